"""Evaluate a trained checkpoint: FID / IS / KID, classifier metrics, CAS and reconstruction scores.

Generative metrics go through torch-fidelity (`calculate_metrics`) against the test split of the
same data, on uint8 [N, 3, 28, 28] images (the grey digit replicated to 3 channels):
  - Inception FID (Heusel et al. 2017, arXiv:1706.08500), Inception Score (Salimans et al. 2016,
    arXiv:1606.03498) and KID (Binkowski et al. 2018, arXiv:1801.01401) with torch-fidelity's
    InceptionV3 ("inception-v3-compat"). Offline, pass its weights with --inception-weights PATH;
    without them one line says what is missing and the classifier metrics still run.
  - the same three with the MNIST classifier of mnist_classifier.py registered as a torch-fidelity
    feature extractor (penultimate 128-d features for FID/KID, its logits for IS). No internet needed.
  - CAS for class-conditional models (Ravuri & Vinyals 2019, arXiv:1905.10887): a classifier
    trained on the generated samples, tested on the real test split.
  - with --baselines, the same metrics for real train images (the floor; as many as were generated,
    at most the whole train split) and uniform noise (the ceiling; as many as were generated).
Reference (test split) features and statistics are cached by torch-fidelity under --cache-dir,
keyed by the images' and the extractor weights' sha256, so a second run does not recompute them.

Reconstruction: test images noised to t with q_sample and denoised back with `reconstruct`, for
each t of --recon-t. The default is 50,100,250,500,750,999 for T = 1000; for another T it keeps the
values below T-1 and ends at T-1 (the pure-noise end). Explicit values outside [0, T-1] are errors.
MSE and PSNR on the [0, 1] pixel scale (PSNR peak 1), SSIM of skimage with data_range=1.

Sampling always goes through `diffusion.sample` with a seeded generator (fixed noise per --seed);
the default sampler is DDIM with 50 steps (--sampler ddpm runs all T). On a GPU the U-Net runs
under bf16 autocast (--amp); --compile and --channels-last make it faster still (10,000 DDIM-50
samples in 7.4 s on an H200, see README). --metrics picks a subset.
Output: a table on the terminal, a JSON file with every metric and its provenance, and a PNG grid
of samples beside it (one row per class for class-conditional models).

Example:
    python eval_MNIST.py --checkpoint checkpoints/last.pt --num-samples 10000 --sampler ddim --steps 50 \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --baselines
    python eval_MNIST.py --baselines-only --data mnist-5k      # the floor and ceiling, no model needed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import socket
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import skimage
import torch
import torch_fidelity
import torchvision
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from checkpointing import DEFAULT_CHECKPOINT_DIR, latest_checkpoint, load_for_inference
from cli import (
    OneLineErrorParser,
    UserError,
    add_unet_speed_flags,
    autocast_context,
    configure_fast_path,
    inference_unet,
    int_tuple,
    parse_with_unet_speed_flags,
    positive_int,
    resolve_amp,
    resolve_device,
    run_cli,
    seed_everything,
    writable_dir,
)
from data_sources import DATA_SETS, load_images, to_model_range
from diffusion import SAMPLERS, GaussianDiffusion, final_sample
from image_metrics import reconstruction_metrics, save_image_grid, to_uint8
from mnist_classifier import (
    DEFAULT_EPOCHS,
    EXTRACTOR_NAME,
    UINT8_MAX,
    accuracy,
    data_label,
    default_classifier_path,
    load_classifier,
    register_with_torch_fidelity,
    train_classifier,
)

METRIC_CHOICES = ("inception", "classifier", "cas", "recon")
DEFAULT_RECON_T = (50, 100, 250, 500, 750)  # then T-1 (999 for T = 1000)
INCEPTION_EXTRACTOR = "inception-v3-compat"
DOWNLOAD_TIMEOUT_S = 20
KID_SUBSET_SIZE = 1000  # torch-fidelity's default, lowered to the smaller set's size when needed
ISC_SPLITS = 10  # torch-fidelity's default, lowered to the number of images when needed
GRID_COLUMNS = 10
GRID_ROWS_UNCONDITIONAL = 10
HASH_CHUNK_BYTES = 1 << 20
SHORT_HASH = 12
COLUMN_TITLES = {
    "generated": "generated",
    "train_vs_test": "train (floor)",
    "noise_vs_test": "noise (ceiling)",
}
SCALES = {
    "mse": "mean squared error per image on [0, 1] pixels (0 = identical, 1 = opposite)",
    "psnr": "dB, 10 log10(1 / MSE) with peak 1 on [0, 1] pixels (higher is better)",
    "ssim": "skimage structural_similarity on [0, 1] images, data_range=1 (1 = identical)",
}


@dataclass
class Extractor:
    """A torch-fidelity feature extractor and the weights file it is built from."""

    label: str  # "classifier" or "inception"
    name: str  # the name registered with torch-fidelity
    weights_path: Path
    sha256: str


@dataclass
class ImageSet:
    """uint8 images [N, 1, 28, 28] and the torch-fidelity cache name of real ones (None: no caching)."""

    images: torch.Tensor
    cache_name: str | None = None


@dataclass
class Comparison:
    """What every torch-fidelity call of a run shares: the reference set, extractors, flags, device."""

    reference: ImageSet
    extractors: list[Extractor]
    args: argparse.Namespace
    device: torch.device


class Uint8Images(Dataset):
    """A torch Dataset for torch-fidelity: item i is uint8 [3, H, W], the grey image replicated."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].expand(3, -1, -1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--checkpoint",
        default=None,
        help=f"checkpoint to evaluate (default: newest in {DEFAULT_CHECKPOINT_DIR}/)",
    )
    add("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    add("--num-samples", type=positive_int, default=10000, help="images to generate for FID/IS/KID/CAS")
    add("--sampler", choices=SAMPLERS, default="ddim", help="reverse process used for sampling")
    add("--steps", type=int, default=None, help="sampler steps in [1, T] (default: 50, all T for ddpm)")
    add("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    add("--guidance", type=float, default=1.0, help="classifier-free guidance scale (conditional models)")
    add("--batch-size", type=positive_int, default=250, help="images per sampler / feature batch")
    add("--seed", type=int, default=0, help="seed of the sampling noise, subsets and KID subsets")
    add("--data", choices=DATA_SETS, default=None, help="reference data (default: the checkpoint's)")
    add("--data-dir", default=None, help="folder of MNIST-format IDX files (overrides --data)")
    add("--metrics", default=",".join(METRIC_CHOICES), help=f"comma-separated subset of {METRIC_CHOICES}")
    add("--inception-weights", default=None, help="local copy of torch-fidelity's InceptionV3 weights")
    add(
        "--classifier",
        default=None,
        help="classifier weights (default checkpoints/mnist_classifier_<data>.pt)",
    )
    add("--cas-epochs", type=positive_int, default=DEFAULT_EPOCHS, help="epochs of the CAS classifier")
    add("--baselines", action=argparse.BooleanOptionalAction, default=False, help="add train/noise baselines")
    add("--baselines-only", action="store_true", help="only the baselines: no checkpoint needed")
    add("--recon-t", type=int_tuple, default=None, help="noise levels t for reconstruction (see above)")
    add("--num-recon", type=positive_int, default=100, help="test images to reconstruct per t")
    add("--out-dir", default="eval_outputs", help="folder of the default JSON and sample grid")
    add("--json", default=None, help="JSON report path (default <out-dir>/eval_<checkpoint>.json)")
    add("--cache-dir", default=None, help="torch-fidelity cache (default $TORCH_HOME/fidelity_cache)")
    add_unet_speed_flags(parser)
    add("--device", default="auto", help="auto, cpu or cuda")
    return parse_with_unet_speed_flags(parser, argv)


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def sha256_of_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_tensor(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


# ----- input checks -------------------------------------------------------------------------------


def parse_metrics(text: str) -> set[str]:
    chosen = {name.strip() for name in text.split(",") if name.strip()}
    unknown = chosen - set(METRIC_CHOICES)
    if unknown or not chosen:
        raise UserError(
            f"--metrics takes a comma-separated subset of {', '.join(METRIC_CHOICES)}, got {text!r}"
        )
    return chosen


def recon_timesteps(requested: tuple[int, ...] | None, T: int) -> list[int]:
    """--recon-t, checked against [0, T-1]; the default keeps 50..750 below T-1 and adds T-1."""
    if requested is None:
        return [t for t in DEFAULT_RECON_T if t < T - 1] + [T - 1]
    outside = [t for t in requested if not 0 <= t < T]
    if outside or not requested:
        raise UserError(
            f"--recon-t values must be in [0, {T - 1}] for this checkpoint (T = {T}), got {outside}"
        )
    return list(requested)


def check_sampling_flags(
    args: argparse.Namespace, diffusion: GaussianDiffusion, num_classes: int | None
) -> None:
    """Check --steps in [1, T] (all T for ddpm) and --eta >= 0; for --guidance and --num-samples, that
    the model is class-conditional and gets at least one sample per class."""
    if args.steps is not None and not 1 <= args.steps <= diffusion.T:
        raise UserError(f"--steps must be in [1, {diffusion.T}] (T of this checkpoint), got {args.steps}")
    try:
        diffusion.timesteps(args.sampler, args.steps, diffusion.T - 1)
    except ValueError as error:
        raise UserError(f"--sampler {args.sampler} --steps {args.steps}: {error}") from None
    if args.eta < 0:
        raise UserError(f"--eta must be >= 0, got {args.eta}")
    if args.guidance != 1.0 and num_classes is None:
        raise UserError("--guidance needs a class-conditional checkpoint; this one is unconditional")
    if args.num_samples < max(2, num_classes or 0):
        raise UserError(
            f"--num-samples must be at least {max(2, num_classes or 0)} (FID needs a covariance, "
            "CAS one sample per class)"
        )


def output_paths(args: argparse.Namespace, stem: str) -> tuple[Path, Path]:
    """The JSON path and the sample grid beside it; their folder must be writable."""
    json_path = Path(args.json) if args.json else Path(args.out_dir) / f"eval_{stem}.json"
    writable_dir(json_path.parent)
    if json_path.is_dir() or (json_path.exists() and not os.access(json_path, os.W_OK)):
        raise UserError(f"cannot write the JSON report to {json_path}")
    return json_path, json_path.with_name(f"{json_path.stem}_samples.png")


# ----- feature extractors -------------------------------------------------------------------------


def hub_inception_path() -> Path:
    """Where torch.hub (and so torch-fidelity) keeps the downloaded InceptionV3 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name


def download_inception_weights() -> Path:
    """torch-fidelity's InceptionV3 weights in the torch.hub cache, downloaded once; OSError offline."""
    target = hub_inception_path()
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(target), progress=False)
        finally:
            socket.setdefaulttimeout(previous_timeout)
    return target


def inception_extractor(weights: str | None) -> tuple[Extractor | None, dict[str, Any]]:
    """The InceptionV3 extractor and its provenance; None and the one-line reason when unavailable."""
    get_it = f"download {URL_INCEPTION_V3} and pass --inception-weights PATH"
    if weights is not None and not Path(weights).is_file():
        return None, skipped(
            f"Inception metrics skipped: --inception-weights {weights} does not exist; {get_it}"
        )
    if weights is None:
        try:
            weights = download_inception_weights()
        except OSError as error:
            cached = hub_inception_path()
            return None, skipped(
                f"Inception metrics skipped: {cached.name} is not in {cached.parent} "
                f"and could not be downloaded ({getattr(error, 'reason', error)}); {get_it}"
            )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError):
        raise UserError(f"InceptionV3 weights {weights} are not a readable PyTorch file") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise UserError(f"{weights} is not torch-fidelity's InceptionV3 state dict (no fc.weight)")
    extractor = Extractor("inception", INCEPTION_EXTRACTOR, Path(weights), sha256_of_file(weights))
    return extractor, used(extractor)


def classifier_extractor(
    path: Path, data: str, data_dir: str | None
) -> tuple[Extractor | None, dict[str, Any]]:
    """The classifier extractor (registered with torch-fidelity) and its provenance, or how to train it."""
    if not path.is_file():
        data_flags = f"--data-dir {data_dir}" if data_dir else f"--data {data}"
        return None, skipped(
            f"classifier metrics skipped: no classifier weights at {path}; "
            f"train them with `python mnist_classifier.py {data_flags} --out {path}`"
        )
    _, info = load_classifier(path)
    if info.get("data") != data_label(data, data_dir):
        note(f"the classifier {path} was trained on {info.get('data')}, not {data_label(data, data_dir)}")
    register_with_torch_fidelity()
    extractor = Extractor("classifier", EXTRACTOR_NAME, path, sha256_of_file(path))
    return extractor, used(extractor) | {
        "trained_on": info.get("data"),
        "test_accuracy": info.get("test_accuracy"),
    }


def used(extractor: Extractor) -> dict[str, Any]:
    return {
        "used": True,
        "name": extractor.name,
        "weights": str(extractor.weights_path),
        "weights_sha256": extractor.sha256,
    }


def skipped(reason: str) -> dict[str, Any]:
    note(reason)
    return {"used": False, "reason": reason}


def resolve_extractors(args: argparse.Namespace, chosen: set[str], data: str) -> tuple[list[Extractor], dict]:
    """The available feature extractors among --metrics, and the provenance of each."""
    candidates, provenance = {}, {}
    if "classifier" in chosen:
        path = Path(args.classifier) if args.classifier else default_classifier_path(data, args.data_dir)
        candidates["classifier"], provenance["classifier"] = classifier_extractor(path, data, args.data_dir)
    if "inception" in chosen:
        candidates["inception"], provenance["inception"] = inception_extractor(args.inception_weights)
    return [extractor for extractor in candidates.values() if extractor is not None], provenance


# ----- images -------------------------------------------------------------------------------------


def real_set(images: torch.Tensor, label: str, split: str) -> ImageSet:
    """A set of real images, cached by torch-fidelity under a name that fixes its content."""
    images_uint8 = to_uint8(images)
    digest = sha256_of_tensor(images_uint8)[:SHORT_HASH]
    return ImageSet(images_uint8, f"{label}-{split}-{len(images_uint8)}-{digest}")


@torch.no_grad()
def generate_samples(
    model: torch.nn.Module, diffusion: GaussianDiffusion, args: argparse.Namespace, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """args.num_samples images [N, 1, 28, 28] in [-1, 1] from diffusion.sample with fixed noise.

    Class-conditional models get balanced labels i % num_classes (returned, else None).
    """
    generator = torch.Generator(device=device).manual_seed(args.seed)
    labels = None
    if model.num_classes is not None:
        labels = torch.arange(args.num_samples, device=device) % model.num_classes
    batches = []
    for start in range(0, args.num_samples, args.batch_size):
        count = min(args.batch_size, args.num_samples - start)
        batch_labels = None if labels is None else labels[start : start + count]
        with autocast_context(args.amp, device):
            images = diffusion.sample(
                model,
                count,
                sampler=args.sampler,
                steps=args.steps,
                eta=args.eta,
                generator=generator,
                labels=batch_labels,
                guidance=args.guidance,
            )
        batches.append(images.cpu())
        print(f"\rsampled {start + count}/{args.num_samples}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return torch.cat(batches), None if labels is None else labels.cpu()


def save_sample_grid(samples: torch.Tensor, labels: torch.Tensor | None, path: Path) -> None:
    """The first samples as a PNG: rows of 10, or for conditional models one row per class."""
    if labels is None:
        save_image_grid(samples[: GRID_COLUMNS * GRID_ROWS_UNCONDITIONAL], path, columns=GRID_COLUMNS)
        return
    per_class = [samples[labels == label] for label in range(int(labels.max()) + 1)]
    columns = min(GRID_COLUMNS, *(len(images) for images in per_class))
    save_image_grid(torch.cat([images[:columns] for images in per_class]), path, columns=columns)


# ----- metrics ------------------------------------------------------------------------------------


def cache_name(images: ImageSet, extractor: Extractor) -> str | None:
    """torch-fidelity's cache entry for real images: their name plus the extractor weights' hash.

    torch-fidelity adds the extractor's registered name, so "mnist-classifier" features of two
    different classifier files would share an entry without the hash.
    """
    if images.cache_name is None:
        return None
    return f"{images.cache_name}-{extractor.sha256[:SHORT_HASH]}"


def fidelity_metrics(candidate: ImageSet, extractor: Extractor, comparison: Comparison) -> dict[str, float]:
    """FID, IS (of the candidate) and KID against the reference, by torch_fidelity.calculate_metrics.

    The KID subset size is min(1000, both set sizes) and the IS splits min(10, candidate size).
    """
    reference, args = comparison.reference, comparison.args
    kid_subset_size = min(KID_SUBSET_SIZE, len(candidate.images), len(reference.images))
    result = torch_fidelity.calculate_metrics(
        input1=Uint8Images(candidate.images),
        input2=Uint8Images(reference.images),
        input1_cache_name=cache_name(candidate, extractor),
        input2_cache_name=cache_name(reference, extractor),
        fid=True,
        isc=True,
        kid=True,
        feature_extractor=extractor.name,
        feature_extractor_weights_path=str(extractor.weights_path),
        kid_subset_size=kid_subset_size,
        isc_splits=min(ISC_SPLITS, len(candidate.images)),
        rng_seed=args.seed,
        batch_size=args.batch_size,
        cuda=comparison.device.type == "cuda",
        cache_root=args.cache_dir,
        save_cpu_ram=True,  # in-memory images: no DataLoader worker processes
        verbose=False,
    )
    return {
        "fid": result[torch_fidelity.KEY_METRIC_FID],
        "is_mean": result[torch_fidelity.KEY_METRIC_ISC_MEAN],
        "is_std": result[torch_fidelity.KEY_METRIC_ISC_STD],
        "kid_mean": result[torch_fidelity.KEY_METRIC_KID_MEAN],
        "kid_std": result[torch_fidelity.KEY_METRIC_KID_STD],
        "kid_subset_size": kid_subset_size,
        "num_images": len(candidate.images),
        "num_reference": len(reference.images),
    }


def metrics_per_extractor(candidate: ImageSet, comparison: Comparison) -> dict[str, dict[str, float]]:
    """{"classifier": {...}, "inception": {...}} for the extractors that are available."""
    return {
        extractor.label: fidelity_metrics(candidate, extractor, comparison)
        for extractor in comparison.extractors
    }


def baseline_sets(train_images: torch.Tensor, count: int, label: str, seed: int) -> dict[str, ImageSet]:
    """The floor (real train images, a seeded subset of up to count) and the ceiling (uniform noise)."""
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(train_images), generator=generator)[:count]
    noise = torch.randint(
        0, UINT8_MAX + 1, (count, 1, *train_images.shape[2:]), generator=generator, dtype=torch.uint8
    )
    return {"train_vs_test": real_set(train_images[subset], label, "train"), "noise_vs_test": ImageSet(noise)}


def class_accuracy_score(
    samples: ImageSet,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    args,
    device,
) -> dict[str, float]:
    """CAS: train the classifier architecture on the generated images, test it on real test images."""
    model = train_classifier(
        to_model_range(samples.images[:, 0]), labels, epochs=args.cas_epochs, seed=args.seed, device=device
    )
    return {
        "cas_accuracy": accuracy(model, test_images, test_labels),
        "epochs": args.cas_epochs,
        "num_train": len(labels),
        "num_test": len(test_labels),
    }


@torch.no_grad()
def reconstruct_and_score(
    model, diffusion: GaussianDiffusion, images, labels, t: int, steps: int | None, args, device
) -> dict[str, np.ndarray]:
    """MSE / PSNR / SSIM per image [N] after `diffusion.reconstruct` from t, in batches, seeded noise."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    scores = {"mse": [], "psnr": [], "ssim": []}
    for start in range(0, len(images), args.batch_size):
        x0 = images[start : start + args.batch_size].to(device)
        batch_labels = None if labels is None else labels[start : start + args.batch_size].to(device)
        steps_iterator = diffusion.reconstruct(
            model,
            x0,
            t,
            generator,
            sampler=args.sampler,
            steps=steps,
            eta=args.eta,
            labels=batch_labels,
            guidance=args.guidance,
        )
        with autocast_context(args.amp, device):
            denoised = final_sample(steps_iterator)
        for name, values in reconstruction_metrics(denoised, x0).items():
            scores[name].append(values)
    return {name: np.concatenate(values) for name, values in scores.items()}


def reconstruction_scores(
    model, diffusion: GaussianDiffusion, images, labels, timesteps: list[int], args, device
) -> dict[str, Any]:
    """Mean and std of MSE / PSNR / SSIM of test images noised to each t and denoised back.

    Every t uses the same seeded noise. ddpm runs all t+1 steps; ddim and dpm++2m run
    min(--steps, t+1) steps (default min(50, t+1)).
    """
    labels = labels if model.num_classes is not None else None
    per_t = {}
    for t in timesteps:
        steps = None if args.sampler == "ddpm" or args.steps is None else min(args.steps, t + 1)
        scores = reconstruct_and_score(model, diffusion, images, labels, t, steps, args, device)
        per_t[str(t)] = {"steps": len(diffusion.timesteps(args.sampler, steps, t))} | {
            f"{name}_{stat}": float(reduce(values))
            for name, values in scores.items()
            for stat, reduce in (("mean", np.mean), ("std", np.std))
        }
    return {"num_images": len(images), "scale": SCALES, "per_t": per_t}


# ----- report -------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_fidelity": torch_fidelity.__version__,
        "numpy": np.__version__,
        "scikit_image": skimage.__version__,
    }


def hardware(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"CPU {names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def checkpoint_provenance(path: Path, checkpoint: dict, use_ema: bool) -> dict[str, Any]:
    return {
        "path": str(path),
        "sha256": sha256_of_file(path),
        "epoch": checkpoint.get("epoch"),
        "step": checkpoint.get("step"),
        "weights": "ema" if use_ema and "ema" in checkpoint else "model",
        "config": checkpoint["config"],
    }


def sampling_provenance(diffusion: GaussianDiffusion | None, args: argparse.Namespace) -> dict | None:
    if diffusion is None:
        return None
    steps = len(diffusion.timesteps(args.sampler, args.steps, diffusion.T - 1))
    return {
        "sampler": args.sampler,
        "steps": steps,
        "eta": args.eta,
        "guidance": args.guidance,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "amp": args.amp,
        "compiled": args.compile_mode if args.compile else None,
        "channels_last": args.channels_last,
    }


def format_metric(metrics: dict | None, key: str) -> str:
    """One table cell: FID, or mean ± std of IS / KID; '-' where not measured."""
    if metrics is None:
        return "-"
    if key == "fid":
        return f"{metrics['fid']:.3f}"
    return f"{metrics[key + '_mean']:.4g} ± {metrics[key + '_std']:.3g}"


def print_fidelity_table(metrics: dict[str, Any]) -> None:
    """FID / IS / KID per feature extractor (rows) and compared set (columns)."""
    columns = {"generated": metrics["generated"]} | (metrics["baselines"] or {})
    columns = {name: values for name, values in columns.items() if values}
    labels = [label for label in ("classifier", "inception") if any(label in c for c in columns.values())]
    if not labels:
        return
    print(f"{'metric':<16}" + "".join(f"{COLUMN_TITLES[name]:>24}" for name in columns))
    for label in labels:
        for key in ("fid", "is", "kid"):
            cells = [format_metric(values.get(label), key) for values in columns.values()]
            print(f"{label + ' ' + key.upper():<16}" + "".join(f"{cell:>24}" for cell in cells))


def print_report(report: dict[str, Any]) -> None:
    """What was evaluated, then the table, CAS and the reconstruction scores."""
    provenance, metrics = report["provenance"], report["metrics"]
    checkpoint, sampling = provenance["checkpoint"], provenance["sampling"]
    if checkpoint is not None:
        print(
            f"\n{checkpoint['path']} ({checkpoint['weights']} weights, epoch {checkpoint['epoch']}, "
            f"step {checkpoint['step']}): {sampling['num_samples']} samples, {sampling['sampler']} "
            f"{sampling['steps']} steps, eta {sampling['eta']}, guidance {sampling['guidance']}, "
            f"seed {provenance['seed']}"
        )
    data = provenance["data"]
    print(f"reference: {data['name']} {data['split']} split, {data['num_reference']} images")
    print_fidelity_table(metrics)
    if metrics["cas"] is not None:
        print(
            f"CAS (classifier trained on the samples, tested on real test images): "
            f"accuracy {metrics['cas']['cas_accuracy']:.4f}"
        )
    if metrics["reconstruction"] is not None:
        print("reconstruction, mean ± std (MSE on [0, 1] pixels, PSNR in dB with peak 1, SSIM data_range=1):")
        for t, scores in metrics["reconstruction"]["per_t"].items():
            cells = [
                f"{name.upper()} {scores[name + '_mean']:.4f} ± {scores[name + '_std']:.4f}"
                for name in ("mse", "psnr", "ssim")
            ]
            print(f"  t={t:>4} ({scores['steps']:>4} steps)  " + "  ".join(cells))


def build_report(
    args, argv, checkpoint_info, diffusion, label, reference, extractor_info, metrics, paths, device
) -> dict[str, Any]:
    """The JSON report: provenance (what was measured, with what), metrics and output files."""
    json_path, grid_path = paths
    return {
        "provenance": {
            "checkpoint": checkpoint_info,
            "data": {
                "name": label,
                "split": "test",
                "num_reference": len(reference.images),
                "reference_sha256": sha256_of_tensor(reference.images),
            },
            "sampling": sampling_provenance(diffusion, args),
            "seed": args.seed,
            "feature_extractors": extractor_info,
            "versions": library_versions(),
            "device": hardware(device),
            "command": " ".join(["eval_MNIST.py", *argv]),
        },
        "metrics": metrics,
        "outputs": {"json": str(json_path), "samples_png": str(grid_path) if diffusion is not None else None},
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write the report atomically (temp file, then os.replace)."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temp, path)


# ----- main ---------------------------------------------------------------------------------------


def load_model(
    args: argparse.Namespace, device: torch.device
) -> tuple[Any, GaussianDiffusion | None, dict | None]:
    """The checkpoint's model, diffusion and provenance; (None, None, None) with --baselines-only."""
    if args.baselines_only:
        return None, None, None
    path = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(DEFAULT_CHECKPOINT_DIR)
    model, diffusion, checkpoint = load_for_inference(path, device, use_ema=args.ema)
    if args.ema and "ema" not in checkpoint:
        note(f"{path} has no EMA weights; evaluating the raw model weights")
    check_sampling_flags(args, diffusion, model.num_classes)
    configure_fast_path(device)
    return inference_unet(model, args), diffusion, checkpoint_provenance(path, checkpoint, args.ema)


def evaluate_model(
    model, diffusion, chosen: set[str], test_set, grid_path: Path, comparison: Comparison
) -> dict:
    """Sample, save the grid, then the metrics of the samples: torch-fidelity, CAS, reconstruction."""
    args, device = comparison.args, comparison.device
    test_images, test_labels = test_set
    samples, labels = generate_samples(model, diffusion, args, device)
    save_sample_grid(samples, labels, grid_path)
    generated = ImageSet(to_uint8(samples))
    metrics = {"generated": metrics_per_extractor(generated, comparison)}
    if labels is not None and "cas" in chosen:
        metrics["cas"] = class_accuracy_score(generated, labels, test_images, test_labels, args, device)
    if "recon" in chosen:
        subset = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(args.seed))
        subset = subset[: args.num_recon]
        recon_t = recon_timesteps(args.recon_t, diffusion.T)
        metrics["reconstruction"] = reconstruction_scores(
            model, diffusion, test_images[subset], test_labels[subset], recon_t, args, device
        )
    return metrics


def evaluate_baselines(data: str, label: str, comparison: Comparison) -> dict:
    """The torch-fidelity metrics of real train images (floor) and uniform noise (ceiling)."""
    args = comparison.args
    train_images, _ = load_images(data, "train", args.data_dir)
    sets = baseline_sets(train_images, args.num_samples, label, args.seed)
    return {name: metrics_per_extractor(images, comparison) for name, images in sets.items()}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    chosen = parse_metrics(args.metrics)
    device = resolve_device(args.device)
    args.amp = resolve_amp(args.amp, device)  # the dtype actually used, as the report records it
    seed_everything(args.seed)
    model, diffusion, checkpoint_info = load_model(args, device)
    if model is not None and "recon" in chosen:
        recon_timesteps(args.recon_t, diffusion.T)  # fail on a bad --recon-t before sampling
    data = args.data or (checkpoint_info["config"].get("data") if checkpoint_info else None) or "mnist"
    label = data_label(data, args.data_dir)
    paths = output_paths(
        args, Path(checkpoint_info["path"]).stem if model is not None else f"baselines_{label}"
    )

    test_set = load_images(data, "test", args.data_dir)
    reference = real_set(test_set[0], label, "test")
    extractors, extractor_info = resolve_extractors(args, chosen, data)
    comparison = Comparison(reference, extractors, args, device)
    metrics = {"generated": None, "baselines": None, "cas": None, "reconstruction": None}
    if model is not None:
        metrics |= evaluate_model(model, diffusion, chosen, test_set, paths[1], comparison)
    if args.baselines or args.baselines_only:
        metrics["baselines"] = evaluate_baselines(data, label, comparison)

    report = build_report(
        args, argv, checkpoint_info, diffusion, label, reference, extractor_info, metrics, paths, device
    )
    print_report(report)
    write_json(report, paths[0])
    print(f"wrote {paths[0]}" + (f" and {paths[1]}" if model is not None else ""))


if __name__ == "__main__":
    run_cli(main)
