"""Hostile input files against every reader: resource bombs refused before allocating, and
misleading or silent results turned into one-line errors or warnings that name file and value.

The bombs run in one subprocess under RLIMIT_AS (tests/hostile_bombs.py): a guard that regresses
makes that process fail with MemoryError instead of exhausting the machine, and the test names it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hostile_files as hf
from aerl_fast.checkpoint import save_checkpoint
from aerl_fast.data import DatasetError, load_dataset
from aerl_fast.data.npz import load_npz
from cifar_files import make_cifar, py2_pickle

HERE = Path(__file__).resolve().parent
GOOD_SPEC = dict(name="alicnn", width=0.25, num_classes=10, mean=[0.5] * 3, std=[0.25] * 3, image_size=32)


def _cifar_with_test_batch(root: Path, data: bytes) -> Path:
    path, _ = make_cifar(root, "cifar10", n_per_batch=3)
    (path / "test_batch").write_bytes(data)
    return root


def _image_tree(root: Path, bomb_name: str, bomb_builder) -> Path:
    from PIL import Image
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (12, 10), (9, 99, 199)).save(root / "train" / cls / "ok.png")
    bomb_builder(root / "train" / "b" / bomb_name)
    return root


def _checkpoint(path: Path, **spec) -> Path:
    save_checkpoint({"model_spec": dict(GOOD_SPEC, **spec), "model": {}}, path)
    return path


def _torch_bomb(path: Path, edit) -> Path:
    import io
    buf = io.BytesIO()
    torch.save({"format": "aerl_fast/1", "model_spec": GOOD_SPEC, "model": {"w": torch.zeros(4)}}, buf)
    return hf.torch_zip_with_pickle(path, buf.getvalue(), edit)


def _build_cases(tmp: Path):
    """name -> (call, args, kwargs, expected error type or None, substrings of the message)."""
    x = np.zeros((4, 8, 8, 3), np.uint8)
    y = np.arange(4) % 2
    big_label = np.array([0, 1, 1, 10 ** 9])
    np.savez(tmp / "labels.npz", X_train=x, y_train=big_label, X_test=x, y_test=y)
    np.savez(tmp / "good.npz", X_train=x, y_train=y, X_test=x, y_test=y)
    cifar = "aerl_fast.data.cifar:load_cifar"
    tree = "aerl_fast.data.imagefolder:load_image_folder"
    model = "aerl_fast.checkpoint:load_model"
    numel = lambda d: d.replace(b"K\x04t", b"J\xff\xff\xff\x7ft", 1)  # noqa: E731 - storage numel 2^31-1
    size = lambda d: d.replace(b"K\x00K\x04\x85", b"K\x00J\xff\xff\xff\x7f\x85", 1)  # noqa: E731 - tensor size
    dali = os.environ.get("HOSTILE_SKIP_DALI") is None and _dali_installed()
    cases = {
        "cifar pickle: _reconstruct of 10^13 elements":
            (cifar, ["cifar10", _cifar_with_test_batch(tmp / "c1", hf.reconstruct_bomb()), "test"], {},
             "DatasetError", ["test_batch", "10000000000000"]),
        "cifar pickle: memo index 2^32-1":
            (cifar, ["cifar10", _cifar_with_test_batch(tmp / "c2", hf.memo_bomb()), "test"], {},
             "DatasetError", ["test_batch", "4294967295"]),
        "cifar pickle: BINBYTES8 of 10^10 bytes":
            (cifar, ["cifar10", _cifar_with_test_batch(tmp / "c3", hf.bytes8_bomb()), "test"], {},
             "DatasetError", ["test_batch", "10000000000"]),
        "cifar pickle: one memoised string encoded 300000 times":
            (cifar, ["cifar10", _cifar_with_test_batch(tmp / "c4", hf.repeated_encode_bomb(300_000, 8192)),
                     "test"], {}, "DatasetError", ["test_batch", "encoded string"]),
        "cifar .tar.gz: member declaring 10^12 bytes":
            (cifar, ["cifar10", hf.tar_gz(tmp / "cifar-10-python.tar.gz", {"cifar-10-batches-py/test_batch": b"x" * 64},
                                          declared={"cifar-10-batches-py/test_batch": 10 ** 12}), "test"], {},
             "DatasetError", ["test_batch", "1000000000000"]),
        "npz: .npy header claiming 3e12 bytes":
            ("aerl_fast.data.npz:load_npz", [hf.npz_with_header(tmp / "header.npz", dict(X_train=x, y_train=y),
                                                                lie={"X_train": (10 ** 6, 1000, 1000, 3)})], {},
             "DatasetError", ["header.npz[X_train]", "3000000000000"]),
        "npz: zip entry inflating 82 bytes to 4 GiB":
            ("aerl_fast.data.npz:load_npz", [hf.npz_declaring(tmp / "zipbomb.npz", dict(X_train=x, y_train=y),
                                                              "X_train", 2 ** 32 - 2)], {},
             "DatasetError", ["zipbomb.npz[X_train]", "4294967294"]),
        "npz: one label of 10^9":
            ("aerl_fast.data.npz:load_npz", [tmp / "labels.npz"], {}, "DatasetError", ["labels.npz", "1000000000"]),
        "png claiming 30000x30000":
            (tree, [_image_tree(tmp / "t1", "bomb.png", lambda p: hf.png_claiming(p, 30000, 30000)), "train", 8],
             dict(cache=False, decoder="pil"), "DatasetError", ["bomb.png", "900000000"]),
        "png claiming 9000x9000 (below Pillow's own limit)":
            (tree, [_image_tree(tmp / "t2", "bomb.png", lambda p: hf.png_claiming(p, 9000, 9000)), "train", 8],
             dict(cache=False, decoder="pil"), "DatasetError", ["bomb.png", "9000×9000"]),
        "jpeg claiming 30000x30000":
            (tree, [_image_tree(tmp / "t3", "bomb.jpg", lambda p: hf.jpeg_claiming(p, 30000, 30000)), "train", 8],
             dict(cache=False, decoder="pil"), "DatasetError", ["bomb.jpg", "900000000"]),
        "checkpoint: num_classes 10^9":
            (model, [_checkpoint(tmp / "classes.pt", num_classes=10 ** 9)], {}, "CheckpointError",
             ["classes.pt", "num_classes", "1000000000"]),
        "checkpoint: width 10^6":
            (model, [_checkpoint(tmp / "width.pt", width=1e6)], {}, "CheckpointError", ["width.pt", "width", "1000000"]),
        "checkpoint: image_size 10^6":
            (model, [_checkpoint(tmp / "size.pt", image_size=10 ** 6)], {}, "CheckpointError",
             ["size.pt", "image_size", "1000000"]),
        # a spec within every bound whose model would not fit in memory: the file cannot hold its
        # weights, so the key-by-key comparison with the meta-device model refuses it first
        "checkpoint: cnn6 at width 64 (60 GB of weights)":
            (model, [_checkpoint(tmp / "cnn6.pt", name="cnn6", width=64)], {}, "CheckpointError",
             ["cnn6.pt", "weights do not fit", "missing 0.mean"]),
        "checkpoint: storage of 2^31-1 elements on 16 bytes":
            (model, [_torch_bomb(tmp / "numel.pt", numel)], {}, "CheckpointError", ["numel.pt", "record size"]),
        "checkpoint: tensor of 2^31-1 elements on a 4-element storage":
            (model, [_torch_bomb(tmp / "tsize.pt", size)], {}, "CheckpointError", ["tsize.pt", "not a readable"]),
        # controls: genuine files load under the same cap, and the cap itself is real
        "control: genuine cifar folder": (cifar, ["cifar10", make_cifar(tmp / "ok", "cifar10", 3)[0], "test"], {},
                                          None, []),
        "control: genuine npz": ("aerl_fast.data.npz:load_npz", [tmp / "good.npz"], {}, None, []),
        "control: 10^10 bytes hit the cap": ("numpy:ones", [10 ** 10], {"dtype": "uint8"}, "MemoryError", []),
    }
    if dali:
        cases["png claiming 30000x30000 through DALI"] = (
            tree, [_image_tree(tmp / "t4", "bomb.png", lambda p: hf.png_claiming(p, 30000, 30000)), "train", 8],
            dict(cache=False, decoder="dali", device="cpu"), "DatasetError", ["bomb.png", "900000000"])
    return cases


def _dali_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("nvidia.dali") is not None


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bombs")
    cases = _build_cases(tmp)
    spec = [{"name": n, "call": c[0], "args": [str(a) if isinstance(a, Path) else a for a in c[1]],
             "kwargs": c[2]} for n, c in cases.items()]
    (tmp / "cases.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "hostile_bombs.py"), str(tmp / "cases.json")],
                          capture_output=True, text=True, timeout=300, env=env)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    results = {r["name"]: r for r in lines}
    assert "__limit__" in results, proc.stderr[-3000:]
    return cases, results, proc


def _case_names():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        return list(_build_cases(Path(d)))


@pytest.mark.parametrize("name", _case_names())
def test_bomb_is_refused_before_allocating(bomb_results, name):
    cases, results, proc = bomb_results
    assert name in results, f"the bomb process died before {name!r}: {proc.stderr[-2000:]}"
    _, _, _, error, needles = cases[name]
    got = results[name]
    assert got["error"] == error, f"{name}: expected {error}, got {got['error']}: {got['message']}"
    for needle in needles:
        assert needle in got["message"], f"{name}: {needle!r} not in {got['message']!r}"
    assert "weights_only" not in got["message"]


def test_bombs_left_memory_bounded(bomb_results):
    """Peak resident memory of the whole bomb process: the imports plus small genuine files."""
    _, results, _ = bomb_results
    peak = max(r["maxrss"] for r in results.values() if "maxrss" in r)
    assert peak < 2 << 30, f"peak RSS {peak / 2**20:.0f} MiB"
