"""The durable queue on local disk. Blocking calls: run them off the event loop
(but ``stage``, made for it).

Layout under ``spool.path`` (readable with ordinary tools)::

    lock                 held (flock) by the running daemon; holds its PID
    reload.json          the daemon's answer to its last reload (``relay.reloadrecord``)
    tmp/                 entries being written (a message as its DATA arrives:
                         ``relay.spoolfile``); emptied at start
    queue/ID.eml         the message exactly as SES gets it
    queue/ID.json        its envelope and delivery state (see ``Entry``)
    dead/ID.eml, .json   messages given up on, kept for ``queue show``/``retry``
    quarantine/          entries that could not be read, kept for a person
    journal/             small new messages while SES is tried inline
                         (``relay.journal``): moved into queue/ at start

An entry is committed when ``queue/ID.json`` exists: ``stage`` writes both
files in ``tmp/`` (no fsync), ``commit`` fsyncs them, renames the message
first and the envelope last, and fsyncs ``queue/`` (once for all the entries
it commits; none is acknowledged before that fsync); ``put`` is the two.
A ``.eml`` without its ``.json`` was never acknowledged: readers skip it and
the daemon removes it at start. State changes rewrite the ``.json`` the same way (write, fsync,
rename, fsync the directory). Every operation keeps "a ``.json`` implies
its ``.eml``": the envelope is committed last and removed first.

Writers of an existing entry (``update``, ``modify``, ``move``, ``remove``)
hold an exclusive ``flock`` on its ``.eml`` (one inode in every area, since
``move`` hard-links it), so the daemon and the ``queue`` command serialise.
``update`` writes the envelope it is given; a writer that may race another
process (the CLI while the daemon runs, or the daemon after an operator's
``retry``) uses ``modify``, which re-reads the envelope under the lock, so
neither side's change is lost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

from relay.diskio import spool_error, sync_dir, write_all
from relay.errors import (
    NoSuchEntry,
    SesError,
    SmtpReply,
    SpoolError,
    SpoolLocked,
    UnreadableEntry,
)
from relay.groupcommit import SharedSync
from relay.journal import Journal, JournalPut
from relay.log import delivery_log
from relay.queueid import is_valid, made_at
from relay.ses.sender import NO_PARAMETERS, RawMessage, SesParameters
from relay.spoolfile import MessageFile

FORMAT_VERSION = 1
QUEUE, DEAD, TMP, QUARANTINE, JOURNAL = "queue", "dead", "tmp", "quarantine", "journal"
AREAS = (QUEUE, DEAD)
_LOCK_RETRY = 0.05
"""Seconds ``open`` keeps trying when the lock is busy: ``daemon_pid`` of a
``queue`` command holds it shared for a moment, which is not a daemon."""

MAX_HISTORY = 20
"""Lines an entry's ``history`` keeps (the newest)."""

BatchState = Literal["pending", "sent", "failed"]

_tmp_seq = itertools.count()


@dataclass(frozen=True, slots=True)
class BatchError:
    """Why SES did not take a batch (the last time it was tried).

    In the file ``reply`` keeps the form every version wrote, ``554 5.7.1
    text`` (read back exactly by ``SmtpReply.parse``), beside ``error_code``
    and ``error_message``: an older ses-relay (a rollback) still reads it.
    """

    reply: SmtpReply
    """What the client (inline) or the bounce says of its recipients."""
    code: str | None = None
    """SES's error code, or ours for no usable answer (``SesError.code``);
    None when no SES error says it (the message expired) or an older
    version wrote the entry."""
    message: str | None = None
    """SES's message, with ``code``."""

    @classmethod
    def of(cls, error: SesError) -> BatchError:
        return cls(error.smtp_reply, error.code, error.message)

    def __str__(self) -> str:
        return str(self.reply)


