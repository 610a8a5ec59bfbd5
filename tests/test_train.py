"""End-to-end training CLI: outputs, bad input, kill-and-resume, load_model."""
import json
import subprocess
import sys

import pytest
import torch

import aerl_fast
from aerl_fast import train as train_mod
from kill_resume import assert_same_weights, crash_and_resume

TINY = ["--dataset", "shapes", "--model", "alicnn", "--width", "0.25", "--train-subset", "480",
        "--batch-size", "32", "--no-progress", "--eval-batch-size", "256"]


def _weights(run_dir, name="last.pt"):
    return torch.load(run_dir / name, weights_only=True)["model"]


@pytest.mark.parametrize("objective", ["sl", "rl-adv"])
def test_cli_outputs(tmp_path, objective, capsys):
    out = tmp_path / "run"
    summary = train_mod.main(TINY + ["--objective", objective, "--epochs", "2", "--out", str(out)])
    for name in ("config.json", "log.jsonl", "best.pt", "last.pt", "summary.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["objective"] == objective and cfg["epochs"] == 2
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2]
    for ln in lines:
        for key in ("epoch", "train_loss", "train_acc", "val_acc", "images_per_s", "epoch_s"):
            assert key in ln and ln[key] is not None
        assert ln["images_per_s"] > 0 and 0 <= ln["train_acc"] <= 1 and 0 <= ln["val_acc"] <= 1
    if objective == "rl-adv":
        assert "train_reward" in lines[0] and "train_loss_adv" in lines[0]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["best_val_acc"] == max(ln["val_acc"] for ln in lines)
    assert 0 <= saved["test_acc"] <= 1 and saved == summary
    assert "done:" in capsys.readouterr().out
    # the public API gives back the best model in eval mode; its test accuracy matches the summary
    model = aerl_fast.load_model(out)
    assert not model.training
    x, y, _ = aerl_fast.load_dataset("shapes", None, "test")
    with torch.no_grad():
        xb = torch.from_numpy(x.copy()).permute(0, 3, 1, 2).float() / 255
        acc = (model(xb).argmax(1) == torch.from_numpy(y.copy())).float().mean().item()
    assert abs(acc - saved["test_acc"]) < 1e-6


def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    args = TINY + ["--objective", "rl", "--epochs", "2", "--checkpoint-minutes", "1e-9"]
    ref = tmp_path / "ref"
    train_mod.main(args + ["--out", str(ref)])

    crashed = tmp_path / "crashed"
    state = crash_and_resume(monkeypatch, args, crashed)  # 15 batches per epoch, a checkpoint after each
    assert state["epoch"] == 0 and 0 < state["step"] < 15
    assert_same_weights(ref, crashed)
    strip = lambda p: [{k: v for k, v in json.loads(ln).items() if k not in ("images_per_s", "epoch_s")}  # noqa: E731
                       for ln in (p / "log.jsonl").read_text().splitlines()]
    assert strip(ref) == strip(crashed)


