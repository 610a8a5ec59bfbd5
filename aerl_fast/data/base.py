"""What every dataset source returns, and the error it raises."""
from __future__ import annotations

from typing import List, NamedTuple

import numpy as np

from aerl_fast.errors import UserError


SPLITS = ("train", "test")  # every source serves these two; validation is carved out of "train"


class DatasetError(UserError):
    """A dataset is missing, malformed or inconsistent; the message names the file and the problem."""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


class ImageSet(NamedTuple):
    images: np.ndarray   # uint8 [N, H, W, 3]
    labels: np.ndarray   # int64 [N]
    classes: List[str]   # class names, index = label


def to_uint8_hwc(x, where: str) -> np.ndarray:
    """Accept uint8 or float-in-[0,1] images, NHWC or NCHW with 1 or 3 channels; return uint8 NHWC RGB."""
    x = np.asarray(x)
    if x.ndim == 3:  # grayscale N,H,W
        x = x[..., None]
    if x.ndim != 4:
        raise DatasetError(f"{where}: images must be 4-D [N,H,W,C] or [N,C,H,W], got shape {x.shape}")
    if x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] not in (1, 3):
        raise DatasetError(f"{where}: images need 1 or 3 channels, got shape {x.shape}")
    if x.dtype == np.uint8:
        out = x
    elif np.issubdtype(x.dtype, np.floating):
        nan = np.isnan(x)
        if nan.any():
            raise DatasetError(f"{where}: float images hold {int(nan.sum())} NaN value(s) (first in image "
                               f"{int(np.argmax(nan.reshape(len(x), -1).any(1)))}); they must lie in [0, 1]")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise DatasetError(f"{where}: float images must lie in [0, 1], got range "
                               f"[{x.min():.3g}, {x.max():.3g}]")
        out = np.round(x * 255.0).astype(np.uint8)
    elif np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DatasetError(f"{where}: integer images must lie in [0, 255], got [{x.min()}, {x.max()}]")
        out = x.astype(np.uint8)
    else:
        raise DatasetError(f"{where}: unsupported image dtype {x.dtype}")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out)
