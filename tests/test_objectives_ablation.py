"""The ablation objectives (rl-expected, prob, rl-baseline): exact values against float64 formulas,
unbiasedness and variance of the sampled estimators, and training through the CLI.

Unbiasedness test: over n independent draws, each element j of the mean sampled gradient has
z_j = (mean_j − expected_j) / (s_j / √n) ~ t_{n−1} ≈ N(0, 1), s_j the sample standard deviation.
The test fails when max_j |z_j| exceeds the Bonferroni bound over the K elements at family-wise
error α = 1e-3, z* = Φ⁻¹(1 − α / 2K), whatever the correlation between elements.  The normal
approximation needs every outcome to be seen often: bounded logits keep each action's probability
≥ 0.017 and n·p ≥ 40 (an action drawn 0.3 times in expectation leaves s_j blind to its jump).
"""
import json
import math
from statistics import NormalDist

import pytest
import torch

from aerl_fast import reproduce
from aerl_fast import train as train_mod

from aerl_fast.errors import ConfigError
from aerl_fast.kernels import eps_greedy_pg_loss
from aerl_fast.kernels.pg_loss import draw_actions
from aerl_fast.objectives import OBJECTIVES, ObjectiveConfig, objective_loss, train_step
from kill_resume import assert_same_weights, crash_and_resume

ALPHA = 1e-3


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny ops: one thread avoids pool wake-ups on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_logits(gen, B, C, scale=1.0, peak=1.0):
    """float64 logits uniform in [−scale, scale] plus `peak` at the label (a partly trained
    policy), and the labels.  Bounded, so that no action is too rare to be drawn in a test."""
    labels = torch.randint(0, C, (B,), generator=gen)
    logits = scale * (2 * torch.rand(B, C, generator=gen, dtype=torch.float64) - 1)
    logits[torch.arange(B), labels] += peak
    return logits, labels


def loss_grad(cfg, logits, labels, gen=None):
    x = logits.clone().requires_grad_(True)
    loss, _ = objective_loss(cfg, x, labels, gen)
    return torch.autograd.grad(loss, x)[0]


def sampled_grads(cfg, logits, labels, n, gen):
    """[n, B, C]: ∂(batch loss)/∂logits for n independent draws.  With a coin per sample the rows
    are independent, so n draws are one call on n stacked copies of the batch (the batch mean of
    the baseline is unchanged by stacking); a coin per batch needs one call per draw."""
    B, C = logits.shape
    if cfg.explore == "sample":
        x = logits.repeat(n, 1).requires_grad_(True)
        loss, _ = objective_loss(cfg, x, labels.repeat(n), gen)
        return n * torch.autograd.grad(loss, x)[0].reshape(n, B, C)
    return torch.stack([loss_grad(cfg, logits, labels, gen) for _ in range(n)])


def max_z(draws, expected):
    """max_j |z_j| of the mean of `draws` [n, ...] against `expected` (module docstring)."""
    n = draws.shape[0]
    se = draws.std(0) / math.sqrt(n)
    diff = (draws.mean(0) - expected).abs()
    constant = se == 0
    assert bool((diff[constant] < 1e-12).all()), "an element that never varies differs"
    return float((diff[~constant] / se[~constant]).max())


def z_bound(k):
    return NormalDist().inv_cdf(1 - ALPHA / (2 * k))


def closed_form_grad(logits, labels, eps):
    """∇ of −mean((1−ε)·π_y + (ε/C)·log π_y) in float64, written from the definition."""
    x = logits.detach().double().requires_grad_(True)
    log_p = torch.log_softmax(x, 1)[torch.arange(len(x)), labels]
    loss = -((1 - eps) * log_p.exp() + eps / x.shape[1] * log_p).mean()
    return torch.autograd.grad(loss, x)[0]


def cross_entropy_grad(logits, labels):
    """∇ of −mean(log π_y): the wrong formula the tests must reject."""
    x = logits.detach().double().requires_grad_(True)
    loss = -torch.log_softmax(x, 1)[torch.arange(len(x)), labels].mean()
    return torch.autograd.grad(loss, x)[0]


