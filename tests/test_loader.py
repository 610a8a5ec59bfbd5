"""The on-device loader: coverage, determinism and augmentation statistics."""
import math

import numpy as np
import pytest
import torch

from aerl_fast.data.loader import Augment, DeviceLoader, augment_batch, draw_augment, fused_augment_op


def _images(n, h=20, w=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), rng.integers(0, 10, n)


def test_epoch_covers_each_sample_once_and_is_seeded():
    x, y = _images(103)
    loader = DeviceLoader(x, y, 10, shuffle=True, seed=3)
    assert len(loader) == 11
    seen = torch.cat([yy for _, yy in loader.epoch(0)])
    assert seen.numel() == 103
    # identify samples by their first pixel row (random bytes: unique with overwhelming probability)
    batches = [xb for xb, _ in loader.epoch(0)]
    keys = torch.cat(batches)[:, :, 0, :].flatten(1)
    ref = torch.from_numpy(x).permute(0, 3, 1, 2)[:, :, 0, :].flatten(1).float() / 255
    match = (keys[:, None, :] == ref[None]).all(-1)
    assert (match.sum(1) == 1).all() and (match.sum(0) == 1).all()
    order0 = loader.order(0)
    assert torch.equal(order0, DeviceLoader(x, y, 10, seed=3).order(0))
    assert not torch.equal(order0, loader.order(1))
    assert not torch.equal(order0, DeviceLoader(x, y, 10, seed=4).order(0))


def test_output_range_dtype_and_drop_last():
    x, y = _images(50)
    loader = DeviceLoader(x, y, 16, augment=Augment(), drop_last=True)
    out = list(loader.epoch(2))
    assert len(out) == 3
    for xb, yb in out:
        assert xb.dtype == torch.float32 and xb.shape == (16, 3, 20, 20) and yb.dtype == torch.int64
        assert float(xb.min()) >= 0.0 and float(xb.max()) <= 1.0


def test_resume_mid_epoch_gives_identical_batches():
    x, y = _images(64)
    loader = DeviceLoader(x, y, 8, augment=Augment(), seed=11)
    full = list(loader.epoch(5))
    tail = list(DeviceLoader(x, y, 8, augment=Augment(), seed=11).epoch(5, start_step=3))
    assert len(tail) == len(full) - 3
    for (a, ya), (b, yb) in zip(full[3:], tail):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def _probe(n, size=30):
    """Images with one bright pixel at a known asymmetric spot: flips and shifts are readable."""
    x = np.zeros((n, size, size, 3), np.uint8)
    x[:, 5, 8, :] = 255
    return x


