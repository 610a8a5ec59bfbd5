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


# ------------------------------------------------------------------- labels and images of an npz

def _npz(path, x, y, xt=None, yt=None, **extra):
    np.savez(path, X_train=x, y_train=y, X_test=x if xt is None else xt, y_test=y if yt is None else yt, **extra)
    return path


def test_nan_images_say_nan_and_a_range_error_still_says_range(tmp_path):
    x = np.random.default_rng(0).random((5, 8, 8, 3)).astype(np.float32)
    y = np.arange(5) % 2
    np.testing.assert_array_equal(load_npz(_npz(tmp_path / "ok.npz", x, y)).images, np.round(x * 255).astype(np.uint8))
    bad = x.copy()
    bad[3, 2, 1, 0] = np.nan
    with pytest.raises(DatasetError, match=r"nan\.npz\[X_train\]: float images hold 1 NaN value\(s\) \(first in image 3\)"):
        load_npz(_npz(tmp_path / "nan.npz", bad, y))
    with pytest.raises(DatasetError, match=r"range \[0, 1\.5\]"):
        load_npz(_npz(tmp_path / "range.npz", np.where(x > 0.5, 1.5, 0.0), y))


def test_a_stray_label_is_named_and_too_many_classes_refused(tmp_path, capsys):
    x = np.zeros((61, 8, 8, 3), np.uint8)
    y = np.r_[np.arange(60) % 10, 57]
    s = load_npz(_npz(tmp_path / "stray.npz", x, y, xt=x[:60], yt=y[:60]))
    err = capsys.readouterr().err
    assert len(s.classes) == 58 and "stray.npz" in err and "57 (1 sample)" in err and "58 classes" in err
    load_npz(_npz(tmp_path / "clean.npz", x[:60], y[:60]))
    assert "warning" not in capsys.readouterr().err  # contiguous labels: no warning
    # more classes than the file has labels: most would be empty; exactly as many is fine
    with pytest.raises(DatasetError, match=r"few\.npz: label 9 implies 10 classes but the file holds only 8"):
        load_npz(_npz(tmp_path / "few.npz", x[:4], np.array([0, 1, 2, 9])))
    assert len(load_npz(_npz(tmp_path / "exact.npz", x[:4], np.array([0, 1, 2, 3]))).classes) == 4


@pytest.mark.parametrize("labels, match", [
    (np.array([0.0, 1.0, 1e20, 0.0]), r"label 1e\+20 at index 2 is out of range"),
    (np.array([0.0, np.nan, 1.0, 0.0]), r"label nan at index 1 is not a number"),
    (np.array([0.0, np.inf, 1.0, 0.0]), r"label inf at index 1 is not a number"),
    (np.array([0.0, 0.5, 1.0, 0.0]), r"labels must be integers, got 0.5 at index 1"),
    (np.array([0, 1, 2 ** 63 + 5, 1], np.uint64), r"label 9223372036854775813 is out of range"),
    (np.array([0, -1, 1, 0]), r"label -1 is negative"),
    (np.array(["a", "b", "a", "b"]), r"labels must be integers, got dtype <U1"),
])
def test_labels_that_would_overflow_or_truncate_are_refused(tmp_path, labels, match):
    x = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(DatasetError, match=match):
        load_npz(_npz(tmp_path / "l.npz", x, labels))


def test_float_labels_with_integer_values_still_load(tmp_path):
    s = load_npz(_npz(tmp_path / "f.npz", np.zeros((4, 8, 8, 3), np.uint8), np.array([0.0, 1.0, 2.0, 1.0])))
    np.testing.assert_array_equal(s.labels, [0, 1, 2, 1])


def test_one_hot_rows_without_a_single_maximum_are_refused(tmp_path):
    x = np.zeros((3, 8, 8, 3), np.uint8)
    onehot = np.eye(3, dtype=np.float32)
    np.testing.assert_array_equal(load_npz(_npz(tmp_path / "ok.npz", x, onehot)).labels, [0, 1, 2])
    tie = onehot.copy()
    tie[1] = 0  # all zeros: argmax would silently say class 0
    with pytest.raises(DatasetError, match=r"one-hot row 1 has no single largest entry"):
        load_npz(_npz(tmp_path / "tie.npz", x, tie))


def test_class_names_stored_as_bytes_are_decoded_and_malformed_names_refused(tmp_path):
    x = np.zeros((2, 8, 8, 3), np.uint8)
    y = np.array([0, 1])
    s = load_npz(_npz(tmp_path / "b.npz", x, y, classes=np.array([b"cat", b"dog"])))
    assert s.classes == ["cat", "dog"]
    with pytest.raises(DatasetError, match=r"m\.npz\[classes\]: class names must be a 1-D array of strings"):
        load_npz(_npz(tmp_path / "m.npz", x, y, classes=np.array([[1, 2]])))


def test_non_square_images_are_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"r\.npz\[X_train\]: images must be square, got 8×6"):
        load_npz(_npz(tmp_path / "r.npz", np.zeros((2, 8, 6, 3), np.uint8), np.array([0, 1])))


