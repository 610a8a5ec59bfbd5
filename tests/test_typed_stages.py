"""The three stages as library functions: train.run / resume, evaluate.run on any nn.Module, and
reproduce on a cluster engine (submitit's local executor), plus the old run-folder format."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from aerl_fast import evaluate, reproduce, train
from aerl_fast.config import RunOptions, TrainConfig
from aerl_fast.errors import ConfigError, UserError

FIXTURE = Path(__file__).parent / "fixtures" / "run_format1"
TINY = dict(dataset="shapes", model="alicnn", width=0.125, train_subset=256, batch_size=64, epochs=1)


def _digest(state_dict) -> str:
    h = hashlib.sha256()
    for k, v in sorted(state_dict.items()):
        h.update(k.encode())
        h.update(v.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_a_run_folder_of_the_old_format_resumes_to_the_old_codes_weights(tmp_path):
    """config.json with the options at the top level and a checkpoint whose config holds them too
    (written by the code before TrainConfig/RunOptions were split) resume, and end exactly where an
    uninterrupted run of the old code ended (digest in the fixture's README)."""
    run = tmp_path / "old"
    shutil.copytree(FIXTURE, run)
    shutil.copy(run / "last.pt", run / "best.pt")
    expected = (FIXTURE / "README.md").read_text().split("is\n")[1].split(":")[0].strip()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)   # the digest's: the CPU kernels' reductions split by thread count
    try:
        summary = train.resume(run, changes={"epochs": 2})
    finally:
        torch.set_num_threads(threads)
    assert summary.epochs == 2 and summary.objective == "rl-adv"
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and _digest(state["model"]) == expected
    saved = json.loads((run / "config.json").read_text())
    assert saved["epochs"] == 2 and "device" not in saved and saved["run_options"]["device"] == "cpu"
    assert saved["resume_history"] == [{"field": "epochs", "from": 1, "to": 2, "epoch": 1, "step": 0}]


def test_train_run_and_resume_from_python(tmp_path):
    out = tmp_path / "run"
    summary = train.run(TrainConfig(**TINY, objective="sl"), RunOptions(out=str(out), progress=False, device="cpu"))
    assert isinstance(summary, train.RunSummary) and summary.run_dir == str(out)
    assert json.loads((out / "summary.json").read_text()) == summary.to_json()
    saved = json.loads((out / "config.json").read_text())
    assert set(TrainConfig().to_json()) <= set(saved) and saved["run_options"]["progress"] is False
    # a non-resumable field cannot change; the rate may only go down, and the change is recorded
    with pytest.raises(ConfigError, match="--width 0.25 differs from the run's 0.125"):
        train.resume(out, changes={"width": 0.25})
    with pytest.raises(ConfigError, match="--lr 0.01 is above the run's 0.001"):
        train.resume(out, changes={"lr": 1e-2})
    again = train.resume(out, changes={"epochs": 2, "lr": 1e-4})
    assert again.epochs == 2
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 1e-4
    assert [(h["field"], h["from"], h["to"], h["epoch"]) for h in saved["resume_history"]] == \
        [("epochs", 1, 2, 1), ("lr", 1e-3, 1e-4, 1)]
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["lr"] == pytest.approx(1e-4)


def test_run_does_not_change_the_callers_objects(tmp_path):
    cfg, opts = TrainConfig(**TINY, objective="sl"), RunOptions(out=str(tmp_path / "r"), progress=False)
    before = (cfg.to_json(), opts.to_json())
    train.run(cfg, opts)
    assert (cfg.to_json(), opts.to_json()) == before


