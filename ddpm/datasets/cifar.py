"""CIFAR-10's python archive (Krizhevsky 2009): its extracted batch files, read safely, and the download.

The archive (cifar-10-python.tar.gz) extracts to cifar-10-batches-py/: data_batch_1..5 (the 50,000
training images) and test_batch (10,000), each a pickle of {"data": uint8 [N, 3072], "labels": [N]}.
The unpickler builds numpy arrays and nothing else, so a batch file cannot run code.

Example:
    pixels, labels = load_cifar_dir(download_cifar10(Path("data")), "test")  # uint8 [10000, 3, 32, 32]
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch

from ddpm.datasets.checks import DataUnavailableError, check_labels

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR_SHAPE = (3, 32, 32)  # each row of a batch's "data" is 1,024 red, then green, then blue values
# What a CIFAR-10 batch may ask the unpickler for (numpy arrays); anything else is refused
CIFAR_PICKLE_GLOBALS = {("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}


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
    return cifar_folder(root) or root / CIFAR_DIR
