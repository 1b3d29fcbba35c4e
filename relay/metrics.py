"""Prometheus metrics of one relay: what is counted, and what is read at scrape.

Counters and histograms are updated as things happen (``RelayMetrics``'s
``message``, ``ses_call``, ``auth_attempt``, ``send_rate_wait``,
``config_reload``, and ``connection`` and ``session`` from the connection
limiter); gauges of state (the spool's contents, a pause of all delivery,
the credentials' expiry, the connections open) are read when Prometheus scrapes,
by ``StateCollector``, which runs in a thread (``exposition``), never on
the event loop. Names follow Prometheus conventions: ``ses_relay_`` prefix,
base units, ``_total`` counters. Each relay has its own registry (tests run
several in one process).

With ``smtp.workers = N > 1`` the counters, histograms and gauges of every
process live in prometheus_client's multiprocess mode (files in
``PROMETHEUS_MULTIPROC_DIR``, set by ``relay.supervisor`` before this is
imported): the parent's ``/metrics`` sums them (``MultiProcessCollector``),
and a worker's counts stay in the total after it dies. The gauges read at
scrape (``State``) are per worker, in its memory: the parent asks each
worker for its ``State`` and exposes their combination
(``relay.workerstate.combine``).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from relay import __version__
from relay.auth import AUTH_OUTCOMES, AuthAttempt
from relay.limiter import CONNECTION_OUTCOMES, SESSION_OUTCOMES, ConnectionOutcome, SessionOutcome
from relay.outcome import DataReply
from relay.ses.classify import metric_code
from relay.ses.sender import SendQuota

# The *_created series double what is exposed and tell Prometheus nothing it uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

SES_DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds; SES answers in well under a second when it is healthy."""
SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 10485760)
"""Bytes of a message as received."""
RECIPIENT_BUCKETS = (1, 2, 5, 10, 50, 100, 500, 1000)
SEND_RATE_WAIT_BUCKETS = (0.005, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Seconds; the first bucket holds the batches that did not wait."""
BOUNCE_OUTCOMES = ("queued", "sent", "failed")


class RelayMetrics:
    """The metrics a relay updates as it works (also the connection limiter's
    ``relay.limiter.SmtpCounts``)."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        """``multiprocess_dir``: expose what every process of the relay wrote
        there (the parent of workers), not this process's registry alone."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._exposed = self.registry
        if multiprocess_dir is not None:
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        build = Gauge(
            "ses_relay_build_info",
            "Always 1; the labels say which ses-relay and Python run.",
            ["version", "python"],
            registry=self.registry,
            multiprocess_mode="max",
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
            '("" on success; NoCredentials: none could be signed; other: a code the relay '
            "does not know).",
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
        self._sizes = Histogram(
            "ses_relay_message_size_bytes",
            "Size of each message received (DATA complete).",
            buckets=SIZE_BUCKETS,
            registry=self.registry,
        )
        self._recipients = Histogram(
            "ses_relay_message_recipients",
            "Envelope recipients of each message received.",
            buckets=RECIPIENT_BUCKETS,
            registry=self.registry,
        )
        self._batches = Counter(
            "ses_relay_batches",
            "SendRawEmail batches tried, by outcome: sent, failed (for good), deferred (to retry).",
            ["outcome"],
            registry=self.registry,
        )
        self._retries = Counter(
            "ses_relay_delivery_retries",
            "Delivery attempts that left batches to retry later.",
            registry=self.registry,
        )
        self._bounces = Counter(
            "ses_relay_bounces",
            "Delivery status notifications for mail that failed after 250, by outcome: "
            "queued (written to the spool), sent (SES took it), failed (SES refused it "
            "or it expired: the sender is not told; kept in the dead-letter area).",
            ["outcome"],
            registry=self.registry,
        )
        self._send_rate_wait = Histogram(
            "ses_relay_send_rate_wait_seconds",
            "Time each batch waited for the sending rate (its recipients' tokens) before "
            "it was sent to SES; batches that gave up waiting (a pause, the attempt's deadline) "
            "are not counted.",
            buckets=SEND_RATE_WAIT_BUCKETS,
            registry=self.registry,
        )
        self._auth_attempts = Counter(
            "ses_relay_auth_attempts",
            "SMTP AUTH attempts, by outcome: ok (235), failed (535: unknown user or wrong "
            "password), locked_out (421: the client has auth.max_failures failures), "
            "unavailable (454: no password check could be made now).",
            ["outcome"],
            registry=self.registry,
        )
        self._reloads = Counter(
            "ses_relay_config_reloads",
            "Reloads of the configuration (SIGHUP, ses-relay reload), by outcome: applied "
            "(new sessions get it; keys that need a restart keep their old values), refused "
            "(invalid: the configuration in force is unchanged).",
            ["outcome"],
            registry=self.registry,
        )
        connections = Counter(
            "ses_relay_smtp_connections",
            "SMTP connections, by outcome: admitted, or refused for a connection limit.",
            ["outcome"],
            registry=self.registry,
        )
        sessions = Counter(
            "ses_relay_smtp_sessions",
            "SMTP connections that have closed, by how they ended: quit (the client "
            "sent QUIT), disconnected (the client closed without QUIT), timeout "
            "(idle, DATA, session or PROXY header time limit), refused (421 for a connection "
            "limit, too many bad commands, a command over its limit or AUTH lock-out; "
            "a bad or untrusted PROXY header), dropped (the client did not read its "
            "replies), tls_failed (the STARTTLS handshake failed), shutdown (421 "
            "while the relay stops), error (an unexpected error).",
            ["outcome"],
            registry=self.registry,
        )
        # One per connection: the children are looked up once, here.
        self._connections = {o: connections.labels(o) for o in CONNECTION_OUTCOMES}
        self._sessions = {o: sessions.labels(o) for o in SESSION_OUTCOMES}
        self._last_reload_ok = Gauge(
            "ses_relay_config_last_reload_successful",
            "0 when the last reload was refused (the configuration file is not what runs), "
            "else 1 (also before any reload).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self._last_reload_ok.set(1)
        for outcome in ("sent", "queued", "deferred", "rejected"):
            self._messages.labels(outcome)  # present at 0 from the start
        for outcome in ("sent", "failed", "deferred"):
            self._batches.labels(outcome)
        for outcome in BOUNCE_OUTCOMES:
            self._bounces.labels(outcome)
        for outcome in AUTH_OUTCOMES:
            self._auth_attempts.labels(outcome)
        for outcome in ("applied", "refused"):
            self._reloads.labels(outcome)

    def message(self, answer: DataReply, *, size: int, recipients: int) -> None:
        """One DATA reply, for a message of ``size`` bytes to ``recipients``."""
        self._messages.labels(answer.outcome).inc()
        self._sizes.observe(size)
        self._recipients.observe(recipients)

    def batch(self, outcome: str) -> None:
        """One batch's outcome: "sent", "failed" or "deferred"."""
        self._batches.labels(outcome).inc()

    def retry(self) -> None:
        """An attempt left batches to retry."""
        self._retries.inc()

    def bounce(self, outcome: str) -> None:
        """A delivery status notification's outcome: one of ``BOUNCE_OUTCOMES``."""
        self._bounces.labels(outcome).inc()

    def send_rate_wait(self, seconds: float) -> None:
        """A batch waited ``seconds`` for sending-rate tokens, and got them."""
        self._send_rate_wait.observe(seconds)

    def auth_attempt(self, outcome: AuthAttempt) -> None:
        """One AUTH attempt's outcome (``relay.auth.Authenticator``)."""
        self._auth_attempts.labels(outcome).inc()

    def config_reload(self, *, refused: bool) -> None:
        """A reload of the configuration was applied, or refused."""
        self._reloads.labels("refused" if refused else "applied").inc()
        self._last_reload_ok.set(0 if refused else 1)

    def connection(self, outcome: ConnectionOutcome) -> None:
        """A new SMTP connection was admitted, or refused for a limit."""
        self._connections[outcome].inc()

    def session(self, outcome: SessionOutcome) -> None:
        """An SMTP connection has closed (``relay.limiter.SESSION_OUTCOMES``)."""
        self._sessions[outcome].inc()

    def ses_call(self, action: str, code: str, seconds: float) -> None:
        """One HTTP call to SES: ``code`` is SES's error code, "" on success."""
        outcome = "error" if code else "success"
        self._ses_requests.labels(action, outcome, metric_code(code)).inc()
        self._ses_duration.labels(action).observe(seconds)

    def add_state(self, read: Callable[[], State]) -> None:
        """Read the relay's state at every scrape (``read`` runs in a thread)."""
        self._exposed.register(StateCollector(read))

    def exposition(self) -> bytes:
        """The text format; blocking (reads the spool): call it in a thread."""
        return generate_latest(self._exposed)


@dataclass(frozen=True, slots=True)
class State:
    """What the relay is, read at scrape time."""

    queued: int
    dead: int
    oldest_age: float
    """Seconds since the oldest queued message arrived; 0 when none is queued."""
    pause_remaining: float
    """Seconds left of a pause of all delivery; 0 when delivering."""
    send_rate: float
    """Recipients per second allowed now (below the account's after throttling)."""
    quota: SendQuota | None
    """The account's quota as GetSendQuota last said; None until it answers."""
    smtp_open: int
    smtp_max: int
    """``smtp.max_connections``."""
    credentials_expiry: float | None
    """Seconds until the current AWS credentials expire (negative once they have);
    None for keys that never expire, or before any were fetched."""


class StateCollector(Collector):
    """Gauges read at scrape time from ``read``."""

    def __init__(self, read: Callable[[], State]) -> None:
        self._read = read

    def describe(self) -> list[Metric]:
        return []  # read at collect time only: registering must not call ``read``

    def collect(self) -> Iterator[Metric]:
        state = self._read()
        yield _by_label(
            GaugeMetricFamily(
                "ses_relay_spool_messages",
                "Messages in the spool, by area: queue (to deliver) and dead (given up on).",
                labels=["area"],
            ),
            {"queue": state.queued, "dead": state.dead},
        )
        yield GaugeMetricFamily(
            "ses_relay_spool_oldest_message_age_seconds",
            "Seconds since the oldest queued message arrived (by its queue id); 0 when "
            "the queue is empty.",
            value=state.oldest_age,
        )
        yield GaugeMetricFamily(
            "ses_relay_delivery_pause_remaining_seconds",
            "Seconds left of a pause of all delivery (daily quota, account paused, "
            "credentials refused, SES unreachable); 0 while delivering.",
            value=state.pause_remaining,
        )
        yield GaugeMetricFamily(
            "ses_relay_send_rate_recipients_per_second",
            "Recipients per second the relay lets through now: the account's MaxSendRate "
            "(or ses.max_send_rate), lower for a while after throttling.",
            value=state.send_rate,
        )
        if state.quota is not None:
            quota = state.quota
            for name, text, number in (
                ("max_24_hour_send", "Max24HourSend: messages the account may send in 24 h.",
                 quota.max_24_hour_send),
                ("sent_last_24_hours", "SentLast24Hours: messages the account sent in 24 h.",
                 quota.sent_last_24_hours),
                ("max_send_rate", "MaxSendRate: messages per second the account may send.",
                 quota.max_send_rate),
            ):  # fmt: skip
                yield GaugeMetricFamily(f"ses_relay_ses_quota_{name}", text, value=number)
        yield GaugeMetricFamily(
            "ses_relay_smtp_connections_open", "SMTP connections open now.", value=state.smtp_open
        )
        yield GaugeMetricFamily(
            "ses_relay_smtp_connections_max",
            "smtp.max_connections: connections open at once before new ones get 421.",
            value=state.smtp_max,
        )
        if state.credentials_expiry is not None:
            yield GaugeMetricFamily(
                "ses_relay_credentials_expiry_seconds",
                "Seconds until the AWS credentials in use expire; negative once they have "
                "(refreshing them fails). Absent for keys that never expire.",
                value=state.credentials_expiry,
            )


def _by_label(family: GaugeMetricFamily, values: Mapping[str, float]) -> Metric:
    """``family`` (one label) with a sample per label value."""
    for label, number in values.items():
        family.add_metric([label], number)
    return family
