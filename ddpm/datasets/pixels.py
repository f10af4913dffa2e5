"""Converting uint8 pixels [N, C, H, W]: to another size (centre-crop, then resize) and channel count.

A picture is centre-cropped to the target's aspect and resized with PIL's bicubic filter (antialiased
when it shrinks); grey is replicated to RGB, and RGB turned grey by the ITU-R 601-2 luma weights.

Example:
    pixels = resize_pixels(to_channels(pixels, 1), (16, 16))   # uint8 [N, 3, 32, 32] -> [N, 1, 16, 16]
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

LUMA_PER_MILLE = (299, 587, 114)  # ITU-R 601-2 luma: grey = 0.299 R + 0.587 G + 0.114 B


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
