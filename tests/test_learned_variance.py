"""--learn-sigma: the learned reverse variance of Nichol & Dhariwal 2021 (arXiv:2102.09672, eq. 15), its
hybrid loss (section 3.1) and DDPM respaced to fewer steps (improved-diffusion's respace.py).

Golden values come from data N(m, s^2) per pixel, whose reverse process is known in closed form: the
optimal denoiser E[x_0 | x_t] = m + g (x_t - sqrt(ab) m), g = sqrt(ab) s^2 / (ab s^2 + 1 - ab), and
Var[x_0 | x_t] = s^2 (1 - ab) / (ab s^2 + 1 - ab), so the exact one-step reverse variance is
Sigma*_t = beta_tilde_t + coef1_t^2 Var[x_0 | x_t] (law of total variance through eq. 7). An oracle
outputs that mean and the v of eq. 15 that gives Sigma*_t; the tests recompute its bound and its
respaced chain's moments in float64 from the schedule's formulas, independently of diffusion.py.
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
from ddpm.plumbing.checkpointing import DEMO_CHECKPOINT, build_model, load_for_inference
from ddpm.training.resume import setup_differences
from diffusion import VLB_WEIGHT, GaussianDiffusion, make_betas

DATA_MEAN, DATA_STD = 0.1, 0.3  # the bound's Gaussian data, on [-1, 1]
SAMPLE_MEAN, SAMPLE_STD = 0.1, 0.2  # the sampler's (as in test_diffusion.py)
IMAGE_SHAPE = (1, 6, 6)
NUM_IMAGES = 8
T_BOUND = 100


class ExactVarianceOracle(nn.Module):
    """The optimal model of data N(mu, s^2) with a learned variance: [eps or v | 2 v_eq15 - 1], the
    second half making Sigma = Sigma*_t, the exact one-step reverse variance (module docstring)."""

    num_classes = None

    def __init__(self, diffusion: GaussianDiffusion, mu: float, s: float):
        super().__init__()
        self.diffusion, self.mu, self.s = diffusion, mu, s

    def forward(self, x_t, t, labels=None):
        d = self.diffusion
        alpha_bar = d.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
        x_t = x_t.double()
        gain = alpha_bar.sqrt() * self.s**2 / (alpha_bar * self.s**2 + 1 - alpha_bar)
        x0_hat = self.mu + gain * (x_t - alpha_bar.sqrt() * self.mu)
        eps = (x_t - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()
        prediction = (
            eps if d.prediction == "eps" else alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0_hat
        )
        log_beta = torch.tensor(np.log(make_betas(d.schedule, d.T)))[t].reshape(-1, 1, 1, 1)
        log_tilde = d.posterior_log_variance_clipped.double()[t].reshape(-1, 1, 1, 1)
        v = (torch.log(exact_reverse_variance(d, t, self.s)) - log_tilde) / (log_beta - log_tilde)
        return torch.cat([prediction, (2 * v - 1).expand_as(x_t)], dim=1).float()


def exact_reverse_variance(diffusion: GaussianDiffusion, t: torch.Tensor, s: float) -> torch.Tensor:
    """Sigma*_t = beta_tilde_t + coef1_t^2 s^2 (1 - ab) / (ab s^2 + 1 - ab) in float64, [B, 1, 1, 1]."""
    betas = make_betas(diffusion.schedule, diffusion.T)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    coef1 = betas * np.sqrt(ab_prev) / (1 - ab)
    sigma = betas * (1 - ab_prev) / (1 - ab) + coef1**2 * s**2 * (1 - ab) / (ab * s**2 + 1 - ab)
    return torch.tensor(sigma)[t].reshape(-1, 1, 1, 1)


def gaussian_images(seed: int = 0) -> torch.Tensor:
    """8-bit images drawn from N(DATA_MEAN, DATA_STD^2) per pixel, on [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn((NUM_IMAGES, *IMAGE_SHAPE), generator=generator, dtype=torch.float64)
    return to_model_range(torch.round((DATA_MEAN + DATA_STD * z + 1) * 127.5).clamp(0, 255).to(torch.uint8))


# ----- the hybrid loss -------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_hybrid_loss_is_l_simple_plus_lambda_t_times_the_likelihood_term(prediction):
    """L_hybrid per example = L_simple (min-SNR weighted) + 0.001 T L_t, L_t the bound's term of
    likelihood.py for the same output (x0_hat unclipped in both, as improved-diffusion trains)."""
    diffusion = GaussianDiffusion(T=T_BOUND, prediction=prediction, learn_sigma=True)
    oracle, x0 = ExactVarianceOracle(diffusion, DATA_MEAN, DATA_STD), gaussian_images()
    t = torch.tensor([0, 1, 2, 10, 40, 70, 98, 99])
    losses = diffusion.training_losses(
        oracle, x0, t, min_snr_gamma=5.0, generator=torch.Generator().manual_seed(3)
    )
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))  # the same draw
    x_t = diffusion.q_sample(x0, t, noise)
    snr = diffusion.alphas_cumprod[t] / (1 - diffusion.alphas_cumprod[t])
    weight = snr.clamp(max=5.0) / (snr if prediction == "eps" else snr + 1)
    target = diffusion.training_target(x0, t, noise)
    l_simple = weight * (oracle(x_t, t)[:, :1] - target).pow(2).mean(dim=(1, 2, 3))
    l_t = likelihood.vb_terms_bpd(oracle, diffusion, x0, x_t, t, clip_x0=False)
    torch.testing.assert_close(losses, l_simple + VLB_WEIGHT * T_BOUND * l_t, rtol=1e-5, atol=1e-7)


