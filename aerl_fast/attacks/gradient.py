"""FGSM and PGD (L-inf and L2) on models taking inputs in [0, 1], with per-sample ε and step.

    x_adv = pgd(model, x, y, eps=1.0, step=0.1, steps=100, norm="l2")
    res = pgd(model, x, y, eps=eps_per_sample, step=0.1, steps=100, norm="l2",
              early_stop=True, return_result=True)   # res.x_adv, res.fooled, res.grad_evals

Every update goes through `aerl_fast.kernels.pgd_step` (one call site: the fused Triton kernel on
CUDA, its torch reference elsewhere); FGSM is one such step of size ε from the clean image.
During an attack the model is in eval mode with frozen parameters (see `attack_mode`), and the
gradient is `torch.autograd.grad` of the *summed* loss with respect to the input only.  The attack
runs on `runtime.fast_eval_copy(model)`, a channels_last copy where that layout pays (CPU and CUDA
for convolutional models; the caller's module is never changed).

Early stopping: a sample counts as broken the first time any iterate (the random start, each
step's iterate, the last one) fools the model; it keeps that iterate and leaves the batch. Robust
samples are those never broken, so this is at least as strong as last-iterate PGD with the same
random start, and the batch shrinks as the attack succeeds. Removing samples needs the host to see
which ones were fooled: that is the only host sync inside the loop, done every `compact_every`
steps (1 on CPU, where there is no device to wait for; 5 on CUDA, where fooled samples are kept in
the batch until the next compaction and their first fooling iterate is stashed on the device).
Last-iterate mode (early_stop=False) has no host sync in its loop when ε and step are floats.
(With per-sample ε/step tensors, `aerl_fast.kernels.pgd_step` itself checks them for negatives on
every call, which syncs on CUDA; the attack checks them once up front.)

Random starts are reproducible per sample: with `seed`, the start direction of row i depends only
on (seed, restart, sample_ids[i]) (default id: the row index), so a batch holding the same image
at several ε (a robustness curve in one batched attack) starts each copy exactly where a separate
run at that ε would, whatever the chunking.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from aerl_fast.kernels import pgd_step
from aerl_fast.runtime import fast_eval_copy

from ._common import (AttackError, Scalar, as_column, attack_loss, attack_mode, check_batch,
                      check_count, check_image_range, check_norm, check_sample_ids, check_step,
                      fooled_by, index, per_sample, resolve_clamp, resolve_compact_every, LOSSES)
from ._rng import mix


class AttackResult(NamedTuple):
    """x_adv: adversarial images; fooled [B] bool: some checked iterate fooled the model (early stop)
    or the returned image does (last-iterate); grad_evals / forwards: per-sample gradient and
    forward evaluations spent (the work early stopping saves)."""
    x_adv: torch.Tensor
    fooled: torch.Tensor
    grad_evals: int
    forwards: int


def _draw(batch, shape, norm, device, gen):
    """Raw starts for `batch` rows (batch=None: one row, no leading dim): U(-1, 1) for L-inf; for
    L2 a Gaussian direction and a U(0, 1) radius fraction (torchattacks' distributions)."""
    lead = () if batch is None else (batch,)
    if norm == "linf":
        u = torch.empty(lead + shape, device=device, dtype=torch.float32).uniform_(-1.0, 1.0, generator=gen)
        return u, None
    d = torch.randn(lead + shape, device=device, dtype=torch.float32, generator=gen)
    return d, torch.rand(lead, device=device, dtype=torch.float32, generator=gen)


def _random_start(x0, eps, norm, seed, restart, ids):
    """A random point of the ball for each row: uniform in the L-inf ball, or torchattacks' L2
    start (random direction, radius ε·U(0,1)).

    With a seed, row i's start depends only on (seed, restart, ids[i]): it does not change with
    the batch it is drawn in (chunking, early-stop compaction, several ε per image). Each distinct
    id gets its own small generator, a Python loop over the batch once per restart, never inside
    the step loop. Without a seed the batch is drawn at once from torch's global RNG.
    """
    B, shape, dev = x0.shape[0], tuple(x0.shape[1:]), x0.device
    if seed is None:
        d, r = _draw(B, shape, norm, dev, None)
    else:
        keys = ids.tolist()  # host read, once per restart
        cache, ds, rs = {}, [], []
        for key in keys:
            if key not in cache:
                g = torch.Generator(device=dev)
                g.manual_seed(mix(seed, restart, key))
                cache[key] = _draw(None, shape, norm, dev, g)
            ds.append(cache[key][0])
            rs.append(cache[key][1])
        d = torch.stack(ds)
        r = None if norm == "linf" else torch.stack(rs)
    if norm == "linf":
        return d.mul_(as_column(eps, d))
    n = d.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = r / n * (eps if isinstance(eps, torch.Tensor) else float(eps))
    return d.mul_(scale.view(-1, *([1] * (d.dim() - 1))))


def _run(model, x, y, *, eps, step, steps, norm, random_start, early_stop, clamp, seed, restarts,
         targeted, loss, tracker, sample_ids, compact_every, need_result) -> AttackResult:
    """Shared driver of fgsm and pgd: checks, restarts, and the step loop."""
    batch = check_batch(x, y)
    norm = check_norm(norm)
    if loss not in LOSSES:
        raise AttackError(f"unknown attack loss {loss!r}; choose one of {', '.join(LOSSES)}")
    steps, restarts = check_count("steps", steps, 0), check_count("restarts", restarts)
    dev = x.device
    eps = per_sample(eps, batch, dev, "eps")
    step = per_sample(step, batch, dev, "step")
    check_step(step, eps)
    box = resolve_clamp(clamp)
    x0 = x.detach()
    check_image_range(x0, box)
    y = y.to(device=dev, dtype=torch.int64)
    if tracker is not None and (early_stop or restarts > 1):
        raise AttackError("gradient tracking needs a fixed batch: use early_stop=False and restarts=1")
    ids_all = check_sample_ids(sample_ids, batch, dev)
    compact_every = resolve_compact_every(compact_every, dev)

    out = x0.clone()
    fooled = torch.zeros(batch, dtype=torch.bool, device=dev)
    counts = [0, 0]  # per-sample gradient evaluations, forwards
    need_final = early_stop or restarts > 1 or need_result
    with attack_mode(fast_eval_copy(model)) as net:
        for r in range(restarts):
            if r == 0:
                rows = torch.arange(batch, device=dev)
            else:  # later restarts attack only what is still unbroken (host sync between restarts)
                rows = (~fooled).nonzero().squeeze(1)
                if rows.numel() == 0:
                    break
            start = None
            if random_start:
                start = _random_start(x0.index_select(0, rows), index(eps, rows) if r else eps,
                                      norm, seed, r, ids_all.index_select(0, rows))
            _restart(net, x0, y, rows, start, index(eps, rows) if r else eps,
                     index(step, rows) if r else step, steps, norm, box, early_stop, targeted, loss,
                     tracker, int(compact_every), need_final, out, fooled, counts)
    return AttackResult(out, fooled, counts[0], counts[1])


def _restart(model, x0_all, y_all, rows, start, eps, step, steps, norm, box, early_stop, targeted,
             loss, tracker, compact_every, need_final, out, fooled, counts):
    """One restart on the batch rows `rows`; writes their adversarials into `out`, marks `fooled`."""
    ids = rows
    x0 = x0_all.index_select(0, rows)
    y = y_all.index_select(0, rows)
    xa = x0.clone() if start is None else (x0 + start)
    if box is not None:
        xa.clamp_(box[0], box[1])
    pending = stash = None  # early stop with compaction every k > 1 steps: fooled-but-not-yet-removed
    stash_needed = early_stop and compact_every > 1

    for t in range(steps):
        xi = xa.detach().requires_grad_(True)
        logits = model(xi)
        (g,) = torch.autograd.grad(attack_loss(logits, y, loss, targeted), xi)
        counts[0] += xi.shape[0]
        counts[1] += xi.shape[0]
        if tracker is not None:
            tracker.update(g)
        if early_stop:
            hit = fooled_by(logits.detach(), y, targeted)
            if stash_needed:
                if pending is None:
                    pending, stash = hit.clone(), xa.clone()
                else:
                    new = hit & ~pending
                    stash = torch.where(new.view(-1, *([1] * (xa.dim() - 1))), xa, stash)
                    pending |= hit
            if t % compact_every == 0:
                hit_now = pending if stash_needed else hit
                src = stash if stash_needed else xa
                sel = hit_now.nonzero().squeeze(1)  # the loop's one host sync (early stop only)
                if sel.numel():
                    out[ids[sel]] = src[sel]
                    fooled[ids[sel]] = True
                    keep = (~hit_now).nonzero().squeeze(1)
                    if keep.numel() == 0:
                        return
                    ids, x0, y, xa, g = ids[keep], x0[keep], y[keep], xa[keep], g[keep]
                    eps, step = index(eps, keep), index(step, keep)
                    if stash_needed:
                        pending, stash = pending[keep], stash[keep]
        # the one PGD update call site; step/ε were checked once in _run (no per-step host sync)
        pgd_step(xa, x0, g, step, eps, norm=norm, clamp=box, validate=False)

    if need_final:
        with torch.no_grad():
            hit = fooled_by(model(xa), y, targeted)
        counts[1] += xa.shape[0]
        if stash_needed and pending is not None:
            # a sample already fooled earlier keeps its first fooling iterate
            xa = torch.where(pending.view(-1, *([1] * (xa.dim() - 1))), stash, xa)
            hit = hit | pending
        out[ids] = xa
        fooled[ids] = fooled[ids] | hit
    else:
        out[ids] = xa


def pgd(model, x, y, *, eps: Scalar, step: Scalar, steps: int = 10, norm: str = "linf",
        random_start: bool = True, early_stop: bool = False, clamp=True, seed: Optional[int] = None,
        restarts: int = 1, targeted: bool = False, loss: str = "ce", tracker=None,
        sample_ids=None, compact_every: Optional[int] = None, return_result: bool = False):
    """Projected gradient ascent on the summed attack loss, inside the ε-ball around `x`.

    eps, step: floats or per-sample [B] tensors (ε in the threat model's norm: L-inf pixel units
      or L2 distance in [0, 1] pixel space); a step larger than a positive ε is refused.
    norm: "linf" (sign steps) or "l2" (normalised-gradient steps).
    random_start: start from a random point of the ball (torchattacks' distributions).
    early_stop: per-sample early stopping (module docstring); False = last iterate.
    clamp: True keeps images in [0, 1]; False is the study's preset (no box); or (lo, hi).
    seed: None uses torch's global RNG; an int a private generator (reproducible starts).
    restarts: further random restarts on the samples not yet fooled.
    targeted: `y` are target classes; success = predicting them.
    loss: "ce" (default; also for RL models, see `attack_loss`) or "margin".
    tracker: an `aerl_fast.analysis.GradStatsTracker` fed every step's gradient (fixed batch only).
    sample_ids: [B] ids choosing each row's random start (rows sharing an id share a start).
    return_result: return an `AttackResult` instead of the images alone.
    """
    res = _run(model, x, y, eps=eps, step=step, steps=steps, norm=norm, random_start=random_start,
               early_stop=early_stop, clamp=clamp, seed=seed, restarts=restarts, targeted=targeted,
               loss=loss, tracker=tracker, sample_ids=sample_ids, compact_every=compact_every,
               need_result=return_result)
    return res if return_result else res.x_adv


def fgsm(model, x, y, *, eps: Scalar, norm: str = "linf", clamp=True, targeted: bool = False,
         loss: str = "ce", return_result: bool = False):
    """Fast gradient (sign) method: one step of size ε from the clean image, through the same
    PGD update (L-inf: ε·sign(g); L2: ε·g/||g||). eps may be per-sample."""
    res = _run(model, x, y, eps=eps, step=eps, steps=1, norm=norm, random_start=False,
               early_stop=False, clamp=clamp, seed=None, restarts=1, targeted=targeted, loss=loss,
               tracker=None, sample_ids=None, compact_every=None, need_result=return_result)
    return res if return_result else res.x_adv
