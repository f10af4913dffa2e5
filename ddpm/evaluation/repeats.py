"""Repeated measurements: the mean, spread and values of metrics measured on K sample sets.

FID and its kin move with the sample count and the seed (improved-diffusion issues 15 and 19,
k-diffusion 51, edm 16), so `eval_MNIST.py --repeats K` draws K sample sets (seeds seed, seed+1, ...)
and reports each number as mean ± std over them. `summarise_repeats` turns K records of one type
(records.py) into one of that type: every number replaced by its mean (lists of numbers averaged
element by element, counts kept), and the record's `over_repeats` holding, per field, a Spread: the
mean, the sample standard deviation (ddof = 1) and the K values.

Example:
    summarise_repeats([CasScores(0.5, 10, 100, 1000), CasScores(0.7, 10, 100, 1000)])
    # CasScores(cas_accuracy=0.6, ..., over_repeats={"cas_accuracy": Spread(0.6, 0.141, [0.5, 0.7])})
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Any, TypeVar

Record = TypeVar("Record")
OVER_REPEATS = "over_repeats"  # the field of a record that holds its spreads


@dataclass(frozen=True)
class Spread:
    """One number over K repeats: its mean, sample standard deviation (ddof = 1; 0 for one value)
    and the K values."""

    mean: float
    std: float
    values: list[float]

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, list(values))


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def summary_of_field(values: list[Any]) -> tuple[Any, Spread | None]:
    """One field's K values -> its summary and, for a measured number, its Spread: records are
    summarised recursively; integers equal in every repeat (counts) are kept; numbers averaged; lists
    of numbers averaged element-wise; anything else (text, None, lists of records) taken from the
    first repeat."""
    first = values[0]
    if dataclasses.is_dataclass(first):
        return summarise_repeats(values), None
    if isinstance(first, int) and len(set(values)) == 1:
        return first, None
    if is_number(first):
        spread = Spread.of(values)
        return spread.mean, spread
    if isinstance(first, list) and first and all(map(is_number, first)):
        return [statistics.fmean(column) for column in zip(*values, strict=True)], None
    return first, None


def summarise_repeats(per_repeat: list[Record]) -> Record:
    """One record from K of the same type (dataclasses): each field summarised by summary_of_field,
    the spreads of its measured numbers in its `over_repeats` field. One repeat is returned as it is."""
    first = per_repeat[0]
    if len(per_repeat) == 1:
        return first
    assert dataclasses.is_dataclass(first) and not isinstance(first, type)
    summary, spreads = {}, {}
    for field in dataclasses.fields(first):
        if field.name == OVER_REPEATS:
            continue
        summary[field.name], spread = summary_of_field([getattr(record, field.name) for record in per_repeat])
        if spread is not None:
            spreads[field.name] = spread
    if spreads:
        summary[OVER_REPEATS] = spreads
    return dataclasses.replace(first, **summary)
