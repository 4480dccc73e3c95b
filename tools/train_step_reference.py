#!/usr/bin/env python3
"""Reference for `tandem train-step`: one SGD step of each algorithm configuration on
the tiny preset, computed with transformers + PyTorch independently of Tandem.
Writes tests/fixtures/train_step.json (rollouts, configs, loss, grad norm, and the
weight change Δ of a few tensors).

    python tools/train_step_reference.py --tandem target/release/tandem
"""
import argparse
import json
import os
import subprocess
import tempfile

import torch
from transformers import AutoModelForCausalLM

import rl_reference as ref

torch.set_default_dtype(torch.float64)

ROLLOUTS = [
    {"group": "a", "prompt_ids": [1, 40, 41, 42], "completion_ids": [60, 61, 62, 2], "behavior_logprobs": [-6.0, -6.5, -5.8, -6.2], "reward": 1.0, "versions": [3, 3, 4, 4]},
    {"group": "a", "prompt_ids": [1, 40, 41, 42], "completion_ids": [70, 71, 2], "behavior_logprobs": [-6.1, -6.4, -6.3], "reward": 0.0, "versions": [2, 2, 2]},
    {"group": "a", "prompt_ids": [1, 40, 41, 42], "completion_ids": [80, 81, 82, 83, 2], "behavior_logprobs": [-6.2, -6.0, -6.6, -6.1, -6.3], "reward": 0.5, "versions": [4, 4, 4, 4, 4]},
    {"group": "b", "prompt_ids": [1, 50, 51], "completion_ids": [90, 91], "behavior_logprobs": [-6.3, -6.2], "reward": 0.2, "versions": [1, 2]},
    {"group": "b", "prompt_ids": [1, 50, 51], "completion_ids": [92, 93, 94], "behavior_logprobs": [-5.9, -6.4, -6.0], "reward": 0.9, "versions": [5, 5, 5]},
]

# The same completions as a multi-turn episode would send them: masked tokens (their
# logprobs garbage, their versions newer than the policy: neither may be read), a
# completion wholly masked, and completions that ended by length.
ROLLOUTS_MASKED = [
    {**ROLLOUTS[0], "loss_mask": [1, 0, 0, 1], "behavior_logprobs": [-6.0, -80.0, -80.0, -6.2], "versions": [3, 9, 9, 4],
     "finish_reason": "stop"},
    {**ROLLOUTS[1], "finish_reason": "length"},
    {**ROLLOUTS[2], "loss_mask": [1, 1, 0, 1, 1], "finish_reason": "stop"},
    {**ROLLOUTS[3], "loss_mask": [0, 0], "behavior_logprobs": [-80.0, -80.0], "finish_reason": "length"},
    {**ROLLOUTS[4], "finish_reason": "stop"},
]
# No reward at all: what pure on-policy distillation trains on.
ROLLOUTS_UNREWARDED = [{**r, "reward": 0.0} for r in ROLLOUTS]
ROLLOUT_SETS = {"plain": ROLLOUTS, "masked": ROLLOUTS_MASKED, "unrewarded": ROLLOUTS_UNREWARDED}
# The distillation teacher: the tiny preset from another seed (`teacher` in a config names it).
TEACHER_SEED = 1

