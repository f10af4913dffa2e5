"""Batched sampling and reconstruction through diffusion.py's samplers: the one loop every script uses.

`generate_samples` draws N images in batches under the U-Net's autocast, sample i's noise a function
of (seed, i) alone, so any batch size or number of processes draws the same noise;
`reconstruction_sweep` noises real images to each t with q(x_t | x_0) (Ho et al. 2020,
arXiv:2006.11239, eq. 4), runs the reverse process back to 0 and scores the result (MSE, PSNR,
SSIM on the [0, 1] scale). `check_sampling` is the one validation of sampler flags, `check_sweep`
its run over every start t of a sweep.

Timesteps as in diffusion.py: t in {0..T-1}. Reconstruction from t with DDPM makes t+1 model
evaluations (min(--steps, t+1) respaced, when --steps is given); DDIM and DPM-Solver++ make
min(--steps, t+1) (default min(50, t+1)).

Example:
    samples, labels = generate_samples(model, diffusion, 1000, sampling=SamplingSettings(), seed=0,
                                       image_shape=(1, 28, 28), device=device)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ddpm.evaluation.image_metrics import reconstruction_metrics
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.runtime import autocast_context
from ddpm.plumbing.settings import SamplingSettings
from diffusion import GaussianDiffusion, final_sample

DEFAULT_RECON_T = (50, 100, 250, 500, 750)  # then T-1 (999 for T = 1000)
DEFAULT_BATCH_SIZE = 250


def check_sampling(
    diffusion: GaussianDiffusion,
    sampling: SamplingSettings,
    num_classes: int | None,
    start_t: int | None = None,
) -> None:
    """A UserError unless the sampler can run `sampling.steps` evaluations from start_t (default T-1)
    and --guidance fits the model (class-conditional for guidance != 1)."""
    start_t = diffusion.T - 1 if start_t is None else start_t
    check_start_t(start_t, diffusion.T, "--t")
    if sampling.steps is not None and not 1 <= sampling.steps <= diffusion.T:
        raise UserError(f"--steps must be in [1, {diffusion.T}] (T of this checkpoint), got {sampling.steps}")
    try:
        diffusion.timesteps(sampling.sampler, sampling.steps, start_t)
    except ValueError as error:
        raise UserError(f"--sampler {sampling.sampler} --steps {sampling.steps}: {error}") from None
    if sampling.guidance != 1.0 and num_classes is None:
        raise UserError("--guidance needs a class-conditional checkpoint; this one is unconditional")
    if sampling.s_churn != 0.0 and sampling.sampler != "heun":
        raise UserError(f"--s-churn is Karras' S_churn, for --sampler heun (not {sampling.sampler})")


def check_sweep(
    diffusion: GaussianDiffusion, sampling: SamplingSettings, num_classes: int | None, timesteps: list[int]
) -> None:
    """check_sampling for every start t of a reconstruction sweep, with the evaluations that t gets
    (steps_from), so that a count the sampler cannot make from some t (heun needs 3 or 4) is one
    UserError before any sampling, not a ValueError mid-sweep."""
    for t in timesteps:
        steps = steps_from(sampling, t)
        try:
            check_sampling(diffusion, replace(sampling, steps=steps), num_classes, t)
        except UserError as error:
            raise UserError(f"reconstruction from t = {t}: {error}") from None


def check_start_t(t: int, T: int, flag: str) -> None:
    """The one rule for a starting step: t must be in [0, T-1], else a UserError naming the flag."""
    if not 0 <= t < T:
        raise UserError(f"{flag} must be in [0, {T - 1}] for this checkpoint (T = {T}), got {t}")


def sweep_timesteps(requested: tuple[int, ...] | None, T: int, flag: str = "--recon-t") -> list[int]:
    """Starting steps of a reconstruction sweep: each of `requested` checked to lie in [0, T-1], or by
    default 50, 100, 250, 500, 750 (those below T-1) and T-1, the pure-noise end."""
    if requested is None:
        return [t for t in DEFAULT_RECON_T if t < T - 1] + [T - 1]
    if not requested:
        raise UserError(f"{flag} needs at least one starting step")
    for t in requested:
        check_start_t(t, T, flag)
    return sorted(set(requested))


def steps_from(sampling: SamplingSettings, t: int) -> int | None:
    """Model evaluations of a reconstruction from t: min(--steps, t+1), or the sampler's default (None:
    DDPM all t+1, the others min(50, t+1))."""
    if sampling.steps is None:
        return None
    return min(sampling.steps, t + 1)


def balanced_labels(count: int, num_classes: int | None, device: torch.device) -> torch.Tensor | None:
    """Labels 0, 1, ..., K-1, 0, 1, ... for a class-conditional model (None for an unconditional one)."""
    return None if num_classes is None else torch.arange(count, device=device) % num_classes


def starting_noise(count: int, image_shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """x_T of samples 0 .. count-1: [count, C, H, W] drawn at once on the CPU from `seed`, so row i
    depends on (seed, i) alone (on the CPU, drawing it batch by batch from one generator, as before,
    gave the same rows)."""
    return torch.randn((count, *image_shape), generator=torch.Generator().manual_seed(seed))


def sample_generators(seed: int, indices: range, device: torch.device) -> list[torch.Generator]:
    """One generator per sample for the fresh noise of stochastic samplers (DDPM, DDIM eta > 0, Heun
    churn): sample i's seeded by NumPy's SeedSequence of (seed, i), independent of its batch."""
    seeds = (int(np.random.SeedSequence((seed, index)).generate_state(1)[0]) for index in indices)
    return [torch.Generator(device=device).manual_seed(stream) for stream in seeds]


def batch_starts(count: int, batch_size: int, rank: int = 0, world_size: int = 1) -> range:
    """The first sample of each batch a process draws: batches rank, rank + world_size, ... of
    [0, batch_size), [batch_size, 2 batch_size), ..., so every batch holds the samples it holds alone."""
    return range(rank * batch_size, count, world_size * batch_size)


def in_sample_order(per_rank: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """The ranks' batches (each rank's concatenated, as batch_starts deals them) back in sample order."""
    batches = [list(torch.split(part, batch_size)) for part in per_rank]
    count = sum(len(rank_batches) for rank_batches in batches)
    return torch.cat([batches[k % len(per_rank)][k // len(per_rank)] for k in range(count)])


@torch.no_grad()
def generate_samples(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    count: int,
    *,
    sampling: SamplingSettings,
    image_shape: tuple[int, int, int],
    seed: int,
    device: torch.device,
    amp: str = "none",
    batch_size: int = DEFAULT_BATCH_SIZE,
    labels: torch.Tensor | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images [N, C, H, W] in [-1, 1] on the CPU: samples 0 .. count-1 in batches, or with world_size
    > 1 this rank's batches of them (batch_starts; in_sample_order puts the ranks' parts together).

    Sample i starts from row i of starting_noise(seed) and draws its fresh noise from its own
    generator (sample_generators), so its noise depends on (seed, i) alone, whatever the batch size
    or the number of processes. A class-conditional model gets `labels` (default: balanced,
    i % num_classes); returns (samples, their labels on the CPU or None).
    """
    if labels is None:
        labels = balanced_labels(count, cast(int | None, model.num_classes), device)
    noise = starting_noise(count, image_shape, seed)
    batches, batch_labels = [], []
    starts = batch_starts(count, batch_size, rank, world_size)
    for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress, leave=False):
        indices = range(start, min(start + batch_size, count))
        with autocast_context(amp, device):
            images = diffusion.sample(
                model,
                generator=sample_generators(seed, indices, device),
                labels=None if labels is None else labels[start : indices.stop].to(device),
                x_start=noise[start : indices.stop],
                **sampling.sampler_options(),
            )
        batches.append(images.cpu())
        if labels is not None:
            batch_labels.append(labels[start : indices.stop].cpu())
    samples = torch.cat(batches) if batches else torch.empty((0, *image_shape))
    if labels is None:
        return samples, None
    return samples, torch.cat(batch_labels) if batch_labels else labels[:0].cpu()


