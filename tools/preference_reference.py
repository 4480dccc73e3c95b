#!/usr/bin/env python3
"""Reference for Tandem's preference losses (trainer/src/preference.rs), written
independently with PyTorch in float64: Bradley–Terry with and without margins,
Plackett–Luce, DPO and IPO, with the gradients of each loss with respect to its inputs.
Writes tests/fixtures/preference.json.

    python tools/preference_reference.py
"""
import json

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
g = torch.Generator().manual_seed(0)


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).requires_grad_(True)


def grads(loss, *xs):
    return [t.tolist() for t in torch.autograd.grad(loss, xs)]


def main():
    out = {}
    r_w, r_l = rand(6, scale=2.0), rand(6, scale=2.0)
    margin = torch.rand(6, generator=g) * 2.0
    bt = -F.logsigmoid(r_w - r_l).mean()
    out["bradley_terry"] = {"r_w": r_w.tolist(), "r_l": r_l.tolist(), "loss": bt.item(), "grads": grads(bt, r_w, r_l)}
    bm = -F.logsigmoid(r_w - r_l - margin).mean()
    out["bradley_terry_margin"] = {"r_w": r_w.tolist(), "r_l": r_l.tolist(), "margin": margin.tolist(), "loss": bm.item(),
                                   "grads": grads(bm, r_w, r_l)}
    r = rand(3, 4, scale=2.0)
    # Plackett–Luce: the probability of the ranking as successive softmax choices.
    pl = 0.0
    for k in range(r.shape[1] - 1):
        pl = pl + torch.log_softmax(r[:, k:], dim=1)[:, 0]
    pl = -pl.mean()
    out["plackett_luce"] = {"r": r.tolist(), "loss": pl.item(), "grads": grads(pl, r)}
    pi_w, pi_l, ref_w, ref_l = (rand(5, scale=3.0) - 20 for _ in range(4))
    pi_w, pi_l = pi_w.detach().requires_grad_(True), pi_l.detach().requires_grad_(True)
    beta = 0.1
    h = (pi_w - ref_w) - (pi_l - ref_l)
    dpo = -F.logsigmoid(beta * h).mean()
    ipo = ((h - 1 / (2 * beta)) ** 2).mean()
    base = {"pi_w": pi_w.tolist(), "pi_l": pi_l.tolist(), "ref_w": ref_w.tolist(), "ref_l": ref_l.tolist(), "beta": beta}
    out["dpo"] = dict(base, loss=dpo.item(), grads=grads(dpo, pi_w, pi_l))
    out["ipo"] = dict(base, loss=ipo.item(), grads=grads(ipo, pi_w, pi_l))
    with open("tests/fixtures/preference.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
