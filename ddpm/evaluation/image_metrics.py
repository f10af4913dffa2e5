"""Per-image reconstruction metrics (MSE, PSNR, SSIM) on the [0, 1] scale, shared by eval and vizu.

Images come in the model's range [-1, 1] and are compared on the [0, 1] scale, so MSE is in
[0, 1], PSNR in dB with peak 1, and SSIM is skimage's `structural_similarity` with data_range=1
(Wang et al. 2004), over the channels of a colour image (`channel_axis`) and averaged.

Example:
    scores = reconstruction_metrics(denoised, originals)   # {"mse": [B], "psnr": [B], "ssim": [B]}
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

MIN_MSE = 1e-12  # PSNR of identical images is capped at 120 dB rather than infinite


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> uint8 in 0..255 on the CPU, the inverse of data_sources.to_model_range."""
    return (to_unit_range(images) * 255).round().to(torch.uint8).cpu()


def mse(images: torch.Tensor, references: torch.Tensor) -> np.ndarray:
    """Mean squared error per image on the [0, 1] scale: [B, C, H, W] x2 -> [B]."""
    difference = to_unit_range(images) - to_unit_range(references)
    return difference.pow(2).flatten(1).mean(1).cpu().double().numpy()


def psnr(images: torch.Tensor, references: torch.Tensor) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image, peak 1 on the [0, 1] scale: 10 log10(1 / MSE)."""
    return 10 * np.log10(1.0 / np.maximum(mse(images, references), MIN_MSE))


def ssim(images: torch.Tensor, references: torch.Tensor) -> np.ndarray:
    """SSIM per image via skimage, on [0, 1] images with data_range=1, channels averaged: [B]."""
    first = to_unit_range(images).cpu().double().numpy()
    second = to_unit_range(references).cpu().double().numpy()
    return np.array(
        [
            structural_similarity(a, b, data_range=1.0, channel_axis=0)
            for a, b in zip(first, second, strict=True)
        ]
    )


def reconstruction_metrics(images: torch.Tensor, references: torch.Tensor) -> dict[str, np.ndarray]:
    """MSE, PSNR and SSIM of each image against its reference: each an array [B]."""
    return {
        "mse": mse(images, references),
        "psnr": psnr(images, references),
        "ssim": ssim(images, references),
    }
