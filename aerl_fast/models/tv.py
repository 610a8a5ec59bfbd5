"""torchvision ResNet-50 / DenseNet-121 as the study uses them: random init (no weights are ever
downloaded), small inputs upscaled to 224×224 inside the model."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
import torchvision

from aerl_fast.errors import ModelError


class Upscaled(nn.Module):
    def __init__(self, net: nn.Module, size: int = 224):
        super().__init__()
        self.size = size
        self.net = net

    def forward(self, x):
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x)


def resnet50(num_classes: int = 10, width: float = 1.0, image_size: int = 32):
    if width != 1.0:
        raise ModelError(f"resnet50 has no width multiplier; use --width 1.0 (got {width})")
    return Upscaled(torchvision.models.resnet50(weights=None, num_classes=num_classes))


def densenet121(num_classes: int = 10, width: float = 1.0, image_size: int = 32):
    if width != 1.0:
        raise ModelError(f"densenet121 has no width multiplier; use --width 1.0 (got {width})")
    return Upscaled(torchvision.models.densenet121(weights=None, num_classes=num_classes))
