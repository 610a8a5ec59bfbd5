"""The fused ε-greedy policy-gradient loss against independent float64 formulas and statistics.

Runs the Triton kernel through the interpreter on CPU (see conftest.py).  Each comparison draws
fresh random inputs from a seeded generator and checks against `kernel_refs.pg_loss_f64`, which
is written from the definition and does not call the code under test.
"""
import math

import pytest
import torch
from scipy import stats

import aerl_fast.kernels as K
from aerl_fast.kernels import PGLoss, backend, eps_greedy_pg_loss
from aerl_fast.kernels import pg_loss as P
from aerl_fast.kernels import pg_loss_triton as T
from kernel_refs import pg_grad_closed_form, pg_loss_f64, study_loss_given_actions

needs_triton = pytest.mark.skipif(
    not P.triton_enabled("cpu"),
    reason="Triton not runnable on CPU here: triton missing, or triton was imported before "
           "TRITON_INTERPRET=1 was set (run `TRITON_INTERPRET=1 pytest tests/kernels`)")
pytestmark = needs_triton

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=2e-5, rtol=2e-5),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def make_inputs(gen, B, C, dtype=torch.float32, peak=4.0):
    """Random logits with a bump of `peak` at the label, so a good share of sampled actions earn
    reward (otherwise most gradients would be zero and prove nothing)."""
    labels = torch.randint(0, C, (B,), generator=gen)
    logits = 2.0 * torch.randn(B, C, generator=gen)
    logits[torch.arange(B), labels] += peak
    return logits.to(dtype), labels


def fixed_actions(gen, labels, C):
    """Half the rows act on the label (reward 1), the rest at random."""
    acts = torch.randint(0, C, labels.shape, generator=gen)
    keep = torch.rand(labels.shape, generator=gen) < 0.5
    return torch.where(keep, labels, acts)


def run_fused(logits, labels, reduction="mean", grad_output=None, **kw):
    x = logits.clone().requires_grad_(True)
    out = eps_greedy_pg_loss(x, labels, kw.pop("epsilon", 0.1), reduction=reduction, **kw)
    go = torch.ones_like(out.loss) if grad_output is None else grad_output
    out.loss.backward(go)
    return out, x.grad


# ── forward + gradient against float64, given the same actions ────────────────────────────────
SHAPES = [(B, C) for B in (1, 7, 256) for C in (2, 10, 100, 1000)] + [(1, 5000), (7, 5000)]


@pytest.mark.parametrize("B,C", SHAPES)
def test_sampled_forward_and_grad_match_f64(gen, B, C):
    """Kernel-sampled actions; loss, logπ, rewards and ∂/∂logits equal the float64 formula."""
    assert C == 5000 or C <= T.MAX_BLOCK_C  # 5000: non-power-of-two above one tile
    logits, labels = make_inputs(gen, B, C)
    out, grad = run_fused(logits, labels, seed=B * 7919 + C)
    assert isinstance(out, PGLoss)
    assert out.actions.dtype == torch.int64 and out.actions.shape == (B,)
    assert int(out.actions.min()) >= 0 and int(out.actions.max()) < C
    ref_loss, ref_grad = pg_loss_f64(logits, labels, out.actions)
    torch.testing.assert_close(out.loss.double(), ref_loss, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.rewards, (out.actions == labels).float())
    z = logits.double().log_softmax(1)[torch.arange(B), out.actions]
    torch.testing.assert_close(out.log_probs.double(), z, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=2e-6, rtol=2e-5)
    assert not out.log_probs.requires_grad and not out.rewards.requires_grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob_floor", [0.0, 1e-6, 0.02])
