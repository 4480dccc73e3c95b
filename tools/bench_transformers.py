#!/usr/bin/env python3
"""PyTorch/transformers reference numbers for the side-by-side model benchmark.

Measures SmolLM2-135M-Instruct (loaded from a GGUF file and dequantized by
transformers to f32), or with --config DIR a random model of the shape of DIR's
config.json (what `tandem bench model --preset NAME` passes: the preset's shape, e.g.
Qwen3-0.6B's), on the CPU, with a fixed thread count, in four phases:

  decode_bB       greedy model.generate() of --new-tokens tokens with the KV cache
                  for B identical rows of a fixed 16-token prompt (one phase per B in
                  --decode-batches); includes the 16-token prefill.
                  tokens_per_s = B * new_tokens / seconds.
  fwd_bwd         forward + backward of -mean(next-token log-prob) on a
                  deterministic (train_batch, train_len) batch of token ids.
                  tokens_per_s = train_batch * train_len / seconds.
  optimizer_step  one torch.optim.AdamW(lr=1e-6) step over all parameters
                  (grads populated beforehand by a small 1x16 fwd+bwd).

Each phase runs in its own subprocess so that its peak RSS is measured on its own:
peak_rss_mib is the child's ru_maxrss over its whole life (so it includes the GGUF
load/dequantization transient, load_peak_rss_mib); phase_peak_rss_mib is the peak
after the watermark is reset once the model is loaded (resident f32 model + the
phase's own working set), the fairer number when load paths differ. "seconds" is
the median over --reps timed repetitions, after one untimed warm-up.

The Rust side (`tandem bench model`) runs the same four phases on the same GGUF
with the same thread count, prompt, lengths and batch sizes, and prints the same
JSON shape; compare the two phase by phase (seconds, tokens_per_s, peak_rss_mib).
The result is the last line of stdout, one line of JSON (tools/bench_protocol.py
parses the arguments and writes it, for this script and its phases); progress goes
to stderr.

  /root/refvenv/bin/python tools/bench_transformers.py --gguf PATH | --config DIR [--threads 2] \
      [--new-tokens 64] [--decode-batches 1,8] [--train-batch 4] [--train-len 128] \
      [--reps 3] [--phase NAME]
"""
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import bench_protocol as protocol

PROMPT = list(range(100, 116))  # 16 fixed token ids
PAD_ID = 2


def log(*a):
    print("[bench_transformers]", *a, file=sys.stderr, flush=True)


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def reset_peak_rss():
    """Reset the peak-RSS watermark (Linux >= 4.0); ru_maxrss then restarts from current RSS."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(fn, reps, sync=lambda: None):
    """Median seconds of `reps` calls after a warm-up; `sync` waits for queued device
    work (tools/gpu_reference.py passes torch.cuda.synchronize)."""
    fn()  # warm-up
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_seconds(model, b, n, reps, pad_id, device="cpu", sync=lambda: None):
    """Median seconds to decode exactly `n` greedy tokens after `b` copies of PROMPT."""
    ids = torch.tensor([PROMPT] * b, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)

    def gen(k):
        with torch.inference_mode():
            o = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k,
                               min_new_tokens=k, do_sample=False, use_cache=True,
                               pad_token_id=pad_id)
        assert o.shape == (b, len(PROMPT) + k), o.shape

    gen(4)  # warm-up (timed() adds a full-length one too)
    return timed(lambda: gen(n), reps, sync)


def fwd_bwd_seconds(model, batch, seq_len, reps, device="cpu", sync=lambda: None):
    """(median seconds, last loss) of a forward and backward pass of the next-token loss
    on a seeded random (batch, seq_len) batch."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g).to(device)
    losses = []

    def step():
        model.zero_grad(set_to_none=True)
        loss = next_token_loss(model, ids)
        loss.backward()
        losses.append(loss.item())

    return timed(step, reps, sync), losses[-1]


def next_token_loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return -tok_logp.mean()


def run_phase(args):
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model = protocol.load_model(args, torch.float32)
    load_peak = rss_mib()
    out = {"load_seconds": round(time.perf_counter() - t, 3),
           "load_peak_rss_mib": round(load_peak, 1)}
    can_reset = reset_peak_rss()
    log(f"{args.phase}: model loaded in {out['load_seconds']}s")

    if args.phase.startswith("decode_b"):
        b, n = int(args.phase[len("decode_b"):]), args.new_tokens
        model.eval()
        secs = decode_seconds(model, b, n, args.reps, PAD_ID)
        out.update(seconds=secs, tokens_per_s=b * n / secs, batch=b, prompt_len=len(PROMPT),
                   new_tokens=n)

    elif args.phase == "fwd_bwd":
        model.train()  # Llama config has no dropout, so this matches eval numerics
        secs, loss = fwd_bwd_seconds(model, args.train_batch, args.train_len, args.reps)
        ntok = args.train_batch * args.train_len
        out.update(seconds=secs, tokens_per_s=ntok / secs, batch=args.train_batch,
                   seq_len=args.train_len, loss=loss)

    elif args.phase == "optimizer_step":
        model.train()
        next_token_loss(model, torch.tensor([PROMPT])).backward()  # small, to populate grads
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6)
        secs = timed(opt.step, args.reps)
        out.update(seconds=secs, n_params=sum(p.numel() for p in params))

    else:
        raise SystemExit(f"unknown phase {args.phase!r}")

    out["peak_rss_mib"] = round(max(load_peak, rss_mib()), 1)  # whole child process
    if can_reset:  # peak from the end of loading on: resident model + this phase's working set
        out["phase_peak_rss_mib"] = round(rss_mib(), 1)
    log(f"{args.phase}: {out['seconds']:.4f}s, peak RSS {out['peak_rss_mib']} MiB")
    protocol.emit(protocol.model_phase(args.phase, **out))


def main():
    args = protocol.model_parser(description=__doc__.split("\n")[0]).parse_args()

    if args.phase:
        return run_phase(args)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    phases = {}
    for ph in protocol.model_phases(args.decode_batches):
        log(f"running phase {ph}")
        cmd = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:] + ["--phase", ph]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        if p.returncode != 0:
            raise SystemExit(f"phase {ph} failed with exit code {p.returncode}")
        phases[ph] = json.loads(p.stdout.strip().splitlines()[-1])
    protocol.emit(protocol.model_result(
        args.threads, phases, torch=torch.__version__,
        transformers=__import__("transformers").__version__))


if __name__ == "__main__":
    main()
