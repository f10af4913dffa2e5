"""The model's sample sets: --repeats sets drawn (seeds seed, seed + 1, ...), each scored, and their
summary as mean ± std (repeats.py); the first set's grid and closest pairs saved beside the report,
and with --save-samples its every image (saved_samples.py).

Each set is drawn by sampling.generate_samples (under torchrun, its batches dealt over the ranks and
gathered: draw_sample_set) and scored by scoring.py (feature metrics, the
classifier's confidence, CAS for a class-conditional model) and memorisation.py (each sample's
nearest training image; every sample's row goes to the nearest CSV).

Example:
    scores = score_sample_sets(loaded, settings, sampling, plan, real, paths, comparison, detector, processes)
    scores.generated.classifier.fid
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ddpm.evaluation.feature_metrics import Comparison, ImageSet
from ddpm.evaluation.image_metrics import to_uint8
from ddpm.evaluation.inputs import LoadedModel, OutputPaths, RealData, repeat_seeds
from ddpm.evaluation.memorisation import CopyDetector, Memorisation
from ddpm.evaluation.records import SampleSetScores
from ddpm.evaluation.repeats import summarise_repeats
from ddpm.evaluation.saved_samples import save_samples
from ddpm.evaluation.scoring import class_accuracy_score, set_scores
from ddpm.plumbing.inference_settings import EvaluationSettings
from ddpm.plumbing.output_files import write_csv
from ddpm.plumbing.processes import Processes
from ddpm.plumbing.runtime import SpeedPlan
from ddpm.plumbing.settings import SamplingSettings
from ddpm.sampling import generate_samples, in_sample_order
from ddpm.visualisation.pictures import save_image_grid

GRID_COLUMNS = 10
GRID_ROWS_UNCONDITIONAL = 10


def score_sample_set(
    samples: torch.Tensor,
    labels: torch.Tensor | None,
    settings: EvaluationSettings,
    real: RealData,
    comparison: Comparison,
    copy_detector: CopyDetector | None,
    seed: int,
) -> tuple[SampleSetScores, Memorisation | None]:
    """Every metric of one sample set: feature metrics, CAS (class-conditional models) and the
    memorisation check (None without a copy_detector)."""
    generated = set_scores(ImageSet(to_uint8(samples)), comparison)
    cas = None
    if labels is not None and "cas" in settings.metrics:
        cas = class_accuracy_score(samples, labels, real, settings.cas_epochs, seed, comparison.device)
    copies = None if copy_detector is None else copy_detector.check(samples)
    return SampleSetScores(generated, cas, None if copies is None else copies.summary()), copies


def score_sample_sets(
    loaded: LoadedModel,
    settings: EvaluationSettings,
    sampling: SamplingSettings,
    plan: SpeedPlan,
    real: RealData,
    paths: OutputPaths,
    comparison: Comparison,
    copy_detector: CopyDetector | None,
    processes: Processes,
) -> SampleSetScores:
    """--repeats sample sets, each drawn by draw_sample_set, scored by score_sample_set and
    summarised as mean ± std; the first one's grid, closest pairs and --save-samples saved, every
    sample's nearest training image in the CSV."""
    per_repeat: list[SampleSetScores] = []
    nearest_rows: list[list[Any]] = []
    for repeat, seed in enumerate(repeat_seeds(settings)):
        samples, labels = draw_sample_set(loaded, settings, sampling, plan, seed, processes)
        scores, copies = score_sample_set(samples, labels, settings, real, comparison, copy_detector, seed)
        per_repeat.append(scores)
        if repeat == 0:
            save_sample_grid(samples, labels, paths.samples_png)
            if paths.saved_samples is not None:
                save_samples(samples, labels, paths.saved_samples)
        if copies is not None:
            if repeat == 0:
                pairs = copies.closest_pairs(samples, real.train_images)
                save_image_grid(pairs, paths.closest_png, columns=len(pairs) // 2)
            nearest_rows += without_header(copies.rows(repeat), nearest_rows)
    if nearest_rows:
        write_csv(nearest_rows, paths.nearest_csv)
    return summarise_repeats(per_repeat)


def draw_sample_set(
    loaded: LoadedModel,
    settings: EvaluationSettings,
    sampling: SamplingSettings,
    plan: SpeedPlan,
    seed: int,
    processes: Processes,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One set of --num-samples images (and labels) from `seed`. Under torchrun each rank draws its
    batches (sampling.batch_starts) and every rank gets the whole set back in sample order: the same
    batches as one process draws, so the same bits."""
    samples, labels = generate_samples(
        loaded.network,
        loaded.diffusion,
        settings.num_samples,
        sampling=sampling,
        image_shape=loaded.image_shape,
        seed=seed,
        device=processes.device,
        amp=plan.amp,
        batch_size=settings.batch_size,
        progress=processes.is_main,
        rank=processes.rank,
        world_size=processes.world_size,
    )
    if processes.world_size == 1:
        return samples, labels
    parts = processes.gather((samples, labels))
    samples = in_sample_order([part[0] for part in parts], settings.batch_size)
    return samples, None if labels is None else in_sample_order(
        [part[1] for part in parts], settings.batch_size
    )


def without_header(rows: list[list[Any]], table: list[list[Any]]) -> list[list[Any]]:
    """A repeat's CSV rows to append to table: its header only when the table is still empty."""
    return rows[1:] if table else rows


def save_sample_grid(samples: torch.Tensor, labels: torch.Tensor | None, path: Path) -> None:
    """The first samples as a PNG: rows of 10, or for conditional models one row per class."""
    if labels is None:
        save_image_grid(samples[: GRID_COLUMNS * GRID_ROWS_UNCONDITIONAL], path, columns=GRID_COLUMNS)
        return
    per_class = [samples[labels == label] for label in range(int(labels.max()) + 1)]
    columns = min(GRID_COLUMNS, *(len(images) for images in per_class))
    save_image_grid(torch.cat([images[:columns] for images in per_class]), path, columns=columns)
