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
  --interpolate   slerp between DDIM-inverted test digits (or seeds' noises), decoded by DDIM
                  (interpolation.py): interpolation.png interpolation.gif interpolation.csv
  --inpaint MASK  RePaint of the test digits' hole (inpainting.py, masks.py): inpainting.png strip.png
                  reverse.gif inpainting.csv
Reconstruction and generation also record the classifier's class of x0-hat at every step (classifier.py,
the shipped one for MNIST): commitment.png (the final class's probability against t per image, and a
histogram of the t at which the predicted class stops changing), commitment.csv (per image: label,
final class, that t and step; the probability per step is in metrics.csv).

Example:
    visualise(VisualisationSettings(t=500), GuidedSamplingSettings(sampler="ddpm"), DataSettings(data=None))
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from torch import nn

from ddpm.datasets.sources import load_images, shape_options, spread_over_classes
from ddpm.plumbing.checkpointing import data_source, image_shape, load_for_inference, resolve_checkpoint
from ddpm.plumbing.inference_settings import EditingSettings, VisualisationSettings
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import writable_dir, write_csv
from ddpm.plumbing.processes import Processes
from ddpm.plumbing.runtime import resolve_device, seed_everything
from ddpm.plumbing.settings import DataSettings, GuidedSamplingSettings, SamplingSettings
from ddpm.sampling import batch_starts, check_sampling, check_sweep, reconstruction_sweep, sweep_timesteps
from ddpm.visualisation.commitment import (
    COMMITMENT_HEADER,
    commitment_judge,
    commitment_rows,
    commitment_summary,
)
from ddpm.visualisation.inpainting import DEFAULT_INPAINT_LEVELS, RepaintPlan, run_inpainting
from ddpm.visualisation.interpolation import DEFAULT_INVERSION_STEPS, noise_latents, run_interpolation
from ddpm.visualisation.masks import make_mask
from ddpm.visualisation.pictures import (
    save_change_curve,
    save_gif,
    save_image_grid,
    save_reconstruction_curves,
    save_strip,
    save_sweep_plot,
)
from ddpm.visualisation.trajectories import (
    Trajectory,
    generation_trajectory,
    joined,
    reconstruction_trajectory,
)
from diffusion import GaussianDiffusion

DEFAULT_SAMPLING = GuidedSamplingSettings(sampler="ddpm")  # vizu_MNIST.py's sampler defaults


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
    model, diffusion, settings, sampling: GuidedSamplingSettings, shape, out_dir: Path, processes, classifier
) -> str:
    """Samples from pure noise with each --guidance scale (the same noise; files suffixed
    _guidance<g> when there are several), and when the digit is decided in each. Under torchrun
    each rank draws its share and rank 0 alone draws the pictures (the other ranks return "")."""
    device = processes.device
    default_labels = torch.arange(settings.num_images, device=device) % (model.num_classes or 1)
    several = len(sampling.guidance) > 1
    lines, rows = [], []
    for guidance in sampling.guidance:
        labels = conditioning(model.num_classes, settings.label, guidance, default_labels)
        trajectory = shared_generation(
            model, diffusion, settings, sampling.at(guidance), shape, labels, processes
        )
        if trajectory is None:
            continue
        suffix = f"_guidance{guidance:g}" if several else ""
        line = generation_pictures(trajectory, settings, sampling.at(guidance), out_dir, suffix, labels)
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


