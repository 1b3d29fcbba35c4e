"""A ``RelaySMTP`` listener on 127.0.0.1 with a recording handler, and a raw client.

``async with smtp_server(max_recipients=3) as server:`` starts
``loop.create_server(smtp_factory(...))`` on a free port; ``server.handler``
records what reached the handler. The handler streams each message to a
file as the relay does (``relay.incoming.IncomingMessage`` over a
``relay.spoolfile.MessageFile`` in ``handler.spool``), its header kept as
it came, and reads it back at the end of DATA. ``RawClient`` speaks SMTP over a plain
stream, byte for byte (smtplib rewrites line endings), and reads replies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.auth import Authenticator
from relay.config import SmtpConfig
from relay.incoming import IncomingMessage
from relay.limiter import ConnectionLimiter, ConnectionOutcome, SessionOutcome
from relay.message import PreparedMessage
from relay.ses.sender import NO_PARAMETERS
from relay.session import client_address
from relay.smtp import RelaySMTP, smtp_factory
from relay.spoolfile import MessageFile

TIMEOUT = 10.0
"""Upper bound on any one wait in these tests; they take milliseconds."""
HOSTNAME = "relay.test"


@dataclass
class Received:
    """One message as the handler got it."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    client: str


@dataclass
class RecordingHandler:
    """Accepts everything (as the lead's handler does for a trusted client) and records it.

    ``replies`` scripts the next DATA replies; ``fail_on`` makes a hook raise.
    """

    messages: list[Received] = field(default_factory=list)
    mail_froms: list[str] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    fail_on: dict[str, Exception] = field(default_factory=dict)
    data_started: asyncio.Event = field(default_factory=asyncio.Event)
    data_release: asyncio.Event | None = None
    """If set, handle_DATA waits for it (to hold a hook open)."""
    spool: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="smtpserver-")))
    """Where messages are written as they arrive (empty between transactions)."""
    header_size_limit: int = 1 << 20
    _numbers: Iterator[int] = field(default_factory=itertools.count)

    def _maybe_fail(self, hook: str) -> None:
        error = self.fail_on.get(hook)
        if error is not None:
            raise error

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self._maybe_fail("MAIL")
        self.clients.append(client_address(session))
        self.mail_froms.append(address)
        envelope.mail_from = "" if address == "<>" else address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self._maybe_fail("RCPT")
        self.rcpts.append(address)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA_START(self, server: Any, session: Any, envelope: Any) -> IncomingMessage:
        self._maybe_fail("DATA_START")
        number = next(self._numbers)
        return IncomingMessage(
            f"M{number}",
            MessageFile(self.spool / f"M{number}.eml"),
            header_size_limit=self.header_size_limit,
            prepare=as_received,
        )

    async def handle_DATA(
        self, server: Any, session: Any, envelope: Any, message: IncomingMessage
    ) -> str:
        self.data_started.set()
        if self.data_release is not None:
            await asyncio.wait_for(self.data_release.wait(), TIMEOUT)
        self._maybe_fail("DATA")
        await message.finish()
        file = message.take()
        try:
            with file.reader() as raw:
                content = b"".join(raw.chunks())
        finally:
            file.discard()
        self.messages.append(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                content=content,
                client=client_address(session),
            )
        )
        return self.replies.pop(0) if self.replies else "250 2.0.0 OK"

    def files(self) -> list[str]:
        """The message files left in ``spool`` (none once a DATA is over)."""
        return sorted(path.name for path in self.spool.iterdir())


def as_received(header: bytes, rest: bytes) -> PreparedMessage:
    """A header "prepared" as it came: the file holds what the client sent."""
    return PreparedMessage(
        raw=header, from_address="", originators=(), header_count=0, ses=NO_PARAMETERS
    )


@dataclass
class Tally:
    """The connections the limiter admitted and refused (``relay.limiter.SmtpCounts``)."""

    admitted: int = 0
    refused: int = 0

    def connection(self, outcome: ConnectionOutcome) -> None:
        if outcome == "admitted":
            self.admitted += 1
        else:
            self.refused += 1

    def session(self, outcome: SessionOutcome) -> None:
        pass


@dataclass
class Server:
    host: str
    port: int
    config: SmtpConfig
    handler: RecordingHandler
    limiter: ConnectionLimiter
    counts: Tally


def smtp_config(**overrides: Any) -> SmtpConfig:
    return dataclasses.replace(SmtpConfig(hostname=HOSTNAME), **overrides)


