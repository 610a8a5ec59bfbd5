"""Reproduce the study as one command: train every cell of an experiment matrix, evaluate, report.

    python -m aerl_fast.reproduce --preset smoke [--out REPORT_DIR] [--print-commands] [--data-dir DIR]

A reproduce preset (configs/matrix/smoke.json, configs/matrix/matrix-*.json, or a path to a .json) lists

    objectives      ["sl", "rl", "sl-adv", "rl-adv"]
    models          [{"name": "alicnn", "width": 0.5}, ...]
    datasets        ["cifar10", ...] or [{"name": "cifar10", "data_dir": ..., "labels": ...,
                    "image_size": ...}, ...]
    seeds           [0, 1, ...]
    train_presets   optional {objective: train preset name}; "{dataset}" is replaced by the dataset
                    name (e.g. {"rl": "{dataset}-rl"} -> cifar10-rl)
    train           optional TrainConfig overrides for every cell (keys as in configs/cifar10-rl.json)
    train_by_objective   optional {objective: TrainConfig overrides}
    eval            evaluation settings: eps (PGD-L2 radius), steps, step or rel_step, restarts,
                    n_test, batch_size, dynamics_n, clamp, masking, seed
    out             optional default report folder (default reports/<preset name>)

Precedence of a cell's training settings: train preset < train < train_by_objective < the cell's
dataset, model, width, objective and seed.  The whole matrix is validated before anything starts.

Layout of REPORT_DIR:

    runs/<dataset>-<model>x<width>-<objective>-s<seed>/   one training run per cell
    eval/<dataset>/seed<s>/                               aerl_fast.evaluate output of the cells of one
                                                          dataset and seed (table, transfer, dynamics)
    eval/<dataset>/seed<s>/curves.json, curves.png        clean and PGD-L2 accuracy of each cell's
                                                          periodic checkpoints (epoch_*.pt, written when
                                                          the `train` overrides set save_every)
    report.md, report.json, report.csv                    the study's tables, every number

Resumable: a cell with summary.json is never retrained, one with last.pt is resumed; an evaluation
is reused while its metrics.json is newer than every best.pt it covers and was made with the same
settings; the accuracy of an epoch_*.pt is reused while its path and modification time are unchanged
(curves.json).  A second invocation after a finished one only rebuilds the report.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from aerl_fast.errors import ConfigError, UserError

TOP_KEYS = {"objectives", "models", "datasets", "seeds", "train_presets", "train",
            "train_by_objective", "eval", "out", "description"}
DATASET_KEYS = {"name", "data_dir", "labels", "image_size"}
MODEL_KEYS = {"name", "width"}
EVAL_DEFAULTS = {"eps": 1.0, "steps": 100, "step": None, "rel_step": None, "restarts": 1,
                 "n_test": 1000, "batch_size": 256, "dynamics_n": 256, "clamp": True,
                 "masking": False, "seed": 0}
CELL_KEYS = {"dataset", "data_dir", "labels", "image_size", "model", "width", "objective", "seed"}
# keys the matrix sets per cell or that reproduce owns: not allowed in train overrides
RESERVED_TRAIN_KEYS = {"out", "overwrite", "preset", "progress"}

# BRIEF.md §1: the study's headline numbers (6-layer CNN, PGD-L2 eps 1.0, step 0.1, 100 steps).
PUBLISHED_PGD = {
    "cifar10": {"sl": 0.05, "rl": 0.55},
    "cifar100": {"sl": 0.02, "rl": 0.25},
    "imagenet100": {"sl": 0.05, "rl": 0.18},
}
PUBLISHED_CLEAN_DROP = (0.03, 0.05)  # SL clean minus RL clean, "3-5 points"
# transfer accuracy (CIFAR-10 headline): crafted on RL models ~43% on SL and RL, crafted on SL ~8%
PUBLISHED_TRANSFER = (("rl", "sl", 0.43), ("rl", "rl", 0.43), ("sl", "sl", 0.08), ("sl", "rl", 0.08))
PUBLISHED_TRANSFER_RL_ADV = 0.30     # "RL-adv holds ~30%" (evaluated on images crafted on other models)
PUBLISHED_SETTINGS = {"model": "cnn6", "width": 1.0, "eps": 1.0}


@dataclass
class Cell:
    name: str
    dataset: dict
    model: str
    width: float
    objective: str
    seed: int
    preset: Optional[str]
    overrides: dict          # TrainConfig keys beyond the preset, cell values included

    @property
    def ds(self) -> str:
        return self.dataset["name"]


# --------------------------------------------------------------------------------------- presets

def _named_entry(where: str, kind: str, raw, allowed) -> dict:
    """A dataset or model entry: a bare name or a dict with a 'name' and only `allowed` keys."""
    entry = {"name": raw} if isinstance(raw, str) else raw
    _check_keys(f"{where}: {kind} entry", entry, allowed)
    if "name" not in entry:
        raise ConfigError(f"{where}: {kind} entry {entry} has no 'name'")
    return dict(entry)


def _preset_path(name: str) -> Path:
    """A reproduce preset by path, or by name from configs/matrix/ (kept apart from the training
    presets in configs/, whose schema is TrainConfig's)."""
    p = Path(name)
    if p.suffix == ".json":
        if p.is_file():
            return p
        raise ConfigError(f"reproduce preset {name}: no such file")
    from importlib import resources  # noqa: PLC0415
    folder = resources.files("aerl_fast.configs") / "matrix"
    found = folder / f"{name}.json"
    if found.is_file():
        return Path(str(found))
    names = sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".json"))
    raise ConfigError(f"unknown reproduce preset {name!r}; available: {', '.join(names)}")


