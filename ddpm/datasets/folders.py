"""Folders of image files: PNG/JPEG in torchvision's ImageFolder layout, and CelebA's aligned faces.

An image folder has one sub-folder per class (labels 0, 1, ... in name order; a flat folder is one
class), optionally under train/ and test/ (without test/, the training images serve as the test split
too). By default its images keep the first image's size, and are grey if every file is. CelebA (Liu
et al. 2015, arXiv:1411.7766) is img_align_celeba/*.jpg with list_eval_partition.txt (0 train,
1 valid, 2 test), centre-cropped and resized to 64 x 64 colour by default, every label 0.

Example:
    pixels, labels = load_image_folder(Path("pngs"), "train", size=(32, 32), channels=3)
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm.datasets.checks import (
    FLOAT32_BYTES,
    NUM_CLASSES,
    DataUnavailableError,
    check_fits_in_memory,
    check_side,
)
from ddpm.datasets.cifar import CIFAR_DIR
from ddpm.datasets.pixels import fit_picture, to_channels
from ddpm.plumbing.messages import note

CELEBA_DIR, CELEBA_IMAGES, CELEBA_PARTITION = "celeba", "img_align_celeba", "list_eval_partition.txt"
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CELEBA_PARTITIONS = {"train": "0", "test": "2"}  # list_eval_partition.txt: 0 train, 1 valid, 2 test
CELEBA_DEFAULT_SIZE = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
READ_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes with the GIL released


def read_picture(path: Path, size: tuple[int, int] | None) -> tuple[np.ndarray, str]:
    """One image file as RGB pixels [H, W, 3] fitted to size (None: its own), and its own PIL mode."""
    try:
        with Image.open(path) as picture:
            rgb = picture.convert("RGB")
            return np.asarray(fit_picture(rgb, size) if size else rgb), picture.mode
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataUnavailableError(f"{path} is not a readable image ({type(error).__name__})") from None


def read_pictures(paths: list[Path], size: tuple[int, int] | None, channels: int | None) -> torch.Tensor:
    """Image files as pixels [N, C, H, W]: size (height, width) by default the first image's; C by
    default 1 if every file is grey, else 3."""
    first = read_picture(paths[0], size)
    size = first[0].shape[:2]
    check_side(size, paths[0])
    check_fits_in_memory(len(paths) * size[0] * size[1] * 3 * FLOAT32_BYTES, f"{len(paths)} images of {size}")
    with ThreadPoolExecutor(READ_THREADS) as pool:
        read = [first, *pool.map(lambda path: read_picture(path, size), paths[1:])]
    pixels = torch.from_numpy(np.stack([array for array, _ in read])).permute(0, 3, 1, 2).contiguous()
    if channels is None:
        channels = 1 if all(mode in GREY_MODES for _, mode in read) else 3
    return to_channels(pixels, channels)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def class_files(folder: Path) -> tuple[list[Path], list[int]]:
    """ImageFolder's layout: the images of each sub-folder (sorted by name) are one class; a folder
    of images without sub-folders is one class (label 0)."""
    loose = sorted(path for path in folder.iterdir() if is_image_file(path))
    classes = sorted(
        path
        for path in folder.iterdir()
        if path.is_dir() and not path.name.startswith(".") and any(map(is_image_file, path.rglob("*")))
    )
    if loose and classes:
        raise DataUnavailableError(
            f"{folder} has both images and class folders ({classes[0].name}/, ...): move {loose[0].name} "
            "and the other loose images into a class folder"
        )
    if len(classes) > NUM_CLASSES:
        raise DataUnavailableError(
            f"{folder} has {len(classes)} class folders: this code handles {NUM_CLASSES}"
        )
    if not classes:
        return loose, [0] * len(loose)
    files = [
        (path, label)
        for label, c in enumerate(classes)
        for path in sorted(c.rglob("*"))
        if is_image_file(path)
    ]
    return [path for path, _ in files], [label for _, label in files]


def image_split_folder(directory: Path, split: str) -> Path:
    """Where a split's images are: directory/train and directory/test if it has them (test falls back
    to train, with a note), else directory itself for both."""
    train, test = directory / "train", directory / "test"
    if not (train.is_dir() or test.is_dir()):
        if split == "test":
            note(f"{directory} has no train/ and test/ folders: its images serve as the test split too")
        return directory
    if not train.is_dir():
        raise DataUnavailableError(
            f"{directory} holds only the test split: it has test/ but no train/ folder"
        )
    if split == "test" and not test.is_dir():
        note(f"{directory} has no test/ folder: the images of {train} serve as the test split")
        return train
    return directory / split


def load_image_folder(
    directory: Path, split: str, size: tuple[int, int] | None, channels: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels [N, C, H, W] and labels of a split of a folder of PNG/JPEG images (ImageFolder layout)."""
    folder = image_split_folder(directory, split)
    paths, labels = class_files(folder)
    if not paths:
        raise DataUnavailableError(
            f"{folder} holds no data: expected MNIST-format IDX files (train-images-idx3-ubyte[.gz], ...), "
            f"CIFAR-10's {CIFAR_DIR}/, CelebA's {CELEBA_IMAGES}/ or PNG/JPEG images (a sub-folder per class)"
        )
    return read_pictures(paths, size, channels), torch.tensor(labels, dtype=torch.int64)


