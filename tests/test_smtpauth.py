"""relay.smtpauth: AUTH PLAIN / LOGIN over real sockets, STARTTLS and implicit TLS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
import ssl
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import argon2
import pytest
import trustme
from aiosmtpd.smtp import SMTP

from relay.auth import (
    Authenticator,
    PasswordHash,
    Users,
    hash_password,
    parse_hash,
    verify_password,
)
from relay.config import AuthConfig
from relay.session import authenticated_user
from relay.smtpauth import AuthMixin

ALICE_PW = "correct horse"
BOB_PW = "battery staple"
TIMEOUT = 10.0
"""Upper bound on any one wait for the server; the tests take milliseconds."""

SUCCESS = "235 2.7.0 Authentication successful"
INVALID = "535 5.7.8 Authentication credentials invalid"
NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
LOCKED_OUT = "421 4.7.0 too many failed AUTH attempts"


class TestSMTP(AuthMixin, SMTP):  # type: ignore[misc]
    """The smallest SMTP class with our AUTH, as the relay's own is built."""

    __test__ = False


class Handler:
    """No hooks but an extra AUTH mechanism, which must not be offered."""

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> None:
        raise AssertionError("XOAUTH2 must not be reachable")


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


class CountingVerify:
    def __init__(self) -> None:
        self.calls = 0
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()

    def __call__(self, stored: PasswordHash, password: bytes) -> bool:
        with self._lock:
            self.calls += 1
        if self.gate is not None:
            self.gate.wait(timeout=TIMEOUT)
        return verify_password(stored, password)


@dataclass
class Server:
    port: int
    tls_port: int
    client_context: ssl.SSLContext
    authenticator: Authenticator
    verify: CountingVerify
    delays: list[float]
    sessions: list[TestSMTP] = field(default_factory=list)


@pytest.fixture(scope="module")
def users() -> Users:
    cheap = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    alice = parse_hash(hash_password(ALICE_PW, argon2_hasher=cheap))
    bob = parse_hash(hash_password(BOB_PW, "bcrypt", bcrypt_rounds=4))
    assert alice is not None
    assert bob is not None
    return Users.from_hashes("test-users", {"alice": alice, "bob": bob, "ünï": alice})


