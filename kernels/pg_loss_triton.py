"""The fused Triton kernels of the ε-greedy policy-gradient loss (forward and backward) and their
launchers.  The specification is the torch reference in `pg_loss.py`, which wraps these in the
torch.library ops; this module is imported from there (and works as a no-op where triton is
absent: `triton_enabled` then says no).
"""
from __future__ import annotations

import torch

from .device import launch_device

# ════════════════════════════════════════════════════════════════════════════════════════════════
# Fused Triton kernel.  It lives next to the reference (Liger-Kernel layout) so the two are read and
# changed together; triton is imported under a guard so the reference works without it.
#
# Forward, one pass over each row (tiles of BLOCK_C columns, ROWS rows per program):
#   * online max / exp-sum (flash-softmax rescaling) → lse;
#   * the policy action by inverse CDF *inside* each tile (tl.cumsum) plus weighted reservoir
#     sampling *across* tiles: tile t's candidate replaces the running one with probability
#     w_t / W_≤t, so P(a = j) = e_j / W for any number of tiles and the row is still read once.
#     Inverse CDF needs two uniforms per row and tile; Gumbel-max would need one Philox draw and two
#     logs per logit, which makes the kernel compute-bound on a GPU.
#   * the floor f is a mixture: q = (1 − λ)·softmax + λ·uniform with λ = C·f / (1 + C·f), so a
#     second coin picks the uniform action, exactly as the exploration coin does;
#   * log π(a) with the reference's floor formula, reward, the advantage A = r − g·b (the baseline,
#     gated by the exploration coin), the per-row loss, and two per-row numbers for the backward:
#     lse and coef, the per-row scale of the gradient (below).
# All random numbers come from Philox counters (row, tile, stream) keyed by a seed read from a
# device tensor (no host sync; torch.compile sees a tensor, not a changing Python int).
#
# Backward recomputes p = exp(x − lse) from the saved logits instead of storing ∂loss/∂logits in the
# forward: that saves a [B, C] fp32 buffer kept alive between forward and backward and one write +
# one read of it, honours any grad_output in the same pass, and rows with zero reward (zero
# gradient) skip the logits read entirely.
#     ∂loss_i/∂x_ij = −g_i · coef_i · (1[j = a_i] − p_ij),
#     coef_i = A_i (f = 0),   coef_i = A_i · p_a / (p_a + f·(2 + C·f)) (f > 0).
# ════════════════════════════════════════════════════════════════════════════════════════════════
try:  # the reference must keep working where triton is absent
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - ImportError, or a broken install raising anything else
    triton = None
    tl = None

MAX_BLOCK_C = 4096  # columns per tile; larger class counts loop over tiles
# ROWS · BLOCK_C per program.  GPU: 256, with 2–16 warps so a thread holds 4–8 logits; compiled for
# sm_90, that keeps the forward at 54–120 registers without spills, where 16 logits per thread
# took 200–255 and spilled.  Several rows per program only for short rows (C < 256).  The
# interpreter pays per program, not per element: 4096 there.
_GPU_ELEMS = 256
_INTERPRETER_ELEMS = 4096

