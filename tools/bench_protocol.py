"""The protocol between `tandem bench` and its reference scripts.

`tandem bench model|generate|train-step --reference SCRIPT --python PY` runs
`PY SCRIPT --gguf MODEL ...` with the arguments the parsers below accept (for `model`
and `generate` with `--preset NAME`: `--config DIR` instead of `--gguf`, DIR holding the
preset's config.json, so the script builds the same shape with random weights:
`model_source` reads it, `load_model` builds it), and reads the
script's result from its standard output: the last non-empty line, which must be one
JSON object on one line (`emit` writes it; bench/src/timing.rs `run_child` reads it,
bench/src/reference.rs checks its fields). Progress and logs go to standard error.

The reference scripts (tools/bench_transformers.py, bench_generate.py,
bench_train_step.py) parse their arguments and build and write their results only
through this module; tests/bench_reference.rs runs each benchmark against a stub
(tests/fixtures/bench_reference_stub.py) that uses it too, so a change of format on
either side fails a test. Standard library only: it is imported without torch.
"""
import argparse
import json
import math
import os
import sys


def emit(result):
    """Writes `result` (a dict) as the last line of standard output: compact JSON on one
    line, no NaN or infinity (JSON has neither)."""
    if not isinstance(result, dict):
        raise TypeError(f"a result is a JSON object, not {type(result).__name__}")
    print(json.dumps(result, separators=(",", ":"), allow_nan=False), flush=True)


def _number(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, not {x!r}")
    return float(x)


def _count(name, x):
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"{name} must be a count, not {x!r}")
    return x


# ---------------------------------------------------------------------------------
# The model: a file or folder (--gguf), or a preset's shape (--config)

# The fields of a preset's config.json the reference needs to build the same shape.
CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")


def _model_arguments(ap):
    """--gguf PATH (a GGUF file or an HF folder) or --config DIR (a preset's
    config.json: its shape, random weights); one of them."""
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--gguf")
    which.add_argument("--config")


def model_source(args):
    """What to load: {"kind": "file", "path": PATH} for --gguf, or {"kind": "config",
    "config": the dict of DIR/config.json} for --config (checked to have CONFIG_KEYS)."""
    if args.gguf:
        return {"kind": "file", "path": os.path.abspath(args.gguf)}
    path = os.path.join(args.config, "config.json")
    with open(path) as f:
        config = json.load(f)
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"{path}: the config lacks {missing}")
    return {"kind": "config", "config": config}


def load_model(args, dtype):
    """The model of `model_source(args)` with transformers, in `dtype`: the GGUF file
    dequantized, the HF folder, or for a preset's config a model of that shape with
    transformers' random initialization (seed 0), as Tandem's preset is a random model
    of it. Imports torch and transformers only when called."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = model_source(args)
    if source["kind"] == "config":
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(args.config)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    path = source["path"]
    if os.path.isdir(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)


# ---------------------------------------------------------------------------------
# tandem bench model <-> tools/bench_transformers.py


def model_parser(description=None):
    """The arguments `tandem bench model` passes (bench/src/model.rs `run_all`)."""
    ap = argparse.ArgumentParser(description=description)
    _model_arguments(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--decode-batches", default="1,8")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--phase", help="internal: run one phase in this process")
    return ap


def model_phases(decode_batches):
    """The phases, in order, as the Rust side names them: decode_bB for each batch size
    of --decode-batches, then fwd_bwd and optimizer_step."""
    phases = [f"decode_b{int(b)}" for b in decode_batches.split(",") if b.strip()]
    return phases + ["fwd_bwd", "optimizer_step"]


def model_phase(phase, seconds, load_seconds, load_peak_rss_mib, peak_rss_mib,
                phase_peak_rss_mib=None, **extra):
    """One phase's measurement. decode_bB and fwd_bwd carry tokens_per_s (in `extra`,
    with batch, lengths, loss or n_params as the phase has them); phase_peak_rss_mib
    is the peak once the model is loaded, where the watermark could be reset."""
    out = {
        "seconds": _number("seconds", seconds),
        "load_seconds": _number("load_seconds", load_seconds),
        "load_peak_rss_mib": _number("load_peak_rss_mib", load_peak_rss_mib),
        "peak_rss_mib": _number("peak_rss_mib", peak_rss_mib),
    }
    if phase_peak_rss_mib is not None:
        out["phase_peak_rss_mib"] = _number("phase_peak_rss_mib", phase_peak_rss_mib)
    if (phase.startswith("decode_b") or phase == "fwd_bwd") and "tokens_per_s" not in extra:
        raise ValueError(f"phase {phase} needs tokens_per_s")
    for k, v in extra.items():
        out[k] = _number(k, v) if isinstance(v, float) else v
    return out


def model_result(threads, phases, **versions):
    """The whole reference run: every phase of `model_phases` (a dict name -> the
    dict of `model_phase`), the thread count, and the library versions."""
    return {"engine": "transformers", **versions, "threads": _count("threads", threads),
            "phases": phases}


# ---------------------------------------------------------------------------------
# tandem bench generate <-> tools/bench_generate.py


def generate_parser(description=None):
    """The arguments `tandem bench generate` passes (bench/src/generate.rs `run_all`)."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(ap)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    return ap


