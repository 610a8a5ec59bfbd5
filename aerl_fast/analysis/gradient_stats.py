"""Per-sample input-gradient statistics of the study's gradient-dynamics analysis, one pass per step.

``grad_stats(g, g_prev)`` returns, for gradients ``g`` [B, ...] of one batch at one attack step and
the same batch's gradients ``g_prev`` at the previous step (``None`` on the first step):

- ``norm`` [B]: ``||g_i||_2``.
- ``cos`` [B]: ``<g_i, p_i> / (||g_i|| ||p_i||)`` clamped to [-1, 1]; **0 when either norm is 0**
  (a zero gradient has no direction to agree with); **NaN on the first step**, so that a mean over
  steps with ``nanmean`` does not mistake "no previous step" for "orthogonal".
- ``sign_agree`` [B]: fraction of elements whose sign in {-1, 0, +1} equals last step's; an exact
  zero agrees only with an exact zero, NaN counts as 0; **NaN on the first step**.
- ``mean_dir`` [D]: ``(1/B) sum_i u_i`` with ``u_i = g_i / ||g_i||`` and ``u_i = 0`` for a zero row;
  the within-batch dispersion ``1 - mean_i <u_i, m/||m||>`` equals ``1 - ||mean_dir||`` (a zero row
  has no direction and so raises the dispersion). ``GradStats.dispersion`` gives it.

Outputs are float32 (float64 when ``g`` is float64). The CPU kernel sums blocks of 512 elements
in float32 (float64 for float64 input) and adds the blocks in float64; the CUDA kernel sums in
float32 (float64 for float64 input); the fallback sums in float64. Inputs of any floating dtype
are accepted; ``g`` and ``g_prev`` must share shape, dtype and device.

Which implementation runs is decided in :func:`grad_stats_backend` only: the compiled op
``torch.ops.aerl_fast.grad_stats`` (package ``aerl_fast._C``, C++/OpenMP and CUDA) when it is built
for the tensors' device, otherwise :func:`grad_stats_reference`, a torch implementation of the same
conventions (the specification; it agrees with the op to float32 rounding). The fallback says so
once per process. ``AERL_FAST_GRAD_STATS=torch`` forces the fallback, ``=extension`` makes a missing
extension an import error. Importing this module registers the op's fake kernel, which
``torch.compile`` and ``torch.library.opcheck`` need.

:class:`GradStatsTracker` follows one batch through an attack: it keeps the previous gradient, one
record per step and the running sum of per-step mean directions for the over-time dispersion.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "GradStats",
    "GradStatsTracker",
    "grad_stats",
    "grad_stats_backend",
    "grad_stats_reference",
]

_ENV = "AERL_FAST_GRAD_STATS"
_OP_NAME = "aerl_fast::grad_stats"


class GradStats(NamedTuple):
    """The op's four outputs; ``dispersion`` is derived without leaving the device."""

    norm: Tensor
    cos: Tensor
    sign_agree: Tensor
    mean_dir: Tensor

    @property
    def dispersion(self) -> Tensor:
        """Within-batch dispersion ``1 - ||mean_dir||`` as a 0-d tensor (no host sync)."""
        return 1.0 - torch.linalg.vector_norm(self.mean_dir)


# --------------------------------------------------------------------------------------------
# Input checks shared by the fallback and the fake kernel (same wording as the C++ TORCH_CHECKs).
# --------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(msg: str) -> None:
    raise RuntimeError("aerl_fast::grad_stats: " + msg)


def _check_inputs(g: Tensor, g_prev: Optional[Tensor]) -> torch.dtype:
    """Validate like the C++ kernel does and return the output dtype."""
    if g.dtype not in _FLOAT_DTYPES:
        _fail(f"g must be a floating-point tensor (float16, bfloat16, float32 or float64), "
              f"got {g.dtype}")
    if g.dim() != 2:
        _fail(f"g must be 2-D [B, D] (one flattened gradient per sample; "
              f"aerl_fast.analysis.grad_stats flattens [B, ...] for you), got shape {list(g.shape)}")
    torch._check(g.shape[0] > 0 and g.shape[1] > 0, lambda: (
        f"aerl_fast::grad_stats: g needs at least one sample and one element, "
        f"got shape {list(g.shape)}"))
    if g_prev is not None:
        if g_prev.device != g.device:
            _fail(f"g is on {g.device} but g_prev is on {g_prev.device}; "
                  "both must be on the same device")
        if g_prev.dtype != g.dtype:
            _fail(f"g_prev has dtype {g_prev.dtype} but g has {g.dtype}; "
                  "keep the previous step's gradient in the same dtype")
        shape_msg = (f"aerl_fast::grad_stats: g_prev has shape {list(g_prev.shape)} but g has shape "
                     f"{list(g.shape)}; g_prev must be the previous step's gradient of the same "
                     "batch (a state from another batch? reset the tracker between batches)")
        if g_prev.dim() != 2:
            raise RuntimeError(shape_msg)
        torch._check(g_prev.shape[0] == g.shape[0], lambda: shape_msg)
        torch._check(g_prev.shape[1] == g.shape[1], lambda: shape_msg)
    return torch.float64 if g.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# The torch implementation: specification and fallback.