CONFIGS = {
    "grpo_decoupled_tis_kl_loss": {"advantage": "grpo", "policy_loss": "ppo_clip", "correction": "tis", "correction_level": "sequence",
                                   "loss_agg": "token_mean", "kl_coef": 0.1, "kl_estimator": "k3", "kl_in": "loss", "entropy_coef": 0.01, "temperature": 0.9},
    "rloo_bypass_kl_reward": {"advantage": "rloo", "policy_loss": "ppo_clip", "correction_mode": "bypass", "clip_eps_high": 0.28,
                              "loss_agg": "seq_mean_token_mean", "kl_coef": 0.05, "kl_estimator": "k1", "kl_in": "reward"},
    "reinforce_pp_icepop_seq_sum": {"advantage": "reinforce_pp", "policy_loss": "reinforce", "correction": "icepop",
                                    "loss_agg": "seq_sum_norm", "max_completion_len": 8},
    "reinforce_tis_token": {"advantage": "reinforce", "policy_loss": "ppo_clip", "correction": "tis", "correction_level": "token",
                                   "tis_cap": 1.5, "loss_agg": "seq_mean_token_mean", "entropy_coef": -0.02},
    "reinforce_no_baseline_icepop_sequence": {"advantage": "reinforce_no_baseline", "policy_loss": "reinforce", "correction": "icepop",
                                              "correction_level": "sequence", "icepop_low": 0.9, "icepop_high": 1.1, "loss_agg": "token_mean"},
    "gae_ppo_value_head": {"advantage": "gae", "policy_loss": "ppo_clip", "gamma": 0.99, "lambda": 0.9, "value_clip": 0.2, "vf_coef": 0.5,
                           "loss_agg": "token_mean", "kl_coef": 0.05, "kl_estimator": "k1", "kl_in": "reward"},
    "grpo_loglinear_icepop": {"advantage": "grpo", "policy_loss": "ppo_clip", "prox_logp": "loglinear", "correction": "icepop",
                              "icepop_low": 0.8, "icepop_high": 1.25, "loss_agg": "token_mean", "kl_coef": 0.05, "kl_estimator": "k3",
                              "kl_in": "reward"},
    "drgrpo_dual_clip_bypass": {"advantage": "drgrpo", "policy_loss": "ppo_clip", "clip_c": 3.0, "correction_mode": "bypass",
                                "loss_agg": "token_mean", "kl_coef": 0.02, "kl_estimator": "k2"},
    "gspo_masked_tis_sequence": {"advantage": "grpo", "policy_loss": "gspo", "clip_eps_low": 3e-4, "clip_eps_high": 4e-4,
                                 "correction": "tis", "correction_level": "sequence", "loss_agg": "seq_mean_token_mean",
                                 "kl_coef": 0.05, "kl_estimator": "k3", "kl_in": "loss", "entropy_coef": 0.01},
    "cispo_mask_truncated_kl_reward": {"advantage": "rloo", "policy_loss": "cispo", "cispo_eps_low": 0.5, "cispo_eps_high": 0.2,
                                       "mask_truncated": True, "loss_agg": "token_mean", "kl_coef": 0.05, "kl_estimator": "k1",
                                       "kl_in": "reward"},
    "drgrpo_overlong_masked_seq_sum": {"advantage": "drgrpo", "policy_loss": "ppo_clip", "overlong_buffer_len": 3,
                                       "overlong_penalty": 0.7, "max_completion_len": 5, "loss_agg": "seq_sum_norm",
                                       "correction": "icepop", "icepop_low": 0.5, "icepop_high": 2.0},
    "gae_masked_value_head": {"advantage": "gae", "policy_loss": "ppo_clip", "gamma": 0.99, "lambda": 0.9, "loss_agg": "token_mean",
                              "mask_truncated": True},
    "grpo_two_epochs_clipped": {"advantage": "grpo", "policy_loss": "ppo_clip", "clip_eps_low": 0.02, "clip_eps_high": 0.02,
                                "ppo_epochs": 2, "loss_agg": "token_mean"},
    "gspo_two_epochs_clipped": {"advantage": "grpo", "policy_loss": "gspo", "clip_eps_low": 3e-3, "clip_eps_high": 4e-3,
                                "ppo_epochs": 2, "loss_agg": "seq_mean_token_mean"},
    "grpo_distill_masked": {"advantage": "grpo", "policy_loss": "ppo_clip", "teacher": "tiny-seed-1", "distill_coef": 0.5,
                            "loss_agg": "token_mean", "temperature": 0.9},
    "pure_distill": {"advantage": "grpo", "policy_loss": "ppo_clip", "teacher": "tiny-seed-1", "distill_coef": 1.0,
                     "loss_agg": "token_mean"},
}
# The rollouts each case trains on (default: plain).
CASE_ROLLOUTS = {"gspo_masked_tis_sequence": "masked", "cispo_mask_truncated_kl_reward": "masked",
                 "drgrpo_overlong_masked_seq_sum": "masked", "gae_masked_value_head": "masked", "gspo_two_epochs_clipped": "masked",
                 "grpo_distill_masked": "masked", "pure_distill": "unrewarded"}
