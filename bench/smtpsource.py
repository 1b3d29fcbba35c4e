"""The load from Postfix's ``smtp-source``, with a latency probe beside it.

``smtp-source`` (C, one process, a few percent of a core at these rates)
leaves both cores to the server measured, where a generator written in
Python takes most of one. It sends a given number of messages over
``--sessions`` parallel sessions, one connection per message by default
(``-d``: many per connection), each of ``--size`` bytes of payload plus
its few header lines, and reports nothing but its exit status; so:

* throughput is the messages of the measured run over its wall time (plus
  the probe's rate). Without ``--count``, warm-up runs of
  ``sessions * 10`` messages go on for ``--warmup`` seconds (at least one),
  and the measured run sends what the last of them reached in
  ``--duration`` seconds;
* latency (DATA to the final reply) comes from a probe: one more session
  of the aiosmtplib generator (``bench.load``), the same mode, starting a
  message at most every ``PROBE_PACE`` seconds, from the first warm-up run
  to the end of the measured run, so under the same load. It is what one
  of the sessions waits; its messages count in the totals;
* the load's CPU is the generator's, from ``getrusage(RUSAGE_CHILDREN)``
  around each run (the driver reaps no other child meanwhile).

The result has the shape of ``bench.load``'s, plus ``generator`` and the
probe's own result.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from bench.load import RECIPIENT, SENDER
from bench.procs import Child, Children, python_env
from bench.services import READY_TIMEOUT, run_limit

SBIN = "/usr/sbin:/usr/lib/postfix/sbin"
PROBE_PACE = 0.05
"""Seconds between the probe's messages, at most (so at most 20 msg/s)."""
PROBE_BOUND = 3600.0
"""The probe's own window; SIGTERM ends it long before."""


def command() -> str | None:
    return shutil.which("smtp-source") or shutil.which("smtp-source", path=SBIN)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class SmtpSource:
    """Runs of ``smtp-source`` against one port."""

    def __init__(
        self, children: Children, directory: Path, name: str, port: int, *, mode: str,
        sessions: int, size: int,
    ) -> None:  # fmt: skip
        self.children = children
        self.directory = directory
        self.name = name
        self.port = port
        self.mode = mode
        self.sessions = sessions
        self.size = size
        self.runs = 0
        self.sent = 0
        self.errors: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def run(self, smtp_source: str, messages: int, limit: float) -> tuple[float, float]:
        """Send ``messages``; (wall seconds, CPU seconds of smtp-source)."""
        self.runs += 1
        argv = [
            smtp_source, "-s", str(self.sessions), "-l", str(self.size), "-m", str(messages),
            "-f", SENDER, "-t", RECIPIENT, "-M", "loadgen.bench",
            *(["-d"] if self.mode == "persistent" else []), f"127.0.0.1:{self.port}",
        ]  # fmt: skip
        log = self.directory / f"smtp-source-{self.name}-{self.runs}.log"
        cpu_before, started = _children_cpu(), time.perf_counter()
        child = self.children.add(Child(f"smtp-source ({self.name})", argv, log, python_env()))
        try:
            status = child.wait_exit(limit)
        finally:
            self.children.stop(child)
        wall, cpu = time.perf_counter() - started, _children_cpu() - cpu_before
        if status == 0:
            self.sent += messages
        else:
            kind = f"smtp-source exit status {status}"
            self.errors[kind] = self.errors.get(kind, 0) + 1
            self.examples.setdefault(kind, child.log_tail(3)[:200])
        return wall, cpu


def _probe(children: Children, directory: Path, name: str, port: int, mode: str) -> Child:
    out = directory / f"probe-{name}.json"
    args = [
        "-m", "bench.load", "--port", str(port), "--out", str(out), "--mode", mode,
        "--sessions", "1", "--warmup", "0", "--duration", str(PROBE_BOUND),
        "--pace", str(PROBE_PACE),
    ]  # fmt: skip
    log = directory / f"probe-{name}.log"
    child = children.add(Child.python(f"latency probe ({name})", args, log))
    child.wait_for_line(r"sending to ", READY_TIMEOUT)
    return child


def _probe_result(children: Children, probe: Child, directory: Path, name: str) -> dict[str, Any]:
    probe.process.terminate()  # ends its window; it writes its result
    try:
        status = probe.wait_exit(READY_TIMEOUT)
    finally:
        children.stop(probe)
    out = directory / f"probe-{name}.json"
    if status != 0 or not out.exists():
        raise probe.failed("failed")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def run_smtp_source(
    children: Children, smtp_source: str, directory: Path, name: str, port: int, *, mode: str,
    sessions: int, size: int, warmup: float, duration: float, count: int | None,
) -> dict[str, Any]:  # fmt: skip
    """Warm-up runs, the measured run and the probe beside them."""
    source = SmtpSource(children, directory, name, port, mode=mode, sessions=sessions, size=size)
    limit = run_limit(warmup, duration, count)
    probe = _probe(children, directory, name, port, mode)
    rate = None
    warmup_ends = time.monotonic() + warmup
    while count is None or warmup > 0:
        batch = sessions * 10
        wall, _ = source.run(smtp_source, batch, limit)
        rate = batch / wall if wall > 0 else None
        if time.monotonic() >= warmup_ends:
            break
    messages = count if count is not None else max(sessions, math.ceil((rate or 1) * duration))
    wall, cpu = source.run(smtp_source, messages, limit)
    latency = _probe_result(children, probe, directory, name)
    errors = source.errors | latency["errors"]
    measured = source.errors == {}
    return {
        "generator": "smtp-source",
        "mode": mode,
        "sessions": sessions,
        "message_size": size,
        "warmup_runs": source.runs - 1,
        "window_s": round(wall, 3),
        "accepted": messages if measured else None,
        "msgs_per_s": (
            round(messages / wall + (latency["msgs_per_s"] or 0), 1) if measured else None
        ),
        "latency_ms": latency["latency_ms"],
        "total_accepted": source.sent + latency["total_accepted"],
        "queued_replies": latency["queued_replies"],
        "reconnects": latency["reconnects"],
        "errors": errors,
        "error_examples": source.examples | latency["error_examples"],
        "wall_s": round(wall, 3),
        "loadgen_cpu_util": round(cpu / wall, 3) if wall > 0 else None,
        "probe": latency,
    }
