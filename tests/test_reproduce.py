"""python -m aerl_fast.reproduce: a micro matrix end to end, resumability, --print-commands, bad input."""
import json
import os
import shlex
import shutil
import time
from pathlib import Path

import pytest

from eval_fixtures import cpu_eval_env  # noqa: F401 - fixture

from aerl_fast import evaluate, reproduce, train
from aerl_fast.train.cli import configs_from_args, parse

pytestmark = pytest.mark.usefixtures("cpu_eval_env")

CELLS = ["shapes-alicnnx0.25-sl-s0", "shapes-alicnnx0.25-rl-s0"]


def micro_preset(tmp, **changes):
    preset = {
        "_comment": "written by tests/test_reproduce.py",
        "objectives": ["sl", "rl"],
        "models": [{"name": "alicnn", "width": 0.25}],
        "datasets": ["shapes"],
        "seeds": [0],
        "train": {"epochs": 1, "train_subset": 400, "batch_size": 64, "device": "cpu",
                  "eval_batch_size": 256, "checkpoint_minutes": 0},
        "eval": {"eps": 1.0, "steps": 3, "n_test": 64, "dynamics_n": 16, "batch_size": 64, "aa_steps": 4,
                 "aa_queries": 40},
    }
    preset.update(changes)
    path = tmp / "micro.json"
    path.write_text(json.dumps(preset))
    return str(path)


def forbid(monkeypatch, what="training"):
    def fail(*a, **k):
        raise AssertionError(f"{what} must not run")
    return fail


