#!/usr/bin/env python3
"""Golden values for Tandem's RL functions (advantages, KL, behaviour weights, policy
losses, aggregation), computed independently with PyTorch following TRL / verl /
OpenRLHF / AReaL formulations. Writes tests/fixtures/rl_golden.json.

    python tools/rl_reference.py [--out tests/fixtures/rl_golden.json]
"""
import argparse
import json

import torch

torch.set_default_dtype(torch.float64)


def advantages(kind, rewards, groups):
    r = torch.tensor(rewards)
    g = torch.tensor(groups)
    out = torch.zeros_like(r)
    if kind == "reinforce":
        return (r - r.mean()).tolist()
    if kind == "reinforce_no_baseline":
        return r.tolist()
    for gid in g.unique():
        idx = (g == gid).nonzero().flatten()
        rg = r[idx]
        k = len(idx)
        if kind == "rloo":
            out[idx] = rg - (rg.sum() - rg) / (k - 1)
        elif kind == "grpo":
            std = rg.std(unbiased=True) if k > 1 else torch.tensor(0.0)  # TRL: std over the group
            out[idx] = (rg - rg.mean()) / (std + 1e-6)
        else:  # drgrpo, reinforce_pp
            out[idx] = rg - rg.mean()
    if kind == "reinforce_pp":  # OpenRLHF: whiten over the batch, biased std
        out = (out - out.mean()) / (out.std(unbiased=False) + 1e-8)
    return out.tolist()


def kl(kind, logp, ref):
    d = logp - ref
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    return torch.exp(-d) + d - 1  # k3 = exp(ref - logp) - (ref - logp) - 1


def weights(kind, level, prox, mu, lengths, cap=2.0, low=0.5, high=2.0):
    lr = prox - mu
    if level == "sequence":
        parts = torch.split(lr, lengths)
        lr = torch.cat([p.mean().expand(len(p)) for p in parts])
    w = lr.exp()
    if kind == "none":
        return torch.ones_like(w)
    if kind == "tis":
        return torch.clamp(w, max=cap)
    return torch.where((w >= low) & (w <= high), w, torch.zeros_like(w))


def loglinear_prox(mu, logp, versions, policy_version):
    """AReaL's proximal approximation: log pi_prox = log mu + alpha (log pi_theta - log mu),
    alpha = (v_prox - v_b) / (v_theta - v_b) with v_prox = v_theta - 1, 0 when v_b >= v_theta."""
    alpha = []
    for v in versions:
        if v >= policy_version:
            alpha.append(0.0)
        else:
            alpha.append(min(max((policy_version - 1 - v) / (policy_version - v), 0.0), 1.0))
    alpha = torch.tensor(alpha)
    return mu + alpha * (logp.detach() - mu), alpha


def policy_loss(kind, logp, old, adv, w, eps_low=0.2, eps_high=0.28, clip_c=None):
    if kind == "reinforce":
        return -w * adv * torch.exp(logp - logp.detach())
    ratio = torch.exp(logp - old)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = torch.maximum(l1, l2)  # = -min(ratio*A, clip(ratio)*A)
    if clip_c is not None:  # verl's dual clip
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * clip_c), loss)
    return w * loss


def aggregate(kind, loss, lengths, max_len):
    if kind == "token_mean":
        return loss.sum() / loss.numel()
    if kind == "seq_sum_norm":
        return loss.sum() / (len(lengths) * max_len)
    return torch.stack([p.mean() for p in torch.split(loss, lengths)]).mean()


def gae(values, rewards, lengths, gamma, lam):
    """Textbook GAE, one completion at a time, reward on the last token, V_T = 0."""
    adv, ret = [], []
    for v, r in zip(torch.split(values, lengths), rewards):
        T = len(v)
        rew = torch.zeros(T)
        rew[-1] = r
        nxt = torch.cat([v[1:], torch.zeros(1)])
        delta = rew + gamma * nxt - v
        a = torch.zeros(T)
        for t in range(T):
            a[t] = sum((gamma * lam) ** l * delta[t + l] for l in range(T - t))
        adv.append(a)
        ret.append(a + v)
    return torch.cat(adv), torch.cat(ret)


