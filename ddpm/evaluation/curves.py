"""Metrics over training: evaluate every epoch checkpoint and draw FID, IS, precision and recall
against the epoch, beside the real-data floor.

`eval_MNIST.py --checkpoint "checkpoints/mnist_epoch_*.pt"` (a quoted glob, or comma-separated
paths) runs evaluation.evaluate on each checkpoint, in the order of their epochs, with the same
flags: same sample count, seeds and repeats, so the points differ only by the weights. Each
checkpoint's JSON goes to <out-dir>/eval_<name>.json; the curve to <out-dir>/training_curve.csv
(one row per checkpoint) and training_curve.png. One checkpoint is the plain evaluation.

Example:
    text = evaluate_checkpoints(EvaluationSettings(checkpoint="checkpoints/mnist_epoch_*.pt",
                                num_samples=1000), SamplingSettings(), RuntimeSettings(), DataSettings(None),
                                command="eval_MNIST.py ...")
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ddpm.evaluation.evaluate import evaluate, format_report
from ddpm.evaluation.repeats import OVER_REPEATS
from ddpm.plumbing.checkpointing import resolve_checkpoints
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import writable_dir, write_csv
from ddpm.plumbing.settings import DataSettings, EvaluationSettings, RuntimeSettings, SamplingSettings
from ddpm.visualisation.pictures import save_training_curves

CURVE_METRICS = ("fid", "is_mean", "precision", "recall")
CURVE_NAME = "training_curve"


def evaluate_checkpoints(
    settings: EvaluationSettings,
    sampling: SamplingSettings,
    runtime: RuntimeSettings,
    data: DataSettings,
    command: str,
) -> str:
    """Evaluate the checkpoint(s) --checkpoint names; returns what to print. Several: one report
    each, then the curve's CSV and PNG in --out-dir."""
    paths = resolve_checkpoints(settings.checkpoint)
    if len(paths) == 1:
        report = evaluate(replace(settings, checkpoint=str(paths[0])), sampling, runtime, data, command)
        return format_report(report) + "\n" + wrote_line(report["outputs"])
    check_several(settings, paths)
    reports = [
        evaluate(replace(settings, checkpoint=str(path)), sampling, runtime, data, command) for path in paths
    ]
    reports.sort(key=lambda report: position(report["provenance"]["checkpoint"]))
    out_dir = writable_dir(settings.out_dir)
    rows = curve_rows(reports)
    write_csv([list(rows[0]), *[list(row.values()) for row in rows]], out_dir / f"{CURVE_NAME}.csv")
    save_training_curves(rows, out_dir / f"{CURVE_NAME}.png")
    lines = [format_report(report) for report in reports]
    return "\n".join([*lines, f"wrote {len(reports)} reports and {out_dir / CURVE_NAME}.csv and .png"])


def wrote_line(outputs: dict[str, str | None]) -> str:
    written = [path for path in outputs.values() if path is not None]
    return "wrote " + ", ".join(written)


def check_several(settings: EvaluationSettings, paths: list[Path]) -> None:
    """Several checkpoints write one report each into --out-dir: --json (one file) cannot name them,
    and two checkpoints with the same file name would overwrite each other's report."""
    if settings.json is not None:
        raise UserError("--json names one report; with several checkpoints use --out-dir")
    names = [path.stem for path in paths]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"two checkpoints are named {twice[0]}: their reports would overwrite each other")


def position(checkpoint: dict[str, Any]) -> tuple[float, float]:
    """Where a checkpoint sits in training: (epoch, step), unknown values last."""
    return tuple(float("inf") if checkpoint[key] is None else checkpoint[key] for key in ("epoch", "step"))


def curve_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per report: checkpoint, epoch, step, then per extractor each CURVE_METRICS of the samples
    and of the floor, with its standard deviation over the repeats ('' with one repeat)."""
    rows = []
    for report in reports:
        checkpoint, metrics = report["provenance"]["checkpoint"], report["metrics"]
        row = {"checkpoint": checkpoint["path"], "epoch": checkpoint["epoch"], "step": checkpoint["step"]}
        for label in ("classifier", "inception"):
            for column, section in (("", "generated"), ("floor_", "floor")):
                values = (metrics[section] or {}).get(label)
                if values is None:
                    continue
                for key in CURVE_METRICS:
                    row[f"{column}{label}_{key}"] = values[key]
                    row[f"{column}{label}_{key}_std"] = (
                        values.get(OVER_REPEATS, {}).get(key, {}).get("std", "")
                    )
        rows.append(row)
    return rows
