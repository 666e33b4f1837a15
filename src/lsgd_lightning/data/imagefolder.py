"""Image folders (``train/<class>/*`` and ``val/<class>/*`` or ``test/<class>/*``) decoded with Pillow.

Small images (``decode_size`` set, e.g. 32 for a CIFAR-10 copy) are decoded once into a uint8 array that is cached on
disk as ``.npy`` files keyed by the folder's contents, and memory-mapped afterwards: later epochs, later runs and the
other worker processes never decode again. Large images (``decode_size: null``, e.g. ImageNet) are decoded per sample.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from .base import ArrayDataset, DataError, LoaderMixin, check_loader_settings, default_cache_dir, save_atomic
from .transforms import ARRAY_AUGMENTS, FILE_AUGMENTS, array_transforms, check_augment, file_transforms

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})
#: Bump when the cached array layout changes, so stale caches are ignored.
CACHE_VERSION = 1


def list_classes(split_dir: Path) -> list[str]:
    """Sorted names of the class sub-folders of ``split_dir``."""
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} does not exist; expected <root>/<split>/<class>/<image files>")
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {split_dir} has no class sub-folders; expected {split_dir}/<class>/<images>")
    return classes


def index_split(split_dir: Path, classes: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """Image files of ``split_dir`` in a fixed order, with labels indexed by ``classes`` (the training classes)."""
    lookup = {name: index for index, name in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for name in list_classes(split_dir):
        if name not in lookup:
            raise DataError(f"class folder {split_dir / name} does not exist in the training split {list(classes)}")
        members = sorted(
            path for path in (split_dir / name).rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        )
        files += members
        labels += [lookup[name]] * len(members)
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {split_dir}")
    return files, np.asarray(labels, dtype=np.int64)


def folder_signature(split_dir: Path, files: Sequence[Path], *extra: Any) -> str:
    """Hash of the file names, sizes and modification times (plus ``extra``): changes whenever the folder does."""
    digest = hashlib.sha1(repr((CACHE_VERSION, *extra)).encode(), usedforsecurity=False)
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(split_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def open_image(path: Path, mode: str) -> Any:
    """Decode ``path`` fully with Pillow into ``mode`` (``RGB`` or ``L``); a :class:`DataError` names a bad file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert(mode)  # convert() forces the full decode, so truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image file {path}: {err}") from err


def decode_fixed_size(path: Path, size: int, mode: str) -> np.ndarray:
    """Decode one image to a ``(size, size, C)`` uint8 array, scaling and centre-cropping if its size differs."""
    from PIL import Image, ImageOps

    img = open_image(path, mode)
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), Image.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


class FileDataset(Dataset):
    """Images decoded from their files on every access (for datasets too large to cache)."""

    def __init__(self, files: Sequence[Path], labels: np.ndarray, mode: str, transform: Any) -> None:
        self.files = list(files)
        self.labels = labels
        self.mode = mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_image(self.files[index], self.mode)), int(self.labels[index])


