"""What vizu_MNIST.py shows: the reverse process of a checkpoint, step by step, as pictures and tables.

Three modes, each consuming diffusion.py's SamplerStep generators through trajectories.py (no
sampling loop of its own):
  reconstruction  test images noised to --t with q(x_t | x_0) (Ho et al. 2020, eq. 4) and denoised
                  back: original.png noised.png denoised.png strip.png curves.png metrics.csv reverse.gif
  --t-sweep       the final MSE/SSIM from each start t (sampling.reconstruction_sweep, the same as
                  eval_MNIST.py's): t_sweep.csv t_sweep.png and a table on the terminal
  --generate      samples from pure noise: generated.png strip.png curves.png metrics.csv reverse.gif;
                  with several --guidance values (1,2,4) the same noise with each, files suffixed
                  _guidance<g>
Reconstruction and generation also record the classifier's class of x0-hat at every step (classifier.py,
the shipped one for MNIST): commitment.png (the final class's probability against t per image, and a
histogram of the t at which the predicted class stops changing), commitment.csv (per image: label,
final class, that t and step; the probability per step is in metrics.csv).

Example:
    visualise(VisualisationSettings(t=500), SamplingSettings(sampler="ddpm"), DataSettings(data=None))
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from ddpm.datasets.sources import load_images, shape_options, spread_over_classes
from ddpm.evaluation.classifier import data_label, default_classifier_path, load_classifier
from ddpm.plumbing.checkpointing import data_source, image_shape, load_for_inference, resolve_checkpoint
from ddpm.plumbing.messages import UserError, note
from ddpm.plumbing.output_files import writable_dir, write_csv
from ddpm.plumbing.runtime import resolve_device, seed_everything
from ddpm.plumbing.settings import DataSettings, GuidedSamplingSettings, VisualisationSettings
from ddpm.sampling import check_sampling, reconstruction_sweep, sweep_timesteps
from ddpm.visualisation.pictures import (
    save_change_curve,
    save_commitment_plot,
    save_gif,
    save_image_grid,
    save_reconstruction_curves,
    save_strip,
    save_sweep_plot,
)
from ddpm.visualisation.trajectories import (
    Trajectory,
    add_class_probabilities,
    decision_steps,
    generation_trajectory,
    reconstruction_trajectory,
)
from diffusion import GaussianDiffusion

COMMITMENT_HEADER = ["guidance", "image", "label", "final_class", "decided_t", "decided_step"]


def conditioning(
    num_classes: int | None, label: int | None, guidance: float, default: torch.Tensor
) -> torch.Tensor | None:
    """Class labels to condition on: None for an unconditional model, else --label or `default` [B]."""
    if num_classes is None:
        if label is not None or guidance != 1.0:
            raise UserError(
                "--label and --guidance need a class-conditional checkpoint; this one is unconditional"
            )
        return None
    if label is None:
        return default
    if not 0 <= label < num_classes:
        raise UserError(f"--label must be in [0, {num_classes - 1}], got {label}")
    return torch.full_like(default, label)


def chosen_test_images(
    settings: VisualisationSettings, data: DataSettings, config: dict, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The test-split images [B, C, H, W] (at the checkpoint's image shape) and labels [B] on device,
    and their indices: --index, else --num-images spread over the classes (seeded)."""
    name, data_dir = data.source_or(data_source(config))
    images, labels = load_images(name, "test", data_dir, **shape_options(image_shape(config)))
    indices = list(settings.index) or spread_over_classes(labels, settings.num_images, settings.seed)
    outside = [index for index in indices if not 0 <= index < len(images)]
    if outside:
        raise UserError(f"--index {outside[0]} is outside the test split [0, {len(images) - 1}]")
    return images[indices].to(device), labels[indices].to(device), indices


def write_metrics_csv(trajectory: Trajectory, path: Path, image_ids: list[int]) -> None:
    """One row per (step, image): step number, t, image id, then every metric."""
    names = list(trajectory.metrics)
    rows: list[list[object]] = [["step", "t", "image", *names]]
    for step, t in enumerate(trajectory.timesteps):
        for column, image in enumerate(image_ids):
            rows.append([step, t, image, *(f"{trajectory.metrics[n][step, column]:.6g}" for n in names)])
    write_csv(rows, path)


def classifier_flags(name: str, data_dir: str | None, shape: tuple[int, int, int]) -> str:
    """ddpm.evaluation.train_classifier's flags for a classifier of this data at this image shape."""
    channels, height, _ = shape
    source = f"--data-dir {data_dir}" if data_dir else f"--data {name}"
    return f"{source} --channels {channels} --image-size {height}"


def commitment_judge(
    settings: VisualisationSettings, data: DataSettings, config: dict, device: torch.device
) -> nn.Module | None:
    """The classifier that says which digit x0-hat is (the shipped one for MNIST, or one made before
    by ddpm.evaluation.train_classifier or eval_MNIST.py), unless --no-commitment; None, with a note,
    if none."""
    if not settings.commitment:
        return None
    name, data_dir = data.source_or(data_source(config))
    path = default_classifier_path(name, data_dir, image_shape(config))
    if not path.is_file():
        flags = classifier_flags(name, data_dir, image_shape(config))
        note(
            f"commitment skipped: no classifier for {data_label(name, data_dir)} at {path} "
            f"(make one with `python -m ddpm.evaluation.train_classifier {flags}`)"
        )
        return None
    return load_classifier(path, device)[0]


