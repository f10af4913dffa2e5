"""Evaluation of a checkpoint: sample, then FID / IS / KID / precision / recall next to the real-data
floor, CAS, memorisation, reconstruction scores and the NLL bound, with the provenance of every number.

Generative metrics go through feature_metrics.py (torch-fidelity) against the test split of the
checkpoint's data, with the classifier of classifier.py (always: the shipped one for MNIST, else
trained once) and InceptionV3 (when its weights are there). The floor (as many real training images
as samples, at most the whole split) is in every report; `baselines` adds the ceiling (uniform
noise). CAS (Ravuri & Vinyals 2019, arXiv:1905.10887) trains the classifier on the samples of a
class-conditional model and tests it on real test images. Reconstruction noises test images to t
with q(x_t | x_0) and denoises them back (sampling.reconstruction_sweep).

--repeats K draws K sample sets (seeds seed .. seed+K-1) and K floor subsets; every sample metric
is then the mean over them, with its spread and values (repeats.py). Memorisation (memorisation.py)
finds each sample's nearest training image and the copy rate against held-out test images; --nll
adds the variational bound in bits/dim on test images (likelihood.py, Ho et al. 2020,
arXiv:2006.11239, eq. 5).

Example:
    report = evaluate(EvaluationSettings(num_samples=1000), SamplingSettings(), RuntimeSettings(),
                      DataSettings(data=None), command="eval_MNIST.py --num-samples 1000")
    print(format_report(report))
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm.datasets.sources import load_images, shape_options, to_model_range
from ddpm.evaluation.classifier import (
    accuracy,
    data_label,
    ensure_classifier,
    judge,
    load_classifier,
    train_classifier,
)
from ddpm.evaluation.feature_metrics import (
    Comparison,
    ImageSet,
    classifier_extractor,
    floor_set,
    inception_extractor,
    metrics_per_extractor,
    noise_set,
    real_set,
    skipped,
)
from ddpm.evaluation.image_metrics import to_uint8
from ddpm.evaluation.likelihood import nll_bits_per_dim
from ddpm.evaluation.memorisation import CopyDetector, Memorisation
from ddpm.evaluation.repeats import OVER_REPEATS, summarise_repeats
from ddpm.plumbing.checkpointing import (
    LEGACY_IMAGE_SHAPE,
    data_source,
    image_shape,
    load_for_inference,
    resolve_checkpoint,
    weights_used,
)
from ddpm.plumbing.messages import UserError, note
from ddpm.plumbing.output_files import OutputError, writable_dir, write_csv, write_json
from ddpm.plumbing.provenance import hardware, library_versions, sha256_of_file, sha256_of_tensor
from ddpm.plumbing.runtime import (
    SpeedPlan,
    configure_fast_path,
    plan_speed,
    prepare_unet,
    resolve_device,
    seed_everything,
)
from ddpm.plumbing.settings import (
    METRICS,
    SAMPLE_METRICS,
    DataSettings,
    EvaluationSettings,
    RuntimeSettings,
    SamplingSettings,
)
from ddpm.sampling import check_sampling, generate_samples, reconstruction_sweep, sweep_timesteps
from ddpm.visualisation.pictures import save_image_grid
from diffusion import GaussianDiffusion

GRID_COLUMNS = 10
GRID_ROWS_UNCONDITIONAL = 10
COLUMN_TITLES = {"generated": "generated", "floor": "train (floor)", "ceiling": "noise (ceiling)"}
SINGLE_VALUED = (
    "fid",
    "precision",
    "recall",
    "mean_confidence",
    "cas_accuracy",
    "copy_rate",
    "median_distance",
)
METRIC_SECTIONS = ("generated", "floor", "ceiling", "cas", "memorisation", "reconstruction", "nll")
TABLE_ROWS = (("fid", "FID"), ("is", "IS"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"))
SCALES = {
    "mse": "mean squared error per image on [0, 1] pixels (0 = identical, 1 = opposite)",
    "psnr": "dB, 10 log10(1 / MSE) with peak 1 on [0, 1] pixels (higher is better)",
    "ssim": "skimage structural_similarity on [0, 1] images, data_range=1, channels averaged (1 = identical)",
}


@dataclass
class LoadedModel:
    """A checkpoint ready to sample: the U-Net (as the speed plan runs it), its diffusion, and facts."""

    network: torch.nn.Module
    diffusion: GaussianDiffusion
    image_shape: tuple[int, int, int]
    num_classes: int | None
    provenance: dict[str, Any]
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
    minimum = max(2, model.num_classes or 0)
    if settings.num_samples < minimum:
        raise UserError(
            f"--num-samples must be at least {minimum} (FID needs a covariance, CAS one sample per class)"
        )
    if "recon" in settings.metrics:
        sweep_timesteps(settings.recon_t, diffusion.T)  # a bad --recon-t fails before any sampling
    provenance = {
        "path": str(path),
        "sha256": sha256_of_file(path),
        "epoch": checkpoint.get("epoch"),
        "step": checkpoint.get("step"),
        "weights": weights,
        "config": checkpoint["config"],
    }
    config = checkpoint["config"]
    network = prepare_unet(model, plan)
    return LoadedModel(
        network, diffusion, image_shape(config), model.num_classes, provenance, data_source(config)
    )


@dataclass
class OutputPaths:
    """The JSON report and the files written beside it (<stem>_samples.png, ...)."""

    json: Path
    samples_png: Path
    closest_png: Path
    nearest_csv: Path


def output_paths(settings: EvaluationSettings, stem: str) -> OutputPaths:
    """The JSON path and the files beside it; their folder must be writable."""
    json_path = Path(settings.json) if settings.json else Path(settings.out_dir) / f"eval_{stem}.json"
    writable_dir(json_path.parent)
    if json_path.is_dir():
        raise OutputError(f"cannot write the JSON report to {json_path}: it is a folder")

    def beside(suffix: str) -> Path:
        return json_path.with_name(f"{json_path.stem}_{suffix}")

    return OutputPaths(json_path, beside("samples.png"), beside("closest.png"), beside("nearest.csv"))


@dataclass
class RealData:
    """The data set's images in [-1, 1]: the test split [N, C, H, W] with its labels [N], the train split."""

    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_images: torch.Tensor


