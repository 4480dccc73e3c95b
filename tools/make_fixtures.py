#!/usr/bin/env python3
"""Writes the reference fixtures Tandem's tests compare against, computed with
PyTorch / transformers (an implementation independent of Tandem's).

    python tools/make_fixtures.py --tandem target/release/tandem \
        --gguf ~/.cache/tandem/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Fixtures (tests/fixtures/):
- tiny.json, tiny-qwen2.json, tiny-qwen3.json, tiny-gemma3.json: `tandem model init --preset P --seed 0` written as an HF
  folder, loaded by `AutoModelForCausalLM.from_pretrained`; per-token logprobs and
  entropies of the next token at two temperatures, full logits of one sequence, the
  tokenizer's ids for a few texts and the chat template's rendering.
- smollm2.json: SmolLM2-135M-Instruct loaded by transformers from the Q4_1 GGUF
  (dequantized to f32 by transformers/gguf-py); logprobs, entropies, tokenization.
- gradients-tiny.json, gradients-tiny-qwen2.json, gradients-tiny-qwen3.json, gradients-tiny-gemma3.json: the preset in f64 (eager attention);
  one prompt with two completions of different lengths, loss Σ aₜ·logprobₜ + Σ bₜ·entropyₜ
  over the completion tokens at temperature 0.8; per parameter the first 16 entries of
  its gradient and the gradient's L2 norm (what the fused backward is checked against).
- qwen3.json (`--only qwen3` writes it alone, without a tandem binary): tiny random
  Qwen3ForCausalLM models built by transformers in f64 (eager attention), with
  RMSNorm and the RoPE tables patched to compute in f64 too, in the awkward shapes:
  head_dim ≠ hidden / heads, GQA 3:1 and 1:1, tied and untied embeddings. Their
  weights come from a generator both sides compute exactly (`det_values`: splitmix64
  over an FNV-1a seed of the name), so no weights are committed; each case holds the
  config.json transformers saved, per-token logprobs and entropies, and the gradient
  fixture's loss and per-parameter gradients (first 16 entries and L2 norm).
- gemma3.json (`--only gemma3`): the same for tiny random Gemma3ForCausalLM models
  (norms, RoPE tables and softmax patched to f64): local layers whose window is
  shorter than every sequence around global ones, head_dim ≠ hidden / heads, GQA 3:1
  and 1:1, query_pre_attn_scalar ≠ head_dim, tied and untied, a soft-capped output
  and linear RoPE scaling on the global layers.
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


PRESETS = ("tiny", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3")
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


MASK64 = (1 << 64) - 1


def fnv1a64(text):
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK64
    return h


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def det_values(name, n):
    """The n values of parameter `name`, exact in f64 on any machine: norms
    1 + 0.4·(u − ½), everything else 0.5·(u − ½), u = splitmix64(seed + i) / 2⁶⁴
    (53 bits), seed = FNV-1a-64(name). model/tests/qwen3.rs computes the same."""
    seed = fnv1a64(name)
    base, scale = (1.0, 0.4) if name.endswith("norm.weight") else (0.0, 0.5)
    return [base + scale * ((splitmix64((seed + i) & MASK64) >> 11) / 2.0**53 - 0.5) for i in range(n)]


QWEN3_CONFIGS = {
    # head_dim 16 ≠ 48 / 6, GQA 3:1, tied embeddings.
    "gqa3-tied": dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                      rope_theta=1_000_000.0, tie_word_embeddings=True),
    # head_dim 8 ≠ 40 / 4, one KV head per query head, untied head.
    "mha-untied": dict(vocab_size=96, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=8, rms_norm_eps=1e-5,
                       rope_theta=10_000.0, tie_word_embeddings=False),
}
QWEN3_SEQS = [[5, 17, 90, 3, 25, 7, 8, 30, 41, 60, 2, 11], [44, 1, 95]]
QWEN3_PROMPT = [5, 17, 90, 3, 25, 7, 8, 30, 41]
QWEN3_COMPLETIONS = [[40, 41, 42], [50, 51, 52, 53, 54, 55]]


def f64_eager_attention(modeling):
    """transformers' eager attention with the softmax in the scores' dtype (it forces
    f32), for a `modeling` module's `repeat_kv`."""
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
        assert softcap is None, "attention soft-capping is not part of these references"
        k = modeling.repeat_kv(key, module.num_key_value_groups)
        v = modeling.repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs
    return attention