# ── exact objectives against float64 formulas ─────────────────────────────────────────────────
@pytest.mark.parametrize("B,C", [(1, 2), (13, 7), (9, 101)])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_rl_expected_is_the_closed_form(B, C, eps):
    gen = torch.Generator().manual_seed(B * C)
    logits, labels = make_logits(gen, B, C)
    cfg = ObjectiveConfig("rl-expected", explore_eps=eps)
    torch.testing.assert_close(loss_grad(cfg, logits, labels), closed_form_grad(logits, labels, eps),
                               rtol=1e-10, atol=1e-14)
    loss, reward = objective_loss(cfg, logits, labels)
    p = torch.softmax(logits, 1)[torch.arange(B), labels]
    q = (1 - eps) * p + eps / C
    torch.testing.assert_close(loss, -(q * p.log()).mean())  # rl's loss averaged over the draw
    torch.testing.assert_close(reward, q.mean())
    # the explore mode changes the draw, not its expectation
    cfg_b = ObjectiveConfig("rl-expected", explore_eps=eps, explore="batch")
    torch.testing.assert_close(loss_grad(cfg_b, logits, labels), loss_grad(cfg, logits, labels))


@pytest.mark.parametrize("floor", [1e-6, 0.02])
def test_rl_expected_with_floor_uses_rls_floored_probabilities(floor):
    """−sg[q(y)]·log(q_f(y) + f): q_f = (softmax + f)/(1 + C·f), q = (1−ε)·q_f + ε/C."""
    gen = torch.Generator().manual_seed(3)
    logits, labels = make_logits(gen, 11, 5)
    eps = 0.1
    x = logits.clone().requires_grad_(True)
    qf = (torch.softmax(x, 1) + floor) / (1 + 5 * floor)
    qf_y = qf[torch.arange(11), labels]
    ref = -(((1 - eps) * qf_y + eps / 5).detach() * torch.log(qf_y + floor)).mean()
    ref_grad = torch.autograd.grad(ref, x)[0]
    cfg = ObjectiveConfig("rl-expected", explore_eps=eps, prob_floor=floor)
    loss, _ = objective_loss(cfg, logits, labels)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(loss_grad(cfg, logits, labels), ref_grad)


@pytest.mark.parametrize("floor", [0.0, 0.02])
def test_prob_is_minus_the_expected_reward(floor):
    gen = torch.Generator().manual_seed(4)
    logits, labels = make_logits(gen, 9, 6)
    x = logits.clone().requires_grad_(True)
    p_y = ((torch.softmax(x, 1) + floor) / (1 + 6 * floor))[torch.arange(9), labels]
    ref_grad = torch.autograd.grad(-p_y.mean(), x)[0]
    cfg = ObjectiveConfig("prob", explore_eps=0.3, prob_floor=floor)  # prob ignores exploration
    loss, reward = objective_loss(cfg, logits, labels)
    torch.testing.assert_close(loss, -p_y.mean().detach())
    torch.testing.assert_close(reward, p_y.mean().detach())
    torch.testing.assert_close(loss_grad(cfg, logits, labels), ref_grad)
    if floor == 0:  # ε = 0 of rl-expected, and ∇π_y = π_y·∇log π_y
        torch.testing.assert_close(loss_grad(cfg, logits, labels), closed_form_grad(logits, labels, 0.0))


def test_objective_properties_and_choice_list():
    assert OBJECTIVES == ("sl", "sl-adv", "rl", "rl-adv", "rl-expected", "rl-expected-adv", "prob",
                          "prob-adv", "rl-baseline", "rl-baseline-adv")
    for kind in OBJECTIVES:
        cfg = ObjectiveConfig(kind)
        assert cfg.is_adv == kind.endswith("-adv") and cfg.base == kind.removesuffix("-adv")
        assert cfg.is_rl == (cfg.base != "sl")
        assert cfg.samples_actions == (cfg.base in ("rl", "rl-baseline"))
    with pytest.raises(ValueError, match="unknown objective 'rl-exp'"):
        ObjectiveConfig("rl-exp")
    with pytest.raises(ValueError, match="unknown objective 'prob-adv-adv'"):
        ObjectiveConfig("prob-adv-adv")


