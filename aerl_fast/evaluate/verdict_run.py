"""The attacks and measurements behind each model's verdict (aerl_fast.analysis.verdict decides).

At the verdict radius (the largest radius of the first gradient attack, or --verdict-eps), per model:
the AutoAttack-grade cascade (APGD-CE, APGD-T, Square), FGSM, the configured PGD, transfer from every
other model on the same test set (the SL twin among them); then on what survives all of them, the
convergence rerun (APGD-CE and APGD-T with twice the steps and two restarts); an ε sweep that ends
at a radius covering the image box; the gradients in the attack's precision; two forward passes;
and the attack self-test on a copy of the model with a shortcut to a wrong class.
"""
from __future__ import annotations

import math
import statistics
from typing import List, Optional

import torch

from aerl_fast.analysis import masking as mk
from aerl_fast.analysis.verdict import (GRADIENT_FREE, SINGLE_STEP, TRANSFER, WHITE_BOX, AttackBreaks,
                                        check_convergence, check_ordering, check_self_test, decide, min_count,
                                        worst_case)

from .config import EvalConfig
from .inputs import ModelEntry, TestSet
from .results import ModelResult

SELF_TEST_POINTS = 64


class Shortcut(torch.nn.Module):
    """The model plus, for each anchor image a_j, a linear path to a wrong class t_j that opens
    inside a_j's ε-ball: z(x) + g_j·⟨x − a_j, u_j⟩/s · (e_t − e_y), with u_j pointing into the box
    and s the largest value of ⟨δ, u_j⟩ over the ball, so the anchor itself is unchanged and the
    far point x = a_j + ε·u_j moves the margin by g_j, twice the anchor's own margin plus one.  A
    working attack breaks it; the anchor of a row is the nearest one (rows move inside their ball)."""

    def __init__(self, model, anchors, labels, targets, gains, eps: float, norm: str):
        super().__init__()
        self.model = model
        d = anchors[0].numel()
        toward_centre = (0.5 - anchors).flatten(1)
        if norm == "linf":
            u, scale = torch.where(toward_centre >= 0, 1.0, -1.0), eps * d
        else:
            u, scale = toward_centre / toward_centre.norm(dim=1, keepdim=True).clamp_min(1e-12), eps
        self.register_buffer("anchors", anchors.detach().clone())
        self.register_buffer("u", u)
        self.register_buffer("labels", labels)
        self.register_buffer("targets", targets)
        self.register_buffer("gains", gains)
        self.scale = float(scale)

    def forward(self, x):
        z = self.model(x)
        with torch.no_grad():
            j = torch.cdist(x.flatten(1).float(), self.anchors.flatten(1).float()).argmin(1)
        delta = (x - self.anchors[j]).flatten(1)
        bump = self.gains[j] * (delta * self.u[j]).sum(1) / self.scale
        shift = torch.zeros_like(z)
        shift.scatter_(1, self.targets[j, None], 1.0)
        shift.scatter_(1, self.labels[j, None], -1.0)
        return z + bump[:, None].to(z.dtype) * shift


def _clean_logits(model, x, batch_size):
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, x.shape[0], batch_size)])


def self_test(entry: ModelEntry, ts: TestSet, clean_ok, eps: float, norm: str, config: EvalConfig, attack) -> mk.MaskingFlag:
    """`attack(model, x, y) -> [m] bool fooled` must break a breakable copy of the model."""
    idx = clean_ok.to(ts.x.device).nonzero().squeeze(1)[:SELF_TEST_POINTS]
    if idx.numel() == 0:
        return check_self_test(0, 0)
    x, y = ts.x[idx], ts.y[idx]
    z = _clean_logits(entry.model, x, config.batch_size)
    runner_up = z.scatter(1, y[:, None], float("-inf")).argmax(1)
    margin = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, runner_up[:, None]).squeeze(1)
    model = Shortcut(entry.model, x, y, runner_up, 2.0 * margin.clamp_min(0) + 1.0, eps, norm).eval()
    fooled = attack(model, x, y)
    return check_self_test(int(fooled.sum()), int(idx.numel()))