def test_fixed_actions_reductions_and_grad_output(gen, reduction, prob_floor):
    """Given actions (no sampling); the backward honours an arbitrary grad_output."""
    B, C = 37, 100
    logits, labels = make_inputs(gen, B, C)
    actions = fixed_actions(gen, labels, C)
    go = torch.randn(B, generator=gen) if reduction == "none" else torch.tensor(-2.5)
    out, grad = run_fused(logits, labels, reduction, go, actions=actions, prob_floor=prob_floor)
    assert torch.equal(out.actions, actions)
    ref_loss, ref_grad = pg_loss_f64(logits, labels, actions, prob_floor, reduction, go)
    torch.testing.assert_close(out.loss.double(), ref_loss, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=2e-6, rtol=2e-5)
    assert float(ref_grad.abs().sum()) > 0  # the comparison is not between zeros


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [10, 1000])
def test_low_precision_logits(gen, dtype, C):
    """bf16/fp16 logits: fp32 accumulation; the gradient comes back in the logits' dtype."""
    logits, labels = make_inputs(gen, 29, C, dtype)
    actions = fixed_actions(gen, labels, C)
    out, grad = run_fused(logits, labels, actions=actions)
    assert out.loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, ref_grad = pg_loss_f64(logits, labels, actions)  # same rounded inputs
    torch.testing.assert_close(out.loss.double(), ref_loss, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[dtype])
    # and close to the fp32 computation on the unrounded logits
    ref32, _ = pg_loss_f64(logits.float(), labels, actions)
    assert abs(out.loss.item() - ref32.item()) < 1e-4 * max(1.0, abs(ref32.item()))


def test_non_contiguous_logits(gen):
    """A transposed view and a strided slice give the same numbers as a contiguous copy."""
    B, C = 9, 33
    base, labels = make_inputs(gen, B, C)
    actions = fixed_actions(gen, labels, C)
    views = [base.t().contiguous().t(), torch.cat([base, base], 1)[:, ::2]]
    views[1].copy_(base)
    for v in views:
        assert not v.is_contiguous()
        x = v.detach().requires_grad_(True)  # same strides, a leaf
        out = eps_greedy_pg_loss(x, labels, 0.0, actions=actions, prob_floor=1e-6)
        out.loss.backward()
        ref_loss, ref_grad = pg_loss_f64(base, labels, actions, 1e-6)
        torch.testing.assert_close(out.loss.double(), ref_loss, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(x.grad.double(), ref_grad, atol=2e-6, rtol=2e-5)


def test_many_tiles_per_row(gen):
    """A small forced tile (32 columns) splits C = 100 into 4 tiles, the last one partial."""
    B, C = 13, 100
    logits, labels = make_inputs(gen, B, C)
    x = logits.clone().requires_grad_(True)
    out = P.eps_greedy_pg_loss_fused(x, labels, 0.2, seed=5, block_c=32, rows=4)
    out.loss.backward()
    ref_loss, ref_grad = pg_loss_f64(logits, labels, out.actions)
    torch.testing.assert_close(out.loss.double(), ref_loss, atol=2e-5, rtol=2e-5)
    # the backward op runs with the default (one-tile) shape; check the tiled backward directly
    _, _, _, _, lse, coef = P.pg_loss_fwd_op(logits, labels, out.actions, torch.zeros(1, dtype=torch.long),
                                             0.0, False, 0.0)
    g = P._pg_bwd_triton(torch.full((B,), 1.0 / B), logits, lse, out.actions, coef, block_c=32, rows=4)
    torch.testing.assert_close(g.double(), ref_grad, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=2e-6, rtol=2e-5)


def test_fixed_actions_equal_the_study_formula(gen):
    """prob_floor = 1e-6 is the study's softmax + 1e-6, renormalised, log(p[a] + 1e-6)."""
    B, C = 64, 10
    logits, labels = make_inputs(gen, B, C)
    actions = fixed_actions(gen, labels, C)
    out = eps_greedy_pg_loss(logits, labels, 0.1, actions=actions, prob_floor=1e-6)
    study = study_loss_given_actions(logits.double(), labels, actions)
    torch.testing.assert_close(out.loss.double(), study, atol=1e-6, rtol=1e-6)
    # and differs measurably from the unfloored loss on a row with a near-zero probability
    logits[0] = torch.tensor([30.0] + [0.0] * (C - 1))
    labels[0], actions[0] = 3, 3
    floored = eps_greedy_pg_loss(logits, labels, 0.0, actions=actions, prob_floor=1e-6).loss
    plain = eps_greedy_pg_loss(logits, labels, 0.0, actions=actions).loss
    torch.testing.assert_close(floored.double(), study_loss_given_actions(logits.double(), labels, actions),
                               atol=1e-6, rtol=1e-6)
    assert float(plain) - float(floored) > 0.1


# ── randomness ─────────────────────────────────────────────────────────────────────────────────
def peaked(B, C, cls=0):
    """Logits that put all mass on `cls`: any action ≠ cls was an exploration."""
    x = torch.full((B, C), -40.0)
    x[:, cls] = 40.0
    return x, torch.full((B,), cls, dtype=torch.long)


def within_4_sigma(count, n, p):
    sigma = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= 4 * sigma, (count, n * p, sigma)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 1.0])
