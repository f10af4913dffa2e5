"""Closed-form checks of diffusion.py: schedules, q and its posterior, the timestep convention,
and every sampler (DDPM, DDIM, DPM-Solver++, Heun) against exact Gaussian-data propagation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import MU, SIGMA, CountingOracle, GaussianOracle, LabelSpy, oracle_affine
from torch import nn

from diffusion import GaussianDiffusion, SamplerStep

S = 0.008  # cosine offset of Nichol & Dhariwal eq. 17


def cosine_alpha_bar(step: float, T: int) -> float:
    """Nichol & Dhariwal eq. 17, written out independently of diffusion.py."""
    f = lambda u: math.cos((u / T + S) / (1 + S) * math.pi / 2) ** 2  # noqa: E731
    return f(step) / f(0)


# ----- schedules ---------------------------------------------------------------------------------


def test_linear_schedule_endpoints_and_alpha_bar():
    diffusion = GaussianDiffusion(T=1000, schedule="linear")
    assert diffusion.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert diffusion.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    # prod_{i=1}^{1000} (1 - beta_i) with beta linear in [1e-4, 0.02]: 4.036e-5 (computed in float64)
    assert diffusion.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)


def test_cosine_schedule_matches_closed_form_and_clips():
    T = 1000
    diffusion = GaussianDiffusion(T=T, schedule="cosine")
    expected = np.array([cosine_alpha_bar(t + 1, T) for t in range(T)])  # index t = paper's t+1
    betas = diffusion.betas.double().numpy()
    unclipped = betas < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]  # only the last beta hits the 0.999 clip
    np.testing.assert_allclose(diffusion.alphas_cumprod.double().numpy()[:-1], expected[:-1], rtol=1e-5)
    assert betas[-1] == pytest.approx(0.999, rel=1e-6)


def test_buffers_are_float32_follow_the_module_and_are_not_weights():
    diffusion = GaussianDiffusion(T=10)
    names = [
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
        "posterior_mean_coef1", "posterior_mean_coef2",
    ]  # fmt: skip
    for name in names:
        buffer = getattr(diffusion, name)
        assert buffer.dtype == torch.float32 and buffer.shape == (10,), name
    assert dict(diffusion.state_dict()) == {}
    assert diffusion.to("meta").betas.device.type == "meta"
    assert GaussianDiffusion(**diffusion.config()).config() == diffusion.config()


def test_posterior_variance_pinned_values_linear():
    # Same golden values as diffusers' DDPM scheduler test (linear betas 1e-4..0.02, T=1000).
    variance = GaussianDiffusion(T=1000, schedule="linear").posterior_variance
    assert variance[0].item() == 0.0
    assert variance[487].item() == pytest.approx(0.00979, abs=1e-5)
    assert variance[999].item() == pytest.approx(0.02, abs=1e-5)


@pytest.mark.parametrize("bad", [{"T": 1}, {"schedule": "quadratic"}, {"prediction": "x0"}])
def test_rejects_bad_configuration(bad):
    with pytest.raises(ValueError):
        GaussianDiffusion(**bad)


# ----- timestep convention -----------------------------------------------------------------------


def test_timestep_convention_index_t_is_paper_step_t_plus_1():
    diffusion = GaussianDiffusion(T=1000, schedule="linear")
    # index 0 is the paper's step 1: alpha_bar_1 = 1 - beta_1, and alpha_bar_0 = 1 is the "prev" of index 0
    assert diffusion.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-7)
    assert diffusion.alphas_cumprod_prev[0].item() == 1.0
    assert diffusion.timesteps("ddim", 10, 999) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert diffusion.timesteps("ddpm", None, 999) == list(range(999, -1, -1))
    assert diffusion.timesteps("ddim", 1, 999) == [999]


@pytest.mark.parametrize(
    ("sampler", "steps", "start_t"),
    [("ddim", 0, 999), ("ddim", 1001, 999), ("ddim", 5, 3), ("ddpm", 1001, 999), ("ddpm", 5, 3)],
)
def test_timesteps_rejects_impossible_requests(sampler, steps, start_t):
    with pytest.raises(ValueError):
        GaussianDiffusion(T=1000).timesteps(sampler, steps, start_t)


# ----- forward process and posterior --------------------------------------------------------------


def test_q_sample_statistics():
    """x_t of a constant x0 = 0.5 has mean sqrt(ab) 0.5 and variance 1 - ab (eq. 4). Tolerances: 6
    standard errors of the estimates over n = 4096 x 784 draws, sqrt(var / n) for the mean and
    var sqrt(2 / n) for the variance. alpha_bar comes from eq. 17 written out in this file; at t = 999
    the last beta is clipped to 0.999, so alpha_bar = alpha_bar(t = 999 of eq. 17) x 0.001."""
    diffusion = GaussianDiffusion(T=1000)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((4096, 1, 28, 28), 0.5)
    n = x0.numel()
    for t in (0, 300, 999):
        batch_t = torch.full((4096,), t)
        x_t = diffusion.q_sample(x0, batch_t, torch.randn(x0.shape, generator=generator)).double()
        alpha_bar = cosine_alpha_bar(t + 1, 1000) if t < 999 else cosine_alpha_bar(999, 1000) * (1 - 0.999)
        variance = 1 - alpha_bar
        assert x_t.mean().item() == pytest.approx(math.sqrt(alpha_bar) * 0.5, abs=6 * math.sqrt(variance / n))
        assert x_t.var().item() == pytest.approx(variance, abs=6 * variance * math.sqrt(2 / n))


def test_ddim_with_eta_1_between_neighbours_is_the_ddpm_posterior():
    """DDIM eq. 16 with eta = 1 and t_prev = t - 1 has sigma^2 = beta_tilde_t and mean mu_tilde(x_t, x0)
    (eq. 7): sampled mean and variance of x_{t-1} match q_posterior within 6 standard errors."""
    diffusion = GaussianDiffusion(T=1000, schedule="linear")
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    x_t, x0 = torch.full((n, 1, 1, 1), 0.3), torch.full((n, 1, 1, 1), -0.2)
    for t in (1, 487, 999):
        x_prev = diffusion._ddim_update(x_t, x0, t, t - 1, 1.0, generator).double()
        mean, variance = diffusion.q_posterior(x0[:1], x_t[:1], torch.tensor([t]))
        variance = variance.item()
        assert x_prev.mean().item() == pytest.approx(mean.item(), abs=6 * math.sqrt(variance / n))
        assert x_prev.var().item() == pytest.approx(variance, rel=6 * math.sqrt(2 / n))


def test_x0_clipping_changes_only_predictions_outside_the_data_range():
    diffusion = GaussianDiffusion(T=100)
    x_t, t = torch.linspace(-6, 6, 49).reshape(1, 1, 7, 7), torch.tensor([60])
    model = Zeros()  # eps_hat = 0: x0_hat = x_t / sqrt(alpha_bar), which leaves [-1, 1] for large |x_t|
    clipped = diffusion.p_mean_variance(model, x_t, t, clip_x0=True)["pred_x0"]
    free = diffusion.p_mean_variance(model, x_t, t, clip_x0=False)["pred_x0"]
    inside = free.abs() <= 1
    assert inside.any() and (~inside).any()
    assert torch.equal(clipped[inside], free[inside])
    assert torch.equal(clipped[~inside], free[~inside].sign())


def test_q_posterior_equals_product_of_gaussians():
    diffusion = GaussianDiffusion(T=1000, schedule="linear")
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bar = np.cumprod(1 - betas)
    x0, x_t = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    t = torch.tensor([1, 2, 50, 487, 900, 999])
    mean, variance = diffusion.q_posterior(x0, x_t, t)
    for i, step in enumerate(t.tolist()):
        # q(x_{t-1} | x_0) = N(sqrt(ab_prev) x_0, 1 - ab_prev); q(x_t | x_{t-1}) = N(sqrt(1 - b) x_{t-1}, b)
        prior_var, beta = 1 - alpha_bar[step - 1], betas[step]
        precision = 1 / prior_var + (1 - beta) / beta
        expected_mean = (
            math.sqrt(alpha_bar[step - 1]) * x0[i].double() / prior_var
            + math.sqrt(1 - beta) * x_t[i].double() / beta
        ) / precision
        assert variance[i].item() == pytest.approx(1 / precision, rel=1e-4)
        torch.testing.assert_close(mean[i].double(), expected_mean, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v", "edm"])
def test_predict_x0_inverts_q_sample(prediction):
    diffusion = GaussianDiffusion(T=1000, prediction=prediction)
    x0, noise = torch.rand(5, 1, 8, 8) * 2 - 1, torch.randn(5, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 900, 998])
    x_t = diffusion.q_sample(x0, t, noise)
    target = diffusion.training_target(x0, t, noise)
    torch.testing.assert_close(diffusion.predict_x0(x_t, t, target), x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(diffusion.predict_eps(x_t, t, x0), noise, atol=2e-3, rtol=0)


# ----- the closed-form denoiser for Gaussian data -----------------------------------------------


def propagate_ddpm(alpha_bar: np.ndarray, mu: float, s: float) -> tuple[float, float]:
    """Exact mean and std after the full ancestral chain from x_{T-1} ~ N(0, 1) (Algorithm 2)."""
    mean, var = 0.0, 1.0
    for t in range(len(alpha_bar) - 1, -1, -1):
        a0, b0, _, _ = oracle_affine(alpha_bar[t], mu, s)
        if t == 0:
            return a0 * mean + b0, math.sqrt(a0**2 * var)
        prev, beta = alpha_bar[t - 1], 1 - alpha_bar[t] / alpha_bar[t - 1]
        coef1 = beta * math.sqrt(prev) / (1 - alpha_bar[t])
        coef2 = (1 - prev) * math.sqrt(1 - beta) / (1 - alpha_bar[t])
        a, b = coef1 * a0 + coef2, coef1 * b0
        mean, var = a * mean + b, a**2 * var + beta * (1 - prev) / (1 - alpha_bar[t])


def propagate_deterministic(alpha_bar: np.ndarray, steps: list[int], mu: float, s: float, solver: str):
    """Exact mean and std of DDIM (eta = 0) or DPM-Solver++(2M): x = a x_T + b throughout."""
    a, b = 1.0, 0.0  # x = a * x_T + b with x_T ~ N(0, 1)
    ab = lambda t: 1.0 if t < 0 else alpha_bar[t]  # noqa: E731
    lam = lambda t: 0.5 * math.log(ab(t) / (1 - ab(t)))  # noqa: E731
    previous = None
    for i, t in enumerate(steps):
        t_prev = steps[i + 1] if i + 1 < len(steps) else -1
        a0, b0, ae, be = oracle_affine(ab(t), mu, s)
        x0 = (a0 * a, a0 * b + b0)
        if solver == "ddim" or t_prev < 0:
            eps = (ae * a, ae * b + be)
            new = [math.sqrt(ab(t_prev)) * x0[k] + math.sqrt(1 - ab(t_prev)) * eps[k] for k in range(2)]
        else:
            h = lam(t_prev) - lam(t)
            data = x0
            if previous is not None:
                r = (lam(t) - lam(steps[i - 1])) / h
                data = tuple((1 + 1 / (2 * r)) * x0[k] - previous[k] / (2 * r) for k in range(2))
            ratio = math.sqrt((1 - ab(t_prev)) / (1 - ab(t)))
            coefficient = -math.sqrt(ab(t_prev)) * math.expm1(-h)
            new = [ratio * (a, b)[k] + coefficient * data[k] for k in range(2)]
        previous, (a, b) = x0, new
    return b, abs(a)


MNIST_SHAPE = (1, 28, 28)
N_SAMPLES = 64  # x 784 pixels = 50k independent draws


def sample_moments(diffusion, sampler, steps):
    oracle = GaussianOracle(diffusion, MU, SIGMA)
    generator = torch.Generator().manual_seed(0)
    x = diffusion.sample(
        oracle,
        N_SAMPLES,
        sampler=sampler,
        steps=steps,
        generator=generator,
        clip_x0=False,
        image_shape=MNIST_SHAPE,
    )
    return x.double().mean().item(), x.double().std().item(), x.numel()


def assert_moments_match(sampled, exact_mean, exact_std):
    mean, std, n = sampled
    # Monte-Carlo standard errors: std / sqrt(n) for the mean, std / sqrt(2n) for the std; 5 of them
    assert mean == pytest.approx(exact_mean, abs=5 * exact_std / math.sqrt(n))
    assert std == pytest.approx(exact_std, abs=5 * exact_std / math.sqrt(2 * n))


@pytest.mark.parametrize("prediction", ["eps", "edm"])
def test_ddpm_matches_exact_propagation_and_recovers_the_data(prediction):
    diffusion = GaussianDiffusion(T=1000, schedule="cosine", prediction=prediction)
    exact_mean, exact_std = propagate_ddpm(diffusion.alphas_cumprod.double().numpy(), MU, SIGMA)
    assert_moments_match(sample_moments(diffusion, "ddpm", None), exact_mean, exact_std)
    assert exact_std == pytest.approx(SIGMA, rel=0.02) and exact_mean == pytest.approx(MU, abs=0.002)


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
@pytest.mark.parametrize("prediction", ["eps", "v", "edm"])
def test_fast_samplers_match_exact_propagation(sampler, steps, prediction):
    diffusion = GaussianDiffusion(T=1000, schedule="cosine", prediction=prediction)
    timesteps = diffusion.timesteps(sampler, steps, 999)
    alpha_bar = diffusion.alphas_cumprod.double().numpy()
    exact_mean, exact_std = propagate_deterministic(alpha_bar, timesteps, MU, SIGMA, sampler)
    assert_moments_match(sample_moments(diffusion, sampler, steps), exact_mean, exact_std)


def sampled_std_ratio(diffusion: GaussianDiffusion, sampler: str, steps: int) -> float:
    """The std of diffusion.sample's output for the Gaussian oracle, over the data's std."""
    return sample_moments(diffusion, sampler, steps)[1] / SIGMA


def test_ddim_std_approaches_the_data_std_with_more_steps():
    """Sampled through diffusion.sample, DDIM's std grows with the steps towards the data's; at 20
    steps it is its own discretisation error's 0.84 s (not a bug), as the closed form says. The
    sampled ratios carry a Monte-Carlo error of about 1 / sqrt(2 x 50,176) = 0.3%."""
    diffusion = GaussianDiffusion(T=1000, schedule="cosine")
    ratios = [sampled_std_ratio(diffusion, "ddim", n) for n in (10, 20, 50, 200)]
    assert ratios == sorted(ratios) and ratios[-1] > 0.95
    assert ratios[1] == pytest.approx(0.84, abs=0.02)
    alpha_bar = diffusion.alphas_cumprod.double().numpy()
    closed = propagate_deterministic(alpha_bar, diffusion.timesteps("ddim", 20, 999), MU, SIGMA, "ddim")[1]
    assert ratios[1] == pytest.approx(closed / SIGMA, abs=5 / math.sqrt(2 * N_SAMPLES * 784))


def test_dpm_solver_beats_ddim_at_few_steps_and_converges():
    """Sampled: DPM-Solver++ lands closer to the data's std than DDIM at every step count; the closed
    form puts it 1.4% off at 20 steps and 0.009% at 100 (DDIM: 16%, 3.2%), inside 2% and, at 100
    steps, inside the 0.3% Monte-Carlo error of the sampled std."""
    diffusion = GaussianDiffusion(T=1000, schedule="cosine")
    for steps in (10, 20):
        dpm_error = abs(sampled_std_ratio(diffusion, "dpm++2m", steps) - 1)
        assert dpm_error < abs(sampled_std_ratio(diffusion, "ddim", steps) - 1)
    assert abs(sampled_std_ratio(diffusion, "dpm++2m", 20) - 1) < 0.02
    assert abs(sampled_std_ratio(diffusion, "dpm++2m", 100) - 1) < 5 / math.sqrt(2 * N_SAMPLES * 784)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("cosine", [999, 981, 947, 849, 606, 280, 96, 28, 6, 0]),
        ("linear", [999, 886, 757, 603, 410, 202, 73, 22, 5, 0]),
    ],
)
def test_dpm_solver_timesteps_are_even_in_log_snr(schedule, expected):
    """10 steps from 999: lambda = log(alpha / sigma) rises by the same amount (+-6%, the rounding to
    integer t) at every step; for the cosine schedule the range starts at index 993 (time 0.9946 T,
    DPM-Solver's end for it), so only its first step, from 999, is longer."""
    diffusion = GaussianDiffusion(T=1000, schedule=schedule)
    timesteps = diffusion.timesteps("dpm++2m", 10, 999)
    assert timesteps == expected
    alpha_bar = diffusion.alphas_cumprod.double().numpy()[timesteps]
    increments = np.diff(0.5 * np.log(alpha_bar / (1 - alpha_bar)))
    even = increments[1:] if schedule == "cosine" else increments
    assert np.allclose(even, even.mean(), rtol=0.06)
    assert schedule == "linear" or increments[0] > 5 * even.mean()


@pytest.mark.parametrize("T", [2, 10, 100])
def test_dpm_solver_timesteps_are_distinct_and_span_every_start(T):
    """Every start_t and every possible step count: start_t first, 0 last, strictly decreasing."""
    diffusion = GaussianDiffusion(T=T)
    for start_t in range(T):
        for steps in range(2, start_t + 2):
            timesteps = diffusion.timesteps("dpm++2m", steps, start_t)
            assert len(timesteps) == steps and timesteps[0] == start_t and timesteps[-1] == 0
            assert np.all(np.diff(timesteps) < 0)


# ----- Heun (Karras et al. 2022, Algorithm 1) ---------------------------------------------------


def karras_sigma(alpha_bar: float) -> float:
    """Karras' sigma of a VP process: x_t / sqrt(alpha_bar) = x_0 + sigma eps."""
    return math.sqrt((1 - alpha_bar) / alpha_bar)


def propagate_heun(alpha_bar: np.ndarray, evaluations: list[int], mu: float, s: float) -> tuple[float, float]:
    """Exact mean and std of Karras' sampler with the Gaussian oracle, on y = x / sqrt(alpha_bar)
    through the levels of `evaluations` and then sigma = 0: y = a x_T + b throughout, x_T ~ N(0, 1).
    As diffusion.timesteps("heun") documents, a step is Heun's (Algorithm 1, lines 5-8) where its
    target level is evaluated twice, else Euler's (line 5 alone)."""
    ab = lambda t: 1.0 if t < 0 else alpha_bar[t]  # noqa: E731

    def slope(a: float, b: float, t: int) -> tuple[float, float]:
        a0, b0, _, _ = oracle_affine(ab(t), mu, s)  # D(y) = x0_hat(x = sqrt(ab) y) = a0 sqrt(ab) y + b0
        k, sigma = a0 * math.sqrt(ab(t)), karras_sigma(ab(t))
        return (1 - k) * a / sigma, ((1 - k) * b - b0) / sigma

    levels = list(dict.fromkeys(evaluations))
    a, b = 1 / math.sqrt(ab(levels[0])), 0.0
    for t, t_next in zip(levels, [*levels[1:], -1], strict=True):
        h = karras_sigma(ab(t_next)) - karras_sigma(ab(t))
        d = slope(a, b, t)
        new = (a + h * d[0], b + h * d[1])
        if evaluations.count(t_next) == 2:
            d_next = slope(*new, t_next)
            new = (a + h * (d[0] + d_next[0]) / 2, b + h * (d[1] + d_next[1]) / 2)
        a, b = new
    return b, a


def karras_levels(diffusion: GaussianDiffusion, steps: int) -> tuple[list[int], list[int]]:
    """Heun's evaluations from T-1 and its levels (each once: a level a Heun step lands on is listed
    twice, once for the Euler evaluation of the next step)."""
    evaluations = diffusion.timesteps("heun", steps, diffusion.T - 1)
    return evaluations, list(dict.fromkeys(evaluations))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [4, 10, 11, 50])