def commitment_rows(
    trajectory: Trajectory,
    classifier: nn.Module,
    image_ids: list[int],
    labels: torch.Tensor | None,
    guidance: float,
) -> list[list]:
    """Adds the classifier's probabilities to the trajectory; one row per image: guidance, image, label
    (or ''), the finished image's class, and the t and step index from which x0-hat's class stays it."""
    add_class_probabilities(trajectory, classifier)
    steps = decision_steps(trajectory)
    final = trajectory.metrics["predicted_class"][-1]
    return [
        [guidance, image, "" if labels is None else int(labels[column]), int(final[column]),
         trajectory.timesteps[steps[column]], int(steps[column])]
        for column, image in enumerate(image_ids)
    ]  # fmt: skip


def commitment_summary(rows: list[list], path: Path, trajectory: Trajectory, title: str) -> str:
    """The plot of one run's rows, and one line: median t of decision and accuracy against the labels."""
    decided_t = np.array([row[4] for row in rows])
    save_commitment_plot(trajectory, decided_t, path, title)
    line = f"class decided (stops changing) at median t = {np.median(decided_t):g}"
    if rows[0][2] != "":
        accuracy = np.mean([row[2] == row[3] for row in rows])
        line += f"; finished images classified as their label: {accuracy:.3f}"
    return f"{line} ({len(rows)} images, guidance {rows[0][0]:g}; {path.name})"


def run_reconstruction(
    model, diffusion, settings, sampling, originals, labels, indices, out_dir: Path, classifier, true_labels
) -> str:
    generator = torch.Generator(originals.device).manual_seed(settings.seed)
    trajectory = reconstruction_trajectory(
        model, diffusion, originals, settings.t, sampling, generator, labels
    )
    commitment = ""
    if classifier is not None:
        rows = commitment_rows(trajectory, classifier, indices, true_labels, sampling.guidance)
        write_csv([COMMITMENT_HEADER, *rows], out_dir / "commitment.csv")
        commitment = "\n" + commitment_summary(rows, out_dir / "commitment.png", trajectory, "reconstruction")
    columns = len(indices)
    save_image_grid(originals, out_dir / "original.png", columns=columns)
    save_image_grid(trajectory.x_t[0], out_dir / "noised.png", columns=columns)
    save_image_grid(trajectory.x_t[-1], out_dir / "denoised.png", columns=columns)
    evaluations = trajectory.evaluations
    title = f"reconstruction from t = {settings.t} ({sampling.sampler}, {evaluations} model evaluations)"
    save_strip(trajectory, out_dir / "strip.png", settings.strip_steps, [f"#{i}" for i in indices], title)
    save_reconstruction_curves(trajectory, out_dir / "curves.png", title)
    write_metrics_csv(trajectory, out_dir / "metrics.csv", indices)
    frames = save_gif(trajectory, out_dir / "reverse.gif", settings.gif_frames)
    final_mse, final_ssim = trajectory.metrics["mse_x0"][-1], trajectory.metrics["ssim_x0"][-1]
    return (
        f"{title}: final MSE {final_mse.mean():.4f} +- {final_mse.std():.4f}, "
        f"SSIM {final_ssim.mean():.4f} +- {final_ssim.std():.4f} over {len(indices)} images; "
        f"wrote {out_dir}/ (GIF: {frames} frames)" + commitment
    )


def run_t_sweep(model, diffusion, settings, sampling, originals, labels, out_dir: Path) -> str:
    """The reconstruction sweep of eval_MNIST.py on the chosen images: table, CSV and plot."""
    starts = sweep_timesteps(settings.sweep_t, diffusion.T, "--sweep-t")
    sweep = reconstruction_sweep(
        model, diffusion, originals, starts, sampling=sampling, seed=settings.seed, device=originals.device,
        labels=labels,
    )  # fmt: skip
    names = ("mse", "psnr", "ssim")
    header = ["t", "evaluations", *(f"{name}_{stat}" for name in names for stat in ("mean", "std"))]
    rows = [
        [
            t,
            scores["steps"],
            *(f"{scores[f'{name}_{stat}']:.6g}" for name in names for stat in ("mean", "std")),
        ]
        for t, scores in sweep["per_t"].items()
    ]
    write_csv([header, *rows], out_dir / "t_sweep.csv")
    save_sweep_plot(
        sweep["per_t"], out_dir / "t_sweep.png", f"final reconstruction vs start t ({sampling.sampler})"
    )
    lines = [
        f"final reconstruction of {len(originals)} test images ({sampling.sampler}); "
        "[0, 1] scale, SSIM data_range=1",
        f"{'start t':>8} {'evals':>6} {'MSE':>17} {'SSIM':>17}",
    ]
    for t, scores in sweep["per_t"].items():
        lines.append(
            f"{t:>8} {scores['steps']:>6} {scores['mse_mean']:>8.4f} +- {scores['mse_std']:.4f} "
            f"{scores['ssim_mean']:>8.4f} +- {scores['ssim_std']:.4f}"
        )
    return "\n".join(lines)