@functools.lru_cache(maxsize=2)
def load_real_data(name: str, data_dir: str | None, shape: tuple[int, int, int] | None) -> RealData:
    """Both splits of a data set at shape (C, H, W), or None for the data set's own, read once per
    process (evaluations of several checkpoints share them; nothing changes them in place)."""
    at_shape = shape_options(shape) if shape is not None else {}
    test_images, test_labels = load_images(name, "test", data_dir, **at_shape)
    return RealData(test_images, test_labels, load_images(name, "train", data_dir, **at_shape)[0])


def repeat_seeds(settings: EvaluationSettings) -> list[int]:
    """The seeds of the --repeats sample sets (and floor subsets): seed, seed + 1, ..."""
    return [settings.seed + repeat for repeat in range(settings.repeats)]


def resolve_extractors(
    settings: EvaluationSettings,
    data: str,
    data_dir: str | None,
    device: torch.device,
    test_set: tuple[torch.Tensor, torch.Tensor],
) -> tuple[list, dict[str, Any]]:
    """The feature extractors among --metrics that can run (the classifier one for data of two or
    more classes, at the test images' shape), and the provenance of each."""
    extractors, provenance = [], {}
    if "classifier" in settings.metrics and len(test_set[1].unique()) < 2:
        provenance["classifier"] = skipped(
            f"classifier metrics skipped: {data_label(data, data_dir)} has one class (use the Inception ones)"
        )
    elif "classifier" in settings.metrics:
        path = ensure_classifier(data, data_dir, settings.classifier, device, tuple(test_set[0].shape[1:]))
        extractor, provenance["classifier"] = classifier_extractor(path, data_label(data, data_dir))
        extractors.append(extractor)
    if "inception" in settings.metrics:
        extractor, provenance["inception"] = inception_extractor(settings.inception_weights)
        extractors += [extractor] if extractor is not None else []
    return extractors, provenance