class ImageFolderDataModule(LoaderMixin, pl.LightningDataModule):
    """``root/train/<class>/*`` for training, ``root/val`` or ``root/test`` (``test_split``) for validation and test.

    With ``decode_size`` set, images are decoded (and, if needed, scaled and centre-cropped) to that square size once,
    cached under ``cache_dir`` and augmented like CIFAR-10 (``augment``: none, pad_crop, random_crop). With
    ``decode_size=None`` they are decoded per sample and ``augment`` is ``resized_crop`` (ImageNet style) or ``none``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        test_split: str = "auto",
        decode_size: int | None = 32,
        channels: int = 3,
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        augment: str = "random_crop",
        crop_size: int = 28,
        padding: int = 4,
        flip: bool = True,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        decode_threads: int | None = None,
    ) -> None:
        super().__init__()
        check_loader_settings(batch_size, eval_batch_size, num_workers)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if len(mean) != channels:
            raise ValueError(f"mean/std need {channels} values (one per channel), got mean={list(mean)}")
        if test_split not in ("auto", "val", "test"):
            raise ValueError(f"test_split must be one of auto, val, test; got {test_split!r}")
        if decode_size is not None and decode_size < 1:
            raise ValueError(f"decode_size must be a positive number of pixels or null, got {decode_size}")
        self.root = Path(root).expanduser().absolute()
        self.test_split = test_split
        self.decode_size = decode_size
        self.in_channels = channels
        self.mode = "RGB" if channels == 3 else "L"
        self.cache_dir = Path(cache_dir).expanduser().absolute() if cache_dir else default_cache_dir() / "imagefolder"
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.decode_threads = decode_threads or min(8, os.cpu_count() or 1)
        if decode_size is None:
            check_augment(augment, FILE_AUGMENTS)
            self.train_transform, self.test_transform = file_transforms(
                augment, crop_size=crop_size, flip=flip, mean=mean, std=std
            )
            self.image_size = crop_size
        else:
            check_augment(augment, ARRAY_AUGMENTS)
            self.train_transform, self.test_transform = array_transforms(
                augment, image_size=decode_size, crop_size=crop_size, padding=padding, flip=flip, mean=mean, std=std
            )
            self.image_size = crop_size if augment == "random_crop" else decode_size
        self._classes: list[str] | None = None
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def classes(self) -> list[str]:
        """Class names: the sub-folders of ``root/train``."""
        if self._classes is None:
            if not self.root.is_dir():
                raise DataError(f"image folder root {self.root} does not exist (set data.root to your dataset folder)")
            self._classes = list_classes(self.root / "train")
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split_dir(self, split: str) -> Path:
        """Folder of ``split`` ("train" or "test"); the test split is ``val/`` or ``test/`` per ``test_split``."""
        if split == "train":
            return self.root / "train"
        names = ("val", "test") if self.test_split == "auto" else (self.test_split,)
        for name in names:
            if (self.root / name).is_dir():
                return self.root / name
        raise DataError(f"no {' or '.join(n + '/' for n in names)} folder under {self.root} for validation and test")

    def cache_paths(self, split: str) -> tuple[Path, Path, list[Path], np.ndarray]:
        """``(images.npy, labels.npy, files, labels)`` for ``split``; the cache names hash the folder's contents."""
        split_dir = self.split_dir(split)
        files, labels = index_split(split_dir, self.classes)
        key = folder_signature(split_dir, files, self.decode_size, self.mode, tuple(self.classes))
        prefix = f"{self.root.name}-{split}-{key}"
        return self.cache_dir / f"{prefix}.images.npy", self.cache_dir / f"{prefix}.labels.npy", files, labels

    def build_cache(self, split: str) -> tuple[Path, Path]:
        """Decode ``split`` into the cache unless a cache for the folder's current contents exists."""
        images_path, labels_path, files, labels = self.cache_paths(split)
        if images_path.is_file() and labels_path.is_file():
            return images_path, labels_path
        assert self.decode_size is not None
        log.info("decoding %d images of %s (cached in %s)", len(files), self.split_dir(split), self.cache_dir)
        size, mode = self.decode_size, self.mode
        # Pillow releases the GIL while decoding, so threads give real parallelism here.
        with ThreadPoolExecutor(max_workers=self.decode_threads) as pool:
            images = np.stack(list(pool.map(lambda path: decode_fixed_size(path, size, mode), files)))
        save_atomic(images_path, images)
        save_atomic(labels_path, labels)  # written last: its presence marks a complete cache
        return images_path, labels_path

    def prepare_data(self) -> None:
        """Check the folders (and, for cached decoding, decode once) before any worker starts."""
        for split in ("train", "test"):
            if self.decode_size is None:
                index_split(self.split_dir(split), self.classes)
            else:
                self.build_cache(split)

    def _dataset(self, split: str, transform: Any) -> Dataset:
        if self.decode_size is None:
            files, labels = index_split(self.split_dir(split), self.classes)
            return FileDataset(files, labels, self.mode, transform)
        images_path, labels_path = self.build_cache(split)
        return ArrayDataset(np.load(images_path, mmap_mode="r"), np.load(labels_path), transform)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._dataset("train", self.train_transform)
            self.test_set = self._dataset("test", self.test_transform)