def forbid_stages(monkeypatch, training=True, evaluation=True):
    """reproduce calls the stages' library functions: make each forbidden one fail loudly."""
    if training:
        monkeypatch.setattr(train, "run", forbid(monkeypatch, "training"))
        monkeypatch.setattr(train, "resume", forbid(monkeypatch, "training"))
    if evaluation:
        monkeypatch.setattr(evaluate, "run", forbid(monkeypatch, "evaluation"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The micro matrix, run once end to end."""
    tmp = tmp_path_factory.mktemp("reproduce")
    out = tmp / "report"
    report = reproduce.main(["--preset", micro_preset(tmp), "--out", str(out)])
    return tmp, out, report


def test_end_to_end_report(finished):
    tmp, out, report = finished
    for cell in CELLS:
        assert (out / "runs" / cell / "summary.json").is_file()
    ev = out / "eval" / "shapes" / "seed0"
    for f in ("metrics.json", "transfer.md", "transfer.png", "dynamics.png", "dynamics.json"):
        assert (ev / f).is_file(), f
    md = (out / "report.md").read_text()
    assert "| objective | model | clean | adversarial | ratio adv/clean |" in md
    assert "| sl | alicnnx0.25 |" in md and "| rl | alicnnx0.25 |" in md
    assert "### Transfer matrix, shapes, seed 0" in md
    assert "| crafted on \\ evaluated on | " + " | ".join(CELLS) + " |" in md
    assert "(eval/shapes/seed0/dynamics.png)" in md
    # shapes has no published values: no comparison columns
    assert "study adversarial" not in md
    # every reproduce report ends in a verdict per cell
    assert "## Verdict per cell" in md
    assert [v["cell"] for v in json.loads((out / "report.json").read_text())["verdicts"]] == CELLS

    # report.json / csv hold the numbers of the evaluation, cell by cell
    metrics = json.loads((ev / "metrics.json").read_text())
    by_name = {m["name"]: m for m in metrics["models"]}
    rj = json.loads((out / "report.json").read_text())
    assert [r["cell"] for r in rj["cells"]] == CELLS
    for r in rj["cells"]:
        m = by_name[r["cell"]]
        assert r["clean_acc"] == m["clean_acc"]
        assert r["pgd_l2_acc"] == m["attacks"]["pgd-l2"]["acc"][0]
        assert r["ratio"] == pytest.approx(r["pgd_l2_acc"] / r["clean_acc"])
        assert r["n_test"] == 64
    assert rj["transfer"]["shapes/seed0"]["names"] == CELLS
    csv_lines = (out / "report.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(CELLS) and csv_lines[0].startswith("cell,dataset,objective")
    assert report["cells"] == rj["cells"]


def test_second_invocation_only_rebuilds_report(finished, monkeypatch):
    tmp, out, _ = finished
    before = (out / "report.md").read_text()
    (out / "report.md").unlink()
    (out / "report.json").unlink()
    forbid_stages(monkeypatch)
    reproduce.main(["--preset", micro_preset(tmp), "--out", str(out)])
    assert (out / "report.md").read_text() == before
    assert (out / "report.json").is_file()


def test_resume_and_reevaluate(finished, tmp_path, monkeypatch):
    """A cell killed after a checkpoint is resumed (not restarted, not the others); a best.pt newer
    than the evaluation invalidates the cached evaluation."""
    tmp, out, _ = finished
    copy = tmp_path / "report"
    shutil.copytree(out, copy)
    (copy / "runs" / CELLS[1] / "summary.json").unlink()
    calls, real_resume = [], train.resume

    def spy(run_dir, *a, **k):
        calls.append(run_dir)
        return real_resume(run_dir, *a, **k)
    monkeypatch.setattr(train, "resume", spy)
    monkeypatch.setattr(train, "run", forbid(monkeypatch, "a fresh start"))
    later = time.time() + 5
    os.utime(copy / "runs" / CELLS[1] / "best.pt", (later, later))
    evals, real_eval = [], evaluate.run
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: evals.append(a) or real_eval(*a, **k))
    reproduce.main(["--preset", micro_preset(tmp), "--out", str(copy)])
    assert calls == [copy / "runs" / CELLS[1]]
    assert (copy / "runs" / CELLS[1] / "summary.json").is_file()
    assert len(evals) == 1  # best.pt newer than metrics.json: evaluated again
    assert (copy / "report.md").is_file()


def test_eval_cache_rules(finished):
    tmp, out, _ = finished
    ev = out / "eval" / "shapes" / "seed0"
    runs = [out / "runs" / c for c in CELLS]
    from dataclasses import replace
    config = reproduce.eval_config(reproduce.load_matrix(micro_preset(tmp)))
    key = reproduce.eval_key(config, runs, None)
    assert json.loads((ev / "reproduce_eval.json").read_text())["key"] == key
    assert reproduce.eval_cached(ev, runs, key)
    other = reproduce.eval_key(replace(config, restarts=2), runs, None)
    assert not reproduce.eval_cached(ev, runs, other)  # other settings
    assert not reproduce.eval_cached(ev, runs + [out / "runs" / "missing"], key)


def test_print_commands(tmp_path, capsys, finished):
    preset = micro_preset(tmp_path)
    out = tmp_path / "fresh"
    assert reproduce.main(["--preset", preset, "--out", str(out), "--print-commands"]) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(CELLS)
    assert not out.exists()  # printing commands trains and creates nothing
    for line, cell in zip(lines, CELLS):
        words = shlex.split(line)
        assert words[:3] == ["python", "-m", "aerl_fast.train"]
        train_values, option_values, train_preset, resume = parse(words[3:])  # a valid aerl_fast.train command line
        assert resume is None and train_preset is None
        cfg, options = configs_from_args(train_values, option_values, train_preset)
        assert options.out == str((out / "runs" / cell).resolve())
        assert (cfg.objective, cfg.model, cfg.width, cfg.seed, cfg.epochs, cfg.train_subset) == \
            (cell.split("-")[2], "alicnn", 0.25, 0, 1, 400)
    # a finished matrix has nothing left to print
    _, done, _ = finished
    reproduce.main(["--preset", preset, "--out", str(done), "--print-commands"])
    assert capsys.readouterr().out.strip() == ""


def test_print_commands_into_a_closed_pipe_is_quiet(tmp_path):
    """`--print-commands | head -1`: the reader leaves early; no BrokenPipe traceback, exit 0."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "aerl_fast.reproduce", "--preset", micro_preset(tmp_path),
                             "--out", str(tmp_path / "o"), "--print-commands"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # before the interpreter has started: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("changes, match", [
    ({"colour": 1}, "unknown key(s) colour"),
    ({"train": {"epochs": 1, "learning_rate": 0.1}}, "'train': unknown key(s) learning_rate"),
    ({"train": {"lr": -1.0}}, "--lr must be > 0"),
    ({"models": [{"name": "alicnn", "width": 0.25}, {"name": "vgg"}]}, "--model must be one of"),
    ({"eval": {"eps": 1.0, "steps": 0}}, "--steps must be >= 1"),
    ({"eval": {"epsilon": 1.0}}, "'eval': unknown key(s) epsilon"),
    ({"train_presets": {"rl": "no-such-preset"}}, "unknown preset 'no-such-preset'"),
    ({"seeds": []}, "'seeds' must be a non-empty list"),
])
def test_bad_preset_fails_before_training(tmp_path, capsys, monkeypatch, changes, match):
    forbid_stages(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--preset", micro_preset(tmp_path, **changes), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and match in err[-1], err
    assert not out.exists()


def test_missing_dataset_fails_before_training(tmp_path, capsys, monkeypatch):
    """The shapes cells come first, yet nothing trains: the cifar10 cell's data is missing."""
    forbid_stages(monkeypatch)
    missing = tmp_path / "no-cifar-here"
    preset = micro_preset(tmp_path, datasets=["shapes", {"name": "cifar10", "data_dir": str(missing)}])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--preset", preset, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: dataset cifar10 for cell cifar10-alicnnx0.25-sl-s0") and str(missing) in err
    assert not out.exists()


