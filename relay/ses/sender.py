"""What delivery needs of SES, whatever API and account serve it. Pure types.

``SesSender`` sends one batch (``SendRequest``) and reads the account's
quota. ``relay.ses.client.SesClient`` (the v1 Query API: SendRawEmail,
GetSendQuota), ``relay.ses.v2.SesV2Client`` (API v2: SendEmail with
``Content.Raw``, GetAccount) and ``relay.ses.api.AutoSender`` (one of the
two per message, by size) are the ones ``ses.api`` chooses from
(``relay.ses.api.connect``), so delivery never learns the wire format.

``RawMessage`` is the message a batch sends, read in chunks (from its open
spool file, or from bytes), so that no body builder ever holds it whole.

``SesParameters`` is the one typed form of the parameters a message carries
beside its sender and recipients: made from the ``X-SES-*`` headers and the
configuration (``relay.message``), kept in the spool entry (``relay.spool``
writes its JSON form), and sent with every batch of the message.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, Protocol, Self

READ_CHUNK: Final = 3 * 16 * 1024
"""Bytes of message read at a time (a multiple of 3: base64 pieces join)."""


@dataclass(frozen=True, slots=True)
class SesParameters:
    """A message's SES parameters; ``None`` and ``()`` are not sent.

    In API v1 terms ``ConfigurationSetName``, ``Tags``, ``SourceArn``,
    ``FromArn`` and ``ReturnPathArn``; in v2 ``ConfigurationSetName``,
    ``EmailTags``, ``FromEmailAddressIdentityArn`` (from ``source_arn``, which authorizes
    the envelope sender, else ``from_arn``), ``FeedbackForwardingEmailAddressIdentityArn`` and
    ``ListManagementOptions`` (``contact_list``, ``topic``; v1 has no
    parameter for them: its SES reads the header, which stays in the message).
    """

    configuration_set: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    """``(name, value)`` pairs, in order."""
    source_arn: str | None = None
    from_arn: str | None = None
    return_path_arn: str | None = None
    contact_list: str | None = None
    """``X-SES-LIST-MANAGEMENT-OPTIONS``' contact list name."""
    topic: str | None = None
    """... and its ``topic=`` (only with a contact list)."""


NO_PARAMETERS = SesParameters()


class RawMessage:
    """A message's bytes as SES gets them: ``size``, and ``chunks`` in order,
    read afresh for each pass (a body's hash, then its sending; a retry).

    Made from bytes (``of``: tests, small messages) or from an open file
    (``open``, or ``relay.spoolfile.MessageFile.reader``): the file is read
    with ``pread`` on a descriptor of each pass's own, so passes may run at
    once, in threads, and the message stays readable if its spool entry is
    deleted meanwhile. ``close`` (or ``with``) releases the file; a pass
    running in a thread then still ends with its own descriptor. Reading a
    file blocks: a caller on the event loop reads a chunk at a time.
    """

    __slots__ = ("_data", "_fd", "size")

    def __init__(self, size: int, *, data: bytes | None = None, fd: int | None = None) -> None:
        """``data``, or the first ``size`` bytes of the file open as ``fd``
        (which this object then owns)."""
        if (data is None) == (fd is None):
            raise ValueError("a RawMessage is made of data or of a file")
        self.size = size
        self._data = data
        self._fd = fd

    @classmethod
    def of(cls, data: bytes) -> RawMessage:
        return cls(len(data), data=data)

    @classmethod
    def open(cls, path: Path) -> RawMessage:
        """The message in the file at ``path`` (blocking; ``OSError``)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return cls(os.fstat(fd).st_size, fd=fd)
        except BaseException:
            os.close(fd)
            raise

    def chunks(self, chunk_size: int = READ_CHUNK) -> Generator[bytes, None, None]:
        """The message in pieces of ``chunk_size`` bytes (the last may be
        shorter); ``OSError`` from a file that cannot be read or is short."""
        if self._data is not None:
            view = memoryview(self._data)
            return (bytes(view[at : at + chunk_size]) for at in range(0, self.size, chunk_size))
        # A descriptor of the pass's own, taken now (``close`` may come before
        # the first read), closed when the pass ends or is dropped.
        return _file_chunks(open(os.dup(self._file()), "rb", buffering=0), self.size, chunk_size)

    def head(self, count: int) -> bytes:
        """The first ``count`` bytes (fewer if the message is shorter); blocking."""
        if self._data is not None:
            return self._data[:count]
        chunks = self.chunks(max(count, 1))
        try:
            return next(chunks, b"")[:count]
        finally:
            chunks.close()

    def _file(self) -> int:
        if self._fd is None:
            raise ValueError("the message's file is closed")
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _file_chunks(file: BinaryIO, size: int, chunk_size: int) -> Generator[bytes, None, None]:
    """The first ``size`` bytes of ``file``, read with ``pread``; closes ``file``."""
    with file:
        fd, offset = file.fileno(), 0
        while offset < size:
            chunk = os.pread(fd, min(chunk_size, size - offset), offset)
            if not chunk:
                raise OSError(f"message file ends at {offset} bytes of {size}")
            offset += len(chunk)
            yield chunk


@dataclass(frozen=True, slots=True)
class SendRequest:
    """One batch: the complete MIME message (without ``Bcc:``) to some of its
    envelope recipients (at most 50, checked by the caller)."""

    raw_message: RawMessage
    destinations: tuple[str, ...] = ()
    source: str | None = None
    """The envelope sender SES uses (v1 ``Source``, v2 ``FromEmailAddress``)."""
    ses: SesParameters = NO_PARAMETERS
    queue_id: str = field(default="", compare=False)
    """The message's queue id, for log lines only (never sent; not compared)."""


@dataclass(frozen=True, slots=True)
class SendResult:
    """SES accepted a batch."""

    message_id: str | None
    """SES's MessageId; None when the answer's was not a token (see
    ``relay.ses.responses.parse_send_raw_email``)."""
    request_id: str | None
    unusable_id: str | None = None
    """The MessageId that was not a token, flattened and cut short, for a log line."""


@dataclass(frozen=True, slots=True)
class SendQuota:
    """The account's sending limits (v1 GetSendQuota, v2 GetAccount's ``SendQuota``)."""

    max_24_hour_send: float
    """``UNLIMITED`` (-1) for an account without a daily quota."""
    max_send_rate: float
    sent_last_24_hours: float
    sending_enabled: bool = True
    """v2 GetAccount's ``SendingEnabled``; GetSendQuota does not say (True)."""


UNLIMITED: Final = -1.0
"""``Max24HourSend`` of an account without a daily quota (SES API reference)."""


class SesSender(Protocol):
    """An SES account as delivery uses it. Every failure is a
    ``relay.errors.SesError``, classified by ``relay.ses.classify``."""

    async def send(self, request: SendRequest, *, deadline: float) -> SendResult:
        """Send one batch within ``deadline`` seconds, retries included."""
        ...

    async def quota(self) -> SendQuota:
        """The account's sending limits now."""
        ...
