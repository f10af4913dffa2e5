"""Editing quality of a checkpoint: the DDIM-inversion round trip and RePaint inpainting of test digits.

(a) Test digits (spread over the classes) are DDIM-inverted to x_T (Song et al. 2021,
arXiv:2010.02502, section 4.3) and decoded back with the same timesteps, as vizu_MNIST.py
--interpolate does for its end frames (interpolation.ddim_decode); MSE and SSIM of the round trip.
(b) The same digits get a hole (--mask, named as vizu_MNIST.py --inpaint names it: right keeps the left
half) filled by RePaint (Lugmayr et al. 2022, arXiv:2201.09865) through inpainting.repaint_steps, the
path of vizu_MNIST.py --inpaint. How close is the hole to the original: its MSE and SSIM against the
MSE and SSIM in the same hole of as many unconditional samples (sampling.generate_samples, DDIM); and
the shipped classifier's agreement with the true labels on the originals, the masked inputs (hole
mid-grey), the RePaint results and the unconditional samples (chance: about 0.1). The known region's
largest MSE is reported too (RePaint keeps it exactly: 0).

Example:
    python -m benchmarks.editing_quality --checkpoint demo --num-images 100 --inversion-steps 100 \\
        --levels 50 --json benchmarks/results/editing_quality_cpu.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from ddpm.datasets.sources import load_images, shape_options, spread_over_classes
from ddpm.evaluation.classifier import accuracy, default_classifier_path, load_classifier
from ddpm.evaluation.image_metrics import mse, ssim
from ddpm.plumbing.checkpointing import data_source, image_shape, load_for_inference, resolve_checkpoint
from ddpm.plumbing.cli import OneLineErrorParser, positive_int, run_cli
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import write_json
from ddpm.plumbing.provenance import hardware
from ddpm.plumbing.runtime import resolve_device, seed_everything, synchronize
from ddpm.plumbing.settings import SamplingSettings
from ddpm.sampling import generate_samples
from ddpm.visualisation.inpainting import RepaintPlan, region_scores, repaint_steps
from ddpm.visualisation.interpolation import ddim_decode
from ddpm.visualisation.masks import make_mask, masked_input
from diffusion import final_sample


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--checkpoint", default=None, help="checkpoint (default: newest in checkpoints/, else the demo model)"
    )
    add("--num-images", type=positive_int, default=100, help="test digits, spread over the classes")
    add("--inversion-steps", type=positive_int, default=100, help="DDIM steps of the inversion and decoding")
    add("--levels", type=positive_int, default=50, help="RePaint's noise levels (the paper: 250)")
    add("--jump-length", type=positive_int, default=10, help="RePaint's jump length j")
    add("--resamples", type=positive_int, default=10, help="RePaint's resamplings r")
    add(
        "--mask",
        default="right",
        help="the hole, as vizu_MNIST.py --inpaint (default right: keep the left half)",
    )
    add("--sample-steps", type=positive_int, default=50, help="DDIM steps of the unconditional samples")
    add("--batch-size", type=positive_int, default=100, help="images per batch")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--seed", type=int, default=0, help="seed of the image choice, the mask and the noise")
    add("--device", default="auto", help="auto | cpu | cuda[:N]")
    add("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def mean_std(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def batches(count: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def round_trips(model, diffusion, images, labels, args, device) -> tuple[torch.Tensor, float]:
    """decode(invert(x)) of every image [N, C, H, W] on the CPU, and the seconds it took."""
    start, results = time.perf_counter(), []
    for part in batches(len(images), args.batch_size):
        x0 = images[part].to(device)
        batch_labels = None if labels is None else labels[part].to(device)
        latents = diffusion.ddim_invert(model, x0, args.inversion_steps, labels=batch_labels)
        results.append(ddim_decode(model, diffusion, latents, args.inversion_steps, batch_labels, 1.0).cpu())
    synchronize(device)
    return torch.cat(results), time.perf_counter() - start


def inpainted(model, diffusion, images, labels, mask, plan, args, device) -> tuple[torch.Tensor, float]:
    """RePaint's results [N, C, H, W] on the CPU (batch b seeded seed + b), and the seconds it took."""
    start, results = time.perf_counter(), []
    for number, part in enumerate(batches(len(images), args.batch_size)):
        batch_labels = None if labels is None else labels[part].to(device)
        steps = repaint_steps(
            model,
            diffusion,
            images[part].to(device),
            mask,
            plan,
            seed=args.seed + number,
            labels=batch_labels,
        )
        results.append(final_sample(steps).cpu())
    synchronize(device)
    return torch.cat(results), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    checkpoint_path = resolve_checkpoint(args.checkpoint)
    model, diffusion, checkpoint = load_for_inference(checkpoint_path, device)
    config = checkpoint["config"]
    shape, (data, data_dir) = image_shape(config), data_source(config)
    for name, value in (("--inversion-steps", args.inversion_steps), ("--levels", args.levels)):
        if value > diffusion.T:
            raise UserError(f"{name} must be in [1, {diffusion.T}] (T of this checkpoint), got {value}")
    mask = make_mask(args.mask, shape[1:], args.seed)
    plan = RepaintPlan(args.levels, args.jump_length, args.resamples)
    classifier_path = default_classifier_path(data, data_dir, shape)
    if not classifier_path.is_file():
        raise UserError(f"no classifier for this data at {classifier_path}: make one with eval_MNIST.py")
    classifier = load_classifier(classifier_path, device)[0]
    test_images, test_labels = load_images(data, "test", data_dir, **shape_options(shape))
    chosen = spread_over_classes(test_labels, args.num_images, args.seed)
    images, true_labels = test_images[chosen], test_labels[chosen]
    labels = true_labels if model.num_classes is not None else None

    back, inversion_seconds = round_trips(model, diffusion, images, labels, args, device)
    results, repaint_seconds = inpainted(model, diffusion, images, labels, mask, plan, args, device)
    samples, _ = generate_samples(
        model, diffusion, len(images), sampling=SamplingSettings("ddim", args.sample_steps),
        image_shape=shape, seed=args.seed, device=device, batch_size=args.batch_size, labels=labels,
        progress=False,
    )  # fmt: skip
    repainted, unconditional = region_scores(results, images, mask), region_scores(samples, images, mask)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint_path),
        "device": hardware(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_images": len(images),
        "inversion": {
            "steps": args.inversion_steps,
            "seconds": inversion_seconds,
            "mse": mean_std(mse(back, images)),
            "ssim": mean_std(ssim(back, images)),
        },
        "inpainting": {
            "mask": args.mask,
            "hole_pixels": int((mask == 0).sum()),
            "levels": plan.levels,
            "jump_length": plan.jump_length,
            "resamples": plan.resamples,
            "evaluations": plan.evaluations,
            "seconds": repaint_seconds,
            "known_mse_max": float(repainted.mse_known.max()),
            "hole_mse_repaint": mean_std(repainted.mse_hole),
            "hole_mse_unconditional": mean_std(unconditional.mse_hole),
            "hole_ssim_repaint": mean_std(repainted.ssim_hole),
            "hole_ssim_unconditional": mean_std(unconditional.ssim_hole),
            "unconditional_sampler": f"ddim, {args.sample_steps} steps",
            "classifier": str(classifier_path),
            "classifier_agreement": {
                name: accuracy(classifier, pictures, true_labels)
                for name, pictures in (
                    ("originals", images),
                    ("masked_inputs", masked_input(images, mask)),
                    ("repaint", results),
                    ("unconditional_samples", samples),
                )
            },
        },
    }
    print_report(report)
    if args.json:
        write_json(report, args.json)


