"""Repeated runs, interleaved, and their figures folded into one.

This machine's speed drifts by ±20 % within minutes, so a ratio of two
single runs can flip a verdict. Each comparison therefore runs its sides in
turn (A, B, C, A, B, C, ...) ``--repeat`` times, so that a slow minute
weighs on every side alike, and reports per side the median of its runs.
"""

from __future__ import annotations

from collections import ChainMap, Counter
from collections.abc import Callable, Sequence
from statistics import median
from typing import Any, TypeVar

T = TypeVar("T")

Fold = Callable[[list[Any]], Any]


def _errors(values: list[Any]) -> Any:
    return dict(sum((Counter(errors) for errors in values), Counter()))


def _joined(values: list[Any]) -> Any:
    if isinstance(values[0], dict):
        return dict(ChainMap(*values))  # an example of each kind, the earliest
    return [item for value in values for item in value]


def _median(values: list[Any]) -> Any:
    return round(median(values), 3)


COUNTS = ("accepted_total", "delivered", "recipients_delivered", "queued_replies", "reconnects",
          "log_warnings_errors")  # fmt: skip
FOLDS: dict[str, Fold] = {
    "peak_rss_mb": max,  # a peak is a peak
    "drained": all,
    "errors": _errors,
    **dict.fromkeys(COUNTS, sum),
}
"""How a summary's figure is folded when not by its median."""


def interleaved(thunks: Sequence[Callable[[int], T]], repeat: int) -> list[list[T]]:
    """Call the thunks in turn, ``repeat`` times over, each with the run's
    number (1, 2, ...): per thunk, its results in the order they ran."""
    results: list[list[T]] = [[] for _ in thunks]
    for run in range(1, repeat + 1):
        for mine, thunk in zip(results, thunks, strict=True):
            mine.append(thunk(run))
    return results


def _fold(key: str, values: list[Any]) -> Any:
    present = [value for value in values if value is not None]
    if not present:
        return None
    fold = FOLDS.get(key) or (_joined if isinstance(present[0], dict | list) else _median)
    return fold(present)


def folded(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One target's summaries of its runs (``bench.scenarios.measure``) as
    one: each figure the median of the runs that have it (None where none
    has), peak RSS the maximum, counts and errors added up, drained only if
    every run drained, lists joined, other mappings merged; ``runs`` keeps
    each run's summary."""
    keys = dict.fromkeys(key for run in runs for key in run)
    return {key: _fold(key, [run.get(key) for run in runs]) for key in keys} | {"runs": [*runs]}