WORKLOAD_KEYS = ("prompts", "stop_token_ids", "samples", "max_new_tokens", "temperature", "seed")


def read_workload(path):
    """The workload `tandem bench generate` wrote: prompts (token ids), stop_token_ids,
    samples per prompt, max_new_tokens, temperature, seed."""
    with open(path) as f:
        w = json.load(f)
    missing = [k for k in WORKLOAD_KEYS if k not in w]
    if missing:
        raise ValueError(f"{path}: the workload lacks {missing}")
    if not w["prompts"] or not all(isinstance(t, int) for p in w["prompts"] for t in p):
        raise ValueError(f"{path}: prompts must be lists of token ids")
    return w


def generate_result(seconds, tokens, sequences, max_running, peak_rss_mib):
    """One `generate` call: generated tokens (each completion up to and including its
    stop token) over its wall time."""
    seconds = _number("seconds", seconds)
    return {
        "tok_per_s": _count("tokens", tokens) / seconds,
        "seconds": seconds,
        "tokens": tokens,
        "sequences": _count("sequences", sequences),
        "max_running": _count("max_running", max_running),
        "peak_rss_mib": _number("peak_rss_mib", peak_rss_mib),
    }


# ---------------------------------------------------------------------------------
# tandem bench train-step <-> tools/bench_train_step.py


def train_step_parser(description=None):
    """The arguments `tandem bench train-step` passes (bench/src/train_step.rs)."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--microbatch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    return ap


BATCH_KEYS = ("rollouts", "clip_eps_low", "clip_eps_high", "lr", "betas", "eps",
              "weight_decay", "max_grad_norm")
ROLLOUT_KEYS = ("group", "prompt_ids", "completion_ids", "behavior_logprobs", "reward")


def read_batch(path):
    """The batch `tandem bench train-step` wrote: rollouts (group, prompt_ids,
    completion_ids, behavior_logprobs, reward) and the clip and AdamW settings."""
    with open(path) as f:
        batch = json.load(f)
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"{path}: the batch lacks {missing}")
    for i, r in enumerate(batch["rollouts"]):
        lacks = [k for k in ROLLOUT_KEYS if k not in r]
        if lacks:
            raise ValueError(f"{path}: rollouts[{i}] lacks {lacks}")
        if len(r["behavior_logprobs"]) != len(r["completion_ids"]):
            raise ValueError(f"{path}: rollouts[{i}]: one behaviour logprob per completion token")
    return batch


def train_step_result(seconds, tokens, peak_rss_mib, loss, grad_norm):
    """One step: median seconds, the tokens computed (padding included), the process's
    peak RSS, the step's loss and gradient norm (before clipping)."""
    return {
        "seconds": _number("seconds", seconds),
        "tokens": _count("tokens", tokens),
        "peak_rss_mib": _number("peak_rss_mib", peak_rss_mib),
        "loss": _number("loss", loss),
        "grad_norm": _number("grad_norm", grad_norm),
    }


if __name__ == "__main__":
    sys.exit("bench_protocol.py is a module: the reference scripts import it")
