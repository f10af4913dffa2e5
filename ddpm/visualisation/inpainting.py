"""Inpainting test digits with RePaint: vizu_MNIST.py --inpaint MASK.

RePaint (Lugmayr et al. 2022, arXiv:2201.09865, Algorithm 1 with the resampling jumps of section 4.2;
diffusion.repaint_progressive) generates the hole of a mask (masks.py) while the known pixels are
q_sample'd from the test digit at every level, so the result equals the digit there exactly. The chain
descends through --steps noise levels (DDIM's evenly spaced timesteps; the paper's T = 250) and at
every --jump-length levels jumps back up that many, --resamples - 1 times: with the defaults 100, 10 and
10 that is 100 + 9 x 10 x 9 = 910 model evaluations (the paper's 250 levels: 2410). A class-conditional
model is given each digit's label (or --label), with --guidance.

Writes inpainting.png (rows: the test digits, the masked input with the hole mid-grey, the results),
strip.png and reverse.gif (the reverse process: x_t over x0-hat) and inpainting.csv (per digit: MSE and
SSIM in the hole and in the known region, and the classifier's class of the result when there is one).

Example:
    python vizu_MNIST.py --inpaint right --num-images 8 --steps 100 --jump-length 10 --resamples 10
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddpm.evaluation.classifier import class_probabilities
from ddpm.plumbing.output_files import write_csv
from ddpm.visualisation.masks import masked_input, region_mse, region_ssim
from ddpm.visualisation.pictures import save_gif, save_image_grid, save_strip
from ddpm.visualisation.trajectories import record_steps
from diffusion import GaussianDiffusion, SamplerStep, repaint_schedule

DEFAULT_INPAINT_LEVELS = 100  # RePaint's noise levels when --steps is not given (the paper: 250)


@dataclass(frozen=True)
class RepaintPlan:
    """RePaint's schedule: `levels` noise levels (the paper's T), jumps of `jump_length` levels (j),
    each jump point left `resamples` times (r)."""

    levels: int
    jump_length: int
    resamples: int

    @property
    def evaluations(self) -> int:
        """Model evaluations: the moves down of repaint_schedule, levels + k j (r - 1)."""
        schedule = repaint_schedule(self.levels, self.jump_length, self.resamples)
        return sum(
            1 for level, following in zip(schedule[:-1], schedule[1:], strict=True) if following < level
        )


@dataclass
class RegionScores:
    """Per image [B] ([0, 1] scale): MSE and SSIM inside the hole and in the known region."""

    mse_hole: np.ndarray
    ssim_hole: np.ndarray
    mse_known: np.ndarray
    ssim_known: np.ndarray


def repaint_steps(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    originals: torch.Tensor,
    mask: torch.Tensor,
    plan: RepaintPlan,
    *,
    seed: int,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> Iterator[SamplerStep]:
    """diffusion.repaint_progressive on originals [B, C, H, W] in [-1, 1] with mask [1, 1, H, W]
    (1: keep), its noise seeded by `seed`: the SamplerSteps of every evaluation, then the result."""
    generator = torch.Generator(originals.device).manual_seed(seed)
    return diffusion.repaint_progressive(
        model, originals, mask.to(originals.device), levels=plan.levels, jump_length=plan.jump_length,
        resamples=plan.resamples, generator=generator, labels=labels, guidance=guidance,
    )  # fmt: skip


def region_scores(results: torch.Tensor, originals: torch.Tensor, mask: torch.Tensor) -> RegionScores:
    """MSE and SSIM of results against originals within the hole (mask 0) and the known region (mask 1)."""
    hole, known = 1 - mask.cpu(), mask.cpu()
    return RegionScores(
        mse_hole=region_mse(results, originals, hole),
        ssim_hole=region_ssim(results, originals, hole),
        mse_known=region_mse(results, originals, known),
        ssim_known=region_ssim(results, originals, known),
    )


def write_inpainting_csv(
    scores: RegionScores,
    path: Path,
    indices: list[int],
    labels: torch.Tensor | None,
    classes: list[int] | None,
) -> None:
    """One row per test digit: index, label, the classifier's class of the result (or ''), the scores."""
    header: list[object] = [
        "image",
        "label",
        "classified",
        "mse_hole",
        "ssim_hole",
        "mse_known",
        "ssim_known",
    ]
    rows: list[list[object]] = [header]
    for column, index in enumerate(indices):
        label = "" if labels is None else int(labels[column])
        classified = "" if classes is None else classes[column]
        values = (scores.mse_hole, scores.ssim_hole, scores.mse_known, scores.ssim_known)
        rows.append([index, label, classified, *(f"{value[column]:.6g}" for value in values)])
    write_csv(rows, path)


def run_inpainting(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    *,
    originals: torch.Tensor,
    mask: torch.Tensor,
    plan: RepaintPlan,
    seed: int,
    labels: torch.Tensor | None,
    guidance: float,
    true_labels: torch.Tensor,
    indices: list[int],
    classifier: nn.Module | None,
    out_dir: Path,
    strip_steps: int,
    gif_frames: int,
) -> str:
    """RePaint on the chosen test digits, then every picture and inpainting.csv; returns what to print."""
    steps = repaint_steps(
        model, diffusion, originals, mask, plan, seed=seed, labels=labels, guidance=guidance
    )
    trajectory = record_steps(steps, None, plan.evaluations + 1)
    results = trajectory.x_t[-1]
    originals, mask = originals.cpu(), mask.cpu()
    assert torch.equal(results * mask, originals * mask), "RePaint changed a known pixel"
    scores = region_scores(results, originals, mask)
    classes = None if classifier is None else class_probabilities(classifier, results).argmax(1).tolist()
    write_inpainting_csv(scores, out_dir / "inpainting.csv", indices, true_labels, classes)
    columns = len(indices)
    save_image_grid(
        torch.cat([originals, masked_input(originals, mask), results]), out_dir / "inpainting.png", columns
    )
    title = (
        f"RePaint: {plan.levels} levels, j = {plan.jump_length}, r = {plan.resamples} "
        f"({plan.evaluations} evaluations)"
    )
    save_strip(trajectory, out_dir / "strip.png", strip_steps, [f"#{i}" for i in indices], title)
    frames = save_gif(trajectory, out_dir / "reverse.gif", gif_frames)
    line = (
        f"{title} on {columns} test digits: in the hole MSE {scores.mse_hole.mean():.4f} +- "
        f"{scores.mse_hole.std():.4f}, SSIM {scores.ssim_hole.mean():.4f}; known region MSE "
        f"{scores.mse_known.max():g} (exact)"
    )
    if classes is not None:
        agreement = np.mean([c == int(label) for c, label in zip(classes, true_labels.tolist(), strict=True)])
        line += f"; results classified as their digit's label: {agreement:.3f}"
    return f"{line}; wrote {out_dir}/ (GIF: {frames} frames)"
