"""Closed-form checks of diffusion.py's edits of real images: DDIM inversion (Song et al. 2021,
arXiv:2010.02502, section 4.3), RePaint inpainting (Lugmayr et al. 2022, arXiv:2201.09865) and the
spherical interpolation of latents, with the exact denoiser of Gaussian data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_diffusion import MU, SIGMA, CountingOracle, GaussianOracle, LabelSpy, oracle_affine

from diffusion import GaussianDiffusion, repaint_schedule, slerp

# ----- DDIM inversion ------------------------------------------------------------------------------


def round_trip_error(diffusion: GaussianDiffusion, x0: torch.Tensor, steps: int) -> float:
    """Largest |x0 - decode(encode(x0))| with the same DDIM timesteps, nothing clipped."""
    oracle = GaussianOracle(diffusion, MU, SIGMA)
    x_T = diffusion.ddim_invert(oracle, x0, steps)
    back = diffusion.sample(oracle, x_start=x_T, sampler="ddim", steps=steps, eta=0.0, clip_x0=False)
    return (back - x0).abs().max().item()


def test_ddim_inversion_retraces_the_decoding_timesteps():
    """Encoding visits -1 (x_0), then DDIM's timesteps backwards; its yields are the decoding's,
    reversed, and both make `steps` model evaluations."""
    diffusion = GaussianDiffusion(T=100)
    oracle = CountingOracle(diffusion, MU, SIGMA)
    x0 = torch.full((2, 1, 4, 4), 0.3)
    encoding = list(diffusion.ddim_invert_progressive(oracle, x0, steps=5))
    encoder_calls, oracle.calls = oracle.calls, []
    decoding = list(diffusion.sample_progressive(oracle, x_start=encoding[-1].x_t, sampler="ddim", steps=5))
    assert [step.t for step in encoding] == [-1, 0, 25, 50, 74, 99] == [step.t for step in decoding][::-1]
    assert encoder_calls == [0, 0, 25, 50, 74] and oracle.calls == [99, 74, 50, 25, 0]
    assert torch.equal(encoding[0].x_t, x0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_inversion_round_trip_error_falls_as_one_over_steps(prediction):
    """x0 ~ N(MU, SIGMA^2) encoded to t = 999 and decoded with the same timesteps. Encoding (Euler up)
    and decoding (Euler down) are both first order, so the round trip's error falls as 1 / steps:
    steps x error stays within 20% of its value at 100 steps from 20 steps to 1000 (about 5.2 on
    this data: 0.24 at 20 steps, 0.052 at 100, 0.0053 at 1000); bounds tested: error(100) <
    error(10) / 6 and error(1000) < 0.006 (3% of the data's std)."""
    diffusion = GaussianDiffusion(T=1000, prediction=prediction)
    x0 = MU + SIGMA * torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    errors = {steps: round_trip_error(diffusion, x0, steps) for steps in (10, 20, 50, 100, 1000)}
    assert list(errors.values()) == sorted(errors.values(), reverse=True)
    assert errors[100] < errors[10] / 6 and errors[1000] < 0.006
    for steps in (20, 50, 1000):
        assert steps * errors[steps] == pytest.approx(100 * errors[100], rel=0.2)


def test_ddim_inversion_of_gaussian_data_is_the_ode_flow():
    """For Gaussian data the probability-flow ODE maps x_0 to x_T = sqrt(ab_T) (mu + (x_0 - mu)
    sqrt(s^2 + sigma_T^2) / s), sigma_T^2 = (1 - ab_T) / ab_T, a standard normal (DDIM section 4.3);
    with 1000 steps the encoding lands within 1% of it, and its std is 1 within 2%."""
    diffusion = GaussianDiffusion(T=1000)
    x0 = MU + SIGMA * torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x_T = diffusion.ddim_invert(GaussianOracle(diffusion, MU, SIGMA), x0, 1000)
    alpha_bar = diffusion.alphas_cumprod_float64[-1]
    sigma_T = math.sqrt((1 - alpha_bar) / alpha_bar)
    flow = math.sqrt(alpha_bar) * (MU + (x0.double() - MU) * math.sqrt(SIGMA**2 + sigma_T**2) / SIGMA)
    torch.testing.assert_close(x_T.double(), flow, rtol=0, atol=0.01 * flow.abs().max().item())
    assert x_T.double().std().item() == pytest.approx(1.0, rel=0.02)


# ----- RePaint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("levels", "jump", "resamples"), [(250, 10, 10), (50, 10, 10), (47, 10, 3), (9, 10, 10)]
)
def test_repaint_schedule_closed_form(levels, jump, resamples):
    """From levels - 1 to -1 by moves of one level. With k = ceil(levels / jump) - 1 jump points
    (0, jump, ..., below levels - jump), each left resamples - 1 times by jump moves up: k jump
    (resamples - 1) moves up and levels + k jump (resamples - 1) moves down (model evaluations).
    The paper's T = 250, j = r = 10: 250 + 24 x 10 x 9 = 2410 evaluations."""
    schedule = repaint_schedule(levels, jump, resamples)
    moves = np.diff(schedule)
    k = math.ceil(levels / jump) - 1
    assert schedule[0] == levels - 1 and schedule[-1] == -1 and set(moves.tolist()) <= {-1, 1}
    assert (moves == 1).sum() == k * jump * (resamples - 1)
    assert (moves == -1).sum() == levels + k * jump * (resamples - 1)
    assert len(schedule) == 1 + levels + 2 * k * jump * (resamples - 1)
    if (levels, jump, resamples) == (250, 10, 10):
        assert (moves == -1).sum() == 2410
    rises = [i for i in range(1, len(moves)) if moves[i] == 1 and moves[i - 1] == -1]
    for i in rises:  # each jump starts at a jump point and climbs exactly `jump` levels
        assert schedule[i] % jump == 0 and schedule[i] < levels - jump
        assert (moves[i : i + jump] == 1).all() and (i + jump == len(moves) or moves[i + jump] == -1)
    assert sorted(schedule[i] for i in rises) == sorted(
        j for j in range(0, levels - jump, jump) for _ in range(resamples - 1)
    )


