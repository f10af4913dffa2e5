"""The report of an evaluation (records.EvaluationReport): as JSON, and as the table on the terminal.

JSON: each record is one object whose keys are its fields in declaration order (fields marked
records.OMITTED_WHEN_NONE left out when None; `over_repeats`, the spreads over --repeats, last and only
when there are any), so that the file keeps the layout users and weights/demo_mnist5k_eval.json rely on.

Terminal: what was evaluated, then the feature metrics per extractor (rows) and compared set
(columns: the samples, the real-data floor, the noise ceiling) with what ± means, then memorisation,
CAS, the NLL bound and the reconstruction scores.

Example:
    write_report(report, "eval_outputs/eval_last.json")
    print(format_report(report))
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ddpm.evaluation.records import (
    EvaluationReport,
    FidelityScores,
    MemorisationSummary,
    NllBound,
    Outputs,
    Reconstruction,
    SetScores,
)
from ddpm.evaluation.repeats import OVER_REPEATS, Spread
from ddpm.plumbing.output_files import write_json

COLUMN_TITLES = {"generated": "generated", "floor": "train (floor)", "ceiling": "noise (ceiling)"}
EXTRACTORS = ("classifier", "inception")
ROW_TITLES = ("FID", "IS", "KID", "precision", "recall")
CLASSIFIER_ROWS = ("confidence",)  # the classifier's own row: its mean top probability
WIDTH = 22  # characters per table column

# ----- JSON ---------------------------------------------------------------------------------------


def as_json(value: Any) -> Any:
    """Records (dataclasses) -> dicts of their fields, recursively through dicts and lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {}
        for field in dataclasses.fields(value):
            item = getattr(value, field.name)
            if field.name == OVER_REPEATS or (item is None and field.metadata.get("omitted_when_none")):
                continue
            fields[field.name] = as_json(item)
        if getattr(value, OVER_REPEATS, None):
            fields[OVER_REPEATS] = as_json(getattr(value, OVER_REPEATS))
        return fields
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_json(item) for item in value]
    return value


def write_report(report: EvaluationReport, path: str | Path) -> None:
    write_json(as_json(report), path)


def wrote_line(outputs: Outputs) -> str:
    """'wrote' and the files written."""
    written = [path for path in as_json(outputs).values() if path is not None]
    return "wrote " + ", ".join(written)


# ----- the terminal -------------------------------------------------------------------------------


def cell(value: float, spread: Spread | None, own_std: float | None = None) -> str:
    """One table cell: mean ± std over the repeats when there are several; else the value, with its
    own ± where it has one (IS over splits, KID over subsets)."""
    if spread is not None:
        return f"{spread.mean:.4g} ± {spread.std:.3g}"
    if own_std is None:
        return f"{value:.4g}"
    return f"{value:.4g} ± {own_std:.3g}"


def fidelity_cells(scores: FidelityScores) -> dict[str, str]:
    """Row title -> cell of one extractor's scores: FID, IS, KID, precision, recall and, for the
    classifier, its confidence."""
    spreads = scores.over_repeats
    cells = {
        "FID": cell(scores.fid, spreads.get("fid")),
        "IS": cell(scores.is_mean, spreads.get("is_mean"), scores.is_std),
        "KID": cell(scores.kid_mean, spreads.get("kid_mean"), scores.kid_std),
        "precision": cell(scores.precision, spreads.get("precision")),
        "recall": cell(scores.recall, spreads.get("recall")),
    }
    if scores.mean_confidence is not None:
        cells["confidence"] = cell(scores.mean_confidence, spreads.get("mean_confidence"))
    return cells


def per_extractor(scores: SetScores) -> dict[str, FidelityScores]:
    """The scores of each extractor that measured this set, classifier first."""
    found = {"classifier": scores.classifier, "inception": scores.inception}
    return {label: values for label, values in found.items() if values is not None}


def spread_note(first: FidelityScores, repeats: int, ceiling: bool) -> str:
    """What the table's ± means (first: the first column's first extractor's scores)."""
    own = f"IS over splits, KID over random subsets of {first.kid_subset_size} images"
    if repeats == 1:
        return f"±: {own}"
    note_text = f"±: standard deviation over {repeats} sample sets (seeds) and {repeats} floor subsets"
    return note_text + (f"; the noise ceiling's: {own}" if ceiling else "")