def test_heun_timesteps_are_karras_sigmas_rounded_to_trained_steps(schedule, steps):
    """From T-1 = 999 (cosine sigma 2.0e4, linear 157, both above Karras' sigma_max = 80): one Euler
    entry step to the trained step nearest sigma = 80 in log-sigma, then N = steps // 2 Karras levels,
    evaluated once at the first and twice at the others: 2N <= steps evaluations. Each level lies
    within half a trained step (in log-sigma) of its target: 80 for the first, then Karras eq. 5 with
    rho = 7, sigma_max = the first level's sigma and sigma_min = sigma at t = 0 (the last level, 0)."""
    diffusion = GaussianDiffusion(T=1000, schedule=schedule)
    evaluations, levels = karras_levels(diffusion, steps)
    n = steps // 2
    assert len(evaluations) == 2 * n <= steps and len(levels) == n + 1
    assert evaluations[1::2] == levels[1:] and evaluations[2::2] == levels[2:]
    assert levels[0] == 999 and levels[-1] == 0 and np.all(np.diff(levels) < 0)
    log_sigma = np.log([karras_sigma(ab) for ab in diffusion.alphas_cumprod_float64])
    top, bottom = math.exp(log_sigma[levels[1]]) ** (1 / 7), math.exp(log_sigma[0]) ** (1 / 7)
    targets = [math.log(80), *(7 * np.log(top + np.arange(1, n) / (n - 1) * (bottom - top)))]
    for t, target in zip(levels[1:], targets, strict=True):
        half_step = max(np.abs(np.diff(log_sigma[max(t - 1, 0) : t + 2]))) / 2
        assert abs(log_sigma[t] - target) <= half_step + 1e-12, (t, target)


