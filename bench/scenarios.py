"""The scenarios, and what running one measures.

One scenario runs the same load twice, one server at a time so they never
share the two cores: first against the do-nothing aiosmtpd server (the
ceiling), then against the relay delivering to the fake SES. For the relay
it also reads, from ``/proc``, the CPU time it used from just before the
load until its queue had drained (per 1000 accepted messages) and its peak
RSS, and from the fake SES what was delivered and over how many TLS
connections.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Child, Children
from bench.services import FakeSes, run_load, start_ceiling, start_fake_ses, start_relay

DRAIN_POLL = 0.1
_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) ")


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str
    """``persistent`` (many messages per connection) or ``per-message``."""
    size: int = 10 * 1024
    recipients: int = 1


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("10k-1rcpt-persistent", "persistent"),
        Scenario("10k-1rcpt-per-message", "per-message"),
    )
}


@dataclass(frozen=True)
class Settings:
    sessions: int
    warmup: float
    duration: float
    count: int | None
    ses_delay_ms: float
    drain_timeout: float


def _queued_entries(spool: Path) -> int:
    try:
        return sum(1 for _ in (spool / "queue").glob("*.json"))
    except OSError:
        return -1


def wait_drained(
    spool: Path, ses: FakeSes, accepted: int, timeout: float
) -> tuple[bool, float, dict[str, int]]:
    """Wait until the relay's queue is empty and the fake SES has had at least
    ``accepted`` SendRawEmail calls: (drained, seconds waited, last stats)."""
    start = time.monotonic()
    while True:
        stats = ses.stats()
        drained = _queued_entries(spool) == 0 and stats["send_raw_email"] >= accepted
        waited = time.monotonic() - start
        if drained or waited >= timeout:
            return drained, round(waited, 2), stats
        time.sleep(DRAIN_POLL)


def _per_1000(cpu: float, messages: int) -> float | None:
    return round(cpu / messages * 1000, 3) if messages else None


def _log_problems(child: Child, keep: int = 5) -> tuple[int, list[str]]:
    lines = [line for line in child.log().splitlines() if _PROBLEM.search(line)]
    return len(lines), lines[:keep]


def _summary(load: dict[str, Any], cpu: float) -> dict[str, Any]:
    return {
        "msgs_per_s": load["msgs_per_s"],
        "p50_ms": load["latency_ms"]["p50"],
        "p99_ms": load["latency_ms"]["p99"],
        "accepted_total": load["total_accepted"],
        "errors": load["errors"],
        "cpu_s_per_1000": _per_1000(cpu, load["total_accepted"]),
        "cpu_util_during_load": round(cpu / load["wall_s"], 3) if load["wall_s"] else None,
        "loadgen_cpu_util": load["loadgen_cpu_util"],
    }


def run_scenario(scenario: Scenario, settings: Settings, workdir: Path) -> dict[str, Any]:
    def load(children: Children, name: str, port: int) -> dict[str, Any]:
        return run_load(
            children,
            workdir,
            name,
            port,
            mode=scenario.mode,
            sessions=settings.sessions,
            size=scenario.size,
            warmup=settings.warmup,
            duration=settings.duration,
            count=settings.count,
        )

    with Children() as children:
        ceiling = start_ceiling(children, workdir / "ceiling")
        before = ceiling.child.cpu_seconds()
        ceiling_load = load(children, "ceiling", ceiling.port)
        ceiling_summary = _summary(ceiling_load, ceiling.child.cpu_seconds() - before)
        children.stop(ceiling.child)

        ses = start_fake_ses(children, workdir / "ses", settings.ses_delay_ms)
        relay = start_relay(children, workdir / "relay", ses)
        user_before, system_before = relay.child.cpu_times()
        before = user_before + system_before
        relay_load = load(children, "relay", relay.port)
        during_load = relay.child.cpu_seconds() - before
        drained, drain_s, ses_stats = wait_drained(
            workdir / "relay" / "spool", ses, relay_load["total_accepted"], settings.drain_timeout
        )
        user_after, system_after = relay.child.cpu_times()
        relay_cpu = user_after + system_after - before
        relay_summary = _summary(relay_load, during_load)
        relay_summary["cpu_s_per_1000"] = _per_1000(relay_cpu, relay_load["total_accepted"])
        problems, examples = _log_problems(relay.child)
        relay_summary |= {
            "cpu_system_share": (
                round((system_after - system_before) / relay_cpu, 3) if relay_cpu else None
            ),
            "peak_rss_mb": round(relay.child.peak_rss_mb(), 1),
            "queued_replies": relay_load["queued_replies"],
            "reconnects": relay_load["reconnects"],
            "delivered": ses_stats["send_raw_email"],
            "recipients_delivered": ses_stats["recipients"],
            "drained": drained,
            "drain_s": drain_s,
            "log_warnings_errors": problems,
            "log_examples": examples,
        }

    ratio = None
    if ceiling_summary["msgs_per_s"] and relay_summary["msgs_per_s"] is not None:
        ratio = round(relay_summary["msgs_per_s"] / ceiling_summary["msgs_per_s"], 3)
    return {
        "scenario": scenario.name,
        "mode": scenario.mode,
        "sessions": settings.sessions,
        "message_size": relay_load["message_size"],
        "recipients": scenario.recipients,
        "ses_delay_ms": settings.ses_delay_ms,
        "ceiling": ceiling_summary,
        "relay": relay_summary,
        "ratio": ratio,
        "ses": ses_stats,
        "load": {"ceiling": ceiling_load, "relay": relay_load},
    }
