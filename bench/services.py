"""How the driver starts each process of the benchmark, and talks to it.

Every start registers the new process with the caller's ``Children`` at
once (so it is stopped whatever happens next), waits (bounded) for the line
the process logs when it is ready, and returns what the driver needs to
reach it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench.fsyncs import FsyncCounter
from bench.fsyncs import counter as fsyncs_counter
from bench.procs import (
    STOP_TIMEOUT,
    Child,
    ChildFailed,
    Children,
    ProcessTree,
    only_child,
    python_env,
)

PYTHON_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) ")
"""A warning or error in the relay's (or the ceiling's) log."""
READY_TIMEOUT = 30.0
"""Seconds any process may take to say it is ready."""
_ADDRESS = r"on 127\.0\.0\.1:(\d+)"
MAX_SEND_RATE = 100000.0
MESSAGES_PER_SESSION = 1_000_000
"""Recipients per second the relay may send: far above anything reached here."""
DUMMY_ACCESS_KEY = "AKIABENCHFAKE0000000"
DUMMY_SECRET_KEY = "benchSecretKeyNotChecked/bench0000000000"  # noqa: S105 - a dummy the fake never checks


@dataclass
class FakeSes:
    child: Child
    url: str
    stats_url: str
    ca_pem: Path

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.stats_url, timeout=5) as answer:  # noqa: S310 - our URL
            stats: dict[str, Any] = json.load(answer)
        return stats


class Downstream(Protocol):
    """Where a target delivers, as far as the driver needs to know."""

    def delivered(self) -> int:
        """Messages delivered so far."""

    def queue_empty(self) -> bool:
        """Nothing left in the target's queue."""


