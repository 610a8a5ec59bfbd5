"""The study's 90/10 stratified train/validation split (seed 42)."""
from __future__ import annotations

import numpy as np

from aerl_fast.errors import ConfigError


def val_count(val_frac: float, n: int) -> int:
    """Samples a class of `n` gives to validation: Python's round() of the float product val_frac · n
    (halves to even: 0.1 · 25 = 2.5 gives 2, 0.1 · 35 = 3.5000000000000004 gives 4), at least 1 when
    val_frac > 0 and the class has two or more samples.  Kept exactly so: every existing run's split
    (and so its resume to identical weights) depends on it."""
    k = int(round(val_frac * n))
    return 1 if (k == 0 and val_frac > 0 and n > 1) else k


def stratified_split(labels, val_frac: float = 0.1, seed: int = 42):
    """Indices (train, val): each class contributes val_count(val_frac, n_class) samples to val.

    Deterministic for a given seed and label vector; both index arrays are sorted so the split does
    not depend on the order classes are visited in.
    """
    if not 0.0 <= val_frac < 1.0:  # NaN fails too
        raise ConfigError(f"val_frac must be in [0, 1), got {val_frac}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_val = val_count(val_frac, len(idx))
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
