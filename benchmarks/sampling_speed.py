"""Wall time of sampling many images (default 10,000 in 50 DDIM steps) through eval_MNIST's code path.

Times `eval_MNIST.generate_samples` (diffusion.sample in batches, DDIM of Song et al. 2021,
arXiv:2010.02502, or any sampler of diffusion.py) end to end, images copied back to the host
included. The U-Net comes from --checkpoint, or is a randomly initialised one of train_MNIST.py's
default size (the time of a sampler does not depend on the weights). A warm-up batch of
--warmup-steps steps runs first, untimed, so that torch.compile, cuDNN autotuning and the CUDA
context stay out of the figures; its time is reported apart. Each configuration in --batch-sizes
is then timed --repeats times (median, min-max).

Example:
    python benchmarks/sampling_speed.py --batch-sizes 1000,2500,10000 --compile --json runs/sampling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpointing import load_for_inference  # noqa: E402
from cli import (  # noqa: E402
    OneLineErrorParser,
    UserError,
    add_unet_speed_flags,
    configure_fast_path,
    inference_unet,
    int_tuple,
    parse_with_unet_speed_flags,
    positive_int,
    resolve_amp,
    resolve_device,
    run_cli,
    seed_everything,
    synchronize,
)
from diffusion import SAMPLERS, GaussianDiffusion  # noqa: E402
from eval_MNIST import check_sampling_flags, generate_samples, hardware  # noqa: E402
from model import UNet, count_parameters  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--checkpoint", default=None, help="checkpoint to sample (default: an untrained default-size U-Net)")
    add("--num-samples", type=positive_int, default=10000, help="images per timed run")
    add("--sampler", choices=SAMPLERS, default="ddim", help="reverse process")
    add("--steps", type=positive_int, default=50, help="sampler steps (network evaluations)")
    add("--batch-sizes", type=int_tuple, default="250,2500", help="images per sampler batch, each timed")
    add_unet_speed_flags(parser)
    add("--repeats", type=positive_int, default=2, help="timed runs per batch size")
    add("--warmup-steps", type=positive_int, default=2, help="sampler steps of the untimed warm-up batch")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--seed", type=int, default=0, help="seed of the weights (no checkpoint) and the noise")
    add("--device", default="auto", help="auto | cpu | cuda")
    add("--json", default=None, help="also write the results to this JSON file")
    return parse_with_unet_speed_flags(parser, argv)


def load_network(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, GaussianDiffusion]:
    """The checkpoint's EMA U-Net and diffusion, or an untrained default U-Net with the cosine schedule."""
    if args.checkpoint is not None:
        model, diffusion, _ = load_for_inference(Path(args.checkpoint), device)
    else:
        model, diffusion = UNet().to(device).eval(), GaussianDiffusion().to(device)
    return model, diffusion


def sampling_flags(args, num_samples: int, batch_size: int, sampler: str, steps: int | None):
    """The flags eval_MNIST.generate_samples reads, for one run."""
    return argparse.Namespace(
        num_samples=num_samples,
        batch_size=batch_size,
        sampler=sampler,
        steps=steps,
        eta=0.0,
        guidance=1.0,
        seed=args.seed,
        amp=args.amp,
    )


def timed_run_flags(args, batch_size: int) -> argparse.Namespace:
    """The flags of a timed run: --num-samples images with --sampler (DDPM runs all T steps)."""
    steps = None if args.sampler == "ddpm" else args.steps
    return sampling_flags(args, args.num_samples, batch_size, args.sampler, steps)


def check_flags(args: argparse.Namespace, model, diffusion: GaussianDiffusion) -> None:
    """One-line errors for batch sizes below 1 and for what eval_MNIST.py would refuse."""
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise UserError(f"--batch-sizes needs positive integers, e.g. 250,2500; got {args.batch_sizes}")
    check_sampling_flags(timed_run_flags(args, args.batch_sizes[0]), diffusion, model.num_classes)


def timed(function, device: torch.device) -> float:
    """Seconds that function() takes, the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def time_batch_size(model, diffusion, args, batch_size: int, device: torch.device) -> dict:
    """Warm up on one batch of this size (a few DDIM steps: the same network calls), then time
    --repeats runs of --num-samples images."""
    warmup = sampling_flags(args, batch_size, batch_size, "ddim", args.warmup_steps)
    warmup_s = timed(lambda: generate_samples(model, diffusion, warmup, device), device)
    flags = timed_run_flags(args, batch_size)
    seconds = [
        timed(lambda: generate_samples(model, diffusion, flags, device), device) for _ in range(args.repeats)
    ]
    median = statistics.median(seconds)
    return {
        "batch_size": batch_size,
        "warmup_s": warmup_s,
        "seconds": seconds,
        "median_s": median,
        "images_per_s": args.num_samples / median,
    }


def print_table(results: list[dict], env: dict) -> None:
    print(
        f"\n{env['device']} ({env['torch_threads']} torch threads), amp {env['amp']}, compiled "
        f"{env['compiled']}, channels_last {env['channels_last']}, torch {env['torch']}, "
        f"U-Net {env['parameters']:,} parameters"
    )
    print(
        f"{env['num_samples']:,} samples, {env['sampler']} {env['steps']} steps,"
        f" median of {env['repeats']} runs"
    )
    header = f"{'batch':>7}{'warm-up s':>11}{'seconds (min-max)':>24}{'images/s':>11}"
    print(header)
    print("-" * len(header))
    for row in results:
        spread = f"{row['median_s']:.2f} ({min(row['seconds']):.2f}-{max(row['seconds']):.2f})"
        print(f"{row['batch_size']:>7}{row['warmup_s']:>11.1f}{spread:>24}{row['images_per_s']:>11.0f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    args.amp = resolve_amp(args.amp, device)  # the dtype actually used, as the table reports it
    if args.threads:
        torch.set_num_threads(args.threads)
    configure_fast_path(device)
    seed_everything(args.seed)
    model, diffusion = load_network(args, device)
    check_flags(args, model, diffusion)
    parameters = count_parameters(model)
    model = inference_unet(model, args)
    results = [time_batch_size(model, diffusion, args, size, device) for size in args.batch_sizes]
    env = {
        "device": hardware(device),
        "torch_threads": torch.get_num_threads(),
        "amp": args.amp,
        "compiled": args.compile_mode if args.compile else False,
        "channels_last": args.channels_last,
        "torch": torch.__version__,
        "parameters": parameters,
        "num_samples": args.num_samples,
        "sampler": args.sampler,
        "steps": diffusion.T if args.sampler == "ddpm" else args.steps,
        "repeats": args.repeats,
        "checkpoint": args.checkpoint,
    }
    print_table(results, env)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"environment": env, "results": results}, indent=2))


if __name__ == "__main__":
    run_cli(main)