def patch_qwen3_to_f64(modeling):
    """transformers computes RMSNorm, the RoPE tables and the eager attention's softmax
    in f32 whatever the model's dtype; the same formulas in the input's dtype make the
    reference f64 throughout."""
    def norm_forward(self, h):
        variance = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(variance + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        dim = self.inv_freq.shape[0] * 2
        inv = 1.0 / (self.config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    modeling.Qwen3RMSNorm.forward = norm_forward
    modeling.eager_attention_forward = f64_eager_attention(modeling)
    modeling.Qwen3RotaryEmbedding.forward = rope_forward


def qwen3_case(name, kwargs):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(**kwargs, attn_implementation="eager")
    return family_case(name, Qwen3ForCausalLM(config).to(torch.float64))


def qwen3_fixture(out_dir):
    import transformers.models.qwen3.modeling_qwen3 as modeling
    patch_qwen3_to_f64(modeling)
    cases = [qwen3_case(name, kwargs) for name, kwargs in QWEN3_CONFIGS.items()]
    write(out_dir, "qwen3.json", {"models": cases})


GEMMA3_CONFIGS = {
    # Local layers (window 4, shorter than every sequence) around a global one,
    # head_dim 16 ≠ 48 / 6, GQA 3:1, query_pre_attn_scalar ≠ head_dim, tied.
    "local-global-gqa3-tied": dict(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        tie_word_embeddings=True),
    # One KV head per query head, untied head, a soft-capped output, linear RoPE scaling
    # on the global layer, the window of 3 crossing a shared prompt.
    "mha-untied-softcap": dict(
        vocab_size=96, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, rms_norm_eps=1e-5,
        query_pre_attn_scalar=8, sliding_window=3, final_logit_softcapping=5.0,
        layer_types=["full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}},
        tie_word_embeddings=False),
}


def patch_gemma3_to_f64(modeling):
    """Gemma 3's RMSNorm, RoPE tables and eager softmax computed in the input's dtype
    (transformers forces f32 in each), so that the reference is f64 throughout."""
    def norm_forward(self, h):
        variance = h.pow(2).mean(-1, keepdim=True)
        return (h * torch.rsqrt(variance + self.eps)) * (1.0 + self.weight)

    def rope_forward(self, x, position_ids, layer_type):
        params = self.config.rope_parameters[layer_type]
        dim = self.config.head_dim
        inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        if params["rope_type"] == "linear":
            inv = inv / params["factor"]
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    modeling.Gemma3RMSNorm.forward = norm_forward
    modeling.eager_attention_forward = f64_eager_attention(modeling)
    modeling.Gemma3RotaryEmbedding.forward = rope_forward


def set_det_weights(model):
    """Every parameter of `model` (f64) set to `det_values` of its name."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(torch.tensor(det_values(pname, p.numel()), dtype=torch.float64).reshape(p.shape))


def saved_config(model):
    """The config.json transformers writes for `model`."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            return json.load(f)


def completion_loss(model):
    """The gradient fixtures' loss: Σ aₜ·logprobₜ + Σ bₜ·entropyₜ over the completion
    tokens of QWEN3_COMPLETIONS after QWEN3_PROMPT at GRAD_TEMPERATURE, a = 1 + 0.1·t,
    b = 0.5 − 0.05·t, t counting the tokens of both completions."""
    total, offset = None, 0
    for completion in QWEN3_COMPLETIONS:
        ids = QWEN3_PROMPT + completion
        logits = model(torch.tensor([ids])).logits[0]
        z = logits[len(QWEN3_PROMPT) - 1:-1] / GRAD_TEMPERATURE
        logp = torch.log_softmax(z, dim=-1)
        lp = logp.gather(1, torch.tensor(completion)[:, None])[:, 0]
        ent = -(logp.exp() * logp).sum(-1)
        idx = torch.arange(offset, offset + len(completion), dtype=torch.float64)
        loss = (lp * (1.0 + 0.1 * idx)).sum() + (ent * (0.5 - 0.05 * idx)).sum()
        total = loss if total is None else total + loss
        offset += len(completion)
    return total


def family_case(name, model):
    """A model with `det_values` weights: its saved config, logprobs and entropies of
    the shared sequences, and the gradient fixture's loss and gradients."""
    set_det_weights(model)
    hf_config = saved_config(model)
    model.eval()
    cases = cases_for(model, QWEN3_SEQS, [1.0, 0.7])
    model.train()
    total = completion_loss(model)
    total.backward()
    grads = {}
    for pname, p in model.named_parameters():
        g = p.grad.detach().flatten()
        grads[pname] = {"head": g[:16].tolist(), "norm": g.norm().item()}
    return {
        "name": name,
        "config": hf_config,
        "cases": cases,
        "prompt": QWEN3_PROMPT,
        "completions": QWEN3_COMPLETIONS,
        "temperature": GRAD_TEMPERATURE,
        "loss": total.item(),
        "gradients": grads,
    }


def gemma3_fixture(out_dir):
    import transformers.models.gemma3.modeling_gemma3 as modeling
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    patch_gemma3_to_f64(modeling)
    cases = []
    for name, kwargs in GEMMA3_CONFIGS.items():
        config = Gemma3TextConfig(**kwargs, attn_implementation="eager")
        cases.append(family_case(name, Gemma3ForCausalLM(config).to(torch.float64)))
    write(out_dir, "gemma3.json", {"models": cases})


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
    ap.add_argument("--only", choices=["qwen3", "gemma3", *PRESETS],
                    help="write only these fixtures: qwen3.json, gemma3.json, or one preset's two files")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    if args.only == "qwen3":
        qwen3_fixture(args.out)
        return
    if args.only == "gemma3":
        gemma3_fixture(args.out)
        return
    if args.only:
        preset_fixture(args.tandem, args.only, args.out)
        gradient_fixture(args.tandem, args.only, args.out)
        return
    qwen3_fixture(args.out)
    gemma3_fixture(args.out)
    for preset in PRESETS:
        preset_fixture(args.tandem, preset, args.out)
        gradient_fixture(args.tandem, preset, args.out)
    adamw_fixture(args.out)
    if args.gguf:
        smollm2_fixture(args.gguf, args.out)


if __name__ == "__main__":
    main()