def celeba_folder(directory: Path) -> Path | None:
    """The CelebA folder (the one holding img_align_celeba/): directory or its celeba/, else None."""
    for candidate in (directory, directory / CELEBA_DIR):
        if (candidate / CELEBA_IMAGES).is_dir():
            return candidate
    return None


def celeba_split_files(folder: Path, split: str) -> list[Path]:
    """The image files of a split, from list_eval_partition.txt ("000001.jpg 0" per line)."""
    partition = folder / CELEBA_PARTITION
    if not partition.is_file():
        raise DataUnavailableError(
            f"{partition} is missing: CelebA's split file (from {CELEBA_URL}); or pass "
            f"--data-dir {folder / CELEBA_IMAGES} to use its images as one folder"
        )
    names = []
    for number, line in enumerate(partition.read_text().splitlines(), start=1):
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataUnavailableError(f"{partition}, line {number}: expected 'NAME.jpg 0|1|2', got {line!r}")
        names += [fields[0]] if fields[1] == CELEBA_PARTITIONS[split] else []
    paths = [folder / CELEBA_IMAGES / name for name in names]
    missing = [path for path in paths if not path.is_file()]
    if not paths or missing:
        what = (
            f"{missing[0]} (and {len(missing) - 1} more) missing" if missing else f"no {split} images listed"
        )
        raise DataUnavailableError(f"{partition}: {what}")
    return paths


def load_celeba_dir(
    folder: Path, split: str, size: tuple[int, int] | None, channels: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CelebA's aligned faces of a split, centre-cropped and resized (default 64 x 64), colour by
    default; every label is 0 (one class)."""
    paths = celeba_split_files(folder, split)
    images = read_pictures(paths, size or (CELEBA_DEFAULT_SIZE, CELEBA_DEFAULT_SIZE), channels or 3)
    return images, torch.zeros(len(paths), dtype=torch.int64)


def download_celeba(root: Path) -> Path:
    """root/celeba, downloaded by torchvision when img_align_celeba/ is not there yet."""
    if celeba_folder(root / CELEBA_DIR) is None:
        from torchvision import datasets

        try:
            datasets.CelebA(str(root), split="all", download=True)
        except (OSError, RuntimeError, ImportError, ValueError) as error:
            raise DataUnavailableError(
                f"could not download CelebA into {root / CELEBA_DIR}/ (its Google Drive host often refuses): "
                f"get img_align_celeba.zip and {CELEBA_PARTITION} from {CELEBA_URL}, unzip them into "
                f"DIR and pass --data-dir DIR"
            ) from error
    return root / CELEBA_DIR
