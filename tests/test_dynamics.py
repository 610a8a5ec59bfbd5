"""aerl_fast.analysis: gradient dynamics against a float64 reference computed from the same
gradients, loss landscapes against direct evaluation, gradient-masking checks on a masked model."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import aerl_fast
from aerl_fast.analysis import (GradStatsTracker, check_epsilon_curve, check_gradient_free,
                                check_transfer, check_zero_gradients, gradient_dynamics,
                                landscape_directions, large_epsilon, large_epsilon_accuracy,
                                loss_landscape, plot_dynamics, plot_landscape, zero_gradient_count)
from aerl_fast.analysis import dynamics as dynamics_module
from aerl_fast.models import build_model
from eval_fixtures import cpu_eval_env, tiny_runs  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("cpu_eval_env")


@pytest.fixture(scope="module")
def sl(tiny_runs):  # noqa: F811
    return aerl_fast.load_model(tiny_runs.dirs["sl"])


@pytest.fixture(scope="module")
def data(tiny_runs):  # noqa: F811
    return tiny_runs.x[:48].clone(), tiny_runs.y[:48].clone()


class RecordingTracker(GradStatsTracker):
    """The tracker the dynamics code uses, also keeping a float64 copy of every gradient fed."""
    log = []

    def update(self, g):
        RecordingTracker.log[-1].append(g.detach().double().clone())
        return super().update(g)

    def reset(self):
        RecordingTracker.log.append([])
        super().reset()


def reference_stats(grads):
    """Float64 per-step batch means and the over-time dispersion, straight from the definitions."""
    rows, mean_dirs = [], []
    prev = None
    for g in grads:
        g = g.flatten(1)
        norm = g.norm(dim=1)
        unit = torch.stack([r / n if n > 0 else torch.zeros_like(r) for r, n in zip(g, norm)])
        m = unit.mean(0)
        mean_dirs.append(m / m.norm())
        if prev is None:
            cos = sign = math.nan
        else:
            cos = float(F.cosine_similarity(g, prev, dim=1).mean())
            sign = float((torch.sign(g) == torch.sign(prev)).double().mean(1).mean())
        rows.append([float(norm.mean()), cos, sign, 1 - float(m.norm())])
        prev = g
    T = len(mean_dirs)
    pair = [float(mean_dirs[t] @ mean_dirs[s]) for t in range(T) for s in range(T) if s != t]
    return torch.tensor(rows, dtype=torch.float64), 1 - sum(pair) / len(pair)


def test_dynamics_equal_float64_reference(sl, data, monkeypatch):
    x, y = data
    monkeypatch.setattr(dynamics_module, "GradStatsTracker", RecordingTracker)
    RecordingTracker.log = []
    out = gradient_dynamics(sl, x, y, eps=0.5, step=0.1, steps=6, norm="l2", random_start=False,
                            seed=0, batch_size=32)          # two batches: 32 + 16 samples
    batches = RecordingTracker.log
    assert [len(b) for b in batches] == [6, 6] and [b[0].shape[0] for b in batches] == [32, 16]

    # the first gradient fed is that of the *summed* CE at the clean images, w.r.t. the input
    model64 = build_model("alicnn", 10, width=0.25,
                                           mean=sl.aerl_spec["mean"], std=sl.aerl_spec["std"])
    model64.load_state_dict(sl.state_dict())
    model64 = model64.double().eval()
    x64 = x[:32].double().requires_grad_(True)
    (g64,) = torch.autograd.grad(F.cross_entropy(model64(x64), y[:32], reduction="sum"), x64)
    torch.testing.assert_close(batches[0][0], g64, rtol=1e-4, atol=1e-7)

    refs = [reference_stats(b) for b in batches]
    weights = [32, 16]
    table = sum(w * r[0] for w, r in zip(weights, refs)) / 48
    over = sum(w * r[1] for w, r in zip(weights, refs)) / 48
    for j, key in enumerate(("norm", "cos", "sign_agree", "dispersion")):
        got = torch.tensor([math.nan if v is None else v for v in out["per_step"][key]], dtype=torch.float64)
        torch.testing.assert_close(got, table[:, j], rtol=2e-5, atol=2e-6, equal_nan=True)
        assert out["summary"][key] == pytest.approx(float(torch.nanmean(table[:, j])), rel=2e-5, abs=2e-6)
    assert out["per_step"]["cos"][0] is None and out["per_step"]["sign_agree"][0] is None
    assert out["summary"]["over_time_dispersion"] == pytest.approx(over, rel=1e-4, abs=1e-6)
    # the study's mean-reduced scale: the per-sample norm divided by the batch size
    assert out["batch_size"] == 32
    assert out["per_step"]["norm_mean_reduced"] == pytest.approx([v / 32 for v in out["per_step"]["norm"]])
    assert out["summary"]["norm_mean_reduced"] == pytest.approx(out["summary"]["norm"] / 32)


def test_dynamics_norm_is_batch_size_free(sl, data):
    """Summed-loss gradients: the same samples give the same norms in batches of 8 or of 48."""
    x, y = data
    a = gradient_dynamics(sl, x, y, eps=0.5, step=0.1, steps=2, norm="linf", random_start=False,
                          batch_size=8)
    b = gradient_dynamics(sl, x, y, eps=0.5, step=0.1, steps=2, norm="linf", random_start=False,
                          batch_size=48)
    assert a["per_step"]["norm"] == pytest.approx(b["per_step"]["norm"], rel=1e-5)
    assert a["summary"]["norm_mean_reduced"] == pytest.approx(6 * b["summary"]["norm_mean_reduced"], rel=1e-5)


def test_plot_dynamics_writes_png(sl, data, tmp_path):
    x, y = data
    d = gradient_dynamics(sl, x[:8], y[:8], eps=0.5, step=0.1, steps=3, norm="l2", batch_size=8)
    plot_dynamics({"sl": d, "copy": d}, tmp_path / "dyn.png", title="t")
    assert (tmp_path / "dyn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------- landscape

def test_landscape_matches_direct_evaluation(sl, data, tmp_path):
    x, y = data
    x, y = x[:3], y[:3]
    from aerl_fast.attacks import pgd
    x_adv = pgd(sl, x, y, eps=0.5, step=0.1, steps=5, norm="l2", seed=0)
    lands = loss_landscape(sl, x, y, x_adv, grid=11, span=2.0, seed=4, batch_size=50)
    u, v, r = landscape_directions(x, x_adv, seed=4)
    assert (u * v).sum(1).abs().max() < 1e-5 and torch.allclose(u.norm(dim=1), torch.ones(3))
    for k, land in enumerate(lands):
        assert len(land["loss"]) == 11 and len(land["loss"][0]) == 11
        a = land["a"]
        for i, j in [(0, 0), (5, 5), (3, 8), (10, 7)]:     # (row b, column a)
            pt = x[k] + r[k] * (a[j] * u[k] + land["b"][i] * v[k]).view_as(x[k])
            with torch.no_grad():
                logits = sl(pt[None])
            assert land["loss"][i][j] == pytest.approx(float(F.cross_entropy(logits, y[k:k + 1])), rel=1e-4, abs=1e-5)
            assert land["correct"][i][j] == bool(logits.argmax(1) == y[k])
        # the grid centre (a, b) = (0, 0) is the clean image
        with torch.no_grad():
            clean_loss = float(F.cross_entropy(sl(x[k:k + 1]), y[k:k + 1]))
        assert land["loss"][5][5] == pytest.approx(clean_loss, rel=1e-4, abs=1e-5)
        assert land["radius"] == pytest.approx(float((x_adv[k] - x[k]).norm()), rel=1e-5)
    plot_landscape(lands[0], tmp_path / "l.png")
    assert (tmp_path / "l.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------ masking

class Quantized(nn.Module):
    """A gradient-masked model: inputs rounded to 4 levels first, so every input gradient is 0."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 3) / 3)


