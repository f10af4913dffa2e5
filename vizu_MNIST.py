"""Watch the reverse diffusion process step by step: reconstructions of noised MNIST digits, or samples.

Reconstruction (default): take MNIST test digits, noise them to step --t with q(x_t | x_0) (eq. 4 of
Ho et al.), run the checkpoint's reverse process back to the clean end with `diffusion.reconstruct`,
and record at every model evaluation the MSE and SSIM of x_t and of the predicted x0 against the
original ([0, 1] scale, skimage SSIM with data_range=1). --t-sweep repeats the reconstruction from
several starting steps and tabulates the final MSE/SSIM. --generate starts from pure noise instead and
records how much the predicted x0 still changes at each step.

Files written to --out-dir:
  reconstruction  original.png noised.png denoised.png strip.png curves.png metrics.csv reverse.gif
  --t-sweep       t_sweep.csv t_sweep.png (and a table on the terminal)
  --generate      generated.png strip.png curves.png metrics.csv reverse.gif
strip.png has one row per image and one column per step (about --strip-steps of them); each cell shows
x_t on top of the predicted x0. reverse.gif shows x_t (top row) and the predicted x0 (bottom row).

Conventions: timesteps as in diffusion.py, t in {0..T-1} with the finished image reported as t = -1.
--steps counts model evaluations from t down to 0: DDPM always makes t + 1 of them; DDIM and
DPM-Solver++ make 1..t+1. In --t-sweep, starting steps >= T are clipped to T-1 (the pure-noise end).

Papers: DDPM, Ho et al. 2020 (arXiv:2006.11239); DDIM, Song et al. 2021 (arXiv:2010.02502);
DPM-Solver++, Lu et al. 2022 (arXiv:2211.01095); classifier-free guidance, Ho & Salimans 2022
(arXiv:2207.12598); SSIM, Wang et al. 2004 (IEEE TIP 13(4), no arXiv id).

Example:
    python vizu_MNIST.py --checkpoint checkpoints/last.pt --t 500 --sampler ddim --steps 50
    python vizu_MNIST.py --t-sweep --num-images 16 --sampler ddim --steps 100
    python vizu_MNIST.py --generate --num-images 8
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from torch import nn
from tqdm import tqdm

from checkpointing import latest_checkpoint, load_for_inference
from cli import (
    OneLineErrorParser,
    UserError,
    int_tuple,
    positive_float,
    positive_int,
    resolve_device,
    run_cli,
    seed_everything,
    writable_dir,
)
from data_sources import DATA_SETS, load_images
from diffusion import SAMPLERS, GaussianDiffusion, SamplerStep, final_sample
from image_metrics import image_grid, mse, save_image_grid, ssim, to_unit_range

GIF_SCALE = 3  # pixels per MNIST pixel in the GIF
GIF_HEADER_PX = 14  # room for the "t = ..." caption above each GIF frame
GIF_FRAME_MS, GIF_LAST_FRAME_MS = 80, 1500
STRIP_CELL_INCHES = 1.0
FINISHED_T = -1  # the t that samplers report for the finished image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", default=None, help="checkpoint to load (default: latest in checkpoints/)"
    )
    parser.add_argument(
        "--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights"
    )
    parser.add_argument(
        "--num-images", type=positive_int, default=4, help="images to reconstruct or generate"
    )
    parser.add_argument(
        "--index",
        default="",
        help="comma-separated test-split indices (overrides --num-images; default: the first)",
    )
    parser.add_argument("--t", type=int, default=500, help="reconstruction: noise the images to this step")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="reverse-process sampler")
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="model evaluations from t down to 0: DDPM always t+1 (leave unset); ddim/dpm++2m 1..t+1, "
        "default min(50, t+1)",
    )
    parser.add_argument(
        "--data", choices=DATA_SETS, default=None, help="test images (default: checkpoint's data)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder of MNIST-format IDX files (overrides --data)"
    )
    parser.add_argument("--out-dir", default="step_outputs_mnist", help="where images, CSVs and plots go")
    parser.add_argument(
        "--t-sweep", action=argparse.BooleanOptionalAction, default=False, help="final MSE/SSIM per start t"
    )
    parser.add_argument(
        "--sweep-t",
        type=int_tuple,
        default=(50, 100, 250, 500, 750, 999),
        help="starting steps of --t-sweep; values >= T are clipped to T-1",
    )
    parser.add_argument(
        "--generate", action=argparse.BooleanOptionalAction, default=False, help="sample from pure noise"
    )
    parser.add_argument(
        "--label",
        type=int,
        default=None,
        help="class to condition on, for class-conditional checkpoints (default: each test image's own "
        "label; with --generate, 0, 1, 2, ... in turn)",
    )
    parser.add_argument("--guidance", type=positive_float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--strip-steps", type=positive_int, default=10, help="columns (steps) in strip.png")
    parser.add_argument("--gif-frames", type=positive_int, default=60, help="most frames in reverse.gif")
    parser.add_argument("--seed", type=int, default=0, help="seed for the noise and the sampler")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return parser.parse_args(argv)


# ----- recording a trajectory ---------------------------------------------------------------------


@dataclass
class Trajectory:
    """Every step of one reverse-process run over B images; S = model evaluations + 1 (the finished one).

    timesteps: [S] ints ending with -1; x_t, pred_x0: [S, B, 1, 28, 28] on the CPU, in [-1, 1] scale.
    metrics: name -> [S, B] array. Always x0_change (MSE between consecutive pred_x0, NaN at the first
    step); with originals also mse_xt, ssim_xt, mse_x0, ssim_x0 against them ([0, 1] scale).
    """

    timesteps: list[int]
    x_t: torch.Tensor
    pred_x0: torch.Tensor
    metrics: dict[str, np.ndarray]


def record_steps(
    sampler_steps: Iterable[SamplerStep], originals: torch.Tensor | None = None, total: int | None = None
) -> Trajectory:
    """Consume a sampler's SamplerSteps, keeping x_t and pred_x0 at each and their metrics."""
    timesteps, states, predictions = [], [], []
    for step in tqdm(sampler_steps, total=total, desc="reverse process", leave=False):
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
    sampler: str = "ddpm",
    steps: int | None = None,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> Trajectory:
    """Noise originals [B, 1, 28, 28] in [-1, 1] to step t (eq. 4), denoise to 0, record every step.

    model is any nn.Module called as model(x_t, t, labels) that predicts what diffusion.prediction says.
    """
    sampler_steps, total = reconstruction_steps(
        model, diffusion, originals, t, sampler, steps, generator, labels, guidance
    )
    return record_steps(sampler_steps, originals, total)


