"""systemd's notify protocol (sd_notify(3)), spoken by the daemon itself.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, an ``AF_UNIX``
datagram socket (a path, or ``@name`` in the abstract namespace); each
message is one datagram of ``KEY=VALUE`` lines. With ``WatchdogSec=`` it
also passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``: the watchdog is ours
only if that is our pid) and restarts the service when ``WATCHDOG=1`` stops
coming. The standard library's ``socket`` is all it takes, so no binding to
libsystemd.

The messages and the reading of the environment are pure functions;
``Notifier`` only sends, and ``keep_alive`` pings from the event loop, so
that a loop that stalls stops the pings.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

from relay.log import smtp_log
from relay.oneline import one_line

Address = str | bytes
"""A socket address for ``AF_UNIX``: a path, or bytes starting with NUL (abstract)."""

WATCHDOG = "WATCHDOG=1"
STATUS_LIMIT = 200
"""Characters of a ``STATUS=`` text (``systemctl status`` shows one line)."""
SEND_TIMEOUT = 1.0
"""Seconds one datagram may wait for room in systemd's queue (the event loop waits)."""


def notify_address(env: Mapping[str, str]) -> Address | None:
    """Where ``$NOTIFY_SOCKET`` says to send, or None when it is not set.

    ``ValueError`` for an address systemd may give but this does not speak
    (``vsock:``, a relative path).
    """
    value = env.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    raise ValueError(f"NOTIFY_SOCKET={value!r}: only a path or an @abstract address is supported")


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1`` (half of ``WATCHDOG_USEC``, as
    sd_watchdog_enabled(3) advises), or None when systemd asks for none, or
    asks it of another process (``WATCHDOG_PID``)."""
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 2 / 1_000_000


def status(text: str) -> str:
    return f"STATUS={one_line(text, STATUS_LIMIT)}"


def ready(summary: str) -> str:
    """Started, or done reloading."""
    return f"READY=1\n{status(summary)}"


def reloading(monotonic_usec: int, summary: str) -> str:
    """A reload begins; ``MONOTONIC_USEC`` (CLOCK_MONOTONIC) is what systemd
    253's ``Type=notify-reload`` needs to match it to the signal it sent."""
    return f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}\n{status(summary)}"


def stopping(summary: str) -> str:
    return f"STOPPING=1\n{status(summary)}"


class Notifier:
    """Sends messages to ``address`` (nothing when it is None: not under systemd)."""

    def __init__(self, address: Address | None) -> None:
        self.address = address

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Notifier:
        try:
            return cls(notify_address(env))
        except ValueError as exc:
            smtp_log.warning("not telling systemd our state: %s", exc)
            return cls(None)

    def send(self, message: str) -> None:
        """One datagram; a failure is logged (systemd then acts on what it misses)."""
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            first = message.partition("\n")[0]
            smtp_log.warning("cannot tell systemd %s: %s", first, exc.strerror or exc)


async def keep_alive(notifier: Notifier, interval: float) -> None:
    """``WATCHDOG=1`` every ``interval`` seconds until cancelled."""
    while True:
        notifier.send(WATCHDOG)
        await asyncio.sleep(interval)
