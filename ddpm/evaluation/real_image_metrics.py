"""The model on real test images: reconstruction (noised to t, denoised back) and the NLL bound.

Reconstruction: --num-recon test images (a seeded subset) noised to each --recon-t with q(x_t | x_0)
(Ho et al. 2020, arXiv:2006.11239, eq. 4) and denoised back by sampling.reconstruction_sweep, scored
by MSE, PSNR and SSIM on [0, 1] pixels. NLL: the variational bound in bits/dim (eq. 5,
likelihood.py) of --num-nll test images.

Example:
    reconstruction = reconstruction_scores(loaded, settings, sampling, plan, real, device)
    reconstruction.per_t["999"].ssim_mean
"""

from __future__ import annotations

import torch

from ddpm.evaluation.inputs import LoadedModel, RealData
from ddpm.evaluation.likelihood import nll_bits_per_dim
from ddpm.evaluation.records import NllBound, Reconstruction, ReconstructionAtT
from ddpm.plumbing.inference_settings import EvaluationSettings
from ddpm.plumbing.runtime import SpeedPlan
from ddpm.plumbing.settings import SamplingSettings
from ddpm.sampling import reconstruction_sweep, sweep_timesteps

SCALES = {
    "mse": "mean squared error per image on [0, 1] pixels (0 = identical, 1 = opposite)",
    "psnr": "dB, 10 log10(1 / MSE) with peak 1 on [0, 1] pixels (higher is better)",
    "ssim": "skimage structural_similarity on [0, 1] images, data_range=1, channels averaged (1 = identical)",
}


def seeded_subset(count: int, total: int, seed: int) -> torch.Tensor:
    """The indices of `count` of `total` images (at most all), in a seeded random order."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]


def reconstruction_scores(
    loaded: LoadedModel,
    settings: EvaluationSettings,
    sampling: SamplingSettings,
    plan: SpeedPlan,
    real: RealData,
    device: torch.device,
) -> Reconstruction:
    """--num-recon test images (a seeded subset) noised to each --recon-t and denoised back."""
    subset = seeded_subset(settings.num_recon, len(real.test_images), settings.seed)
    sweep = reconstruction_sweep(
        loaded.network,
        loaded.diffusion,
        real.test_images[subset],
        sweep_timesteps(settings.recon_t, loaded.diffusion.T),
        sampling=sampling,
        seed=settings.seed,
        device=device,
        amp=plan.amp,
        labels=real.test_labels[subset],
        batch_size=settings.batch_size,
    )
    per_t = {t: ReconstructionAtT(**scores) for t, scores in sweep["per_t"].items()}
    return Reconstruction(num_images=sweep["num_images"], per_t=per_t, scale=SCALES)


def nll_of_test_split(
    loaded: LoadedModel, settings: EvaluationSettings, real: RealData, device: torch.device
) -> NllBound:
    """The variational bound in bits/dim (likelihood.py) of --num-nll test images (a seeded subset;
    a class-conditional model is given their labels)."""
    subset = seeded_subset(settings.num_nll, len(real.test_images), settings.seed)
    labels = None if loaded.num_classes is None else real.test_labels[subset]
    return nll_bits_per_dim(
        loaded.network,
        loaded.diffusion,
        real.test_images[subset],
        labels,
        batch_size=settings.batch_size,
        seed=settings.seed,
        device=device,
    )