def set_metrics(images: ImageSet, comparison: Comparison) -> dict[str, Any]:
    """Every feature metric of one image set, plus the classifier's mean confidence and predicted-class
    fractions (how recognisable the images are) where the classifier is among the extractors."""
    metrics = metrics_per_extractor(images, comparison)
    for extractor in comparison.extractors:
        if extractor.label == "classifier":
            model, _ = load_classifier(extractor.weights_path)
            metrics["classifier"] |= judge(model, to_model_range(images.images))
    return metrics


def classifier_comparison(
    data: str,
    data_dir: str | None,
    batch_size: int,
    seed: int,
    device: torch.device,
    image_shape: tuple[int, int, int] = LEGACY_IMAGE_SHAPE,
) -> Comparison:
    """A Comparison with the data set's test split (at image_shape) as the reference and its
    classifier (shipped, or trained once) as the only extractor: what the benchmarks judge samples with."""
    label = data_label(data, data_dir)
    test_images, _ = load_images(data, "test", data_dir, **shape_options(image_shape))
    extractor, _ = classifier_extractor(ensure_classifier(data, data_dir, None, device, image_shape), label)
    return Comparison(real_set(test_images, label, "test"), [extractor], batch_size, seed, device)


def classifier_scores(images: torch.Tensor, comparison: Comparison) -> dict[str, Any]:
    """The classifier's FID, IS, KID, precision, recall, mean confidence and class fractions of
    images [N, C, H, W] in [-1, 1] (quantized to 8 bits first, as a saved PNG would be)."""
    return set_metrics(ImageSet(to_uint8(images)), comparison)["classifier"]


def class_accuracy_score(
    samples: torch.Tensor,
    labels: torch.Tensor,
    test_set: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    seed: int,
    device: torch.device,
) -> dict[str, float]:
    """CAS: train the classifier architecture on the generated images (quantized to 8 bits, as a
    saved PNG would be), test it on the real test images."""
    model = train_classifier(
        to_model_range(to_uint8(samples)), labels, epochs=epochs, seed=seed, device=device
    )
    test_images, test_labels = test_set
    return {
        "cas_accuracy": accuracy(model, test_images, test_labels),
        "epochs": epochs,
        "num_train": len(labels),
        "num_test": len(test_labels),
    }


def sample_set_metrics(
    samples: torch.Tensor,
    labels: torch.Tensor | None,
    settings: EvaluationSettings,
    real: RealData,
    comparison: Comparison,
    copy_detector: CopyDetector | None,
    seed: int,
) -> tuple[dict[str, Any], Memorisation | None]:
    """Every metric of one sample set: feature metrics, CAS (class-conditional models) and the
    memorisation check (None without a copy_detector)."""
    metrics = {"generated": set_metrics(ImageSet(to_uint8(samples)), comparison), "cas": None}
    if labels is not None and "cas" in settings.metrics:
        test_set = (real.test_images, real.test_labels)
        metrics["cas"] = class_accuracy_score(
            samples, labels, test_set, settings.cas_epochs, seed, comparison.device
        )
    copies = None if copy_detector is None else copy_detector.check(samples)
    metrics["memorisation"] = None if copies is None else copies.summary()
    return metrics, copies


def draws_samples(settings: EvaluationSettings) -> bool:
    """Whether --metrics asks for anything measured on generated samples (not only reconstruction)."""
    return bool(set(settings.metrics) & set(SAMPLE_METRICS))


