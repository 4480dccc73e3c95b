#!/usr/bin/env python3
"""LoRA references from PEFT (an implementation independent of Tandem's).

    python tools/lora_reference.py [fixture] [--out tests/fixtures]
    python tools/lora_reference.py check-saved --base BASE_DIR --adapter ADAPTER_DIR \\
        --merged MERGED_DIR --ids 1,2,3,... [--tandem target/release/tandem]

Needs torch, transformers 5 and peft (pip install -r tools/requirements.txt; written
with torch 2.15.0, transformers 5.25.0, peft 0.22.0, the versions are in the fixture).

`fixture` (the default) writes tests/fixtures/lora.json. Per case, a tiny model of
make_fixtures.py (QWEN3_CONFIGS / GEMMA3_CONFIGS, f64 throughout, eager attention, base
weights `det_values` of their HF names) wrapped by `peft.get_peft_model` (LoraConfig with
the case's r, lora_alpha, target_modules, use_rslora; no dropout, no bias). Every LoRA
tensor, A (r, in) and B (out, r), B non-zero, is set to `det_values` of its name in
adapter_model.safetensors (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`:
the parameter's name without the adapter name `.default`). PEFT computes
y = W·x + scale·B·(A·x), scale = lora_alpha / r, or lora_alpha / √r with use_rslora.
Each case holds:
- config: the config.json transformers saves for the base model; lora: the LoraConfig;
- cases: per-token logprobs and entropies of make_fixtures' QWEN3_SEQS at temperatures 1
  and 0.7 with the adapter applied (its `det_values` weights, before the AdamW step), and
  merge_max_abs_diff: the largest difference of those numbers after merge_and_unload();
- loss, gradients: make_fixtures' gradient loss (QWEN3_PROMPT, QWEN3_COMPLETIONS,
  temperature 0.8, Σ aₜ·logprobₜ + Σ bₜ·entropyₜ) through the PEFT model in training mode,
  and per LoRA tensor (by saved name) the first 16 entries of its gradient and its L2
  norm; the base is frozen and has none;
- adamw, updated: one torch.optim.AdamW step over the LoRA tensors only from those
  gradients, and per LoRA tensor the first 16 entries of its new value and its L2 norm.

`check-saved` checks an adapter in PEFT's format and the merged model written from it
(Tandem writes both): the base loaded by transformers (f32) with
`PeftModel.from_pretrained(base, ADAPTER_DIR)` and `AutoModelForCausalLM.from_pretrained
(MERGED_DIR)` give the per-token logprobs (temperature 1) of the ids; it prints
{"peft_logprobs", "merged_logprobs", "max_abs_diff"} as one JSON line and exits 1 when
max_abs_diff > 1e-4. With --tandem, `tandem score` on the merged model too
("tandem_logprobs", "tandem_max_abs_diff", in the same bound). A Tandem-trained adapter:

    tandem sft examples/tiny-sft.toml --set train.out_dir='"base"'
    tandem sft examples/tiny-sft.toml --set model.path='"base/final"' \\
        --set train.out_dir='"ad"' --set lora.rank=8 --set lora.rslora=true
    tandem model merge --base base/final --adapter ad/final --out merged
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import (  # noqa: E402
    GEMMA3_CONFIGS, GRAD_TEMPERATURE, QWEN3_COMPLETIONS, QWEN3_CONFIGS, QWEN3_PROMPT, QWEN3_SEQS,
    cases_for, completion_loss, det_values, patch_gemma3_to_f64, patch_qwen3_to_f64, saved_config,
    set_det_weights, token_stats, write)

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [
    dict(name="qwen3-all", family="qwen3", config="gqa3-tied",
         lora=dict(r=4, lora_alpha=8, target_modules=ALL_MODULES, use_rslora=False)),
    dict(name="gemma3-rslora-subset", family="gemma3", config="local-global-gqa3-tied",
         lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)),
    dict(name="qwen3-rslora", family="qwen3", config="mha-untied",
         lora=dict(r=2, lora_alpha=3, target_modules=ALL_MODULES, use_rslora=True)),
]
ADAMW = {"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
MERGE_TOLERANCE = 1e-10
SAVED_TOLERANCE = 1e-4


def base_model(family, config):
    """The f64 model of make_fixtures (transformers patched to compute in f64)."""
    if family == "qwen3":
        import transformers.models.qwen3.modeling_qwen3 as modeling
        from transformers import Qwen3Config, Qwen3ForCausalLM
        patch_qwen3_to_f64(modeling)
        cfg = Qwen3Config(**QWEN3_CONFIGS[config], attn_implementation="eager")
        return Qwen3ForCausalLM(cfg).to(torch.float64)
    import transformers.models.gemma3.modeling_gemma3 as modeling
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    patch_gemma3_to_f64(modeling)
    cfg = Gemma3TextConfig(**GEMMA3_CONFIGS[config], attn_implementation="eager")
    return Gemma3ForCausalLM(cfg).to(torch.float64)


def saved_name(name):
    """The name PEFT writes into adapter_model.safetensors: without the adapter name."""
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def head_norm(t):
    t = t.detach().flatten()
    return {"head": t[:16].tolist(), "norm": t.norm().item()}


def max_case_diff(a, b):
    return max(abs(x - y) for ca, cb in zip(a, b, strict=True) for key in ("logprobs", "entropy")
               for x, y in zip(ca[key], cb[key], strict=True))


def lora_case(case):
    model = base_model(case["family"], case["config"])
    set_det_weights(model)
    hf_config = saved_config(model)
    lora = case["lora"]
    model = get_peft_model(model, LoraConfig(
        r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules=lora["target_modules"],
        use_rslora=lora["use_rslora"], lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))

    lora_params = {}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float64, name
        if ".lora_" in name:
            assert p.requires_grad, name
            lora_params[saved_name(name)] = p
        else:
            assert not p.requires_grad, f"base parameter {name} is not frozen"
    saved = get_peft_model_state_dict(model)
    assert sorted(saved) == sorted(lora_params), (sorted(saved), sorted(lora_params))
    for name, p in lora_params.items():
        kind = "lora_A" if ".lora_A." in name else "lora_B"
        assert p.shape == saved[name].shape
        assert p.dim() == 2 and (p.shape[0] if kind == "lora_A" else p.shape[1]) == lora["r"], (name, p.shape)
    with torch.no_grad():
        for name, p in lora_params.items():
            p.copy_(torch.tensor(det_values(name, p.numel()), dtype=torch.float64).reshape(p.shape))
    scale = lora["lora_alpha"] / (lora["r"] ** 0.5 if lora["use_rslora"] else lora["r"])
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == len(lora_params) // 2
    for layer in layers:
        assert abs(layer.scaling["default"] - scale) < 1e-15, (layer.scaling, scale)

    model.eval()
    cases = cases_for(model, QWEN3_SEQS, [1.0, 0.7])
    merged = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    merge_diff = max_case_diff(cases, cases_for(merged, QWEN3_SEQS, [1.0, 0.7]))
    assert merge_diff < MERGE_TOLERANCE, merge_diff

    model.train()
    loss = completion_loss(model)
    loss.backward()
    for name, p in model.named_parameters():
        assert ".lora_" in name or p.grad is None, name
    gradients = {name: head_norm(p.grad) for name, p in lora_params.items()}

    opt = torch.optim.AdamW(list(lora_params.values()), lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    opt.step()
    updated = {name: head_norm(p) for name, p in lora_params.items()}
    return {
        "name": case["name"],
        "family": case["family"],
        "config": hf_config,
        "lora": lora,
        "prompt": QWEN3_PROMPT,
        "completions": QWEN3_COMPLETIONS,
        "temperature": GRAD_TEMPERATURE,
        "loss": loss.item(),
        "cases": cases,
        "gradients": gradients,
        "adamw": ADAMW,
        "updated": updated,
        "merge_max_abs_diff": merge_diff,
    }


def fixture(args):
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    models = [lora_case(case) for case in CASES]
    write(args.out, "lora.json", {
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "models": models,
    })


def check_saved(args):
    ids = [int(i) for i in args.ids.split(",")]
    assert len(ids) >= 2, "--ids needs at least two ids"
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, args.adapter).eval()
    peft_lp, _, _ = token_stats(with_adapter, ids, 1.0)
    merged = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32).eval()
    merged_lp, _, _ = token_stats(merged, ids, 1.0)
    diff = max(abs(a - b) for a, b in zip(peft_lp, merged_lp, strict=True))
    out = {"peft_logprobs": peft_lp, "merged_logprobs": merged_lp, "max_abs_diff": diff}
    if args.tandem:
        # `tandem score` on the merged model, the same ids.
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.jsonl")
            with open(src, "w") as f:
                f.write(json.dumps({"prompt_ids": ids[:1], "completion_ids": ids[1:]}) + "\n")
            subprocess.run([args.tandem, "score", "--model", args.merged, "--input", src, "--output", dst], check=True)
            with open(dst) as f:
                tandem_lp = json.loads(f.readline())["logprobs"]
        out["tandem_logprobs"] = tandem_lp
        out["tandem_max_abs_diff"] = max(abs(a - b) for a, b in zip(peft_lp, tandem_lp, strict=True))
        diff = max(diff, out["tandem_max_abs_diff"])
    print(json.dumps(out))
    if diff > SAVED_TOLERANCE:
        print(f"max_abs_diff {diff} > {SAVED_TOLERANCE}", file=sys.stderr)
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures", help="the fixture's folder")
    sub = ap.add_subparsers(dest="command")
    fx = sub.add_parser("fixture", help="write tests/fixtures/lora.json (the default)")
    fx.add_argument("--out", default=argparse.SUPPRESS, help="the fixture's folder")
    cs = sub.add_parser("check-saved", help="a saved PEFT adapter against the merged model")
    cs.add_argument("--base", required=True, help="the base model's HF folder")
    cs.add_argument("--adapter", required=True, help="the adapter's folder in PEFT's format")
    cs.add_argument("--merged", required=True, help="the merged model's HF folder")
    cs.add_argument("--ids", required=True, help="token ids, comma separated")
    cs.add_argument("--tandem", help="a tandem binary: also compare `tandem score` on the merged model")
    args = ap.parse_args()
    if args.command == "check-saved":
        check_saved(args)
    else:
        fixture(args)


if __name__ == "__main__":
    main()