def load_matrix(name: str) -> dict:
    path = _preset_path(name)
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a reproduce preset is a JSON object")
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    unknown = sorted(set(values) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a reproduce preset takes "
                          f"{', '.join(sorted(TOP_KEYS))}")
    for key in ("objectives", "models", "datasets", "seeds"):
        if not isinstance(values.get(key), list) or not values[key]:
            raise ConfigError(f"{path}: {key!r} must be a non-empty list")
    values["_path"] = str(path)
    values["_name"] = path.stem
    return values


def _check_keys(where, d, allowed):
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be an object, got {d!r}")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _fmt_width(w) -> str:
    return f"{float(w):g}"


def build_cells(m: dict, data_dir_override: Optional[str]) -> List[Cell]:
    """Every cell of the matrix, each validated as a TrainConfig (raises ConfigError)."""
    from aerl_fast.config import FIELDS, TrainConfig, load_preset  # noqa: PLC0415

    where = m["_path"]
    train = m.get("train", {}) or {}
    _check_keys(f"{where}: 'train'", train, set(FIELDS) - RESERVED_TRAIN_KEYS - CELL_KEYS)
    by_obj = m.get("train_by_objective", {}) or {}
    _check_keys(f"{where}: 'train_by_objective'", by_obj, m["objectives"])
    for obj, ov in by_obj.items():
        _check_keys(f"{where}: 'train_by_objective.{obj}'", ov, set(FIELDS) - RESERVED_TRAIN_KEYS - CELL_KEYS)
    presets = m.get("train_presets", {}) or {}
    _check_keys(f"{where}: 'train_presets'", presets, m["objectives"])
    _check_keys(f"{where}: 'eval'", m.get("eval", {}) or {}, EVAL_DEFAULTS)

    datasets = []
    for raw in m["datasets"]:
        d = _named_entry(where, "dataset", raw, DATASET_KEYS)
        if data_dir_override is not None:
            d["data_dir"] = data_dir_override
        datasets.append(d)
    models = []
    for raw in m["models"]:
        md = _named_entry(where, "model", raw, MODEL_KEYS)
        models.append((md["name"], float(md.get("width", TrainConfig().width))))
    for s in m["seeds"]:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"{where}: seeds must be integers >= 0, got {s!r}")

    cells, names = [], set()
    for d in datasets:
        for obj in m["objectives"]:
            preset = presets.get(obj)
            preset = preset.replace("{dataset}", d["name"]) if preset else None
            base = load_preset(preset) if preset else {}
            for model, width in models:
                for seed in m["seeds"]:
                    name = f"{d['name']}-{model}x{_fmt_width(width)}-{obj}-s{seed}"
                    if name in names:
                        raise ConfigError(f"{where}: cell {name} appears twice")
                    names.add(name)
                    ov = dict(train)
                    ov.update(by_obj.get(obj, {}) or {})
                    ov.update({"dataset": d["name"], "model": model, "width": width,
                               "objective": obj, "seed": seed})
                    ov.update({k: d[k] for k in ("data_dir", "labels", "image_size") if k in d})
                    values = dict(base)
                    values.update(ov)
                    try:
                        TrainConfig(**values).validate()
                    except ConfigError as exc:
                        raise ConfigError(f"{where}: cell {name}: {exc}") from None
                    except TypeError as exc:
                        raise ConfigError(f"{where}: cell {name}: {exc}") from None
                    cells.append(Cell(name, d, model, width, obj, seed, preset, ov))
    return cells


