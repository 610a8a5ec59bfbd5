"""Image-folder trees decoded by NVIDIA DALI (`--decoder dali`) against the PIL path, and the choice.

DALI-dependent tests skip when nvidia.dali does not import; the choice and its errors are tested
either way, with DALI's absence simulated.

Tolerance, from what the two resizes do.  Both decoders resize to the same integer size (the same
Python expression) and crop at the same offset, so the geometry is identical, and both filters are
the same separable triangle ("bilinear" + antialias: support scaled by the shrink factor).  What
differs:
- rounding: PIL rounds its first (horizontal) pass to uint8 before the vertical pass, DALI keeps it
  in float.  The intermediate error (≤ 0.5) goes through a non-negative normalised filter, so the
  two exact values differ by ≤ 0.5 and their rounded results by ≤ 1 level.  That is the bound
  inside the image for lossless PNGs (identical decodes).  JPEGs get 1 more level: DALI's and
  PIL's libjpeg-turbo builds may differ by one level per pixel (they agree exactly here).
- edges: where the filter of an output pixel hangs over the image border (the outermost ring of
  output pixels, nowhere else: the support is ±1 output pixel around a centre 0.5 pixel in), PIL
  renormalises the in-bounds taps and DALI fills the outside from the image.  With an outside weight
  w (0.125 for a continuous triangle), the two values differ by w·|edge − local mean| per pass, so
  by at most 2·w·(range of the source under that pixel's footprint) over the two passes.  We allow
  w = 0.25 (discrete taps put more weight outside than the continuous triangle) plus the rounding.
- mean absolute difference: observed 0.1–0.3 (about a fifth of the values differ by one level);
  we assert < 0.5.
"""
import math
import shutil

import numpy as np
import pytest
import torch

import aerl_fast.data.dali as dali_mod
import aerl_fast.data.imagefolder as imf
from aerl_fast import train as train_mod
from aerl_fast.config import RunOptions, TrainConfig
from aerl_fast.data import DatasetError, load_dataset
from aerl_fast.data.dali import INSTALL_HINT, dali_available
from aerl_fast.data.imagefolder import _decode, _resized_size, choose_decoder, load_image_folder
from aerl_fast.errors import ConfigError

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed (pip install 'aerl_fast[dali]')")
SIZE = 24

# (height, width), PIL mode saved, extension: odd sizes, both shrink (most) and enlarge (20x28 -> 24 wide)
TRAIN = {
    "c0": [((53, 37), "RGB", ".jpg"), ((40, 64), "RGB", ".JPEG"), ((37, 53), "L", ".png"), ((64, 40), "RGBA", ".png")],
    "c1": [((20, 28), "RGB", ".png"), ((31, 100), "RGB", ".jpeg"), ((45, 45), "P", ".png"), ((50, 70), "L", ".jpg")],
    "c2": [((120, 90), "RGB", ".JPEG"), ((33, 47), "RGB", ".png"), ((61, 29), "RGB", ".jpg")],
}  # 11 images: with batch_size 4 the last DALI batch holds 3
VAL = {"c0": [((44, 52), "RGB", ".JPEG")], "c2": [((52, 44), "RGBA", ".png"), ((39, 39), "RGB", ".jpg")]}


def _smooth(rng, h, w, c):
    """Natural-looking smooth content: a coarse random grid (cells of ~8 px), bilinearly
    interpolated, plus a little noise."""
    g = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), c)).astype(np.float32)
    ys, xs = np.linspace(0, g.shape[0] - 1, h), np.linspace(0, g.shape[1] - 1, w)
    y0 = np.floor(ys).astype(int).clip(0, g.shape[0] - 2)
    x0 = np.floor(xs).astype(int).clip(0, g.shape[1] - 2)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    a = (g[y0][:, x0] * (1 - fy) * (1 - fx) + g[y0 + 1][:, x0] * fy * (1 - fx)
         + g[y0][:, x0 + 1] * (1 - fy) * fx + g[y0 + 1][:, x0 + 1] * fy * fx)
    return np.clip(a + rng.normal(0, 2, a.shape), 0, 255).round().astype(np.uint8)


