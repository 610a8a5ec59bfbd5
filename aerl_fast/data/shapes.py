"""The embedded default dataset: procedural 10-class 32×32 RGB shapes, generated from a seed.

No files, no download.  Each image shows one shape whose class is its geometry (disk, square,
triangle, ring, plus, horizontal bars, vertical bars, X, checker, diamond) at a random position,
scale, small rotation and colour, on a textured background with pixel noise and, often, a faded
distractor shape of another class.  Hard enough that a CNN stays well below 100% and PGD has
something to break; easy enough that a CPU run learns it in a minute or two.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .base import ImageSet, check_split

CLASSES = ["disk", "square", "triangle", "ring", "plus", "hbars", "vbars", "x", "checker", "diamond"]
SIZES = {"train": 12000, "test": 2000}
LABEL_NOISE = 0.1
PALETTE = [(0.9, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.2, 0.9), (0.9, 0.9, 0.1), (0.9, 0.1, 0.9),
           (0.1, 0.9, 0.9), (0.95, 0.55, 0.1), (0.5, 0.1, 0.8), (0.95, 0.95, 0.95), (0.05, 0.05, 0.05)]
_SPLIT_STREAM = {"train": 0, "test": 1}


_SHAPES = [
    lambda u, v, r, box: r < 1.0,
    lambda u, v, r, box: box < 0.85,
    lambda u, v, r, box: (v > -0.8) & (v < 0.8) & (u.abs() < 0.55 * (v + 0.8)),
    lambda u, v, r, box: (r > 0.55) & (r < 1.0),
    lambda u, v, r, box: ((u.abs() < 0.3) & (v.abs() < 1.0)) | ((v.abs() < 0.3) & (u.abs() < 1.0)),
    lambda u, v, r, box: (box < 1.0) & (torch.floor((v + 1.0) * 2.5) % 2 == 0),
    lambda u, v, r, box: (box < 1.0) & (torch.floor((u + 1.0) * 2.5) % 2 == 0),
    lambda u, v, r, box: (box < 1.0) & ((u.abs() - v.abs()).abs() < 0.3),
    lambda u, v, r, box: (box < 1.0) & ((torch.floor((u + 1.0) * 2.0) + torch.floor((v + 1.0) * 2.0)) % 2 == 0),
    lambda u, v, r, box: (u.abs() + v.abs()) < 1.0,
]


def _masks(cls, u, v):
    """Coverage in {0,1} of each sample's class shape in normalised coordinates (u, v)."""
    out = torch.zeros_like(u)
    for k, shape in enumerate(_SHAPES):
        idx = (cls == k).nonzero().squeeze(1)
        if idx.numel():
            uk, vk = u[idx], v[idx]
            out[idx] = shape(uk, vk, torch.sqrt(uk * uk + vk * vk), torch.maximum(uk.abs(), vk.abs())).float()
    return out


def _shape_layer(cls, g, n, size, scale_lo, scale_hi):
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    cx = size / 2 + (torch.rand(n, generator=g) - 0.5) * (size / 4)
    cy = size / 2 + (torch.rand(n, generator=g) - 0.5) * (size / 4)
    scale = scale_lo + torch.rand(n, generator=g) * (scale_hi - scale_lo)
    theta = (torch.rand(n, generator=g) - 0.5) * (math.pi / 6)  # ±15°: bars keep their orientation
    dx = (xs[None] - cx[:, None, None]) / scale[:, None, None]
    dy = (ys[None] - cy[:, None, None]) / scale[:, None, None]
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    return _masks(cls, c * dx + s * dy, -s * dx + c * dy)


def generate_shapes(n: int, seed: int = 0, size: int = 32) -> ImageSet:
    """`n` images [n, size, size, 3] uint8 with balanced labels, fully determined by `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    # background: a random colour plus smooth low-frequency texture
    bg = torch.rand(n, 3, 1, 1, generator=g) * 0.8 + 0.1
    texture = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) - 0.5, size=(size, size),
                                              mode="bilinear", align_corners=False)
    img = bg + 0.2 * texture
    # faded distractor of another class
    other = (labels + 1 + torch.randint(0, len(CLASSES) - 1, (n,), generator=g)) % len(CLASSES)
    d_alpha = (torch.rand(n, generator=g) < 0.5).float() * (0.2 + 0.25 * torch.rand(n, generator=g))
    d_color = torch.rand(n, 3, 1, 1, generator=g)
    d_mask = _shape_layer(other, g, n, size, 3.0, 6.0)[:, None] * d_alpha.view(n, 1, 1, 1)
    img = img * (1 - d_mask) + d_color * d_mask
    # the labelled shape: its colour leans toward a per-class hue (a cue a policy finds early;
    # the geometry is needed for the rest)
    palette = torch.tensor(PALETTE)[labels].view(n, 3, 1, 1)
    fg = (0.6 * palette + 0.4 * torch.rand(n, 3, 1, 1, generator=g)).clamp(0, 1)
    mask = _shape_layer(labels, g, n, size, 8.0, 12.0)[:, None]
    img = img * (1 - mask) + fg * mask
    noise = (0.02 + 0.08 * torch.rand(n, 1, 1, 1, generator=g)) * torch.randn(n, 3, size, size, generator=g)
    img = (img + noise).clamp(0, 1)
    # annotation noise: a fixed share of labels is replaced by a uniformly drawn class, which caps
    # the attainable accuracy near 1 - LABEL_NOISE·0.9
    flip = torch.rand(n, generator=g) < LABEL_NOISE
    labels = torch.where(flip, torch.randint(0, len(CLASSES), (n,), generator=g), labels)
    images = (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return ImageSet(images, labels.numpy().astype(np.int64), list(CLASSES))


def load_shapes(split: str = "train", seed: int = 0, n=None) -> ImageSet:
    """The embedded dataset's train (12k) or test (2k) split; splits use disjoint seed streams.
    Memoised per process (generation takes a few seconds; the arrays are read-only)."""
    check_split(split)
    return _cached(n or SIZES[split], seed * 2 + _SPLIT_STREAM[split])


@functools.lru_cache(maxsize=4)
def _cached(n: int, seed: int) -> ImageSet:
    out = generate_shapes(n, seed=seed)
    out.images.setflags(write=False)
    out.labels.setflags(write=False)
    return out
