"""One DATA transfer on its way to the spool: what the listener writes it to.

The listener's ``relay.dataread.DataReader`` writes the message here in
pieces as it arrives (dot-unstuffed, its newlines normalized, within the
size limit). The spool file is the message exactly as SES gets it, made
without ever holding the message whole:

1. the header block is held in memory (``relay.message.HeaderSplitter``: at
   most ``smtp.header_size_limit`` bytes) until its end is seen;
2. it is then prepared (``relay.message.prepare_header``: the sender
   checks, the ``X-SES-*`` and Bcc fields taken out, Date and Message-ID
   added, the empty line inserted where missing) and written first to the
   message's file in the spool's ``tmp/`` (``relay.spoolfile``), opened
   when DATA started;
3. the rest (the empty line and the body) is appended unchanged as it comes.

A header block over ``relay.message.INLINE_HEADER_LIMIT`` is prepared in a
thread, by ``settle``, which the listener awaits after each chunk it reads;
what follows the header waits in memory meanwhile (the rest of one chunk).
A refused header (``MessageRefused``) or a failed write (``SpoolError``:
ENOSPC, EIO) stops the writing and removes the file at once; the reading
goes on to the end of DATA, where ``finish`` raises it for the reply.
``take`` hands the file to delivery (``Spool.stage`` and ``commit`` make it
durable); until then
``discard`` removes it, as the listener does whenever DATA ends otherwise
(refused, client gone, timeout, error).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from relay.errors import MessageRefused, SpoolError
from relay.message import HeaderSplitter, PreparedMessage, cheap_to_prepare
from relay.spoolfile import MessageFile

Prepare = Callable[[bytes, bytes], PreparedMessage]
"""``prepare(header, rest)``: ``relay.message.prepare_header`` with the
message's own values (its Message-ID, the time, the defaults)."""


class IncomingMessage:
    """One message arriving by DATA; see the module docstring."""

    __slots__ = (
        "_error",
        "_file",
        "_prepare",
        "_splitter",
        "_waiting",
        "prepared",
        "queue_id",
        "size",
    )

    def __init__(
        self, queue_id: str, file: MessageFile, *, header_size_limit: int, prepare: Prepare
    ) -> None:
        self.queue_id = queue_id
        self._file: MessageFile | None = file
        self._splitter = HeaderSplitter(header_size_limit)
        self._prepare = prepare
        self._waiting: list[bytes] = []
        """What follows the header block, until the header is written."""
        self._error: MessageRefused | SpoolError | None = None
        self.prepared: PreparedMessage | None = None
        """The header as SES gets it, once written."""
        self.size = 0
        """Bytes of message received (as the client sent them, unstuffed)."""

    def write(self, piece: bytes) -> None:
        """The next piece of the message (``DataReader``'s ``write``)."""
        self.size += len(piece)
        if self._file is None:
            return  # refused, failed, taken or discarded: nothing more is kept
        if self.prepared is not None:
            self._append(piece)
        elif self._splitter.split:
            self._waiting.append(piece)
        else:
            try:
                rest = self._splitter.feed(piece)
            except MessageRefused as refused:
                self._stop(refused)
                return
            if self._splitter.split:
                self._waiting.append(rest)

    async def settle(self) -> None:
        """Prepare and write the header once its end is known (in a thread
        when large). The listener awaits it after each chunk."""
        if self._file is None or self.prepared is not None or not self._splitter.split:
            return
        header, rest = self._splitter.header, b"".join(self._waiting)
        self._waiting = []
        try:
            if cheap_to_prepare(header):
                prepared = self._prepare(header, rest)
            else:
                prepared = await asyncio.to_thread(self._prepare, header, rest)
        except MessageRefused as refused:
            self._stop(refused)
            return
        if self._file is None:  # discarded while it was prepared
            return
        self.prepared = prepared
        self._append(prepared.raw)
        self._append(rest)

    async def finish(self) -> PreparedMessage:
        """The end of DATA: the message is whole in its file. Raises the
        ``MessageRefused`` or ``SpoolError`` that stopped it."""
        if self._error is None and self._file is not None and not self._splitter.split:
            try:
                self._waiting.append(self._splitter.feed(b"", final=True))
            except MessageRefused as refused:
                self._stop(refused)
        await self.settle()
        if self._error is not None:
            raise self._error
        if self.prepared is None or self._file is None:
            raise RuntimeError(f"{self.queue_id}: the message was discarded")
        return self.prepared

    def take(self) -> MessageFile:
        """The message's file, now the caller's to commit (after ``finish``)."""
        file, self._file = self._file, None
        if file is None:
            raise RuntimeError(f"{self.queue_id}: the message was discarded")
        return file

    def discard(self) -> None:
        """Remove the file unless it was taken. Never raises."""
        file, self._file = self._file, None
        self._waiting = []
        if file is not None:
            file.discard()

    def _append(self, data: bytes) -> None:
        file = self._file
        if file is None or not data:
            return
        try:
            file.write(data)
        except SpoolError as exc:
            self._stop(exc)

    def _stop(self, error: MessageRefused | SpoolError) -> None:
        if self._error is None:
            self._error = error
        self.discard()
