"""The one-line bugs a reviewer planted by hand (issue 18), each in a copy of the tree, against the
tests that should catch it. Exit status 1 when any survives.

    python scripts/planted_bugs.py          # about 2 minutes on a 2-core CPU

Complements `mutmut run` (docs/mutation-testing.md): these are the bugs that once survived the whole
suite, named after what a user would see.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

M = [  # (name, file, old, new)
    ("unpickler admits builtins.getattr", "aerl_fast/data/safe_pickle.py",
        '    ("numpy", "ndarray"): "_ndarray",\n', '    ("numpy", "ndarray"): "_ndarray",\n    ("builtins", "getattr"): "_encode",\n'),
    ("saturation flag always fires", "aerl_fast/analysis/masking.py",
        "    flagged = share > max_share\n", "    flagged = True\n"),
    ("epsilon-curve tolerance sign flipped", "aerl_fast/analysis/masking.py",
        "if a1 > a0 + tol]", "if a1 > a0 - tol]"),
    ("zero-gradient count counts any zero pixel", "aerl_fast/analysis/masking.py",
        "zero += (g.flatten(1).abs().amax(1) == 0).sum()", "zero += (g.flatten(1) == 0).any(1).sum()"),
    ("transfer masked with the crafting model's clean set", "aerl_fast/attacks/transfer.py",
        "& clean_ok[b, i:i + batch_size]", "& clean_ok[a, i:i + batch_size]"),
    ("transfer matrix transposed", "aerl_fast/attacks/transfer.py",
        "per_sample[a, b, i:i + xb.shape[0]] = ok.cpu()", "per_sample[b, a, i:i + xb.shape[0]] = ok.cpu()"),
    ("early stop ignores targeted", "aerl_fast/attacks/gradient.py",
        "hit = fooled_by(logits.detach(), y, targeted)", "hit = fooled_by(logits.detach(), y)"),
    ("validation split floors instead of rounds", "aerl_fast/data/split.py",
        "k = int(round(val_frac * n))", "k = int(val_frac * n)"),
    ("linear decay ends at 0.9x", "aerl_fast/optim.py",
        "return 1.0 - (1.0 - cfg.final_lr_frac) * min(1.0, frac)", "return 1.0 - 0.1 * min(1.0, frac)"),
    ("adversarial term starts one epoch late", "aerl_fast/train/trainer.py",
        "adv_active = self.epoch >= cfg.adv_start_epoch", "adv_active = self.epoch > cfg.adv_start_epoch"),
    ("checkpoint written in place (not atomic)", "aerl_fast/checkpoint.py",
        'fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)',
        'fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), str(path)'),
]
TESTS = ["tests/test_safe_pickle.py", "tests/test_payloads.py", "tests/test_masking_checks.py",
         "tests/test_verdict_logic.py", "tests/test_transfer.py", "tests/test_early_stop.py", "tests/test_split.py",
         "tests/test_optim.py", "tests/test_trainer_steps.py", "tests/test_checkpoint.py", "tests/test_data_sources.py"]


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    for so in (ROOT / "aerl_fast").glob("_C*.so"):   # the built extension, when there is one
        shutil.copy2(so, dest / "aerl_fast" / so.name)


def main() -> int:
    survived = 0
    with tempfile.TemporaryDirectory(prefix="planted_") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tree))
        for name, f, old, new in M:
            p = tree / f
            text = p.read_text()
            if old not in text:
                print(f"STALE: {name}: the line it changes is gone from {f}; update this script")
                survived += 1
                continue
            p.write_text(text.replace(old, new, 1))
            t = time.time()
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
                                *TESTS], cwd=tree, capture_output=True, text=True, env=env)
            p.write_text(text)
            first = next((ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")), "")
            survived += r.returncode == 0
            print(f"{'caught' if r.returncode else 'SURVIVED'} ({time.time() - t:.0f} s): {name}  {first[:120]}",
                  flush=True)
    print(f"{len(M) - survived} of {len(M)} planted bugs caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
