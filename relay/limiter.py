"""Open SMTP connections, overall and per client address, and shutting them down.

Bookkeeping over the connections it is given; no sockets.
A connection is anything with ``shutdown`` and ``close_when_idle``
(``relay.smtp.RelaySMTP``). What it admits, refuses and sees end is counted
by its ``SmtpCounts`` (``relay.metrics.RelayMetrics``: counters that, with
``smtp.workers``, outlive the worker that counted).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Final, Literal, Protocol, get_args

REPLY_SHUTTING_DOWN: Final = "421 4.3.2 Service shutting down"

SessionOutcome = Literal[
    "quit", "disconnected", "timeout", "refused", "dropped", "tls_failed", "shutdown", "error"
]
"""How an SMTP connection ended (``ses_relay_smtp_sessions_total``): the client
sent QUIT; it closed without QUIT; a time limit (idle, DATA, session, PROXY
header) ran out; the relay refused it (a connection limit, too many bad
commands, a command over its limit, AUTH lock-out, a bad or untrusted PROXY
header); the relay dropped it (its replies were not read); the STARTTLS
handshake failed; the relay was stopping; or an unexpected error ended it."""
SESSION_OUTCOMES: Final[tuple[SessionOutcome, ...]] = get_args(SessionOutcome)
ConnectionOutcome = Literal["admitted", "refused"]
"""A new connection (``ses_relay_smtp_connections_total``): admitted, or
refused for a connection limit."""
CONNECTION_OUTCOMES: Final[tuple[ConnectionOutcome, ...]] = get_args(ConnectionOutcome)


class SmtpCounts(Protocol):
    """Where the limiter counts connections and how sessions ended."""

    def connection(self, outcome: ConnectionOutcome) -> None: ...
    def session(self, outcome: SessionOutcome) -> None: ...


class _NotCounted:
    def connection(self, outcome: ConnectionOutcome) -> None:
        pass

    def session(self, outcome: SessionOutcome) -> None:
        pass


class _Closable(Protocol):
    def shutdown(self, reply: str) -> None: ...
    def close_when_idle(self, reply: str) -> None: ...


class ConnectionLimiter:
    """Open SMTP connections, overall and per client address.

    One instance is shared by every listener of a relay. A connection takes
    an overall slot as soon as it is accepted (``open``) and a per-client slot
    once its client address is known, after the PROXY header if any
    (``admit``); ``release`` gives both back when it closes. ``drain`` starts
    a shutdown: sessions between transactions get ``421`` at once, the others
    when their transaction ends, and new connections get ``421``.
    """

    def __init__(
        self, max_connections: int, max_per_client: int, counts: SmtpCounts | None = None
    ) -> None:
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self._open: dict[_Closable, str | None] = {}
        self._per_client: Counter[str] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        """Shutting down: every connection is told 421 as soon as it is idle."""
        self._counts = counts or _NotCounted()

    @property
    def active(self) -> int:
        """Connections open now."""
        return len(self._open)

    def connections(self, client: str) -> int:
        """Connections admitted now for ``client``."""
        return self._per_client[client]

    def open(self, connection: _Closable) -> bool:
        """Take an overall slot; False when ``max_connections`` are open."""
        if connection in self._open:
            return True
        if len(self._open) >= self.max_connections:
            self._counts.connection("refused")
            return False
        self._open[connection] = None
        self._idle.clear()
        return True

    def admit(self, connection: _Closable, client: str) -> bool:
        """Take a slot for ``client``; False when it has ``max_per_client`` already."""
        if connection not in self._open:
            return False
        if self._open[connection] is not None:
            return True  # admitted already
        if self._per_client[client] >= self.max_per_client:
            self._counts.connection("refused")
            return False
        self._per_client[client] += 1
        self._open[connection] = client
        self._counts.connection("admitted")
        return True

    def release(self, connection: _Closable) -> None:
        """Give back whatever ``connection`` holds (nothing if it holds nothing)."""
        if connection not in self._open:
            return
        client = self._open.pop(connection)
        if client is not None:
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]
        if not self._open:
            self._idle.set()

    def ended(self, outcome: SessionOutcome) -> None:
        """A connection has closed (whether or not it was admitted)."""
        self._counts.session(outcome)

    async def wait_idle(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for every connection to close; True if they did."""
        try:
            async with asyncio.timeout(seconds):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def drain(self) -> None:
        """Start a shutdown: ``421 4.3.2`` now for sessions between transactions,
        after the transaction for the others, at once for new connections."""
        self.draining = True
        for connection in list(self._open):
            connection.close_when_idle(REPLY_SHUTTING_DOWN)

    def close_all(self) -> None:
        """Tell every open connection ``421 4.3.2`` and close it."""
        for connection in list(self._open):
            connection.shutdown(REPLY_SHUTTING_DOWN)
