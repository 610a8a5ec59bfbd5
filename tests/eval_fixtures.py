"""Tiny trained models for the attack / evaluation / dynamics tests (and bench/bench_attacks.py).

One SL and one RL AliCNN (width 0.25) are trained in-process on the first 1,500 images of the
embedded `shapes` test split (no augmentation, a few hundred steps, ~10 s on 2 cores) and written
as run folders the way `python -m aerl_fast.train` writes them (config.json, summary.json,
best.pt with the same checkpoint keys). They are fixtures, not results: training on the split the
tests attack is deliberate, it gives accurate models quickly so the attacks have work to do.

`trained_runs(root)` builds them once per process (a module-level cache), so several test modules
can share one session's models.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, NamedTuple

import numpy as np
import torch

import aerl_fast
from aerl_fast.checkpoint import save_checkpoint
from aerl_fast.config import TrainConfig
from aerl_fast.models import build_model
from aerl_fast.objectives import ObjectiveConfig, train_step

TRAIN_N = 1500
RECIPES = {"sl": dict(steps=250, lr=3e-3), "rl": dict(steps=400, lr=3e-3)}


class Runs(NamedTuple):
    dirs: Dict[str, Path]        # objective -> run folder
    x: torch.Tensor              # shapes test split, float [N, 3, 32, 32] in [0, 1]
    y: torch.Tensor              # int64 [N]


_CACHE: Dict[str, Runs] = {}


def shapes_test():
    ds = aerl_fast.load_dataset("shapes", None, "test", seed=0)
    x = torch.from_numpy(np.array(ds.images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(), torch.from_numpy(np.array(ds.labels, dtype=np.int64))


def _train(objective, x, y, mean, std, steps, lr, seed=0):
    import os
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see cpu_eval_env(): 2 threads on a busy 2-core machine are ~10x slower
    # the torch references of the fused ops: the same models whether or not Triton's interpreter
    # is on in this process (its RL sampling draws other random numbers), and no interpreter cost
    forced = "AERL_FAST_KERNELS" not in os.environ
    if forced:
        os.environ["AERL_FAST_KERNELS"] = "reference"
    try:
        return _train_steps(objective, x, y, mean, std, steps, lr, seed)
    finally:
        torch.set_num_threads(before)
        if forced:
            os.environ.pop("AERL_FAST_KERNELS", None)


def _train_steps(objective, x, y, mean, std, steps, lr, seed):
    torch.manual_seed(seed)
    model = build_model("alicnn", 10, width=0.25, mean=mean, std=std)
    opt = torch.optim.AdamW(model.parameters(), lr)
    cfg = ObjectiveConfig(kind=objective, explore_eps=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, TRAIN_N, (64,), generator=gen)
        opt.zero_grad(set_to_none=True)
        train_step(model, x[idx], y[idx], cfg, adv_active=False, generator=gen)
        opt.step()
    return model.eval()


def write_run(run_dir: Path, model, objective: str, spec: dict, test_acc: float, **config):
    """A run folder as aerl_fast.train leaves it (only what evaluation reads is meaningful);
    `config` overrides TrainConfig fields (dataset, data_dir, ...)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(**{"model": spec["name"], "width": spec["width"], "objective": objective,
                         "seed": 0, "epochs": 1, **config}).to_json()
    dataset = cfg["dataset"]
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    summary = {"dataset": dataset, "model": spec["name"], "width": spec["width"],
               "objective": objective, "epochs": 1, "best_epoch": 1, "best_val_acc": test_acc,
               "test_acc": test_acc, "num_classes": spec["num_classes"], "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    save_checkpoint({"model_spec": spec, "model": model.state_dict(), "epoch": 1, "step": 0,
                     "best_val_acc": test_acc, "config": cfg, "classes": [str(i) for i in range(10)]},
                    run_dir / "best.pt")


