"""Model registry.  Every model takes images in [0, 1]: normalisation is its first layer, so
attacks work in pixel space.

    model = build_model("cnn6", num_classes=10, width=0.25, mean=..., std=...)

Every size is checked before anything is allocated (the arguments may come from a checkpoint
file): the network is first assembled on the meta device, which costs no memory, and refused
when its weights would not fit in this machine's memory.
"""
from __future__ import annotations

import math
import operator
from itertools import chain
from numbers import Real
from typing import Callable, Dict, Sequence

import torch
import torch.nn as nn

from aerl_fast.errors import ModelError
from aerl_fast.limits import MAX_CLASSES, MAX_IMAGE_SIDE, require_memory

from .cnn import AliCNN, CNN6
from .normalize import Normalize
from .resnet import ResNet18
from .tv import densenet121, resnet50

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "cnn6": CNN6,           # the study's 6-layer CNN (~2.3 GFLOP per 32×32 image at width 1)
    "alicnn": AliCNN,       # the study's small CNN (~0.1 GFLOP)
    "resnet18": ResNet18,   # CIFAR ResNet-18 (3×3 stem, no max-pool)
    "resnet50": resnet50,   # torchvision, inputs upscaled to 224×224
    "densenet121": densenet121,
}
MAX_WIDTH = 64.0            # width multiplier (cnn6 at 64 has ~15e9 weights: the memory check refuses it)
MIN_IMAGE_SIDE = 8          # the CNNs pool three times


def _integer(value, name: str, lo: int, hi: int) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        raise ModelError(f"{name} must be an integer, got {value!r:.40}") from None
    if isinstance(value, bool) or not lo <= n <= hi:
        raise ModelError(f"{name} must be in [{lo}, {hi}], got {value!r:.40}")
    return n


def _triple(value, name: str):
    if not (isinstance(value, Sequence) and len(value) == 3
            and all(isinstance(v, Real) and math.isfinite(v) for v in value)):
        raise ModelError(f"{name} must be 3 finite numbers (one per channel), got {value!r:.60}")
    return tuple(float(v) for v in value)


def check_model_args(name, num_classes, width, mean, std, image_size):
    """The arguments of build_model, checked; a ModelError names the first bad one and its value."""
    if not isinstance(name, str) or name not in MODELS:
        raise ModelError(f"unknown model {name!r:.40}; choose one of {', '.join(MODELS)}")
    num_classes = _integer(num_classes, "num_classes", 2, MAX_CLASSES)
    if not (isinstance(width, Real) and not isinstance(width, bool) and math.isfinite(width)
            and 0 < width <= MAX_WIDTH):
        raise ModelError(f"width must be > 0 and <= {MAX_WIDTH:g}, got {width!r:.40}")
    image_size = _integer(image_size, "image_size", MIN_IMAGE_SIDE, MAX_IMAGE_SIDE)
    mean, std = _triple(mean, "mean"), _triple(std, "std")
    if min(std) <= 0:
        raise ModelError(f"std must be positive, got {std}")
    return num_classes, float(width), mean, std, image_size


def _assemble(name, num_classes, width, mean, std, image_size) -> nn.Sequential:
    return nn.Sequential(Normalize(mean, std), MODELS[name](num_classes=num_classes, width=width,
                                                            image_size=image_size))


def build_model(name: str, num_classes: int, *, width: float = 1.0,
                mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                image_size: int = 32, device=None) -> nn.Sequential:
    """Normalize(mean, std) followed by the named network; `device="meta"` gives the shapes only."""
    args = check_model_args(name, num_classes, width, mean, std, image_size)
    with torch.device("meta"):  # no memory, no random numbers drawn
        probe = _assemble(name, *args)
    if device is not None and torch.device(device).type == "meta":
        return probe
    nbytes = sum(t.numel() * t.element_size() for t in chain(probe.parameters(), probe.buffers()))
    require_memory(nbytes, f"{name} at width {args[1]:g} with {args[0]} classes and {args[4]} px images",
                   ModelError)
    model = _assemble(name, *args)
    return model if device is None else model.to(device)


__all__ = ["MODELS", "ModelError", "Normalize", "build_model", "check_model_args"]
