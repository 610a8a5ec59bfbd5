"""Label vectors from dataset files: integers checked, class counts bounded by what the file holds,
and a stray label (one 57 among labels 0-9) named instead of silently making a 58-class model."""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from aerl_fast.limits import MAX_CLASSES

from .base import DatasetError

_INT64_MAX = np.iinfo(np.int64).max


def as_int_labels(labels, where: str) -> np.ndarray:
    """1-D int64 labels from an integer array or an integer-valued float array."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise DatasetError(f"{where}: labels must be 1-D, got shape {y.shape}")
    if not y.size:
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(y))
        if bad.size:
            raise DatasetError(f"{where}: label {y[bad[0]]} at index {bad[0]} is not a number")
        bad = np.flatnonzero(y != np.round(y))
        if bad.size:
            raise DatasetError(f"{where}: labels must be integers, got {y[bad[0]]} at index {bad[0]}")
        big = np.flatnonzero(np.abs(y) > MAX_CLASSES)
        if big.size:  # before the cast: 1e20 would wrap around in int64
            raise DatasetError(f"{where}: label {y[big[0]]:.6g} at index {big[0]} is out of range")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{where}: labels must be integers, got dtype {y.dtype}")
    elif y.dtype == np.uint64 and y.max() > _INT64_MAX:
        raise DatasetError(f"{where}: label {y.max()} is out of range")
    return y.astype(np.int64)


def check_labels(labels, num_classes: int, where: str) -> np.ndarray:
    """int64 labels in [0, num_classes), or a DatasetError naming the bad value."""
    y = as_int_labels(labels, where)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DatasetError(f"{where}: label {bad} out of range for {num_classes} classes")
    return y


def infer_num_classes(label_sets: Sequence[np.ndarray], where: str) -> int:
    """max label + 1 over every split of a file that names no classes.

    Refused when that is more classes than the file has labels (most classes would have no sample)
    or than MAX_CLASSES; a warning names the labels above a gap of empty classes (a stray label)."""
    y = np.concatenate([as_int_labels(a, where) for a in label_sets]) if label_sets else np.zeros(0, np.int64)
    if not y.size:
        raise DatasetError(f"{where}: no labels, so the number of classes is unknown")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise DatasetError(f"{where}: label {lo} is negative")
    k = hi + 1
    if k > MAX_CLASSES:
        raise DatasetError(f"{where}: label {hi} implies {k} classes, more than the {MAX_CLASSES} "
                           f"a dataset may have")
    if k > y.size:
        raise DatasetError(f"{where}: label {hi} implies {k} classes but the file holds only {y.size} "
                           f"labels, so most classes would have no sample; is label {hi} a mistake?")
    counts = np.bincount(y, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        above = np.flatnonzero(counts[empty[0]:]) + empty[0]
        shown = ", ".join(f"{c} ({counts[c]} sample{'s' if counts[c] > 1 else ''})" for c in above[:5])
        print(f"aerl_fast: warning: {where}: label(s) {shown}{' ...' if above.size > 5 else ''} lie above "
              f"{empty.size} class(es) with no sample (first: {empty[0]}); the model gets {k} classes. "
              f"A stray label?", file=sys.stderr)
    return k