def test_flip_and_translate_statistics():
    n, size = 4000, 30
    g = torch.Generator().manual_seed(0)
    base = torch.from_numpy(_probe(n, size)).permute(0, 3, 1, 2).contiguous()
    out = augment_batch(base, Augment(hflip=True, vflip=True, translate=0.1), g)
    assert out.dtype == torch.uint8
    assert torch.equal(out.flatten(1).sum(1), torch.full((n,), 3 * 255))  # pixel never lost (|shift| <= 3)
    pos = out[:, 0].flatten(1).argmax(1)
    r, c = pos // size, pos % size
    vflip = r > size // 2
    hflip = c > size // 2
    dr = torch.where(vflip, (size - 1 - 5) - r, r - 5) * torch.where(vflip, -1, 1)
    dc = torch.where(hflip, (size - 1 - 8) - c, c - 8) * torch.where(hflip, -1, 1)
    # flips: Bernoulli(0.5) each, independent; 4σ bounds
    for f in (vflip, hflip):
        assert abs(f.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    assert abs((vflip & hflip).float().mean().item() - 0.25) < 4 * math.sqrt(0.1875 / n)
    # shifts: uniform on {-3..3} (floor(0.1 * 30)); chi-square against uniform
    for d in (dr, dc):
        assert int(d.min()) == -3 and int(d.max()) == 3
        counts = torch.bincount(d + 3, minlength=7).double()
        expected = n / 7
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 22.46  # p = 0.001 for 6 degrees of freedom


def test_translate_fills_with_zeros_or_replicates():
    x = torch.full((64, 3, 10, 10), 200, dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    z = augment_batch(x, Augment(False, False, 0.2, "zeros"), g)
    assert (z == 0).any() and ((z == 0) | (z == 200)).all()
    r = augment_batch(x, Augment(False, False, 0.2, "replicate"), g)
    assert (r == 200).all()


def test_no_augmentation_is_identity():
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(augment_batch(x, Augment(False, False, 0.0), torch.Generator()), x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size must be >= 1"),
])
def test_bad_arguments(kwargs, match):
    x, y = _images(4)
    with pytest.raises(ValueError, match=match):
        DeviceLoader(x, y, **kwargs)
    with pytest.raises(ValueError, match="labels of shape"):
        DeviceLoader(x, y[:3], 2)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(x.astype(np.float32), y, 2)
    with pytest.raises(ValueError, match="translate"):
        Augment(translate=0.7)



# ------------------------------------------------ the CPU loader's fused batch (aerl_fast._C)

FUSED = fused_augment_op()
needs_fused = pytest.mark.skipif(FUSED is None, reason="aerl_fast._C is not built with augment_gather")


def _explicit(images, idx, ty, tx, vf, hf):
    """Independent definition: each sample flipped, then its content moved by (ty, tx) pixels with
    zero fill, by slicing; then / 255 in float32."""
    out = torch.zeros(len(idx), *images.shape[1:])
    h, w = images.shape[2:]
    for i, (j, dy, dx, v, f) in enumerate(zip(idx.tolist(), ty.tolist(), tx.tolist(), vf.tolist(), hf.tolist())):
        x = images[j].float() / 255
        x = x.flip(1) if v else x
        x = x.flip(2) if f else x
        ys, xs = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
        if ys.start < ys.stop and xs.start < xs.stop:
            out[i, :, ys, xs] = x[:, max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)]
    return out


@needs_fused
@pytest.mark.parametrize("c, h, w", [(3, 13, 29), (1, 32, 32), (3, 1, 7)])
def test_fused_batch_equals_flips_and_shifts_by_slicing(c, h, w):
    g = torch.Generator().manual_seed(c * 100 + h)
    images = torch.randint(0, 256, (17, c, h, w), dtype=torch.uint8, generator=g)
    b = 40
    idx = torch.randint(0, 17, (b,), generator=g)  # repeats included
    ty = torch.randint(-h - 2, h + 3, (b,), generator=g)  # shifts past the border: rows of zeros
    tx = torch.randint(-w - 2, w + 3, (b,), generator=g)
    vf, hf = torch.rand(b, generator=g) < 0.5, torch.rand(b, generator=g) < 0.5
    got = FUSED(images, idx, ty, tx, vf, hf)
    assert got.dtype == torch.float32 and got.shape == (b, c, h, w) and got.is_contiguous()
    assert torch.equal(got, _explicit(images, idx, ty, tx, vf, hf))  # bit for bit


@needs_fused
def test_fused_batch_equals_the_torch_gather_definition():
    """The op against augment_batch (the torch definition) on the same draws, bit for bit."""
    images = torch.as_tensor(_images(50, 20, 24)[0]).permute(0, 3, 1, 2).contiguous()
    aug = Augment(translate=0.2)
    idx = torch.randperm(50)[:33]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    want = augment_batch(images.index_select(0, idx), aug, g1).float().div_(255.0)
    got = FUSED(images, idx, *draw_augment(33, 20, 24, aug, g2))
    assert torch.equal(got, want)


