"""Guards against numbers that mean nothing, each on an input that must trigger it and one that
must not: degenerate models, impossible radii, attacks too short for their radius, images outside
[0, 1]; and what a results folder records (versions, intervals, the image subset, vector figures)."""
import json

import pytest
import torch

from aerl_fast import evaluate
from aerl_fast.errors import ConfigError, UserError
from aerl_fast.evaluate import EvalConfig, EvalOptions, degenerate_reason, wilson

CPU = EvalOptions(device="cpu", progress=False)


class Constant(torch.nn.Module):
    """Predicts class `k` for every input, through a path that still has an input gradient."""

    def __init__(self, k=3, classes=10):
        super().__init__()
        self.k, self.classes = k, classes
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        z = torch.zeros(x.shape[0], self.classes) + 1e-3 * x.flatten(1).sum(1, keepdim=True) * self.w
        z[:, self.k] += 10.0
        return z


class Oracle(torch.nn.Module):
    """Reads the label off the image (the first pixel holds label/10): accurate, attackable."""

    def __init__(self, classes=10):
        super().__init__()
        self.centres = torch.nn.Parameter(torch.arange(classes).float() / 10 + 0.05, requires_grad=False)

    def forward(self, x):
        return -100.0 * (x[:, :1, 0, 0] - self.centres[None]) ** 2


def _data(n=60, classes=10):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.rand(n, 3, 8, 8, generator=g) * 0.5
    x[:, 0, 0, 0] = y.float() / 10 + 0.05
    return x, y


def test_a_constant_model_is_degenerate_and_an_accurate_one_is_not():
    x, y = _data()
    cfg = EvalConfig(attacks=("pgd-l2",), l2_eps=(0.05,), steps=2, n_test=60, masking=False)
    const = evaluate.run([Constant()], (x, y), cfg, CPU).models[0]
    assert const.degenerate is not None and "predicts class 3 for 100%" in const.degenerate
    good = evaluate.run([Oracle()], (x, y), cfg, CPU).models[0]
    assert good.clean_acc == 1.0 and good.degenerate is None


def test_chance_level_accuracy_is_degenerate_only_within_noise():
    y = torch.arange(200) % 10
    pred = y.clone()
    pred[:180] = (y[:180] + 1) % 10          # 10% correct, spread over classes: chance
    assert "within noise of chance" in degenerate_reason(pred, y, 10)
    pred = y.clone()
    pred[:100] = (y[:100] + 1) % 10          # 50% correct: far from chance
    assert degenerate_reason(pred, y, 10) is None


def test_wilson_interval_matches_the_closed_form():
    lo, hi = wilson(32, 64)                  # p = 0.5, n = 64: 0.5 ± 1.96·sqrt(0.25/64 + 1.96²/(4·64²)) / (1 + 1.96²/64)
    z = 1.959963984540054
    half = z * (0.25 / 64 + z * z / (4 * 64 * 64)) ** 0.5 / (1 + z * z / 64)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)


@pytest.mark.parametrize("eps, bad", [(1.0, True), (8.0, True), (8 / 255, False), (0.999, False)])
def test_linf_radius_of_the_whole_box_is_refused_with_the_intent(eps, bad):
    cfg = EvalConfig(attacks=("pgd-linf",), linf_eps=(eps,))
    if bad:
        with pytest.raises(ConfigError, match="covers the whole") as e:
            cfg.validate()
        assert f"did you mean {eps:g}/255 = {eps / 255:.4f}" in str(e.value)
    else:
        assert cfg.validate().radii("pgd-linf") == (eps,)


def test_l2_radius_beyond_the_box_is_refused_once_the_image_size_is_known():
    x, y = _data(20)
    too_far = (3 * 8 * 8) ** 0.5 + 0.1
    with pytest.raises(ConfigError, match="reaches every image"):
        evaluate.run([Oracle()], (x, y), EvalConfig(l2_eps=(too_far,), steps=1, masking=False), CPU)
    evaluate.run([Oracle()], (x, y), EvalConfig(l2_eps=(too_far - 0.2,), rel_step=1.0, steps=1, masking=False), CPU)


@pytest.mark.parametrize("steps, rel_step, random_start, warned", [
    (5, 0.1, False, True),    # 0.5 ε: cannot even reach the boundary
    (10, 0.1, False, False),  # exactly ε
    (10, 0.1, True, True),    # from a random start the far side is 2ε away
    (20, 0.1, True, False),
])
def test_an_attack_too_short_for_its_radius_is_warned(steps, rel_step, random_start, warned):
    x, y = _data(20)
    cfg = EvalConfig(l2_eps=(0.2,), steps=steps, rel_step=rel_step, random_start=random_start, n_test=20,
                     masking=False)
    res = evaluate.run([Oracle()], (x, y), cfg, CPU)
    assert any("too weak for its radius" in w for w in res.warnings) is warned


def test_uint8_range_and_normalised_images_get_the_right_hint():
    x, y = _data(20)
    with pytest.raises(UserError, match="divide by 255"):
        evaluate.run([Oracle()], (x * 255, y), EvalConfig(masking=False), CPU)
    with pytest.raises(UserError, match="normalisation inside the model") as e:
        evaluate.run([Oracle()], ((x - 0.5) / 0.25, y), EvalConfig(masking=False), CPU)
    assert "clamp" not in str(e.value)
    evaluate.run([Oracle()], (x, y), EvalConfig(steps=1, rel_step=1.0, masking=False), CPU)  # [0, 1]: accepted


def test_norm_names_as_autoattack_writes_them(tmp_path):
    from aerl_fast.evaluate import parse_args
    parsed = parse_args([str(tmp_path), "--aa-norm", "L2", "--attack", "PGD-L2"])
    assert parsed.config.aa_norm == "l2" and parsed.config.attacks == ("pgd-l2",)


def test_results_record_versions_intervals_subset_and_vector_figures(tmp_path):
    x, y = _data(40)
    cfg = EvalConfig(l2_eps=(0.05, 0.1), steps=4, n_test=30, masking=False)
    res = evaluate.run([Oracle(), Constant()], (x, y), cfg,
                       EvalOptions(device="cpu", progress=False, names=("oracle", "constant")))
    evaluate.write_report(res, tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    env = m["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["date"] and "aerl_fast" in env
    assert m["test_subset"]["given"]["n"] == 30 and m["test_subset"]["given"]["of"] == 40
    assert len(set(m["test_subset"]["given"]["indices"])) == 30
    model = m["models"][0]
    assert model["name"] == "oracle" and len(model["clean_ci95"]) == 2
    assert [len(ci) for ci in model["attacks"]["pgd-l2"]["ci95"]] == [2, 2]
    assert m["models"][1]["degenerate"]
    md = (tmp_path / "results.md").read_text()
    assert "Degenerate models" in md and "**constant**" in md and "95% Wilson" in md
    for name in ("robustness_curve",):
        assert (tmp_path / f"{name}.png").stat().st_size > 0 and (tmp_path / f"{name}.pdf").read_bytes()[:4] == b"%PDF"


def test_evaluate_refuses_a_non_empty_out_without_overwrite(tmp_path, capsys):
    out = tmp_path / "res"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / "nope"), "--out", str(out)])
    assert "already holds files; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