def test_l_vlb_reaches_only_the_variance_channels():
    """Stop-gradient on the mean (section 3.1): L_vlb's gradient on the eps channel is 0, and the whole
    L_hybrid's gradient there is L_simple's alone, while the variance channel gets L_vlb's."""
    diffusion = GaussianDiffusion(T=T_BOUND, learn_sigma=True)
    fixed = GaussianDiffusion(T=T_BOUND)
    x0, t = gaussian_images(), torch.arange(0, 96, 12)
    output = nn.Parameter(
        0.5 * torch.randn(NUM_IMAGES, 2, *IMAGE_SHAPE[1:], generator=torch.Generator().manual_seed(0))
    )
    x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    diffusion.hybrid_vb_term(x0, x_t, t, output[:, :1], output[:, 1:]).sum().backward()
    assert torch.equal(output.grad[:, :1], torch.zeros_like(x0)) and output.grad[:, 1:].abs().min() > 0

    def gradient(process: GaussianDiffusion, channels: slice) -> torch.Tensor:
        output.grad = None
        constant = lambda x, t_, labels=None: output[:, channels]  # noqa: E731
        process.training_losses(constant, x0, t, generator=torch.Generator().manual_seed(2)).sum().backward()
        return output.grad[:, :1].clone()

    torch.testing.assert_close(gradient(diffusion, slice(None)), gradient(fixed, slice(0, 1)), rtol=0, atol=0)


# ----- the bound with the learned variance ---------------------------------------------------------