# --------------------------------------------------------------------------------------------

def grad_stats_reference(g: Tensor, g_prev: Optional[Tensor] = None) -> GradStats:
    """Torch implementation of the op on 2-D inputs (float64 sums); the fallback and the spec."""
    out_dtype = _check_inputs(g, g_prev)
    B, D = g.shape
    g64 = g.to(torch.float64)
    norm = (g64 * g64).sum(1).sqrt()
    inv = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
    mean_dir = (inv @ g64) / B
    if g_prev is None:
        cos = torch.full_like(norm, math.nan)
        sign_agree = torch.full_like(norm, math.nan)
    else:
        p64 = g_prev.to(torch.float64)
        pnorm = (p64 * p64).sum(1).sqrt()
        dot = (g64 * p64).sum(1)
        both = (norm > 0) & (pnorm > 0)
        cos = torch.where(both, dot / (norm * pnorm), torch.zeros_like(dot)).clamp(-1.0, 1.0)
        sg = (g > 0).to(torch.int8) - (g < 0).to(torch.int8)
        sp = (g_prev > 0).to(torch.int8) - (g_prev < 0).to(torch.int8)
        sign_agree = (sg == sp).sum(1, dtype=torch.float64) / D
    return GradStats(norm.to(out_dtype), cos.to(out_dtype), sign_agree.to(out_dtype),
                     mean_dir.to(out_dtype))


# --------------------------------------------------------------------------------------------
# The one place that picks the compiled op or the fallback.
# --------------------------------------------------------------------------------------------

def _grad_stats_fake(g: Tensor, g_prev: Optional[Tensor]):
    """Fake (meta) kernel: output shapes and dtypes only, for torch.compile and opcheck."""
    out_dtype = _check_inputs(g, g_prev)
    B, D = g.shape
    return (g.new_empty((B,), dtype=out_dtype), g.new_empty((B,), dtype=out_dtype),
            g.new_empty((B,), dtype=out_dtype), g.new_empty((D,), dtype=out_dtype))


def _load_extension():
    """Import aerl_fast._C once and register the fake kernel; returns (module or None, reason)."""
    choice = os.environ.get(_ENV, "auto").strip().lower()
    if choice == "torch":
        return None, f"{_ENV}=torch forces it"
    try:
        from aerl_fast import _C  # noqa: PLC0415 - the import registers torch.ops.aerl_fast
    except ImportError as exc:
        if choice in ("extension", "ext", "cpp", "c"):
            raise ImportError(f"{_ENV}={choice} but aerl_fast._C cannot be imported: {exc}") from exc
        return None, f"the C++ extension aerl_fast._C is not built ({exc})"
    torch.library.register_fake(_OP_NAME, _grad_stats_fake)
    return _C, None


_EXT, _EXT_MISSING = _load_extension()
_announced = False


def grad_stats_backend(device="cpu") -> str:
    """``"extension"`` or ``"torch"``: which implementation :func:`grad_stats` runs on ``device``."""
    kind = torch.device(device).type
    if _EXT is None:
        return "torch"
    if kind in ("cpu", "meta") or (kind == "cuda" and _EXT.cuda_compiled()):
        return "extension"
    return "torch"


def _announce_fallback(device: torch.device) -> None:
    global _announced
    if _announced:
        return
    _announced = True
    reason = _EXT_MISSING or f"aerl_fast._C was built without a kernel for {device.type} tensors"
    warnings.warn(f"aerl_fast: grad_stats uses the pure-torch fallback ({reason}); results are the "
                  "same, it is several times slower", RuntimeWarning, stacklevel=3)


