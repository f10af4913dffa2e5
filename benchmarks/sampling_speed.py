"""Wall time of sampling many images (default 10,000 in 50 DDIM steps) through eval_MNIST's code path.

Times `sampling.generate_samples` (diffusion.sample in batches under the U-Net's autocast; DDIM of
Song et al. 2021, arXiv:2010.02502, or any sampler of diffusion.py) end to end, images copied back
to the host included, with the U-Net prepared as eval_MNIST.py prepares it (runtime.prepare_unet:
the fast path on a GPU by default). The U-Net comes from --checkpoint, or is a randomly initialised
one of train_MNIST.py's default size (the time of a sampler does not depend on the weights). A
warm-up batch of --warmup-steps steps runs first, untimed, so that torch.compile, cuDNN autotuning
and the CUDA context stay out of the figures; its time is reported apart. Each batch size in
--batch-sizes is then timed --repeats times (median, min-max).

Example:
    python -m benchmarks.sampling_speed --batch-sizes 1000,2500,10000 --json runs/sampling.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from ddpm.plumbing.checkpointing import LEGACY_IMAGE_SHAPE, image_shape, load_for_inference
from ddpm.plumbing.cli import OneLineErrorParser, positive_int, positive_int_tuple, run_cli
from ddpm.plumbing.output_files import write_json
from ddpm.plumbing.provenance import hardware
from ddpm.plumbing.runtime import (
    configure_fast_path,
    plan_speed,
    prepare_unet,
    resolve_device,
    seed_everything,
    synchronize,
)
from ddpm.plumbing.settings import RuntimeSettings, SamplingSettings
from ddpm.sampling import check_sampling, generate_samples
from diffusion import GaussianDiffusion
from model import UNet, count_parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--checkpoint", default=None, help="checkpoint to sample (default: an untrained default-size U-Net)")
    add("--num-samples", type=positive_int, default=10000, help="images per timed run")
    add(
        "--batch-sizes",
        type=positive_int_tuple,
        default="250,2500",
        help="images per sampler batch, each timed",
    )
    add("--repeats", type=positive_int, default=2, help="timed runs per batch size")
    add("--warmup-steps", type=positive_int, default=2, help="sampler steps of the untimed warm-up batch")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--seed", type=int, default=0, help="seed of the weights (no checkpoint) and the noise")
    add("--json", default=None, help="also write the results to this JSON file")
    SamplingSettings.add_flags(parser, SamplingSettings(sampler="ddim"))  # the figures of docs/benchmarks.md
    RuntimeSettings.add_flags(parser)
    return parser.parse_args(argv)


def load_network(checkpoint: str | None, device: torch.device):
    """The checkpoint's EMA U-Net, diffusion and image shape, or an untrained default U-Net."""
    if checkpoint is not None:
        model, diffusion, state = load_for_inference(checkpoint, device)
        return model, diffusion, image_shape(state["config"])
    return UNet().to(device).eval(), GaussianDiffusion().to(device), LEGACY_IMAGE_SHAPE


def timed(function, device: torch.device) -> float:
    """Seconds that function() takes, the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def time_batch_size(network, diffusion, shape, args, sampling, plan, batch_size: int, device) -> dict:
    """Warm up on one batch of this size (a few DDIM steps: the same network calls), then time
    --repeats runs of --num-samples images."""
    options = {"image_shape": shape, "seed": args.seed, "device": device, "amp": plan.amp, "progress": False}
    warmup = replace(sampling, sampler="ddim", steps=args.warmup_steps)
    warmup_s = timed(
        lambda: generate_samples(
            network, diffusion, batch_size, sampling=warmup, batch_size=batch_size, **options
        ),
        device,
    )
    seconds = [
        timed(
            lambda: generate_samples(
                network, diffusion, args.num_samples, sampling=sampling, batch_size=batch_size, **options
            ),
            device,
        )
        for _ in range(args.repeats)
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
        f"\n{env['device']} ({env['torch_threads']} torch threads), {env['speed']}, torch {env['torch']}, "
        f"U-Net {env['parameters']:,} parameters"
    )
    print(
        f"{env['num_samples']:,} samples, {env['sampler']} {env['steps']} steps, "
        f"median of {env['repeats']} runs"
    )
    header = f"{'batch':>7}{'warm-up s':>11}{'seconds (min-max)':>24}{'images/s':>11}"
    print(header)
    print("-" * len(header))
    for row in results:
        spread = f"{row['median_s']:.2f} ({min(row['seconds']):.2f}-{max(row['seconds']):.2f})"
        print(f"{row['batch_size']:>7}{row['warmup_s']:>11.1f}{spread:>24}{row['images_per_s']:>11.0f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sampling, runtime = SamplingSettings.from_args(args), RuntimeSettings.from_args(args)
    device = resolve_device(runtime.device)
    plan = plan_speed(runtime.amp, runtime.compile, runtime.compile_mode, runtime.channels_last, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    configure_fast_path(device)
    seed_everything(args.seed)
    model, diffusion, shape = load_network(args.checkpoint, device)
    check_sampling(diffusion, sampling, model.num_classes)
    parameters = count_parameters(model)
    network = prepare_unet(model, plan)
    results = [
        time_batch_size(network, diffusion, shape, args, sampling, plan, size, device)
        for size in args.batch_sizes
    ]
    env = {
        "device": hardware(device),
        "torch_threads": torch.get_num_threads(),
        "speed": plan.describe(),
        "torch": torch.__version__,
        "parameters": parameters,
        "num_samples": args.num_samples,
        "sampler": sampling.sampler,
        "steps": len(diffusion.timesteps(sampling.sampler, sampling.steps, diffusion.T - 1)),
        "repeats": args.repeats,
        "checkpoint": args.checkpoint,
    }
    print_table(results, env)
    if args.json:
        write_json({"environment": env, "results": results}, args.json)


if __name__ == "__main__":
    run_cli(main)
