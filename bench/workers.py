"""Point 7: the relay with ``smtp.workers = 2``.

Runs only where the relay's configuration has ``smtp.workers`` (an older
relay: then the result says "not built" and nothing runs): the relay with
two workers under the load of each throughput scenario asked for (all of
them when none is named). ``compared`` sets each beside the same scenario's
ceiling, one-process relay and Postfix of the same run, where they ran, with
the two workers' msg/s over each of theirs (the table, and point 7's
verdicts). Each is the median of ``--repeat`` runs, the scenarios named
run in turn.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from bench.procs import Children
from bench.repeat import folded, interleaved
from bench.scenarios import SCENARIOS, TARGETS, Settings, measure_relay, scenario_load
from relay.config import SmtpConfig

WORKERS = 2
TARGET = f"relay, {WORKERS} workers"
"""The name of the two workers' row beside the scenario's targets."""


def built() -> bool:
    return "workers" in {f.name for f in fields(SmtpConfig)}


def run_workers(settings: Settings, workdir: Path, names: Sequence[str]) -> dict[str, Any]:
    """Per scenario in ``names``: the relay's summary with ``WORKERS``
    workers, the medians of ``settings.repeat`` runs (the scenarios in turn,
    ``bench/repeat.py``); ``modes`` names each one's mode, ``ses_delay_ms``
    the fake SES's delay."""
    if not built():
        return {"built": False, "workers": WORKERS}
    results: dict[str, Any] = {
        "built": True, "workers": WORKERS, "ses_delay_ms": settings.ses_delay_ms, "modes": {},
    }  # fmt: skip
    with Children() as children:

        def measure(name: str, run: int) -> dict[str, Any]:
            load = scenario_load(SCENARIOS[name], settings, workdir / name)
            summary, _, _ = measure_relay(
                children, workdir / name, f"relay-{run}", load, settings,
                ses_delay_ms=settings.ses_delay_ms, overrides={"smtp": {"workers": WORKERS}},
            )  # fmt: skip
            return summary

        thunks = [functools.partial(measure, name) for name in names]
        for name, runs in zip(names, interleaved(thunks, settings.repeat), strict=True):
            results[name] = folded(runs)
            results["modes"][name] = SCENARIOS[name].mode
    return results


def _ratio(mine: dict[str, Any], theirs: dict[str, Any] | None) -> float | None:
    if theirs is None or mine["msgs_per_s"] is None or not theirs["msgs_per_s"]:
        return None
    ratio: float = round(mine["msgs_per_s"] / theirs["msgs_per_s"], 3)
    return ratio


def compared(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per scenario the workers part measured: its ``scenario``,
    ``mode`` and ``ses_delay_ms``, each target's summary where it ran in this
    run (``TARGETS`` and ``TARGET``), and ``ratios``: the workers' msg/s
    over each target's (None where it did not run)."""
    part = document.get("parts", {}).get("workers")
    if part is None or not part["built"]:
        return []
    ran = {s["scenario"]: s for s in document.get("scenarios", [])}
    entries = []
    for name, mode in part["modes"].items():
        scenario, mine = ran.get(name, {}), part[name]
        targets = {target: scenario.get(target) for target in TARGETS}
        entries.append(
            {
                "scenario": name,
                "mode": mode,
                "ses_delay_ms": part["ses_delay_ms"],
                **targets,
                TARGET: mine,
                "ratios": {target: _ratio(mine, targets[target]) for target in TARGETS},
            }
        )
    return entries
