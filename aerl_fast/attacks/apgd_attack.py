"""APGD, Auto-PGD (Croce & Hein, ICML 2020), with CE and DLR losses, untargeted or over the top-k
target classes, in L-inf and L2, with per-sample ε.

    res = apgd(model, x, y, eps=8/255, norm="linf", steps=100, loss="ce")
    res = apgd(model, x, y, eps=0.5, norm="l2", loss="dlr", targets=9)   # APGD-T
    res.fooled, res.x_adv, res.forwards, res.backwards

The iteration (x0 the clean image, P the projection onto the ε-ball and [0, 1]):

    z       = P(x_k + η_k · d(∇f(x_k)))            d = sign (L-inf) or g/‖g‖ (L2): `pgd_step`
    x_{k+1} = P(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1}))     α = 0.75 (1 on the first step)

η_0 = 2ε.  At the checkpoints w_j = ⌈p_j·N⌉, p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1}
− 0.03, 0.06) (AutoAttack's integer form, `checkpoints`), η halves and the iterate restarts from
the best point when fewer than ρ = 0.75 of the steps since the last checkpoint increased the loss,
or when the step size was not halved at the last checkpoint and the best loss has not grown since.
The start is x0 + ε·t/‖t‖ (t uniform in [−1, 1]^d for L-inf, normal for L2), clipped to [0, 1].

Targeted (targets = k): one run per target class, the 2nd … (k+1)-th largest clean logits in turn,
each on the points still unbroken; DLR-targeted loss (see `dlr_loss`) or minus CE on the target.

Differences from AutoAttack's implementation, on purpose: a point leaves the batch as soon as an
iterate fools the model (results are per sample, so this changes the cost, not the outcome);
every random start comes from the point's own counter-based stream (seed, sample id, stream,
restart: `_rng`), so results do not depend on the batch; the oscillation test counts increases
against the previous iterate from the first step on (AutoAttack's first window compares its first
loss against an unset entry).
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from aerl_fast.kernels import pgd_step

from . import _rng
from ._active import Rows, Target, attack_clean_correct
from ._common import AttackError, check_count, dlr_loss, margin
from .budget import StallRule, rule_for

APGD_LOSSES = ("ce", "dlr")
Hook = Callable[[int, torch.Tensor, Dict[str, torch.Tensor]], None]
STREAMS = {"ce": 1, "dlr": 2}  # random-stream codes; a targeted run adds 16 x its target rank


class APGDResult(NamedTuple):
    """x_adv: the first fooling iterate of each fooled sample, the clean image elsewhere;
    fooled [B] bool; forwards / backwards [B] int64: passes spent on each sample."""
    x_adv: torch.Tensor
    fooled: torch.Tensor
    forwards: torch.Tensor
    backwards: torch.Tensor


def checkpoints(steps: int) -> List[int]:
    """Iteration counts after which the step size is reviewed: AutoAttack's integer form of
    p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (for 100 steps: 22, 41, 57, 70,
    80, 87, 93, 99)."""
    k = max(int(0.22 * steps), 1)
    shrink, floor = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, w = [], k
    while w <= steps:
        out.append(w)
        k = max(k - shrink, floor)
        w += k
    return out


def halve(n_up: torch.Tensor, window: int, reduced: torch.Tensor, best_then: torch.Tensor,
          best_now: torch.Tensor, rho: float = 0.75) -> torch.Tensor:
    """The paper's two conditions at a checkpoint, per row: fewer than rho of the window's steps
    increased the loss, or the step was not halved at the last checkpoint and the best loss has
    not grown since."""
    return (n_up < rho * window) | (~reduced & (best_then >= best_now))


def _loss_fn(rows: Rows, loss: str):
    def fn(z):
        y, t = rows["y"], rows.state.get("target")
        if loss == "ce":
            return F.cross_entropy(z, y, reduction="none") if t is None else -F.cross_entropy(z, t, reduction="none")
        return dlr_loss(z, y, t)
    return fn


def _start(tg: Target, idx, x0, eps, stream: int, restart: int) -> torch.Tensor:
    """x0 + ε·t/‖t‖ from each sample's own stream, clipped to the box."""
    key = _rng.keys(tg.seed, tg.ids[idx], stream, restart)
    d = x0[0].numel()
    if tg.norm == "linf":
        t = _rng.uniform(key, d).mul_(2).sub_(1)
        t = t / (t.abs().amax(1, keepdim=True) + 1e-12)
    else:
        t = _rng.normal(key, d)
        t = t / (t.norm(dim=1, keepdim=True) + 1e-12)
    x = x0 + eps.view(-1, *([1] * (x0.dim() - 1))) * t.view(x0.shape)
    return x.clamp_(*tg.box) if tg.box is not None else x


