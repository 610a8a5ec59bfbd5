"""The DALI loader backend against the tensor loader, and the --loader choice.

DALI-dependent tests skip when nvidia.dali does not import; the choice logic is tested either way,
with DALI's absence simulated by hiding the module."""
import json
import math
import sys

import numpy as np
import pytest
import torch

from aerl_fast import train as train_mod
from aerl_fast.data.backends import choose_loader, make_loader
from aerl_fast.data.dali import INSTALL_HINT, augment_params, dali_available, dali_wheel
from aerl_fast.data.loader import Augment, DeviceLoader
from aerl_fast.errors import ConfigError

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed (pip install 'aerl_fast[dali]')")
CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing below runs on it


def _images(n, h=20, w=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _dali(*args, **kwargs):
    from aerl_fast.data.dali import DaliLoader
    return DaliLoader(*args, **kwargs)


def _hide_dali(monkeypatch):
    """Make `import nvidia.dali` fail, as on a machine without the extra."""
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)


@needs_dali
@pytest.mark.parametrize("augment", [Augment(), None])
def test_the_gpu_pipeline_graph_is_valid_here(monkeypatch, augment):
    """No GPU here, but DALI checks every operator, argument and device placement (argument inputs
    on the host, data on the GPU) when the graph is defined; only building it needs the GPU.  So the
    GPU pipeline is defined for device 0: a wrong argument or a placement error fails here."""
    from aerl_fast.data.dali import DaliLoader
    x, y = _images(10)
    loader = _dali(x, y, 4, augment=augment, seed=0, channels_last=True)
    loader.pipeline_device = "gpu"
    monkeypatch.setattr(DaliLoader, "device_id", property(lambda self: 0))
    pipe = loader.build_pipeline(lambda: None)
    assert pipe.device_id == 0
    # images (flipped, sliced, normalised) and labels both come out on the GPU
    assert [node.device for node in pipe._graph_out] == ["gpu", "gpu"]


# --------------------------------------------------------------------------- outputs and order

@needs_dali
@pytest.mark.parametrize("channels_last", [False, True])
def test_batches_equal_the_tensor_loaders(channels_last):
    """Same shape, dtype, range, labels and pixels as DeviceLoader, bit for bit."""
    x, y = _images(103)
    ref = list(DeviceLoader(x, y, 10, augment=Augment(), seed=3).epoch(2))
    got = list(_dali(x, y, 10, augment=Augment(), seed=3, channels_last=channels_last).epoch(2))
    assert len(got) == len(ref) == 11
    for (xa, ya), (xb, yb) in zip(ref, got):
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.device.type == "cpu"
        assert xb.shape == xa.shape and torch.equal(ya, yb)
        assert float(xb.min()) >= 0.0 and float(xb.max()) <= 1.0
        assert xb.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(xb, xa)
    assert not torch.equal(got[0][0], torch.from_numpy(x[:10]).permute(0, 3, 1, 2).float() / 255)  # augmented


@needs_dali
def test_drop_last_and_length():
    x, y = _images(50)
    loader = _dali(x, y, 16, augment=Augment(), drop_last=True)
    out = list(loader.epoch(0))
    assert len(loader) == len(out) == 3 and loader.num_samples == 50
    assert all(xb.shape == (16, 3, 20, 20) for xb, _ in out)
    assert [xb.shape[0] for xb, _ in _dali(x, y, 16).epoch(0)] == [16, 16, 16, 2]


@needs_dali
def test_epoch_covers_each_sample_once_in_the_tensor_loaders_order():
    x, y = _images(103)
    loader = _dali(x, y, 10, shuffle=True, seed=3)  # no augmentation: samples are recognisable
    assert torch.equal(loader.order(4), DeviceLoader(x, y, 10, seed=3).order(4))
    assert not torch.equal(loader.order(4), loader.order(5))
    batches = list(loader.epoch(4))
    xs = torch.cat([xb for xb, _ in batches])
    order = loader.order(4)
    expected = torch.from_numpy(x).permute(0, 3, 1, 2).float()[order] / 255
    torch.testing.assert_close(xs, expected, rtol=0, atol=1e-7)
    assert torch.equal(torch.cat([yb for _, yb in batches]), torch.from_numpy(y)[order])
    assert sorted(order.tolist()) == list(range(103))


@needs_dali
def test_resume_mid_epoch_gives_identical_batches():
    x, y = _images(64)
    full = list(_dali(x, y, 8, augment=Augment(), seed=11).epoch(5))
    tail = list(_dali(x, y, 8, augment=Augment(), seed=11).epoch(5, start_step=3))
    assert len(tail) == len(full) - 3
    for (a, ya), (b, yb) in zip(full[3:], tail):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert list(_dali(x, y, 8, seed=11).epoch(0, start_step=8)) == []


@needs_dali
def test_abandoned_epoch_does_not_leak_into_the_next():
    x, y = _images(64)
    loader = _dali(x, y, 8, augment=Augment(), seed=2)
    first = next(iter(loader.epoch(1)))  # the pipeline has prefetched more of epoch 1
    again = list(loader.epoch(1))
    assert torch.equal(first[0], again[0][0]) and len(again) == 8


