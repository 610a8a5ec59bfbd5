"""Checkpoints: written atomically (temp file + rename), read with `weights_only=True`.

A checkpoint is a plain dict of tensors and primitives:
    format, model_spec {name, width, num_classes, mean, std, image_size}, model, optimizer,
    scheduler, epoch, step (batches done in `epoch`), progress (epoch accumulators), rng,
    best_val_acc, config

Non-finite model or optimizer tensors are never written, and a file holding them is refused on
reading: a diverged run cannot overwrite its last good checkpoint nor be evaluated as a model.
A file is checked before anything is built from it: its model_spec's sizes are bounded
(aerl_fast.models), and its weights are compared, key by key, with the model the spec describes,
assembled on the meta device (no memory).
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping, Optional

import torch

from aerl_fast.errors import CheckpointError, ModelError

FORMAT = "aerl_fast/1"
SPEC_KEYS = ("name", "width", "num_classes", "mean", "std", "image_size")
_TEMP = re.compile(r"^.+\.pt\.[A-Za-z0-9_]+\.tmp$")  # what save_checkpoint's mkstemp names look like
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def first_non_finite(tree, prefix: str = "") -> Optional[str]:
    """The key path of the first floating tensor in `tree` (nested dicts/lists) holding NaN or inf."""
    tensors = []

    def collect(node, key):
        if torch.is_tensor(node):
            if node.is_floating_point() and not node.is_meta:  # a meta tensor holds no values
                tensors.append((key, node))
        elif isinstance(node, Mapping):
            for k, v in node.items():
                collect(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                collect(v, f"{key}.{i}" if key else str(i))
    collect(tree, prefix)
    by_device = {}
    for i, (_, t) in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    finite = {}
    for idx in by_device.values():  # one synchronisation per device, not one per tensor
        # a float64 sum is finite exactly when every element is (it cannot overflow on float32,
        # bf16 or fp16 values), and is ~3x cheaper than isfinite().all()
        sums = torch.stack([tensors[i][1].sum(dtype=torch.float64) for i in idx])
        finite.update(zip(idx, torch.isfinite(sums).cpu().tolist()))
    return next((key for i, (key, _) in enumerate(tensors) if not finite[i]), None)


def _refuse_non_finite(state: Mapping, where) -> None:
    for part in ("model", "optimizer"):
        bad = first_non_finite(state.get(part), part)
        if bad is not None:
            raise CheckpointError(f"{where}: {bad} holds NaN or inf (the run diverged); "
                                  f"a checkpoint with non-finite weights is never used")


def save_checkpoint(state: dict, path) -> None:
    """Write `state` to `path` so that a crash at any moment leaves either the old or the new file.
    Refused (CheckpointError naming the first bad key) when a model or optimizer tensor is not finite."""
    path = Path(path)
    _refuse_non_finite(state, f"not writing {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power cut once the folder is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # a folder that cannot be opened or synced (some network filesystems)
        pass


def remove_stale_temp_files(run_dir) -> list:
    """Delete the temporary files that a killed save_checkpoint left in `run_dir`; returns them.

    Call it when no other process writes checkpoints into `run_dir` (at the start of a new run or a
    resume): a temporary file then belongs to a write that can never finish."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if _TEMP.match(p.name) and p.is_file() and not p.is_symlink()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or the best (else last) checkpoint of a run folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: no best.pt or last.pt in this run folder")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file or run folder")
    return p


def _load_error(exc: BaseException) -> str:
    """What torch's refusal means, without its advice to turn the safety off."""
    text = str(exc)
    found = _REFUSED_GLOBAL.search(text)
    if isinstance(exc, pickle.UnpicklingError) and found:
        return (f"it names the Python global {found.group(1)}, which a checkpoint never holds "
                f"(refused: loading it could run code)")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()
             and not re.search(r"weights_only|trusted source|Weights only load failed|documentation", ln)]
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path, map_location="cpu") -> dict:
    """The state of a checkpoint file or run folder, after the checks of this module's docstring."""
    p = resolve_checkpoint(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # torch's zip format, or its legacy pickle
        raise CheckpointError(f"{p}: not a readable aerl_fast checkpoint ("
                              f"{'an empty file' if not head else f'it starts with {head!r}, not a zip archive'})")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            KeyError, IndexError, TypeError, AttributeError, MemoryError) as exc:
        raise CheckpointError(f"{p}: not a readable aerl_fast checkpoint ({_load_error(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an aerl_fast checkpoint (format {state.get('format') if isinstance(state, dict) else type(state).__name__})")
    spec = state.get("model_spec")
    if not isinstance(spec, dict):
        raise CheckpointError(f"{p}: model_spec is {type(spec).__name__}, not a dict")
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise CheckpointError(f"{p}: model_spec lacks {', '.join(missing)}")
    weights = state.get("model")
    if not (isinstance(weights, Mapping) and all(torch.is_tensor(v) for v in weights.values())):
        raise CheckpointError(f"{p}: 'model' is not a dict of tensors")
    if "config" in state and not isinstance(state["config"], dict):
        raise CheckpointError(f"{p}: 'config' is {type(state['config']).__name__}, not a dict")
    _refuse_non_finite(state, p)
    return state


def build_from_spec(spec: dict, where=None, device=None):
    """The model a checkpoint's model_spec describes; a bad spec is a CheckpointError naming the
    file `where` (when given), the key and the value."""
    from aerl_fast.models import build_model
    try:
        return build_model(spec["name"], spec["num_classes"], width=spec["width"], mean=spec["mean"],
                           std=spec["std"], image_size=spec["image_size"], device=device)
    except ModelError as exc:
        raise CheckpointError(f"{where}: model_spec: {exc}" if where else f"model_spec: {exc}") from None


def check_weights_fit(model: torch.nn.Module, weights: Mapping, where) -> None:
    """Raise a CheckpointError naming the first missing, unexpected or differently shaped key of
    `weights` against `model` (which may live on the meta device)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) \
            + ([f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"] if unexpected else [])
        raise CheckpointError(f"{where}: weights do not fit the model ({'; '.join(parts)})")
    for k, t in expected.items():
        if tuple(weights[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: weight {k} has shape {list(weights[k].shape)} in the checkpoint "
                                  f"but {list(t.shape)} in the model")


def load_model(path, device="cpu") -> torch.nn.Module:
    """The trained model of a run folder or checkpoint, in eval mode, taking inputs in [0, 1]."""
    where = resolve_checkpoint(path)
    state = load_checkpoint(where, map_location=device)
    spec = state["model_spec"]
    check_weights_fit(build_from_spec(spec, where, device="meta"), state["model"], where)
    model = build_from_spec(spec)  # the spec passed the same checks on the meta device just above
    model.load_state_dict(state["model"])
    model.aerl_spec = dict(spec)
    model.aerl_config = dict(state.get("config", {}))
    return model.to(device).eval()
