"""Every file format the product reads that could carry code, against payloads that would create a
marker file if they ran: each is shown live first (unguarded, it does create the marker), then
refused by the product with nothing executed and the refused global named."""
import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import hostile_files as hf
from aerl_fast.checkpoint import load_checkpoint, load_model
from aerl_fast.data import DatasetError, load_dataset
from aerl_fast.data.safe_pickle import UnsafePickleError, loads_dataset_pickle
from aerl_fast.errors import CheckpointError
from cifar_files import make_cifar

with tempfile.TemporaryDirectory() as _d:
    FAMILIES = list(hf.pickle_payloads(Path(_d) / "m"))


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "ran"


def _live(marker, data: bytes):
    """The payload really runs when unpickled without a guard (so refusing it means something)."""
    try:
        pickle.loads(data)
    except Exception:  # noqa: BLE001 - some payloads fail after their side effect
        pass
    assert marker.exists(), "payload did not run unguarded: the test would prove nothing"
    marker.unlink()


@pytest.mark.parametrize("family", FAMILIES)
def test_dataset_unpickler_refuses_every_payload_family(marker, family):
    data, refused = hf.pickle_payloads(marker)[family]
    _live(marker, data)
    with pytest.raises(UnsafePickleError, match=f"refusing to load global {refused}:"):
        loads_dataset_pickle(data)
    assert not marker.exists()


@pytest.mark.parametrize("family", ["builtins.eval", "posix.system", "numpy.load(allow_pickle=True)"])
@pytest.mark.parametrize("archive", [False, True])
def test_cifar_files_carrying_a_payload_are_refused_by_name(tmp_path, marker, family, archive):
    data, refused = hf.pickle_payloads(marker)[family]
    _live(marker, data)
    root = tmp_path / "data"
    root.mkdir()
    if archive:
        hf.tar_gz(root / "cifar-10-python.tar.gz", {"cifar-10-batches-py/test_batch": data,
                                                    "cifar-10-batches-py/batches.meta": pickle.dumps({})})
    else:
        path, _ = make_cifar(root, "cifar10", n_per_batch=2)
        (path / "test_batch").write_bytes(data)
    with pytest.raises(DatasetError, match=rf"test_batch: refusing to load global {refused}"):
        load_dataset("cifar10", root, "test")
    assert not marker.exists()


def test_cifar_meta_carrying_a_payload_is_refused(tmp_path, marker):
    data, _ = hf.pickle_payloads(marker)["posix.system"]
    path, _ = make_cifar(tmp_path, "cifar10", n_per_batch=2)
    (path / "batches.meta").write_bytes(data)
    with pytest.raises(DatasetError, match=r"batches\.meta: refusing to load global posix\.system"):
        load_dataset("cifar10", tmp_path, "test")
    assert not marker.exists()


def _object_npz(path, marker, **arrays):
    payload = np.array([hf._Reduce(os.system, f"touch '{marker}'")], dtype=object)
    np.savez(path, **arrays, **{k: payload for k in ("X_train", "y_train", "X_test", "y_test") if k not in arrays})
    return path


@pytest.mark.parametrize("key", ["X_train", "y_train", "y_test"])
def test_npz_with_pickled_objects_is_refused_without_unpickling(tmp_path, marker, key):
    x, y = np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1])
    good = dict(X_train=x, y_train=y, X_test=x, y_test=y)
    good.pop(key)
    p = _object_npz(tmp_path / "obj.npz", marker, **good)
    with np.load(p, allow_pickle=True) as z:
        z[key]  # noqa: B018 - live: unpickling the member runs the payload
    assert marker.exists()
    marker.unlink()
    for name in ("npz", "imagenet100"):
        with pytest.raises(DatasetError, match=rf"obj\.npz\[{key}\]: holds pickled Python objects"):
            load_dataset(name, p, "train")
    assert not marker.exists()


def _payload_checkpoint(path, marker):
    torch.save({"format": "aerl_fast/1", "model_spec": {}, "model": {},
                "config": hf._Reduce(os.system, f"touch '{marker}'")}, path)
    return path


def test_checkpoint_payload_is_refused_naming_the_global_without_unsafe_advice(tmp_path, marker, monkeypatch):
    # an environment that makes torch.load default to the unsafe loader must not reach ours
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    p = _payload_checkpoint(tmp_path / "evil.pt", marker)
    with zipfile.ZipFile(p) as zf:  # live: the checkpoint's pickle, unpickled without a guard, runs it
        pickle.loads(zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl"))))
    assert marker.exists()
    marker.unlink()
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError) as e:
            load(p)
        msg = str(e.value)
        assert msg.startswith(f"{p}: not a readable aerl_fast checkpoint (it names the Python global posix.system")
        assert "weights_only" not in msg and "trusted" not in msg and "\n" not in msg
    assert not marker.exists()


def test_other_torch_refusals_drop_the_advice_too(tmp_path):
    """A file torch refuses for another reason than a global: the reason, never the advice."""
    src = io.BytesIO()
    torch.save({"format": "aerl_fast/1", "w": torch.zeros(2)}, src)
    bad = hf.torch_zip_with_pickle(tmp_path / "op.pt", src.getvalue(), lambda d: d[:2] + b"\x94" + d[2:])  # MEMOIZE
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert str(e.value) == f"{bad}: not a readable aerl_fast checkpoint (Unsupported operand 148)"


def test_image_cache_carrying_a_payload_is_rebuilt_not_unpickled(tmp_path, marker, capsys):
    from PIL import Image

    from aerl_fast.data.folder_cache import cache_path
    from aerl_fast.data.imagefolder import load_image_folder
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (9, 9), (40, 50, 60)).save(tmp_path / "train" / cls / "x.png")
    np.savez(cache_path(tmp_path, "train", 8), images=np.array([hf._Reduce(os.system, f"touch '{marker}'")],
                                                               dtype=object), labels=np.array([0, 1]))
    s = load_image_folder(tmp_path, "train", 8, decoder="pil")
    assert s.images.shape == (2, 8, 8, 3) and (s.images == (40, 50, 60)).all()
    assert "pickled Python objects" in capsys.readouterr().err
    assert not marker.exists()
