"""The baseline of the fused ε-greedy policy-gradient loss: a per-row shift of the reward on the
rows that followed the policy, in the Triton kernel (run by the interpreter on CPU) and in the
torch reference, against the float64 formula `kernel_refs.pg_loss_f64(..., shift=...)`.
"""
import math

import pytest
import torch

from aerl_fast.kernels import eps_greedy_pg_loss
from aerl_fast.kernels import pg_loss as P
from kernel_refs import pg_loss_f64

pytestmark = pytest.mark.skipif(
    not P.triton_enabled("cpu"),
    reason="Triton not runnable on CPU here (run `TRITON_INTERPRET=1 pytest tests/kernels`)")


def make_inputs(gen, B, C):
    """Moderate logits (no probability near 1, so log π(a) and the shift b·log π(a) are not ~0)
    and labels; half the rows' fixed actions are the label."""
    labels = torch.randint(0, C, (B,), generator=gen)
    logits = torch.randn(B, C, generator=gen)
    acts = torch.where(torch.rand(B, generator=gen) < 0.5, labels, torch.randint(0, C, (B,), generator=gen))
    return logits, labels, acts


def fused(logits, labels, eps, reduction="mean", grad_output=None, **kw):
    x = logits.clone().requires_grad_(True)
    out = eps_greedy_pg_loss(x, labels, eps, reduction=reduction, **kw)
    out.loss.backward(torch.ones_like(out.loss) if grad_output is None else grad_output)
    return out, x.grad


