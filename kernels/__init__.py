"""Fused ops of aerl_fast, importable by any RL-classification code as `aerl_fast.kernels`.

    from aerl_fast.kernels import eps_greedy_pg_loss, pgd_step, backend, fallbacks

Each op has one dispatch point here: the Triton kernel when the tensors are on CUDA (or when
TRITON_INTERPRET=1 was set before the import, which runs the kernels on CPU tensors), otherwise
the torch reference that sits next to the kernel and is its specification.  `backend()` says which
one runs.  AERL_FAST_KERNELS chooses the policy:

    auto (default)  Triton where it can run; if its first launch on a device fails (no driver, an
                    unsupported GPU), a warning names the op, the device and the error, the op runs
                    the reference on that device from then on, and `fallbacks()` lists it (a run
                    records it beside its results: a broken GPU path must not hide behind a 10x
                    slower reference).  Triton running out of shared memory or registers falls
                    back for that call only; a CUDA out-of-memory error is raised, never hidden.
    triton          strict: the Triton kernel or an error (tests and the GPU check use it).
    reference       the reference everywhere (to compare or to debug).

Both ops are also registered with torch.library (`torch.ops.aerl_fast.pg_loss_fwd`,
`pg_loss_bwd`, `pgd_step_`), so torch.compile traces code that calls them without graph breaks
inside the op.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import pg_loss as _pg
from . import pgd_update as _pgd
from .pg_loss import PGLoss, check_pg_inputs, eps_greedy_pg_loss_reference
from .pgd_update import check_pgd_inputs, per_sample, pgd_step_reference

try:
    from triton.runtime.errors import OutOfResources
except Exception:  # noqa: BLE001 - triton missing or broken: nothing launches, nothing to catch
    class OutOfResources(Exception):
        pass

OPS = ("eps_greedy_pg_loss", "pgd_step")
MODES = ("auto", "triton", "reference")
_ENABLED = {"eps_greedy_pg_loss": _pg.triton_enabled, "pgd_step": _pgd.triton_enabled}
_FAILED: set = set()     # (op, device) whose first launch raised: reference from then on
_VERIFIED: set = set()   # (op, device) that launched once: errors propagate from then on
_FALLBACKS: list = []    # what fell back, in order: see fallbacks()


def _mode() -> str:
    """AERL_FAST_KERNELS, read on every call (tests and tools switch it at run time)."""
    mode = os.environ.get("AERL_FAST_KERNELS", "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"AERL_FAST_KERNELS must be one of {', '.join(MODES)}, got "
                         f"{os.environ['AERL_FAST_KERNELS']!r}")
    return mode


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device_key(device: torch.device) -> str:
    """'cuda:1', 'cpu': failures are per device, so one bad GPU does not disable the others."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return str(device)


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


def fallbacks() -> list:
    """Every fallback to the reference so far in this process, oldest first: dicts with op,
    device, error and scope ('device': the reference serves that device from then on; 'call': that
    call only).  Empty when every launch ran the Triton kernel (or none was attempted)."""
    return [dict(f) for f in _FALLBACKS]


def _use_triton(op: str, device: torch.device) -> bool:
    if _mode() == "reference":
        return False
    return (op, _device_key(device)) not in _FAILED and _ENABLED[op](device)


def _dispatch_triton(op: str, device: torch.device) -> bool:
    """_use_triton for an op about to run; in strict mode a device Triton cannot serve is an error."""
    use = _use_triton(op, device)
    if not use and _mode() == "triton":
        raise RuntimeError(f"AERL_FAST_KERNELS=triton: the Triton {op} cannot run on {device} "
                           "tensors (CUDA with triton, or TRITON_INTERPRET=1 for CPU tensors)")
    return use


def _record(op: str, device: str, exc: BaseException, scope: str):
    error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    entry = {"op": op, "device": device, "error": error, "scope": scope}
    if entry in _FALLBACKS:
        return
    _FALLBACKS.append(entry)
    then = "from now on" if scope == "device" else "for this call"
    warnings.warn(f"aerl_fast.kernels: the Triton {op} failed on {device} ({error}); the torch "
                  f"reference runs there {then}, about 10x slower (AERL_FAST_KERNELS=triton makes "
                  "this an error)", RuntimeWarning, stacklevel=4)


def _launch(op, device, fused, reference):
    """Run `fused`.  Until it has launched once on this device, a failure is recorded, warned
    about and answered by the reference (see the module docstring); inputs are checked before
    this, so the error is the launch's own.  The first launch on a GPU is synchronised, so an
    asynchronous fault is charged to the kernel here, not to whatever runs next."""
    key = (op, _device_key(device))
    if key in _VERIFIED or torch.compiler.is_compiling() or _mode() == "triton":
        return fused()
    try:
        out = fused()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        raise  # the reference needs more memory still: not a kernel fault
    except OutOfResources as exc:  # this launch shape is too big for the GPU: this call only
        _record(op, key[1], exc, "call")
        return reference()
    except Exception as exc:  # noqa: BLE001 - compile/driver errors have no common type
        _FAILED.add(key)
        _record(op, key[1], exc, "device")
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

    if logits.dtype == torch.float64 or not _dispatch_triton("eps_greedy_pg_loss", logits.device):
        return reference()  # fp64 keeps fp64 accumulation: the kernel accumulates in fp32
    return _launch("eps_greedy_pg_loss", logits.device, lambda: _pg.eps_greedy_pg_loss_fused(
        logits, labels, eps, explore=explore, prob_floor=prob_floor, generator=generator,
        seed=seed, reduction=reduction, actions=actions, baseline=baseline, checked=True),
        reference)


def pgd_step(x_adv, x0, grad, step, eps, norm="linf", clamp=(0.0, 1.0), validate=True):
    """One in-place PGD update with per-sample step/ε (floats or [B] tensors); see `pgd_update.py`.
    Returns `x_adv`.  `validate=False` skips reading tensor step/ε for negatives (a host sync on
    CUDA each call): for attack loops that checked them once up front."""
    if not _dispatch_triton("pgd_step", getattr(x_adv, "device", torch.device("cpu"))):
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


__all__ = ["PGLoss", "backend", "eps_greedy_pg_loss", "eps_greedy_pg_loss_reference", "fallbacks",
           "pgd_step", "pgd_step_reference"]