def test_repaint_schedule_without_resampling_is_the_plain_descent():
    assert repaint_schedule(20, 10, 1) == list(range(19, -2, -1))
    with pytest.raises(ValueError):
        repaint_schedule(20, 0, 10)


def propagate_repaint_unknown(alpha_bar: np.ndarray, schedule: list[int], mu: float, s: float):
    """Exact mean and std of a pixel RePaint generates when the denoiser is the per-pixel Gaussian
    oracle (the known pixels never reach it): from x ~ N(0, 1), each move down is DDPM's ancestral
    step with the posterior of eq. 7, each move up q(x_t | x_{t-1}) of eq. 2."""
    mean, var = 0.0, 1.0
    for t, t_next in zip(schedule[:-1], schedule[1:], strict=True):
        if t_next > t:  # eq. 2: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z
            beta = 1 - alpha_bar[t_next] / alpha_bar[t]
            mean, var = math.sqrt(1 - beta) * mean, (1 - beta) * var + beta
            continue
        a0, b0, _, _ = oracle_affine(alpha_bar[t], mu, s)
        if t == 0:
            mean, var = a0 * mean + b0, a0**2 * var
            continue
        prev, beta = alpha_bar[t - 1], 1 - alpha_bar[t] / alpha_bar[t - 1]
        coef1 = beta * math.sqrt(prev) / (1 - alpha_bar[t])  # eq. 7
        coef2 = (1 - prev) * math.sqrt(1 - beta) / (1 - alpha_bar[t])
        a, b = coef1 * a0 + coef2, coef1 * b0
        mean, var = a * mean + b, a**2 * var + beta * (1 - prev) / (1 - alpha_bar[t])
    return mean, math.sqrt(var)


