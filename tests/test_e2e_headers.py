"""Who a message is from, and what its header costs: real SMTP clients against
the running relay and the fake SES (issue 12, points 2, 5 and 6)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

import relay.handler
from relay.app import Relay
from relay.log import delivery_log
from tests.fakeses import FakeSes
from tests.relayd import running_relay
from tests.test_e2e import client_tls, read_reply, relay_cert, users_file

__all__ = ["relay_cert", "users_file"]  # fixtures, used by name

ALICE = "alice@allowed.example"
SENDER_RULES = {"users": {"alice": {"allowed_senders": [ALICE, "@team.example"]}}}


def message(from_lines: str) -> bytes:
    return (
        f"{from_lines}To: bob@example.net\r\nSubject: hi\r\n"
        "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <m1@allowed.example>\r\n"
        "\r\nbody\r\n"
    ).encode()


@contextlib.asynccontextmanager
async def as_alice(relay: Relay, ca_pem_path: Path) -> AsyncIterator[aiosmtplib.SMTP]:
    """A client after STARTTLS and AUTH as alice (limited to ALICE and @team.example)."""
    host, port = relay.smtp_addresses[0]
    client = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, tls_context=client_tls(ca_pem_path)
    )
    async with client:
        await client.ehlo()
        await client.starttls()
        await client.ehlo()
        await client.auth_plain("alice", "s3cret")
        yield client


async def send_as_alice(relay: Relay, ca_pem_path: Path, raw: bytes) -> tuple[int, str]:
    """One message from alice (``as_alice``)."""
    async with as_alice(relay, ca_pem_path) as client:
        await client.mail(ALICE)
        await client.rcpt("bob@example.net")
        try:
            response = await client.data(raw)
        except aiosmtplib.SMTPDataError as refused:
            return refused.code, refused.message
    return response.code, response.message


NOT_ALLOWED = "5.7.1 {} <eve@evil.example> is not allowed for user alice"


@pytest.mark.parametrize(
    ("from_lines", "code", "text"),
    [
        (  # a second mailbox in From:
            f"From: Alice <{ALICE}>, eve@evil.example\r\n",
            553,
            NOT_ALLOWED.format("From:"),
        ),
        (  # a second From: field
            f"From: {ALICE}\r\nFrom: eve@evil.example\r\n",
            550,
            "5.6.0 message has 2 From: header fields; one is allowed",
        ),
        (  # a second From: field written "From :", once taken as the end of the header
            f"From: {ALICE}\r\nFrom : eve@evil.example\r\n",
            550,
            "5.6.0 message has 2 From: header fields; one is allowed",
        ),
        (  # a group
            f"From: Team: {ALICE}, eve@evil.example;\r\n",
            550,
            "5.6.0 From: header is not a valid mailbox list: "
            "a group is not allowed here, only mailboxes",
        ),
        (  # read as two addresses by Python, as one by some mail readers
            f"From: {ALICE}<eve@evil.example>\r\n",
            550,
            "5.6.0 From: header is not a valid mailbox list: "
            "unexpected '<' after an address: missing ','?",
        ),
        (  # an encoded word that a reader may decode into an address
            f"From: =?utf-8?q?{ALICE}?= <eve@evil.example>\r\n",
            550,
            "5.6.0 From: header is not a valid mailbox list: "
            "an encoded word (=?...?=) inside an address",
        ),
        (  # Sender: is checked too
            f"From: {ALICE}\r\nSender: eve@evil.example\r\n",
            553,
            NOT_ALLOWED.format("Sender:"),
        ),
    ],
)
async def test_a_limited_user_cannot_send_as_anyone_else(
    tmp_path: Path,
    fake_ses: FakeSes,
    relay_cert: dict[str, str],
    users_file: str,
    ca_pem_path: Path,
    from_lines: str,
    code: int,
    text: str,
) -> None:
    async with running_relay(
        tmp_path,
        fake_ses,
        smtp={"allowed_networks": ["192.0.2.0/24"], **relay_cert},
        auth={"users_file": users_file, "failure_delay": 0.0, **SENDER_RULES},
    ) as relay:
        assert await send_as_alice(relay, ca_pem_path, message(from_lines)) == (code, text)
        assert fake_ses.requests == []
        allowed = f"From: Alice <{ALICE}>, bob@team.example\r\nSender: {ALICE}\r\n"
        code, _ = await send_as_alice(relay, ca_pem_path, message(allowed))
    assert code == 250
    [request] = fake_ses.requests
    assert request.raw_message == message(allowed)


async def test_a_limited_user_gets_553_for_a_mail_from_not_allowed(
    tmp_path: Path,
    fake_ses: FakeSes,
    relay_cert: dict[str, str],
    users_file: str,
    ca_pem_path: Path,
) -> None:
    async with (
        running_relay(
            tmp_path,
            fake_ses,
            smtp={"allowed_networks": ["192.0.2.0/24"], **relay_cert},
            auth={"users_file": users_file, "failure_delay": 0.0, **SENDER_RULES},
        ) as relay,
        as_alice(relay, ca_pem_path) as client,
    ):
        refused = []
        for sender in ("eve@evil.example", "alice@sub.team.example", "alice@team.example.net"):
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
                await client.mail(sender)
            refused.append((caught.value.code, caught.value.message))
        accepted = await client.mail("Carol@Team.Example")  # a domain entry, any case
        await client.rcpt("bob@example.net")
        sent = await client.data(message("From: Carol@Team.Example\r\n"))
    assert refused == [
        (553, f"5.7.1 MAIL FROM <{sender}> is not allowed for user alice")
        for sender in ("eve@evil.example", "alice@sub.team.example", "alice@team.example.net")
    ]
    assert (accepted.code, sent.code) == (250, 250)
    [request] = fake_ses.requests
    assert request.params["Source"] == "Carol@Team.Example"


async def test_deeply_nested_comment_gets_5xx_and_one_log_line(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    raw = message("From: " + "(" * 50_000 + "x" + ")" * 50_000 + " a@example.com\r\n")
    async with running_relay(tmp_path, fake_ses) as relay:
        host, port = relay.smtp_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as client:
            with pytest.raises(aiosmtplib.SMTPDataError) as caught:
                await client.sendmail("a@example.com", ["bob@example.net"], raw)
    assert (caught.value.code, caught.value.message) == (
        550,
        "5.6.0 From: header is not a valid mailbox list: comments nested more than 8 deep",
    )
    assert fake_ses.requests == []
    data_lines = [r for r in caplog.records if "status=550 5.6.0" in r.getMessage()]
    assert len(data_lines) == 1
    assert "\n" not in data_lines[0].getMessage()
    assert all(r.exc_info is None and r.levelno < logging.WARNING for r in caplog.records)


async def test_header_over_header_size_limit_gets_552(tmp_path: Path, fake_ses: FakeSes) -> None:
    folded = "Subject: long\r\n" + " folded line\r\n" * 10_000  # 140 KB
    async with running_relay(tmp_path, fake_ses) as relay:
        host, port = relay.smtp_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as client:
            with pytest.raises(aiosmtplib.SMTPDataError) as caught:
                await client.sendmail(
                    "a@example.com",
                    ["bob@example.net"],
                    message(f"From: a@example.com\r\n{folded}"),
                )
    assert (caught.value.code, caught.value.message) == (
        552,
        "5.3.4 message header exceeds 102400 bytes",
    )
    assert fake_ses.requests == []


async def test_a_large_legal_header_does_not_stall_another_session(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    """While one message with a 4 MB header is decided, a second session's
    NOOPs keep getting answers: the longest wait is a small part of the time
    the decision took (it used to be all of it)."""
    header = "X-Many: y\r\n" * 400_000
    raw = message(f"From: a@example.com\r\n{header}")
    async with running_relay(
        tmp_path,
        fake_ses,
        smtp={"header_size_limit": 5_000_000, "max_commands": 100_000},
    ) as relay:
        host, port = relay.smtp_addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        await read_reply(reader)
        for command in (b"EHLO c", b"MAIL FROM:<a@example.com>", b"RCPT TO:<bob@example.net>"):
            writer.write(command + b"\r\n")
            assert (await read_reply(reader)).startswith(b"250")
        writer.write(b"DATA\r\n")
        assert (await read_reply(reader)).startswith(b"354")
        decided = asyncio.Event()
        waits: list[float] = []

        async def noops() -> None:
            async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as other:
                for _ in range(100_000):
                    if decided.is_set():
                        return
                    started = time.perf_counter()
                    await other.noop()
                    waits.append(time.perf_counter() - started)

        second = asyncio.create_task(noops())
        writer.write(raw + b".\r\n")
        await writer.drain()
        started = time.perf_counter()
        reply = await read_reply(reader)
        decision = time.perf_counter() - started
        decided.set()
        await second
        writer.close()
        await writer.wait_closed()
    assert reply.startswith(b"250 ")
    assert fake_ses.requests[0].raw_message == raw
    assert waits
    assert max(waits) < decision / 4, (max(waits), decision)


async def test_only_a_large_header_is_prepared_off_the_event_loop(
    tmp_path: Path, fake_ses: FakeSes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A usual message is prepared on the event loop, sparing a thread hop; a
    header block of more than 8 KiB (the cost is in its address fields) in a
    thread. Both reach SES as sent."""
    threads: list[bool] = []
    prepare = relay.handler.prepare_header

    def recorded(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return prepare(*args, **kwargs)

    monkeypatch.setattr(relay.handler, "prepare_header", recorded)
    small = message("From: a@example.com\r\n")
    large = message("From: a@example.com\r\n" + "X-Many: y\r\n" * 1000)
    async with running_relay(tmp_path, fake_ses) as running:
        host, port = running.smtp_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as client:
            for raw in (small, large):
                response = await client.sendmail("a@example.com", ["bob@example.net"], raw)
                assert response[1].startswith("2.0.0"), response
        await fake_ses.wait_for_requests(2)
    assert threads == [True, False]
    assert [request.raw_message for request in fake_ses.requests] == [small, large]


async def test_a_suppressed_log_level_builds_no_record(
    tmp_path: Path, fake_ses: FakeSes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With relay.smtp above INFO, the per-message line's fields are not even
    computed (they were, for every message, and then thrown away)."""

    def built(*args: Any) -> Any:
        raise AssertionError("a log record's fields were built for a suppressed level")

    monkeypatch.setattr(relay.handler, "session_fields", built)
    monkeypatch.setattr(delivery_log, "log", built)  # the per-batch lines (relay.msglog)
    loggers = [logging.getLogger("relay.smtp"), delivery_log]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        async with running_relay(tmp_path, fake_ses) as running:
            host, port = running.smtp_addresses[0]
            async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as client:
                raw = message("From: a@example.com\r\n")
                response = await client.sendmail("a@example.com", ["bob@example.net"], raw)
        assert response[1].startswith("2.0.0"), response
        assert " sent as " in response[1], response  # not "queued" after a failed log call
    finally:
        for logger in loggers:
            logger.setLevel(logging.NOTSET)
    assert fake_ses.requests[0].raw_message == raw
