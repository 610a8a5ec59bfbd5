"""What APGD and Square share: the attacked set with its pass counters, and the rows still under
attack, compacted as they leave.

`Target` holds everything per sample that does not change during an attack (clean images, labels,
ε, sample ids for the random streams) and counts each sample's forward and backward passes.
`Rows` is one run's working set: indices into the `Target` and per-row state tensors.  A row that
fools the model is recorded (its first fooling iterate) and leaves the batch at the next
compaction, so the cost of a run follows the rows still standing; a row the budget rule gives up
on leaves without being recorded.  Compaction reads which rows left (a host sync): every iteration
on the CPU, every `compact_every` iterations on CUDA, where fooled rows ride along until then.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from aerl_fast import runtime

from ._common import (AttackError, AttackWarning, attack_mode, check_batch, check_image_range,
                      check_norm, check_sample_ids, fooled_by, per_sample, resolve_clamp,
                      resolve_compact_every)


@dataclass
class Target:
    """The samples under attack and their pass counters (all tensors indexed by sample)."""
    model: torch.nn.Module             # laid out, in attack mode
    x0: torch.Tensor                   # [N, ...] clean images
    y: torch.Tensor                    # [N] int64 labels
    eps: torch.Tensor                  # [N] fp32 radii
    ids: torch.Tensor                  # [N] int64 sample ids (the random streams' keys)
    norm: str
    box: Optional[Tuple[float, float]]
    seed: int
    autocast: Optional[torch.dtype] = None
    compact_every: int = 1
    forwards: torch.Tensor = field(default=None)
    backwards: torch.Tensor = field(default=None)
    calls: int = 0                     # batched model calls: the sequential steps a GPU waits on

    def __post_init__(self):
        n = self.x0.shape[0]
        if self.forwards is None:
            self.forwards = torch.zeros(n, dtype=torch.int64, device=self.x0.device)
        if self.backwards is None:
            self.backwards = torch.zeros(n, dtype=torch.int64, device=self.x0.device)

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.x0.device.type, dtype=self.autocast)

    def logits(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits of x (one forward for each of `rows`)."""
        with torch.no_grad(), self._autocast():
            z = self.model(x)
        self.forwards[rows] += 1
        self.calls += 1
        return z.float()

    def loss_grad(self, x: torch.Tensor, rows: torch.Tensor,
                  loss_fn: Callable[[torch.Tensor], torch.Tensor]):
        """(fp32 logits, per-row loss, input gradient of the summed loss): one forward and one
        backward for each of `rows`."""
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            with self._autocast():
                z = self.model(xi)
            z = z.float()
            loss = loss_fn(z)
            (g,) = torch.autograd.grad(loss.sum(), xi)
        self.forwards[rows] += 1
        self.backwards[rows] += 1
        self.calls += 1
        return z.detach(), loss.detach(), g


class Rows:
    """One run's rows (`idx` into the Target) and their state tensors, all selected together.

    `out`/`fooled` are the run's [N] results: the first fooling iterate of each fooled sample and
    the flag.  `state` tensors have the rows as their first dimension; floats pass through.
    """

    def __init__(self, target: Target, idx: torch.Tensor, out: torch.Tensor, fooled: torch.Tensor):
        self.target, self.idx, self.out, self.fooled = target, idx, out, fooled
        self.state: Dict[str, torch.Tensor] = {}
        self._pending: Optional[torch.Tensor] = None   # fooled, not yet compacted away
        self._stash: Optional[torch.Tensor] = None     # their first fooling iterate

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.state[name]

    def __setitem__(self, name: str, value: torch.Tensor):
        self.state[name] = value

    def hit(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Record the rows whose logits fool the model at iterate `x`; returns the [R] mask."""
        hit = fooled_by(logits, self.state["y"])
        if self._pending is None:
            self._pending, self._stash = hit.clone(), x.clone()
        else:
            new = hit & ~self._pending
            self._stash = torch.where(new.view(-1, *([1] * (x.dim() - 1))), x, self._stash)
            self._pending |= hit
        return hit

    def compact(self, it: int = 0, drop: Optional[torch.Tensor] = None, force: bool = False) -> bool:
        """At compaction times (or when `force`d): write out the fooled rows, drop them and the
        `drop` rows (given up: not fooled).  Returns False once no row is left."""
        if not (force or drop is not None or it % self.target.compact_every == 0):
            return True
        leave = self._pending if self._pending is not None else torch.zeros(len(self), dtype=torch.bool,
                                                                            device=self.idx.device)
        if drop is not None:
            drop = drop & ~leave
            leave = leave | drop
        gone = leave.nonzero().squeeze(1)          # the host sync of the loop
        if gone.numel() == 0:
            return True
        if self._pending is not None:
            sel = self._pending.nonzero().squeeze(1)
            if sel.numel():
                self.out[self.idx[sel]] = self._stash[sel]
                self.fooled[self.idx[sel]] = True
        keep = (~leave).nonzero().squeeze(1)
        self.idx = self.idx[keep]
        self.state = {k: (v[keep] if isinstance(v, torch.Tensor) else v) for k, v in self.state.items()}
        if self._pending is not None:
            self._pending, self._stash = self._pending[keep], self._stash[keep]
        return keep.numel() > 0

    def finish(self):
        """Write out what is still pending at the end of the run."""
        self.compact(force=True)


def setup_target(net: torch.nn.Module, x, y, *, eps, norm: str, seed: int, sample_ids, clamp,
                 amp: bool, compact_every: Optional[int]) -> Target:
    """Check the common arguments of APGD, Square and autoattack_fast and build their `Target`
    (`net`: the laid-out model, already in attack mode)."""
    batch = check_batch(x, y)
    norm = check_norm(norm)
    dev = x.device
    e = per_sample(eps, batch, dev, "eps")
    e = e if isinstance(e, torch.Tensor) else torch.full((batch,), e, device=dev)
    if bool((e <= 0).any()):
        raise AttackError(f"eps must be > 0, got {float(e.min()):g}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AttackError(f"seed must be an integer (every random draw is keyed by it), got {seed!r}")
    box = resolve_clamp(clamp)
    x0 = x.detach().float()
    check_image_range(x0, box)
    dtype = runtime.amp_dtype(dev, amp, log=lambda m: warnings.warn(m, AttackWarning, stacklevel=3),
                              what="attacking")
    return Target(model=net, x0=x0, y=y.to(device=dev, dtype=torch.int64), eps=e,
                  ids=check_sample_ids(sample_ids, batch, dev), norm=norm, box=box, seed=seed,
                  autocast=dtype, compact_every=resolve_compact_every(compact_every, dev))


def attack_clean_correct(model, x, y, run: Callable, **setup) -> Tuple[Target, torch.Tensor, torch.Tensor]:
    """The standalone attacks' frame: lay the model out (`runtime.fast_eval_copy`), check the
    arguments (`setup_target`), then `run(target, idx, out, fooled, clean_logits)` on the
    clean-correct samples.  Returns (target, out, fooled); a misclassified sample counts as fooled,
    with its clean image."""
    with attack_mode(runtime.fast_eval_copy(model)) as net:
        tg = setup_target(net, x, y, **setup)
        clean = tg.logits(tg.x0, torch.arange(x.shape[0], device=tg.x0.device))
        fooled = clean.argmax(1) != tg.y
        out = tg.x0.clone()
        run(tg, (~fooled).nonzero().squeeze(1), out, fooled, clean)
    return tg, out, fooled