def test_heun_timesteps_pinned():
    """Cosine, T = 1000: 10 evaluations are the entry step from 999 (sigma 2.0e4) and 5 levels 991,
    966, 802, 164, 0 (sigma 80.2, 18.9, 3.15, 0.276, 0.0063; Karras' targets 80, 18.8, 3.2, 0.28,
    0.0063). From t = 500 (sigma 0.99, below 80) there is no entry step: N = (steps + 1) // 2 levels
    from 500, 2N - 1 evaluations."""
    diffusion = GaussianDiffusion(T=1000, schedule="cosine")
    assert diffusion.timesteps("heun", 10, 999) == [999, 991, 966, 966, 802, 802, 164, 164, 0, 0]
    assert diffusion.timesteps("heun", 11, 999) == diffusion.timesteps("heun", 10, 999)
    assert diffusion.timesteps("heun", None, 999) == diffusion.timesteps("heun", 50, 999)
    assert diffusion.timesteps("heun", 3, 500) == [500, 0, 0]
    assert len(diffusion.timesteps("heun", 10, 500)) == 9 and len(diffusion.timesteps("heun", 11, 500)) == 11


@pytest.mark.parametrize(
    ("steps", "start_t", "fewest"), [(1, 999, 4), (3, 999, 4), (2, 500, 3), (1001, 999, 4), (None, 1, 3)]
)
def test_heun_rejects_too_few_or_too_many_steps(steps, start_t, fewest):
    """At least 2 Karras levels (3 evaluations), plus the entry step from above sigma = 80."""
    with pytest.raises(ValueError, match=rf"steps must be in \[{fewest}, "):
        GaussianDiffusion(T=1000).timesteps("heun", steps, start_t)