def _as_rows(t: Tensor, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"aerl_fast.analysis.grad_stats: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() == 0:
        _fail(f"{name} must be [B, ...] with one gradient per sample, got a 0-d tensor")
    t = t.detach()
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def grad_stats(g: Tensor, g_prev: Optional[Tensor] = None) -> GradStats:
    """Statistics of gradients ``g`` [B, ...] against last step's ``g_prev`` (None on the first step).

    See the module docstring for the conventions. Inputs are flattened per sample and detached.
    """
    g2 = _as_rows(g, "g")
    p2 = None if g_prev is None else _as_rows(g_prev, "g_prev")
    if grad_stats_backend(g2.device) == "extension":
        return GradStats(*torch.ops.aerl_fast.grad_stats(g2, p2))
    _announce_fallback(g2.device)
    return grad_stats_reference(g2, p2)


# --------------------------------------------------------------------------------------------
# Tracking one batch over the steps of an attack.
# --------------------------------------------------------------------------------------------

class GradStatsTracker:
    """Follows one batch through an attack: previous gradient, per-step records, over-time dispersion.

    Call :meth:`update` once per step with that step's input gradients and :meth:`reset` before the
    next batch. Nothing is copied to the host until :meth:`summary`, so tracking adds no
    synchronisation to a CUDA attack loop.

    Feed gradients of the *summed* (per-sample) loss: the study's loss is mean-reduced, so its
    gradient norms shrink as 1/B; per-sample-loss norms do not depend on the batch size.

    The previous gradient is kept by reference (no copy). If the caller later changes that tensor
    in place (e.g. ``x.grad.zero_()``), the next :meth:`update` raises; pass ``copy=True`` then.
    Records per step: mean over the batch of ``norm``, ``cos``, ``sign_agree`` and the within-batch
    dispersion (``cos``/``sign_agree`` are NaN on the first step); with ``keep_per_sample=True``
    also the per-sample values. The over-time dispersion is ``1 -`` the mean pairwise cosine of
    the per-step mean directions; it is computed from their running sum, so memory stays O(D).
    """

    def __init__(self, keep_per_sample: bool = False, copy: bool = False):
        self.keep_per_sample = keep_per_sample
        self.copy = copy
        self.reset()

    def reset(self) -> None:
        """Forget the batch: the next update is a first step."""
        self._prev: Optional[Tensor] = None
        self._prev_version = 0
        self._records: list[Tensor] = []
        self._per_sample: list[Tensor] = []
        self._dir_sum: Optional[Tensor] = None
        self._dir_sq_sum: Optional[Tensor] = None

    @property
    def steps(self) -> int:
        return len(self._records)

    def update(self, g: Tensor) -> GradStats:
        """Add one step's gradients ``g`` [B, ...]; returns that step's :class:`GradStats`."""
        prev = self._prev
        if prev is not None and prev._version != self._prev_version:
            raise RuntimeError("GradStatsTracker: the previous step's gradient was modified in place "
                               "after update(); create the tracker with copy=True")
        stats = grad_stats(g, prev)
        kept = g.detach()
        if self.copy:
            kept = kept.clone()
        self._prev, self._prev_version = kept, kept._version

        self._records.append(torch.stack([stats.norm.mean(), stats.cos.mean(),
                                          stats.sign_agree.mean(), stats.dispersion]))
        if self.keep_per_sample:
            self._per_sample.append(torch.stack([stats.norm, stats.cos, stats.sign_agree]))
        m = stats.mean_dir.to(torch.float64)
        m_norm = torch.linalg.vector_norm(m)
        unit = torch.where(m_norm > 0, m / m_norm, torch.zeros_like(m))
        unit_sq = (unit * unit).sum()
        if self._dir_sum is None:
            self._dir_sum, self._dir_sq_sum = unit, unit_sq
        else:
            self._dir_sum = self._dir_sum + unit
            self._dir_sq_sum = self._dir_sq_sum + unit_sq
        return stats

    def records(self) -> dict[str, Tensor]:
        """Per-step batch means as tensors [T]: norm, cos, sign_agree, dispersion."""
        if not self._records:
            raise RuntimeError("GradStatsTracker: no step recorded yet")
        table = torch.stack(self._records)
        return {"norm": table[:, 0], "cos": table[:, 1], "sign_agree": table[:, 2],
                "dispersion": table[:, 3]}

    def per_sample(self) -> dict[str, Tensor]:
        """Per-step, per-sample values [T, B] (needs ``keep_per_sample=True``)."""
        if not self.keep_per_sample:
            raise RuntimeError("GradStatsTracker: created without keep_per_sample=True")
        if not self._per_sample:
            raise RuntimeError("GradStatsTracker: no step recorded yet")
        table = torch.stack(self._per_sample)
        return {"norm": table[:, 0], "cos": table[:, 1], "sign_agree": table[:, 2]}

    def over_time_dispersion(self) -> Tensor:
        """``1 -`` mean pairwise cosine of the per-step mean directions (NaN before two steps).

        With unit (or zero) directions d_t and S = sum_t d_t, the sum over pairs t != s of
        <d_t, d_s> is ||S||^2 - sum_t ||d_t||^2; a step whose mean direction is zero counts as
        cosine 0 with every other step.
        """
        T = self.steps
        if T < 2:
            return torch.tensor(math.nan, dtype=torch.float64)
        pair_sum = (self._dir_sum * self._dir_sum).sum() - self._dir_sq_sum
        return 1.0 - pair_sum / (T * (T - 1))

    def summary(self) -> dict[str, float]:
        """Means over steps (first-step NaNs skipped) and the over-time dispersion, as floats."""
        rec = self.records()
        values = torch.stack([rec["norm"].double().nanmean(), rec["cos"].double().nanmean(),
                              rec["sign_agree"].double().nanmean(),
                              rec["dispersion"].double().nanmean(),
                              self.over_time_dispersion().to(rec["norm"].device)]).tolist()
        keys = ("norm", "cos", "sign_agree", "dispersion", "over_time_dispersion")
        out = dict(zip(keys, values))
        out["steps"] = self.steps
        return out
