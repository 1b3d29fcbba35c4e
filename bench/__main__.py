"""``python -m bench``: the relay against a do-nothing SMTP server and
Postfix, same load.

Run from the repository root. Each scenario starts its own processes (the
do-nothing server; a fake SES and the relay; smtp-sink and a private
Postfix; and the load for each) in a temporary directory, and stops them
all and removes the directory at the end, also on ^C, SIGTERM or an error.

The load is Postfix's ``smtp-source`` when it is installed (it leaves the
cores to the server measured), else the aiosmtplib generator; Postfix is a
target when it is installed and the benchmark runs as root. fsyncs are
counted with ``perf`` when it is installed and allowed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import fsyncs, machine, postfix, report, smtpsource
from bench.procs import ChildFailed, terminate_as_interrupt
from bench.scenarios import LOADS, SCENARIOS, TARGETS, Settings, run_scenario

FORMAT = 2
"""The JSON's shape: 2 added per-target summaries (``postfix``), ``ratios``,
``load_generator``, fsyncs and TLS handshakes per 1000; what 1 had is kept."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run this scenario (repeatable; default: all)",
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
    for name in ("sessions", "count"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    if args.duration <= 0 or args.warmup < 0 or args.ses_delay_ms < 0:
        parser.error("--duration must be positive, --warmup and --ses-delay-ms not negative")
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
    )
    document: dict[str, Any] = {
        "format": FORMAT,
        "machine": machine.describe(workdir),
        "settings": vars(settings),
        "fsyncs_counted": fsyncs.perf() is not None,
        "postfix": postfix.commands() is not None,
        "scenarios": [],
    }
    for name in args.scenario or list(SCENARIOS):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        result = run_scenario(SCENARIOS[name], settings, workdir / name)
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        document["scenarios"].append(result)
    return document


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tmp_dir is not None:
        args.tmp_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="ses-relay-bench-", dir=args.tmp_dir))
    workdir.chmod(0o755)  # Postfix's daemons, as the postfix user, must reach their directories
    try:
        with terminate_as_interrupt():
            document = run(args, workdir)
    except ChildFailed as failure:
        print(f"bench failed: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    machine_info = document["machine"]
    print(
        f"{machine_info['cpus']} CPUs, Python {machine_info['python']}, "
        f"spool on {machine_info['spool_file_system']}, "
        f"load average at start {machine_info['load_average_at_start'][0]:.2f}, "
        f"load from {args.load}"
    )
    print(report.table(document["scenarios"]))
    print()
    print(report.ratio_table(document["scenarios"]))
    for note in report.notes(document["scenarios"]):
        print(f"note: {note}")
    if args.json is not None:
        report.write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
