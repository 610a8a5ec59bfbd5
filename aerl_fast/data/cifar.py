"""CIFAR-10 / CIFAR-100 from the official python layout: the extracted folder or the .tar.gz.

Members are read straight out of the archive (no extraction).  The batches are Python 2 pickles;
they go through the restricted unpickler and every array is checked before use, so a truncated or
foreign file is reported by name instead of half-read.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tarfile
import urllib.request
import zlib
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from aerl_fast.limits import DEFLATE_MAX_RATIO, format_bytes, require_memory

from .base import DatasetError, ImageSet, check_split
from .labels import check_labels
from .safe_pickle import UnsafePickleError, loads_dataset_pickle

SPECS = {
    "cifar10": dict(
        folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], meta="batches.meta",
        label_key="labels", names_key="label_names", num_classes=10,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a"),
    "cifar100": dict(
        folder="cifar-100-python", archive="cifar-100-python.tar.gz",
        train=["train"], test=["test"], meta="meta",
        label_key="fine_labels", names_key="fine_label_names", num_classes=100,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85"),
}
LABEL_SETS = ("fine", "coarse")  # CIFAR-100's two label sets (--labels)
COARSE = dict(label_key="coarse_labels", names_key="coarse_label_names", num_classes=20)


def _str_keys(d, where):
    """Python 2 pickles give bytes keys under encoding='bytes'; normalise to str."""
    if not isinstance(d, dict):
        raise DatasetError(f"{where}: expected a dict, got {type(d).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _decode(names, where):
    if not (isinstance(names, list) and all(isinstance(n, (bytes, str)) for n in names)):
        raise DatasetError(f"{where}: class names must be a list of strings, got {type(names).__name__}")
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: class names are not UTF-8 ({exc})") from None


class _Source:
    """Reads named members from the extracted folder or from the archive."""

    def __init__(self, root: Path, spec):
        self.spec = spec
        self.folder = self.archive = None
        candidates = [root / spec["folder"], root]
        for c in candidates:
            if c.is_dir() and (c / spec["test"][0]).exists():
                self.folder = c
                return
        for c in ([root] if root.is_file() else []) + [root / spec["archive"]]:
            if c.is_file():
                self.archive = c
                return
        raise DatasetError(
            f"no {spec['folder']} found at {root}: expected the extracted folder "
            f"{root / spec['folder']}/ (with {', '.join(spec['train'][:2])}..., {spec['test'][0]}, {spec['meta']}) "
            f"or the archive {root / spec['archive']}; pass --data-dir, or --download to fetch it")

    @property
    def where(self):
        return str(self.folder or self.archive)

    def read_all(self, names) -> Dict[str, Optional[bytes]]:
        """The bytes of each named member (None when absent), each size checked before it is read."""
        if self.folder is not None:
            return {n: self._read_file(self.folder / n) for n in names}
        wanted = {f"{self.spec['folder']}/{n}": n for n in names}
        out = {n: None for n in names}
        # a gzip stream inflates at most ~1000-fold: a member declaring more is lying
        most = DEFLATE_MAX_RATIO * self.archive.stat().st_size
        try:
            with tarfile.open(self.archive, "r:gz") as tar:
                for member in tar:
                    if member.name in wanted and member.isfile():
                        where = f"{self.archive}:{member.name}"
                        if member.size > most:
                            raise DatasetError(f"{where}: declares {member.size} bytes, more than the "
                                               f"archive's {self.archive.stat().st_size} bytes can inflate to")
                        require_memory(member.size, where, DatasetError)
                        out[wanted.pop(member.name)] = tar.extractfile(member).read()
                        if not wanted:
                            break
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise DatasetError(f"{self.archive}: corrupt or truncated archive ({exc})") from None
        return out

    @staticmethod
    def _read_file(path: Path) -> Optional[bytes]:
        """A member of the extracted folder: a regular file (not a device, a FIFO or a folder) whose
        size fits in memory, or None when there is nothing of that name."""
        if not os.path.lexists(path):
            return None
        if not path.is_file():
            raise DatasetError(f"{path}: not a regular file")
        try:
            size = path.stat().st_size
            require_memory(size, f"{path} ({format_bytes(size)})", DatasetError)
            with open(path, "rb") as fh:
                return fh.read(size)  # no more than stat said: a device or growing file cannot run on
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _unpickle(raw: bytes, where: str) -> dict:
    """A batch or meta file through the restricted unpickler, as a dict with str keys."""
    try:
        return _str_keys(loads_dataset_pickle(raw, encoding="bytes"), where)
    except UnsafePickleError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            RecursionError) as exc:
        raise DatasetError(f"{where}: corrupt or truncated file ({type(exc).__name__}: {exc})") from None


def _load_batch(raw: bytes, where: str, label_key: str, num_classes: int):
    d = _unpickle(raw, where)
    for key in ("data", label_key):
        if key not in d:
            raise DatasetError(f"{where}: missing key '{key}' (has {sorted(map(str, d))})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetError(f"{where}: 'data' must be uint8 [N, 3072], got {getattr(data, 'dtype', type(data))} {shape}")
    try:
        labels = np.asarray(d[label_key])
    except (ValueError, TypeError) as exc:  # ragged or foreign objects
        raise DatasetError(f"{where}: '{label_key}' is not a list of integers ({exc})") from None
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{where}: {data.shape[0]} images but {labels.shape} '{label_key}'")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, check_labels(labels, num_classes, f"{where}['{label_key}']")


def download(name: str, data_dir: Path) -> Path:
    """Fetch the official archive into data_dir (atomic write, md5 checked)."""
    spec = SPECS[name]
    data_dir.mkdir(parents=True, exist_ok=True)
    dest = data_dir / spec["archive"]
    if dest.exists():
        return dest
    tmp = dest.with_suffix(".part")
    print(f"downloading {spec['url']} -> {dest}", file=sys.stderr)
    try:
        with urllib.request.urlopen(spec["url"], timeout=60) as resp, open(tmp, "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"download of {spec['url']} failed ({exc}); place {spec['archive']} in {data_dir}") from None
    digest = hashlib.md5(tmp.read_bytes()).hexdigest()
    if digest != spec["md5"]:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"download of {spec['url']}: md5 {digest} != expected {spec['md5']}")
    os.replace(tmp, dest)
    return dest


def load_cifar(name: str, data_dir, split: str = "train", labels: str = "fine",
               download_missing: bool = False) -> ImageSet:
    """CIFAR-10 or CIFAR-100 (`labels='fine'|'coarse'` for CIFAR-100) as uint8 NHWC + int64 labels."""
    if name not in SPECS:
        raise DatasetError(f"unknown CIFAR variant {name!r}")
    check_split(split)
    spec = dict(SPECS[name])
    if name == "cifar100" and labels == "coarse":
        spec.update(COARSE)
    elif labels not in LABEL_SETS:
        raise DatasetError(f"labels must be one of {', '.join(LABEL_SETS)}, got {labels!r}")
    root = Path(data_dir).expanduser()
    try:
        source = _Source(root, spec)
    except DatasetError:
        if not download_missing:
            raise
        download(name, root if not root.is_file() else root.parent)
        source = _Source(root, spec)
    members = spec[split]
    raw = source.read_all(members + [spec["meta"]])
    present = [m for m in members if raw[m] is not None]
    if not present:
        raise DatasetError(f"{source.where}: missing {', '.join(members)} for the {split} split")
    missing = [m for m in members if raw[m] is None]
    if missing:
        print(f"aerl_fast: warning: {source.where} lacks {', '.join(missing)}; "
              f"using {', '.join(present)} only", file=sys.stderr)
    images, ys = [], []
    for m in present:
        x, y = _load_batch(raw[m], f"{source.where}/{m}", spec["label_key"], spec["num_classes"])
        images.append(x)
        ys.append(y)
    classes = [str(i) for i in range(spec["num_classes"])]
    if raw[spec["meta"]] is not None:
        meta_where = f"{source.where}/{spec['meta']}"
        meta = _unpickle(raw[spec["meta"]], meta_where)
        if spec["names_key"] in meta:
            classes = _decode(meta[spec["names_key"]], f"{meta_where}[{spec['names_key']}]")
    if len(classes) != spec["num_classes"]:
        raise DatasetError(f"{source.where}: meta lists {len(classes)} classes, expected {spec['num_classes']}")
    images = np.ascontiguousarray(np.concatenate(images))
    return ImageSet(images, np.concatenate(ys), classes)
