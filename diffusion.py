"""Gaussian diffusion (DDPM) and its samplers: the math of the repo in one file.

Follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239), with the
cosine schedule of Nichol & Dhariwal 2021 (arXiv:2102.09672), DDIM of Song et al. 2021
(arXiv:2010.02502), v-prediction of Salimans & Ho 2022 (arXiv:2202.00512), min-SNR weighting of
Hang et al. 2023 (arXiv:2303.09556), DPM-Solver++ of Lu et al. 2022 (arXiv:2211.01095) and
classifier-free guidance of Ho & Salimans 2022 (arXiv:2207.12598).

Timestep convention (one for the whole repo): t is an integer index in {0, ..., T-1}, and index t
is the paper's step t+1. So `betas[0]` is the paper's beta_1, `alphas_cumprod[t]` is alpha_bar_{t+1},
and `alphas_cumprod_prev[0] = 1` is alpha_bar_0. Samplers report the clean end of the chain (the
paper's x_0) as t = -1.

Example:
    diffusion = GaussianDiffusion(T=1000, schedule="cosine").to("cuda")
    images = diffusion.sample(model, 64, sampler="ddim", steps=50, image_shape=(1, 28, 28))  # in [-1, 1]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "v")
SAMPLERS = ("ddpm", "ddim", "dpm++2m")
DEFAULT_FAST_STEPS = 50  # model evaluations of DDIM and DPM-Solver++ when steps is not given
COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal eq. 17
MAX_BETA = 0.999  # clip of the cosine betas (Nichol & Dhariwal, section 3.2)
LINEAR_BETA_START, LINEAR_BETA_END = 1e-4, 0.02  # Ho et al. section 4, scaled for T = 1000
COSINE_SOLVER_END = 0.9946  # DPM-Solver's end time for the cosine schedule, as a fraction of T


def cosine_alphas_cumprod(T: int) -> np.ndarray:
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2) for t = 0..T (eq. 17)."""
    steps = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    return f / f[0]


def make_betas(schedule: str, T: int) -> np.ndarray:
    """betas[t] = beta_{t+1} in float64, shape [T]."""
    if schedule == "linear":
        scale = 1000 / T  # keeps alpha_bar_T the same for other T (improved-diffusion)
        return np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, T, dtype=np.float64)
    if schedule == "cosine":
        alpha_bar = cosine_alphas_cumprod(T)
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], MAX_BETA)  # Nichol & Dhariwal eq. 17
    raise ValueError(f"unknown schedule {schedule!r}: choose one of {SCHEDULES}")


