"""The scenarios, and what running one measures.

One scenario runs the same load against each target in turn, one at a time
so they never share the two cores: the do-nothing aiosmtpd server (the
ceiling), the relay delivering to the fake SES, and Postfix relaying to
``smtp-sink`` (when installed; see ``bench/postfix.py``); the round is
repeated ``Settings.repeat`` times, interleaved (ceiling, relay, Postfix,
ceiling, ...), each run with fresh processes. For each run of each target
it reads, from just before the load until its queue has drained:

* CPU seconds of the target's processes (``/proc``; Postfix's master and
  every daemon it ran), per 1000 accepted messages;
* peak RSS (``VmHWM``; for Postfix the sum over its processes);
* fsync and fdatasync calls per 1000 accepted messages (``perf stat``, see
  ``bench/fsyncs.py``; None without perf);
* TLS handshakes at the fake SES per 1000 accepted messages (the relay);
* what was delivered downstream, and whether the queue drained.

Each target's figures are the medians of its runs (peak RSS their maximum;
``bench/repeat.py``), each run's kept under ``runs``. The ratios compare
those medians' throughput and CPU per message between the targets.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import postfix
from bench.procs import Children
from bench.repeat import folded, interleaved
from bench.services import (
    Downstream,
    Overrides,
    Server,
    run_load,
    start_ceiling,
    start_fake_ses,
    start_relay,
)
from bench.smtpsource import run_smtp_source

DRAIN_POLL = 0.1
TARGETS = ("ceiling", "relay", "postfix")
LOADS = ("smtp-source", "aiosmtplib")


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
    load: str = "aiosmtplib"
    """``smtp-source`` or ``aiosmtplib``."""
    smtp_source: str | None = None
    targets: tuple[str, ...] = ("ceiling", "relay")
    repeat: int = 1
    """Runs of each target, interleaved (``bench/repeat.py``)."""


def wait_drained(downstream: Downstream, accepted: int, timeout: float) -> tuple[bool, float, int]:
    """Wait until the target's queue is empty and at least ``accepted``
    messages were delivered: (drained, seconds waited, delivered)."""
    start = time.monotonic()
    while True:
        delivered = downstream.delivered()
        drained = downstream.queue_empty() and delivered >= accepted
        waited = time.monotonic() - start
        if drained or waited >= timeout:
            return drained, round(waited, 2), delivered
        time.sleep(DRAIN_POLL)


def _per_1000(value: float | None, messages: int) -> float | None:
    return round(value / messages * 1000, 3) if messages and value is not None else None


Load = Callable[[Children, str, int], dict[str, Any]]


def measure(
    children: Children, server: Server, name: str, load: Load, drain_timeout: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``server``, wait for its queue to drain, stop it: (summary, load)."""
    user_before, system_before = server.tree.cpu_times()
    if server.fsyncs is not None:
        server.fsyncs.enable()
    result = load(children, name, server.port)
    during_load = sum(server.tree.cpu_times()) - user_before - system_before
    accepted = result["total_accepted"]
    drained, drain_s, delivered = True, 0.0, None
    if server.downstream is not None:
        drained, drain_s, delivered = wait_drained(server.downstream, accepted, drain_timeout)
    user_after, system_after = server.tree.cpu_times()
    problems = server.problems()
    peak_rss = server.tree.peak_rss_mb()
    if server.fsyncs is not None:
        server.fsyncs.disable()
    children.stop(server)
    fsyncs = server.fsyncs_counted()
    cpu = user_after + system_after - user_before - system_before
    summary = {
        "msgs_per_s": result["msgs_per_s"],
        "p50_ms": result["latency_ms"]["p50"],
        "p99_ms": result["latency_ms"]["p99"],
        "accepted_total": accepted,
        "errors": result["errors"],
        "error_examples": result["error_examples"],
        "cpu_s_per_1000": _per_1000(cpu, accepted),
        "cpu_util_during_load": (
            round(during_load / result["wall_s"], 3) if result["wall_s"] else None
        ),
        "cpu_system_share": round((system_after - system_before) / cpu, 3) if cpu else None,
        "loadgen_cpu_util": result["loadgen_cpu_util"],
        "peak_rss_mb": round(peak_rss, 1),
        "fsyncs_per_1000": _per_1000(fsyncs, accepted),
        "tls_handshakes_per_1000": None,
        "queued_replies": result["queued_replies"],
        "reconnects": result["reconnects"],
        "delivered": delivered,
        "drained": drained,
        "drain_s": drain_s,
    }
    summary["log_warnings_errors"], summary["log_examples"] = problems
    return summary, result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(targets: dict[str, dict[str, Any] | None]) -> dict[str, float | None]:
    """Throughput and CPU per message of one target over another's."""
    found: dict[str, float | None] = {}
    for a, b in (("relay", "ceiling"), ("relay", "postfix"), ("postfix", "ceiling")):
        first, second = targets.get(a), targets.get(b)
        if first is None or second is None:
            continue
        found[f"{a}/{b} msg/s"] = _ratio(first["msgs_per_s"], second["msgs_per_s"])
        found[f"{a}/{b} CPU per msg"] = _ratio(first["cpu_s_per_1000"], second["cpu_s_per_1000"])
    return found


