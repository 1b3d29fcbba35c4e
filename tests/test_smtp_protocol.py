"""relay.smtp: the SMTP session over real sockets on 127.0.0.1.

Replies are checked with their enhanced status codes; bounds with small
configured limits and timeouts (waits are on events and replies, never on
fixed sleeps).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import inspect
import ipaddress
import logging
import smtplib
import socket
import ssl
import struct
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiosmtplib
import argon2
import pytest
import trustme
from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.aiosmtpd_compat import HookTable
from relay.auth import (
    Authenticator,
    PasswordHash,
    Users,
    hash_password,
    load_users,
    parse_hash,
    verify_password,
)
from relay.config import AuthConfig
from relay.limiter import ConnectionLimiter
from relay.session import client_address, client_label
from relay.smtp import (
    DATA_INPUT_BUFFER,
    RelaySMTP,
    SessionSettings,
    call_limits,
    smtp_factory,
)
from relay.smtpsyntax import parse_path
from tests.smtpserver import (
    EHLO,
    HOSTNAME,
    OVER_HIGH_WATER,
    STALLED_RECEIVE_BUFFER,
    STALLED_SEND_BUFFER,
    TIMEOUT,
    UNDER_HIGH_WATER,
    RawClient,
    RecordingHandler,
    Server,
    raw_client,
    smtp_config,
    smtp_server,
    stalled_client,
    wait_for,
)

KEYWORDS = ["SIZE 7864320", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"]
MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: t\r\n\r\nHello\r\n"
PASSWORD = "correct horse"
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
TRUSTED_PROXY = ("127.0.0.1/32",)
UNTRUSTED_PROXY = "PROXY header from a peer outside smtp.proxy_trusted_networks"
"""The test clients' address, as the load balancer's: their PROXY headers are believed."""


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tls_ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) with a certificate for localhost."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    tls_ca.configure_trust(client_context)
    return server_context, client_context


def alice() -> Users:
    """One user, alice, with a cheap argon2id hash of ``PASSWORD``."""
    cheap = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    stored = parse_hash(hash_password(PASSWORD, argon2_hasher=cheap))
    assert stored is not None
    return Users.from_hashes("test-users", {"alice": stored})


@pytest.fixture
async def authenticator() -> AsyncIterator[Authenticator]:
    auth = Authenticator(alice(), AuthConfig(failure_delay=0.0, hash_threads=1))
    yield auth
    auth.close()


async def transaction(client: RawClient, sender: str = "a@example.com") -> None:
    assert await client.command(f"MAIL FROM:<{sender}>") == "250 2.1.0 Ok"
    assert await client.command("RCPT TO:<b@example.net>") == "250 2.1.5 Ok"
    assert (await client.command("DATA")).startswith("354 ")


async def eof_after(client: RawClient) -> list[str]:
    """The replies the server sends before closing."""
    return await client.replies_until_eof()


def proxy_v1(source: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    destination = "2001:db8::25" if ":" in source else "198.51.100.25"
    return f"PROXY {family} {source} {destination} {port} 25\r\n".encode()


def proxy_v2(source: str | None, port: int = 40000) -> bytes:
    """A PROXY v2 header; ``None``: a LOCAL command (a load balancer's health check)."""
    if source is None:
        return PROXY_V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    address = ipaddress.ip_address(source)
    if address.version == 4:
        family, destination = 0x11, ipaddress.ip_address("198.51.100.25")
    else:
        family, destination = 0x21, ipaddress.ip_address("2001:db8::25")
    body = address.packed + destination.packed + struct.pack("!HH", port, 25)
    tlv = bytes([0x04]) + struct.pack("!H", 2) + b"\x00\x00"  # a NOOP TLV, to be skipped
    body += tlv
    return PROXY_V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


# -- banner and EHLO --------------------------------------------------------------


async def test_banner_names_the_host_and_no_version() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        assert await client.line() == f"220 {HOSTNAME} ESMTP ses-relay"


async def test_ehlo_without_tls_configured() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.line()
        await client.send(b"EHLO client.test\r\n")
        code, lines = await client.reply()
    assert code == 250
    assert lines == [HOSTNAME, *KEYWORDS]


async def test_ehlo_advertises_the_configured_size() -> None:
    async with smtp_server(max_message_size=1234) as server, raw_client(server) as client:
        assert await client.greet() == ["SIZE 1234", *KEYWORDS[1:]]


async def test_starttls_then_auth(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], authenticator: Authenticator
) -> None:
    server_context, client_context = tls
    async with (
        smtp_server(tls_context=server_context, authenticator=authenticator) as server,
        raw_client(server) as client,
    ):
        assert await client.greet() == [*KEYWORDS, "STARTTLS"]
        assert await client.command("AUTH PLAIN " + plain("alice", PASSWORD)) == (
            "538 5.7.11 Encryption required for requested authentication mechanism"
        )
        assert await client.command("STARTTLS") == "220 Ready to start TLS"
        await client.writer.start_tls(client_context, server_hostname="localhost")
        await client.send(b"EHLO client.test\r\n")
        _, lines = await client.reply()
        assert lines[1:] == [*KEYWORDS, "AUTH PLAIN LOGIN"]
        assert await client.command("STARTTLS") == "503 5.5.1 TLS already active"
        assert await client.command("AUTH PLAIN " + plain("alice", PASSWORD)) == (
            "235 2.7.0 Authentication successful"
        )
        await transaction(client)
        assert await client.command(MESSAGE + b".") == "250 2.0.0 OK"
    assert server.handler.messages[0].content == MESSAGE


async def test_auth_not_offered_under_tls_without_an_authenticator(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, client_context = tls
    async with smtp_server(tls_context=server_context) as server:
        smtp = aiosmtplib.SMTP(
            hostname=server.host, port=server.port, start_tls=False, tls_context=client_context
        )
        async with smtp:
            await smtp.ehlo()
            assert set(smtp.esmtp_extensions) == {
                "size",
                "8bitmime",
                "pipelining",
                "enhancedstatuscodes",
                "starttls",
            }
            await smtp.starttls(server_hostname="localhost")
            await smtp.ehlo()
            assert set(smtp.esmtp_extensions) == {
                "size",
                "8bitmime",
                "pipelining",
                "enhancedstatuscodes",
            }


async def test_implicit_tls_offers_auth_and_no_starttls(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], authenticator: Authenticator
) -> None:
    server_context, client_context = tls
    async with (
        smtp_server(
            tls_context=server_context, implicit_tls=True, authenticator=authenticator
        ) as server,
        raw_client(server, ssl_context=client_context) as client,
    ):
        assert await client.greet() == [*KEYWORDS, "AUTH PLAIN LOGIN"]
        assert await client.command("STARTTLS") == "503 5.5.1 TLS already active"
        assert await client.command("AUTH PLAIN " + plain("alice", PASSWORD)) == (
            "235 2.7.0 Authentication successful"
        )
        [protocol] = server.limiter._open
        assert isinstance(protocol, RelaySMTP)
        assert protocol.session.ssl is not None
        assert protocol.session.ssl["ssl_object"] is not None


async def test_implicit_tls_with_smtplib(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], authenticator: Authenticator
) -> None:
    server_context, client_context = tls

    def send(port: int) -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP_SSL("localhost", port, context=client_context, timeout=TIMEOUT) as smtp:
            smtp.login("alice", PASSWORD)
            return smtp.sendmail("a@example.com", ["b@example.net"], MESSAGE)

    async with smtp_server(
        tls_context=server_context, implicit_tls=True, authenticator=authenticator
    ) as server:
        assert await asyncio.to_thread(send, server.port) == {}
    assert server.handler.messages[0].content == MESSAGE