def extract(values: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Look up values[t] for a batch of timesteps t: [B], reshaped to [B, 1, 1, 1] to broadcast."""
    return values[t].reshape(t.shape[0], *([1] * (len(shape) - 1)))


class SamplerStep(NamedTuple):
    """One step of a sampler: at timestep t the chain is at x_t and the model predicts pred_x0.

    The last step a sampler yields has t = -1: x_t is the finished sample (the paper's x_0).
    """

    t: int
    x_t: torch.Tensor
    pred_x0: torch.Tensor


class GaussianDiffusion(nn.Module):
    """The forward process q and the learned reverse process p of DDPM, for a given noise schedule.

    Holds no trainable weights: only schedule buffers, rebuilt from (T, schedule, prediction). The
    buffers move with `.to(device)` and are excluded from `state_dict()`.
    """

    def __init__(self, T: int = 1000, schedule: str = "cosine", prediction: str = "eps"):
        super().__init__()
        if T < 2:
            raise ValueError(f"T must be at least 2, got {T}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: choose one of {PREDICTIONS}")
        self.T, self.schedule, self.prediction = T, schedule, prediction
        betas = make_betas(schedule, T)
        alphas_cumprod = np.cumprod(1 - betas)  # alpha_bar_t = prod_s (1 - beta_s)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # eq. 7: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t (0 at t = 0)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        coefficients = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - alphas_cumprod),
            "posterior_variance": posterior_variance,
            # log(0) at t = 0 is replaced by the next value, as in improved-diffusion
            "posterior_log_variance_clipped": np.log(
                np.append(posterior_variance[1], posterior_variance[1:])
            ),
            # eq. 7: mu_tilde = coef1 * x_0 + coef2 * x_t
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * np.sqrt(1 - betas) / (1 - alphas_cumprod),
        }
        for name, values in coefficients.items():
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)
        self.alphas_cumprod_float64 = alphas_cumprod  # host copy for the samplers' scalar coefficients

    def config(self) -> dict:
        """The plain-Python values that rebuild this process: GaussianDiffusion(**config)."""
        return {"T": self.T, "schedule": self.schedule, "prediction": self.prediction}

    # ----- forward process -----------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (eq. 4).

        x0, noise: [B, C, H, W]; t: [B] long.
        """
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
        )

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7); both broadcast to x_t's shape."""
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x0
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        return mean, extract(self.posterior_variance, t, x_t.shape)

    # ----- what the network predicts ------------------------------------------------------------

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target: eps, or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0."""
        if self.prediction == "eps":
            return noise
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
        )

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """Invert eq. 4 for x_0 given the network's eps (or v) prediction."""
        sqrt_ab = extract(self.sqrt_alphas_cumprod, t, x_t.shape)
        sqrt_one_minus_ab = extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        if self.prediction == "eps":
            return (x_t - sqrt_one_minus_ab * model_output) / sqrt_ab
        return sqrt_ab * x_t - sqrt_one_minus_ab * model_output

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes x0 to x_t under eq. 4: (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)."""
        return (x_t - extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x0) / extract(
            self.sqrt_one_minus_alphas_cumprod, t, x_t.shape
        )

    def model_output(
        self,
        model: nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """The network's prediction, mixed with the null-label one for classifier-free guidance.

        guided = uncond + guidance * (cond - uncond) (Ho & Salimans eq. 6 with w = guidance - 1);
        guidance = 1 is the plain conditional model. The null label is `model.num_classes`.
        """
        if labels is None or guidance == 1.0:
            return model(x_t, t, labels)
        null_labels = torch.full_like(labels, model.num_classes)
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null_labels]))
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    # ----- reverse process ----------------------------------------------------------------------

    def p_mean_variance(
        self,
        model: nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
        clip_x0: bool = True,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_hat), beta_tilde_t) (eq. 11 through eq. 7).

        x0_hat is clipped to [-1, 1] (the data range) when clip_x0. Returns mean, variance,
        log_variance and pred_x0, each [B, C, H, W] (variances [B, 1, 1, 1]).
        """
        pred_x0 = self.predict_x0(x_t, t, self.model_output(model, x_t, t, labels, guidance))
        if clip_x0:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, variance = self.q_posterior(pred_x0, x_t, t)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0}

    def _reverse_step(
        self,
        model: nn.Module,
        x_t: torch.Tensor,
        t: int,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
        clip_x0: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} (Algorithm 2, line 4); returns (x_{t-1}, pred_x0).

        The noise uses the posterior variance beta_tilde (zero at t = 0, where x_{t-1} = x0_hat).
        """
        batch_t = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        out = self.p_mean_variance(model, x_t, batch_t, labels, guidance, clip_x0)
        if t == 0:
            return out["mean"], out["pred_x0"]
        noise = _randn_like(x_t, generator)
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise, out["pred_x0"]

    # ----- training -----------------------------------------------------------------------------

    def training_loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor | None = None,
        min_snr_gamma: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), MSE between the network and its target.

        With min_snr_gamma, each example is weighted by min(SNR_t, gamma) / SNR_t for eps, or
        min(SNR_t, gamma) / (SNR_t + 1) for v (Hang et al. eq. 9), SNR_t = alpha_bar / (1 - alpha_bar).
        """
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device, generator=generator)
        noise = _randn_like(x0, generator)
        prediction = model(self.q_sample(x0, t, noise), t, labels)
        target = self.training_target(x0, t, noise)
        per_example = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if min_snr_gamma is None:
            return per_example.mean()
        snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
        clipped = snr.clamp(max=min_snr_gamma)
        weight = clipped / snr if self.prediction == "eps" else clipped / (snr + 1)
        return (weight * per_example).mean()

    # ----- sampling -----------------------------------------------------------------------------

    def timesteps(self, sampler: str, steps: int | None, start_t: int) -> list[int]:
        """The timesteps a sampler evaluates the model at, from start_t down to 0.

        DDPM visits every step. DDIM visits `steps` evenly spaced ones that start at start_t and end
        at 0 (start_t = 999, 10 steps: 999, 888, ..., 111, 0). DPM-Solver++ spaces them evenly in
        lambda = log(alpha / sigma) (see _log_snr_uniform_timesteps).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: choose one of {SAMPLERS}")
        if not 0 <= start_t < self.T:
            raise ValueError(f"t must be in [0, {self.T - 1}], got {start_t}")
        if sampler == "ddpm":
            if steps is not None and steps != start_t + 1:
                raise ValueError(f"ddpm runs every step ({start_t + 1} here); use ddim for fewer")
            return list(range(start_t, -1, -1))
        steps = min(DEFAULT_FAST_STEPS, start_t + 1) if steps is None else steps
        if not 1 <= steps <= start_t + 1:
            raise ValueError(f"steps must be in [1, {start_t + 1}] to start at t={start_t}, got {steps}")
        if steps == 1:
            return [start_t]
        if sampler == "ddim":
            return [int(round(s)) for s in np.linspace(start_t, 0, steps)]
        return self._log_snr_uniform_timesteps(steps, start_t)

    def _log_snr_uniform_timesteps(self, steps: int, start_t: int) -> list[int]:
        """`steps` timesteps from start_t to 0, evenly spaced in lambda: DPM-Solver's spacing (Lu et al.
        2022, arXiv:2206.00927, section 3.3), each rounded to the index of the nearest lambda.

        The cosine schedule's lambda falls to -inf at its end (the last betas are clipped at 0.999),
        so, as in DPM-Solver's code, its lambda range starts at time 0.9946 T (index 993 of 1000),
        and the first step stays at start_t. Indices that round together are moved apart, so the
        list is strictly decreasing; 2 <= steps <= start_t + 1.
        """
        lambdas = 0.5 * np.log(self.alphas_cumprod_float64 / (1 - self.alphas_cumprod_float64))
        top = start_t
        if self.schedule == "cosine":
            top = min(start_t, math.floor(COSINE_SOLVER_END * self.T) - 1)
        targets = np.linspace(lambdas[top], lambdas[0], steps)
        timesteps = [int(np.argmin(np.abs(lambdas[: top + 1] - target))) for target in targets]
        timesteps[0], timesteps[-1] = start_t, 0
        for i in range(1, steps):  # strictly below the step before
            timesteps[i] = min(timesteps[i], timesteps[i - 1] - 1)
        timesteps[-1] = 0
        for i in range(steps - 2, -1, -1):  # and room for the ones after, down to 0
            timesteps[i] = max(timesteps[i], timesteps[i + 1] + 1)
        return timesteps

    @torch.no_grad()
    def sample_progressive(
        self,
        model: nn.Module,
        n: int | None = None,
        sampler: str = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
        x_start: torch.Tensor | None = None,
        start_t: int | None = None,
        clip_x0: bool = True,
        image_shape: tuple[int, int, int] | None = None,
    ) -> Iterator[SamplerStep]:
        """Run the reverse process, yielding a SamplerStep at each model evaluation, then the result.

        Starts from x_start at start_t (default: n images of pure noise [n, *image_shape] at t = T-1).
        Samplers: "ddpm" (Algorithm 2), "ddim" (DDIM eq. 12 with eta) and "dpm++2m" (DPM-Solver++(2M)).
        """
        start_t = self.T - 1 if start_t is None else start_t
        timesteps = self.timesteps(sampler, steps, start_t)
        device = self.betas.device
        if x_start is None:
            if n is None or image_shape is None:
                raise ValueError("sampling from pure noise needs n and image_shape (C, H, W)")
            x_start = torch.randn((n, *image_shape), generator=generator, device=device)
        x_t = x_start.to(device)
        previous_x0 = None
        for index, t in enumerate(timesteps):
            t_prev = timesteps[index + 1] if index + 1 < len(timesteps) else -1
            if sampler == "ddpm":
                x_prev, pred_x0 = self._reverse_step(model, x_t, t, generator, labels, guidance, clip_x0)
            else:
                pred_x0 = self._predict_x0_at(model, x_t, t, labels, guidance, clip_x0)
                if sampler == "ddim":
                    x_prev = self._ddim_update(x_t, pred_x0, t, t_prev, eta, generator)
                else:
                    x_prev = self._dpm_solver_update(x_t, pred_x0, previous_x0, timesteps, index)
            yield SamplerStep(t, x_t, pred_x0)
            x_t, previous_x0 = x_prev, pred_x0
        yield SamplerStep(-1, x_t, x_t)

    def sample(self, model: nn.Module, n: int | None = None, **kwargs) -> torch.Tensor:
        """Run sample_progressive to the end and return the finished samples [n, C, H, W]."""
        return final_sample(self.sample_progressive(model, n, **kwargs))

    def reconstruct(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        t: int,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> Iterator[SamplerStep]:
        """Noise real images x0 to step t with q_sample (eq. 4), then run the reverse process to 0.

        Yields the SamplerSteps of sample_progressive, which starts at the noised x_t.
        """
        batch_t = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
        x_t = self.q_sample(x0, batch_t, _randn_like(x0, generator))
        return self.sample_progressive(model, x_start=x_t, start_t=t, generator=generator, **kwargs)

    def _predict_x0_at(self, model, x_t, t, labels, guidance, clip_x0) -> torch.Tensor:
        batch_t = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        pred_x0 = self.predict_x0(x_t, batch_t, self.model_output(model, x_t, batch_t, labels, guidance))
        return pred_x0.clamp(-1, 1) if clip_x0 else pred_x0

    def _alpha_bar(self, t: int) -> float:
        """alpha_bar at index t as a Python float, with alpha_bar = 1 at the clean end t = -1."""
        return 1.0 if t < 0 else float(self.alphas_cumprod_float64[t])

    def _ddim_update(self, x_t, pred_x0, t: int, t_prev: int, eta: float, generator) -> torch.Tensor:
        """DDIM eq. 12: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z.

        sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev) (DDIM eq. 16).
        """
        alpha_bar, alpha_bar_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        eps = (x_t - math.sqrt(alpha_bar) * pred_x0) / math.sqrt(1 - alpha_bar)
        sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        x_prev = (
            math.sqrt(alpha_bar_prev) * pred_x0 + math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
        )
        if sigma > 0:
            x_prev = x_prev + sigma * _randn_like(x_t, generator)
        return x_prev

    def _dpm_solver_update(self, x_t, pred_x0, previous_x0, timesteps: list[int], index: int):
        """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in the data-prediction form.

        With alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma), h = lambda_prev - lambda_t:
        x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (exp(-h) - 1) D, where D = x0_hat (first order,
        used at the first and last steps) or D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_before,
        r = h_before / h (second order).
        """
        t = timesteps[index]
        t_prev = timesteps[index + 1] if index + 1 < len(timesteps) else -1
        if t_prev < 0:
            return pred_x0  # the clean end: sigma = 0, lambda = inf, x_prev = x0_hat
        lam, lam_prev = self._log_snr_half(t), self._log_snr_half(t_prev)
        h = lam_prev - lam
        data_estimate = pred_x0
        if previous_x0 is not None:
            r = (lam - self._log_snr_half(timesteps[index - 1])) / h
            data_estimate = (1 + 1 / (2 * r)) * pred_x0 - (1 / (2 * r)) * previous_x0
        alpha_bar, alpha_bar_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        sigma_ratio = math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
        return sigma_ratio * x_t - math.sqrt(alpha_bar_prev) * math.expm1(-h) * data_estimate

    def _log_snr_half(self, t: int) -> float:
        """lambda_t = log(alpha_t / sigma_t) = 0.5 * log(alpha_bar / (1 - alpha_bar))."""
        alpha_bar = self._alpha_bar(t)
        return 0.5 * math.log(alpha_bar / (1 - alpha_bar))


def final_sample(steps: Iterable[SamplerStep]) -> torch.Tensor:
    """Drain a sampler's steps without keeping them and return the finished images (the t = -1 step)."""
    return deque(steps, maxlen=1).pop().x_t


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from generator (which must live on x's device)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
