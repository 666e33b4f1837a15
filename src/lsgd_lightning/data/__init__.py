"""Datamodules for the benchmarks: mnist5k (offline default), CIFAR-10 pickle batches, generic image folders."""

from .base import ArrayDataModule, ArrayDataset, DataError
from .cifar10 import CIFAR10DataModule
from .imagefolder import ImageFolderDataModule
from .mnist5k import MNIST5kDataModule

#: Names accepted by the app's ``data.name`` setting.
DATAMODULES = {
    "mnist5k": MNIST5kDataModule,
    "cifar10": CIFAR10DataModule,
    "imagefolder": ImageFolderDataModule,
}

__all__ = [
    "DATAMODULES",
    "ArrayDataModule",
    "ArrayDataset",
    "CIFAR10DataModule",
    "DataError",
    "ImageFolderDataModule",
    "MNIST5kDataModule",
]