def test_resume_extends_epochs_and_refuses_other_model(tmp_path, capsys):
    out = tmp_path / "run"
    train_mod.main(TINY + ["--objective", "sl", "--epochs", "1", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        train_mod.main(["--resume", str(out), "--model", "cnn6"])
    assert e.value.code == 2
    assert "--model cnn6 differs from the run's alicnn" in capsys.readouterr().err
    train_mod.main(["--resume", str(out), "--epochs", "2", "--no-progress"])
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_resume_may_switch_loader_and_gives_the_uninterrupted_runs_weights(tmp_path):
    """A run resumed with --loader dali (e.g. moved to where DALI streams the data) ends with the
    weights of the uninterrupted tensor-loader run, bit for bit: both loaders give identical batches."""
    from aerl_fast.data.dali import dali_available
    if not dali_available():
        pytest.skip("nvidia.dali is not installed")
    ref, out = tmp_path / "ref", tmp_path / "switched"
    args = TINY + ["--objective", "rl", "--loader", "tensor", "--device", "cpu"]
    train_mod.main(args + ["--epochs", "2", "--out", str(ref)])
    train_mod.main(args + ["--epochs", "1", "--out", str(out)])
    train_mod.main(["--resume", str(out), "--epochs", "2", "--loader", "dali", "--no-progress"])
    assert json.loads((out / "config.json").read_text())["run_options"]["loader"] == "dali"
    a, b = _weights(ref), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    from aerl_fast.checkpoint import load_checkpoint, save_checkpoint
    from aerl_fast.config import RunOptions, config_from_json
    out = tmp_path / "run"
    train_mod.main(TINY + ["--objective", "sl", "--epochs", "1", "--out", str(out)])
    state = load_checkpoint(out / "last.pt")
    state["model_spec"] = dict(state["model_spec"], name="cnn6")
    state.pop("format")
    save_checkpoint(state, out / "last.pt")
    cfg = config_from_json(json.loads((out / "config.json").read_text()), "config.json")
    with pytest.raises(aerl_fast.checkpoint.CheckpointError, match="checkpoint is for cnn6"):
        train_mod.Trainer(cfg, RunOptions(), out, resume_state=state)


@pytest.mark.parametrize("argv, message", [
    (["--model", "vgg"], "--model must be one of"),
    (["--objective", "ppo"], "--objective must be one of"),
    (["--adv-eps", "-0.1"], "--adv-eps must be >= 0"),
    (["--adv-beta", "-1"], "--adv-beta must be >= 0"),
    (["--explore-eps", "1.5"], "--explore-eps must be in [0, 1]"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--preset", "nope"], "unknown preset 'nope'"),
])
def test_bad_input_is_one_line_error(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_mod.main(argv + ["--out", str(tmp_path / "r"), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "r" / "last.pt").exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        train_mod.main(TINY + ["--out", str(out)])
    assert "already holds files" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "{}"


def test_corrupt_checkpoint_is_reported(tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(b"garbage" * 10)
    with pytest.raises(aerl_fast.checkpoint.CheckpointError, match="x.pt"):
        aerl_fast.load_model(p)


def test_presets_load_and_validate():
    from aerl_fast.config import TrainConfig, load_preset, preset_names
    names = preset_names()
    assert {"cifar10-rl", "cifar10-sl", "cifar100-rl", "cifar100-sl", "imagenet100-rl", "imagenet100-sl"} <= set(names)
    for n in names:
        cfg = TrainConfig(**load_preset(n)).validate()
        assert cfg.dataset in n
    rl = TrainConfig(**load_preset("cifar10-rl"))
    assert (rl.lr, rl.batch_size, rl.epochs, rl.adv_start_epoch, rl.explore_eps, rl.prob_floor, rl.explore) == \
        (1e-4, 256, 600, 400, 0.1, 1e-6, "batch")


def test_amp_falls_back_on_cpu_without_bf16(monkeypatch):
    from aerl_fast import runtime
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    said = []
    assert runtime.amp_dtype(torch.device("cpu"), True, log=said.append) is None
    assert len(said) == 1 and "fp32" in said[0]
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.amp_dtype(torch.device("cpu"), True, log=said.append) is torch.bfloat16
    assert runtime.amp_dtype(torch.device("cpu"), False, log=said.append) is None


def test_help_documents_defaults():
    out = subprocess.run([sys.executable, "-m", "aerl_fast.train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--dataset", "--data-dir", "--model", "--width", "--objective", "--epochs", "--batch-size", "--lr",
                 "--explore-eps", "--explore", "--adv-eps", "--adv-beta", "--adv-start-epoch", "--seed", "--device",
                 "--amp", "--compile", "--out", "--resume", "--preset"):
        assert flag in out
    assert "(default: shapes)" in out and "(default: rl)" in out


def test_cli_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "aerl_fast.train", "--dataset", "npz", "--data-dir",
                        str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "missing.npz" in r.stderr


def test_save_every_keeps_periodic_checkpoints(tmp_path):
    out = tmp_path / "run"
    train_mod.main(TINY + ["--objective", "sl", "--epochs", "2", "--save-every", "1", "--out", str(out)])
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_0001.pt", "epoch_0002.pt"]
    for name in ("epoch_0001.pt", "epoch_0002.pt"):
        model = aerl_fast.load_model(out / name)
        assert not model.training
    assert torch.load(out / "epoch_0001.pt", weights_only=True)["epoch"] == 1
    last, second, first = _weights(out), _weights(out, "epoch_0002.pt"), _weights(out, "epoch_0001.pt")
    assert last.keys() == second.keys()
    for k in last:
        assert torch.equal(last[k], second[k]), k
    assert any(not torch.equal(first[k], last[k]) for k in last)  # the epochs are distinct snapshots


def test_keep_freed_memory_is_glibc_only_and_harmless_elsewhere(monkeypatch):
    import ctypes
    from aerl_fast import runtime
    runtime.keep_freed_memory.cache_clear()
    try:
        import platform
        if platform.libc_ver()[0] == "glibc":
            assert runtime.keep_freed_memory() is True
            runtime.keep_freed_memory.cache_clear()

        def no_libc(*a, **k):
            raise OSError("libc.so.6: cannot open shared object file")
        monkeypatch.setattr(ctypes, "CDLL", no_libc)
        assert runtime.keep_freed_memory() is False  # musl, macOS, ...: nothing changed, no error
    finally:
        runtime.keep_freed_memory.cache_clear()
