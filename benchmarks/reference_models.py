"""The competitors of the benchmarks: diffusers' UNet2DModel and denoising-diffusion-pytorch's Unet.

Both are benchmark-only dependencies (benchmarks/requirements.txt). Each model is wrapped so that
`denoiser(x_t, t) -> prediction` has the signature of this repo's UNet (x_t: [B, C, H, W], t: [B]
long), and sized to a parameter budget so that throughput is compared at equal size. For CIFAR-10
(3 x 32 x 32), DIFFUSERS_CIFAR10 is the layout of diffusers' `google/ddpm-cifar10-32`, its conversion
of Ho et al. 2020's (arXiv:2006.11239) CIFAR-10 model: 35,746,307 parameters.

Example:
    unet = diffusers_unet(DIFFUSERS_TUNED)          # the tuned set-up of issue 7: 1,062,497 parameters
    cifar = diffusers_unet(diffusers_cifar10_setup(128), (3, 32, 32))   # Ho et al.'s CIFAR-10 U-Net
    lucid = lucidrains_unet_matching(1_000_000)     # the Unet whose size is closest to 1M
"""

from __future__ import annotations

import torch
from torch import nn

from model import count_parameters

IMAGE_SIZE = 28
LUCIDRAINS_DIM_MULTS = (1, 2, 2)  # 28 -> 14 -> 7, like the other two U-Nets
LUCIDRAINS_DIM_STEP = 4  # candidate widths are multiples of this
LUCIDRAINS_MAX_DIM = 128

# The "typical" and "tuned" diffusers set-ups of issue 7 (block widths, layers per block, attention).
DIFFUSERS_TYPICAL = {
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "attention": (False, True, False),
}
DIFFUSERS_TUNED = {
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "attention": (False, False, False),
}
CIFAR10_WIDTHS = (1, 2, 2, 2)  # of the first width; attention at the second level (16 x 16)
CIFAR10_ATTENTION = (False, True, False, False)
# google/ddpm-cifar10-32's settings that differ from UNet2DModel's defaults (as converted from Ho et al.)
CIFAR10_OPTIONS = {"downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6}


def diffusers_cifar10_setup(channels: int, layers_per_block: int = 2) -> dict:
    """google/ddpm-cifar10-32's layout with first width `channels` (128 there) and layers per block."""
    return {
        "block_out_channels": tuple(channels * mult for mult in CIFAR10_WIDTHS),
        "layers_per_block": layers_per_block,
        "attention": CIFAR10_ATTENTION,
        "options": CIFAR10_OPTIONS,
    }


class Denoiser(nn.Module):
    """Gives a reference U-Net this repo's call signature: (x_t [B, C, H, W], t [B]) -> [B, C, H, W]."""

    def __init__(self, network: nn.Module, returns_tuple: bool):
        super().__init__()
        self.network, self.returns_tuple = network, returns_tuple

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.returns_tuple:
            return self.network(x, t, return_dict=False)[0]
        return self.network(x, t)


def diffusers_unet(setup: dict, image_shape: tuple[int, int, int] = (1, IMAGE_SIZE, IMAGE_SIZE)) -> Denoiser:
    """diffusers UNet2DModel for images of image_shape (C, H, W); attention[i] puts self-attention at
    level i, setup["options"] (if any) are further UNet2DModel arguments.

    The middle block keeps diffusers' default self-attention (add_attention=True), as in issue 7.
    """
    from diffusers import UNet2DModel

    attention = setup["attention"]
    channels, height, _ = image_shape
    network = UNet2DModel(
        sample_size=height,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=setup["block_out_channels"],
        layers_per_block=setup["layers_per_block"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        **setup.get("options", {}),
    )
    return Denoiser(network, returns_tuple=True)


def lucidrains_unet(dim: int) -> Denoiser:
    """denoising-diffusion-pytorch Unet(dim, dim_mults=(1, 2, 2), channels=1) with its defaults."""
    from denoising_diffusion_pytorch import Unet

    return Denoiser(Unet(dim, dim_mults=LUCIDRAINS_DIM_MULTS, channels=1), returns_tuple=False)


def lucidrains_unet_matching(num_parameters: int) -> Denoiser:
    """The lucidrains Unet whose width (a multiple of 4) gives the parameter count closest to the target."""
    best = lucidrains_unet(LUCIDRAINS_DIM_STEP)
    for dim in range(2 * LUCIDRAINS_DIM_STEP, LUCIDRAINS_MAX_DIM + 1, LUCIDRAINS_DIM_STEP):
        candidate = lucidrains_unet(dim)  # the count grows with dim: stop past the target
        if abs(count_parameters(candidate) - num_parameters) > abs(count_parameters(best) - num_parameters):
            break
        best = candidate
    return best