def test_exploration_fraction_per_sample(eps):
    B, C = 8192, 10
    x, y = peaked(B, C)
    out = P.eps_greedy_pg_loss_fused(x, y, eps, seed=11, rows=512)
    n_off = int((out.actions != 0).sum())
    p = eps * (C - 1) / C  # an explored row lands on class 0 with probability 1/C
    ok, info = within_4_sigma(n_off, B, p)
    assert ok, info
    if eps == 1.0:  # then actions are uniform: chi-square
        counts = torch.bincount(out.actions, minlength=C).numpy()
        assert stats.chisquare(counts).pvalue > 1e-3


def test_exploration_once_per_batch():
    """explore='batch': over calls the fraction of exploring batches is ε, and a call's rows
    either all follow the policy or are uniform draws."""
    B, C, eps, calls = 4, 50, 0.3, 150
    x, y = peaked(B, C)
    explored = 0
    for i in range(calls):
        a = P.eps_greedy_pg_loss_fused(x, y, eps, explore="batch", seed=1000 + i).actions
        # an exploring batch has 4 uniform draws: all four on class 0 has p = 1.6e-7
        explored += int(bool((a != 0).any()))
    ok, info = within_4_sigma(explored, calls, eps)
    assert ok, info


def test_batch_coin_shared_across_programs():
    """One row per program: every program must read the same batch coin."""
    B, C = 6, 50
    x, y = peaked(B, C)
    outcomes = set()
    for seed in range(12):
        a = P.eps_greedy_pg_loss_fused(x, y, 0.5, explore="batch", seed=seed, rows=1).actions
        n_off = int((a != 0).sum())
        assert n_off == 0 or n_off >= B - 2, a  # all policy, or (almost surely) all uniform
        outcomes.add(n_off == 0)
    assert outcomes == {True, False}


def _chi2_pvalue(actions, probs):
    counts = torch.bincount(actions, minlength=len(probs)).double()
    expected = probs.double() * len(actions)
    return stats.chisquare(counts.numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("block_c", [0, 4])  # 4: three tiles of a 10-class row (reservoir path)
@pytest.mark.parametrize("eps,floor", [(0.0, 0.0), (0.0, 0.05), (0.4, 0.0)])
def test_sampled_actions_follow_the_policy(block_c, eps, floor):
    """Chi-square: kernel actions ~ ε·uniform + (1 − ε)·(softmax + f)/(1 + C·f)."""
    n, C = 20000, 10
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0, 0.2, 0.8])
    x = row.expand(n, C)  # stride-0 rows: also a non-contiguous input
    y = torch.zeros(n, dtype=torch.long)
    out = P.eps_greedy_pg_loss_fused(x, y, eps, seed=77, prob_floor=floor, block_c=block_c,
                                     rows=1024)
    q = (torch.softmax(row.double(), 0) + floor) / (1 + C * floor)
    probs = eps / C + (1 - eps) * q
    assert _chi2_pvalue(out.actions, probs) > 1e-3
    # the test has power: the same counts against the plain softmax (floor/exploration ignored)
    # or against a distribution shifted by one class are rejected
    wrong = torch.softmax(row.double(), 0).roll(1)
    assert _chi2_pvalue(out.actions, wrong) < 1e-6


def test_reference_sampler_follows_the_policy():
    n, C = 20000, 10
    row = torch.linspace(-2, 2, C)
    g = torch.Generator().manual_seed(3)
    acts = P.sample_actions(row.expand(n, C), 0.2, "sample", 0.05, g)
    q = (torch.softmax(row.double(), 0) + 0.05) / (1 + C * 0.05)
    assert _chi2_pvalue(acts, 0.2 / C + 0.8 * q) > 1e-3


