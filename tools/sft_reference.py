#!/usr/bin/env python3
"""Reference for `tandem sft`, independent of Tandem: writes tests/fixtures/sft.json.

1. The masked NLL of random logits (float64) with ignore_index = -100, as
   torch.nn.functional.cross_entropy computes it.
2. Assistant masks of conversations on the tiny preset, from transformers' tokenizer and
   chat template: the labels of every assistant turn (or only the last), each turn's
   span running from the end of the template rendered up to it with
   add_generation_prompt to the end of the template rendered through it.
3. The SFT loss of those tokenized records under the tiny model (transformers, float64).

    python tools/sft_reference.py --tandem target/release/tandem
"""
import argparse
import json
import os
import subprocess
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Green, or red."}],
]


def masked_nll_case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 13, generator=g, dtype=torch.float64) * 2.0
    labels = torch.tensor([3, -100, 12, 0, -100, -100, 7])
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    return {"logits": logits.tolist(), "labels": labels.tolist(), "loss": loss.item()}


def tokenize(tok, turns, last_only):
    full = tok.apply_chat_template(turns, tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    targets = []
    assistant = [k for k, m in enumerate(turns) if m["role"] == "assistant"]
    for k in (assistant[-1:] if last_only else assistant):
        a = tok(tok.apply_chat_template(turns[:k], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] if k > 0 else []
        b = tok(tok.apply_chat_template(turns[:k + 1], tokenize=False), add_special_tokens=False)["input_ids"]
        assert ids[:len(a)] == a and ids[:len(b)] == b, "template is not prefix-stable"
        targets.extend(range(max(len(a), 1), len(b)))
    return ids, targets


def sft_loss(model, records):
    total, n = 0.0, 0
    for ids, targets in records:
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
        logp = torch.log_softmax(logits, -1)
        for t in targets:
            total -= logp[t - 1, ids[t]].item()
            n += 1
    return total / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tandem", default="target/release/tandem")
    ap.add_argument("--out", default="tests/fixtures/sft.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "tiny")
        subprocess.run([args.tandem, "model", "init", "--preset", "tiny", "--seed", "0", "--out", folder], check=True)
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
        cases = []
        for masking, last_only in [("all_assistant", False), ("last_turn", True)]:
            records = [tokenize(tok, c, last_only) for c in CONVERSATIONS]
            with torch.no_grad():
                loss = sft_loss(model, records)
            cases.append({"masking": masking, "records": [{"ids": i, "targets": t} for i, t in records], "loss": loss})
    with open(args.out, "w") as f:
        json.dump({"preset": "tiny", "seed": 0, "conversations": CONVERSATIONS, "masked_nll": masked_nll_case(),
                   "cases": cases}, f)


if __name__ == "__main__":
    main()