@asynccontextmanager
async def smtp_server(
    *,
    handler: Any = None,
    tls_context: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    authenticator: Authenticator | None = None,
    **overrides: Any,
) -> AsyncIterator[Server]:
    """A listener with ``SmtpConfig(hostname="relay.test", **overrides)``."""
    config = smtp_config(**overrides)
    handler = handler if handler is not None else RecordingHandler()
    counts = Tally()
    limiter = ConnectionLimiter(config.max_connections, config.max_connections_per_client, counts)
    factory = smtp_factory(
        config,
        handler,
        tls_context=tls_context,
        limiter=limiter,
        implicit_tls=implicit_tls,
        authenticator=authenticator,
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory, "127.0.0.1", 0, ssl=tls_context if implicit_tls else None
    )
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield Server(host, port, config, handler, limiter, counts)
    finally:
        server.close()
        limiter.close_all()
        await limiter.wait_idle(TIMEOUT)
        await server.wait_closed()
        if isinstance(handler, RecordingHandler):
            shutil.rmtree(handler.spool, ignore_errors=True)


class RawClient:
    """SMTP by hand over a TCP stream: exact bytes out, parsed replies in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, server: Server, *, ssl_context: ssl.SSLContext | None = None
    ) -> RawClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                server.host,
                server.port,
                ssl=ssl_context,
                server_hostname="localhost" if ssl_context else None,
            ),
            TIMEOUT,
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> tuple[int, list[str]]:
        """The next reply: its code and its lines' texts. EOF raises IncompleteReadError."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), TIMEOUT)
            text = raw[:-2].decode("ascii")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    async def line(self) -> str:
        """The next reply as one string ``"250 2.0.0 OK"`` (last line of a multi-line one)."""
        code, lines = await self.reply()
        return f"{code} {lines[-1]}"

    async def command(self, text: str | bytes) -> str:
        data = text.encode() if isinstance(text, str) else text
        await self.send(data + b"\r\n")
        return await self.line()

    async def greet(self, ehlo: str = "client.test") -> list[str]:
        """Read the banner, say EHLO; the EHLO keywords."""
        await self.line()
        await self.send(f"EHLO {ehlo}\r\n".encode())
        code, lines = await self.reply()
        assert code == 250, lines
        return lines[1:]

    async def replies_until_eof(self) -> list[str]:
        """Every reply line left, until the server closes the connection."""
        found: list[str] = []
        while True:
            try:
                raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), TIMEOUT)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise AssertionError(f"unterminated reply {exc.partial!r}") from None
                return found
            found.append(raw[:-2].decode("ascii"))

    async def at_eof(self) -> bool:
        """True once the server has closed (reads and drops anything before)."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
        except ConnectionResetError:
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


@asynccontextmanager
async def raw_client(
    server: Server, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(server, ssl_context=ssl_context)
    try:
        yield client
    finally:
        await client.close()


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds about server state that has no event of its own.

    Polls every 5 ms, for at most ``TIMEOUT`` seconds.
    """
    async with asyncio.timeout(TIMEOUT):
        while not predicate():
            await asyncio.sleep(0.005)


EHLO = b"EHLO client.test\r\n"
UNDER_HIGH_WATER = 450
"""Pipelined EHLOs whose replies (~40 KB) overflow the kernel's buffers of a
``stalled_client`` but not the relay's write buffer: the relay answers them all
and waits for the next command."""
OVER_HIGH_WATER = 2000
"""Pipelined EHLOs whose replies (~180 KB) leave the relay waiting to write."""
STALLED_RECEIVE_BUFFER = 1024
"""SO_RCVBUF of a client that never reads (the kernel rounds it up to its minimum)."""
STALLED_SEND_BUFFER = 4096
"""SO_SNDBUF of the relay's side of that connection, as on a host short of memory:
loopback would otherwise let the kernel take megabytes of replies."""


@asynccontextmanager
async def stalled_client(
    limiter: ConnectionLimiter, address: tuple[str, int], payload: bytes
) -> AsyncIterator[RelaySMTP]:
    """A client that sends ``payload`` (pipelined commands) and never reads a reply.

    With both socket buffers small, about 6 KB of replies fill the kernel's
    buffers; the rest wait in the relay's own write buffer, and from its
    high-water mark (64 KiB, some 740 EHLO replies) the relay waits to write.
    Yields the relay's protocol object for the connection.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RECEIVE_BUFFER)
    sock.setblocking(False)
    try:
        before = set(limiter._open)
        await asyncio.wait_for(loop.sock_connect(sock, address), TIMEOUT)
        await wait_for(lambda: len(set(limiter._open) - before) == 1)
        [protocol] = set(limiter._open) - before
        assert isinstance(protocol, RelaySMTP)
        server_socket = protocol.transport.get_extra_info("socket")
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STALLED_SEND_BUFFER)
        await asyncio.wait_for(loop.sock_sendall(sock, payload), TIMEOUT)
        yield protocol
    finally:
        sock.close()
