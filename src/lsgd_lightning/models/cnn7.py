"""CNN7: the 7-layer convolutional network of the EASGD paper, as used by the LSGD paper on CIFAR-10."""

from __future__ import annotations

import torch
from torch import nn


def cnn7_feature_size(image_size: int) -> int:
    """Side length of CNN7's last feature map for a square input of ``image_size`` pixels (0 if too small)."""
    side = image_size - 4  # conv 5x5, no padding
    side //= 2  # max-pool 2
    side -= 4  # conv 5x5
    side //= 2  # max-pool 2
    side -= 2  # conv 3x3
    return max(side, 0)


class CNN7(nn.Module):
    """conv5x5(in->64)-ReLU-pool, conv5x5(64->128)-ReLU-pool, conv3x3(128->64)-ReLU, linear 256, dropout, linear.

    The flatten size follows from ``image_size``: 64 * 2 * 2 = 256 for the 28x28 inputs of the papers (MNIST, or
    CIFAR-10's 28x28 crops), 576 for uncropped 32x32 images.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, image_size: int = 28, hidden: int = 256, dropout: float = 0.5
    ) -> None:
        super().__init__()
        side = cnn7_feature_size(image_size)
        if side < 1:
            raise ValueError(f"cnn7 needs images of at least 24x24 pixels, got image_size={image_size}")
        self.flatten_size = 64 * side * side
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 64, kernel_size=3),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.flatten_size, hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
