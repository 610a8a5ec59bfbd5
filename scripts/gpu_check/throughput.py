"""Step "train" of scripts/gpu_check.sh: training throughput of the train CLI on the embedded data.

    python -m gpu_check.throughput --out OUT [--device cuda] [--small] [--budget SECONDS]

cnn6 w1 (the study's network) and alicnn w1 at batch 256, RL and RL-adv, eager fp32 / bf16 /
compiled bf16 (channels_last throughout: the trainer's CUDA layout), images/s of the last epoch in
log.jsonl (the first one includes warm-up and compilation).  Runs go in order of importance while
the step's budget lasts; the rest are recorded as not run.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_check.figures import TRAIN_MODES, train_key
from gpu_check.record import NotRun, StepRecord, step_args

PLAN = [("cnn6", "rl", "eager fp32"), ("cnn6", "rl", "bf16"), ("alicnn", "rl", "eager fp32"),
        ("alicnn", "rl", "bf16"), ("cnn6", "rl-adv", "bf16"), ("alicnn", "rl-adv", "bf16"),
        ("cnn6", "rl", "compiled bf16"), ("alicnn", "rl", "compiled bf16"),
        ("cnn6", "rl-adv", "eager fp32"), ("alicnn", "rl-adv", "eager fp32"),
        ("cnn6", "rl-adv", "compiled bf16")]  # alicnn rl-adv compiled: the "first" step's run
NEEDS_S = {"eager fp32": 20, "bf16": 20, "compiled bf16": 75}  # least time worth starting a run with


def run_dir(out, model, objective, mode) -> Path:
    return Path(out) / "runs" / f"train-{model}-{objective}-{mode.replace(' ', '-')}"


def train(model, objective, mode, device, out, timeout, small) -> float:
    """images/s of the last epoch of one train CLI run."""
    folder = run_dir(out, model, objective, mode)
    size = ["--width", "0.25", "--epochs", "1", "--batch-size", "64", "--train-subset", "256"] if small \
        else ["--width", "1.0", "--epochs", "3", "--batch-size", "256"]
    cmd = [sys.executable, "-m", "aerl_fast.train", "--dataset", "shapes", "--model", model,
           "--objective", objective, *size, "--device", str(device), "--out", str(folder),
           "--overwrite", "--no-progress", "--checkpoint-minutes", "0", *TRAIN_MODES[mode]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    (folder.parent / f"{folder.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    epochs = [json.loads(ln) for ln in (folder / "log.jsonl").read_text().splitlines() if ln.strip()]
    return epochs[-1]["images_per_s"]


def main(argv=None):
    args = step_args(__doc__, argv, 105)
    end = time.monotonic() + args.budget - 3
    device = torch.device(args.device)
    rec = StepRecord(args.out, "train", str(device))
    for model, objective, mode in [("alicnn", "rl", "eager fp32")] if args.small else PLAN:
        left = end - time.monotonic()

        def one():
            if left < NEEDS_S[mode]:
                raise NotRun(f"{max(left, 0):.0f} s left of the step's budget")
            rate = train(model, objective, mode, device, args.out, left, args.small)
            rec.figure(train_key(model, objective, mode), round(rate), "img/s", "last epoch")
            return f"{rate:.0f} img/s"
        rec.check(f"train {model} {objective} {mode}", one)
    return rec


if __name__ == "__main__":
    sys.exit(1 if main().failed else 0)
