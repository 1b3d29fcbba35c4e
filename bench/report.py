"""The results as tables (stdout) and as JSON (``--json FILE``)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.scenarios import TARGETS
from bench.workers import TARGET, WORKERS

COLUMNS = (
    "scenario",
    "target",
    "msg/s",
    "p50/p99 ms",
    "CPU s/1000",
    "peak RSS MB",
    "fsyncs/1000",
    "TLS hs/1000",
    "delivered/accepted",
    "errors",
)
RATIOS = (
    "relay/ceiling msg/s",
    "relay/postfix msg/s",
    "postfix/ceiling msg/s",
    "relay/ceiling CPU per msg",
    "relay/postfix CPU per msg",
)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _targets(result: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name in TARGETS:
        if result.get(name) is not None:
            yield name, result[name]


def _name(result: dict[str, Any]) -> str:
    delay = f" (SES +{result['ses_delay_ms']:g} ms)" if result["ses_delay_ms"] else ""
    return f"{result['scenario']}{delay}"


def row(result: dict[str, Any], target: str, summary: dict[str, Any]) -> list[str]:
    drained = "" if summary["drained"] else " (not drained)"
    delivered = "-" if summary["delivered"] is None else str(summary["delivered"])
    return [
        _name(result),
        target,
        _num(summary["msgs_per_s"]),
        f"{_num(summary['p50_ms'])} / {_num(summary['p99_ms'])}",
        _num(summary["cpu_s_per_1000"], 2),
        _num(summary["peak_rss_mb"]),
        _num(summary.get("fsyncs_per_1000")),
        _num(summary.get("tls_handshakes_per_1000"), 2),
        f"{delivered}/{summary['accepted_total']}{drained}",
        str(sum(summary["errors"].values())),
    ]


def _markdown(header: Sequence[str], rows: Sequence[list[str]]) -> str:
    everything = [list(header), *rows]
    widths = [max(len(r[i]) for r in everything) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(everything[0]), rule, *(line(r) for r in everything[1:])])


def table(results: Sequence[dict[str, Any]]) -> str:
    """One row per scenario and target."""
    return _markdown(COLUMNS, [row(r, t, s) for r in results for t, s in _targets(r)])


def ratio_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per scenario: each target's throughput and CPU per message
    over another's."""
    rows = [[_name(r), *(_num(r.get("ratios", {}).get(k), 2) for k in RATIOS)] for r in results]
    return _markdown(("scenario", *RATIOS), rows)


WORKERS_COLUMNS = COLUMNS[:6] + COLUMNS[8:]
WORKERS_RATIOS = tuple(f"{WORKERS} workers/{target} msg/s" for target in TARGETS)


def workers_table(entries: Sequence[dict[str, Any]]) -> str:
    """Point 7: per scenario, the relay with workers beside the ceiling, the
    one-process relay and Postfix where they ran (``bench.workers.compared``)."""
    order = ("ceiling", "relay", TARGET, "postfix")
    rows = [
        row(entry, target, entry[target])
        for entry in entries
        for target in order
        if entry[target] is not None
    ]
    keep = [COLUMNS.index(column) for column in WORKERS_COLUMNS]
    return _markdown(WORKERS_COLUMNS, [[cells[i] for i in keep] for cells in rows])


def workers_ratio_table(entries: Sequence[dict[str, Any]]) -> str:
    """Point 7: the workers' msg/s over each target's ("-" where it did not run)."""
    rows = [[_name(e), *(_num(e["ratios"][t], 2) for t in TARGETS)] for e in entries]
    return _markdown(("scenario", *WORKERS_RATIOS), rows)


def repeat_line(repeat: int) -> str:
    """Says what the tables' figures are (``bench/repeat.py``)."""
    if repeat == 1:
        return "each figure from one run per target"
    return (
        f"each figure the median of {repeat} interleaved runs per target (peak RSS: the "
        "maximum; delivered/accepted and errors: added up over the runs)"
    )


def notes(results: Sequence[dict[str, Any]], workers: Sequence[dict[str, Any]] = ()) -> list[str]:
    """What a reader should not miss, in any run: errors, undrained queues,
    log warnings, a load generator that may have been the limit; for the
    scenarios' targets and for the workers part's rows
    (``bench.workers.compared``)."""
    found: list[str] = []
    for result in results:
        for side, summary in _targets(result):
            found += _runs_notes(result["scenario"], side, summary)
    for entry in workers:
        found += _runs_notes(entry["scenario"], TARGET, entry[TARGET])
    return found


def _runs_notes(name: str, side: str, summary: dict[str, Any]) -> list[str]:
    """The notes on each run folded into ``summary`` (on ``summary`` itself
    when it holds no runs), named by run when there were several."""
    runs = summary.get("runs") or [summary]
    found: list[str] = []
    for number, run in enumerate(runs, 1):
        label = f"{name} (run {number} of {len(runs)})" if len(runs) > 1 else name
        found += _summary_notes(label, side, run)
    return found


def _summary_notes(name: str, side: str, summary: dict[str, Any]) -> list[str]:
    found: list[str] = []
    if summary["errors"]:
        examples = list(summary.get("error_examples", {}).values())
        found.append(f"{name}: {side} errors {summary['errors']}, e.g. {examples}")
    if (summary["loadgen_cpu_util"] or 0) > 0.9:
        found.append(
            f"{name}: the load generator was busy "
            f"{summary['loadgen_cpu_util']:.0%} against the {side}: "
            "it may have been the limit"
        )
    if not summary["drained"]:
        found.append(f"{name}: the {side}'s queue had not drained after {summary['drain_s']} s")
    if summary["reconnects"]:
        found.append(
            f"{name}: the {side} ended {summary['reconnects']} persistent sessions "
            "(e.g. smtp.max_messages_per_session); the sessions reconnected"
        )
    if side in ("relay", TARGET) and summary["queued_replies"]:
        found.append(
            f"{name}: {summary['queued_replies']} of the {side}'s replies were "
            "'250 queued' (SES not reached inline)"
        )
    if summary["log_warnings_errors"]:
        found.append(
            f"{name}: the {side} logged {summary['log_warnings_errors']} "
            f"warnings/errors, e.g. {summary['log_examples'][:2]}"
        )
    return found


VERDICT_COLUMNS = ("point", "what", "must", "stretch", "measured", "verdict")


def _verdict(row: dict[str, Any]) -> str:
    if row["status"] != "pass" or row["stretch_met"] is None:
        return str(row["status"])
    return f"pass, stretch {'met' if row['stretch_met'] else 'missed'}"


def verdict_table(rows: Sequence[dict[str, Any]]) -> str:
    """Issue 15's points 6-13: one row per check (``bench/verdict.py``)."""
    cells = [
        [r["point"], r["what"], r["must"], r["stretch"] or "-", r["shown"], _verdict(r)]
        for r in rows
    ]
    return _markdown(VERDICT_COLUMNS, cells)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")
