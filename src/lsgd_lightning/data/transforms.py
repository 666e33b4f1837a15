"""Image transforms written with torch only (torchvision has no CPU build here).

Tensor transforms take a ``uint8`` CHW tensor; randomness comes from torch's global generator, which Lightning's
``seed_everything(..., workers=True)`` seeds per process and per DataLoader worker. The PIL transforms serve the
lazily decoded image folders (ImageNet-sized images that are never cached).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: Augmentations for datasets held as arrays of equal-sized images.
ARRAY_AUGMENTS = ("none", "pad_crop", "random_crop")
#: Augmentations for image folders decoded on the fly.
FILE_AUGMENTS = ("none", "resized_crop")


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for transform in self.transforms:
            x = transform(x)
        return x


class RandomCrop:
    """Random ``size`` x ``size`` crop, after zero-padding each border by ``padding`` pixels."""

    def __init__(self, size: int, padding: int = 0) -> None:
        self.size = size
        self.padding = padding

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.padding:
            img = F.pad(img, (self.padding,) * 4)
        height, width = img.shape[-2:]
        if height < self.size or width < self.size:
            raise ValueError(f"crop size {self.size} is larger than the (padded) image {height}x{width}")
        top = int(torch.randint(0, height - self.size + 1, ()))
        left = int(torch.randint(0, width - self.size + 1, ()))
        return img[..., top : top + self.size, left : left + self.size]


class CenterCrop:
    """Central ``size`` x ``size`` crop."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        height, width = img.shape[-2:]
        if height < self.size or width < self.size:
            raise ValueError(f"crop size {self.size} is larger than the image {height}x{width}")
        top = (height - self.size) // 2
        left = (width - self.size) // 2
        return img[..., top : top + self.size, left : left + self.size]


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img.flip(-1) if float(torch.rand(())) < self.p else img


class Normalize:
    """``uint8`` [0, 255] to float, then per-channel ``(x / 255 - mean) / std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std > 0, got mean={mean}, std={std}")
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return (img.float().div_(255.0) - self.mean) / self.std


def check_augment(augment: str, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the setting and its allowed values."""
    if augment not in allowed:
        raise ValueError(f"augment must be one of {', '.join(allowed)}; got {augment!r}")


def array_transforms(
    augment: str,
    *,
    image_size: int,
    crop_size: int,
    padding: int,
    flip: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[Compose, Compose]:
    """Train and test transforms for ``image_size`` x ``image_size`` uint8 images.

    - ``none``: normalisation only.
    - ``pad_crop``: train on random crops of the original size after ``padding`` pixels of zero padding (the usual
      CIFAR 32x32 pad-4 recipe); test on the whole image.
    - ``random_crop``: train on random ``crop_size`` crops, test on the centre ``crop_size`` crop (the LSGD paper's
      28x28 CIFAR-10 recipe).
    ``flip`` adds random horizontal flips to training in the two cropping modes.
    """
    check_augment(augment, ARRAY_AUGMENTS)
    normalize = Normalize(mean, std)
    train: list[Callable[[Any], Any]] = []
    test: list[Callable[[Any], Any]] = []
    if augment == "pad_crop":
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        train.append(RandomCrop(image_size, padding))
    elif augment == "random_crop":
        if not 0 < crop_size <= image_size:
            raise ValueError(f"crop_size must be in 1..{image_size} for {image_size}-pixel images, got {crop_size}")
        train.append(RandomCrop(crop_size))
        test.append(CenterCrop(crop_size))
    if flip and augment != "none":
        train.append(RandomHorizontalFlip())
    return Compose([*train, normalize]), Compose([*test, normalize])


def pil_to_tensor(img: Any) -> torch.Tensor:
    """PIL image (mode ``RGB`` or ``L``) to a ``uint8`` CHW tensor."""
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class ResizeCenterCrop:
    """Resize the shorter side to ``size / crop_fraction``, then take the centre ``size`` square (ImageNet testing)."""

    def __init__(self, size: int, crop_fraction: float = 0.875) -> None:
        self.size = size
        self.resize = round(size / crop_fraction)

    def __call__(self, img: Any) -> Any:
        from PIL import Image

        width, height = img.size
        scale = self.resize / min(width, height)
        img = img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
        width, height = img.size
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


class RandomResizedCrop:
    """Crop a random area (``scale`` of the image) and aspect ratio, resized to ``size`` (ImageNet training)."""

    def __init__(
        self, size: int, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
    ) -> None:
        self.size = size
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.fallback = ResizeCenterCrop(size, crop_fraction=1.0)

    def __call__(self, img: Any) -> Any:
        from PIL import Image

        width, height = img.size
        area = width * height
        for _ in range(10):
            target = area * float(torch.empty(()).uniform_(*self.scale))
            aspect = math.exp(float(torch.empty(()).uniform_(*self.log_ratio)))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, ()))
                top = int(torch.randint(0, height - h + 1, ()))
                return img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        return self.fallback(img)


def file_transforms(
    augment: str, *, crop_size: int, flip: bool, mean: Sequence[float], std: Sequence[float]
) -> tuple[Compose, Compose]:
    """Train and test transforms for PIL images of any size, producing ``crop_size`` squares.

    - ``resized_crop``: random-resized crops (plus flips when ``flip``) for training, resize and centre crop for test.
    - ``none``: resize and centre crop for both.
    """
    check_augment(augment, FILE_AUGMENTS)
    normalize = Normalize(mean, std)
    test = Compose([ResizeCenterCrop(crop_size), pil_to_tensor, normalize])
    if augment == "none":
        return test, test
    train: list[Callable[[Any], Any]] = [RandomResizedCrop(crop_size), pil_to_tensor]
    if flip:
        train.append(RandomHorizontalFlip())
    return Compose([*train, normalize]), test
