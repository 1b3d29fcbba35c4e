"""Memory with large messages: issue 15's point 11 (7 MiB through
SendRawEmail) and issue 16's point 4 (30 MB through SES API v2).

``count`` sessions each send one message of ``size`` bytes at once, one
connection per message, to the relay (the aiosmtplib generator, which
keeps the SHA-256 of every message accepted); the fake SES decodes each
``RawMessage.Data`` and keeps its SHA-256. Reported: the relay's peak RSS
(``VmHWM``, its whole life) and whether the digests sent and received are
the same, message for message. The relay's ``smtp.max_message_size`` is
raised to fit when ``size`` is over its default (issue 16's 30 MB messages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.procs import Children
from bench.scenarios import Settings, measure
from bench.services import run_load, start_fake_ses, start_relay
from relay.ses.limits import api_message_limit

COUNT = 10
SIZE = 7 * 1024 * 1024
LARGE_SIZE = 30_000_000
"""Issue 16's large messages: v2's limit as the relay reads it (``relay.ses.limits``)."""
WINDOW = 120.0
"""Seconds the messages may take to be answered, at most."""
SIZE_MARGIN = 1 << 20
"""Bytes over ``size`` the size limit allows when raised (headers, dot-stuffing)."""


def run_big_messages(
    settings: Settings, workdir: Path, count: int, size: int, api: str = "v1"
) -> dict[str, Any]:
    """``api``: the relay's ``ses.api`` (v2 takes the messages v1 cannot)."""

    def load(children: Children, name: str, port: int) -> dict[str, Any]:
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        return run_load(
            children, directory, name, port, mode="per-message", sessions=count, size=size,
            warmup=0.0, duration=WINDOW, count=None, more=["--messages", str(count), "--digests"],
        )  # fmt: skip

    with Children() as children:
        ses = start_fake_ses(children, workdir / "ses", 0.0, digests=True)
        limit = max(api_message_limit(api), size + SIZE_MARGIN)
        overrides = {"ses": {"api": api}, "smtp": {"max_message_size": limit}}
        relay = start_relay(children, workdir / "relay", ses, overrides)
        summary, result = measure(children, relay, "relay", load, settings.drain_timeout)
        stats = ses.stats()
    sent, received = sorted(result["digests"]), sorted(stats["digests"])
    return {
        "api": api,
        "messages": count,
        "message_size": result["message_size"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "accepted": summary["accepted_total"],
        "delivered": summary["delivered"],
        "identical": len(sent) == count and sent == received,
        "errors": summary["errors"],
        "relay": summary,
    }