def print_report(report: dict[str, Any]) -> None:
    inversion, inpainting = report["inversion"], report["inpainting"]
    print(f"\n{report['checkpoint']} on {report['device']}, {report['num_images']} test digits")
    print(
        f"DDIM inversion round trip ({inversion['steps']} steps, {inversion['seconds']:.0f} s): "
        f"MSE {inversion['mse']['mean']:.5f} +- {inversion['mse']['std']:.5f}, "
        f"SSIM {inversion['ssim']['mean']:.4f} +- {inversion['ssim']['std']:.4f}"
    )
    print(
        f"RePaint, hole '{inpainting['mask']}' ({inpainting['hole_pixels']} pixels), "
        f"{inpainting['levels']} levels, j = {inpainting['jump_length']}, r = {inpainting['resamples']} "
        f"({inpainting['evaluations']} evaluations, {inpainting['seconds']:.0f} s); "
        f"known region MSE max {inpainting['known_mse_max']:g}"
    )
    for name in ("repaint", "unconditional"):
        mse_, ssim_ = inpainting[f"hole_mse_{name}"], inpainting[f"hole_ssim_{name}"]
        print(
            f"  {name:<14} hole MSE {mse_['mean']:.4f} +- {mse_['std']:.4f}, "
            f"hole SSIM {ssim_['mean']:.4f} +- {ssim_['std']:.4f}"
        )
    agreement = ", ".join(f"{k} {v:.3f}" for k, v in inpainting["classifier_agreement"].items())
    print(f"  classifier agrees with the true label: {agreement}")


if __name__ == "__main__":
    run_cli(main)
