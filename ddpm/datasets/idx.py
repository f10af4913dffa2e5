"""IDX files, MNIST's format: read and write them, find a split's pair in a folder, load it as tensors.

An IDX file is a header (0 0, a type byte, the number of dimensions, each dimension as a big-endian
uint32) and the values; MNIST ships four, gzipped: train-images-idx3-ubyte, train-labels-idx1-ubyte
and the same with t10k- for the test split. Any image size is read. Broken files (truncated or foreign
IDX, a ".gz" that is not gzip, counts that disagree, splits of different sizes, only the test split)
are one-line DataUnavailableErrors naming the file.

Example:
    write_idx("out/train-images-idx3-ubyte.gz", pixels)          # uint8 [N, H, W]
    images, labels = load_idx_dir("out", "train")                # uint8 [N, 1, H, W], int64 [N]
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from ddpm.datasets.checks import DataUnavailableError, check_labels

IDX_PREFIX = {"train": "train", "test": "t10k"}
IDX_STEMS = ("images-idx3-ubyte", "labels-idx1-ubyte")
IDX_DTYPES = {
    code: np.dtype(kind)
    for code, kind in ((0x08, "u1"), (0x09, "i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8"))
}
GZIP_MAGIC = b"\x1f\x8b"


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
    return IDX_DTYPES[raw[2]], shape, offset


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
    images, labels = (find_idx(directory, split, stem) for stem in IDX_STEMS)
    if images is not None and labels is not None:
        return images, labels
    stem = IDX_STEMS[0] if images is None else IDX_STEMS[1]
    other = "test" if split == "train" else "train"
    only = any(find_idx(directory, other, s) for s in IDX_STEMS)
    raise DataUnavailableError(
        f"{directory} has no {IDX_PREFIX[split]}-{stem}[.gz]"
        + (f": it holds only the {other} split" if only else " (expected MNIST-format IDX files)")
    )


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
