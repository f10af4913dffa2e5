"""Recording the reverse process: every step's x_t and predicted x0 of a sampler run, and their metrics.

A `Trajectory` keeps what diffusion.py's samplers yield (SamplerStep: t, x_t, pred_x0) for B images
over S steps, plus per-step metrics: how much x0-hat still changes (MSE to the previous step's),
for reconstructions the MSE and SSIM of x_t and of x0-hat against the originals ([0, 1] scale), and
with a classifier its predicted class of x0-hat at every step: when the digit is decided is the
first step after which that class no longer changes. vizu_MNIST.py draws them; the samplers' loop
is never re-implemented here.

Example:
    trajectory = reconstruction_trajectory(model, diffusion, originals, 500, SamplingSettings("ddpm"))
    trajectory.metrics["ssim_x0"]      # [S, B]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ddpm.evaluation.classifier import class_probabilities
from ddpm.evaluation.image_metrics import mse, ssim
from ddpm.plumbing.settings import SamplingSettings
from ddpm.sampling import sample_generators, starting_noise
from diffusion import GaussianDiffusion, SamplerStep

FINISHED_T = -1  # the t that samplers report for the finished image


@dataclass
class Trajectory:
    """Every step of one reverse-process run over B images; S = model evaluations + 1 (the finished one).

    timesteps: [S] ints ending with -1; x_t, pred_x0: [S, B, C, H, W] on the CPU, in [-1, 1] scale.
    metrics: name -> [S, B] array. Always x0_change (MSE between consecutive pred_x0, NaN at the first
    step); with originals also mse_xt, ssim_xt, mse_x0, ssim_x0 against them ([0, 1] scale).
    """

    timesteps: list[int]
    x_t: torch.Tensor
    pred_x0: torch.Tensor
    metrics: dict[str, np.ndarray]

    @property
    def evaluations(self) -> int:
        return len(self.timesteps) - 1


def record_steps(
    sampler_steps: Iterable[SamplerStep],
    originals: torch.Tensor | None = None,
    total: int | None = None,
    progress: bool = True,
) -> Trajectory:
    """Consume a sampler's SamplerSteps, keeping x_t and pred_x0 at each and their metrics."""
    timesteps, states, predictions = [], [], []
    steps = tqdm(sampler_steps, total=total, desc="reverse process", leave=False, disable=not progress)
    for step in steps:
        timesteps.append(step.t)
        states.append(step.x_t.float().cpu())
        predictions.append(step.pred_x0.float().cpu())
    x_t, pred_x0 = torch.stack(states), torch.stack(predictions)
    metrics = {"x0_change": x0_change(pred_x0)}
    if originals is not None:
        originals = originals.cpu()
        metrics["mse_xt"] = np.stack([mse(state, originals) for state in x_t])
        metrics["ssim_xt"] = np.stack([ssim(state, originals) for state in x_t])
        metrics["mse_x0"] = np.stack([mse(prediction, originals) for prediction in pred_x0])
        metrics["ssim_x0"] = np.stack([ssim(prediction, originals) for prediction in pred_x0])
    return Trajectory(timesteps, x_t, pred_x0, metrics)


def x0_change(pred_x0: torch.Tensor) -> np.ndarray:
    """MSE ([0, 1] scale) between the predicted x0 at consecutive steps: [S, B, ...] -> [S, B], NaN first."""
    steps, batch = pred_x0.shape[:2]
    change = mse(pred_x0[1:].flatten(0, 1), pred_x0[:-1].flatten(0, 1)).reshape(steps - 1, batch)
    return np.concatenate([np.full((1, batch), np.nan), change])


def reconstruction_trajectory(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    originals: torch.Tensor,
    t: int,
    sampling: SamplingSettings,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
) -> Trajectory:
    """Noise originals [B, C, H, W] in [-1, 1] to step t (eq. 4), denoise to 0, record every step.

    model is any nn.Module called as model(x_t, t, labels) that predicts what diffusion.prediction says.
    """
    sampler_steps = diffusion.reconstruct(
        model,
        originals,
        t,
        generator=generator,
        labels=labels,
        **sampling.sampler_options(),
    )
    total = len(diffusion.timesteps(sampling.sampler, sampling.steps, t)) + 1
    return record_steps(sampler_steps, originals, total)


def generation_trajectory(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    samples: range,
    image_shape: tuple[int, int, int],
    sampling: SamplingSettings,
    seed: int,
    labels: torch.Tensor | None = None,
    progress: bool = True,
) -> Trajectory:
    """Samples `samples` (indices i of a run of samples.stop) from pure noise at t = T-1, every step
    recorded. Sample i's x_T is row i of sampling.starting_noise(seed) and its fresh noise comes from
    its own generator (sampling.sample_generators), so it depends on (seed, i) alone: any share of the
    samples draws what the whole run draws for them. labels: [len(samples)] or None."""
    total = len(diffusion.timesteps(sampling.sampler, sampling.steps, diffusion.T - 1)) + 1
    device = diffusion.betas.device
    sampler_steps = diffusion.sample_progressive(
        model,
        generator=sample_generators(seed, samples, device),
        labels=labels,
        x_start=starting_noise(samples.stop, image_shape, seed)[samples.start :],
        **sampling.sampler_options(),
    )
    return record_steps(sampler_steps, None, total, progress)


def joined(parts: list[Trajectory]) -> Trajectory:
    """Trajectories of consecutive shares of one run's samples (same timesteps) as one, in that order."""
    return Trajectory(
        parts[0].timesteps,
        torch.cat([part.x_t for part in parts], dim=1),
        torch.cat([part.pred_x0 for part in parts], dim=1),
        {name: np.concatenate([part.metrics[name] for part in parts], axis=1) for name in parts[0].metrics},
    )


# ----- when the digit is decided ------------------------------------------------------------------


def add_class_probabilities(trajectory: Trajectory, classifier: nn.Module) -> None:
    """The classifier's class probabilities of x0-hat at every step, as two [S, B] metrics:
    "predicted_class" (the most probable class) and "p_final_class" (the probability of the class
    the finished image is given, the last step's prediction)."""
    steps, batch = trajectory.pred_x0.shape[:2]
    probabilities = class_probabilities(classifier, trajectory.pred_x0.flatten(0, 1)).reshape(
        steps, batch, -1
    )
    final_class = probabilities[-1].argmax(dim=1)  # [B]
    trajectory.metrics["predicted_class"] = probabilities.argmax(dim=2).numpy()
    trajectory.metrics["p_final_class"] = probabilities[:, torch.arange(batch), final_class].numpy()


def decision_steps(trajectory: Trajectory) -> np.ndarray:
    """Per image [B], the first step index from which x0-hat's predicted class never changes again
    (0: decided from the start); needs add_class_probabilities."""
    predicted = trajectory.metrics["predicted_class"]
    differs = predicted != predicted[-1]  # [S, B]; never at the last step
    steps = len(predicted)
    last_difference = steps - 1 - np.argmax(differs[::-1], axis=0)  # where differs is all False: steps - 1
    return np.where(differs.any(axis=0), last_difference + 1, 0)
