"""The one exception hierarchy of ses-relay.

    RelayError
    ├── ConfigError                  a configuration file or variable is wrong; lists every problem
    ├── CredentialsError             no AWS credentials could be found or refreshed
    │   ├── CredentialsNotConfigured a source has nothing to offer: the chain tries the next
    │   └── CredentialsUnreachable   a credential endpoint (STS, container, IMDS) gave no answer
    ├── HttpTransportError           no usable HTTP answer from an AWS endpoint, and why
    ├── MessageRefused               the relay will not take a message; carries the SMTP reply
    ├── SesError                     SES (or the way to it) did not accept a call
    │   └── SesTransportError        no usable SES answer: timeout, reset, oversized, garbled
    └── SpoolError                   the spool cannot be written or read (full disk, I/O error)
        ├── SpoolLocked              another daemon holds the spool
        ├── NoSuchEntry              the entry is not (or no longer) in that area
        └── UnreadableEntry          an envelope on disk is not a valid entry (also a ValueError)

Every SesError carries its ``Disposition`` (what delivery should do next) and the
SMTP reply the relay gives when the error decides a client's transaction.
Lower-level errors are translated into these where they arise, each kind in
one place: aiohttp's and the operating system's errors of a call to AWS in
``relay.ses.http.fetch`` (into ``HttpTransportError``, which the SES client
classifies and the credential sources report), the file system's in
``relay.spool``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from relay.oneline import one_line


class Disposition(enum.Enum):
    """What to do with a message after an SES error."""

    RETRYABLE = "retryable"
    """Try again soon, with backoff (throttling, 5xx, network trouble)."""
    DEFERRABLE = "deferrable"
    """Keep the mail and alert an operator; retrying quickly will not help."""
    PERMANENT = "permanent"
    """SES will never accept this message: reject it (5xx) or bounce it."""


REPLY_LINE_LIMIT = 510
"""Characters of one reply line without its CRLF (RFC 5321 4.5.3.1.5)."""
_REPLY_LINE = re.compile(r"([2-5][0-9][0-9]) ([245]\.[0-9]{1,3}\.[0-9]{1,3}) (.*)")


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """An SMTP reply: basic code, enhanced status code (RFC 3463) and text.

    Always one line, whatever the text was built from (SES's words, a
    client's address): ``text`` is kept as ASCII (no SMTPUTF8; other
    characters escaped), without control characters, and short enough for
    the line limit.
    """

    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        text = self.text
        room = REPLY_LINE_LIMIT - len(f"{self.code} {self.enhanced} ")
        if text.isascii() and text.isprintable() and len(text) <= room:
            return  # the replies the relay writes itself: as they are
        # Escaping may lengthen the text: it is cut to the room again after.
        flat = one_line(text, room).encode("ascii", "backslashreplace").decode("ascii")
        object.__setattr__(self, "text", one_line(flat, room))

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @classmethod
    def parse(cls, line: str) -> SmtpReply | None:
        """The reply whose ``str`` is ``line``; None when ``line`` is not one."""
        found = _REPLY_LINE.fullmatch(line)
        if found is None:
            return None
        return cls(int(found[1]), found[2], found[3])


class RelayError(Exception):
    """Base of every error ses-relay raises on purpose."""


class ConfigError(RelayError):
    """The configuration is invalid. ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class CredentialsError(RelayError):
    """No AWS credentials could be resolved; the message lists what was tried."""


class CredentialsNotConfigured(CredentialsError):
    """A credential source that has nothing to offer: the chain moves on to the
    next one. Raised during a refresh (IMDS gone away), it is an ordinary failure."""


class CredentialsUnreachable(CredentialsError):
    """A credential endpoint gave no usable answer; ``cause`` is the
    ``HttpTransportError``'s. The message names the endpoint's origin only
    (a container endpoint's path or query may hold a secret)."""

    def __init__(self, message: str, cause: TransportCause) -> None:
        super().__init__(message)
        self.cause = cause


TransportCause = Literal["connect", "connect-timeout", "timeout", "io", "too-large"]
"""Why an HTTP call got no usable answer: could not connect, timed out
connecting (in both, the request was certainly not sent), no answer in time,
the connection failed, or the answer exceeds the size the caller reads."""


class HttpTransportError(RelayError):
    """No usable HTTP answer from an AWS endpoint. ``status`` is the HTTP status
    when one came before the failure (an oversized answer)."""

    def __init__(self, message: str, cause: TransportCause, *, status: int | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.status = status

    @property
    def request_sent(self) -> bool:
        """False only when the request certainly never reached the endpoint."""
        return self.cause not in ("connect", "connect-timeout")


class MessageRefused(RelayError):
    """A message (or address) the relay refuses, with the SMTP reply that says why."""

    def __init__(self, reply: SmtpReply) -> None:
        self.reply = reply
        super().__init__(str(reply))


class SesError(RelayError):
    """SES refused a call, or no usable answer came back.

    ``code`` is SES's error code (``Throttling``, ``MessageRejected``, ...) or,
    for errors that never reached an SES answer, one of ours
    (see ``SesTransportError``).
    """

    def __init__(
        self,
        *,
        code: str,
        message: str,
        http_status: int | None,
        request_id: str | None,
        disposition: Disposition,
        smtp_reply: SmtpReply,
        refresh_credentials: bool = False,
        pause: float = 0.0,
        throttled: bool = False,
    ) -> None:
        self.code = code
        self.message = message
        self.http_status = http_status
        self.request_id = request_id
        self.disposition = disposition
        self.smtp_reply = smtp_reply
        self.refresh_credentials = refresh_credentials
        self.pause = pause
        """Seconds all delivery should wait: the error is the account's (daily
        quota, sending paused, credentials refused), not the message's."""
        self.throttled = throttled
        """SES says the account's sending rate was exceeded: every delivery
        slows down (the error is the account's, and retrying soon helps)."""
        super().__init__(f"{code}: {message}" if message else code)

    @property
    def retryable(self) -> bool:
        return self.disposition is Disposition.RETRYABLE

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"http_status={self.http_status!r}, request_id={self.request_id!r}, "
            f"disposition={self.disposition.value})"
        )


class SesTransportError(SesError):
    """No usable SES answer. Codes: ``Timeout``, ``ConnectionError``,
    ``ResponseTooLarge``, ``MalformedResponse``. Always retryable.

    ``request_sent`` is False only when the request certainly never reached
    SES (the connection could not be opened). When it is True, SES may have
    accepted the message: SendRawEmail has no idempotency token, so sending
    it again can deliver it twice.
    """

    def __init__(self, *, request_sent: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.request_sent = request_sent


class SpoolError(RelayError):
    """The spool cannot be written or read (full disk, I/O error, permissions).

    ``errno`` is the operating system's error number when there was one
    (``errno.ENOSPC`` for a full disk).
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class SpoolLocked(SpoolError):
    """Another daemon holds the spool's lock; ``pid`` is its process id when known."""

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class NoSuchEntry(SpoolError):
    """The entry is not (or no longer) in that area: delivered, deleted or moved."""


class UnreadableEntry(SpoolError):
    """An envelope on disk is not a valid spool entry (garbled, truncated, from
    another tool, or its message file is gone): set it aside for a person."""
