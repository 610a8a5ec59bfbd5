"""A restricted unpickler for the official CIFAR python batches.

Unpickling runs code named by the file, so a downloaded batch is never handed to `pickle.load`.
CIFAR batches are Python 2 pickles holding only dicts, lists, str/bytes, ints and numpy arrays of
plain numbers; the only globals they name are numpy's array reconstructor, `ndarray` and `dtype`
(plus `_codecs.encode` in Python 3 re-pickles at protocol 2, and numpy's `_frombuffer` at
protocol 5).  Anything else is refused with the name it asked for.

Those globals are not handed out raw either: each is a checked stand-in, so a file of a few bytes
cannot make them allocate more than the file itself holds (an array "of 10^13 elements", a dtype
with object fields, the same string encoded a million times).  Before anything is unpickled the
opcode stream is scanned, so a length or memo index the data cannot back is refused before the
C unpickler would allocate for it.
"""
from __future__ import annotations

import codecs
import io
import math
import pickle
import pickletools

import numpy as np

try:  # numpy >= 2 moved the module; old pickles still name `numpy.core.multiarray`
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

# every global a dataset batch may name -> the checked stand-in (a method of the unpickler)
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy", "ndarray"): "_ndarray",
    ("numpy", "dtype"): "_dtype",
    ("_codecs", "encode"): "_encode",
    # protocol 5 re-pickles (Python 3.14's default) spell an array as _frombuffer(bytes, dtype, shape, order)
    ("numpy.core.numeric", "_frombuffer"): "_frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "_frombuffer",
}
NUMBER_KINDS = "biuf"                # bool, signed, unsigned, float: what image and label arrays hold
LATIN1 = ("latin1", "latin-1")       # the one encoding protocol-2 re-pickles spell bytes with
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global that a dataset batch never contains, or asks for more than it holds."""


class _NdarrayToken:
    """What `numpy.ndarray` resolves to: only a marker for `_reconstruct`, never an allocation."""

    def __new__(cls, *args, **kwargs):
        raise UnsafePickleError("refusing to call numpy.ndarray directly: a dataset batch only "
                                "passes it to _reconstruct")


class _DtypeRequest:
    """A dtype the file asked for, kept inert until an array's state is checked against it."""

    def __init__(self, spec: str):
        self.dtype = np.dtype(spec)
        # at most 8 bytes: a bytes object's buffer is aligned for them, so numpy never copies it
        if self.dtype.kind not in NUMBER_KINDS or self.dtype.itemsize > 8:
            raise UnsafePickleError(f"refusing numpy dtype {spec!r}: a dataset batch holds plain numbers")

    def __setstate__(self, state):
        # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata]);
        # Python 2 pickles read with encoding='bytes' spell the byte order as bytes
        if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], bytes):
            state = state[:1] + (state[1].decode("latin1"),) + state[2:]
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
                and state[5:8] == (-1, -1, 0) and (len(state) == 8 or state[8] is None)):
            raise UnsafePickleError(f"refusing dtype state {state!r:.80}: not a plain number type")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class _BoundedArray(np.ndarray):
    """An array being unpickled: its state is checked and its bytes counted against the file's size."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise UnsafePickleError(f"refusing array state of {type(state).__name__}: not a numpy array")
        _, shape, dtype, fortran, raw = state
        if isinstance(raw, str):  # Python 2 str under encoding='latin1'
            raw = raw.encode("latin1")
        self._guard.spend_array(raw, dtype, shape)
        super().__setstate__((1, tuple(shape), dtype.dtype, bool(fortran), raw))


class DatasetUnpickler(pickle.Unpickler):
    """Resolves only the globals of `_ALLOWED`, each to a checked stand-in, and lets the whole
    file produce at most `budget` bytes of arrays and encoded strings."""

    def __init__(self, file, *, budget: int, **kwargs):
        super().__init__(file, **kwargs)
        self.budget = budget
        self._counted = {}  # id -> bytes already spent (kept alive so the id stays theirs)

    def find_class(self, module, name):
        try:
            return getattr(self, _ALLOWED[(module, name)])
        except KeyError:
            raise UnsafePickleError(f"refusing to load global {module}.{name}: not part of a dataset batch") from None

    _ndarray = _NdarrayToken

    def spend(self, nbytes: int, what: str):
        """Count `nbytes` made from the file; refuse once the total exceeds the file's size."""
        if nbytes > self.budget:
            raise UnsafePickleError(f"refusing {what} ({nbytes} bytes): more than the file's remaining "
                                    f"{self.budget} bytes can hold")
        self.budget -= nbytes

    def spend_array(self, raw, dtype, shape):
        """Check that `raw` holds exactly an array of `shape` and `dtype`, and count its bytes."""
        if not isinstance(dtype, _DtypeRequest):
            raise UnsafePickleError("refusing an array whose dtype is not a numpy.dtype of numbers")
        if not isinstance(raw, (bytes, bytearray)):
            raise UnsafePickleError(f"refusing array data of type {type(raw).__name__}: "
                                    f"a dataset array holds raw bytes")
        n = self.count_elements(shape)
        if n * dtype.dtype.itemsize != len(raw):
            raise UnsafePickleError(f"array of shape {shape} needs {n * dtype.dtype.itemsize} bytes, "
                                    f"the file gives {len(raw)}")
        self.spend_once(raw, f"array of shape {shape}")  # numpy keeps the bytes, it does not copy them

    def spend_once(self, raw, what: str):
        """Count `raw` against the budget the first time it is seen (protocol-2 arrays reuse the
        bytes `_codecs.encode` made)."""
        if id(raw) not in self._counted:
            self._counted[id(raw)] = raw
            self.spend(len(raw), what)

    @staticmethod
    def count_elements(shape) -> int:
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in shape)):
            raise UnsafePickleError(f"refusing array shape {shape!r:.80}: not a tuple of sizes")
        return math.prod(shape)

    def _reconstruct(self, subtype, shape, typecode):
        if subtype is not _NdarrayToken or typecode not in (b"b", "b"):
            raise UnsafePickleError("refusing _reconstruct of anything but a plain numpy array")
        n = self.count_elements(shape)  # genuine batches ask for (0,): the data comes with the state
        self.spend(n, f"an array of {n} elements")
        arr = _reconstruct(_BoundedArray, shape, "b")
        arr._guard = self
        return arr

    def _frombuffer(self, raw, dtype, shape, order):
        if order not in ("C", "F"):
            raise UnsafePickleError(f"refusing _frombuffer order {order!r:.20}")
        self.spend_array(raw, dtype, shape)
        return np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order=order)  # no copy: counted once

    def _dtype(self, spec, *align_copy):  # align and copy change nothing for plain number types
        if isinstance(spec, bytes):
            spec = spec.decode("latin1")
        if not isinstance(spec, str):
            raise UnsafePickleError(f"refusing numpy dtype of {type(spec).__name__}: a dataset batch holds plain numbers")
        try:
            return _DtypeRequest(spec)
        except (TypeError, ValueError, SyntaxError):  # not a dtype numpy can parse
            raise UnsafePickleError(f"refusing numpy dtype {spec!r}: not a number type") from None

    def _encode(self, obj, encoding, errors="strict"):
        if not (isinstance(obj, str) and encoding in LATIN1 and errors == "strict"):
            raise UnsafePickleError(f"refusing _codecs.encode(<{type(obj).__name__}>, {encoding!r:.20}): "
                                    f"only latin1 strings spell bytes in a dataset batch")
        out = codecs.encode(obj, "latin1")
        self.spend_once(out, "an encoded string")
        return out


