"""The settings of the scripts that use a trained model: eval_MNIST.py's evaluation and vizu_MNIST.py's
pictures and edits, declared as settings.py declares the others (one dataclass field, one flag).

Example:
    parser = OneLineErrorParser()
    EvaluationSettings.add_flags(parser)
    settings = EvaluationSettings.from_args(parser.parse_args(["--num-samples", "1000"]))
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ddpm.plumbing.cli import int_between, int_tuple, positive_int, seed_number
from ddpm.plumbing.runtime import DEVICE_HELP
from ddpm.plumbing.settings import Settings, setting

MAX_REPEATS = 1000  # eval's sample sets


SAMPLE_METRICS = ("inception", "classifier", "cas", "memorisation")  # measured on generated samples
METRICS = (*SAMPLE_METRICS, "recon")


def metric_names(text: str) -> tuple[str, ...]:
    """argparse type: a comma-separated subset of METRICS, e.g. 'classifier,recon'."""
    chosen = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not chosen or set(chosen) - set(METRICS):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(METRICS)}, got {text!r}"
        )
    return chosen


@dataclass(frozen=True)
class EvaluationSettings(Settings):
    TITLE = "evaluation"
    checkpoint: str | None = setting(
        None,
        "checkpoint: a path, demo (the shipped model), or by default the newest in checkpoints/, else demo; "
        'several (comma-separated, or a quoted glob such as "checkpoints/mnist_epoch_*.pt"): each evaluated, '
        "and the metrics against the epoch in <out-dir>/training_curve.csv and .png",
    )
    ema: bool = setting(True, "use the EMA weights")
    num_samples: int = setting(10000, "images to generate for FID/IS/KID/precision/recall/CAS", positive_int)
    repeats: int = setting(
        1,
        "sample sets (seeds seed, seed+1, ...): each sample metric as mean ± std over them",
        int_between(1, MAX_REPEATS),
    )
    batch_size: int = setting(250, "images per sampler / feature batch", positive_int)
    seed: int = setting(0, "seed of the sampling noise, image subsets and KID subsets", seed_number)
    metrics: tuple[str, ...] = setting(
        METRICS,
        "comma-separated subset of " + ", ".join(METRICS) + " (cas: class-conditional checkpoints only; "
        "the default skips it for others)",
        metric_names,
    )
    inception_weights: str | None = setting(None, "local copy of torch-fidelity's InceptionV3 weights")
    classifier: str | None = setting(
        None, "classifier weights (default: the shipped one for MNIST, else trained once into checkpoints/)"
    )
    cas_epochs: int = setting(10, "epochs of the CAS classifier (class-conditional models)", positive_int)
    baselines: bool = setting(
        False, "also the uniform-noise ceiling (the real-data floor is always reported)"
    )
    baselines_only: bool = setting(False, "only the floor and the ceiling: no checkpoint needed")
    recon_t: tuple[int, ...] | None = setting(
        None,
        "noise levels t of the reconstruction (default: 50,100,250,500,750 below T-1, and T-1)",
        int_tuple,
    )
    num_recon: int = setting(100, "test images to reconstruct per t", positive_int)
    nll: bool = setting(False, "also the NLL bound in bits/dim (Ho et al. eq. 5) on --num-nll test images")
    num_nll: int = setting(1000, "test images of --nll (each costs T model evaluations)", positive_int)
    out_dir: str = setting("eval_outputs", "folder of the default JSON and sample grid")
    json: str | None = setting(None, "JSON report path (default <out-dir>/eval_<checkpoint>.json)")
    cache_dir: str | None = setting(None, "torch-fidelity cache (default $TORCH_HOME/fidelity_cache)")
    save_samples: str | None = setting(
        None,
        "also write every generated image: a folder of PNGs (000123.png; 000123_label7.png for a "
        "class-conditional model), or PATH.npz (guided-diffusion's uint8 NHWC arr_0, labels arr_1); "
        "with --repeats the first set (seed --seed). An existing folder must be empty or an earlier "
        "--save-samples folder, which is replaced whole",
    )


@dataclass(frozen=True)
class VisualisationSettings(Settings):
    TITLE = "what vizu_MNIST.py shows"
    checkpoint: str | None = setting(
        None,
        "checkpoint: a path, demo (the shipped model), or by default the newest in checkpoints/, else demo",
    )
    ema: bool = setting(True, "use the EMA weights")
    num_images: int = setting(4, "images to reconstruct or generate", positive_int)
    index: tuple[int, ...] = setting(
        (), "comma-separated test-split indices (default: --num-images spread over the classes)", int_tuple
    )
    t: int = setting(500, "reconstruction: noise the images to this step, in [0, T-1]", int, flag="--t")
    t_sweep: bool = setting(False, "final MSE/SSIM of the reconstruction from each --sweep-t")
    sweep_t: tuple[int, ...] | None = setting(
        None, "starting steps of --t-sweep (default: 50,100,250,500,750 below T-1, and T-1)", int_tuple
    )
    generate: bool = setting(False, "sample from pure noise instead of reconstructing test images")
    batch_size: int = setting(
        250,
        "--generate: images per sampler batch; torchrun deals whole batches over the processes, so the "
        "files equal one process's with the same --batch-size",
        positive_int,
    )
    label: int | None = setting(
        None,
        "class to condition on, for class-conditional checkpoints (default: each test image's own label; "
        "with --generate, 0, 1, 2, ... in turn)",
        int,
    )
    commitment: bool = setting(
        True,
        "the classifier's class of x0-hat at every step: commitment.png/.csv (when the digit is decided)",
    )
    strip_steps: int = setting(10, "columns (steps) in strip.png", positive_int)
    gif_frames: int = setting(60, "most frames in reverse.gif", positive_int)
    out_dir: str = setting("step_outputs_mnist", "where images, CSVs and plots go")
    seed: int = setting(0, "seed for the image choice, the noise and the sampler", seed_number)
    device: str = setting("auto", DEVICE_HELP)


@dataclass(frozen=True)
class EditingSettings(Settings):
    """vizu_MNIST.py's edits of real images: interpolation between DDIM-inverted digits, RePaint."""

    TITLE = "editing test digits (vizu_MNIST.py --interpolate, --inpaint)"
    interpolate: bool = setting(
        False, "DDIM-invert the images, slerp between consecutive ones' x_T and decode each frame"
    )
    from_noise: bool = setting(False, "--interpolate between the noises of seeds --seed, --seed+1, ...")
    frames: int = setting(8, "--interpolate: frames per pair, the two ends included", int_between(2, 1000))
    inpaint: str | None = setting(
        None,
        "inpaint with RePaint the region left, right, top, bottom, centre or random (half the pixels), or "
        "a PNG mask of the image's size (white: keep, black: inpaint)",
    )
    jump_length: int = setting(10, "--inpaint: RePaint's jump length j (levels per jump back)", positive_int)
    resamples: int = setting(10, "--inpaint: RePaint's resamplings r at each jump point", positive_int)
