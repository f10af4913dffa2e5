"""What an evaluation reads before it samples, each checked once: the checkpoint's model against the
sampling flags, every count (--num-samples against what FID, precision/recall and CAS need), the
output paths (--save-samples included), the real data and the classifier.

All of it runs before the first sample is drawn, so that a bad flag costs a second, not a sampling
run: `eval_MNIST.py --num-samples 3` stops here with one line.

Example:
    loaded = load_model(EvaluationSettings(checkpoint="demo"), SamplingSettings(), plan, device)
    check_counts(settings, loaded.num_classes)
    real = load_real_data("mnist-5k", None, loaded.image_shape)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm.datasets.sources import load_images, shape_options
from ddpm.evaluation.classifier import LoadedClassifier, data_label, ensure_classifier
from ddpm.evaluation.feature_metrics import MIN_SET_SIZE, PRC_NEIGHBOURHOOD
from ddpm.evaluation.records import CheckpointInfo
from ddpm.evaluation.saved_samples import check_samples_path
from ddpm.plumbing.checkpointing import (
    data_source,
    image_shape,
    load_for_inference,
    resolve_checkpoint,
    weights_used,
)
from ddpm.plumbing.inference_settings import METRICS, SAMPLE_METRICS, EvaluationSettings
from ddpm.plumbing.messages import UserError, note
from ddpm.plumbing.output_files import OutputError, writable_dir
from ddpm.plumbing.provenance import sha256_of_file
from ddpm.plumbing.runtime import SpeedPlan, prepare_unet
from ddpm.plumbing.settings import SamplingSettings
from ddpm.sampling import check_sampling, sweep_timesteps
from diffusion import GaussianDiffusion

FEATURE_METRICS = ("classifier", "inception")  # the --metrics compared through torch-fidelity
FEWEST_FOR_FID = 2  # a covariance needs two images


@dataclass
class LoadedModel:
    """A checkpoint ready to sample: the U-Net (as the speed plan runs it), its diffusion, and facts."""

    network: torch.nn.Module
    diffusion: GaussianDiffusion
    image_shape: tuple[int, int, int]
    num_classes: int | None
    checkpoint: CheckpointInfo
    data: tuple[str, str | None]


def load_model(
    settings: EvaluationSettings, sampling: SamplingSettings, plan: SpeedPlan, device: torch.device
) -> LoadedModel:
    """The checkpoint's model (EMA weights unless told otherwise), checked against the sampling flags."""
    path = resolve_checkpoint(settings.checkpoint)
    model, diffusion, checkpoint = load_for_inference(path, device, use_ema=settings.ema)
    weights = weights_used(checkpoint, settings.ema)
    if weights != ("ema" if settings.ema else "model"):
        note(f"{path} has only its {weights} weights; evaluating them")
    check_sampling(diffusion, sampling, model.num_classes)
    if model.num_classes is None and "cas" in settings.metrics and settings.metrics != METRICS:
        raise UserError("--metrics cas needs a class-conditional checkpoint; this one is unconditional")
    if "recon" in settings.metrics:
        sweep_timesteps(settings.recon_t, diffusion.T)  # a bad --recon-t fails before any sampling
    config = checkpoint["config"]
    info = CheckpointInfo(
        path=str(path),
        sha256=sha256_of_file(path),
        epoch=checkpoint.get("epoch"),
        step=checkpoint.get("step"),
        weights=weights,
        config=config,
    )
    network = prepare_unet(model, plan)
    return LoadedModel(network, diffusion, image_shape(config), model.num_classes, info, data_source(config))


def draws_samples(settings: EvaluationSettings) -> bool:
    """Whether --metrics asks for anything measured on generated samples (not only reconstruction)."""
    return bool(set(settings.metrics) & set(SAMPLE_METRICS))


