#!/usr/bin/env python3
"""PyTorch reference for `tandem bench train-step`: one GRPO step the way TRL does it.

Reads the batch `tandem bench train-step` wrote (--batch JSON: rollouts with
prompt_ids, completion_ids, behavior_logprobs, reward and group; the clip and AdamW
settings) and runs, on SmolLM2-135M-Instruct loaded by transformers from the GGUF
(dequantized to f32), with a fixed thread count:

  - GRPO advantages: (r - mean_group) / (std_group + 1e-6) (sample std, as
    Tandem's `grpo`), one per completion;
  - a padded batch, as TRL builds it: every completion with its own copy of its
    prompt, completions right-padded to the longest, every completion computed (none
    skipped), in micro-batches of --microbatch sequences with gradient accumulation;
  - per token: log pi at temperature 1 of the completion tokens (logits of the
    completion positions only, TRL's logits_to_keep), ratio = exp(log pi - log mu),
    PPO clip with eps_low / eps_high, loss = -min(ratio A, clip(ratio) A), averaged
    over every completion token of the batch (token mean);
  - clip_grad_norm_ and one torch.optim.AdamW step.

Prints one JSON line, the last of stdout: seconds (median of --reps steps after
--warmup untimed ones, each from the same weights with a fresh optimizer), tokens (the
padded tokens computed), peak_rss_mib (ru_maxrss of the process, model load included),
loss and grad_norm. tools/bench_protocol.py parses the arguments, reads the batch and
writes the result.

  python3 tools/bench_train_step.py --gguf PATH --batch batch.json [--threads 2] \
      [--microbatch 8] [--reps 1] [--warmup 1]
"""
import copy
import os
import resource
import statistics
import sys
import time

import torch

import bench_protocol as protocol


def log(*a):
    print("[bench_train_step]", *a, file=sys.stderr, flush=True)


def grpo_advantages(rollouts):
    groups = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(r["group"], []).append(i)
    adv = [0.0] * len(rollouts)
    for ids in groups.values():
        rs = torch.tensor([rollouts[i]["reward"] for i in ids], dtype=torch.float64)
        std = rs.std(unbiased=True)
        for i, a in zip(ids, (rs - rs.mean()) / (std + 1e-6)):
            adv[i] = a.item()
    return adv


def step(model, batch, microbatch):
    rollouts = batch["rollouts"]
    adv = grpo_advantages(rollouts)
    total_tokens = sum(len(r["completion_ids"]) for r in rollouts)
    longest = max(len(r["completion_ids"]) for r in rollouts)
    opt = torch.optim.AdamW(model.parameters(), lr=batch["lr"], betas=tuple(batch["betas"]),
                            eps=batch["eps"], weight_decay=batch["weight_decay"])
    opt.zero_grad(set_to_none=True)
    lo, hi = batch["clip_eps_low"], batch["clip_eps_high"]
    loss_total, computed = 0.0, 0
    for s in range(0, len(rollouts), microbatch):
        part = rollouts[s:s + microbatch]
        prompt_len = max(len(r["prompt_ids"]) for r in part)
        ids, attn, mask, mu, a = [], [], [], [], []
        for k, r in enumerate(part):
            p, c = r["prompt_ids"], r["completion_ids"]
            # Prompts left-padded, completions right-padded (TRL's layout).
            ids.append([2] * (prompt_len - len(p)) + p + c + [2] * (longest - len(c)))
            attn.append([0] * (prompt_len - len(p)) + [1] * (len(p) + len(c)) + [0] * (longest - len(c)))
            mask.append([1.0] * len(c) + [0.0] * (longest - len(c)))
            mu.append(r["behavior_logprobs"] + [0.0] * (longest - len(c)))
            a.append(adv[s + k])
        ids = torch.tensor(ids)
        attn = torch.tensor(attn)
        mask = torch.tensor(mask)
        mu = torch.tensor(mu)
        a = torch.tensor(a)[:, None]
        computed += ids.numel()
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False,
                       logits_to_keep=longest + 1).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        targets = ids[:, prompt_len:]
        tok = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(tok - mu)
        per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - lo, 1 + hi) * a)
        loss = (per_token * mask).sum() / total_tokens
        loss.backward()
        loss_total += loss.item()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), batch["max_grad_norm"])
    opt.step()
    return loss_total, norm.item(), computed


def main():
    args = protocol.train_step_parser(description=__doc__).parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    batch = protocol.read_batch(args.batch)
    path = os.path.abspath(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    model.train()
    start = copy.deepcopy(model.state_dict())
    times = []
    for rep in range(args.warmup + max(args.reps, 1)):
        model.load_state_dict(start)
        t = time.perf_counter()
        loss, norm, computed = step(model, batch, args.microbatch)
        secs = time.perf_counter() - t
        if rep >= args.warmup:
            times.append(secs)
        log(f"step {rep}: {secs:.1f}s, loss {loss:.6f}, grad norm {norm:.4f}")
    protocol.emit(protocol.train_step_result(
        seconds=statistics.median(times),
        tokens=computed,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        loss=loss,
        grad_norm=norm,
    ))


if __name__ == "__main__":
    main()