def test_shipped_presets_validate():
    """smoke and the study matrices parse and every cell is a valid training config (no data needed)."""
    for name in ("smoke", "matrix-cifar10", "matrix-cifar100", "matrix-imagenet100"):
        m = reproduce.load_matrix(name)
        cells = reproduce.build_cells(m, None)
        assert len(cells) == len(m["objectives"]) * len(m["models"]) * len(m["datasets"]) * len(m["seeds"])
    smoke = reproduce.build_cells(reproduce.load_matrix("smoke"), None)
    assert {c.objective for c in smoke} == {"sl", "rl", "sl-adv", "rl-adv"} and {c.ds for c in smoke} == {"shapes"}
    c10 = {c.objective: c for c in reproduce.build_cells(reproduce.load_matrix("matrix-cifar10"), None)}
    assert c10["rl-adv"].preset == "cifar10-rl" and c10["sl-adv"].preset == "cifar10-sl"


def test_published_values_beside_ours_on_cifar10(tmp_path):
    """On a CIFAR-10 matrix (a tiny fake set in the official layout) the table carries the study's
    PGD accuracy and our difference, and the transfer matrix the study's transfer numbers."""
    from cifar_files import make_cifar

    root, _ = make_cifar(tmp_path / "data", "cifar10", n_per_batch=40)
    preset = micro_preset(tmp_path, objectives=["sl", "rl", "rl-adv"],
                          datasets=[{"name": "cifar10", "data_dir": str(root)}],
                          train={"epochs": 1, "batch_size": 50, "device": "cpu", "checkpoint_minutes": 0})
    out = tmp_path / "report"
    report = reproduce.main(["--preset", preset, "--out", str(out)])
    md = (out / "report.md").read_text()
    assert "| objective | model | clean | adversarial | ratio adv/clean | study adversarial | difference |" in md
    rows = {r["objective"]: r for r in report["summary"]}
    for obj, pub in (("sl", 0.05), ("rl", 0.55)):
        r = rows[obj]
        assert r["published_pgd_l2_acc"] == pub and r["difference"] == pytest.approx(r["pgd_l2_acc"] - pub)
        assert f"| {obj} | alicnnx0.25 | " in md and f"| {100 * pub:.1f} | {100 * (r['pgd_l2_acc'] - pub):+.1f} |" in md
    assert rows["rl-adv"]["published_pgd_l2_acc"] is None
    assert "settings here differ (models other than cnn6 x1, 3 PGD steps instead of 100)" in md
    assert "Clean accuracy SL − RL (alicnnx0.25)" in md
    assert "| crafted on rl, evaluated on sl |" in md and "| crafted on sl, evaluated on rl |" in md
    assert "| evaluated on rl-adv (crafted on the others) |" in md


