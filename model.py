"""The U-Net that predicts the noise (or v) of an image (C x H x W: 1 x 28 x 28 for MNIST) at timestep t.

The architecture of Ho et al. 2020 (arXiv:2006.11239, appendix B) as refined by Nichol & Dhariwal
2021 (arXiv:2102.09672): residual blocks with GroupNorm and a timestep embedding, self-attention at
chosen resolutions, and an optional class embedding with a "null" label for classifier-free guidance
(Ho & Salimans 2022, arXiv:2207.12598). Any image size works: each downsampling halves a side
rounding up (20 -> 10 -> 5 -> 3) and each upsampling returns to its skip connection's size.

Example:
    model = UNet(model_channels=64, channel_mult=(1, 2, 2))
    eps_hat = model(x_t, t)          # x_t: [B, 1, 28, 28], t: [B] long -> [B, 1, 28, 28]
    # out_channels=2 for a learned variance (Nichol & Dhariwal eq. 15): [B, 1, 28, 28] -> [B, 2, 28, 28]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

MAX_NORM_GROUPS = 32
ATTENTION_HEAD_CHANNELS = 32


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, section 3.5): [B] -> [B, dim]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(embedding, (0, dim % 2))


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups, as many as divide the channel count."""
    return nn.GroupNorm(math.gcd(MAX_NORM_GROUPS, channels), channels)