def eval_settings(m: dict) -> dict:
    s = dict(EVAL_DEFAULTS)
    s.update(m.get("eval", {}) or {})
    return s


def eval_argv(settings: dict, run_dirs: List[str], out: Path, data_dir: Optional[str]) -> List[str]:
    argv = [*run_dirs, "--attack", "pgd-l2", "--eps", str(settings["eps"]),
            "--steps", str(settings["steps"]), "--restarts", str(settings["restarts"]),
            "--n-test", str(settings["n_test"]), "--batch-size", str(settings["batch_size"]),
            "--dynamics-n", str(settings["dynamics_n"]), "--seed", str(settings["seed"]),
            "--transfer", "--dynamics", "--no-progress", "--out", str(out)]
    if settings["step"] is not None:
        argv += ["--step", str(settings["step"])]
    if settings["rel_step"] is not None:
        argv += ["--rel-step", str(settings["rel_step"])]
    argv.append("--clamp" if settings["clamp"] else "--no-clamp")
    argv.append("--masking" if settings["masking"] else "--no-masking")
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    return argv


def check_datasets(cells: List[Cell]):
    """Load the test split of every distinct non-embedded dataset once: a missing one fails now."""
    from aerl_fast.data import load_dataset  # noqa: PLC0415

    seen = set()
    for c in cells:
        if c.ds == "shapes":
            continue  # generated from the seed, always available
        key = (c.ds, c.dataset.get("data_dir"), c.dataset.get("labels", "fine"),
               int(c.dataset.get("image_size", 32)))
        if key in seen:
            continue
        seen.add(key)
        try:
            ds = load_dataset(c.ds, key[1], "test", labels=key[2], image_size=key[3])
        except UserError as exc:
            raise UserError(f"dataset {c.ds} for cell {c.name}: {exc}") from None
        if len(ds.labels) == 0:
            raise UserError(f"dataset {c.ds} for cell {c.name}: the test split holds no images")


def validate(m: dict, data_dir: Optional[str]) -> List[Cell]:
    from aerl_fast.evaluate import parse_args  # noqa: PLC0415

    cells = build_cells(m, data_dir)
    settings = eval_settings(m)
    try:
        parse_args(eval_argv(settings, ["x"], Path("x"), None))
    except UserError as exc:
        raise ConfigError(f"{m['_path']}: 'eval': {exc}") from None
    except SystemExit:
        raise ConfigError(f"{m['_path']}: 'eval': invalid value in {settings}") from None
    check_datasets(cells)
    return cells


# -------------------------------------------------------------------------------------- training

def _flag(k: str) -> str:
    return "--" + k.replace("_", "-")


def train_argv(cell: Cell, run_dir: Path) -> List[str]:
    """aerl_fast.train arguments of a cell in its current state (fresh, resume or restart)."""
    if (run_dir / "last.pt").is_file():
        return ["--resume", str(run_dir), "--no-progress"]
    argv = ["--preset", cell.preset] if cell.preset else []
    for k, v in cell.overrides.items():
        if v is None:
            continue
        if isinstance(v, bool):
            argv.append(_flag(k) if v else "--no-" + k.replace("_", "-"))
        else:
            argv += [_flag(k), str(v)]
    argv += ["--out", str(run_dir), "--no-progress"]
    if run_dir.exists() and any(run_dir.iterdir()):
        argv.append("--overwrite")  # killed before its first checkpoint: nothing to keep
    return argv


