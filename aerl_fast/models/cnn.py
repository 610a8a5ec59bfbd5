"""The study's two CNNs, with a width multiplier (1.0 = the study's channel counts)."""
from __future__ import annotations

import torch.nn as nn


def _scaled(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


def _conv_bn_relu(cin, cout, k):
    """k×k conv with 'same' padding as Keras/torch place it for even k (extra pixel right/bottom)."""
    lo = (k - 1) // 2
    return [nn.ZeroPad2d((lo, k - 1 - lo, lo, k - 1 - lo)), nn.Conv2d(cin, cout, k),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CNN6(nn.Module):
    """The study's 6-layer CNN: conv 3→264→128 (4×4, 'same'), pool, 128→512→128, pool,
    128→128→128, pool; BatchNorm+ReLU after every conv and fc1; dropout 0.2/0.25/0.35/0.5;
    fc 2048→256→classes.  ~2.3 GFLOP per 32×32 image at width 1."""

    CHANNELS = (264, 128, 512, 128, 128, 128)
    HIDDEN = 256
    DROPOUT = (0.2, 0.25, 0.35, 0.5)

    def __init__(self, num_classes: int = 10, width: float = 1.0, image_size: int = 32):
        super().__init__()
        c = [_scaled(ch, width) for ch in self.CHANNELS]
        hidden = _scaled(self.HIDDEN, width)
        d = self.DROPOUT
        self.features = nn.Sequential(
            *_conv_bn_relu(3, c[0], 4), *_conv_bn_relu(c[0], c[1], 4), nn.MaxPool2d(2), nn.Dropout(d[0]),
            *_conv_bn_relu(c[1], c[2], 4), *_conv_bn_relu(c[2], c[3], 4), nn.MaxPool2d(2), nn.Dropout(d[1]),
            *_conv_bn_relu(c[3], c[4], 4), *_conv_bn_relu(c[4], c[5], 4), nn.MaxPool2d(2), nn.Dropout(d[2]),
        )
        flat = c[5] * (image_size // 8) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Dropout(d[3]), nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class AliCNN(nn.Module):
    """The study's small CNN: conv 32, 64 | pool | 128 | pool | 128 | pool | fc 1024;
    3×3 'same' convs with ReLU, dropout .25/.25/.5.  ~0.1 GFLOP per 32×32 image."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, image_size: int = 32):
        super().__init__()
        c1, c2, c3, c4 = (_scaled(ch, width) for ch in (32, 64, 128, 128))
        hidden = _scaled(1024, width)
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), relu(), nn.Conv2d(c1, c2, 3, padding=1), relu(),
            nn.MaxPool2d(2), nn.Dropout(0.25),
            nn.Conv2d(c2, c3, 3, padding=1), relu(), nn.MaxPool2d(2), nn.Dropout(0.25),
            nn.Conv2d(c3, c4, 3, padding=1), relu(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c4 * (image_size // 8) ** 2, hidden), relu(), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
