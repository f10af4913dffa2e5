"""The competitors of the benchmarks: diffusers' UNet2DModel and denoising-diffusion-pytorch's Unet.

Both are benchmark-only dependencies (benchmarks/requirements.txt). Each model is wrapped so that
`denoiser(x_t, t) -> prediction` has the signature of this repo's UNet (x_t: [B, 1, 28, 28],
t: [B] long), and sized to a parameter budget so that throughput is compared at equal size.

Example:
    unet = diffusers_unet(DIFFUSERS_TUNED)          # the tuned set-up of issue 7: 1,062,497 parameters
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


class Denoiser(nn.Module):
    """Gives a reference U-Net this repo's call signature: (x_t [B, C, H, W], t [B]) -> [B, C, H, W]."""

    def __init__(self, network: nn.Module, returns_tuple: bool):
        super().__init__()
        self.network, self.returns_tuple = network, returns_tuple

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.returns_tuple:
            return self.network(x, t, return_dict=False)[0]
        return self.network(x, t)


def diffusers_unet(setup: dict) -> Denoiser:
    """diffusers UNet2DModel for 1-channel 28x28 images; attention[i] puts self-attention at level i.

    The middle block keeps diffusers' default self-attention (add_attention=True), as in issue 7.
    """
    from diffusers import UNet2DModel

    attention = setup["attention"]
    network = UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=setup["block_out_channels"],
        layers_per_block=setup["layers_per_block"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
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
