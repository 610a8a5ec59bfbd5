"""Kill a training run right after one of its checkpoints and resume it: the training tests' check
that --resume ends with the uninterrupted run's weights."""
import pytest
import torch

from aerl_fast import train as train_mod
from aerl_fast.train import trainer as trainer_mod  # the module whose save_checkpoint the loop calls


def crash_and_resume(monkeypatch, args, run_dir, after_saves=7):
    """Train `args` into `run_dir`, crash right after its `after_saves`-th checkpoint (the caller's
    --checkpoint-minutes decides where that falls), then --resume it.  Returns the checkpoint
    state the crash left."""
    real_save = trainer_mod.save_checkpoint
    calls = {"n": 0}

    def crash_after(state, path):
        real_save(state, path)
        calls["n"] += 1
        if calls["n"] == after_saves:
            raise RuntimeError("simulated crash")
    monkeypatch.setattr(trainer_mod, "save_checkpoint", crash_after)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_mod.main(args + ["--out", str(run_dir)])
    monkeypatch.setattr(trainer_mod, "save_checkpoint", real_save)
    state = torch.load(run_dir / "last.pt", weights_only=True)
    train_mod.main(["--resume", str(run_dir), "--no-progress"])
    return state


def assert_same_weights(run_a, run_b, name="last.pt"):
    a = torch.load(run_a / name, weights_only=True)["model"]
    b = torch.load(run_b / name, weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
