"""The verdict must be able to fail: deliberately masked models get "masking likely" naming the check
that caught them, an honestly trained model gets "no masking signs", a crippled attack gets
"attack failure", and the worst case is the per-sample union of the attacks (read back from the
per-sample files).  The decision logic on hand-made per-sample outcomes: tests/test_verdict_logic.py."""
import csv

import pytest
import torch

from aerl_fast import evaluate
from aerl_fast.evaluate import EvalConfig, EvalOptions
from eval_fixtures import cpu_eval_env, held_out, tiny_models, tiny_runs  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("cpu_eval_env")

N = 48
# a cheap but complete verdict: every attack and check runs, with small budgets
CFG = EvalConfig(attacks=("pgd-l2",), l2_eps=(0.5,), steps=20, n_test=N, batch_size=N, masking=False, verdict=True,
                 aa_steps=20, aa_queries=300, aa_budget="full")
CPU = EvalOptions(device="cpu", progress=False)


class Temperature(torch.nn.Module):
    """Logits x 1000: the softmax saturates, cross-entropy gradients underflow to exactly zero."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return 1000.0 * self.model(x)


class Quantised(torch.nn.Module):
    """round(x·255)/255 in front of the network: the input gradient is zero almost everywhere."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 255) / 255)


class RandomInput(torch.nn.Module):
    """A randomised defence: fresh noise on every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


def _verdict(model, data):
    res = evaluate.run([model], data, CFG, CPU)
    return res.models[0].verdict


@pytest.fixture(scope="module")
def data(tiny_runs):  # noqa: F811
    x, y = tiny_runs.x[-N:], tiny_runs.y[-N:]   # held-out images the fixtures were not trained on
    return x, y


@pytest.mark.slow
def test_an_honestly_trained_model_shows_no_masking_signs(tiny_models, data):  # noqa: F811
    v = _verdict(tiny_models["sl"], data)
    assert v.label == "no masking signs", [(c.check, c.observed) for c in v.checks if c.flagged]
    names = {c.check for c in v.checks}
    assert {"randomness", "ordering_gradient_free", "ordering_single_step", "convergence", "epsilon_to_zero",
            "gradients", "saturation", "attack_self_test"} <= names
    assert v.worst.accuracy <= min(v.worst.n - v.worst.broken_by[a] for a in v.worst.broken_by) / v.worst.n


@pytest.mark.slow
@pytest.mark.parametrize("wrap, caught_by", [
    (Temperature, {"gradients", "saturation"}),
    (Quantised, {"gradients"}),
    (RandomInput, {"randomness"}),
])
def test_masked_models_are_called_masking_likely_naming_the_check(tiny_models, data, wrap, caught_by):  # noqa: F811
    v = _verdict(wrap(tiny_models["sl"]).eval(), data)
    fired = {c.check for c in v.checks if c.flagged}
    assert v.label == "masking likely", fired
    assert fired & caught_by, fired
    assert any(name in v.sentence for name in fired)


@pytest.mark.slow
def test_a_crippled_attack_is_an_attack_failure(tiny_models, data, monkeypatch):  # noqa: F811
    """Every update a no-op (step 0): the attacks cannot move, so the self-test on a model built to be
    breakable fails and the verdict blames the attack, not the model."""
    import importlib
    apgd_mod = importlib.import_module("aerl_fast.attacks.apgd_attack")
    gradient_mod = importlib.import_module("aerl_fast.attacks.gradient")
    frozen = lambda x_adv, *a, **k: x_adv  # noqa: E731
    monkeypatch.setattr(apgd_mod, "pgd_step", frozen)
    monkeypatch.setattr(gradient_mod, "pgd_step", frozen)
    v = _verdict(tiny_models["sl"], data)
    test = next(c for c in v.checks if c.check == "attack_self_test")
    assert test.flagged and v.label == "attack failure", test.observed


@pytest.mark.slow
def test_worst_case_is_the_per_sample_union_in_the_files(tiny_models, data, tmp_path):  # noqa: F811
    res = evaluate.run([tiny_models["sl"], tiny_models["rl"]], data, CFG,
                       EvalOptions(device="cpu", progress=False, names=("sl", "rl")))
    evaluate.write_report(res, tmp_path)
    for m in res.models:
        with open(tmp_path / "per_sample" / f"{m.name}.csv") as f:
            rows = list(csv.DictReader(f))
        broken_cols = [c for c in rows[0] if c.startswith("verdict:") and c.endswith("_broken")]
        assert any("transfer from" in c for c in broken_cols)  # the other model, as every set of two
        assert any("apgd-t" in c for c in broken_cols) and any("square" in c for c in broken_cols)
        union = [int(r["clean_correct"]) == 1 and not any(int(r[c]) for c in broken_cols) for r in rows]
        assert union == [r["worst_case_robust"] == "1" for r in rows]
        assert sum(union) == m.verdict.worst.robust
        for c in broken_cols:  # the union is never above any single attack
            assert sum(union) <= sum(int(r["clean_correct"]) and not int(r[c]) for r in rows)
    md = (tmp_path / "results.md").read_text()
    assert "## Verdict" in md and "worst case (union)" in md


def test_shortcut_model_is_unchanged_at_its_anchors_and_broken_at_the_far_point():
    from aerl_fast.evaluate.verdict_run import Shortcut
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x = torch.rand(3, 3, 2, 2)
    y = net(x).argmax(1)
    z = net(x)
    t = (y + 1) % 5
    margin = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, t[:, None]).squeeze(1)
    for norm, eps in (("l2", 0.3), ("linf", 0.1)):
        s = Shortcut(net, x, y, t, 2 * margin.clamp_min(0) + 1, eps, norm)
        torch.testing.assert_close(s(x), z)
        u = s.u.view_as(x)
        far = x + eps * u
        d = (far - x).flatten(1)
        assert bool((d.norm(dim=1) <= eps + 1e-6).all() if norm == "l2" else (d.abs().amax(1) <= eps + 1e-6).all())
        assert bool(((far >= 0) & (far <= 1)).all())
        assert bool((s(far).argmax(1) != y).all())