def float64_bound(x0: np.ndarray, noises: list[np.ndarray]) -> np.ndarray:
    """The oracle's bound in bits/dim [B] in float64, with the model's variance Sigma*_t: Gaussian KLs of
    unequal variances for t > 0, the discretized decoder with Sigma*_0 at t = 0, and the prior L_T."""
    betas = make_betas("cosine", T_BOUND)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    tilde = betas * (1 - ab_prev) / (1 - ab)
    coef1, coef2 = betas * np.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab)
    sigma = tilde + coef1**2 * DATA_STD**2 * (1 - ab) / (ab * DATA_STD**2 + 1 - ab)
    bits = lambda nats: nats.reshape(len(nats), -1).mean(axis=1) / math.log(2)  # noqa: E731
    total = bits(0.5 * (-1 - np.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * x0**2))  # L_T
    for i, noise in enumerate(noises):
        t = T_BOUND - 1 - i
        x_t = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * noise
        gain = math.sqrt(ab[t]) * DATA_STD**2 / (ab[t] * DATA_STD**2 + 1 - ab[t])
        x0_hat = np.clip(DATA_MEAN + gain * (x_t - math.sqrt(ab[t]) * DATA_MEAN), -1, 1)
        model_mean = coef1[t] * x0_hat + coef2[t] * x_t
        if t > 0:
            true_mean = coef1[t] * x0 + coef2[t] * x_t
            ratio = tilde[t] / sigma[t]
            total += bits(0.5 * (ratio - 1 - np.log(ratio) + (true_mean - model_mean) ** 2 / sigma[t]))
            continue
        scale = math.sqrt(sigma[0])
        upper, lower = (x0 + 1 / 255 - model_mean) / scale, (x0 - 1 / 255 - model_mean) / scale
        edges = np.where(x0 > 0.999, log_ndtr(-lower), np.log(ndtr(upper) - ndtr(lower)))
        total += bits(-np.where(x0 < -0.999, log_ndtr(upper), edges))
    return total


def test_bound_with_the_exact_learned_variance_matches_float64_and_beats_beta_tilde():
    diffusion = GaussianDiffusion(T=T_BOUND, learn_sigma=True)
    x0 = gaussian_images()
    oracle = ExactVarianceOracle(diffusion, DATA_MEAN, DATA_STD)
    result = likelihood.bound_terms_bpd(oracle, diffusion, x0, torch.Generator().manual_seed(1))
    replay = torch.Generator().manual_seed(1)  # the code's draws, in its order t = T-1, ..., 0
    noises = [torch.randn(x0.shape, generator=replay).double().numpy() for _ in range(T_BOUND)]
    expected = float64_bound(x0.double().numpy(), noises)
    assert result["total"].double().numpy() == pytest.approx(expected, rel=1e-4)
    fixed_diffusion = GaussianDiffusion(T=T_BOUND)
    eps_only = lambda x, t, labels=None: oracle(x, t)[:, :1]  # noqa: E731
    fixed = likelihood.bound_terms_bpd(eps_only, fixed_diffusion, x0, torch.Generator().manual_seed(1))
    assert result["total"].mean() < fixed["total"].mean() - 0.05  # bits/dim: Sigma* beats beta_tilde


# ----- DDPM respaced to fewer steps ----------------------------------------------------------------


def chain_moments(
    alpha_bar: np.ndarray, steps: list[int], learned: bool, eta: float | None = None
) -> tuple[float, float]:
    """Exact mean and std of the oracle's chain `steps` from x ~ N(0, 1), in float64. Each move t -> t'
    has beta = 1 - ab_t / ab_t' (improved-diffusion's respace.py) and the variance beta_tilde of the
    move, or with `learned` exp(v log beta + (1 - v) log beta_tilde), v the oracle's one-step v at t
    (what a learned-variance model outputs). eta None: DDPM (eq. 7 with the oracle's x0_hat, plus
    that variance); else DDIM eq. 12 with sigma^2 = eta^2 times it."""
    mu, s = SAMPLE_MEAN, SAMPLE_STD
    ab = lambda t: 1.0 if t < 0 else float(alpha_bar[t])  # noqa: E731
    mean, var = 0.0, 1.0
    for i, t in enumerate(steps):
        t_prev = steps[i + 1] if i + 1 < len(steps) else -1
        gain = math.sqrt(ab(t)) * s**2 / (ab(t) * s**2 + 1 - ab(t))
        x0_a, x0_b = gain, mu - gain * math.sqrt(ab(t)) * mu  # x0_hat = x0_a x_t + x0_b
        eps_a, eps_b = (
            (1 - math.sqrt(ab(t)) * x0_a) / math.sqrt(1 - ab(t)),
            -math.sqrt(ab(t)) * x0_b / math.sqrt(1 - ab(t)),
        )
        beta = 1 - ab(t) / ab(t_prev)
        variance = 0.0 if t_prev < 0 else beta * (1 - ab(t_prev)) / (1 - ab(t))
        if learned and t_prev >= 0:
            variance = math.exp(
                one_step_v(ab(t), ab(t - 1), s) * math.log(beta / variance) + math.log(variance)
            )
        if eta is None:
            coef1 = beta * math.sqrt(ab(t_prev)) / (1 - ab(t))
            coef2 = (1 - ab(t_prev)) * math.sqrt(1 - beta) / (1 - ab(t))
            a, b = coef1 * x0_a + coef2, coef1 * x0_b
        else:
            variance = eta**2 * variance
            direction = math.sqrt(max(1 - ab(t_prev) - variance, 0.0))
            a = math.sqrt(ab(t_prev)) * x0_a + direction * eps_a
            b = math.sqrt(ab(t_prev)) * x0_b + direction * eps_b
        mean, var = a * mean + b, a**2 * var + variance
    return mean, math.sqrt(var)