@needs_fused
def test_the_cpu_loader_uses_the_fused_batch_and_gives_the_torch_paths_batches():
    x, y = _images(70, 20, 20)
    fused = DeviceLoader(x, y, 16, augment=Augment(), seed=2)
    torch_path = DeviceLoader(x, y, 16, augment=Augment(), seed=2)
    torch_path.fused = None
    assert fused.fused is not None
    assert DeviceLoader(x, y, 16, augment=Augment(pad_mode="reflect")).fused is None  # zero fill only
    for (a, la), (b, lb) in zip(fused.epoch(3), torch_path.epoch(3)):
        assert torch.equal(a, b) and torch.equal(la, lb)


@needs_fused
@pytest.mark.parametrize("change, match", [
    (dict(images=torch.rand(4, 3, 8, 8)), "images must be uint8"),
    (dict(images=torch.zeros(4, 8, 8, dtype=torch.uint8)), r"images must be \[N, C, H, W\]"),
    (dict(index=torch.tensor([0, 4])), r"index\[1\] = 4 is out of range for 4 images"),
    (dict(index=torch.tensor([0, -1])), "out of range"),
    (dict(shift_y=torch.zeros(3, dtype=torch.int64)), r"shift_y must have shape \[2\]"),
    (dict(vflip=torch.zeros(2, dtype=torch.int64)), "vflip must be Bool"),
])
def test_fused_batch_rejects_bad_input_with_a_clear_error(change, match):
    kw = dict(images=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), index=torch.tensor([0, 3]),
              shift_y=torch.zeros(2, dtype=torch.int64), shift_x=torch.zeros(2, dtype=torch.int64),
              vflip=torch.zeros(2, dtype=torch.bool), hflip=torch.zeros(2, dtype=torch.bool))
    kw.update(change)
    with pytest.raises(RuntimeError, match=match):
        FUSED(*kw.values())


# ------------------------------------------ the same batches on every device (CPU generators)

def _recorded_draws(monkeypatch):
    """Wrap draw_augment: record the CPU draws every loader path takes (and check its generator
    is a CPU one), then hand them on as the loader asked."""
    import aerl_fast.data.loader as loader_mod
    real, seen = loader_mod.draw_augment, []

    def recording(b, h, w, aug, generator, device=None):
        assert generator.device.type == "cpu"
        out = real(b, h, w, aug, generator)
        seen.append([t.clone() for t in out])
        return out if device is None else tuple(t.to(device) for t in out)
    monkeypatch.setattr(loader_mod, "draw_augment", recording)
    return seen


def test_order_and_augmentation_do_not_depend_on_the_device(monkeypatch):
    """On "meta" (no data, no generator of its own: the old per-device generators failed there) the
    loader draws exactly the CPU loader's permutation and augmentation parameters."""
    x, y = _images(37, 12, 12)
    seen = {}
    for dev in ("cpu", "meta"):
        seen[dev] = _recorded_draws(monkeypatch)
        loader = DeviceLoader(x, y, 8, device=dev, augment=Augment(), seed=5)
        batches = list(loader.epoch(2, start_step=1))
        assert len(batches) == 4 and batches[0][0].device.type == dev
        assert torch.equal(loader.host_order(2), DeviceLoader(x, y, 8, seed=5).order(2))
        assert loader.order(2).device.type == dev
        monkeypatch.undo()
    assert len(seen["cpu"]) == len(seen["meta"]) == 4
    for a, b in zip(seen["cpu"], seen["meta"]):
        assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not all(torch.equal(s, t) for s, t in zip(seen["cpu"][0], seen["cpu"][1]))  # per step


def test_draw_augment_moves_cpu_draws_to_the_device():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    on_cpu = draw_augment(9, 20, 20, Augment(), g1)
    on_meta = draw_augment(9, 20, 20, Augment(), g2, device="meta")
    assert all(t.device.type == "cpu" for t in on_cpu) and all(t.device.type == "meta" for t in on_meta)
    assert torch.equal(g1.get_state(), g2.get_state())  # the same draws were taken
