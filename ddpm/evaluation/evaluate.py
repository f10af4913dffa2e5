"""Evaluation of a checkpoint: sample, then FID / IS / KID / precision / recall next to the real-data
floor, CAS, memorisation, reconstruction scores and the NLL bound, with the provenance of every number.

`evaluate` reads like the table of contents of an evaluation: its inputs checked and loaded before
anything is sampled (inputs.py), the model's sample sets scored (sample_sets.py), the model on real
test images (real_image_metrics.py), the floor (as many real training images as samples, at most the
whole split; in every report) and with --baselines the ceiling (uniform noise), all against the test
split of the checkpoint's data (scoring.py, feature_metrics.py); then the report (records.py) is
written as JSON (report.py). --repeats K draws K sample sets (seeds seed .. seed+K-1) and K floor
subsets; every sample metric is then the mean over them, with its spread and values (repeats.py).
Under torchrun the sample sets' batches are dealt over the ranks and gathered, and rank 0 alone scores,
prints and writes: the same report and files as one process, bit for bit.

Example:
    report = evaluate(EvaluationSettings(num_samples=1000), SamplingSettings(), RuntimeSettings(),
                      DataSettings(data=None), command="eval_MNIST.py --num-samples 1000")
    print(format_report(report))
"""

from __future__ import annotations

from pathlib import Path

from ddpm.evaluation.classifier import LoadedClassifier, data_label
from ddpm.evaluation.feature_metrics import Comparison, floor_set, noise_set
from ddpm.evaluation.inputs import (
    LoadedModel,
    OutputPaths,
    RealData,
    check_counts,
    draws_samples,
    load_judge,
    load_model,
    load_real_data,
    output_paths,
    repeat_seeds,
    saved_samples_path,
)
from ddpm.evaluation.memorisation import CopyDetector
from ddpm.evaluation.real_image_metrics import nll_of_test_split, reconstruction_scores
from ddpm.evaluation.records import (
    DataInfo,
    EvaluationReport,
    Metrics,
    Outputs,
    Provenance,
    SamplingInfo,
    SetScores,
)
from ddpm.evaluation.repeats import summarise_repeats
from ddpm.evaluation.report import write_report
from ddpm.evaluation.sample_sets import draw_sample_set, score_sample_sets
from ddpm.evaluation.scoring import compare_with_test_split, set_scores
from ddpm.plumbing.inference_settings import EvaluationSettings
from ddpm.plumbing.processes import Processes
from ddpm.plumbing.provenance import hardware, library_versions, sha256_of_tensor
from ddpm.plumbing.runtime import SpeedPlan, configure_fast_path, plan_speed, resolve_device, seed_everything
from ddpm.plumbing.settings import DataSettings, RuntimeSettings, SamplingSettings


def evaluate(
    settings: EvaluationSettings,
    sampling: SamplingSettings,
    runtime: RuntimeSettings,
    data: DataSettings,
    command: str,
    processes: Processes | None = None,
) -> EvaluationReport:
    """Run the whole evaluation; returns the report (also written to its JSON path). Under torchrun
    this is rank 0's part: the other ranks run sample_for_rank_0 and draw their share of the samples."""
    processes = processes or Processes(rank=0, world_size=1, device=resolve_device(runtime.device))
    device = processes.device
    plan = plan_speed(runtime.amp, runtime.compile, runtime.compile_mode, runtime.channels_last, device)
    configure_fast_path(device)
    seed_everything(settings.seed)
    loaded = None if settings.baselines_only else load_model(settings, sampling, plan, device)
    check_counts(settings, None if loaded is None else loaded.num_classes)
    name, data_dir = data.source_or(("mnist", None) if loaded is None else loaded.data)
    stem = f"baselines_{data_label(name, data_dir)}" if loaded is None else Path(loaded.checkpoint.path).stem
    paths = output_paths(settings, stem)
    paths.saved_samples = saved_samples_path(settings, None if loaded is None else loaded.image_shape)

    real = load_real_data(name, data_dir, None if loaded is None else loaded.image_shape)
    classifier = load_judge(settings, real, loaded is not None, device)
    comparison, extractors = compare_with_test_split(settings, real, classifier, device)
    metrics = Metrics()
    if loaded is not None:
        metrics = model_metrics(
            loaded, settings, sampling, plan, real, paths, comparison, classifier, processes
        )
    metrics.floor, metrics.ceiling = baselines(settings, real, comparison)

    provenance = Provenance(
        checkpoint=None if loaded is None else loaded.checkpoint,
        data=data_info(real, comparison),
        sampling=None if loaded is None else sampling_info(loaded, settings, sampling, plan),
        seed=settings.seed,
        repeats=settings.repeats,
        feature_extractors=extractors,
        versions=library_versions(),
        device=hardware(device),
        command=command,
    )
    sampled = loaded is not None and draws_samples(settings)
    report = EvaluationReport(provenance, metrics, outputs(paths, sampled, metrics.memorisation is not None))
    write_report(report, paths.json)
    return report


