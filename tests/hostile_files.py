"""Builders of hostile input files for the hostile-input tests: code-carrying payloads that would
create a marker file if they ever ran, and bombs of a few bytes that ask for far more than they hold.

Every builder writes genuine container formats (pickle opcodes, zip, tar.gz, PNG, JPEG, torch zip
checkpoints) by hand or with the standard writers, then plants the one hostile field.
"""
import gzip
import io
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import numpy.lib.format as npy

PROTO2 = b"\x80\x02"


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _unicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _call(func: bytes, *args: bytes) -> bytes:
    """func(*args) as pickle opcodes (MARK args TUPLE REDUCE)."""
    return func + b"(" + b"".join(args) + b"tR"


class _Reduce:
    """Pickles as `func(*args)`, the way a payload made with Python's own pickler looks."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def pickle_payloads(marker: Path) -> dict:
    """One pickle per known payload family, each creating `marker` when unpickled unguarded:
    name -> (pickle bytes, the global the guard must name)."""
    import os
    m = str(marker)
    touch = f"touch '{m}'"
    py_touch = f"open({m!r}, 'w').close()"
    inner = marker.with_name(marker.name + ".inner.pkl")  # what the numpy.load payload loads
    inner.write_bytes(pickle.dumps(_Reduce(os.system, touch), protocol=2))
    stop = b"."
    return {
        "builtins.eval": (PROTO2 + _call(_global("builtins", "eval"), _unicode(py_touch)) + stop, "builtins.eval"),
        "__builtin__.eval (Python 2 spelling)":
            (PROTO2 + _call(_global("__builtin__", "eval"), _unicode(py_touch)) + stop, "__builtin__.eval"),
        "builtins.exec": (PROTO2 + _call(_global("builtins", "exec"), _unicode(py_touch)) + stop, "builtins.exec"),
        "builtins.getattr(os, 'system')": (PROTO2 + _call(
            _call(_global("builtins", "getattr"), _call(_global("builtins", "__import__"), _unicode("os")),
                  _unicode("system")), _unicode(touch)) + stop, "builtins.getattr"),
        "posix.system": (pickle.dumps(_Reduce(os.system, touch), protocol=2), "posix.system"),
        "os.system": (PROTO2 + _call(_global("os", "system"), _unicode(touch)) + stop, "os.system"),
        "subprocess.check_call": (PROTO2 + _call(_global("subprocess", "check_call"),
                                                 b"](" + _unicode("touch") + _unicode(m) + b"e") + stop,
                                  "subprocess.check_call"),
        "copyreg._reconstructor": (PROTO2 + _call(_global("copyreg", "_reconstructor"), _global("builtins", "object"),
                                                  _global("builtins", "object"),
                                                  _call(_global("os", "system"), _unicode(touch))) + stop,
                                   "copyreg._reconstructor"),
        "numpy.load(allow_pickle=True)": (PROTO2 + _call(_global("numpy", "load"), _unicode(str(inner)), b"N", b"\x88")
                                          + stop, "numpy.load"),
        # an allowed global wrapping a forbidden one: the inner call must be refused
        "nested reduce in _codecs.encode": (PROTO2 + _call(_global("_codecs", "encode"), _call(
            _global("builtins", "eval"), _unicode(f"({py_touch}, 'x')[1]")), _unicode("latin1")) + stop, "builtins.eval"),
        "nested reduce in _reconstruct": (PROTO2 + _call(_global("numpy.core.multiarray", "_reconstruct"),
                                                         _global("numpy", "ndarray"), b"K\x00\x85",
                                                         _call(_global("posix", "system"), _unicode(touch))) + stop,
                                          "posix.system"),
        "STACK_GLOBAL (protocol 4)": (pickle.dumps(_Reduce(os.system, touch), protocol=4), "posix.system"),
        "INST (protocol 0)": (b"(S'" + touch.encode() + b"'\nios\nsystem\n.", "os.system"),
        "OBJ (protocol 1)": (b"(cos\nsystem\nS'" + touch.encode() + b"'\no.", "os.system"),
    }


# --------------------------------------------------------------------------------- pickle bombs

def reconstruct_bomb(elements: int = 10 ** 13) -> bytes:
    """~70 bytes asking numpy's _reconstruct for an array of `elements` bytes."""
    n = elements.to_bytes((elements.bit_length() + 8) // 8, "little")
    return (PROTO2 + b"}(" + _unicode("data") + _global("numpy.core.multiarray", "_reconstruct")
            + _global("numpy", "ndarray") + b"\x8a" + bytes([len(n)]) + n + b"\x85" + b"U\x01b\x87Ru.")


def memo_bomb() -> bytes:
    """A memo index of 2^32 - 1: the C unpickler would size its memo table for it first."""
    return PROTO2 + b"]r\xff\xff\xff\xff."


def bytes8_bomb(length: int = 10 ** 10) -> bytes:
    """A BINBYTES8 declaring `length` bytes followed by three."""
    return b"\x80\x04\x8e" + struct.pack("<Q", length) + b"abc."


def repeated_encode_bomb(copies: int = 4000, size: int = 4096) -> bytes:
    """One memoised string latin1-encoded `copies` times: each call allocates it anew."""
    body = _unicode("a" * size) + b"q\x01" + _global("_codecs", "encode") + b"q\x02"
    body += b"(" + b"".join(b"h\x02h\x01" + _unicode("latin1") + b"\x86R" for _ in range(copies)) + b"l"
    return PROTO2 + body + b"."


# ------------------------------------------------------------------------------------ archives

def tar_gz(path: Path, members: dict, declared: dict = None) -> Path:
    """A .tar.gz of `members` (name -> bytes); `declared` overrides a member's size in its header."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf = bytearray(raw.getvalue())
    for name, size in (declared or {}).items():
        off = buf.index(name.encode())  # the member's 512-byte header starts with its name
        # size: 12 bytes at offset 124, octal, or base-256 (GNU) when it does not fit
        field = f"{size:011o}".encode() + b"\0" if size < 8 ** 11 else b"\x80" + size.to_bytes(11, "big")
        buf[off + 124:off + 136] = field
        buf[off + 148:off + 156] = b" " * 8  # the checksum is summed with its own field as spaces
        buf[off + 148:off + 156] = f"{sum(buf[off:off + 512]):06o}\0 ".encode()
    path.write_bytes(gzip.compress(bytes(buf), mtime=0))
    return path


def npz_with_header(path: Path, arrays: dict, lie: dict = None, compress: bool = False) -> Path:
    """An .npz of `arrays`; `lie` maps a key to the shape its .npy header claims instead."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            header = npy.header_data_from_array_1_0(arr)
            if lie and key in lie:
                header["shape"] = lie[key]
            npy.write_array_header_1_0(buf, header)
            buf.write(np.ascontiguousarray(arr).tobytes())
            zf.writestr(f"{key}.npy", buf.getvalue())
    return path


def npz_declaring(path: Path, arrays: dict, key: str, declared: int) -> Path:
    """A deflated .npz whose member `key` declares `declared` uncompressed bytes (< 4 GiB, so the
    32-bit size fields of both the local header and the central directory hold it)."""
    npz_with_header(path, arrays, lie={key: (declared - 128,)}, compress=True)
    buf = bytearray(path.read_bytes())
    name = f"{key}.npy".encode()
    local = buf.index(b"PK\x03\x04")
    while buf[local + 30:local + 30 + len(name)] != name:
        local = buf.index(b"PK\x03\x04", local + 4)
    buf[local + 22:local + 26] = struct.pack("<I", declared)
    central = buf.index(b"PK\x01\x02")
    while buf[central + 46:central + 46 + len(name)] != name:
        central = buf.index(b"PK\x01\x02", central + 4)
    buf[central + 24:central + 28] = struct.pack("<I", declared)
    path.write_bytes(bytes(buf))
    return path


# --------------------------------------------------------------------------------------- images

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid-looking PNG of ~60 bytes whose header claims width × height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 4))
                     + _chunk(b"IEND", b""))
    return path


def jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A real 8×8 JPEG whose start-of-frame marker is rewritten to claim width × height."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------------------------- checkpoints

def torch_zip_with_pickle(path: Path, src: bytes, edit) -> Path:
    """A copy of the torch zip checkpoint `src` whose data.pkl is replaced by edit(data.pkl)."""
    zin = zipfile.ZipFile(io.BytesIO(src))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info.filename, edit(data) if info.filename.endswith("data.pkl") else data)
    return path