@pytest.mark.parametrize("prob_floor", [0.0, 1e-6, 0.02])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", ["float", "rows"])
def test_fixed_actions_shift_every_row(gen, prob_floor, reduction, kind):
    """Given actions (no coin): every row's reward is shifted; loss and gradient = float64."""
    B, C = 11, 20
    logits, labels, acts = make_inputs(gen, B, C)
    b = 0.37 if kind == "float" else torch.rand(B, generator=gen)
    go = torch.randn(B, generator=gen) if reduction == "none" else None
    out, grad = fused(logits, labels, 0.3, reduction, go, actions=acts, prob_floor=prob_floor, baseline=b)
    ref_loss, ref_grad = pg_loss_f64(logits, labels, acts, prob_floor, reduction, go, shift=b)
    torch.testing.assert_close(out.loss.double(), ref_loss, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(out.rewards, (acts == labels).float())  # rewards stay unshifted
    # zero-reward rows now carry gradient: the shift reached the backward
    zero_reward = acts != labels
    assert bool(zero_reward.any()) and float(grad[zero_reward].abs().sum()) > 0


@pytest.mark.parametrize("explore", ["sample", "batch"])
@pytest.mark.parametrize("eps,floor", [(0.0, 0.0), (0.0, 0.05), (1.0, 0.0)])
def test_sampled_rows_shift_unless_explored(gen, explore, eps, floor):
    """ε = 0: every row followed the policy and is shifted, also where the floor's mixture coin
    chose the action (that draw is the policy's); ε = 1: every row explored, none is shifted."""
    B, C, b = 37, 10, 0.6
    logits, labels, _ = make_inputs(gen, B, C)
    out, grad = fused(logits, labels, eps, explore=explore, prob_floor=floor, seed=5, baseline=b)
    shift = b if eps == 0.0 else None
    ref_loss, ref_grad = pg_loss_f64(logits, labels, out.actions, floor, shift=shift)
    torch.testing.assert_close(out.loss.double(), ref_loss, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("explore", ["sample", "batch"])
def test_shift_follows_the_exploration_coin(gen, explore):
    """ε = 0.5: each row's loss is the shifted or the unshifted formula for its action; with a coin
    per sample the shifted share is Binomial(B, 1 − ε) (within 4σ), with one per batch all or none."""
    B, C, b, eps = 512, 10, 0.6, 0.5
    logits, labels, _ = make_inputs(gen, B, C)
    shares = set()
    for seed in range(4):
        out, _ = fused(logits, labels, eps, "none", explore=explore, seed=seed, baseline=b)
        shifted, _ = pg_loss_f64(logits, labels, out.actions, reduction="none", shift=b)
        plain, _ = pg_loss_f64(logits, labels, out.actions, reduction="none")
        is_shifted = (out.loss.double() - shifted).abs() < 1e-4
        is_plain = (out.loss.double() - plain).abs() < 1e-4
        assert bool((is_shifted ^ is_plain).all())  # one or the other, never ambiguous
        share = float(is_shifted.double().mean())
        if explore == "sample":
            assert abs(share - (1 - eps)) < 4 * math.sqrt(eps * (1 - eps) / B), share
        else:
            assert share in (0.0, 1.0)
        shares.add(share)
    if explore == "batch":
        assert shares == {0.0, 1.0}  # both outcomes of the batch coin (P(one-sided) = 2·0.5⁴)


def test_reference_gates_like_the_kernel(gen):
    """The torch reference draws other numbers; the same rule: ε = 1 no shift, ε = 0 all."""
    B, C, b = 9, 6, 0.45
    logits, labels, _ = make_inputs(gen, B, C)
    for eps, shift in ((0.0, b), (1.0, None)):
        g = torch.Generator().manual_seed(3)
        x = logits.double().requires_grad_(True)
        out = P.eps_greedy_pg_loss_reference(x, labels, eps, generator=g, baseline=b)
        out.loss.backward()
        ref_loss, ref_grad = pg_loss_f64(logits.double(), labels, out.actions, shift=shift)
        torch.testing.assert_close(out.loss, ref_loss)
        torch.testing.assert_close(x.grad, ref_grad)


def test_op_torch_kernel_matches_triton_with_baseline(gen):
    """The op's plain-CPU half agrees with the Triton half, coef (the backward's scale) included."""
    B, C = 13, 24
    logits, labels, acts = make_inputs(gen, B, C)
    b = torch.rand(B, generator=gen)
    seed = torch.zeros(1, dtype=torch.long)
    for f in (0.0, 0.01):
        tri = P._pg_fwd_triton(logits, labels, acts, seed, 0.0, False, f, 0, 0, b)
        ref = P._pg_fwd_torch(logits, labels, acts, seed, 0.0, False, f, b)
        for a, r in zip(tri, ref):
            torch.testing.assert_close(a, r.to(a.dtype), atol=2e-5, rtol=2e-5)


def test_opcheck_with_baseline(gen):
    logits, labels, acts = make_inputs(gen, 6, 12)
    x = logits.requires_grad_(True)
    seed = torch.tensor([7], dtype=torch.long)
    b = torch.rand(6, generator=gen)
    torch.library.opcheck(P.pg_loss_fwd_op, (x, labels, None, seed, 0.2, False, 1e-6),
                          {"baseline": b})
    torch.library.opcheck(P.pg_loss_fwd_op, (x, labels, acts, seed, 0.0, True, 0.0), {"baseline": b})


@pytest.mark.parametrize("baseline,match", [
    (torch.zeros(4), r"baseline must be a float scalar or \[3\] tensor"),
    (torch.zeros(3, dtype=torch.long), "baseline must be a float scalar"),
    (torch.tensor([0.0, float("nan"), 0.0]), "baseline holds a non-finite value"),
    (float("inf"), "baseline must be None, a finite number or a tensor"),
    (True, "baseline must be None, a finite number or a tensor"),
    ("mean", "baseline must be None, a finite number or a tensor"),
])
def test_bad_baseline_raises_before_launch(monkeypatch, baseline, match):
    def boom(*a, **k):
        raise AssertionError("a kernel was launched before the input check")
    monkeypatch.setattr(P, "_pg_fwd_triton", boom)
    monkeypatch.setattr(P, "_pg_fwd_torch", boom)
    with pytest.raises(ValueError, match=match):
        eps_greedy_pg_loss(torch.randn(3, 10), torch.tensor([0, 1, 2]), 0.1, baseline=baseline)
