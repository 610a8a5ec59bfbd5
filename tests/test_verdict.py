"""The verdict must be able to fail: deliberately masked models get "masking likely" naming the check
that caught them, an honestly trained model gets "no masking signs", a crippled attack gets
"attack failure", and the worst case is the per-sample union of the attacks (read back from the
per-sample files)."""
import csv

import pytest
import torch

from aerl_fast import evaluate
from aerl_fast.analysis.verdict import (GRADIENT_FREE, SINGLE_STEP, TRANSFER, WHITE_BOX, AttackBreaks,
                                        check_convergence, check_ordering, check_self_test, decide, min_count,
                                        worst_case)
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


def _breaks(name, kind, bits):
    return AttackBreaks(name, kind, torch.tensor(bits, dtype=torch.bool))


def test_worst_case_and_unique_breaks_by_hand():
    clean = torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool)
    atts = [_breaks("pgd", WHITE_BOX, [1, 0, 0, 0, 1, 0]), _breaks("apgd-t", WHITE_BOX, [1, 1, 0, 0, 0, 0]),
            _breaks("square", GRADIENT_FREE, [0, 0, 1, 0, 0, 0])]
    w = worst_case(clean, atts)
    assert (w.n, w.clean, w.robust) == (6, 5, 2)          # points 3 and 5 survive everything
    assert w.broken_by == {"pgd": 1, "apgd-t": 2, "square": 1}  # point 4 is not clean-correct: not counted
    assert w.only_by == {"pgd": 0, "apgd-t": 1, "square": 1}
    assert w.robust_mask.tolist() == [False, False, False, True, False, True]


@pytest.mark.parametrize("missed, flagged", [(0, False), (1, False), (2, True)])
def test_ordering_flags_points_the_white_box_attacks_missed(missed, flagged):
    n = 100
    white = torch.zeros(n, dtype=torch.bool)
    white[:30] = True
    other = white.clone()
    other[30:30 + missed] = True
    for kind, check in ((TRANSFER, "ordering_transfer"), (GRADIENT_FREE, "ordering_gradient_free"),
                        (SINGLE_STEP, "ordering_single_step")):
        flags = {f.check: f for f in check_ordering([AttackBreaks("w", WHITE_BOX, white), AttackBreaks("o", kind, other)], n)}
        assert flags[check].flagged is flagged and flags[check].numbers["missed_by_white_box"] == missed
    assert min_count(100) == 2 and min_count(1000) == 5 and min_count(10) == 2


@pytest.mark.parametrize("extra, n, flagged", [(0, 1000, False), (4, 1000, False), (5, 1000, True), (2, 50, True)])
def test_convergence_threshold(extra, n, flagged):
    assert check_convergence(extra, 100, n, "x").flagged is flagged


@pytest.mark.parametrize("broken, attempted, flagged", [(64, 64, False), (61, 64, False), (60, 64, True), (0, 64, True)])
def test_self_test_threshold(broken, attempted, flagged):
    assert check_self_test(broken, attempted).flagged is flagged
    assert check_self_test(0, 0).flagged is None


def test_decide_puts_attack_failure_before_masking():
    w = worst_case(torch.ones(4, dtype=torch.bool), [])
    ok, bad_attack = check_self_test(4, 4), check_self_test(0, 4)
    masked = check_convergence(3, 4, 4, "x")
    settings = {"eps": 0.5, "norm": "l2"}
    assert decide(w, [ok], settings).label == "no masking signs"
    assert decide(w, [ok, masked], settings).label == "masking likely"
    assert decide(w, [bad_attack, masked], settings).label == "attack failure"


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
