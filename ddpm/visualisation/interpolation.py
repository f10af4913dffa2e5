"""Interpolating between digits in the DDIM latent space: vizu_MNIST.py --interpolate.

Test digits are encoded to x_T by DDIM inversion (DDIM eq. 12 with eta = 0 run upwards, Song et al.
2021, arXiv:2010.02502, section 4.3; diffusion.ddim_invert), or, with --from-noise, x_T is the noise of
seeds --seed, --seed+1, ...; each consecutive pair's latents are interpolated spherically (slerp, DDIM
appendix D.5) in --frames steps, alpha = 0 ... 1, and every frame is decoded by DDIM (eta = 0, nothing
clipped, the inversion's timesteps). So the end frames of a pair are the round trips
decode(invert(x)) of its two digits, whose MSE and SSIM against them interpolation.csv records.

A class-conditional model inverts each digit with its own label (or --label) and decodes a frame with
the first digit's label while alpha < 1/2 and the second's from alpha = 1/2 on: the U-Net embeds a
label index, not a vector one could interpolate, so the label switches once, halfway.

Example:
    python vizu_MNIST.py --interpolate --index 3,2 --steps 100 --frames 8
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ddpm.evaluation.image_metrics import mse, ssim
from ddpm.plumbing.output_files import save_picture, write_csv
from ddpm.visualisation.pictures import (
    GIF_FRAME_MS,
    GIF_HEADER_PX,
    GIF_LAST_FRAME_MS,
    GIF_SCALE,
    grid_picture,
    save_image_grid,
)
from diffusion import GaussianDiffusion, slerp

DEFAULT_INVERSION_STEPS = 100  # DDIM steps of the inversion and of each decoding when --steps is not given
LABEL_SWITCH_ALPHA = 0.5  # a frame is decoded with the second digit's label from this alpha on


@dataclass
class Interpolation:
    """Every frame of the interpolations between consecutive images of N inputs (P = N - 1 pairs).

    alphas: [F] from 0 to 1; latents, frames: [P, F, C, H, W] (frames in [-1, 1], unclipped);
    labels: [P, F] the label each frame was decoded with, or None; sources: the N inputs' names
    (test indices or seeds); originals: the N test images [N, C, H, W], or None from noise.
    """

    alphas: torch.Tensor
    latents: torch.Tensor
    frames: torch.Tensor
    labels: torch.Tensor | None
    sources: list[int]
    originals: torch.Tensor | None

    @property
    def pairs(self) -> int:
        return self.frames.shape[0]


def noise_latents(count: int, shape: tuple[int, int, int], seed: int, device: torch.device) -> torch.Tensor:
    """x_T of `count` seeds seed, seed+1, ...: [count, C, H, W], each the first draw of its generator."""
    return torch.cat(
        [
            torch.randn((1, *shape), generator=torch.Generator(device).manual_seed(seed + i), device=device)
            for i in range(count)
        ]
    )


def slerp_pairs(latents: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between consecutive latents [N, C, H, W] at each alpha [F]: [N-1, F, ...]."""
    starts = latents[:-1, None].expand(-1, len(alphas), *latents.shape[1:])
    ends = latents[1:, None].expand_as(starts)
    flat_alphas = alphas.to(latents).repeat(len(latents) - 1)
    return slerp(starts.flatten(0, 1), ends.flatten(0, 1), flat_alphas).reshape(starts.shape)


def frame_labels(labels: torch.Tensor | None, alphas: torch.Tensor) -> torch.Tensor | None:
    """The label of each frame [N-1, F]: the pair's first label below LABEL_SWITCH_ALPHA, then its second."""
    if labels is None:
        return None
    second = (alphas >= LABEL_SWITCH_ALPHA).to(labels.device)
    return torch.where(second[None], labels[1:, None], labels[:-1, None])


def ddim_decode(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    latents: torch.Tensor,
    steps: int,
    labels: torch.Tensor | None,
    guidance: float,
) -> torch.Tensor:
    """DDIM (eta = 0, nothing clipped) from x_T [B, C, H, W] at t = T-1 to x_0, through the timesteps
    that ddim_invert(steps) climbs: the inverse of the inversion up to its discretisation error."""
    return diffusion.sample(
        model, x_start=latents, sampler="ddim", steps=steps, eta=0.0, clip_x0=False, labels=labels,
        guidance=guidance,
    )  # fmt: skip


def interpolate(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    *,
    frames: int,
    steps: int,
    originals: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    sources: list[int] | None = None,
) -> Interpolation:
    """Interpolations between consecutive inputs: test images `originals` [N, C, H, W] in [-1, 1] (DDIM-
    inverted with `steps` steps) or x_T `latents` [N, C, H, W]; labels [N] for a conditional model."""
    if latents is None:
        assert originals is not None, "interpolate needs originals or latents"
        latents = diffusion.ddim_invert(model, originals, steps, labels=labels, guidance=guidance)
    alphas = torch.linspace(0, 1, frames, dtype=torch.float64)
    interpolated = slerp_pairs(latents, alphas)  # [P, F, C, H, W]
    per_frame = frame_labels(labels, alphas)
    flat_labels = None if per_frame is None else per_frame.flatten()
    decoded = ddim_decode(model, diffusion, interpolated.flatten(0, 1), steps, flat_labels, guidance)
    return Interpolation(
        alphas=alphas,
        latents=interpolated.cpu(),
        frames=decoded.reshape(interpolated.shape).cpu(),
        labels=None if per_frame is None else per_frame.cpu(),
        sources=sources if sources is not None else list(range(len(latents))),
        originals=None if originals is None else originals.cpu(),
    )