def reconstruction_steps(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    originals: torch.Tensor,
    t: int,
    sampler: str,
    steps: int | None,
    generator: torch.Generator | None,
    labels: torch.Tensor | None,
    guidance: float,
) -> tuple[Iterable[SamplerStep], int]:
    """diffusion.reconstruct's step generator from t, and how many SamplerSteps it will yield."""
    sampler_steps = diffusion.reconstruct(
        model,
        originals,
        t,
        generator=generator,
        sampler=sampler,
        steps=steps,
        labels=labels,
        guidance=guidance,
    )
    return sampler_steps, len(diffusion.timesteps(sampler, steps, t)) + 1


def generation_trajectory(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    n: int,
    sampler: str = "ddpm",
    steps: int | None = None,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> Trajectory:
    """Sample n images from pure noise at t = T-1 and record every step."""
    total = len(diffusion.timesteps(sampler, steps, diffusion.T - 1)) + 1
    sampler_steps = diffusion.sample_progressive(
        model, n, sampler=sampler, steps=steps, generator=generator, labels=labels, guidance=guidance
    )
    return record_steps(sampler_steps, None, total)


def final_reconstruction(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    originals: torch.Tensor,
    t: int,
    sampler: str,
    steps: int | None,
    generator: torch.Generator,
    labels: torch.Tensor | None,
    guidance: float,
) -> torch.Tensor:
    """Only the finished reconstruction from step t: [B, 1, 28, 28] (for the t-sweep)."""
    sampler_steps, total = reconstruction_steps(
        model, diffusion, originals, t, sampler, steps, generator, labels, guidance
    )
    return final_sample(tqdm(sampler_steps, total=total, desc=f"t={t}", leave=False))


# ----- checking the user's input ------------------------------------------------------------------


def check_schedule(diffusion: GaussianDiffusion, t: int, sampler: str, steps: int | None) -> None:
    """A UserError unless t is a valid starting step and steps a valid number of model evaluations."""
    if not 0 <= t < diffusion.T:
        raise UserError(
            f"--t must be in [0, {diffusion.T - 1}] for this checkpoint (T = {diffusion.T}), got {t}"
        )
    try:
        diffusion.timesteps(sampler, steps, t)
    except ValueError as error:
        raise UserError(f"--steps: {error}") from None


def select_indices(index_text: str, num_images: int, split_size: int) -> list[int]:
    """Test-split indices from --index ('3,17,42'), else the first --num-images."""
    try:
        indices = list(int_tuple(index_text))
    except argparse.ArgumentTypeError as error:
        raise UserError(f"--index: {error}") from None
    indices = indices or list(range(num_images))
    outside = [index for index in indices if not 0 <= index < split_size]
    if outside:
        raise UserError(f"--index {outside[0]} is outside the test split [0, {split_size - 1}]")
    return indices


def conditioning(
    model: nn.Module, label: int | None, guidance: float, default: torch.Tensor
) -> torch.Tensor | None:
    """Class labels to condition on: None for an unconditional model, else --label or `default` [B]."""
    num_classes = getattr(model, "num_classes", None)
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


def sweep_starts(requested: tuple[int, ...], T: int) -> list[int]:
    """The --t-sweep starting steps, each >= T clipped to T-1 (said on the terminal), without repeats."""
    if not requested or min(requested) < 0:
        raise UserError(f"--sweep-t needs starting steps >= 0, got {requested}")
    clipped = [t for t in requested if t >= T]
    if clipped:
        print(f"note: --sweep-t {', '.join(map(str, clipped))} >= T = {T}: clipped to t = {T - 1}")
    return sorted({min(t, T - 1) for t in requested})


# ----- pictures and tables ------------------------------------------------------------------------


def evenly_spaced(count: int, wanted: int) -> list[int]:
    """About `wanted` evenly spaced indices into range(count), always the first and the last."""
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, min(wanted, count))})


