"""The training recipe of Karras et al. inside the DDPM: the preconditioning of EDM (arXiv:2206.00364,
Table 1) as `--prediction edm`, its log-normal noise levels on the discrete schedule
(`--timestep-sampler log-normal`) and EDM2's power-function EMA (arXiv:2312.02696, section 3.1) as
`--ema-sigma-rel`. Each against the papers' own formulas, written here in their sigma form; the
samplers' exactness with the optimal denoiser of Gaussian data is in test_diffusion.py (the oracle of
helpers.py answers F for edm). A run with all three resumes to the bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import straight_and_resumed
from torch import nn

from ddpm.plumbing.presets import training_job_from_flags, write_run_config
from ddpm.training.state import WarmupEMA, power_ema_decay_after, power_ema_exponent
from ddpm.training.timestep_sampler import LOG_NORMAL_MEAN, LOG_NORMAL_STD, make_timestep_sampler
from diffusion import EDM_SIGMA_DATA, GaussianDiffusion, cosine_alphas_cumprod, edm_coefficients


class InputSpy(nn.Module):
    """Answers zeros and keeps what the network was given."""

    def forward(self, x, t, labels=None):
        self.seen = x.clone()
        return torch.zeros_like(x)


def karras_terms(alpha_bar: torch.Tensor, x_t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Table 1 of Karras et al. for VP's x_t: y = x_t / sqrt(ab), sigma^2 = (1 - ab) / ab, ab = alpha_bar."""
    sigma_squared, data_squared = (1 - alpha_bar) / alpha_bar, EDM_SIGMA_DATA**2
    return {
        "y": x_t / alpha_bar.sqrt(),
        "c_skip": data_squared / (sigma_squared + data_squared),
        "c_out": sigma_squared.sqrt() * EDM_SIGMA_DATA / (sigma_squared + data_squared).sqrt(),
        "c_in": 1 / (sigma_squared + data_squared).sqrt(),
        "snr": 1 / sigma_squared,
    }


