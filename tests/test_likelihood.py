"""likelihood.py: the variational bound in bits/dim (Ho et al. eq. 5), with T = 100 and stand-in models.

Golden values: the KL terms vanish for an oracle that knows x_0 (its mean is the posterior mean);
the decoder's 256 bin probabilities sum to 1; and for Gaussian data N(m, s^2) per pixel, whose
optimal denoiser is E[x_0 | x_t] = m + g (x_t - sqrt(ab) m), g = sqrt(ab) s^2 / (ab s^2 + 1 - ab), the
whole bound is recomputed here independently in float64 from the schedule's formulas (closed-form
Gaussian KLs and normal CDFs at the same noise draws) and must agree with the code's float32 result.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import log_ndtr, ndtr
from torch import nn

from ddpm.datasets.sources import to_model_range
from ddpm.evaluation import likelihood
from diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood, extract, make_betas

T = 100
DATA_MEAN, DATA_STD = 0.1, 0.3  # of the Gaussian data, on [-1, 1]
IMAGE_SHAPE = (1, 6, 6)
NUM_IMAGES = 8


class Oracle(nn.Module):
    """Predicts the true eps (or v) of x_t for known clean images x0: its x0_hat is x0 itself."""

    num_classes = None

    def __init__(self, diffusion: GaussianDiffusion, x0: torch.Tensor):
        super().__init__()
        self.diffusion, self.x0 = diffusion, x0

    def forward(self, x_t, t, labels=None):
        eps = self.diffusion.predict_eps(x_t, t, self.x0)
        return self.diffusion.training_target(self.x0, t, eps)  # eps, or v = sqrt(ab) eps - sqrt(1-ab) x0


class GaussianDenoiser(nn.Module):
    """The optimal denoiser of data N(DATA_MEAN, DATA_STD^2) per pixel, as an eps-prediction network."""

    num_classes = None

    def __init__(self, diffusion: GaussianDiffusion):
        super().__init__()
        self.diffusion = diffusion

    def forward(self, x_t, t, labels=None):
        a = extract(self.diffusion.sqrt_alphas_cumprod, t, x_t.shape)
        gain = a * DATA_STD**2 / (a**2 * DATA_STD**2 + 1 - a**2)
        x0_hat = DATA_MEAN + gain * (x_t - a * DATA_MEAN)
        return self.diffusion.predict_eps(x_t, t, x0_hat)


def gaussian_images(seed: int = 0) -> torch.Tensor:
    """8-bit images drawn from N(DATA_MEAN, DATA_STD^2) per pixel, on [-1, 1]."""
    z = torch.randn(
        (NUM_IMAGES, *IMAGE_SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return to_model_range(torch.round((DATA_MEAN + DATA_STD * z + 1) * 127.5).clamp(0, 255).to(torch.uint8))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_kl_terms_vanish_when_the_model_mean_is_the_posterior_mean(prediction):
    diffusion = GaussianDiffusion(T=T, prediction=prediction)
    x0 = gaussian_images()
    result = likelihood.bound_terms_bpd(
        Oracle(diffusion, x0), diffusion, x0, torch.Generator().manual_seed(0)
    )
    kl_terms = result["terms"][1:]
    assert kl_terms.abs().max() < 1e-6  # bits/dim, for all 99 indices t = 1..T-1
    assert (result["terms"][0] > 0).all()  # the decoder still pays for the bin width


def test_decoder_bin_probabilities_sum_to_one():
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # every 8-bit value on [-1, 1]
    generator = torch.Generator().manual_seed(0)
    means = torch.rand(20, 1, dtype=torch.float64, generator=generator) * 2.4 - 1.2
    log_scales = torch.rand(20, 1, dtype=torch.float64, generator=generator) * math.log(100) + math.log(0.005)
    probabilities = discretized_gaussian_log_likelihood(bins[None], means, log_scales).exp()
    assert probabilities.sum(dim=1) == pytest.approx(torch.ones(20, dtype=torch.float64), abs=1e-9)


def float64_bound(x0: np.ndarray, noises: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian denoiser's bound in bits/dim from the schedule's formulas in float64: the terms
    [T, B] (index 0 the decoder) and the total [B] with the prior L_T.

    noises[i] is the noise of index t = T-1-i. The model's variance is beta_tilde (index 1 at index 0).
    """
    betas = make_betas("cosine", T)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    posterior_variance = betas * (1 - ab_prev) / (1 - ab)  # eq. 7
    coef1 = betas * np.sqrt(ab_prev) / (1 - ab)  # mu_tilde = coef1 x0 + coef2 x_t (eq. 7)
    per_dim = lambda nats: nats.reshape(len(nats), -1).mean(axis=1) / math.log(2)  # noqa: E731
    # L_T: KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1))
    prior = per_dim(0.5 * (-1 - np.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * x0**2))
    terms = np.zeros((T, len(x0)))
    for i, noise in enumerate(noises):
        t = T - 1 - i
        a = math.sqrt(ab[t])
        x_t = a * x0 + math.sqrt(1 - ab[t]) * noise  # eq. 4
        gain = a * DATA_STD**2 / (ab[t] * DATA_STD**2 + 1 - ab[t])
        x0_hat = np.clip(DATA_MEAN + gain * (x_t - a * DATA_MEAN), -1, 1)
        if t > 0:  # equal variances: the KL is the squared mean gap over twice the variance
            terms[t] = per_dim((coef1[t] * (x0 - x0_hat)) ** 2 / (2 * posterior_variance[t]))
            continue
        sigma = math.sqrt(posterior_variance[1])
        upper, lower = (x0 + 1 / 255 - x0_hat) / sigma, (x0 - 1 / 255 - x0_hat) / sigma
        log_p = np.where(
            x0 < -0.999,
            log_ndtr(upper),
            np.where(x0 > 0.999, log_ndtr(-lower), np.log(ndtr(upper) - ndtr(lower))),
        )
        terms[t] = per_dim(-log_p)
    return terms, terms.sum(axis=0) + prior


