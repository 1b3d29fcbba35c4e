"""The spool's journal: small new messages made durable together, in one file.

Most mail is small and SES takes it at once, inline: for such a message an
entry of its own in ``queue/`` (two files created, fsync'd, renamed into
``queue/`` and unlinked again a moment later) is most of what the relay
spends on it, in system calls that wait on the file system's journal. A
message whose bytes are wholly held in memory (``MessageFile.held``) is
appended instead, with its envelope, to the spool's journal, together with
the others that arrive at the same time: one ``write`` (on the event loop)
and one ``fdatasync`` (in a thread) make all of them durable, and ``250``
may follow. When SES has sent every batch (or refused the message before ``250``), a small
"done" record follows. Any other outcome moves the entry into ``queue/``
(``Spool.put``) before its "done" record (``relay.record``): the journal
holds entries only while they are tried inline.

Layout: ``journal/SEQ.log`` segments (``SEQ`` increasing). A segment starts
with ``SRJ1`` and 12 random bytes, its mark, which begins each of its records::

    mark | kind: "P" (put) or "D" (done) | payload size (u32) | payload's CRC-32 (u32) | payload
    put:   id length (u8) | envelope length (u32) | id | envelope (JSON) | message
    done:  id

A new segment starts when the current one passes ``SEGMENT_SIZE``, or after
a write or fsync failed; one whose puts are all done, and is not the current
one, is removed, and so is the current one past ``RECYCLE_SIZE`` when every
put in the journal is done (``sync`` replaces it with a new one there and
then, so that the next put does not wait for its making): the journal takes
at most ``SEGMENT_SIZE`` and the messages in flight under load, and little
more when it is quiet.

At start (``Spool.open``) every put with no done record in any segment is
moved into ``queue/`` (unless its entry is in the spool already: moved
before the crash) and the segments are removed: nothing that
got ``250`` is lost.

Only a write that was never fsync'd can be cut short, and a failed fsync may
leave a stretch of the file unwritten with later records after it (another
writer's fsync succeeded): reading skips bytes that are not a whole record
with a good CRC up to the next mark. The mark is random and never leaves
the disk, so the bytes of a message, which a client chose, cannot pass for
a record. Each write's fsync is made on a descriptor opened before the
write: an error of the file's writeback after that is reported to it, and not
taken by another thread's fsync of the same file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from relay.diskio import spool_error, sync_dir, write_all
from relay.errors import SpoolError
from relay.log import delivery_log

MAGIC: Final = b"SRJ1"
PUT: Final = b"P"
DONE: Final = b"D"
SEGMENT_SIZE: Final = 16 * 1024 * 1024
"""Bytes after which the next write starts a new segment."""
RECYCLE_SIZE: Final = 64 * 1024
"""Bytes past which the current segment is removed as soon as every put in
the journal is done (a quiet moment), rather than kept until it is full."""
SUFFIX: Final = ".log"
ATTEMPTS: Final = 3
"""Times a thread's ``append`` makes a new segment and writes, when other
threads filled each new segment before its write."""

MARK_SIZE: Final = 12
_SEGMENT_HEADER_SIZE = len(MAGIC) + MARK_SIZE
_HEADER = struct.Struct(f">{MARK_SIZE}scII")
_PUT_HEADER = struct.Struct(">BI")


@dataclass(frozen=True, slots=True)
class JournalPut:
    """A new entry as the journal holds it."""

    entry_id: str
    envelope: bytes
    """``Entry.to_json``."""
    message: bytes


def encode_put(mark: bytes, put: JournalPut) -> bytes:
    entry_id = put.entry_id.encode("ascii")
    head = _PUT_HEADER.pack(len(entry_id), len(put.envelope))
    return _record(mark, PUT, b"".join((head, entry_id, put.envelope, put.message)))


def encode_done(mark: bytes, entry_id: str) -> bytes:
    return _record(mark, DONE, entry_id.encode("ascii"))


def _record(mark: bytes, kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(mark, kind, len(payload), zlib.crc32(payload)) + payload


def decode_put(payload: bytes) -> JournalPut:
    """A put record's payload; ``ValueError`` when it is not one."""
    if len(payload) < _PUT_HEADER.size:
        raise ValueError("a put record shorter than its header")
    id_size, envelope_size = _PUT_HEADER.unpack_from(payload)
    start = _PUT_HEADER.size
    if start + id_size + envelope_size > len(payload):
        raise ValueError("a put record shorter than its id and envelope")
    entry_id = payload[start : start + id_size].decode("ascii")
    start += id_size
    envelope = payload[start : start + envelope_size]
    return JournalPut(entry_id, envelope, payload[start + envelope_size :])