def test_edm_with_unit_sigma_data_is_v_prediction():
    """s = 1: c_in y = x_t, c_skip y = sqrt(alpha_bar) x_t, c_out = sqrt(1 - alpha_bar): v's x0_hat, F -v."""
    alphas_cumprod = cosine_alphas_cumprod(1000)[1:]
    unit = edm_coefficients(alphas_cumprod, 1.0)
    np.testing.assert_allclose(unit["edm_input_scale"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(unit["edm_skip"], np.sqrt(alphas_cumprod), rtol=1e-12)
    np.testing.assert_allclose(unit["edm_out"], np.sqrt(1 - alphas_cumprod), rtol=1e-12)


@pytest.mark.parametrize("min_snr_gamma", [None, 5.0])
def test_edm_loss_is_karras_table_1(min_snr_gamma):
    """The network sees c_in y; its target is F = (x0 - c_skip y) / c_out with weight 1 (lambda c_out^2 = 1);
    with min-SNR, x0_hat's squared error weighted by min(SNR, gamma). Zeros answered: x0_hat = c_skip y."""
    diffusion = GaussianDiffusion(T=1000, prediction="edm")
    x0 = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spy = InputSpy()
    loss = diffusion.training_loss(
        spy, x0, min_snr_gamma=min_snr_gamma, generator=torch.Generator().manual_seed(0)
    )
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (64,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    alpha_bar = diffusion.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0.double() + (1 - alpha_bar).sqrt() * noise.double()
    terms = karras_terms(alpha_bar, x_t)
    torch.testing.assert_close(spy.seen.double(), terms["c_in"] * terms["y"], rtol=1e-5, atol=1e-5)
    if min_snr_gamma is None:
        target = (x0.double() - terms["c_skip"] * terms["y"]) / terms["c_out"]
        expected = target.pow(2).mean()
    else:
        x0_error = (terms["c_skip"] * terms["y"] - x0.double()).pow(2).mean(dim=(1, 2, 3))
        expected = (terms["snr"].flatten().clamp(max=min_snr_gamma) * x0_error).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_log_normal_sampler_gives_each_t_the_normal_mass_of_its_ln_sigma():
    """P(t <= k) = Phi((m_k - P_mean) / P_std), m_k the midpoint of ln sigma_k and ln sigma_(k+1) (float64
    from eq. 17), within 4 standard errors over 200,000 draws; and every draw is a valid t."""
    T, draws = 1000, 200_000
    alpha_bar = cosine_alphas_cumprod(T)[1:]
    alpha_bar = np.cumprod(1 - np.minimum(1 - alpha_bar / np.append(1.0, alpha_bar[:-1]), 0.999))
    log_sigma = 0.5 * np.log((1 - alpha_bar) / alpha_bar)
    torch.manual_seed(0)
    sampler = make_timestep_sampler("log-normal", GaussianDiffusion(T=T).alphas_cumprod, torch.device("cpu"))
    t, weights = sampler.sample(draws, torch.device("cpu"))
    assert t.min() >= 0 and t.max() <= T - 1 and torch.equal(weights, torch.ones(draws))
    for k in (50, 150, 300, 500, 700):
        midpoint = (log_sigma[k] + log_sigma[k + 1]) / 2
        expected = 0.5 * (1 + math.erf((midpoint - LOG_NORMAL_MEAN) / (LOG_NORMAL_STD * math.sqrt(2))))
        observed = (t <= k).double().mean().item()
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / draws), k


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_power_ema_exponent_has_the_relative_width_asked(sigma_rel):
    """EDM2 eq. 3: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))); and the averaging weights
    after n = 4,000 updates, as a profile over tau / n, have that relative standard deviation (within 3%)."""
    gamma = power_ema_exponent(sigma_rel)
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel, rel=1e-9)
    n = 4000
    decays = np.array([power_ema_decay_after(k - 1, gamma) for k in range(1, n + 1)])
    later = np.append(np.cumprod(decays[::-1])[::-1][1:], 1.0)  # prod_{j > k} decay_j
    weights = (1 - decays) * later
    tau = np.arange(1, n + 1) / n
    mean = (weights * tau).sum()
    assert weights.sum() == pytest.approx(1.0, rel=1e-9)
    assert math.sqrt((weights * (tau - mean) ** 2).sum()) == pytest.approx(sigma_rel, rel=0.03)


def test_power_ema_averages_as_its_closed_form():
    """After weights theta_1..theta_n: ema = sum_k theta_k (1 - b_k) prod_{j > k} b_j with
    b_k = (1 - 1/k)^(gamma + 1), computed here in float64."""
    model = nn.Linear(3, 1)
    ema = WarmupEMA(model, max_decay=0.999, sigma_rel=0.1)
    gamma = power_ema_exponent(0.1)
    thetas = torch.randn(30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for theta in thetas:
        with torch.no_grad():
            model.weight.copy_(theta[:3].reshape(1, 3))
            model.bias.copy_(theta[3:])
        ema.update()
    expected = torch.zeros(4, dtype=torch.float64)
    for k, theta in enumerate(thetas, start=1):
        expected = (1 - 1 / k) ** (gamma + 1) * expected + (1 - (1 - 1 / k) ** (gamma + 1)) * theta
    averaged = torch.cat([ema.module.weight.flatten(), ema.module.bias]).double()
    torch.testing.assert_close(averaged, expected, rtol=1e-5, atol=1e-6)


def test_min_snr_none_switches_a_preset_value_off_and_survives_the_run_config(tmp_path):
    job = training_job_from_flags(["--preset", "cpu", "--min-snr-gamma", "none", "--prediction", "edm"])
    assert (
        job.training.min_snr_gamma is None
        and training_job_from_flags(["--preset", "cpu"]).training.min_snr_gamma
    )
    path = write_run_config(job, tmp_path)
    assert training_job_from_flags(["--config", str(path)]) == job


def test_edm_recipe_resume_is_bit_exact(tiny_train_data, tmp_path):
    """6 steps straight == 2 + resume + 4 with edm, log-normal t and the power EMA (all weights equal)."""
    flags = [
        "--epochs",
        "2",
        "--prediction",
        "edm",
        "--timestep-sampler",
        "log-normal",
        "--ema-sigma-rel",
        "0.1",
    ]
    straight, _, resumed = straight_and_resumed(tiny_train_data, tmp_path, flags, stop_at=2)
    assert straight["step"] == resumed["step"] == 6
    assert straight["config"]["diffusion"]["prediction"] == "edm"
    assert straight["config"]["train"]["training"]["ema_sigma_rel"] == 0.1
    for part in ("model", "ema"):
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)
