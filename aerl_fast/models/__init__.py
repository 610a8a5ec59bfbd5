"""Model registry.  Every model takes images in [0, 1]: normalisation is its first layer, so
attacks work in pixel space.

    model = build_model("cnn6", num_classes=10, width=0.25, mean=..., std=...)
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch.nn as nn

from aerl_fast.errors import UserError

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


class ModelError(UserError, ValueError):
    pass


def build_model(name: str, num_classes: int, *, width: float = 1.0,
                mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                image_size: int = 32) -> nn.Sequential:
    """Normalize(mean, std) followed by the named network."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if not width > 0:
        raise ModelError(f"width must be > 0, got {width}")
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2, got {num_classes}")
    net = MODELS[name](num_classes=num_classes, width=width, image_size=image_size)
    return nn.Sequential(Normalize(mean, std), net)


__all__ = ["MODELS", "ModelError", "Normalize", "build_model"]