def one_step_v(alpha_bar: float, alpha_bar_prev: float, s: float) -> float:
    """The v of eq. 15 that gives Sigma*_t for the one-step move (t > 0): (log Sigma* - log beta_tilde)
    / (log beta - log beta_tilde)."""
    beta = 1 - alpha_bar / alpha_bar_prev
    tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    coef1 = beta * math.sqrt(alpha_bar_prev) / (1 - alpha_bar)
    exact = tilde + coef1**2 * s**2 * (1 - alpha_bar) / (alpha_bar * s**2 + 1 - alpha_bar)
    return (math.log(exact) - math.log(tilde)) / (math.log(beta) - math.log(tilde))


def assert_sampled_moments(x: torch.Tensor, exact_mean: float, exact_std: float) -> None:
    """Within 5 Monte-Carlo standard errors: std / sqrt(n) for the mean, std / sqrt(2n) for the std."""
    x = x.double()
    assert x.mean().item() == pytest.approx(exact_mean, abs=5 * exact_std / math.sqrt(x.numel()))
    assert x.std().item() == pytest.approx(exact_std, abs=5 * exact_std / math.sqrt(2 * x.numel()))


def oracle_for(diffusion: GaussianDiffusion):
    """The exact-variance oracle, or for a fixed-variance diffusion its eps (or v) half only."""
    oracle = ExactVarianceOracle(diffusion, SAMPLE_MEAN, SAMPLE_STD)
    return oracle if diffusion.learn_sigma else (lambda x, t, labels=None: oracle(x, t)[:, :1])


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_respaced_ddpm_matches_float64_and_reaches_the_data_with_the_learned_variance(prediction):
    """DDPM in 50 respaced steps matches the float64 chain (chain_moments); with the oracle's learned
    variance its std is the data's within 2% (1.05% short: the one-step v reused on the respaced betas),
    with beta_tilde of the respaced move it is 13% short (0.1745 for 0.2)."""
    exact_stds = {}
    for learned in (True, False):
        diffusion = GaussianDiffusion(T=1000, prediction=prediction, learn_sigma=learned)
        x = diffusion.sample(oracle_for(diffusion), 64, sampler="ddpm", steps=50, clip_x0=False,
                             generator=torch.Generator().manual_seed(0), image_shape=(1, 28, 28))  # fmt: skip
        steps = diffusion.timesteps("ddpm", 50, 999)
        exact_mean, exact_stds[learned] = chain_moments(diffusion.alphas_cumprod_float64, steps, learned)
        assert_sampled_moments(x, exact_mean, exact_stds[learned])
        assert exact_mean == pytest.approx(SAMPLE_MEAN, abs=1e-4)
    assert exact_stds[True] == pytest.approx(SAMPLE_STD, rel=0.02)
    assert exact_stds[False] < 0.9 * SAMPLE_STD


