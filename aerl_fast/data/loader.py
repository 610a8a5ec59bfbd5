"""The on-device loader: the whole uint8 dataset lives on the training device; each batch is a
gather, a batched augmentation on uint8 and one conversion to float in [0, 1] — on the CPU all three
in one C++ pass (torch.ops.aerl_fast.augment_gather, bit for bit the torch definition below).

Randomness is counter-based: the epoch's permutation depends on (seed, epoch) and each batch's
augmentation on (seed, epoch, step).  Resuming at any (epoch, step) therefore reproduces exactly
the batches an uninterrupted run would have seen, with no generator state to carry around.  Both
are drawn from CPU generators and then moved to the device (CPU and CUDA generators give different
numbers for one seed): every device and every loader backend sees the same batches, so a run may
resume on another device or with another loader.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from aerl_fast.seeds import derived_seed

PAD_MODES = ("zeros", "reflect", "replicate")


@dataclass(frozen=True)
class Augment:
    """The study's augmentation: random h-flip, random v-flip, random translation up to `translate`
    of the image size (integer pixel shifts, uniform in [-m, m]); vacated pixels filled per `pad_mode`
    (zeros, as torchvision's RandomAffine does by default)."""
    hflip: bool = True
    vflip: bool = True
    translate: float = 0.1
    pad_mode: str = "zeros"

    def __post_init__(self):
        if not 0.0 <= self.translate < 0.5:
            raise ValueError(f"translate must be in [0, 0.5), got {self.translate}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")

    @property
    def active(self) -> bool:
        return self.hflip or self.vflip or self.translate > 0

    def margins(self, h: int, w: int) -> Tuple[int, int]:
        """The largest shift in pixels, (rows, columns), for an h x w image."""
        return int(math.floor(self.translate * h)), int(math.floor(self.translate * w))




def draw_augment(b: int, h: int, w: int, aug: Augment, generator: torch.Generator, device=None):
    """Per-sample (shift_y, shift_x, vflip, hflip) of one batch of [b] tensors (int64, int64, bool,
    bool), drawn from `generator` (the loaders' is a CPU one) in one fixed order, then moved to
    `device` without a host sync; every loader backend draws here, so all see the same
    augmentations.  A sample is flipped, then moved by (shift_y, shift_x) pixels (down/right for
    positive shifts): output pixel (r, q) comes from (r - shift_y, q - shift_x) of the flipped image."""
    where = generator.device
    my, mx = aug.margins(h, w)
    ty = tx = torch.zeros(b, dtype=torch.int64, device=where)
    if my or mx:
        ty = torch.randint(-my, my + 1, (b,), device=where, generator=generator)
        tx = torch.randint(-mx, mx + 1, (b,), device=where, generator=generator)
    no = torch.zeros(b, dtype=torch.bool, device=where)
    vf = (torch.rand(b, device=where, generator=generator) < 0.5) if aug.vflip else no
    hf = (torch.rand(b, device=where, generator=generator) < 0.5) if aug.hflip else no
    if device is None or torch.device(device) == where:
        return ty, tx, vf, hf
    return tuple(t.to(device, non_blocking=True) for t in (ty, tx, vf, hf))


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Flip and translate an NCHW batch (uint8 or float), each sample independently.

    Flips and shifts are folded into one index map per sample, so the whole augmentation is a
    single gather from the padded batch (padding is symmetric, so flipping the padded image equals
    padding the flipped one).  This is the torch definition; on the CPU the loader runs the same
    thing fused into one C++ pass (torch.ops.aerl_fast.augment_gather, csrc/augment_cpu.cpp).
    """
    b, c, h, w = x.shape
    my, mx = aug.margins(h, w)
    if not (my or mx or aug.vflip or aug.hflip):
        return x
    ty, tx, vf, hf = draw_augment(b, h, w, aug, generator, x.device)
    H, W = h + 2 * my, w + 2 * mx
    rows = torch.arange(h, device=x.device).expand(b, h) + my - ty[:, None]
    cols = torch.arange(w, device=x.device).expand(b, w) + mx - tx[:, None]
    rows = torch.where(vf[:, None], H - 1 - rows, rows)
    cols = torch.where(hf[:, None], W - 1 - cols, cols)
    if not (my or mx):
        padded = x
    elif aug.pad_mode == "zeros":
        padded = F.pad(x, (mx, mx, my, my))
    else:  # reflect/replicate padding is implemented for float input only
        padded = F.pad(x.float(), (mx, mx, my, my), mode=aug.pad_mode).to(x.dtype)
    index = (rows[:, :, None] * W + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, H * W).gather(2, index).view(b, c, h, w)


def fused_augment_op():
    """torch.ops.aerl_fast.augment_gather when the C++ extension is built with it, else None: the CPU
    loader's one-pass batch (index_select + flips + zero-filled shifts + float / 255), bit for bit
    what index_select, augment_batch and the float conversion give, ~3x faster on one core."""
    try:
        from aerl_fast import _C  # noqa: F401  (the import registers torch.ops.aerl_fast)
    except ImportError:
        return None
    return getattr(torch.ops.aerl_fast, "augment_gather", None)


class EpochOrder:
    """What every loader backend shares: epoch length and the (seed, epoch) permutation, drawn on
    the CPU whatever the training device.  Subclasses set images (first dim = samples),
    batch_size, shuffle, drop_last, seed and device."""

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        return self.images.shape[0]

    def host_order(self, epoch: int) -> torch.Tensor:
        """The sample order of `epoch` as a CPU tensor (the same on every device)."""
        n = self.images.shape[0]
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)))

    def order(self, epoch: int) -> torch.Tensor:
        """host_order on the training device (one copy per epoch, no host sync)."""
        return self.host_order(epoch).to(self.device, non_blocking=True)


class DeviceLoader(EpochOrder):
    """Batches of (float images in [0,1] NCHW, int64 labels) from a device-resident uint8 dataset."""

    def __init__(self, images, labels, batch_size: int, *, device="cpu", shuffle: bool = True,
                 augment: Augment | None = None, drop_last: bool = False, seed: int = 0,
                 channels_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # torch refuses to share read-only memory
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N,H,W,C], got {x.dtype} {tuple(x.shape)}")
        y = torch.as_tensor(np.array(labels, dtype=np.int64))  # a copy: sources may be read-only
        if y.shape != (x.shape[0],):
            raise ValueError(f"{x.shape[0]} images but labels of shape {tuple(y.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty dataset: no images to load")
        self.device = torch.device(device)
        self.images = x.to(self.device).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW on device
        self.labels = y.to(self.device)
        self.batch_size = int(batch_size)
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.seed, self.channels_last = int(seed), channels_last
        self._gen = torch.Generator()  # augmentation draws, on the CPU (see the module docstring)
        # the C++ one-pass batch on the CPU (zero fill only); the torch gather elsewhere
        zero_fill = augment is None or augment.pad_mode == "zeros"
        self.fused = fused_augment_op() if self.device.type == "cpu" and zero_fill else None

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch`, starting at batch `start_step` (for mid-epoch resume)."""
        order = self.order(epoch)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            if self.augment is not None and self.augment.active:
                self._gen.manual_seed(derived_seed(self.seed, epoch, step, 1))
                if self.fused is not None:
                    h, w = self.images.shape[2:]
                    x = self.fused(self.images, idx, *draw_augment(len(idx), h, w, self.augment, self._gen))
                else:
                    x = augment_batch(self.images.index_select(0, idx), self.augment, self._gen)
            else:
                x = self.images.index_select(0, idx)
            if self.channels_last:  # (CUDA: the torch path's uint8 batch, a quarter of the float bytes)
                x = x.contiguous(memory_format=torch.channels_last)
            if x.dtype == torch.uint8:
                x = x.float().div_(255.0)  # keeps the memory format
            yield x, self.labels.index_select(0, idx)

    def __iter__(self):
        return self.epoch(0)
