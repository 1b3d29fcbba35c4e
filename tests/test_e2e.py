"""SMTP in, SES out: real SMTP clients against the running relay and the fake SES."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import smtplib
import ssl
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from relay.app import Relay
from relay.auth import hash_password
from relay.delivery import COMMITS
from tests.fakeses import FakeSes, RawReply, SesErrorReply, Succeed, error_body, send_raw_email_body
from tests.fsyncgate import JournalSyncGate
from tests.relayd import in_data, running_relay

SENDER = "app@example.com"


def message(
    *,
    to: str = "Bob <bob@example.net>",
    extra_headers: str = "",
    body: str = "Hello from a legacy app.\r\n",
) -> bytes:
    return (
        f"From: App <{SENDER}>\r\nTo: {to}\r\nSubject: test\r\n"
        f"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n"
        f"{extra_headers}\r\n{body}"
    ).encode()


async def send(
    relay: Relay,
    recipients: list[str],
    raw: bytes,
    *,
    sender: str = SENDER,
) -> tuple[int, str]:
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=15) as client:
        await client.mail(sender)
        for recipient in recipients:
            await client.rcpt(recipient)
        response = await client.data(raw)
    return response.code, response.message


async def test_one_recipient_reaches_ses_byte_for_byte(tmp_path: Path, fake_ses: FakeSes) -> None:
    raw = message()
    fake_ses.script(Succeed(message_id="0100-first-message"))
    async with running_relay(tmp_path, fake_ses) as relay:
        code, text = await send(relay, ["bob@example.net"], raw)
    assert code == 250
    [request] = fake_ses.requests
    assert text.startswith("2.0.0 Ok: ")
    assert text.endswith(" sent as 0100-first-message")
    assert request.raw_message == raw
    assert request.destinations == ["bob@example.net"]
    assert request.params["Source"] == SENDER
    assert request.signature_ok


async def test_a_sent_message_is_recorded_done_on_disk_without_more_traffic(
    tmp_path: Path, fake_ses: FakeSes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply does not wait for the done record's fdatasync, and no new
    message comes to make it: the relay syncs it soon all the same."""
    async with running_relay(tmp_path, fake_ses) as relay:
        gate = JournalSyncGate(monkeypatch, tmp_path / "spool" / "journal")
        code, text = await send(relay, ["bob@example.net"], message())
        assert code == 250, text
        assert relay.spool is not None
        journal = relay.spool.journal
        async with asyncio.timeout(15):
            while journal.unsynced():
                await asyncio.sleep(0.01)
        assert gate.written() == []  # a restart would not send it again
    assert [r.destinations for r in fake_ses.requests] == [["bob@example.net"]]


@pytest.mark.parametrize(
    ("to_header", "sizes"),
    [("undisclosed-recipients:;", [50, 50, 20]), ("Team <team@example.org>", [49, 49, 22])],
)
async def test_120_recipients_make_three_calls_none_lost_or_repeated(
    tmp_path: Path, fake_ses: FakeSes, to_header: str, sizes: list[int]
) -> None:
    recipients = [f"user{i}@example.net" for i in range(120)]
    async with running_relay(tmp_path, fake_ses, smtp={"max_recipients": 200}) as relay:
        code, text = await send(relay, recipients, message(to=to_header))
    assert code == 250, text
    calls = fake_ses.requests
    assert sorted(len(r.destinations) for r in calls) == sorted(sizes)
    delivered = [d for r in calls for d in r.destinations]
    assert sorted(delivered) == sorted(recipients)
    assert len({r.raw_message for r in calls}) == 1
    for request in calls:
        assert request.params["RawMessage.Data"]


async def test_bcc_recipient_delivered_and_header_absent(tmp_path: Path, fake_ses: FakeSes) -> None:
    raw = message(extra_headers="Bcc: hidden@example.org\r\n")
    async with running_relay(tmp_path, fake_ses) as relay:
        code, _ = await send(relay, ["bob@example.net", "hidden@example.org"], raw)
    assert code == 250
    [request] = fake_ses.requests
    assert request.destinations == ["bob@example.net", "hidden@example.org"]
    assert request.raw_message is not None
    assert b"Bcc" not in request.raw_message
    assert b"hidden@example.org" not in request.raw_message


