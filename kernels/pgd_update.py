"""One fused projected-gradient-descent update, batched, with per-sample step and ε.

The torch reference `pgd_step_reference` is the specification and the CPU path:

    d      = sign(g)                    (norm="linf")
           = g / ‖g‖₂ per sample        (norm="l2"; zero gradient → zero step)
    δ      = x_adv − x0 + step · d
    δ      = clamp(δ, −ε, ε)            (linf)     |   δ · min(1, ε / ‖δ‖₂)   (l2)
    x_adv ← clamp(x0 + δ, lo, hi)       (in place; clamp=None skips the box)

Below the reference: the fused Triton kernels, the torch.library op `aerl_fast::pgd_step_` and
`pgd_step_fused`.  Callers use the dispatch point `aerl_fast.kernels.pgd_step`.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .device import launch_device

NORMS = ("linf", "l2")
_TINY = 1e-12

Scalar = Union[float, torch.Tensor]


def per_sample(value: Scalar, batch: int, like: torch.Tensor, name: str, validate: bool = True) -> torch.Tensor:
    """Broadcast a float or a [B] tensor to a [B, 1, ...] fp32 tensor; reject negatives.
    A Python number is checked on the host and becomes a device-side fill (torch.full: no
    host-to-device copy, so an attack loop with float step/ε never syncs); a tensor's values are
    read only when `validate` (a host sync on CUDA)."""
    if isinstance(value, torch.Tensor):
        t = value.to(dtype=torch.float32, device=like.device)
    else:
        if float(value) < 0:
            raise ValueError(f"pgd_step: {name} must be >= 0, got min {float(value)}")
        t = torch.full((batch,), float(value), dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"pgd_step: {name} must be a float or a [{batch}] tensor, got shape {tuple(t.shape)}")
    if validate and isinstance(value, torch.Tensor) and not torch.compiler.is_compiling() \
            and bool((t < 0).any()):  # reads the data: eager only
        raise ValueError(f"pgd_step: {name} must be >= 0, got min {float(t.min())}")
    return t.view(batch, *([1] * (like.dim() - 1)))


def check_pgd_inputs(x_adv, x0, grad, norm, clamp):
    if norm not in NORMS:
        raise ValueError(f"pgd_step: norm must be one of {NORMS}, got {norm!r}")
    for name, t in (("x_adv", x_adv), ("x0", x0), ("grad", grad)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"pgd_step: {name} must be a float tensor")
    if x_adv.shape != x0.shape or grad.shape != x0.shape:
        raise ValueError(f"pgd_step: shape mismatch x_adv {tuple(x_adv.shape)}, x0 {tuple(x0.shape)}, grad {tuple(grad.shape)}")
    if x_adv.dim() < 1 or x_adv.shape[0] == 0:
        raise ValueError("pgd_step: empty batch")
    if x0.device != x_adv.device or grad.device != x_adv.device:
        raise ValueError(f"pgd_step: x_adv on {x_adv.device}, x0 on {x0.device}, grad on {grad.device}")
    if clamp is not None and (len(clamp) != 2 or clamp[0] > clamp[1]):
        raise ValueError(f"pgd_step: clamp must be (lo, hi) with lo <= hi, got {clamp}")


def pgd_step_reference(x_adv: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step: Scalar,
                       eps: Scalar, norm: str = "linf",
                       clamp: Optional[Tuple[float, float]] = (0.0, 1.0), validate: bool = True) -> torch.Tensor:
    """Torch reference of the fused PGD update; modifies and returns `x_adv`.  `validate=False`
    skips the per-call check of tensor step/ε values for negatives (the caller checked them once)."""
    check_pgd_inputs(x_adv, x0, grad, norm, clamp)
    batch = x0.shape[0]
    step_t = per_sample(step, batch, x0, "step", validate)
    eps_t = per_sample(eps, batch, x0, "eps", validate)
    return _pgd_update_torch(x_adv, x0, grad, step_t, eps_t, norm, clamp)


def _pgd_update_torch(x_adv, x0, grad, step_t, eps_t, norm, clamp):
    """The update itself (inputs already checked; step_t/eps_t broadcastable [B, 1, ...]).
    In fp32, on one scratch tensor updated in place: this is also the CPU path, where each extra
    [B, ...] temporary costs as much as the arithmetic."""
    with torch.no_grad():
        g = grad.float()
        delta = x_adv.float() - x0.float()                      # fresh fp32 scratch
        if norm == "linf":
            delta.addcmul_(g.sign(), step_t)
            delta.clamp_(min=-eps_t, max=eps_t)
        else:
            gnorm = g.flatten(1).norm(dim=1).view_as(step_t)
            delta.addcmul_(g, step_t / gnorm.clamp_min(_TINY))  # step · g/‖g‖; 0 if g = 0
            dnorm = delta.flatten(1).norm(dim=1).view_as(eps_t)
            delta.mul_(torch.clamp(eps_t / dnorm.clamp_min(_TINY), max=1.0))
        out = delta.add_(x0)
        if clamp is not None:
            out.clamp_(clamp[0], clamp[1])
        x_adv.copy_(out)
    return x_adv


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Fused Triton kernels, next to the reference they must match.
#   L∞: elementwise over the flattened batch (sample index = offset // N for the per-sample
#       step/ε): reads x_adv, x0, grad once, writes x_adv once.
#   L2: ROWS samples per program.  Pass 1 accumulates ‖g‖², ⟨δ₀, g⟩ and ‖δ₀‖² (δ₀ = x_adv − x0);
#       then ‖δ‖² = ‖δ₀‖² + 2·s·⟨δ₀, g⟩/‖g‖ + s²·‖g‖²/‖g‖² needs no second reduction pass, and
#       pass 2 writes x0 + δ·min(1, ε/‖δ‖): 7 passes over an image-sized tensor (L∞: 4) where
#       the eager reference makes ~18.
#       (The expansion loses relative accuracy only when ‖δ‖ ≪ ‖δ₀‖, where the projection is the
#       identity unless ε ≪ ‖δ₀‖, i.e. a start far outside the ball stepped exactly back to x0.)
# ════════════════════════════════════════════════════════════════════════════════════════════════
try:  # the reference must keep working where triton is absent
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None
    tl = None

_BLOCK_LINF = 1024
_MAX_BLOCK_N = 2048        # L2 tile: 8 warps · 8 elements per thread on a GPU
_INTERPRETER_ELEMS = 4096  # the interpreter pays per program: several samples per program there

if triton is not None:

    @triton.jit
    def _pgd_linf_kernel(xadv_ptr, x0_ptr, g_ptr, step_ptr, eps_ptr, N, total, lo, hi,
                         HAS_CLAMP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        row = offs // N
        s = tl.load(step_ptr + row, mask=mask, other=0.0)
        e = tl.load(eps_ptr + row, mask=mask, other=0.0)
        xa = tl.load(xadv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        direction = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        delta = xa - x0 + s * direction
        delta = tl.maximum(tl.minimum(delta, e), -e)
        out = x0 + delta
        if HAS_CLAMP:
            out = tl.minimum(tl.maximum(out, lo), hi)
        tl.store(xadv_ptr + offs, out.to(xadv_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _l2_tile(xadv_ptr, x0_ptr, g_ptr, base, rmask, t, N, BLOCK_N: tl.constexpr):
        """Tile t of ROWS samples: offsets, mask and x_adv, x0, grad in fp32 (both passes read it)."""
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols < N)[None, :]
        offs = base[:, None] + cols[None, :]
        xa = tl.load(xadv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return offs, mask, xa, x0, g

    @triton.jit
    def _pgd_l2_kernel(xadv_ptr, x0_ptr, g_ptr, step_ptr, eps_ptr, B, N, lo, hi,
                       HAS_CLAMP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = rows < B
        base = rows.to(tl.int64) * N
        gg = tl.zeros([ROWS], tl.float32)
        dg = tl.zeros([ROWS], tl.float32)
        dd = tl.zeros([ROWS], tl.float32)
        n_tiles = tl.cdiv(N, BLOCK_N)
        for t in range(0, n_tiles):
            offs, mask, xa, x0, g = _l2_tile(xadv_ptr, x0_ptr, g_ptr, base, rmask, t, N, BLOCK_N)
            d0 = xa - x0
            gg += tl.sum(g * g, axis=1)
            dg += tl.sum(d0 * g, axis=1)
            dd += tl.sum(d0 * d0, axis=1)
        s = tl.load(step_ptr + rows, mask=rmask, other=0.0)
        e = tl.load(eps_ptr + rows, mask=rmask, other=0.0)
        inv = 1.0 / tl.maximum(tl.sqrt(gg), 1e-12)          # zero gradient → zero step
        dn2 = tl.maximum(dd + 2.0 * s * inv * dg + s * s * inv * inv * gg, 0.0)
        factor = tl.minimum(e / tl.maximum(tl.sqrt(dn2), 1e-12), 1.0)
        sg = s * inv
        for t in range(0, n_tiles):
            offs, mask, xa, x0, g = _l2_tile(xadv_ptr, x0_ptr, g_ptr, base, rmask, t, N, BLOCK_N)
            out = x0 + (xa - x0 + sg[:, None] * g) * factor[:, None]
            if HAS_CLAMP:
                out = tl.minimum(tl.maximum(out, lo), hi)
            tl.store(xadv_ptr + offs, out.to(xadv_ptr.dtype.element_ty), mask=mask)


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


INTERPRETED = triton is not None and _is_interpreted(_pgd_linf_kernel)


def triton_enabled(device) -> bool:
    """Can the Triton kernels run on tensors of `device`?  CUDA with triton, or the interpreter
    (TRITON_INTERPRET=1 when this module was imported), which runs them on CPU tensors."""
    if triton is None:
        return False
    return INTERPRETED or torch.device(device).type == "cuda"


def _sample_major(t: torch.Tensor) -> bool:
    """True when sample b occupies elements [b·N, (b+1)·N) of t's memory in some order (contiguous,
    channels_last, …): the update is elementwise plus per-sample sums, so order does not matter."""
    if t.is_contiguous():
        return True
    B = t.shape[0]
    N = t.numel() // B
    if B > 1 and t.stride(0) != N:
        return False
    expected = 1
    for st, sz in sorted((t.stride(i), t.shape[i]) for i in range(1, t.dim()) if t.shape[i] != 1):
        if st != expected:
            return False
        expected *= sz
    return True


def _flat_views(x_adv, x0, grad):
    """[B, N] contiguous views of the three tensors sharing their memory when they are all
    sample-major with the same layout; otherwise contiguous copies (x_adv's is written back)."""
    B = x0.shape[0]
    N = x0.numel() // B
    key = lambda t: [st for st, sz in zip(t.stride(), t.shape) if sz != 1]  # noqa: E731
    same = key(x_adv) == key(x0) == key(grad)
    if same and all(_sample_major(t) for t in (x_adv, x0, grad)):
        return [t.as_strided((B, N), (N, 1)) for t in (x_adv, x0, grad)], False
    return [t.contiguous().view(B, N) for t in (x_adv, x0, grad)], not x_adv.is_contiguous()


def _pgd_triton(x_adv, x0, grad, step, eps, l2, lo, hi):
    B = x0.shape[0]
    N = x0.numel() // B
    (xa, x0f, gf), copied = _flat_views(x_adv, x0, grad)
    has_clamp = lo is not None
    lo_f = float(lo) if has_clamp else 0.0
    hi_f = float(hi) if has_clamp else 0.0
    step = step.float().contiguous()
    eps = eps.float().contiguous()
    if l2:
        block_n = max(16, min(triton.next_power_of_2(N), _MAX_BLOCK_N))
        rows = 1
        if INTERPRETED:
            rows = max(1, min(64, _INTERPRETER_ELEMS // block_n, triton.next_power_of_2(B)))
        warps = max(2, min(8, block_n * rows // 256))
        with launch_device(x_adv):
            _pgd_l2_kernel[(triton.cdiv(B, rows),)](xa, x0f, gf, step, eps, B, N, lo_f, hi_f,
                                                     HAS_CLAMP=has_clamp, ROWS=rows,
                                                     BLOCK_N=block_n, num_warps=warps)
    else:
        total = B * N
        with launch_device(x_adv):
            _pgd_linf_kernel[(triton.cdiv(total, _BLOCK_LINF),)](
                xa, x0f, gf, step, eps, N, total, lo_f, hi_f, HAS_CLAMP=has_clamp,
                BLOCK=_BLOCK_LINF)
    if copied:
        x_adv.copy_(xa.view(x_adv.shape))


# custom_op rather than triton_op for the same reason as aerl_fast::pg_loss_fwd: one op serves
# CUDA, the interpreter and the plain-CPU reference.
@torch.library.custom_op("aerl_fast::pgd_step_", mutates_args={"x_adv"})
def pgd_step_op(x_adv: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step: torch.Tensor,
                eps: torch.Tensor, l2: bool, clamp_lo: Optional[float],
                clamp_hi: Optional[float]) -> None:
    """In-place PGD update; step and eps are [B] fp32 tensors (inputs already checked)."""
    if triton_enabled(x_adv.device):
        _pgd_triton(x_adv, x0, grad, step, eps, l2, clamp_lo, clamp_hi)
        return
    shape = (x0.shape[0],) + (1,) * (x0.dim() - 1)
    clamp = None if clamp_lo is None else (clamp_lo, clamp_hi)
    _pgd_update_torch(x_adv, x0, grad, step.float().view(shape), eps.float().view(shape),
                      "l2" if l2 else "linf", clamp)


@pgd_step_op.register_fake
def _(x_adv, x0, grad, step, eps, l2, clamp_lo, clamp_hi):
    return None


def pgd_step_fused(x_adv, x0, grad, step, eps, norm="linf", clamp=(0.0, 1.0), checked=False):
    """The fused op (Triton where it can run, else the op's torch kernel); same contract as
    `pgd_step_reference`: checks first, then one in-place update of `x_adv`, which it returns.
    `checked=True`: the caller already ran the checks and passes step/eps as [B] tensors."""
    batch = x0.shape[0]
    if checked:
        step_t, eps_t = step, eps
    else:
        check_pgd_inputs(x_adv, x0, grad, norm, clamp)
        step_t = per_sample(step, batch, x0, "step").reshape(batch)
        eps_t = per_sample(eps, batch, x0, "eps").reshape(batch)
    lo, hi = (None, None) if clamp is None else (float(clamp[0]), float(clamp[1]))
    with torch.no_grad():
        pgd_step_op(x_adv, x0, grad, step_t, eps_t, norm == "l2", lo, hi)
    return x_adv
