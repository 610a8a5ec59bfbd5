"""The study's 90/10 stratified train/validation split (seed 42)."""
from __future__ import annotations

import numpy as np


def stratified_split(labels, val_frac: float = 0.1, seed: int = 42):
    """Indices (train, val): each class contributes round(val_frac · n_class) samples to val.

    Deterministic for a given seed and label vector; both index arrays are sorted so the split does
    not depend on the order classes are visited in.
    """
    if not 0.0 <= val_frac < 1.0:
        raise ValueError(f"val_frac must be in [0, 1), got {val_frac}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_val = int(round(val_frac * len(idx)))
        if val_frac > 0 and n_val == 0 and len(idx) > 1:
            n_val = 1
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