def test_evaluate_a_users_own_module_on_given_tensors():
    """A torchvision ResNet-18 with random weights (10 classes), images and labels as tensors: the
    evaluation needs no run folder, no dataset, and leaves the module as it was."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(24, 3, 32, 32)
    y = torch.arange(24) % 10
    cfg = evaluate.EvalConfig(attacks=("pgd-l2", "fgsm"), l2_eps=(0.25,), linf_eps=(2 / 255,), steps=3, n_test=24,
                              batch_size=12, masking=False)
    res = evaluate.run([model], (x, y), cfg, evaluate.EvalOptions(device="cpu", progress=False))
    m = res.models[0]
    with torch.no_grad():
        clean = (model(x).argmax(1) == y)
    assert m.n == 24 and torch.equal(m.clean_ok, clean)
    for label in ("pgd-l2", "fgsm"):
        out = m.attacks[label]
        assert out.robust.shape == (1, 24) and not bool((out.robust[0] & ~clean).any())
        assert out.acc[0] == pytest.approx(float(out.robust.double().mean()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and res.test_sets["given"]["source"] == "tensors given"


def test_evaluate_refuses_images_outside_the_unit_box():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    y = torch.arange(6) % 4
    with pytest.raises(UserError, match="divide by 255"):
        evaluate.run([model], (torch.rand(6, 3, 8, 8) * 255, y), evaluate.EvalConfig(masking=False))
    with pytest.raises(UserError, match="normalisation inside the model"):
        evaluate.run([model], (torch.randn(6, 3, 8, 8), y), evaluate.EvalConfig(masking=False))


def test_the_test_subset_is_stratified_and_the_same_for_every_model():
    """A class-ordered split (as image folders and many .npz files are): the first N would cover a
    few classes; the subset covers all of them in proportion, with exactly N images."""
    from aerl_fast.data.split import stratified_subset
    labels = np.repeat(np.arange(100), 50)            # 5000 images ordered by class
    idx = stratified_subset(labels, 1000, seed=0)
    assert len(idx) == 1000 and len(set(idx.tolist())) == 1000
    assert np.all(np.bincount(labels[idx], minlength=100) == 10)
    assert np.array_equal(idx, stratified_subset(labels, 1000, seed=0))
    assert not np.array_equal(idx, stratified_subset(labels, 1000, seed=1))
    # uneven classes: largest remainders, total exact, each class within one of its share
    labels = np.repeat(np.arange(7), [5, 90, 33, 1, 40, 12, 19])
    for n in (1, 13, 50, 199):
        idx = stratified_subset(labels, n, seed=3)
        counts = np.bincount(labels[idx], minlength=7)
        share = n * np.bincount(labels) / len(labels)
        assert counts.sum() == n and np.all(np.abs(counts - share) < 1)


def _cluster_preset(tmp):
    preset = {"objectives": ["sl", "rl"], "models": [{"name": "alicnn", "width": 0.125}], "datasets": ["shapes"],
              "seeds": [0], "train": {"epochs": 1, "train_subset": 256, "batch_size": 64, "device": "cpu",
                                      "checkpoint_minutes": 0},
              "eval": {"eps": 1.0, "steps": 2, "n_test": 32, "dynamics_n": 8, "batch_size": 32, "masking": False,
                       "verdict": False}}
    path = tmp / "cluster.json"
    path.write_text(json.dumps(preset))
    return str(path)


@pytest.mark.slow
def test_reproduce_through_submitit_runs_each_cell_as_its_own_process(tmp_path, monkeypatch):
    """submitit's local executor: two cells trained as separate processes, the evaluation as a job,
    the report written here; a second invocation submits nothing."""
    pytest.importorskip("submitit")
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("cells must train in their own processes"))
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: pytest.fail("the evaluation must run as a job"))
    out = tmp_path / "report"
    preset = _cluster_preset(tmp_path)
    logs = []
    report = reproduce.run(preset, out=out, cluster=reproduce.ClusterOptions(launcher="submitit-local", max_retries=0),
                           log=logs.append)
    names = ["shapes-alicnnx0.125-sl-s0", "shapes-alicnnx0.125-rl-s0"]
    assert [r["cell"] for r in report["cells"]] == names
    assert all((out / "runs" / n / "summary.json").is_file() for n in names)
    assert (out / "report.md").is_file() and (out / "eval" / "shapes" / "seed0" / "metrics.json").is_file()
    assert any(m.startswith("submitted 2 cell job(s)") for m in logs)
    assert any(m.startswith("submitted 1 evaluation job(s)") for m in logs)
    assert len(list((out / "jobs").glob("*_log.out"))) == 3  # two cells and one evaluation, each a process
    logs.clear()
    reproduce.run(preset, out=out, cluster=reproduce.ClusterOptions(launcher="submitit-local"), log=logs.append)
    assert not any(m.startswith("submitted") for m in logs), logs
    assert "2 cells done: no training job to submit" in logs and "evaluations cached: no evaluation job to submit" in logs


def test_slurm_launcher_needs_a_partition_and_submitit(tmp_path, capsys, monkeypatch):
    preset = _cluster_preset(tmp_path)
    with pytest.raises(SystemExit):
        reproduce.main(["--preset", preset, "--out", str(tmp_path / "o"), "--launcher", "slurm"])
    assert "--launcher slurm needs --slurm-partition" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "submitit", None)
    with pytest.raises(SystemExit):
        reproduce.main(["--preset", preset, "--out", str(tmp_path / "o"), "--launcher", "submitit-local"])
    assert 'pip install "aerl_fast[cluster]"' in capsys.readouterr().err


@pytest.mark.slow
def test_aa_fast_sharded_over_two_processes_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m aerl_fast.evaluate --attack aa-fast`: each process attacks its
    shard, rank 0 writes the report, and every sample's outcome (robust, the stage that broke it, its
    passes) equals the single-process run's."""
    import csv
    import subprocess
    import sys
    run = tmp_path / "run"
    train.run(TrainConfig(**TINY, objective="sl"), RunOptions(out=str(run), progress=False, device="cpu"))
    common = [str(run), "--attack", "aa-fast", "--eps", "0.5", "--aa-steps", "5", "--aa-queries", "40", "--n-test",
              "40", "--batch-size", "16", "--device", "cpu", "--no-progress", "--no-masking"]
    one = subprocess.run([sys.executable, "-m", "aerl_fast.evaluate", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert one.returncode == 0, one.stderr
    from test_distributed import _env, _torchrun_cmd  # the project's way to launch torchrun in tests
    two = subprocess.run(_torchrun_cmd("-m", "aerl_fast.evaluate", *common, "--out", str(tmp_path / "two")),
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, env=_env(), timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]

    def rows(folder):
        with open(folder / "per_sample" / "run.csv") as f:
            return list(csv.DictReader(f))
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert len(a) == 40 and a == b
    assert any(r["aa-fast-l2@0.5_broken_by"] for r in a)  # something broke: the comparison has content