def test_repaint_keeps_the_known_region_and_resamples_the_rest_exactly():
    """T = 50, j = r = 10 (410 evaluations): the result equals the input bit for bit where the mask
    is 1; elsewhere, pixel by pixel independent under the oracle, the samples' mean and std are the
    closed form's (5 standard errors over 64 x 392 pixels)."""
    diffusion = GaussianDiffusion(T=50)
    oracle = CountingOracle(diffusion, MU, SIGMA)
    x0 = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :14] = 1
    run = list(
        diffusion.repaint_progressive(
            oracle, x0, mask, generator=torch.Generator().manual_seed(0), clip_x0=False
        )
    )
    result = run[-1].x_t
    assert run[-1].t == -1 and torch.equal(result[..., :14], x0[..., :14])
    schedule = repaint_schedule(50)
    assert len(oracle.calls) == len(run) - 1 == int((np.diff(schedule) == -1).sum()) == 50 + 4 * 10 * 9
    assert oracle.calls == [t for t, t_next in zip(schedule[:-1], schedule[1:], strict=True) if t_next < t]
    exact_mean, exact_std = propagate_repaint_unknown(
        diffusion.alphas_cumprod.double().numpy(), schedule, MU, SIGMA
    )
    unknown = result[..., 14:].double()
    n = unknown.numel()
    assert unknown.mean().item() == pytest.approx(exact_mean, abs=5 * exact_std / math.sqrt(n))
    assert unknown.std().item() == pytest.approx(exact_std, abs=5 * exact_std / math.sqrt(2 * n))


def test_repaint_on_fewer_levels_uses_ddim_spacing_and_keeps_the_known_region():
    """levels = 20 of T = 100: the chain moves between DDIM's 20 timesteps (99, 94, ..., 0); with the
    default clipping and a boolean mask the known region is still the input exactly."""
    diffusion = GaussianDiffusion(T=100)
    oracle = CountingOracle(diffusion, MU, SIGMA)
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.5
    result = diffusion.repaint(
        oracle, x0, mask, levels=20, jump_length=5, resamples=3, generator=torch.Generator()
    )
    assert torch.equal(result[mask], x0[mask])
    assert set(oracle.calls) == set(diffusion.timesteps("ddim", 20, 99))
    assert len(oracle.calls) == 20 + 3 * 5 * 2


# ----- labels and guidance -------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_inversion_and_repaint_pass_labels_and_guidance_to_every_evaluation(guidance):
    diffusion = GaussianDiffusion(T=30)
    labels, x0 = torch.tensor([2, 7]), torch.zeros(2, 1, 4, 4)
    expected = [2, 7] if guidance == 1.0 else [2, 7, 10, 10]
    spy = LabelSpy(diffusion)
    diffusion.ddim_invert(spy, x0, 6, labels=labels, guidance=guidance)
    assert spy.seen == [expected] * 6
    spy = LabelSpy(diffusion)
    diffusion.repaint(
        spy, x0, torch.ones(1, 1, 4, 4), jump_length=10, resamples=2, labels=labels, guidance=guidance
    )
    assert spy.seen == [expected] * (30 + 2 * 10 * 1)


# ----- spherical interpolation --------------------------------------------------------------------


def test_slerp_end_frames_are_the_inputs_exactly():
    generator = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 1, 28, 28, generator=generator), torch.randn(3, 1, 28, 28, generator=generator)
    assert torch.equal(slerp(z0, z1, 0.0), z0) and torch.equal(slerp(z0, z1, 1.0), z1)
    frames = slerp(z0[:1], z1[:1], torch.linspace(0, 1, 5))  # one pair, five frames
    assert frames.shape == (5, 1, 28, 28) and torch.equal(frames[0], z0[0]) and torch.equal(frames[-1], z1[0])


def test_slerp_follows_the_great_circle_per_sample():
    """Orthogonal unit vectors: slerp(alpha) = cos(alpha pi/2) e0 + sin(alpha pi/2) e1, unit norm; each
    sample has its own angle, and a parallel pair (sin theta = 0) falls back to linear interpolation."""
    e0, e1 = torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    e0[:, 0, 0, 0] = 1
    e1[0, 0, 0, 1] = 1  # sample 0: orthogonal
    e1[1, 0, 0, 0] = 2  # sample 1: parallel, twice as long
    alpha = torch.tensor([0.3, 0.3], dtype=torch.float64)
    mid = slerp(e0, e1, alpha)
    expected = torch.zeros_like(mid)
    expected[0, 0, 0, :2] = torch.tensor([math.cos(0.3 * math.pi / 2), math.sin(0.3 * math.pi / 2)])
    expected[1, 0, 0, 0] = 0.7 + 0.3 * 2
    torch.testing.assert_close(mid, expected)