def test_only_sampled_objectives_draw_from_the_generator():
    """rl-expected and prob are deterministic: they leave the exploration generator untouched."""
    gen = torch.Generator().manual_seed(8)
    logits, labels = make_logits(gen, 5, 4)
    for kind in ("rl-expected", "prob", "rl-baseline"):
        g = torch.Generator().manual_seed(1)
        state = g.get_state()
        objective_loss(ObjectiveConfig(kind), logits, labels, g)
        drew = not torch.equal(g.get_state(), state)
        assert drew == ObjectiveConfig(kind).samples_actions, kind


# ── unbiasedness: mean of sampled gradients = the exact expectation ──────────────────────────
CASES = [(explore, eps) for explore in ("sample", "batch") for eps in (0.0, 0.1, 1.0)]


@pytest.mark.parametrize("explore,eps", CASES)
def test_rl_and_rl_baseline_are_unbiased_for_rl_expected(explore, eps):
    """E[∇ rl] = E[∇ rl-baseline] = ∇ rl-expected; −log π_y alone (cross-entropy) is rejected by
    the same statistic."""
    gen = torch.Generator().manual_seed(100 + int(eps * 10) + (explore == "batch"))
    B, C, n = (13, 7, 20000) if explore == "sample" else (9, 5, 2000)  # per batch: a call per draw
    logits, labels = make_logits(gen, B, C)
    expected = loss_grad(ObjectiveConfig("rl-expected", explore_eps=eps), logits, labels)
    bound = z_bound(B * C)
    for kind in ("rl", "rl-baseline"):
        cfg = ObjectiveConfig(kind, explore_eps=eps, explore=explore)
        draws = sampled_grads(cfg, logits, labels, n, gen)
        z = max_z(draws, expected)
        assert z < bound, (kind, z, bound)
        assert max_z(draws, cross_entropy_grad(logits, labels)) > bound, kind


@pytest.mark.parametrize("floor", [1e-6, 0.02])
def test_rl_with_floor_is_unbiased_for_rl_expected(floor):
    gen = torch.Generator().manual_seed(7)
    logits, labels = make_logits(gen, 11, 5)
    expected = loss_grad(ObjectiveConfig("rl-expected", explore_eps=0.1, prob_floor=floor), logits, labels)
    draws = sampled_grads(ObjectiveConfig("rl", explore_eps=0.1, prob_floor=floor), logits, labels, 20000, gen)
    assert max_z(draws, expected) < z_bound(55)
    unfloored = loss_grad(ObjectiveConfig("rl-expected", explore_eps=0.1), logits, labels)
    if floor == 0.02:  # the floor matters at this size, and the statistic sees it
        assert max_z(draws, unfloored) > z_bound(55)


def test_baseline_on_explored_rows_would_bias_the_gradient():
    """Why the baseline skips explored rows: shifting every row's reward adds b·(1/C − π) per
    explored row to the expected gradient, which the unbiasedness statistic detects."""
    gen = torch.Generator().manual_seed(9)
    B, C, n = 13, 7, 20000
    logits, labels = make_logits(gen, B, C)
    b = float(torch.softmax(logits, 1)[torch.arange(B), labels].mean())
    x = logits.repeat(n, 1).requires_grad_(True)
    actions, _ = draw_actions(x.detach(), 1.0, "sample", 0.0, gen)
    loss = eps_greedy_pg_loss(x, labels.repeat(n), 1.0, actions=actions, baseline=b).loss  # every row
    draws = n * torch.autograd.grad(loss, x)[0].reshape(n, B, C)
    expected = loss_grad(ObjectiveConfig("rl-expected", explore_eps=1.0), logits, labels)
    assert max_z(draws, expected) > z_bound(B * C)
    p = torch.softmax(logits, 1)
    assert max_z(draws, expected + b * (1.0 / C - p) / B) < z_bound(B * C)  # the predicted bias


