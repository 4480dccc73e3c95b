#!/usr/bin/env python3
"""Writes the reference fixtures Tandem's tests compare against, computed with
PyTorch / transformers (an implementation independent of Tandem's).

    python tools/make_fixtures.py --tandem target/release/tandem \
        --gguf ~/.cache/tandem/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Fixtures (tests/fixtures/):
- tiny.json, tiny-qwen2.json: `tandem model init --preset P --seed 0` written as an HF
  folder, loaded by `AutoModelForCausalLM.from_pretrained`; per-token logprobs and
  entropies of the next token at two temperatures, full logits of one sequence, the
  tokenizer's ids for a few texts and the chat template's rendering.
- smollm2.json: SmolLM2-135M-Instruct loaded by transformers from the Q4_1 GGUF
  (dequantized to f32 by transformers/gguf-py); logprobs, entropies, tokenization.
- gradients-tiny.json, gradients-tiny-qwen2.json: the preset in f64 (eager attention);
  one prompt with two completions of different lengths, loss Σ aₜ·logprobₜ + Σ bₜ·entropyₜ
  over the completion tokens at temperature 0.8; per parameter the first 16 entries of
  its gradient and the gradient's L2 norm (what the fused backward is checked against).
- adamw.json: torch.optim.AdamW (two param groups, weight decay on the matrix only)
  with clip_grad_norm_, three steps on fixed gradients.
The weights hash (sha256 of name + little-endian f32 bytes, names sorted) lets a test
say "the preset changed: regenerate" instead of failing on numbers.
"""
import argparse
import hashlib
import json
import os
import random
import subprocess
import tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "What is 12 + 7?",
    "Hello, world! The answer is 42.",
    "  leading spaces\tand tabs\nnew lines",
    "<|im_start|>user\nhi<|im_end|>",
    "naïve café ünïcödé — 東京",
]
CHAT = [{"role": "user", "content": "What is 2+3?"}]


def weights_hash(path):
    tensors = load_file(path)
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


def token_stats(model, ids, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    z = logits[:-1] / temperature
    logp = torch.log_softmax(z, dim=-1)
    target = torch.tensor(ids[1:])
    lp = logp.gather(1, target[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    return lp.tolist(), ent.tolist(), logits


def cases_for(model, seqs, temperatures):
    out = []
    for ids in seqs:
        for t in temperatures:
            lp, ent, _ = token_stats(model, ids, t)
            out.append({"ids": ids, "temperature": t, "logprobs": lp, "entropy": ent})
    return out


def tokenizer_cases(tok):
    return {
        "encode": [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TEXTS],
        "chat": {
            "messages": CHAT,
            "rendered": tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        },
    }


def preset_fixture(tandem, preset, out_dir):
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, preset)
        subprocess.run([tandem, "model", "init", "--preset", preset, "--seed", "0", "--out", folder], check=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        vocab = model.config.vocab_size
        rng = random.Random(1)
        seqs = [[rng.randrange(vocab) for _ in range(n)] for n in (12, 5, 31)]
        _, _, logits = token_stats(model, seqs[0], 1.0)
        fixture = {
            "preset": preset,
            "seed": 0,
            "weights_sha256": weights_hash(os.path.join(folder, "model.safetensors")),
            "cases": cases_for(model, seqs, [1.0, 0.7]),
            "logits": {"ids": seqs[0], "values": logits.tolist()},
            "tokenizer": tokenizer_cases(tok),
        }
    write(out_dir, f"{preset}.json", fixture)


GRAD_PROMPT = [5, 17, 99, 3, 250, 7, 8, 300, 41]
GRAD_COMPLETIONS = [[40, 41, 42], [50, 51, 52, 53, 54, 55]]
GRAD_TEMPERATURE = 0.8


def gradient_fixture(tandem, preset, out_dir):
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, preset)
        subprocess.run([tandem, "model", "init", "--preset", preset, "--seed", "0", "--out", folder], check=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager")
        model.train()
        total = None
        offset = 0
        for completion in GRAD_COMPLETIONS:
            ids = GRAD_PROMPT + completion
            logits = model(torch.tensor([ids])).logits[0]
            start = len(GRAD_PROMPT)
            z = logits[start - 1:-1] / GRAD_TEMPERATURE
            logp = torch.log_softmax(z, dim=-1)
            lp = logp.gather(1, torch.tensor(completion)[:, None])[:, 0]
            ent = -(logp.exp() * logp).sum(-1)
            idx = torch.arange(offset, offset + len(completion), dtype=torch.float64)
            a = 1.0 + 0.1 * idx
            b = 0.5 - 0.05 * idx
            loss = (lp * a).sum() + (ent * b).sum()
            total = loss if total is None else total + loss
            offset += len(completion)
        total.backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.detach().flatten()
            grads[name] = {"head": g[:16].tolist(), "norm": g.norm().item()}
        fixture = {
            "preset": preset,
            "seed": 0,
            "weights_sha256": weights_hash(os.path.join(folder, "model.safetensors")),
            "prompt": GRAD_PROMPT,
            "completions": GRAD_COMPLETIONS,
            "temperature": GRAD_TEMPERATURE,
            "loss": total.item(),
            "gradients": grads,
        }
    write(out_dir, f"gradients-{preset}.json", fixture)


def smollm2_fixture(gguf, out_dir):
    folder, name = os.path.split(os.path.abspath(gguf))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    chat = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    answer = tok.encode(chat + "2 + 3 = 5<|im_end|>", add_special_tokens=False)
    rng = random.Random(2)
    seqs = [answer, [rng.randrange(model.config.vocab_size) for _ in range(24)]]
    fixture = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "cases": cases_for(model, seqs, [1.0, 0.7]),
        "tokenizer": tokenizer_cases(tok),
    }
    write(out_dir, "smollm2.json", fixture)


def adamw_fixture(out_dir):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    grads = [(torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)) for _ in range(3)]
    pw, pb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    cfg = {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "max_grad_norm": 1.0}
    opt = torch.optim.AdamW(
        [{"params": [pw], "weight_decay": cfg["weight_decay"]}, {"params": [pb], "weight_decay": 0.0}],
        lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"],
    )
    steps = []
    for gw, gb in grads:
        pw.grad, pb.grad = gw.clone(), gb.clone()
        norm = torch.nn.utils.clip_grad_norm_([pw, pb], cfg["max_grad_norm"])
        opt.step()
        steps.append({"grad_w": gw.tolist(), "grad_b": gb.tolist(), "grad_norm": norm.item(),
                      "w": pw.detach().tolist(), "b": pb.detach().tolist()})
    write(out_dir, "adamw.json", {"config": cfg, "w0": w.tolist(), "b0": b.tolist(), "steps": steps})


def write(out_dir, name, obj):
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(obj, f)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tandem", default="target/release/tandem")
    ap.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (tandem model fetch smollm2)")
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    for preset in ("tiny", "tiny-qwen2"):
        preset_fixture(args.tandem, preset, args.out)
        gradient_fixture(args.tandem, preset, args.out)
    adamw_fixture(args.out)
    if args.gguf:
        smollm2_fixture(args.gguf, args.out)


if __name__ == "__main__":
    main()