@torch.no_grad()
def reconstruct_images(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    t: int,
    *,
    sampling: SamplingSettings,
    seed: int,
    device: torch.device,
    amp: str = "none",
    labels: torch.Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """Noise images [N, C, H, W] to step t (eq. 4) and denoise them back with `diffusion.reconstruct`,
    in batches, the noise seeded by `seed`; returns the reconstructions on the CPU."""
    generator = torch.Generator(device=device).manual_seed(seed)
    steps, results = steps_from(sampling, t), []
    for start in range(0, len(images), batch_size):
        x0 = images[start : start + batch_size].to(device)
        batch_labels = None if labels is None else labels[start : start + batch_size].to(device)
        sampler_steps = diffusion.reconstruct(
            model,
            x0,
            t,
            generator,
            labels=batch_labels,
            **(sampling.sampler_options() | {"steps": steps}),
        )
        with autocast_context(amp, device):
            results.append(final_sample(sampler_steps).cpu())
    return torch.cat(results)


def reconstruction_sweep(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    timesteps: list[int],
    *,
    sampling: SamplingSettings,
    seed: int,
    device: torch.device,
    amp: str = "none",
    labels: torch.Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """For each t: test images noised to t and denoised back (the same seeded noise for every t),
    scored against the originals. Returns {"num_images", "per_t": {t: {"steps", "mse_mean",
    "mse_std", "psnr_mean", ..., "ssim_std"}}} with t as a string key (for JSON)."""
    labels = labels if model.num_classes is not None else None
    check_sweep(diffusion, sampling, cast(int | None, model.num_classes), timesteps)
    per_t = {}
    for t in tqdm(timesteps, desc="reconstruction sweep", unit="t", leave=False):
        denoised = reconstruct_images(
            model,
            diffusion,
            images,
            t,
            sampling=sampling,
            seed=seed,
            device=device,
            amp=amp,
            labels=labels,
            batch_size=batch_size,
        )
        scores = reconstruction_metrics(denoised, images)
        per_t[str(t)] = {"steps": len(diffusion.timesteps(sampling.sampler, steps_from(sampling, t), t))} | {
            f"{name}_{stat}": float(reduce(values))
            for name, values in scores.items()
            for stat, reduce in (("mean", np.mean), ("std", np.std))
        }
    return {"num_images": len(images), "per_t": per_t}
