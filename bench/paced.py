"""Point 9: latency with the load paced at half the relay's maximum.

The maximum is the relay's msg/s in this run's one-connection-per-message
scenario (or, when that scenario is not run, a measurement of its own with
the same load). The paced load is the aiosmtplib generator (``smtp-source``
cannot pace), one connection per message, ``sessions`` sessions each
starting a message every ``sessions / (SHARE * maximum)`` seconds, spread
evenly; the ceiling and then the relay get the same pace, the pair
``settings.repeat`` times, and the medians of their p99 DATA-to-reply
latencies are compared (``bench/repeat.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.procs import Children
from bench.repeat import folded, interleaved
from bench.scenarios import SCENARIOS, Settings, measure, measure_relay, scenario_load
from bench.services import run_load, start_ceiling

SCENARIO = SCENARIOS["10k-1rcpt-per-message"]
SHARE = 0.5
"""The paced load's share of the relay's maximum."""


def run_paced(settings: Settings, workdir: Path, maximum: float | None) -> dict[str, Any]:
    """The ceiling and the relay at ``SHARE`` of ``maximum`` msg/s (measured
    first when None, once): each one's summary (medians of its runs), and
    the p99 difference."""
    measured_here = maximum is None
    with Children() as children:
        if maximum is None:
            load = scenario_load(SCENARIO, settings, workdir)
            summary, _, _ = measure_relay(
                children, workdir, "relay-maximum", load, settings, ses_delay_ms=0.0
            )
            maximum = summary["msgs_per_s"]
        if not maximum:
            return {"maximum_msgs_per_s": maximum, "measured_here": measured_here}
        pace = settings.sessions / (maximum * SHARE)

        def paced(children: Children, name: str, port: int) -> dict[str, Any]:
            directory = workdir / name
            directory.mkdir(parents=True, exist_ok=True)
            return run_load(
                children, directory, name, port, mode=SCENARIO.mode, sessions=settings.sessions,
                size=SCENARIO.size, warmup=settings.warmup, duration=settings.duration,
                count=settings.count, more=["--pace", f"{pace:.6f}"],
            )  # fmt: skip

        def ceiling(run: int) -> dict[str, Any]:
            server = start_ceiling(children, workdir / f"ceiling-{run}")
            return measure(children, server, f"ceiling-{run}", paced, settings.drain_timeout)[0]

        def relay(run: int) -> dict[str, Any]:
            return measure_relay(
                children, workdir, f"relay-{run}", paced, settings, ses_delay_ms=0.0
            )[0]

        ceiling_runs, relay_runs = interleaved([ceiling, relay], settings.repeat)
    ceiling_summary, relay_summary = folded(ceiling_runs), folded(relay_runs)
    p99s = ceiling_summary["p99_ms"], relay_summary["p99_ms"]
    return {
        "maximum_msgs_per_s": maximum,
        "measured_here": measured_here,
        "paced_msgs_per_s": round(maximum * SHARE, 1),
        "pace_s_per_session": round(pace, 4),
        "ceiling": ceiling_summary,
        "relay": relay_summary,
        "p99_over_ceiling_ms": None if None in p99s else round(p99s[1] - p99s[0], 3),
    }
