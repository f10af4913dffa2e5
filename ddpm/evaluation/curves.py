"""Metrics over training: evaluate every epoch checkpoint and draw FID, IS, precision and recall
against the epoch, beside the real-data floor.

`eval_MNIST.py --checkpoint "checkpoints/mnist_epoch_*.pt"` (a quoted glob, or comma-separated
paths) runs evaluate.evaluate on each checkpoint, with the same flags: same sample count, seeds and
repeats, so the points differ only by the weights. Each checkpoint's JSON goes to
<out-dir>/eval_<name>.json; the curve, in the order of their epochs, to <out-dir>/training_curve.csv
(one row per checkpoint) and training_curve.png.

Example:
    text = evaluate_over_training(resolve_checkpoints("checkpoints/mnist_epoch_*.pt"),
                                  EvaluationSettings(num_samples=1000), SamplingSettings(),
                                  RuntimeSettings(), DataSettings(None), command="eval_MNIST.py ...")
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ddpm.evaluation.evaluate import evaluate
from ddpm.evaluation.records import CheckpointInfo, EvaluationReport, FidelityScores, SetScores
from ddpm.evaluation.report import format_report
from ddpm.plumbing.inference_settings import EvaluationSettings
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import writable_dir, write_csv
from ddpm.plumbing.processes import Processes
from ddpm.plumbing.settings import DataSettings, RuntimeSettings, SamplingSettings
from ddpm.visualisation.pictures import save_training_curves

CURVE_NAME = "training_curve"


def evaluate_over_training(
    paths: list[Path],
    settings: EvaluationSettings,
    sampling: SamplingSettings,
    runtime: RuntimeSettings,
    data: DataSettings,
    command: str,
    processes: Processes | None = None,
) -> str:
    """Evaluate each checkpoint of paths (one report each), then write the curve's CSV and PNG in
    --out-dir; returns what to print."""
    check_several(settings, paths)
    reports = [
        evaluate(replace(settings, checkpoint=str(path)), sampling, runtime, data, command, processes)
        for path in paths
    ]
    reports.sort(key=position)
    out_dir = writable_dir(settings.out_dir)
    rows = curve_rows(reports)
    write_csv([list(rows[0]), *[list(row.values()) for row in rows]], out_dir / f"{CURVE_NAME}.csv")
    save_training_curves(rows, out_dir / f"{CURVE_NAME}.png")
    lines = [format_report(report) for report in reports]
    return "\n".join([*lines, f"wrote {len(reports)} reports and {out_dir / CURVE_NAME}.csv and .png"])


def check_several(settings: EvaluationSettings, paths: list[Path]) -> None:
    """Several checkpoints write one report each into --out-dir: --json (one file) and --save-samples
    cannot name them, and two checkpoints with the same file name would overwrite each other's report."""
    if settings.json is not None:
        raise UserError("--json names one report; with several checkpoints use --out-dir")
    if settings.save_samples is not None:
        raise UserError("--save-samples names one checkpoint's samples; evaluate one checkpoint at a time")
    names = [path.stem for path in paths]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"two checkpoints are named {twice[0]}: their reports would overwrite each other")


def position(report: EvaluationReport) -> tuple[float, float]:
    """Where a report's checkpoint sits in training: (epoch, step), unknown values last."""
    checkpoint = report.provenance.checkpoint
    assert checkpoint is not None  # a curve's reports are of checkpoints
    epoch, step = checkpoint.epoch, checkpoint.step
    return (float("inf") if epoch is None else epoch, float("inf") if step is None else step)


def curve_columns(scores: FidelityScores, prefix: str) -> dict[str, Any]:
    """FID, IS, precision and recall of one extractor's scores, each with its standard deviation over
    the repeats ('' with one repeat), under column names that start with prefix."""
    values = {
        "fid": scores.fid,
        "is_mean": scores.is_mean,
        "precision": scores.precision,
        "recall": scores.recall,
    }
    columns: dict[str, Any] = {}
    for name, value in values.items():
        spread = scores.over_repeats.get(name)
        columns[f"{prefix}_{name}"] = value
        columns[f"{prefix}_{name}_std"] = "" if spread is None else spread.std
    return columns


def curve_rows(reports: list[EvaluationReport]) -> list[dict[str, Any]]:
    """One row per report: checkpoint, epoch, step, then per extractor the curve_columns of the samples
    and of the floor."""
    rows = []
    for report in reports:
        checkpoint: CheckpointInfo | None = report.provenance.checkpoint
        assert checkpoint is not None
        metrics = report.metrics
        row: dict[str, Any] = {
            "checkpoint": checkpoint.path,
            "epoch": checkpoint.epoch,
            "step": checkpoint.step,
        }
        for label in ("classifier", "inception"):
            for prefix, scores in (("", metrics.generated), ("floor_", metrics.floor)):
                extractor_scores = of_extractor(scores, label)
                if extractor_scores is not None:
                    row |= curve_columns(extractor_scores, prefix + label)
        rows.append(row)
    return rows


def of_extractor(scores: SetScores | None, label: str) -> FidelityScores | None:
    """One extractor's scores of an image set (None where that set or extractor was not measured)."""
    if scores is None:
        return None
    return scores.classifier if label == "classifier" else scores.inception