def cell_done(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


@contextmanager
def cell_lock(runs: Path, name: str, wait: bool):
    """An advisory lock on one cell (flock on runs/.<cell>.lock), so that two reproduce processes
    sharing a folder never train the same cell at once; yields False when another process holds it
    and `wait` is off.  The kernel drops the lock when its holder dies, so a killed run never leaves
    a stale lock.  Without fcntl (not POSIX) it always yields True."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # pragma: no cover - Windows
        yield True
        return
    with open(runs / f".{name}.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def train_cells(cells: List[Cell], runs: Path, log):
    """Train every unfinished cell; cells another process is training are left to it, then waited for
    (and finished here if that process died before it was done)."""
    from aerl_fast import train  # noqa: PLC0415

    def train_one(i, c):
        run_dir = runs / c.name
        if cell_done(run_dir):  # (again: another process may have finished it meanwhile)
            log(f"[{i}/{len(cells)}] {c.name}: done, skipped")
            return
        argv = train_argv(c, run_dir)
        log(f"[{i}/{len(cells)}] {c.name}: python -m aerl_fast.train {shlex.join(argv)}")
        train.main(argv)
        if not cell_done(run_dir):
            raise UserError(f"{c.name}: training finished without {run_dir / 'summary.json'}")

    busy = []
    for i, c in enumerate(cells, 1):
        if cell_done(runs / c.name):
            log(f"[{i}/{len(cells)}] {c.name}: done, skipped")
            continue
        with cell_lock(runs, c.name, wait=False) as mine:
            if mine:
                train_one(i, c)
            else:
                log(f"[{i}/{len(cells)}] {c.name}: another process is training it; coming back to it last")
                busy.append((i, c))
    for i, c in busy:
        log(f"[{i}/{len(cells)}] {c.name}: waiting for the other process")
        with cell_lock(runs, c.name, wait=True):
            train_one(i, c)


# ------------------------------------------------------------------------------------ evaluation

def groups(cells: List[Cell]) -> Dict[tuple, List[Cell]]:
    out: Dict[tuple, List[Cell]] = {}
    for c in cells:
        out.setdefault((c.ds, c.seed), []).append(c)
    return out


def eval_dir(root: Path, ds: str, seed: int) -> Path:
    return root / "eval" / ds / f"seed{seed}"


def eval_cached(out: Path, run_dirs: List[Path], argv: List[str]) -> bool:
    metrics, stamp = out / "metrics.json", out / "reproduce_eval.json"
    if not (metrics.is_file() and stamp.is_file()):
        return False
    try:
        if json.loads(stamp.read_text()).get("argv") != argv:
            return False
    except (json.JSONDecodeError, OSError):
        return False
    t = metrics.stat().st_mtime
    return all((r / "best.pt").is_file() and (r / "best.pt").stat().st_mtime < t for r in run_dirs)


def evaluate_groups(cells, root: Path, settings: dict, data_dir, log) -> Dict[tuple, dict]:
    from aerl_fast import evaluate  # noqa: PLC0415

    results = {}
    for (ds, seed), members in groups(cells).items():
        out = eval_dir(root, ds, seed)
        run_dirs = [root / "runs" / c.name for c in members]
        argv = eval_argv(settings, [str(r) for r in run_dirs], out, data_dir)
        if eval_cached(out, run_dirs, argv):
            log(f"evaluation {ds} seed {seed}: cached ({out / 'metrics.json'})")
        else:
            log(f"evaluation {ds} seed {seed}: {len(members)} models -> {out}")
            evaluate.main(argv)
            (out / "reproduce_eval.json").write_text(json.dumps({"argv": argv}, indent=2) + "\n")
        results[(ds, seed)] = json.loads((out / "metrics.json").read_text())
    return results


# ------------------------------------------------------------------------- accuracy over epochs

CURVES_FILE = "curves.json"
CURVE_SETTINGS = ("eps", "steps", "step", "rel_step", "restarts", "n_test", "clamp", "seed")


def epoch_checkpoints(run_dir: Path) -> List[Path]:
    """The periodic checkpoints (train --save-every) of a run, in epoch order."""
    return sorted(run_dir.glob("epoch_[0-9]*.pt"), key=lambda p: int(p.stem.split("_", 1)[1]))


def curve_args(settings: dict, data_dir):
    """aerl_fast.evaluate's parsed arguments for one PGD-L2 radius (the preset's first eps)."""
    from aerl_fast import evaluate  # noqa: PLC0415

    one = dict(settings, eps=_first_eps(settings))
    argv = eval_argv(one, ["x"], Path("x"), data_dir)
    argv = [a for a in argv if a not in ("--transfer", "--dynamics")]
    return evaluate.parse_args(argv)


def _first_eps(settings: dict) -> float:
    eps = settings["eps"]
    return float(eps[0] if isinstance(eps, (list, tuple)) else eps)


def eval_checkpoint(path: Path, args, data_dir, data_cache: dict) -> dict:
    """Clean and PGD-L2 accuracy (correct clean and under attack) of one checkpoint file, on the first
    n_test test images, with aerl_fast.evaluate's own loading and attack code."""
    from aerl_fast import evaluate  # noqa: PLC0415
    from aerl_fast.runtime import resolve_device  # noqa: PLC0415

    device = resolve_device(args.device)
    entry = evaluate.load_entries([str(path)], device)[0]
    key = evaluate.data_key(entry, data_dir)
    if key not in data_cache:
        data_cache[key] = evaluate.load_test_set(key, args.n_test, device)
    x, y, _ = data_cache[key]
    clean_ok = evaluate.predict(entry.fast, x, args.batch_size) == y
    spec = args.specs[0]
    r = evaluate.run_gradient_attack(entry.fast, x, y, clean_ok, spec, spec.eps, args,
                                     early_stop=args.early_stop)
    return {"clean_acc": float(clean_ok.double().mean()), "pgd_l2_acc": float(r["acc"][0]),
            "n_test": int(x.shape[0])}