@pytest.fixture
async def server(tls_ca: trustme.CA, users: Users) -> AsyncIterator[Server]:
    cert = tls_ca.issue_cert("localhost", "127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    client_context = ssl.create_default_context()
    tls_ca.configure_trust(client_context)

    delays: list[float] = []

    async def record_delay(seconds: float) -> None:
        delays.append(seconds)

    verify = CountingVerify()
    config = AuthConfig(max_failures=3, failure_window=600, failure_delay=1.0, hash_threads=2)
    authenticator = Authenticator(users, config, sleep=record_delay, verify=verify)
    loop = asyncio.get_running_loop()
    sessions: list[TestSMTP] = []

    def factory(tls_context: ssl.SSLContext | None) -> TestSMTP:
        smtp = TestSMTP(
            Handler(),
            hostname="relay.test",
            tls_context=tls_context,
            relay_authenticator=authenticator,
            loop=loop,
        )
        sessions.append(smtp)
        return smtp

    starttls = await loop.create_server(lambda: factory(server_context), "127.0.0.1", 0)
    implicit = await loop.create_server(lambda: factory(None), "127.0.0.1", 0, ssl=server_context)
    yield Server(
        port=starttls.sockets[0].getsockname()[1],
        tls_port=implicit.sockets[0].getsockname()[1],
        client_context=client_context,
        authenticator=authenticator,
        verify=verify,
        delays=delays,
        sessions=sessions,
    )
    for listener in (starttls, implicit):
        listener.close()
    for smtp in sessions:
        if smtp.transport is not None:
            smtp.transport.close()
    for listener in (starttls, implicit):
        await asyncio.wait_for(listener.wait_closed(), TIMEOUT)
    authenticator.close()


class Raw:
    """A line-level SMTP client: exact bytes, exact replies, every read bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, tls: ssl.SSLContext | None = None) -> Raw:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None
            ),
            TIMEOUT,
        )
        client = cls(reader, writer)
        assert (await client.reply())[0].startswith("220 ")
        return client

    @classmethod
    async def ready(cls, server: Server, *, implicit: bool = False) -> Raw:
        """Connected, under TLS, after EHLO."""
        if implicit:
            client = await cls.connect(server.tls_port, server.client_context)
        else:
            client = await cls.connect(server.port)
            await client.ehlo()
            assert await client.command("STARTTLS") == ["220 Ready to start TLS"]
            await asyncio.wait_for(
                client.writer.start_tls(server.client_context, server_hostname="localhost"),
                TIMEOUT,
            )
        await client.ehlo()
        return client

    async def reply(self) -> list[str]:
        lines: list[str] = []
        for _ in range(50):
            line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
            assert line.endswith(b"\r\n"), f"connection ended after {lines!r}: {line!r}"
            text = line[:-2].decode()
            lines.append(text)
            if text[3:4] != "-":
                return lines
        raise AssertionError(f"endless reply: {lines!r}")

    async def send(self, line: str | bytes) -> None:
        self.writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")
        await asyncio.wait_for(self.writer.drain(), TIMEOUT)

    async def command(self, line: str | bytes) -> list[str]:
        await self.send(line)
        return await self.reply()

    async def one(self, line: str | bytes) -> str:
        (answer,) = await self.command(line)
        return answer

    async def ehlo(self) -> list[str]:
        lines = await self.command("EHLO client.test")
        assert lines[-1].startswith("250 ")
        return [line[4:] for line in lines]

    async def closed(self) -> bool:
        """True when the server has closed the connection (nothing more to read)."""
        rest = await asyncio.wait_for(self.reader.read(), TIMEOUT)
        assert rest == b"", rest
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)


@pytest.fixture
async def raw_clients() -> AsyncIterator[list[Raw]]:
    clients: list[Raw] = []
    yield clients
    for client in clients:
        await client.close()


async def ready(server: Server, clients: list[Raw], *, implicit: bool = False) -> Raw:
    client = await Raw.ready(server, implicit=implicit)
    clients.append(client)
    return client


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


# --- EHLO and the refusals before any exchange ----------------------------------


async def test_auth_is_offered_only_under_tls_and_only_plain_login(
    server: Server, raw_clients: list[Raw]
) -> None:
    client = await Raw.connect(server.port)
    raw_clients.append(client)
    before = await client.ehlo()
    assert "STARTTLS" in before
    assert not any(line.startswith("AUTH") for line in before)
    assert await client.one(f"AUTH PLAIN {plain('alice', ALICE_PW)}") == NEEDS_TLS
    assert server.verify.calls == 0

    starttls = await ready(server, raw_clients)
    assert "AUTH LOGIN PLAIN" in await starttls.ehlo()
    assert await starttls.one("AUTH XOAUTH2 abc") == "504 5.5.4 Unrecognized authentication type"

    implicit = await ready(server, raw_clients, implicit=True)
    lines = await implicit.ehlo()
    assert "AUTH LOGIN PLAIN" in lines
    assert "STARTTLS" not in lines


async def test_auth_needs_ehlo_and_arguments(server: Server, raw_clients: list[Raw]) -> None:
    client = await Raw.connect(server.tls_port, server.client_context)
    raw_clients.append(client)
    assert await client.one("AUTH PLAIN") == "503 5.5.1 Error: send EHLO first"
    assert (await client.one("HELO client.test")).startswith("250 ")
    assert await client.one("AUTH PLAIN") == "500 5.5.1 Error: command 'AUTH' not recognized"
    await client.ehlo()
    syntax = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
    assert await client.one("AUTH") == syntax
    assert await client.one("AUTH PLAIN a b") == syntax


# --- success ------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit-tls"])
async def test_plain_and_login_with_initial_response(
    server: Server, raw_clients: list[Raw], implicit: bool
) -> None:
    client = await ready(server, raw_clients, implicit=implicit)
    assert await client.one(f"AUTH PLAIN {plain('alice', ALICE_PW)}") == SUCCESS
    session = server.sessions[-1].session
    assert session.authenticated is True
    assert session.auth_data == "alice"
    assert authenticated_user(session) == "alice"
    assert await client.one(f"AUTH PLAIN {plain('alice', ALICE_PW)}") == (
        "503 5.5.1 Already authenticated"
    )

    other = await ready(server, raw_clients, implicit=implicit)
    assert await other.one(f"AUTH LOGIN {b64('bob')}") == "334 " + b64("Password:")
    assert await other.one(b64(BOB_PW)) == SUCCESS
    assert authenticated_user(server.sessions[-1].session) == "bob"
    assert server.delays == []


async def test_plain_and_login_with_challenges(server: Server, raw_clients: list[Raw]) -> None:
    client = await ready(server, raw_clients)
    assert await client.one("auth plain") == "334 "  # mechanism names are case-insensitive
    assert await client.one(plain("alice", ALICE_PW, authzid="alice")) == SUCCESS

    other = await ready(server, raw_clients)
    assert await other.one("AUTH LOGIN") == "334 " + b64("Username:")
    assert await other.one(b64("ünï")) == "334 " + b64("Password:")
    assert await other.one(b64(ALICE_PW)) == SUCCESS
    assert authenticated_user(server.sessions[-1].session) == "ünï"


async def test_aiosmtplib_starttls_and_implicit_tls(server: Server) -> None:
    for method in ("auth_plain", "auth_login"):
        async with aiosmtplib.SMTP(
            hostname="localhost",
            port=server.port,
            tls_context=server.client_context,
            start_tls=True,
            timeout=TIMEOUT,
        ) as smtp:
            await smtp.ehlo()  # STARTTLS reset the session; auth_* do not say EHLO again
            response = await getattr(smtp, method)("alice", ALICE_PW)
            assert (response.code, response.message) == (235, "2.7.0 Authentication successful")
    async with aiosmtplib.SMTP(
        hostname="localhost",
        port=server.tls_port,
        tls_context=server.client_context,
        use_tls=True,
        timeout=TIMEOUT,
    ) as smtp:
        response = await smtp.login("bob", BOB_PW)
        assert response.code == 235


def smtplib_session(server: Server, implicit: bool, how: str) -> tuple[int, bytes]:
    if implicit:
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(
            "localhost", server.tls_port, timeout=TIMEOUT, context=server.client_context
        )
    else:
        smtp = smtplib.SMTP("localhost", server.port, timeout=TIMEOUT)
    with smtp:
        smtp.ehlo()
        if not implicit:
            smtp.starttls(context=server.client_context)
            smtp.ehlo()
        smtp.user, smtp.password = "alice", ALICE_PW
        if how == "login":
            return smtp.login("alice", ALICE_PW)
        mechanism, method = {
            "plain": ("PLAIN", smtp.auth_plain),
            "LOGIN": ("LOGIN", smtp.auth_login),
        }[how]
        # initial_response_ok=False: the challenge form (334, then the answer).
        return smtp.auth(mechanism, method, initial_response_ok=False)


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit-tls"])
@pytest.mark.parametrize("how", ["login", "plain", "LOGIN"])
async def test_smtplib_in_a_thread(server: Server, implicit: bool, how: str) -> None:
    code, message = await asyncio.wait_for(
        asyncio.to_thread(smtplib_session, server, implicit, how), TIMEOUT * 2
    )
    assert (code, message) == (235, b"2.7.0 Authentication successful")


# --- failure ------------------------------------------------------------------


async def test_wrong_password_and_unknown_user_get_535_at_once(
    server: Server, raw_clients: list[Raw]
) -> None:
    client = await ready(server, raw_clients)
    assert await client.one(f"AUTH PLAIN {plain('alice', 'nope')}") == INVALID
    assert await client.one("AUTH LOGIN") == "334 " + b64("Username:")
    assert await client.one(b64("nobody")) == "334 " + b64("Password:")
    assert await client.one(b64("nope")) == INVALID
    assert server.delays == [1.0, 1.0]  # each failure held back failure_delay
    assert server.verify.calls == 2  # the unknown user was checked too (dummy hash)
    assert server.sessions[-1].session.authenticated is None
    assert await client.one("NOOP") == "250 OK"  # the session goes on


async def test_aiosmtplib_gets_535_and_does_not_hang(server: Server) -> None:
    async with aiosmtplib.SMTP(
        hostname="localhost",
        port=server.port,
        tls_context=server.client_context,
        start_tls=True,
        timeout=TIMEOUT,
    ) as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
            await asyncio.wait_for(smtp.login("alice", "wrong"), TIMEOUT)
        assert caught.value.code == 535
        assert caught.value.message == "5.7.8 Authentication credentials invalid"


async def test_other_user_as_authzid_is_refused(server: Server, raw_clients: list[Raw]) -> None:
    client = await ready(server, raw_clients)
    answer = await client.one(f"AUTH PLAIN {plain('alice', ALICE_PW, authzid='bob')}")
    assert answer == INVALID


async def test_lockout_answers_421_and_closes(server: Server, raw_clients: list[Raw]) -> None:
    client = await ready(server, raw_clients)
    assert await client.one(f"AUTH PLAIN {plain('alice', 'guess1')}") == INVALID
    assert await client.one(f"AUTH PLAIN {plain('alice', 'guess2')}") == INVALID
    # The third failure reaches max_failures: 535 for it, then 421 and the close.
    assert await client.command(f"AUTH PLAIN {plain('alice', 'guess3')}") == [INVALID]
    assert await client.reply() == [LOCKED_OUT]
    assert await client.closed()
    checks = server.verify.calls

    # A new connection from the same client: refused without a check, right password or not.
    again = await ready(server, raw_clients, implicit=True)
    assert await again.command(f"AUTH PLAIN {plain('alice', ALICE_PW)}") == [LOCKED_OUT]
    assert await again.closed()
    assert server.verify.calls == checks


async def test_lockout_with_smtplib(server: Server) -> None:
    def attempts() -> list[tuple[int, bytes | str]]:
        answers: list[tuple[int, bytes | str]] = []
        with smtplib.SMTP("localhost", server.port, timeout=TIMEOUT) as smtp:
            smtp.starttls(context=server.client_context)
            smtp.ehlo()
            smtp.user, smtp.password = "alice", "wrong"
            for _ in range(3):
                try:
                    smtp.auth("PLAIN", smtp.auth_plain)
                except smtplib.SMTPAuthenticationError as exc:
                    answers.append((exc.smtp_code, exc.smtp_error))
            # The 421 sent after the third 535 is what the next command reads.
            try:
                answers.append(smtp.noop())
            except smtplib.SMTPServerDisconnected:
                answers.append((-1, b"disconnected"))
        return answers

    answers = await asyncio.wait_for(asyncio.to_thread(attempts), TIMEOUT * 2)
    assert answers[:3] == [(535, b"5.7.8 Authentication credentials invalid")] * 3
    assert answers[3] in {(421, b"4.7.0 too many failed AUTH attempts"), (-1, b"disconnected")}


# --- bad exchanges: aiosmtpd's 501 replies, nothing counted -----------------------


async def test_bad_base64_and_bad_values_get_501_and_are_not_counted(
    server: Server, raw_clients: list[Raw]
) -> None:
    client = await ready(server, raw_clients)
    assert await client.one("AUTH PLAIN !!notbase64!!") == "501 5.5.2 Can't decode base64"
    assert await client.one("AUTH LOGIN !!notbase64!!") == "501 5.5.2 Can't decode base64"
    assert await client.one("AUTH PLAIN") == "334 "
    assert await client.one("%%%") == "501 5.5.2 Can't decode base64"
    assert await client.one(f"AUTH PLAIN {b64('no-nul-here')}") == (
        "501 5.5.2 Can't split auth value"
    )
    assert await client.one("AUTH PLAIN =") == "501 5.5.2 Can't split auth value"
    assert await client.one("AUTH LOGIN") == "334 " + b64("Username:")
    assert await client.one("*") == "501 5.7.0 Auth aborted"
    assert await client.one("AUTH PLAIN") == "334 "
    assert await client.one("A" * 2000) == "500 5.5.6 Authentication exchange line is too long"
    assert server.verify.calls == 0
    assert server.delays == []
    assert not server.authenticator.locked_out("127.0.0.1")


async def test_a_slow_check_does_not_stall_other_sessions(
    server: Server, raw_clients: list[Raw]
) -> None:
    server.verify.gate = threading.Event()
    slow = await ready(server, raw_clients)
    await slow.send(f"AUTH PLAIN {plain('alice', ALICE_PW)}")
    for _ in range(100):
        if server.verify.calls:
            break
        await asyncio.sleep(0.01)
    assert server.verify.calls == 1
    other = await ready(server, raw_clients, implicit=True)
    assert await asyncio.wait_for(other.one("NOOP"), 1.0) == "250 OK"
    server.verify.gate.set()
    assert await slow.reply() == [SUCCESS]


async def test_client_gone_during_the_check_is_harmless(
    server: Server, raw_clients: list[Raw]
) -> None:
    server.verify.gate = threading.Event()
    client = await Raw.ready(server)
    await client.send(f"AUTH PLAIN {plain('alice', 'wrong')}")
    for _ in range(100):
        if server.verify.calls:
            break
        await asyncio.sleep(0.01)
    await client.close()
    server.verify.gate.set()
    later = await ready(server, raw_clients)
    assert await later.one(f"AUTH PLAIN {plain('alice', ALICE_PW)}") == SUCCESS


async def test_no_auth_inside_a_mail_transaction(server: Server, raw_clients: list[Raw]) -> None:
    client = await ready(server, raw_clients)
    assert await client.one("MAIL FROM:<app@example.com>") == "250 OK"
    assert await client.one(f"AUTH PLAIN {plain('alice', ALICE_PW)}") == (
        "503 5.5.1 AUTH not allowed during a mail transaction"
    )
    assert await client.one("RSET") == "250 OK"
    assert await client.one(f"AUTH PLAIN {plain('alice', ALICE_PW)}") == SUCCESS


async def test_stopped_authenticator_answers_454(server: Server, raw_clients: list[Raw]) -> None:
    client = await ready(server, raw_clients)
    server.authenticator.close()
    assert await client.one(f"AUTH PLAIN {plain('alice', ALICE_PW)}") == (
        "454 4.7.0 Temporary authentication failure"
    )
    assert server.sessions[-1].session.authenticated is None