@dataclass(frozen=True, slots=True)
class Batch:
    """One SES call's recipients and what became of them."""

    recipients: tuple[str, ...]
    state: BatchState = "pending"
    message_id: str | None = None
    """SES's MessageId once ``state`` is "sent"."""
    error: BatchError | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    """A queued message's envelope and state: ``queue/ID.json``.

    The file is a JSON object (ASCII, indented) with ``version`` (1), ``id``,
    ``received``, ``client``, ``user`` (or null), ``sender``, ``source``,
    ``recipients``, ``ses`` (an object: ``configuration_set``, ``tags`` as
    ``[name, value]`` pairs, ``source_arn``, ``from_arn``,
    ``return_path_arn``, each only when set), ``batches`` (objects with
    ``recipients``, ``state``, ``message_id``, ``error`` (the SMTP reply
    ``554 5.7.1 text``, or null) and, when SES said why, ``error_code`` and
    ``error_message``), ``attempts``, ``next_attempt``, ``history``,
    ``bounce`` and ``bounce_of`` (ids, or null). Unknown keys are ignored on
    reading, so a version without ``error_code`` reads these files, and an
    error that is not a reply (never written by ses-relay) reads as
    ``554 5.0.0`` (failed) or ``451 4.0.0`` with its text.
    """

    id: str
    received: float
    """Unix time the message was accepted."""
    client: str
    sender: str
    """The envelope sender; "" for the null sender ``<>``."""
    source: str
    """SES ``Source``: the sender, or the From: address for the null sender."""
    recipients: tuple[str, ...]
    batches: tuple[Batch, ...]
    ses: SesParameters = NO_PARAMETERS
    """SES parameters beside the source and the recipients."""
    user: str | None = None
    attempts: int = 0
    next_attempt: float = 0.0
    """Unix time of the next delivery attempt."""
    history: tuple[str, ...] = ()
    """One line per failed attempt, newest last (bounded)."""
    bounce: str | None = None
    """The id of the delivery status notification queued for this message's
    failed recipients; recorded before the notification is written."""
    bounce_of: str | None = None
    """For a delivery status notification: the id of the message it reports on."""

    def pending(self) -> list[int]:
        """Indexes of the batches still to send."""
        return [i for i, b in enumerate(self.batches) if b.state == "pending"]

    def with_batch(self, index: int, batch: Batch) -> Entry:
        batches = list(self.batches)
        batches[index] = batch
        return replace(self, batches=tuple(batches))

    def to_json(self) -> bytes:
        """The file's bytes; ``ValueError`` for an entry ``from_json`` would refuse."""
        data = {
            "version": FORMAT_VERSION,
            "id": self.id,
            "received": self.received,
            "client": self.client,
            "user": self.user,
            "sender": self.sender,
            "source": self.source,
            "recipients": list(self.recipients),
            "ses": ses_json(self.ses),
            "batches": [_batch_json(b) for b in self.batches],
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "history": list(self.history),
            "bounce": self.bounce,
            "bounce_of": self.bounce_of,
        }
        try:
            # Compact: the C encoder (an indent takes Python's, ten times slower).
            text = json.dumps(data, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        except TypeError as exc:
            raise ValueError(f"entry {self.id!r} cannot be written: {exc}") from None
        return text.encode() + b"\n"

    @classmethod
    def from_json(cls, text: bytes) -> Entry:
        """Parse ``queue/ID.json``; ``UnreadableEntry`` when it is not a valid entry."""
        try:
            data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
            entry = cls(**_fields(data))
        except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise UnreadableEntry(f"not a spool entry: {type(exc).__name__}: {exc}") from None
        if not is_valid(entry.id):
            raise UnreadableEntry(f"not a spool entry: bad id {entry.id!r}")
        if not entry.batches:
            raise UnreadableEntry("not a spool entry: no batches")
        return entry


def _fields(data: Any) -> dict[str, Any]:
    """``Entry``'s fields from a parsed envelope, every type checked."""
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    version = data.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(f"unknown format version {version!r}")
    batches = data["batches"]
    if not isinstance(batches, list):
        raise TypeError("batches is not a list")
    return {
        "id": _str(data["id"], "id"),
        "received": _number(data["received"], "received"),
        "client": _str(data["client"], "client"),
        "user": _optional_str(data.get("user"), "user"),
        "sender": _str(data["sender"], "sender"),
        "source": _str(data["source"], "source"),
        "recipients": _strings(data["recipients"], "recipients"),
        "ses": _ses(data.get("ses")),
        "batches": tuple(_batch(b) for b in batches),
        "attempts": _count(data.get("attempts", 0), "attempts"),
        "next_attempt": _number(data.get("next_attempt", 0.0), "next_attempt"),
        "history": _strings(data.get("history", []), "history"),
        "bounce": _optional_id(data.get("bounce"), "bounce"),
        "bounce_of": _optional_id(data.get("bounce_of"), "bounce_of"),
    }


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} is not a string")
    return value


def _optional_str(value: Any, name: str) -> str | None:
    return None if value is None else _str(value, name)


def _optional_id(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not is_valid(value):
        raise ValueError(f"{name} is not a queue id")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} is not a number")
    result = float(value)  # an int too large for a float raises OverflowError
    if not math.isfinite(result):
        raise ValueError(f"{name} is out of range")
    return result


def _count(value: Any, name: str) -> int:
    if type(value) is not int or value < 0:
        raise TypeError(f"{name} is not a count")
    return value


def ses_json(ses: SesParameters) -> dict[str, Any]:
    """The JSON form of ``ses``: its parameters that are set, by name."""
    named: tuple[tuple[str, Any], ...] = (
        ("configuration_set", ses.configuration_set),
        ("tags", [list(tag) for tag in ses.tags] or None),
        ("source_arn", ses.source_arn),
        ("from_arn", ses.from_arn),
        ("return_path_arn", ses.return_path_arn),
        ("contact_list", ses.contact_list),
        ("topic", ses.topic),
    )
    return {name: value for name, value in named if value is not None}


def _ses(value: Any) -> SesParameters:
    if value is None:
        return NO_PARAMETERS
    if not isinstance(value, dict):
        raise TypeError("ses is not an object")
    tags = value.get("tags", [])
    if not isinstance(tags, list):
        raise TypeError("ses tags is not a list")
    pairs = tuple(_strings(tag, "an ses tag") for tag in tags)
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError("an ses tag is not a [name, value] pair")
    return SesParameters(
        configuration_set=_optional_str(value.get("configuration_set"), "configuration_set"),
        tags=tuple((name, tag_value) for name, tag_value in pairs),
        source_arn=_optional_str(value.get("source_arn"), "source_arn"),
        from_arn=_optional_str(value.get("from_arn"), "from_arn"),
        return_path_arn=_optional_str(value.get("return_path_arn"), "return_path_arn"),
        contact_list=_optional_str(value.get("contact_list"), "contact_list"),
        topic=_optional_str(value.get("topic"), "topic"),
    )


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} is not a list of strings")
    return tuple(value)


def _batch(value: Any) -> Batch:
    if not isinstance(value, dict):
        raise TypeError("a batch is not an object")
    state = value["state"]
    if state not in ("pending", "sent", "failed"):
        raise TypeError(f"bad batch state {state!r}")
    return Batch(
        recipients=_strings(value["recipients"], "batch recipients"),
        state=state,
        message_id=_optional_str(value.get("message_id"), "message_id"),
        error=_batch_error(value, state),
    )


