"""The results as a table (stdout) and as JSON (``--json FILE``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    "scenario",
    "ceiling msg/s",
    "relay msg/s",
    "relay/ceiling",
    "ceiling p50/p99 ms",
    "relay p50/p99 ms",
    "relay CPU s/1000",
    "relay peak RSS MB",
    "delivered/accepted",
    "SES TLS hs/conn",
    "errors c/r",
)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _errors(summary: dict[str, Any]) -> int:
    return sum(summary["errors"].values())


def row(result: dict[str, Any]) -> list[str]:
    ceiling, relay, ses = result["ceiling"], result["relay"], result["ses"]
    delay = f" (SES +{result['ses_delay_ms']:g} ms)" if result["ses_delay_ms"] else ""
    drained = "" if relay["drained"] else " (not drained)"
    return [
        result["scenario"] + delay,
        _num(ceiling["msgs_per_s"]),
        _num(relay["msgs_per_s"]),
        _num(result["ratio"], 2),
        f"{_num(ceiling['p50_ms'])} / {_num(ceiling['p99_ms'])}",
        f"{_num(relay['p50_ms'])} / {_num(relay['p99_ms'])}",
        _num(relay["cpu_s_per_1000"], 2),
        _num(relay["peak_rss_mb"]),
        f"{relay['delivered']}/{relay['accepted_total']}{drained}",
        f"{ses['tls_handshakes']}/{ses['connections']}",
        f"{_errors(ceiling)}/{_errors(relay)}",
    ]


def table(results: Sequence[dict[str, Any]]) -> str:
    rows = [list(COLUMNS), *(row(r) for r in results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def notes(results: Sequence[dict[str, Any]]) -> list[str]:
    """What a reader should not miss: errors, undrained queues, log warnings,
    a load generator that may have been the limit."""
    found: list[str] = []
    for result in results:
        name = result["scenario"]
        for side in ("ceiling", "relay"):
            summary = result[side]
            if summary["errors"]:
                examples = result["load"][side]["error_examples"]
                found.append(f"{name}: {side} errors {summary['errors']}, e.g. {examples}")
            if (summary["loadgen_cpu_util"] or 0) > 0.9:
                found.append(
                    f"{name}: the load generator was busy "
                    f"{summary['loadgen_cpu_util']:.0%} against the {side}: "
                    "it may have been the limit"
                )
        relay = result["relay"]
        if not relay["drained"]:
            found.append(f"{name}: the relay's queue had not drained after {relay['drain_s']} s")
        if relay["reconnects"]:
            found.append(
                f"{name}: the relay ended {relay['reconnects']} persistent sessions "
                "(smtp.max_messages_per_session); the sessions reconnected"
            )
        if relay["queued_replies"]:
            found.append(
                f"{name}: {relay['queued_replies']} replies were '250 queued' "
                "(SES not reached inline)"
            )
        if relay["log_warnings_errors"]:
            found.append(
                f"{name}: the relay logged {relay['log_warnings_errors']} "
                f"warnings/errors, e.g. {relay['log_examples'][:2]}"
            )
    return found


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")
