"""Training on colour images, measured offline: a generated folder of PNGs through the trainer of
train_MNIST.py, and how far its loss falls.

No colour data set can be downloaded on an offline machine, so this writes one (seeded): two
classes, discs and squares of a random colour, size and place on a dark background of random tint,
S x S PNG files in torchvision's ImageFolder layout (one sub-folder per class). It then trains a
small U-Net on them for --steps steps through trainer.train, with train_MNIST.py's flags (printed,
so that the run can be repeated with the script; further flags given here are passed on and
override them), and reports the mean logged loss of Ho et al. 2020 (arXiv:2006.11239, eq. 14) over
the first and the last --window rows of train_log.csv.

Example:
    python -m benchmarks.colour_training --steps 300 --out-dir runs/colour
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm.plumbing.cli import OneLineErrorParser, positive_int, run_cli
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import write_json
from ddpm.plumbing.presets import training_job_from_flags
from ddpm.training.trainer import train
from ddpm.training.training_log import LOG_NAME

CLASSES = ("discs", "squares")
BACKGROUND_MAX, SHAPE_MIN = 60, 120  # background channels in 0..59, shape channels in 120..255
SMALL_UNET = ["--model-channels", "32", "--channel-mult", "1,2,2", "--num-res-blocks", "1",
              "--attn-resolutions", "", "--dropout", "0"]  # fmt: skip


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--steps", type=positive_int, default=300, help="training steps")
    add("--images-per-class", type=positive_int, default=256, help="generated PNGs per class")
    add("--image-size", type=positive_int, default=32, help="side of the generated images")
    add("--batch-size", type=positive_int, default=32, help="images per training step")
    add("--log-every", type=positive_int, default=10, help="steps per row of train_log.csv")
    add("--window", type=positive_int, default=5, help="rows of the log averaged at the start and the end")
    add("--seed", type=int, default=0, help="seed of the images, the weights and the data order")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--out-dir", default="runs/colour_training", help="the PNG folder and the run go here")
    add("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_known_args(argv)


def write_shape_images(folder: Path, per_class: int, size: int, seed: int) -> None:
    """per_class PNGs per class in folder/<class>/: a disc or a square of a random colour on a dark
    background; radius (or half side) in [size/8, size/3), fully inside the image."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[:size, :size]
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = np.broadcast_to(
                rng.integers(0, BACKGROUND_MAX, 3, dtype=np.uint8), (size, size, 3)
            ).copy()
            radius = int(rng.integers(size // 8, size // 3))
            centre_x, centre_y = rng.integers(radius, size - radius, 2)
            dx, dy = columns - centre_x, rows - centre_y
            inside = dx**2 + dy**2 < radius**2 if label == 0 else (abs(dx) < radius) & (abs(dy) < radius)
            pixels[inside] = rng.integers(SHAPE_MIN, 256, 3, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{index:04d}.png")


def training_flags(args: argparse.Namespace, data_dir: Path, run_dir: Path, extra: list[str]) -> list[str]:
    """train_MNIST.py's flags of the run: a small U-Net, no checkpoints or grids before the end."""
    return [
        "--data-dir", str(data_dir), "--channels", "3", "--image-size", str(args.image_size),
        "--max-steps", str(args.steps), *SMALL_UNET, "--batch-size", str(args.batch_size), "--lr", "1e-3",
        "--warmup-steps", "20", "--log-every", str(args.log_every), "--save-every", "1000",
        "--sample-every", "1000", "--eval-every", "0", "--device", "cpu", "--seed", str(args.seed),
        "--out-dir", str(run_dir), *extra,
    ]  # fmt: skip


def loss_summary(log_path: Path, window: int) -> dict:
    """Mean loss of the first and last `window` rows of train_log.csv, and the step ranges."""
    with log_path.open(newline="") as log_file:
        rows = [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(log_file)]
    if len(rows) < 2 * window:
        raise UserError(f"{log_path} has {len(rows)} rows: fewer than 2 x --window {window}")
    first, last = rows[:window], rows[-window:]
    return {
        "first_steps": [first[0][0], first[-1][0]],
        "first_loss": float(np.mean([loss for _, loss in first])),
        "last_steps": [last[0][0], last[-1][0]],
        "last_loss": float(np.mean([loss for _, loss in last])),
    }


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    data_dir, run_dir = out_dir / "pngs", out_dir / "run"
    if run_dir.exists():
        raise UserError(f"{run_dir} exists: give this run another --out-dir")
    write_shape_images(data_dir, args.images_per_class, args.image_size, args.seed)
    flags = training_flags(args, data_dir, run_dir, extra)
    print("train_MNIST.py " + " ".join(flags))
    start = time.perf_counter()
    result = train(training_job_from_flags(flags))
    seconds = time.perf_counter() - start
    summary = loss_summary(run_dir / LOG_NAME, args.window) | {"steps": result.step, "seconds": seconds}
    print(
        f"{2 * args.images_per_class} generated {args.image_size}x{args.image_size} colour PNGs, "
        f"{result.step} steps in {seconds:.0f} s ({torch.get_num_threads()} torch threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}): mean loss "
        f"{summary['first_loss']:.4f} over steps {summary['first_steps'][0]}-{summary['first_steps'][1]}, "
        f"{summary['last_loss']:.4f} over steps {summary['last_steps'][0]}-{summary['last_steps'][1]}"
    )
    if args.json:
        write_json({"flags": flags, "torch": torch.__version__, "results": summary}, args.json)


if __name__ == "__main__":
    run_cli(main)