def _randomness(model, x, batch_size) -> mk.MaskingFlag:
    from aerl_fast.attacks import attack_mode  # noqa: PLC0415
    with attack_mode(model):
        a, b = _clean_logits(model, x, batch_size), _clean_logits(model, x, batch_size)
    diff = float((a - b).abs().max()) / max(float(a.abs().max()), 1.0)
    return mk.check_randomness(int((a.argmax(1) != b.argmax(1)).sum()), diff, int(x.shape[0]))


def _box_radius(norm: str, shape) -> float:
    return 1.0 if norm == "linf" else math.sqrt(float(torch.Size(shape).numel()))


def epsilon_sweep(entry: ModelEntry, ts: TestSet, clean_ok, eps: float, norm: str, config: EvalConfig):
    """Accuracy at eps·2^k up to, and ending at, a radius covering the box (APGD with the DLR loss,
    which does not saturate, each radius only on the points the smaller one left); the median over
    broken points of the distance of the first adversarial; and which points broke at eps itself."""
    from aerl_fast.attacks import apgd  # noqa: PLC0415
    box = _box_radius(norm, ts.x.shape[1:])
    radii, r = [], eps
    while r < box:
        radii.append(r)
        r *= 2
    radii.append(box)
    alive = clean_ok.to(ts.x.device).clone()
    n, accs, dist = alive.numel(), [], torch.full((alive.numel(),), float("inf"))
    classes = int(_clean_logits(entry.model, ts.x[:1], 1).shape[1])
    for r in radii:
        idx = alive.nonzero().squeeze(1)
        if idx.numel():
            res = apgd(entry.model, ts.x[idx], ts.y[idx], eps=r, norm=norm, steps=config.aa_steps,
                       loss="dlr" if classes >= 3 else "ce", seed=config.seed + 7, sample_ids=idx, budget="full",
                       clamp=True)
            hit = res.fooled.nonzero().squeeze(1)
            if hit.numel():
                d = (res.x_adv[hit] - ts.x[idx[hit]]).flatten(1)
                d = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
                dist[idx[hit].cpu()] = d.float().cpu()
                alive[idx[hit]] = False
        accs.append(float(alive.double().sum()) / n)
        if r == radii[0]:
            first = clean_ok.cpu() & ~alive.cpu()  # broken at the verdict radius itself
    found = [v for v in dist.tolist() if math.isfinite(v)]
    return radii, accs, (statistics.median(found) if found else None), first


def _aa_breaks(res, clean_ok) -> List[AttackBreaks]:
    kinds = {"apgd-ce": WHITE_BOX, "apgd-t": WHITE_BOX, "fab-t": WHITE_BOX, "square": GRADIENT_FREE}
    by = res.broken_by.cpu()
    return [AttackBreaks(name, kinds[name], (by == k) & clean_ok) for k, name in enumerate(res.stage_names)]


