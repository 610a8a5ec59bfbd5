"""A reproduce preset: the experiment matrix (objectives × models × datasets × seeds) as typed cells,
each a TrainConfig + RunOptions, and the evaluation as an EvalConfig — all validated before anything
starts.

A preset (configs/matrix/*.json or a path) holds
    objectives      ["sl", "rl", "sl-adv", "rl-adv", ...]
    models          [{"name": "alicnn", "width": 0.5}, ...]
    datasets        ["cifar10", ...] or [{"name": "cifar10", "data_dir": ..., "labels": ..., "image_size": ...}]
    seeds           [0, 1, ...]
    train_presets   optional {objective: train preset name}; "{dataset}" is replaced by the dataset name
    train           optional TrainConfig / RunOptions overrides for every cell
    train_by_objective   optional {objective: overrides}
    eval            EvalConfig fields (flags of python -m aerl_fast.evaluate, with underscores), plus
                    "bundle" (default, study, smoke) and "eps" (the PGD-L2 radius or radii)
    out             optional default report folder (default reports/<preset name>)
Precedence of a cell's training settings: train preset < train < train_by_objective < the cell's
dataset, model, width, objective and seed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import List, Optional

from aerl_fast import published
from aerl_fast.config import RunOptions, TrainConfig, load_preset, read_json, split_values
from aerl_fast.errors import ConfigError, UserError
from aerl_fast.evaluate import EvalConfig

TOP_KEYS = {"objectives", "models", "datasets", "seeds", "train_presets", "train", "train_by_objective", "eval",
            "out", "description"}
DATASET_KEYS = {"name", "data_dir", "labels", "image_size"}
MODEL_KEYS = {"name", "width"}
CELL_KEYS = {"dataset", "data_dir", "labels", "image_size", "model", "width", "objective", "seed"}
RESERVED_KEYS = {"out", "overwrite", "progress"}   # reproduce owns them for every cell
EVAL_KEYS = {f.name for f in fields(EvalConfig)} | {"bundle", "eps"}


@dataclass
class Cell:
    name: str
    dataset: dict
    model: str
    width: float
    objective: str
    seed: int
    preset: Optional[str]
    config: TrainConfig
    options: RunOptions      # out/progress are set per run folder by the launcher

    @property
    def ds(self) -> str:
        return self.dataset["name"]

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.config.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def _named_entry(where: str, kind: str, raw, allowed) -> dict:
    """A dataset or model entry: a bare name or a dict with a 'name' and only `allowed` keys."""
    entry = {"name": raw} if isinstance(raw, str) else raw
    _check_keys(f"{where}: {kind} entry", entry, allowed)
    if "name" not in entry:
        raise ConfigError(f"{where}: {kind} entry {entry} has no 'name'")
    return dict(entry)


def _check_keys(where, d, allowed):
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be an object, got {d!r}")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")


def preset_path(name: str) -> Path:
    """A reproduce preset by path, or by name from configs/matrix/ (kept apart from the training
    presets in configs/, whose schema is TrainConfig's)."""
    p = Path(name)
    if p.suffix == ".json":
        if p.is_file():
            return p
        raise ConfigError(f"reproduce preset {name}: no such file")
    folder = resources.files("aerl_fast.configs") / "matrix"
    found = folder / f"{name}.json"
    if found.is_file():
        return Path(str(found))
    names = sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".json"))
    raise ConfigError(f"unknown reproduce preset {name!r}; available: {', '.join(names)}")


def load_matrix(name: str) -> dict:
    path = preset_path(name)
    values = read_json(path.read_text(), str(path))
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


def _fmt_width(w) -> str:
    return f"{float(w):g}"


