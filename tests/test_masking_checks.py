"""aerl_fast.analysis.masking: every check on both sides of its threshold, and the gradient counts on
hand-built models whose input gradients are known exactly (zero, partly zero, infinite, underflowing
only in half precision).  No trained fixture: each case is built to trigger a check or to not."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from aerl_fast.analysis import masking as mk


class Gated(nn.Module):
    """logits = relu(x − 0.5)·W + where(x₀ = 0, √x₀, 0)·u: a sample whose pixels are all below 0.5 has
    an input gradient that is exactly zero, one with a pixel above 0.5 is zero everywhere else, and
    one whose first pixel is 0 has an infinite gradient there."""

    def __init__(self, d, classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(d, classes, generator=g))
        self.u = nn.Parameter(torch.tensor([1.0, -2.0, 0.5][:classes]))

    def forward(self, x):
        f = x.flatten(1)
        first = f[:, :1]
        root = torch.where(first == 0, first.sqrt(), torch.zeros_like(first))
        return torch.relu(f - 0.5) @ self.w + root * self.u


def gated_batch():
    """Rows 0, 3, 4: all pixels < 0.5 (zero gradient); 1, 5, 6: one pixel at 0.9 (gradient zero on
    every other pixel); 2: first pixel 0 (infinite gradient)."""
    g = torch.Generator().manual_seed(1)
    x = 0.05 + 0.4 * torch.rand(7, 1, 3, 4, generator=g)
    x[:, 0, 0, 0] = 0.3
    for r in (1, 5, 6):
        x[r, 0, 1, 2] = 0.9
    x[2, 0, 0, 0] = 0.0
    return x, torch.tensor([0, 1, 2, 0, 1, 2, 0])


def per_row_gradients(model, x, y):
    """Each sample's input gradient of its own cross-entropy, one sample at a time, in float64."""
    m = model.double()
    rows = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].double().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(m(xi), y[i:i + 1]), xi)
        rows.append(g.flatten())
    model.float()
    return torch.stack(rows)


def test_the_zero_count_counts_rows_that_are_zero_everywhere_not_rows_with_a_zero():
    x, y = gated_batch()
    model = Gated(12)
    g = per_row_gradients(model, x, y)
    finite = torch.isfinite(g).all(1)
    assert finite.tolist() == [True, True, False, True, True, True, True]
    assert (g[finite] == 0).any(1).all()                                  # every finite row has zeros
    expected = int((finite & (g.abs().amax(1) == 0)).sum())
    assert expected == 3
    for batch_size in (7, 3, 1):
        assert mk.zero_gradient_count(model, x, y, batch_size=batch_size) == expected


def test_gradient_health_counts_zero_non_finite_and_saturated_rows():
    x, y = gated_batch()
    h = mk.gradient_health(Gated(12), x, y, batch_size=3)
    assert h == {"n": 7, "zero": 3, "nonfinite": 1, "saturated": 0, "precision": "float32", "loss": "ce"}


class Scaled(nn.Module):
    """logits = s·(the first three pixels): at s = 200 a one-hot image has a softmax of exactly 1."""

    def __init__(self, s=200.0):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self, x):
        return self.s * x.flatten(1)[:, :3]


def test_saturation_is_the_labels_probability_being_exactly_one():
    x = torch.zeros(5, 1, 1, 4)
    x[0, 0, 0, :3] = torch.tensor([1.0, 0.0, 0.0])      # label 0, p = 1 exactly: saturated
    x[1, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.0])      # label 1: saturated
    x[2, 0, 0, :3] = torch.tensor([1.0, 0.0, 0.0])      # label 1, p(label) = 0: confidently wrong, not saturated
    x[3, 0, 0, :3] = torch.tensor([0.02, 0.01, 0.0])    # label 0 at p ~ 0.6
    x[4, 0, 0, :3] = torch.tensor([0.0, 0.0, 1.0])      # label 2: saturated
    y = torch.tensor([0, 1, 1, 0, 2])
    p = torch.softmax(Scaled()(x), 1).gather(1, y[:, None]).squeeze(1)
    assert (p == 1).tolist() == [True, True, False, False, True]
    h = mk.gradient_health(Scaled(), x, y, batch_size=2)
    assert (h["saturated"], h["zero"], h["nonfinite"]) == (3, 3, 0)  # CE's gradient at p = 1 is exactly 0
    assert mk.gradient_health(Scaled(), x, y, loss="margin")["zero"] == 0  # the margin's is not
    assert mk.zero_gradient_count(Scaled(), x, y, loss="ce") == 3
    assert mk.zero_gradient_count(Scaled(), x, y, loss="margin") == 0