# ------------------------------------------------------------------------ augmentation statistics

def _probe(n, size=30):
    """Images with one bright pixel at a known asymmetric spot: flips and shifts are readable."""
    x = np.zeros((n, size, size, 3), np.uint8)
    x[:, 5, 8, :] = 255
    return x


@needs_dali
def test_flip_and_translate_statistics():
    n, size = 4000, 30
    loader = _dali(_probe(n, size), np.zeros(n), 500, augment=Augment(translate=0.1), seed=0)
    out = torch.cat([xb for xb, _ in loader.epoch(0)])
    assert out.shape == (n, 3, size, size)
    assert torch.equal((out * 255).round().flatten(1).sum(1), torch.full((n,), 3 * 255.0))  # |shift| <= 3: kept
    pos = out[:, 0].flatten(1).argmax(1)
    r, c = pos // size, pos % size
    vflip, hflip = r > size // 2, c > size // 2
    dr = torch.where(vflip, (size - 1 - 5) - r, r - 5) * torch.where(vflip, -1, 1)
    dc = torch.where(hflip, (size - 1 - 8) - c, c - 8) * torch.where(hflip, -1, 1)
    for f in (vflip, hflip):  # Bernoulli(0.5) each, independent; 4σ bounds
        assert abs(f.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    assert abs((vflip & hflip).float().mean().item() - 0.25) < 4 * math.sqrt(0.1875 / n)
    for d in (dr, dc):  # uniform on {-3..3} = floor(0.1 * 30): chi-square, 6 degrees of freedom
        assert int(d.min()) == -3 and int(d.max()) == 3
        counts = torch.bincount(d + 3, minlength=7).double()
        chi2 = float(((counts - n / 7) ** 2 / (n / 7)).sum())
        assert chi2 < 22.46  # p = 0.001


@needs_dali
def test_translation_fills_with_zeros_and_no_augmentation_is_identity():
    x = np.full((64, 10, 10, 3), 200, np.uint8)
    out = torch.cat([xb for xb, _ in _dali(x, np.zeros(64), 32, augment=Augment(False, False, 0.2)).epoch(0)])
    px = (out * 255).round()
    assert (px == 0).any() and ((px == 0) | (px == 200)).all()
    plain = torch.cat([xb for xb, _ in _dali(x, np.zeros(64), 32, shuffle=False).epoch(0)])
    assert torch.equal((plain * 255).round(), torch.full_like(plain, 200.0))
    with pytest.raises(ValueError, match="zeros only"):
        _dali(x, np.zeros(64), 32, augment=Augment(pad_mode="reflect"))


def test_augment_params_draw_like_augment_batch():
    """The parameters fed to DALI reproduce augment_batch's gather (no DALI needed)."""
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    from aerl_fast.data.loader import augment_batch
    ref = augment_batch(x, Augment(), g1)
    vf, hf, ty, tx = augment_params(Augment(), 64, 12, 12, g2)
    assert set(np.unique(ty)) <= {-1, 0, 1} and vf.dtype == np.int32
    for i in range(64):
        img = x[i]
        img = img.flip(1) if vf[i] else img
        img = img.flip(2) if hf[i] else img
        shifted = torch.zeros_like(img)
        sy, sx = int(ty[i]), int(tx[i])
        shifted[:, max(sy, 0):12 + min(sy, 0), max(sx, 0):12 + min(sx, 0)] = \
            img[:, max(-sy, 0):12 + min(-sy, 0), max(-sx, 0):12 + min(-sx, 0)]
        assert torch.equal(shifted, ref[i]), i


# --------------------------------------------------------------------------- no GPU op on CPU

@needs_dali
def test_cpu_pipeline_never_touches_a_gpu(monkeypatch):
    def no_cuda(*a, **k):
        raise AssertionError("a CUDA call on the CPU path")
    for name in ("current_device", "mem_get_info", "synchronize", "set_device"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    x, y = _images(40)
    loader = _dali(x, y, 16, augment=Augment(), device="cpu")
    assert loader.pipeline_device == "cpu" and loader.device_id is None
    pipe = loader.build_pipeline(lambda: (_ for _ in ()).throw(StopIteration))
    assert pipe.device_id is None
    pipe.build()
    devices = {node.device for op in pipe._ops for node in op.outputs}
    assert devices == {"cpu"}
    batches = list(loader.epoch(0))
    assert all(xb.device.type == "cpu" and yb.device.type == "cpu" for xb, yb in batches)
    assert choose_loader("auto", CPU, 10 ** 12, dali_ok=True, gpu_free_bytes=no_cuda).name == "tensor"


@needs_dali
def test_a_gpu_loader_draws_the_tensor_loaders_order_on_the_host(monkeypatch):
    """The epoch order and augmentation of a CUDA-bound DALI loader come from CPU generators: the
    tensor loader's on any device, and nothing asks CUDA for them."""
    def no_cuda(*a, **k):
        raise AssertionError("a CUDA call while drawing the order")
    for name in ("current_device", "mem_get_info", "synchronize", "set_device", "manual_seed"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    x, y = _images(50)
    loader = _dali(x, y, 8, augment=Augment(), seed=3, device=CUDA)
    assert loader.pipeline_device == "gpu"
    assert torch.equal(loader.host_order(1), DeviceLoader(x, y, 8, seed=3, device="meta").host_order(1))
    assert torch.equal(loader.host_order(1), DeviceLoader(x, y, 8, seed=3).order(1))


# --------------------------------------------------------------------------------- the choice

def test_auto_on_cpu_is_tensor_whatever_is_installed():
    for ok in (True, False):
        choice = choose_loader("auto", CPU, 10 ** 12, dali_ok=ok)
        assert choice.name == "tensor" and "CPU" in choice.reason


def test_auto_on_cuda_keeps_tensor_while_the_set_fits_then_streams_with_dali():
    free = lambda dev: 8 * 2 ** 30  # noqa: E731  (a fake 8 GiB free: no CUDA call)
    assert choose_loader("auto", CUDA, 2 * 2 ** 30, dali_ok=True, gpu_free_bytes=free).name == "tensor"
    big = choose_loader("auto", CUDA, 6 * 2 ** 30, dali_ok=True, gpu_free_bytes=free)
    assert big.name == "dali" and "host memory" in big.reason
    missing = choose_loader("auto", CUDA, 6 * 2 ** 30, dali_ok=False, gpu_free_bytes=free)
    assert missing.name == "tensor" and "not installed" in missing.reason
    assert choose_loader("auto", CUDA, 6 * 2 ** 30, dali_ok=True, gpu_free_bytes=free,
                         pad_mode="reflect").name == "tensor"


def test_without_dali_auto_never_picks_it_and_dali_says_how_to_install(monkeypatch):
    _hide_dali(monkeypatch)
    assert not dali_available()
    assert choose_loader("auto", CPU, 10).name == "tensor"
    assert choose_loader("auto", CUDA, 10 ** 15, gpu_free_bytes=lambda d: 10 ** 9).name == "tensor"
    with pytest.raises(ConfigError, match=r"pip install \"aerl_fast\[dali\]\""):
        choose_loader("dali", CPU, 10)
    assert dali_wheel() in INSTALL_HINT
    with pytest.raises(ImportError, match="aerl_fast\\[dali\\]"):
        _dali(*_images(4), 2)


def test_requested_loaders_and_bad_values():
    assert choose_loader("tensor", CUDA, 10 ** 15, dali_ok=True, gpu_free_bytes=lambda d: 0).name == "tensor"
    assert choose_loader("dali", CPU, 10, dali_ok=True).name == "dali"
    with pytest.raises(ConfigError, match="pad-mode"):
        choose_loader("dali", CPU, 10, dali_ok=True, pad_mode="replicate")
    with pytest.raises(ConfigError, match="--loader must be one of"):
        choose_loader("fast", CPU, 10)


TINY = ["--dataset", "shapes", "--model", "alicnn", "--width", "0.25", "--train-subset", "480",
        "--batch-size", "32", "--no-progress", "--eval-batch-size", "256", "--epochs", "1"]


def test_cli_loader_dali_without_dali_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    _hide_dali(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        train_mod.main(TINY + ["--loader", "dali", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'error: --loader dali: DALI is not installed: pip install "aerl_fast[dali]"' in err
    with pytest.raises(SystemExit):
        train_mod.main(TINY + ["--loader", "fast", "--out", str(tmp_path / "s")])
    assert "--loader must be one of auto, tensor, dali" in capsys.readouterr().err


@pytest.mark.parametrize("loader", ["auto", pytest.param("dali", marks=needs_dali)])
def test_cli_records_the_loader(loader, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train_mod.main(TINY + ["--objective", "rl", "--loader", loader, "--out", str(out)])
    expected = "tensor" if loader == "auto" else "dali"
    assert summary["loader"] == expected
    assert json.loads((out / "summary.json").read_text())["loader"] == expected
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert first["loader"] == expected and first["images_per_s"] > 0
    assert f"loader: {expected} (" in capsys.readouterr().err


def test_make_loader_builds_the_chosen_backend():
    from aerl_fast.config import TrainConfig
    x, y = _images(40)
    loader, choice = make_loader(TrainConfig(batch_size=16), x, y, CPU, loader="tensor")
    assert isinstance(loader, DeviceLoader) and choice.name == "tensor" and len(loader) == 2
    if dali_available():
        from aerl_fast.data.dali import DaliLoader
        loader, choice = make_loader(TrainConfig(batch_size=16), x, y, CPU, loader="dali")
        assert isinstance(loader, DaliLoader) and len(loader) == 2 and loader.augment == Augment()


def test_the_dali_extra_is_the_build_for_torchs_cuda(monkeypatch):
    """pyproject's `dali` extra is what dali_wheel() names for the pinned torch (a CUDA 13 build),
    and dali_wheel() follows torch's CUDA major."""
    import tomllib
    from pathlib import Path
    extra = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]["dali"]
    assert [req.split("==")[0] for req in extra] == ["nvidia-dali-cuda130"]
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert dali_wheel() == "nvidia-dali-cuda130"
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert dali_wheel() == "nvidia-dali-cuda120"
