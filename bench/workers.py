"""Point 7: the relay with ``smtp.workers = 2``.

Runs only where the relay's configuration has ``smtp.workers`` (an older
relay: then the result says "not built" and nothing runs): the relay with
two workers under each throughput scenario's load, its msg/s over the same
scenario's ceiling and Postfix figures of this run.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from bench.procs import Children
from bench.scenarios import SCENARIOS, Settings, measure_relay, scenario_load
from relay.config import SmtpConfig

WORKERS = 2


def built() -> bool:
    return "workers" in {f.name for f in fields(SmtpConfig)}


def run_workers(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Per scenario: the relay's summary with ``WORKERS`` workers."""
    if not built():
        return {"built": False, "workers": WORKERS}
    results: dict[str, Any] = {"built": True, "workers": WORKERS}
    with Children() as children:
        for name, scenario in SCENARIOS.items():
            load = scenario_load(scenario, settings, workdir / name)
            results[name], _, _ = measure_relay(
                children, workdir / name, "relay", load, settings,
                ses_delay_ms=settings.ses_delay_ms, overrides={"smtp": {"workers": WORKERS}},
            )  # fmt: skip
    return results
