#!/usr/bin/env python3
"""PyTorch/transformers side of scripts/gpu-check.sh: the same model folder, the same
device, the same dtype as Tandem, in the same run. Only stdout carries JSON; progress
goes to stderr.

  init      --shape DIR --out DIR [--seed 0]
            A randomly initialised model (transformers' own init: N(0, 0.02) matrices,
            unit norms) with the config and tokenizer files of DIR, saved as f32
            safetensors: SmolLM2-135M's shape when its weights cannot travel.
  inputs    --model DIR --out FILE.jsonl
            Fixed scoring records {prompt_ids, completion_ids}: text encoded with the
            model's tokenizer (chat-like and plain) plus seeded random ids.
  logprobs  --model DIR --input FILE.jsonl --output FILE.jsonl [--device cuda] [--dtype f32]
            Per completion token: log softmax(logits)[token] and the entropy, one record
            per line as `tandem score` writes them ({"logprobs": [...], "entropy": [...]}).
            Logits are computed in --dtype and widened to f32 for the softmax (as TRL
            and verl do); one sequence per forward, so no padding is involved. Several
            dtypes (--dtype f32,bf16) run in one process; `{dtype}` in --output is
            replaced by each.
  compare   --reference FILE.jsonl NAME=FILE.jsonl ...
            Max and mean |Δ| of logprobs and entropies of each file against the reference.
  bench     --model DIR [--device cuda] [--dtype bf16] [--decode-batches 1,8,64]
            [--new-tokens 128] [--train-batch 8] [--train-len 512] [--reps 3]
            The phases of `tandem bench model` (decode_bB: greedy generate of exactly
            new_tokens tokens after a fixed 16-token prompt for B rows, with the KV cache;
            fwd_bwd: forward + backward of -mean(next-token logprob) on a seeded
            train_batch x train_len batch; optimizer_step: one AdamW step), each timed
            as the median of --reps after a warm-up, with torch.cuda.synchronize().
"""
import argparse
import json
import os
import shutil
import sys
import time

import torch

# The decode prompt (the 16 ids `tandem bench model` decodes from), the timing and the
# training loss are the CPU reference's, so both benches measure the same work.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_transformers import decode_seconds, fwd_bwd_seconds, timed  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
COPIED = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt"]


def log(*a):
    print("[gpu_reference]", *a, file=sys.stderr, flush=True)


def load(path, device, dtype):
    from transformers import AutoModelForCausalLM
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=DTYPES[dtype])
    return m.to(device)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def cmd_init(a):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(a.seed)
    cfg = AutoConfig.from_pretrained(a.shape)
    model = AutoModelForCausalLM.from_config(cfg).float()
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    for f in COPIED:
        src = os.path.join(a.shape, f)
        if os.path.exists(src) and f != "config.json":
            shutil.copy(src, os.path.join(a.out, f))
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": a.out, "seed": a.seed, "params": n}))


TEXTS = [
    ("<|im_start|>user\nWhat is 7 + 5? Answer with the number only.<|im_end|>\n"
     "<|im_start|>assistant\n", "12<|im_end|>"),
    ("The capital of France is", " Paris, a city on the Seine known for its museums, "
     "cafés and the Eiffel Tower, which was built for the 1889 World's Fair."),
    ("def fibonacci(n):\n", "    if n < 2:\n        return n\n"
     "    return fibonacci(n - 1) + fibonacci(n - 2)\n"),
    ("Once upon a time, in a small village by the sea,", " there lived an old fisherman "
     "who had never caught a single fish. Every morning he rowed out before dawn."),
]


