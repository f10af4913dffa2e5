"""Pictures: image grids, the training-loss plot, and every figure of the reverse process.

All take images in the model's range [-1, 1] ([N, C, H, W], C = 1 grey or 3 colour) and write
PNG/GIF files whole (output_files). Figures are matplotlib `Figure`s without a GUI backend.

Example:
    save_image_grid(samples, "runs/samples.png", columns=8)
    plot_loss("checkpoints/train_log.csv", "checkpoints/loss.png")
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from ddpm.evaluation.image_metrics import to_uint8
from ddpm.plumbing.output_files import save_figure, save_picture

GRID_PADDING = 2
GRID_SCALE = 2


def image_grid(images: torch.Tensor, columns: int, padding: int = GRID_PADDING) -> np.ndarray:
    """Tile [N, C, H, W] images in [-1, 1] into one uint8 array [rows (H+p) + p, columns (W+p) + p]
    (with a trailing channel axis of 3 for colour images)."""
    count, channels, height, width = images.shape
    rows = -(-count // columns)
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    grid = np.zeros(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels), np.uint8
    )
    for index in range(count):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = pixels[index]
    return grid[..., 0] if channels == 1 else grid


def grid_picture(images: torch.Tensor, columns: int, scale: int = GRID_SCALE) -> Image.Image:
    """image_grid as a PIL image, upscaled by `scale` (nearest neighbour) for viewing."""
    grid = Image.fromarray(image_grid(images, columns))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


def save_image_grid(
    images: torch.Tensor, path: str | Path, columns: int = 8, scale: int = GRID_SCALE
) -> None:
    """Save [N, C, H, W] images in [-1, 1] as one PNG grid, upscaled by `scale` for viewing."""
    save_picture(grid_picture(images, columns, scale), path)


def plot_loss(log_path: Path, plot_path: Path) -> None:
    """The logged training loss (train_log.csv) against the step, on a log scale."""
    with log_path.open(newline="") as log_file:
        rows = list(csv.DictReader(log_file))
    if not rows:
        return
    figure = Figure(figsize=(7, 4), tight_layout=True)
    axis = figure.subplots()
    axis.plot([int(row["step"]) for row in rows], [float(row["loss"]) for row in rows])
    axis.set(xlabel="step", ylabel="training loss", yscale="log", title="DDPM training loss")
    axis.grid(alpha=0.3)
    save_figure(figure, plot_path, dpi=120)


# ----- the reverse process (vizu_MNIST.py) --------------------------------------------------------

STRIP_CELL_INCHES = 1.0
GIF_SCALE = 3  # pixels per image pixel in the GIF
GIF_HEADER_PX = 14  # room for the "t = ..." caption above each GIF frame
GIF_FRAME_MS, GIF_LAST_FRAME_MS = 80, 1500
FINISHED_T = -1  # the t that samplers report for the finished image


def evenly_spaced(count: int, wanted: int) -> list[int]:
    """About `wanted` evenly spaced indices into range(count), always the first and the last."""
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, min(wanted, count))})


def step_label(t: int) -> str:
    return "finished" if t == FINISHED_T else f"t = {t}"


def show_image(axis, image: torch.Tensor) -> None:
    """Draw one [C, H, W] image in [-1, 1] (grey or colour) without ticks."""
    pixels = to_uint8(image[None])[0].permute(1, 2, 0).numpy()
    if pixels.shape[-1] == 1:
        axis.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        axis.imshow(pixels, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


def save_strip(trajectory, path: Path, columns: int, row_names: list[str], title: str) -> None:
    """One row per image, one column per step; each cell is x_t (top) over the predicted x0 (bottom)."""
    picks = evenly_spaced(len(trajectory.timesteps), columns)
    rows = trajectory.x_t.shape[1]
    figure = Figure(figsize=(STRIP_CELL_INCHES * len(picks) + 0.6, 2 * STRIP_CELL_INCHES * rows + 0.6))
    axes = figure.subplots(rows, len(picks), squeeze=False)
    channels, _, width = trajectory.x_t.shape[2:]
    separator = torch.zeros(channels, 2, width)  # a grey line (0 is mid-grey in [-1, 1])
    for column, step in enumerate(picks):
        axes[0, column].set_title(step_label(trajectory.timesteps[step]), fontsize=8)
        for row in range(rows):
            pair = torch.cat([trajectory.x_t[step, row], separator, trajectory.pred_x0[step, row]], dim=-2)
            show_image(axes[row, column], pair)
    for row, name in enumerate(row_names):
        axes[row, 0].set_ylabel(f"{name}\nx_t / x̂0", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, dpi=80)


def style_reverse_axis(axis) -> None:
    """t decreases from left to right, as the reverse process runs."""
    axis.invert_xaxis()
    axis.set_xlabel("t  (reverse process runs left to right; -1 = finished)")
    axis.grid(alpha=0.3)


def save_reconstruction_curves(trajectory, path: Path, title: str) -> None:
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
    save_figure(figure, path, dpi=80)


def save_change_curve(trajectory, path: Path, title: str) -> None:
    """How much the predicted x0 changes at each step (MSE to the previous step's), vs t."""
    t = np.array(trajectory.timesteps[1:])
    change = trajectory.metrics["x0_change"][1:]
    figure = Figure(figsize=(6, 3.8))
    axis = figure.subplots()
    axis.plot(t, change, color="tab:orange", alpha=0.25, linewidth=0.8)
    axis.plot(t, change.mean(1), color="tab:orange", linewidth=2, label=f"mean of {change.shape[1]}")
    if (change > 0).any():  # a log axis needs a positive value (an x0-hat that never moves has none)
        axis.set_yscale("log")
    axis.set_ylabel("MSE(x̂0 at this step, x̂0 at previous step)")
    style_reverse_axis(axis)
    axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=80)