def scenario_load(scenario: Scenario, settings: Settings, workdir: Path) -> Load:
    """The scenario's load, from the generator the settings name."""

    def load(children: Children, name: str, port: int) -> dict[str, Any]:
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        common: dict[str, Any] = {
            "mode": scenario.mode,
            "sessions": settings.sessions,
            "size": scenario.size,
            "warmup": settings.warmup,
            "duration": settings.duration,
            "count": settings.count,
        }
        if settings.smtp_source is not None:
            return run_smtp_source(children, settings.smtp_source, directory, name, port, **common)
        return run_load(children, directory, name, port, **common)

    return load


def measure_relay(
    children: Children,
    workdir: Path,
    name: str,
    load: Load,
    settings: Settings,
    *,
    ses_delay_ms: float,
    overrides: Overrides | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A fake SES and the relay (``overrides`` on its TOML), loaded, drained
    and stopped: (summary with the TLS handshakes, load, the fake SES's stats)."""
    ses = start_fake_ses(children, workdir / f"{name}-ses", ses_delay_ms)
    relay = start_relay(children, workdir / name, ses, overrides)
    summary, result = measure(children, relay, name, load, settings.drain_timeout)
    ses_stats = ses.stats()
    children.stop(ses.child)
    handshakes = _per_1000(ses_stats["tls_handshakes"], summary["accepted_total"])
    summary |= {
        "tls_handshakes_per_1000": handshakes,
        "recipients_delivered": ses_stats["recipients"],
    }
    return summary, result, ses_stats


Run = tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]
"""One run of one target: its summary, its load's result, the fake SES's
stats (the relay's; None for the others)."""


def run_scenario(scenario: Scenario, settings: Settings, workdir: Path) -> dict[str, Any]:
    """Each target in ``settings.targets`` under the scenario's load, the
    targets in turn ``settings.repeat`` times, each run with processes and
    directories of its own: per target the medians of its runs
    (``bench.repeat.folded``), and the ratios between those."""
    load = scenario_load(scenario, settings, workdir)
    commands = postfix.commands()
    with Children() as children:
        starts: dict[str, Callable[[int], Server]] = {
            "ceiling": lambda run: start_ceiling(children, workdir / f"ceiling-{run}")
        }
        if commands is not None:
            postfix_commands = commands
            # Short: Postfix's Unix sockets live under it.
            starts["postfix"] = lambda run: postfix.start_postfix(
                children, workdir.parent / f"postfix-{scenario.mode}-{run}", *postfix_commands
            )

        def measure_target(target: str, run: int) -> Run:
            name = f"{target}-{run}"
            if target == "relay":
                delay = settings.ses_delay_ms
                return measure_relay(children, workdir, name, load, settings, ses_delay_ms=delay)
            return *measure(children, starts[target](run), name, load, settings.drain_timeout), None

        names = [t for t in TARGETS if t in settings.targets and (t == "relay" or t in starts)]
        thunks = [functools.partial(measure_target, name) for name in names]
        runs = dict(zip(names, interleaved(thunks, settings.repeat), strict=True))
    targets: dict[str, dict[str, Any] | None] = dict.fromkeys(TARGETS)
    for name, results in runs.items():
        targets[name] = folded([summary for summary, _, _ in results])
    loads = {name: [result for _, result, _ in results] for name, results in runs.items()}
    relay_load = (loads.get("relay") or next(iter(loads.values())))[0]
    ratio_table = ratios(targets)
    return {
        "scenario": scenario.name,
        "mode": scenario.mode,
        "sessions": settings.sessions,
        "message_size": relay_load["message_size"],
        "recipients": scenario.recipients,
        "ses_delay_ms": settings.ses_delay_ms,
        "load_generator": settings.load,
        **targets,
        "ratio": ratio_table.get("relay/ceiling msg/s"),
        "ratios": ratio_table,
        "ses": [ses for _, _, ses in runs["relay"]] if "relay" in runs else None,
        "load": loads,
    }
