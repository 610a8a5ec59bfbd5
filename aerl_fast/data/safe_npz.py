""".npz arrays read so that the file cannot run code or ask for more memory than it backs.

An .npz is a zip of .npy members.  `np.load` would allocate each member at the shape its header
claims before reading a byte of it, so a 200-byte file can ask for 10^12 bytes; and a zip member
can inflate ~1000-fold (a zip bomb).  Here every requested member is checked first: stored or
deflated only, its declared size within what its compressed bytes can inflate to, its .npy header
in agreement with that size, no pickled objects (`allow_pickle` stays off), and all requested
arrays together within this machine's memory.  Only then are they read.
"""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Dict, Iterable, NamedTuple

import numpy as np
import numpy.lib.format as npy

from aerl_fast.limits import DEFLATE_MAX_RATIO, array_bytes, format_bytes, require_memory

from .base import DatasetError

_HEADER_READERS = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
_ZIP_SLACK = 1024  # bytes a tiny member may exceed the deflate ratio by (block and header overhead)


class _Member(NamedTuple):
    info: zipfile.ZipInfo
    shape: tuple
    dtype: np.dtype


def _check_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> _Member:
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DatasetError(f"{where}: compression method {info.compress_type} is not one numpy writes "
                           f"(stored or deflated)")
    limit = info.compress_size if info.compress_type == zipfile.ZIP_STORED \
        else DEFLATE_MAX_RATIO * info.compress_size + _ZIP_SLACK
    if info.file_size > limit:
        raise DatasetError(f"{where}: declares {info.file_size} bytes uncompressed from {info.compress_size} "
                           f"compressed, more than they can inflate to (a zip bomb?)")
    with zf.open(info) as fp:
        version = npy.read_magic(fp)
        if version not in _HEADER_READERS:
            raise DatasetError(f"{where}: .npy format version {version} is not supported")
        shape, _, dtype = _HEADER_READERS[version](fp)
        header_len = fp.tell()
    if dtype.hasobject:
        raise DatasetError(f"{where}: holds pickled Python objects (dtype {dtype}); refused: they could "
                           f"run code, and a dataset holds plain arrays")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise DatasetError(f"{where}: structured dtype {dtype} where a plain array was expected")
    nbytes = array_bytes(shape, dtype.itemsize)
    if header_len + nbytes != info.file_size:
        raise DatasetError(f"{where}: header claims shape {shape} of {dtype} ({nbytes} bytes) but the "
                           f"member holds {info.file_size - header_len} bytes of data")
    return _Member(info, shape, dtype)


def read_npz(path, keys: Iterable[str], optional: Iterable[str] = ()) -> Dict[str, np.ndarray]:
    """The arrays `keys` (each required) and those of `optional` present in the .npz at `path`,
    by name without ".npy".  Every problem is a DatasetError naming the file and the member."""
    path = Path(path)
    keys, optional = list(keys), list(optional)
    try:
        with zipfile.ZipFile(path) as zf:
            members = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
            missing = [k for k in keys if k not in members]
            if missing:
                raise DatasetError(f"{path}: missing key(s) {', '.join(missing)} (has {', '.join(members)})")
            wanted = keys + [k for k in optional if k in members and k not in keys]
            checked = {k: _check_member(zf, members[k], f"{path}[{k}]") for k in wanted}
            total = sum(array_bytes(m.shape, m.dtype.itemsize) for m in checked.values())
            require_memory(total, f"{path}: {', '.join(f'{k} {m.shape}' for k, m in checked.items())} "
                                  f"({format_bytes(total)})", DatasetError)
            out = {}
            for k, m in checked.items():
                with zf.open(m.info) as fp:
                    out[k] = npy.read_array(fp, allow_pickle=False)
            return out
    except DatasetError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError, KeyError,
            RuntimeError, SyntaxError) as exc:  # RuntimeError: an encrypted member
        raise DatasetError(f"{path}: corrupt or truncated .npz ({type(exc).__name__}: {exc})") from None
