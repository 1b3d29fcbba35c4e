"""A new message's file in the spool's ``tmp/`` area, written as it arrives.

``Spool.new_message`` makes it when DATA starts; the message goes in by
``write`` in pieces, then ``Spool.stage`` and ``Spool.commit`` (or ``put``,
the two) make it durable (``sync``: the data's fsync, then the rename into
``queue/``, and close it) or ``discard`` removes it. Nothing of it is
visible in ``queue/`` before the commit, and a file left in ``tmp/`` by a
crash is removed at the next start (``Spool.open``).

``write`` runs on the event loop: the pieces are gathered into writes of
``WRITE_SIZE`` bytes, which the page cache takes at once; only ``sync``
(the fsync) waits for the disk, and runs in a thread. The file is created
with the first write: a message that stays within ``WRITE_SIZE`` (most
mail) is never written to a file of its own if it goes to the spool's
journal (``held``, ``relay.journal``). A failed write (``ENOSPC``, ``EIO``)
raises ``SpoolError`` and leaves the file to ``discard``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final

from relay.errors import SpoolError
from relay.ses.sender import RawMessage

WRITE_SIZE: Final = 64 * 1024
"""Bytes gathered before a write to the file."""


class MessageFile:
    """One new message's file: see the module docstring."""

    __slots__ = ("_closed", "_fd", "_pending", "committed", "path", "size")

    def __init__(self, path: Path) -> None:
        """A message for ``path``, which must not exist; created with the first
        write to it (``flush``)."""
        self.path = path
        self._fd: int | None = None
        self._closed = False
        self._pending = bytearray()
        self.size = 0
        """Bytes written so far."""
        self.committed = False
        """``Spool.commit`` made it a queued message (``path`` is in ``queue/``)."""

    def write(self, data: bytes) -> None:
        """Add ``data``; ``SpoolError`` when the file cannot take it."""
        self._pending += data
        self.size += len(data)
        if len(self._pending) >= WRITE_SIZE:
            try:
                self.flush()
            except OSError as exc:
                raise SpoolError(
                    f"cannot write spool file {self.path.name}: {exc.strerror or exc}",
                    errno=exc.errno,
                ) from None

    def sync(self) -> None:
        """Write what is gathered and fsync the file (blocking)."""
        self.flush()
        os.fsync(self._descriptor())

    def commit(self, target: Path) -> None:
        """Now queued as ``target`` (``Spool.commit``, after its last fsync)."""
        self.path = target
        self.committed = True

    def reader(self) -> RawMessage:
        """The message as written so far, to send once committed: a
        descriptor of its own, still readable after ``discard`` (close it).
        ``OSError`` when the gathered bytes cannot be written. A message still
        wholly gathered (``held``) is given as its bytes."""
        held = self.held()
        if held is not None:
            return RawMessage.of(held)
        self.flush()
        return RawMessage(self.size, fd=os.dup(self._descriptor()))

    def held(self) -> bytes | None:
        """The message's bytes when no part of it was written to the file yet
        (at most ``WRITE_SIZE``), else None."""
        if self._fd is None and not self._closed:
            return bytes(self._pending)
        return None

    def discard(self) -> None:
        """Close the file, and remove it unless it was committed. Never raises;
        a second call does nothing."""
        fd, self._fd = self._fd, None
        self._pending = bytearray()
        if self._closed:
            return
        self._closed = True
        if fd is None:
            return  # never created
        with contextlib.suppress(OSError):
            os.close(fd)
        if not self.committed:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)

    def _descriptor(self) -> int:
        """The file's descriptor, creating the file the first time (``OSError``)."""
        if self._closed:
            raise ValueError(f"{self.path.name}: the message file is closed")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return self._fd

    def flush(self) -> None:
        """Write what is gathered (``OSError``); no fsync."""
        pending = self._pending
        fd = self._descriptor()
        written = 0
        with memoryview(pending) as view:
            while written < len(view):
                written += os.write(fd, view[written:])
        pending.clear()