def _make_tree(root, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, spec in (("train", TRAIN), ("val", VAL)):
        for cls, images in spec.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i, ((h, w), mode, ext) in enumerate(images):
                c = {"RGB": 3, "L": 1, "RGBA": 4, "P": 3}[mode]
                a = _smooth(rng, h, w, c)
                im = Image.fromarray(a[..., 0] if c == 1 else a)
                if mode == "P":
                    im = im.convert("P", palette=Image.ADAPTIVE, colors=64)
                im.save(d / f"img{i}{ext}", quality=90)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _make_tree(tmp_path_factory.mktemp("in100"))


@pytest.fixture
def own_tree(tree, tmp_path):
    """A copy the test may write caches into or break."""
    return shutil.copytree(tree, tmp_path / "in100")


def _files(root, split="train"):
    return sorted(p for p in (root / split).rglob("*") if p.is_file())


def _edge_bound(path, size):
    """Per output pixel of the crop: the allowed |DALI - PIL| (see the module docstring)."""
    from PIL import Image
    with Image.open(path) as im:
        src = np.asarray(im.convert("RGB")).astype(int)
    h, w = src.shape[:2]
    rw, rh = _resized_size(w, h, size)
    fy, fx = h / rh, w / rw                         # source pixels per output pixel
    ry, rx = max(fy, 1.0), max(fx, 1.0)             # filter radius in source pixels
    top, left = (rh - size) // 2, (rw - size) // 2
    bound = np.zeros((size, size), int)
    for i in range(size):
        for j in range(size):
            cy, cx = (top + i + 0.5) * fy, (left + j + 0.5) * fx
            patch = src[max(0, math.floor(cy - ry)):math.ceil(cy + ry) + 1,
                        max(0, math.floor(cx - rx)):math.ceil(cx + rx) + 1]
            rng = int((patch.max(axis=(0, 1)) - patch.min(axis=(0, 1))).max())
            bound[i, j] = math.ceil(2 * 0.25 * rng) + 2
    return bound


def _check_close(pil, dali, files, size):
    assert dali.shape == pil.shape == (len(files), size, size, 3) and dali.dtype == pil.dtype == np.uint8
    diff = np.abs(pil.astype(int) - dali.astype(int))
    assert diff.mean() < 0.5, diff.mean()
    for k, f in enumerate(files):
        d = diff[k]
        inner = 1 if f.suffix.lower() == ".png" else 2
        assert d[1:-1, 1:-1].max() <= inner, (f.name, d[1:-1, 1:-1].max())
        assert (d.max(axis=2) <= np.maximum(_edge_bound(f, size), inner)).all(), (f.name, d.max())


# ------------------------------------------------------------------------------ DALI == PIL

@needs_dali
def test_dali_cpu_decode_matches_pil_shape_labels_order_and_pixels(tree):
    pil = load_image_folder(tree, "train", SIZE, cache=False, decoder="pil", num_threads=1)
    got = load_image_folder(tree, "train", SIZE, cache=False, decoder="dali", device="cpu",
                            num_threads=1, batch_size=4)  # batches of 4, 4 and 3
    assert got.classes == pil.classes == ["c0", "c1", "c2"]
    np.testing.assert_array_equal(got.labels, pil.labels)
    np.testing.assert_array_equal(got.labels, [0] * 4 + [1] * 4 + [2] * 3)
    files = _files(tree)
    assert len(files) == 11
    _check_close(pil.images, got.images, files, SIZE)
    # the partial last batch (and a batch larger than the set, and single images) decode the same
    for bs in (1, 64):
        other = load_image_folder(tree, "train", SIZE, cache=False, decoder="dali", device="cpu",
                                  num_threads=1, batch_size=bs)
        np.testing.assert_array_equal(other.images, got.images)
    # the test split: classes of train, labels by train's class index, a class folder may be missing
    t_pil = load_image_folder(tree, "test", 32, cache=False, decoder="pil", num_threads=1)
    t_got = load_image_folder(tree, "test", 32, cache=False, decoder="dali", device="cpu", num_threads=1)
    np.testing.assert_array_equal(t_got.labels, [0, 2, 2])
    np.testing.assert_array_equal(t_got.labels, t_pil.labels)
    _check_close(t_pil.images, t_got.images, _files(tree, "val"), 32)


@needs_dali
def test_cpu_pipeline_never_touches_a_gpu(tree, monkeypatch):
    def no_cuda(*a, **k):
        raise AssertionError("a CUDA call on the CPU path")
    for name in ("is_available", "current_device", "device_count", "mem_get_info", "synchronize",
                 "set_device", "init"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    dec = imf._DaliDecoder(4, SIZE, 1, None)
    pipe = dec.build()
    assert pipe.device_id is None
    assert {node.device for op in pipe._ops for node in op.outputs} == {"cpu"}
    s = load_image_folder(tree, "train", SIZE, cache=False, decoder="dali", device="cpu", num_threads=1)
    assert s.images.shape == (11, SIZE, SIZE, 3)
    assert choose_decoder("auto", "cpu")[:2] == choose_decoder("dali", "cpu")[:2] == ("dali", None)


@needs_dali
def test_the_gpu_decoding_graph_is_valid_here(monkeypatch):
    """No GPU here, but DALI checks every operator, argument and device placement when the graph is
    defined; only `build()` needs the GPU.  So the "mixed" (nvJPEG) pipeline is defined for device 0
    with build() stubbed: a wrong argument name or a CPU/GPU placement error fails here."""
    from nvidia.dali import Pipeline
    built = []
    monkeypatch.setattr(Pipeline, "build", lambda self: built.append(self.device_id))
    pipe = imf._DaliDecoder(4, SIZE, 1, device_id=0).build()
    assert built == [0]
    assert [node.device for node in pipe._graph_out] == ["gpu"]  # decoded, resized, cropped on the GPU


# --------------------------------------------------------------------------- broken files

@needs_dali
@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_a_corrupt_file_is_named_and_nothing_is_cached(own_tree, kind):
    bad = own_tree / "train" / "c1" / "img1.jpeg"  # in the second DALI batch of 4
    data = bad.read_bytes()
    # garbage: no image header at all; truncated: a valid header, then half the scan is missing
    # (the header reads, so DALI itself fails on the batch and the file is found one by one)
    bad.write_bytes(b"definitely not a JPEG " * 20 if kind == "garbage" else data[:len(data) // 2])
    with pytest.raises(DatasetError, match=r"c1/img1\.jpeg: cannot decode image"):
        load_image_folder(own_tree, "train", SIZE, decoder="dali", device="cpu", num_threads=1, batch_size=4)
    assert not [p.name for p in own_tree.iterdir() if p.name.startswith(".aerl_fast")]  # no cache, no temp
    with pytest.raises(DatasetError, match=r"c1/img1\.jpeg: cannot decode image"):  # the PIL path agrees
        load_image_folder(own_tree, "train", SIZE, cache=False, decoder="pil", num_threads=1)


@needs_dali
def test_a_file_only_dali_rejects_is_decoded_with_pil(tree, monkeypatch, capsys):
    files = _files(tree)
    rejected = files[5]
    size_of_rejected = rejected.stat().st_size
    real_run = imf._DaliDecoder.run

    def run(self, encoded, hw):
        if any(e.size == size_of_rejected for e in encoded):
            self.pipe = None
            raise RuntimeError("Critical error in pipeline:\nencountered:\nnvImageCodec failure: '#4'")
        return real_run(self, encoded, hw)

    monkeypatch.setattr(imf._DaliDecoder, "run", run)
    ref = load_image_folder(tree, "train", SIZE, cache=False, decoder="dali", device="cpu", num_threads=1,
                            batch_size=64)
    err = capsys.readouterr().err
    assert f"{rejected}: DALI cannot decode it (nvImageCodec failure: '#4'); decoded with PIL" in err
    np.testing.assert_array_equal(ref.images[5], _decode(rejected, SIZE))
    monkeypatch.setattr(imf._DaliDecoder, "run", real_run)
    clean = load_image_folder(tree, "train", SIZE, cache=False, decoder="dali", device="cpu", num_threads=1)
    keep = np.arange(11) != 5
    np.testing.assert_array_equal(ref.images[keep], clean.images[keep])


@needs_dali
def test_dali_failing_on_everything_is_an_error_not_a_silent_pil_run(tree, monkeypatch):
    def run(self, encoded, hw):
        raise RuntimeError("Critical error in pipeline:\nencountered:\nCUDA error: out of memory")

    monkeypatch.setattr(imf._DaliDecoder, "run", run)
    with pytest.raises(DatasetError, match=r"DALI failed on 8 images in a row.*out of memory.*--decoder pil"):
        load_image_folder(tree, "train", SIZE, cache=False, decoder="dali", device="cpu", num_threads=1,
                          batch_size=4)  # the count runs across batches


# ---------------------------------------------------------------------------------- cache

@needs_dali
def test_the_cache_serves_both_decoders_and_is_written_atomically(own_tree):
    first = load_image_folder(own_tree, "train", SIZE, decoder="dali", device="cpu", num_threads=1)
    caches = [p for p in own_tree.iterdir() if p.name.startswith(".aerl_fast")]
    assert [p.name for p in caches] == [f".aerl_fast_train_{SIZE}px.npz"]  # no decoder in the name, no temp
    with np.load(caches[0]) as z:
        assert str(z["decoder"]) == "DALI CPU"
    again = load_image_folder(own_tree, "train", SIZE, decoder="pil", num_threads=1)  # served by the cache
    np.testing.assert_array_equal(again.images, first.images)
    # a cache cut short (as by a crash of a writer without the rename) is rebuilt, not an error
    caches[0].write_bytes(caches[0].read_bytes()[:300])
    rebuilt = load_image_folder(own_tree, "train", SIZE, decoder="pil", num_threads=1)
    pil = load_image_folder(own_tree, "train", SIZE, cache=False, decoder="pil", num_threads=1)
    np.testing.assert_array_equal(rebuilt.images, pil.images)
    with np.load(caches[0]) as z:
        assert str(z["decoder"]) == "PIL"


# ----------------------------------------------------------------------- choice and errors

def test_choice_rules_without_touching_dali_or_cuda():
    assert choose_decoder("pil", "cuda").name == "pil"
    assert choose_decoder("auto", "cpu", dali_ok=False).name == "pil"
    assert choose_decoder("auto", "cuda:1", dali_ok=False).name == "pil"
    cpu = choose_decoder("auto", "cpu", dali_ok=True)
    assert (cpu.name, cpu.device_id, cpu.label) == ("dali", None, "DALI CPU")
    gpu = choose_decoder("auto", "cuda:1", dali_ok=True)  # a device index only: nothing runs on it
    assert (gpu.name, gpu.device_id, gpu.label) == ("dali", 1, "DALI mixed, cuda:1")
    assert choose_decoder("dali", "cpu", dali_ok=True).device_id is None
    with pytest.raises(ConfigError, match=r"--decoder dali: DALI is not installed: pip install \"aerl_fast\[dali\]\""):
        choose_decoder("dali", "cpu", dali_ok=False)
    with pytest.raises(ConfigError, match="--decoder must be one of auto, pil, dali, got 'bogus'"):
        choose_decoder("bogus", "cpu")


def test_bogus_decoder_is_rejected_everywhere(tree, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--decoder must be one of auto, pil, dali, got 'bogus'"):
        load_image_folder(tree, "train", SIZE, decoder="bogus")
    with pytest.raises(ConfigError, match="--decoder must be one of"):
        load_dataset("imagenet100", tree, "train", image_size=SIZE, decoder="bogus")
    with pytest.raises(ConfigError, match="--decoder must be one of"):
        RunOptions(decoder="bogus").validate()
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--decoder", "bogus", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    assert "error: --decoder must be one of auto, pil, dali, got 'bogus'" in capsys.readouterr().err
    from aerl_fast.evaluate import parse_args
    with pytest.raises(SystemExit):
        parse_args([str(tmp_path), "--decoder", "bogus"])
    assert parse_args([str(tmp_path), "--decoder", "dali"]).options.decoder == "dali"


def test_decoder_dali_without_dali_is_a_one_line_error(own_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dali_mod, "dali_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--decoder dali: DALI is not installed: pip install \"aerl_fast\[dali\]\""):
        load_image_folder(own_tree, "train", SIZE, cache=False, decoder="dali", device="cpu")
    assert dali_mod.dali_wheel() in INSTALL_HINT
    # auto falls back to PIL
    auto = load_image_folder(own_tree, "train", SIZE, cache=False, decoder="auto", device="cpu", num_threads=1)
    pil = load_image_folder(own_tree, "train", SIZE, cache=False, decoder="pil", num_threads=1)
    np.testing.assert_array_equal(auto.images, pil.images)
    # through the training CLI (load_dataset is called by train.prepare_data)
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--dataset", "imagenet100", "--data-dir", str(own_tree), "--image-size", "16",
                        "--decoder", "dali", "--device", "cpu", "--no-progress", "--epochs", "1",
                        "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --decoder dali: {INSTALL_HINT}"


def test_cli_plumbs_the_decoder_to_load_dataset(own_tree, tmp_path, monkeypatch):
    seen = []
    real = imf.load_image_folder

    def spy(*args, **kwargs):
        seen.append((kwargs.get("decoder"), kwargs.get("device")))
        return real(*args, **kwargs)

    monkeypatch.setattr(imf, "load_image_folder", spy)
    cfg = TrainConfig(dataset="imagenet100", data_dir=str(own_tree), image_size=16, val_frac=0.3).validate()
    train, val, test, _ = train_mod.prepare_data(cfg, RunOptions(decoder="pil", device="cpu"))
    assert seen == [("pil", "cpu"), ("pil", "cpu")]
    assert len(train.labels) + len(val.labels) == 11 and len(test.labels) == 3
    assert RunOptions().decoder == "auto"
    assert "decoder" in RunOptions().to_json()
