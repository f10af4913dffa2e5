"""What vizu_MNIST.py shows: the reverse process of a checkpoint, step by step, as pictures and tables.

Three modes, each consuming diffusion.py's SamplerStep generators through trajectories.py (no
sampling loop of its own):
  reconstruction  test images noised to --t with q(x_t | x_0) (Ho et al. 2020, eq. 4) and denoised
                  back: original.png noised.png denoised.png strip.png curves.png metrics.csv reverse.gif
  --t-sweep       the final MSE/SSIM from each start t (sampling.reconstruction_sweep, the same as
                  eval_MNIST.py's): t_sweep.csv t_sweep.png and a table on the terminal
  --generate      samples from pure noise: generated.png strip.png curves.png metrics.csv reverse.gif

Example:
    visualise(VisualisationSettings(t=500), SamplingSettings(sampler="ddpm"), DataSettings(data=None))
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from checkpointing import data_source, image_shape, load_for_inference, resolve_checkpoint
from data_sources import load_images, shape_options, spread_over_classes
from diffusion import GaussianDiffusion
from messages import UserError
from output_files import writable_dir, write_csv
from pictures import (
    save_change_curve,
    save_gif,
    save_image_grid,
    save_reconstruction_curves,
    save_strip,
    save_sweep_plot,
)
from runtime import resolve_device, seed_everything
from sampling import check_sampling, reconstruction_sweep, sweep_timesteps
from settings import DataSettings, SamplingSettings, VisualisationSettings
from trajectories import Trajectory, generation_trajectory, reconstruction_trajectory


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
    trained_on = data_source(config)
    name, data_dir = data.data or trained_on[0], data.data_dir or (None if data.data else trained_on[1])
    images, labels = load_images(name, "test", data_dir, **shape_options(image_shape(config)))
    indices = list(settings.index) or spread_over_classes(labels, settings.num_images, settings.seed)
    outside = [index for index in indices if not 0 <= index < len(images)]
    if outside:
        raise UserError(f"--index {outside[0]} is outside the test split [0, {len(images) - 1}]")
    return images[indices].to(device), labels[indices].to(device), indices


def write_metrics_csv(trajectory: Trajectory, path: Path, image_ids: list[int]) -> None:
    """One row per (step, image): step number, t, image id, then every metric."""
    names = list(trajectory.metrics)
    rows = [["step", "t", "image", *names]]
    for step, t in enumerate(trajectory.timesteps):
        for column, image in enumerate(image_ids):
            rows.append([step, t, image, *(f"{trajectory.metrics[n][step, column]:.6g}" for n in names)])
    write_csv(rows, path)


def run_reconstruction(
    model, diffusion, settings, sampling, originals, labels, indices, out_dir: Path
) -> str:
    generator = torch.Generator(originals.device).manual_seed(settings.seed)
    trajectory = reconstruction_trajectory(
        model, diffusion, originals, settings.t, sampling, generator, labels
    )
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
        f"wrote {out_dir}/ (GIF: {frames} frames)"
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


def run_generation(model, diffusion, settings, sampling, shape, out_dir: Path, device: torch.device) -> str:
    default_labels = torch.arange(settings.num_images, device=device) % (model.num_classes or 1)
    labels = conditioning(model.num_classes, settings.label, sampling.guidance, default_labels)
    generator = torch.Generator(device).manual_seed(settings.seed)
    trajectory = generation_trajectory(
        model, diffusion, settings.num_images, shape, sampling, generator, labels
    )
    samples = list(range(settings.num_images))
    names = [f"sample {i}" if labels is None else f"class {int(labels[i])}" for i in samples]
    title = f"generation from pure noise ({sampling.sampler}, {trajectory.evaluations} model evaluations)"
    save_image_grid(trajectory.x_t[-1], out_dir / "generated.png", columns=settings.num_images)
    save_strip(trajectory, out_dir / "strip.png", settings.strip_steps, names, title)
    save_change_curve(trajectory, out_dir / "curves.png", title)
    write_metrics_csv(trajectory, out_dir / "metrics.csv", samples)
    frames = save_gif(trajectory, out_dir / "reverse.gif", settings.gif_frames)
    return f"{title}: wrote {out_dir}/ (GIF: {frames} frames)"


def check_mode(
    settings: VisualisationSettings,
    sampling: SamplingSettings,
    diffusion: GaussianDiffusion,
    model: nn.Module,
):
    """One-line errors for flags the chosen mode cannot run, before any image is loaded."""
    if settings.t_sweep:
        for t in sweep_timesteps(settings.sweep_t, diffusion.T, "--sweep-t"):
            check_sampling(diffusion, sampling, model.num_classes, t if sampling.sampler == "ddpm" else None)
    else:
        check_sampling(diffusion, sampling, model.num_classes, None if settings.generate else settings.t)


def visualise(settings: VisualisationSettings, sampling: SamplingSettings, data: DataSettings) -> str:
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
    if settings.generate:
        shape = image_shape(checkpoint["config"])
        return run_generation(model, diffusion, settings, sampling, shape, out_dir, device)
    originals, true_labels, indices = chosen_test_images(settings, data, checkpoint["config"], device)
    labels = conditioning(model.num_classes, settings.label, sampling.guidance, true_labels)
    if settings.t_sweep:
        return run_t_sweep(model, diffusion, settings, sampling, originals, labels, out_dir)
    return run_reconstruction(model, diffusion, settings, sampling, originals, labels, indices, out_dir)