async def test_ses_headers_become_parameters(tmp_path: Path, fake_ses: FakeSes) -> None:
    raw = message(
        extra_headers=(
            "X-SES-CONFIGURATION-SET: marketing\r\n"
            "X-SES-MESSAGE-TAGS: campaign=fall, team=ops\r\n"
            "X-SES-SOURCE-ARN: arn:aws:ses:us-east-1:123456789012:identity/example.com\r\n"
            "X-SES-FROM-ARN: arn:aws:ses:us-east-1:123456789012:identity/example.com\r\n"
            "X-SES-RETURN-PATH-ARN: arn:aws:ses:us-east-1:123456789012:identity/example.com\r\n"
        )
    )
    async with running_relay(
        tmp_path, fake_ses, smtp={"identity_header_networks": ["127.0.0.0/8"]}
    ) as relay:
        code, _ = await send(relay, ["bob@example.net"], raw)
    assert code == 250
    [request] = fake_ses.requests
    arn = "arn:aws:ses:us-east-1:123456789012:identity/example.com"
    assert request.params["ConfigurationSetName"] == "marketing"
    assert request.tags == [("campaign", "fall"), ("team", "ops")]
    assert request.params["SourceArn"] == arn
    assert request.params["FromArn"] == arn
    assert request.params["ReturnPathArn"] == arn
    assert request.raw_message is not None
    assert b"X-SES-" not in request.raw_message


async def test_identity_headers_need_a_privilege(tmp_path: Path, fake_ses: FakeSes) -> None:
    raw = message(extra_headers="X-SES-FROM-ARN: arn:aws:ses:us-east-1:1:identity/other.com\r\n")
    async with running_relay(tmp_path, fake_ses) as relay:
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send(relay, ["bob@example.net"], raw)
    assert caught.value.code == 550
    assert caught.value.message == "5.7.1 X-SES-FROM-ARN header is not allowed for this client"
    assert fake_ses.requests == []