def cmd_inputs(a):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model)
    g = torch.Generator().manual_seed(0)
    vocab = json.load(open(os.path.join(a.model, "config.json")))["vocab_size"]
    recs = []
    for p, c in TEXTS:
        recs.append({"prompt_ids": tok.encode(p, add_special_tokens=False),
                     "completion_ids": tok.encode(c, add_special_tokens=False)})
    for plen, clen in [(8, 24), (40, 64), (100, 156), (16, 16)]:
        ids = torch.randint(0, vocab, (plen + clen,), generator=g).tolist()
        recs.append({"prompt_ids": ids[:plen], "completion_ids": ids[plen:]})
    with open(a.out, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    print(json.dumps({"records": len(recs),
                      "tokens": sum(len(r["completion_ids"]) for r in recs)}))


def cmd_logprobs(a):
    dtypes = a.dtype.split(",")
    if len(dtypes) > 1 and "{dtype}" not in a.output:
        raise SystemExit("--output needs `{dtype}` when --dtype lists several")
    for dt in dtypes:
        if dt not in DTYPES:
            raise SystemExit(f"unknown dtype {dt!r} (expected {', '.join(DTYPES)})")
        logprobs_one(a, dt, a.output.replace("{dtype}", dt))


def logprobs_one(a, dtype, output):
    model = load(a.model, a.device, dtype).eval()
    out = []
    with torch.inference_mode():
        for line in open(a.input):
            r = json.loads(line)
            ids = r["prompt_ids"] + r["completion_ids"]
            x = torch.tensor([ids], device=a.device)
            logits = model(input_ids=x, use_cache=False).logits[0].float() / a.temperature
            logp = torch.log_softmax(logits, dim=-1)
            start = len(r["prompt_ids"])
            tgt = x[0, start:]
            rows = logp[start - 1:len(ids) - 1]
            lp = rows.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            ent = -(rows.exp() * rows).sum(-1)
            out.append({"logprobs": lp.tolist(), "entropy": ent.tolist()})
    with open(output, "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    print(json.dumps({"records": len(out), "device": a.device, "dtype": dtype}))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def cmd_compare(a):
    ref = read_jsonl(a.reference)
    result = {"reference": a.reference, "against": {}}
    for spec in a.files:
        name, path = spec.split("=", 1)
        try:
            got = read_jsonl(path)
        except OSError as e:
            result["against"][name] = {"error": str(e)}
            continue
        if len(got) != len(ref):
            result["against"][name] = {"error": f"{len(got)} records, reference has {len(ref)}"}
            continue
        stats = {}
        for key in ("logprobs", "entropy"):
            d = []
            for r, g in zip(ref, got):
                if len(r[key]) != len(g[key]):
                    stats["error"] = "token counts differ"
                    break
                d += [abs(x - y) for x, y in zip(r[key], g[key])]
            if d:
                stats[f"{key}_max_abs_diff"] = max(d)
                stats[f"{key}_mean_abs_diff"] = sum(d) / len(d)
        stats["tokens"] = sum(len(r["logprobs"]) for r in ref)
        result["against"][name] = stats
    print(json.dumps(result, indent=2))


def cmd_bench(a):
    dev = a.device
    t = time.perf_counter()
    model = load(a.model, dev, a.dtype)
    sync(dev)
    res = {"engine": "transformers", "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "device": dev,
           "dtype": a.dtype, "load_seconds": time.perf_counter() - t, "phases": {}}
    if dev.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name(0)
    pad = model.config.pad_token_id
    pad = pad if pad is not None else 0
    model.eval()
    for b in [int(x) for x in a.decode_batches.split(",") if x.strip()]:
        secs = decode_seconds(model, b, a.new_tokens, a.reps, pad, dev, lambda: sync(dev))
        res["phases"][f"decode_b{b}"] = {"seconds": secs,
                                         "tokens_per_s": b * a.new_tokens / secs}
        log(f"decode_b{b}: {b * a.new_tokens / secs:.1f} tok/s")
    model.train()
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    secs, loss = fwd_bwd_seconds(model, a.train_batch, a.train_len, a.reps, dev,
                                 lambda: sync(dev))
    ph = {"seconds": secs, "tokens_per_s": a.train_batch * a.train_len / secs, "loss": loss}
    if dev.startswith("cuda"):
        ph["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    res["phases"]["fwd_bwd"] = ph
    log(f"fwd_bwd: {ph['tokens_per_s']:.1f} tok/s")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    res["phases"]["optimizer_step"] = {"seconds": timed(opt.step, a.reps, lambda: sync(dev))}
    out = json.dumps(res, indent=2)
    print(out)
    if a.json:
        with open(a.json, "w") as f:
            f.write(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init")
    p.add_argument("--shape", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("inputs")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("logprobs")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="f32", help="f32, bf16, f16 or a comma-separated list")
    p.add_argument("--temperature", type=float, default=1.0)
    p = sub.add_parser("compare")
    p.add_argument("--reference", required=True)
    p.add_argument("files", nargs="+", help="NAME=FILE.jsonl")
    p = sub.add_parser("bench")
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--decode-batches", default="1,8,64")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # f32 means f32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    {"init": cmd_init, "inputs": cmd_inputs, "logprobs": cmd_logprobs, "compare": cmd_compare,
     "bench": cmd_bench}[a.cmd](a)


if __name__ == "__main__":
    main()
