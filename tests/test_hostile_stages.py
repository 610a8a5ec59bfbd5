"""Hostile use of the stages (train, evaluate, reproduce): divergence, paths and devices, killed
writes, torn logs, models that are not finite, test sets that differ.  Each case ends in a one-line
error (or a clean recovery), nothing non-finite on disk, nothing outside the run folder touched."""
import json
import subprocess
import sys

import pytest
import torch

from aerl_fast import evaluate, train
from aerl_fast.config import RunOptions, TrainConfig
from aerl_fast.errors import ConfigError, UserError

TINY = dict(dataset="shapes", model="alicnn", width=0.125, train_subset=256, batch_size=64)


def _cli(args, cwd=None):
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       cwd=cwd)
    return r.returncode, r.stdout, r.stderr


def _all_finite(path):
    st = torch.load(path, weights_only=True)
    tensors = list(st["model"].values())
    for s in st.get("optimizer", {}).get("state", {}).values():
        tensors += [v for v in s.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


@pytest.mark.parametrize("objective", ["sl", "rl"])
def test_divergence_stops_with_a_message_and_no_nonfinite_checkpoint(objective, tmp_path):
    """A learning rate of 1e6 diverges within the first epoch; with --no-progress and a mid-epoch
    checkpoint timer (the batch-job setting) no NaN weights may reach last.pt, the message names the
    step and the way out, and a kept checkpoint resumes with a lower --lr."""
    bad = tmp_path / "bad"
    code, _, err = _cli(["aerl_fast.train", "--dataset", "shapes", "--width", "0.125", "--train-subset", "256",
                         "--batch-size", "64", "--objective", objective, "--epochs", "2", "--lr", "1e6",
                         "--no-progress", "--checkpoint-minutes", "1e-9", "--out", str(bad)])
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and last.startswith("error: training diverged"), err
    assert "step" in last and "--lr" in last
    for p in bad.glob("*.pt"):
        assert _all_finite(p), p
    if (bad / "last.pt").exists():  # a kept checkpoint: a resume at a lower rate is accepted and recorded (after
        # a step at 1e6 the finite weights may be too far gone to recover: then it stops cleanly again)
        code, _, err = _cli(["aerl_fast.train", "--resume", str(bad), "--lr", "1e-4", "--no-progress"])
        assert code in (0, 2) and "Traceback" not in err, err
        assert code == 0 or "training diverged" in err.strip().splitlines()[-1]
        history = json.loads((bad / "config.json").read_text())["resume_history"]
        assert history[-1]["field"] == "lr" and history[-1]["to"] == 1e-4
        for p in bad.glob("*.pt"):
            assert _all_finite(p), p


def test_resume_may_lower_the_learning_rate_but_not_raise_it(tmp_path):
    """Raising --lr on resume is refused; lowering it is accepted, recorded, and used from that epoch on."""
    out = tmp_path / "run"
    train.run(TrainConfig(**TINY, objective="rl", epochs=1, lr=1e-3), RunOptions(out=str(out), progress=False))
    good = torch.load(out / "last.pt", weights_only=True)["model"]
    code, _, err = _cli(["aerl_fast.train", "--resume", str(out), "--epochs", "3", "--no-progress",
                         "--checkpoint-minutes", "1e-9"], cwd=tmp_path)
    assert code == 0, err  # same lr: trains on
    code, _, err = _cli(["aerl_fast.train", "--resume", str(out), "--epochs", "4", "--lr", "1e6", "--no-progress"])
    assert code == 2 and "may only be lowered" in err and "Traceback" not in err
    code, _, err = _cli(["aerl_fast.train", "--resume", str(out), "--epochs", "4", "--lr", "1e-4", "--no-progress"])
    assert code == 0, err
    history = json.loads((out / "config.json").read_text())["resume_history"]
    assert (history[-1]["field"], history[-1]["from"], history[-1]["to"], history[-1]["epoch"]) == ("lr", 1e-3, 1e-4, 3)
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert log[2]["lr"] == pytest.approx(1e-3) and log[3]["lr"] == pytest.approx(1e-4)
    assert any(not torch.equal(v, good[k]) for k, v in torch.load(out / "last.pt", weights_only=True)["model"].items())


def test_evaluate_refuses_a_model_with_nonfinite_weights(tmp_path):
    from aerl_fast.models import build_model
    model = build_model("alicnn", 10, width=0.125).eval()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    with pytest.raises(UserError, match="weights are not finite"):
        evaluate.run([model], (x, y), evaluate.EvalConfig(masking=False), evaluate.EvalOptions(progress=False))


def test_evaluate_refuses_nonfinite_logits():
    class Inf(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 4), float("inf"))
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 4
    with pytest.raises(UserError, match="logits are not finite"):
        evaluate.run([Inf()], (x, y), evaluate.EvalConfig(masking=False), evaluate.EvalOptions(progress=False))


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "no CUDA device is available" if not torch.cuda.is_available() else None),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N"),
])
def test_devices(args, message, tmp_path):
    if message is None:
        pytest.skip("this machine has CUDA")
    code, _, err = _cli(["aerl_fast.train", *args, "--out", str(tmp_path / "r"), "--epochs", "1"])
    assert code == 2 and "Traceback" not in err and message in err.strip().splitlines()[-1]
    assert not (tmp_path / "r").exists()  # a failed start leaves no half-made folder
    code, _, err = _cli(["aerl_fast.evaluate", str(tmp_path), *args, "--out", str(tmp_path / "e")])
    assert code == 2 and "Traceback" not in err