def _batch_json(batch: Batch) -> dict[str, Any]:
    data: dict[str, Any] = {
        "recipients": list(batch.recipients),
        "state": batch.state,
        "message_id": batch.message_id,
        "error": None if batch.error is None else str(batch.error.reply),
    }
    if batch.error is not None and batch.error.code is not None:
        data["error_code"] = batch.error.code
    if batch.error is not None and batch.error.message is not None:
        data["error_message"] = batch.error.message
    return data


def _batch_error(value: dict[str, Any], state: str) -> BatchError | None:
    text = _optional_str(value.get("error"), "error")
    if text is None:
        return None
    reply = SmtpReply.parse(text)
    if reply is None:
        reply = (
            SmtpReply(554, "5.0.0", text) if state == "failed" else SmtpReply(451, "4.0.0", text)
        )
    return BatchError(
        reply,
        code=_optional_str(value.get("error_code"), "error_code"),
        message=_optional_str(value.get("error_message"), "error_message"),
    )


@dataclass(frozen=True, slots=True)
class Census:
    """How many entries the spool's areas hold, for metrics."""

    queued: int
    dead: int
    oldest_arrival: float | None
    """Unix time the oldest queued message arrived, by its queue id; None when
    the queue is empty (or no queued id tells its time)."""


@dataclass(slots=True)
class StagedEntry:
    """A new entry's files written in ``tmp/``, not yet durable (``Spool.stage``)."""

    entry_id: str
    message: MessageFile
    json_tmp: Path
    json_fd: int

    def close(self) -> None:
        """Close both files (a message not committed is removed)."""
        self.message.discard()
        with contextlib.suppress(OSError):
            os.close(self.json_fd)