def test_gradient_health_measures_in_the_attacks_precision():
    """Weights of 1e-9 give input gradients of ~1e-9: representable in fp32, zero in fp16."""
    lin = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        lin[1].weight.copy_(1e-9 * torch.arange(1.0, 4.0)[:, None].expand(3, 8))   # one weight per class
        lin[1].bias.copy_(torch.tensor([0.0, 0.3, -0.2]))
    x, y = torch.rand(4, 2, 2, 2), torch.tensor([0, 1, 2, 0])
    full = mk.gradient_health(lin, x, y)
    half = mk.gradient_health(lin, x, y, amp_dtype=torch.float16)
    assert (full["zero"], full["precision"]) == (0, "float32")
    assert (half["zero"], half["precision"]) == (4, "float16")


@pytest.mark.parametrize("zero, n, flagged", [(0, 10, False), (1, 10, True), (10, 10, True), (0, 0, False)])
def test_zero_gradient_flag_fires_on_a_single_zero_row(zero, n, flagged):
    f = mk.check_zero_gradients(zero, n)
    assert f.flagged is flagged and f.check == "zero_gradients"
    assert f"{zero} of {n} samples" in f.observed
    assert ("try --loss margin" in f.observed) is flagged
    assert "try --loss margin" not in mk.check_zero_gradients(zero, n, loss="margin").observed
    if n:
        assert f"({zero / n:.1%})" in f.observed


@pytest.mark.parametrize("best, flagged", [(0.28, True), (0.295, False), (0.30, False), (0.40, False)])
def test_transfer_flags_only_a_source_stronger_than_white_box_by_the_tolerance(best, flagged):
    """White-box 30%, tolerance 1 point: a transfer accuracy of 29.5% is within it, 28% is not."""
    col = {"target": 0.10, "a": 0.5, "b": best}   # the target's own entry (10%) is not a transfer
    f = mk.check_transfer("target", 0.30, col)
    assert f.flagged is flagged
    assert f"crafted on b) leaves {best:.1%} vs 30.0% white-box" in f.observed
    assert ("weaker attack" in f.observed) is flagged
    assert mk.check_transfer("target", 0.30, col, tol=0.0).flagged is (best < 0.30)


def test_transfer_needs_another_model():
    assert mk.check_transfer("t", 0.3, {"t": 0.1}).flagged is None
    assert mk.check_transfer("t", 0.3, {}).flagged is None


@pytest.mark.parametrize("accs, flagged", [
    ([0.40, 0.42, 0.10], True),     # +2 points at eps 0.5: beyond the 1-point tolerance
    ([0.40, 0.405, 0.10], False),   # +0.5 point: noise
    ([0.40, 0.30, 0.10], False),
])
def test_epsilon_curve_flags_a_rise_beyond_the_tolerance(accs, flagged):
    f = mk.check_epsilon_curve([1.0, 0.5, 0.25], accs[::-1], None, None)   # given unsorted: sorted by eps
    assert f.flagged is flagged
    assert f.observed.startswith(f"accuracy {accs[0]:.1%} (eps 0.25) -> {accs[1]:.1%} (eps 0.5)")
    assert ("rises from 40.0% at eps 0.25" in f.observed) is flagged


@pytest.mark.parametrize("large_acc, flagged", [(0.0, False), (0.02, False), (0.03, True)])
def test_epsilon_curve_flags_survivors_of_the_box_covering_radius(large_acc, flagged):
    f = mk.check_epsilon_curve([0.25, 0.5], [0.4, 0.1], 55.4, large_acc, 50)
    assert f.flagged is flagged
    assert f"{large_acc:.1%} of 50 clean-correct samples survive PGD at eps 55.4" in f.observed
    alone = mk.check_epsilon_curve([0.25], [0.4], 55.4, large_acc, 50)   # one radius and the large one
    assert alone.flagged is flagged


def test_epsilon_curve_not_run_without_a_curve():
    f = mk.check_epsilon_curve([0.5], [0.4], None, None)
    assert f.flagged is None and "needs several eps" in f.observed
    assert mk.check_epsilon_curve([], [], None, None).flagged is None


def test_zero_gradient_note_on_an_empty_set_and_the_epsilon_curve_at_its_tolerance():
    assert mk.check_zero_gradients(0, 0).observed.startswith("0 of 0 samples (0.0%) have")
    exact = mk.check_epsilon_curve([1.0, 2.0], [0.25, 0.5], None, None, tol=0.25)   # a rise of exactly tol
    assert exact.flagged is False
    assert mk.check_epsilon_curve([1.0, 2.0], [0.25, 0.5], None, None, tol=0.125).flagged is True
    assert "0.0% of 0 clean-correct samples" in mk.check_epsilon_curve([], [], 8.0, 0.0).observed