def fidelity_table(columns: dict[str, dict[str, FidelityScores]], repeats: int) -> list[str]:
    """Feature metrics per extractor (rows) and compared set (columns: per extractor its scores, only
    sets some extractor measured), and what ± means."""
    labels = [label for label in EXTRACTORS if any(label in column for column in columns.values())]
    if not labels:
        return []
    lines = [f"{'metric':<{WIDTH}}" + "".join(f"{COLUMN_TITLES[name]:>{WIDTH}}" for name in columns)]
    for label in labels:
        cells = [fidelity_cells(column[label]) if label in column else {} for column in columns.values()]
        for title in ROW_TITLES + (CLASSIFIER_ROWS if label == "classifier" else ()):
            row = "".join(f"{column_cells.get(title, '-'):>{WIDTH}}" for column_cells in cells)
            lines.append(f"{label + ' ' + title:<{WIDTH}}" + row)
    first = next(iter(next(iter(columns.values())).values()))
    return [*lines, spread_note(first, repeats, "ceiling" in columns)]


def memorisation_lines(memorisation: MemorisationSummary) -> list[str]:
    """The copy rate and median nearest-training distance in each space."""
    lines = [
        "memorisation (nearest training image; a copy is nearer than percentile "
        f"{memorisation.percentile:g} of the same distance of {memorisation.num_held_out} "
        "held-out test images):"
    ]
    for space, title in (
        (memorisation.pixels, "pixels, L2 on [0, 1]"),
        (memorisation.classifier, "classifier features, L2"),
    ):
        lines.append(
            f"  {title:<26} copy rate {cell(space.copy_rate, space.over_repeats.get('copy_rate'))}, "
            f"median distance {cell(space.median_distance, space.over_repeats.get('median_distance'))} "
            f"(held-out test images: {space.held_out_median_distance:.4g})"
        )
    return lines


def nll_line(nll: NllBound) -> str:
    return (
        f"NLL bound (Ho et al. eq. 5) on {nll.num_images} test images: {nll.bits_per_dim:.4f} ± "
        f"{nll.bits_per_dim_sem:.4f} bits/dim (± standard error; prior {nll.prior_bpd:.2g}, "
        f"KL terms {nll.kl_terms_bpd:.4f}, decoder L_0 {nll.decoder_bpd:.4f})"
    )


def reconstruction_lines(reconstruction: Reconstruction) -> list[str]:
    lines = ["reconstruction, mean ± std (MSE on [0, 1] pixels, PSNR in dB with peak 1, SSIM data_range=1):"]
    for t, scores in reconstruction.per_t.items():
        cells = [
            f"MSE {scores.mse_mean:.4f} ± {scores.mse_std:.4f}",
            f"PSNR {scores.psnr_mean:.4f} ± {scores.psnr_std:.4f}",
            f"SSIM {scores.ssim_mean:.4f} ± {scores.ssim_std:.4f}",
        ]
        lines.append(f"  t={t:>4} ({scores.steps:>4} steps)  " + "  ".join(cells))
    return lines


def format_report(report: EvaluationReport) -> str:
    """What was evaluated, then the table, memorisation, CAS, the NLL bound and the reconstruction
    scores, as text."""
    provenance, metrics = report.provenance, report.metrics
    checkpoint, sampling = provenance.checkpoint, provenance.sampling
    lines = []
    if checkpoint is not None and sampling is not None:
        lines.append(
            f"\n{checkpoint.path} ({checkpoint.weights} weights, epoch {checkpoint.epoch}, "
            f"step {checkpoint.step}): {sampling.num_samples} samples, {sampling.sampler} "
            f"{sampling.steps} steps, eta {sampling.eta}, guidance {sampling.guidance}, "
            f"seed {provenance.seed}"
        )
    data = provenance.data
    lines.append(f"reference: {data.name} {data.split} split, {data.num_reference} images")
    sets = {"generated": metrics.generated, "floor": metrics.floor, "ceiling": metrics.ceiling}
    columns = {name: per_extractor(scores) for name, scores in sets.items() if scores is not None}
    lines += fidelity_table({name: column for name, column in columns.items() if column}, provenance.repeats)
    if metrics.memorisation is not None:
        lines += memorisation_lines(metrics.memorisation)
    if metrics.cas is not None:
        accuracy = cell(metrics.cas.cas_accuracy, metrics.cas.over_repeats.get("cas_accuracy"))
        lines.append(
            f"CAS (classifier trained on the samples, tested on real test images): accuracy {accuracy}"
        )
    if metrics.nll is not None:
        lines.append(nll_line(metrics.nll))
    if metrics.reconstruction is not None:
        lines += reconstruction_lines(metrics.reconstruction)
    return "\n".join(lines)
