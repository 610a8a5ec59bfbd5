"""Checkpoints: written atomically (temp file + rename), read with `weights_only=True`.

A checkpoint is a plain dict of tensors and primitives:
    format, model_spec {name, width, num_classes, mean, std, image_size}, model, optimizer,
    scheduler, epoch, step (batches done in `epoch`), progress (epoch accumulators), rng,
    best_val_acc, config
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from aerl_fast.errors import CheckpointError

FORMAT = "aerl_fast/1"


def save_checkpoint(state: dict, path) -> None:
    """Write `state` to `path` so that a crash at any moment leaves either the old or the new file."""
    path = Path(path)
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


def load_checkpoint(path, map_location="cpu") -> dict:
    p = resolve_checkpoint(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{p}: not a readable aerl_fast checkpoint ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an aerl_fast checkpoint (format {state.get('format') if isinstance(state, dict) else type(state).__name__})")
    return state


def build_from_spec(spec: dict):
    from aerl_fast.models import build_model
    return build_model(spec["name"], spec["num_classes"], width=spec["width"], mean=spec["mean"],
                       std=spec["std"], image_size=spec["image_size"])


def load_model(path, device="cpu") -> torch.nn.Module:
    """The trained model of a run folder or checkpoint, in eval mode, taking inputs in [0, 1]."""
    state = load_checkpoint(path, map_location=device)
    model = build_from_spec(state["model_spec"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{resolve_checkpoint(path)}: weights do not fit {state['model_spec']['name']} "
                              f"({str(exc).splitlines()[0]})") from None
    model.aerl_spec = dict(state["model_spec"])
    model.aerl_config = dict(state.get("config", {}))
    return model.to(device).eval()