def test_large_epsilon_reaches_across_the_box():
    assert mk.large_epsilon("linf", (3, 32, 32)) == 1.0
    assert mk.large_epsilon("l2", (3, 32, 32)) == pytest.approx(math.sqrt(3072))
    assert mk.large_epsilon("l2", (1, 2, 2)) == 2.0


class FarBoundary(nn.Module):
    """Two classes, class 1 once the pixel sum passes 0.9·d: from the dark images below, the
    boundary lies 1.7 (L2) or 0.85 (L-inf per pixel) away, more than 5 steps of a tenth of the box
    radius cover, less than 20.  `quantise`: round(x·3)/3 first, a zero gradient everywhere."""

    def __init__(self, quantise=False):
        super().__init__()
        self.quantise = quantise
        self.k = nn.Parameter(torch.tensor(4.0))

    def forward(self, x):
        if self.quantise:
            x = torch.round(x * 3) / 3
        s = x.flatten(1).sum(1)
        d = x[0].numel()
        return torch.stack([torch.zeros_like(s), self.k * (s - 0.9 * d)], 1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_large_epsilon_attack_breaks_an_honest_model_and_not_a_masked_one(norm):
    x = torch.full((5, 1, 2, 2), 0.05)
    x[1] = x[4] = 0.95                            # class 1 already: clean-misclassified for label 0
    y = torch.zeros(5, dtype=torch.long)
    assert mk.large_epsilon_accuracy(FarBoundary(), x, y, norm=norm, steps=1, batch_size=2) == 0.0
    # the masked model keeps rows 0, 2, 3; rows 1 and 4 count as broken (misclassified at the start)
    assert mk.large_epsilon_accuracy(FarBoundary(True), x, y, norm=norm, steps=1, batch_size=2) == 0.6


@pytest.mark.parametrize("steps, clamp", [(3, True), (50, False)])
def test_large_epsilon_attack_is_early_stopped_pgd_from_the_clean_point(monkeypatch, steps, clamp):
    """The box-covering attack: the caller's norm and clamp, at least 20 steps of a tenth of the
    radius, no random start, a sample counts as broken the first time any iterate fools the model."""
    import aerl_fast.attacks as attacks
    calls, real = [], attacks.pgd
    monkeypatch.setattr(attacks, "pgd", lambda *a, **k: calls.append(k) or real(*a, **k))
    x, y = torch.full((5, 2, 2, 2), 0.05), torch.zeros(5, dtype=torch.long)
    mk.large_epsilon_accuracy(FarBoundary(), x, y, norm="l2", steps=steps, clamp=clamp, loss="margin", batch_size=3)
    assert len(calls) == 2   # batches of 3 and 2
    for k in calls:
        assert (k["norm"], k["steps"], k["random_start"], k["early_stop"], k["clamp"], k["loss"]) == \
            ("l2", max(20, steps), False, True, clamp, "margin")
        assert k["eps"] == pytest.approx(math.sqrt(8)) and k["step"] == pytest.approx(math.sqrt(8) / 10)
    calls.clear()
    mk.large_epsilon_accuracy(FarBoundary(), x, y, norm="linf", steps=steps)
    assert (calls[0]["clamp"], calls[0]["loss"], calls[0]["eps"], calls[0]["norm"]) == (True, "ce", 1.0, "linf")


@pytest.mark.parametrize("quantise, expected", [(False, 0.0), (True, 1.0)])
def test_large_epsilon_accuracy_of_a_single_sample(quantise, expected):
    x, y = torch.full((1, 1, 2, 2), 0.05), torch.zeros(1, dtype=torch.long)
    assert mk.large_epsilon_accuracy(FarBoundary(quantise), x, y, norm="l2", steps=1) == expected


def test_gradient_health_runs_in_fp32_unless_asked_for_lower_precision():
    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.autocast = nn.Linear(4, 3), []

        def forward(self, x):
            self.autocast.append(torch.is_autocast_enabled(x.device.type))
            return self.lin(x.flatten(1))

    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2])
    spy = Spy()
    mk.gradient_health(spy, x, y)
    mk.gradient_health(spy, x, y, amp_dtype=torch.bfloat16)
    assert spy.autocast == [False, True]


