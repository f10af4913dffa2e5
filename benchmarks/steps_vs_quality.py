"""Sampling steps against quality: classifier metrics and wall time of each sampler for one checkpoint.

Runs DDPM with all T steps (Ho et al. 2020, arXiv:2006.11239, Algorithm 2), then DDIM (Song et al.
2021, arXiv:2010.02502, eta = 0), DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095) and Heun
(Karras et al. 2022, arXiv:2206.00364, Algorithm 1) at each of --steps model evaluations, all from
the same starting noise, through sampling.generate_samples. Heun makes 2 evaluations per noise level,
so it runs steps or steps - 1 of them (the table shows the count it made). Each set of samples
is judged as eval_MNIST.py judges it (scoring.classifier_scores: torch-fidelity with the data's
classifier): classifier-FID against the test split, precision, recall and mean confidence, next to
as many real training images (the floor).

Example:
    python -m benchmarks.steps_vs_quality --checkpoint weights/demo_mnist5k.pt --json runs/steps.json
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from ddpm.datasets.sources import load_images, shape_options
from ddpm.evaluation.feature_metrics import floor_set
from ddpm.evaluation.scoring import classifier_comparison, classifier_scores
from ddpm.plumbing.checkpointing import data_source, image_shape, load_for_inference, resolve_checkpoint
from ddpm.plumbing.cli import OneLineErrorParser, positive_int, positive_int_tuple, run_cli
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import write_json
from ddpm.plumbing.provenance import hardware
from ddpm.plumbing.runtime import resolve_device, seed_everything, synchronize
from ddpm.plumbing.settings import SamplingSettings
from ddpm.sampling import generate_samples
from diffusion import GaussianDiffusion

FEW_STEP_SAMPLERS = ("ddim", "dpm++2m", "heun")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--checkpoint", default=None, help="checkpoint (default: newest in checkpoints/, else the demo model)"
    )
    add(
        "--steps",
        type=positive_int_tuple,
        default="10,20,50,100",
        help="model evaluations for DDIM, DPM-Solver++ and Heun",
    )
    add("--ddpm", action=argparse.BooleanOptionalAction, default=True, help="include DDPM with all T steps")
    add("--num-samples", type=positive_int, default=1000, help="samples judged per sampler and step count")
    add("--batch-size", type=positive_int, default=250, help="samples drawn at once")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--seed", type=int, default=0, help="seed of the starting noise (the same for every sampler)")
    add("--device", default="auto", help="auto | cpu | cuda[:N]")
    add("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def runs(diffusion: GaussianDiffusion, args: argparse.Namespace) -> list[tuple[str, int | None]]:
    """(sampler, steps) pairs: DDPM with T steps first (if asked), then each few-step sampler.

    A step count the sampler cannot run (diffusion.timesteps refuses it) is a UserError, except one
    too few for Heun (at least 2 noise levels: 3 or 4 evaluations), which only leaves Heun's row out.
    """
    pairs = [("ddpm", None)] if args.ddpm else []
    pairs += [(sampler, steps) for sampler in FEW_STEP_SAMPLERS for steps in args.steps]
    runnable = []
    for sampler, steps in pairs:
        try:
            diffusion.timesteps(sampler, steps, diffusion.T - 1)
        except ValueError as error:
            if sampler != "heun":  # DDIM, checked first, accepts every count up to T that Heun does
                raise UserError(f"--steps: {error}") from None
            print(f"note: heun skips --steps {steps}: {error}")
            continue
        runnable.append((sampler, steps))
    return runnable


def print_table(rows: list[dict], floor: dict, checkpoint: str) -> None:
    ddpm = next((row for row in rows if row["sampler"] == "ddpm"), None)
    print(f"\n{checkpoint}: {floor['num_images']} samples per row")
    print(
        f"{'sampler':<10}{'steps':>6}{'wall s':>9}{'img/s':>8}{'confidence':>11}{'precision':>10}"
        f"{'recall':>8}{'cFID':>8}{'/ DDPM':>8}"
    )
    print(
        f"{'real':<10}{'-':>6}{'-':>9}{'-':>8}{floor['mean_confidence']:>11.3f}{floor['precision']:>10.3f}"
        f"{floor['recall']:>8.3f}{floor['fid']:>8.2f}"
    )
    for row in rows:
        ratio = f"{row['fid'] / ddpm['fid']:.2f}" if ddpm else "-"
        print(
            f"{row['sampler']:<10}{row['steps']:>6}{row['wall_seconds']:>9.1f}{row['img_per_s']:>8.2f}"
            f"{row['mean_confidence']:>11.3f}{row['precision']:>10.3f}{row['recall']:>8.3f}{row['fid']:>8.2f}"
            f"{ratio:>8}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    checkpoint_path = resolve_checkpoint(args.checkpoint)
    model, diffusion, checkpoint = load_for_inference(checkpoint_path, device)
    data, data_dir = data_source(checkpoint["config"])
    shape = image_shape(checkpoint["config"])
    comparison = classifier_comparison(data, data_dir, args.batch_size, args.seed, device, shape)
    train_images, _ = load_images(data, "train", data_dir, **shape_options(shape))
    floor = classifier_scores(floor_set(train_images, args.num_samples, data, args.seed), comparison)

    rows = []
    for sampler, steps in tqdm(runs(diffusion, args), desc="samplers"):
        start = time.perf_counter()
        samples, _ = generate_samples(
            model, diffusion, args.num_samples, sampling=SamplingSettings(sampler, steps),
            image_shape=shape, seed=args.seed, device=device,
            batch_size=args.batch_size, progress=False,
        )  # fmt: skip
        synchronize(device)
        seconds = time.perf_counter() - start
        evaluations = len(diffusion.timesteps(sampler, steps, diffusion.T - 1))
        row = {
            "sampler": sampler,
            "steps": evaluations,
            "wall_seconds": seconds,
            "img_per_s": len(samples) / seconds,
        }
        rows.append(row | classifier_scores(samples, comparison))
    print_table(rows, floor, str(checkpoint_path))
    if args.json:
        report = {"checkpoint": str(checkpoint_path), "device": hardware(device), "torch": torch.__version__}
        write_json(report | {"real_train_images": floor, "rows": rows}, args.json)


if __name__ == "__main__":
    run_cli(main)
