"""Dataset readers against files written in their genuine formats."""
import io
import pickle
from pathlib import Path

import numpy as np
import pytest

from aerl_fast.data import DatasetError, load_dataset, stratified_split
from aerl_fast.data.cifar import load_cifar
from aerl_fast.data.safe_pickle import UnsafePickleError, loads_dataset_pickle
from cifar_files import make_cifar, py2_pickle

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("form", ["py2", "py3"])
@pytest.mark.parametrize("archive", [False, True])
def test_cifar10_folder_and_archive(tmp_path, form, archive):
    path, truth = make_cifar(tmp_path, "cifar10", n_per_batch=7, form=form, archive=archive, seed=3)
    for split in ("train", "test"):
        s = load_dataset("cifar10", tmp_path, split)
        imgs, labels, _ = truth[split]
        assert s.images.dtype == np.uint8 and s.images.shape == (len(labels), 32, 32, 3)
        np.testing.assert_array_equal(s.images, imgs)
        np.testing.assert_array_equal(s.labels, labels)
        assert s.labels.dtype == np.int64
        assert s.classes == [f"c{i}" for i in range(10)]
    # the folder itself (not its parent) and the archive path itself work too
    s = load_cifar("cifar10", path, "test")
    assert len(s.labels) == 7


@pytest.mark.parametrize("archive", [False, True])
def test_cifar100_fine_and_coarse(tmp_path, archive):
    _, truth = make_cifar(tmp_path, "cifar100", n_per_batch=11, archive=archive, seed=5)
    fine = load_dataset("cifar100", tmp_path, "train")
    coarse = load_dataset("cifar100", tmp_path, "train", labels="coarse")
    np.testing.assert_array_equal(fine.labels, truth["train"][1])
    np.testing.assert_array_equal(coarse.labels, truth["train"][2])
    assert len(fine.classes) == 100 and fine.classes[7] == "f7"
    assert len(coarse.classes) == 20 and coarse.classes[3] == "k3"
    np.testing.assert_array_equal(fine.images, coarse.images)


def test_truncated_batch_is_reported(tmp_path):
    path, _ = make_cifar(tmp_path, "cifar10", n_per_batch=5)
    f = path / "data_batch_2"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(DatasetError, match="data_batch_2.*(corrupt|truncated)"):
        load_dataset("cifar10", tmp_path, "train")


def test_truncated_archive_is_reported(tmp_path):
    path, _ = make_cifar(tmp_path, "cifar10", n_per_batch=5, archive=True)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path, "train")


def test_missing_dataset_names_path_and_layout(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg


def test_download_offline_fails_cleanly(tmp_path):
    with pytest.raises(DatasetError, match="download"):
        load_dataset("cifar10", tmp_path, "train", download=True)


def test_restricted_unpickler_refuses_code():
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))
    with pytest.raises(UnsafePickleError, match="system"):
        loads_dataset_pickle(pickle.dumps({"data": Evil()}, protocol=2))


def test_foreign_pickle_in_dataset_reported(tmp_path):
    path, _ = make_cifar(tmp_path, "cifar10", n_per_batch=5)
    (path / "test_batch").write_bytes(pickle.dumps({"data": io.BytesIO(b"x")}, protocol=2))
    with pytest.raises(DatasetError, match="test_batch.*refusing"):
        load_dataset("cifar10", tmp_path, "test")


def test_label_out_of_range(tmp_path):
    path, _ = make_cifar(tmp_path, "cifar10", n_per_batch=5)
    bad = py2_pickle({"labels": [0, 1, 2, 3, 12], "data": np.zeros((5, 3072), np.uint8)})
    (path / "test_batch").write_bytes(bad)
    with pytest.raises(DatasetError, match="label 12 out of range"):
        load_dataset("cifar10", tmp_path, "test")


def test_wrong_data_shape(tmp_path):
    path, _ = make_cifar(tmp_path, "cifar10", n_per_batch=5)
    (path / "test_batch").write_bytes(py2_pickle({"labels": [0, 1], "data": np.zeros((2, 100), np.uint8)}))
    with pytest.raises(DatasetError, match=r"uint8 \[N, 3072\]"):
        load_dataset("cifar10", tmp_path, "test")


