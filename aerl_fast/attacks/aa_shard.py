"""autoattack_fast over several processes: each attacks its contiguous shard of the set, rank 0
gathers the per-sample results.

    ctx = aerl_fast.distributed.init()          # under torchrun (gloo on CPUs, NCCL on GPUs)
    res = autoattack_fast_sharded(model, x, y, dist=ctx, eps=8/255, norm="Linf")
    if ctx.is_main: print(res.robust_accuracy)   # None on the other ranks

Every rank passes the whole (x, y); rank r attacks `distributed.shard_range(n, r, world)` with the
samples' global indices as their ids, so every random draw is the one a single process makes and
the gathered result equals the single-process result sample by sample.  Stage counts are summed
over the ranks; a stage's seconds and model calls are the slowest rank's.
"""
from __future__ import annotations

from typing import Optional

import torch

from aerl_fast.distributed import DistContext, shard_range

from ._common import check_sample_ids
from .aa_fast import AutoAttackFastResult, StageReport, autoattack_fast

_PER_SAMPLE = ("robust", "clean", "broken_by", "forwards", "backwards", "x_adv")


def autoattack_fast_sharded(model, x, y, *, dist: DistContext, eps, sample_ids=None,
                            gather_adv: bool = False, **kwargs) -> Optional[AutoAttackFastResult]:
    """`autoattack_fast` on this process's shard of (x, y); the merged result (tensors on the CPU)
    on rank 0, None elsewhere.  gather_adv: also send the adversarial images to rank 0.
    Other keyword arguments go to `autoattack_fast` unchanged (seed, stages, budget, ...)."""
    n = x.shape[0]
    lo, hi = shard_range(n, dist.rank, dist.world_size)
    ids = check_sample_ids(sample_ids, n, x.device)[lo:hi]
    if isinstance(eps, torch.Tensor) and eps.dim() == 1:
        eps = eps[lo:hi]
    piece = None
    if hi > lo:
        res = autoattack_fast(model, x[lo:hi], y[lo:hi], eps=eps, sample_ids=ids,
                              return_adv=gather_adv, **kwargs)
        piece = {k: (getattr(res, k).cpu() if getattr(res, k) is not None else None) for k in _PER_SAMPLE}
        piece.update(stage_names=res.stage_names, stages=res.stages, settings=res.settings)
    gathered = dist.all_gather_object(piece)
    if not dist.is_main:
        return None
    return merge([p for p in gathered if p is not None], processes=len(gathered))


def merge(pieces, processes: int) -> AutoAttackFastResult:
    """One result from the ranks' pieces (those with samples), in rank order."""
    first = pieces[0]
    cat = {k: (torch.cat([p[k] for p in pieces]) if first[k] is not None else None) for k in _PER_SAMPLE}
    stages = []
    for j, name in enumerate(first["stage_names"]):
        reps = [p["stages"][j] for p in pieces]
        stages.append(StageReport(name, *(sum(getattr(r, f) for r in reps)
                                          for f in ("attacked", "broken", "forwards", "backwards")),
                                  seconds=max(r.seconds for r in reps),
                                  disagreements=sum(r.disagreements for r in reps),
                                  calls=max(r.calls for r in reps)))
    settings = dict(first["settings"], seconds=max(p["settings"]["seconds"] for p in pieces),
                    processes=processes)
    return AutoAttackFastResult(cat["robust"], cat["clean"], cat["broken_by"], cat["forwards"],
                                cat["backwards"], list(first["stage_names"]), stages, cat["x_adv"], settings)
