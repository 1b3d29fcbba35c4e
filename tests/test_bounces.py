"""Bounces after ``250``: exactly one delivery status notification per
given-up message, whatever crash or write failure comes between queuing it
and moving the message to the dead-letter area.

The crash states are written to the spool as a crash would leave them, then
a relay starts on it; the write failures are injected into the running
relay's spool (``errno.EIO``, once). The fake SES counts what is sent.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.app import Relay
from relay.errors import SmtpReply, SpoolError
from relay.spool import DEAD, QUEUE, Batch, BatchError, Entry, Spool
from tests.fakeses import FakeSes, SesErrorReply
from tests.relayd import running_relay

SENDER = "app@example.com"
BOUNCE_FROM = "MAILER-DAEMON@relay.test"
ORIGINAL_ID = "0005F1AAAAAAAAAA000001"
BOUNCE_ID = "0005F1AAAAAAAAAA00000B"
WRITTEN_BOUNCE = b"From: MAILER-DAEMON@relay.test\r\nSubject: written before the crash\r\n\r\nx\r\n"
MESSAGE = b"From: App <app@example.com>\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHello\r\n"
REFUSED = SmtpReply(554, "5.7.1", "message rejected by SES: Address blacklisted.")
FAST_RETRY = {"retry_min": 0.05, "retry_max": 0.1}


def original(**changes: Any) -> Entry:
    """A message whose second batch SES refused for good after ``250``."""
    fields: dict[str, Any] = {
        "id": ORIGINAL_ID,
        "received": time.time() - 60,
        "client": "192.0.2.7",
        "sender": SENDER,
        "source": SENDER,
        "recipients": ("bob@example.net", "carol@example.org"),
        "batches": (
            Batch(("bob@example.net",), "sent", "0100-sent-1"),
            Batch(("carol@example.org",), "failed", None, BatchError(REFUSED, "MessageRejected")),
        ),
        "attempts": 1,
    }
    return Entry(**(fields | changes))


def written_bounce(**changes: Any) -> Entry:
    fields: dict[str, Any] = {
        "id": BOUNCE_ID,
        "received": time.time() - 1,
        "client": "localhost",
        "sender": "",
        "source": BOUNCE_FROM,
        "recipients": (SENDER,),
        "batches": (Batch((SENDER,)),),
        "bounce_of": ORIGINAL_ID,
    }
    return Entry(**(fields | changes))


def prepare(tmp_path: Path, *entries: tuple[Entry, bytes, str]) -> Spool:
    """Write ``(entry, message, area)`` into the spool, as another process would."""
    spool = Spool(tmp_path / "spool")
    spool.open(lock=False)
    for entry, message, area in entries:
        spool.put(entry, message)
        if area == DEAD:
            spool.move(entry, QUEUE, DEAD)
    return spool


async def settled(relay: Relay, within: float = 10.0) -> None:
    """Until the original is in the dead-letter area and the queue is empty."""
    assert relay.spool is not None
    spool = relay.spool

    def done() -> bool:
        return spool.find(ORIGINAL_ID) == DEAD and not list(spool.entries(QUEUE))

    async with asyncio.timeout(within):
        while not await asyncio.to_thread(done):
            await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    "state",
    [
        "failure recorded, no bounce yet",
        "bounce id recorded, bounce not written",
        "bounce written, message still queued",
        "message moved, bounce not sent",
    ],
)
async def test_a_crash_while_bouncing_sends_exactly_one_bounce(
    tmp_path: Path, fake_ses: FakeSes, state: str
) -> None:
    soon = time.time() + 0.5  # the written bounce is due first: it must still wait
    if state == "failure recorded, no bounce yet":
        entries = [(original(next_attempt=soon), MESSAGE, QUEUE)]
    elif state == "bounce id recorded, bounce not written":
        entries = [(original(bounce=BOUNCE_ID, next_attempt=soon), MESSAGE, QUEUE)]
    elif state == "bounce written, message still queued":
        entries = [
            (original(bounce=BOUNCE_ID, next_attempt=soon), MESSAGE, QUEUE),
            (written_bounce(), WRITTEN_BOUNCE, QUEUE),
        ]
    else:
        entries = [
            (original(bounce=BOUNCE_ID), MESSAGE, DEAD),
            (written_bounce(), WRITTEN_BOUNCE, QUEUE),
        ]
    prepare(tmp_path, *entries)
    async with running_relay(tmp_path, fake_ses, delivery=FAST_RETRY) as relay:
        await settled(relay)
        assert relay.spool is not None
        dead = relay.spool.load(ORIGINAL_ID, DEAD)
    [bounce] = fake_ses.requests  # the batch SES accepted was not sent again
    assert bounce.destinations == [SENDER]
    assert bounce.raw_message is not None
    if state in ("bounce written, message still queued", "message moved, bounce not sent"):
        assert bounce.raw_message == WRITTEN_BOUNCE  # the one written, not a new one
    else:
        assert b"Final-Recipient: rfc822; carol@example.org" in bounce.raw_message
    if state == "failure recorded, no bounce yet":
        assert dead.bounce is not None
    else:
        assert dead.bounce == BOUNCE_ID


def fail_once(monkeypatch: pytest.MonkeyPatch, name: str, when: Callable[..., bool]) -> list[str]:
    """Make ``Spool.<name>`` raise EIO the first time ``when(*args)`` holds."""
    real = getattr(Spool, name)
    failed: list[str] = []

    def failing(self: Spool, *args: Any, **kwargs: Any) -> Any:
        if not failed and when(*args):
            failed.append(name)
            raise SpoolError(f"injected: cannot {name}", errno=errno.EIO)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Spool, name, failing)
    return failed


def is_original(entry: Any, *_: Any) -> bool:
    return isinstance(entry, Entry) and entry.id == ORIGINAL_ID


def recording_the_bounce(entry: Any, *_: Any) -> bool:
    return is_original(entry) and entry.bounce is not None


def the_bounce(entry: Any, *_: Any) -> bool:
    return isinstance(entry, Entry) and entry.bounce_of == ORIGINAL_ID


@pytest.mark.parametrize(
    ("operation", "when", "logged"),
    [
        ("update", recording_the_bounce, "cannot record delivery state"),
        ("put", the_bounce, "cannot queue the bounce"),
        ("move", is_original, "cannot move to the dead-letter area"),
    ],
)
async def test_a_failed_write_while_bouncing_is_retried_without_a_second_bounce(
    tmp_path: Path,
    fake_ses: FakeSes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    operation: str,
    when: Callable[..., bool],
    logged: str,
) -> None:
    pending = original(batches=(Batch(("carol@example.org",)),), recipients=("carol@example.org",))
    prepare(tmp_path, (pending, MESSAGE, QUEUE))
    failed = fail_once(monkeypatch, operation, when)
    fake_ses.script(SesErrorReply(400, "MessageRejected", "Address blacklisted."))
    with caplog.at_level(logging.INFO, logger="relay"):
        async with running_relay(tmp_path, fake_ses, delivery=FAST_RETRY) as relay:
            await settled(relay)
    assert failed == [operation]
    assert any(logged in r.getMessage() for r in caplog.records)
    rejected, bounce = fake_ses.requests
    assert rejected.destinations == ["carol@example.org"]
    assert bounce.destinations == [SENDER]
    assert bounce.raw_message is not None
    assert b"carol@example.org" in bounce.raw_message


async def test_a_bounce_that_cannot_be_built_is_logged_and_not_claimed(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-edited envelope whose sender cannot go into a header field."""
    prepare(tmp_path, (original(sender="app\x7f@example.com"), MESSAGE, QUEUE))
    with caplog.at_level(logging.INFO, logger="relay"):
        async with running_relay(tmp_path, fake_ses, delivery=FAST_RETRY) as relay:
            await settled(relay)
            assert relay.spool is not None
            dead = relay.spool.load(ORIGINAL_ID, DEAD)
    assert fake_ses.requests == []
    assert dead.bounce is None  # `queue show` names no bounce that does not exist
    [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.startswith(f"{ORIGINAL_ID}: cannot build a bounce: sender must be printable")
