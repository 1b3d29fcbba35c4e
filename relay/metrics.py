"""Prometheus metrics of one relay: what is counted, and what is read at scrape.

Counters and histograms are updated as things happen (``RelayMetrics``'s
``message`` and ``ses_call``); gauges of state (the spool's contents, a
pause of all delivery) are read when Prometheus scrapes, by ``StateCollector``,
which runs in a thread (``exposition``), never on the event loop. Names
follow Prometheus conventions: ``ses_relay_`` prefix, base units, ``_total``
counters. Each relay has its own registry (tests run several in one process).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay import __version__
from relay.errors import SmtpReply

SES_DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds; SES answers in well under a second when it is healthy."""


def message_outcome(reply: SmtpReply) -> str:
    """A DATA reply as a ``ses_relay_messages_total`` outcome."""
    if reply.code // 100 == 2:
        return "queued" if " queued as " in f" {reply.text}" else "sent"
    return "deferred" if reply.code // 100 == 4 else "rejected"


class RelayMetrics:
    """The metrics a relay updates as it works."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        build = Gauge(
            "ses_relay_build_info",
            "Always 1; the labels say which ses-relay and Python run.",
            ["version", "python"],
            registry=self.registry,
        )
        build.labels(__version__, platform.python_version()).set(1)
        self._messages = Counter(
            "ses_relay_messages",
            "Messages whose DATA was answered, by outcome: sent (SES took every batch "
            "at once), queued (250, delivery goes on in the background), deferred (4xx), "
            "rejected (5xx).",
            ["outcome"],
            registry=self.registry,
        )
        self._ses_requests = Counter(
            "ses_relay_ses_requests",
            "Calls to SES (each retry counts), by action, outcome and SES error code "
            '("" on success; NoCredentials: none could be signed).',
            ["action", "outcome", "code"],
            registry=self.registry,
        )
        self._ses_duration = Histogram(
            "ses_relay_ses_request_duration_seconds",
            "Time of one HTTP call to SES, answered or not.",
            ["action"],
            buckets=SES_DURATION_BUCKETS,
            registry=self.registry,
        )
        for outcome in ("sent", "queued", "deferred", "rejected"):
            self._messages.labels(outcome)  # present at 0 from the start

    def message(self, reply: SmtpReply) -> None:
        """One DATA reply."""
        self._messages.labels(message_outcome(reply)).inc()

    def ses_call(self, action: str, code: str, seconds: float) -> None:
        """One HTTP call to SES: ``code`` is SES's error code, "" on success."""
        outcome = "error" if code else "success"
        self._ses_requests.labels(action, outcome, code).inc()
        self._ses_duration.labels(action).observe(seconds)

    def add_state(self, read: Callable[[], State]) -> None:
        """Read the relay's state at every scrape (``read`` runs in a thread)."""
        self.registry.register(StateCollector(read))

    def exposition(self) -> bytes:
        """The text format; blocking (reads the spool): call it in a thread."""
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class State:
    """What the relay is, read at scrape time."""

    queued: int
    dead: int
    pause_remaining: float
    """Seconds left of a pause of all delivery; 0 when delivering."""


class StateCollector(Collector):
    """Gauges read at scrape time from ``read``."""

    def __init__(self, read: Callable[[], State]) -> None:
        self._read = read

    def describe(self) -> list[Metric]:
        return []  # read at collect time only: registering must not call ``read``

    def collect(self) -> Iterator[Metric]:
        state = self._read()
        spool = GaugeMetricFamily(
            "ses_relay_spool_messages",
            "Messages in the spool, by area: queue (to deliver) and dead (given up on).",
            labels=["area"],
        )
        spool.add_metric(["queue"], state.queued)
        spool.add_metric(["dead"], state.dead)
        yield spool
        yield GaugeMetricFamily(
            "ses_relay_delivery_pause_remaining_seconds",
            "Seconds left of a pause of all delivery (daily quota, account paused, "
            "credentials refused, SES unreachable); 0 while delivering.",
            value=state.pause_remaining,
        )


def count_entries(directory: str | os.PathLike[str]) -> int:
    """Envelopes (``*.json``) in one spool area; 0 when it cannot be read."""
    try:
        with os.scandir(directory) as entries:
            return sum(1 for entry in entries if entry.name.endswith(".json"))
    except OSError:
        return 0