@pytest.mark.parametrize("T", [3, 10, 50])
def test_heun_timesteps_span_every_start(T):
    """Every start_t and step count heun accepts: levels strictly decrease from start_t to 0, and
    the evaluations never exceed the steps asked for."""
    diffusion = GaussianDiffusion(T=T)
    for start_t in range(2, T):
        fewest = 4 if diffusion._karras_top(start_t) < start_t else 3
        for steps in range(fewest, start_t + 2):
            evaluations = diffusion.timesteps("heun", steps, start_t)
            levels = list(dict.fromkeys(evaluations))
            assert len(evaluations) <= steps and levels[0] == start_t and levels[-1] == 0
            assert np.all(np.diff(levels) < 0)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [4, 10, 20, 50])
@pytest.mark.parametrize("prediction", ["eps", "v", "edm"])
def test_heun_matches_exact_propagation_sample_by_sample(schedule, steps, prediction):
    """Deterministic, so each sample is b + a x_T of the closed form, within 5e-4 (1 + |a|): float32,
    and the oracle's x0_hat at T-1, where sqrt(alpha_bar) = 4.9e-5 on the cosine schedule."""
    diffusion = GaussianDiffusion(T=1000, schedule=schedule, prediction=prediction)
    alpha_bar = diffusion.alphas_cumprod.double().numpy()
    b, a = propagate_heun(alpha_bar, diffusion.timesteps("heun", steps, 999), MU, SIGMA)
    x_T = torch.randn(N_SAMPLES, *MNIST_SHAPE, generator=torch.Generator().manual_seed(0))
    oracle = GaussianOracle(diffusion, MU, SIGMA)
    x = diffusion.sample(oracle, x_start=x_T, sampler="heun", steps=steps, clip_x0=False)
    torch.testing.assert_close(x.double(), b + a * x_T.double(), rtol=0, atol=5e-4 * (1 + abs(a)))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_heun_reaches_the_data_and_converges_at_second_order(schedule):
    """Sampled at 100 and 200 evaluations, Heun's mean and std are the data's (MU, SIGMA) within 5
    Monte-Carlo standard errors. In closed form its std error (cosine / linear) is +150% / +125% at
    10 evaluations, +26% / +24% at 20, +3.1% / +2.9% at 50, +0.67% / +0.56% at 100: it falls over 4x
    from 50 to 100, as a second-order method's should, where DDIM's (-6.4% / -12% at 50) halves.
    So Heun is the closer from 50 evaluations on (linear: from 20), and at 10 it overshoots, std 2.5 x
    the data's against DDIM's 0.69 x: with 5 levels one Heun step spans sigma 3.2 -> 0.28, too long
    for a second-order rule on this data (Lu et al. 2022, arXiv:2206.00927, likewise find Heun behind
    DDIM near 10 evaluations)."""
    diffusion = GaussianDiffusion(T=1000, schedule=schedule)
    for steps in (100, 200):
        assert_moments_match(sample_moments(diffusion, "heun", steps), MU, SIGMA)
    alpha_bar = diffusion.alphas_cumprod.double().numpy()

    def error(sampler: str, steps: int) -> float:
        timesteps = diffusion.timesteps(sampler, steps, 999)
        if sampler == "heun":
            return abs(propagate_heun(alpha_bar, timesteps, MU, SIGMA)[1] / SIGMA - 1)
        return abs(propagate_deterministic(alpha_bar, timesteps, MU, SIGMA, "ddim")[1] / SIGMA - 1)

    assert error("heun", 50) / error("heun", 100) > 4 > 2.2 > error("ddim", 50) / error("ddim", 100)
    assert error("heun", 50) < error("ddim", 50) and error("heun", 100) < error("ddim", 100)
    assert error("heun", 10) > 1 > 0.6 > error("ddim", 10)