# ── variance of the sampled estimators ────────────────────────────────────────────────────────
def exact_variance(logits, labels, eps, baseline):
    """Σ_j Var[∂L/∂z_j] over the draw (coin per sample, rows independent), by enumerating the coin
    and the action in float64: g = −A·(e_a − π)/B with A = r − b on policy rows, r on explored."""
    B, C = logits.shape
    p = torch.softmax(logits.double(), 1)
    eye = torch.eye(C, dtype=torch.float64)
    total = 0.0
    for i in range(B):
        r = (torch.arange(C) == labels[i]).double()
        sq_norm = ((eye - p[i]) ** 2).sum(1)  # |e_a − π|² for each action a
        second = ((1 - eps) * p[i] * (r - baseline) ** 2 + eps / C * r ** 2) @ sq_norm
        q_y = (1 - eps) * p[i, labels[i]] + eps / C
        mean_sq = (q_y * (eye[labels[i]] - p[i])).pow(2).sum()
        total += float(second - mean_sq)
    return total / B ** 2


def measured_variance(draws):
    """(Σ_j sample variance, its standard error): d_k = |G_k − Ḡ|², mean and CLT error of d."""
    n = draws.shape[0]
    d = (draws - draws.mean(0)).pow(2).flatten(1).sum(1) * n / (n - 1)
    return float(d.mean()), float(d.std() / math.sqrt(n))


@pytest.mark.parametrize("regime", ["near-uniform", "confident"])
def test_rl_baseline_variance_against_exact_enumeration(regime):
    """The batch-mean baseline b = mean π_y is the variance-optimal constant for a near-uniform
    policy (the start of training; exact ratio 1 − 1/(C−1) = 0.5 at C = 3), but on a confident
    policy it raises the variance: for a wrong action |e_a − π|² is large and its weight goes
    from 0 to b², while the right action's small |e_y − π|² gains little."""
    gen = torch.Generator().manual_seed(11)
    B, eps, n = 13, 0.1, 20000
    if regime == "near-uniform":
        logits, labels = make_logits(gen, B, 3, scale=0.2, peak=0.0)
    else:
        logits, labels = make_logits(gen, B, 7, scale=1.0, peak=5.0)
    b = float(torch.softmax(logits, 1)[torch.arange(B), labels].mean())
    var = {}
    for kind, baseline in (("rl", 0.0), ("rl-baseline", b)):
        draws = sampled_grads(ObjectiveConfig(kind, explore_eps=eps), logits, labels, n, gen)
        got, se = measured_variance(draws)
        exact = exact_variance(logits, labels, eps, baseline)
        assert abs(got - exact) < 5 * se, (kind, got, exact, se)  # 5σ of the estimate's CLT error
        var[kind] = got
    ratio = var["rl-baseline"] / var["rl"]
    if regime == "near-uniform":
        assert ratio < 0.7, ratio  # exact ≈ 0.55 (the ε-explored rows keep their variance)
    else:
        assert ratio > 10.0, ratio  # exact ≈ 160 (π_y ≈ 0.96, b ≈ 0.95)


