"""The study's `.npz` layout (X_train, y_train, X_test, y_test) — also used for 32×32 ImageNet-100.

Loaded with `allow_pickle=False`: an npz holding object arrays is refused, not executed.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .base import DatasetError, ImageSet, check_labels, check_split, to_uint8_hwc

KEYS = {"train": ("X_train", "y_train"), "test": ("X_test", "y_test")}
NAME_KEYS = ("classes", "class_names", "label_names")


def _labels(y, where):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot, as Keras pipelines store them
        y = y.argmax(1)
    return y.reshape(-1) if y.ndim == 2 else y


def load_npz(path, split: str = "train", num_classes=None) -> ImageSet:
    """Images of one split as uint8 NHWC (uint8 or float-in-[0,1] input, NHWC or NCHW)."""
    path = Path(path).expanduser()
    check_split(split)
    if not path.is_file():
        raise DatasetError(f"no .npz file at {path}: expected a file with arrays "
                           f"X_train, y_train, X_test, y_test (images HWC uint8 or float in [0,1])")
    xk, yk = KEYS[split]
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in (xk, yk) if k not in z.files]
            if missing:
                raise DatasetError(f"{path}: missing key(s) {', '.join(missing)} (has {', '.join(z.files)})")
            x, y = z[xk], _labels(z[yk], str(path))
            y_all = [_labels(z[k], str(path)) for k in ("y_train", "y_test") if k in z.files]
            names = next((list(map(str, z[k])) for k in NAME_KEYS if k in z.files), None)
    except DatasetError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: corrupt or truncated .npz ({type(exc).__name__}: {exc})") from None
    where = f"{path}[{xk}]"
    images = to_uint8_hwc(x, where)
    if len(images) != len(y):
        raise DatasetError(f"{path}: {len(images)} images in {xk} but {len(y)} labels in {yk}")
    if num_classes is None:
        num_classes = len(names) if names else int(max(int(np.max(a)) for a in y_all if a.size)) + 1
    labels = check_labels(y, num_classes, f"{path}[{yk}]")
    classes = names if names and len(names) == num_classes else [str(i) for i in range(num_classes)]
    return ImageSet(images, labels, classes)
