"""Every use of aiosmtpd's private API, behind names of the relay's own.

The listener (``relay.smtp``) and AUTH (``relay.smtpauth``) build on
aiosmtpd's ``SMTP`` but replace its command loop, EHLO, MAIL, RCPT, DATA,
AUTH and timers. Where that needs aiosmtpd's private names, it is done here
and nowhere else, so that an aiosmtpd upgrade is checked in this file: read
aiosmtpd's ``smtp.py`` for each item below, then run ``tests/test_smtp_protocol.py``,
``tests/test_smtpauth.py``, ``tests/test_smtp_smuggling.py`` and
``tests/test_smtpsyntax.py``. Checked against aiosmtpd ``CHECKED_VERSION``.

What is relied upon:

- ``SMTP.__init__`` is not called: ``AiosmtpdSMTP.__init__`` sets the
  attributes it sets (the names and meanings of 1.4.6, compared by
  ``tests/test_smtp_protocol.py``) after ``StreamReaderProtocol.__init__``,
  without its per-connection reflection; ``__ident__``, ``CALL_LIMIT_DEFAULT``,
  ``login_always_fail`` and ``_AuthMechAttr`` are aiosmtpd's.
  ``_smtp_methods`` (``smtp_*``) and ``_auth_methods`` (``auth_*``, named
  by ``__auth_mechanism_name__``) are what its reflection would find;
  ``_handle_hooks`` maps ``"MAIL"`` to the handler's ``handle_MAIL``.
- ``connection_made`` calls ``_set_rset_state``, ``_create_session`` and
  ``_reset_timeout``; the first time it starts ``_handle_client`` as a task
  (cancelled by ``connection_lost`` and ``eof_received``); after STARTTLS it
  is called again with a new ``Session``, clears the reader's ``_buffer``
  (RFC 3207 4.2) and sets ``_tls_handshake_okay`` from a ``handle_STARTTLS``
  hook. ``connection_lost`` cancels ``_timeout_handle``, which must be set.
- asyncio's ``StreamReaderProtocol`` keeps ``_client_connected_cb`` and
  ``_stream_writer``, and aiosmtpd ``_handler_coroutine``: all three are
  dropped once the session is over and the connection lost (``_release``).
- asyncio's ``StreamReader._limit`` is the line limit of ``readuntil`` and
  half the buffered input that pauses the transport (``input_buffered_up_to``).
- ``_cb_client_connected`` sets ``_reader`` and ``_writer``; the reader's
  ``_buffer`` is the asyncio ``StreamReader``'s ``bytearray`` (``unread``,
  ``line_waiting``).
- ``_timeout_duration`` is the ``timeout=`` given; ``_timeout_cb`` is what
  aiosmtpd's timer calls.
- ``_call_handler_hook`` is how aiosmtpd and ``relay.smtpauth`` call a hook.
- ``_create_envelope``, ``_set_post_data_state`` and ``_set_rset_state``: a
  new ``Envelope``, nothing else.
- ``smtp_STARTTLS`` sends ``220``, swaps the transport and awaits the
  handshake, raising ``TLSSetupException`` if it fails; ``challenge_auth``
  (overridden in ``relay.smtp`` for its timer) sends ``334`` and reads one
  line with ``_reader.readline``.
- ``_getaddr``, ``_getparams`` and ``_strip_command_keyword`` are pure
  parsers; ``_getaddr`` reads only ``local_part_limit`` of its ``self``.
- ``_auth_methods`` maps a mechanism name to its implementation (EHLO lists
  its keys); EHLO and AUTH read ``_auth_require_tls`` and ``_tls_protocol``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

from aiosmtpd.smtp import (
    CALL_LIMIT_DEFAULT,
    MISSING,
    SMTP,
    Session,
    _AuthMechAttr,
    login_always_fail,
)
from aiosmtpd.smtp import __ident__ as AIOSMTPD_IDENT

CHECKED_VERSION: Final = "1.4.6"
"""The aiosmtpd release this module was checked against (the private
methods it needs are checked by ``tests/test_smtpsyntax.py``)."""

_PARSER: Final = cast(SMTP, SimpleNamespace(local_part_limit=SMTP.local_part_limit))
"""What aiosmtpd's parsing methods read of ``self``: ``local_part_limit`` (0: no limit)."""