LR = 0.1
WATCH = ["model.norm.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.weight",
         "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]


def value_head(hidden_size):
    """The value head's starting values; tests/ build the same from this formula."""
    w = torch.tensor([0.05 * torch.sin(torch.tensor(i + 1.0)).item() for i in range(hidden_size)], requires_grad=True)
    b = torch.tensor([0.1], requires_grad=True)
    return w, b


def token_stats(model, rollouts, temperature, head=None):
    lps, ents, vals = [], [], []
    for r in rollouts:
        ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
        out = model(ids, output_hidden_states=True)
        logits = out.logits[0].to(torch.float64)
        p = len(r["prompt_ids"])
        z = logits[p - 1:-1] / temperature
        logp = torch.log_softmax(z, -1)
        lps.append(logp.gather(1, torch.tensor(r["completion_ids"])[:, None])[:, 0])
        ents.append(-(logp.exp() * logp).sum(-1))
        if head is not None:
            h = out.hidden_states[-1][0, p - 1:-1]  # after the final norm
            vals.append(h @ head[0] + head[1])
    if head is not None:
        return torch.cat(lps), torch.cat(ents), torch.cat(vals)
    return torch.cat(lps), torch.cat(ents)


POLICY_VERSION = {"grpo_loglinear_icepop": 5}


def step(folder, cfg, policy_version=None, rollouts="plain", teacher_folder=None):
    ROLLOUTS = ROLLOUT_SETS[rollouts]
    c = {"policy_loss": "ppo_clip", "clip_eps_low": 0.2, "clip_eps_high": 0.2, "clip_c": None, "correction_mode": "decoupled",
         "cispo_eps_low": 1.0, "cispo_eps_high": 0.28, "mask_truncated": False, "overlong_buffer_len": 0, "overlong_penalty": 1.0,
         "ppo_epochs": 1,
         "correction": "none", "correction_level": "token", "tis_cap": 2.0, "icepop_low": 0.5, "icepop_high": 2.0,
         "loss_agg": "token_mean", "max_completion_len": 1024, "kl_coef": 0.0, "kl_estimator": "k3", "kl_in": "loss",
         "entropy_coef": 0.0, "temperature": 1.0, "gamma": 1.0, "lambda": 0.95, "value_clip": 0.2, "vf_coef": 0.5,
         "prox_logp": "recompute", **cfg}
    loglinear = c["prox_logp"] == "loglinear"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    lengths = [len(r["completion_ids"]) for r in ROLLOUTS]
    t = c["temperature"]
    mu = torch.tensor([x for r in ROLLOUTS for x in r["behavior_logprobs"]])
    loss_mask = [r.get("loss_mask", [1] * len(r["completion_ids"])) for r in ROLLOUTS]
    m = torch.tensor([float(x) * (0.0 if c["mask_truncated"] and r.get("finish_reason") == "length" else 1.0)
                      for r, lm in zip(ROLLOUTS, loss_mask) for x in lm])
    with torch.no_grad():
        prox, _ = token_stats(model, ROLLOUTS, t)
        ref_lp, _ = token_stats(reference, ROLLOUTS, t)
    old = prox if c["correction_mode"] == "decoupled" and not loglinear else mu
    rewards = [r["reward"] + ref.overlong_penalty(sum(lm), c["max_completion_len"], c["overlong_buffer_len"], c["overlong_penalty"])
               for r, lm in zip(ROLLOUTS, loss_mask)]
    if c["kl_coef"] > 0 and c["kl_in"] == "reward":
        k = ref.kl(c["kl_estimator"], old, ref_lp) * m  # loglinear has no pi_prox yet: mu
        rewards = [rw - c["kl_coef"] * part.sum().item() for rw, part in zip(rewards, torch.split(k, lengths))]
    head = value_head(model.config.hidden_size) if c["advantage"] == "gae" else None
    if head is not None:
        with torch.no_grad():
            _, _, old_values = token_stats(model, ROLLOUTS, t, head)
        tok_adv, returns = ref.gae(old_values, rewards, lengths, c["gamma"], c["lambda"])
    else:
        groups = {g: i for i, g in enumerate(dict.fromkeys(r["group"] for r in ROLLOUTS))}
        adv = ref.advantages(c["advantage"], rewards, [groups[r["group"]] for r in ROLLOUTS])
        tok_adv = torch.cat([torch.full((n,), a) for a, n in zip(adv, lengths)])
    if "teacher" in c:  # on-policy distillation: A_t += lambda (log pi_teacher - log mu) on trained tokens
        teacher = AutoModelForCausalLM.from_pretrained(teacher_folder, dtype=torch.float64).eval()
        with torch.no_grad():
            teacher_lp, _ = token_stats(teacher, ROLLOUTS, t)
        tok_adv = tok_adv + c["distill_coef"] * (teacher_lp - mu) * m
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = list(model.parameters()) + (list(head) if head is not None else [])
    losses, norms, clip_low, clip_high = [], [], [], []
    for _ in range(c["ppo_epochs"]):  # pi_prox, mu and the advantages stay fixed
        if head is not None:
            logp, ent, new_values = token_stats(model, ROLLOUTS, t, head)
        else:
            logp, ent = token_stats(model, ROLLOUTS, t)
        if loglinear:
            versions = [v for r in ROLLOUTS for v in r["versions"]]
            prox, _ = ref.loglinear_prox(mu, logp, versions, policy_version)
            old = prox
        if c["correction_mode"] == "decoupled":
            w = ref.weights(c["correction"], c["correction_level"], prox, mu, lengths, c["tis_cap"], c["icepop_low"], c["icepop_high"],
                            mask=m)
        else:
            w = torch.ones_like(mu)
        eps = (c["cispo_eps_low"], c["cispo_eps_high"]) if c["policy_loss"] == "cispo" else (c["clip_eps_low"], c["clip_eps_high"])
        pl = ref.policy_loss(c["policy_loss"], logp, old, tok_adv, w, *eps, c["clip_c"], lengths=lengths, mask=m)
        agg = lambda x: ref.aggregate(c["loss_agg"], x, lengths, c["max_completion_len"], mask=m)
        loss = agg(pl)
        if c["kl_coef"] > 0 and c["kl_in"] == "loss":
            loss = loss + c["kl_coef"] * agg(ref.kl(c["kl_estimator"], logp, ref_lp))
        if c["entropy_coef"]:
            loss = loss - c["entropy_coef"] * agg(ent)
        if head is not None:
            loss = loss + c["vf_coef"] * agg(ref.value_loss(new_values, old_values, returns, c["value_clip"]))
        for p in params:
            p.grad = None
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        norms.append(torch.sqrt(sum((g * g).sum() for g in grads)).item())
        losses.append(loss.item())
        # Clipped shares of the trained tokens (ppo_clip: the ratio; gspo: the sequence ratio).
        with torch.no_grad():
            if c["policy_loss"] == "gspo":
                d = (logp - old) * m
                ratio = torch.cat([(dd.sum() / max(mm.sum().item(), 1.0)).expand(len(dd)).exp()
                                   for dd, mm in zip(torch.split(d, lengths), torch.split(m, lengths))])
            else:
                ratio = torch.exp(logp - old)
            n = m.sum().item()
            clip_low.append((((tok_adv < 0) & (ratio < 1 - eps[0])).double() * m).sum().item() / n)
            clip_high.append((((tok_adv > 0) & (ratio > 1 + eps[1])).double() * m).sum().item() / n)
            for p in params:
                if p.grad is not None:
                    p -= LR * p.grad
    delta = {n: (p.detach() - before[n]).flatten()[:512].tolist() for n, p in model.named_parameters() if n in WATCH}
    if head is not None:
        start_w, start_b = value_head(model.config.hidden_size)
        delta["value_head.weight"] = (head[0].detach() - start_w.detach()).tolist()
        delta["value_head.bias"] = (head[1].detach() - start_b.detach()).tolist()
    out = {"config": cfg, "rollouts": rollouts, "loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms),
           "clip_fractions_per_epoch": [clip_low, clip_high], "delta": delta}
    if policy_version is not None:
        out["policy_version"] = policy_version
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tandem", default="target/release/tandem")
    ap.add_argument("--out", default="tests/fixtures/train_step.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "tiny")
        subprocess.run([args.tandem, "model", "init", "--preset", "tiny", "--seed", "0", "--out", folder], check=True)
        teacher = os.path.join(tmp, "teacher")
        subprocess.run([args.tandem, "model", "init", "--preset", "tiny", "--seed", str(TEACHER_SEED), "--out", teacher], check=True)
        cases = {name: step(folder, cfg, POLICY_VERSION.get(name), CASE_ROLLOUTS.get(name, "plain"), teacher)
                 for name, cfg in CONFIGS.items()}
    with open(args.out, "w") as f:
        json.dump({"preset": "tiny", "seed": 0, "lr": LR, "rollouts": ROLLOUTS, "rollouts_masked": ROLLOUTS_MASKED,
                   "rollouts_unrewarded": ROLLOUTS_UNREWARDED, "teacher_seed": TEACHER_SEED,
                   "cases": cases}, f)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
