"""`eval_MNIST.py --save-samples PATH`: every generated image of the first sample set, for other tools.

Two layouts, after the two usual conventions:
- a folder of PNGs, one per sample, named by its index zero-padded to 6 digits (000123.png; for a
  class-conditional model its label too, 000123_label7.png), as EDM's generate.py names its images.
  This is what pytorch-fid, clean-fid and torch-fidelity (`input1=folder`) read directly;
- PATH ending in .npz: guided-diffusion's image_sample.py format (Dhariwal & Nichol 2021,
  arXiv:2105.05233), `arr_0` uint8 [N, H, W, C] and, for a class-conditional model, `arr_1` the
  labels [N] (int64). C is the model's: 1 for grey MNIST (guided-diffusion's evaluator wants C = 3).

The pixels are the 8-bit ones every metric scored (image_metrics.to_uint8). Both are written whole or
not at all: the .npz through output_files.atomic_write; the PNGs into a hidden temp folder beside PATH,
flushed to disk (os.sync), which then takes PATH's place (a previous --save-samples folder, which is replaced
whole). `check_samples_path` runs before sampling: a folder holding anything but such PNGs is refused.

Example:
    path = check_samples_path("eval_outputs/samples", 10000, (1, 28, 28))
    save_samples(samples, labels, path)     # eval_outputs/samples/000000.png ... 009999.png
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm.evaluation.image_metrics import to_uint8
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import TEMP_SUFFIX, OutputError, atomic_write, sync_directory, writable_dir

NPZ_SUFFIX = ".npz"
INDEX_DIGITS = 6  # 000123.png, wider only past a million samples
SAVED_PNG = re.compile(r"\d{6,}(_label\d+)?\.png")  # the names this module writes in a folder
BYTES_PER_SAMPLE_VALUE = 4 + 1  # the float32 samples and their uint8 copy, both in memory at once


def is_npz(path: Path) -> bool:
    return path.suffix.lower() == NPZ_SUFFIX


def check_samples_path(path: str, count: int, image_shape: tuple[int, int, int]) -> Path:
    """The --save-samples path, checked before sampling: an .npz whose folder is writable and whose
    samples fit in memory, or a new, empty or earlier --save-samples folder in a writable folder."""
    target = Path(path)
    if is_npz(target):
        if target.is_dir():
            raise OutputError(f"--save-samples {target} is a folder; an .npz path must name a file")
        check_npz_fits(count, image_shape)
    elif target.exists() and not target.is_dir():
        raise OutputError(
            f"--save-samples {target} is a file; give a folder for the PNGs, or a path ending in .npz"
        )
    elif target.is_dir():
        others = sorted(entry.name for entry in target.iterdir() if not SAVED_PNG.fullmatch(entry.name))
        if others:
            raise OutputError(
                f"--save-samples folder {target} holds other files ({others[0]}, ...): give a new or empty "
                "folder (only an earlier --save-samples folder is replaced)"
            )
    writable_dir(target.parent)
    return target


def check_npz_fits(count: int, image_shape: tuple[int, int, int]) -> None:
    """A UserError unless `count` samples, as float32 and as the .npz's uint8, fit in this machine's RAM."""
    needed = count * math.prod(image_shape) * BYTES_PER_SAMPLE_VALUE
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        raise UserError(
            f"--save-samples .npz: {count} samples of {'x'.join(map(str, image_shape))} need "
            f"{needed / 2**30:.0f} GiB in memory, this machine has {memory / 2**30:.0f}: lower --num-samples"
        )


def save_samples(samples: torch.Tensor, labels: torch.Tensor | None, path: Path) -> None:
    """Samples [N, C, H, W] in [-1, 1] (and their labels [N] or None) as 8-bit images at path."""
    pixels = to_uint8(samples)
    if is_npz(path):
        write_npz(pixels, labels, path)
    else:
        write_png_folder(pixels, labels, path)


def write_npz(pixels: torch.Tensor, labels: torch.Tensor | None, path: Path) -> None:
    """guided-diffusion's layout: arr_0 uint8 [N, H, W, C], arr_1 the labels (conditional models)."""
    images = pixels.permute(0, 2, 3, 1).numpy()
    with atomic_write(path) as temp, open(temp, "wb") as handle:
        if labels is None:
            np.savez(handle, arr_0=images)
        else:
            np.savez(handle, arr_0=images, arr_1=labels.numpy())


def png_name(index: int, label: int | None, digits: int = INDEX_DIGITS) -> str:
    """000123.png, or 000123_label7.png for a sample drawn with label 7."""
    return f"{index:0{digits}d}" + ("" if label is None else f"_label{label}") + ".png"


def write_png_folder(pixels: torch.Tensor, labels: torch.Tensor | None, folder: Path) -> None:
    """One PNG per sample (grey or RGB) in a temp folder beside `folder`, which then replaces it."""
    digits = max(INDEX_DIGITS, len(str(len(pixels) - 1)))
    try:
        temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=TEMP_SUFFIX))
    except OSError as error:
        raise OutputError(f"cannot write {folder}: {error.strerror or error}") from None
    try:
        for index, image in enumerate(pixels.permute(0, 2, 3, 1).numpy()):
            label = None if labels is None else int(labels[index])
            write_png(image, temp / png_name(index, label, digits))
        replace_folder(temp, folder)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        raise OutputError(f"cannot write {folder}: {error.strerror or error}") from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def write_png(image: np.ndarray, path: Path) -> None:
    """One image [H, W, C] uint8 as a PNG (grey for C = 1)."""
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(path, format="PNG")


def replace_folder(new: Path, folder: Path) -> None:
    """Move the finished folder `new` to `folder`, removing what was there (an earlier output)."""
    os.chmod(new, 0o777 & ~current_umask())  # mkdtemp makes 0700; give the usual mode
    os.sync()  # every PNG on disk before the folder takes PATH's place (1,000 fsyncs took 5x longer)
    if folder.exists():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old.", suffix=TEMP_SUFFIX))
        os.replace(folder, old)
        os.replace(new, folder)
        shutil.rmtree(old)
    else:
        os.replace(new, folder)
    sync_directory(folder.parent)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
