"""Fused ops of aerl_fast, importable by any RL-classification code as `aerl_fast.kernels`.

    from aerl_fast.kernels import eps_greedy_pg_loss, pgd_step, backend

Each op has one dispatch point here: the Triton kernel when the tensors are on CUDA (or when
TRITON_INTERPRET=1 was set before the import, which runs the kernels on CPU tensors), otherwise
the torch reference that sits next to the kernel and is its specification.  `backend()` says which
one runs.  If triton is missing, or the first launch on a device type fails (no driver, an
unsupported GPU), the op falls back silently to the reference and `backend()` reports it.
`AERL_FAST_KERNELS=reference` forces the reference everywhere (to compare or to debug).

Both ops are also registered with torch.library (`torch.ops.aerl_fast.pg_loss_fwd`,
`pg_loss_bwd`, `pgd_step_`), so torch.compile traces code that calls them without graph breaks
inside the op.
"""
from __future__ import annotations

import logging
import os

import torch

from . import pg_loss as _pg
from . import pgd_step as _pgd
from .pg_loss import PGLoss, check_pg_inputs, eps_greedy_pg_loss_reference
from .pgd_step import check_pgd_inputs, per_sample, pgd_step_reference

_log = logging.getLogger(__name__)

OPS = ("eps_greedy_pg_loss", "pgd_step")
_ENABLED = {"eps_greedy_pg_loss": _pg.triton_enabled, "pgd_step": _pgd.triton_enabled}
_FAILED: set = set()    # (op, device type) whose first launch raised: reference from then on
_VERIFIED: set = set()  # (op, device type) that launched once: errors propagate from then on


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend(device=None, op: str | None = None) -> str:
    """'triton' or 'reference': what runs for tensors on `device` (default: CUDA when available,
    else CPU) — for `op`, or for both ops when `op` is None ('triton' only if both use it)."""
    dev = torch.device(device) if device is not None else _default_device()
    ops = OPS if op is None else (op,)
    for name in ops:
        if name not in _ENABLED:
            raise ValueError(f"backend: unknown op {name!r}; one of {OPS}")
        if not _use_triton(name, dev):
            return "reference"
    return "triton"


def _use_triton(op: str, device: torch.device) -> bool:
    if os.environ.get("AERL_FAST_KERNELS", "").strip().lower() == "reference":
        return False
    return (op, device.type) not in _FAILED and _ENABLED[op](device)


def _launch(op, device, fused, reference):
    """Run `fused`; if its first launch on this device type raises, remember it and run the
    reference instead.  Inputs are checked before this, so the error is the launch's own."""
    key = (op, device.type)
    if key in _VERIFIED or torch.compiler.is_compiling():
        return fused()
    try:
        out = fused()
    except Exception as exc:  # noqa: BLE001 - compile/driver errors have no common type
        _FAILED.add(key)
        _log.debug("aerl_fast.kernels: %s on %s fell back to the reference: %r", op, device, exc)
        return reference()
    _VERIFIED.add(key)
    return out


def eps_greedy_pg_loss(logits, labels, epsilon, *, explore="sample", prob_floor=0.0,
                       generator=None, seed=None, reduction="mean", actions=None,
                       baseline=None, validate=True) -> PGLoss:
    """ε-greedy REINFORCE loss; see `pg_loss.py` for the exact definition.

    Returns PGLoss(loss, actions, rewards, log_probs); only `loss` carries gradient.  `seed` or
    `generator` makes the draw reproducible (same seed, same device → same actions); the Triton
    path and the reference draw different numbers from the same distribution.  `actions` fixes
    the actions (no sampling), which makes the op deterministic.  fp32/bf16/fp16 logits use the
    kernel (fp32 accumulation); fp64 logits run the reference in fp64.  `validate=False` skips
    the label/action range checks, the one host sync per call on CUDA (for a training loop whose
    labels were checked once at load time).  `baseline` (a number or a [B] tensor, detached) is
    subtracted from the reward of the rows that followed the policy: REINFORCE with a baseline.
    """
    eps = check_pg_inputs(logits, labels, epsilon, explore, prob_floor, reduction, actions,
                          validate, baseline)

    def reference():
        return eps_greedy_pg_loss_reference(logits, labels, eps, explore=explore,
                                            prob_floor=prob_floor, generator=generator,
                                            seed=seed, reduction=reduction, actions=actions,
                                            baseline=baseline)

    if logits.dtype == torch.float64 or not _use_triton("eps_greedy_pg_loss", logits.device):
        return reference()  # fp64 keeps fp64 accumulation: the kernel accumulates in fp32
    return _launch("eps_greedy_pg_loss", logits.device, lambda: _pg.eps_greedy_pg_loss_fused(
        logits, labels, eps, explore=explore, prob_floor=prob_floor, generator=generator,
        seed=seed, reduction=reduction, actions=actions, baseline=baseline, checked=True),
        reference)


def pgd_step(x_adv, x0, grad, step, eps, norm="linf", clamp=(0.0, 1.0), validate=True):
    """One in-place PGD update with per-sample step/ε (floats or [B] tensors); see `pgd_step.py`.
    Returns `x_adv`.  `validate=False` skips reading tensor step/ε for negatives (a host sync on
    CUDA each call): for attack loops that checked them once up front."""
    if not _use_triton("pgd_step", getattr(x_adv, "device", torch.device("cpu"))):
        return pgd_step_reference(x_adv, x0, grad, step, eps, norm=norm, clamp=clamp, validate=validate)
    check_pgd_inputs(x_adv, x0, grad, norm, clamp)
    batch = x0.shape[0]
    step_t = per_sample(step, batch, x0, "step", validate).reshape(batch)
    eps_t = per_sample(eps, batch, x0, "eps", validate).reshape(batch)
    return _launch("pgd_step", x_adv.device,
                   lambda: _pgd.pgd_step_fused(x_adv, x0, grad, step_t, eps_t, norm=norm,
                                               clamp=clamp, checked=True),
                   lambda: pgd_step_reference(x_adv, x0, grad, step_t, eps_t, norm=norm,
                                              clamp=clamp))


__all__ = ["PGLoss", "backend", "eps_greedy_pg_loss", "eps_greedy_pg_loss_reference", "pgd_step",
           "pgd_step_reference"]
