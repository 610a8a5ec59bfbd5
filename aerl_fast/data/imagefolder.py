"""ImageNet-100 as an image-folder tree: <root>/train/<class>/*.JPEG and <root>/val/<class>/*.

Images are decoded and resized (shorter side to `size`, centre crop) once, in a thread pool, and
cached beside the tree as an .npz when the folder is writable, so later runs start instantly.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .base import DatasetError, ImageSet

EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}


def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc})") from None


def _class_dirs(split_dir: Path):
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir())


def load_image_folder(root, split: str = "train", size: int = 32, cache: bool = True) -> ImageSet:
    root = Path(root).expanduser()
    if split not in SPLIT_DIRS:
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    split_dir = next((root / d for d in SPLIT_DIRS[split] if (root / d).is_dir()), None)
    if split_dir is None:
        raise DatasetError(f"no image folder tree at {root}: expected {root}/train/<class>/*.JPEG and "
                           f"{root}/val/<class>/*.JPEG (or a 32×32 .npz file with X_train, y_train, X_test, y_test)")
    classes = _class_dirs(root / "train") if (root / "train").is_dir() else _class_dirs(split_dir)
    if not classes:
        raise DatasetError(f"{split_dir}: no class folders")
    split_classes = _class_dirs(split_dir)
    unknown = sorted(set(split_classes) - set(classes))
    if unknown:
        raise DatasetError(f"{split_dir}: class folder(s) {unknown[:5]} not present in {root / 'train'}")
    files, labels = [], []
    for label, cls in enumerate(classes):
        d = split_dir / cls
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in EXTENSIONS:
                files.append(f)
                labels.append(label)
    if not files:
        raise DatasetError(f"{split_dir}: no images ({', '.join(sorted(EXTENSIONS))})")
    cache_path = root / f".aerl_fast_{split_dir.name}_{size}px_{len(files)}.npz"
    if cache and cache_path.is_file():
        try:
            with np.load(cache_path, allow_pickle=False) as z:
                if z["images"].shape == (len(files), size, size, 3):
                    return ImageSet(z["images"], z["labels"].astype(np.int64), classes)
        except (OSError, ValueError, KeyError):
            pass  # a stale or broken cache is rebuilt
    images = np.empty((len(files), size, size, 3), np.uint8)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        it = pool.map(lambda f: _decode(f, size), files)
        if tqdm is not None:
            it = tqdm(it, total=len(files), desc=f"decoding {split_dir.name}", unit="img",
                      disable=len(files) < 2000, file=sys.stderr)
        for i, img in enumerate(it):
            images[i] = img
    y = np.asarray(labels, np.int64)
    if cache:
        tmp = cache_path.with_name(cache_path.name + ".tmp.npz")
        try:
            np.savez(tmp, images=images, labels=y)
            os.replace(tmp, cache_path)
        except OSError:
            tmp.unlink(missing_ok=True)  # read-only dataset folder: no cache, no harm
    return ImageSet(images, y, classes)