@pytest.fixture(scope="module")
def with_curves(tmp_path_factory):
    """The micro matrix with periodic checkpoints (train save_every 1, 2 epochs)."""
    tmp = tmp_path_factory.mktemp("curves")
    out = tmp / "report"
    train_over = {"epochs": 2, "train_subset": 400, "batch_size": 64, "device": "cpu",
                  "eval_batch_size": 256, "checkpoint_minutes": 0, "save_every": 1}
    preset = micro_preset(tmp, train=train_over)
    report = reproduce.main(["--preset", preset, "--out", str(out)])
    return preset, out, report


def test_accuracy_over_epochs(with_curves):
    import torch
    import aerl_fast

    _, out, report = with_curves
    ev = out / "eval" / "shapes" / "seed0"
    assert (ev / "curves.png").is_file() and (ev / "curves.png").stat().st_size > 0
    data = json.loads((ev / "curves.json").read_text())
    recs = data["checkpoints"]
    expected = {f"runs/{c}/epoch_{e:04d}.pt" for c in CELLS for e in (1, 2)}
    assert set(recs) == expected
    for key, r in recs.items():
        assert r["cell"] in key and key.endswith(f"epoch_{r['epoch']:04d}.pt")
        assert 0 <= r["clean_acc"] <= 1 and 0 <= r["pgd_l2_acc"] <= r["clean_acc"] and r["n_test"] == 64
        assert r["ratio"] == pytest.approx(r["pgd_l2_acc"] / r["clean_acc"])
    assert data["settings"]["eps"] == 1.0 and data["settings"]["steps"] == 3
    # the last epoch's clean accuracy, computed independently of reproduce/evaluate on the test images
    # the evaluation recorded (a stratified subset: 64 of the 2000, every class)
    subset = json.loads((ev / "metrics.json").read_text())["test_subset"]["shapes"]
    idx = subset["indices"]
    assert subset["n"] == 64 and subset["of"] == 2000 and len(set(idx)) == 64
    x, y, _ = aerl_fast.load_dataset("shapes", None, "test")
    assert len(set(y[idx].tolist())) == 10
    xb = torch.from_numpy(x[idx].copy()).permute(0, 3, 1, 2).float() / 255
    yb = torch.from_numpy(y[idx].copy()).long()
    for cell in CELLS:
        model = aerl_fast.load_model(out / "runs" / cell / "epoch_0002.pt")
        with torch.no_grad():
            acc = (model(xb).argmax(1) == yb).double().mean().item()
        assert recs[f"runs/{cell}/epoch_0002.pt"]["clean_acc"] == pytest.approx(acc, abs=1e-9)
    md = (out / "report.md").read_text()
    assert "### Accuracy over epochs, shapes, seed 0" in md
    assert "(eval/shapes/seed0/curves.png)" in md
    assert "| objective | epoch 1 | epoch 2 |" in md and "| sl | " in md and "| rl | " in md
    assert "Not in this report" not in md
    assert len(report["curves"]["shapes/seed0"]) == 4
    # the RL cell beside the SL checkpoint whose clean accuracy is closest to RL's (ties: earlier epoch)
    (matched,) = report["matched_accuracy"]
    rl = next(r for r in report["cells"] if r["objective"] == "rl")
    sl_epochs = {r["epoch"]: r["clean_acc"] for r in recs.values() if r["objective"] == "sl"}
    closest = min(sorted(sl_epochs), key=lambda e: abs(sl_epochs[e] - rl["clean_acc"]))
    assert matched["cell"] == rl["cell"] and matched["sl_epoch"] == closest
    assert matched["sl_clean_acc"] == sl_epochs[closest] and "## At matched clean accuracy" in md


