"""DATA streamed to the spool, the SES body streamed from it (issue 15 point 5,
issue 16 point 4): real SMTP clients against the running relay and the fake
SES, which checks every signature with botocore."""

from __future__ import annotations

import asyncio
import email.utils
import errno
import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest

from relay.app import Relay
from relay.message import prepare
from tests.fakeses import FakeSes
from tests.relayd import in_data, last_reply_line, running_relay

SENDER = "app@example.com"
WAIT = 15.0


def big_message(size: int, *, headers: str) -> bytes:
    """A text message of about ``size`` bytes: random base64-like lines, some
    starting with a dot (stuffed on the wire, unstuffed by the relay)."""
    rng = random.Random(size)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/."
    lines = [bytes(rng.choices(alphabet, k=76)) + b"\r\n" for _ in range(size // 78)]
    return f"From: App <{SENDER}>\r\nTo: Bob <bob@example.net>\r\n{headers}\r\n".encode() + (
        b"".join(lines)
    )


async def send(relay: Relay, raw: bytes, recipients: list[str]) -> tuple[int, str]:
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=WAIT) as client:
        await client.mail(SENDER)
        for recipient in recipients:
            await client.rcpt(recipient)
        response = await client.data(raw)
    return response.code, response.message


def tmp_files(relay_spool: Path) -> list[str]:
    return sorted(p.name for p in (relay_spool / "tmp").iterdir())


async def test_multi_mebibyte_messages_reach_ses_byte_identical(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    """Two 6 MiB messages, one SES takes as sent, one whose header the relay
    prepares (Bcc out, Date and Message-ID in), each in two batches: every
    request SES gets holds exactly the message as prepared whole, by digest."""
    dated = "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <big@example.com>\r\n"
    as_is = big_message(6 << 20, headers=f"Subject: as is\r\n{dated}")
    prepared = big_message(6 << 20, headers="Subject: prepared\r\nBcc: hidden@example.org\r\n")
    recipients = [f"user{n}@example.net" for n in range(60)]
    async with running_relay(
        tmp_path,
        fake_ses,
        smtp={"max_recipients": 100, "max_message_size": 8 << 20},
        delivery={"inline_timeout": 30.0},
    ) as relay:
        for raw in (as_is, prepared):
            code, text = await send(relay, raw, recipients)
            assert code == 250, text
            assert " sent as " in text, text
    assert len(fake_ses.requests) == 4
    assert all(request.signature_ok for request in fake_ses.requests)
    added = fake_ses.requests[-1].raw_message or b""
    date, message_id = header_field(added, "Date"), header_field(added, "Message-ID")
    expected_prepared = prepare(
        prepared, now=email.utils.parsedate_to_datetime(date), message_id=lambda: message_id
    ).raw
    assert b"Bcc:" not in expected_prepared.split(b"\r\n\r\n", 1)[0]
    digests = [hashlib.sha256(r.raw_message or b"").hexdigest() for r in fake_ses.requests]
    assert digests == [
        hashlib.sha256(as_is).hexdigest(),
        hashlib.sha256(as_is).hexdigest(),
        hashlib.sha256(expected_prepared).hexdigest(),
        hashlib.sha256(expected_prepared).hexdigest(),
    ]
    assert tmp_files(tmp_path / "spool") == []


def header_field(raw: bytes, name: str) -> str:
    """The value of the one ``name:`` field of ``raw``'s header block."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    [value] = [line.split(": ", 1)[1] for line in head.split("\r\n") if line.startswith(name + ":")]
    return value


async def test_the_message_is_in_its_spool_file_before_data_ends(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    """Streamed, not gathered: while the client is still sending, the spool's
    tmp/ holds the prepared header and the body so far; a client that goes
    away then leaves nothing behind."""
    raw = big_message(2 << 20, headers="Subject: cut\r\n")
    async with running_relay(tmp_path, fake_ses) as relay:
        spool = tmp_path / "spool"
        _, writer = await in_data(relay, SENDER)
        try:
            writer.write(raw[: len(raw) // 2])
            await writer.drain()
            await wait_until(lambda: spooled_bytes(spool) >= len(raw) // 4, "the body in tmp/")
            [name] = tmp_files(spool)
            assert ".eml." in name
            head = (spool / "tmp" / name).read_bytes()[:200]
            assert head.startswith(b"From: App <app@example.com>\r\nTo: Bob <bob@example.net>\r\n")
            assert b"\r\nMessage-ID: <" in head  # prepared before the body came
        finally:
            writer.transport.abort()
        await wait_until(lambda: tmp_files(spool) == [], "the partial message to be removed")
        assert list((spool / "queue").iterdir()) == []
    assert fake_ses.requests == []


def spooled_bytes(spool: Path) -> int:
    return sum(p.stat().st_size for p in (spool / "tmp").iterdir())


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.mark.parametrize(
    ("tail", "refusal"),
    [
        (b"bare\nnewline\r\n", "550 5.5.2 bare CR or LF not allowed"),
        (b"a NUL \x00\r\n", "550 5.6.0 NUL character not allowed in message"),
        (b"x" * 70_000 + b"\r\n", "552 5.3.4 Message size exceeds fixed maximum message size"),
    ],
    ids=["bare-newline", "nul", "too-big"],
)
async def test_a_refused_data_leaves_no_file(
    tmp_path: Path, fake_ses: FakeSes, tail: bytes, refusal: str
) -> None:
    raw = big_message(300_000, headers="Subject: refused\r\n") + tail
    async with running_relay(
        tmp_path, fake_ses, smtp={"bare_newline": "reject", "max_message_size": 370_000}
    ) as relay:
        reader, writer = await in_data(relay, SENDER)
        try:
            writer.write(raw.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            assert (await last_reply_line(reader)).decode().rstrip("\r\n") == refusal
            assert tmp_files(tmp_path / "spool") == []  # gone before the client heard
        finally:
            writer.transport.abort()
        assert list((tmp_path / "spool" / "queue").iterdir()) == []
    assert fake_ses.requests == []


async def test_an_eio_at_the_message_fsync_gives_452_and_nothing_queued(
    tmp_path: Path, fake_ses: FakeSes, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    failed: list[str] = []

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "/tmp/" in name and ".eml." in name and not failed:
            failed.append(name)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    raw = big_message(1 << 20, headers="Subject: eio\r\n")
    async with running_relay(tmp_path, fake_ses) as relay:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(relay, raw, ["b@x.net"])
        assert (refused.value.code, refused.value.message[:6]) == (452, "4.3.1 ")
        assert failed
        spool = tmp_path / "spool"
        assert tmp_files(spool) == []
        assert list((spool / "queue").iterdir()) == []
        assert fake_ses.requests == []
        code, text = await send(relay, raw, ["b@x.net"])  # the next one is taken
        assert code == 250, text
    assert len(fake_ses.requests) == 1