if triton is not None:

    @triton.jit
    def _pg_fwd_kernel(logits_ptr, stride_b, stride_c, labels_ptr, actions_in_ptr, seed_ptr,
                       baseline_ptr, loss_ptr, actions_ptr, rewards_ptr, logp_ptr, lse_ptr, coef_ptr,
                       B, C, epsilon, prob_floor,
                       EXPLORE_BATCH: tl.constexpr, HAS_FLOOR: tl.constexpr,
                       HAS_ACTIONS: tl.constexpr, HAS_BASELINE: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        rmask = rows < B
        row_off = rows.to(tl.int64) * stride_b
        labels = tl.load(labels_ptr + rows, mask=rmask, other=0)
        seed = tl.load(seed_ptr)

        # Per-row draws (counter stream 1): exploration coin, uniform action, floor-mixture coin.
        zero_u = (rows * 0).to(tl.uint32)
        rows_u = rows.to(tl.uint32)
        if HAS_ACTIONS:
            fixed_a = tl.load(actions_in_ptr + rows, mask=rmask, other=0).to(tl.int32)
        else:
            r0, r1, r2, _r3 = tl.philox(seed, rows_u, zero_u, zero_u + 1, zero_u)
            coin = tl.uint_to_uniform_float(r0)
            if EXPLORE_BATCH:  # one coin for the whole batch: every row reads counter (0, 0, 1)
                _b0, _b1, _b2, b3 = tl.philox(seed, zero_u, zero_u, zero_u + 1, zero_u)
                coin = tl.uint_to_uniform_float(b3)
            fixed_a = (r1 >> 1).to(tl.int32) % C
            explored = coin < epsilon
            use_fixed = explored
            if HAS_FLOOR:
                mix = C * prob_floor / (1.0 + C * prob_floor)
                use_fixed = use_fixed | (tl.uint_to_uniform_float(r2) < mix)

        m = tl.full([ROWS], float("-inf"), tl.float32)
        s = tl.zeros([ROWS], tl.float32)
        x_fixed = tl.zeros([ROWS], tl.float32)
        sel = tl.zeros([ROWS], tl.int32)
        x_sel = tl.zeros([ROWS], tl.float32)
        n_tiles = tl.cdiv(C, BLOCK_C)
        for t in range(0, n_tiles):
            cols = t * BLOCK_C + tl.arange(0, BLOCK_C)
            cmask = cols < C
            mask2 = rmask[:, None] & cmask[None, :]
            x = tl.load(logits_ptr + row_off[:, None] + cols[None, :].to(tl.int64) * stride_c,
                        mask=mask2, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows: no inf − inf
            e = tl.exp(x - m_safe[:, None])
            w = tl.sum(e, axis=1)
            s = s * tl.exp(m - m_safe) + w
            m = m_new
            is_fixed = cols[None, :] == fixed_a[:, None]
            x_fixed += tl.sum(tl.where(is_fixed, x, 0.0), axis=1)
            if not HAS_ACTIONS:
                # Counter stream 0: (row, tile) → two uniforms.
                q0, q1, _q2, _q3 = tl.philox(seed, rows_u, zero_u + t, zero_u, zero_u)
                target = tl.uint_to_uniform_float(q0) * w
                cum = tl.cumsum(e, axis=1)
                cnt = tl.sum((cum <= target[:, None]).to(tl.int32), axis=1)
                n_valid = tl.minimum(C - t * BLOCK_C, BLOCK_C)
                # Rounding can put target at the tile total: take the tile's mode instead.
                idx = tl.where(cnt >= n_valid, tl.argmax(e, axis=1), cnt)
                cand = t * BLOCK_C + idx
                cand_x = tl.sum(tl.where(cols[None, :] == cand[:, None], x, 0.0), axis=1)
                take = tl.uint_to_uniform_float(q1) * s < w  # P = w_t / W_≤t (reservoir)
                sel = tl.where(take, cand, sel)
                x_sel = tl.where(take, cand_x, x_sel)

        lse = tl.where(rmask, m + tl.log(tl.where(rmask, s, 1.0)), 0.0)  # padded rows: finite
        if HAS_ACTIONS:
            action = fixed_a
            x_a = x_fixed
        else:
            action = tl.where(use_fixed, fixed_a, sel)
            x_a = tl.where(use_fixed, x_fixed, x_sel)
        x_a = tl.where(rmask, x_a, 0.0)
        reward = (action == labels).to(tl.float32)
        advantage = reward
        if HAS_BASELINE:
            b = tl.load(baseline_ptr + rows, mask=rmask, other=0.0)
            if not HAS_ACTIONS:
                b = tl.where(explored, 0.0, b)  # explored rows keep their reward (module docstring)
            advantage = reward - b
        if HAS_FLOOR:
            p_a = tl.exp(x_a - lse)
            q_a = (p_a + prob_floor) / (1.0 + C * prob_floor)
            logp = tl.log(q_a + prob_floor)
            coef = advantage * (p_a / (p_a + prob_floor * (2.0 + C * prob_floor)))
        else:
            logp = x_a - lse
            coef = advantage
        tl.store(loss_ptr + rows, -(advantage * logp), mask=rmask)
        tl.store(actions_ptr + rows, action.to(tl.int64), mask=rmask)
        tl.store(rewards_ptr + rows, reward, mask=rmask)
        tl.store(logp_ptr + rows, logp, mask=rmask)
        tl.store(lse_ptr + rows, lse, mask=rmask)
        tl.store(coef_ptr + rows, coef, mask=rmask)

    @triton.jit
    def _pg_bwd_kernel(grad_rows_ptr, logits_ptr, stride_b, stride_c, lse_ptr, actions_ptr, coef_ptr,
                       grad_ptr, B, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        rmask = rows < B
        scale = -tl.load(grad_rows_ptr + rows, mask=rmask, other=0.0) * \
            tl.load(coef_ptr + rows, mask=rmask, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        action = tl.load(actions_ptr + rows, mask=rmask, other=0).to(tl.int32)
        active = rmask & (scale != 0.0)  # zero-reward rows: zero gradient, logits not read
        row_in = rows.to(tl.int64) * stride_b
        row_out = rows.to(tl.int64) * C
        for t in range(0, tl.cdiv(C, BLOCK_C)):
            cols = t * BLOCK_C + tl.arange(0, BLOCK_C)
            cmask = cols < C
            x = tl.load(logits_ptr + row_in[:, None] + cols[None, :].to(tl.int64) * stride_c,
                        mask=active[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
            p = tl.exp(x - lse[:, None])
            onehot = (cols[None, :] == action[:, None]).to(tl.float32)
            g = scale[:, None] * (onehot - p)
            tl.store(grad_ptr + row_out[:, None] + cols[None, :],
                     g.to(grad_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def triton_enabled(device) -> bool:
    """Can the Triton kernels run on tensors of `device`?  CUDA with triton, or the interpreter
    (TRITON_INTERPRET=1 when this module was imported), which runs them on CPU tensors."""
    if triton is None:
        return False
    return INTERPRETED or torch.device(device).type == "cuda"


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


INTERPRETED = triton is not None and _is_interpreted(_pg_fwd_kernel)


def _pg_launch_config(batch: int, classes: int, block_c: int = 0, rows: int = 0):
    """(BLOCK_C, ROWS, num_warps): one tile up to MAX_BLOCK_C columns; several rows per program
    when rows are short (see _GPU_ELEMS)."""
    if block_c <= 0:
        block_c = max(16, min(triton.next_power_of_2(classes), MAX_BLOCK_C))
    if rows <= 0:
        target = _INTERPRETER_ELEMS if INTERPRETED else _GPU_ELEMS
        rows = max(1, min(64, target // block_c, triton.next_power_of_2(batch)))
    for name, v in (("block_c", block_c), ("rows", rows)):
        if v & (v - 1):
            raise ValueError(f"eps_greedy_pg_loss: {name} must be a power of two, got {v}")
    return block_c, rows, max(2, min(16, block_c * rows // 256))


def _pg_fwd_triton(logits, labels, actions, seed, epsilon, explore_batch, prob_floor, block_c, rows,
                   baseline=None):
    B, C = logits.shape
    dev = logits.device
    block_c, rows, warps = _pg_launch_config(B, C, block_c, rows)
    out = [torch.empty(B, dtype=torch.float32, device=dev) for _ in range(6)]
    out[1] = torch.empty(B, dtype=torch.int64, device=dev)
    has_actions = actions is not None
    with launch_device(logits):
        _pg_fwd_kernel[(triton.cdiv(B, rows),)](
            logits, logits.stride(0), logits.stride(1), labels.contiguous(),
            actions.contiguous() if has_actions else labels, seed,
            baseline.contiguous() if baseline is not None else out[0],
            *out, B, C, float(epsilon), float(prob_floor),
            EXPLORE_BATCH=bool(explore_batch), HAS_FLOOR=prob_floor > 0, HAS_ACTIONS=has_actions,
            HAS_BASELINE=baseline is not None, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    return tuple(out)


def _pg_bwd_triton(grad_rows, logits, lse, actions, coef, block_c=0, rows=0):
    B, C = logits.shape
    block_c, rows, warps = _pg_launch_config(B, C, block_c, rows)
    grad = torch.empty((B, C), dtype=logits.dtype, device=logits.device)
    with launch_device(logits):
        _pg_bwd_kernel[(triton.cdiv(B, rows),)](
            grad_rows.float().contiguous(), logits, logits.stride(0), logits.stride(1), lse,
            actions, coef, grad, B, C, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    return grad