async def test_configured_configuration_set_is_the_default(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    async with running_relay(tmp_path, fake_ses, ses={"configuration_set": "default-set"}) as relay:
        await send(relay, ["bob@example.net"], message())
    assert fake_ses.requests[0].params["ConfigurationSetName"] == "default-set"


async def test_unverified_sender_gets_ses_text_as_5xx(tmp_path: Path, fake_ses: FakeSes) -> None:
    fake_ses.script(
        SesErrorReply(400, "MessageRejected", "Email address is not verified. app@example.com")
    )
    async with running_relay(tmp_path, fake_ses) as relay:
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send(relay, ["bob@example.net"], message())
    assert caught.value.code == 554
    assert caught.value.message == (
        "5.7.1 message rejected by SES: Email address is not verified. app@example.com"
    )


async def test_ses_outage_queues_then_delivers_exactly_once(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    fake_ses.script(*[SesErrorReply(503, "ServiceUnavailable", "down", "Receiver")] * 4)
    async with running_relay(
        tmp_path,
        fake_ses,
        ses={"max_attempts": 2},
        delivery={"retry_min": 0.05, "retry_max": 0.1},
    ) as relay:
        code, text = await send(relay, ["bob@example.net"], message())
        assert code == 250
        assert text.startswith("2.0.0 Ok: queued as ")
        queue_id = text.rsplit(" ", 1)[1]
        requests = await fake_ses.wait_for_requests(5, within=10)
        await wait_until_gone(relay, queue_id)
    assert [r.destinations for r in requests if r.signature_ok][-1] == ["bob@example.net"]
    assert len(fake_ses.requests) == 5  # 4 refused, 1 accepted, none after


async def wait_until_gone(relay: Relay, queue_id: str, within: float = 10.0) -> None:
    """Until the spool no longer holds ``queue_id`` (delivered and removed)."""
    assert relay.spool is not None
    spool = relay.spool
    async with asyncio.timeout(within):
        while await asyncio.to_thread(spool.find, queue_id) is not None:
            await asyncio.sleep(0.02)


async def test_null_sender_uses_the_from_header_as_source(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    async with running_relay(tmp_path, fake_ses) as relay:
        code, _ = await send(relay, ["bob@example.net"], message(), sender="")
    assert code == 250
    assert fake_ses.requests[0].params["Source"] == SENDER


async def test_message_without_from_is_refused(tmp_path: Path, fake_ses: FakeSes) -> None:
    raw = b"To: bob@example.net\r\nSubject: x\r\n\r\nbody\r\n"
    async with running_relay(tmp_path, fake_ses) as relay:
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send(relay, ["bob@example.net"], raw)
    assert (caught.value.code, caught.value.message) == (
        550,
        "5.6.0 message has no From: header with an address",
    )
    assert fake_ses.requests == []


async def test_to_header_over_fifty_is_refused_with_advice(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    to = ", ".join(f"u{i}@example.net" for i in range(51))
    async with running_relay(tmp_path, fake_ses) as relay:
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send(relay, ["u0@example.net"], message(to=to))
    assert caught.value.code == 550
    assert caught.value.message.startswith("5.5.3 the To/Cc headers name 51 addresses")
    assert fake_ses.requests == []


LIMIT = 7_864_320


async def test_size_limit_is_advertised_and_enforced_both_ways(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    async with running_relay(tmp_path, fake_ses) as relay:
        host, port = relay.smtp_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as client:
            await client.ehlo()
            assert client.esmtp_extensions["size"] == str(LIMIT)
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await client.mail(SENDER, options=[f"SIZE={LIMIT + 1}"])
            assert refused.value.code == 552
            assert refused.value.message.startswith("5.3.4")
            await client.rset()
            await client.mail(SENDER)
            await client.rcpt("bob@example.net")
            head = message(body="")
            raw = head + b"x" * (LIMIT + 1 - len(head))
            with pytest.raises(aiosmtplib.SMTPDataError) as too_big:
                await client.data(raw)
            assert too_big.value.code == 552
            assert too_big.value.message.startswith("5.3.4")
    assert fake_ses.requests == []


async def test_message_at_the_limit_reaches_ses(tmp_path: Path, fake_ses: FakeSes) -> None:
    head = message(body="")
    raw = head + b"y" * (LIMIT - len(head) - 2) + b"\r\n"
    async with running_relay(tmp_path, fake_ses) as relay:
        code, _ = await send(relay, ["bob@example.net"], raw)
    assert code == 250
    assert fake_ses.requests[0].raw_message == raw


async def test_client_outside_allowed_networks_must_authenticate(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    async with running_relay(
        tmp_path, fake_ses, smtp={"allowed_networks": ["192.0.2.0/24"]}
    ) as relay:
        host, port = relay.smtp_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as client:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
                await client.mail(SENDER)
    assert (caught.value.code, caught.value.message) == (530, "5.7.0 Authentication required")
    assert fake_ses.requests == []


async def test_ipv6_listener(tmp_path: Path, fake_ses: FakeSes) -> None:
    async with running_relay(tmp_path, fake_ses, smtp={"listen": ["[::1]:0"]}) as relay:
        host, port = relay.smtp_addresses[0]
        assert host == "::1"

        def send_with_smtplib() -> None:
            with smtplib.SMTP(host, port, timeout=15) as client:
                client.sendmail(SENDER, ["bob@example.net"], message())

        await asyncio.to_thread(send_with_smtplib)
    assert fake_ses.requests[0].destinations == ["bob@example.net"]


@pytest.fixture
def relay_cert(tls_ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """A certificate for the relay, issued by the test CA, as config keys."""
    cert = tls_ca.issue_cert("relay.test", "127.0.0.1")
    cert_path, key_path = tmp_path / "relay.pem", tmp_path / "relay.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return {"tls_cert": str(cert_path), "tls_key": str(key_path)}


@pytest.fixture
def users_file(tmp_path: Path) -> str:
    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password('s3cret', 'bcrypt', bcrypt_rounds=4)}\n")
    return str(path)


def client_tls(ca_pem_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_pem_path))


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_starttls_then_auth_lets_an_outside_client_relay(
    tmp_path: Path,
    fake_ses: FakeSes,
    relay_cert: dict[str, str],
    users_file: str,
    ca_pem_path: Path,
    mechanism: str,
) -> None:
    async with running_relay(
        tmp_path,
        fake_ses,
        smtp={"allowed_networks": ["192.0.2.0/24"], **relay_cert},
        auth={"users_file": users_file, "failure_delay": 0.0},
    ) as relay:
        host, port = relay.smtp_addresses[0]
        client = aiosmtplib.SMTP(
            hostname=host, port=port, start_tls=False, tls_context=client_tls(ca_pem_path)
        )
        async with client:
            await client.ehlo()
            assert "auth" not in client.esmtp_extensions
            assert "starttls" in client.esmtp_extensions
            await client.starttls()
            await client.ehlo()
            assert client.esmtp_extensions["auth"] == "PLAIN LOGIN"
            auth = client.auth_plain if mechanism == "PLAIN" else client.auth_login
            response = await auth("alice", "s3cret")
            assert (response.code, response.message) == (235, "2.7.0 Authentication successful")
            await client.sendmail(SENDER, ["bob@example.net"], message())
    assert fake_ses.requests[0].destinations == ["bob@example.net"]


async def test_auth_over_plain_text_is_refused(
    tmp_path: Path, fake_ses: FakeSes, relay_cert: dict[str, str], users_file: str
) -> None:
    async with running_relay(
        tmp_path, fake_ses, smtp=relay_cert, auth={"users_file": users_file}
    ) as relay:
        host, port = relay.smtp_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as client:
            await client.ehlo()
            response = await client.execute_command(b"AUTH", b"PLAIN", b"AGFsaWNlAHMzY3JldA==")
    assert (response.code, response.message) == (
        538,
        "5.7.11 Encryption required for requested authentication mechanism",
    )


async def test_wrong_password_gets_535_and_no_relay(
    tmp_path: Path,
    fake_ses: FakeSes,
    relay_cert: dict[str, str],
    users_file: str,
    ca_pem_path: Path,
) -> None:
    async with running_relay(
        tmp_path,
        fake_ses,
        smtp={"allowed_networks": ["192.0.2.0/24"], "tls_listen": ["127.0.0.1:0"], **relay_cert},
        auth={"users_file": users_file, "failure_delay": 0.0},
    ) as relay:
        host, port = relay.tls_addresses[0]
        client = aiosmtplib.SMTP(
            hostname=host, port=port, use_tls=True, tls_context=client_tls(ca_pem_path)
        )
        async with client:
            await client.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
                await client.auth_plain("alice", "wrong")
            assert caught.value.code == 535
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await client.mail(SENDER)
            assert refused.value.code == 530
    assert fake_ses.requests == []


def proxy_v1(source: str) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 40000 25\r\n".encode()


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


def behind_proxy(trusted: str) -> dict[str, object]:
    """PROXY protocol believed from ``trusted``; 198.51.100.0/24 may relay."""
    return {
        "proxy_protocol": True,
        "proxy_trusted_networks": [trusted],
        "allowed_networks": ["198.51.100.0/24"],
    }


async def test_proxy_header_decides_who_may_relay(tmp_path: Path, fake_ses: FakeSes) -> None:
    async with running_relay(
        tmp_path,
        fake_ses,
        smtp=behind_proxy("127.0.0.1/32"),
    ) as relay:
        host, port = relay.smtp_addresses[0]
        results = {}
        for source in ("198.51.100.7", "203.0.113.9"):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(proxy_v1(source))
            assert (await read_reply(reader)).startswith(b"220 ")
            writer.write(b"EHLO client.test\r\n")
            await read_reply(reader)
            writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
            results[source] = await read_reply(reader)
            writer.close()
            await writer.wait_closed()
    assert results["198.51.100.7"].startswith(b"250 ")
    assert results["203.0.113.9"] == b"530 5.7.0 Authentication required\r\n"


async def test_proxy_header_from_an_untrusted_peer_relays_nothing(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that is not a load balancer claims an allowed network: closed
    before the banner, nothing relayed, the log names the peer."""
    caplog.set_level(logging.INFO, logger="relay.smtp")
    async with running_relay(
        tmp_path,
        fake_ses,
        smtp=behind_proxy("10.0.0.0/8"),
    ) as relay:
        host, port = relay.smtp_addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            proxy_v1("198.51.100.7")
            + f"EHLO c\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n".encode()
            + message()
            + b".\r\nQUIT\r\n"
        )
        try:
            received = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            received = b""
        writer.close()
        assert received == b""
        assert await relay.limiter.wait_idle(10)
    assert fake_ses.requests == []
    lines = [r.getMessage() for r in caplog.records if "client=" in r.getMessage()]
    assert lines == [
        "client=127.0.0.1: closed: PROXY header from a peer outside smtp.proxy_trusted_networks"
    ]


async def test_log_names_the_client_and_the_proxy_that_vouched_for_it(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtp")
    fake_ses.script(Succeed(message_id="0100-via-proxy"))
    async with running_relay(
        tmp_path,
        fake_ses,
        smtp=behind_proxy("127.0.0.1/32"),
    ) as relay:
        host, port = relay.smtp_addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(proxy_v1("198.51.100.7"))
        replies = [await read_reply(reader)]
        for command in (b"EHLO c", f"MAIL FROM:<{SENDER}>".encode(), b"RCPT TO:<bob@example.net>"):
            writer.write(command + b"\r\n")
            replies.append(await read_reply(reader))
        writer.write(b"DATA\r\n")
        assert (await read_reply(reader)).startswith(b"354 ")
        writer.write(message() + b".\r\n")
        sent = await read_reply(reader)
        writer.close()
        await writer.wait_closed()
    assert [reply[:4] for reply in replies] == [b"220 ", b"250-", b"250 ", b"250 "]
    assert sent.startswith(b"250 2.0.0 Ok: ")
    [request] = fake_ses.requests
    assert request.destinations == ["bob@example.net"]
    [line] = [r.getMessage() for r in caplog.records if " from=<" in r.getMessage()]
    assert f"client=198.51.100.7 via=127.0.0.1 user=- from=<{SENDER}> rcpts=1 " in line


CRLF_FORGERY = b"&#13;&#10;250 forged&#13;&#10;"
"""CR LF encoded in SES's XML, then a line that would pass for a reply or a log line."""


async def transaction_replies(relay: Relay, raw: bytes) -> tuple[list[bytes], bytes]:
    """A message over a raw socket: every line that came back after the
    message's end marker, until the NOOP sent after it is answered; and NOOP's."""
    reader, writer = await in_data(relay, SENDER, "bob@example.net")
    try:
        writer.write(raw + b".\r\nNOOP\r\n")
        lines = []
        async with asyncio.timeout(10):
            while not (line := await reader.readline()).startswith(b"250 2.0.0 OK"):
                lines.append(line)
        return lines, line
    finally:
        writer.close()


def log_lines_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def log_lines_broken(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records that would print as more than one line."""
    breaks = ("\r", "\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")
    return [r.getMessage() for r in caplog.records if any(c in r.getMessage() for c in breaks)]


async def test_message_id_with_crlf_adds_no_reply_line_and_no_log_line(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    """SES said yes (200) with a MessageId holding CR LF: the message counts as
    sent (no second call, no duplicate); the client gets one reply line
    without that id; the log gets a warning on one line."""
    caplog.set_level(logging.INFO)
    body = send_raw_email_body("0100-accepted", "req-crlf")
    fake_ses.script(RawReply(200, body.replace(b"0100-accepted", b"0100-accepted" + CRLF_FORGERY)))
    async with running_relay(tmp_path, fake_ses) as relay:
        lines, noop = await transaction_replies(relay, message())
    [reply] = lines
    assert reply.startswith(b"250 2.0.0 Ok: ")
    assert reply.endswith(b" sent as (SES gave no usable message id)\r\n")
    assert noop == b"250 2.0.0 OK\r\n"
    assert len(fake_ses.requests) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "SES accepted a message (request req-crlf) with a MessageId that is not a token, "
        "not used: '0100-accepted 250 forged'"
    ]
    assert log_lines_with(caplog, "250 forged") == warnings
    assert log_lines_broken(caplog) == []


async def test_ses_error_message_with_crlf_stays_on_one_reply_line(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    body = error_body("MessageRejected", "Email address is not verified.MARK", "req-bad")
    fake_ses.script(
        RawReply(400, body.replace(b"MARK", CRLF_FORGERY + b"&#x2028;&#133;&#x9B;[31m end"))
    )
    async with running_relay(tmp_path, fake_ses) as relay:
        lines, noop = await transaction_replies(relay, message())
    assert lines == [
        b"554 5.7.1 message rejected by SES: Email address is not verified. 250 forged [31m end\r\n"
    ]
    assert noop == b"250 2.0.0 OK\r\n"
    assert len(fake_ses.requests) == 1
    [status] = log_lines_with(caplog, "250 forged")
    assert (
        " status=554 5.7.1 message rejected by SES: Email address is not verified. "
        "250 forged [31m end delay="
    ) in status
    assert log_lines_broken(caplog) == []


SMUGGLED = (
    b"From: <app@example.com>\r\nTo: <bob@example.net>\r\nSubject: outer\r\n\r\n"
    b"legit body\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.net>\nDATA\n"
    b"From: evil@example.com\n\nsmuggled\n.\n"
    b"end\r\n.\r\n"
)


@pytest.mark.parametrize("mode", ["normalize", "reject"])
async def test_smuggling_never_reaches_ses_as_two_messages(
    tmp_path: Path, fake_ses: FakeSes, mode: str
) -> None:
    async with running_relay(tmp_path, fake_ses, smtp={"bare_newline": mode}) as relay:
        host, port = relay.smtp_addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        await read_reply(reader)
        for command in (b"EHLO c", f"MAIL FROM:<{SENDER}>".encode(), b"RCPT TO:<bob@example.net>"):
            writer.write(command + b"\r\n")
            assert (await read_reply(reader))[:1] == b"2"
        writer.write(b"DATA\r\n")
        assert (await read_reply(reader)).startswith(b"354")
        writer.write(SMUGGLED)
        reply = await read_reply(reader)
        writer.write(b"QUIT\r\n")
        tail = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert tail.startswith(b"221")  # exactly one reply to DATA came before
    if mode == "reject":
        assert reply == b"550 5.5.2 bare CR or LF not allowed\r\n"
        assert fake_ses.requests == []
        return
    assert reply.startswith(b"250 ")
    [request] = fake_ses.requests
    assert request.destinations == ["bob@example.net"]
    raw = request.raw_message
    assert raw is not None
    assert raw.replace(b"\r\n", b"").count(b"\n") == 0
    assert raw.replace(b"\r\n", b"").count(b"\r") == 0
    assert b"MAIL FROM:<evil@example.com>" in raw  # content, not a command


# -- group commit: messages that arrive together share the spool's fsync ----------

CLIENTS = 6
"""More than ``relay.delivery.COMMITS``: some share a commit."""


async def send_any(relay: Relay, n: int) -> tuple[int, str]:
    """``send``, with the reply to DATA whatever its code."""
    try:
        return await send(relay, [f"user{n}@example.net"], message())
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message


async def clients_held_at_the_commit(
    relay: Relay, gate: JournalSyncGate
) -> list[asyncio.Task[Any]]:
    """``CLIENTS`` clients sending at once, the first one's commit held in
    its fdatasync of the journal, the others' messages written to it
    meanwhile, waiting for an fdatasync (in ``COMMITS`` commits at most):
    until every message is written, or every commit is held (the messages
    that arrived after the last one began wait for a commit, unwritten)."""
    gate.hold = True
    first = asyncio.create_task(send_any(relay, 0))
    assert await asyncio.to_thread(gate.entered.wait, 15)
    clients = [first, *(asyncio.create_task(send_any(relay, n)) for n in range(1, CLIENTS))]
    async with asyncio.timeout(15):
        while len(gate.written()) < CLIENTS and gate.calls < COMMITS:
            await asyncio.sleep(0.01)
    assert gate.calls <= COMMITS
    assert not any(c.done() for c in clients)  # no reply while the fdatasyncs are held
    return clients


async def test_messages_sent_at_once_are_answered_only_after_their_fsync(
    tmp_path: Path, fake_ses: FakeSes, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_relay(tmp_path, fake_ses) as relay:
        gate = JournalSyncGate(monkeypatch, tmp_path / "spool" / "journal")
        clients = await clients_held_at_the_commit(relay, gate)
        gate.release()
        replies = []
        for client in asyncio.as_completed(clients):
            code, text = await client
            assert code == 250, text
            told = re.fullmatch(r"2\.0\.0 Ok: (?:queued as )?(\S+).*", text)
            assert told is not None, text
            queue_id = told[1]
            gate.log.append(("replied", queue_id))
            replies.append(queue_id)
    assert len(set(replies)) == CLIENTS
    for queue_id in replies:
        assert gate.synced(queue_id) < gate.log.index(("replied", queue_id))
    delivered = sorted(d for r in fake_ses.requests for d in r.destinations)
    assert delivered == sorted(f"user{n}@example.net" for n in range(CLIENTS))


async def test_a_failed_fsync_gives_452_to_every_message_it_covered(
    tmp_path: Path, fake_ses: FakeSes, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_relay(tmp_path, fake_ses) as relay:
        gate = JournalSyncGate(monkeypatch, tmp_path / "spool" / "journal")
        clients = await clients_held_at_the_commit(relay, gate)
        gate.release(fail=errno.EIO)
        replies = await asyncio.gather(*clients)
        assert replies == [(452, "4.3.1 Insufficient system storage, try again later")] * CLIENTS
        assert gate.log == []
        assert gate.written() == []  # marked done: a restart does not resume them
        assert sorted(os.listdir(tmp_path / "spool" / "queue")) == []
        assert fake_ses.requests == []
        gate.fail = None
        code, text = await send_any(relay, 99)
    assert code == 250, text
    assert [r.destinations for r in fake_ses.requests] == [["user99@example.net"]]