def test_out_that_is_a_file_or_read_only(tmp_path):
    f = tmp_path / "file"
    f.write_text("precious")
    code, _, err = _cli(["aerl_fast.train", "--out", str(f), "--epochs", "1"])
    assert code == 2 and "is an existing file" in err and f.read_text() == "precious"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if (ro / "x").parent.stat().st_mode & 0o200 or __import__("os").geteuid() == 0:
            pytest.skip("running as root: permissions do not bind")
        code, _, err = _cli(["aerl_fast.train", "--out", str(ro / "run"), "--epochs", "1", "--train-subset", "128",
                             "--width", "0.125", "--no-progress"])
        assert code == 2 and "cannot write the run folder" in err and "Traceback" not in err
    finally:
        ro.chmod(0o700)


def test_overwrite_replaces_only_a_run_of_ours(tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="does not hold an aerl_fast run"):
        train.run(TrainConfig(**TINY, epochs=1), RunOptions(out=str(foreign), overwrite=True, progress=False))
    assert (foreign / "chapter1.tex").read_text() == "years of work"


def test_a_failed_start_leaves_no_folder_and_the_rerun_works(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError):
        train.run(TrainConfig(dataset="npz", data_dir=str(tmp_path / "missing.npz"), epochs=1),
                  RunOptions(out=str(out), progress=False))
    assert not out.exists()
    train.run(TrainConfig(**TINY, epochs=1), RunOptions(out=str(out), progress=False))
    assert (out / "summary.json").is_file()


def test_resume_cleans_stale_temp_files_and_repairs_a_torn_log(tmp_path):
    out = tmp_path / "run"
    train.run(TrainConfig(**TINY, epochs=1), RunOptions(out=str(out), progress=False))
    (out / "last.pt.123.tmp").write_bytes(b"half a checkpoint")          # a kill during torch.save
    (out / ".config.json.99.tmp").write_text("{")                        # a kill during a JSON write
    with open(out / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')                                 # a kill mid-line
    train.resume(out, changes={"epochs": 2})
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]


def test_log_line_of_an_epoch_is_written_before_its_checkpoint(tmp_path, monkeypatch):
    """A kill between the two leaves a log line the checkpoint does not cover (dropped on resume),
    never a checkpoint whose epoch has no log line."""
    from aerl_fast.train import trainer as trainer_mod
    out = tmp_path / "run"
    seen = []
    real = trainer_mod.save_checkpoint

    def spy(state, path):
        lines = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []
        seen.append((state["epoch"], state["step"], len(lines)))
        return real(state, path)
    monkeypatch.setattr(trainer_mod, "save_checkpoint", spy)
    train.run(TrainConfig(**TINY, epochs=2), RunOptions(out=str(out), progress=False, checkpoint_minutes=0))
    assert seen and all(lines >= epoch for epoch, step, lines in seen if step == 0)


def test_transfer_across_different_data_folders_names_the_folder_and_the_way_out(tmp_path):
    import numpy as np
    from eval_fixtures import write_run
    from aerl_fast.models import build_model
    runs = []
    for name in ("a", "b"):
        data = tmp_path / f"{name}.npz"
        rng = np.random.default_rng(0)
        np.savez(data, X_train=rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8), y_train=np.arange(10) % 5,
                 X_test=rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8), y_test=np.arange(10) % 5)
        spec = dict(name="alicnn", width=0.125, num_classes=5, mean=[0.5] * 3, std=[0.25] * 3, image_size=32)
        write_run(tmp_path / name, build_model("alicnn", 5, width=0.125), "sl", spec, 0.2, dataset="npz",
                  data_dir=str(data))
        runs.append(str(tmp_path / name))
    with pytest.raises(UserError) as e:
        evaluate.run(runs, None, evaluate.EvalConfig(transfer=True, steps=1, masking=False),
                     evaluate.EvalOptions(progress=False))
    msg = str(e.value)
    assert "data folder differs" in msg and "a.npz" in msg and "b.npz" in msg and "--data-dir" in msg