def test_same_seed_same_actions(gen):
    logits, labels = make_inputs(gen, 64, 100, peak=0.0)
    a1 = eps_greedy_pg_loss(logits, labels, 0.3, seed=42).actions
    a2 = eps_greedy_pg_loss(logits, labels, 0.3, seed=42).actions
    a3 = eps_greedy_pg_loss(logits, labels, 0.3, seed=43).actions
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    b1 = eps_greedy_pg_loss(logits, labels, 0.3, generator=g1).actions
    b2 = eps_greedy_pg_loss(logits, labels, 0.3, generator=g2).actions
    b3 = eps_greedy_pg_loss(logits, labels, 0.3, generator=g1).actions  # generator advanced
    assert torch.equal(b1, b2) and not torch.equal(b1, b3)
    torch.manual_seed(5)
    c1 = eps_greedy_pg_loss(logits, labels, 0.3).actions
    torch.manual_seed(5)
    c2 = eps_greedy_pg_loss(logits, labels, 0.3).actions
    assert torch.equal(c1, c2)


# ── bad input: clear errors, and nothing launched ─────────────────────────────────────────────
@pytest.fixture
def no_launch(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a kernel was launched before the input check")
    monkeypatch.setattr(P, "_pg_fwd_triton", boom)
    monkeypatch.setattr(P, "_pg_fwd_torch", boom)


@pytest.mark.parametrize("case,exc,match", [
    (lambda x, y: (x, torch.tensor([0, 1, 10]), 0.1), ValueError, "label 10 out of range"),
    (lambda x, y: (x, torch.tensor([0, -1, 2]), 0.1), ValueError, "label -1 out of range"),
    (lambda x, y: (x, y, -0.1), ValueError, "epsilon must be in"),
    (lambda x, y: (x, y[:2], 0.1), ValueError, "labels must be"),
    (lambda x, y: (x[:, :, None], y, 0.1), ValueError, r"logits must be \[batch, classes\]"),
    (lambda x, y: (x.long(), y, 0.1), TypeError, "logits must be a float tensor"),
    (lambda x, y: (x[:0], y[:0], 0.1), ValueError, "empty batch"),
    (lambda x, y: (x, y.float(), 0.1), TypeError, "labels must be an integer tensor"),
])
def test_bad_inputs_raise_before_launch(no_launch, case, exc, match):
    x, y = torch.randn(3, 10), torch.tensor([0, 1, 2])
    with pytest.raises(exc, match=match):
        eps_greedy_pg_loss(*case(x, y))


def test_bad_options_raise(no_launch):
    x, y = torch.randn(3, 10), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="explore must be"):
        eps_greedy_pg_loss(x, y, 0.1, explore="row")
    with pytest.raises(ValueError, match="reduction must be"):
        eps_greedy_pg_loss(x, y, 0.1, reduction="avg")
    with pytest.raises(ValueError, match="action is out of range"):
        eps_greedy_pg_loss(x, y, 0.1, actions=torch.tensor([0, 1, 12]))
    with pytest.raises(ValueError, match="power of two"):
        T._pg_launch_config(3, 10, block_c=24)


def test_validate_false_skips_range_checks_safely(gen):
    """validate=False (no host sync on CUDA): an out-of-range label just never earns reward."""
    logits, labels = make_inputs(gen, 5, 10)
    bad = labels.clone()
    bad[2] = 10
    actions = labels.clone()
    out = eps_greedy_pg_loss(logits, bad, 0.0, actions=actions, validate=False)
    assert out.rewards.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="label 10 out of range"):
        eps_greedy_pg_loss(logits, bad, 0.0, actions=actions)


# ── the reference (specification) itself ──────────────────────────────────────────────────────
@pytest.mark.parametrize("prob_floor", [0.0, 1e-6, 0.05])
def test_reference_gradient_is_the_closed_form(gen, prob_floor):
    """The reference's backward in fp64 against the gradient derived by hand (no autograd)."""
    logits, labels = make_inputs(gen, 5, 7, torch.float64, peak=1.0)
    actions = torch.where(torch.arange(5) % 2 == 0, labels, (labels + 1) % 7)
    x = logits.clone().requires_grad_(True)
    P.eps_greedy_pg_loss_reference(x, labels, 0.1, actions=actions, prob_floor=prob_floor,
                                   reduction="sum").loss.backward()
    expected = pg_grad_closed_form(logits, labels, actions, prob_floor)
    assert expected[1::2].abs().max() == 0 and expected[::2].abs().max() > 0.01   # reward 0 rows: no gradient
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)