def shared_generation(
    model, diffusion, settings, sampling: SamplingSettings, shape, labels, processes: Processes
) -> Trajectory | None:
    """The --num-images samples' trajectory on rank 0 (None on the others), drawn in batches of
    --batch-size dealt over the ranks (batch_starts; each sample's noise a function of (seed, i)
    alone) and gathered by rank 0 in sample order: the same batches, so the same bits, as one process."""
    count, size = settings.num_images, settings.batch_size
    batches = [
        generation_trajectory(
            model, diffusion, range(start, min(start + size, count)), shape, sampling, settings.seed,
            None if labels is None else labels[start : start + size], progress=processes.is_main,
        )
        for start in batch_starts(count, size, processes.rank, processes.world_size)
    ]  # fmt: skip
    per_rank = processes.gather(batches)
    if not processes.is_main:
        return None
    ranks, total = len(per_rank), sum(len(rank_batches) for rank_batches in per_rank)
    return joined([per_rank[k % ranks][k // ranks] for k in range(total)])


def generation_pictures(
    trajectory: Trajectory, settings, sampling, out_dir: Path, suffix: str, labels
) -> str:
    """One generation's pictures; returns a line to print."""
    samples = range(settings.num_images)
    names = [f"sample {i}" if labels is None else f"class {int(labels[i])}" for i in samples]
    title = f"generation from pure noise ({sampling.sampler}, {trajectory.evaluations} model evaluations)"
    if sampling.guidance != 1.0:
        title += f", guidance {sampling.guidance:g}"
    save_image_grid(trajectory.x_t[-1], out_dir / f"generated{suffix}.png", columns=settings.num_images)
    save_strip(trajectory, out_dir / f"strip{suffix}.png", settings.strip_steps, names, title)
    save_change_curve(trajectory, out_dir / f"curves{suffix}.png", title)
    frames = save_gif(trajectory, out_dir / f"reverse{suffix}.gif", settings.gif_frames)
    return f"{title}: wrote {out_dir}/ (GIF{suffix}: {frames} frames)"


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
            starts = sweep_timesteps(settings.sweep_t, diffusion.T, "--sweep-t")
            for t in starts if plain.sampler == "ddpm" else []:  # ddpm refuses --steps: it runs every step
                check_sampling(diffusion, plain, num_classes, t)
            check_sweep(diffusion, plain, num_classes, starts)
        else:
            check_sampling(diffusion, plain, num_classes, None if settings.generate else settings.t)


def check_editing(
    settings: VisualisationSettings,
    editing: EditingSettings,
    sampling: GuidedSamplingSettings,
    diffusion: GaussianDiffusion,
    num_classes: int | None,
) -> None:
    """One-line errors for --interpolate and --inpaint flags, before any image is loaded."""
    if (sampling.sampler, sampling.eta, sampling.s_churn) != (
        DEFAULT_SAMPLING.sampler, DEFAULT_SAMPLING.eta, DEFAULT_SAMPLING.s_churn
    ):  # fmt: skip
        raise UserError(
            "--interpolate decodes with DDIM (eta 0) and --inpaint runs RePaint's ancestral steps: "
            "--sampler, --eta and --s-churn do not apply"
        )
    if len(sampling.guidance) > 1:
        raise UserError("several --guidance values are for --generate; edit with one")
    if editing.interpolate and (len(settings.index) or settings.num_images) < 2:
        raise UserError("--interpolate needs at least two images: --index A,B or --num-images 2 or more")
    if editing.from_noise and settings.index:
        raise UserError(
            "--from-noise interpolates the noises of --num-images seeds; --index picks test digits"
        )
    check_sampling(
        diffusion,
        SamplingSettings("ddim", editing_steps(editing, sampling), guidance=sampling.guidance[0]),
        num_classes,
    )


def editing_steps(editing: EditingSettings, sampling: GuidedSamplingSettings) -> int:
    """--steps, else the mode's default: DDIM steps of --interpolate, RePaint's levels of --inpaint."""
    if sampling.steps is not None:
        return sampling.steps
    return DEFAULT_INVERSION_STEPS if editing.interpolate else DEFAULT_INPAINT_LEVELS


def edit(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    config: dict,
    settings: VisualisationSettings,
    editing: EditingSettings,
    sampling: GuidedSamplingSettings,
    data: DataSettings,
    out_dir: Path,
    device: torch.device,
) -> str:
    """--interpolate (test digits, or with --from-noise seeds' noises) or --inpaint."""
    guidance, steps, shape = sampling.guidance[0], editing_steps(editing, sampling), image_shape(config)
    num_classes = cast(int | None, model.num_classes)
    if editing.from_noise:
        seeds = [settings.seed + i for i in range(settings.num_images)]
        default_labels = torch.arange(len(seeds), device=device) % (num_classes or 1)
        return run_interpolation(
            model, diffusion, frames=editing.frames, steps=steps, out_dir=out_dir, originals=None,
            latents=noise_latents(len(seeds), shape, settings.seed, device), guidance=guidance, sources=seeds,
            labels=conditioning(num_classes, settings.label, guidance, default_labels),
        )  # fmt: skip
    mask = make_mask(editing.inpaint, shape[1:], settings.seed) if editing.inpaint else None
    originals, true_labels, indices = chosen_test_images(settings, data, config, device)
    labels = conditioning(num_classes, settings.label, guidance, true_labels)
    if mask is None:
        return run_interpolation(
            model, diffusion, frames=editing.frames, steps=steps, out_dir=out_dir, originals=originals,
            latents=None, labels=labels, guidance=guidance, sources=indices,
        )  # fmt: skip
    return run_inpainting(
        model, diffusion, originals=originals, mask=mask, seed=settings.seed, labels=labels,
        guidance=guidance, plan=RepaintPlan(steps, editing.jump_length, editing.resamples),
        true_labels=true_labels, indices=indices, out_dir=out_dir, strip_steps=settings.strip_steps,
        gif_frames=settings.gif_frames, classifier=commitment_judge(settings, data, config, device),
    )  # fmt: skip


def check_modes(settings: VisualisationSettings, editing: EditingSettings) -> None:
    """At most one of the modes besides reconstruction; --from-noise only with --interpolate."""
    chosen = [
        flag
        for flag, on in (("--generate", settings.generate), ("--t-sweep", settings.t_sweep),
                         ("--interpolate", editing.interpolate), ("--inpaint", editing.inpaint is not None))
        if on
    ]  # fmt: skip
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} are separate modes: pick one")
    if editing.from_noise and not editing.interpolate:
        raise UserError("--from-noise is for --interpolate")


def visualise(
    settings: VisualisationSettings,
    sampling: GuidedSamplingSettings,
    data: DataSettings,
    editing: EditingSettings | None = None,
    processes: Processes | None = None,
) -> str:
    """Run the chosen mode; returns what to print. Under torchrun (processes of several ranks, for
    --generate alone) every rank samples its share and rank 0 alone writes and returns the text."""
    editing = editing if editing is not None else EditingSettings()
    check_modes(settings, editing)
    if processes is None:
        processes = Processes(rank=0, world_size=1, device=resolve_device(settings.device))
    out_dir = writable_dir(settings.out_dir) if processes.is_main else Path(settings.out_dir)
    device = processes.device
    seed_everything(settings.seed)
    model, diffusion, checkpoint = load_for_inference(
        resolve_checkpoint(settings.checkpoint), device, settings.ema
    )
    config = checkpoint["config"]
    if editing.interpolate or editing.inpaint is not None:
        check_editing(settings, editing, sampling, diffusion, cast(int | None, model.num_classes))
        return edit(model, diffusion, config, settings, editing, sampling, data, out_dir, device)
    check_mode(settings, sampling, diffusion, model)
    judge = not settings.t_sweep and processes.is_main
    classifier = commitment_judge(settings, data, config, device) if judge else None
    if settings.generate:
        return run_generation(
            model, diffusion, settings, sampling, image_shape(config), out_dir, processes, classifier
        )
    plain = sampling.at(sampling.guidance[0])
    originals, true_labels, indices = chosen_test_images(settings, data, config, device)
    labels = conditioning(model.num_classes, settings.label, plain.guidance, true_labels)
    if settings.t_sweep:
        return run_t_sweep(model, diffusion, settings, plain, originals, labels, out_dir)
    return run_reconstruction(
        model, diffusion, settings, plain, originals, labels, indices, out_dir, classifier, true_labels
    )
