"""Shared pieces of the datamodules: in-memory image arrays, loaders and the clear-error type."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .transforms import array_transforms


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lsgd_lightning`` (``~/.cache/lsgd_lightning`` when unset): decoded-array caches live here."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lsgd_lightning"


def save_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name, then rename: concurrent writers (one per rank or node) never expose a partial
    file, and the last complete one wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


class DataError(RuntimeError):
    """A dataset is missing, corrupt or unreadable; the message names the file or folder and what to do."""


class ArrayDataset(Dataset):
    """Images in an ``(N, H, W, C)`` uint8 array (possibly memory-mapped) with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[torch.Tensor], Any]) -> None:
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"expected (N, H, W, C) uint8 images and N labels, got {images.shape} {images.dtype}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        # np.array copies one image out of a memory map, so workers never write into the shared cache.
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)
        return self.transform(image), int(self.labels[index])


LOADER_SETTINGS = ("batch_size", "eval_batch_size", "num_workers")
AUGMENT_SETTINGS = ("augment", "crop_size", "padding", "flip", "mean", "std")


def loader_settings(arguments: dict[str, Any]) -> dict[str, Any]:
    """The loader and augmentation settings among a datamodule constructor's arguments (its ``locals()``), to hand
    on to :class:`ArrayDataModule` unchanged."""
    return {name: arguments[name] for name in LOADER_SETTINGS + AUGMENT_SETTINGS}


def check_loader_settings(batch_size: int, eval_batch_size: int, num_workers: int) -> None:
    """Raise ``ValueError`` naming the offending loader setting."""
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if int(num_workers) != num_workers or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers}")


class LoaderMixin:
    """Train/val/test DataLoaders over ``self.train_set`` and ``self.test_set``.

    Validation runs on the test split: the papers' curves are test error against time, and the test sets here are
    the held-out splits. Lightning adds a ``DistributedSampler`` to every loader in multi-process runs.
    """

    train_set: Dataset | None
    test_set: Dataset | None
    batch_size: int
    eval_batch_size: int
    num_workers: int

    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a DataLoader")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)


class ArrayDataModule(LoaderMixin, pl.LightningDataModule):
    """Base for datasets of equal-sized images loaded into arrays; subclasses implement :meth:`load_arrays`."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        native_size: int,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        augment: str,
        crop_size: int,
        padding: int,
        flip: bool,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        check_loader_settings(batch_size, eval_batch_size, num_workers)
        if len(mean) != in_channels:
            raise ValueError(f"mean/std need {in_channels} values (one per channel), got mean={list(mean)}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.native_size = native_size
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.augment = augment
        self.train_transform, self.test_transform = array_transforms(
            augment, image_size=native_size, crop_size=crop_size, padding=padding, flip=flip, mean=mean, std=std
        )
        self.image_size = crop_size if augment == "random_crop" else native_size
        self.train_set: ArrayDataset | None = None
        self.test_set: ArrayDataset | None = None

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(train_images, train_labels, test_images, test_labels)``; images ``(N, H, W, C)`` uint8."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_x, train_y, test_x, test_y = self.load_arrays()
        self.train_set = ArrayDataset(train_x, train_y, self.train_transform)
        self.test_set = ArrayDataset(test_x, test_y, self.test_transform)
