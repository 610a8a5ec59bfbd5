"""Input-gradient dynamics during PGD: the study's explanation of why RL models resist attacks.

Per step, over the attacked batch: mean per-sample input-gradient L2 norm, cosine of each
sample's gradient to its previous-step gradient, sign consistency, within-batch dispersion
(1 - ||mean unit gradient||); after the run the over-time dispersion of the per-step mean
directions. All of it comes from `GradStatsTracker` (one call site per step inside
`aerl_fast.attacks.pgd`), which accumulates on the device; results are read once per batch.

Scale: the gradients are those of the *summed* per-sample loss, so a sample's norm does not depend
on the batch size. The study's loss is mean-reduced, which divides every gradient by the batch
size B; `norm_mean_reduced` = norm / B reports that scale for the B used here.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from .gradient_stats import GradStatsTracker

STAT_KEYS = ("norm", "cos", "sign_agree", "dispersion")


def gradient_dynamics(model, x, y, *, eps, step, steps: int, norm: str = "l2", clamp=True,
                      random_start: bool = True, seed: Optional[int] = 0, batch_size: int = 256,
                      loss: str = "ce", targeted: bool = False, progress=None) -> dict:
    """Run last-iterate PGD on `x` in batches of `batch_size`, tracking the gradient statistics.

    Returns a JSON-ready dict: per-step batch means (`per_step`), their means over steps and the
    over-time dispersion (`summary`), weighted by batch size when there are several batches.
    `cos`/`sign_agree` are None (JSON null) on step 0, which has no previous step.
    progress: optional callable(n) after each batch.
    """
    from aerl_fast.attacks import pgd  # noqa: PLC0415 - attacks import analysis lazily too

    n = x.shape[0]
    if n == 0:
        raise ValueError("gradient_dynamics: empty batch")
    if steps < 1:
        raise ValueError("gradient_dynamics: needs at least one PGD step")
    batch = min(int(batch_size), n)
    sums = None     # [T, 4] float64 on device: batch-size-weighted per-step records
    over_time = None
    for i in range(0, n, batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        tracker = GradStatsTracker()
        pgd(model, xb, yb, eps=eps, step=step, steps=steps, norm=norm, clamp=clamp,
            random_start=random_start, early_stop=False, seed=seed, loss=loss, targeted=targeted,
            tracker=tracker)
        rec = tracker.records()
        table = torch.stack([rec[k].double() for k in STAT_KEYS], 1) * xb.shape[0]
        otd = tracker.over_time_dispersion().to(table.device).double() * xb.shape[0]
        sums = table if sums is None else sums + table
        over_time = otd if over_time is None else over_time + otd
        if progress is not None:
            progress(xb.shape[0])
    table = (sums / n).cpu()          # the one host read of the whole run
    over = float(over_time.cpu()) / n
    per_step = {k: [_num(v) for v in table[:, j].tolist()] for j, k in enumerate(STAT_KEYS)}
    per_step["norm_mean_reduced"] = [v / batch for v in per_step["norm"]]
    summary = {k: _num(float(torch.nanmean(table[:, j]))) for j, k in enumerate(STAT_KEYS)}
    summary["norm_mean_reduced"] = summary["norm"] / batch
    summary["over_time_dispersion"] = _num(over)
    return {
        "n": n, "batch_size": batch, "steps": steps, "norm": norm,
        "eps": _scalar(eps), "step": _scalar(step), "clamp": bool(clamp), "loss": loss,
        "per_step": per_step, "summary": summary,
        "scale_note": ("norm: L2 norm of each sample's input gradient of its own loss (summed-loss "
                       f"gradients, batch-size free); norm_mean_reduced = norm / {batch} (the batch "
                       "size), the scale of the study's mean-reduced loss"),
    }


def _num(v: float):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _scalar(v):
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.dim() else float(v)
    return float(v)


def plot_dynamics(results: Mapping[str, dict], path, title: Optional[str] = None) -> None:
    """One figure, all models: gradient norm (log scale), cosine to last step, sign consistency,
    within-batch dispersion, per PGD step."""
    from aerl_fast.plotting import pyplot, save  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415
    plt = pyplot()

    panels = [("norm", "input-gradient L2 norm\n(per-sample loss)", True),
              ("cos", "cosine to previous step", False),
              ("sign_agree", "sign consistency", False),
              ("dispersion", "within-batch dispersion\n1 - ||mean unit gradient||", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, label, log) in zip(axes, panels):
        for name, dyn in results.items():
            vals = [float("nan") if v is None else v for v in dyn["per_step"][key]]
            ax.plot(range(len(vals)), vals, label=name, lw=1.5)
        ax.set_xlabel("PGD step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92) if title else None)  # the title above the panels, not on them
    save(fig, path)