def check_counts(settings: EvaluationSettings, num_classes: int | None, flag: str = "--num-samples") -> None:
    """The one check of --num-samples (or the flag that sets settings.num_samples, such as training's
    --eval-samples), before anything is sampled: FID needs a covariance, a class-conditional model one
    sample per class (CAS, the grid's rows), and precision/recall more than k images per compared set
    (the samples, the floor and the ceiling hold --num-samples each)."""
    needs = [(FEWEST_FOR_FID, "FID needs a covariance")]
    if num_classes is not None:
        needs.append((num_classes, "CAS one sample per class"))
    if set(settings.metrics) & set(FEATURE_METRICS):
        needs.append((MIN_SET_SIZE, f"precision/recall more than k = {PRC_NEIGHBOURHOOD} images per set"))
    minimum = max(count for count, _ in needs)
    if settings.num_samples < minimum:
        reasons = ", ".join(reason for _, reason in needs)
        raise UserError(f"{flag} must be at least {minimum} ({reasons}), got {settings.num_samples}")


def repeat_seeds(settings: EvaluationSettings) -> list[int]:
    """The seeds of the --repeats sample sets (and floor subsets): seed, seed + 1, ..."""
    return [settings.seed + repeat for repeat in range(settings.repeats)]


@dataclass
class OutputPaths:
    """The JSON report and the files written beside it (<stem>_samples.png, ...)."""

    json: Path
    samples_png: Path
    closest_png: Path
    nearest_csv: Path
    saved_samples: Path | None = None  # --save-samples: a folder of PNGs or an .npz


def output_paths(settings: EvaluationSettings, stem: str) -> OutputPaths:
    """The JSON path (--json, else <out-dir>/eval_<stem>.json) and the files beside it; their folder
    must be writable."""
    json_path = Path(settings.json) if settings.json else Path(settings.out_dir) / f"eval_{stem}.json"
    writable_dir(json_path.parent)
    if json_path.is_dir():
        raise OutputError(f"cannot write the JSON report to {json_path}: it is a folder")

    def beside(suffix: str) -> Path:
        return json_path.with_name(f"{json_path.stem}_{suffix}")

    return OutputPaths(json_path, beside("samples.png"), beside("closest.png"), beside("nearest.csv"))


def saved_samples_path(settings: EvaluationSettings, image_shape: tuple[int, int, int] | None) -> Path | None:
    """--save-samples checked (saved_samples.check_samples_path), or None without it; image_shape is
    the model's (None: no model, so nothing sampled)."""
    if settings.save_samples is None:
        return None
    if image_shape is None or not draws_samples(settings):
        raise UserError(
            "--save-samples needs generated samples: a checkpoint and a sample metric in --metrics"
        )
    return check_samples_path(settings.save_samples, settings.num_samples, image_shape)


@dataclass
class RealData:
    """A data set's images in [-1, 1]: the test split [N, C, H, W] with its labels [N], the train split;
    name and data_dir as given, label its short name (classifier.data_label)."""

    name: str
    data_dir: str | None
    label: str
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_images: torch.Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.test_images.shape[1:]
        return channels, height, width


@functools.lru_cache(maxsize=2)
def load_real_data(name: str, data_dir: str | None, shape: tuple[int, int, int] | None) -> RealData:
    """Both splits of a data set at shape (C, H, W), or None for the data set's own, read once per
    process (evaluations of several checkpoints share them; nothing changes them in place)."""
    at_shape = shape_options(shape) if shape is not None else {}
    test_images, test_labels = load_images(name, "test", data_dir, **at_shape)
    train_images = load_images(name, "train", data_dir, **at_shape)[0]
    return RealData(name, data_dir, data_label(name, data_dir), test_images, test_labels, train_images)


def needs_classifier(settings: EvaluationSettings, real: RealData, with_model: bool) -> bool:
    """Whether the classifier is used: for the classifier metrics (data of two or more classes) or for
    the memorisation check of a model's samples."""
    if "classifier" in settings.metrics and len(real.test_labels.unique()) >= 2:
        return True
    return with_model and "memorisation" in settings.metrics


def load_judge(
    settings: EvaluationSettings, real: RealData, with_model: bool, device: torch.device
) -> LoadedClassifier | None:
    """The classifier of the data at its shape (--classifier, the shipped one, or trained once), read
    once for the whole evaluation; None when nothing uses it."""
    if not needs_classifier(settings, real, with_model):
        return None
    return ensure_classifier(real.name, real.data_dir, settings.classifier, device, real.image_shape)