def evaluate_model(
    loaded: LoadedModel,
    settings: EvaluationSettings,
    sampling: SamplingSettings,
    plan: SpeedPlan,
    real: RealData,
    paths: OutputPaths,
    comparison: Comparison,
    copy_detector: CopyDetector | None,
) -> dict[str, Any]:
    """--repeats sample sets (seeds seed, seed + 1, ...), each scored by sample_set_metrics and
    summarised as mean ± std; the first one's grid and closest pairs saved; then reconstruction."""
    per_repeat, nearest_rows = [], []
    for repeat, seed in enumerate(repeat_seeds(settings) if draws_samples(settings) else []):
        samples, labels = generate_samples(
            loaded.network,
            loaded.diffusion,
            settings.num_samples,
            sampling=sampling,
            image_shape=loaded.image_shape,
            seed=seed,
            device=comparison.device,
            amp=plan.amp,
            batch_size=settings.batch_size,
        )
        metrics, copies = sample_set_metrics(samples, labels, settings, real, comparison, copy_detector, seed)
        per_repeat.append(metrics)
        if repeat == 0:
            save_sample_grid(samples, labels, paths.samples_png)
        if copies is not None:
            if repeat == 0:
                pairs = copies.closest_pairs(samples, real.train_images)
                save_image_grid(pairs, paths.closest_png, columns=len(pairs) // 2)
            rows = copies.rows(repeat)
            nearest_rows += rows[1:] if nearest_rows else rows  # one header line
    if nearest_rows:
        write_csv(nearest_rows, paths.nearest_csv)
    metrics = summarise_repeats(per_repeat) if per_repeat else {}
    if "recon" in settings.metrics:
        metrics["reconstruction"] = reconstruction_scores(
            loaded, settings, sampling, plan, real, comparison.device
        )
    if settings.nll:
        metrics["nll"] = nll_of_test_split(loaded, settings, real, comparison.device)
    return metrics


def nll_of_test_split(
    loaded: LoadedModel, settings: EvaluationSettings, real: RealData, device: torch.device
) -> dict[str, Any]:
    """The variational bound in bits/dim (likelihood.py) of --num-nll test images (a seeded subset;
    a class-conditional model is given their labels)."""
    order = torch.randperm(len(real.test_images), generator=torch.Generator().manual_seed(settings.seed))
    subset = order[: settings.num_nll]
    labels = None if loaded.num_classes is None else real.test_labels[subset]
    return nll_bits_per_dim(
        loaded.network,
        loaded.diffusion,
        real.test_images[subset],
        labels,
        batch_size=settings.batch_size,
        seed=settings.seed,
        device=device,
    )


def reconstruction_scores(
    loaded: LoadedModel,
    settings: EvaluationSettings,
    sampling: SamplingSettings,
    plan: SpeedPlan,
    real: RealData,
    device: torch.device,
) -> dict[str, Any]:
    """--num-recon test images (a seeded subset) noised to each --recon-t and denoised back."""
    subset = torch.randperm(len(real.test_images), generator=torch.Generator().manual_seed(settings.seed))
    subset = subset[: settings.num_recon]
    sweep = reconstruction_sweep(
        loaded.network,
        loaded.diffusion,
        real.test_images[subset],
        sweep_timesteps(settings.recon_t, loaded.diffusion.T),
        sampling=sampling,
        seed=settings.seed,
        device=device,
        amp=plan.amp,
        labels=real.test_labels[subset],
        batch_size=settings.batch_size,
    )
    return sweep | {"scale": SCALES}


def save_sample_grid(samples: torch.Tensor, labels: torch.Tensor | None, path: Path) -> None:
    """The first samples as a PNG: rows of 10, or for conditional models one row per class."""
    if labels is None:
        save_image_grid(samples[: GRID_COLUMNS * GRID_ROWS_UNCONDITIONAL], path, columns=GRID_COLUMNS)
        return
    per_class = [samples[labels == label] for label in range(int(labels.max()) + 1)]
    columns = min(GRID_COLUMNS, *(len(images) for images in per_class))
    save_image_grid(torch.cat([images[:columns] for images in per_class]), path, columns=columns)


def report_outputs(paths: OutputPaths, sampled: bool, copies: bool) -> dict[str, str | None]:
    """The files a report names: the JSON, and the sample grid and memorisation files when written."""
    return {
        "json": str(paths.json),
        "samples_png": str(paths.samples_png) if sampled else None,
        "closest_png": str(paths.closest_png) if copies else None,
        "nearest_csv": str(paths.nearest_csv) if copies else None,
    }


def sampling_provenance(loaded: LoadedModel, settings: EvaluationSettings, sampling: SamplingSettings, plan):
    T = loaded.diffusion.T
    return asdict(sampling) | {
        "steps": len(loaded.diffusion.timesteps(sampling.sampler, sampling.steps, T - 1)),
        "num_samples": settings.num_samples if draws_samples(settings) else 0,  # reconstruction only: none
        "seeds": repeat_seeds(settings),
        "batch_size": settings.batch_size,
        "amp": plan.amp,
        "compiled": plan.compile_mode if plan.compile else None,
        "channels_last": plan.channels_last,
    }


def evaluate(
    settings: EvaluationSettings,
    sampling: SamplingSettings,
    runtime: RuntimeSettings,
    data: DataSettings,
    command: str,
) -> dict[str, Any]:
    """Run the whole evaluation; returns the report (also written to its JSON path)."""
    device = resolve_device(runtime.device)
    plan = plan_speed(runtime.amp, runtime.compile, runtime.compile_mode, runtime.channels_last, device)
    configure_fast_path(device)
    seed_everything(settings.seed)
    loaded = None if settings.baselines_only else load_model(settings, sampling, plan, device)
    name, data_dir = data.source_or(loaded.data if loaded is not None else ("mnist", None))
    label = data_label(name, data_dir)
    stem = Path(loaded.provenance["path"]).stem if loaded is not None else f"baselines_{label}"
    paths = output_paths(settings, stem)

    real = load_real_data(name, data_dir, tuple(loaded.image_shape) if loaded is not None else None)
    test_images = real.test_images
    extractors, extractor_info = resolve_extractors(
        settings, name, data_dir, device, (real.test_images, real.test_labels)
    )
    comparison = Comparison(
        real_set(test_images, label, "test"),
        extractors,
        settings.batch_size,
        settings.seed,
        device,
        settings.cache_dir,
    )
    metrics = {name: None for name in METRIC_SECTIONS}
    if loaded is not None:
        copy_detector = None
        if "memorisation" in settings.metrics:
            judge_path = ensure_classifier(
                name, data_dir, settings.classifier, device, tuple(test_images.shape[1:])
            )
            copy_detector = CopyDetector(
                real.train_images, test_images, load_classifier(judge_path, device)[0]
            )
        metrics |= evaluate_model(loaded, settings, sampling, plan, real, paths, comparison, copy_detector)
    if extractors:
        floors = [
            set_metrics(floor_set(real.train_images, settings.num_samples, label, seed), comparison)
            for seed in repeat_seeds(settings)
        ]
        metrics["floor"] = summarise_repeats(floors)
    if settings.baselines or settings.baselines_only:
        shape = tuple(test_images.shape[1:])
        metrics["ceiling"] = set_metrics(noise_set(settings.num_samples, shape, settings.seed), comparison)

    report = {
        "provenance": {
            "checkpoint": None if loaded is None else loaded.provenance,
            "data": {
                "name": label,
                "split": "test",
                "num_reference": len(comparison.reference.images),
                "reference_sha256": sha256_of_tensor(comparison.reference.images),
            },
            "sampling": None if loaded is None else sampling_provenance(loaded, settings, sampling, plan),
            "seed": settings.seed,
            "repeats": settings.repeats,
            "feature_extractors": extractor_info,
            "versions": library_versions(),
            "device": hardware(device),
            "command": command,
        },
        "metrics": metrics,
        "outputs": report_outputs(
            paths, loaded is not None and draws_samples(settings), metrics["memorisation"] is not None
        ),
    }
    write_json(report, paths.json)
    return report


# ----- the report on the terminal -----------------------------------------------------------------


def format_cell(metrics: dict | None, key: str) -> str:
    """One table cell: mean ± std over the repeats when there are several; else FID, precision or
    recall, or IS / KID with their own ± (over IS splits, KID subsets); '-' where not measured."""
    if metrics is None:
        return "-"
    name = key if key in SINGLE_VALUED else key + "_mean"
    spread = metrics.get(OVER_REPEATS, {}).get(name)
    if spread is not None:
        return f"{spread['mean']:.4g} ± {spread['std']:.3g}"
    if key in SINGLE_VALUED:
        return f"{metrics[key]:.4g}"
    return f"{metrics[name]:.4g} ± {metrics[key + '_std']:.3g}"


def spread_note(first_column: dict[str, Any], repeats: int, ceiling: bool) -> str:
    """What the table's ± means (first_column: the first column's metrics per extractor)."""
    values = next(iter(first_column.values()))
    own = f"IS over splits, KID over random subsets of {values['kid_subset_size']} images"
    if repeats == 1:
        return f"±: {own}"
    note_text = f"±: standard deviation over {repeats} sample sets (seeds) and {repeats} floor subsets"
    return note_text + (f"; the noise ceiling's: {own}" if ceiling else "")


def fidelity_table(metrics: dict[str, Any], repeats: int = 1) -> list[str]:
    """Feature metrics per extractor (rows) and compared set (columns), and what ± means."""
    columns = {name: metrics[name] for name in COLUMN_TITLES if metrics.get(name)}
    labels = [label for label in ("classifier", "inception") if any(label in c for c in columns.values())]
    if not labels:
        return []
    lines = [f"{'metric':<22}" + "".join(f"{COLUMN_TITLES[name]:>22}" for name in columns)]
    for label in labels:
        rows = TABLE_ROWS + ((("mean_confidence", "confidence"),) if label == "classifier" else ())
        for key, title in rows:
            cells = [format_cell(values.get(label), key) for values in columns.values()]
            lines.append(f"{label + ' ' + title:<22}" + "".join(f"{cell:>22}" for cell in cells))
    return [*lines, spread_note(next(iter(columns.values())), repeats, "ceiling" in columns)]


def memorisation_lines(memorisation: dict[str, Any]) -> list[str]:
    """The copy rate and median nearest-training distance in each space."""
    lines = [
        "memorisation (nearest training image; a copy is nearer than percentile "
        f"{memorisation['percentile']:g} of the same distance of {memorisation['num_held_out']} "
        "held-out test images):"
    ]
    for space, title in (("pixels", "pixels, L2 on [0, 1]"), ("classifier", "classifier features, L2")):
        values = memorisation[space]
        lines.append(
            f"  {title:<26} copy rate {format_cell(values, 'copy_rate')}, median distance "
            f"{format_cell(values, 'median_distance')} (held-out test images: "
            f"{values['held_out_median_distance']:.4g})"
        )
    return lines


def format_report(report: dict[str, Any]) -> str:
    """What was evaluated, then the table, CAS and the reconstruction scores, as text."""
    provenance, metrics = report["provenance"], report["metrics"]
    checkpoint, sampling = provenance["checkpoint"], provenance["sampling"]
    lines = []
    if checkpoint is not None:
        lines.append(
            f"\n{checkpoint['path']} ({checkpoint['weights']} weights, epoch {checkpoint['epoch']}, "
            f"step {checkpoint['step']}): {sampling['num_samples']} samples, {sampling['sampler']} "
            f"{sampling['steps']} steps, eta {sampling['eta']}, guidance {sampling['guidance']}, "
            f"seed {provenance['seed']}"
        )
    data = provenance["data"]
    lines.append(f"reference: {data['name']} {data['split']} split, {data['num_reference']} images")
    lines += fidelity_table(metrics, provenance["repeats"])
    if metrics["memorisation"] is not None:
        lines += memorisation_lines(metrics["memorisation"])
    if metrics["cas"] is not None:
        lines.append(
            "CAS (classifier trained on the samples, tested on real test images): "
            f"accuracy {format_cell(metrics['cas'], 'cas_accuracy')}"
        )
    if metrics["nll"] is not None:
        nll = metrics["nll"]
        lines.append(
            f"NLL bound (Ho et al. eq. 5) on {nll['num_images']} test images: {nll['bits_per_dim']:.4f} ± "
            f"{nll['bits_per_dim_sem']:.4f} bits/dim (± standard error; prior {nll['prior_bpd']:.2g}, "
            f"KL terms {nll['kl_terms_bpd']:.4f}, decoder L_0 {nll['decoder_bpd']:.4f})"
        )
    if metrics["reconstruction"] is not None:
        lines.append(
            "reconstruction, mean ± std (MSE on [0, 1] pixels, PSNR in dB with peak 1, SSIM data_range=1):"
        )
        for t, scores in metrics["reconstruction"]["per_t"].items():
            cells = [
                f"{name.upper()} {scores[name + '_mean']:.4f} ± {scores[name + '_std']:.4f}"
                for name in ("mse", "psnr", "ssim")
            ]
            lines.append(f"  t={t:>4} ({scores['steps']:>4} steps)  " + "  ".join(cells))
    return "\n".join(lines)