def step_label(t: int) -> str:
    return "finished" if t == FINISHED_T else f"t = {t}"


def save_strip(trajectory: Trajectory, path: Path, columns: int, row_names: list[str], title: str) -> None:
    """One row per image, one column per step; each cell is x_t (top) over the predicted x0 (bottom)."""
    picks = evenly_spaced(len(trajectory.timesteps), columns)
    rows = trajectory.x_t.shape[1]
    figure = Figure(figsize=(STRIP_CELL_INCHES * len(picks) + 0.6, 2 * STRIP_CELL_INCHES * rows + 0.6))
    axes = figure.subplots(
        rows,
        len(picks),
        squeeze=False,
    )
    separator = torch.zeros(1, 2, trajectory.x_t.shape[-1])  # a grey line (0 is mid-grey in [-1, 1])
    for column, step in enumerate(picks):
        axes[0, column].set_title(step_label(trajectory.timesteps[step]), fontsize=8)
        for row in range(rows):
            pair = torch.cat([trajectory.x_t[step, row], separator, trajectory.pred_x0[step, row]], dim=-2)
            axes[row, column].imshow(
                to_unit_range(pair)[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest"
            )
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
    for row, name in enumerate(row_names):
        axes[row, 0].set_ylabel(f"{name}\nx_t / x̂0", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def save_reconstruction_curves(trajectory: Trajectory, path: Path, title: str) -> None:
    """MSE and SSIM against the original vs t, for x_t and predicted x0 (thin: each image; thick: mean)."""
    t = np.array(trajectory.timesteps)
    figure = Figure(figsize=(10, 3.8))
    axes = figure.subplots(1, 2)
    for axis, metric in zip(axes, ("mse", "ssim"), strict=True):
        for key, name, color in (("xt", "x_t", "tab:blue"), ("x0", "predicted x̂0", "tab:orange")):
            values = trajectory.metrics[f"{metric}_{key}"]
            axis.plot(t, values, color=color, alpha=0.25, linewidth=0.8)
            axis.plot(
                t, values.mean(1), color=color, linewidth=2, label=f"{name} (mean of {values.shape[1]})"
            )
        axis.set_ylabel(f"{metric.upper()} vs original")
        style_reverse_axis(axis)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def save_change_curve(trajectory: Trajectory, path: Path, title: str) -> None:
    """How much the predicted x0 changes at each step (MSE to the previous step's), vs t."""
    t = np.array(trajectory.timesteps[1:])
    change = trajectory.metrics["x0_change"][1:]
    figure = Figure(figsize=(6, 3.8))
    axis = figure.subplots()
    axis.plot(t, change, color="tab:orange", alpha=0.25, linewidth=0.8)
    axis.plot(t, change.mean(1), color="tab:orange", linewidth=2, label=f"mean of {change.shape[1]}")
    axis.set_yscale("log")
    axis.set_ylabel("MSE(x̂0 at this step, x̂0 at previous step)")
    style_reverse_axis(axis)
    axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def style_reverse_axis(axis: Axes) -> None:
    """t decreases from left to right, as the reverse process runs."""
    axis.invert_xaxis()
    axis.set_xlabel("t  (reverse process runs left to right; -1 = finished)")
    axis.grid(alpha=0.3)


def save_gif(trajectory: Trajectory, path: Path, frames: int) -> int:
    """Animated GIF of the reverse process: x_t (top row) and predicted x0 (bottom row); returns frames."""
    pictures = [gif_frame(trajectory, step) for step in evenly_spaced(len(trajectory.timesteps), frames)]
    durations = [GIF_FRAME_MS] * (len(pictures) - 1) + [GIF_LAST_FRAME_MS]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return len(pictures)


def gif_frame(trajectory: Trajectory, step: int) -> Image.Image:
    batch = trajectory.x_t.shape[1]
    grid = Image.fromarray(image_grid(torch.cat([trajectory.x_t[step], trajectory.pred_x0[step]]), batch))
    grid = grid.resize((grid.width * GIF_SCALE, grid.height * GIF_SCALE), Image.NEAREST)
    frame = Image.new("L", (grid.width, grid.height + GIF_HEADER_PX), 0)
    frame.paste(grid, (0, GIF_HEADER_PX))
    ImageDraw.Draw(frame).text((2, 1), step_label(trajectory.timesteps[step]), fill=255)
    return frame


def write_metrics_csv(trajectory: Trajectory, path: Path, image_ids: list[int]) -> None:
    """One row per (step, image): step number, t, image id, then every metric."""
    names = list(trajectory.metrics)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "t", "image", *names])
        for step, t in enumerate(trajectory.timesteps):
            for column, image in enumerate(image_ids):
                writer.writerow(
                    [step, t, image, *(f"{trajectory.metrics[n][step, column]:.6g}" for n in names)]
                )


