"""Sampling steps against quality: classifier-FID and wall time of each sampler for one checkpoint.

Runs DDPM with all T steps (Ho et al. 2020, arXiv:2006.11239, Algorithm 2), then DDIM (Song et al.
2021, arXiv:2010.02502, eta = 0) and DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095) at each
of --steps, all from the same starting noise, through diffusion.sample. Each set of samples is
judged by the MNIST classifier (benchmarks/classifier_judge.py): classifier-FID against the held-out
test digits and mean confidence, next to real training digits (the floor).

Example:
    python benchmarks/steps_vs_quality.py --checkpoint runs/time_to_digits/ours.pt --json runs/steps.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.classifier_judge import ClassifierJudge, real_data_floor  # noqa: E402
from checkpointing import latest_checkpoint, load_for_inference  # noqa: E402
from cli import (  # noqa: E402
    OneLineErrorParser,
    UserError,
    int_tuple,
    positive_int,
    resolve_device,
    run_cli,
    seed_everything,
    synchronize,
)
from data_sources import DATA_SETS, load_images  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402
from mnist_classifier import default_classifier_path  # noqa: E402

FEW_STEP_SAMPLERS = ("ddim", "dpm++2m")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--checkpoint", default=None, help="checkpoint to sample (default: newest in checkpoints/)")
    add("--steps", type=int_tuple, default="10,20,50,100", help="step counts for DDIM and DPM-Solver++")
    add("--ddpm", action=argparse.BooleanOptionalAction, default=True, help="include DDPM with all T steps")
    add("--num-samples", type=positive_int, default=256, help="samples judged per sampler and step count")
    add("--batch-size", type=positive_int, default=256, help="samples drawn at once")
    add("--data", choices=DATA_SETS, default="mnist-5k", help="data set whose test split is the reference")
    add("--data-dir", default=None, help="folder of MNIST-format IDX files (overrides --data)")
    add("--classifier", default=None, help="MNIST classifier weights (default: mnist_classifier.py's path)")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--seed", type=int, default=0, help="seed of the starting noise (the same for every sampler)")
    add("--device", default="auto", help="auto | cpu | cuda")
    add("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def runs(diffusion: GaussianDiffusion, args: argparse.Namespace) -> list[tuple[str, int]]:
    """(sampler, steps) pairs: DDPM with T steps first (if asked), then each few-step sampler.

    A step count the sampler cannot run (diffusion.timesteps refuses it) is a UserError.
    """
    pairs = [("ddpm", diffusion.T)] if args.ddpm else []
    pairs += [(sampler, steps) for sampler in FEW_STEP_SAMPLERS for steps in args.steps]
    for sampler, steps in pairs:
        try:
            diffusion.timesteps(sampler, steps, diffusion.T - 1)
        except ValueError as error:
            raise UserError(f"--steps: {error}") from None
    return pairs


def draw(
    model, diffusion: GaussianDiffusion, sampler: str, steps: int, args, device
) -> tuple[torch.Tensor, float]:
    """args.num_samples samples [N, 1, 28, 28] and the wall seconds they took."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start, batches = time.perf_counter(), []
    for first in range(0, args.num_samples, args.batch_size):
        count = min(args.batch_size, args.num_samples - first)
        batches.append(
            diffusion.sample(model, count, sampler=sampler, steps=steps, generator=generator).cpu()
        )
    synchronize(device)
    return torch.cat(batches), time.perf_counter() - start


def print_table(rows: list[dict], floor: dict, checkpoint: Path) -> None:
    ddpm = next((row for row in rows if row["sampler"] == "ddpm"), None)
    print(f"\n{checkpoint}: {floor['num_images']} samples per row")
    print(f"{'sampler':<10}{'steps':>6}{'wall s':>9}{'img/s':>8}{'mean conf':>11}{'cFID':>8}{'/ DDPM':>8}")
    print(
        f"{'real':<10}{'-':>6}{'-':>9}{'-':>8}{floor['mean_confidence']:>11.3f}{floor['classifier_fid']:>8.2f}"
    )
    for row in rows:
        ratio = f"{row['classifier_fid'] / ddpm['classifier_fid']:.2f}" if ddpm else "-"
        print(
            f"{row['sampler']:<10}{row['steps']:>6}{row['wall_seconds']:>9.1f}{row['img_per_s']:>8.2f}"
            f"{row['mean_confidence']:>11.3f}{row['classifier_fid']:>8.2f}{ratio:>8}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    checkpoint_path = Path(args.checkpoint) if args.checkpoint else latest_checkpoint()
    model, diffusion, _ = load_for_inference(checkpoint_path, device)
    test_images, _ = load_images(args.data, "test", args.data_dir)
    train_images, _ = load_images(args.data, "train", args.data_dir)
    judge = ClassifierJudge.load(
        args.classifier or default_classifier_path(args.data, args.data_dir), test_images
    )
    floor = real_data_floor(judge, train_images, args.num_samples, args.seed)

    rows = []
    for sampler, steps in tqdm(runs(diffusion, args), desc="samplers"):
        samples, seconds = draw(model, diffusion, sampler, steps, args, device)
        rows.append(
            {"sampler": sampler, "steps": steps, "wall_seconds": seconds, "img_per_s": len(samples) / seconds}
            | judge.score(samples)
        )
    print_table(rows, floor, checkpoint_path)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        report = {"checkpoint": str(checkpoint_path), "device": str(device), "torch": torch.__version__}
        Path(args.json).write_text(json.dumps(report | {"real_train_digits": floor, "rows": rows}, indent=2))


if __name__ == "__main__":
    run_cli(main)
