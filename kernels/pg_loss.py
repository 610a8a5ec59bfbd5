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


from .pg_loss_triton import _pg_bwd_triton, _pg_fwd_triton, triton_enabled


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
