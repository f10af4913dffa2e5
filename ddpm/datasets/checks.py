"""What every data source checks, so that broken data is one line before any training starts.

A `DataUnavailableError` (a UserError: one line on stderr, exit status 2) names the file and what is
wrong with it: labels outside 0..NUM_CLASSES-1, image sides outside [MIN_IMAGE_SIDE, MAX_IMAGE_SIDE],
or a data set larger than this machine's memory.

Example:
    check_side((20, 20), "train-images-idx3-ubyte")   # fine; (5, 5) raises DataUnavailableError
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ddpm.plumbing.messages import UserError

NUM_CLASSES = 10  # the most classes a data set may have (the class embedding's and classifier's size)
MIN_IMAGE_SIDE = 8  # SSIM's 7 x 7 window and the classifier's two 2 x 2 poolings need this much
MAX_IMAGE_SIDE = 512  # twice the largest of Ho et al. (256); whole data sets in memory must fit
FLOAT32_BYTES = 4  # the images as the model sees them (load_images)


class DataUnavailableError(UserError):
    """No copy of the requested data set could be found or downloaded, or its files are broken."""


def check_labels(labels: np.ndarray, source: Path) -> None:
    """Labels must lie in 0..NUM_CLASSES-1; else one line naming the file."""
    if len(labels) and not (labels.min() >= 0 and labels.max() < NUM_CLASSES):
        raise DataUnavailableError(
            f"{source} has labels in [{labels.min()}, {labels.max()}]: expected 0..{NUM_CLASSES - 1}"
        )


def check_side(size: tuple[int, ...], source: str | Path) -> None:
    """Images of size (height, width) must have sides in [MIN_IMAGE_SIDE, MAX_IMAGE_SIDE]."""
    if not MIN_IMAGE_SIDE <= min(size) <= max(size) <= MAX_IMAGE_SIDE:
        raise DataUnavailableError(
            f"{source}: images of {'x'.join(map(str, size))} pixels; this code takes sides from "
            f"{MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} (pass --image-size)"
        )


def check_fits_in_memory(needed_bytes: int, what: str) -> None:
    """A one-line error, not an allocation failure or the OOM killer, for data larger than the RAM."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed_bytes > memory:
        raise DataUnavailableError(
            f"{what} need {needed_bytes / 2**30:.0f} GiB as float32, this machine has {memory / 2**30:.0f}: "
            "pass a smaller --image-size"
        )