def evaluate_curves(cells, root: Path, settings: dict, data_dir, log) -> Dict[tuple, dict]:
    """Accuracy of every epoch_*.pt of every cell, per (dataset, seed), cached in
    eval/<dataset>/seed<s>/curves.json by checkpoint path and modification time (and settings)."""
    sig = {k: settings[k] for k in CURVE_SETTINGS}
    sig["eps"] = _first_eps(settings)
    sig["data_dir"] = data_dir
    results = {}
    args = None
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
        fresh, data_cache, computed = {}, {}, 0
        for c, p in found:
            key = str(p.relative_to(root))
            mtime = p.stat().st_mtime_ns
            rec = old.get(key)
            if rec is None or rec.get("mtime_ns") != mtime:
                if args is None:
                    args = curve_args(settings, data_dir)
                r = eval_checkpoint(p, args, data_dir, data_cache)
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


def _curve_label(rec, multi_model: bool) -> str:
    return rec["objective"] + (f" {rec['model']}x{_fmt_width(rec['width'])}" if multi_model else "")


def _by_cell(recs: dict) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for rec in recs.values():
        out.setdefault(rec["cell"], []).append(rec)
    return {k: sorted(v, key=lambda r: r["epoch"]) for k, v in out.items()}


def plot_epoch_curves(recs: dict, path: Path, title: str, eps: float):
    """Left: clean (solid) and PGD-L2 (dashed) accuracy over epochs, one colour per cell; right: the
    ratio adversarial / clean."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cells = _by_cell(recs)
    multi = len({(r["model"], r["width"]) for r in recs.values()}) > 1
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (cell, rs) in enumerate(cells.items()):
        color = f"C{i % 10}"
        ep = [r["epoch"] for r in rs]
        label = _curve_label(rs[0], multi)
        a1.plot(ep, [100 * r["clean_acc"] for r in rs], "o-", color=color, label=f"{label} clean")
        a1.plot(ep, [100 * r["pgd_l2_acc"] for r in rs], "s--", color=color, label=f"{label} PGD-L2")
        ratio = [(e, r["ratio"]) for e, r in zip(ep, rs) if r["ratio"] is not None]
        a2.plot([e for e, _ in ratio], [v for _, v in ratio], "o-", color=color, label=label)
    a1.set_ylabel("accuracy (%)")
    a1.set_ylim(-2, 102)
    a1.set_title(f"{title}: clean (solid), PGD-L2 eps {eps:g} (dashed)", fontsize=9)
    a2.set_ylabel("adversarial / clean")
    a2.set_ylim(-0.02, 1.02)
    a2.set_title(f"{title}: ratio adversarial / clean", fontsize=9)
    for ax in (a1, a2):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_markdown(recs: dict, rel: Path, ds: str, seed: int) -> List[str]:
    cells = _by_cell(recs)
    multi = len({(r["model"], r["width"]) for r in recs.values()}) > 1
    epochs = sorted({r["epoch"] for r in recs.values()})
    md = [f"### Accuracy over epochs, {ds}, seed {seed}", "",
          f"![accuracy over epochs]({rel / 'curves.png'})", "",
          "Periodic checkpoints (epoch_NNNN.pt): clean / adversarial accuracy in %, (ratio adv/clean); "
          f"data: [curves.json]({rel / CURVES_FILE}).", "",
          "| objective | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
          "|---|" + "---|" * len(epochs)]
    for rs in cells.values():
        at = {r["epoch"]: r for r in rs}

        def cell(e):
            r = at.get(e)
            if r is None:
                return "—"
            ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
            return f"{_pct(r['clean_acc'])} / {_pct(r['pgd_l2_acc'])} ({ratio})"
        md.append(f"| {_curve_label(rs[0], multi)} | " + " | ".join(cell(e) for e in epochs) + " |")
    return md + [""]


# ---------------------------------------------------------------------------------------- report

def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def _sd(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if len(xs) < 2:
        return None
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def _diff(ours, pub) -> str:
    if ours is None or pub is None:
        return ""
    return f"{100 * (ours - pub):+.1f}"


def collect(cells, root: Path, metrics: Dict[tuple, dict], settings: dict) -> dict:
    rows = []
    for c in cells:
        m = metrics[(c.ds, c.seed)]
        entry = next((e for e in m["models"] if e["name"] == c.name), None)
        if entry is None:
            raise UserError(f"{eval_dir(root, c.ds, c.seed)}/metrics.json has no model {c.name}")
        pgd = entry["attacks"]["pgd-l2"]
        adv = pgd["acc"][pgd["eps"].index(float(settings["eps"]))]
        summary = json.loads((root / "runs" / c.name / "summary.json").read_text())
        clean = entry["clean_acc"]
        rows.append({
            "cell": c.name, "dataset": c.ds, "objective": c.objective, "model": c.model,
            "width": c.width, "seed": c.seed, "n_test": entry["n"], "clean_acc": clean,
            "pgd_l2_acc": adv, "ratio": adv / clean if clean > 0 else None,
            "test_acc_train": summary.get("test_acc"), "best_val_acc": summary.get("best_val_acc"),
            "best_epoch": summary.get("best_epoch"), "epochs": summary.get("epochs"),
            "train_s": summary.get("total_train_s"),
            "published_pgd_l2_acc": PUBLISHED_PGD.get(c.ds, {}).get(c.objective),
        })
    return {"rows": rows}


def _study_note(settings, models) -> str:
    diffs = []
    if any(m != (PUBLISHED_SETTINGS["model"], PUBLISHED_SETTINGS["width"]) for m in models):
        diffs.append("models other than cnn6 x1")
    if float(settings["eps"]) != PUBLISHED_SETTINGS["eps"]:
        diffs.append(f"eps {settings['eps']:g} instead of 1.0")
    if settings["steps"] != 100:
        diffs.append(f"{settings['steps']} PGD steps instead of 100")
    return ("The study's values are for its 6-layer CNN (cnn6 x1), PGD-L2 eps 1.0, step 0.1, 100 steps"
            + (f"; settings here differ ({', '.join(diffs)}), so the difference is indicative only."
               if diffs else "."))


def write_report(m: dict, cells, root: Path, metrics: Dict[tuple, dict], settings: dict,
                 curves: Optional[Dict[tuple, dict]] = None) -> dict:
    data = collect(cells, root, metrics, settings)
    rows = data["rows"]
    seeds = sorted({c.seed for c in cells})
    models = list(dict.fromkeys((c.model, c.width) for c in cells))
    step = (f"step {settings['step']:g}" if settings["step"] is not None
            else f"step {settings['rel_step'] if settings['rel_step'] is not None else 0.1:g} x eps")
    md = [f"# Reproduction report: preset `{m['_name']}`", "",
          f"Preset: `{m['_path']}`. {len(cells)} cells: objectives {', '.join(m['objectives'])}; models "
          f"{', '.join(f'{a}x{_fmt_width(w)}' for a, w in models)}; seeds {', '.join(map(str, seeds))}.",
          f"Attack: PGD-L2 eps {settings['eps']:g}, {settings['steps']} steps, {step}, "
          f"{settings['restarts']} restart(s), [0,1] clamp {'on' if settings['clamp'] else 'off'}, "
          f"first {settings['n_test']} test images. Accuracies in %; adversarial = correct both clean "
          "and under attack; ratio = adversarial / clean. Several seeds: mean ± sd over seeds.", ""]
    summary_rows = []
    for ds in dict.fromkeys(c.ds for c in cells):
        pub = PUBLISHED_PGD.get(ds)
        md += [f"## {ds}", ""]
        head = "| objective | model | clean | adversarial | ratio adv/clean |"
        sep = "|---|---|---|---|---|"
        if pub:
            head += " study adversarial | difference |"
            sep += "---|---|"
        md += [head, sep]
        clean_by_obj = {}
        for obj in m["objectives"]:
            for model, width in models:
                rs = [r for r in rows if r["dataset"] == ds and r["objective"] == obj
                      and r["model"] == model and r["width"] == width]
                clean = _mean([r["clean_acc"] for r in rs])
                adv = _mean([r["pgd_l2_acc"] for r in rs])
                ratio = _mean([r["ratio"] for r in rs])
                clean_by_obj[(obj, model, width)] = clean

                def show(v, xs):
                    sd = _sd(xs)
                    return _pct(v) + (f" ± {100 * sd:.1f}" if sd is not None else "")
                line = (f"| {obj} | {model}x{_fmt_width(width)} | {show(clean, [r['clean_acc'] for r in rs])} | "
                        f"{show(adv, [r['pgd_l2_acc'] for r in rs])} | "
                        f"{'n/a' if ratio is None else f'{ratio:.2f}'} |")
                p = pub.get(obj) if pub else None
                if pub:
                    line += f" {_pct(p) if p is not None else '—'} | {_diff(adv, p) or '—'} |"
                md.append(line)
                summary_rows.append({"dataset": ds, "objective": obj, "model": model, "width": width,
                                     "seeds": len(rs), "clean_acc": clean, "pgd_l2_acc": adv,
                                     "ratio": ratio, "published_pgd_l2_acc": p,
                                     "difference": None if p is None or adv is None else adv - p})
        md.append("")
        if pub:
            md.append(_study_note(settings, models))
            for model, width in models:
                sl, rl = clean_by_obj.get(("sl", model, width)), clean_by_obj.get(("rl", model, width))
                if sl is not None and rl is not None:
                    drop = sl - rl
                    lo, hi = PUBLISHED_CLEAN_DROP
                    inside = lo <= drop <= hi
                    md.append(f"Clean accuracy SL − RL ({model}x{_fmt_width(width)}): {100 * drop:+.1f} points; "
                              f"study: 3–5 points ({'within' if inside else 'outside'} that range).")
            md.append("")
        for seed in seeds:
            key = (ds, seed)
            if key not in metrics:
                continue
            rel = Path("eval") / ds / f"seed{seed}"
            t = metrics[key].get("transfer")
            md += [f"### Transfer matrix, {ds}, seed {seed}", ""]
            if t:
                md.append((root / rel / "transfer.md").read_text().rstrip())
                md += ["", f"![transfer]({rel / 'transfer.png'})", ""]
                if ds == "cifar10":
                    md += transfer_comparison(t, cells) + [""]
            md += [f"Gradient dynamics during PGD ({ds}, seed {seed}): [dynamics.png]({rel / 'dynamics.png'}) "
                   f"([data]({rel / 'dynamics.json'})); full evaluation: [results.md]({rel / 'results.md'}).", "",
                   f"![dynamics]({rel / 'dynamics.png'})", ""]
            dyn = metrics[key].get("dynamics") or {}
            if dyn:
                md += ["| model | per-sample \\|g\\| | cos to previous step | sign consistency | within-batch dispersion |",
                       "|---|---|---|---|---|"]
                for name, s in dyn.items():
                    md.append(f"| {name} | {s['norm']:.3g} | {s['cos']:.3g} | {s['sign_agree']:.3g} | "
                              f"{s['dispersion']:.3g} |")
                md.append("")
    curves = curves or {}
    if curves:
        md += ["## Accuracy over epochs", ""]
        for (ds, seed), recs in curves.items():
            md += curves_markdown(recs, Path("eval") / ds / f"seed{seed}", ds, seed)
    else:
        md += ["## Not in this report", "",
               "Accuracy of periodic checkpoints over epochs: no cell kept any (set `\"save_every\": N` in "
               "the preset's `train` overrides); only the best checkpoint of each cell is evaluated.", ""]
    (root / "report.md").write_text("\n".join(md))

    report = {"preset": m["_name"], "preset_path": m["_path"], "eval_settings": settings,
              "published": {"pgd_l2_acc": PUBLISHED_PGD, "clean_drop_sl_minus_rl": PUBLISHED_CLEAN_DROP,
                            "transfer_cifar10": {"crafted_on_rl": 0.43, "crafted_on_sl": 0.08,
                                                 "rl_adv": PUBLISHED_TRANSFER_RL_ADV},
                            "settings": PUBLISHED_SETTINGS},
              "cells": rows, "summary": summary_rows,
              "transfer": {f"{ds}/seed{s}": metrics[(ds, s)].get("transfer") for ds, s in metrics},
              "dynamics": {f"{ds}/seed{s}": metrics[(ds, s)].get("dynamics") for ds, s in metrics},
              "curves": {f"{ds}/seed{s}": sorted(recs.values(), key=lambda r: (r["cell"], r["epoch"]))
                         for (ds, s), recs in curves.items()}}
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(root / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return report


def transfer_comparison(t: dict, cells) -> List[str]:
    """Mean transfer accuracy by (crafted-on objective, evaluated-on objective), beside the study's."""
    obj = {c.name: c.objective for c in cells}
    names, acc = t["names"], t["accuracy"]

    def mean_block(src, dst):
        vals = [acc[i][j] for i, a in enumerate(names) for j, b in enumerate(names)
                if i != j and obj.get(a) == src and obj.get(b) == dst]
        return _mean(vals)
    lines = ["| transfer (off-diagonal means) | ours | study (CIFAR-10) | difference |", "|---|---|---|---|"]
    for src, dst, pub in PUBLISHED_TRANSFER:
        v = mean_block(src, dst)
        if v is None:  # only the white-box diagonal exists for this pair (one model per objective)
            continue
        lines.append(f"| crafted on {src}, evaluated on {dst} | {_pct(v)} | {_pct(pub)} | {_diff(v, pub) or '—'} |")
    v = _mean([acc[i][j] for i, a in enumerate(names) for j, b in enumerate(names)
               if i != j and obj.get(b) == "rl-adv"])
    lines.append(f"| evaluated on rl-adv (crafted on the others) | {_pct(v)} | {_pct(PUBLISHED_TRANSFER_RL_ADV)} | "
                 f"{_diff(v, PUBLISHED_TRANSFER_RL_ADV) or '—'} |")
    return lines