class ChannelsLastGradient(torch.autograd.Function):
    """Identity whose backward hands the gradient on in channels_last (NHWC) layout.

    Under torch.compile the gradient reaching a convolution's backward can be NCHW (Inductor traces
    GroupNorm's backward with NCHW strides) or a channel slice (torch.cat's backward); cuDNN then
    copies it to NHWC inside convolution_backward, where Inductor cannot fuse the copy away. Asking
    for NHWC here lets Inductor write the gradient in NHWC in the kernel that computes it (docs/benchmarks.md,
    "On one GPU": about half the copies gone, 20,057 training img/s on an H200 instead of 18,207).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose NHWC output passes its gradient back in NHWC (see ChannelsLastGradient).

    The same parameters and state_dict keys as nn.Conv2d; for NCHW tensors it is nn.Conv2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = super().forward(x)
        if torch.is_grad_enabled() and output.is_contiguous(memory_format=torch.channels_last):
            return ChannelsLastGradient.apply(output)
        return output


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias, so its block starts as the identity (Nichol & Dhariwal)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResidualBlock(nn.Module):
    """GroupNorm, SiLU, conv; the timestep (and label) embedding; GroupNorm, SiLU, dropout, conv; a skip.

    With scale_shift_norm (the default) the embedding gives a per-channel scale and shift applied after
    the second GroupNorm, norm(h) * (1 + scale) + shift: AdaGN (Dhariwal & Nichol 2021,
    arXiv:2105.05233, section 3; improved-diffusion's use_scale_shift_norm). Without it the embedding is
    added before that norm, as in Ho et al.; a GroupNorm of one channel per group (widths up to 32)
    then subtracts the whole embedding again, so such levels see neither t nor the label. Checkpoints
    written before scale_shift_norm existed are built without it (checkpointing.build_model).
    """

    def __init__(
        self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float, scale_shift_norm: bool
    ):
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.in_layers = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), Conv2d(in_channels, out_channels, 3, padding=1)
        )
        projected = 2 * out_channels if scale_shift_norm else out_channels
        self.embedding_projection = nn.Sequential(nn.SiLU(), nn.Linear(embedding_dim, projected))
        self.out_layers = nn.Sequential(
            group_norm(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_init(Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = nn.Identity() if in_channels == out_channels else Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        projected = self.embedding_projection(embedding)[:, :, None, None]
        if self.scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = projected.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + projected)
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        divisible = channels % ATTENTION_HEAD_CHANNELS == 0
        self.num_heads = channels // ATTENTION_HEAD_CHANNELS if divisible else 1
        self.norm = group_norm(channels)
        self.qkv = Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.num_heads, channels // self.num_heads, -1)
        query, key, value = qkv.transpose(-1, -2).unbind(dim=1)  # each [B, heads, HW, head_dim]
        attended = F.scaled_dot_product_attention(query, key, value)
        return x + self.proj(attended.transpose(-1, -2).reshape(batch, channels, height, width))


class Downsample(nn.Module):
    """Stride-2 convolution, a side n -> ceil(n / 2): 28 -> 14 -> 7 -> 4, 32 -> 16 -> 8 -> 4."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the skip connection's size (4 -> 7 needs it), then a conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Level(nn.Module):
    """The residual blocks (each optionally followed by attention) of one U-Net resolution."""

    def __init__(
        self,
        channels_in: list[int],
        channels_out: int,
        embedding_dim: int,
        dropout: float,
        attention: bool,
        scale_shift_norm: bool,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualBlock(c_in, channels_out, embedding_dim, dropout, scale_shift_norm)
            for c_in in channels_in
        )
        self.attentions = nn.ModuleList(
            AttentionBlock(channels_out) if attention else nn.Identity() for _ in channels_in
        )


class UNet(nn.Module):
    """U-Net eps/v predictor: [B, in_channels, H, W], t [B] (, labels [B]) -> [B, out_channels, H, W].

    channel_mult gives the width of each resolution level as a multiple of model_channels;
    attention_resolutions lists the feature-map heights (28, 14, 7, 4 for image_size 28) that get
    self-attention.
    With num_classes = K the labels 0..K-1 are embedded, and label K is the null label.
    scale_shift_norm: how the residual blocks take the embedding (see ResidualBlock).
    out_channels: in_channels by default; 2 x in_channels when the diffusion learns the variance
    (GaussianDiffusion.output_channels).
    """

    def __init__(
        self,
        in_channels: int = 1,
        model_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (14,),
        dropout: float = 0.1,
        num_classes: int | None = None,
        image_size: int = 28,
        scale_shift_norm: bool = True,
        out_channels: int | None = None,
    ):
        super().__init__()
        self.model_channels, self.num_classes = model_channels, num_classes
        embedding_dim = 4 * model_channels
        self.time_embedding = nn.Sequential(
            nn.Linear(model_channels, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim)
        )
        self.label_embedding = None if num_classes is None else nn.Embedding(num_classes + 1, embedding_dim)
        self.input_conv = Conv2d(in_channels, model_channels, 3, padding=1)

        widths = [model_channels * mult for mult in channel_mult]
        resolutions = [image_size]
        for _ in widths[1:]:
            resolutions.append((resolutions[-1] + 1) // 2)

        def make_level(inputs: list[int], width: int, level: int) -> Level:
            attention = resolutions[level] in attention_resolutions
            return Level(inputs, width, embedding_dim, dropout, attention, scale_shift_norm)

        skip_channels, channels = [model_channels], model_channels
        self.down_levels, self.downsamples = nn.ModuleList(), nn.ModuleList()
        for level, width in enumerate(widths):
            inputs = [channels] + [width] * (num_res_blocks - 1)
            self.down_levels.append(make_level(inputs, width, level))
            channels = width
            skip_channels += [width] * num_res_blocks
            if level < len(widths) - 1:
                self.downsamples.append(Downsample(channels))
                skip_channels.append(channels)

        self.middle_block_in = ResidualBlock(channels, channels, embedding_dim, dropout, scale_shift_norm)
        self.middle_attention = AttentionBlock(channels)
        self.middle_block_out = ResidualBlock(channels, channels, embedding_dim, dropout, scale_shift_norm)

        self.up_levels, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            inputs = []
            for _ in range(num_res_blocks + 1):
                inputs.append(channels + skip_channels.pop())
                channels = width
            self.up_levels.append(make_level(inputs, width, level))
            if level > 0:
                self.upsamples.append(Upsample(channels))

        output_channels = out_channels or in_channels
        self.output = nn.Sequential(
            group_norm(channels), nn.SiLU(), zero_init(Conv2d(channels, output_channels, 3, padding=1))
        )

    def embed(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Timestep embedding plus, for a class-conditional model, the label embedding: [B, 4C]."""
        embedding = self.time_embedding(timestep_embedding(t, self.model_channels))
        if self.label_embedding is not None:
            if labels is None:
                labels = torch.full_like(t, self.label_embedding.num_embeddings - 1)  # the null label K
            embedding = embedding + self.label_embedding(labels)
        return embedding

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        embedding = self.embed(t, labels)
        h = self.input_conv(x)
        skips = [h]
        for level, down in enumerate(cast(Iterable[Level], self.down_levels)):
            for block, attention in zip(down.blocks, down.attentions, strict=True):
                h = attention(block(h, embedding))
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                skips.append(h)
        h = self.middle_block_out(self.middle_attention(self.middle_block_in(h, embedding)), embedding)
        for level, up in enumerate(cast(Iterable[Level], self.up_levels)):
            for block, attention in zip(up.blocks, up.attentions, strict=True):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), embedding))
            if level < len(self.upsamples):
                h = self.upsamples[level](h, skips[-1].shape[-2:])
        return self.output(h)
