"""Issue 15's "What the relay must reach" (points 6-13), judged on one run.

Each check reads one figure from the run's document (``python -m bench``'s
JSON) and compares it with the point's must and, where there is one, its
stretch. A figure the run did not measure is "not run"; point 7 is "not
built" while the relay has no ``smtp.workers``, and judged against whichever
of the ceiling and Postfix ran the same scenario in the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.workers import compared

RATE_TOLERANCE = 0.05
"""Point 13: the delivered rate within this share of the configured one."""
KIB = 1024


@dataclass(frozen=True)
class Bound:
    """``low <= value <= high`` (``<`` with ``strict``); either side may be open."""

    low: float | None = None
    high: float | None = None
    strict: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and value < self.low:
            return False
        if self.high is not None:
            return value < self.high if self.strict else value <= self.high
        return True

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.low:g} to {self.high:g}"
        if self.low is not None:
            return f">= {self.low:g}"
        return f"{'<' if self.strict else '<='} {self.high:g}"


@dataclass(frozen=True)
class Check:
    point: str
    what: str
    must: Bound
    stretch: Bound | None
    value: float | None
    shown: str
    status: str | None = None
    """Set when there is nothing to judge: "not run" or "not built"."""

    def row(self) -> dict[str, Any]:
        must_met = stretch_met = None
        status = self.status or "not run"
        if self.status is None and self.value is not None:
            must_met = self.must.holds(self.value)
            stretch_met = None if self.stretch is None else self.stretch.holds(self.value)
            status = "pass" if must_met else "FAIL"
        return {
            "point": self.point,
            "what": self.what,
            "must": str(self.must),
            "stretch": None if self.stretch is None else str(self.stretch),
            "measured": self.value,
            "shown": self.shown if self.value is not None else "-",
            "must_met": must_met,
            "stretch_met": stretch_met,
            "status": status,
        }


def _fmt(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _scenario(document: dict[str, Any], mode: str) -> dict[str, Any] | None:
    return next((s for s in document.get("scenarios", []) if s["mode"] == mode), None)


def _ratio(document: dict[str, Any], mode: str, key: str) -> float | None:
    scenario = _scenario(document, mode)
    if scenario is None:
        return None
    ratio: float | None = scenario.get("ratios", {}).get(key)
    return ratio


def _throughput(document: dict[str, Any]) -> Iterator[Check]:
    for mode, must, stretch in (("per-message", 0.5, 0.7), ("persistent", 0.35, 0.5)):
        value = _ratio(document, mode, "relay/ceiling msg/s")
        yield Check("6", f"{mode}: relay/ceiling msg/s", Bound(must), Bound(stretch), value,
                    _fmt(value))  # fmt: skip


def _workers(document: dict[str, Any]) -> Iterator[Check]:
    """From the scenarios the workers part measured, against the targets that
    ran them in this run (``bench.workers.compared``)."""
    part = document.get("parts", {}).get("workers")
    status = None if part is None or part["built"] else "not built"
    entries = compared(document)

    def figure(mode: str, target: str) -> float | None:
        entry = next((e for e in entries if e["mode"] == mode), None)
        return None if entry is None else entry["ratios"][target]

    checks = (
        ("per-message: 2 workers/Postfix msg/s", "per-message", "postfix", Bound(1.0), None),
        ("per-message: 2 workers/ceiling msg/s", "per-message", "ceiling", Bound(0.75),
         Bound(1.3)),
        ("persistent: 2 workers/ceiling msg/s", "persistent", "ceiling", Bound(0.5), None),
    )  # fmt: skip
    for what, mode, target, must, stretch in checks:
        value = figure(mode, target)
        yield Check("7", what, must, stretch, value, _fmt(value), status)


def _cpu(document: dict[str, Any]) -> Iterator[Check]:
    for mode in ("per-message", "persistent"):
        value = _ratio(document, mode, "relay/ceiling CPU per msg")
        yield Check("8", f"{mode}: relay/ceiling CPU per msg", Bound(high=2.0), Bound(high=1.5),
                    value, _fmt(value))  # fmt: skip


def _latency(document: dict[str, Any]) -> Iterator[Check]:
    part = document.get("parts", {}).get("latency") or {}
    value = part.get("p99_over_ceiling_ms")
    shown = "-"
    if value is not None:
        shown = (
            f"{part['relay']['p99_ms']:.1f} - {part['ceiling']['p99_ms']:.1f} = {value:.1f} ms "
            f"at {part['paced_msgs_per_s']:g} msg/s"
        )
    yield Check("9", "p99 relay - p99 ceiling at half the relay's max (ms)", Bound(high=10.0),
                None, value, shown)  # fmt: skip


def _slow_ses(document: dict[str, Any]) -> Iterator[Check]:
    part = document.get("parts", {}).get("ses_delay") or {}
    ratio, handshakes = part.get("throughput_ratio"), part.get("tls_handshakes_per_100")
    shown = "-"
    if ratio is not None:
        shown = (
            f"{part['at_delay']['msgs_per_s']:.1f}/{part['at_0ms']['msgs_per_s']:.1f} = {ratio:.2f}"
        )
    yield Check("10", "SES +20 ms: msg/s over msg/s at 0 ms", Bound(0.9), None, ratio, shown)
    yield Check("10", "SES +20 ms: TLS handshakes per 100 messages", Bound(high=1.0), None,
                handshakes, _fmt(handshakes, 3))  # fmt: skip


def _memory(document: dict[str, Any]) -> Iterator[Check]:
    yield from _big_messages(document, "memory", "11", 7 << 20)


def _large(document: dict[str, Any]) -> Iterator[Check]:
    yield from _big_messages(document, "large", "16.4", 30_000_000)


def _big_messages(document: dict[str, Any], name: str, point: str, size: int) -> Iterator[Check]:
    part = document.get("parts", {}).get(name) or {}
    rss = part.get("peak_rss_mb")
    label = f"{part.get('messages', 10)} concurrent {part.get('message_size', size) / 2**20:.1f}"
    api = f" via {part['api']}" if "api" in part else ""
    yield Check(point, f"{label} MiB messages{api}: relay peak RSS (MiB)", Bound(high=150.0),
                Bound(high=100.0), rss, _fmt(rss, 1))  # fmt: skip
    identical = part.get("identical")
    value = None if identical is None else float(identical)
    shown = f"{'identical' if identical else 'DIFFERENT'} ({part.get('delivered')} delivered)"
    yield Check(point, "the same messages reach SES byte-identical (1 = yes)", Bound(1.0), None,
                value, shown)  # fmt: skip


def _startup(document: dict[str, Any]) -> Iterator[Check]:
    part = document.get("parts", {}).get("startup") or {}
    count = part.get("count", 100_000)
    ready = part.get("median_ready_s")
    yield Check("12", f"ready over {count} queued messages (s)", Bound(high=5.0),
                Bound(high=2.0), ready, _fmt(ready, 2, " s"))  # fmt: skip
    per_message = None
    if part:
        per_message = max(part["bytes_per_message_ready"], part["bytes_per_message_idle"])
    yield Check("12", "memory per queued message (bytes, ready or idle)", Bound(high=KIB), None,
                per_message, f"{per_message} B")  # fmt: skip


def _rate_limit(document: dict[str, Any]) -> Iterator[Check]:
    part = document.get("parts", {}).get("rate_limit") or {}
    rate = part.get("max_send_rate", 50.0)
    delivered = part.get("delivered_rate")
    shown = "-"
    if delivered is not None:
        dry = "" if part["backlog_left"] else " (queue ran dry: not at the rate)"
        shown = f"{delivered:.2f}/s over {part['window_s']:g} s{dry}"
        if not part["backlog_left"]:
            delivered = -1.0  # no figure at the rate: a failure, not a pass
    band = Bound(rate * (1 - RATE_TOLERANCE), rate * (1 + RATE_TOLERANCE))
    yield Check("13", f"max_send_rate {rate:g}: delivered recipients/s", band, None, delivered,
                shown)  # fmt: skip
    throttled = part.get("throttled")
    yield Check("13", "Throttling answers from SES", Bound(high=0.0), None, throttled,
                str(throttled))  # fmt: skip
    cpu = part.get("cpu_util_waiting")
    yield Check("13", "relay CPU while it waits (share of a core)", Bound(high=0.05, strict=True),
                None, cpu, _fmt(None if cpu is None else cpu * 100, 1, " %"))  # fmt: skip


JUDGES = (
    _throughput, _workers, _cpu, _latency, _slow_ses, _memory, _startup, _rate_limit, _large,
)  # fmt: skip


def verdicts(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per check, in the issue's order."""
    return [check.row() for judge in JUDGES for check in judge(document)]
