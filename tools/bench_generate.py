#!/usr/bin/env python3
"""Reference for `tandem bench generate`: transformers' `generate` on the same prompts.

Reads the workload `tandem bench generate` wrote (--workload JSON: prompts as token
ids, stop_token_ids, samples per prompt, max_new_tokens, temperature, seed), loads
SmolLM2 with transformers from the GGUF (dequantized to f32) with a fixed thread
count (with --config DIR instead, a random model of the shape of DIR's config.json:
what `tandem bench generate --preset NAME` passes), and samples `samples` completions of each of the first --prompts prompts in one
`generate` call (num_return_sequences, prompts left-padded to the longest, KV cache,
temperature as given, top_k 0, top_p 1, stopping at the stop tokens or
max_new_tokens).

Prints one JSON line, the last of stdout: tok_per_s (generated tokens, each completion
counted up to and including its stop token, over the wall time of the call), seconds,
tokens, sequences, max_running, peak_rss_mib (ru_maxrss of the process, model load
included). tools/bench_protocol.py parses the arguments, reads the workload and writes
the result.

  python3 tools/bench_generate.py --gguf PATH | --config DIR --workload workload.json \
      [--prompts 8] [--threads 2] [--device cpu|cuda] [--dtype f32|bf16]

--gguf also takes an HF model folder (as on the GPU machine).
"""
import resource
import sys
import time

import torch

import bench_protocol as protocol


def log(*a):
    print("[bench_generate]", *a, file=sys.stderr, flush=True)


def main():
    args = protocol.generate_parser(description=__doc__).parse_args()
    torch.set_num_threads(args.threads)
    w = protocol.read_workload(args.workload)
    prompts = w["prompts"][: args.prompts]
    stop = w["stop_token_ids"]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = protocol.load_model(args, dtype).to(args.device).eval()
    pad = stop[0] if stop else 0
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=args.device)
    attn = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=args.device)
    torch.manual_seed(w["seed"])
    kwargs = dict(
        attention_mask=attn,
        do_sample=True,
        temperature=w["temperature"],
        top_k=0,
        top_p=1.0,
        num_return_sequences=w["samples"],
        eos_token_id=stop or None,
        pad_token_id=pad,
    )
    with torch.inference_mode():
        # Warm-up: two tokens.
        model.generate(ids[:1], max_new_tokens=2, **{**kwargs, "attention_mask": attn[:1]})
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=w["max_new_tokens"], **kwargs)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
    tokens = 0
    for row in out[:, longest:].tolist():
        n = len(row)
        for i, x in enumerate(row):
            if x in stop:
                n = i + 1
                break
        tokens += n
    log(f"{tokens} tokens in {secs:.1f}s")
    protocol.emit(protocol.generate_result(
        seconds=secs,
        tokens=tokens,
        sequences=len(prompts) * w["samples"],
        max_running=len(prompts) * w["samples"],
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    ))


if __name__ == "__main__":
    main()
