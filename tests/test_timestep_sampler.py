"""--timestep-sampler loss-aware: Nichol & Dhariwal's importance sampling of t (arXiv:2102.09672,
section 3.3), against improved-diffusion's LossSecondMomentResampler re-implemented here one loss at
a time; its re-weighted loss is an unbiased estimate of the uniform one; and a run resumes to the bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import straight_and_resumed

from ddpm.plumbing.processes import Processes
from ddpm.training.timestep_sampler import (
    HISTORY_PER_T,
    UNIFORM_PROB,
    LossAwareSampler,
    UniformSampler,
    make_timestep_sampler,
)
from diffusion import GaussianDiffusion

ALONE = Processes(rank=0, world_size=1, device=torch.device("cpu"))


class ReferenceSampler:
    """improved-diffusion's resample.py LossSecondMomentResampler, one (t, loss) at a time, in float64."""

    def __init__(self, T: int):
        self.history = np.zeros((T, HISTORY_PER_T))
        self.count = np.zeros(T, dtype=int)

    def update(self, ts, losses) -> None:
        for t, loss in zip(ts, losses, strict=True):
            if self.count[t] == HISTORY_PER_T:
                self.history[t, :-1] = self.history[t, 1:]
                self.history[t, -1] = loss
            else:
                self.history[t, self.count[t]] = loss
                self.count[t] += 1

    def probabilities(self) -> np.ndarray:
        T = len(self.count)
        if not (self.count == HISTORY_PER_T).all():
            return np.full(T, 1 / T)
        weights = np.sqrt(np.mean(self.history**2, axis=-1))
        return weights / weights.sum() * (1 - UNIFORM_PROB) + UNIFORM_PROB / T


def test_probabilities_sum_to_one_and_follow_the_last_ten_losses_of_each_t():
    """Batches of 40 draws from T = 7, and one with t = 3 fifteen times, so the ring keeps only the
    newest 10 of a batch; the probabilities equal the one-at-a-time reference after every batch."""
    T, generator = 7, torch.Generator().manual_seed(0)
    sampler, reference = LossAwareSampler(T, torch.device("cpu")), ReferenceSampler(T)
    batches = [torch.randint(0, T, (40,), generator=generator) for _ in range(12)]
    batches.insert(6, torch.tensor([3] * 15 + [5] * 5))
    for t in batches:
        losses = (1 + t) * torch.rand(len(t), generator=generator, dtype=torch.float64)  # larger at larger t
        sampler.update(t, losses, ALONE)
        reference.update(t.tolist(), losses.tolist())
        p = sampler.probabilities()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(p.numpy(), reference.probabilities(), rtol=1e-12, atol=0)
    assert (sampler.count >= HISTORY_PER_T).all()
    assert np.all(np.diff(p.numpy()) > 0)  # p_t grows with the loss scale 1 + t


def test_uniform_until_every_t_has_its_ten_losses():
    sampler = LossAwareSampler(3, torch.device("cpu"))
    sampler.update(torch.tensor([0] * 10 + [1] * 10 + [2] * 9), torch.arange(29.0), ALONE)
    assert torch.equal(sampler.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    sampler.update(torch.tensor([2]), torch.tensor([100.0]), ALONE)
    assert sampler.probabilities()[2] > 0.5


def test_reweighted_loss_is_an_unbiased_estimate_of_the_uniform_mean():
    """Losses L_t = 1 + (t/10)^2 (T = 50), p from a history of another shape (sqrt(1 + t)): over
    200,000 draws the mean of L_t / (T p_t) is within 4 standard errors (estimated from the draws) of
    (1/T) sum_t L_t, while the unweighted mean under p is off by more than 20 of them."""
    T = 50
    sampler = LossAwareSampler(T, torch.device("cpu"))
    ts = torch.arange(T).repeat(HISTORY_PER_T)
    sampler.update(ts, torch.sqrt(1 + ts.double()), ALONE)
    losses = 1 + (torch.arange(T, dtype=torch.float64) / 10) ** 2
    torch.manual_seed(0)
    draws = [sampler.sample(1000, torch.device("cpu")) for _ in range(200)]
    t = torch.cat([draw[0] for draw in draws])
    weighted = torch.cat([draw[1] for draw in draws]).double() * losses[t]
    standard_error = weighted.std().item() / len(t) ** 0.5
    assert abs(weighted.mean().item() - losses.mean().item()) < 4 * standard_error
    assert abs(losses[t].mean().item() - losses.mean().item()) > 20 * standard_error


def test_uniform_sampler_draws_as_training_loss_does():
    torch.manual_seed(3)
    cpu, alphas_cumprod = torch.device("cpu"), GaussianDiffusion(T=1000).alphas_cumprod
    t, weights = make_timestep_sampler("uniform", alphas_cumprod, cpu).sample(64, cpu)
    torch.manual_seed(3)
    assert torch.equal(t, torch.randint(0, 1000, (64,))) and torch.equal(weights, torch.ones(64))
    assert type(make_timestep_sampler("uniform", alphas_cumprod[:10], cpu)) is UniformSampler
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        make_timestep_sampler("importance", alphas_cumprod, cpu)


def test_loss_aware_learned_sigma_resume_is_bit_exact(tiny_train_data, tmp_path):
    """4 steps straight == 2 + resume + 2, with --learn-sigma and --timestep-sampler loss-aware; T = 4
    and 48 images a step, so every t has its 10 losses after step 2 and steps 3-4 draw by importance."""
    flags = [
        "--T",
        "4",
        "--batch-size",
        "48",
        "--epochs",
        "4",
        "--learn-sigma",
        "--timestep-sampler",
        "loss-aware",
    ]
    straight, halfway, resumed = straight_and_resumed(tiny_train_data, tmp_path, flags, stop_at=2)
    assert (halfway["timestep_sampler"]["count"] >= HISTORY_PER_T).all()
    assert straight["step"] == resumed["step"] == 4
    assert (
        straight["config"]["diffusion"]["learn_sigma"] and straight["model"]["output.2.weight"].shape[0] == 2
    )
    for part in ("model", "ema", "timestep_sampler"):
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)
    assert torch.equal(straight["rng"][0]["torch"], resumed["rng"][0]["torch"])
    assert not torch.equal(straight["timestep_sampler"]["history"], halfway["timestep_sampler"]["history"])