def test_reference_matches_f64_formula(gen):
    logits, labels = make_inputs(gen, 16, 12, torch.float64)
    actions = fixed_actions(gen, labels, 12)
    for f in (0.0, 0.03):
        x = logits.clone().requires_grad_(True)
        out = P.eps_greedy_pg_loss_reference(x, labels, 0.0, actions=actions, prob_floor=f)
        out.loss.backward()
        ref_loss, ref_grad = pg_loss_f64(logits, labels, actions, f)
        torch.testing.assert_close(out.loss.double(), ref_loss)
        torch.testing.assert_close(x.grad, ref_grad)


def test_op_torch_kernel_matches_triton(gen):
    """The op's plain-CPU kernel (used where Triton cannot run) agrees with the Triton kernel."""
    logits, labels = make_inputs(gen, 11, 20)
    actions = fixed_actions(gen, labels, 20)
    seed = torch.zeros(1, dtype=torch.long)
    for f in (0.0, 0.01):
        tri = P._pg_fwd_triton(logits, labels, actions, seed, 0.0, False, f, 0, 0)
        ref = P._pg_fwd_torch(logits, labels, actions, seed, 0.0, False, f)
        for a, b in zip(tri, ref):
            torch.testing.assert_close(a, b.to(a.dtype), atol=2e-5, rtol=2e-5)
        go = torch.randn(11, generator=gen)
        torch.testing.assert_close(P._pg_bwd_triton(go, logits, tri[4], actions, tri[5]),
                                   P._pg_bwd_torch(go, logits, ref[4], actions, ref[5]),
                                   atol=2e-6, rtol=2e-5)


# ── torch.library / torch.compile / dispatch ──────────────────────────────────────────────────
def test_opcheck_forward_and_backward_ops(gen):
    """opcheck with a seed tensor: the sampling op is deterministic given its seed."""
    logits, labels = make_inputs(gen, 6, 12)
    seed = torch.tensor([123], dtype=torch.long)
    x = logits.requires_grad_(True)
    torch.library.opcheck(P.pg_loss_fwd_op, (x, labels, None, seed, 0.2, False, 1e-6))
    acts = fixed_actions(gen, labels, 12)
    torch.library.opcheck(P.pg_loss_fwd_op, (x, labels, acts, seed, 0.0, True, 0.0))
    _, a, _, _, lse, coef = P.pg_loss_fwd_op(logits.detach(), labels, acts, seed, 0.0, False, 0.0)
    torch.library.opcheck(P.pg_loss_bwd_op, (torch.randn(6, generator=gen), logits.detach(), lse, a, coef))


def test_torch_compile_traces_the_op(gen):
    """fullgraph: no graph break around the fused loss; same result as eager for the same seed."""
    lin = torch.nn.Linear(8, 10)
    inp = torch.randn(16, 8, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)

    def step(inp):
        return eps_greedy_pg_loss(lin(inp), y, 0.1, seed=3, prob_floor=1e-6)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager, comp = step(inp), compiled(inp)
    assert torch.equal(eager.actions, comp.actions)
    torch.testing.assert_close(comp.loss, eager.loss)
    g_e = torch.autograd.grad(eager.loss, lin.weight)[0]
    g_c = torch.autograd.grad(comp.loss, lin.weight)[0]
    torch.testing.assert_close(g_c, g_e)


def test_backend_dispatch_and_forced_reference(monkeypatch, gen):
    assert backend("cpu") == "triton"
    calls = []
    monkeypatch.setattr(K, "eps_greedy_pg_loss_reference",
                        lambda *a, **k: calls.append(1) or P.eps_greedy_pg_loss_reference(*a, **k))
    monkeypatch.setenv("AERL_FAST_KERNELS", "reference")
    assert backend("cpu") == "reference"
    logits, labels = make_inputs(gen, 4, 10)
    eps_greedy_pg_loss(logits, labels, 0.1, seed=1)
    assert calls == [1]
