"""Point 10: SES answering after 20 ms.

The relay runs back to back with the run's load, one connection per
message: against a fake SES answering at once, then after ``DELAY_MS``; the
pair ``settings.repeat`` times, each side's figures the medians of its runs
(``bench/repeat.py``). Reported: the throughput at the delay over that at
none (same run, the two measured a minute apart at most), and the TLS
handshakes the slow fake SES completed per 100 messages the relay accepted.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from bench.procs import Children
from bench.repeat import folded, interleaved
from bench.scenarios import SCENARIOS, Settings, measure_relay, scenario_load

SCENARIO = SCENARIOS["10k-1rcpt-per-message"]
DELAY_MS = 20.0


def run_slow_ses(settings: Settings, workdir: Path) -> dict[str, Any]:
    load = scenario_load(SCENARIO, settings, workdir)
    with Children() as children:

        def at(delay: float, run: int) -> dict[str, Any]:
            name = f"relay-ses-{delay:g}ms-{run}"
            return measure_relay(children, workdir, name, load, settings, ses_delay_ms=delay)[0]

        thunks = [functools.partial(at, delay) for delay in (0.0, DELAY_MS)]
        fast, slow = (folded(runs) for runs in interleaved(thunks, settings.repeat))
    handshakes = slow["tls_handshakes_per_1000"]
    return {
        "delay_ms": DELAY_MS,
        "at_0ms": fast,
        "at_delay": slow,
        "throughput_ratio": (
            round(slow["msgs_per_s"] / fast["msgs_per_s"], 3)
            if slow["msgs_per_s"] is not None and fast["msgs_per_s"]
            else None
        ),
        "tls_handshakes_per_100": None if handshakes is None else round(handshakes / 10, 3),
    }