def test_masked_model_raises_flags(sl, data):
    x, y = data
    masked = Quantized(sl).eval()
    with torch.no_grad():
        ok = masked(x).argmax(1) == y
    xs, ys = x[ok], y[ok]
    assert zero_gradient_count(sl, x, y) == 0
    zero = zero_gradient_count(masked, x, y)
    assert zero == x.shape[0]
    flag = check_zero_gradients(zero, x.shape[0])
    assert flag.flagged and f"{zero} of {x.shape[0]}" in flag.observed
    # PGD with a box-covering radius breaks every sample of the honest model, not of the masked one
    honest = large_epsilon_accuracy(sl, x[:16], y[:16], norm="l2", steps=5, batch_size=16)
    assert honest == 0.0
    masked_acc = large_epsilon_accuracy(masked, xs, ys, norm="l2", steps=5)
    curve = check_epsilon_curve([0.1, 0.5], [0.5, 0.4], large_epsilon("l2", x.shape[1:]), masked_acc, len(xs))
    assert masked_acc > 0.02 and curve.flagged and "survive" in curve.observed
    assert large_epsilon("l2", (3, 32, 32)) == pytest.approx(math.sqrt(3072))
    assert large_epsilon("linf", (3, 32, 32)) == 1.0


def test_check_functions_flag_what_they_observe():
    rising = check_epsilon_curve([0.25, 0.5, 1.0], [0.4, 0.5, 0.3], None, None)
    assert rising.flagged and "rises from 40.0% at eps 0.25 to 50.0% at eps 0.5" in rising.observed
    falling = check_epsilon_curve([0.25, 0.5], [0.4, 0.1], 55.4, 0.0, 10)
    assert falling.flagged is False
    assert check_epsilon_curve([0.5], [0.4], None, None).flagged is None
    t = check_transfer("rl", 0.30, {"rl": 0.30, "sl": 0.20})
    assert t.flagged and "crafted on sl" in t.observed and "20.0%" in t.observed
    assert check_transfer("rl", 0.30, {"rl": 0.30, "sl": 0.45}).flagged is False
    assert check_transfer("rl", 0.30, {"rl": 0.30}).flagged is None
    assert check_gradient_free(0.10, 0.30, n=50).flagged
    assert check_gradient_free(0.35, 0.30, n=50).flagged is False
    assert check_gradient_free(None, 0.3, why_not="x").flagged is None