def getaddr(path: str) -> tuple[str | None, str | None]:
    """aiosmtpd's path parser: ``(address, rest)``; ``(None, None)`` if it fails."""
    return SMTP._getaddr(_PARSER, path)


def getparams(options: Sequence[str]) -> dict[str, str | bool] | None:
    """aiosmtpd's ESMTP parameter parser: ``{"SIZE": "10", "FLAG": True}``; None if garbled."""
    return SMTP._getparams(_PARSER, options)


def strip_command_keyword(keyword: str, arg: str) -> str | None:
    """``arg`` without ``keyword`` (``"FROM:"``, any case) and spaces; None without it."""
    return SMTP._strip_command_keyword(_PARSER, keyword, arg)


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put ``data`` back at the front of ``reader``'s buffer.

    DATA reads the stream in large chunks; the bytes after the end marker are
    the client's next (pipelined) commands and must be read again by the
    command loop, by AUTH challenges, or discarded by STARTTLS, exactly as if
    they had never been taken. aiosmtpd itself reaches into ``_buffer``
    (STARTTLS clears it); there is no public way to push bytes back.
    """
    buffer = reader._buffer  # type: ignore[attr-defined]
    assert isinstance(buffer, bytearray)
    buffer[:0] = data


def line_waiting(reader: asyncio.StreamReader) -> bool:
    """A whole line is in ``reader``'s buffer: reading it will not wait.

    The listener holds a reply back while the client's next (pipelined)
    command is already here; asyncio has no public view of the buffer.
    """
    buffer = reader._buffer  # type: ignore[attr-defined]
    return b"\n" in buffer


class HookTable:
    """The handler's ``handle_*`` hooks by command (``{"MAIL": handler.handle_MAIL}``),
    found once per listener: aiosmtpd's ``_handle_hooks``.

    ``handle_EHLO`` is left out: ``RelaySMTP`` writes the EHLO reply itself.
    """

    def __init__(self, handler: object) -> None:
        self.hooks: dict[str, Callable[..., Any]] = {
            name[len("handle_") :]: getattr(handler, name)
            for name in dir(handler)
            if name.startswith("handle_") and name not in ("handle_EHLO", "handle_exception")
        }


_tables: dict[tuple[type, str], tuple[tuple[str, str], ...]] = {}


def _methods(cls: type, prefix: str) -> tuple[tuple[str, str], ...]:
    """``(name, attribute)`` of each ``prefix*`` method of ``cls``, named as
    aiosmtpd names them (``auth_CRAM__MD5`` is ``CRAM-MD5``); once per class."""
    table = _tables.get((cls, prefix))
    if table is not None:
        return table
    found = []
    for attribute in dir(cls):
        if attribute.startswith(prefix):
            name, method = attribute[len(prefix) :], getattr(cls, attribute)
            if not callable(method):  # a property such as auth_tls_active
                continue
            if prefix == "auth_":
                name = getattr(method, "__auth_mechanism_name__", name.replace("__", "-"))
            found.append((name, attribute))
    table = _tables[cls, prefix] = tuple(found)
    return table


class AiosmtpdSMTP(SMTP, abc.ABC):
    """aiosmtpd's ``SMTP`` with its private API behind the relay's names.

    A subclass serves the connection (``serve_client``) and keeps the timer
    for what the client owes (``restart_client_timer``, ``client_timer_fired``,
    ``schedule_client_timer``); aiosmtpd's own loop and timer are not used.

    Per connection, aiosmtpd's ``SMTP.__init__`` reflects over the protocol
    object and the handler (``inspect.getmembers``, ``dir``) and formats an
    INFO line that is never logged: about 60 µs of a connection's 70. This
    ``__init__`` sets the same attributes without it (a test compares them
    with ``SMTP.__init__``'s): the handler's hooks come from a ``HookTable``
    built once per listener, and ``_smtp_methods`` and ``_auth_methods``,
    which only aiosmtpd's replaced command loop, EHLO and AUTH read, are
    built from per-class tables when read.
    """

    session_class: ClassVar[type[Session]] = Session
    """What ``session`` is: aiosmtpd's ``Session`` or a subclass."""
    offered_mechanisms: ClassVar[frozenset[str] | None] = None
    """The AUTH mechanisms in ``_auth_methods``; None: every ``auth_*`` method."""

    def __init__(
        self,
        hooks: HookTable,
        *,
        hostname: str,
        data_size_limit: int,
        timeout: float,
        command_call_limit: Mapping[str, int],
        loop: asyncio.AbstractEventLoop,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        # What SMTP.__init__ does for these arguments, in its order.
        self.__ident__ = AIOSMTPD_IDENT
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.event_handler = hooks
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = False
        self._decode_data = False
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = False
        self._timeout_duration = timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._session_over = False
        self._connection_ended = False
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._handle_hooks = hooks.hooks
        self._ehlo_hook_ver = None
        self._enforce_call_limit = True
        self._call_limit_base = dict(command_call_limit)
        self._call_limit_default = command_call_limit.get("*", CALL_LIMIT_DEFAULT)

    # Read-only views where aiosmtpd has attributes: only its replaced code
    # would read them, and nothing writes them.
    @property
    def _smtp_methods(self) -> dict[str, Any]:  # type: ignore[override]
        return {name: getattr(self, attribute) for name, attribute in _methods(type(self), "smtp_")}

    @property
    def _auth_methods(self) -> dict[str, Any]:  # type: ignore[override]
        offered = self.offered_mechanisms
        return {
            name: _AuthMechAttr(getattr(self, attribute), True)
            for name, attribute in _methods(type(self), "auth_")
            if offered is None or name in offered
        }

    # -- streams -------------------------------------------------------------

    @property
    def reader(self) -> asyncio.StreamReader:
        """The connection's input (also after STARTTLS)."""
        reader: asyncio.StreamReader = self._reader
        return reader

    @property
    def writer(self) -> asyncio.StreamWriter:
        """The connection's output (also after STARTTLS)."""
        writer: asyncio.StreamWriter = self._writer
        return writer

    def unread(self, data: bytes) -> None:
        """Put ``data`` back at the front of the input (see ``unread``)."""
        unread(self._reader, data)

    @contextlib.contextmanager
    def input_buffered_up_to(self, size: int) -> Iterator[None]:
        """Within the block, the input stops being read past twice ``size``
        buffered bytes, not twice the line limit (asyncio's
        ``StreamReader._limit`` is both the longest line ``readuntil``
        takes and half the buffer that pauses the transport): for DATA, read
        in chunks, so that a message of a few kilobytes does not stop and
        start the socket's reading several times (two ``epoll_ctl`` calls each)."""
        reader: Any = self._reader  # asyncio.StreamReader, whose _limit is private
        line_limit = reader._limit
        reader._limit = size
        try:
            yield
        finally:
            reader._limit = line_limit

    # -- the session -----------------------------------------------------------

    async def _handle_client(self) -> None:
        try:
            await self.serve_client()
        finally:
            self._session_over = True
            self._release()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._connection_ended = True
        self._release()

    def _release(self) -> None:
        """Once the session is over and the connection lost, drop what ties
        this protocol to itself: asyncio's ``client_connected_cb`` (a bound
        method of it, kept for ``connection_made`` again after STARTTLS),
        the stream writer (whose protocol it is) and the session's task
        (whose end may hold a traceback through it). The connection's
        objects are then freed at once, not by the garbage collector: with
        one connection per message, its collections cost some 3 % of the CPU."""
        if self._session_over and self._connection_ended:
            self._client_connected_cb = None
            self._stream_writer = None
            self._writer = None  # type: ignore[assignment]
            self._handler_coroutine = None

    @abc.abstractmethod
    async def serve_client(self) -> None:
        """The whole session, from the banner; a task cancelled when the connection is lost."""

    def _create_session(self) -> Session:
        return self.session_class(self.loop)

    def reset_envelope(self) -> None:
        """A new, empty envelope (EHLO, RSET, the end of DATA)."""
        self.envelope = self._create_envelope()

    def _set_post_data_state(self) -> None:
        self.reset_envelope()

    def _set_rset_state(self) -> None:
        self.reset_envelope()

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        return await self.call_hook(command, *args)

    async def call_hook(self, command: str, *args: Any) -> Any:
        """The handler's ``handle_<command>(server, session, envelope, *args)``; MISSING
        if it has none."""
        hook = self._handle_hooks.get(command)
        if hook is None:
            return MISSING
        return await hook(self, self.session, self.envelope, *args)

    @property
    def tls_handshake_okay(self) -> bool:
        """False once a ``handle_STARTTLS`` hook has refused the client's TLS."""
        return bool(self._tls_handshake_okay)

    async def start_tls(self) -> None:
        """``220``, then the client's handshake (``TLSSetupException`` if it fails).

        When it succeeds aiosmtpd calls ``connection_made`` again, with a new
        session (RFC 3207 4.2) and the unencrypted input discarded.
        """
        await SMTP.smtp_STARTTLS(self, "")

    # -- the client timer ------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd: from connection_made (also after STARTTLS).
        self.restart_client_timer(duration or self._timeout_duration)

    def _timeout_cb(self) -> None:
        self.client_timer_fired()

    def schedule_client_timer(self, when: float) -> None:
        """Call ``client_timer_fired`` at loop time ``when`` instead of when it was due.

        The handle is aiosmtpd's ``_timeout_handle``: ``connection_lost`` cancels it.
        """
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._timeout_handle = self.loop.call_at(when, self._timeout_cb)

    @abc.abstractmethod
    def restart_client_timer(self, seconds: float) -> None:
        """A connection (or its TLS) has started: the client has ``seconds`` to speak."""

    @abc.abstractmethod
    def client_timer_fired(self) -> None:
        """The time set with ``schedule_client_timer`` has come."""


class AiosmtpdAuth:
    """aiosmtpd's AUTH internals for ``relay.smtpauth.AuthMixin``, over ``AiosmtpdSMTP``.

    Only ``offered_mechanisms`` are offered (and in ``_auth_methods``),
    whatever the handler defines, and TLS is read from ``auth_tls_active``
    (the transport) rather than from aiosmtpd's ``_tls_protocol``, which
    implicit-TLS listeners never set.
    """

    offered_mechanisms: ClassVar[frozenset[str] | None] = frozenset()

    if TYPE_CHECKING:
        _auth_configured_tls: bool

        async def _call_handler_hook(self, command: str, *args: Any) -> Any: ...

        @property
        def auth_tls_active(self) -> bool: ...

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        found = self.__dict__.get("_auth_methods")
        if found is not None:  # aiosmtpd's own SMTP.__init__ found every auth_* method
            offered = self.offered_mechanisms or ()
            self.__dict__["_auth_methods"] = {
                name: method for name, method in found.items() if name in offered
            }

    def mechanism_offered(self, name: str) -> bool:
        """``name`` is offered and has an implementation."""
        return name in (self.offered_mechanisms or ()) and any(
            found == name for found, _ in _methods(type(self), "auth_")
        )

    async def call_auth_hook(self, args: list[str]) -> Any:
        """The handler's ``handle_AUTH``; MISSING if it has none."""
        return await self._call_handler_hook("AUTH", args)

    # aiosmtpd's EHLO lists AUTH when ``not self._auth_require_tls or
    # self._tls_protocol``; on an implicit-TLS listener ``_tls_protocol`` is
    # None, so TLS is read from the transport here. TLS is always required.
    @property
    def _auth_require_tls(self) -> bool:
        return not self.auth_tls_active

    @_auth_require_tls.setter
    def _auth_require_tls(self, value: bool) -> None:
        self._auth_configured_tls = value  # ignored: AUTH needs TLS here
