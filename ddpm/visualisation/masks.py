"""Inpainting masks: the region to keep and the region to generate, and scores within each.

A mask is a float tensor [1, 1, H, W] that broadcasts over a batch and its channels, 1 where the image
is known (kept) and 0 where RePaint generates it (the hole): the convention of diffusion.repaint and of
RePaint's `gt_keep_mask` files (Lugmayr et al. 2022, arXiv:2201.09865). `--inpaint` names the hole:
left, right, top, bottom (that half of the image), centre (the middle square of half the side) or
random (each pixel with probability 1/2, seeded); or it is a PNG of the image's size read as grey,
white (>= 128) kept and black generated. A mask that keeps everything or nothing is refused.

MSE and SSIM within a region are on the [0, 1] scale: MSE over the region's pixels, SSIM the mean of
skimage's SSIM map (7 x 7 windows, data_range=1; Wang et al. 2004) over them; a window at the border
of a region also sees the other one, so the SSIM of an exact region can be below 1, its MSE cannot.

Example:
    mask = make_mask("right", (28, 28), seed=0)      # keep the left half, inpaint the right one
    hole_mse = region_mse(inpainted, originals, 1 - mask)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from skimage.metrics import structural_similarity

from ddpm.evaluation.image_metrics import to_unit_range
from ddpm.plumbing.messages import UserError

NAMED_MASKS = ("left", "right", "top", "bottom", "centre", "random")
RANDOM_HOLE_FRACTION = 0.5  # the share of pixels the random mask generates
PNG_KEEP_THRESHOLD = 128  # grey levels at or above it are kept


def named_hole(name: str, size: tuple[int, int], seed: int) -> torch.Tensor:
    """The hole [H, W] (True: generate) of a named mask for images of size (H, W)."""
    height, width = size
    hole = torch.zeros(height, width, dtype=torch.bool)
    if name == "left":
        hole[:, : width // 2] = True
    elif name == "right":
        hole[:, width // 2 :] = True
    elif name == "top":
        hole[: height // 2] = True
    elif name == "bottom":
        hole[height // 2 :] = True
    elif name == "centre":
        hole[height // 4 : height // 4 + height // 2, width // 4 : width // 4 + width // 2] = True
    else:
        generator = torch.Generator().manual_seed(seed)
        hole = torch.rand(height, width, generator=generator) < RANDOM_HOLE_FRACTION
    return hole


def png_keep(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """The kept region [H, W] (True: keep) of a PNG mask, which must be H x W pixels; white is kept."""
    try:
        with Image.open(path) as picture:
            grey = np.asarray(picture.convert("L"))
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"--inpaint {path}: cannot read it as an image ({error})") from None
    if grey.shape != size:
        raise UserError(
            f"--inpaint {path}: the mask is {grey.shape[1]}x{grey.shape[0]} pixels, the images "
            f"{size[1]}x{size[0]}"
        )
    return torch.from_numpy(grey >= PNG_KEEP_THRESHOLD)


def make_mask(spec: str, size: tuple[int, int], seed: int) -> torch.Tensor:
    """The mask [1, 1, H, W] (1: keep, 0: inpaint) of --inpaint `spec`: a name of NAMED_MASKS or a PNG
    path; a UserError if it is neither, or keeps every pixel or none."""
    if spec in NAMED_MASKS:
        keep = ~named_hole(spec, size, seed)
    elif Path(spec).is_file():
        keep = png_keep(Path(spec), size)
    else:
        raise UserError(f"--inpaint must be one of {', '.join(NAMED_MASKS)} or a PNG file, got {spec!r}")
    if keep.all() or not keep.any():
        what = "nothing to inpaint" if keep.all() else "no pixel kept"
        raise UserError(f"--inpaint {spec}: the mask is {'full' if keep.all() else 'empty'} ({what})")
    return keep.float()[None, None]


def region_mse(images: torch.Tensor, references: torch.Tensor, region: torch.Tensor) -> np.ndarray:
    """MSE per image [B] on the [0, 1] scale over the pixels where region [1, 1, H, W] is 1."""
    squared = (to_unit_range(images) - to_unit_range(references)).pow(2).cpu()
    weight = region.cpu().expand_as(squared)
    return ((squared * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)).double().numpy()


def region_ssim(images: torch.Tensor, references: torch.Tensor, region: torch.Tensor) -> np.ndarray:
    """SSIM per image [B]: skimage's SSIM map (data_range=1, channels averaged) averaged over the
    pixels where region [1, 1, H, W] is 1."""
    first = to_unit_range(images).cpu().double().numpy()
    second = to_unit_range(references).cpu().double().numpy()
    inside = region[0, 0].cpu().numpy() > 0
    scores = []
    for a, b in zip(first, second, strict=True):
        ssim_map = structural_similarity(a, b, data_range=1.0, channel_axis=0, full=True)[1]
        scores.append(ssim_map.mean(axis=0)[inside].mean())
    return np.array(scores)


def masked_input(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the inpainting is given, for pictures: the kept pixels, mid-grey (0 in [-1, 1]) in the hole."""
    return images * mask.to(images)
