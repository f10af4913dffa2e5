"""Which timesteps a training step draws: uniformly (Algorithm 1 of Ho et al. 2020, arXiv:2006.11239),
by the importance sampling of Nichol & Dhariwal 2021 (arXiv:2102.09672, section 3.3), or from the
log-normal noise levels of Karras et al. 2022 (arXiv:2206.00364, Table 1).

log-normal: ln sigma ~ N(P_mean = -1.2, P_std = 1.2) with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t),
mapped onto this schedule's discrete t: the t whose ln sigma_t is nearest (ln sigma_t grows with t, so
each t receives the normal's mass between the midpoints to its neighbours; draws beyond either end go
to t = 0 or T - 1). The weights are 1: the distribution is the training objective's, as in EDM, not an
importance sampling of the uniform one.

loss-aware: p_t proportional to sqrt(E[L_t^2]) over the last 10 losses seen at each t, uniform until
every t has 10, and each example's loss re-weighted by 1 / (T p_t), so that the batch mean stays an
unbiased estimate of the uniform one: E_{t~p}[L_t / (T p_t)] = (1/T) sum_t L_t. As improved-diffusion's
resample.py (LossSecondMomentResampler), p is mixed with a uniform probability of 0.001
(p = 0.999 p_importance + 0.001 / T), so no t starves, and the history holds the loss that the step
minimises (L_hybrid with --learn-sigma, L_simple without), unweighted; under DDP every rank adds every
rank's losses, so the histories agree. The history (a [T, 10] ring per timestep and a count) is part
of the checkpoint, so a resume goes on bit for bit. Its update costs one device sync per step.

Example (loop.py's training step):
    sampler = make_timestep_sampler("loss-aware", diffusion.alphas_cumprod, device)
    t, weights = sampler.sample(batch_size, device)
    losses = diffusion.training_losses(network, x0, t, labels)
    sampler.update(t, losses, processes)
    loss = (weights * losses).mean()
"""

from __future__ import annotations

from typing import Any

import torch

from ddpm.plumbing.processes import Processes
from ddpm.plumbing.settings import TIMESTEP_SAMPLERS

LOG_NORMAL_MEAN, LOG_NORMAL_STD = -1.2, 1.2  # P_mean, P_std of Karras et al. (Table 1)
HISTORY_PER_T = 10  # losses kept per timestep (Nichol & Dhariwal, section 3.3)
UNIFORM_PROB = 0.001  # uniform share mixed into p (improved-diffusion's uniform_prob)


class UniformSampler:
    """t ~ U{0..T-1} with weight 1 (Algorithm 1): the draws of GaussianDiffusion.training_loss."""

    def __init__(self, T: int):
        self.T = T

    def sample(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [batch] long, weights [batch] = 1 / (T p_t)) from the global RNG."""
        t = torch.randint(0, self.T, (batch,), device=device)
        return t, torch.ones(batch, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor, processes: Processes) -> None:
        """Nothing to learn from the losses."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """No state."""


class LossAwareSampler(UniformSampler):
    """Nichol & Dhariwal's p_t proportional to sqrt(E[L_t^2]) (section 3.3), mixed with UNIFORM_PROB."""

    def __init__(self, T: int, device: torch.device):
        super().__init__(T)
        self.history = torch.zeros(T, HISTORY_PER_T, dtype=torch.float64, device=device)  # ring per t
        self.count = torch.zeros(T, dtype=torch.long, device=device)  # losses ever seen per t

    def probabilities(self) -> torch.Tensor:
        """p [T] float64: uniform until every t has HISTORY_PER_T losses, then
        (1 - UNIFORM_PROB) sqrt(E[L_t^2]) / sum_s sqrt(E[L_s^2]) + UNIFORM_PROB / T."""
        root_mean_square = self.history.pow(2).mean(dim=1).sqrt()
        importance = (1 - UNIFORM_PROB) * root_mean_square / root_mean_square.sum() + UNIFORM_PROB / self.T
        warm = (self.count >= HISTORY_PER_T).all()
        return torch.where(warm, importance, torch.full_like(importance, 1 / self.T))

    def sample(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probabilities().to(device)
        t = torch.multinomial(p, batch, replacement=True)
        return t, (1 / (self.T * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor, processes: Processes) -> None:
        """Add every rank's (t [B], unweighted losses [B]) to the history, in rank and batch order:
        each t keeps its last HISTORY_PER_T losses (a ring: E[L_t^2] does not depend on their order)."""
        t = processes.concatenated(t).to(self.count.device)
        losses = processes.concatenated(losses.detach().double()).to(self.history.device)
        order = torch.argsort(t, stable=True)  # batch order within each t
        t, losses = t[order], losses[order]
        per_t = torch.bincount(t, minlength=self.T)
        rank = torch.arange(len(t), device=t.device) - (torch.cumsum(per_t, 0) - per_t)[t]  # k-th at its t
        last = rank >= per_t[t] - HISTORY_PER_T  # only the newest HISTORY_PER_T of a t in this batch
        slot = (self.count[t] + rank) % HISTORY_PER_T
        self.history[t[last], slot[last]] = losses[last]
        self.count += per_t

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The history of a checkpoint; one written without it (uniform sampling) starts afresh."""
        if "history" in state:
            self.history.copy_(state["history"])
            self.count.copy_(state["count"])


class LogNormalSampler(UniformSampler):
    """Karras et al.'s ln sigma ~ N(LOG_NORMAL_MEAN, LOG_NORMAL_STD^2), each draw at its nearest t."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__(len(alphas_cumprod))
        log_sigmas = 0.5 * (torch.log1p(-alphas_cumprod.double()) - alphas_cumprod.double().log())
        self.boundaries = (log_sigmas[1:] + log_sigmas[:-1]) / 2  # [T - 1] midpoints, increasing

    def sample(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [batch] long, weights [batch] = 1) from the global RNG."""
        log_sigma = LOG_NORMAL_MEAN + LOG_NORMAL_STD * torch.randn(batch, device=device, dtype=torch.float64)
        t = torch.searchsorted(self.boundaries.to(device), log_sigma)
        return t, torch.ones(batch, device=device)


def make_timestep_sampler(kind: str, alphas_cumprod: torch.Tensor, device: torch.device) -> UniformSampler:
    """The sampler --timestep-sampler names for a schedule's alpha_bar [T]: uniform, loss-aware or
    log-normal."""
    if kind not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep sampler {kind!r}: choose one of {TIMESTEP_SAMPLERS}")
    T = len(alphas_cumprod)
    if kind == "log-normal":
        return LogNormalSampler(alphas_cumprod)
    return UniformSampler(T) if kind == "uniform" else LossAwareSampler(T, device)