# ── the adversarial variants and the training CLI ─────────────────────────────────────────────
@pytest.mark.parametrize("kind", ["prob-adv", "rl-expected-adv"])
def test_adversarial_variant_uses_the_objectives_own_gradient(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)).double()
    x = torch.rand(10, 3, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    cfg = ObjectiveConfig(kind, explore_eps=0.2, adv_eps=0.05, adv_beta=0.7)
    out = train_step(model, x, y, cfg, adv_active=True)
    grads = [p.grad.clone() for p in model.parameters()]

    eps = 0.0 if kind == "prob-adv" else 0.2  # independent: the closed forms, in float64

    def closed(inp):
        log_p = torch.log_softmax(model(inp), 1)[torch.arange(10), y]
        return -((1 - eps) * log_p.exp() + eps / 4 * log_p).mean()
    xr = x.clone().requires_grad_(True)
    gx, = torch.autograd.grad(closed(xr), xr)
    total = closed(x) + 0.7 * closed((x + 0.05 * gx.sign()).clamp(0, 1))
    for a, b in zip(grads, torch.autograd.grad(total, list(model.parameters()))):
        torch.testing.assert_close(a, b)
    if kind == "prob-adv":
        torch.testing.assert_close(out.loss, total.detach())


# 2,000 images for 3 epochs: on 500 the sampled objectives often sit at one class for 5 epochs
TINY = ["--dataset", "shapes", "--model", "alicnn", "--width", "0.25", "--train-subset", "2000",
        "--batch-size", "32", "--epochs", "3", "--no-progress", "--eval-batch-size", "500"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["rl-expected", "prob", "rl-baseline"])
def test_trains_above_chance_and_resumes_exactly(tmp_path, monkeypatch, objective):
    """Test accuracy on the 2,000 test images above chance (0.1) by more than
    Φ⁻¹(1 − 1e-6)·√(0.1·0.9/2000) = 0.032; killed mid-epoch and resumed, the same weights."""
    args = TINY + ["--objective", objective, "--checkpoint-minutes", "1e-9"]
    ref = tmp_path / "ref"
    summary = train_mod.main(args + ["--out", str(ref)])
    assert summary["test_acc"] > 0.1 + NormalDist().inv_cdf(1 - 1e-6) * math.sqrt(0.09 / 2000)
    log = [json.loads(ln) for ln in (ref / "log.jsonl").read_text().splitlines()]
    assert all(0 < ln["train_reward"] < 1 for ln in log)  # realised or expected reward

    crashed = tmp_path / "crashed"
    state = crash_and_resume(monkeypatch, args, crashed)  # 57 batches per epoch, a checkpoint after each
    assert state["epoch"] == 0 and 0 < state["step"] < 57
    assert_same_weights(ref, crashed)


# ── the reproduce presets ─────────────────────────────────────────────────────────────────────
ABLATION = {"sl", "rl", "rl-expected", "prob", "rl-baseline"}


@pytest.mark.parametrize("name,dataset", [("ablation", "shapes"), ("ablation-cifar10", "cifar10")])
def test_ablation_presets_validate(name, dataset):
    cells = reproduce.build_cells(reproduce.load_matrix(name), None)
    assert {c.objective for c in cells} == ABLATION and {c.seed for c in cells} == {0, 1}
    assert {c.ds for c in cells} == {dataset} and len(cells) == 10
    configs = {(c.objective, c.seed): c.config for c in cells}
    assert all(c.options.save_every > 0 for c in cells)  # accuracy over epochs
    if dataset == "cifar10":  # the study's settings: SL's and RL's presets, the 6-layer CNN
        sl = configs[("sl", 0)]
        assert (sl.model, sl.width, sl.lr, sl.epochs, sl.schedule) == ("cnn6", 1.0, 2e-4, 100, "warmup-linear")
        for obj in ABLATION - {"sl"}:
            cfg = configs[(obj, 0)]
            assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.explore_eps, cfg.explore, cfg.prob_floor) == \
                (1e-4, 600, 256, 0.1, "batch", 1e-6), obj
        assert reproduce.eval_config(reproduce.load_matrix(name)).clamp is False


def test_matrix_with_a_misspelt_objective_names_the_choices(tmp_path):
    m = reproduce.load_matrix("ablation")
    m["objectives"] = ["sl", "rl-expectd"]
    with pytest.raises(ConfigError, match="cell shapes-alicnnx0.25-rl-expectd-s0: --objective must be one of "
                                          "sl, sl-adv, rl, rl-adv, rl-expected, rl-expected-adv"):
        reproduce.build_cells(m, None)
