"""Repeated measurements: the mean, spread and values of metrics measured on K sample sets.

FID and its kin move with the sample count and the seed (improved-diffusion issues 15 and 19,
k-diffusion 51, edm 16), so `eval_MNIST.py --repeats K` draws K sample sets (seeds seed, seed+1, ...)
and reports each number as mean ± std over them. `summarise_repeats` turns K reports of the same
shape into one of that shape: every number replaced by its mean (lists of numbers averaged element
by element, counts kept), with an "over_repeats" entry beside them holding, per number, the mean, the sample
standard deviation (ddof = 1) and the K values.

Example:
    summarise_repeats([{"fid": 40.0}, {"fid": 44.0}])
    # {"fid": 42.0, "over_repeats": {"fid": {"mean": 42.0, "std": 2.83, "values": [40.0, 44.0]}}}
"""

from __future__ import annotations

import statistics
from typing import Any

OVER_REPEATS = "over_repeats"


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof = 1; 0 for one value) and the values themselves."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": list(values)}


def summarise_repeats(per_repeat: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from K of the same shape: numbers averaged (with their spread under
    "over_repeats"), lists of numbers averaged element-wise, dicts summarised recursively; integers
    equal in every repeat (counts) and anything else (text, lists of records) taken from the first
    repeat. One repeat is returned as it is."""
    if len(per_repeat) == 1:
        return per_repeat[0]
    summary, spreads = {}, {}
    for key, first in per_repeat[0].items():
        values = [report[key] for report in per_repeat]
        if isinstance(first, dict):
            summary[key] = summarise_repeats(values)
        elif isinstance(first, int) and len(set(values)) == 1:
            summary[key] = first  # a count, the same in every repeat
        elif is_number(first):
            spreads[key] = spread(values)
            summary[key] = spreads[key]["mean"]
        elif isinstance(first, list) and first and all(map(is_number, first)):
            summary[key] = [statistics.fmean(column) for column in zip(*values, strict=True)]
        else:
            summary[key] = first
    if spreads:
        summary[OVER_REPEATS] = spreads
    return summary
