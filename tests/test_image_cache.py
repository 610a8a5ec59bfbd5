"""The image-folder cache is keyed on the files: any change to names, labels, sizes or times
rebuilds it (and says so); an untouched tree is served without decoding; a killed writer's
temporary file is removed once its process is gone, another live process's is kept."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import aerl_fast.data.imagefolder as imf
from aerl_fast.data.folder_cache import cache_path, remove_orphaned_temps

SIZE = 8


def _tree(root, seed=0):
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / "train" / cls / f"{i}.png")
    return root


def _decode_counter(monkeypatch):
    calls = []
    real = imf._decode_pil
    monkeypatch.setattr(imf, "_decode_pil", lambda files, *a, **k: calls.append(len(files)) or real(files, *a, **k))
    return calls


def _load(root):
    return imf.load_image_folder(root, "train", SIZE, decoder="pil", num_threads=1)


def _fresh(root):
    return imf.load_image_folder(root, "train", SIZE, cache=False, decoder="pil", num_threads=1)


def test_untouched_tree_is_served_from_the_cache(tmp_path, monkeypatch, capsys):
    root = _tree(tmp_path)
    calls = _decode_counter(monkeypatch)
    first = _load(root)
    assert calls == [6] and cache_path(root, "train", SIZE).is_file()
    again = _load(root)
    assert calls == [6]  # no second decode
    np.testing.assert_array_equal(again.images, first.images)
    assert "rebuilding" not in capsys.readouterr().err


def _same_size_replacement(path, seed):
    """Rewrite `path` with other pixels, padded to its byte size, then restore its mtime: only the
    content (and the status-change time, which no copy can preserve) differs."""
    st = path.stat()
    rng = np.random.default_rng(seed)
    for _ in range(50):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=9)
        data = buf.getvalue()
        if len(data) <= st.st_size:
            break
    path.write_bytes(data + b"\0" * (st.st_size - len(data)))  # trailing bytes after IEND are ignored
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("change", ["replace every image, same sizes and mtimes", "add an image",
                                    "rename an image", "move an image to another class", "touch one image"])
def test_a_changed_tree_rebuilds_the_cache_and_says_so(tmp_path, monkeypatch, capsys, change):
    root = _tree(tmp_path)
    _load(root)
    capsys.readouterr()
    files = sorted((root / "train").rglob("*.png"))
    if change.startswith("replace"):
        for k, f in enumerate(files):
            _same_size_replacement(f, 100 + k)
    elif change == "add an image":
        Image.new("RGB", (12, 10), (5, 5, 5)).save(root / "train" / "a" / "9.png")
    elif change == "rename an image":
        files[0].rename(files[0].with_name("renamed.png"))
    elif change == "move an image to another class":
        files[0].rename(root / "train" / "b" / "moved.png")
    else:
        st = files[2].stat()
        os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    calls = _decode_counter(monkeypatch)
    got = _load(root)
    assert calls, "the stale cache was served"
    assert "rebuilding the image cache" in capsys.readouterr().err
    want = _fresh(root)
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.labels, want.labels)
    calls.clear()
    _load(root)  # the rebuilt cache now serves
    assert calls == []


def test_an_old_format_cache_is_rebuilt_and_removed(tmp_path, capsys):
    root = _tree(tmp_path)
    old = root / f".aerl_fast_train_{SIZE}px_6.npz"  # the name older versions wrote, no fingerprint
    np.savez(old, images=np.zeros((6, SIZE, SIZE, 3), np.uint8), labels=np.repeat([0, 1], 3))
    got = _load(root)
    np.testing.assert_array_equal(got.images, _fresh(root).images)
    assert not old.exists()
    np.savez(cache_path(root, "train", SIZE), images=np.zeros((6, SIZE, SIZE, 3), np.uint8),
             labels=np.repeat([0, 1], 3))
    np.testing.assert_array_equal(_load(root).images, _fresh(root).images)
    assert "written by an older aerl_fast" in capsys.readouterr().err


def test_a_hostile_cache_is_rebuilt_not_trusted(tmp_path, capsys):
    """A cache claiming the right key but the wrong shape, or holding pickled objects, is rebuilt."""
    root = _tree(tmp_path)
    good = _load(root)
    path = cache_path(root, "train", SIZE)
    with np.load(path) as z:
        key = str(z["fingerprint"])
    np.savez(path, images=np.zeros((6, 4, 4, 3), np.uint8), labels=np.repeat([0, 1], 3), fingerprint=np.array(key))
    np.testing.assert_array_equal(_load(root).images, good.images)
    assert "not the 6 images of 8 px" in capsys.readouterr().err
    np.savez(path, images=np.array([object()], dtype=object), labels=np.repeat([0, 1], 3), fingerprint=np.array(key))
    np.testing.assert_array_equal(_load(root).images, good.images)
    assert "pickled Python objects" in capsys.readouterr().err


def test_orphaned_temp_files_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its pid is free (reuse within the test is vanishingly unlikely)
    orphan = tmp_path / f".aerl_fast_train_8px.npz.{dead_pid}-0123abcd.tmp"
    live = tmp_path / f".aerl_fast_train_8px.npz.{os.getpid()}-0123abcd.tmp"
    foreign = tmp_path / f"notes.npz.{dead_pid}-0123abcd.tmp"  # not ours: never touched
    for p in (orphan, live, foreign):
        p.write_bytes(b"half")
    assert remove_orphaned_temps(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and foreign.exists()
    # writing the cache cleans up the same way
    root = _tree(tmp_path / "t")
    orphan2 = root / f".aerl_fast_train_8px.npz.{dead_pid}-89abcdef.tmp"
    orphan2.write_bytes(b"half")
    _load(root)
    assert not orphan2.exists()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".aerl")) == [f".aerl_fast_train_{SIZE}px.npz"]