def save_gif(trajectory, path: Path, frames: int) -> int:
    """Animated GIF of the reverse process: x_t (top row) and predicted x0 (bottom row); returns frames."""
    pictures = [gif_frame(trajectory, step) for step in evenly_spaced(len(trajectory.timesteps), frames)]
    durations = [GIF_FRAME_MS] * (len(pictures) - 1) + [GIF_LAST_FRAME_MS]
    save_picture(pictures[0], path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return len(pictures)


def gif_frame(trajectory, step: int) -> Image.Image:
    batch = trajectory.x_t.shape[1]
    grid = grid_picture(torch.cat([trajectory.x_t[step], trajectory.pred_x0[step]]), batch, GIF_SCALE)
    frame = Image.new(grid.mode, (grid.width, grid.height + GIF_HEADER_PX), 0)
    frame.paste(grid, (0, GIF_HEADER_PX))
    ImageDraw.Draw(frame).text(
        (2, 1), step_label(trajectory.timesteps[step]), fill=255 if grid.mode == "L" else "white"
    )
    return frame


def save_sweep_plot(per_t: dict[str, dict], path: Path, title: str) -> None:
    """Final MSE and SSIM (mean ± std) against the start t of a reconstruction sweep."""
    t = np.array([int(key) for key in per_t])
    figure = Figure(figsize=(9, 3.5))
    axes = figure.subplots(1, 2)
    for axis, name in zip(axes, ("mse", "ssim"), strict=True):
        mean = np.array([scores[f"{name}_mean"] for scores in per_t.values()])
        std = np.array([scores[f"{name}_std"] for scores in per_t.values()])
        axis.errorbar(t, mean, yerr=std, marker="o", capsize=3)
        axis.set_xlabel("start t (noise level the images were taken to)")
        axis.set_ylabel(f"final {name.upper()} vs original (mean +- std)")
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=80)


# ----- metrics over training (eval_MNIST.py with several checkpoints) -----------------------------

CURVE_TITLES = {"fid": "FID", "is_mean": "IS", "precision": "precision", "recall": "recall"}


def save_training_curves(rows: list[dict], path: Path) -> None:
    """FID, IS, precision and recall against the epoch (training_curves.curve_rows), per extractor,
    with error bars where there are standard deviations over repeats, and the floor dashed."""
    epochs = np.array([np.nan if row["epoch"] is None else row["epoch"] for row in rows], dtype=float)
    labels = [label for label in ("classifier", "inception") if f"{label}_fid" in rows[0]]
    figure = Figure(figsize=(10, 6.5))
    axes = figure.subplots(2, 2).flatten()
    for axis, (key, title) in zip(axes, CURVE_TITLES.items(), strict=True):
        for label, color in zip(labels, ("tab:blue", "tab:green"), strict=False):
            for prefix, style, name in (("", "-o", "samples"), ("floor_", "--", "floor (real train)")):
                values = np.array([row[f"{prefix}{label}_{key}"] for row in rows], dtype=float)
                stds = [row[f"{prefix}{label}_{key}_std"] for row in rows]
                errors = None if "" in stds else np.array(stds, dtype=float)
                axis.errorbar(
                    epochs, values, yerr=errors, fmt=style, color=color, capsize=3, label=f"{label} {name}"
                )
        axis.set(xlabel="epoch", ylabel=title, title=title)
        axis.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    figure.suptitle("metrics over training", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=90)


# ----- when the digit is decided (vizu_MNIST.py) --------------------------------------------------

LEGEND_MAX_IMAGES = 10


def save_commitment_plot(trajectory, decided_t: np.ndarray, path: Path, title: str) -> None:
    """Left: the classifier's probability of the final class for x0-hat against t, one line per image;
    right: a histogram of the t at which each image's predicted class stops changing."""
    t = np.array(trajectory.timesteps)
    probability, final_class = trajectory.metrics["p_final_class"], trajectory.metrics["predicted_class"][-1]
    figure = Figure(figsize=(11, 3.8))
    left, right = figure.subplots(1, 2)
    few = probability.shape[1] <= LEGEND_MAX_IMAGES
    for image in range(probability.shape[1]):
        label = f"image {image} (class {final_class[image]})" if few else None
        left.plot(t, probability[:, image], alpha=0.8 if few else 0.25, linewidth=1, label=label)
    left.plot(t, probability.mean(1), color="black", linewidth=2, label=f"mean of {probability.shape[1]}")
    left.set(ylabel="classifier's P(final class | x̂0)", ylim=(-0.02, 1.02))
    style_reverse_axis(left)
    left.legend(fontsize=7)
    right.hist(decided_t, bins=min(20, max(1, len(set(decided_t.tolist())))), color="tab:purple")
    right.set(xlabel="t at which the predicted class stops changing", ylabel="images")
    right.invert_xaxis()
    right.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=80)