def recipe_key() -> str:
    """Changes whenever the fixtures would train differently (recipes, model or objective code,
    torch version), so a persistent cache never serves stale models."""
    import aerl_fast.models.cnn as cnn
    import aerl_fast.objectives as objectives
    h = hashlib.sha256(json.dumps(RECIPES, sort_keys=True).encode())
    for source in (cnn.__file__, objectives.__file__, __file__):
        h.update(Path(source).read_bytes())
    h.update(torch.__version__.encode())
    h.update(str(TRAIN_N).encode())
    return h.hexdigest()[:16]


def trained_runs(root: Path) -> Runs:
    """The SL and RL runs under `root/<recipe key>/`; trained only if not there yet (pass a
    persistent folder, e.g. pytest's cache dir, to train once across sessions)."""
    key = recipe_key()
    if key in _CACHE:
        return _CACHE[key]
    x, y = shapes_test()
    base = Path(root) / key
    dirs = {obj: base / f"shapes-alicnn-{obj}" for obj in RECIPES}
    if all((d / "best.pt").is_file() and (d / "summary.json").is_file() for d in dirs.values()):
        _CACHE[key] = Runs(dirs, x, y)
        return _CACHE[key]
    px = x[:TRAIN_N].permute(0, 2, 3, 1).reshape(-1, 3)
    mean, std = px.mean(0).tolist(), px.std(0).tolist()
    for objective, recipe in RECIPES.items():
        model = _train(objective, x, y, mean, std, **recipe)
        with torch.no_grad():
            acc = float((model(x[TRAIN_N:]).argmax(1) == y[TRAIN_N:]).double().mean())
        spec = dict(name="alicnn", width=0.25, num_classes=10, mean=mean, std=std, image_size=32)
        write_run(dirs[objective], model, objective, spec, acc)
    _CACHE[key] = Runs(dirs, x, y)
    return _CACHE[key]


try:
    import pytest

    @pytest.fixture(scope="module")
    def cpu_eval_env():
        """One intra-op thread, and the torch reference of the PGD update when Triton's
        interpreter is on, for the attack/evaluation modules.

        Threads: on the shared 2-core machine a second OpenMP thread waits on a busy core; 100
        training steps took 44 s with 2 threads against 3.8 s with 1 (measured).
        Interpreter: tests/kernels sets TRITON_INTERPRET=1 for its process; in a run over all of
        tests/ every CPU PGD update would then go through the interpreter (~4 ms per program, a
        second or more per attack step). The kernel tests check the kernel against this reference;
        here the attacks are under test, so the reference serves (AERL_FAST_KERNELS=reference,
        read by the dispatcher on every call). Both restored afterwards.
        """
        import os
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        from aerl_fast.kernels import pgd_update
        forced = pgd_update.INTERPRETED and "AERL_FAST_KERNELS" not in os.environ
        if forced:
            os.environ["AERL_FAST_KERNELS"] = "reference"
        yield
        if forced:
            os.environ.pop("AERL_FAST_KERNELS", None)
        torch.set_num_threads(before)

    @pytest.fixture(scope="session")
    def tiny_runs(request, tmp_path_factory) -> Runs:
        """The shared SL/RL runs, kept in pytest's cache dir (trained on first use), or in a
        temporary folder when the cache is disabled (-p no:cacheprovider)."""
        cache = getattr(request.config, "cache", None)
        root = cache.mkdir("aerl_eval_runs") if cache is not None else tmp_path_factory.mktemp("runs")
        return trained_runs(Path(root))
    @pytest.fixture(scope="session")
    def tiny_models(tiny_runs) -> Dict[str, torch.nn.Module]:
        """The SL and RL fixture models, loaded once per session (tests must not change them)."""
        return {kind: aerl_fast.load_model(d) for kind, d in tiny_runs.dirs.items()}

    @pytest.fixture(scope="session")
    def held_out(tiny_runs):
        """The test images the fixture models were not trained on (500), and their labels."""
        return tiny_runs.x[TRAIN_N:].clone(), tiny_runs.y[TRAIN_N:].clone()
except ImportError:  # bench scripts import this module without pytest fixtures in mind
    pass
