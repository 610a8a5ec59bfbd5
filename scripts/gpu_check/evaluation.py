"""Step "eval" of scripts/gpu_check.sh: attack throughput on 1000 test images of the embedded data.

    python -m gpu_check.evaluation --out OUT [--device cuda] [--small] [--budget SECONDS]

PGD-L2 (eps 1, step 0.1, 100 steps) on cnn6 w1 and alicnn w1, last iterate (fixed work) and with
early stopping, on the "train" step's RL runs when they exist (random weights otherwise, said);
then the AutoAttack-grade cascade through `python -m aerl_fast.evaluate --attack aa-fast` when its
--help lists it (wall time, start-up included), "not present" otherwise.
"""
from __future__ import annotations

import subprocess
import sys
import time

import torch

import aerl_fast
from aerl_fast.attacks import pgd
from aerl_fast.models import build_model
from aerl_fast.runtime import fast_eval_copy
from gpu_check.record import NotRun, Skip, StepRecord, step_args
from gpu_check.throughput import run_dir


def _model(out, name, device, small, rec):
    folder = run_dir(out, name, "rl", "eager fp32")
    if (folder / "best.pt").is_file():
        return aerl_fast.load_model(folder, device=device), folder
    rec.note(f"{name}: no trained run from the train step; PGD timed on random weights")
    torch.manual_seed(0)
    return build_model(name, 10, width=0.25 if small else 1.0).to(device).eval(), None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pgd_rate(model, x, y, steps, early_stop, device) -> float:
    model = fast_eval_copy(model)
    kw = dict(eps=1.0, step=0.1, norm="l2", early_stop=early_stop, seed=0)
    pgd(model, x[:8], y[:8], steps=2, **kw)  # warm-up: kernels compiled, first launches checked
    _sync(device)
    t0 = time.perf_counter()
    pgd(model, x, y, steps=steps, **kw)
    _sync(device)
    return x.shape[0] / (time.perf_counter() - t0)


def aa_fast(out, folder, n, device, timeout) -> float:
    helptext = subprocess.run([sys.executable, "-m", "aerl_fast.evaluate", "--help"],
                              capture_output=True, text=True, timeout=60).stdout
    if "aa-fast" not in helptext:
        raise NotRun("aa-fast not present in aerl_fast.evaluate")
    if folder is None:
        raise Skip("no trained run to evaluate")
    cmd = [sys.executable, "-m", "aerl_fast.evaluate", str(folder), "--attack", "aa-fast", "--eps",
           "1.0", "--n-test", str(n), "--device", str(device), "--out", f"{out}/eval-aa-fast",
           "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    (out / "eval-aa-fast.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return n / wall


def main(argv=None):
    from pathlib import Path
    args = step_args(__doc__, argv, 45)
    end = time.monotonic() + args.budget - 3
    out, device = Path(args.out), torch.device(args.device)
    rec = StepRecord(out, "eval", str(device))
    n, steps = (16, 3) if args.small else (1000, 100)
    test = aerl_fast.load_dataset("shapes", None, "test")
    x = torch.as_tensor(test.images[:n].copy()).permute(0, 3, 1, 2).float().div(255).to(device)
    y = torch.as_tensor(test.labels[:n].copy()).to(device)
    folders = {}
    for name in ("alicnn", "cnn6"):
        model, folders[name] = _model(out, name, device, args.small, rec)
        for early in (False, True) if name == "alicnn" else (False,):
            key = f"pgd_l2_100{'_early_stop' if early else ''} {name}"

            def one():
                rate = pgd_rate(model, x, y, steps, early, device)
                rec.figure(key, round(rate), "img/s", f"{n} images, {steps} steps")
                return f"{rate:.0f} img/s"
            rec.check(key, one)

    def cascade():
        rate = aa_fast(out, folders["alicnn"], n, device, max(10.0, end - time.monotonic()))
        rec.figure("aa_fast alicnn", round(rate, 1), "img/s", "wall time of the CLI")
        return f"{rate:.1f} img/s"
    rec.check("aa_fast alicnn", cascade)
    return rec


if __name__ == "__main__":
    sys.exit(1 if main().failed else 0)