def test_the_memory_bound_refuses_what_the_machine_cannot_hold(tmp_path, monkeypatch):
    import aerl_fast.limits as limits
    from aerl_fast.models import ModelError, build_model
    p = _npz(tmp_path / "one_mib.npz", np.zeros((1024, 32, 32, 1), np.uint8), np.arange(1024) % 2)
    assert len(load_npz(p).labels) == 1024
    m = build_model("alicnn", 10, width=0.25)
    nbytes = 4 * sum(t.numel() for t in list(m.parameters()) + list(m.buffers()))  # all float32
    monkeypatch.setattr(limits, "memory_bytes", lambda: 512 * 1024)
    with pytest.raises(DatasetError, match=r"one_mib\.npz: X_train \(1024, 32, 32, 1\).*needs 1\.0 MiB but this machine allows 512\.0 KiB"):
        load_npz(p)
    with pytest.raises(ModelError, match=rf"alicnn at width 0.25 with 10 classes and 32 px images needs "
                                         rf"{nbytes / 1024:.1f} KiB but this machine allows 512.0 KiB"):
        build_model("alicnn", 10, width=0.25)


# ------------------------------------------------------------------------- file-system oddities

def test_cifar_member_that_is_a_folder_or_a_device_is_named(tmp_path):
    path, _ = make_cifar(tmp_path / "d", "cifar10", n_per_batch=3)
    (path / "test_batch").unlink()
    (path / "test_batch").mkdir()
    with pytest.raises(DatasetError, match=r"test_batch: not a regular file"):
        load_dataset("cifar10", tmp_path / "d", "test")
    path, _ = make_cifar(tmp_path / "z", "cifar10", n_per_batch=3)
    (path / "data_batch_1").unlink()
    (path / "data_batch_1").symlink_to("/dev/zero")  # read_bytes() would never end
    with pytest.raises(DatasetError, match=r"data_batch_1: not a regular file"):
        load_dataset("cifar10", tmp_path / "z", "train")


@pytest.mark.parametrize("batch, match", [
    ({"labels": [[0], [1, 2], [3]], "data": np.zeros((3, 3072), np.uint8)}, r"'labels' is not a list of integers"),
    ({1: b"x", "other": b"y"}, r"missing key 'data' \(has \['1', 'other'\]\)"),
    ({"labels": [0, 1, 12], "data": np.zeros((3, 3072), np.uint8)}, r"test_batch\['labels'\]: label 12 out of range"),
])
def test_malformed_cifar_batches_are_named(tmp_path, batch, match):
    import pickle
    path, _ = make_cifar(tmp_path, "cifar10", n_per_batch=3)
    (path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2) if 1 in batch else py2_pickle(batch))
    with pytest.raises(DatasetError, match=match):
        load_dataset("cifar10", tmp_path, "test")


@pytest.mark.parametrize("names, match", [(7, r"label_names\]: class names must be a list of strings"),
                                          ([b"\xff\xfe"] * 10, r"class names are not UTF-8")])
def test_malformed_cifar_meta_is_named(tmp_path, names, match):
    import pickle
    path, _ = make_cifar(tmp_path, "cifar10", n_per_batch=3)
    (path / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=2))
    with pytest.raises(DatasetError, match=r"batches\.meta.*" + match):
        load_dataset("cifar10", tmp_path, "test")


def test_image_folder_skips_fifos_and_folders_named_like_images(tmp_path):
    """Pillow would block for ever on a FIFO: run the reader in a subprocess with a timeout."""
    from PIL import Image
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (9, 9), (1, 2, 3)).save(tmp_path / "train" / cls / "ok.png")
    os.mkfifo(tmp_path / "train" / "a" / "pipe.png")
    (tmp_path / "train" / "b" / "folder.jpg").mkdir()
    code = ("from aerl_fast.data.imagefolder import load_image_folder as f; import sys; "
            "s = f(sys.argv[1], 'train', 8, cache=False, decoder='pil'); print(len(s.labels), list(s.labels))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "2"


def test_image_folder_class_count_bound_and_empty_class_warning(tmp_path, monkeypatch, capsys):
    import aerl_fast.data.imagefolder as imf
    from PIL import Image
    for cls in ("a", "b", "c"):
        (tmp_path / "train" / cls).mkdir(parents=True)
    for cls in ("a", "c"):
        Image.new("RGB", (9, 9), (1, 2, 3)).save(tmp_path / "train" / cls / "ok.png")
    s = imf.load_image_folder(tmp_path, "train", 8, cache=False, decoder="pil")
    assert s.classes == ["a", "b", "c"]
    assert "class folder(s) b hold no images" in capsys.readouterr().err
    monkeypatch.setattr(imf, "MAX_CLASSES", 2)
    with pytest.raises(DatasetError, match=r"3 class folders, more than the 2"):
        imf.load_image_folder(tmp_path, "train", 8, cache=False, decoder="pil")
