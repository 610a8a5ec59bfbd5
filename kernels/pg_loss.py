"""ε-greedy policy-gradient (REINFORCE) loss over classification logits.

The torch reference `eps_greedy_pg_loss_reference` below is the specification of the op and the
CPU path.  Per row i of `logits` [B, C]:

    p_i      = softmax(logits_i)                       (fp32 accumulation)
    q_i      = (p_i + f) / (1 + C·f)                   (f = prob_floor; the study uses f = 1e-6)
    explore  = U_i < ε   (explore="sample")  or one coin for the whole batch (explore="batch")
    a_i      ~ Uniform{0..C-1} if explore else Categorical(q_i)
    logπ_i   = log(q_i[a_i] + f)                       (= log_softmax(logits_i)[a_i] when f = 0)
    r_i      = 1[a_i == label_i]
    A_i      = r_i − g_i·b_i                           (b = baseline, 0 when None; g_i below)
    loss     = −reduce_i(A_i · logπ_i)                 reduce = mean | sum | none

Only `loss` carries gradient (actions are sampled, rewards and the baseline are constants).

The baseline is a per-row shift of the reward, applied only where the action was drawn from the
policy: g_i = 0 on rows the ε coin sent exploring, 1 otherwise (1 on every row when `actions` is
given).  A constant b leaves the REINFORCE gradient unbiased only under the distribution whose
score it multiplies: E_{a~π}[∇log π(a)] = 0, but an explored action is uniform and
E_{a~U}[∇_z log π(a)] = 1/C − π, so shifting explored rows too would add ε·b·(1/C − π) to the
expected gradient (a push toward confident outputs).  b must not depend on the row's own action.

Below the reference: the fused Triton kernels (forward and backward), the torch.library ops
`aerl_fast::pg_loss_fwd` / `pg_loss_bwd` that wrap them with autograd, and
`eps_greedy_pg_loss_fused`.  Callers use the dispatch point `aerl_fast.kernels.eps_greedy_pg_loss`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .device import launch_device

REDUCTIONS = ("mean", "sum", "none")
EXPLORE_MODES = ("sample", "batch")


class PGLoss(NamedTuple):
    loss: torch.Tensor       # scalar (mean/sum) or [B] (none); the only output with gradient
    actions: torch.Tensor    # [B] int64, the sampled classes
    rewards: torch.Tensor    # [B] float32, 1[action == label]
    log_probs: torch.Tensor  # [B] float32, log π(action | x), detached


def check_pg_inputs(logits, labels, epsilon, explore, prob_floor, reduction, actions=None,
                    validate=True, baseline=None):
    """Validate before any launch: every failure names the argument and the offending value.
    `validate=False` skips the label/action range checks, which read the data (a host sync on
    CUDA); the Triton kernel only compares labels, so bad ones cost reward, not memory safety."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("eps_greedy_pg_loss: logits and labels must be tensors")
    if not logits.is_floating_point():
        raise TypeError(f"eps_greedy_pg_loss: logits must be a float tensor, got dtype {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"eps_greedy_pg_loss: logits must be [batch, classes], got shape {tuple(logits.shape)}")
    batch, classes = logits.shape
    if batch == 0:
        raise ValueError("eps_greedy_pg_loss: empty batch (logits has 0 rows)")
    if classes < 1:
        raise ValueError("eps_greedy_pg_loss: logits has 0 classes")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"eps_greedy_pg_loss: labels must be [{batch}] to match logits, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"eps_greedy_pg_loss: labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"eps_greedy_pg_loss: labels on {labels.device} but logits on {logits.device}")
    # Value checks read the data (a device sync on CUDA); torch.compile cannot trace them, so they
    # run in eager mode only.
    values_checked = validate and not torch.compiler.is_compiling()
    if values_checked:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"eps_greedy_pg_loss: label {bad} out of range for {classes} classes")
    eps = float(epsilon)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps_greedy_pg_loss: epsilon must be in [0, 1], got {eps}")
    if explore not in EXPLORE_MODES:
        raise ValueError(f"eps_greedy_pg_loss: explore must be one of {EXPLORE_MODES}, got {explore!r}")
    if not 0.0 <= float(prob_floor) < 1.0:
        raise ValueError(f"eps_greedy_pg_loss: prob_floor must be in [0, 1), got {prob_floor}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"eps_greedy_pg_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if actions is not None:
        if actions.shape != (batch,) or actions.dtype.is_floating_point:
            raise ValueError(f"eps_greedy_pg_loss: actions must be integer [{batch}], got {actions.dtype} {tuple(actions.shape)}")
        if actions.device != logits.device:
            raise ValueError(f"eps_greedy_pg_loss: actions on {actions.device} but logits on {logits.device}")
        if values_checked and (int(actions.min()) < 0 or int(actions.max()) >= classes):
            raise ValueError(f"eps_greedy_pg_loss: an action is out of range for {classes} classes")
    if isinstance(baseline, torch.Tensor):
        if not baseline.is_floating_point() or baseline.shape not in ((), (batch,)):
            raise ValueError(f"eps_greedy_pg_loss: baseline must be a float scalar or [{batch}] tensor, "
                             f"got {baseline.dtype} {tuple(baseline.shape)}")
        if baseline.device != logits.device:
            raise ValueError(f"eps_greedy_pg_loss: baseline on {baseline.device} but logits on {logits.device}")
        if values_checked and not bool(torch.isfinite(baseline).all()):
            raise ValueError("eps_greedy_pg_loss: baseline holds a non-finite value")
    elif baseline is not None and (isinstance(baseline, bool) or not isinstance(baseline, (int, float))
                                   or not math.isfinite(baseline)):
        raise ValueError(f"eps_greedy_pg_loss: baseline must be None, a finite number or a tensor, got {baseline!r}")
    return eps


def host_draw(generator: torch.Generator) -> int:
    """One 62-bit integer from `generator`: the whole draw of an op from a generator of another
    device (a CPU generator costs no device RNG, copy or sync)."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))


def baseline_rows(baseline, logits) -> Optional[torch.Tensor]:
    """The baseline as a detached fp32 [B] tensor on the logits' device (None stays None)."""
    if baseline is None:
        return None
    b = torch.as_tensor(baseline, dtype=torch.float32, device=logits.device).detach()
    return b.expand(logits.shape[0]).contiguous()


def make_generator(device, seed=None, generator=None) -> Optional[torch.Generator]:
    """The generator to draw from: the one given, a fresh one from `seed`, or None (global RNG).
    A generator of another device type (the trainer's CPU exploration stream for CUDA logits)
    seeds a fresh generator on `device` with one draw, so the stream stays device-independent."""
    if generator is not None:
        if generator.device.type == torch.device(device).type:
            return generator
        seed = host_draw(generator)
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: fp32 for fp32/bf16/fp16 logits, fp64 kept (so gradcheck can run)."""
    return x if x.dtype == torch.float64 else x.float()


def floored_probs(logits: torch.Tensor, prob_floor: float) -> torch.Tensor:
    """q = (softmax + f) / (1 + C·f), computed in fp32 (fp64 for fp64 logits): the policy actions
    are drawn from."""
    p = torch.softmax(_acc(logits), dim=-1)
    if prob_floor > 0:
        p = (p + prob_floor) / (1.0 + logits.shape[-1] * prob_floor)
    return p


def sample_actions(logits, epsilon, explore="sample", prob_floor=0.0, generator=None):
    """Draw ε-greedy actions [B] from the policy (no gradient)."""
    return draw_actions(logits, epsilon, explore, prob_floor, generator)[0]


def draw_actions(logits, epsilon, explore="sample", prob_floor=0.0, generator=None):
    """(actions [B], explored [B] bool): ε-greedy draws and which rows the ε coin chose."""
    batch, classes = logits.shape
    device = logits.device
    with torch.no_grad():
        probs = floored_probs(logits, prob_floor)
        policy = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        uniform = torch.randint(0, classes, (batch,), device=device, generator=generator)
        if explore == "sample":
            coin = torch.rand(batch, device=device, generator=generator) < epsilon
        else:
            coin = (torch.rand(1, device=device, generator=generator) < epsilon).expand(batch)
        return torch.where(coin, uniform, policy), coin


def pg_loss_given_actions(logits, labels, actions, prob_floor=0.0, reduction="mean", shift=None):
    """The differentiable part: −reduce((r − shift) · log π(a)) for fixed actions, `shift` the
    per-row baseline already gated (None: 0).  Returns (loss, rewards, logπ); rewards unshifted."""
    if prob_floor > 0:
        q = floored_probs(logits, prob_floor)
        log_probs = torch.log(q.gather(1, actions[:, None]).squeeze(1) + prob_floor)
    else:
        log_probs = torch.log_softmax(_acc(logits), dim=-1).gather(1, actions[:, None]).squeeze(1)
    rewards = (actions == labels).float()
    advantage = rewards if shift is None else rewards - shift.to(log_probs.dtype)
    per_sample = -(advantage * log_probs)
    if reduction == "mean":
        loss = per_sample.mean()
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        loss = per_sample
    return loss, rewards, log_probs.detach()


def eps_greedy_pg_loss_reference(logits, labels, epsilon, *, explore="sample", prob_floor=0.0,
                                 generator=None, seed=None, reduction="mean", actions=None,
                                 baseline=None) -> PGLoss:
    """Torch reference (the specification) of the fused ε-greedy policy-gradient loss.

    `actions` may be given to evaluate the loss for fixed actions (no sampling): tests use it to
    compare implementations that draw different random numbers.  `baseline` (a number or [B]) is
    subtracted from the reward of the rows that followed the policy (module docstring).
    """
    eps = check_pg_inputs(logits, labels, epsilon, explore, prob_floor, reduction, actions,
                          baseline=baseline)
    labels = labels.long()
    shift = baseline_rows(baseline, logits)
    if actions is None:
        gen = make_generator(logits.device, seed, generator)
        actions, explored = draw_actions(logits.detach(), eps, explore, prob_floor, gen)
        if shift is not None:
            shift = torch.where(explored, 0.0, shift)
    else:
        actions = actions.long()
    loss, rewards, log_probs = pg_loss_given_actions(logits, labels, actions, prob_floor, reduction,
                                                     shift)
    return PGLoss(loss, actions, rewards, log_probs)


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


# ── torch reference of the two op halves (the ops' CPU kernel where Triton cannot run) ─────────
def _pg_fwd_torch(logits, labels, actions, seed, epsilon, explore_batch, prob_floor, baseline=None):
    shift = baseline
    if actions is None:
        gen = make_generator(logits.device, int(seed.reshape(-1)[0]))
        actions, explored = draw_actions(logits, epsilon, "batch" if explore_batch else "sample",
                                         prob_floor, gen)
        if shift is not None:
            shift = torch.where(explored, 0.0, shift)
    actions = actions.long().clone()
    loss_rows, rewards, log_probs = pg_loss_given_actions(logits.detach(), labels, actions,
                                                          prob_floor, "none", shift)
    lse = torch.logsumexp(logits.detach().float(), dim=1)
    coef = rewards.clone() if shift is None else rewards - shift.float()
    if prob_floor > 0:
        p_a = torch.exp(logits.detach().float().gather(1, actions[:, None]).squeeze(1) - lse)
        coef = coef * p_a / (p_a + prob_floor * (2.0 + logits.shape[1] * prob_floor))
    return loss_rows.float(), actions, rewards, log_probs.float(), lse, coef.float()


def _pg_bwd_torch(grad_rows, logits, lse, actions, coef):
    p = torch.exp(logits.float() - lse[:, None])
    onehot = torch.zeros_like(p).scatter_(1, actions[:, None], 1.0)
    return (-(grad_rows.float() * coef)[:, None] * (onehot - p)).to(logits.dtype)


# ── torch.library registration ─────────────────────────────────────────────────────────────────
# custom_op (opaque to the compiler) rather than triton_op: one op must serve CUDA (Triton), CPU
# under the interpreter (Triton) and plain CPU (the reference, which seeds a torch.Generator from
# the seed tensor's value); triton_op uses its body as the fake kernel, and that data-dependent
# branch cannot run on fake tensors.  The fused kernel gains nothing from Inductor seeing inside it.
@torch.library.custom_op("aerl_fast::pg_loss_fwd", mutates_args=())
def pg_loss_fwd_op(logits: torch.Tensor, labels: torch.Tensor, actions: Optional[torch.Tensor],
                   seed: torch.Tensor, epsilon: float, explore_batch: bool, prob_floor: float,
                   block_c: int = 0, rows: int = 0, baseline: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor]:
    """Per-row (loss, action, reward, logπ, lse, coef); reduction and autograd live outside.
    `baseline`: fp32 [B], the per-row reward shift (gated by the exploration coin)."""
    if triton_enabled(logits.device):
        return _pg_fwd_triton(logits, labels, actions, seed, epsilon, explore_batch, prob_floor,
                              block_c, rows, baseline)
    return _pg_fwd_torch(logits, labels, actions, seed, epsilon, explore_batch, prob_floor, baseline)


@pg_loss_fwd_op.register_fake
def _(logits, labels, actions, seed, epsilon, explore_batch, prob_floor, block_c=0, rows=0,
      baseline=None):
    B = logits.shape[0]
    f = lambda dt: logits.new_empty((B,), dtype=dt)  # noqa: E731
    return f(torch.float32), f(torch.int64), f(torch.float32), f(torch.float32), \
        f(torch.float32), f(torch.float32)


@torch.library.custom_op("aerl_fast::pg_loss_bwd", mutates_args=())
def pg_loss_bwd_op(grad_rows: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor,
                   actions: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """∂loss/∂logits recomputed from the saved logits and the per-row lse / coef."""
    if triton_enabled(logits.device):
        return _pg_bwd_triton(grad_rows, logits, lse, actions, coef)
    return _pg_bwd_torch(grad_rows, logits, lse, actions, coef)


@pg_loss_bwd_op.register_fake
def _(grad_rows, logits, lse, actions, coef):
    return logits.new_empty(logits.shape)


def _pg_setup_context(ctx, inputs, output):
    logits = inputs[0]
    ctx.save_for_backward(logits, output[4], output[1], output[5])


def _pg_backward(ctx, g_loss, *_unused):
    logits, lse, actions, coef = ctx.saved_tensors
    return pg_loss_bwd_op(g_loss, logits, lse, actions, coef), *([None] * 9)


pg_loss_fwd_op.register_autograd(_pg_backward, setup_context=_pg_setup_context)


def kernel_seed(device, seed=None, generator=None) -> torch.Tensor:
    """The kernel's Philox key as a 1-element int64 tensor on `device`: from `generator` (one draw,
    so the generator's state decides it reproducibly), from `seed`, or from the device's global RNG
    (so torch.manual_seed governs it).  Host numbers become a device-side fill, not a copy: no host
    sync on CUDA, whether the generator lives on the CPU (one host draw) or on the device."""
    if generator is not None and torch.device(device).type == generator.device.type:
        return torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device,
                             dtype=torch.int64).to(device)  # another GPU: a device-to-device copy
    if generator is not None:
        seed = host_draw(generator)
    if seed is not None:
        return torch.full((1,), int(seed) & (2 ** 63 - 1), dtype=torch.int64, device=device)
    return torch.randint(0, 2 ** 62, (1,), device=device, dtype=torch.int64)


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def eps_greedy_pg_loss_fused(logits, labels, epsilon, *, explore="sample", prob_floor=0.0,
                             generator=None, seed=None, reduction="mean", actions=None,
                             baseline=None, checked=False, block_c=0, rows=0) -> PGLoss:
    """The fused op (Triton where it can run, else the op's torch kernel), same contract as the
    reference.  `checked=True` skips the input checks the caller already ran; `block_c`/`rows`
    override the launch shape (tests use them to force several tiles on small rows)."""
    eps = float(epsilon) if checked else check_pg_inputs(logits, labels, epsilon, explore,
                                                         prob_floor, reduction, actions,
                                                         baseline=baseline)
    if actions is not None:
        actions = actions.long()
        seed_t = torch.zeros(1, dtype=torch.int64, device=logits.device)
    else:
        seed_t = kernel_seed(logits.device, seed, generator)
    loss_rows, acts, rewards, log_probs, _lse, _coef = pg_loss_fwd_op(
        logits, labels.long(), actions, seed_t, eps, explore == "batch", float(prob_floor),
        block_c, rows, baseline_rows(baseline, logits))
    return PGLoss(_reduce(loss_rows, reduction), acts, rewards.detach(), log_probs.detach())