def test_bound_of_the_optimal_gaussian_denoiser_matches_float64():
    diffusion = GaussianDiffusion(T=T, prediction="eps")
    x0 = gaussian_images()
    result = likelihood.bound_terms_bpd(
        GaussianDenoiser(diffusion), diffusion, x0, torch.Generator().manual_seed(1)
    )
    replay = torch.Generator().manual_seed(1)  # the same draws, in the code's order t = T-1, ..., 0
    noises = [torch.randn(x0.shape, generator=replay).double().numpy() for _ in range(T)]
    expected_terms, expected_total = float64_bound(x0.double().numpy(), noises)
    assert result["terms"].double().numpy() == pytest.approx(expected_terms, rel=1e-3, abs=1e-7)
    assert result["total"].double().numpy() == pytest.approx(expected_total, rel=1e-4)
    assert result["total"] == pytest.approx(result["terms"].sum(0) + result["prior"])
    assert 0 < result["prior"].max() < 1e-3  # alpha_bar_T = 2.4e-7: q(x_T | x_0) is almost N(0, I)


def test_nll_report_over_batches_has_every_part(tmp_path):
    diffusion = GaussianDiffusion(T=T, prediction="eps")
    images = gaussian_images()
    bound = likelihood.nll_bits_per_dim(
        GaussianDenoiser(diffusion), diffusion, images, None, batch_size=3, seed=0, device=torch.device("cpu")
    )
    assert bound.num_images == NUM_IMAGES and len(bound.terms_per_t) == T
    assert bound.bits_per_dim == pytest.approx(bound.prior_bpd + bound.decoder_bpd + bound.kl_terms_bpd)
    assert bound.decoder_bpd == pytest.approx(bound.terms_per_t[0])
    assert 0 < bound.bits_per_dim_sem < bound.bits_per_dim_std