def build_cells(m: dict, data_dir_override: Optional[str]) -> List[Cell]:
    """Every cell of the matrix, each a validated TrainConfig + RunOptions (raises ConfigError)."""
    where = m["_path"]
    override_keys = {f.name for f in fields(TrainConfig)} | {f.name for f in fields(RunOptions)}
    override_keys -= RESERVED_KEYS | CELL_KEYS
    train = m.get("train", {}) or {}
    _check_keys(f"{where}: 'train'", train, override_keys)
    by_obj = m.get("train_by_objective", {}) or {}
    _check_keys(f"{where}: 'train_by_objective'", by_obj, m["objectives"])
    for obj, ov in by_obj.items():
        _check_keys(f"{where}: 'train_by_objective.{obj}'", ov, override_keys)
    presets = m.get("train_presets", {}) or {}
    _check_keys(f"{where}: 'train_presets'", presets, m["objectives"])
    _check_keys(f"{where}: 'eval'", m.get("eval", {}) or {}, EVAL_KEYS)

    datasets = []
    for raw in m["datasets"]:
        d = _named_entry(where, "dataset", raw, DATASET_KEYS)
        if data_dir_override is not None:
            d["data_dir"] = data_dir_override
        datasets.append(d)
    models = []
    for raw in m["models"]:
        md = _named_entry(where, "model", raw, MODEL_KEYS)
        width = md.get("width", TrainConfig().width)
        if isinstance(width, bool) or not isinstance(width, (int, float)):
            raise ConfigError(f"{where}: model {md['name']}: width must be a number, got {width!r}")
        models.append((md["name"], float(width)))
    for s in m["seeds"]:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"{where}: seeds must be integers >= 0, got {s!r}")

    cells, names = [], set()
    for d in datasets:
        for obj in m["objectives"]:
            preset = presets.get(obj)
            preset = preset.replace("{dataset}", d["name"]) if isinstance(preset, str) else preset
            base = load_preset(preset) if preset else {}
            for model, width in models:
                for seed in m["seeds"]:
                    name = f"{d['name']}-{model}x{_fmt_width(width)}-{obj}-s{seed}"
                    if name in names:
                        raise ConfigError(f"{where}: cell {name} appears twice")
                    names.add(name)
                    values = {**base, **train, **(by_obj.get(obj, {}) or {}),
                              "dataset": d["name"], "model": model, "width": width, "objective": obj, "seed": seed,
                              **{k: d[k] for k in ("data_dir", "labels", "image_size") if k in d}}
                    try:
                        t, o = split_values(values, where)
                        cfg, opts = TrainConfig(**t).validate(), RunOptions(**o).validate()
                    except (ConfigError, TypeError) as exc:
                        raise ConfigError(f"{where}: cell {name}: {exc}") from None
                    cells.append(Cell(name, d, model, width, obj, seed, preset, cfg, opts))
    return cells


def eval_config(m: dict) -> EvalConfig:
    """The matrix's evaluation: PGD-L2 at the study's radius unless 'eval' says otherwise, with the
    transfer matrix and gradient dynamics always on (the report lays them out) and the verdict on
    unless the preset turns it off ("verdict": false, e.g. for a quick look)."""
    values = dict(m.get("eval", {}) or {})
    bundle = values.pop("bundle", "default")
    if "eps" in values:
        eps = values.pop("eps")
        values["l2_eps"] = eps if isinstance(eps, list) else [eps]
    values.setdefault("l2_eps", [published.SETTINGS["eps"]])
    for key in ("attacks", "l2_eps", "linf_eps", "aa_attacks"):
        if key in values and isinstance(values[key], list):
            values[key] = tuple(values[key])
    values.update(attacks=("pgd-l2",), transfer=True, dynamics=True)
    values.setdefault("verdict", True)  # every reproduce report ends in a verdict per cell
    try:
        return EvalConfig.bundle(bundle, **values).validate()
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{m['_path']}: 'eval': {exc}") from None


def check_datasets(cells: List[Cell]):
    """Load the test split of every distinct non-embedded dataset once: a missing one fails now."""
    from aerl_fast.data import load_dataset  # noqa: PLC0415

    seen = set()
    for c in cells:
        if c.ds == "shapes":
            continue  # generated from the seed, always available
        key = (c.ds, c.config.data_dir, c.config.labels, c.config.image_size)
        if key in seen:
            continue
        seen.add(key)
        try:
            ds = load_dataset(c.ds, key[1], "test", labels=key[2], image_size=key[3])
        except UserError as exc:
            raise UserError(f"dataset {c.ds} for cell {c.name}: {exc}") from None
        if len(ds.labels) == 0:
            raise UserError(f"dataset {c.ds} for cell {c.name}: the test split holds no images")


def validate(m: dict, data_dir: Optional[str]):
    """(cells, eval config) of a loaded matrix, everything checked, datasets included."""
    cells = build_cells(m, data_dir)
    config = eval_config(m)
    check_datasets(cells)
    return cells, config