# ------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aerl_fast.reproduce",
        description="Train, evaluate and report a whole experiment matrix of the study (resumable).")
    p.add_argument("--preset", required=True,
                   help="reproduce preset: smoke, matrix-cifar10, matrix-cifar100, matrix-imagenet100, "
                        "or a path to a .json")
    p.add_argument("--out", default=None, help="report folder (default: the preset's 'out', else "
                                                "reports/<preset>)")
    p.add_argument("--data-dir", default=None, help="dataset folder for every dataset of the matrix")
    p.add_argument("--print-commands", action="store_true",
                   help="print one `python -m aerl_fast.train ...` command per unfinished cell and exit")
    return p


def main(argv=None) -> Optional[dict]:
    args = build_parser().parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        m = load_matrix(args.preset)
        cells = validate(m, args.data_dir)
        root = Path(args.out or m.get("out") or Path("reports") / m["_name"])
        runs = root / "runs"
        if args.print_commands:
            runs = runs.resolve()  # the commands run from wherever the job scheduler starts them
            todo = [c for c in cells if not cell_done(runs / c.name)]
            try:
                for c in todo:
                    print("python -m aerl_fast.train " + shlex.join(train_argv(c, runs / c.name)), flush=True)
            except BrokenPipeError:  # `--print-commands | head`: the reader has what it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
                return None
            log(f"{len(todo)} of {len(cells)} cells to train ({len(cells) - len(todo)} done)")
            return None
        log(f"{m['_name']}: {len(cells)} cells -> {root}")
        runs.mkdir(parents=True, exist_ok=True)
        train_cells(cells, runs, log)
        settings = eval_settings(m)
        metrics = evaluate_groups(cells, root, settings, args.data_dir, log)
        curves = evaluate_curves(cells, root, settings, args.data_dir, log)
        report = write_report(m, cells, root, metrics, settings, curves)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    log(f"report: {root / 'report.md'}")
    return report


if __name__ == "__main__":
    main()
