"""The study's `.npz` layout (X_train, y_train, X_test, y_test) — also used for 32×32 ImageNet-100.

Read through `safe_npz`: an npz holding object arrays is refused, not executed, and a member whose
header or zip entry asks for more than the file backs is refused before anything is allocated.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from aerl_fast.limits import MAX_CLASSES

from .base import DatasetError, ImageSet, check_split, to_uint8_hwc
from .labels import as_int_labels, check_labels, infer_num_classes
from .safe_npz import read_npz

KEYS = {"train": ("X_train", "y_train"), "test": ("X_test", "y_test")}
NAME_KEYS = ("classes", "class_names", "label_names")


def _labels(y, where):
    """1-D labels; one-hot rows (as Keras pipelines store them) become their class index."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        if not (np.issubdtype(y.dtype, np.number) and np.isfinite(y).all()):
            raise DatasetError(f"{where}: one-hot labels must be finite numbers, got dtype {y.dtype}")
        top = y.max(1, keepdims=True)
        ties = np.flatnonzero((y == top).sum(1) != 1)
        if ties.size:  # argmax would pick the first of them, silently
            raise DatasetError(f"{where}: one-hot row {ties[0]} has no single largest entry "
                               f"({np.array2string(y[ties[0]][:10], precision=3)}{' ...' if y.shape[1] > 10 else ''})")
        y = y.argmax(1)
    return as_int_labels(y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y, where)


def _names(arr, where):
    arr = np.asarray(arr)
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise DatasetError(f"{where}: class names must be a 1-D array of strings, got {arr.dtype} {arr.shape}")
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in arr.tolist()]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: class names are not UTF-8 ({exc})") from None


def load_npz(path, split: str = "train", num_classes=None) -> ImageSet:
    """Images of one split as uint8 NHWC (uint8 or float-in-[0,1] input, NHWC or NCHW)."""
    path = Path(path).expanduser()
    check_split(split)
    if not path.is_file():
        raise DatasetError(f"no .npz file at {path}: expected a file with arrays "
                           f"X_train, y_train, X_test, y_test (images HWC uint8 or float in [0,1])")
    xk, yk = KEYS[split]
    label_keys = ("y_train", "y_test")
    arrays = read_npz(path, (xk, yk), optional=label_keys + NAME_KEYS)
    y = _labels(arrays[yk], f"{path}[{yk}]")
    y_all = [_labels(arrays[k], f"{path}[{k}]") if k != yk else y for k in label_keys if k in arrays]
    name_key = next((k for k in NAME_KEYS if k in arrays), None)
    names = _names(arrays[name_key], f"{path}[{name_key}]") if name_key else None
    if names and len(names) > MAX_CLASSES:
        raise DatasetError(f"{path}[{name_key}]: {len(names)} class names, more than the {MAX_CLASSES} "
                           f"a dataset may have")
    images = to_uint8_hwc(arrays[xk], f"{path}[{xk}]")
    if len(images) != len(y):
        raise DatasetError(f"{path}: {len(images)} images in {xk} but {len(y)} labels in {yk}")
    if images.shape[1] != images.shape[2]:
        raise DatasetError(f"{path}[{xk}]: images must be square, got {images.shape[1]}×{images.shape[2]}")
    if num_classes is None:
        num_classes = len(names) if names else infer_num_classes(y_all, str(path))
    labels = check_labels(y, num_classes, f"{path}[{yk}]")
    classes = names if names and len(names) == num_classes else [str(i) for i in range(num_classes)]
    return ImageSet(images, labels, classes)