def test_accuracy_over_epochs_is_cached(with_curves, tmp_path, monkeypatch):
    preset, out, _ = with_curves
    ev = out / "eval" / "shapes" / "seed0"
    before = (ev / "curves.json").read_text()
    forbid_stages(monkeypatch, evaluation=False)
    real_run = evaluate.run
    monkeypatch.setattr(evaluate, "run", forbid(monkeypatch, "evaluation"))
    real_eval = reproduce.evaluation.eval_checkpoint
    monkeypatch.setattr(reproduce.evaluation, "eval_checkpoint", forbid(monkeypatch, "curve evaluation"))
    reproduce.main(["--preset", preset, "--out", str(out)])
    assert (ev / "curves.json").read_text() == before
    # a rewritten checkpoint (new mtime) is evaluated again, and only that one (the copy's other
    # folder names make the main evaluation run again: allowed here)
    monkeypatch.setattr(evaluate, "run", real_run)
    copy = tmp_path / "report"
    shutil.copytree(out, copy)
    ckpt = copy / "runs" / CELLS[0] / "epoch_0001.pt"
    later = time.time() + 5
    os.utime(ckpt, (later, later))
    seen = []
    monkeypatch.setattr(reproduce.evaluation, "eval_checkpoint", lambda p, *a: seen.append(p) or real_eval(p, *a))
    reproduce.main(["--preset", preset, "--out", str(copy)])
    assert seen == [ckpt]
    assert json.loads((copy / "eval" / "shapes" / "seed0" / "curves.json").read_text())["checkpoints"] \
        == json.loads(before)["checkpoints"] | {
            f"runs/{CELLS[0]}/epoch_0001.pt": json.loads(before)["checkpoints"][f"runs/{CELLS[0]}/epoch_0001.pt"]
            | {"mtime_ns": ckpt.stat().st_mtime_ns}}


@pytest.mark.parametrize("other_finishes", [True, False])
def test_a_cell_another_process_trains_is_left_to_it_then_waited_for(tmp_path, monkeypatch, other_finishes):
    """Two reproduce processes on one folder: a locked cell is skipped, the others are trained, then
    the locked one is waited for — and trained here if its holder died without finishing it."""
    import fcntl
    import threading
    cells = reproduce.build_cells(reproduce.load_matrix(micro_preset(tmp_path)), None)
    runs = tmp_path / "runs"
    runs.mkdir()
    trained = []

    def finished(run_dir, cfg):
        """A run folder as a finished training leaves it (what reproduce looks at)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_json()))
        (run_dir / "last.pt").write_bytes(b"")
        (run_dir / "summary.json").write_text("{}")

    def fake_run(config, options, log=None):
        trained.append(Path(options.out).name)
        finished(Path(options.out), config)
    monkeypatch.setattr(train, "run", fake_run)
    monkeypatch.setattr(train, "resume", forbid(monkeypatch, "a resume"))

    held = open(runs / f".{cells[0].name}.lock", "a")  # "the other process": its own open file
    fcntl.flock(held, fcntl.LOCK_EX)
    logs = []

    def other_process_ends():
        if other_finishes:
            finished(runs / cells[0].name, cells[0].config)
        fcntl.flock(held, fcntl.LOCK_UN)
        held.close()
    timer = threading.Timer(1.0, other_process_ends)
    timer.start()
    try:
        reproduce.train_cells(cells, runs, logs.append)
    finally:
        timer.join()
    assert trained == [c.name for c in cells[1:]] + ([] if other_finishes else [cells[0].name])
    assert any("another process is training it" in m for m in logs)
    assert all((runs / c.name / "summary.json").is_file() for c in cells)


def test_accuracy_over_epochs_runs_one_pgd_and_nothing_else():
    """The matrix's evaluation (verdict, aa-fast, transfer, ...) must not run once per epoch checkpoint."""
    from aerl_fast.reproduce.evaluation import curve_config
    full = evaluate.EvalConfig(attacks=("fgsm", "aa-fast", "pgd-l2", "pgd-linf"), l2_eps=(0.5, 1.0), linf_eps=(8 / 255,),
                               transfer=True, dynamics=True, landscape=3, masking=True, verdict=True, steps=7)
    one = curve_config(full)
    assert one.attacks == ("pgd-l2",) and one.radii("pgd-l2") == (0.5,)
    assert not (one.verdict or one.transfer or one.dynamics or one.masking or one.landscape)
    assert (one.steps, one.n_test, one.subset_seed) == (7, full.n_test, full.subset_seed)  # the matrix's own PGD
    plain = curve_config(evaluate.EvalConfig(eps=(2.0,)))
    assert plain.attacks == ("pgd-l2",) and plain.radii("pgd-l2") == (2.0,) and not plain.verdict
