"""Writers of CIFAR batches in the genuine on-disk forms, for reader tests (no real data needed).

`py2_pickle` emits the opcodes Python 2's cPickle wrote for the official batches (protocol 2,
SHORT_BINSTRING keys, numpy arrays via numpy.core.multiarray._reconstruct), byte for byte in the
same shape as the real files; `py3_pickle` is a Python 3 re-pickle with str keys.
"""
import io
import pickle
import struct
import tarfile

import numpy as np


def _str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def _uint8_array(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _int(0) + b"\x85" + _str(b"b")
            + b"\x87R" + b"(" + _int(1) + b"(" + b"".join(_int(d) for d in a.shape) + b"t"
            + b"cnumpy\ndtype\n" + _str(b"u1") + _int(0) + _int(1) + b"\x87R"
            + b"(" + _int(3) + _str(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + _int(0) + b"tb"
            + b"\x89" + _str(a.tobytes()) + b"tb")


def _value(v) -> bytes:
    if isinstance(v, np.ndarray):
        return _uint8_array(v)
    if isinstance(v, (bytes, str)):
        return _str(v.encode() if isinstance(v, str) else v)
    if isinstance(v, int):
        return _int(v)
    if isinstance(v, list):
        return b"](" + b"".join(_value(x) for x in v) + b"e"
    raise TypeError(type(v))


def py2_pickle(d: dict) -> bytes:
    body = b"".join(_str(k.encode()) + _value(v) for k, v in d.items())
    return b"\x80\x02}q\x00(" + body + b"u."


def py3_pickle(d: dict) -> bytes:
    return pickle.dumps(d, protocol=4)


def make_cifar(root, name="cifar10", n_per_batch=20, form="py2", archive=False, seed=0):
    """Write a small CIFAR-10/100 in the official layout; returns (path, {split: (images NHWC, labels)})."""
    rng = np.random.default_rng(seed)
    dump = py2_pickle if form == "py2" else py3_pickle
    if name == "cifar10":
        folder, train, test, meta = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"
        meta_d = {"num_cases_per_batch": n_per_batch, "label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}
    else:
        folder, train, test, meta = "cifar-100-python", ["train"], ["test"], "meta"
        meta_d = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"k{i}" for i in range(20)]}
    files, truth = {}, {"train": [], "test": []}
    for split, names in (("train", train), ("test", test)):
        for fname in names:
            data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            if name == "cifar10":
                labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
                d = {"batch_label": f"batch {fname}", "labels": labels, "data": data,
                     "filenames": [f"img_{i}.png" for i in range(n_per_batch)]}
                truth[split].append((data, labels, None))
            else:
                fine = [int(v) for v in rng.integers(0, 100, n_per_batch)]
                coarse = [f // 5 for f in fine]
                d = {"filenames": [f"img_{i}.png" for i in range(n_per_batch)], "batch_label": fname,
                     "fine_labels": fine, "coarse_labels": coarse, "data": data}
                truth[split].append((data, fine, coarse))
            files[f"{folder}/{fname}"] = dump(d)
    files[f"{folder}/{meta}"] = dump(meta_d)
    out = {}
    for split, parts in truth.items():
        imgs = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        fine = np.concatenate([p[1] for p in parts])
        coarse = np.concatenate([p[2] for p in parts]) if parts[0][2] is not None else None
        out[split] = (imgs, fine, coarse)
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        path = root / ("cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz")
        with tarfile.open(path, "w:gz") as tar:
            for member, data in files.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path, out
    for member, data in files.items():
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        (root / member).write_bytes(data)
    return root / folder, out
