"""SMTP AUTH for aiosmtpd, checked by ``relay.auth.Authenticator``.

``AuthMixin`` goes first in the bases of the relay's SMTP class::

    class RelaySMTP(AuthMixin, aiosmtpd.smtp.SMTP): ...
    RelaySMTP(handler, ..., relay_authenticator=authenticator)

What it changes in aiosmtpd 1.4.6:

- ``auth_PLAIN`` / ``auth_LOGIN`` keep aiosmtpd's parsing (``challenge_auth``,
  base64, ``501 5.5.2`` on bad base64 or a PLAIN value without two NULs) but
  await ``Authenticator.authenticate`` (hashes checked in a thread pool)
  instead of calling aiosmtpd's synchronous ``authenticator``;
- ``smtp_AUTH`` always answers: ``235`` or ``535`` (aiosmtpd's ``AuthResult``
  defaults to ``handled=True``, which sends nothing and leaves the client
  waiting), ``503 5.5.1`` once authenticated or inside a mail transaction,
  ``538 5.7.11`` without TLS,
  ``421 4.7.0`` (then closes) for a client with too many failures, and
  ``454 4.7.0`` at once when no check can be made now (``auth.max_queued_checks``
  checks already wait for a hash thread, or the relay is stopping);
- TLS is read from the transport, so AUTH is offered (EHLO) and accepted on
  implicit-TLS listeners too, where aiosmtpd's ``_tls_protocol`` is unset;
- only PLAIN and LOGIN are offered, whatever the handler defines.

The aiosmtpd internals this needs are in ``relay.aiosmtpd_compat.AiosmtpdAuth``.

On success ``session.authenticated`` is True and ``session.auth_data`` holds
the user name (a ``str``; aiosmtpd would keep the password there too):
see ``relay.session.authenticated_user``.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any, ClassVar, Final

from aiosmtpd.smtp import MISSING, AuthResult

from relay.aiosmtpd_compat import AiosmtpdAuth
from relay.auth import Authenticator, AuthOutcome
from relay.session import client_address, vouching_peer

REPLY_SUCCESS: Final = "235 2.7.0 Authentication successful"
REPLY_INVALID: Final = "535 5.7.8 Authentication credentials invalid"
REPLY_ENCRYPTION_REQUIRED: Final = (
    "538 5.7.11 Encryption required for requested authentication mechanism"
)
REPLY_ALREADY_AUTHENTICATED: Final = "503 5.5.1 Already authenticated"
REPLY_IN_TRANSACTION: Final = "503 5.5.1 AUTH not allowed during a mail transaction"
REPLY_LOCKED_OUT: Final = "421 4.7.0 too many failed AUTH attempts"
REPLY_NO_EHLO: Final = "503 5.5.1 Error: send EHLO first"
REPLY_NOT_EXTENDED: Final = "500 5.5.1 Error: command 'AUTH' not recognized"
REPLY_SYNTAX: Final = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
REPLY_UNKNOWN_MECHANISM: Final = "504 5.5.4 Unrecognized authentication type"
REPLY_BAD_BASE64: Final = "501 5.5.2 Can't decode base64"
REPLY_BAD_PLAIN: Final = "501 5.5.2 Can't split auth value"
REPLY_LINE_TOO_LONG: Final = "500 5.5.6 Authentication exchange line is too long"
REPLY_NOT_AVAILABLE: Final = "502 5.5.1 AUTH not available"
REPLY_TEMPORARY_FAILURE: Final = "454 4.7.0 Temporary authentication failure"

MECHANISMS: Final = frozenset({"PLAIN", "LOGIN"})


class AuthMixin(AiosmtpdAuth):
    """AUTH PLAIN and LOGIN for an aiosmtpd ``SMTP`` subclass; put it first in the bases."""

    offered_mechanisms: ClassVar[frozenset[str] | None] = MECHANISMS

    relay_authenticator: Authenticator | None = None
    """Set by the factory (``relay_authenticator=`` keyword); None: AUTH not available."""

    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    if TYPE_CHECKING:
        session: Any
        transport: Any

        async def push(self, status: str | bytes) -> None: ...
        async def challenge_auth(
            self,
            challenge: str | bytes,
            encode_to_b64: bool = True,
            log_client_response: bool = False,
        ) -> Any: ...

    def __init__(
        self, *args: Any, relay_authenticator: Authenticator | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if relay_authenticator is not None:
            self.relay_authenticator = relay_authenticator

    @property
    def auth_tls_active(self) -> bool:
        """True when the connection is under TLS (STARTTLS or implicit TLS)."""
        transport = getattr(self, "transport", None)
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    @property
    def auth_offered(self) -> bool:
        """True when EHLO should list AUTH now: under TLS, with an authenticator."""
        return self.auth_tls_active and self.relay_authenticator is not None

    def auth_client_ip(self) -> str:
        """The client address whose failures count: the PROXY source, else the peer."""
        return client_address(self.session)

    async def smtp_AUTH(self, arg: str | None) -> None:
        if not self.session.host_name:
            await self.push(REPLY_NO_EHLO)
            return
        args = arg.split() if arg else []
        if args:
            args[0] = args[0].upper()  # RFC 4954: mechanism names are case-insensitive
        refusal = self._auth_refusal(args)
        if refusal is not None:
            await self.push(refusal)
            return
        authenticator = self.relay_authenticator
        assert authenticator is not None
        if authenticator.refuses(self.auth_client_ip(), via=vouching_peer(self.session)):
            await self._auth_lock_out()
            return
        status = await self.call_auth_hook(args)
        if status is not MISSING:
            await self.push(status)
            return
        method = self.auth_PLAIN if args[0] == "PLAIN" else self.auth_LOGIN
        result = await method(self, args)
        outcome = result.auth_data if isinstance(result.auth_data, AuthOutcome) else None
        if result.success and outcome is not None and outcome.username is not None:
            self.session.authenticated = True
            self.session.auth_data = outcome.username
            await self.push(REPLY_SUCCESS)
            return
        if not result.handled:
            await self.push(result.message or REPLY_INVALID)
        if outcome is not None and outcome.locked_out:
            await self._auth_lock_out()

    def _auth_refusal(self, args: list[str]) -> str | None:
        """The reply refusing ``AUTH <args>`` before any exchange, or None to go on."""
        session = self.session
        checks = (
            (not session.extended_smtp, REPLY_NOT_EXTENDED),
            (not self.auth_tls_active, REPLY_ENCRYPTION_REQUIRED),
            (bool(session.authenticated), REPLY_ALREADY_AUTHENTICATED),
            (self._in_transaction(), REPLY_IN_TRANSACTION),
            (not 1 <= len(args) <= 2, REPLY_SYNTAX),
            (bool(args) and not self.mechanism_offered(args[0]), REPLY_UNKNOWN_MECHANISM),
            (self.relay_authenticator is None, REPLY_NOT_AVAILABLE),
        )
        return next((reply for refused, reply in checks if refused), None)

    def _in_transaction(self) -> bool:
        # RFC 4954 4: no AUTH between MAIL and the end of the transaction, so
        # the identity a MAIL FROM was judged by cannot change under it.
        return getattr(getattr(self, "envelope", None), "mail_from", None) is not None

    async def _auth_lock_out(self) -> None:
        # RFC 5321 3.8: a server may send 421 and close at any time.
        await self.push(REPLY_LOCKED_OUT)
        self._close()

    def _close(self) -> None:
        """Close the connection; the relay's SMTP class also bounds how long
        its last reply may wait for a client that does not read."""
        if self.transport is not None:
            self.transport.close()

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        """RFC 4616: ``[authzid] NUL authcid NUL passwd``, as initial response or after 334."""
        value = await self._auth_response(args, "")
        if value is None:
            return AuthResult(success=False, handled=True)
        try:
            authzid, login, password = value.split(b"\x00")
        except ValueError:
            await self.push(REPLY_BAD_PLAIN)
            return AuthResult(success=False, handled=True)
        if authzid and authzid != login:
            # Acting as another user (proxy authorization) is not supported.
            return AuthResult(success=False, handled=False, message=REPLY_INVALID)
        return await self._auth_check(login, password)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        """The LOGIN mechanism: user name (initial response or 334), then password."""
        login = await self._auth_response(args, self.AuthLoginUsernameChallenge)
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await self._auth_challenge(self.AuthLoginPasswordChallenge)
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._auth_check(login, password)

    async def _auth_response(self, args: list[str], challenge: str) -> bytes | None:
        """The initial response of ``AUTH MECH <b64>``, or else the answer to ``challenge``.

        None when a reply has already been sent (bad base64, aborted, too long).
        """
        if len(args) == 1:
            return await self._auth_challenge(challenge)
        if args[1] == "=":  # RFC 4954: an empty initial response
            return b""
        try:
            return base64.b64decode(args[1].encode("ascii"), validate=True)
        except (binascii.Error, ValueError):
            await self.push(REPLY_BAD_BASE64)
            return None

    async def _auth_challenge(self, challenge: str) -> bytes | None:
        try:
            answer = await self.challenge_auth(challenge)
        except ValueError:  # longer than the reader's line limit
            await self.push(REPLY_LINE_TOO_LONG)
            return None
        if answer is MISSING:  # aiosmtpd has answered 501 (bad base64, or "*")
            return None
        assert isinstance(answer, bytes)
        return answer

    async def _auth_check(self, login: bytes, password: bytes) -> AuthResult:
        authenticator = self.relay_authenticator
        assert authenticator is not None
        # A name that is not UTF-8 keeps its bytes as lone surrogates: it
        # cannot match any user, and it still gets the dummy check.
        username = login.decode("utf-8", "surrogateescape")
        outcome = await authenticator.authenticate(
            username, password, self.auth_client_ip(), via=vouching_peer(self.session)
        )
        if outcome.unavailable:
            return AuthResult(success=False, handled=False, message=REPLY_TEMPORARY_FAILURE)
        if outcome.success:
            return AuthResult(success=True, auth_data=outcome)
        return AuthResult(success=False, handled=False, auth_data=outcome)
