"""Negative log-likelihood in bits/dim from DDPM's variational bound (Ho et al. 2020, arXiv:2006.11239).

The bound of Ho et al. eq. 5, for 8-bit images scaled to [-1, 1]:
    L = L_T + sum_{t=2..T} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                              the prior term
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))       Gaussians (eqs. 6-7)
    L_0     = -log p_theta(x_0 | x_1)                                   the discretized Gaussian
              decoder of section 3.3 (eq. 13): 256 bins of width 2/255, the end bins open to +-inf.
In diffusion.py's index convention (index t is the paper's step t+1) the KL terms sit at indices
1..T-1 and the decoder at index 0. Each term is taken at one x_t ~ q(x_t | x_0) (fresh noise per
index, drawn in the order T-1, ..., 0), averaged over the C*H*W dimensions and divided by log 2:
bits/dim. The sum bounds -log2 p(x_0) / (C*H*W) from above, per image.

p_theta(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_hat), Sigma) with x0_hat clipped to [-1, 1]: the very
distribution the DDPM sampler draws from (GaussianDiffusion.p_mean_variance). Sigma is the fixed
sigma_t^2 = beta_tilde_t, the posterior variance (one of Ho et al.'s two choices, section 3.2), or for
a model trained with --learn-sigma the learned one of Nichol & Dhariwal eq. 15, per dimension. At
index 0, where beta_tilde = 0, the decoder's beta_tilde is that of index 1 (the clipped log-variance,
as improved-diffusion does). The network runs in float32 (no autocast), so that the bound is not
rounded by bf16. The terms themselves (GaussianDiffusion.vb_terms_bpd) are the ones L_hybrid trains.

After improved-diffusion (Nichol & Dhariwal 2021, arXiv:2102.09672): gaussian_diffusion.py's
`_vb_terms_bpd`, `_prior_bpd`, `calc_bpd_loop` and losses.py's `normal_kl`,
`discretized_gaussian_log_likelihood` (in diffusion.py, with the exact normal CDF, torch.special.log_ndtr).

Example:
    bound = nll_bits_per_dim(model, diffusion, images, None, batch_size=100, seed=0, device=device)
    bound.bits_per_dim
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from ddpm.evaluation.records import NllBound
from diffusion import GaussianDiffusion, extract, mean_bits, normal_kl

FIXED_VARIANCE = "posterior beta_tilde (Ho et al. sigma_t^2 = beta_tilde_t); at index 0 beta_tilde of index 1"
LEARNED_VARIANCE = (
    "learned (Nichol & Dhariwal eq. 15: exp(v log beta_t + (1 - v) log beta_tilde_t)); at index 0 "
    "beta_tilde of index 1"
)


def variance_choice(diffusion: GaussianDiffusion) -> str:
    """What the report says of the reverse variance the bound uses."""
    return LEARNED_VARIANCE if diffusion.learn_sigma else FIXED_VARIANCE


def buffer(schedule: torch.Tensor | nn.Module) -> torch.Tensor:
    """A schedule tensor of GaussianDiffusion (a registered buffer, which nn.Module types as
    Tensor | Module)."""
    assert isinstance(schedule, torch.Tensor)
    return schedule


def prior_bpd(diffusion: GaussianDiffusion, x0: torch.Tensor) -> torch.Tensor:
    """L_T in bits/dim [B]: KL(q(x_T | x_0) || N(0, I)), with q(x_T | x_0) from eq. 4."""
    t = torch.full((x0.shape[0],), diffusion.T - 1, device=x0.device, dtype=torch.long)
    mean = extract(buffer(diffusion.sqrt_alphas_cumprod), t, x0.shape) * x0
    log_variance = torch.log(1.0 - extract(buffer(diffusion.alphas_cumprod), t, x0.shape))
    return mean_bits(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean)))


def vb_terms_bpd(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None = None,
    clip_x0: bool = True,
) -> torch.Tensor:
    """One term of the bound in bits/dim [B] at x_t [B, C, H, W] (t [B]): L_{t} = KL(q(x_{t-1} | x_t,
    x_0) || p_theta(x_{t-1} | x_t)) where t > 0, the decoder's -log p_theta(x_0 | x_1) where t = 0
    (GaussianDiffusion.vb_terms_bpd of p_mean_variance, x0_hat clipped when clip_x0)."""
    model_out = diffusion.p_mean_variance(model, x_t, t, labels, clip_x0=clip_x0)
    return diffusion.vb_terms_bpd(x0, x_t, t, model_out)


@torch.no_grad()
def bound_terms_bpd(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
    progress: tqdm | None = None,
) -> dict[str, torch.Tensor]:
    """Every term of the bound for images x0 [B, C, H, W] (8-bit values on [-1, 1]), in bits/dim.

    For t = T-1, ..., 0: fresh noise from `generator`, x_t = q_sample(x0, t, noise) (eq. 4), the term
    vb_terms_bpd. Returns "terms" [T, B] (index 0: the decoder L_0; index t > 0: the KL term of the
    paper's step t+1), "prior" [B] (L_T) and "total" [B] (their sum).
    """
    terms = torch.zeros(diffusion.T, x0.shape[0], device=x0.device)
    for t_index in range(diffusion.T - 1, -1, -1):
        t = torch.full((x0.shape[0],), t_index, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        terms[t_index] = vb_terms_bpd(model, diffusion, x0, diffusion.q_sample(x0, t, noise), t, labels)
        if progress is not None:
            progress.update(1)
    prior = prior_bpd(diffusion, x0)
    return {"terms": terms, "prior": prior, "total": terms.sum(dim=0) + prior}


def nll_bits_per_dim(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> NllBound:
    """The bound in bits/dim of images [N, C, H, W] (a class-conditional model: given their labels),
    in batches, with a progress bar over the N/batch_size x T model evaluations.

    Returns the mean bits/dim, its standard deviation over images and standard error, the mean of each
    part (prior L_T, decoder L_0, the KL terms' sum) and the mean term per index t ("terms_per_t", T).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = list(range(0, len(images), batch_size))
    parts = []
    with tqdm(total=len(batches) * diffusion.T, desc="NLL bound", unit="step", leave=False) as progress:
        for start in batches:
            x0 = images[start : start + batch_size].to(device)
            batch_labels = None if labels is None else labels[start : start + batch_size].to(device)
            parts.append(bound_terms_bpd(model, diffusion, x0, generator, batch_labels, progress))
    terms = torch.cat([part["terms"] for part in parts], dim=1).double().cpu()
    prior = torch.cat([part["prior"] for part in parts]).double().cpu()
    total = torch.cat([part["total"] for part in parts]).double().cpu()
    return NllBound(
        bits_per_dim=total.mean().item(),
        bits_per_dim_std=total.std().item() if len(total) > 1 else 0.0,
        bits_per_dim_sem=total.std().item() / math.sqrt(len(total)) if len(total) > 1 else 0.0,
        prior_bpd=prior.mean().item(),
        decoder_bpd=terms[0].mean().item(),
        kl_terms_bpd=terms[1:].sum(dim=0).mean().item(),
        terms_per_t=terms.mean(dim=1).tolist(),
        num_images=len(images),
        variance=variance_choice(diffusion),
        clip_x0=True,
    )