async def test_failed_tls_handshake_frees_the_connection(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, _ = tls
    async with smtp_server(tls_context=server_context) as server, raw_client(server) as client:
        await client.greet()
        assert await client.command("STARTTLS") == "220 Ready to start TLS"
        await client.send(b"this is not a TLS ClientHello\r\n" * 4)
        assert await client.at_eof()
        assert await server.limiter.wait_idle(TIMEOUT)


async def test_a_finished_connection_is_freed_without_the_garbage_collector() -> None:
    """With one connection per message, reference cycles left by each one
    made the collector's work a few per cent of the CPU."""
    gc.collect()
    gc.disable()
    try:
        async with smtp_server() as server:
            for _ in range(3):
                async with raw_client(server) as client:
                    await client.greet()
                    assert (await client.command("QUIT")).startswith("221 ")
                    assert await client.at_eof()
            assert await server.limiter.wait_idle(TIMEOUT)
            for _ in range(100):  # the session tasks' last steps: a few turns of the loop
                left = [o for o in gc.get_objects() if isinstance(o, RelaySMTP)]
                if not left:
                    break
                await asyncio.sleep(0)
    finally:
        gc.enable()
    assert left == []


def test_implicit_tls_needs_a_context() -> None:
    with pytest.raises(ValueError, match="TLS context"):
        smtp_factory(
            smtp_config(),
            RecordingHandler(),
            tls_context=None,
            limiter=ConnectionLimiter(1, 1),
            implicit_tls=True,
        )


def test_proxy_protocol_on_implicit_tls_is_refused(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    with pytest.raises(ValueError, match="proxy_protocol"):
        smtp_factory(
            smtp_config(proxy_protocol=True, proxy_trusted_networks=TRUSTED_PROXY),
            RecordingHandler(),
            tls_context=tls[0],
            limiter=ConnectionLimiter(1, 1),
            implicit_tls=True,
        )


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# -- the simple commands ------------------------------------------------------------


async def test_every_reply_has_an_enhanced_status_code() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.line()
        assert await client.command("MAIL FROM:<a@example.com>") == (
            "503 5.5.1 Error: send HELO first"
        )
        await client.command("EHLO client.test")
        assert await client.command("NOOP") == "250 2.0.0 OK"
        assert await client.command("NOOP anything") == "250 2.0.0 OK"
        assert await client.command("RSET") == "250 2.0.0 OK"
        assert await client.command("RSET x") == "501 5.5.4 Syntax: RSET"
        assert await client.command("VRFY b@example.net") == (
            "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
        )
        assert (await client.command("HELP")).startswith("214 2.0.0 ")
        assert await client.command("EXPN list") == "502 5.5.1 EXPN not implemented"
        assert await client.command("RCPT TO:<b@example.net>") == (
            "503 5.5.1 Error: need MAIL command"
        )
        assert await client.command("DATA") == "503 5.5.1 Error: need MAIL command"
        assert await client.command("MAIL FROM:<a@example.com>") == "250 2.1.0 Ok"
        assert await client.command("MAIL FROM:<a@example.com>") == (
            "503 5.5.1 Error: nested MAIL command"
        )
        assert await client.command("DATA") == "503 5.5.1 Error: need RCPT command"
        assert await client.command("RCPT TO:<b@example.net>") == "250 2.1.5 Ok"
        assert await client.command("DATA now") == "501 5.5.4 Syntax: DATA"
        assert await client.command("FROB") == "500 5.5.1 Error: command not recognized"
        assert await client.command("MAIL TO:<x@y.z>") == ("503 5.5.1 Error: nested MAIL command")
        assert await client.command("RSET") == "250 2.0.0 OK"
        assert await client.command("MAIL TO:<x@y.z>") == ("501 5.5.4 Syntax: MAIL FROM:<address>")
        assert await client.command("QUIT") == "221 2.0.0 Bye"
        assert await client.at_eof()


async def test_helo_session_takes_no_parameters() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.line()
        assert await client.command("HELO client.test") == f"250 {HOSTNAME}"
        assert await client.command("MAIL FROM:<a@example.com> SIZE=10") == (
            "501 5.5.4 Syntax: MAIL FROM:<address>"
        )
        await transaction(client)
        assert await client.command(MESSAGE + b".") == "250 2.0.0 OK"


async def test_smtplib_and_aiosmtplib_send() -> None:
    async with smtp_server() as server:

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as smtp:
                return smtp.sendmail("a@example.com", ["b@example.net"], b".leading dot\r\n")

        assert await asyncio.to_thread(send) == {}
        errors, reply = await aiosmtplib.send(
            MESSAGE,
            sender="c@example.com",
            recipients=["d@example.net", "e@example.net"],
            hostname=server.host,
            port=server.port,
            start_tls=False,
        )
        assert errors == {}
        assert reply == "2.0.0 OK"
    first, second = server.handler.messages
    assert first.content == b".leading dot\r\n"
    assert second.rcpt_tos == ["d@example.net", "e@example.net"]
    assert second.content == MESSAGE


# -- MAIL and RCPT ----------------------------------------------------------------------


async def test_size_parameter_over_the_limit_is_refused_at_once() -> None:
    async with smtp_server(max_message_size=1000) as server, raw_client(server) as client:
        await client.greet()
        assert await client.command("MAIL FROM:<a@example.com> SIZE=1001") == (
            "552 5.3.4 Message size exceeds fixed maximum message size"
        )
        assert await client.command("MAIL FROM:<a@example.com> SIZE=x") == (
            "501 5.5.4 Syntax: MAIL FROM:<address>"
        )
        assert await client.command("MAIL FROM:<a@example.com> SIZE=\N{SUPERSCRIPT TWO}") == (
            "501 5.5.4 Syntax: MAIL FROM:<address>"
        )
        assert await client.command("MAIL FROM:<a@example.com> SIZE=1000 BODY=8BITMIME") == (
            "250 2.1.0 Ok"
        )
    assert server.handler.mail_froms == ["a@example.com"]


async def test_aiosmtplib_big_message_is_refused_by_size_parameter() -> None:
    async with smtp_server() as server:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
            await aiosmtplib.send(
                b"x" * (10 * 1024 * 1024 + 1),
                sender="a@example.com",
                recipients=["b@example.net"],
                hostname=server.host,
                port=server.port,
                start_tls=False,
            )
    assert caught.value.code == 552
    assert caught.value.message.startswith("5.3.4 ")


async def test_mail_parameters() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        assert await client.command("MAIL FROM:<a@example.com> SMTPUTF8") == (
            "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
        )
        assert await client.command("MAIL FROM:<a@example.com> BODY=BINARYMIME") == (
            "501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME"
        )
        assert await client.command("MAIL FROM:<a@example.com> AUTH=<>") == "250 2.1.0 Ok"
        assert await client.command("RCPT TO:<b@example.net> NOTIFY=NEVER") == (
            "555 5.5.4 RCPT TO parameters not recognized or not implemented"
        )
        assert await client.command("RCPT TO:<b@example.net> =x") == (
            "501 5.5.4 Syntax: RCPT TO:<address>"
        )


async def test_null_sender_is_accepted() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        assert await client.command("MAIL FROM:<>") == "250 2.1.0 Ok"
        assert await client.command("RCPT TO:<b@example.net>") == "250 2.1.5 Ok"
        assert (await client.command("DATA")).startswith("354")
        assert await client.command(MESSAGE + b".") == "250 2.0.0 OK"
    assert server.handler.mail_froms == ["<>"]
    assert server.handler.messages[0].mail_from == ""


async def test_idn_domains_reach_the_handler_as_punycode() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        await transaction(client, sender="info@bücher.de")
        assert await client.command(MESSAGE + b".") == "250 2.0.0 OK"
        assert await client.command("MAIL FROM:<a@example.com>") == "250 2.1.0 Ok"
        assert await client.command("RCPT TO:<Kunde@Bücher.example>") == "250 2.1.5 Ok"
    assert server.handler.mail_froms[0] == "info@xn--bcher-kva.de"
    assert server.handler.rcpts[-1] == "Kunde@xn--bcher-kva.example"


async def test_non_ascii_local_part_is_refused() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        reply = await client.command("MAIL FROM:<josé@example.com>")
        assert reply.startswith("553 5.6.7 ")
        assert "ASCII" in reply
        assert await client.command("MAIL FROM:<a@example.com>") == "250 2.1.0 Ok"
        assert (await client.command("RCPT TO:<用户@例子.广告>")).startswith("553 5.6.7 ")
        assert await client.command(b"RCPT TO:<b\xff@example.net>") == (
            "500 5.5.2 Error: bad syntax"
        )
    assert server.handler.rcpts == []


async def test_malformed_paths() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        assert await client.command("MAIL FROM:<a@b.>") == "553 5.1.7 Error: malformed address"
        assert await client.command("MAIL FROM:") == "501 5.5.4 Syntax: MAIL FROM:<address>"
        assert (await client.command("MAIL FROM:<a..b@example.com>")).startswith("553 5.1.7 ")
        assert await client.command("MAIL FROM:<@r.example:a@example.com>") == "250 2.1.0 Ok"
        assert await client.command("RCPT TO:<>") == (
            "553 5.1.3 recipient address must be local-part@domain"
        )
        assert await client.command("RCPT TO:<b@[192.0.2.1]>") == "250 2.1.5 Ok"
        assert await client.command('RCPT TO:<"b c"@example.net>') == "250 2.1.5 Ok"
    assert server.handler.mail_froms == ["a@example.com"]
    assert server.handler.rcpts == ["b@[192.0.2.1]", '"b c"@example.net']


async def test_recipients_over_the_limit_get_452() -> None:
    async with smtp_server(max_recipients=3) as server, raw_client(server) as client:
        await client.greet()
        for transaction_number in range(2):
            assert await client.command("MAIL FROM:<a@example.com>") == "250 2.1.0 Ok"
            for i in range(3):
                assert await client.command(f"RCPT TO:<r{i}@example.net>") == "250 2.1.5 Ok"
            for i in range(3, 5):
                assert await client.command(f"RCPT TO:<r{i}@example.net>") == (
                    "452 4.5.3 Too many recipients"
                )
            assert (await client.command("DATA")).startswith("354")
            assert await client.command(MESSAGE + b".") == "250 2.0.0 OK", transaction_number
    for message in server.handler.messages:
        assert message.rcpt_tos == ["r0@example.net", "r1@example.net", "r2@example.net"]


# -- path parsing: the fast path agrees with aiosmtpd's parser ---------------------------


@pytest.fixture(scope="module")
def protocol() -> Iterator[RelaySMTP]:
    loop = asyncio.new_event_loop()
    settings = SessionSettings.from_config(smtp_config(), implicit_tls=False)
    yield RelaySMTP(
        RecordingHandler(), settings=settings, limiter=ConnectionLimiter(1, 1), loop=loop
    )
    loop.close()


ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
local_parts = st.text(alphabet=ATEXT + ".", min_size=1, max_size=12)
domains = st.text(alphabet="abcXYZ019-.", min_size=1, max_size=12)
rests = st.text(alphabet=' \tSIZE=10()<>@x"', max_size=10)


@settings(max_examples=1000)
@given(local=local_parts, domain=domains, rest=rests)
def test_fast_path_parses_as_aiosmtpd_does(
    protocol: RelaySMTP, local: str, domain: str, rest: str
) -> None:
    path = f"<{local}@{domain}>{rest}"
    try:
        expected_address, expected_rest = SMTP._getaddr(protocol, path)
    except Exception as exc:  # aiosmtpd's parser breaks: so must the fast path
        with pytest.raises(type(exc)):
            parse_path(path)
        return
    address, params = parse_path(path)
    assert address == expected_address
    assert params.upper().split() == (expected_rest or "").upper().split()


@pytest.mark.parametrize(
    "path",
    [
        "<a@example.com>",
        "<A.B+c@Sub.Example-1.COM> SIZE=10",
        "<a@example.com>SIZE=10",
        "<a@example.com> (comment) SIZE=10",
        "<a@example.com>\tBODY=8BITMIME",
        "<@relay.example,@b.example:a@example.com>",
        '<"quoted local"@example.com>',
        "<a@[192.0.2.1]>",
        "a@example.com",
        "<a @example.com>",
        "<a@example.com",
        "<>",
        "<a@b c>",
    ],
)
def test_unusual_paths_parse_as_aiosmtpd_does(protocol: RelaySMTP, path: str) -> None:
    expected_address, expected_rest = SMTP._getaddr(protocol, path)
    address, params = parse_path(path)
    assert address == expected_address
    assert params.split() == (expected_rest or "").split()


# -- DATA ---------------------------------------------------------------------------------


async def test_data_is_unstuffed_and_ends_only_at_crlf_dot_crlf() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        await transaction(client)
        assert await client.command(b"..one\r\n...\r\n.two\r\nend\r\n.") == "250 2.0.0 OK"
    assert server.handler.messages[0].content == b".one\r\n..\r\ntwo\r\nend\r\n"


async def test_empty_message() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        await transaction(client)
        assert await client.command(b".") == "250 2.0.0 OK"
    assert server.handler.messages[0].content == b""


async def test_message_over_the_limit_is_refused_after_the_end() -> None:
    async with smtp_server() as server:
        smtp = aiosmtplib.SMTP(hostname=server.host, port=server.port, start_tls=False)
        async with smtp:
            await smtp.mail("a@example.com")
            await smtp.rcpt("b@example.net")
            with pytest.raises(aiosmtplib.SMTPDataError) as caught:
                await smtp.data(b"x" * 1000 + b"\r\n" + b"y" * (10 * 1024 * 1024 + 1))
            assert caught.value.code == 552
            assert caught.value.message == "5.3.4 Message size exceeds fixed maximum message size"
            # The session goes on, with a fresh transaction.
            assert (await smtp.noop()).code == 250
            await smtp.sendmail("a@example.com", ["b@example.net"], MESSAGE)
    assert [m.content for m in server.handler.messages] == [MESSAGE]


async def test_oversized_data_is_not_held_in_memory() -> None:
    limit = 1024 * 1024
    chunk = (b"z" * 1022 + b"\r\n") * 64  # 64 KiB, sent again and again
    total = 10 * 1024 * 1024 + 1
    async with smtp_server(max_message_size=limit) as server, raw_client(server) as client:
        await client.greet()
        await transaction(client)
        tracemalloc.start()
        try:
            sent = 0
            while sent + len(chunk) <= total:
                client.writer.write(chunk)
                await client.writer.drain()
                sent += len(chunk)
            await client.send(b"q" * (total - sent) + b"\r\n.\r\n")
            reply = await client.line()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert reply == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert peak < limit + 2 * 1024 * 1024, peak
    assert server.handler.messages == []


async def test_pipelined_commands_after_the_end_marker() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        # Everything in one write, data included before the 354 comes back.
        await client.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
            b"first\r\n.\r\n"
            b"MAIL FROM:<c@example.com>\r\nRCPT TO:<d@example.net>\r\nDATA\r\n"
        )
        replies = [await client.line() for _ in range(7)]
        assert replies == [
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 OK",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
        ]
        big = b"line of the second message\r\n" * 20_000
        await client.send(big + b".\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        assert await eof_after(client) == [
            "250 2.0.0 OK",
            "250 2.0.0 OK",
            "250 2.0.0 OK",
            "221 2.0.0 Bye",
        ]
    first, second = server.handler.messages
    assert (first.mail_from, first.content) == ("a@example.com", b"first\r\n")
    assert (second.mail_from, second.content) == ("c@example.com", big)


def spy_on_transports(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    record: Callable[[RelaySMTP, tuple[Any, ...]], None],
) -> None:
    """Call ``record(session, args)`` before each call of ``method`` on a
    session's transport."""
    made = RelaySMTP.connection_made

    def connection_made(self: RelaySMTP, transport: Any) -> None:
        original = getattr(transport, method)

        def spied(*args: Any) -> Any:
            record(self, args)
            return original(*args)

        setattr(transport, method, spied)
        made(self, transport)

    monkeypatch.setattr(RelaySMTP, "connection_made", connection_made)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write of the relay's sessions to their transports, in order."""
    seen: list[bytes] = []
    spy_on_transports(monkeypatch, "write", lambda _, args: seen.append(bytes(args[0])))
    return seen


async def test_pipelined_commands_get_their_replies_in_one_write(writes: list[bytes]) -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        before = len(writes)
        rcpts = b"".join(b"RCPT TO:<b%d@example.net>\r\n" % i for i in range(8))
        await client.send(b"MAIL FROM:<a@example.com>\r\n" + rcpts + b"DATA\r\n")
        replies = [await client.line() for _ in range(10)]
        assert replies == [
            "250 2.1.0 Ok",
            *["250 2.1.5 Ok"] * 8,
            "354 End data with <CR><LF>.<CR><LF>",
        ]
        assert len(writes) == before + 1, writes[before:]
        await client.send(MESSAGE + b".\r\n")
        assert await client.line() == "250 2.0.0 OK"
    assert len(server.handler.messages[0].rcpt_tos) == 8


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many bytes each session had buffered each time it stopped reading its socket."""
    seen: list[int] = []
    spy_on_transports(
        monkeypatch,
        "pause_reading",
        lambda session, _: seen.append(len(session.reader._buffer)),  # type: ignore[attr-defined]
    )
    return seen


async def test_data_of_a_few_kilobytes_does_not_stop_reading_and_a_flood_still_does(
    pauses: list[int],
) -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        await client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        assert [await client.line() for _ in range(3)][-1].startswith("354 ")
        await client.send(
            b"Subject: ten kilobytes\r\n\r\n" + (b"x" * 78 + b"\r\n") * 128 + b".\r\n"
        )
        assert await client.line() == "250 2.0.0 OK"
        assert pauses == []
        # Commands have their line limit again.
        assert await client.command(b"X" * 5000) == "500 5.5.2 Line too long"
        await client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        assert [await client.line() for _ in range(3)][-1].startswith("354 ")
        await client.send((b"y" * 998 + b"\r\n") * 2000 + b".\r\n")  # 2 MB at once
        assert await client.line() == "250 2.0.0 OK"
    assert pauses, "a client sending faster than the relay reads was never paused"
    assert max(pauses) <= 2 * DATA_INPUT_BUFFER + 262144  # the buffer and one read of the socket
    assert [len(m.content) for m in server.handler.messages] == [10_266, 2_000_000]


async def test_a_reply_goes_out_at_once_when_no_whole_command_follows() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        await client.send(b"NOOP\r\nNO")  # the next command is not here yet
        assert await client.line() == "250 2.0.0 OK"
        await client.send(b"OP\r\n")
        assert await client.line() == "250 2.0.0 OK"


async def test_held_replies_go_out_while_a_hook_waits() -> None:
    handler = RecordingHandler(data_release=asyncio.Event())
    async with smtp_server(handler=handler) as server, raw_client(server) as client:
        await client.greet()
        # The message comes without waiting for the 354: the replies are held
        # while it is read, and must not wait for the DATA hook (SES) too.
        await client.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n" + MESSAGE + b".\r\n"
        )
        replies = [await client.line() for _ in range(3)]
        assert replies == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
        assert handler.data_started.is_set()
        assert server.handler.messages == []
        handler.data_release.set()
        assert await client.line() == "250 2.0.0 OK"


async def test_handler_reply_is_passed_on_and_made_ascii() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        server.handler.replies.append("554 5.7.1 Refusé")
        await client.greet()
        await transaction(client)
        assert await client.command(MESSAGE + b".") == "554 5.7.1 Refus\\xe9"


# -- unexpected errors ------------------------------------------------------------------------


@pytest.mark.parametrize("hook", ["MAIL", "RCPT", "DATA"])
async def test_internal_error_is_451_without_internals(
    hook: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtp")
    async with smtp_server() as server, raw_client(server) as client:
        server.handler.fail_on[hook] = RuntimeError("secret detail /etc/ses-relay")
        await client.greet()
        await client.send(b"MAIL FROM:<a@example.com>\r\n")
        replies = [await client.line()]
        if hook != "MAIL":
            await client.send(b"RCPT TO:<b@example.net>\r\n")
            replies.append(await client.line())
        if hook == "DATA":
            await client.send(b"DATA\r\n")
            replies.append(await client.line())
            await client.send(MESSAGE + b".\r\n")
            replies.append(await client.line())
        assert replies[-1] == "451 4.3.0 Internal error, try again later"
        # The session goes on; after DATA the transaction is over.
        del server.handler.fail_on[hook]
        assert await client.command("RSET") == "250 2.0.0 OK"
        await transaction(client)
        assert await client.command(MESSAGE + b".") == "250 2.0.0 OK"
    records = [r for r in caplog.records if r.name == "relay.smtp" and r.exc_info]
    assert len(records) == 1
    assert "secret detail" in str(records[0].exc_info[1])  # type: ignore[index]
    assert len(server.handler.messages) == 1


@pytest.mark.parametrize(
    "error",
    [OSError(28, "No space left on device"), ConnectionResetError("upstream reset")],
    ids=["ENOSPC", "reset"],
)
async def test_handler_os_errors_are_internal_errors_too(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtp")
    async with smtp_server() as server, raw_client(server) as client:
        server.handler.fail_on["DATA"] = error
        await client.greet()
        await transaction(client)
        assert await client.command(MESSAGE + b".") == "451 4.3.0 Internal error, try again later"
        assert await client.command("NOOP") == "250 2.0.0 OK"
    assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [error]  # type: ignore[index]


async def test_client_vanishing_mid_data_is_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtp")
    async with smtp_server() as server:
        async with raw_client(server) as client:
            await client.greet()
            await transaction(client)
            await client.send(b"Subject: half a message\r\n")
        assert await server.limiter.wait_idle(TIMEOUT)
    assert server.handler.messages == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- session bounds ---------------------------------------------------------------------------


async def test_too_long_line_is_refused_and_the_session_goes_on() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        assert await client.command("NOOP " + "x" * 600) == "500 5.5.2 Line too long"
        assert await client.command(b"X" * 5000) == "500 5.5.2 Line too long"
        assert await client.command("MAIL FROM:<a@example.com> " + "x" * 520) == (
            "500 5.5.2 Line too long"
        )
        assert await client.command("NOOP") == "250 2.0.0 OK"


async def test_too_many_bad_lines_close_the_session() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        await client.send(b"FROB\r\n" * 4 + b"\r\n")
        assert await eof_after(client) == [
            *["500 5.5.1 Error: command not recognized"] * 4,
            "421 4.7.0 too many bad commands",
        ]


async def test_command_call_limit_closes_with_421() -> None:
    async with smtp_server(max_commands=3) as server, raw_client(server) as client:
        await client.greet()  # one EHLO
        for _ in range(3):
            assert await client.command("NOOP") == "250 2.0.0 OK"
        await client.send(b"NOOP\r\n")
        assert await eof_after(client) == ["421 4.7.0 NOOP sent too many times"]


async def test_messages_per_session_limit() -> None:
    async with smtp_server(max_messages_per_session=1) as server, raw_client(server) as client:
        await client.greet()
        await transaction(client)
        assert await client.command(MESSAGE + b".") == "250 2.0.0 OK"
        await client.send(b"MAIL FROM:<a@example.com>\r\n")
        assert await eof_after(client) == ["421 4.7.0 MAIL sent too many times"]


def test_call_limits_scale_with_the_config() -> None:
    limits = call_limits(
        smtp_config(max_messages_per_session=10, max_recipients=50, max_commands=7)
    )
    assert limits == {"MAIL": 10, "DATA": 10, "RCPT": 500, "RSET": 17, "*": 7}


async def test_idle_timeout() -> None:
    async with smtp_server(idle_timeout=0.3) as server, raw_client(server) as client:
        await client.greet()
        assert await eof_after(client) == ["421 4.4.2 idle timeout"]
        assert await server.limiter.wait_idle(TIMEOUT)


async def test_idle_timeout_before_the_first_command() -> None:
    async with smtp_server(idle_timeout=0.3) as server, raw_client(server) as client:
        assert await eof_after(client) == [
            f"220 {HOSTNAME} ESMTP ses-relay",
            "421 4.4.2 idle timeout",
        ]


async def test_commands_keep_an_idle_session_alive() -> None:
    async with smtp_server(idle_timeout=0.5) as server, raw_client(server) as client:
        await client.greet()
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < 1.0:  # twice the idle timeout, busy all along
            assert await client.command("RSET") == "250 2.0.0 OK"
            await asyncio.sleep(0.05)
        assert await eof_after(client) == ["421 4.4.2 idle timeout"]


async def test_data_timeout() -> None:
    async with (
        smtp_server(idle_timeout=30, data_timeout=0.3) as server,
        raw_client(server) as client,
    ):
        await client.greet()
        await transaction(client)
        await client.send(b"Subject: slow\r\n")
        assert await eof_after(client) == ["421 4.7.0 DATA transfer took too long"]
    assert server.handler.messages == []


async def test_session_timeout() -> None:
    async with (
        smtp_server(idle_timeout=30, session_timeout=0.3) as server,
        raw_client(server) as client,
    ):
        await client.greet()
        assert await eof_after(client) == ["421 4.7.0 session time limit reached"]


async def test_session_timeout_waits_for_a_running_hook() -> None:
    handler = RecordingHandler(data_release=asyncio.Event())
    async with (
        smtp_server(handler=handler, idle_timeout=30, session_timeout=0.5) as server,
        raw_client(server) as client,
    ):
        await client.greet()
        await transaction(client)
        await client.send(MESSAGE + b".\r\n")
        await asyncio.wait_for(handler.data_started.wait(), TIMEOUT)
        [protocol] = server.limiter._open
        assert isinstance(protocol, RelaySMTP)
        await wait_for(lambda: protocol._expired)
        assert handler.data_release is not None
        handler.data_release.set()
        assert await eof_after(client) == [
            "250 2.0.0 OK",
            "421 4.7.0 session time limit reached",
        ]
    assert len(handler.messages) == 1


# -- connection limits -----------------------------------------------------------------------


async def test_global_connection_limit() -> None:
    async with smtp_server(max_connections=2) as server:
        first = await RawClient.connect(server)
        second = await RawClient.connect(server)
        await first.greet()
        await second.greet()
        third = await RawClient.connect(server)
        assert await eof_after(third) == ["421 4.7.0 too many connections"]
        await third.close()
        assert await first.command("QUIT") == "221 2.0.0 Bye"
        await first.close()
        await wait_for(lambda: server.limiter.active == 1)
        fourth = await RawClient.connect(server)
        assert await fourth.greet()
        for client in (second, fourth):
            await client.close()


async def test_per_client_connection_limit() -> None:
    async with smtp_server(max_connections_per_client=1) as server:
        first = await RawClient.connect(server)
        await first.greet()
        second = await RawClient.connect(server)
        assert await eof_after(second) == ["421 4.7.0 too many connections"]
        await second.close()
        assert server.limiter.connections("127.0.0.1") == 1
        await first.close()
        assert await server.limiter.wait_idle(TIMEOUT)
        assert server.limiter.connections("127.0.0.1") == 0


async def test_close_all_says_421() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        server.limiter.close_all()
        assert await eof_after(client) == ["421 4.3.2 Service shutting down"]
        assert await server.limiter.wait_idle(TIMEOUT)


async def test_drain_tells_idle_sessions_and_new_connections_421_at_once() -> None:
    async with smtp_server() as server, raw_client(server) as idle:
        await idle.greet()
        server.limiter.drain()
        assert await eof_after(idle) == ["421 4.3.2 Service shutting down"]
        async with raw_client(server) as late:
            assert await eof_after(late) == ["421 4.3.2 Service shutting down"]
        assert await server.limiter.wait_idle(TIMEOUT)


async def test_drain_lets_a_transaction_finish_then_says_421() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        await transaction(client)
        server.limiter.drain()
        assert await client.command(MESSAGE + b".") == "250 2.0.0 OK"
        assert await eof_after(client) == ["421 4.3.2 Service shutting down"]
        assert len(server.handler.messages) == 1
        assert await server.limiter.wait_idle(TIMEOUT)


async def test_drain_ends_a_transaction_abandoned_with_rset() -> None:
    async with smtp_server() as server, raw_client(server) as client:
        await client.greet()
        assert (await client.command("MAIL FROM:<a@example.com>")).startswith("250")
        server.limiter.drain()
        assert (await client.command("RCPT TO:<b@example.net>")).startswith("250")
        assert await client.command("RSET") == "250 2.0.0 OK"
        assert await eof_after(client) == ["421 4.3.2 Service shutting down"]
        assert server.handler.messages == []


# -- clients that do not read their replies -----------------------------------------------

LONG = 30.0
"""A timeout that must not be the one that acts."""


async def slots_are_freed(server: Server) -> None:
    """Every stalled connection is gone, and a new client gets the banner (not 421)."""
    await wait_for(lambda: server.limiter.active == 0)
    async with raw_client(server) as client:
        assert await client.greet()


async def test_a_client_that_does_not_read_is_dropped_after_write_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with smtp_server(
        max_connections=2,
        max_commands=10_000,
        idle_timeout=LONG,
        session_timeout=LONG,
        write_timeout=0.3,
    ) as server:
        address = (server.host, server.port)
        payload = EHLO * OVER_HIGH_WATER
        async with (
            stalled_client(server.limiter, address, payload),
            stalled_client(server.limiter, address, payload),
        ):
            await slots_are_freed(server)
    drops = [r.message for r in caplog.records if r.name == "relay.smtp"]
    assert len(drops) == 2, drops
    for drop in drops:
        assert drop.startswith("client=127.0.0.1: dropped: a reply waited 0.3s: it does not read (")


async def test_a_tls_client_that_does_not_read_is_dropped_after_write_timeout(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    """TLS transports buffer 512 KiB of unsent replies by default; the relay
    holds them to the same 64 KiB as plain TCP, so ~540 KB of replies that
    the client never reads (its own buffers take a few hundred KB) leave the
    relay waiting to write, and ``write_timeout`` drops the client."""
    server_context, client_context = tls
    async with smtp_server(
        tls_context=server_context,
        implicit_tls=True,
        max_connections=1,
        max_commands=10_000,
        idle_timeout=LONG,
        session_timeout=LONG,
        write_timeout=0.3,
    ) as server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RECEIVE_BUFFER)
        sock.connect((server.host, server.port))
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(
                sock=sock, ssl=client_context, server_hostname="localhost", limit=1024
            ),
            TIMEOUT,
        )
        try:
            await wait_for(lambda: server.limiter.active == 1)
            [protocol] = server.limiter._open
            relay_side = protocol.transport.get_extra_info("socket")
            relay_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STALLED_SEND_BUFFER)
            writer.write(EHLO * 6000)  # never read
            await wait_for(lambda: server.limiter.active == 0)
        finally:
            writer.transport.abort()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                server.host, server.port, ssl=client_context, server_hostname="localhost"
            ),
            TIMEOUT,
        )
        try:  # the slot is free: a new client gets the banner, not 421
            assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"220 ")
        finally:
            writer.close()
    drops = [r.message for r in caplog.records if r.name == "relay.smtp"]
    assert drops == [m for m in drops if m.startswith("client=127.0.0.1: dropped: a reply waited")]
    assert len(drops) == 1


@pytest.mark.parametrize(
    ("timeouts", "payload", "logged"),
    [
        ({"idle_timeout": 0.3}, EHLO * UNDER_HIGH_WATER, "idle timeout"),
        (
            {"data_timeout": 0.3},
            EHLO * UNDER_HIGH_WATER
            + b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
            + b"Subject: never ends\r\n",
            "DATA transfer took too long",
        ),
        ({"session_timeout": 0.5}, EHLO * OVER_HIGH_WATER, "session time limit reached"),
    ],
    ids=["idle", "data", "session"],
)
async def test_a_timeout_drops_a_client_that_does_not_read_at_once(
    timeouts: dict[str, float], payload: bytes, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtp")
    limits: dict[str, float] = {
        "idle_timeout": LONG,
        "data_timeout": LONG,
        "session_timeout": LONG,
        "write_timeout": LONG,
    }
    async with (
        smtp_server(max_connections=1, max_commands=10_000, **(limits | timeouts)) as server,
        stalled_client(server.limiter, (server.host, server.port), payload),
    ):
        await slots_are_freed(server)
    messages = [r.message for r in caplog.records if r.name == "relay.smtp"]
    assert messages[0] == f"client=127.0.0.1: {logged}"
    assert messages[1].startswith("client=127.0.0.1: dropped: it does not read its replies (")
    assert server.handler.messages == []


async def test_a_limit_drops_a_client_that_does_not_read_after_write_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        smtp_server(
            max_connections=1,
            max_commands=UNDER_HIGH_WATER,
            idle_timeout=LONG,
            session_timeout=LONG,
            write_timeout=0.3,
        ) as server,
        stalled_client(server.limiter, (server.host, server.port), EHLO * (UNDER_HIGH_WATER + 1)),
    ):
        await slots_are_freed(server)
    messages = [r.message for r in caplog.records if r.name == "relay.smtp"]
    assert messages[0] == "client=127.0.0.1: closed: EHLO sent too many times"
    assert messages[1].startswith("client=127.0.0.1: dropped: its last replies were not taken (")


async def test_shutdown_drops_clients_that_do_not_read() -> None:
    async with smtp_server(
        max_commands=10_000, idle_timeout=LONG, session_timeout=LONG, write_timeout=LONG
    ) as server:
        address = (server.host, server.port)
        async with (
            stalled_client(server.limiter, address, EHLO * UNDER_HIGH_WATER) as waiting,
            stalled_client(server.limiter, address, EHLO * OVER_HIGH_WATER) as writing,
        ):
            await wait_for(lambda: writing._busy)  # waiting to write an EHLO reply
            server.limiter.drain()  # the session waiting for a command: 421, dropped at once
            await wait_for(lambda: waiting not in server.limiter._open)
            assert server.limiter.active == 1  # the other one is still answering a command
            server.limiter.close_all()
            assert await server.limiter.wait_idle(TIMEOUT)


# -- the relay's own time is not the client's idle time -------------------------------------


async def an_idle_timeout_passes(server: Server, ssl_context: ssl.SSLContext | None = None) -> None:
    """Return once a full ``idle_timeout`` has passed since the call, by the relay's
    own clock: a client that says EHLO now is cut off for its silence."""
    async with raw_client(server, ssl_context=ssl_context) as witness:
        await witness.greet()
        assert await eof_after(witness) == ["421 4.4.2 idle timeout"]


async def test_auth_beyond_the_queue_gets_454_at_once_and_a_queued_auth_is_not_cut_off(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    server_context, client_context = tls
    users_file = tmp_path / "users"
    users_file.write_text(f"alice:{alice().hash_for('alice').value}\n")
    release = threading.Event()

    def held_verify(stored: PasswordHash, password: bytes) -> bool:
        release.wait(TIMEOUT)
        return verify_password(stored, password)

    config = AuthConfig(failure_delay=0.0, hash_threads=1, max_queued_checks=1, max_failures=100)
    auth = Authenticator(load_users(users_file), config, verify=held_verify)
    clients: list[RawClient] = []

    async def auth_sent(password: str) -> RawClient:
        client = await RawClient.connect(server, ssl_context=client_context)
        clients.append(client)
        await client.greet()
        await client.send(f"AUTH PLAIN {plain('alice', password)}\r\n".encode())
        return client

    try:
        async with smtp_server(
            tls_context=server_context, implicit_tls=True, authenticator=auth, idle_timeout=0.5
        ) as server:
            legitimate = await auth_sent(PASSWORD)
            await wait_for(lambda: auth.checks == 1)  # its check runs (and is held)
            queued = await auth_sent("guess")
            await wait_for(lambda: auth.checks == 2)  # this one waits for the hash thread
            for _ in range(3):  # the flood beyond the queue is answered while both wait
                flood = await auth_sent("guess")
                assert await flood.line() == "454 4.7.0 Temporary authentication failure"
            await an_idle_timeout_passes(server, client_context)
            release.set()
            assert await legitimate.line() == "235 2.7.0 Authentication successful"
            assert await queued.line() == "535 5.7.8 Authentication credentials invalid"
            assert await legitimate.command("NOOP") == "250 2.0.0 OK"
    finally:
        release.set()
        for client in clients:
            await client.close()
        auth.close()


async def test_failure_delay_is_not_counted_as_idle_time(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, client_context = tls

    async def delay_past_an_idle_timeout(seconds: float) -> None:
        await an_idle_timeout_passes(server, client_context)

    auth = Authenticator(
        alice(), AuthConfig(failure_delay=1.0, hash_threads=1), sleep=delay_past_an_idle_timeout
    )
    try:
        async with (
            smtp_server(
                tls_context=server_context, implicit_tls=True, authenticator=auth, idle_timeout=0.3
            ) as server,
            raw_client(server, ssl_context=client_context) as client,
        ):
            await client.greet()
            assert await client.command("AUTH PLAIN " + plain("alice", "guess")) == (
                "535 5.7.8 Authentication credentials invalid"
            )
            assert await client.command("AUTH LOGIN") == "334 VXNlcm5hbWU6"
            assert await client.command(base64.b64encode(b"alice")) == "334 UGFzc3dvcmQ6"
            assert await client.command(base64.b64encode(PASSWORD.encode())) == (
                "235 2.7.0 Authentication successful"
            )
    finally:
        auth.close()


async def test_a_handler_hook_is_not_counted_as_idle_time() -> None:
    handler = RecordingHandler(data_release=asyncio.Event())
    async with (
        smtp_server(handler=handler, idle_timeout=0.3) as server,
        raw_client(server) as client,
    ):
        await client.greet()
        await transaction(client)
        await client.send(MESSAGE + b".\r\n")
        await asyncio.wait_for(handler.data_started.wait(), TIMEOUT)
        await an_idle_timeout_passes(server)  # delivering to SES takes a while
        assert handler.data_release is not None
        handler.data_release.set()
        assert await client.line() == "250 2.0.0 OK"
        assert await client.command("NOOP") == "250 2.0.0 OK"
    assert len(handler.messages) == 1


async def test_a_client_silent_during_an_auth_exchange_is_cut_off(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], authenticator: Authenticator
) -> None:
    server_context, client_context = tls
    async with (
        smtp_server(
            tls_context=server_context,
            implicit_tls=True,
            authenticator=authenticator,
            idle_timeout=0.3,
        ) as server,
        raw_client(server, ssl_context=client_context) as client,
    ):
        await client.greet()
        assert await client.command("AUTH LOGIN") == "334 VXNlcm5hbWU6"
        assert await eof_after(client) == ["421 4.4.2 idle timeout"]


class FakeConnection:
    def __init__(self) -> None:
        self.replies: list[str] = []
        self.when_idle: list[str] = []

    def shutdown(self, reply: str) -> None:
        self.replies.append(reply)

    def close_when_idle(self, reply: str) -> None:
        self.when_idle.append(reply)


async def test_limiter_bookkeeping() -> None:
    limiter = ConnectionLimiter(2, 1)
    a, b, c = FakeConnection(), FakeConnection(), FakeConnection()
    assert limiter.open(a)
    assert not limiter.admit(c, "192.0.2.1")  # not open
    assert limiter.admit(a, "192.0.2.1")
    assert limiter.admit(a, "192.0.2.1")  # idempotent
    assert limiter.open(b)
    assert not limiter.open(c)
    assert not limiter.admit(b, "192.0.2.1")
    assert limiter.admit(b, "192.0.2.2")
    assert not await limiter.wait_idle(0.01)
    limiter.close_all()
    assert a.replies == b.replies == ["421 4.3.2 Service shutting down"]
    limiter.release(a)
    limiter.release(a)
    assert limiter.connections("192.0.2.1") == 0
    assert limiter.open(c)
    limiter.release(b)
    limiter.release(c)
    assert limiter.active == 0
    assert await limiter.wait_idle(0.01)


def test_limiter_drain_tells_every_open_connection() -> None:
    limiter = ConnectionLimiter(2, 2)
    a, b = FakeConnection(), FakeConnection()
    assert limiter.open(a)
    assert limiter.open(b)
    assert not limiter.draining
    limiter.drain()
    assert limiter.draining
    assert a.when_idle == b.when_idle == ["421 4.3.2 Service shutting down"]
    assert a.replies == b.replies == []


# -- PROXY protocol ----------------------------------------------------------------------------


async def send_through_proxy(server: Server, header: bytes, sender: str = "a@example.com") -> None:
    async with raw_client(server) as client:
        await client.send(header)
        await client.greet()
        await transaction(client, sender=sender)
        assert await client.command(MESSAGE + b".") == "250 2.0.0 OK"
        assert await client.command("QUIT") == "221 2.0.0 Bye"


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (proxy_v1("192.0.2.7"), "192.0.2.7"),
        (proxy_v1("2001:db8::7"), "2001:db8::7"),
        (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
        (proxy_v2("192.0.2.8"), "192.0.2.8"),
        (proxy_v2("2001:db8::8"), "2001:db8::8"),
        (proxy_v2("::ffff:192.0.2.9"), "192.0.2.9"),
        (proxy_v2(None), "127.0.0.1"),
    ],
)
async def test_proxy_header_gives_the_client_address(header: bytes, client: str) -> None:
    async with smtp_server(proxy_protocol=True, proxy_trusted_networks=TRUSTED_PROXY) as server:
        await send_through_proxy(server, header)
    assert server.handler.clients == [client]
    assert server.handler.messages[0].client == client


async def test_proxy_header_in_the_same_packet_as_commands() -> None:
    async with (
        smtp_server(proxy_protocol=True, proxy_trusted_networks=TRUSTED_PROXY) as server,
        raw_client(server) as client,
    ):
        await client.send(proxy_v2("192.0.2.10") + b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n")
        assert (await client.line()).startswith("220 ")
        await client.reply()
        assert await client.line() == "250 2.1.0 Ok"
    assert server.handler.clients == ["192.0.2.10"]


async def test_per_client_limit_counts_proxy_sources() -> None:
    async with smtp_server(
        proxy_protocol=True, proxy_trusted_networks=TRUSTED_PROXY, max_connections_per_client=1
    ) as server:
        one = await RawClient.connect(server)
        await one.send(proxy_v1("192.0.2.1"))
        await one.greet()
        two = await RawClient.connect(server)
        await two.send(proxy_v2("192.0.2.2"))
        await two.greet()
        three = await RawClient.connect(server)
        await three.send(proxy_v1("192.0.2.1"))
        assert await eof_after(three) == ["421 4.7.0 too many connections"]
        assert server.limiter.connections("192.0.2.1") == 1
        assert server.limiter.connections("192.0.2.2") == 1
        assert server.limiter.connections("127.0.0.1") == 0
        for client in (one, two, three):
            await client.close()


@pytest.mark.parametrize(
    "header",
    [
        b"EHLO client.test\r\n",
        b"PROXY TCP4 192.0.2.300 198.51.100.25 40000 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.25 40000\r\n",
        b"PROXY TCP4 2001:db8::1 198.51.100.25 40000 25\r\n",
        b"PROXY " + b"x" * 2000 + b"\r\n",
        PROXY_V2_SIGNATURE + bytes([0x31, 0x11]) + struct.pack("!H", 12) + b"\0" * 12,
        PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 4) + b"\0" * 4,
    ],
)
async def test_missing_or_garbled_proxy_header_closes(
    header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relay.smtp")
    async with (
        smtp_server(proxy_protocol=True, proxy_trusted_networks=TRUSTED_PROXY) as server,
        raw_client(server) as client,
    ):
        await client.send(header)
        assert await eof_after(client) == []
        assert await server.limiter.wait_idle(TIMEOUT)
    assert server.handler.clients == []
    assert any("PROXY header missing or invalid" in r.getMessage() for r in caplog.records)


async def test_late_proxy_header_closes() -> None:
    async with (
        smtp_server(
            proxy_protocol=True, proxy_trusted_networks=TRUSTED_PROXY, proxy_protocol_timeout=0.3
        ) as server,
        raw_client(server) as client,
    ):
        await client.send(b"PROXY TCP4 192.0.2.1")  # ... and nothing more
        assert await eof_after(client) == []


async def test_proxy_client_address_survives_starttls(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, client_context = tls
    async with (
        smtp_server(
            tls_context=server_context, proxy_protocol=True, proxy_trusted_networks=TRUSTED_PROXY
        ) as server,
        raw_client(server) as client,
    ):
        await client.send(proxy_v1("192.0.2.55"))
        await client.greet()
        assert await client.command("STARTTLS") == "220 Ready to start TLS"
        await client.writer.start_tls(client_context, server_hostname="localhost")
        await client.send(b"EHLO client.test\r\n")
        await client.reply()
        await transaction(client)
        assert await client.command(MESSAGE + b".") == "250 2.0.0 OK"
    assert server.handler.clients == ["192.0.2.55"]


async def test_handler_proxy_hook_can_refuse() -> None:
    class Picky(RecordingHandler):
        async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy: Any) -> bool:
            return str(proxy.src_addr) != "192.0.2.66"

    async with smtp_server(
        handler=Picky(), proxy_protocol=True, proxy_trusted_networks=TRUSTED_PROXY
    ) as server:
        async with raw_client(server) as client:
            await client.send(proxy_v1("192.0.2.66"))
            assert await eof_after(client) == []
        await send_through_proxy(server, proxy_v1("192.0.2.67"))
    assert server.handler.clients == ["192.0.2.67"]


async def bytes_until_closed(client: RawClient) -> bytes:
    """Everything the server sends before it closes (a reset counts as closed)."""
    received = b""
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                chunk = await client.reader.read(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


async def test_proxy_header_from_an_untrusted_peer_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """127.0.0.1 is not a load balancer here: whatever it claims, it is closed at
    once, before a banner, so it takes no slot in another's name and never
    reaches AUTH (where it could lock another address out)."""
    caplog.set_level(logging.WARNING, logger="relay.smtp")
    claims = [
        proxy_v1("10.1.2.3"),
        proxy_v2("192.0.2.1"),
        proxy_v1("192.0.2.1"),
        b"PROXY UNKNOWN\r\n",
    ]
    async with smtp_server(
        proxy_protocol=True,
        proxy_trusted_networks=("10.0.0.0/8",),
        max_connections_per_client=1,
    ) as server:
        clients = [await RawClient.connect(server) for _ in claims]
        for client, header in zip(clients, claims, strict=True):
            await client.send(
                header + b"EHLO c\r\nAUTH PLAIN " + plain("alice", "x").encode() + b"\r\n"
            )
            assert await bytes_until_closed(client) == b""
        for client in clients:
            await client.close()
        assert await server.limiter.wait_idle(TIMEOUT)
        assert server.counts.admitted == 0
    assert server.handler.clients == []
    refusals = [
        r for r in caplog.records if "outside smtp.proxy_trusted_networks" in r.getMessage()
    ]
    assert [(r.levelname, r.getMessage()) for r in refusals] == [
        ("WARNING", f"client=127.0.0.1: closed: {UNTRUSTED_PROXY}")
    ] * len(claims)


def test_proxy_protocol_needs_trusted_networks() -> None:
    with pytest.raises(ValueError, match="proxy_trusted_networks"):
        SessionSettings.from_config(smtp_config(proxy_protocol=True), implicit_tls=False)


def test_client_address_forms() -> None:
    proxy = ProxyData(version=1)
    proxy.protocol = 1
    proxy.src_addr = ipaddress.ip_address("203.0.113.5")
    assert client_address(SimpleNamespace(peer=("10.0.0.1", 1), proxy_data=proxy)) == (
        "203.0.113.5"
    )
    assert client_address(SimpleNamespace(peer=("::ffff:192.0.2.1", 25, 0, 0))) == "192.0.2.1"
    assert client_address(SimpleNamespace(peer=("2001:db8::1", 25, 0, 0))) == "2001:db8::1"
    assert client_address(SimpleNamespace(peer="/run/relay.sock", proxy_data=None)) == (
        "/run/relay.sock"
    )
    invalid = ProxyData(version=None)
    assert client_address(SimpleNamespace(peer=("10.0.0.1", 1), proxy_data=invalid)) == ("10.0.0.1")


def test_client_label_names_the_peer_that_vouched() -> None:
    proxy = ProxyData(version=1)
    proxy.protocol = 1
    proxy.src_addr = ipaddress.ip_address("203.0.113.9")
    assert client_label(SimpleNamespace(peer=("::ffff:10.0.0.5", 1, 0, 0), proxy_data=proxy)) == (
        "203.0.113.9 via=10.0.0.5"
    )
    local = ProxyData(version=2)  # a LOCAL command: the peer speaks for itself
    local.protocol = 0
    assert client_label(SimpleNamespace(peer=("10.0.0.5", 1), proxy_data=local)) == "10.0.0.5"
    assert client_label(SimpleNamespace(peer=("192.0.2.1", 1))) == "192.0.2.1"


# -- per-connection set-up --------------------------------------------------------------------


async def test_reflection_tables_are_right_and_dir_is_whole() -> None:
    handler = RecordingHandler()
    settings = SessionSettings.from_config(smtp_config(), implicit_tls=False)
    hooks = HookTable(handler)
    protocol = RelaySMTP(
        handler,
        settings=settings,
        limiter=ConnectionLimiter(1, 1),
        hooks=hooks,
        loop=asyncio.get_running_loop(),
    )
    assert protocol.event_handler is handler
    assert set(protocol._handle_hooks) == {"MAIL", "RCPT", "DATA_START", "DATA"}
    assert protocol._handle_hooks["DATA"] == handler.handle_DATA
    assert set(protocol._auth_methods) == {"PLAIN", "LOGIN"}
    assert set(protocol._smtp_methods) >= {"EHLO", "MAIL", "RCPT", "DATA", "STARTTLS", "AUTH"}
    assert protocol._smtp_methods["MAIL"] == protocol.smtp_MAIL
    names = dir(protocol)
    assert "connection_made" in names
    assert "limiter" in names


async def test_a_connection_is_set_up_as_aiosmtpd_would_without_reflection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``SMTP.__init__`` is not run per connection (its ``inspect.getmembers``
    and ``dir`` cost most of a connection's set-up); every attribute it sets
    is set, or answered by the class, and sessions work."""
    loop = asyncio.get_running_loop()
    handler = RecordingHandler()
    reference = SMTP(handler, hostname=HOSTNAME, loop=loop)

    def reflection(*args: Any) -> Any:
        raise AssertionError("reflection on a connection")

    monkeypatch.setattr(inspect, "getmembers", reflection)
    settings = SessionSettings.from_config(smtp_config(), implicit_tls=False)
    protocol = RelaySMTP(
        handler,
        settings=settings,
        limiter=ConnectionLimiter(1, 1),
        hooks=HookTable(handler),
        loop=loop,
    )
    missing = {
        name
        for name in vars(reference)
        if name not in vars(protocol) and not hasattr(type(protocol), name)
    }
    assert missing == set()
    same = ("__ident__", "hostname", "enable_SMTPUTF8", "_decode_data", "_tls_handshake_okay")
    same += ("_auth_required", "_auth_callback", "_ehlo_hook_ver", "_proxy_timeout")
    for name in same:
        assert getattr(protocol, name) == getattr(reference, name), name
    assert not protocol.require_starttls
    assert protocol._call_limit_base == dict(call_limits(smtp_config()))
    async with smtp_server(handler=handler) as server, raw_client(server) as client:
        assert await client.greet() == KEYWORDS
        await transaction(client)
        assert await client.command(MESSAGE + b".") == "250 2.0.0 OK"
    assert handler.messages[0].content == MESSAGE


def test_aiosmtpd_command_logging_is_quiet() -> None:
    logging.getLogger("mail.log").setLevel(logging.NOTSET)
    smtp_factory(
        smtp_config(), RecordingHandler(), tls_context=None, limiter=ConnectionLimiter(1, 1)
    )
    assert not logging.getLogger("mail.log").isEnabledFor(logging.INFO)
