"""Evaluating the matrix: one `aerl_fast.evaluate.run` per (dataset, seed) group of cells, and the
clean / PGD accuracy of every periodic checkpoint (accuracy over epochs).

Both are cached: a group's evaluation while its metrics.json is newer than every best.pt it covers
and was made with the same EvalConfig (a hash of it, with the data folder and the cells); a
checkpoint's accuracy while its path and modification time are unchanged (curves.json)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

from aerl_fast import evaluate
from aerl_fast.evaluate import EvalConfig, EvalOptions

from .figures import CURVES_FILE, plot_epoch_curves
from .matrix import Cell

STAMP = "reproduce_eval.json"


def groups(cells: List[Cell]) -> Dict[tuple, List[Cell]]:
    out: Dict[tuple, List[Cell]] = {}
    for c in cells:
        out.setdefault((c.ds, c.seed), []).append(c)
    return out


def eval_dir(root: Path, ds: str, seed: int) -> Path:
    return root / "eval" / ds / f"seed{seed}"


def eval_key(config: EvalConfig, run_dirs: List[Path], data_dir: Optional[str]) -> str:
    """What a cached evaluation must match: the typed config, the data folder and the cells."""
    blob = json.dumps({"config": config.to_json(), "data_dir": data_dir, "runs": [Path(r).name for r in run_dirs]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def eval_cached(out: Path, run_dirs: List[Path], key: str) -> bool:
    metrics, stamp = out / "metrics.json", out / STAMP
    if not (metrics.is_file() and stamp.is_file()):
        return False
    try:
        if json.loads(stamp.read_text()).get("key") != key:
            return False
    except (json.JSONDecodeError, OSError):
        return False
    t = metrics.stat().st_mtime
    return all((r / "best.pt").is_file() and (r / "best.pt").stat().st_mtime < t for r in run_dirs)


def evaluate_group(members: List[Cell], root: Path, config: EvalConfig, data_dir: Optional[str], log=print,
                   device: str = "auto") -> Path:
    """Evaluate one (dataset, seed) group unless cached; returns its folder (metrics.json inside)."""
    ds, seed = members[0].ds, members[0].seed
    out = eval_dir(root, ds, seed)
    run_dirs = [root / "runs" / c.name for c in members]
    key = eval_key(config, run_dirs, data_dir)
    if eval_cached(out, run_dirs, key):
        log(f"evaluation {ds} seed {seed}: cached ({out / 'metrics.json'})")
        return out
    log(f"evaluation {ds} seed {seed}: {len(members)} models -> {out}")
    options = EvalOptions(device=device, data_dir=data_dir, progress=False, out=str(out), overwrite=True)
    results = evaluate.run([str(r) for r in run_dirs], None, config, options, log=log)
    evaluate.write_report(results, out)
    (out / STAMP).write_text(json.dumps({"key": key, "config": config.to_json(), "data_dir": data_dir}, indent=2) + "\n")
    return out


def evaluate_groups(cells: List[Cell], root: Path, config: EvalConfig, data_dir, log) -> Dict[tuple, dict]:
    results = {}
    for (ds, seed), members in groups(cells).items():
        out = evaluate_group(members, root, config, data_dir, log)
        results[(ds, seed)] = json.loads((out / "metrics.json").read_text())
    return results


def epoch_checkpoints(run_dir: Path) -> List[Path]:
    """The periodic checkpoints (train --save-every) of a run, in epoch order."""
    return sorted(run_dir.glob("epoch_[0-9]*.pt"), key=lambda p: int(p.stem.split("_", 1)[1]))


def curve_config(config: EvalConfig) -> EvalConfig:
    """The accuracy-over-epochs attack: the matrix's PGD-L2 at its first radius, nothing else (no other
    attack, no analysis, no verdict: one PGD per epoch checkpoint)."""
    return replace(config, attacks=("pgd-l2",), l2_eps=(config.radii("pgd-l2")[0],), eps=(), linf_eps=(),
                   transfer=False, dynamics=False, landscape=0, masking=False, verdict=False).validate()


def eval_checkpoint(path: Path, test_set, config: EvalConfig) -> dict:
    """Clean and PGD-L2 accuracy (correct clean and under attack) of one checkpoint file on `test_set`
    (x, y), with aerl_fast.evaluate's own code."""
    res = evaluate.run([str(path)], test_set, config, EvalOptions(progress=False))
    m = res.models[0]
    return {"clean_acc": m.clean_acc, "pgd_l2_acc": m.attacks["pgd-l2"].acc[0], "n_test": m.n}


def evaluate_curves(cells: List[Cell], root: Path, config: EvalConfig, data_dir, log) -> Dict[tuple, dict]:
    """Accuracy of every epoch_*.pt of every cell, per (dataset, seed), cached in
    eval/<dataset>/seed<s>/curves.json by checkpoint path and modification time (and settings)."""
    from aerl_fast.evaluate.inputs import data_key, load_entries, load_test_set  # noqa: PLC0415
    from aerl_fast.runtime import resolve_device  # noqa: PLC0415

    one = curve_config(config)
    sig = {**one.to_json(), "eps": one.l2_eps[0], "data_dir": data_dir}
    results = {}
    for (ds, seed), members in groups(cells).items():
        found = [(c, p) for c in members for p in epoch_checkpoints(root / "runs" / c.name)]
        if not found:
            continue
        out = eval_dir(root, ds, seed)
        cache_file = out / CURVES_FILE
        old = {}
        if cache_file.is_file():
            try:
                cached = json.loads(cache_file.read_text())
                if cached.get("settings") == sig:
                    old = cached.get("checkpoints", {})
            except (json.JSONDecodeError, OSError):
                old = {}
        fresh, computed, test_set = {}, 0, None
        for c, p in found:
            key = str(p.relative_to(root))
            mtime = p.stat().st_mtime_ns
            rec = old.get(key)
            if rec is None or rec.get("mtime_ns") != mtime:
                if test_set is None:  # the group's test subset, loaded once
                    device = resolve_device("auto")
                    entry = load_entries([str(p)], device)[0]
                    ts = load_test_set(data_key(entry, data_dir), one.n_test, one.subset_seed, device)
                    test_set = (ts.x, ts.y)
                r = eval_checkpoint(p, test_set, one)
                computed += 1
                rec = {"cell": c.name, "objective": c.objective, "model": c.model, "width": c.width,
                       "epoch": int(p.stem.split("_", 1)[1]), "mtime_ns": mtime, **r,
                       "ratio": r["pgd_l2_acc"] / r["clean_acc"] if r["clean_acc"] > 0 else None}
            fresh[key] = rec
        out.mkdir(parents=True, exist_ok=True)
        if computed or fresh != old:
            cache_file.write_text(json.dumps({"settings": sig, "checkpoints": fresh}, indent=2) + "\n")
        log(f"accuracy over epochs {ds} seed {seed}: {len(fresh)} checkpoints "
            f"({computed} evaluated, {len(fresh) - computed} cached)")
        plot_epoch_curves(fresh, out / "curves.png", f"{ds}, seed {seed}", sig["eps"])
        results[(ds, seed)] = fresh
    return results