class Spool:
    """The queue directory. Every method blocks: call it in a thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._synced = {area: SharedSync(partial(sync_dir, self.dir(area))) for area in AREAS}
        """Per area, the fsync of its directory that threads changing it at once share."""
        self.journal = Journal(self.dir(JOURNAL))
        """Where small new messages are committed (``relay.journal``): the
        daemon's, once ``open`` has moved what a previous run left there into
        the queue."""

    def dir(self, area: str) -> Path:
        return self.path / area

    def waiting_for_sync(self, area: str = QUEUE) -> int:
        """Threads whose change to ``area`` is made and waits for an fsync of
        it that has not started yet (they will share the next one)."""
        _check_area(area)
        return self._synced[area].waiting

    # -- life cycle

    def open(self, *, lock: bool = True, lock_wait: float = _LOCK_RETRY) -> None:
        """Create the layout; with ``lock`` (the daemon) take the lock and
        recover: empty ``tmp/``, finish interrupted moves, remove messages
        whose envelope was never committed, move the journal's entries into
        the queue. ``SpoolLocked`` when another
        daemon holds the lock for ``lock_wait`` seconds."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            for area in (TMP, QUEUE, DEAD, QUARANTINE, JOURNAL):
                self.dir(area).mkdir(exist_ok=True, mode=0o700)
            sync_dir(self.path)
            with contextlib.suppress(PermissionError):  # a parent we may only traverse
                sync_dir(self.path.parent)
            if lock and self._lock_fd is None:
                self._lock(lock_wait)
                try:
                    self._recover()
                except BaseException:
                    self.close()
                    raise
        except OSError as exc:
            raise spool_error(f"spool {self.path}", exc) from None

    def _lock(self, wait: float) -> None:
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + wait
            while not _try_flock(fd, fcntl.LOCK_EX):
                if time.monotonic() >= deadline:
                    holder = _read_pid(fd)
                    os.close(fd)
                    raise SpoolLocked(
                        f"spool {self.path} is in use by another ses-relay "
                        f"(pid {holder or 'unknown'})",
                        pid=holder,
                    )
                time.sleep(0.002)
        except OSError:
            os.close(fd)
            raise
        self._lock_fd = fd
        # Written in place (no truncation first): on a full disk the file's
        # block is reused, and a daemon that cannot even record its PID
        # still runs, since the lock is what keeps a second one out.
        pid = f"{os.getpid()}\n".encode()
        try:
            os.pwrite(fd, pid, 0)
            os.ftruncate(fd, len(pid))
        except OSError as exc:
            delivery_log.warning("cannot record the pid in %s: %s", self.path / "lock", exc)

    def _recover(self) -> None:
        for leftover in self.dir(TMP).iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink(missing_ok=True)
        self._finish_moves()
        for area in AREAS:
            directory = self.dir(area)
            names = set(os.listdir(directory))
            orphans = [n for n in names if n.endswith(".eml") and f"{n[:-4]}.json" not in names]
            for name in sorted(orphans):
                delivery_log.info("%s: removing a message that was never acknowledged", name[:-4])
                (directory / name).unlink(missing_ok=True)
            if orphans:
                sync_dir(directory)
        self._replay_journal()

    def _replay_journal(self) -> None:
        """Move the entries the journal still holds (a previous run stopped
        while they were tried inline) into the queue, then empty it."""
        for put in self.journal.pending():
            if self.find(put.entry_id) is not None:
                continue  # moved into the queue before the stop
            try:
                entry = _entry_of(put)
            except UnreadableEntry as exc:
                delivery_log.error("%s: an unreadable entry in the journal: %s", put.entry_id, exc)
                self._quarantine_put(put)
                continue
            self.put(entry, put.message)
            delivery_log.info("%s: moved from the journal into the queue", entry.id)
        self.journal.clear()

    def used_by_daemon(self) -> bool:
        """Whether a daemon has ever opened this spool (it leaves its lock file)."""
        return (self.path / "lock").exists()

    def daemon_pid(self) -> int | None:
        """The PID of the daemon holding the lock, or None when none does."""
        path = self.path / "lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise spool_error(f"cannot read {path}", exc) from None
        try:
            for _ in range(50):
                if _try_flock(fd, fcntl.LOCK_SH):
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    return None
                pid = _read_pid(fd)
                if pid is not None:
                    return pid
                time.sleep(0.001)  # the daemon is between taking the lock and writing its PID
        except OSError as exc:
            raise spool_error(f"cannot read {path}", exc) from None
        finally:
            os.close(fd)
        return None

    def close(self) -> None:
        """Close the journal and release the lock. The PID is blanked in place
        (keeping the file's block for the next start on a full disk)."""
        self.journal.close()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            with contextlib.suppress(OSError):
                os.pwrite(fd, b"\n" * os.fstat(fd).st_size, 0)
            os.close(fd)

    # -- writing

    def new_message(self, entry_id: str) -> MessageFile:
        """A new file in ``tmp/`` for the message of ``entry_id``, to write as
        it arrives and commit with ``stage`` and ``commit``, or to take back
        to commit in the journal when it stays small (``relay.spoolfile``).
        Nothing is created yet: a call made for the event loop."""
        return MessageFile(_tmp_path(self.dir(TMP), entry_id, "eml"))

    def put(self, entry: Entry, message: bytes | MessageFile) -> None:
        """Commit a new entry durably; ``SpoolError`` leaves nothing behind:
        ``stage`` then ``commit`` (see there), in the calling thread."""
        [outcome] = self.commit([self.stage(entry, message)])
        if outcome is not None:
            raise outcome

    def journal_put(self, entry: Entry, message: bytes) -> JournalPut:
        """A new entry to commit in the journal (``Journal.append``);
        ``ValueError`` for an entry that cannot be encoded. Its envelope is
        not read back here, as it is for ``queue/`` (3 % of the event loop's
        time per message): every new entry is one the handler made, and
        one the journal could not give back at start would be kept in
        ``quarantine/`` (``_replay_journal``); its move into ``queue/`` reads
        it back."""
        return JournalPut(entry.id, entry.to_json(), message)

    def stage(self, entry: Entry, message: bytes | MessageFile) -> StagedEntry:
        """Write a new entry's files in ``tmp/`` without waiting for the disk
        (no fsync: cheap enough for the event loop, where the relay calls it);
        ``commit`` makes it durable and visible. ``SpoolError`` leaves nothing
        behind.

        ``message`` is the message's bytes, or its file from ``new_message``,
        written whole; either way it is closed by ``commit`` (or here, on
        failure): take its ``reader`` first to send it.

        ``ValueError`` (and nothing written) for an entry that could not be
        read back: a bad id, no batches, values JSON cannot hold."""
        envelope = _checked(entry)
        queue = self.dir(QUEUE)
        file = None
        json_tmp = _tmp_path(self.dir(TMP), entry.id, "json")
        try:
            if (queue / f"{entry.id}.json").exists() or (queue / f"{entry.id}.eml").exists():
                raise FileExistsError(errno.EEXIST, "an entry with this id exists")
            file = message if isinstance(message, MessageFile) else self.new_message(entry.id)
            if not isinstance(message, MessageFile):
                file.write(message)
            file.flush()
            json_fd = os.open(json_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                write_all(json_fd, envelope)
            except BaseException:
                os.close(json_fd)
                json_tmp.unlink(missing_ok=True)
                raise
        except (OSError, SpoolError) as exc:
            if file is not None:
                file.discard()
            elif isinstance(message, MessageFile):
                message.discard()
            if isinstance(exc, SpoolError):
                raise
            raise spool_error(f"cannot write spool entry {entry.id}", exc) from None
        return StagedEntry(entry.id, file, json_tmp, json_fd)

    def commit(self, staged: Sequence[StagedEntry]) -> list[SpoolError | None]:
        """Make staged entries durable and visible together (group commit,
        blocking: one thread hop for all of them): each one's files are
        fsync'd and renamed into ``queue/``, the message first and the
        envelope last, then one fsync of ``queue/`` covers them all. Returns
        each one's outcome, in order; a failed one has nothing left behind
        (a failed directory fsync fails, and removes, every entry it covered).
        Every staged file is closed in any case."""
        queue = self.dir(QUEUE)
        outcomes: list[SpoolError | None] = [None] * len(staged)
        renamed: list[int] = []
        for index, item in enumerate(staged):
            eml, json_path = queue / f"{item.entry_id}.eml", queue / f"{item.entry_id}.json"
            moved: list[Path] = []
            try:
                item.message.sync()
                os.fsync(item.json_fd)
                os.rename(item.message.path, eml)
                moved.append(eml)
                os.rename(item.json_tmp, json_path)
            except OSError as exc:
                _unlink_quietly(*moved, item.message.path, item.json_tmp)
                outcomes[index] = spool_error(f"cannot write spool entry {item.entry_id}", exc)
            else:
                item.message.commit(eml)
                renamed.append(index)
        if renamed:
            try:
                self._synced[QUEUE]()
            except OSError as exc:
                for index in renamed:
                    item = staged[index]
                    _unlink_quietly(queue / f"{item.entry_id}.json", item.message.path)
                    outcomes[index] = spool_error(f"cannot write spool entry {item.entry_id}", exc)
                with contextlib.suppress(OSError):
                    self._synced[QUEUE]()
        for item in staged:
            item.close()
        return outcomes

    def update(self, entry: Entry, area: str = QUEUE) -> None:
        """Replace an existing entry's envelope and state durably.

        ``NoSuchEntry`` when the entry is no longer in ``area`` (an operator
        deleted it): an update never brings an entry back. Use ``modify``
        where another process may change the entry meanwhile."""
        envelope = _checked(entry)
        _check_area(area)
        try:
            with self._locked(entry.id, area):
                self._require(entry.id, area)
                self._write_envelope(entry.id, envelope, area)
        except OSError as exc:
            raise spool_error(f"cannot update spool entry {entry.id}", exc) from None

    def modify(self, entry_id: str, change: Callable[[Entry], Entry], area: str = QUEUE) -> Entry:
        """Read-modify-write an entry under its lock and return the new entry.

        ``change`` gets the envelope as it is on disk now (with every other
        writer's changes) and must not call the spool. ``NoSuchEntry`` when
        the entry is gone; ``UnreadableEntry`` when its envelope is unreadable."""
        _check_area(area)
        try:
            with self._locked(entry_id, area):
                self._require(entry_id, area)
                current = self._read(entry_id, area)
                new = change(current)
                if new.id != entry_id:
                    raise ValueError(f"modify changed the id {entry_id} to {new.id!r}")
                self._write_envelope(entry_id, _checked(new), area)
                return new
        except OSError as exc:
            raise spool_error(f"cannot update spool entry {entry_id}", exc) from None

    def remove(self, entry_id: str, area: str = QUEUE) -> None:
        """Forget an entry (delivered, refused, or deleted by an operator).
        Removing an entry that is not there does nothing."""
        [outcome] = self.remove_many([entry_id], area)
        if outcome is not None:
            raise outcome

    def unlink_now(self, entry_id: str) -> bool:
        """Unlink a queued entry's files at once if no one holds its lock
        (never waiting for it: made for the event loop, where a thread hop
        costs more than the unlinks); False, and nothing done, when someone
        does (``remove_many`` waits for it). Not durable until ``sync_queue``.
        ``SpoolError`` when a file cannot be unlinked."""
        try:
            _unlink_locked(os.fspath(self.dir(QUEUE)), entry_id, wait=False)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise spool_error(f"cannot remove spool entry {entry_id}", exc) from None
        return True

    def sync_queue(self, changes: Sequence[object]) -> list[SpoolError | None]:
        """One fsync of ``queue/`` for ``changes`` made to it (``unlink_now``):
        every one's outcome, the same (a ``GroupCommit`` commit)."""
        try:
            self._synced[QUEUE]()
        except OSError as exc:
            return [spool_error("cannot sync the spool's queue", exc)] * len(changes)
        return [None] * len(changes)

    def remove_many(self, entry_ids: Sequence[str], area: str = QUEUE) -> list[SpoolError | None]:
        """Forget entries together (group commit): each one's files are
        unlinked under its lock, the envelope first, and one fsync of the
        area then covers them all. Returns each one's outcome, in order, as
        ``remove`` would raise it (a failed fsync fails every one it covered)."""
        _check_area(area)
        directory = self.dir(area)
        outcomes: list[SpoolError | None] = [None] * len(entry_ids)
        unlinked: list[int] = []
        for index, entry_id in enumerate(entry_ids):
            if not is_valid(entry_id):
                continue
            try:
                _unlink_locked(os.fspath(directory), entry_id)
            except OSError as exc:
                outcomes[index] = spool_error(f"cannot remove spool entry {entry_id}", exc)
            else:
                unlinked.append(index)
        if unlinked:
            try:
                self._synced[area]()
            except OSError as exc:
                for index in unlinked:
                    outcomes[index] = spool_error(
                        f"cannot remove spool entry {entry_ids[index]}", exc
                    )
        return outcomes

    def move(self, entry: Entry, source: str, target: str) -> None:
        """Move an entry between areas (queue ↔ dead) without a moment where
        it is in neither: link the message, commit the envelope in the
        target, then forget the source. A crash in between leaves it in
        both; ``open`` keeps the newer envelope (the target's: its mtime is
        made later than the source's). A move already done is not an error."""
        envelope = _checked(entry)
        _check_area(source)
        _check_area(target)
        if source == target:
            raise ValueError(f"cannot move {entry.id} from {source} to itself")
        src, dst = self.dir(source), self.dir(target)
        name_eml, name_json = f"{entry.id}.eml", f"{entry.id}.json"
        try:
            if not (src / name_json).exists() and (dst / name_json).exists():
                # Done before (a retried move): forget what is left in source.
                with self._locked(entry.id, target):
                    (src / name_eml).unlink(missing_ok=True)
                    sync_dir(src)
                return
            with self._locked(entry.id, source):
                self._require(entry.id, source)
                _link_into(src / name_eml, dst / name_eml, self.dir(TMP))
                floor = (src / name_json).stat().st_mtime_ns
                self._write_envelope(entry.id, envelope, target, newer_than=floor)
                (src / name_json).unlink()
                (src / name_eml).unlink(missing_ok=True)
                sync_dir(src)
        except OSError as exc:
            raise spool_error(f"cannot move spool entry {entry.id}", exc) from None

    def adopt(self, source: Spool, area: str) -> list[str]:
        """Move every committed entry of ``source``'s ``area`` into this
        spool's (a partition whose worker is gone: the caller holds
        ``source``'s lock); return the ids moved.

        Each message is linked in first, then its envelope renamed across
        (the commit: at every moment the envelope is in exactly one of the
        two spools, so the entry is neither lost nor delivered twice), then
        the source's link is removed. A crash between leaves a message
        without its envelope in one spool, which that spool's next ``open``
        removes. Each entry moves under its lock, so a ``queue`` command
        changing it meanwhile is not lost; one already in this spool stays."""
        _check_area(area)
        src, dst = source.dir(area), self.dir(area)
        try:
            ids = [i for i in source.ids(area) if not (dst / f"{i}.json").exists()]
            for entry_id in ids:  # the messages first, all covered by one fsync
                with contextlib.suppress(FileNotFoundError):
                    _link_into(src / f"{entry_id}.eml", dst / f"{entry_id}.eml", self.dir(TMP))
            sync_dir(dst)
            moved = []
            for entry_id in ids:
                with (
                    contextlib.suppress(NoSuchEntry, FileNotFoundError),  # deleted meanwhile
                    source._locked(entry_id, area),
                ):
                    os.rename(src / f"{entry_id}.json", dst / f"{entry_id}.json")
                    moved.append(entry_id)
            sync_dir(dst)
            sync_dir(src)
            done = set(moved)
            for entry_id in ids:  # the source's links; this spool's of what did not move
                left = src if entry_id in done else dst
                (left / f"{entry_id}.eml").unlink(missing_ok=True)
            sync_dir(src)
            sync_dir(dst)
        except OSError as exc:
            raise spool_error(f"cannot adopt the entries of {source.path}", exc) from None
        return moved

    def requeue(self, entry_id: str, change: Callable[[Entry], Entry]) -> Entry:
        """Move a dead entry back to ``queue/`` with ``change`` applied to its
        envelope as it is on disk now, under the entry's lock (``modify`` and
        ``move`` in one step, for ``ses-relay queue retry``); return the new
        entry. ``NoSuchEntry`` when it is not (or no longer) in ``dead/``;
        ``UnreadableEntry`` when its envelope is unreadable. The same crash
        guarantees as ``move``."""
        src, dst = self.dir(DEAD), self.dir(QUEUE)
        name_eml, name_json = f"{entry_id}.eml", f"{entry_id}.json"
        try:
            with self._locked(entry_id, DEAD):
                self._require(entry_id, DEAD)
                new = change(self._read(entry_id, DEAD))
                if new.id != entry_id:
                    raise ValueError(f"requeue changed the id {entry_id} to {new.id!r}")
                envelope = _checked(new)
                _link_into(src / name_eml, dst / name_eml, self.dir(TMP))
                floor = (src / name_json).stat().st_mtime_ns
                self._write_envelope(entry_id, envelope, QUEUE, newer_than=floor)
                (src / name_json).unlink()
                (src / name_eml).unlink(missing_ok=True)
                sync_dir(src)
                return new
        except OSError as exc:
            raise spool_error(f"cannot requeue spool entry {entry_id}", exc) from None

    def _finish_moves(self) -> None:
        """An entry in both areas was being moved: keep the newer envelope."""
        queued = {n[:-5] for n in os.listdir(self.dir(QUEUE)) if n.endswith(".json")}
        for name in sorted(os.listdir(self.dir(DEAD))):
            entry_id = name[:-5]
            if not name.endswith(".json") or entry_id not in queued:
                continue
            dead_json = self.dir(DEAD) / name
            queue_json = self.dir(QUEUE) / f"{entry_id}.json"
            try:
                queue_time = queue_json.stat().st_mtime_ns
                dead_time = dead_json.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            older = QUEUE if queue_time <= dead_time else DEAD
            newer = DEAD if older == QUEUE else QUEUE
            newer_eml = self.dir(newer) / f"{entry_id}.eml"
            older_eml = self.dir(older) / f"{entry_id}.eml"
            if not newer_eml.exists() and older_eml.exists():
                # Cannot happen with ``move`` (it links first); keep the message anyway.
                os.link(older_eml, newer_eml)
                sync_dir(self.dir(newer))
            delivery_log.info("%s: finishing an interrupted move to %s/", entry_id, newer)
            (self.dir(older) / f"{entry_id}.json").unlink()
            older_eml.unlink(missing_ok=True)
            sync_dir(self.dir(older))

    @contextlib.contextmanager
    def _locked(self, entry_id: str, area: str) -> Iterator[None]:
        """Hold the entry's lock: an exclusive flock on its message file."""
        if not is_valid(entry_id):
            raise NoSuchEntry(f"no spool entry {entry_id!r}: not an id")
        path = self.dir(area) / f"{entry_id}.eml"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise NoSuchEntry(f"no spool entry {entry_id} in {area}/") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:  # removed or moved away while we waited
                raise NoSuchEntry(f"no spool entry {entry_id} in {area}/")
            yield
        finally:
            os.close(fd)

    def _require(self, entry_id: str, area: str) -> None:
        if not (self.dir(area) / f"{entry_id}.json").exists():
            raise NoSuchEntry(f"no spool entry {entry_id} in {area}/")

    def _write_envelope(
        self, entry_id: str, envelope: bytes, area: str, *, newer_than: int | None = None
    ) -> None:
        json_tmp = _tmp_path(self.dir(TMP), entry_id, "json")
        try:
            _write_synced(json_tmp, envelope, newer_than=newer_than)
            os.rename(json_tmp, self.dir(area) / f"{entry_id}.json")
            sync_dir(self.dir(area))
        except BaseException:
            _unlink_quietly(json_tmp)
            raise

    # -- reading

    def _read(self, entry_id: str, area: str) -> Entry:
        path = self.dir(area) / f"{entry_id}.json"
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise NoSuchEntry(f"no spool entry {entry_id} in {area}/") from None
        entry = Entry.from_json(text)
        if entry.id != entry_id:
            raise UnreadableEntry(f"not a spool entry: {path.name} holds id {entry.id!r}")
        return entry

    def load(self, entry_id: str, area: str = QUEUE) -> Entry:
        """An entry's envelope: ``NoSuchEntry`` when it is not there,
        ``UnreadableEntry`` when it is unreadable."""
        _check_area(area)
        if not is_valid(entry_id):
            raise NoSuchEntry(f"no spool entry {entry_id!r}: not an id")
        try:
            return self._read(entry_id, area)
        except OSError as exc:
            raise spool_error(f"cannot read spool entry {entry_id}", exc) from None

    def message(self, entry_id: str, area: str = QUEUE) -> bytes:
        """An entry's whole message (for ``ses-relay queue show``; delivery
        reads it in chunks: ``open_message``)."""
        _check_area(area)
        if not is_valid(entry_id):
            raise NoSuchEntry(f"no spool entry {entry_id!r}: not an id")
        try:
            return (self.dir(area) / f"{entry_id}.eml").read_bytes()
        except FileNotFoundError:
            raise NoSuchEntry(f"no message {entry_id} in {area}/") from None
        except OSError as exc:
            raise spool_error(f"cannot read message {entry_id}", exc) from None

    def open_message(self, entry_id: str, area: str = QUEUE) -> RawMessage:
        """An entry's message, open to read in chunks (close it when done)."""
        _check_area(area)
        if not is_valid(entry_id):
            raise NoSuchEntry(f"no spool entry {entry_id!r}: not an id")
        try:
            return RawMessage.open(self.dir(area) / f"{entry_id}.eml")
        except FileNotFoundError:
            raise NoSuchEntry(f"no message {entry_id} in {area}/") from None
        except OSError as exc:
            raise spool_error(f"cannot read message {entry_id}", exc) from None

    def message_size(self, entry_id: str, area: str = QUEUE) -> int | None:
        """Bytes of an entry's message; None when it is not there."""
        _check_area(area)
        if not is_valid(entry_id):
            return None
        try:
            return (self.dir(area) / f"{entry_id}.eml").stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise spool_error(f"cannot read message {entry_id}", exc) from None

    def census(self) -> Census:
        """What the areas hold, from their listings alone (no file is read),
        for metrics. An area that cannot be listed counts as empty."""
        queued, oldest = _tally(self.dir(QUEUE))
        dead, _ = _tally(self.dir(DEAD))
        return Census(queued=queued, dead=dead, oldest_arrival=oldest)

    def find(self, entry_id: str) -> str | None:
        """The area holding ``entry_id``, or None."""
        if not is_valid(entry_id):
            return None
        for area in AREAS:
            if (self.dir(area) / f"{entry_id}.json").exists():
                return area
        return None

    def ids(self, area: str = QUEUE) -> Iterator[str]:
        """The ids of an area's committed entries (its envelopes' names), as
        the directory lists them: streamed, in no order, and no file is read.
        A ``.json`` whose name is not an id is moved to ``quarantine/`` with
        an ERROR log line."""
        _check_area(area)
        directory = self.dir(area)
        try:
            for entry_id in _envelope_names(directory):
                if is_valid(entry_id):
                    yield entry_id
                else:
                    self.quarantine(entry_id, area, reason="its name is not a queue id")
        except OSError as exc:
            raise spool_error(f"cannot list {directory}", exc) from None

    def entries(self, area: str = QUEUE) -> Iterator[Entry]:
        """Every readable entry of an area. An unreadable one is moved to
        ``quarantine/`` with an ERROR log line; a message without its
        envelope (not committed yet, or never acknowledged) is skipped."""
        _check_area(area)
        directory = self.dir(area)
        try:
            names = sorted(p.name for p in directory.iterdir())
        except OSError as exc:
            raise spool_error(f"cannot list {directory}", exc) from None
        for name in names:
            if not name.endswith(".json"):
                continue
            entry_id = name[:-5]
            json_path = directory / name
            try:
                entry = Entry.from_json(json_path.read_bytes())
            except FileNotFoundError:
                continue  # delivered, deleted or moved since the listing
            except (OSError, UnreadableEntry) as exc:
                self.quarantine(entry_id, area, reason=str(exc))
                continue
            if entry.id != entry_id:
                self.quarantine(entry_id, area, reason=f"the envelope holds id {entry.id!r}")
                continue
            if not (directory / f"{entry_id}.eml").exists():
                # The envelope goes first when an entry leaves: if it is
                # still here, the message is really missing.
                if json_path.exists():
                    self.quarantine(entry_id, area, reason="its message file is missing")
                continue
            yield entry

    def quarantine(self, entry_id: str, area: str, *, reason: str) -> None:
        """Move an entry's files to ``quarantine/`` (under a fresh name if
        that one is taken) and log an ERROR naming it. Never raises."""
        source, target = self.dir(area), self.dir(QUARANTINE)
        try:
            stem = _free_stem(target, entry_id)
            moved = []
            for suffix in (".json", ".eml"):  # envelope first: uncommit
                with contextlib.suppress(FileNotFoundError):
                    os.rename(source / f"{entry_id}{suffix}", target / f"{stem}{suffix}")
                    moved.append(f"{stem}{suffix}")
            if not moved:
                return  # someone else moved it meanwhile
            sync_dir(target)
            sync_dir(source)
        except OSError as exc:
            delivery_log.error(
                "%s: unreadable spool entry in %s/ (%s), and it cannot be quarantined: %s",
                entry_id,
                area,
                reason,
                exc.strerror or exc,
            )
            return
        delivery_log.error(
            "%s: quarantined unreadable spool entry from %s/ as quarantine/%s: %s",
            entry_id,
            area,
            " ".join(moved),
            reason,
        )

    def inline(self) -> Iterator[tuple[Entry, bytes]]:
        """The entries the journal holds (being tried inline by the running
        daemon), with their messages; read beside it, never changed."""
        for put in Journal(self.dir(JOURNAL)).pending(quiet=True):
            with contextlib.suppress(UnreadableEntry):
                entry = _entry_of(put)
                if self.find(entry.id) is None:  # else moved into the queue meanwhile
                    yield entry, put.message

    def _quarantine_put(self, put: JournalPut) -> None:
        """Keep an unreadable entry of the journal in ``quarantine/`` for a person."""
        target = self.dir(QUARANTINE)
        stem = _free_stem(target, put.entry_id if is_valid(put.entry_id) else "journal")
        for suffix, data in ((".eml", put.message), (".json", put.envelope)):
            _write_synced(target / f"{stem}{suffix}", data)
        sync_dir(target)
        delivery_log.error("%s: kept as quarantine/%s.json and .eml", put.entry_id, stem)

    def free_bytes(self) -> int:
        """Bytes available to us on the spool's file system."""
        try:
            stats = os.statvfs(self.path)
        except OSError as exc:
            raise spool_error(f"spool {self.path}", exc) from None
        return stats.f_bavail * stats.f_frsize


def _tally(directory: Path) -> tuple[int, float | None]:
    """Committed entries (envelopes) in an area, and the earliest arrival
    their ids tell; (0, None) when the area cannot be listed. The ids the
    relay makes sort by arrival: only one that sorts first so far is parsed."""
    count, oldest = 0, None
    try:
        for entry_id in _envelope_names(directory):
            count += 1
            if (oldest is None or entry_id < oldest) and made_at(entry_id) is not None:
                oldest = entry_id
    except OSError:
        return 0, None
    return count, None if oldest is None else made_at(oldest)


def _envelope_names(directory: Path) -> Iterator[str]:
    """The names of the envelopes (``*.json``) in ``directory``, without the
    suffix: streamed, in no order, no file read; ``OSError`` if unlistable."""
    with os.scandir(directory) as listing:
        for item in listing:
            name = item.name.removesuffix(".json")
            if name != item.name:
                yield name


def _check_area(area: str) -> None:
    if area not in AREAS:
        raise ValueError(f"not a spool area: {area!r}")


def _checked(entry: Entry) -> bytes:
    """The envelope's bytes, once we know they will read back as this entry."""
    envelope = entry.to_json()
    try:
        read_back = Entry.from_json(envelope)
    except UnreadableEntry as exc:  # not the disk's fault: the caller's entry is wrong
        raise ValueError(f"entry {entry.id!r} cannot be written: {exc}") from None
    if read_back.id != entry.id:  # pragma: no cover - from_json keeps ids
        raise ValueError(f"entry {entry.id!r} does not read back")
    return envelope


def _entry_of(put: JournalPut) -> Entry:
    """The entry a put of the journal holds; ``UnreadableEntry`` when none."""
    entry = Entry.from_json(put.envelope)
    if entry.id != put.entry_id:
        raise UnreadableEntry(f"its envelope is that of {entry.id}")
    return entry


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace")
    first = text.split("\n", 1)[0].strip()
    return int(first) if first.isdigit() and "\n" in text else None


def _tmp_path(tmp: Path, entry_id: str, suffix: str) -> Path:
    """A name in ``tmp/`` no other writer (thread or process) uses."""
    return tmp / f"{entry_id}.{suffix}.{os.getpid()}.{next(_tmp_seq)}"


def _free_stem(directory: Path, entry_id: str) -> str:
    for n in range(1000):
        stem = entry_id if n == 0 else f"{entry_id}.{n}"
        if not (directory / f"{stem}.json").exists() and not (directory / f"{stem}.eml").exists():
            return stem
    return f"{entry_id}.{time.time_ns()}"


def _link_into(source: Path, target: Path, tmp: Path) -> None:
    """Make ``target`` a hard link to ``source`` (replacing a different file)."""
    try:
        os.link(source, target)
    except FileExistsError:
        if os.path.samefile(source, target):
            return  # a retried move linked it already
        staged = _tmp_path(tmp, source.stem, "eml")
        os.link(source, staged)
        try:
            os.rename(staged, target)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise


def _unlink_locked(directory: str, entry_id: str, *, wait: bool = True) -> None:
    """Unlink an entry's files, the envelope first, holding its lock when it
    has a message file to hold it on (``Spool._locked``, lean: this runs for
    every delivered message). Without ``wait``, ``BlockingIOError`` and
    nothing done when the lock is held."""
    eml = f"{directory}/{entry_id}.eml"
    try:
        fd: int | None = os.open(eml, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        for path in (f"{directory}/{entry_id}.json", eml):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        if fd is not None:
            os.close(fd)


def _unlink_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _write_synced(path: Path, data: bytes, *, newer_than: int | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
        if newer_than is not None:
            _make_newer(fd, newer_than)
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_newer(fd: int, floor_ns: int) -> None:
    """Give the file an mtime later than ``floor_ns``, whatever the clock
    and the file system's timestamp granularity say."""
    for step in (1, 1_000_000, 1_000_000_000):
        mtime = os.fstat(fd).st_mtime_ns
        if mtime > floor_ns:
            return
        os.utime(fd, ns=(floor_ns + step, floor_ns + step))
