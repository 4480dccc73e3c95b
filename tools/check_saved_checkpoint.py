#!/usr/bin/env python3
"""Checks that transformers loads what Tandem saves, and writes the verdict as a fixture
(tests/fixtures/saved-checkpoint.json) so CI checks it without torch.

    python tools/check_saved_checkpoint.py            # from the repository root

Tandem's side (the ignored test `write_checkpoint_for_transformers` in
model/tests/checkpoints.rs, run here through cargo): the tiny preset (seed 0) rounded to
bf16 and written as two shards by the safetensors crate, loaded by Tandem, and saved by
`save_hf_sharded` in bf16 with a 50 kB shard limit (several shards and
model.safetensors.index.json); `tandem.json` beside it has the token ids, Tandem's
logits of them on the saved folder, and the hash of the saved tensors.

transformers' side: `AutoModelForCausalLM.from_pretrained(folder)` (its default dtype
must be the config's bfloat16), then in float32 for the logits, compared with Tandem's
(the same bf16 weights, both computing in f32: agreement to 1e-4); the tokenizer, the
chat template and the generation config load with it.

The test `transformers_loads_what_tandem_saves` checks that Tandem still writes the same
bytes and the same logits, and that this verdict passed.
"""
import argparse
import json
import os
import subprocess
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

TOLERANCE = 1e-4


def tandem_side(work):
    env = dict(os.environ, TANDEM_SAVED_CHECKPOINT_DIR=work, CARGO_INCREMENTAL="0")
    subprocess.run(
        ["cargo", "test", "-p", "tandem-model", "--test", "checkpoints", "--",
         "--ignored", "--exact", "write_checkpoint_for_transformers"],
        check=True, env=env,
    )
    with open(os.path.join(work, "tandem.json")) as f:
        return json.load(f)


def transformers_side(folder, ids):
    native = AutoModelForCausalLM.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    tok = AutoTokenizer.from_pretrained(folder)
    gen = GenerationConfig.from_pretrained(folder)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    return logits.flatten().tolist(), {
        "torch_dtype": str(native.dtype),
        "class": type(model).__name__,
        "eos_token_id": gen.eos_token_id,
        "temperature": gen.temperature,
        "chat_rendered": chat,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/saved-checkpoint.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        t = tandem_side(work)
        hf_logits, info = transformers_side(t["folder"], t["ids"])
    diff = max(abs(a - b) for a, b in zip(t["logits"], hf_logits))
    ok = (
        len(hf_logits) == len(t["logits"])
        and diff <= TOLERANCE
        and info["torch_dtype"] == "torch.bfloat16"
    )
    out = {
        "about": "tools/check_saved_checkpoint.py: transformers loading a bf16 sharded checkpoint Tandem saved",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "ids": t["ids"],
        "shards": t["shards"],
        "weights_sha256": t["weights_sha256"],
        "tandem_logits": t["logits"],
        "transformers_logits": hf_logits,
        "max_abs_diff": diff,
        "tolerance": TOLERANCE,
        "transformers": info,
        "verdict": "pass" if ok else "fail",
    }
    with open(args.out, "w") as f:
        json.dump(out, f)
        f.write("\n")
    print(f"{out['verdict']}: max |Δlogit| {diff:.2e} over {len(hf_logits)} logits; "
          f"{t['shards']} shards; default dtype {info['torch_dtype']}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
