"""CIFAR-10 from the standard ``cifar-10-batches-py`` pickle batches, downloaded (md5-checked) when possible."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import ArrayDataModule, DataError, loader_settings

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a tar archive, refusing members that would land outside ``target``."""
    target = target.resolve()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not (target / member.name).resolve().is_relative_to(target) or member.issym() or member.islnk():
                raise DataError(f"refusing to extract {archive}: unsafe member {member.name!r}")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: also strip odd permissions
            tar.extractall(target, filter="data")
        else:
            tar.extractall(target)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 pickle batch as ``(N, 32, 32, 3)`` uint8 images and int64 labels; clear errors if corrupt."""
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:  # unpickling garbage can raise almost anything
        raise DataError(
            f"CIFAR-10 batch file {path} is corrupt or not a CIFAR-10 python batch ({type(err).__name__}: {err}); "
            f"delete the {path.parent} folder and run again to re-download, or replace it with a good copy"
        ) from err
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data) or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"CIFAR-10 batch file {path} has unexpected contents: data {data.shape}, {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class CIFAR10DataModule(ArrayDataModule):
    """CIFAR-10 (50,000 train / 10,000 test images of 32x32 pixels) read from ``data_dir/cifar-10-batches-py``.

    The default augmentation is the LSGD paper's: random 28x28 crops with flips for training, the centre 28x28 crop
    for testing. ``augment="pad_crop"`` gives the usual 32x32 pad-4 crops instead.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] = ".data",
        download: bool = True,
        url: str = CIFAR10_URL,
        md5: str = CIFAR10_MD5,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        augment: str = "random_crop",
        crop_size: int = 28,
        padding: int = 4,
        flip: bool = True,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2470, 0.2435, 0.2616),
    ) -> None:
        super().__init__(num_classes=10, in_channels=3, native_size=32, **loader_settings(locals()))
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.download = download
        self.url = url
        self.md5 = md5

    @property
    def batches_dir(self) -> Path:
        return self.data_dir / BATCHES_DIR

    @property
    def archive_path(self) -> Path:
        return self.data_dir / Path(self.url.split("?")[0]).name

    def _missing(self) -> list[str]:
        return [name for name in TRAIN_FILES + TEST_FILES if not (self.batches_dir / name).is_file()]

    def _instructions(self) -> str:
        return (
            f"fetch {CIFAR10_URL} (md5 {CIFAR10_MD5}), on another machine if need be, and extract it into "
            f"{self.data_dir} so that {self.batches_dir} holds {', '.join(TRAIN_FILES + TEST_FILES)}; "
            f"or point data.data_dir at a folder that already holds {BATCHES_DIR}/"
        )

    def prepare_data(self) -> None:
        """Make sure the six batch files exist: extract a present archive, else download it if allowed."""
        missing = self._missing()
        if not missing:
            return
        if not self.archive_path.is_file():
            if not self.download:
                raise DataError(
                    f"CIFAR-10 not found: {self.batches_dir} lacks {', '.join(missing)} and download is off "
                    f"(data.download=false). To fix it, {self._instructions()}."
                )
            self._download()
        self._check_md5()
        log.info("extracting %s into %s", self.archive_path, self.data_dir)
        try:
            safe_extract(self.archive_path, self.data_dir)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"cannot extract CIFAR-10 archive {self.archive_path}: {err}; delete it and retry") from err
        missing = self._missing()
        if missing:
            raise DataError(f"archive {self.archive_path} did not contain {BATCHES_DIR}/{', '.join(missing)}")

    def _download(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        partial = self.archive_path.with_name(self.archive_path.name + ".part")
        log.info("downloading %s to %s", self.url, self.archive_path)
        try:
            with urllib.request.urlopen(self.url, timeout=60) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:  # URLError, timeouts, refused connections
            partial.unlink(missing_ok=True)
            raise DataError(
                f"CIFAR-10 is not in {self.batches_dir} and downloading {self.url} failed ({err}). "
                f"To fix it, {self._instructions()}."
            ) from err
        partial.replace(self.archive_path)

    def _check_md5(self) -> None:
        actual = file_md5(self.archive_path)
        if actual != self.md5:
            raise DataError(
                f"CIFAR-10 archive {self.archive_path} has md5 {actual}, expected {self.md5}: it is corrupt or "
                f"incomplete. Delete it and run again, or {self._instructions()}."
            )

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        missing = self._missing()
        if missing:
            raise DataError(
                f"CIFAR-10 files missing in {self.batches_dir}: {', '.join(missing)}; {self._instructions()}"
            )
        train = [read_batch(self.batches_dir / name) for name in TRAIN_FILES]
        test = [read_batch(self.batches_dir / name) for name in TEST_FILES]
        return (
            np.concatenate([x for x, _ in train]),
            np.concatenate([y for _, y in train]),
            np.concatenate([x for x, _ in test]),
            np.concatenate([y for _, y in test]),
        )