def sample_for_rank_0(
    settings: EvaluationSettings, sampling: SamplingSettings, runtime: RuntimeSettings, processes: Processes
) -> None:
    """A torchrun rank other than 0: the model loaded and checked as rank 0 does, then this rank's
    batches of every sample set drawn and gathered (sample_sets.draw_sample_set); rank 0 does the rest
    (scores, reconstruction, NLL, files), and a failure there ends the job on every rank."""
    plan = plan_speed(
        runtime.amp, runtime.compile, runtime.compile_mode, runtime.channels_last, processes.device
    )
    configure_fast_path(processes.device)
    seed_everything(settings.seed)
    if settings.baselines_only or not draws_samples(settings):
        return
    loaded = load_model(settings, sampling, plan, processes.device)
    check_counts(settings, loaded.num_classes)
    for seed in repeat_seeds(settings):
        draw_sample_set(loaded, settings, sampling, plan, seed, processes)


def model_metrics(
    loaded: LoadedModel,
    settings: EvaluationSettings,
    sampling: SamplingSettings,
    plan: SpeedPlan,
    real: RealData,
    paths: OutputPaths,
    comparison: Comparison,
    classifier: LoadedClassifier | None,
    processes: Processes,
) -> Metrics:
    """What is measured on the model: its sample sets (feature metrics, CAS, memorisation), when
    --metrics asks for any (drawn over every process), then the reconstruction sweep and the NLL bound
    on test images (on this process)."""
    metrics = Metrics()
    if draws_samples(settings):
        copy_detector = None
        if "memorisation" in settings.metrics and classifier is not None:
            copy_detector = CopyDetector(
                real.train_images, real.test_images, classifier.on(comparison.device)
            )
        sets = score_sample_sets(
            loaded, settings, sampling, plan, real, paths, comparison, copy_detector, processes
        )
        metrics = Metrics(generated=sets.generated, cas=sets.cas, memorisation=sets.memorisation)
    if "recon" in settings.metrics:
        metrics.reconstruction = reconstruction_scores(
            loaded, settings, sampling, plan, real, comparison.device
        )
    if settings.nll:
        metrics.nll = nll_of_test_split(loaded, settings, real, comparison.device)
    return metrics


def baselines(
    settings: EvaluationSettings, real: RealData, comparison: Comparison
) -> tuple[SetScores | None, SetScores | None]:
    """The floor (--repeats seeded subsets of --num-samples real training images, when there is an
    extractor) and, with --baselines, the ceiling (--num-samples images of uniform noise)."""
    floor = None
    if comparison.extractors:
        subsets = [
            floor_set(real.train_images, settings.num_samples, real.label, seed)
            for seed in repeat_seeds(settings)
        ]
        floor = summarise_repeats([set_scores(subset, comparison) for subset in subsets])
    ceiling = None
    if settings.baselines or settings.baselines_only:
        ceiling = set_scores(noise_set(settings.num_samples, real.image_shape, settings.seed), comparison)
    return floor, ceiling


def data_info(real: RealData, comparison: Comparison) -> DataInfo:
    reference = comparison.reference.images
    return DataInfo(real.label, "test", len(reference), sha256_of_tensor(reference))


def sampling_info(
    loaded: LoadedModel, settings: EvaluationSettings, sampling: SamplingSettings, plan: SpeedPlan
) -> SamplingInfo:
    """The sampling flags, the model evaluations per sample and how the network ran."""
    timesteps = loaded.diffusion.timesteps(sampling.sampler, sampling.steps, loaded.diffusion.T - 1)
    return SamplingInfo(
        sampler=sampling.sampler,
        steps=len(timesteps),
        eta=sampling.eta,
        guidance=sampling.guidance,
        num_samples=settings.num_samples if draws_samples(settings) else 0,  # reconstruction only: none
        seeds=repeat_seeds(settings),
        batch_size=settings.batch_size,
        amp=plan.amp,
        compiled=plan.compile_mode if plan.compile else None,
        channels_last=plan.channels_last,
    )


def outputs(paths: OutputPaths, sampled: bool, copies: bool) -> Outputs:
    """The files a report names: the JSON, and the sample grid and memorisation files when written."""
    return Outputs(
        json=str(paths.json),
        samples_png=str(paths.samples_png) if sampled else None,
        closest_png=str(paths.closest_png) if copies else None,
        nearest_csv=str(paths.nearest_csv) if copies else None,
        saved_samples=None if paths.saved_samples is None else str(paths.saved_samples),
    )
