"""The SMTP listener's protocol: aiosmtpd's ``SMTP`` with the relay's session rules.

``smtp_factory`` returns what ``loop.create_server`` needs; each connection
is a ``RelaySMTP``. aiosmtpd keeps the parts it does well (STARTTLS, HELO,
address parsing for unusual paths, PROXY header parsing, AUTH through
``relay.smtpauth.AuthMixin``); this module replaces the command loop, EHLO,
MAIL, RCPT and DATA so that every reply carries an enhanced status code and
every resource has a bound. The handler (``relay.handler``) decides MAIL,
RCPT and DATA through aiosmtpd's hooks and gets ASCII addresses only.

This module is the session's policy and flow; its parts are elsewhere:
``relay.smtpsyntax`` parses command lines and the paths and parameters of
MAIL and RCPT (pure), ``relay.limiter`` counts connections, and
``relay.aiosmtpd_compat`` holds every use of aiosmtpd's private API.
How each connection ended (``relay.limiter.SessionOutcome``) is told to the
limiter when it closes, for ``ses_relay_smtp_sessions_total``.

DATA is read in 64 KiB chunks by ``relay.dataread.DataReader`` (dot
unstuffing, size limit, bare CR/LF and NUL rules, SMTP smuggling); the bytes
that follow the end marker in the last chunk are the client's pipelined
commands and go back to the front of the stream's buffer (``unread``).
The message is never gathered here: it goes as it arrives to the sink the
handler gives when DATA starts (``DataSink``; the relay's writes it to the
spool), which gets it back in the DATA hook, or is discarded.
The replies to pipelined commands go out in one write (``push``).

Replies given here (the handler's own replies come on top):

===============================================  ===============================================
EHLO                                             SIZE, 8BITMIME, PIPELINING, ENHANCEDSTATUSCODES;
                                                 STARTTLS until TLS is on (never on implicit TLS);
                                                 AUTH PLAIN LOGIN only under TLS
over ``max_connections`` / ``..._per_client``    ``421 4.7.0 too many connections`` (no banner)
PROXY header missing, garbled or late            connection closed, nothing sent
peer outside ``proxy_trusted_networks``          connection closed at once, nothing sent or read
``MAIL ... SIZE=`` over ``max_message_size``     ``552 5.3.4``
malformed path                                   ``553 5.1.7`` (MAIL) / ``553 5.1.3`` (RCPT)
non-ASCII local part, bad IDN domain             ``553 5.6.7`` / ``553 5.1.x`` (relay.addresses)
RCPT over ``max_recipients``                     ``452 4.5.3 Too many recipients``
DATA over ``max_message_size``                   ``552 5.3.4``, after the end marker
bare CR/LF with ``bare_newline = "reject"``      ``550 5.5.2 bare CR or LF not allowed``
NUL in DATA                                      ``550 5.6.0``
command line too long                            ``500 5.5.2 Line too long``, session goes on
5 unrecognized, too long or garbled lines        ``421 4.7.0`` and close
a command past its ``command_call_limit``        ``421 4.7.0 <CMD> sent too many times``, close
``idle_timeout`` of client silence                ``421 4.4.2 idle timeout``, close (the relay's
                                                 own work on a command does not count)
``data_timeout`` for one DATA transfer           ``421 4.7.0 DATA transfer took too long``, close
``session_timeout``                              ``421 4.7.0 session time limit reached``, close
                                                 (deferred until a running handler hook answers)
a reply unsent for ``write_timeout``             connection dropped (the client does not read)
a close with earlier replies still unsent        dropped at once (timeouts, shutdown), or after
                                                 ``write_timeout`` (QUIT, refusals)
unexpected exception (ours or the handler's)     ``451 4.3.0 Internal error, try again later``
``ConnectionLimiter.close_all`` (shutdown)       ``421 4.3.2 Service shutting down``, close
===============================================  ===============================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import MISSING, Envelope, Session, TLSSetupException

from relay.addresses import ascii_address
from relay.aiosmtpd_compat import AiosmtpdSMTP, HookTable, line_waiting
from relay.auth import Authenticator
from relay.config import SmtpConfig
from relay.dataread import BareNewline, DataReader
from relay.errors import MessageRefused
from relay.limiter import REPLY_SHUTTING_DOWN, SessionOutcome
from relay.limiter import ConnectionLimiter as ConnectionLimiter  # noqa: PLC0414 (relay.app)
from relay.log import smtp_log
from relay.oneline import one_line
from relay.policy import Network, in_networks, networks
from relay.session import (
    authenticated_user,
    client_label,
    find_client_address,
    peer_address,
    session_fields,
)
from relay.smtpauth import AuthMixin
from relay.smtpsyntax import (
    REPLY_TOO_BIG,
    ehlo_reply,
    parse_command,
    parse_mail,
    parse_rcpt,
)

BANNER_SOFTWARE: Final = "ESMTP ses-relay"

REPLY_TOO_MANY_CONNECTIONS: Final = "421 4.7.0 too many connections"
REPLY_IDLE_TIMEOUT: Final = "421 4.4.2 idle timeout"
REPLY_DATA_TIMEOUT: Final = "421 4.7.0 DATA transfer took too long"
REPLY_SESSION_TIMEOUT: Final = "421 4.7.0 session time limit reached"
REPLY_TOO_MANY_ERRORS: Final = "421 4.7.0 too many bad commands"
REPLY_INTERNAL_ERROR: Final = "451 4.3.0 Internal error, try again later"
REPLY_TOO_MANY_RECIPIENTS: Final = "452 4.5.3 Too many recipients"
REPLY_UNKNOWN_COMMAND: Final = "500 5.5.1 Error: command not recognized"
REPLY_BARE_NEWLINE: Final = "550 5.5.2 bare CR or LF not allowed"
REPLY_NUL: Final = "550 5.6.0 NUL character not allowed in message"
REPLY_NO_HELO: Final = "503 5.5.1 Error: send HELO first"
REPLY_NEED_MAIL: Final = "503 5.5.1 Error: need MAIL command"
REPLY_NEED_RCPT: Final = "503 5.5.1 Error: need RCPT command"
REPLY_NESTED_MAIL: Final = "503 5.5.1 Error: nested MAIL command"
REPLY_INSECURE: Final = "554 5.7.0 Command refused due to lack of security"

BAD_COMMAND_LIMIT: Final = 5
"""Unrecognized, garbled or too long command lines per session before 421."""
WRITE_BUFFER_LIMIT: Final = 65536
"""Bytes of unsent replies before the client counts as not reading (plain and TLS)."""
DATA_CHUNK: Final = 65536
"""Bytes asked of the stream per read while in DATA."""
DATA_INPUT_BUFFER: Final = 16384
"""During DATA, reading the socket pauses once more than twice this many
bytes are buffered (twice the line limit otherwise): a message of 10 KB
arrives without a pause. A client that sends faster than the relay takes
it is paused as before, its buffer at most 32 KiB and the one read of the
socket (up to 256 KiB, asyncio's) that crossed it."""
_TIMER_SLACK: Final = 0.001


def call_limits(config: SmtpConfig) -> dict[str, int]:
    """aiosmtpd's ``command_call_limit``: times each command may be sent per session."""
    messages = config.max_messages_per_session
    return {
        "MAIL": messages,
        "DATA": messages,
        "RCPT": messages * config.max_recipients,
        "RSET": messages + config.max_commands,
        "*": config.max_commands,
    }


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """What every session of one listener needs, computed once per factory."""

    hostname: str
    max_message_size: int
    max_recipients: int
    bare_newline: BareNewline
    idle_timeout: float
    data_timeout: float
    session_timeout: float
    write_timeout: float
    proxy_timeout: float | None
    """Seconds for the PROXY header; None: no PROXY protocol."""
    proxy_trusted: tuple[Network, ...]
    """Peers whose PROXY header is believed; every other peer is closed at once."""
    call_limits: Mapping[str, int]
    implicit_tls: bool

    @classmethod
    def from_config(cls, config: SmtpConfig, *, implicit_tls: bool) -> SessionSettings:
        if config.bare_newline not in ("normalize", "reject"):
            raise ValueError(f"smtp.bare_newline: {config.bare_newline!r}")
        if config.proxy_protocol and not config.proxy_trusted_networks:
            raise ValueError("smtp.proxy_protocol needs smtp.proxy_trusted_networks")
        return cls(
            # Never empty: aiosmtpd would call socket.getfqdn() per connection.
            hostname=config.hostname or socket.getfqdn(),
            max_message_size=config.max_message_size,
            max_recipients=config.max_recipients,
            bare_newline=cast(BareNewline, config.bare_newline),
            idle_timeout=config.idle_timeout,
            data_timeout=config.data_timeout,
            session_timeout=config.session_timeout,
            write_timeout=config.write_timeout,
            proxy_timeout=config.proxy_protocol_timeout if config.proxy_protocol else None,
            proxy_trusted=networks(config.proxy_trusted_networks),
            call_limits=call_limits(config),
            implicit_tls=implicit_tls,
        )

    @property
    def banner(self) -> str:
        return f"220 {self.hostname} {BANNER_SOFTWARE}"


Command = Callable[[Any, str | None], Awaitable[None]]

_commands: dict[type, dict[str, Command]] = {}


def _command_table(cls: type) -> dict[str, Command]:
    """``{"MAIL": RelaySMTP.smtp_MAIL, ...}``, built once per class."""
    table = _commands.get(cls)
    if table is None:
        table = _commands[cls] = {
            name[5:]: getattr(cls, name) for name in dir(cls) if name.startswith("smtp_")
        }
    return table


class RelaySession(Session):
    """aiosmtpd's session, with the client address worked out once."""

    relay_client: str | None = None
    """The client's IP address (PROXY source or peer); see ``client_address``."""


class RelaySMTP(AuthMixin, AiosmtpdSMTP):
    """One SMTP connection; built by ``smtp_factory``, which passes the handler's
    hooks as a ``HookTable`` built once per factory."""

    session_class = RelaySession
    _timeout_reply: str | None = REPLY_IDLE_TIMEOUT

    if TYPE_CHECKING:  # set in connection_made, before any command runs
        session: RelaySession
        envelope: Envelope

    def __init__(
        self,
        handler: object,
        *,
        settings: SessionSettings,
        limiter: ConnectionLimiter,
        hooks: HookTable | None = None,
        tls_context: ssl.SSLContext | None = None,
        authenticator: Authenticator | None = None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(
            hooks if hooks is not None else HookTable(handler),
            data_size_limit=settings.max_message_size,
            hostname=settings.hostname,
            tls_context=None if settings.implicit_tls else tls_context,
            timeout=settings.idle_timeout,
            command_call_limit=settings.call_limits,
            relay_authenticator=authenticator,
            loop=loop,
        )
        self.event_handler = handler
        self.settings = settings
        self.limiter = limiter
        self._closing = False
        self._lost = False
        self._in_hook = False
        self._busy = False
        """A command is running (its reply is not sent yet)."""
        self._command: tuple[str, str | None] | None = None
        """The command running and its argument (``shown_argument`` for a log line)."""
        self._drain_reply: str | None = None
        self._expired = False
        self._deadline: float | None = None
        """When the client's time for what it owes runs out; None: it owes nothing."""
        self._timer_at: float | None = None
        self._session_timer: asyncio.TimerHandle | None = None
        self._write_blocked = False
        """The transport's buffer is over its high-water mark: the client is not reading."""
        self._held: list[bytes] = []
        """Replies not written yet: more pipelined commands were waiting (``push``)."""
        self._held_size = 0
        self._flush_soon: asyncio.Handle | None = None
        """Writes ``_held`` as soon as the session waits for anything."""
        self._write_through = False
        """Every reply is written at once (STARTTLS: its ``220`` precedes the handshake)."""
        self._linger: asyncio.TimerHandle | None = None
        """Drops a closing connection whose last replies were not taken in time."""
        self._outcome: SessionOutcome | None = None
        """How the session ends, once the relay knows; None: the client closed it."""

    # -- connection life ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        previous = self.session
        super().connection_made(transport)
        if isinstance(transport, asyncio.WriteTransport):
            # TLS transports would buffer 512 KiB of unsent replies: as plain TCP.
            transport.set_write_buffer_limits(high=WRITE_BUFFER_LIMIT)
        session = self.session
        if previous is not None:
            # STARTTLS: aiosmtpd starts a new Session (RFC 3207 4.2); who the
            # client is does not change.
            session.proxy_data = previous.proxy_data
            session.relay_client = previous.relay_client
            return
        self._session_timer = self.loop.call_later(
            self.settings.session_timeout, self._session_expired
        )
        if self.settings.implicit_tls:
            session.ssl = {
                name: transport.get_extra_info(name)
                for name in ("sslcontext", "peercert", "cipher", "compression", "ssl_object")
            }

    def connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self.limiter.release(self)
        self.limiter.ended(self._outcome or "disconnected")
        for timer in (self._session_timer, self._linger, self._flush_soon):
            if timer is not None:
                timer.cancel()
        self._held.clear()
        super().connection_lost(error)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_blocked = True

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_blocked = False

    def shutdown(self, reply: str) -> None:
        """Send ``reply`` (a 421) at once and close; for ``ConnectionLimiter.close_all``."""
        self._ending("shutdown")
        self._write_and_close(reply)

    def close_when_idle(self, reply: str) -> None:
        """Send ``reply`` (a 421) and close once no transaction is open: now if
        the session is waiting for a command outside one, else when the
        transaction ends (``ConnectionLimiter.drain``)."""
        self._drain_reply = reply
        if not self._busy and not self._in_transaction():
            self._ending("shutdown")
            self._write_and_close(reply)

    def _in_transaction(self) -> bool:
        return self.envelope.mail_from is not None

    def _ending(self, outcome: SessionOutcome) -> None:
        """Say how the session ends, unless that is said already."""
        if self._outcome is None:
            self._outcome = outcome

    def _close(self) -> None:
        """Close once the replies written so far are sent; a client that has
        not taken them within ``write_timeout`` is dropped."""
        self._closing = True
        if self.transport is None:
            return
        self._flush()
        self.transport.close()
        if self._linger is None and not self._lost:
            self._linger = self.loop.call_later(
                self.settings.write_timeout, self._drop, "its last replies were not taken"
            )

    def _write_and_close(self, reply: str | None) -> None:
        """Send ``reply`` (a 421) and close; for a timeout or a shutdown.

        If earlier replies are still unsent the client is not reading: the
        reply would never reach it, and the connection is dropped at once.
        """
        transport = self.transport
        if transport is None or self._lost:
            return
        if transport.get_write_buffer_size():
            self._drop("it does not read its replies")
            return
        if transport.is_closing():
            return
        if reply:
            self._hold(reply.encode("ascii"))
        self._close()

    def _drop(self, reason: str) -> None:
        """Abort the connection, discarding unsent replies, so that it frees its slot."""
        self._closing = True
        transport = self.transport
        if transport is None or self._lost:
            return
        self._outcome = "dropped"  # whatever ended it, its last replies were lost
        self._held.clear()
        smtp_log.warning(
            "client=%s: dropped: %s (%d bytes unsent)",
            client_label(self.session),
            reason,
            transport.get_write_buffer_size(),
        )
        transport.abort()

    # -- timers --------------------------------------------------------------
    # One timer for "the client owes us something": the PROXY header, the
    # next command or an AUTH answer (idle_timeout), the TLS handshake, or the
    # rest of DATA (data_timeout). While the relay works on a command (a
    # password check, failure_delay, a handler hook delivering to SES) the
    # client owes nothing and the timer is disarmed: only the client's silence
    # counts. Arming only moves a deadline; the timer callback sleeps again if
    # the deadline moved on, so no timer is created per command.

    @contextlib.contextmanager
    def _awaiting_client(self, seconds: float, reply: str) -> Iterator[None]:
        """The client has ``seconds`` for what it owes now, then ``reply`` and close."""
        self._arm(seconds, reply)
        try:
            yield
        finally:
            self._deadline = None

    def _arm(self, seconds: float, reply: str | None) -> None:
        deadline = self.loop.time() + seconds
        self._deadline = deadline
        self._timeout_reply = reply
        if self._timer_at is None or deadline < self._timer_at:
            self.schedule_client_timer(deadline)
            self._timer_at = deadline

    def restart_client_timer(self, seconds: float) -> None:
        self._arm(seconds, self._timeout_reply)

    def client_timer_fired(self) -> None:
        self._timer_at = None
        deadline = self._deadline
        if deadline is None:  # the client owes nothing now
            return
        if deadline - self.loop.time() > _TIMER_SLACK:
            self.schedule_client_timer(deadline)
            self._timer_at = deadline
            return
        if self._timeout_reply is not None:
            smtp_log.info("client=%s: %s", client_label(self.session), self._timeout_reply[10:])
        self._ending("timeout")
        self._write_and_close(self._timeout_reply)

    def _session_expired(self) -> None:
        if self._in_hook:  # let the handler answer first: it may be delivering
            self._expired = True
            return
        smtp_log.info("client=%s: session time limit reached", client_label(self.session))
        self._ending("timeout")
        self._write_and_close(REPLY_SESSION_TIMEOUT)

    # -- the session -----------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        """Send a reply; held back while the client's next command is already here.

        Pipelined commands get their replies in one write, as Postfix
        flushes only once its input is empty (RFC 2920 3.1). A reply is
        written at once when no whole command line is waiting, and held
        replies go out as soon as the session waits for anything (the
        client, a hook, SES): ``_flush_soon`` runs once the session's task
        yields to the loop. A client that does not read is found as before:
        once the transport is over its high-water mark, each reply waits at
        most ``write_timeout`` to be taken, and the held replies are written
        (and waited for) when they reach ``WRITE_BUFFER_LIMIT`` bytes.
        """
        if self._command is not None:
            self._log_refusal(*self._command, status)
        # Replies are ASCII (no SMTPUTF8); a non-ASCII character in a handler's
        # text is escaped rather than failing the reply.
        self._hold(
            status if isinstance(status, bytes) else status.encode("ascii", "backslashreplace")
        )
        if (
            not self._write_blocked
            and not self._write_through
            and self._held_size < WRITE_BUFFER_LIMIT
            and line_waiting(self.reader)
        ):
            if self._flush_soon is None:
                self._flush_soon = self.loop.call_soon(self._flush)
            return
        self._flush()
        writer = self.writer
        if not self._write_blocked:
            await writer.drain()  # returns at once (raises if the connection is gone)
            return
        deadline = asyncio.timeout(self.settings.write_timeout)
        try:
            async with deadline:
                await writer.drain()
        except TimeoutError:
            if not deadline.expired():
                raise
            self._drop(f"a reply waited {self.settings.write_timeout:g}s: it does not read")
            raise ConnectionAbortedError("the client does not read its replies") from None

    def _hold(self, reply: bytes) -> None:
        self._held.append(reply + b"\r\n")
        self._held_size += len(reply) + 2

    def _flush(self) -> None:
        """Write the replies held back, in one write."""
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        held = self._held
        if not held:
            return
        data = held[0] if len(held) == 1 else b"".join(held)
        held.clear()
        self._held_size = 0
        self.writer.write(data)

    def _log_refusal(self, command: str, raw_arg: str | None, status: str | bytes) -> None:
        """One line for a refusal before DATA (``refusal_logged``); nothing of it
        is built unless it is logged."""
        if not smtp_log.isEnabledFor(logging.WARNING):
            return
        reply = status if isinstance(status, str) else status.decode("ascii", "replace")
        if not refusal_logged(command, reply):
            return
        arg = shown_argument(command, raw_arg)
        session = self.session
        user = authenticated_user(session)
        smtp_log.warning(
            "NOQUEUE: reject: %s from client=%s user=%s: %s; arg=%s",
            command,
            client_label(session),
            user or "-",
            reply,
            arg,
            extra={
                "event": "refused",
                **session_fields(session),
                "command": command,
                "arg": arg,
                "reply": reply,
            },
        )

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> Any:
        """aiosmtpd's ``334`` challenge; the client has ``idle_timeout`` to answer."""
        with self._awaiting_client(self.settings.idle_timeout, REPLY_IDLE_TIMEOUT):
            return await super().challenge_auth(challenge, encode_to_b64, log_client_response)

    async def call_hook(self, command: str, *args: Any) -> Any:
        self._in_hook = True
        try:
            return await super().call_hook(command, *args)
        finally:
            self._in_hook = False

    async def serve_client(self) -> None:
        try:
            if await self._admit():
                await self.push(self.settings.banner)
                await self._serve()
        except asyncio.CancelledError:
            self._close()
            raise
        except asyncio.IncompleteReadError:
            self._close()
        except Exception:
            if not self._connection_gone():
                smtp_log.exception("client=%s: session failed", client_label(self.session))
                self._ending("error")
            self._close()

    def _connection_gone(self) -> bool:
        transport = self.transport
        return transport is None or transport.is_closing()

    async def _admit(self) -> bool:
        """Connection limits and the PROXY header; False if the connection is closed."""
        session = self.session
        if self.limiter.draining:
            await self._refuse(REPLY_SHUTTING_DOWN, "shutdown")
            return False
        if not self.limiter.open(self):
            smtp_log.warning(
                "client=%s: refused: %d connections open",
                client_label(session),
                self.limiter.active,
            )
            await self._refuse(REPLY_TOO_MANY_CONNECTIONS, "refused")
            return False
        timeout = self.settings.proxy_timeout
        if timeout is not None:
            self._arm(timeout, None)
            if not await self._read_proxy_header():
                return False
        client = session.relay_client = find_client_address(session)
        if not self.limiter.admit(self, client):
            smtp_log.warning(
                "client=%s: refused: %d connections open from it",
                client_label(session),
                self.limiter.connections(client),
            )
            await self._refuse(REPLY_TOO_MANY_CONNECTIONS, "refused")
            return False
        return True

    async def _refuse(self, reply: str, outcome: SessionOutcome) -> None:
        self._ending(outcome)
        await self.push(reply)
        self._close()

    async def _auth_lock_out(self) -> None:
        self._ending("refused")
        await super()._auth_lock_out()

    async def _read_proxy_header(self) -> bool:
        """The PROXY header, believed only from ``proxy_trusted_networks``.

        Any other peer is closed before a byte of its header is read: it could
        claim any address (a trusted network, or a victim to lock out), and
        nothing it sends is worth parsing.
        """
        session = self.session
        peer = peer_address(session)
        if not in_networks(peer, self.settings.proxy_trusted):
            smtp_log.warning(
                "client=%s: closed: PROXY header from a peer outside smtp.proxy_trusted_networks",
                peer,
            )
            self._ending("refused")
            self._close()
            return False
        try:
            proxy = await get_proxy(self.reader)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            proxy = None
        if not proxy:  # aiosmtpd's ProxyData is false when invalid
            problem = getattr(proxy, "error", "") or "no header"
            smtp_log.warning(
                "client=%s: closed: PROXY header missing or invalid (%s)",
                client_label(session),
                problem,
            )
            self._ending("refused")
            self._close()
            return False
        session.proxy_data = proxy
        accepted = await self.call_hook("PROXY", proxy)
        if accepted is not MISSING and not accepted:
            self._ending("refused")
            self._close()
            return False
        return True

    async def _serve(self) -> None:
        """The command loop."""
        settings = self.settings
        idle = settings.idle_timeout
        base_limits = settings.call_limits
        default_limit = base_limits["*"]
        used: Counter[str] = Counter()
        commands = _command_table(type(self))
        bad_lines = 0
        while not self._closing:
            with self._awaiting_client(idle, REPLY_IDLE_TIMEOUT):
                line = await self._read_command_line()
            command, arg, problem = parse_command(line, extended=self.session.extended_smtp)
            method = commands.get(command) if problem is None else None
            if method is None:
                bad_lines += 1
                if bad_lines >= BAD_COMMAND_LIMIT:
                    await self._refuse(REPLY_TOO_MANY_ERRORS, "refused")
                    return
                await self.push(problem or REPLY_UNKNOWN_COMMAND)
                continue
            used[command] += 1
            if used[command] > base_limits.get(command, default_limit):
                smtp_log.warning(
                    "client=%s: closed: %s sent too many times",
                    client_label(self.session),
                    command,
                )
                await self._refuse(f"421 4.7.0 {command} sent too many times", "refused")
                return
            self._busy = True
            self._command = (command, arg)
            try:
                if not self.tls_handshake_okay and command != "QUIT":
                    await self.push(REPLY_INSECURE)
                    continue
                await self._run(command, method, arg)
            finally:
                self._busy = False
                self._command = None
            if self._closing:
                return
            if self._expired:
                await self._refuse(REPLY_SESSION_TIMEOUT, "timeout")
            elif self._drain_reply is not None and not self._in_transaction():
                await self._refuse(self._drain_reply, "shutdown")

    async def _read_command_line(self) -> bytes | None:
        """The next line, or None if it was too long (and has been skipped)."""
        reader = self.reader
        try:
            line: bytes = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
        else:
            return line
        while True:  # skip to the end of the line, bounded by the idle timer
            await reader.read(consumed)
            try:
                await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                consumed = exc.consumed
            else:
                return None

    async def _run(self, command: str, method: Command, arg: str | None) -> None:
        """Run one command; an unexpected error becomes 451 and a log record."""
        try:
            await method(self, arg)
        except TLSSetupException:
            # The handshake failed: nothing can be said in clear any more.
            self._ending("tls_failed")
            self._close()
            if self.transport is not None:
                self.connection_lost(None)
        except MessageRefused as refused:
            await self.push(str(refused.reply))
        except asyncio.IncompleteReadError:
            raise
        except Exception:
            if self._connection_gone():  # the client went away: no one to answer
                raise
            smtp_log.exception(
                "client=%s: internal error in %s", client_label(self.session), command
            )
            if command == "DATA":
                self.reset_envelope()
            await self.push(REPLY_INTERNAL_ERROR)

    # -- commands --------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push("501 Syntax: EHLO hostname")
            return
        self.reset_envelope()
        session = self.session
        session.extended_smtp = True
        session.host_name = hostname
        auth = None
        if self.auth_offered:
            auth = [m for m in ("PLAIN", "LOGIN") if self.mechanism_offered(m)]
        await self.push(
            ehlo_reply(
                self.hostname,
                self.settings.max_message_size,
                starttls=self.tls_context is not None and not self.auth_tls_active,
                auth=auth,
            )
        )

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
        elif self.auth_tls_active:
            await self.push("503 5.5.1 TLS already active")
        elif self.tls_context is None:
            await self.push("454 4.7.0 TLS not available")
        else:
            # The 220 and every reply before it go out in clear, before the
            # handshake; pipelined input after STARTTLS is discarded unread.
            self._write_through = True
            try:
                with self._awaiting_client(self.settings.idle_timeout, REPLY_IDLE_TIMEOUT):
                    await self.start_tls()
            finally:
                self._write_through = False

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.push("250 2.0.0 OK")

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self.reset_envelope()
        status = await self.call_hook("RSET")
        await self.push("250 2.0.0 OK" if status is MISSING else status)

    async def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: QUIT")
            return
        self._ending("quit")
        await self.push("221 2.0.0 Bye")
        self._close()

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.push(
            "214 2.0.0 Commands: AUTH DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET STARTTLS VRFY"
        )

    async def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push("502 5.5.1 EXPN not implemented")

    async def smtp_MAIL(self, arg: str | None) -> None:
        envelope = self.envelope
        if not self.session.host_name:
            await self.push(REPLY_NO_HELO)
            return
        if envelope.mail_from is not None:
            await self.push(REPLY_NESTED_MAIL)
            return
        parsed = parse_mail(
            arg,
            extended=self.session.extended_smtp,
            max_message_size=self.settings.max_message_size,
        )
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        address, options = parsed.address, parsed.options
        if address != "<>":
            address = ascii_address(address, "sender")  # MessageRefused: its 553 reply
        status = await self.call_hook("MAIL", address, options)
        if status is MISSING:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            status = "250 2.1.0 OK"
        await self.push(status)

    async def smtp_RCPT(self, arg: str | None) -> None:
        envelope = self.envelope
        if not self.session.host_name:
            await self.push(REPLY_NO_HELO)
            return
        if envelope.mail_from is None:
            await self.push(REPLY_NEED_MAIL)
            return
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            await self.push(REPLY_TOO_MANY_RECIPIENTS)
            return
        parsed = parse_rcpt(arg, extended=self.session.extended_smtp)
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        options = parsed.options
        address = ascii_address(parsed.address, "recipient")  # MessageRefused: its 553 reply
        status = await self.call_hook("RCPT", address, options)
        if status is MISSING:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
            status = "250 2.1.5 OK"
        await self.push(status)

    async def smtp_DATA(self, arg: str | None) -> None:
        envelope = self.envelope
        if not self.session.host_name:
            await self.push(REPLY_NO_HELO)
            return
        if envelope.mail_from is None:
            await self.push(REPLY_NEED_MAIL)
            return
        if not envelope.rcpt_tos:
            await self.push(REPLY_NEED_RCPT)
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        sink: DataSink = await self.call_hook("DATA_START")  # MessageRefused: its reply
        try:
            await self._read_data(sink)
        finally:
            sink.discard()  # unless the DATA hook took the message

    async def _read_data(self, sink: DataSink) -> None:
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        settings = self.settings
        data = DataReader(settings.max_message_size, settings.bare_newline, write=sink.write)
        stream = self.reader
        with (
            self._awaiting_client(settings.data_timeout, REPLY_DATA_TIMEOUT),
            self.input_buffered_up_to(DATA_INPUT_BUFFER),
        ):
            while not data.done:
                chunk = await stream.read(DATA_CHUNK)
                if not chunk:  # end of stream: nothing to answer
                    self._close()
                    return
                used = data.feed(chunk)
                if used < len(chunk):
                    self.unread(chunk[used:])
                if not data.failed:
                    await sink.settle()
        refusal = (
            REPLY_TOO_BIG
            if data.too_big
            else REPLY_BARE_NEWLINE
            if data.bad_newline
            else REPLY_NUL
            if data.has_nul
            else None
        )
        if refusal is not None:
            sink.discard()  # before the reply: nothing of it is left once the client hears
            self.reset_envelope()
            await self.push(refusal)
            return
        try:
            status = await self.call_hook("DATA", sink)
        finally:
            self.reset_envelope()
        await self.push("250 2.0.0 OK" if status is MISSING else status)


class DataSink(Protocol):
    """Where a DATA transfer's message goes as it arrives: the handler's
    ``handle_DATA_START(server, session, envelope)`` returns one (or raises
    ``MessageRefused``), and ``handle_DATA(server, session, envelope, sink)``
    gets it back at the end of DATA (``relay.incoming.IncomingMessage``)."""

    def write(self, piece: bytes) -> None:
        """The next piece of the message (dot-unstuffed, within the limits)."""

    async def settle(self) -> None:
        """Called after each chunk read, while the client waits: the sink's
        own work on what it got so far."""

    def discard(self) -> None:
        """DATA is over: drop what is left unless ``handle_DATA`` took it."""


REFUSALS_NOT_LOGGED: Final = frozenset({500, 501, 502, 503, 504})
"""Syntax and sequence errors: a client's bug, not a refusal worth a log line."""
ARG_LOG_LIMIT: Final = 200
"""Characters of a refused command's argument in its log line."""


def refusal_logged(command: str, reply: str) -> bool:
    """Whether ``reply`` to ``command`` gets a log line of its own: every
    ``4xx`` or ``5xx`` to MAIL or RCPT but a syntax or sequence error
    (``530``, ``550``, ``552``, ``553``, ``554``, ``452``, ...), and AUTH's
    ``538`` (no TLS). The outcome of an AUTH exchange and a locked-out
    client are logged by ``relay.auth``. Pure."""
    code = int(reply[:3]) if reply[:3].isdigit() else 0
    if command == "AUTH":
        return code == 538
    return command in ("MAIL", "RCPT") and code >= 400 and code not in REFUSALS_NOT_LOGGED


def shown_argument(command: str, arg: str | None) -> str:
    """What a log line may show of ``arg``: for AUTH the mechanism alone
    (the rest is a credential), else the text flattened and bounded."""
    text = arg or ""
    if command == "AUTH":
        text = text.split(" ", 1)[0]
    return one_line(text, ARG_LOG_LIMIT)


def quiet_aiosmtpd_logs() -> None:
    """aiosmtpd logs every connection and command at INFO on "mail.log", and PROXY
    problems at WARNING on "mail.debug"; the relay logs its own events."""
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("mail.debug").setLevel(logging.ERROR)


def smtp_factory(
    config: SmtpConfig,
    handler: object,
    *,
    tls_context: ssl.SSLContext | None,
    limiter: ConnectionLimiter,
    implicit_tls: bool = False,
    authenticator: Authenticator | None = None,
) -> Callable[[], RelaySMTP]:
    """A protocol factory for ``loop.create_server``.

    ``tls_context`` offers STARTTLS on a plain listener; with ``implicit_tls``
    the listener itself must be created with ``ssl=tls_context`` and sessions
    start under TLS (no STARTTLS; AUTH offered at once). ``limiter`` is shared
    by all listeners. With ``config.proxy_protocol`` every connection must
    start with a PROXY v1 or v2 header.

    PROXY on an implicit-TLS listener is refused (``ValueError``): a load
    balancer sends the header before the TLS handshake, which the listener's
    ``ssl=`` performs before this protocol sees a byte.
    """
    if implicit_tls and tls_context is None:
        raise ValueError("an implicit-TLS listener needs a TLS context")
    if implicit_tls and config.proxy_protocol:
        raise ValueError(
            "smtp.proxy_protocol with smtp.tls_listen is not supported: the PROXY header "
            "comes before the TLS handshake; terminate TLS at the load balancer, or use "
            "STARTTLS on smtp.listen"
        )
    quiet_aiosmtpd_logs()
    settings = SessionSettings.from_config(config, implicit_tls=implicit_tls)
    hooks = HookTable(handler)

    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler,
            settings=settings,
            limiter=limiter,
            hooks=hooks,
            tls_context=tls_context,
            authenticator=authenticator,
            loop=asyncio.get_running_loop(),
        )

    return factory
