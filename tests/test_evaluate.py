"""python -m aerl_fast.evaluate: the results folder end to end, the batched robustness curve, and
bad input (missing/foreign checkpoint, ε < 0, step > ε, unknown attack/norm, empty dataset, class
counts differing in a transfer matrix, AutoAttack extra missing)."""
import csv
import json
import re
import sys

import numpy as np
import pytest
import torch

from aerl_fast import evaluate as ev
from aerl_fast.attacks import autoattack_available
from aerl_fast.models import build_model
from eval_fixtures import cpu_eval_env, tiny_runs, write_run  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("cpu_eval_env")

FAST = ["--steps", "4", "--n-test", "48", "--batch-size", "48", "--device", "cpu", "--no-progress"]


def run_cli(argv, capsys):
    metrics = ev.main(argv)
    captured = capsys.readouterr()
    return metrics, captured.out, captured.err


def test_results_folder_end_to_end(tiny_runs, tmp_path, capsys):  # noqa: F811
    sl, rl = str(tiny_runs.dirs["sl"]), str(tiny_runs.dirs["rl"])
    out = tmp_path / "res"
    metrics, stdout, stderr = run_cli(
        [sl, rl, "--attack", "pgd-l2,fgsm", "--eps", "0.1", "0.5", "--linf-eps", "0.02",
         "--last-iterate", "--transfer", "--dynamics", "--dynamics-n", "16", "--landscape", "1",
         "--landscape-grid", "5", "--square-queries", "30", "--out", str(out)] + FAST, capsys)
    for name in ("metrics.json", "results.md", "results.csv", "transfer.md", "transfer.csv",
                 "transfer.png", "dynamics.json", "dynamics.png", "robustness_curve.png",
                 "landscape.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "landscape").glob("*.png"))) == 2

    # the printed table is the markdown table of the results
    assert "| shapes-alicnn-sl | sl | alicnnx0.25 | shapes | 48 |" in stdout
    assert "| shapes-alicnn-rl | rl |" in stdout and "pgd-l2 eps=0.5" in stdout
    assert metrics["table_md"] in (out / "results.md").read_text()
    saved = json.loads((out / "metrics.json").read_text())
    models = {m["name"]: m for m in saved["models"]}
    assert set(models) == {"shapes-alicnn-sl", "shapes-alicnn-rl"}
    sl_m = models["shapes-alicnn-sl"]
    assert sl_m["objective"] == "sl" and models["shapes-alicnn-rl"]["objective"] == "rl"
    pgd_acc = sl_m["attacks"]["pgd-l2"]["acc"]
    assert sl_m["attacks"]["pgd-l2"]["eps"] == [0.1, 0.5] and pgd_acc[1] <= pgd_acc[0] <= sl_m["clean_acc"]
    assert sl_m["attacks"]["pgd-l2"]["mode"] == "last-iterate"

    # transfer matrix: diagonal = white-box last-iterate result of the table at the transfer eps
    tr = saved["transfer"]
    assert tr["eps"] == 0.5 and tr["names"] == ["shapes-alicnn-sl", "shapes-alicnn-rl"]
    for i, name in enumerate(tr["names"]):
        assert tr["accuracy"][i][i] == models[name]["attacks"]["pgd-l2"]["acc"][1]
    with open(out / "transfer.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["crafted_on"] + tr["names"] and float(rows[1][1]) == pytest.approx(tr["accuracy"][0][0])

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == tr["names"]
    assert float(table[0]["pgd-l2@0.5"]) == pytest.approx(pgd_acc[1])
    assert float(table[0]["clean_acc"]) == pytest.approx(sl_m["clean_acc"])

    dyn = json.loads((out / "dynamics.json").read_text())
    d = dyn["models"]["shapes-alicnn-sl"]
    assert d["steps"] == 4 and d["batch_size"] == 16 and len(d["per_step"]["norm"]) == 4
    assert d["summary"]["norm_mean_reduced"] == pytest.approx(d["summary"]["norm"] / 16)

    flags = {f["check"]: f for f in sl_m["masking"]}
    assert set(flags) == {"zero_gradients", "transfer", "epsilon_curve", "gradient_free"}
    if autoattack_available():  # Square on the first 48 samples (all of them), against PGD's robust set there
        log = (out / "square_shapes-alicnn-sl.log").read_text()
        square = float(re.search(r"robust accuracy after SQUARE\s*:\s*([0-9.]+)%", log).group(1)) / 100
        assert flags["gradient_free"]["flagged"] is (square < pgd_acc[1] - 0.01)   # 1/48 apart or more
        assert (f"Square (gradient-free) leaves {square:.1%} vs {pgd_acc[1]:.1%} for the gradient attack on the "
                "same 48 samples") == flags["gradient_free"]["observed"]
    else:
        assert flags["gradient_free"]["flagged"] is None and "pyautoattack" in flags["gradient_free"]["observed"]
    assert flags["epsilon_curve"]["flagged"] is False and "survive" in flags["epsilon_curve"]["observed"]
    assert "Gradient-masking checks" in (out / "results.md").read_text()


def test_early_stop_default_and_transfer_crafted_last_iterate(tiny_runs, tmp_path, capsys):  # noqa: F811
    sl, rl = str(tiny_runs.dirs["sl"]), str(tiny_runs.dirs["rl"])
    metrics, _, _ = run_cli([sl, rl, "--attack", "pgd-linf", "--eps", "0.03", "--transfer",
                             "--no-masking", "--no-clamp", "--out", str(tmp_path / "r")] + FAST, capsys)
    assert metrics["settings"]["clamp"] is False and metrics["settings"]["mode"] == "early-stop"
    assert "clamp off (study preset)" in (tmp_path / "r" / "results.md").read_text()
    for i, m in enumerate(metrics["models"]):
        r = m["attacks"]["pgd-linf"]
        assert r["mode"] == "early-stop"
        # early stop is at least as strong as the last iterate that transfer crafts with
        assert r["acc"][0] <= metrics["transfer"]["accuracy"][i][i]
        assert r["grad_evals_per_sample"] < 4
        assert m["masking"] == []


def test_curve_in_one_batch_equals_single_eps_runs(tiny_runs):  # noqa: F811
    from aerl_fast import load_model
    from aerl_fast.evaluate.attack_runs import run_gradient_attack
    model = load_model(tiny_runs.dirs["sl"])
    x, y = tiny_runs.x[:40], tiny_runs.y[:40]
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    config = ev.EvalConfig(rel_step=0.25, steps=4, batch_size=32, seed=3).validate()
    radii = [0.1, 0.3, 0.6]
    both, _ = run_gradient_attack(model, x, y, clean_ok, "pgd-l2", "l2", radii, config, early_stop=True)
    for k, eps in enumerate(radii):
        one, _ = run_gradient_attack(model, x, y, clean_ok, "pgd-l2", "l2", [eps], config, early_stop=True)
        assert torch.equal(both.robust[k], one.robust[0])
        assert both.acc[k] == one.acc[0]


@pytest.mark.skipif(not autoattack_available(), reason="pyautoattack not installed")
def test_autoattack_from_cli(tiny_runs, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "aa"
    metrics, _, _ = run_cli([str(tiny_runs.dirs["sl"]), "--attack", "autoattack", "--aa-version",
                             "custom", "--aa-attacks", "apgd-ce", "--eps", "0.25", "--no-masking",
                             "--out", str(out), "--steps", "4", "--n-test", "12", "--batch-size",
                             "12", "--device", "cpu", "--no-progress"], capsys)
    r = metrics["models"][0]["attacks"]["autoattack-l2"]
    assert r["mode"] == "autoattack-custom" and 0 <= r["acc"][0] <= metrics["models"][0]["clean_acc"]
    logs = list((out / "autoattack").glob("*.log"))
    assert len(logs) == 1 and "apgd-ce" in logs[0].read_text().lower()
    assert r["per_attack"][0]["apgd-ce"] == pytest.approx(r["acc"][0], abs=1e-4)


# ------------------------------------------------------------------------------------ bad input

def _npz_run(tmp_path, name, n_test, classes=5):
    """A run folder whose config points at a small .npz dataset (random model: only shapes matter)."""
    data = tmp_path / f"{name}.npz"
    rng = np.random.default_rng(0)
    np.savez(data, X_train=rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(10) % classes,
             X_test=rng.integers(0, 255, (n_test, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(n_test) % classes)
    model = build_model("alicnn", classes, width=0.25)
    spec = dict(name="alicnn", width=0.25, num_classes=classes, mean=[0.5] * 3, std=[0.25] * 3,
                image_size=32)
    write_run(tmp_path / name, model, "sl", spec, 0.2, dataset="npz", data_dir=str(data))
    return str(tmp_path / name)


def _expect_error(argv, capsys, match):
    with pytest.raises(SystemExit) as exc:
        ev.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err
    return err


@pytest.mark.parametrize("extra, match", [
    (["--eps", "-1"], "--eps must be >= 0"),
    (["--attack", "pgd-l2", "--eps", "0.1", "--step", "0.5"], "--step 0.5 > eps 0.1"),
    (["--attack", "pgd-l3"], "unknown attack pgd-l3"),
    (["--aa-norm", "l3"], "--aa-norm must be one of linf, l2, got 'l3'"),
    (["--n-test", "0"], "--n-test must be >= 1"),
    (["--transfer", "--attack", "autoattack"], "--transfer needs fgsm"),
])
def test_bad_flags(tiny_runs, tmp_path, capsys, extra, match):  # noqa: F811
    if "autoattack" in extra and not autoattack_available():
        pytest.skip("pyautoattack not installed")
    _expect_error([str(tiny_runs.dirs["sl"]), "--out", str(tmp_path / "o")] + FAST + extra, capsys, match)


def test_missing_and_foreign_checkpoints(tmp_path, capsys):
    _expect_error([str(tmp_path / "nope"), "--out", str(tmp_path / "o")] + FAST, capsys,
                  "no such checkpoint file or run folder")
    (tmp_path / "empty_run").mkdir()
    _expect_error([str(tmp_path / "empty_run")] + FAST, capsys, "no best.pt or last.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    _expect_error([str(foreign)] + FAST, capsys, "not an aerl_fast checkpoint")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip file at all")
    _expect_error([str(garbage)] + FAST, capsys, "not a readable aerl_fast checkpoint")


def test_empty_dataset(tmp_path, capsys):
    run = _npz_run(tmp_path, "empty", n_test=0)
    _expect_error([run, "--out", str(tmp_path / "o")] + FAST, capsys, "empty dataset")


def test_transfer_class_count_mismatch(tiny_runs, tmp_path, capsys):  # noqa: F811
    five = _npz_run(tmp_path, "five", n_test=8)
    _expect_error([str(tiny_runs.dirs["sl"]), five, "--transfer", "--out", str(tmp_path / "o")] + FAST,
                  capsys, "class counts differ (shapes-alicnn-sl: 10, five: 5)")


def test_autoattack_missing_extra(tiny_runs, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    monkeypatch.setitem(sys.modules, "autoattack", None)
    _expect_error([str(tiny_runs.dirs["sl"]), "--attack", "autoattack", "--out", str(tmp_path / "o")]
                  + FAST, capsys, "pip install 'aerl_fast[autoattack]'")


def test_model_entry_keeps_an_nchw_model_for_peers_and_a_channels_last_copy_for_our_attacks():
    torch.manual_seed(3)
    model = build_model("alicnn", 10, width=0.25).eval()
    e = ev.ModelEntry("m", "m.pt", model, {}, {}, "rl")
    assert e.fast is not model
    convs = [m for m in e.fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert all(p.is_contiguous() for p in model.parameters())  # the original is left as it was
    x = torch.rand(5, 3, 32, 32, requires_grad=True)
    torch.testing.assert_close(e.fast(x), model(x), rtol=1e-4, atol=1e-5)
    g, = torch.autograd.grad(model(x).sum(), x)
    g.view(5, -1)  # peers (torchattacks, AutoAttack) .view() input gradients: NCHW model, NCHW grads
