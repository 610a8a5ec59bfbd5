"""The decoded-pixel cache of an image-folder tree, kept beside the tree.

It is keyed on what changes when images change: every file's path, label, size, modification and
status-change time (the latter moves even when a copy preserves the modification time), plus the
output size and the decoding geometry's version.  A cache whose key differs is rebuilt, and the
rebuild is said on stderr.  Hashing every file's content would read the whole tree on each start
(tens of GB for ImageNet-100); the status-change time catches the replacements a content hash would.

Written atomically (a uniquely named temporary file renamed over the cache, so concurrent torchrun
processes never see half a file); temporary files left by a killed writer are removed the next
time the cache is written, once their process no longer runs.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .base import DatasetError
from .safe_npz import read_npz

GEOMETRY_VERSION = 2   # bump when the resize/crop arithmetic changes: old caches then rebuild
_TEMP = re.compile(r"^\.aerl_fast_.+\.npz\.(\d+)-[0-9a-f]{8}\.tmp$")


def cache_path(root: Path, split_dir: str, size: int) -> Path:
    return root / f".aerl_fast_{split_dir}_{size}px.npz"


def fingerprint(root: Path, files: Sequence[Path], labels: Sequence[int], size: int) -> str:
    """The cache key of decoding `files` (with `labels`) to `size` px."""
    h = hashlib.sha256(f"aerl_fast image cache v{GEOMETRY_VERSION} {size}px\n".encode())
    for f, y in zip(files, labels):
        st = f.stat()
        rel = os.fsencode(f.relative_to(root))
        h.update(rel + f"\0{int(y)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()


def _say(message: str):
    print(f"aerl_fast: {message}", file=sys.stderr)


def read_cache(path: Path, key: str, labels: np.ndarray, size: int) -> Optional[np.ndarray]:
    """The cached images when `path` holds them under `key`, else None (and why, on stderr)."""
    if not path.is_file():
        return None
    try:
        arrays = read_npz(path, ("images", "labels"), optional=("fingerprint",))
    except DatasetError as exc:
        _say(f"rebuilding the image cache: {exc}")
        return None
    images = arrays["images"]
    if "fingerprint" not in arrays:
        _say(f"rebuilding the image cache {path}: written by an older aerl_fast (no file fingerprint)")
    elif str(arrays["fingerprint"]) != key:
        _say(f"rebuilding the image cache {path}: the image files changed since it was written "
             f"(names, sizes or modification times)")
    elif images.shape != (len(labels), size, size, 3) or images.dtype != np.uint8 \
            or not np.array_equal(arrays["labels"], labels):
        _say(f"rebuilding the image cache {path}: it holds {images.dtype} {images.shape}, "
             f"not the {len(labels)} images of {size} px expected")
    else:
        return images
    return None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def remove_orphaned_temps(root: Path) -> list:
    """Delete the cache temporaries in `root` whose writing process is gone (killed mid-write).

    Keyed on the pid in the name, so another live process's file is kept; on a folder shared by
    several machines a remote writer whose pid is free here loses its temporary file, and its
    rename then fails harmlessly (no cache, nothing wrong)."""
    removed = []
    for p in root.glob(".aerl_fast_*.tmp"):
        m = _TEMP.match(p.name)
        if m and _process_gone(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_cache(path: Path, images: np.ndarray, labels: np.ndarray, key: str, decoder: str):
    """Atomically: a uniquely named temporary file in the same folder, fsynced, then renamed over `path`
    (concurrent writers, e.g. torchrun processes, each write their own temporary file).  A read-only
    dataset folder means no cache, no harm."""
    remove_orphaned_temps(path.parent)
    for old in path.parent.glob(f"{path.stem}_*.npz"):  # older versions put the image count in the name
        old.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            np.savez(fh, images=images, labels=labels, fingerprint=np.array(key), decoder=np.array(decoder))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
