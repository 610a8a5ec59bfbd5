"""What an evaluation attacks: the models (run folders, checkpoints or any nn.Module taking [0,1]
images) and the test images (each run's own test split, or tensors the caller gives), subsampled
by class with a fixed seed so every model and every run sees the same images."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from aerl_fast import runtime
from aerl_fast.data.split import stratified_subset
from aerl_fast.errors import UserError


@dataclass
class ModelEntry:
    name: str
    path: Optional[str]      # None for a module given from Python
    model: torch.nn.Module   # NCHW, as given or loaded: what peer libraries (AutoAttack) get
    spec: dict
    config: dict
    objective: str
    data_key: Optional[tuple] = None
    fast: Optional[torch.nn.Module] = field(default=None, repr=False)  # the same weights laid out for our attacks

    def __post_init__(self):
        if self.fast is None:
            self.fast = runtime.fast_eval_copy(self.model)

    @property
    def arch(self) -> str:
        width = self.spec.get("width")
        return f"{self.spec['name']}x{width:g}" if isinstance(width, (int, float)) else str(self.spec["name"])


@dataclass
class TestSet:
    x: torch.Tensor          # float [n, C, H, W] in [0, 1] on the device
    y: torch.Tensor          # int64 [n]
    classes: List[str]
    indices: np.ndarray      # positions in the full split
    total: int               # images in the full split
    source: str              # what it is, for the report ("cifar10 test split", "tensors given")
    seed: int

    def describe(self) -> dict:
        return {"source": self.source, "n": int(self.x.shape[0]), "of": self.total,
                "stratified_by_class": self.x.shape[0] < self.total, "seed": self.seed,
                "indices": self.indices.tolist()}


def load_entries(models: Sequence, device, names: Sequence[str] = (), log=print) -> List[ModelEntry]:
    """A ModelEntry per run folder, checkpoint file or nn.Module; names de-duplicated (#2, #3)."""
    from aerl_fast.checkpoint import load_model, resolve_checkpoint  # noqa: PLC0415

    if not models:
        raise UserError("no models to evaluate")
    if names and len(names) != len(models):
        raise UserError(f"--names gives {len(names)} names for {len(models)} models")
    entries, seen = [], {}
    for i, m in enumerate(models):
        if isinstance(m, torch.nn.Module):
            if m.training:
                log(f"model {i} is in training mode: it is evaluated in eval mode (switched for each attack and "
                    "restored afterwards)")
            model = m.to(device)
            spec = dict(getattr(m, "aerl_spec", None) or {"name": type(m).__name__, "width": None})
            entry = ModelEntry(f"model{i}", None, model, spec, dict(getattr(m, "aerl_config", None) or {}),
                               str(getattr(m, "aerl_config", {}).get("objective", "?")))
        else:
            ckpt = resolve_checkpoint(m)
            model = load_model(m, device=device)
            run_dir = Path(m) if Path(m).is_dir() else ckpt.parent
            name = run_dir.name if Path(m).is_dir() else f"{ckpt.parent.name}/{ckpt.stem}"
            entry = ModelEntry(name, str(m), model, dict(model.aerl_spec), dict(model.aerl_config),
                               _objective(run_dir, model))
        if names:
            entry.name = names[i]
        seen[entry.name] = seen.get(entry.name, 0) + 1
        if seen[entry.name] > 1:
            entry.name = f"{entry.name}#{seen[entry.name]}"
        entries.append(entry)
    return entries


def _objective(run_dir: Path, model) -> str:
    objective = model.aerl_config.get("objective", "?")
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            objective = json.loads(summary.read_text()).get("objective", objective)
        except (json.JSONDecodeError, OSError, AttributeError):
            pass
    return str(objective)


def data_key(entry: ModelEntry, data_dir_override) -> tuple:
    """What identifies a run's test split: (dataset, data_dir, labels, image_size, seed of shapes)."""
    cfg = entry.config
    if "dataset" not in cfg:
        raise UserError(f"{entry.path or entry.name}: no training config tells its test set; pass the images "
                        "(evaluate.run(models, (x, y), config))")
    name = cfg["dataset"]
    return (name, data_dir_override if data_dir_override is not None else cfg.get("data_dir"),
            cfg.get("labels", "fine"), int(cfg.get("image_size", entry.spec.get("image_size", 32))),
            int(cfg.get("seed", 0)) if name == "shapes" else 0)


KEY_FIELDS = ("dataset", "data folder", "label set", "image size", "seed of the embedded data")


def describe_difference(entries: Sequence[ModelEntry]) -> str:
    """Which part of the test-set key differs between the models, named, with the way out."""
    keys = [e.data_key for e in entries]
    for i, label in enumerate(KEY_FIELDS):
        values = {k[i] for k in keys}
        if len(values) > 1:
            listing = ", ".join(f"{e.name}: {e.data_key[i]}" for e in entries)
            way_out = " (pass --data-dir to read them all from one folder)" if i == 1 else ""
            return f"their {label} differs ({listing}){way_out}"
    return "their test sets differ"


def load_test_set(key: tuple, n_test: int, seed: int, device, decoder: str = "auto") -> TestSet:
    from aerl_fast.data import load_dataset  # noqa: PLC0415

    name, data_dir, labels, image_size, data_seed = key
    ds = load_dataset(name, data_dir, "test", labels=labels, image_size=image_size, seed=data_seed,
                      decoder=decoder, decode_device=device)
    if len(ds.labels) == 0:
        raise UserError(f"empty dataset: the {name} test split holds no images")
    idx = stratified_subset(ds.labels, n_test, seed)
    x = torch.from_numpy(np.array(ds.images[idx], dtype=np.uint8)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    y = torch.from_numpy(np.array(ds.labels[idx], dtype=np.int64)).to(device)
    return TestSet(x, y, list(ds.classes), idx, len(ds.labels), f"{name} test split", seed)


def check_images(x: torch.Tensor, what: str = "images") -> None:
    """Attacks work in [0,1] pixel space: images in 0..255 or normalised images would make every
    radius meaningless, so say what to do (never 'turn the clamp off')."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise UserError(f"{what} must be a float tensor [N, C, H, W] in [0, 1], got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                        f"{' ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise UserError(f"{what} hold NaN or infinite values")
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
    if lo < 0.0:  # first: normalised images also exceed 1.5
        raise UserError(f"{what} go down to {lo:g}: normalised images? pass images in [0, 1] and put the "
                        "normalisation inside the model (aerl_fast.models.Normalize(mean, std) as its first layer)")
    if hi > 1.5:
        raise UserError(f"{what} range up to {hi:g}: pixel values in 0..255? divide by 255 (attacks and their "
                        "radii work on images in [0, 1])")
    if hi > 1.0:
        raise UserError(f"{what} range up to {hi:g}, above 1: images must lie in [0, 1]")


def given_test_set(data: Tuple[torch.Tensor, torch.Tensor], n_test: int, seed: int, device) -> TestSet:
    """The caller's (x, y), checked, subsampled like a test split (recorded in the report)."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise UserError("data must be a tuple (x, y) of tensors, or None for each run's own test split")
    x, y = data
    check_images(x, "images")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise UserError(f"labels must be an integer tensor [{x.shape[0]}], got "
                        f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.numel() == 0:
        raise UserError("no images given")
    if int(y.min()) < 0:
        raise UserError(f"labels must be >= 0, got {int(y.min())}")
    labels = y.detach().cpu().numpy()
    idx = stratified_subset(labels, n_test, seed)
    sel = torch.from_numpy(idx)
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    return TestSet(x.detach()[sel.to(x.device)].to(device).float().contiguous(),
                   y.detach()[sel.to(y.device)].to(device=device, dtype=torch.int64), classes, idx, len(labels),
                   "tensors given", seed)
