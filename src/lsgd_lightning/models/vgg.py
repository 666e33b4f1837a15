"""VGG16 with batch norm, CIFAR variant (512-512 classifier with dropout, as in the LSGD authors' code)."""

from __future__ import annotations

import torch
from torch import nn

# Configuration "D" of the VGG paper; "M" is a 2x2 max-pool.
VGG16_LAYERS: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
)


class VGG16(nn.Module):
    """VGG16-BN for small images.

    The fifth max-pool is an adaptive max-pool to 1x1: identical to a 2x2 pool for 32x32 inputs, and it keeps the
    network valid for the papers' 28x28 crops, where five halvings would shrink the map to nothing.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dropout: float = 0.5) -> None:
        super().__init__()
        if image_size < 16:
            raise ValueError(f"vgg16 needs images of at least 16x16 pixels, got image_size={image_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU(True)]
                channels = int(item)
        layers.append(nn.AdaptiveMaxPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(True),
            nn.Linear(512, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
