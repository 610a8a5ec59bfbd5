"""A restricted unpickler for the official CIFAR python batches.

Unpickling runs code named by the file, so a downloaded batch is never handed to `pickle.load`.
CIFAR batches are Python 2 pickles holding only dicts, lists, str/bytes, ints and numpy uint8
arrays; the only globals they name are numpy's array reconstructor, `ndarray` and `dtype` (plus
`_codecs.encode` in Python 3 re-pickles).
Anything else is refused with the name it asked for.
"""
from __future__ import annotations

import codecs
import io
import pickle

import numpy as np

try:  # numpy >= 2 moved the module; old pickles still name `numpy.core.multiarray`
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 re-pickles of the batches at protocol 2 spell bytes as _codecs.encode(str, 'latin1')
    ("_codecs", "encode"): codecs.encode,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global that a dataset batch never contains."""


class DatasetUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load global {module}.{name}: not part of a dataset batch") from None


def loads_dataset_pickle(data: bytes, encoding: str = "bytes"):
    """Unpickle a dataset batch (`encoding='bytes'` keeps Python 2 str keys as bytes)."""
    return DatasetUnpickler(io.BytesIO(data), encoding=encoding).load()
