"""``python -m bench``: the relay against a do-nothing SMTP server and
Postfix, same load.

Run from the repository root. Each scenario starts its own processes (the
do-nothing server; a fake SES and the relay; smtp-sink and a private
Postfix; and the load for each) in a temporary directory, and stops them
all and removes the directory at the end, also on ^C, SIGTERM or an error.

Each scenario runs its targets in turn ``--repeat`` times (3 by default:
ceiling, relay, Postfix, ceiling, relay, ...; this machine's speed drifts
within minutes) and reports per target the median of its runs for each
figure (peak RSS: the maximum, ``bench/repeat.py``); the ratios and the
verdicts use those medians, and the JSON keeps every run.

The load is Postfix's ``smtp-source`` when it is installed (it leaves the
cores to the server measured), else the aiosmtplib generator; Postfix is a
target when it is installed and the benchmark runs as root. fsyncs are
counted with ``perf`` when it is installed and allowed.

Besides the throughput scenarios (``--scenario``), the parts (``--part``)
measure what the rest of issue 15's points 6-13 are judged by: ``workers``
(7: the scenarios named, or all, with two workers, ``--repeat`` runs of
each; printed beside the scenarios' targets where they ran), ``latency``
(9, ``bench/paced.py``) and ``ses-delay`` (10, ``bench/slowses.py``), each
comparing two sides run in turn ``--repeat`` times, ``memory`` (11,
``bench/bigmessages.py``), ``startup`` (12, ``bench/startup.py``) and
``rate-limit`` (13, ``bench/ratelimit.py``); ``large`` measures issue 16's
point 4 (30 MB messages through SES API v2, ``bench/bigmessages.py``).
With neither option everything runs; with either, only what is named. The
run ends with the verdict table (``bench/verdict.py``): each check, its
must and stretch, the figure and whether it holds.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import bigmessages, fsyncs, machine, postfix, ratelimit, report, smtpsource, startup
from bench.paced import run_paced
from bench.procs import run_in_temp_dir
from bench.scenarios import LOADS, SCENARIOS, TARGETS, Settings, run_scenario
from bench.slowses import run_slow_ses
from bench.verdict import verdicts
from bench.workers import compared, run_workers

FORMAT = 4
"""The JSON's shape: 2 added per-target summaries (``postfix``), ``ratios``,
``load_generator``, fsyncs and TLS handshakes per 1000; 3 added ``parts``
(by name, with ``_`` for ``-``) and ``verdicts``; what 1 and 2 had is kept.
4 added ``settings.repeat`` and, under each target of a scenario and each
summary of the ``workers``, ``latency`` and ``ses_delay`` parts, ``runs``
(every run's own figures, with its ``error_examples``), the target's figures
becoming the medians of its runs (``bench/repeat.py``); a scenario's ``load``
(per target) and ``ses`` became lists, one entry per run."""
PARTS = ("workers", "latency", "ses-delay", "memory", "startup", "rate-limit", "large")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run this scenario (repeatable; default: all, unless --part is given)",
    )
    parser.add_argument(
        "--part",
        action="append",
        choices=PARTS,
        help="run this part (repeatable; default: all, unless --scenario is given)",
    )
    parser.add_argument(
        "--load",
        choices=("auto", *LOADS),
        default="auto",
        help="the load generator (default: smtp-source when installed, else aiosmtplib)",
    )
    parser.add_argument(
        "--target",
        action="append",
        choices=TARGETS,
        help="load this target (repeatable; default: all; postfix only when installed)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each target, interleaved, whose medians are reported (default: 3)",
    )
    parser.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument(
        "--count", type=int, help="measure this many messages instead of --duration seconds"
    )
    parser.add_argument(
        "--ses-delay-ms", type=float, default=0.0, help="the fake SES answers after this delay"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the relay's queue to drain",
    )
    parser.add_argument(
        "--memory-messages", type=int, default=bigmessages.COUNT, help="memory: concurrent messages"
    )
    parser.add_argument(
        "--memory-size", type=int, default=bigmessages.SIZE, help="memory: bytes per message"
    )
    parser.add_argument(
        "--large-size",
        type=int,
        default=bigmessages.LARGE_SIZE,
        help="large: bytes per message (as many as --memory-messages)",
    )
    parser.add_argument(
        "--rate-window", type=float, default=ratelimit.WINDOW, help="rate-limit: seconds measured"
    )
    parser.add_argument(
        "--startup-count", type=int, default=100_000, help="startup: queued messages"
    )
    parser.add_argument(
        "--startup-runs", type=int, default=3, help="startup: starts of each kind (median)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--tmp-dir", type=Path, help="parent of the temporary directory (holds the spool)"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (logs, spool) and print its path",
    )
    args = parser.parse_args(argv)
    for name in ("repeat", "sessions", "count", "memory_messages", "memory_size", "large_size",
                 "startup_count", "startup_runs"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    if args.duration <= 0 or args.warmup < 0 or args.ses_delay_ms < 0 or args.rate_window <= 0:
        parser.error(
            "--duration and --rate-window must be positive, "
            "--warmup and --ses-delay-ms not negative"
        )
    if args.scenario is None and args.part is None:
        args.scenario, args.part = list(SCENARIOS), list(PARTS)
    args.smtp_source = smtpsource.command()
    if args.load == "auto":
        args.load = "aiosmtplib" if args.smtp_source is None else "smtp-source"
    elif args.load == "smtp-source" and args.smtp_source is None:
        parser.error("--load smtp-source: smtp-source is not installed (Debian: postfix)")
    if args.load == "aiosmtplib":
        args.smtp_source = None
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    settings = Settings(
        sessions=args.sessions,
        warmup=args.warmup,
        duration=args.duration,
        count=args.count,
        ses_delay_ms=args.ses_delay_ms,
        drain_timeout=args.drain_timeout,
        load=args.load,
        smtp_source=args.smtp_source,
        targets=tuple(args.target or TARGETS),
        repeat=args.repeat,
    )
    document: dict[str, Any] = {
        "format": FORMAT,
        "machine": machine.describe(workdir),
        "settings": vars(settings),
        "fsyncs_counted": fsyncs.perf() is not None,
        "postfix": postfix.commands() is not None,
        "scenarios": [],
        "parts": {},
    }
    for name in args.scenario or ():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        result = run_scenario(SCENARIOS[name], settings, workdir / name)
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        document["scenarios"].append(result)
    for name in (part for part in PARTS if part in (args.part or ())):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        directory = workdir / name
        directory.mkdir()
        result = run_part(name, args, settings, directory, document)
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        document["parts"][name.replace("-", "_")] = result
    document["verdicts"] = verdicts(document)
    return document


def _relay_maximum(document: dict[str, Any]) -> float | None:
    """The relay's msg/s, one connection per message, if this run measured it."""
    for scenario in document["scenarios"]:
        if scenario["mode"] == "per-message" and scenario.get("relay") is not None:
            maximum: float | None = scenario["relay"]["msgs_per_s"]
            return maximum
    return None


def run_part(
    name: str, args: argparse.Namespace, settings: Settings, workdir: Path,
    document: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "workers": lambda: run_workers(settings, workdir, args.scenario or list(SCENARIOS)),
        "latency": lambda: run_paced(settings, workdir, _relay_maximum(document)),
        "ses-delay": lambda: run_slow_ses(settings, workdir),
        "memory": lambda: bigmessages.run_big_messages(
            settings, workdir, args.memory_messages, args.memory_size
        ),
        "large": lambda: bigmessages.run_big_messages(
            settings, workdir, args.memory_messages, args.large_size, api="v2"
        ),
        "startup": lambda: startup.run(workdir, args.startup_count, args.startup_runs),
        "rate-limit": lambda: ratelimit.run_rate_limit(settings, workdir, args.rate_window),
    }
    return parts[name]()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tmp_dir is not None:
        args.tmp_dir.mkdir(parents=True, exist_ok=True)
    status, document = run_in_temp_dir(
        "bench",
        "ses-relay-bench-",
        args.tmp_dir,
        args.keep,
        lambda workdir: run(args, workdir),
        mode=0o755,  # Postfix's daemons, as the postfix user, must reach their directories
    )
    if document is None:
        return status
    machine_info = document["machine"]
    print(
        f"{machine_info['cpus']} CPUs, Python {machine_info['python']}, "
        f"spool on {machine_info['spool_file_system']}, "
        f"load average at start {machine_info['load_average_at_start'][0]:.2f}, "
        f"load from {args.load}"
    )
    workers = compared(document)
    if document["scenarios"] or workers:
        print(report.repeat_line(args.repeat))
    if document["scenarios"]:
        print(report.table(document["scenarios"]))
        print()
        print(report.ratio_table(document["scenarios"]))
        print()
    if workers:
        print(report.workers_table(workers))
        print()
        print(report.workers_ratio_table(workers))
        print()
    for note in report.notes(document["scenarios"], workers):
        print(f"note: {note}")
    print(report.verdict_table(document["verdicts"]))
    if args.json is not None:
        report.write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
