"""Independent float64 formulas the kernels and the torch reference are checked against, and the
study's own formulation (bench/bench_kernels.py imports it so tests and benchmarks agree).

Written from the definitions in kernels/pg_loss.py's docstring (the study's loss), not by calling aerl_fast.kernels.
"""
import random

import torch

STUDY_FLOOR = 1e-6


def pg_loss_f64(logits, labels, actions, prob_floor=0.0, reduction="mean", grad_output=None,
                shift=None):
    """(loss, ∂loss/∂logits) in float64 for fixed actions: q = (softmax + f)/(1 + C·f),
    logπ = log(q[a] + f), r = 1[a = label], loss = −reduce((r − shift)·logπ), `shift` a per-row
    baseline (None: 0)."""
    x = logits.detach().double().requires_grad_(True)
    C = x.shape[1]
    z = x - x.max(dim=1, keepdim=True).values
    p = z.exp() / z.exp().sum(dim=1, keepdim=True)
    if prob_floor > 0:
        q = (p + prob_floor) / (1.0 + C * prob_floor)
        logp = torch.log(q[torch.arange(len(x)), actions] + prob_floor)
    else:
        logp = z[torch.arange(len(x)), actions] - z.exp().sum(dim=1).log()
    r = (actions == labels).double()
    if shift is not None:
        r = r - torch.as_tensor(shift, dtype=torch.float64)
    per_row = -(r * logp)
    loss = {"mean": per_row.mean, "sum": per_row.sum, "none": lambda: per_row}[reduction]()
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(loss, x, go)
    return loss.detach(), grad


def pg_grad_closed_form(logits, labels, actions, prob_floor=0.0):
    """∂/∂z of the summed loss −Σ r·log(q[a] + f) without autograd, in float64: with p = softmax(z),
    q = (p + f)/(1 + C·f) and ∂p_a/∂z_j = p_a(δ_aj − p_j), row i's gradient is
    −r_i · p_a(δ_aj − p_j) / ((1 + C·f)(q_a + f)); at f = 0 that is −r_i(δ_aj − p_j)."""
    z = logits.detach().double()
    p = torch.softmax(z, dim=1)
    rows = torch.arange(len(z))
    p_a = p[rows, actions]
    onehot = torch.zeros_like(p)
    onehot[rows, actions] = 1.0
    r = (actions == labels).double()
    renorm = 1 + z.shape[1] * prob_floor
    q_a = (p_a + prob_floor) / renorm
    return -(r * p_a / (renorm * (q_a + prob_floor)))[:, None] * (onehot - p)


def study_probs(logits):
    """The study's policy: softmax + 1e-6, renormalised."""
    p = torch.softmax(logits, dim=-1) + STUDY_FLOOR
    return p / p.sum(dim=-1, keepdim=True)


def study_loss_given_actions(logits, labels, actions):
    """The study's loss for given actions: −mean(r · log(p[a] + 1e-6))."""
    p = study_probs(logits)
    logp = torch.log(p.gather(1, actions[:, None]).squeeze(1) + STUDY_FLOOR)
    return -((actions == labels).float() * logp).mean()


def study_pg_loss(logits, labels, epsilon, generator=None, coin_rng=random):
    """The study's whole RL loss as they wrote it: torch.multinomial on the floored softmax and a
    host-side Python coin once per batch deciding uniform exploration for every row (no device
    sync).  `generator` must live on the logits' device."""
    p = study_probs(logits)
    if coin_rng.random() < epsilon:
        actions = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=generator,
                                device=logits.device)
    else:
        actions = torch.multinomial(p.detach(), 1, generator=generator).squeeze(1)
    logp = torch.log(p.gather(1, actions[:, None]).squeeze(1) + STUDY_FLOOR)
    return -((actions == labels).float() * logp).mean(), actions


def pgd_f64(x_adv, x0, grad, step, eps, norm, clamp=(0.0, 1.0)):
    """One PGD update in float64, per sample with plain Python loops over the batch."""
    out = torch.empty(x0.shape, dtype=torch.float64)
    B = x0.shape[0]
    step = torch.as_tensor(step, dtype=torch.float64).expand(B)
    eps = torch.as_tensor(eps, dtype=torch.float64).expand(B)
    for i in range(B):
        g = grad[i].double()
        d0 = x_adv[i].double() - x0[i].double()
        if norm == "linf":
            d = (d0 + step[i] * torch.sign(g)).clamp(-float(eps[i]), float(eps[i]))
        else:
            gn = float(g.norm())
            d = d0 + step[i] * (g / gn if gn > 1e-12 else g * 0)
            dn = float(d.norm())
            if dn > float(eps[i]):
                d = d * (eps[i] / dn)
        o = x0[i].double() + d
        out[i] = o.clamp(*clamp) if clamp is not None else o
    return out