def run_generation(
    model, diffusion, settings, sampling: GuidedSamplingSettings, shape, out_dir: Path, device, classifier
) -> str:
    """Samples from pure noise with each --guidance scale (the same noise; files suffixed
    _guidance<g> when there are several), and when the digit is decided in each."""
    default_labels = torch.arange(settings.num_images, device=device) % (model.num_classes or 1)
    several = len(sampling.guidance) > 1
    lines, rows = [], []
    for guidance in sampling.guidance:
        labels = conditioning(model.num_classes, settings.label, guidance, default_labels)
        suffix = f"_guidance{guidance:g}" if several else ""
        trajectory, line = generate_once(
            model, diffusion, settings, sampling.at(guidance), shape, out_dir, suffix, labels, device
        )
        if classifier is not None:
            new_rows = commitment_rows(
                trajectory, classifier, list(range(settings.num_images)), labels, guidance
            )
            rows += new_rows
            title = f"generation, guidance {guidance:g}"
            line += "\n" + commitment_summary(
                new_rows, out_dir / f"commitment{suffix}.png", trajectory, title
            )
        write_metrics_csv(trajectory, out_dir / f"metrics{suffix}.csv", list(range(settings.num_images)))
        lines.append(line)
    if rows:
        write_csv([COMMITMENT_HEADER, *rows], out_dir / "commitment.csv")
    return "\n".join(lines)


def generate_once(model, diffusion, settings, sampling, shape, out_dir: Path, suffix: str, labels, device):
    """One generation from the seeded noise: its pictures; returns the trajectory and a line to print."""
    generator = torch.Generator(device).manual_seed(settings.seed)
    trajectory = generation_trajectory(
        model, diffusion, settings.num_images, shape, sampling, generator, labels
    )
    samples = range(settings.num_images)
    names = [f"sample {i}" if labels is None else f"class {int(labels[i])}" for i in samples]
    title = f"generation from pure noise ({sampling.sampler}, {trajectory.evaluations} model evaluations)"
    if sampling.guidance != 1.0:
        title += f", guidance {sampling.guidance:g}"
    save_image_grid(trajectory.x_t[-1], out_dir / f"generated{suffix}.png", columns=settings.num_images)
    save_strip(trajectory, out_dir / f"strip{suffix}.png", settings.strip_steps, names, title)
    save_change_curve(trajectory, out_dir / f"curves{suffix}.png", title)
    frames = save_gif(trajectory, out_dir / f"reverse{suffix}.gif", settings.gif_frames)
    return trajectory, f"{title}: wrote {out_dir}/ (GIF{suffix}: {frames} frames)"


def check_mode(
    settings: VisualisationSettings,
    sampling: GuidedSamplingSettings,
    diffusion: GaussianDiffusion,
    model: nn.Module,
) -> None:
    """One-line errors for flags the chosen mode cannot run, before any image is loaded."""
    num_classes = cast(int | None, model.num_classes)
    if len(sampling.guidance) > 1 and not settings.generate:
        raise UserError("several --guidance values are for --generate; reconstruct with one")
    for guidance in sampling.guidance:
        plain = sampling.at(guidance)
        if settings.t_sweep:
            for t in sweep_timesteps(settings.sweep_t, diffusion.T, "--sweep-t"):
                check_sampling(diffusion, plain, num_classes, t if plain.sampler == "ddpm" else None)
        else:
            check_sampling(diffusion, plain, num_classes, None if settings.generate else settings.t)


def visualise(settings: VisualisationSettings, sampling: GuidedSamplingSettings, data: DataSettings) -> str:
    """Run the chosen mode; returns what to print."""
    if settings.generate and settings.t_sweep:
        raise UserError("--generate and --t-sweep are separate modes: pick one")
    out_dir = writable_dir(settings.out_dir)
    device = resolve_device(settings.device)
    seed_everything(settings.seed)
    model, diffusion, checkpoint = load_for_inference(
        resolve_checkpoint(settings.checkpoint), device, settings.ema
    )
    check_mode(settings, sampling, diffusion, model)
    config = checkpoint["config"]
    classifier = None if settings.t_sweep else commitment_judge(settings, data, config, device)
    if settings.generate:
        return run_generation(
            model, diffusion, settings, sampling, image_shape(config), out_dir, device, classifier
        )
    plain = sampling.at(sampling.guidance[0])
    originals, true_labels, indices = chosen_test_images(settings, data, config, device)
    labels = conditioning(model.num_classes, settings.label, plain.guidance, true_labels)
    if settings.t_sweep:
        return run_t_sweep(model, diffusion, settings, plain, originals, labels, out_dir)
    return run_reconstruction(
        model, diffusion, settings, plain, originals, labels, indices, out_dir, classifier, true_labels
    )