def test_ddpm_timesteps_respace_like_ddim_and_one_move_is_eq_7():
    diffusion = GaussianDiffusion(T=1000)
    assert diffusion.timesteps("ddpm", 10, 999) == diffusion.timesteps("ddim", 10, 999)
    assert diffusion.timesteps("ddpm", 1000, 999) == list(range(999, -1, -1))
    posterior = diffusion.respaced_posterior(500, 499, 501, torch.zeros(2, 1, 4, 4))
    one_step = diffusion.posterior(torch.tensor([500, 500]), torch.Size((2, 1, 4, 4)))
    for respaced, buffered in zip(posterior, one_step, strict=True):  # one move down: eqs. 6-7
        torch.testing.assert_close(respaced, buffered, rtol=1e-5, atol=0)


@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_draws_with_the_learned_variance(eta, learned):
    """DDIM eq. 12 with sigma^2 = eta^2 Sigma of the move, Sigma learned (eq. 15 on the respaced
    betas) or beta_tilde (DDIM eq. 16): 20 steps match the float64 chain (chain_moments)."""
    diffusion = GaussianDiffusion(T=1000, learn_sigma=learned)
    x = diffusion.sample(oracle_for(diffusion), 64, sampler="ddim", steps=20, eta=eta, clip_x0=False,
                         generator=torch.Generator().manual_seed(0), image_shape=(1, 28, 28))  # fmt: skip
    steps = diffusion.timesteps("ddim", 20, 999)
    assert_sampled_moments(x, *chain_moments(diffusion.alphas_cumprod_float64, steps, learned, eta))


# ----- guidance, checkpoints -----------------------------------------------------------------------


class LabelEcho(nn.Module):
    """Outputs [label, 10 * label] (null label 10): the eps half and the variance half."""

    num_classes = 10

    def forward(self, x, t, labels):
        value = labels.float().reshape(-1, 1, 1, 1).expand_as(x)
        return torch.cat([value, 10 * value], dim=1)


def test_guidance_mixes_the_mean_half_and_keeps_the_conditional_variance():
    diffusion = GaussianDiffusion(T=10, learn_sigma=True)
    x, t, labels = torch.zeros(2, 1, 4, 4), torch.tensor([3, 3]), torch.tensor([2, 7])
    prediction, variance_output = diffusion.model_prediction(LabelEcho(), x, t, labels, guidance=3.0)
    torch.testing.assert_close(
        prediction[:, 0, 0, 0], torch.tensor([10 + 3 * (2 - 10.0), 10 + 3 * (7 - 10.0)])
    )
    torch.testing.assert_close(variance_output[:, 0, 0, 0], torch.tensor([20.0, 70.0]))


def test_a_checkpoint_without_learn_sigma_loads_as_a_fixed_variance_model():
    model, diffusion, checkpoint = load_for_inference(DEMO_CHECKPOINT, torch.device("cpu"))
    assert "learn_sigma" not in checkpoint["config"]["diffusion"] and not diffusion.learn_sigma
    assert model.output[-1].out_channels == 1
    images = diffusion.sample(model, 2, sampler="ddpm", steps=3, image_shape=(1, 28, 28))
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    config = dict(checkpoint["config"], diffusion=dict(checkpoint["config"]["diffusion"], learn_sigma=True))
    assert build_model(config).output[-1].out_channels == 2
    here = {"model": {}, "diffusion": diffusion.config(), "data": None, "data_dir": None}
    there = {"model": {}, "diffusion": checkpoint["config"]["diffusion"]}
    assert setup_differences(there, here) == []  # resumable as learn_sigma False
    assert setup_differences(there, dict(here, diffusion=config["diffusion"])) == [
        "learn_sigma False there, True here"
    ]