def run_verdict(entry: ModelEntry, result: ModelResult, ts: TestSet, config: EvalConfig, eps: float, norm: str,
                transfer: Optional[dict], amp: bool, log) -> None:
    """Every attack and check of the verdict for one model; stores result.verdict and result.breaks."""
    from aerl_fast.attacks import AttackError, autoattack_fast, fgsm  # noqa: PLC0415
    from aerl_fast.runtime import amp_dtype  # noqa: PLC0415

    clean_ok = result.clean_ok.bool()
    n = int(clean_ok.numel())
    x, y = ts.x, ts.y
    attacks: List[AttackBreaks] = []
    checks = [_randomness(entry.model, x[:SELF_TEST_POINTS * 4], config.batch_size)]
    for label, out in result.attacks.items():
        if eps in out.eps and out.attack in ("pgd-l2", "pgd-linf") and out.norm == norm:
            attacks.append(AttackBreaks(label, WHITE_BOX, clean_ok & ~out.robust[out.eps.index(eps)]))
    cascade = None
    if not checks[0].flagged:  # a random model has no reproducible cascade (autoattack_fast refuses it)
        try:
            cascade = autoattack_fast(entry.model, x, y, eps=eps, norm=norm, seed=config.seed, budget=config.aa_budget,
                                      steps=config.aa_steps, queries=config.aa_queries, batch_size=config.batch_size,
                                      amp=amp, return_adv=False)
            attacks += _aa_breaks(cascade, clean_ok)
        except AttackError as exc:
            log(f"  verdict {entry.name}: the cascade did not run ({exc})")
    single = fgsm(entry.model, x, y, eps=eps, norm=norm, clamp=config.clamp, return_result=True)
    attacks.append(AttackBreaks("fgsm", SINGLE_STEP, clean_ok & single.fooled.cpu()))
    if transfer is not None and entry.name in transfer["names"]:
        j = transfer["names"].index(entry.name)
        for i, src in enumerate(transfer["names"]):
            if i != j:
                attacks.append(AttackBreaks(f"transfer from {src}", TRANSFER, clean_ok & ~transfer["robust"][i, j]))
    radii, accs, median, at_eps = epsilon_sweep(entry, ts, clean_ok, eps, norm, config)
    attacks.append(AttackBreaks("apgd-dlr", WHITE_BOX, at_eps))  # the sweep's first radius is the verdict's
    checks += check_ordering(attacks, n)
    # convergence: the strongest white-box attack, twice the steps and two restarts, on what survived
    alive = worst_case(clean_ok, attacks).robust_mask.to(x.device)
    idx = alive.nonzero().squeeze(1)
    extra = torch.zeros(n, dtype=torch.bool)
    if idx.numel() and not checks[0].flagged:
        again = autoattack_fast(entry.model, x[idx], y[idx], eps=eps, norm=norm, seed=config.seed + 1,
                                stages=("apgd-ce", "apgd-t"), budget="full", steps=2 * config.aa_steps,
                                batch_size=config.batch_size, sample_ids=idx, amp=amp, return_adv=False)
        extra[idx.cpu()] = (~again.robust & again.clean).cpu()
    checks.append(check_convergence(int(extra.sum()), int(idx.numel()), n,
                                    f"APGD-CE + APGD-T with {2 * config.aa_steps} steps"))
    attacks.append(AttackBreaks("convergence rerun", WHITE_BOX, extra))
    worst = worst_case(clean_ok, attacks)  # the union of everything run at the verdict radius
    checks.append(mk.check_epsilon_to_zero(radii, accs, median))
    health = mk.gradient_health(entry.fast, x, y, loss="ce", batch_size=config.batch_size,
                                amp_dtype=amp_dtype(x.device, amp, log=lambda m: None))
    checks += [mk.check_gradients(health, min_count(n)), mk.check_saturation(health)]

    def white_box(model, xs, ys):
        """The verdict's white-box attack: APGD-CE, then APGD-DLR (scale-invariant: a saturated softmax
        does not stop it) on what CE left."""
        from aerl_fast.attacks import apgd  # noqa: PLC0415
        kw = dict(eps=eps, norm=norm, steps=config.aa_steps, seed=config.seed, budget="full")
        fooled = apgd(model, xs, ys, loss="ce", **kw).fooled
        left = (~fooled).nonzero().squeeze(1)
        if left.numel() and model.model(xs[:1]).shape[1] >= 3:
            fooled[left] = apgd(model, xs[left], ys[left], loss="dlr", sample_ids=left, **kw).fooled
        return fooled
    checks.append(self_test(entry, ts, clean_ok, eps, norm, config, white_box))
    settings = {"eps": eps, "norm": norm, "norm_name": "L∞" if norm == "linf" else "L2", "n": n,
                "aa_steps": config.aa_steps, "aa_queries": config.aa_queries, "aa_budget": config.aa_budget,
                "cascade": cascade.summary() if cascade is not None else None}
    result.breaks = {a.name: a.broken for a in attacks}
    result.verdict = decide(worst, checks, settings, entry.name)
    log(f"  verdict {entry.name}: {result.verdict.label} — worst case {100 * worst.accuracy:.1f}% "
        f"({', '.join(c.check for c in checks if c.flagged) or 'no check fired'})")


def verdict_radius(config: EvalConfig) -> tuple:
    """(eps, norm) of the verdict: --verdict-eps, else the largest radius of the first gradient attack."""
    grad = [a for a in config.attacks if a in ("pgd-l2", "pgd-linf", "fgsm")] or list(config.attacks)
    a = grad[0]
    norm = config.norm_of(a)
    return (config.verdict_eps if config.verdict_eps is not None else max(config.radii(a))), norm