def _prescan(data: bytes):
    """Walk the opcodes without running them: every length must be backed by the data (pickletools
    checks it) and every memo index and frame must fit in the file (the C unpickler would allocate
    for them first)."""
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name in _MEMO_OPS and arg > len(data):
                raise UnsafePickleError(f"refusing memo index {arg} at byte {pos}: a file of "
                                        f"{len(data)} bytes cannot fill it")
            if op.name == "FRAME" and arg > len(data) - pos:
                raise UnsafePickleError(f"refusing a frame of {arg} bytes at byte {pos}: the file "
                                        f"has {len(data) - pos} left")
    except ValueError as exc:  # a length the data cannot back, an unknown opcode, no STOP
        raise pickle.UnpicklingError(f"corrupt pickle ({exc})") from None


def _plain_arrays(root):
    """Replace the bounded arrays in the loaded dicts and lists by plain ndarray views, in place
    (shared and cyclic references allowed; one array shared by several slots stays one object)."""
    views = {}

    def plain(arr):
        return views.setdefault(id(arr), arr.view(np.ndarray))
    if isinstance(root, _BoundedArray):
        return plain(root)
    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        slots = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
        for key, value in list(slots):
            if isinstance(value, _BoundedArray) and not isinstance(obj, tuple):
                obj[key] = plain(value)
            elif isinstance(value, (dict, list, tuple)):
                stack.append(value)
    return root


def loads_dataset_pickle(data: bytes, encoding: str = "bytes"):
    """Unpickle a dataset batch (`encoding='bytes'` keeps Python 2 str keys as bytes)."""
    _prescan(data)
    unpickler = DatasetUnpickler(io.BytesIO(data), budget=len(data), encoding=encoding)
    return _plain_arrays(unpickler.load())