def read_segment(data: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """The records of a segment's bytes, as (kind, payload), and how many
    bytes were skipped (not a whole record with a good CRC: see the module
    docstring). A segment without its header is all skipped. Pure."""
    if len(data) < _SEGMENT_HEADER_SIZE or not data.startswith(MAGIC):
        return [], len(data)
    mark = data[len(MAGIC) : _SEGMENT_HEADER_SIZE]
    records: list[tuple[bytes, bytes]] = []
    skipped = 0
    at = _SEGMENT_HEADER_SIZE
    while at < len(data):
        record = _record_at(data, at, mark)
        if record is not None:
            records.append(record[:2])
            at = record[2]
            continue
        following = data.find(mark, at + 1)
        following = len(data) if following < 0 else following
        skipped += following - at
        at = following
    return records, skipped


def _record_at(data: bytes, at: int, mark: bytes) -> tuple[bytes, bytes, int] | None:
    """The record at ``at`` (kind, payload, where the next one starts), or None."""
    if at + _HEADER.size > len(data):
        return None
    found, kind, size, crc = _HEADER.unpack_from(data, at)
    end = at + _HEADER.size + size
    if found != mark or kind not in (PUT, DONE) or end > len(data):
        return None
    payload = data[at + _HEADER.size : end]
    return (kind, payload, end) if zlib.crc32(payload) == crc else None


class Journal:
    """The journal in one spool directory: see the module docstring.

    ``append`` and ``sync`` block (threads, several at once); ``done`` is
    made for the event loop (one small write to the page cache), and so is
    ``begin``, which leaves its fdatasync to a thread. Start-up
    (``pending``, ``clear``) runs before any of them."""

    def __init__(self, directory: Path, *, segment_size: int = SEGMENT_SIZE) -> None:
        self.directory = directory
        self._segment_size = segment_size
        self._lock = threading.Lock()
        """Guards what follows (never held during an fsync)."""
        self._rotation = threading.Lock()
        """Held by the thread making a new segment (threads only)."""
        self._fd: int | None = None
        """The current segment, opened with the first write (done records go here)."""
        self._seq = 0
        self._mark = b""
        self._size = 0
        self._full = False
        """A write to the current segment failed: the next one starts a new segment."""
        self._live: dict[int, set[str]] = {}
        """Per segment, the puts not done yet."""
        self._where: dict[str, int] = {}
        """Each live put's segment."""
        self._dones = 0
        """Done records written."""
        self._dones_synced = 0
        """Done records an fdatasync made durable (the first so many)."""
        self._finished: list[int] = []
        """Segments all done and no longer current: removed by the next ``sync``."""

    # -- start-up

    def pending(self, *, quiet: bool = False) -> Iterator[JournalPut]:
        """The puts of the segments on disk with no done record, oldest first
        (blocking; one segment in memory at a time). ``quiet``: a reader
        beside the running daemon (``ses-relay queue``), for which a record
        being written is not whole yet: skipped bytes are not logged."""
        segments = self._segments()
        done: set[bytes] = set()
        for path in segments:
            done.update(payload for kind, payload in self._read(path, quiet) if kind == DONE)
        for path in segments:
            for kind, payload in self._read(path, quiet):
                if kind != PUT:
                    continue
                try:
                    put = decode_put(payload)
                except ValueError as exc:  # its CRC held: written so by a bug
                    delivery_log.error("%s: an unreadable record left alone: %s", path, exc)
                    continue
                if put.entry_id.encode("ascii") not in done:
                    yield put

    def clear(self) -> None:
        """Remove every segment (their puts are in the queue now); the next
        write starts a new one."""
        segments = self._segments()
        for path in segments:
            self._seq = max(self._seq, int(path.stem))
            path.unlink()
        if segments:
            sync_dir(self.directory)

    def _segments(self) -> list[Path]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:  # a spool made before the journal
            return []
        return sorted(
            self.directory / name
            for name in names
            if name.endswith(SUFFIX) and name[: -len(SUFFIX)].isdigit()
        )

    def _read(self, path: Path, quiet: bool) -> list[tuple[bytes, bytes]]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # removed meanwhile: all done
            return []
        records, skipped = read_segment(data)
        if skipped and not quiet:
            delivery_log.warning(
                "%s: %d bytes that are not whole records skipped (writes never "
                "acknowledged, cut short or not written)",
                path,
                skipped,
            )
        return records

    # -- running

    def append(self, puts: Sequence[JournalPut]) -> list[SpoolError | None]:
        """Make ``puts`` durable together: one write, one ``fdatasync``
        (blocking), after a new segment where one is needed (made without
        the lock; if another thread fills it before the write, all over
        again, at most ``ATTEMPTS`` times). A failure fails every one of
        them, and each is then marked done (never resumed at a restart: its
        client got no ``250``); the next write starts a new segment."""
        for _ in range(ATTEMPTS):
            try:
                with self._lock:
                    self._new_segment_if_needed()
                rest = self._write(puts)
            except OSError as exc:
                return self._failed(puts, exc)
            if rest is not None:
                return rest()
        busy = OSError(errno.EAGAIN, "the journal started new segments faster than it could write")
        return self._failed(puts, busy)

    def begin(self, puts: Sequence[JournalPut]) -> Callable[[], list[SpoolError | None]]:
        """``append`` begun on the event loop (``GroupCommit(begin=...)``):
        ``puts`` are written there, one write to the page cache as ``done``
        makes, and the blocking rest is returned for a thread: an
        ``fdatasync`` and a ``close`` of a duplicate descriptor, where a
        commit wholly in a thread made five system calls, after each of
        which the thread waits for the interpreter's lock while the loop is
        busy (a commit's wait at the relay's maximum, measured: p50 6.1 ->
        4.6 ms, p99 13.4 -> 10.3 ms). A segment that must be replaced first
        (there is none yet, it is full, or a write to it failed) is replaced
        in the thread: all of ``append`` runs there."""
        rest = self._write(puts)
        return functools.partial(self.append, puts) if rest is None else rest

    def _write(self, puts: Sequence[JournalPut]) -> Callable[[], list[SpoolError | None]] | None:
        """Write ``puts`` to the current segment, under the lock; the rest
        of their commit (their fdatasync, or their failure), or None when the
        segment cannot take them (a new one must be made first). Puts whose
        write fails get done records: a part of it may have reached the file
        whole."""
        with self._lock:
            if not self._writable():
                return None
            data = b"".join(encode_put(self._mark, put) for put in puts)
            live = self._live.setdefault(self._seq, set())
            for put in puts:  # before the write: one that fails gets done records
                live.add(put.entry_id)
                self._where[put.entry_id] = self._seq
            try:
                write_all(self._descriptor(), data)
                fd = os.dup(self._descriptor())  # ours while a rotation closes the segment's
            except OSError as exc:
                self._full = True
                failure = exc
            else:
                self._size += len(data)
                return functools.partial(self._sync_puts, puts, fd, self._dones)
        return functools.partial(self._failed, puts, failure)

    def _sync_puts(
        self, puts: Sequence[JournalPut], fd: int, dones: int
    ) -> list[SpoolError | None]:
        """The fdatasync that makes ``puts``, written by ``fd``, durable
        (with the first ``dones`` done records); ``fd`` is closed."""
        try:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            return self._failed(puts, exc)
        self._synced(dones)
        return [None] * len(puts)

    def _failed(self, puts: Sequence[JournalPut], exc: OSError) -> list[SpoolError | None]:
        """``puts`` could not be made durable: each is marked done, and the
        next write starts a new segment."""
        with self._lock:
            self._full = True
        for put in puts:
            self.done(put.entry_id)
        return [spool_error(f"cannot write spool entry {put.entry_id}", exc) for put in puts]

    def done(self, entry_id: str) -> None:
        """``entry_id`` left the journal (sent, refused, or moved into the
        queue): a done record, durable with the next fdatasync of the
        segment (``sync``, or the next ``append``'s). Never raises:
        a record that cannot be written is logged (a restart may then send
        the message again)."""
        with self._lock:
            seq = self._where.pop(entry_id, None)
            if seq is None:
                return
            live = self._live[seq]
            live.discard(entry_id)
            if not live and seq != self._seq:
                del self._live[seq]
                self._finished.append(seq)
            record = encode_done(self._mark, entry_id)
            try:
                write_all(self._descriptor(), record)
            except OSError as exc:
                self._full = True
                delivery_log.error(
                    "%s: cannot record in the journal that it left (a restart "
                    "may send it again): %s",
                    entry_id,
                    exc,
                )
                return
            self._size += len(record)
            self._dones += 1

    def unsynced(self) -> bool:
        """Whether done records wait for an fdatasync, or segments all done
        for their removal (``sync`` would have work)."""
        with self._lock:
            return self._dones > self._dones_synced or bool(self._finished)

    def sync(self, requests: Sequence[object]) -> list[SpoolError | None]:
        """One ``fdatasync`` of the current segment for ``requests`` (the done
        records written before it), and the removal of the segments all done,
        the current one too when every put is done and it passed
        ``RECYCLE_SIZE`` (blocking; a ``GroupCommit`` commit)."""
        with self._lock:
            quiet = not self._where and self._fd is not None and self._size >= RECYCLE_SIZE
            seq = self._seq
        if quiet:
            # Every put is done: the segment goes (not to hold its space
            # until it is full), replaced now by a new one, which the next
            # put then finds ready (its client never waits for the new
            # segment's fsyncs).
            self._recycle(seq)
        with self._lock:
            path = None if self._fd is None else self._path(self._seq)
            finished, self._finished = self._finished, []
            dones = self._dones
        try:
            if path is not None:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            return [spool_error("cannot sync the spool's journal", exc)] * len(requests)
        self._synced(dones)
        for seq in finished:
            with contextlib.suppress(OSError):
                self._path(seq).unlink()
        return [None] * len(requests)

    def close(self) -> None:
        """Close the current segment, its done records fsync'd; remove it
        when nothing in it is live."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            with contextlib.suppress(OSError):  # else a restart may send some again
                os.fdatasync(fd)
            os.close(fd)
            if not self._live.get(self._seq):
                with contextlib.suppress(OSError):
                    self._path(self._seq).unlink()

    def _new_segment_if_needed(self) -> None:
        """Under the lock, which this may release and take again: make a new
        segment when there is none, the current one is full, or a write to
        it failed. It is made with the lock released: ``done`` and
        ``begin``, on the event loop, never wait for its fsyncs."""
        if not self._writable():
            seq = self._seq
            self._lock.release()
            try:
                with self._rotation:
                    self._rotate(seq)
            finally:
                self._lock.acquire()
        if self._fd is None:
            raise OSError(errno.EBADF, "the journal is closed")

    def _writable(self) -> bool:
        return self._fd is not None and not self._full and self._size < self._segment_size

    def _recycle(self, seq: int) -> None:
        """Replace segment ``seq``, all done, with a new one; when that cannot
        be made (a full disk), close it: it goes all the same, and the next
        put tries again to make one."""
        try:
            with self._rotation:
                self._rotate(seq)
        except OSError:
            with self._lock:
                if self._seq == seq and self._fd is not None and not self._where:
                    os.close(self._fd)
                    self._fd = None
                    self._live.pop(seq, None)
                    self._finished.append(seq)

    def _rotate(self, replacing: int) -> None:
        """Replace segment ``replacing`` with a new one, unless another thread
        just did (under ``_rotation``, without the lock); the old one's done
        records are then made durable."""
        with self._lock:
            if self._seq != replacing:
                return
            seq = replacing + 1
        path = self._path(seq)
        mark = os.urandom(MARK_SIZE)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, MAGIC + mark)
            os.fdatasync(fd)
            sync_dir(self.directory)  # the segment outlives a crash before its first record
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        with self._lock:
            old, self._fd, self._seq, self._mark = self._fd, fd, seq, mark
            self._size, self._full = _SEGMENT_HEADER_SIZE, False
            if old is not None and not self._live.get(replacing):
                self._live.pop(replacing, None)
                self._finished.append(replacing)
            dones = self._dones
        if old is not None:  # no longer written to: its done records made durable
            try:
                os.fdatasync(old)
            except OSError:  # a restart may send some again
                pass
            else:
                self._synced(dones)
            finally:
                os.close(old)

    def _synced(self, dones: int) -> None:
        """The first ``dones`` done records are durable."""
        with self._lock:
            self._dones_synced = max(self._dones_synced, dones)

    def _descriptor(self) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, "the journal is closed")
        return self._fd

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:020d}{SUFFIX}"