@dataclass
class Server:
    """A target under load: the command started (the server, or ``perf
    stat`` around it), its SMTP port, its processes, its fsync counter (None
    without ``perf``), where it delivers, and the log whose lines matching
    ``problem`` are warnings or errors."""

    child: Child
    port: int
    tree: ProcessTree
    fsyncs: FsyncCounter | None
    downstream: Downstream | None = None
    log: Path | None = None
    problem: re.Pattern[str] = PYTHON_PROBLEM

    def problems(self, keep: int = 5) -> tuple[int, list[str]]:
        """How many warnings or errors it logged, and the first few."""
        try:
            text = (self.log or self.child.log_path).read_text(errors="replace")
        except OSError:
            return 0, []
        lines = [line for line in text.splitlines() if self.problem.search(line)]
        return len(lines), lines[:keep]

    def stop(self) -> None:
        """SIGTERM to the server itself (``perf stat`` then sees it exit and
        writes its count), then to the command. Never raises."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.tree.root, signal.SIGTERM)
        with contextlib.suppress(ChildFailed):
            self.child.wait_exit(STOP_TIMEOUT)
        self.child.stop()
        if self.fsyncs is not None:
            self.fsyncs.close()

    def fsyncs_counted(self) -> int | None:
        """Once stopped: the fsyncs counted while enabled (None without perf)."""
        if self.fsyncs is None:
            return None
        try:
            return self.fsyncs.count()
        except (OSError, ValueError):
            return None


def launch(
    children: Children, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str]
) -> tuple[Child, FsyncCounter | None]:
    """Start ``argv`` under ``perf stat`` when it can count fsyncs, else as is."""
    fsyncs = fsyncs_counter(log.with_suffix(".fsyncs.csv"))
    if fsyncs is None:
        return children.add(Child(name, argv, log, env)), None
    child = children.add(Child(name, fsyncs.wrap(argv), log, env, fsyncs.pass_fds))
    fsyncs.started()
    return child, fsyncs


def server_root(child: Child, fsyncs: FsyncCounter | None) -> ProcessTree:
    """The server's own process: the child, or perf stat's only child."""
    return ProcessTree(child.pid if fsyncs is None else only_child(child.pid))


def start_fake_ses(
    children: Children,
    directory: Path,
    delay_ms: float,
    *,
    max_rate: float = 0.0,
    digests: bool = False,
) -> FakeSes:
    """``python -m bench.fakeses`` (see there for ``max_rate`` and ``digests``)."""
    directory.mkdir(parents=True, exist_ok=True)
    args = ["-m", "bench.fakeses", "--dir", str(directory), "--delay-ms", str(delay_ms)]
    args += ["--max-rate", str(max_rate), *(["--digests"] if digests else [])]
    child = children.add(Child.python("fake SES", args, directory / "fakeses.log"))
    ses_port = child.wait_for_line(r"ses " + _ADDRESS, READY_TIMEOUT)[1]
    stats_port = child.wait_for_line(r"stats " + _ADDRESS, READY_TIMEOUT)[1]
    return FakeSes(
        child=child,
        url=f"https://127.0.0.1:{ses_port}",
        stats_url=f"http://127.0.0.1:{stats_port}/stats",
        ca_pem=directory / "ca.pem",
    )


def start_ceiling(children: Children, directory: Path) -> Server:
    directory.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "bench.ceiling"]
    child, fsyncs = launch(children, "ceiling", argv, directory / "ceiling.log", python_env())
    port = int(child.wait_for_line(r"listening " + _ADDRESS, READY_TIMEOUT)[1])
    return children.add(Server(child, port, server_root(child, fsyncs), fsyncs))


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


Overrides = Mapping[str, Mapping[str, Any]]
"""Settings of the relay's TOML by section, over ``relay_config``'s."""


def relay_config(directory: Path, ses: FakeSes, overrides: Overrides | None = None) -> Path:
    """The relay's TOML: SMTP on a free port without a limit of messages per
    session, the spool (fsync on, as always) under ``directory``, SES at the
    fake with an explicit sending rate (so no GetSendQuota call), then
    ``overrides``; everything else at its default."""
    sections: dict[str, dict[str, Any]] = {
        # A persistent session of the load sends more messages than the default
        # max_messages_per_session (1000) allows; the ceiling and Postfix have no
        # such limit.
        "smtp": {
            "listen": ["127.0.0.1:0"],
            "hostname": "relay.bench",
            "max_messages_per_session": MESSAGES_PER_SESSION,
        },
        "ses": {
            "endpoint": ses.url,
            "ca_bundle": str(ses.ca_pem),
            "region": "us-east-1",
            "max_send_rate": MAX_SEND_RATE,
        },
        "spool": {"path": str(directory / "spool")},
        "metrics": {"listen": "127.0.0.1:0"},
    }
    for section, values in (overrides or {}).items():
        sections[section] = sections.get(section, {}) | dict(values)
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
    path = directory / "relay.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def relay_env() -> dict[str, str]:
    """This environment without AWS or ses-relay settings, with dummy keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SES_RELAY_"))}
    env |= {
        "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return python_env(env)


def start_relay(
    children: Children, directory: Path, ses: FakeSes, overrides: Overrides | None = None
) -> Server:
    """``python -m relay serve -c CONFIG``; ready once it logs ``listening on``
    and ``ses-relay ready``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = relay_config(directory, ses, overrides)
    argv = [sys.executable, "-m", "relay", "serve", "-c", str(config)]
    child, fsyncs = launch(children, "relay", argv, directory / "relay.log", relay_env())
    port = int(child.wait_for_line(r"listening " + _ADDRESS, READY_TIMEOUT)[1])
    child.wait_for_line(r"ses-relay ready", READY_TIMEOUT)
    spool = directory / "spool"
    server = Server(child, port, server_root(child, fsyncs), fsyncs, RelayDownstream(spool, ses))
    return children.add(server)


@dataclass
class RelayDownstream:
    """The relay delivers to the fake SES; its queue is the spool's."""

    spool: Path
    ses: FakeSes

    def delivered(self) -> int:
        delivered: int = self.ses.stats()["send_raw_email"]
        return delivered

    def queue_empty(self) -> bool:
        """No entry queued, in the spool or a worker's partition (``smtp.workers``)."""
        try:
            return not any(self.spool.glob("queue/*.json")) and not any(
                self.spool.glob("worker-*/queue/*.json")
            )
        except OSError:
            return False


def run_limit(warmup: float, duration: float, count: int | None) -> float:
    """Seconds a load generator's run may take: it bounds itself, this bounds it."""
    return warmup + (duration if count is None else 120.0) + 90.0


def run_load(
    children: Children,
    directory: Path,
    name: str,
    port: int,
    *,
    mode: str,
    sessions: int,
    size: int,
    warmup: float,
    duration: float,
    count: int | None,
    more: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the load generator against ``port`` to its end, with ``more`` of
    its options (see ``bench/load.py``); its JSON result."""
    out = directory / f"load-{name}.json"
    options = {
        "--port": port,
        "--out": out,
        "--mode": mode,
        "--sessions": sessions,
        "--size": size,
        "--warmup": warmup,
        "--duration": duration,
    }
    if count is not None:
        options["--count"] = count
    args = ["-m", "bench.load", *(s for pair in options.items() for s in map(str, pair)), *more]
    log = directory / f"load-{name}.log"
    child = children.add(Child.python(f"load generator ({name})", args, log))
    try:
        status = child.wait_exit(run_limit(warmup, duration, count))
    finally:
        children.stop(child)
    if status != 0 or not out.exists():
        raise child.failed("failed")
    result: dict[str, Any] = json.loads(out.read_text())
    return result