@pytest.mark.parametrize("square, flagged", [(0.28, True), (0.295, False), (0.30, False), (0.5, False)])
def test_gradient_free_flags_only_square_beating_the_gradient_attack_by_the_tolerance(square, flagged):
    f = mk.check_gradient_free(square, 0.30, n=40)
    assert f.flagged is flagged
    assert f.observed == f"Square (gradient-free) leaves {square:.1%} vs 30.0% for the gradient attack on the same 40 samples"
    assert mk.check_gradient_free(square, 0.30, n=40, tol=0.0).flagged is (square < 0.30)


def test_gradient_free_not_run_says_why():
    assert mk.check_gradient_free(None, 0.3, why_not="no pyautoattack").observed == "no pyautoattack"
    f = mk.check_gradient_free(0.2, None)
    assert f.flagged is None and f.observed == "Square attack not run"


@pytest.mark.parametrize("zero, nonfinite, threshold, flagged", [
    (0, 0, 2, False), (1, 0, 2, False), (2, 0, 2, True), (0, 2, 2, True), (1, 1, 2, True), (0, 1, 2, False)])
def test_gradients_flag_counts_zero_and_non_finite_rows_against_the_threshold(zero, nonfinite, threshold, flagged):
    h = {"n": 100, "zero": zero, "nonfinite": nonfinite, "saturated": 0, "precision": "float32", "loss": "ce"}
    f = mk.check_gradients(h, threshold)
    assert f.flagged is flagged and f.numbers == dict(h, threshold=threshold)  # metrics.json keeps the counts
    assert f.observed.startswith(f"{zero} zero and {nonfinite} non-finite input gradients of the ce loss in float32 "
                                 "among 100 samples")
    assert ("cannot move these points" in f.observed) is flagged


@pytest.mark.parametrize("saturated, n, flagged", [(50, 100, False), (51, 100, True), (0, 100, False),
                                                    (100, 100, True), (1, 1, True), (0, 0, False)])
def test_saturation_flags_more_than_half(saturated, n, flagged):
    f = mk.check_saturation({"n": n, "saturated": saturated})
    assert f.flagged is flagged
    assert f.numbers == {"saturated": saturated, "n": n, "max_share": 0.5}
    assert f.observed.startswith(f"{saturated / max(1, n):.0%} of the samples")
    assert mk.check_saturation({"n": 100, "saturated": 30}, max_share=0.25).flagged is True


@pytest.mark.parametrize("max_diff, flagged", [(0.0, False), (1e-5, False), (2e-5, True), (0.3, True)])
def test_randomness_flags_passes_that_differ_beyond_rounding(max_diff, flagged):
    f = mk.check_randomness(0, max_diff, 64)
    assert f.flagged is flagged
    assert f.numbers == {"disagree": 0, "max_diff": max_diff, "n": 64}
    assert f.observed.startswith("two forward passes of the same 64 images change 0 predictions")
    assert ("(EOT)" in f.observed) is flagged


@pytest.mark.parametrize("last, flagged", [(0.0, False), (0.01, False), (0.011, True), (0.5, True)])
def test_epsilon_to_zero_flags_the_last_radius_above_one_percent(last, flagged):
    """Only the box-covering radius (the last) decides; the curve before it may be anything."""
    f = mk.check_epsilon_to_zero([0.5, 1.0, 55.4], [0.0, 0.3, last], 0.7)
    assert f.flagged is flagged
    assert f.observed.startswith(f"accuracy 0.0% (eps 0.5), 30.0% (eps 1), {100 * last:.1f}% (eps 55.4); "
                                 "median minimal adversarial distance 0.7")
    assert f.numbers == {"radii": [0.5, 1.0, 55.4], "acc": [0.0, 0.3, last], "median_min_distance": 0.7,
                         "tol": 0.01}
    assert ("reaches every image" in f.observed) is flagged
    assert "distance n/a" in mk.check_epsilon_to_zero([1.0], [last], None).observed


def test_flag_labels_and_summary_name_only_what_fired():
    fired, quiet, skipped = (mk.MaskingFlag("a", True, ""), mk.MaskingFlag("b", False, ""),
                             mk.MaskingFlag("c", None, "why"))
    assert [f.label for f in (fired, quiet, skipped)] == ["FLAG", "ok", "not run"]
    assert mk.summarize([fired, quiet, skipped, mk.MaskingFlag("d", True, "")]) == "a, d"
    assert mk.summarize([quiet, skipped]) == "none"
    assert skipped.to_dict() == {"check": "c", "flagged": None, "observed": "why", "numbers": {}}


