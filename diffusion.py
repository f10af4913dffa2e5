"""Gaussian diffusion (DDPM) and its samplers: the math of the repo in one file.

Follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239), with the
cosine schedule of Nichol & Dhariwal 2021 (arXiv:2102.09672), DDIM of Song et al. 2021
(arXiv:2010.02502), v-prediction of Salimans & Ho 2022 (arXiv:2202.00512), the network preconditioning
of Karras et al. 2022 (EDM, arXiv:2206.00364, Table 1) on this discrete schedule, min-SNR weighting of
Hang et al. 2023 (arXiv:2303.09556), the learned variance and hybrid loss of Nichol & Dhariwal
(eq. 15, section 3.1) with their respaced sampling in fewer steps (section 4), DPM-Solver++ of Lu et
al. 2022 (arXiv:2211.01095), the Heun sampler of Karras et al. 2022 (arXiv:2206.00364),
classifier-free guidance of Ho & Salimans 2022 (arXiv:2207.12598), and two edits of real images:
DDIM inversion (Song et al., section 4.3) and RePaint inpainting (Lugmayr et al. 2022, arXiv:2201.09865).

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
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "v", "edm")
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "heun")
# The samplers' noise: one generator, or one per sample (row i of every draw from generator i)
Generators = torch.Generator | list[torch.Generator] | None
DEFAULT_FAST_STEPS = 50  # model evaluations of DDIM, DPM-Solver++ and Heun when steps is not given
HEUN_MIN_LEVELS = 2  # Karras levels of the shortest Heun run: one Heun step, then Euler's to sigma = 0
KARRAS_RHO = 7.0  # rho of Karras et al. eq. 5
KARRAS_SIGMA_MAX = 80.0  # Karras et al.'s largest sigma (Table 1), in x / sqrt(alpha_bar) units
REPAINT_JUMP_LENGTH, REPAINT_RESAMPLES = 10, 10  # j and r of Lugmayr et al., section 4.2
SLERP_MIN_SIN = 1e-6  # below this sin(angle), slerp falls back to linear interpolation
EDM_SIGMA_DATA = 0.5  # sigma_data of Karras et al. (Table 1): the data's standard deviation assumed
COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal eq. 17
MAX_BETA = 0.999  # clip of the cosine betas (Nichol & Dhariwal, section 3.2)
LINEAR_BETA_START, LINEAR_BETA_END = 1e-4, 0.02  # Ho et al. section 4, scaled for T = 1000
COSINE_SOLVER_END = 0.9946  # DPM-Solver's end time for the cosine schedule, as a fraction of T
VLB_WEIGHT = 0.001  # lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal, section 3.1)
BIN_HALF_WIDTH = 1 / 255  # 8-bit values on [-1, 1] sit 2/255 apart (the decoder's bins, eq. 13)
EDGE = 0.999  # pixels beyond +-EDGE are in the end bins (-1 and 1), open to -inf and +inf
MIN_PROBABILITY = 1e-12  # floor of a bin's probability before the log


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


def edm_coefficients(alphas_cumprod: np.ndarray, sigma_data: float) -> dict[str, np.ndarray]:
    """Karras et al.'s c_in, c_skip and c_out (Table 1) as multipliers of x_t and F, per index t:
    edm_input_scale = 1 / D_t, edm_skip = s^2 sqrt(alpha_bar) / D_t^2, edm_out = s sqrt(1 - alpha_bar) / D_t,
    with D_t^2 = 1 - alpha_bar + s^2 alpha_bar (GaussianDiffusion's docstring derives them)."""
    variance = 1 - alphas_cumprod + sigma_data**2 * alphas_cumprod
    return {
        "edm_input_scale": 1 / np.sqrt(variance),
        "edm_skip": sigma_data**2 * np.sqrt(alphas_cumprod) / variance,
        "edm_out": sigma_data * np.sqrt(1 - alphas_cumprod) / np.sqrt(variance),
    }


def extract(values: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Look up values[t] for a batch of timesteps t: [B], reshaped to [B, 1, 1, 1] to broadcast."""
    return values[t].reshape(t.shape[0], *([1] * (len(shape) - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) element-wise, in nats (arguments broadcast)."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(bin of x) element-wise under N(means, e^(2 log_scales)) cut into 256 bins (Ho et al. eq. 13).

    x: 8-bit values on [-1, 1] (k / 127.5 - 1); the bin of x is [x - 1/255, x + 1/255], except the
    end bins (-inf, -1 + 1/255] and [1 - 1/255, inf), so the 256 probabilities sum to 1.
    """
    inverse_scale = torch.exp(-log_scales)
    upper = inverse_scale * (x - means + BIN_HALF_WIDTH)
    lower = inverse_scale * (x - means - BIN_HALF_WIDTH)
    log_below_upper = torch.special.log_ndtr(upper)  # log Phi(upper): the bottom bin
    log_above_lower = torch.special.log_ndtr(-lower)  # log (1 - Phi(lower)): the top bin
    inside = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=MIN_PROBABILITY).log()
    return torch.where(x < -EDGE, log_below_upper, torch.where(x > EDGE, log_above_lower, inside))


def mean_bits(nats: torch.Tensor) -> torch.Tensor:
    """[B, ...] nats -> [B] bits per dimension (mean over all but the batch axis, / log 2)."""
    return nats.flatten(1).mean(dim=1) / math.log(2.0)


class Posterior(NamedTuple):
    """q(x_{t'} | x_t, x_0) for a step down from t to t' < t, and the betas of that step; each field
    [B, 1, 1, 1]. One step (t' = t - 1): eqs. 6-7. A respaced step (improved-diffusion's respace.py):
    the same formulas with beta = 1 - alpha_bar_t / alpha_bar_t'."""

    mean_coef1: torch.Tensor  # mu_tilde = mean_coef1 x_0 + mean_coef2 x_t (eq. 7)
    mean_coef2: torch.Tensor
    variance: torch.Tensor  # beta_tilde (eq. 7), 0 at the last step
    log_variance_clipped: torch.Tensor  # log beta_tilde, at the last step that of the step above it
    log_beta: torch.Tensor  # log beta: the upper end of the learned variance (Nichol & Dhariwal eq. 15)


class SamplerStep(NamedTuple):
    """One step of a sampler: at timestep t the chain is at x_t and the model predicts pred_x0.

    The last step a sampler yields has t = -1: x_t is the finished sample (the paper's x_0).
    """

    t: int
    x_t: torch.Tensor
    pred_x0: torch.Tensor


class GaussianDiffusion(nn.Module):
    """The forward process q and the learned reverse process p of DDPM, for a given noise schedule.

    Holds no trainable weights: only schedule buffers, rebuilt from (T, schedule, prediction,
    learn_sigma). The buffers move with `.to(device)` and are excluded from `state_dict()`.

    learn_sigma (Nichol & Dhariwal 2021, section 3.1): the network outputs 2C channels, its eps (or v)
    prediction and then the v of eq. 15, the reverse variance Sigma = exp(v log beta + (1 - v) log
    beta_tilde) with v = (output + 1) / 2 per dimension, trained by L_hybrid; without it Sigma =
    beta_tilde (Ho et al.'s fixed choice).

    prediction: what the network outputs: eps (Ho et al.), v (Salimans & Ho), or edm, the F of
    Karras et al.'s preconditioning (Table 1) on this schedule. With sigma_t = sqrt((1 - alpha_bar) /
    alpha_bar), y = x_t / sqrt(alpha_bar) = x_0 + sigma_t eps, and s = EDM_SIGMA_DATA, their denoiser
    D(y) = c_skip y + c_out F(c_in y) with c_skip = s^2 / (sigma^2 + s^2), c_out = sigma s /
    sqrt(sigma^2 + s^2), c_in = 1 / sqrt(sigma^2 + s^2) reads, in x_t and D_t^2 = 1 - alpha_bar +
    s^2 alpha_bar (x_t's variance when x_0's is s^2):
        network input x_t / D_t,  x0_hat = s^2 sqrt(alpha_bar) x_t / D_t^2 + s sqrt(1 - alpha_bar) F / D_t,
    and F's target (x_0 - c_skip y) / c_out = (sqrt(1 - alpha_bar) x_0 - s^2 sqrt(alpha_bar) eps) / (s D_t),
    regressed with weight 1 (their lambda(sigma) = 1 / c_out^2 on x0_hat's error). c_noise stays the
    integer t of the time embedding. With s = 1 this is v-prediction with F = -v.
    """

    # the schedule buffers, each [T] float32 (registered in __init__, named as in improved-diffusion)
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    log_betas: torch.Tensor
    edm_input_scale: torch.Tensor
    edm_skip: torch.Tensor
    edm_out: torch.Tensor

    def __init__(
        self, T: int = 1000, schedule: str = "cosine", prediction: str = "eps", learn_sigma: bool = False
    ):
        super().__init__()
        if T < 2:
            raise ValueError(f"T must be at least 2, got {T}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: choose one of {PREDICTIONS}")
        self.T, self.schedule, self.prediction, self.learn_sigma = T, schedule, prediction, learn_sigma
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
            "log_betas": np.log(betas),  # the upper end of the learned log-variance (eq. 15)
            **edm_coefficients(alphas_cumprod, EDM_SIGMA_DATA),
        }
        for name, values in coefficients.items():
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)
        self.alphas_cumprod_float64 = alphas_cumprod  # host copy for the samplers' scalar coefficients

    def config(self) -> dict:
        """The plain-Python values that rebuild this process: GaussianDiffusion(**config). A config
        without learn_sigma (older checkpoints) rebuilds a fixed-variance process."""
        return {
            "T": self.T,
            "schedule": self.schedule,
            "prediction": self.prediction,
            "learn_sigma": self.learn_sigma,
        }

    def output_channels(self, image_channels: int) -> int:
        """Channels the network outputs for images of image_channels: C, or 2C with learn_sigma."""
        return 2 * image_channels if self.learn_sigma else image_channels

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

    def posterior(self, t: torch.Tensor, shape: torch.Size) -> Posterior:
        """The Posterior of the one-step moves t -> t - 1 from the buffers (eqs. 6-7); t: [B]."""
        return Posterior(
            *(
                extract(values, t, shape)
                for values in (
                    self.posterior_mean_coef1,
                    self.posterior_mean_coef2,
                    self.posterior_variance,
                    self.posterior_log_variance_clipped,
                    self.log_betas,
                )
            )
        )

    def respaced_posterior(self, t: int, t_prev: int, t_above: int | None, x_t: torch.Tensor) -> Posterior:
        """The Posterior of the move t -> t_prev (t_prev < t; -1: to x_0) of a chain respaced to fewer
        steps (improved-diffusion's respace.py): beta = 1 - alpha_bar_t / alpha_bar_t_prev, then eqs. 6-7
        with it, in float64; each field [B, 1, 1, 1] like x_t. At the last move (t_prev = -1, where
        beta_tilde = 0) the clipped log-variance is the beta_tilde of the move t_above -> t above it
        (beta's when the chain has that one move only: no noise is drawn there)."""
        beta, variance, coef1, coef2 = self._respaced_step(t, t_prev)
        clipped = variance
        if t_prev < 0:
            clipped = beta if t_above is None else self._respaced_step(t_above, t)[1]
        values = (coef1, coef2, variance, math.log(clipped), math.log(beta))
        return Posterior(*(torch.full((x_t.shape[0], *[1] * (x_t.dim() - 1)), v).to(x_t) for v in values))

    def _respaced_step(self, t: int, t_prev: int) -> tuple[float, float, float, float]:
        """(beta, beta_tilde, mean_coef1, mean_coef2) of the move t -> t_prev (eq. 7 with
        beta = 1 - alpha_bar_t / alpha_bar_t_prev, alpha_bar = 1 at t_prev = -1), in float64."""
        alpha_bar, alpha_bar_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        beta = 1 - alpha_bar / alpha_bar_prev
        variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
        coef1 = beta * math.sqrt(alpha_bar_prev) / (1 - alpha_bar)
        coef2 = (1 - alpha_bar_prev) * math.sqrt(1 - beta) / (1 - alpha_bar)
        return beta, variance, coef1, coef2

    # ----- what the network predicts ------------------------------------------------------------

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target: eps, v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, or edm's F."""
        if self.prediction == "eps":
            return noise
        sqrt_ab = extract(self.sqrt_alphas_cumprod, t, x0.shape)
        sqrt_one_minus_ab = extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape)
        if self.prediction == "v":
            return sqrt_ab * noise - sqrt_one_minus_ab * x0
        # edm: F = (sqrt(1 - alpha_bar) x_0 - s^2 sqrt(alpha_bar) eps) / (s D_t), 1 / D_t = edm_input_scale
        scale = extract(self.edm_input_scale, t, x0.shape) / EDM_SIGMA_DATA
        return scale * (sqrt_one_minus_ab * x0 - EDM_SIGMA_DATA**2 * sqrt_ab * noise)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """Invert eq. 4 for x_0 given the network's eps (or v) prediction; edm: D = c_skip y + c_out F."""
        if self.prediction == "edm":
            return (
                extract(self.edm_skip, t, x_t.shape) * x_t
                + extract(self.edm_out, t, x_t.shape) * model_output
            )
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
        guidance = 1 is the plain conditional model. The null label is `model.num_classes`. With
        learn_sigma only the eps (or v) half; model_prediction gives both.
        """
        return self.model_prediction(model, x_t, t, labels, guidance)[0]

    def model_prediction(
        self,
        model: nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps or v, guided as in model_output; the variance output of eq. 15 or None), each
        [B, C, H, W]. Guidance mixes only the eps (or v) half: the variance is the conditional one's."""
        if labels is None or guidance == 1.0:
            return self.split_output(self.network(model, x_t, t, labels))
        null_labels = torch.full_like(labels, cast(int, model.num_classes))  # the U-Net's null label
        both = self.network(model, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null_labels]))
        conditional, unconditional = both.chunk(2)
        (prediction, variance_output), (null_prediction, _) = (
            self.split_output(conditional),
            self.split_output(unconditional),
        )
        return null_prediction + guidance * (prediction - null_prediction), variance_output

    def network(
        self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The raw network output for x_t: the U-Net sees x_t, or with edm x_t / D_t (c_in y)."""
        if self.prediction == "edm":
            x_t = extract(self.edm_input_scale, t, x_t.shape) * x_t
        return model(x_t, t, labels)

    def split_output(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's output [B, C or 2C, H, W] as (eps or v [B, C, H, W], the raw variance output
        [B, C, H, W], or None without learn_sigma)."""
        if not self.learn_sigma:
            return output, None
        prediction, variance_output = output.chunk(2, dim=1)
        return prediction, variance_output

    @staticmethod
    def learned_log_variance(variance_output: torch.Tensor, posterior: Posterior) -> torch.Tensor:
        """Nichol & Dhariwal eq. 15: log Sigma = v log beta + (1 - v) log beta_tilde, with the network's
        raw output mapped to v = (output + 1) / 2 (improved-diffusion); beta_tilde's log is the clipped
        one. variance_output: [B, C, H, W] -> [B, C, H, W]."""
        v = (variance_output + 1) / 2
        return v * posterior.log_beta + (1 - v) * posterior.log_variance_clipped

    # ----- reverse process ----------------------------------------------------------------------

    def p_mean_variance(
        self,
        model: nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
        clip_x0: bool = True,
        posterior: Posterior | None = None,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_hat), Sigma) (eq. 11 through eq. 7), Sigma = beta_tilde_t
        or, with learn_sigma, Nichol & Dhariwal's eq. 15.

        x0_hat is clipped to [-1, 1] (the data range) when clip_x0. posterior: the move's Posterior
        (default the one step t -> t - 1; respaced_posterior for a respaced chain). Returns mean,
        variance, log_variance and pred_x0, each [B, C, H, W] (fixed variances [B, 1, 1, 1]).
        """
        prediction, variance_output = self.model_prediction(model, x_t, t, labels, guidance)
        return self.p_from_output(x_t, t, prediction, variance_output, clip_x0, posterior)

    def p_from_output(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        prediction: torch.Tensor,
        variance_output: torch.Tensor | None,
        clip_x0: bool = True,
        posterior: Posterior | None = None,
    ) -> dict[str, torch.Tensor]:
        """p_mean_variance for a given network output: prediction (eps or v) and variance_output (or
        None), each [B, C, H, W]."""
        posterior = self.posterior(t, x_t.shape) if posterior is None else posterior
        pred_x0 = self.predict_x0(x_t, t, prediction)
        if clip_x0:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean = posterior.mean_coef1 * pred_x0 + posterior.mean_coef2 * x_t  # eq. 7
        if variance_output is None:  # beta_tilde (0 at t = 0; its log the clipped one)
            variance, log_variance = posterior.variance, posterior.log_variance_clipped
        else:
            log_variance = self.learned_log_variance(variance_output, posterior)
            variance = log_variance.exp()
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0}

    def vb_terms_bpd(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """One term of the variational bound (Ho et al. eq. 5) in bits/dim [B] for p = p_mean_variance's
        output at x_t [B, C, H, W] (t [B]): L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) where
        t > 0, the discretized decoder's -log p(x_0 | x_1) (eq. 13) where t = 0. x0: 8-bit values."""
        true_mean, _ = self.q_posterior(x0, x_t, t)  # eqs. 6-7
        true_log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        kl = mean_bits(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"]))
        decoder = -mean_bits(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]))
        return torch.where(t == 0, decoder, kl)

    def _reverse_step(
        self,
        model: nn.Module,
        x_t: torch.Tensor,
        t: int,
        generator: Generators = None,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
        clip_x0: bool = True,
        t_prev: int | None = None,
        t_above: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step x_t -> x_{t_prev} (Algorithm 2, line 4); returns (x_{t_prev}, pred_x0).

        t_prev: t - 1 (default, the trained chain) or lower (a respaced chain: respaced_posterior, with
        t_above the chain's step above t, None at its top). The noise uses the reverse variance Sigma
        (beta_tilde, or the learned one); none at t = 0, where x_{t_prev} = x0_hat.
        """
        t_prev = t - 1 if t_prev is None else t_prev
        batch_t = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        posterior = None if t_prev == t - 1 else self.respaced_posterior(t, t_prev, t_above, x_t)
        out = self.p_mean_variance(model, x_t, batch_t, labels, guidance, clip_x0, posterior)
        if t_prev < 0:
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
        """Algorithm 1: t ~ U{0..T-1}, then the batch mean of training_losses."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device, generator=generator)
        return self.training_losses(model, x0, t, labels, min_snr_gamma, generator).mean()

    def training_losses(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        min_snr_gamma: float | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of each example [B] of x0 [B, C, H, W] at its timestep t [B]: eps ~ N(0, I), the MSE
        between the network and its target (L_simple, Algorithm 1), and with learn_sigma
        L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal, section 3.1; hybrid_vb_term).

        With min_snr_gamma, L_simple is weighted by min(SNR_t, gamma) / SNR_t for eps, or
        min(SNR_t, gamma) / (SNR_t + 1) for v (Hang et al. eq. 9), SNR_t = alpha_bar / (1 - alpha_bar).
        noise: eps drawn beforehand (a micro-batch's share of its batch's: loop.py), else drawn here.
        """
        noise = _randn_like(x0, generator) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        prediction, variance_output = self.split_output(self.network(model, x_t, t, labels).float())
        target = self.training_target(x0, t, noise)
        per_example = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        if min_snr_gamma is not None:
            per_example = per_example * self.min_snr_weights(t, min_snr_gamma)
        if variance_output is None:
            return per_example
        return per_example + self.hybrid_vb_term(x0, x_t, t, prediction, variance_output)

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Hang et al.'s weight of x0_hat's squared error, min(SNR_t, gamma), SNR_t = alpha_bar / (1 -
        alpha_bar), written on the network's output (x0_hat's error = its error times d x0_hat / d output):
        min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v (their eq. 9), min(SNR, gamma)
        c_out^2 for edm. t: [B] -> [B]."""
        snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
        clipped = snr.clamp(max=gamma)
        if self.prediction == "edm":
            return clipped * self.edm_out[t] ** 2
        return clipped / snr if self.prediction == "eps" else clipped / (snr + 1)

    def hybrid_vb_term(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        prediction: torch.Tensor,
        variance_output: torch.Tensor,
    ) -> torch.Tensor:
        """lambda L_vlb of L_hybrid per example [B]: L_vlb = sum_t L_t = T E_t[L_t], so lambda T L_t in
        bits/dim (vb_terms_bpd), with a stop-gradient on the mean (prediction detached: L_vlb trains
        only the variance) and x0_hat unclipped, as improved-diffusion's training_losses."""
        p = self.p_from_output(x_t, t, prediction.detach(), variance_output, clip_x0=False)
        return VLB_WEIGHT * self.T * self.vb_terms_bpd(x0, x_t, t, p)

    # ----- sampling -----------------------------------------------------------------------------

    def timesteps(self, sampler: str, steps: int | None, start_t: int) -> list[int]:
        """The timesteps a sampler evaluates the model at, from start_t down to 0.

        DDPM visits every step by default; with fewer `steps` it visits DDIM's, respaced as in
        improved-diffusion (see respaced_posterior). DDIM visits `steps` evenly spaced ones that start
        at start_t and end at 0 (start_t = 999, 10 steps: 999, 888, ..., 111, 0). DPM-Solver++ spaces
        them evenly in lambda = log(alpha / sigma) (see _log_snr_uniform_timesteps). Heun lists its
        evaluations (see _heun_timesteps): a level appears twice where a Heun step lands on it. The
        list's length is always the number of model evaluations.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: choose one of {SAMPLERS}")
        if not 0 <= start_t < self.T:
            raise ValueError(f"t must be in [0, {self.T - 1}], got {start_t}")
        if sampler == "ddpm" and steps in (None, start_t + 1):
            return list(range(start_t, -1, -1))
        steps = min(DEFAULT_FAST_STEPS, start_t + 1) if steps is None else steps
        fewest, most = self._heun_step_range(start_t) if sampler == "heun" else (1, start_t + 1)
        if not fewest <= steps <= most:
            raise ValueError(f"steps must be in [{fewest}, {most}] to start at t={start_t}, got {steps}")
        if sampler == "heun":
            return self._heun_timesteps(steps, start_t)
        if steps == 1:
            return [start_t]
        if sampler in ("ddim", "ddpm"):
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
        lambdas = self._log_snrs_half()
        top = start_t
        if self.schedule == "cosine":
            top = min(start_t, math.floor(COSINE_SOLVER_END * self.T) - 1)
        return self._nearest_distinct_timesteps(np.linspace(lambdas[top], lambdas[0], steps), start_t, top)

    def _karras_top(self, start_t: int) -> int:
        """The trained step of the nearest sigma (in log-sigma) to min(sigma at start_t, 80), 80 being
        Karras et al.'s sigma_max (Table 1): start_t itself unless the chain starts above sigma = 80, as
        it does at T-1 of both schedules (cosine: sigma = 2.0e4, its last beta clipped; linear: 157)."""
        target = -math.log(min(self._sigma(start_t), KARRAS_SIGMA_MAX))  # lambda = -log(sigma)
        return int(np.argmin(np.abs(self._log_snrs_half()[: start_t + 1] - target)))

    def _heun_step_range(self, start_t: int) -> tuple[int, int]:
        """Fewest and most evaluations heun can make from start_t: HEUN_MIN_LEVELS to top + 1 Karras
        levels (top = _karras_top), plus the entry step when top < start_t, within start_t + 1."""
        top = self._karras_top(start_t)
        entry = int(top < start_t)
        return 2 * HEUN_MIN_LEVELS - 1 + entry, min(start_t + 1, 2 * top + 2 + entry)

    def _heun_timesteps(self, steps: int, start_t: int) -> list[int]:
        """Heun's evaluations: N Karras levels k_0 > ... > k_{N-1} = 0 from k_0 = _karras_top(start_t)
        (_karras_timesteps), evaluated [k_0, k_1, k_1, ..., k_{N-1}, k_{N-1}]: each step k_i -> k_{i+1}
        evaluates at k_i (Euler) and at k_{i+1} (Heun's correction), the last, to sigma = 0, only at
        k_{N-1} (Karras et al. Algorithm 1): 2N - 1 evaluations. When k_0 < start_t, one Euler (DDIM)
        step from start_t enters first, evaluated at start_t: 2N evaluations. Karras' sampler never
        takes that step (it starts at sigma = 80), and a Heun step across it would multiply the
        float32 rounding of its Euler point by |h| / (2 sigma_next), 125 from the cosine schedule's
        T-1 to sigma = 80. So N = (steps + 1 - entry) // 2: the evaluations are steps, or steps - 1.
        """
        top = self._karras_top(start_t)
        entry = [start_t] if top < start_t else []
        levels = self._karras_timesteps((steps + 1 - len(entry)) // 2, top)
        return entry + levels[:1] + [t for t in levels[1:] for _ in range(2)]

    def _karras_timesteps(self, levels: int, top: int) -> list[int]:
        """`levels` noise levels from top to 0, spaced as Karras et al. eq. 5 (rho = 7):
        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, where
        sigma = sqrt((1 - alpha_bar) / alpha_bar), sigma_max = sigma at top and sigma_min = sigma at 0.

        Each sigma_i is rounded to the trained timestep of the nearest sigma in log-sigma (EDM's
        generate.py rounds to a discrete model's sigmas too), then moved apart as in
        _nearest_distinct_timesteps: the model only sees timesteps it was trained on, and the levels
        strictly decrease from top to 0; 2 <= levels <= top + 1.
        """
        root_max, root_min = self._sigma(top) ** (1 / KARRAS_RHO), self._sigma(0) ** (1 / KARRAS_RHO)
        sigmas = (root_max + np.linspace(0, 1, levels) * (root_min - root_max)) ** KARRAS_RHO
        return self._nearest_distinct_timesteps(-np.log(sigmas), top, top)  # lambda = -log(sigma)

    def _nearest_distinct_timesteps(self, targets: np.ndarray, start_t: int, top: int) -> list[int]:
        """Each target lambda rounded to the index (at most top) of the nearest lambda_t; start_t first,
        0 last, and indices that round together moved apart so the list strictly decreases."""
        lambdas = self._log_snrs_half()
        steps = len(targets)
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
        generator: Generators = None,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
        x_start: torch.Tensor | None = None,
        start_t: int | None = None,
        clip_x0: bool = True,
        image_shape: tuple[int, int, int] | None = None,
        s_churn: float = 0.0,
    ) -> Iterator[SamplerStep]:
        """Run the reverse process, yielding a SamplerStep at each model evaluation, then the result.

        Starts from x_start at start_t (default: n images of pure noise [n, *image_shape] at t = T-1).
        Samplers: "ddpm" (Algorithm 2; with fewer steps than t + 1, respaced as Nichol & Dhariwal
        section 4), "ddim" (DDIM eq. 12 with eta), "dpm++2m" (DPM-Solver++(2M)) and "heun" (Karras et
        al. Algorithm 1, or Algorithm 2 with S_churn = s_churn > 0). DDPM and DDIM with eta > 0 draw
        their noise with the reverse variance, the learned one with learn_sigma.
        """
        start_t = self.T - 1 if start_t is None else start_t
        timesteps = self.timesteps(sampler, steps, start_t)
        if s_churn < 0:
            raise ValueError(f"s_churn must be >= 0, got {s_churn}")
        device = self.betas.device
        if x_start is None:
            if n is None or image_shape is None:
                raise ValueError("sampling from pure noise needs n and image_shape (C, H, W)")
            x_start = _randn((n, *image_shape), generator, device, torch.float32)
        x_t = x_start.to(device)
        if sampler == "heun":
            yield from self._heun_steps(model, x_t, timesteps, s_churn, generator, labels, guidance, clip_x0)
            return
        previous_x0 = None
        for index, t in enumerate(timesteps):
            t_prev = timesteps[index + 1] if index + 1 < len(timesteps) else -1
            t_above = timesteps[index - 1] if index > 0 else None
            if sampler == "ddpm":
                x_prev, pred_x0 = self._reverse_step(
                    model, x_t, t, generator, labels, guidance, clip_x0, t_prev, t_above
                )
            else:
                pred_x0, variance_output = self._prediction_at(model, x_t, t, labels, guidance, clip_x0)
                if sampler == "ddim":
                    variance = None
                    if variance_output is not None and eta > 0 and t_prev >= 0:
                        posterior = self.respaced_posterior(t, t_prev, t_above, x_t)
                        variance = self.learned_log_variance(variance_output, posterior).exp()
                    x_prev = self._ddim_update(x_t, pred_x0, t, t_prev, eta, generator, variance)
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
        return self._prediction_at(model, x_t, t, labels, guidance, clip_x0)[0]

    def _prediction_at(
        self, model, x_t, t: int, labels, guidance, clip_x0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x0_hat, the variance output or None) of one evaluation at timestep t for the whole batch."""
        batch_t = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        prediction, variance_output = self.model_prediction(model, x_t, batch_t, labels, guidance)
        pred_x0 = self.predict_x0(x_t, batch_t, prediction)
        return (pred_x0.clamp(-1, 1) if clip_x0 else pred_x0), variance_output

    def _alpha_bar(self, t: int) -> float:
        """alpha_bar at index t as a Python float, with alpha_bar = 1 at the clean end t = -1."""
        return 1.0 if t < 0 else float(self.alphas_cumprod_float64[t])

    def _ddim_update(
        self, x_t, pred_x0, t: int, t_prev: int, eta: float, generator, variance=None
    ) -> torch.Tensor:
        """DDIM eq. 12: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z.

        sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev) (DDIM eq. 16): eta times
        the square root of beta_tilde of the move t -> t_prev, or of `variance` [B, C, H, W] where given
        (a learned Sigma of that move, Nichol & Dhariwal eq. 15).
        """
        alpha_bar, alpha_bar_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        eps = (x_t - math.sqrt(alpha_bar) * pred_x0) / math.sqrt(1 - alpha_bar)
        if variance is not None:
            sigma_learned = eta * variance.sqrt()
            direction = (1 - alpha_bar_prev - sigma_learned**2).clamp(min=0).sqrt()
            noise = _randn_like(x_t, generator)
            return math.sqrt(alpha_bar_prev) * pred_x0 + direction * eps + sigma_learned * noise
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

    def _sigma(self, t: int) -> float:
        """Karras' sigma of the VP process at index t: sqrt((1 - alpha_bar) / alpha_bar), 0 at t = -1."""
        alpha_bar = self._alpha_bar(t)
        return math.sqrt((1 - alpha_bar) / alpha_bar)

    def _heun_steps(
        self, model, x_t, timesteps: list[int], s_churn: float, generator, labels, guidance, clip_x0
    ) -> Iterator[SamplerStep]:
        """Karras et al. Algorithm 1 (Algorithm 2 when s_churn > 0, with S_tmin = 0, S_tmax = inf,
        S_noise = 1) on y = x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps, the VP chain in the sigma
        domain, through the levels of _heun_timesteps and then sigma = 0. A step is Heun's where its
        target is evaluated twice in `timesteps`, else Euler's (the last one, and the entry step).

        Yields a SamplerStep at each evaluation (x_t back in the VP scale), then the result.
        """
        levels = list(dict.fromkeys(timesteps))  # each level once, in order
        entry = int(self._karras_top(levels[0]) < levels[0])  # 1: levels[0] is the entry step's start
        gamma = min(s_churn / (len(levels) - entry), math.sqrt(2) - 1)  # Algorithm 2, line 4
        y = x_t / math.sqrt(self._alpha_bar(levels[0]))
        for i, t in enumerate(levels):
            t_next = levels[i + 1] if i + 1 < len(levels) else -1
            if gamma > 0 and i >= entry:
                t, y = self._churn(y, t, gamma, generator)
            slope, step = self._karras_slope(model, y, t, labels, guidance, clip_x0)
            yield step
            h = self._sigma(t_next) - self._sigma(t)
            y_next = y + h * slope  # Euler step (Algorithm 1, line 5)
            if timesteps.count(t_next) == 2:  # second-order correction (lines 6-8)
                slope_next, step = self._karras_slope(model, y_next, t_next, labels, guidance, clip_x0)
                yield step
                y_next = y + h * (slope + slope_next) / 2
            y = y_next
        yield SamplerStep(-1, y, y)

    def _karras_slope(self, model, y, t: int, labels, guidance, clip_x0) -> tuple[torch.Tensor, SamplerStep]:
        """dy/dsigma = (y - D(y; sigma_t)) / sigma_t (Karras et al. eq. 3 with sigma(t) = t, s(t) = 1),
        where the denoiser D is the model's x0_hat at x_t = sqrt(alpha_bar_t) y (which makes dy/dsigma
        the model's eps_hat when x0_hat is not clipped); also the SamplerStep of this evaluation."""
        x_t = math.sqrt(self._alpha_bar(t)) * y
        pred_x0 = self._predict_x0_at(model, x_t, t, labels, guidance, clip_x0)
        return (y - pred_x0) / self._sigma(t), SamplerStep(t, x_t, pred_x0)

    def _churn(self, y: torch.Tensor, t: int, gamma: float, generator) -> tuple[int, torch.Tensor]:
        """Algorithm 2, lines 5-7: raise the noise to sigma_hat = (1 + gamma) sigma_t, rounded to the
        trained timestep t_hat >= t of the nearest sigma in log-sigma, by adding
        sqrt(sigma_hat^2 - sigma_t^2) eps; returns (t_hat, y_hat)."""
        log_sigmas = -self._log_snrs_half()[t:]
        t_hat = t + int(np.argmin(np.abs(log_sigmas - math.log((1 + gamma) * self._sigma(t)))))
        extra = math.sqrt(self._sigma(t_hat) ** 2 - self._sigma(t) ** 2)
        return t_hat, y + extra * _randn_like(y, generator)

    def _log_snrs_half(self) -> np.ndarray:
        """lambda_t for every trained t: [T] float64 (Karras' log sigma is -lambda)."""
        return 0.5 * np.log(self.alphas_cumprod_float64 / (1 - self.alphas_cumprod_float64))

    # ----- editing real images: DDIM inversion and RePaint ----------------------------------------

    @torch.no_grad()
    def ddim_invert_progressive(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        steps: int | None = None,
        end_t: int | None = None,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> Iterator[SamplerStep]:
        """DDIM inversion (Song et al. 2021, section 4.3): DDIM eq. 12 with eta = 0 run from x_0 (t = -1)
        up to x_{end_t} (default T-1), through DDIM's timesteps for `steps` in reverse.

        The step up from level t uses the model's eps_hat at (x_t, t), at the clean end at (x_0, 0): the
        Euler step of the ODE that DDIM's decoding steps down with. So decoding with
        sample_progressive(model, sampler="ddim", steps=steps, eta=0, clip_x0=False, x_start=x_{end_t},
        start_t=end_t) retraces the same timesteps and returns x_0 up to an error that falls with the
        steps. Nothing is clipped (a clipped x0_hat cannot be inverted). x0: [B, C, H, W]. Yields a
        SamplerStep at each of the `steps` evaluations, then (end_t, x_{end_t}, the last x0_hat).
        """
        end_t = self.T - 1 if end_t is None else end_t
        levels = [-1, *reversed(self.timesteps("ddim", steps, end_t))]
        x_t = x0
        for t, t_next in zip(levels[:-1], levels[1:], strict=True):
            pred_x0 = self._predict_x0_at(model, x_t, max(t, 0), labels, guidance, clip_x0=False)
            yield SamplerStep(t, x_t, pred_x0)
            x_t = self._ddim_inverse_update(x_t, pred_x0, t, t_next)
        yield SamplerStep(end_t, x_t, pred_x0)

    def ddim_invert(
        self, model: nn.Module, x0: torch.Tensor, steps: int | None = None, **kwargs
    ) -> torch.Tensor:
        """Run ddim_invert_progressive to the end and return the encoding x_{end_t}: [B, C, H, W]."""
        return final_sample(self.ddim_invert_progressive(model, x0, steps, **kwargs))

    def _ddim_inverse_update(self, x_t, pred_x0, t: int, t_next: int) -> torch.Tensor:
        """DDIM eq. 12 (eta = 0) in its eps form, run upwards from t to t_next > t:
        x_next = sqrt(ab_next) (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) + sqrt(1 - ab_next) eps, with the
        eps_hat of the evaluation at max(t, 0); at t = -1 (ab = 1) the bracket is x_0 itself."""
        alpha_bar_model = self._alpha_bar(max(t, 0))
        eps = (x_t - math.sqrt(alpha_bar_model) * pred_x0) / math.sqrt(1 - alpha_bar_model)
        alpha_bar, alpha_bar_next = self._alpha_bar(t), self._alpha_bar(t_next)
        x0_part = (x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
        return math.sqrt(alpha_bar_next) * x0_part + math.sqrt(1 - alpha_bar_next) * eps

    @torch.no_grad()
    def repaint_progressive(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        mask: torch.Tensor,
        levels: int | None = None,
        jump_length: int = REPAINT_JUMP_LENGTH,
        resamples: int = REPAINT_RESAMPLES,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
        clip_x0: bool = True,
    ) -> Iterator[SamplerStep]:
        """RePaint inpainting (Lugmayr et al. 2022, Algorithm 1 with the jumps of section 4.2).

        x0: [B, C, H, W] images; mask: broadcastable to x0, 1 where x0 is known (kept), 0 where it is
        generated. The chain descends through `levels` noise levels (the paper's T; default every
        trained timestep, else DDIM's evenly spaced timesteps) along repaint_schedule: each move down is
        the ancestral step (DDIM eq. 16 with eta = 1, the DDPM posterior of eq. 7) for the unknown
        region joined with q_sample of x0 for the known one, each move up a forward jump
        q(x_next | x_t). Yields a SamplerStep at each model evaluation, then the result, which equals
        x0 where mask is 1.
        """
        ladder = self.timesteps("ddim", self.T if levels is None else levels, self.T - 1)[::-1]
        schedule = repaint_schedule(len(ladder), jump_length, resamples)
        mask = mask.to(x0)
        x_t = _randn_like(x0, generator)  # x_T ~ N(0, I) (line 1)
        for level, level_next in zip(schedule[:-1], schedule[1:], strict=True):
            t, t_next = ladder[level], (ladder[level_next] if level_next >= 0 else -1)
            if level_next > level:
                x_t = self._forward_jump(x_t, t, t_next, generator)  # line 9
                continue
            pred_x0 = self._predict_x0_at(model, x_t, t, labels, guidance, clip_x0)
            yield SamplerStep(t, x_t, pred_x0)
            unknown = self._ddim_update(x_t, pred_x0, t, t_next, 1.0, generator)  # line 7
            known = self._noised_to(x0, t_next, generator)  # line 5
            x_t = mask * known + (1 - mask) * unknown  # line 8
        yield SamplerStep(-1, x_t, x_t)

    def repaint(self, model: nn.Module, x0: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """Run repaint_progressive to the end and return the inpainted images [B, C, H, W]."""
        return final_sample(self.repaint_progressive(model, x0, mask, **kwargs))

    def _noised_to(self, x0: torch.Tensor, t: int, generator) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) (eq. 4) at one timestep t for the whole batch; x0 itself at t = -1."""
        if t < 0:
            return x0
        alpha_bar = self._alpha_bar(t)
        return math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * _randn_like(x0, generator)

    def _forward_jump(self, x_t: torch.Tensor, t: int, t_next: int, generator) -> torch.Tensor:
        """x_next ~ q(x_next | x_t) = N(sqrt(ab_next / ab_t) x_t, (1 - ab_next / ab_t) I) for t_next > t:
        eq. 2, q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), across the steps between."""
        ratio = self._alpha_bar(t_next) / self._alpha_bar(t)
        return math.sqrt(ratio) * x_t + math.sqrt(1 - ratio) * _randn_like(x_t, generator)


def repaint_schedule(
    levels: int, jump_length: int = REPAINT_JUMP_LENGTH, resamples: int = REPAINT_RESAMPLES
) -> list[int]:
    """The levels RePaint's chain visits (Lugmayr et al. 2022, section 4.2; get_schedule_jump in its
    code), from levels - 1 (pure noise) to -1 (the clean end), one level per move.

    Each time the descent reaches a level j in {0, J, 2J, ...} below levels - J (J = jump_length), it
    jumps back up J levels and descends again, resamples - 1 times for each such j. With
    k = ceil(levels / J) - 1 such levels, the chain makes levels + k J (resamples - 1) moves down (model
    evaluations) and k J (resamples - 1) moves up.
    """
    if levels < 1 or jump_length < 1 or resamples < 1:
        raise ValueError(
            f"levels, jump_length and resamples must be >= 1, got {levels}, {jump_length}, {resamples}"
        )
    jumps_left = {j: resamples - 1 for j in range(0, levels - jump_length, jump_length)}
    level, schedule = levels - 1, [levels - 1]
    while level >= 0:
        level -= 1
        schedule.append(level)
        if jumps_left.get(level, 0) > 0:
            jumps_left[level] -= 1
            schedule.extend(range(level + 1, level + jump_length + 1))
            level += jump_length
    return schedule


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of latents, as the DDIM paper interpolates x_T (Song et al. 2021,
    appendix D.5): sin((1 - alpha) theta) / sin(theta) z0 + sin(alpha theta) / sin(theta) z1, with theta
    the angle between z0 and z1 per sample. z0, z1: [B, C, H, W] (B may be 1 on either); alpha: a
    float or [B]. alpha = 0 gives z0 and alpha = 1 gives z1 exactly; (anti)parallel pairs, where
    sin(theta) vanishes, are interpolated linearly.
    """
    z0, z1 = torch.broadcast_tensors(z0, z1)
    per_sample = (-1, *([1] * (z0.dim() - 1)))
    cosine = F.cosine_similarity(z0.flatten(1), z1.flatten(1), dim=1).clamp(-1, 1)
    theta = torch.acos(cosine).reshape(per_sample)
    alpha = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device).reshape(per_sample)
    sin_theta = torch.sin(theta)
    linear = (1 - alpha) * z0 + alpha * z1
    spherical = torch.sin((1 - alpha) * theta) / sin_theta * z0 + torch.sin(alpha * theta) / sin_theta * z1
    return torch.where(sin_theta > SLERP_MIN_SIN, spherical, linear)


def final_sample(steps: Iterable[SamplerStep]) -> torch.Tensor:
    """Drain a sampler's steps without keeping them and return the finished images (the t = -1 step)."""
    return deque(steps, maxlen=1).pop().x_t


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from generator (which must live on x's device)."""
    return _randn(x.shape, generator, x.device, x.dtype)


def _randn(
    shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise [B, ...] from one generator, or from a list of B generators, row i from
    generator i (diffusers' convention), so that a sample's noise does not depend on its batch."""
    if isinstance(generator, list):
        rows = [torch.randn(tuple(shape[1:]), generator=row, device=device, dtype=dtype) for row in generator]
        return torch.stack(rows)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