def run_apgd(tg: Target, idx: torch.Tensor, out: torch.Tensor, fooled: torch.Tensor, *, steps: int,
             loss: str, stream: int, restart: int = 0, rho: float = 0.75,
             rule: Optional[StallRule] = None, target: Optional[torch.Tensor] = None,
             hook: Optional[Hook] = None) -> None:
    """One APGD run on the samples `idx` of `tg`; fills `out`/`fooled`.  `target`: [len(idx)]
    target classes for a targeted run.  `rule` ends the run early for points off course.
    `hook(i, rows, state)` sees the state after the start (i = -1) and after every iteration's
    step-size review (before broken rows leave)."""
    rows = Rows(tg, idx, out, fooled)
    x0, eps = tg.x0[idx], tg.eps[idx]
    rows["x0"], rows["y"], rows["eps"] = x0, tg.y[idx], eps
    if target is not None:
        rows["target"] = target
    fn = _loss_fn(rows, loss)
    x = _start(tg, idx, x0, eps, stream, restart)
    z, l, g = tg.loss_grad(x, rows.idx, fn)
    rows.hit(z, x)
    m = margin(z, rows["y"])
    n = len(rows)
    rows.state.update(x=x, x_prev=x, g=g, x_best=x.clone(), g_best=g.clone(), l_best=l, l_prev=l,
                      l_check=l, n_up=torch.zeros(n, device=l.device), step=2 * eps,
                      reduced=torch.ones(n, dtype=torch.bool, device=l.device), m_best=m,
                      m_hist=m[:, None], strikes=torch.zeros(n, dtype=torch.int32, device=l.device))
    if hook is not None:
        hook(-1, rows.idx, rows.state)
    if not rows.compact(0):
        return
    marks, last, reviewed = checkpoints(steps), 0, [0]
    col = (-1,) + (1,) * (x0.dim() - 1)
    for i in range(steps):
        s = rows.state
        x, x0, eps, step = s["x"], s["x0"], s["eps"], s["step"]
        zx = x.clone()
        pgd_step(zx, x0, s["g"], step, eps, norm=tg.norm, clamp=tg.box, validate=False)
        if i == 0:
            x_new = zx
        else:  # momentum 0.75, then back into the ball and the box
            x_new = x + 0.75 * (zx - x) + 0.25 * (x - s["x_prev"])
            pgd_step(x_new, x0, torch.zeros_like(x_new), 0.0, eps, norm=tg.norm, clamp=tg.box, validate=False)
        z, l, g = tg.loss_grad(x_new, rows.idx, fn)
        rows.hit(z, x_new)
        better = l > s["l_best"]
        s["x_best"] = torch.where(better.view(col), x_new, s["x_best"])
        s["g_best"] = torch.where(better.view(col), g, s["g_best"])
        s["l_best"] = torch.where(better, l, s["l_best"])
        s["n_up"] = s["n_up"] + (l > s["l_prev"]).float()
        s.update(x_prev=x, x=x_new, g=g, l_prev=l, m_best=torch.minimum(s["m_best"], margin(z, s["y"])))
        drop = None
        if marks and i + 1 == marks[0]:
            window, last = marks[0] - last, marks.pop(0)
            red = halve(s["n_up"], window, s["reduced"], s["l_check"], s["l_best"], rho)
            s["step"] = torch.where(red, s["step"] / 2, s["step"])
            s["x"] = torch.where(red.view(col), s["x_best"], s["x"])
            s["g"] = torch.where(red.view(col), s["g_best"], s["g"])
            s.update(reduced=red, l_check=s["l_best"], n_up=torch.zeros_like(s["n_up"]))
            if rule is not None:
                s["m_hist"] = torch.cat([s["m_hist"], s["m_best"][:, None]], 1)
                reviewed.append(i + 1)
                s["strikes"], drop = rule.review(s["m_hist"], reviewed, steps - i - 1, s["strikes"])
        if hook is not None:
            hook(i, rows.idx, s)
        if not rows.compact(i + 1, drop=drop):
            return
    rows.finish()