def round_trip_scores(interpolation: Interpolation) -> dict[tuple[int, int], tuple[float, float]]:
    """(pair, frame) -> (MSE, SSIM) of each end frame against its test image ([0, 1] scale); from noise
    none."""
    if interpolation.originals is None:
        return {}
    last = len(interpolation.alphas) - 1
    scores = {}
    for pair in range(interpolation.pairs):
        for frame, image in ((0, pair), (last, pair + 1)):
            decoded = interpolation.frames[pair, frame][None]
            reference = interpolation.originals[image][None]
            scores[pair, frame] = (float(mse(decoded, reference)[0]), float(ssim(decoded, reference)[0]))
    return scores


def write_interpolation_csv(
    interpolation: Interpolation, path: Path
) -> dict[tuple[int, int], tuple[float, float]]:
    """One row per (pair, frame): alpha, the pair's inputs, the decoding label, and for the end frames of
    inverted test images the round trip's MSE and SSIM; returns those scores."""
    scores = round_trip_scores(interpolation)
    rows: list[list[object]] = [
        ["pair", "frame", "alpha", "from", "to", "label", "roundtrip_mse", "roundtrip_ssim"]
    ]
    for pair in range(interpolation.pairs):
        for frame, alpha in enumerate(interpolation.alphas.tolist()):
            label = "" if interpolation.labels is None else int(interpolation.labels[pair, frame])
            score = [f"{value:.6g}" for value in scores.get((pair, frame), ())] or ["", ""]
            source, target = interpolation.sources[pair], interpolation.sources[pair + 1]
            rows.append([pair, frame, f"{alpha:.6g}", source, target, label, *score])
    write_csv(rows, path)
    return scores


def save_interpolation_strip(interpolation: Interpolation, path: Path) -> None:
    """One row per pair: its first test image, the frames from alpha = 0 to 1, its second test image
    (from noise: the frames only)."""
    rows = []
    for pair in range(interpolation.pairs):
        row = interpolation.frames[pair]
        if interpolation.originals is not None:
            row = torch.cat(
                [interpolation.originals[pair][None], row, interpolation.originals[pair + 1][None]]
            )
        rows.append(row)
    save_image_grid(torch.cat(rows), path, columns=len(rows[0]))


def save_interpolation_gif(interpolation: Interpolation, path: Path) -> int:
    """An animated GIF, one frame per alpha, every pair side by side; returns the number of frames."""
    pictures = []
    for frame, alpha in enumerate(interpolation.alphas.tolist()):
        grid = grid_picture(interpolation.frames[:, frame], interpolation.pairs, GIF_SCALE)
        picture = Image.new(grid.mode, (grid.width, grid.height + GIF_HEADER_PX), 0)
        picture.paste(grid, (0, GIF_HEADER_PX))
        ImageDraw.Draw(picture).text(
            (2, 1), f"alpha = {alpha:.2f}", fill=255 if grid.mode == "L" else "white"
        )
        pictures.append(picture)
    durations = [GIF_FRAME_MS * 4] * (len(pictures) - 1) + [GIF_LAST_FRAME_MS]
    save_picture(pictures[0], path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return len(pictures)


def run_interpolation(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    *,
    frames: int,
    steps: int,
    out_dir: Path,
    originals: torch.Tensor | None,
    latents: torch.Tensor | None,
    labels: torch.Tensor | None,
    guidance: float,
    sources: list[int],
) -> str:
    """interpolate, then interpolation.png, interpolation.gif and interpolation.csv; returns what to print."""
    result = interpolate(
        model, diffusion, frames=frames, steps=steps, originals=originals, latents=latents, labels=labels,
        guidance=guidance, sources=sources,
    )  # fmt: skip
    scores = write_interpolation_csv(result, out_dir / "interpolation.csv")
    save_interpolation_strip(result, out_dir / "interpolation.png")
    gif_frames = save_interpolation_gif(result, out_dir / "interpolation.gif")
    start = "DDIM-inverted test digits" if originals is not None else "seeds' noises"
    line = (
        f"slerp between {result.pairs + 1} {start} ({', '.join(map(str, sources))}) in {frames} frames, "
        f"decoded by DDIM in {steps} steps"
    )
    if scores:
        mses, ssims = np.array(list(scores.values())).T
        line += (
            f"; round trips: MSE {mses.mean():.4f} +- {mses.std():.4f}, "
            f"SSIM {ssims.mean():.4f} +- {ssims.std():.4f}"
        )
    return f"{line}; wrote {out_dir}/ (GIF: {gif_frames} frames)"