@pytest.mark.skipif(not (SHARED / "cifar-10-batches-py" / "test_batch").exists(), reason="shared CIFAR-10 sample not present")
def test_real_cifar10_batch_matches_latin1_unpickle():
    """The genuine file, read with the restricted unpickler, equals a plain latin1 unpickle."""
    folder = SHARED / "cifar-10-batches-py"
    s = load_cifar("cifar10", folder, "test")
    ref = pickle.loads((folder / "test_batch").read_bytes(), encoding="latin1")  # trusted local copy
    np.testing.assert_array_equal(s.images, ref["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(s.labels, ref["labels"])
    assert s.classes[0] == "airplane"


# ------------------------------------------------------------------------------------------ npz

def _write_npz(path, x_train, y_train, x_test, y_test, **extra):
    np.savez(path, X_train=x_train, y_train=y_train, X_test=x_test, y_test=y_test, **extra)
    return path


def test_study_npz_uint8_and_float(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 13)
    p = _write_npz(tmp_path / "d.npz", x, y, x[:5], y[:5])
    s = load_dataset("npz", p, "train")
    np.testing.assert_array_equal(s.images, x)
    np.testing.assert_array_equal(s.labels, y)
    pf = _write_npz(tmp_path / "f.npz", x.astype(np.float32) / 255, y, x[:5].astype(np.float32) / 255, y[:5])
    np.testing.assert_array_equal(load_dataset("npz", pf, "train").images, x)
    # NCHW and one-hot labels as Keras pipelines store them
    onehot = np.eye(10)[y]
    pc = _write_npz(tmp_path / "c.npz", x.transpose(0, 3, 1, 2), onehot, x[:5].transpose(0, 3, 1, 2), onehot[:5])
    s = load_dataset("npz", pc, "test")
    np.testing.assert_array_equal(s.images, x[:5])
    np.testing.assert_array_equal(s.labels, y[:5])


def test_npz_errors(tmp_path):
    x = np.zeros((4, 8, 8, 3), np.uint8)
    y = np.zeros(4, np.int64)
    np.savez(tmp_path / "missing.npz", X_train=x, y_train=y)
    with pytest.raises(DatasetError, match="missing key.*X_test"):
        load_dataset("npz", tmp_path / "missing.npz", "test")
    p = _write_npz(tmp_path / "range.npz", x.astype(np.float32) * 2 + 1.5, y, x, y)
    with pytest.raises(DatasetError, match=r"\[0, 1\]"):
        load_dataset("npz", p, "train")
    (tmp_path / "trunc.npz").write_bytes(p.read_bytes()[:100])
    with pytest.raises(DatasetError, match="trunc.npz.*(corrupt|truncated)"):
        load_dataset("npz", tmp_path / "trunc.npz", "train")
    with pytest.raises(DatasetError, match="no .npz file"):
        load_dataset("npz", tmp_path / "nope.npz", "train")
    _write_npz(tmp_path / "m.npz", x, np.array([0, 1, 2]), x, y)
    with pytest.raises(DatasetError, match="4 images.*3 labels"):
        load_dataset("npz", tmp_path / "m.npz", "train")


def test_imagenet100_npz_and_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(1)
    root = tmp_path / "in100"
    truth = {}
    for split in ("train", "val"):
        for c, cls in enumerate(["n01", "n02", "n03"]):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                arr = rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8)
                ext = ".JPEG" if i % 2 == 0 else ".png"
                Image.fromarray(arr).save(d / f"img{i}{ext}", quality=95)
                truth.setdefault(split, []).append(c)
    s = load_dataset("imagenet100", root, "train", image_size=16)
    assert s.images.shape == (9, 16, 16, 3) and s.images.dtype == np.uint8
    assert s.classes == ["n01", "n02", "n03"]
    np.testing.assert_array_equal(s.labels, truth["train"])
    # resize + centre crop equals PIL doing the same by hand on one PNG (lossless)
    from aerl_fast.data.imagefolder import _decode
    im = Image.open(root / "train" / "n01" / "img1.png").convert("RGB")
    w, h = im.size
    sc = 16 / min(w, h)
    im = im.resize((max(16, round(w * sc)), max(16, round(h * sc))), Image.BILINEAR)
    l, t = (im.size[0] - 16) // 2, (im.size[1] - 16) // 2
    np.testing.assert_array_equal(_decode(root / "train" / "n01" / "img1.png", 16), np.asarray(im.crop((l, t, l + 16, t + 16))))
    # the cache is used on the second read and gives the same arrays
    assert (root / ".aerl_fast_train_16px.npz").is_file()
    s2 = load_dataset("imagenet100", root, "train", image_size=16)
    np.testing.assert_array_equal(s2.images, s.images)
    t = load_dataset("imagenet100", root, "test", image_size=16)
    np.testing.assert_array_equal(t.labels, truth["val"])
    # a corrupt image is reported by name
    (root / "val" / "n02" / "img0.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="img0.JPEG.*decode"):
        load_dataset("imagenet100", root, "test", image_size=8)
    # a 32x32 .npz works as ImageNet-100 too
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    p = _write_npz(tmp_path / "in100_32.npz", x, np.arange(6) % 3, x, np.arange(6) % 3)
    np.testing.assert_array_equal(load_dataset("imagenet100", p, "train").images, x)


def test_imagefolder_missing(tmp_path):
    with pytest.raises(DatasetError, match="train/<class>"):
        load_dataset("imagenet100", tmp_path, "train")


# --------------------------------------------------------------------------------- shapes, split

def test_shapes_deterministic_balanced_and_distinct_splits():
    from aerl_fast.data.shapes import generate_shapes
    a = generate_shapes(300, seed=4)
    b = generate_shapes(300, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.images.dtype == np.uint8 and a.images.shape == (300, 32, 32, 3)
    counts = np.bincount(a.labels, minlength=10)
    assert counts.min() >= 15  # balanced up to the 10% annotation noise
    c = generate_shapes(300, seed=5)
    assert not np.array_equal(a.images, c.images)
    assert 40 < a.images.mean() < 215 and a.images.std() > 20


def test_stratified_split_proportions():
    y = np.repeat(np.arange(7), [50, 30, 20, 11, 9, 100, 3])
    tr, va = stratified_split(y, 0.1, 42)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    for c, n in zip(range(7), [50, 30, 20, 11, 9, 100, 3]):
        assert (y[va] == c).sum() == max(1, round(0.1 * n))
    tr2, va2 = stratified_split(y, 0.1, 42)
    np.testing.assert_array_equal(va, va2)
    _, va3 = stratified_split(y, 0.1, 7)
    assert not np.array_equal(va, va3)


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", None, "train")