H = {"n": 100, "zero": 3, "nonfinite": 1, "saturated": 60, "precision": "bfloat16", "loss": "margin"}
# every check's report, word for word (results.md prints it), where it fires, where it does not, and
# where it cannot run
REPORTS = [
    (lambda: mk.check_zero_gradients(3, 10), "zero_gradients", True,
     "3 of 10 samples (30.0%) have an exactly zero input gradient of the ce loss at the clean image (saturated "
     "softmax: CE-based attacks cannot move them; try --loss margin)"),
    (lambda: mk.check_zero_gradients(0, 10, "margin"), "zero_gradients", False,
     "0 of 10 samples (0.0%) have an exactly zero input gradient of the margin loss at the clean image"),
    (lambda: mk.check_transfer("t", 0.3, {"t": 0.3, "s": 0.2}), "transfer", True,
     "strongest transfer (crafted on s) leaves 20.0% vs 30.0% white-box: the model's own gradients are the "
     "weaker attack"),
    (lambda: mk.check_transfer("t", 0.3, {"t": 0.3, "s": 0.4}), "transfer", False,
     "strongest transfer (crafted on s) leaves 40.0% vs 30.0% white-box"),
    (lambda: mk.check_transfer("t", 0.3, {"t": 0.3}), "transfer", None, "needs at least two models (--transfer)"),
    (lambda: mk.check_epsilon_curve([0.5, 1.0], [0.2, 0.3], 2.0, 0.0, 8), "epsilon_curve", True,
     "accuracy 20.0% (eps 0.5) -> 30.0% (eps 1); rises from 20.0% at eps 0.5 to 30.0% at eps 1; 0.0% of 8 "
     "clean-correct samples survive PGD at eps 2 (a radius covering the whole image box)"),
    (lambda: mk.check_epsilon_curve([0.5, 1.0], [0.3, 0.2], None, None), "epsilon_curve", False,
     "accuracy 30.0% (eps 0.5) -> 20.0% (eps 1)"),
    (lambda: mk.check_epsilon_curve([0.5], [0.3], None, None), "epsilon_curve", None,
     "needs several eps values or the large-eps attack"),
    (lambda: mk.check_gradient_free(0.1, 0.3), "gradient_free", True,
     "Square (gradient-free) leaves 10.0% vs 30.0% for the gradient attack on the same 0 samples"),
    (lambda: mk.check_gradient_free(0.3, 0.3, n=5), "gradient_free", False,
     "Square (gradient-free) leaves 30.0% vs 30.0% for the gradient attack on the same 5 samples"),
    (lambda: mk.check_gradient_free(None, 0.3), "gradient_free", None, "Square attack not run"),
    (lambda: mk.check_gradients(H, 4), "gradients", True,
     "3 zero and 1 non-finite input gradients of the margin loss in bfloat16 among 100 samples: gradient attacks "
     "cannot move these points (shattered, saturated or underflowing gradients)"),
    (lambda: mk.check_gradients(H, 5), "gradients", False,
     "3 zero and 1 non-finite input gradients of the margin loss in bfloat16 among 100 samples"),
    (lambda: mk.check_saturation(H), "saturation", True,
     "60% of the samples have a softmax probability of exactly 1 for their label in fp32: cross-entropy gradients "
     "vanish there (try the margin/DLR losses)"),
    (lambda: mk.check_saturation(H, max_share=0.6), "saturation", False,
     "60% of the samples have a softmax probability of exactly 1 for their label in fp32"),
    (lambda: mk.check_randomness(3, 0.25, 64), "randomness", True,
     "two forward passes of the same 64 images change 3 predictions (largest logit difference 0.25, relative): "
     "randomised defence; evaluate its expectation (EOT)"),
    (lambda: mk.check_randomness(0, 0.0, 64), "randomness", False,
     "two forward passes of the same 64 images change 0 predictions (largest logit difference 0, relative)"),
    (lambda: mk.check_epsilon_to_zero([0.5, 4.0], [0.4, 0.05], 1.25), "epsilon_to_zero", True,
     "accuracy 40.0% (eps 0.5), 5.0% (eps 4); median minimal adversarial distance 1.25: points survive a radius "
     "that reaches every image"),
    (lambda: mk.check_epsilon_to_zero([0.5, 4.0], [0.4, 0.0], None), "epsilon_to_zero", False,
     "accuracy 40.0% (eps 0.5), 0.0% (eps 4); median minimal adversarial distance n/a"),
]


@pytest.mark.parametrize("make, check, flagged, observed", REPORTS)
def test_each_check_reports_its_name_verdict_and_evidence(make, check, flagged, observed):
    f = make()
    assert (f.check, f.flagged, f.observed) == (check, flagged, observed)
