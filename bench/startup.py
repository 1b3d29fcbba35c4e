"""``python -m bench.startup``: how fast the relay is ready over a full queue,
and what each queued message costs it in memory.

Fills a spool with ``--count`` small entries written by ``Spool.put``
itself (fsync made a no-op for the fill only: the files are the same, and
``os.sync`` flushes them before anything is timed), each waiting for a
retry an hour from now, so nothing is delivered while it is measured. Then
starts ``ses-relay serve`` (against the benchmark's fake SES) over an empty
spool and over the full one, and reports for each the seconds from exec to
the SMTP banner and to ``/readyz`` answering 200, its ``VmRSS`` when ready
and once it has gone idle (its CPU time stopped growing), and the
difference per queued message. The page cache is warm (the fill just
wrote the files): a cold start reads them from the disk too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

from bench.procs import Child, ChildFailed, Children, ProcessTree, run_in_temp_dir
from bench.services import relay_config, relay_env, start_fake_ses
from relay.queueid import new_id
from relay.spool import Batch, Entry, Spool

MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: queued\r\n\r\nHello.\r\n"
READY_TIMEOUT = 120.0
"""Seconds the relay may take to be ready over the full queue."""
IDLE_TIMEOUT = 180.0
"""Seconds it may take afterwards to go idle."""
IDLE_SPAN = 1.0
"""Seconds without CPU time that count as idle."""
_POLL = 0.005
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_METRICS = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/")


@dataclass
class Start:
    """One start of the relay."""

    queued: int
    banner_s: float
    ready_s: float
    rss_ready_kib: int
    rss_idle_kib: int
    idle_s: float


def fill(spool_path: Path, count: int) -> float:
    """Queue ``count`` entries with the spool's own ``put``; seconds taken."""
    started = time.monotonic()
    spool = Spool(spool_path)
    spool.open()
    retry_at = time.time() + 3600
    try:
        with mock.patch.object(os, "fsync", return_value=None):
            for _ in range(count):
                entry = Entry(
                    id=new_id(),
                    received=time.time(),
                    client="127.0.0.1",
                    sender="a@example.com",
                    source="a@example.com",
                    recipients=("b@example.com",),
                    batches=(Batch(("b@example.com",)),),
                    attempts=1,
                    next_attempt=retry_at,
                    history=("451 4.4.5 Maximum sending rate exceeded",),
                )
                spool.put(entry, MESSAGE)
    finally:
        spool.close()
    os.sync()
    return time.monotonic() - started


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ChildFailed(f"no VmRSS for process {pid}")


def _banner(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
        s.settimeout(READY_TIMEOUT)
        return s.recv(512).startswith(b"220")
    return False


def _ready(port: int) -> bool:
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=READY_TIMEOUT) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _polls(child: Child, timeout: float, what: str) -> Iterator[float]:
    """Seconds since ``child`` started, every few ms, until ``timeout``."""
    began = time.monotonic()
    while (elapsed := time.monotonic() - began) < timeout:
        if child.process.poll() is not None:
            raise child.failed(f"exited before {what}")
        yield elapsed
        time.sleep(_POLL)
    raise child.failed(f"not {what} within {timeout:g}s")


def _wait_idle(child: Child) -> float:
    """Seconds until the relay's CPU time stops growing for ``IDLE_SPAN``."""
    tree = ProcessTree(child.pid)
    began = time.monotonic()
    last, since = sum(tree.cpu_times()), time.monotonic()
    for _ in _polls(child, IDLE_TIMEOUT, "idle"):
        cpu = sum(tree.cpu_times())
        if cpu != last:
            last, since = cpu, time.monotonic()
        elif time.monotonic() - since >= IDLE_SPAN:
            return since - began
    raise AssertionError("unreachable")  # pragma: no cover - _polls raises


def start(children: Children, directory: Path, config: Path, queued: int) -> Start:
    """Start the relay once, measure, stop it."""
    argv = [sys.executable, "-m", "relay", "serve", "-c", str(config)]
    began = time.monotonic()
    child = children.add(Child("relay", argv, directory / f"relay-{queued}.log", relay_env()))
    smtp_port = metrics_port = None
    banner_s = ready_s = None
    for _ in _polls(child, READY_TIMEOUT, "ready"):
        log = child.log()
        if smtp_port is None and (found := _LISTENING.search(log)):
            smtp_port = int(found[1])
        if metrics_port is None and (found := _METRICS.search(log)):
            metrics_port = int(found[1])
        if banner_s is None and smtp_port is not None and _banner(smtp_port):
            banner_s = time.monotonic() - began
        if ready_s is None and metrics_port is not None and _ready(metrics_port):
            ready_s = time.monotonic() - began
        if banner_s is not None and ready_s is not None:
            break
    assert banner_s is not None
    assert ready_s is not None
    rss_ready = _rss_kib(child.pid)
    idle_s = _wait_idle(child)
    rss_idle = _rss_kib(child.pid)
    children.stop(child)
    return Start(
        queued, round(banner_s, 3), round(ready_s, 3), rss_ready, rss_idle, round(idle_s, 2)
    )


def _per_message(loaded_kib: int, base_kib: int, count: int) -> int:
    return round((loaded_kib - base_kib) * 1024 / count)


def run(workdir: Path, count: int, runs: int) -> dict[str, object]:
    with Children() as children:
        ses = start_fake_ses(children, workdir / "ses", 0.0)
        empty_dir, full_dir = workdir / "empty", workdir / "full"
        empty_dir.mkdir()
        full_dir.mkdir()
        empty_config = relay_config(empty_dir, ses)
        full_config = relay_config(full_dir, ses)
        print(f"filling a spool with {count} entries ...", file=sys.stderr, flush=True)
        fill_s = fill(full_dir / "spool", count)
        starts: list[Start] = []
        for _ in range(runs):  # interleaved: both see the same machine
            starts.append(start(children, empty_dir, empty_config, 0))
            starts.append(start(children, full_dir, full_config, count))
    empty = sorted((s for s in starts if s.queued == 0), key=lambda s: s.ready_s)
    full = sorted((s for s in starts if s.queued), key=lambda s: s.ready_s)
    base, loaded = empty[len(empty) // 2], full[len(full) // 2]
    return {
        "count": count,
        "fill_s": round(fill_s, 1),
        "starts": [asdict(s) for s in starts],
        "median_ready_s": loaded.ready_s,
        "median_banner_s": loaded.banner_s,
        "empty_ready_s": base.ready_s,
        "bytes_per_message_ready": _per_message(loaded.rss_ready_kib, base.rss_ready_kib, count),
        "bytes_per_message_idle": _per_message(loaded.rss_idle_kib, base.rss_idle_kib, count),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--count", type=int, default=100_000, help="queued messages")
    parser.add_argument("--runs", type=int, default=3, help="starts of each kind (median)")
    parser.add_argument("--tmp-dir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.count < 1 or args.runs < 1:
        parser.error("--count and --runs must be at least 1")
    status, result = run_in_temp_dir(
        "bench.startup",
        "ses-relay-startup-",
        args.tmp_dir,
        args.keep,
        lambda workdir: run(workdir, args.count, args.runs),
    )
    if result is None:
        return status
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