def value_loss(new, old, returns, clip):
    clipped = old + torch.clamp(new - old, -clip, clip)
    return 0.5 * torch.maximum((new - returns) ** 2, (clipped - returns) ** 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/rl_golden.json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(7)
    rewards = [1.0, 0.0, 0.5, 1.0, 0.2, 0.2, 0.2, 0.2, 0.9, -0.3, 0.4]
    groups = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    adv = {k: advantages(k, rewards, groups) for k in
           ["reinforce", "reinforce_no_baseline", "rloo", "grpo", "drgrpo", "reinforce_pp"]}

    lengths = [5, 3, 4]
    n = sum(lengths)
    logp = -torch.rand(n, generator=g) * 3
    prox = logp + torch.randn(n, generator=g) * 0.3
    mu = prox + torch.randn(n, generator=g) * 0.5
    ref = logp + torch.randn(n, generator=g) * 0.2
    seq_adv = torch.tensor([1.5, -0.8, 0.6])
    tok_adv = torch.cat([a.expand(l) for a, l in zip(seq_adv, lengths)])
    max_len = 6

    tokens = {"lengths": lengths, "max_completion_len": max_len, "logp": logp.tolist(), "prox_logp": prox.tolist(),
              "behaviour_logp": mu.tolist(), "ref_logp": ref.tolist(), "advantages": tok_adv.tolist()}
    kls = {k: kl(k, logp, ref).tolist() for k in ["k1", "k2", "k3"]}
    ws = {f"{k}/{lvl}": weights(k, lvl, prox, mu, lengths).tolist()
          for k in ["none", "tis", "icepop"] for lvl in ["token", "sequence"]}
    losses = {}
    for pl, kw in [("ppo_clip", {}), ("ppo_clip_dual", {"clip_c": 3.0}), ("reinforce", {})]:
        for corr in ["none/token", "tis/sequence", "icepop/token"]:
            w = torch.tensor(ws[corr])
            for agg in ["token_mean", "seq_mean_token_mean", "seq_sum_norm"]:
                theta = logp.clone().requires_grad_(True)
                per_tok = policy_loss("reinforce" if pl == "reinforce" else "ppo_clip", theta, prox, tok_adv, w, **kw)
                total = aggregate(agg, per_tok, lengths, max_len)
                total.backward()
                losses[f"{pl}|{corr}|{agg}"] = {"per_token": per_tok.detach().tolist(), "loss": total.item(),
                                                 "grad_logp": theta.grad.tolist()}
    values = torch.randn(n, generator=g) * 0.5
    new_values = values + torch.randn(n, generator=g) * 0.4
    seq_rewards = [1.0, -0.5, 0.25]
    a_gae, r_gae = gae(values, seq_rewards, lengths, 0.99, 0.95)
    nv = new_values.clone().requires_grad_(True)
    vl = value_loss(nv, values, r_gae, 0.2)
    vl.sum().backward()
    critic = {"values": values.tolist(), "new_values": new_values.tolist(), "rewards": seq_rewards, "gamma": 0.99,
              "lambda": 0.95, "value_clip": 0.2, "advantages": a_gae.tolist(), "returns": r_gae.tolist(),
              "value_loss": vl.detach().tolist(), "value_loss_grad": nv.grad.tolist()}
    versions = [6, 6, 5, 4, 3, 5, 5, 0, 2, 6, 1, 4]
    approx, alpha = loglinear_prox(mu, logp, versions, 6)
    loglinear = {"versions": versions, "policy_version": 6, "alpha": alpha.tolist(), "prox_logp": approx.tolist()}
    out = {"critic": critic, "loglinear": loglinear, "rewards": rewards, "groups": groups, "advantages": adv, "tokens": tokens, "kl": kls,
           "weights": ws, "policy": losses,
           "params": {"eps_low": 0.2, "eps_high": 0.28, "clip_c": 3.0, "tis_cap": 2.0, "icepop_low": 0.5, "icepop_high": 2.0}}
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
