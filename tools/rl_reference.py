#!/usr/bin/env python3
"""Golden values for Tandem's RL functions (advantages, KL, behaviour weights, policy
losses incl. GSPO and CISPO, aggregation, loss masks, DAPO's overlong penalty),
computed independently with PyTorch following TRL / verl / OpenRLHF / AReaL / DAPO /
MiniMax-M1 formulations. Writes tests/fixtures/rl_golden.json.

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


def weights(kind, level, prox, mu, lengths, cap=2.0, low=0.5, high=2.0, mask=None):
    """A token with mask 0 is not trained: its mu is ignored (log-ratio 0, weight 1) and
    the sequence-level mean runs over the trained tokens only."""
    m = torch.ones_like(prox) if mask is None else mask
    lr = torch.where(m > 0, prox - mu, torch.zeros_like(prox))
    if level == "sequence":
        seq = []
        for p, mm in zip(torch.split(lr, lengths), torch.split(m, lengths)):
            mean = p.sum() / max(mm.sum().item(), 1.0)
            seq.append(torch.where(mm > 0, mean.expand(len(p)), torch.zeros(len(p))))
        lr = torch.cat(seq)
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


def policy_loss(kind, logp, old, adv, w, eps_low=0.2, eps_high=0.28, clip_c=None, lengths=None, mask=None):
    """Per-token loss times the mask (1 everywhere when absent)."""
    m = torch.ones_like(logp) if mask is None else mask
    return m * _policy_loss(kind, logp, old, adv, w, eps_low, eps_high, clip_c, lengths, m)


def _policy_loss(kind, logp, old, adv, w, eps_low, eps_high, clip_c, lengths, m):
    if kind == "reinforce":
        return -w * adv * torch.exp(logp - logp.detach())
    if kind == "cispo":  # MiniMax-M1: the IS weight clipped and detached, REINFORCE on log pi
        r = torch.exp(logp - old).detach()
        return -w * torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv * logp
    if kind == "gspo":  # Zheng et al. 2025, token form (verl's gspo)
        d = (logp - old).detach() * m
        s = torch.cat([(dd.sum() / max(mm.sum().item(), 1.0)).expand(len(dd))
                       for dd, mm in zip(torch.split(d, lengths), torch.split(m, lengths))])
        ratio = torch.exp(s + logp - logp.detach())
    else:
        ratio = torch.exp(logp - old)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = torch.maximum(l1, l2)  # = -min(ratio*A, clip(ratio)*A)
    if clip_c is not None:  # verl's dual clip
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * clip_c), loss)
    return w * loss


def aggregate(kind, loss, lengths, max_len, mask=None):
    """Masked tokens count in no denominator; seq_mean_token_mean averages over the
    completions with a trained token; seq_sum_norm keeps its constant."""
    m = torch.ones_like(loss) if mask is None else mask
    loss = loss * m
    if kind == "token_mean":
        return loss.sum() / max(m.sum().item(), 1.0)
    if kind == "seq_sum_norm":
        return loss.sum() / (len(lengths) * max_len)
    means = [p.sum() / mm.sum() for p, mm in zip(torch.split(loss, lengths), torch.split(m, lengths)) if mm.sum() > 0]
    return torch.stack(means).sum() / max(len(means), 1)


def distill_advantage(adv, teacher, mu, mask, coef):
    """On-policy distillation: A_t + coef (log pi_teacher - log mu) on trained tokens, and
    the mean reverse-KL estimate log mu - log pi_teacher over them."""
    d = (teacher - mu) * mask
    return adv + coef * d, (-d.sum() / mask.sum()).item()


def overlong_penalty(length, max_len, buffer_len, penalty):
    """DAPO's soft overlong punishment (their reward_manager's formula)."""
    if buffer_len == 0:
        return 0.0
    expected = max_len - buffer_len
    exceed = length - expected
    return min(-exceed / buffer_len * penalty, 0.0) if length <= max_len else -penalty


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
    # The second completion is wholly masked, the others in part; a masked token's mu is
    # garbage (it must not be read).
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    mu_masked = torch.where(mask > 0, mu, torch.full_like(mu, -80.0))
    tokens["mask"] = mask.tolist()
    tokens["behaviour_logp_masked"] = mu_masked.tolist()
    masks = {"all": None, "masked": mask}
    ws = {}
    for mname, mm in masks.items():
        for k in ["none", "tis", "icepop"]:
            for lvl in ["token", "sequence"]:
                key = f"{k}/{lvl}" + ("" if mm is None else "|masked")
                ws[key] = weights(k, lvl, prox, mu if mm is None else mu_masked, lengths, mask=mm).tolist()
    losses = {}
    eps = {"ppo_clip": (0.2, 0.28), "ppo_clip_dual": (0.2, 0.28), "reinforce": (0.2, 0.28),
           "gspo": (3e-4, 4e-4), "cispo": (1.0, 0.28)}
    for pl, kw in [("ppo_clip", {}), ("ppo_clip_dual", {"clip_c": 3.0}), ("reinforce", {}), ("gspo", {}), ("cispo", {})]:
        for corr in ["none/token", "tis/sequence", "icepop/token"]:
            for mname, mm in masks.items():
                w = torch.tensor(ws[corr + ("" if mm is None else "|masked")])
                for agg in ["token_mean", "seq_mean_token_mean", "seq_sum_norm"]:
                    theta = logp.clone().requires_grad_(True)
                    kind = "ppo_clip" if pl == "ppo_clip_dual" else pl
                    per_tok = policy_loss(kind, theta, prox, tok_adv, w, *eps[pl], lengths=lengths, mask=mm, **kw)
                    total = aggregate(agg, per_tok, lengths, max_len, mask=mm)
                    total.backward()
                    losses[f"{pl}|{corr}|{agg}|{mname}"] = {"per_token": per_tok.detach().tolist(), "loss": total.item(),
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
    teacher = logp + torch.randn(n, generator=g) * 0.7
    new_adv, rkl = distill_advantage(tok_adv, teacher, mu_masked, mask, 0.6)
    distill = {"teacher_logp": teacher.tolist(), "coef": 0.6, "advantages": new_adv.tolist(), "reverse_kl": rkl}
    overlong = [{"len": n, "max_len": 20, "buffer_len": b, "penalty": p, "reward": overlong_penalty(n, 20, b, p)}
                for n in [0, 12, 16, 17, 19, 20, 21, 40] for b, p in [(0, 1.0), (4, 1.0), (4, 0.5), (20, 2.0)]]
    out = {"distill": distill, "overlong": overlong, "critic": critic, "loglinear": loglinear, "rewards": rewards, "groups": groups, "advantages": adv, "tokens": tokens, "kl": kls,
           "weights": ws, "policy": losses,
           "params": {"eps_low": 0.2, "eps_high": 0.28, "gspo_eps_low": 3e-4, "gspo_eps_high": 4e-4,
                      "cispo_eps_low": 1.0, "cispo_eps_high": 0.28, "clip_c": 3.0, "tis_cap": 2.0, "icepop_low": 0.5, "icepop_high": 2.0}}
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
