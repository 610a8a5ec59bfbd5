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


def stratified_subset(labels, n: int, seed: int = 0):
    """Sorted indices of exactly min(n, len(labels)) samples, stratified by class.

    Each class gets floor(n · n_c / N) samples and the remaining slots go to the classes with the
    largest remainders (ties: the smaller label), so class shares match the whole split as closely
    as an integer count allows; which samples of a class are taken depends only on (seed, class).
    Why: test splits are often ordered by class, so the first n would cover only some classes."""
    labels = np.asarray(labels)
    total = len(labels)
    if n >= total:
        return np.arange(total)
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / total
    quota = np.floor(exact).astype(np.int64)
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - quota[i]), classes[i]))
    for i in order[: n - int(quota.sum())]:
        quota[i] += 1
    picked = []
    for cls, q in zip(classes, quota):
        idx = np.flatnonzero(labels == cls)
        rng = np.random.default_rng([int(seed), int(cls) & 0x7FFFFFFF])
        picked.append(rng.choice(idx, size=int(q), replace=False) if q < len(idx) else idx)
    return np.sort(np.concatenate(picked))