# ----- the three modes ----------------------------------------------------------------------------


def load_originals(
    args: argparse.Namespace, checkpoint: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The chosen test-split images [B, 1, 28, 28] and labels [B] on device, and their indices."""
    name = args.data or checkpoint["config"].get("data", "mnist")
    images, labels = load_images(name, "test", data_dir=args.data_dir)
    indices = select_indices(args.index, args.num_images, len(images))
    return images[indices].to(device), labels[indices].to(device), indices


def run_reconstruction(model, diffusion, args, originals, labels, indices, out_dir: Path) -> None:
    generator = torch.Generator(originals.device).manual_seed(args.seed)
    trajectory = reconstruction_trajectory(
        model, diffusion, originals, args.t, args.sampler, args.steps, generator, labels, args.guidance
    )
    evaluations = len(trajectory.timesteps) - 1
    save_image_grid(originals, out_dir / "original.png", columns=len(indices))
    save_image_grid(trajectory.x_t[0], out_dir / "noised.png", columns=len(indices))
    save_image_grid(trajectory.x_t[-1], out_dir / "denoised.png", columns=len(indices))
    title = f"reconstruction from t = {args.t} ({args.sampler}, {evaluations} model evaluations)"
    save_strip(trajectory, out_dir / "strip.png", args.strip_steps, [f"#{i}" for i in indices], title)
    save_reconstruction_curves(trajectory, out_dir / "curves.png", title)
    write_metrics_csv(trajectory, out_dir / "metrics.csv", indices)
    frames = save_gif(trajectory, out_dir / "reverse.gif", args.gif_frames)
    final = {name: trajectory.metrics[name][-1] for name in ("mse_x0", "ssim_x0")}
    print(
        f"{title}: final MSE {final['mse_x0'].mean():.4f} +- {final['mse_x0'].std():.4f}, "
        f"SSIM {final['ssim_x0'].mean():.4f} +- {final['ssim_x0'].std():.4f} over {len(indices)} images; "
        f"wrote {out_dir}/ (GIF: {frames} frames)"
    )


def sweep_plan(diffusion: GaussianDiffusion, args: argparse.Namespace) -> list[tuple[int, int | None]]:
    """(start t, --steps capped at t+1) for each --t-sweep start, each checked."""
    plan = [
        (t, None if args.steps is None else min(args.steps, t + 1))
        for t in sweep_starts(args.sweep_t, diffusion.T)
    ]
    for t, steps in plan:
        check_schedule(diffusion, t, args.sampler, steps)
    return plan


def run_t_sweep(model, diffusion, args, plan, originals, labels, out_dir: Path) -> None:
    rows = []
    for t, steps in tqdm(plan, desc="t-sweep"):
        generator = torch.Generator(originals.device).manual_seed(args.seed)  # the same noise for every t
        final = final_reconstruction(
            model, diffusion, originals, t, args.sampler, steps, generator, labels, args.guidance
        )
        errors, similarities = mse(final, originals), ssim(final, originals)
        evaluations = len(diffusion.timesteps(args.sampler, steps, t))
        rows.append((t, evaluations, errors.mean(), errors.std(), similarities.mean(), similarities.std()))
    header = ("t", "evaluations", "mse_mean", "mse_std", "ssim_mean", "ssim_std")
    with open(out_dir / "t_sweep.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(
            [header, *[(t, n, *(f"{v:.6g}" for v in values)) for t, n, *values in rows]]
        )
    print_sweep_table(rows, len(originals), args.sampler)
    save_sweep_plot(rows, out_dir / "t_sweep.png", f"final reconstruction vs start t ({args.sampler})")


def print_sweep_table(rows: list[tuple], images: int, sampler: str) -> None:
    print(f"final reconstruction of {images} test images ({sampler}); [0, 1] scale, SSIM data_range=1")
    print(f"{'start t':>8} {'evals':>6} {'MSE':>17} {'SSIM':>17}")
    for t, evaluations, mse_mean, mse_std, ssim_mean, ssim_std in rows:
        print(
            f"{t:>8} {evaluations:>6} {mse_mean:>8.4f} +- {mse_std:.4f} {ssim_mean:>8.4f} +- {ssim_std:.4f}"
        )


def save_sweep_plot(rows: list[tuple], path: Path, title: str) -> None:
    t, _, mse_mean, mse_std, ssim_mean, ssim_std = (np.array(column) for column in zip(*rows, strict=True))
    figure = Figure(figsize=(9, 3.5))
    axes = figure.subplots(1, 2)
    for axis, mean, std, name in (
        (axes[0], mse_mean, mse_std, "MSE"),
        (axes[1], ssim_mean, ssim_std, "SSIM"),
    ):
        axis.errorbar(t, mean, yerr=std, marker="o", capsize=3)
        axis.set_xlabel("start t (noise level the images were taken to)")
        axis.set_ylabel(f"final {name} vs original (mean +- std)")
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def run_generation(model, diffusion, args, out_dir: Path, device: torch.device) -> None:
    check_schedule(diffusion, diffusion.T - 1, args.sampler, args.steps)
    default_labels = torch.arange(args.num_images, device=device) % (model.num_classes or 1)
    labels = conditioning(model, args.label, args.guidance, default_labels)
    generator = torch.Generator(device).manual_seed(args.seed)
    trajectory = generation_trajectory(
        model, diffusion, args.num_images, args.sampler, args.steps, generator, labels, args.guidance
    )
    evaluations = len(trajectory.timesteps) - 1
    samples = list(range(args.num_images))
    names = [f"sample {i}" if labels is None else f"class {int(labels[i])}" for i in samples]
    title = f"generation from pure noise ({args.sampler}, {evaluations} model evaluations)"
    save_image_grid(trajectory.x_t[-1], out_dir / "generated.png", columns=args.num_images)
    save_strip(trajectory, out_dir / "strip.png", args.strip_steps, names, title)
    save_change_curve(trajectory, out_dir / "curves.png", title)
    write_metrics_csv(trajectory, out_dir / "metrics.csv", samples)
    frames = save_gif(trajectory, out_dir / "reverse.gif", args.gif_frames)
    print(f"{title}: wrote {out_dir}/ (GIF: {frames} frames)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.generate and args.t_sweep:
        raise UserError("--generate and --t-sweep are separate modes: pick one")
    out_dir = writable_dir(args.out_dir)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model, diffusion, checkpoint = load_for_inference(
        args.checkpoint or latest_checkpoint(), device, args.ema
    )
    if args.generate:
        run_generation(model, diffusion, args, out_dir, device)
        return
    if args.t_sweep:
        plan = sweep_plan(diffusion, args)
    else:
        check_schedule(diffusion, args.t, args.sampler, args.steps)
    originals, true_labels, indices = load_originals(args, checkpoint, device)
    labels = conditioning(model, args.label, args.guidance, true_labels)
    if args.t_sweep:
        run_t_sweep(model, diffusion, args, plan, originals, labels, out_dir)
    else:
        run_reconstruction(model, diffusion, args, originals, labels, indices, out_dir)


if __name__ == "__main__":
    run_cli(main)
