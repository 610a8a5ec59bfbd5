"""Datasets: sources that return uint8 NHWC images + int64 labels, and the on-device batch loader.

    from aerl_fast.data import load_dataset
    images, labels, classes = load_dataset("cifar10", "~/data", "train")
"""
from __future__ import annotations

import os
from pathlib import Path

from .base import SPLITS, DatasetError, ImageSet, check_split
from .split import stratified_split

DATASETS = ("shapes", "cifar10", "cifar100", "imagenet100", "npz")

# per-dataset channel statistics for the normalisation layer inside the model (None: computed)
CHANNEL_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet100": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def default_data_dir() -> Path:
    return Path(os.environ.get("AERL_FAST_DATA", "data")).expanduser()


def load_dataset(name: str, data_dir=None, split: str = "train", *, labels: str = "fine",
                 image_size: int = 32, download: bool = False, seed: int = 0,
                 decoder: str = "auto", decode_device=None) -> ImageSet:
    """One split ('train' or 'test') of a dataset as ImageSet(images uint8 [N,H,W,3], labels int64, classes).

    name: shapes (embedded, generated from `seed`) | cifar10 | cifar100 (labels fine|coarse) |
          imagenet100 (image-folder tree, or a pre-resized .npz) | npz (the study's .npz file).
    decoder: how an image-folder tree is decoded: auto | pil | dali (aerl_fast.data.imagefolder);
    decode_device: where DALI decodes it (None/"auto": CUDA when available, "cpu", "cuda[:N]").
    Both are ignored by the other sources.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    check_split(split)
    if name == "shapes":
        from .shapes import load_shapes
        return load_shapes(split, seed=seed)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name in ("cifar10", "cifar100"):
        from .cifar import load_cifar
        return load_cifar(name, root, split, labels=labels, download_missing=download)
    if name == "npz":
        from .npz import load_npz
        return load_npz(root, split)
    # imagenet100: an .npz file, a folder holding exactly one, or an image-folder tree
    from .npz import load_npz
    if root.suffix == ".npz" or (root.is_dir() and not (root / "train").is_dir()
                                 and len(list(root.glob("*.npz"))) == 1):
        return load_npz(root if root.suffix == ".npz" else next(root.glob("*.npz")), split)
    from .imagefolder import load_image_folder
    return load_image_folder(root, split, size=image_size, decoder=decoder,
                             device=None if decode_device in (None, "auto") else decode_device)


__all__ = ["CHANNEL_STATS", "DATASETS", "SPLITS", "DatasetError", "ImageSet", "load_dataset", "stratified_split"]