def target_ranks(clean_logits: torch.Tensor) -> torch.Tensor:
    """Classes by decreasing clean logit ([N, K]); column r - 1 is the rank-r target."""
    return clean_logits.sort(dim=1, descending=True, stable=True).indices


def run_apgd_stage(tg: Target, idx: torch.Tensor, out: torch.Tensor, fooled: torch.Tensor, *,
                   steps: int, loss: str, targets: int, restarts: int, rho: float,
                   rule: Optional[StallRule], clean_logits: Optional[torch.Tensor],
                   hook: Optional[Hook] = None) -> None:
    """APGD (targets = 0) or APGD-T over `targets` classes, `restarts` runs each, on `idx`; each
    run attacks the samples still unbroken."""
    order = target_ranks(clean_logits) if targets else None
    for rank in (range(2, targets + 2) if targets else [0]):
        stream = STREAMS[loss] + 16 * rank
        for r in range(restarts):
            live = idx[~fooled[idx]]
            if live.numel() == 0:
                return
            tgt = order[live, rank - 1] if targets else None
            run_apgd(tg, live, out, fooled, steps=steps, loss=loss, stream=stream, restart=r, rho=rho,
                     rule=rule, target=tgt, hook=hook)


def apgd(model, x, y, *, eps, norm: str = "linf", steps: int = 100, loss: str = "ce",
         targets: int = 0, restarts: int = 1, rho: float = 0.75, seed: int = 0, sample_ids=None,
         clamp=True, budget: str = "full", amp: bool = False,
         compact_every: Optional[int] = None, hook: Optional[Hook] = None) -> APGDResult:
    """APGD on the summed per-sample `loss` ("ce" or "dlr"); `targets` > 0 runs APGD-T over that
    many target classes.  eps: a float or a [B] tensor (> 0).  seed / sample_ids key each
    sample's random starts (default ids: the row index).  budget "fast" stops points that make no
    progress (`aerl_fast.attacks.budget`).  amp: bf16 autocast where the device has it (the
    fooling decision is the bf16 model's; `autoattack_fast` re-checks in fp32).  hook(i, rows,
    state): called with each run's state after the start (i = -1) and after every iteration
    (rows: sample indices; state: x, x_best, l_best, step, ... per row).  Only clean-correct
    samples are attacked (a misclassified one counts as fooled, with its clean image)."""
    if loss not in APGD_LOSSES:
        raise AttackError(f"unknown APGD loss {loss!r}; choose one of {', '.join(APGD_LOSSES)}")
    steps, restarts, targets = check_count("steps", steps), check_count("restarts", restarts), \
        check_count("targets", targets, 0)
    if not 0 < rho <= 1:
        raise AttackError(f"rho must be in (0, 1], got {rho}")
    rule = rule_for(budget)

    def run(tg, idx, out, fooled, clean):
        if targets:
            check_target_classes(clean.shape[1], targets)
        run_apgd_stage(tg, idx, out, fooled, steps=steps, loss=loss, targets=targets, restarts=restarts,
                       rho=float(rho), rule=rule, clean_logits=clean, hook=hook)

    tg, out, fooled = attack_clean_correct(model, x, y, run, eps=eps, norm=norm, seed=seed,
                                           sample_ids=sample_ids, clamp=clamp, amp=amp,
                                           compact_every=compact_every)
    return APGDResult(out, fooled, tg.forwards, tg.backwards)


def check_target_classes(n_classes: int, targets: int) -> None:
    """Targeted runs need targets + 1 classes, and the targeted DLR loss the 4 largest logits."""
    need = max(4, int(targets) + 1)
    if n_classes < need:
        raise AttackError(f"targets={targets} needs at least {need} classes (the targeted DLR loss uses "
                          f"the 4 largest logits); the model has {n_classes}: lower targets or drop the stage")