@pytest.mark.parametrize("steps", [4, 10, 11])
def test_heun_yields_each_evaluation_then_the_result(steps):
    diffusion = GaussianDiffusion(T=100)
    oracle = CountingOracle(diffusion, MU, SIGMA)
    run = list(diffusion.sample_progressive(oracle, 2, sampler="heun", steps=steps, image_shape=MNIST_SHAPE))
    assert oracle.calls == [step.t for step in run[:-1]] == diffusion.timesteps("heun", steps, 99)
    assert run[-1].t == -1 and all(step.x_t.shape == (2, 1, 28, 28) for step in run)
    torch.testing.assert_close(run[-1].x_t, run[-2].pred_x0)  # the last Euler step lands on D(x; sigma)


def test_heun_with_churn_is_stochastic_and_still_reaches_the_data():
    """Algorithm 2 with S_churn = 5: the noise is raised to trained steps at or above each level, so
    the evaluations see t >= the plain levels; reproducible with a generator, different from S_churn = 0,
    and at 200 evaluations still the data's moments within 5 standard errors."""
    diffusion = GaussianDiffusion(T=1000)
    oracle = GaussianOracle(diffusion, MU, SIGMA)
    kwargs = {"sampler": "heun", "steps": 11, "image_shape": MNIST_SHAPE, "clip_x0": False}
    runs = [
        list(
            diffusion.sample_progressive(
                oracle, 2, generator=torch.Generator().manual_seed(0), s_churn=5, **kwargs
            )
        )
        for _ in range(2)
    ]
    plain = diffusion.sample(oracle, 2, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(runs[0][-1].x_t, runs[1][-1].x_t, rtol=0, atol=0)
    assert not torch.allclose(runs[0][-1].x_t, plain)
    churned, levels = [step.t for step in runs[0][:-1]], diffusion.timesteps("heun", 11, 999)
    assert all(t >= level for t, level in zip(churned, levels, strict=True)) and churned != levels
    generator = torch.Generator().manual_seed(0)
    x = diffusion.sample(oracle, N_SAMPLES, generator=generator, s_churn=5, **kwargs | {"steps": 200})
    assert_moments_match((x.double().mean().item(), x.double().std().item(), x.numel()), MU, SIGMA)
    with pytest.raises(ValueError, match="s_churn"):
        diffusion.sample(oracle, 2, s_churn=-1, **kwargs)


# ----- the reverse step, progressive sampling, guidance, loss ----------------------------------


def test_reverse_step_at_t0_returns_the_x0_prediction_without_noise():
    diffusion = GaussianDiffusion(T=100)
    oracle = GaussianOracle(diffusion, MU, SIGMA)
    x = torch.randn(3, 1, 28, 28)
    first = diffusion._reverse_step(oracle, x, 0, torch.Generator().manual_seed(0))
    second = diffusion._reverse_step(oracle, x, 0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(first[0], first[1])
    torch.testing.assert_close(first[0], second[0])


def test_sample_progressive_yields_each_step_then_the_result():
    diffusion = GaussianDiffusion(T=100)
    oracle = GaussianOracle(diffusion, MU, SIGMA)
    steps = list(diffusion.sample_progressive(oracle, 2, sampler="ddim", steps=5, image_shape=MNIST_SHAPE))
    assert [step.t for step in steps] == [99, 74, 50, 25, 0, -1]
    assert all(isinstance(step, SamplerStep) and step.x_t.shape == (2, 1, 28, 28) for step in steps)
    torch.testing.assert_close(steps[-1].x_t, steps[-2].pred_x0)


def test_reconstruct_starts_from_noised_images_at_t():
    diffusion = GaussianDiffusion(T=100)
    oracle = GaussianOracle(diffusion, MU, SIGMA)
    x0 = torch.full((2, 1, 28, 28), 0.3)
    steps = list(diffusion.reconstruct(oracle, x0, 40, generator=torch.Generator().manual_seed(0)))
    assert [s.t for s in steps][:3] == [40, 39, 38] and steps[-1].t == -1 and len(steps) == 42
    x_start = steps[0].x_t
    assert x_start.mean().item() == pytest.approx(diffusion.sqrt_alphas_cumprod[40].item() * 0.3, abs=0.05)


def test_sampling_is_reproducible_with_a_generator():
    diffusion = GaussianDiffusion(T=50)
    oracle = GaussianOracle(diffusion, MU, SIGMA)
    runs = [
        diffusion.sample(oracle, 2, generator=torch.Generator().manual_seed(7), image_shape=MNIST_SHAPE)
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    other = diffusion.sample(oracle, 2, generator=torch.Generator().manual_seed(8), image_shape=MNIST_SHAPE)
    assert not torch.equal(runs[0], other)


class LabelEcho(nn.Module):
    """A stand-in network whose output is its label (null label 10) broadcast to the image."""

    num_classes = 10

    def forward(self, x, t, labels):
        return labels.float().reshape(-1, 1, 1, 1).expand_as(x)


def test_classifier_free_guidance_mixes_conditional_and_null_predictions():
    diffusion, model = GaussianDiffusion(T=10), LabelEcho()
    x, t, labels = torch.zeros(2, 1, 4, 4), torch.tensor([3, 3]), torch.tensor([2, 7])
    plain = diffusion.model_output(model, x, t, labels, guidance=1.0)
    guided = diffusion.model_output(model, x, t, labels, guidance=3.0)
    torch.testing.assert_close(plain[:, 0, 0, 0], torch.tensor([2.0, 7.0]))
    # uncond + w (cond - uncond) = 10 + 3 (label - 10)
    torch.testing.assert_close(guided[:, 0, 0, 0], torch.tensor([10 + 3 * (2 - 10.0), 10 + 3 * (7 - 10.0)]))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_heun_passes_labels_and_guidance_to_every_evaluation(guidance):
    diffusion = GaussianDiffusion(T=100)
    spy, labels = LabelSpy(diffusion), torch.tensor([2, 7])
    diffusion.sample(
        spy, 2, sampler="heun", steps=10, labels=labels, guidance=guidance, image_shape=(1, 4, 4)
    )
    expected = [2, 7] if guidance == 1.0 else [2, 7, 10, 10]
    assert spy.seen == [expected] * len(diffusion.timesteps("heun", 10, 99))


class Zeros(nn.Module):
    def forward(self, x, t, labels=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_loss_is_algorithm_1_with_min_snr_weights(prediction):
    diffusion = GaussianDiffusion(T=1000, prediction=prediction)
    x0 = torch.rand(64, 1, 28, 28) * 2 - 1
    loss = diffusion.training_loss(Zeros(), x0, min_snr_gamma=5.0, generator=torch.Generator().manual_seed(0))
    # the same draws, by hand: t ~ U{0..T-1}, eps ~ N(0, I), target eps or v, weight min(snr, 5)/(snr [+1])
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (64,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    alpha_bar = diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    target = noise if prediction == "eps" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    snr = alpha_bar.flatten() / (1 - alpha_bar.flatten())
    weight = snr.clamp(max=5.0) / (snr if prediction == "eps" else snr + 1)
    expected = (weight * target.pow(2).mean(dim=(1, 2, 3))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = diffusion.training_loss(Zeros(), x0, generator=torch.Generator().manual_seed(0))
    assert plain.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)
