#!/usr/bin/env python3
"""Writes tests/fixtures/gemma3-270m.json: Gemma 3 270M (the Q4_K_M GGUF Tandem fetches
as `gemma3-270m`) as transformers loads it, for model/tests/gemma3_gguf.rs.

    tandem model fetch gemma3-270m          # prints the GGUF's path
    python tools/gemma3_gguf_reference.py --gguf PATH

Needs torch, transformers 5 (it reads the config's `rope_parameters`; written with
5.25.0) and gguf (pip install -r tools/requirements.txt). About 4 minutes on two cores.

transformers reads the GGUF itself (`from_pretrained(folder, gguf_file=name)`): its own
reader and dequantization to float32, llama.cpp's +1 on every Gemma norm weight taken
off, the tokenizer rebuilt from the file's vocabulary (GemmaTokenizer: merges recovered
from the token order, byte fallback, spaces as U+2581, no prefix space). None of it is
Tandem's code (candle dequantizes on Tandem's side), so agreement checks the loading and
the forward both.

The fixture holds:
- config: the fields transformers derived (layers, sizes, window, layer types, RoPE bases);
- tokenizer: ids of texts (no special tokens added), their decoding, the BOS transformers
  prepends, the chat template (null: this file carries none);
- weights: per parameter (HF name) its shape, Σw, Σ|w| (float64) and first 8 values, so a
  disagreement can be placed in the loading before the forward is suspected;
- cases: per-token logprobs and entropies (eager attention, float32) of a short text at
  two temperatures, a text longer than the 512-token window (local layers must forget),
  and random ids;
- greedy: 8 tokens decoded greedily after the long text with the KV cache (the path
  Tandem's engine takes through its paged cache), their logprobs (temperature 1) and the
  gap to the runner-up at each step (checked here to be far above the forwards' rounding
  differences, so the argmax cannot flip between implementations).
"""
import argparse
import hashlib
import json
import os
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from make_fixtures import CHAT, TEXTS, cases_for, write

GEMMA_TEXTS = [
    "<start_of_turn>user\nWhat is 2+3?<end_of_turn>\n<start_of_turn>model\n",
    "two  spaces,   three, and\ttabs\n\nnew paragraphs\n\n\n",
    " leading space and trailing space ",
    "Emoji 🤖🎉, rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and a control \x01 byte",
    "def f(x):\n    return x ** 2  # square\n",
    "<bos>literal special tokens <eos> in text <pad>",
    "Zürich, Kraków, Đà Nẵng, Ελληνικά, Русский, العربية, हिन्दी, 한국어",
]

SHORT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"


def long_text():
    """About 700 tokens of numbered sentences: past the 512-token window."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    things = ["apple", "river", "mountain", "book", "engine", "garden", "violin", "comet"]
    rng = random.Random(7)
    parts = [f"Note {i}: the {rng.choice(colours)} {rng.choice(things)} is number {i * 7 % 13}." for i in range(70)]
    return " ".join(parts)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_stats(model):
    out = {}
    for name, p in model.named_parameters():
        w = p.detach().to(torch.float64)
        out[name] = {
            "shape": list(p.shape),
            "sum": w.sum().item(),
            "abs_sum": w.abs().sum().item(),
            "head": w.flatten()[:8].tolist(),
        }
    return out


def tokenizer_cases(tok):
    cases = []
    for text in TEXTS + GEMMA_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids)})
    with_bos = tok.encode(TEXTS[0])
    return {
        "encode": cases,
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "with_special_tokens": {"text": TEXTS[0], "ids": with_bos},
        "chat_template": tok.chat_template,
        "chat": None if tok.chat_template is None else {
            "messages": CHAT,
            "rendered": tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        },
    }


def config_fields(cfg):
    return {
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "sliding_window": cfg.sliding_window,
        "layer_types": cfg.layer_types,
        "rope_theta": cfg.rope_parameters["full_attention"]["rope_theta"],
        "rope_local_theta": cfg.rope_parameters["sliding_attention"]["rope_theta"],
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }


def greedy(model, ids, n):
    """`n` tokens by argmax with the KV cache, their logprobs and the runner-up gaps."""
    tokens, logprobs, gaps = [], [], []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            z = torch.log_softmax(out.logits[0, -1].to(torch.float64), dim=-1)
            top = torch.topk(z, 2)
            token = int(top.indices[0])
            tokens.append(token)
            logprobs.append(z[token].item())
            gaps.append((top.values[0] - top.values[1]).item())
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    assert min(gaps) > 1e-2, f"a near tie in the greedy continuation: {gaps}"
    return {"prompt": ids, "tokens": tokens, "logprobs": logprobs, "gaps": gaps}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = os.path.expanduser("~/.cache/tandem/models/gemma3-270m/gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--gguf", default=default)
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    # The reference must be the dequantized float32 weights in plain modules, not a
    # kernel computing on the packed blocks.
    for pname, p in model.named_parameters():
        assert p.dtype == torch.float32, f"{pname} is {p.dtype}"
    for mname, m in model.named_modules():
        assert "Gguf" not in type(m).__name__, f"{mname} is {type(m).__name__}: weights left packed"
    bos = tok.bos_token_id
    short = [bos] + tok.encode(SHORT, add_special_tokens=False)
    long = [bos] + tok.encode(long_text(), add_special_tokens=False)
    assert len(long) > model.config.sliding_window + 100, len(long)
    rng = random.Random(2)
    noise = [bos] + [rng.randrange(model.config.vocab_size) for _ in range(23)]
    torch.manual_seed(0)
    fixture = {
        "model": name,
        "sha256": sha256(args.gguf),
        "transformers": __import__("transformers").__version__,
        "config": config_fields(model.config),
        "tokenizer": tokenizer_cases(tok),
        "weights": weight_stats(model),
        "cases": cases_for(model, [short, noise], [1.0, 0.7]) + cases_for(model, [long], [1.0]),
        "greedy": greedy(model, long, 8),
    }
    write(args.out, "gemma3-270m.json", fixture)


if __name__ == "__main__":
    main()
