"""Each queued entry's delivery state, written to the spool as SES answers,
and remembered where it could not be written.

A new entry committed in the spool's journal (``relay.journal``) is held
here with its message while SES is tried inline: sent (or refused), it only
gets its "done" record; anything else moves it into the queue first
(``keep``, and every ``save``), and it is an ordinary queued entry from then
on. One that cannot be moved (a full disk) is served from memory, and the
move is tried again with its next save; a restart finds it in the journal.

Every batch's outcome is written as soon as SES answers, so that a restart
never resends a batch SES accepted. When a write fails (a full disk), the
entry is remembered in memory until a write succeeds or it leaves the
queue, and the entry loaded for its next attempt gets the outcomes back
(``recall``): this process does not resend the batch either (a restart
before a write succeeds may).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from relay.errors import NoSuchEntry, SpoolError, UnreadableEntry
from relay.groupcommit import GroupCommit
from relay.log import delivery_log
from relay.ses.sender import RawMessage
from relay.spool import QUEUE, Entry, Spool

DONE_SYNC_DELAY = 0.05
"""Seconds a delivered message's done record may wait for an fdatasync."""


@dataclass(slots=True)
class _Journaled:
    """An entry in the journal only, as last decided, and its message."""

    entry: Entry
    message: bytes


def recall(on_disk: Entry, known: Entry | None) -> Entry:
    """``on_disk`` with the batch outcomes of ``known`` (the same entry as
    last decided in memory) that it still shows pending. Pure."""
    if known is None:
        return on_disk
    entry = on_disk
    for index, (written, remembered) in enumerate(
        zip(on_disk.batches, known.batches, strict=False)
    ):
        if (
            written.state == "pending"
            and remembered.state != "pending"
            and written.recipients == remembered.recipients
        ):
            entry = entry.with_batch(index, remembered)
    return entry


class Record:
    """The delivery state of one spool's queued entries."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._unsaved: dict[str, Entry] = {}
        """Entries whose latest state could not be written, by id."""
        self._removes = GroupCommit(spool.remove_many)
        """Entries whose lock was busy (``unlink_now``), removed together in
        one thread hop and one fsync of ``queue/``."""
        self._syncs = GroupCommit(spool.sync_queue)
        """Delivered entries unlinked on the loop share one fsync of ``queue/``."""
        self._journaled: dict[str, _Journaled] = {}
        """Entries in the journal only (not moved into the queue yet), by id."""
        self._journal_syncs: GroupCommit[object] = GroupCommit(spool.journal.sync)
        """The done records of entries that left the journal share one fdatasync."""
        self._sync_timer: asyncio.TimerHandle | None = None
        self._lazy_syncs: set[asyncio.Task[None]] = set()

    def journaled(self, entry: Entry, message: bytes) -> None:
        """``entry`` was committed in the journal, with ``message``."""
        self._journaled[entry.id] = _Journaled(entry, message)

    async def keep(self, entry: Entry) -> bool:
        """Make sure ``entry`` is in the queue, as it is now (moved there from
        the journal if it is only in the journal); True when it is."""
        if entry.id not in self._journaled:
            return True
        return await self._move_from_journal(entry)

    async def save(self, entry: Entry) -> bool:
        """Write ``entry``'s state; True when it is on disk."""
        if entry.id in self._journaled:
            return await self._move_from_journal(entry)
        try:
            await asyncio.to_thread(self._spool.update, entry)
        except NoSuchEntry:
            self._unsaved.pop(entry.id, None)
            delivery_log.warning("%s: deleted while being delivered", entry.id)
            return False
        except SpoolError as exc:
            # The outcome is known but not on disk: kept in memory so that this
            # process does not resend the batch; a restart before a write
            # succeeds may.
            self._unsaved[entry.id] = entry
            delivery_log.error("%s: cannot record delivery state: %s", entry.id, exc)
            return False
        self._unsaved.pop(entry.id, None)
        return True

    async def envelope(self, entry_id: str) -> Entry:
        """A queued entry's envelope, with what is known of it beyond the disk."""
        if (journaled := self._journaled.get(entry_id)) is not None:
            return journaled.entry
        entry = await asyncio.to_thread(self._spool.load, entry_id)
        return recall(entry, self._unsaved.get(entry_id))

    async def message(self, entry_id: str) -> RawMessage:
        """A queued entry's message, open to read in chunks (close it);
        ``UnreadableEntry`` when only its envelope is left."""
        if (journaled := self._journaled.get(entry_id)) is not None:
            return RawMessage.of(journaled.message)
        return await asyncio.to_thread(self._message, entry_id)

    async def remove(self, entry: Entry) -> None:
        """``entry`` is done with (sent, or refused inline): out of the spool."""
        self.left(entry.id)
        if self._journaled.pop(entry.id, None) is not None:
            # Durable with the next fdatasync of the journal, which new
            # messages make under load: a power loss before it may resend it
            # after the restart (the same window as between SES's answer and
            # this call), never lose it.
            self._spool.journal.done(entry.id)
            self._sync_soon()
            return
        try:
            if self._spool.unlink_now(entry.id):
                await self._syncs.submit(entry.id)
            else:
                await self._removes.submit(entry.id)
        except SpoolError as exc:
            delivery_log.error("%s: delivered but not removed: %s", entry.id, exc)

    async def idle(self) -> None:
        """Return when no removal is running in a thread (before the spool
        closes), the journal's done records synced."""
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_if_needed()
        while self._lazy_syncs:
            await asyncio.wait(list(self._lazy_syncs))
        await self._removes.idle()
        await self._syncs.idle()
        await self._journal_syncs.idle()

    def left(self, entry_id: str) -> None:
        """``entry_id`` left the queue: nothing more to remember of it."""
        self._unsaved.pop(entry_id, None)

    async def _move_from_journal(self, entry: Entry) -> bool:
        journaled = self._journaled[entry.id]
        journaled.entry = entry
        try:
            await asyncio.to_thread(self._spool.put, entry, journaled.message)
        except SpoolError as exc:
            delivery_log.error("%s: cannot move from the journal into the queue: %s", entry.id, exc)
            return False
        del self._journaled[entry.id]
        await self._leave_journal(entry.id, "moved into the queue but still in the journal")
        return True

    def _sync_soon(self) -> None:
        """Sync the journal's done records within ``DONE_SYNC_DELAY``, unless
        an fdatasync of new messages does it first."""
        if self._sync_timer is None:
            loop = asyncio.get_running_loop()
            self._sync_timer = loop.call_later(DONE_SYNC_DELAY, self._sync_if_needed)

    def _sync_if_needed(self) -> None:
        self._sync_timer = None
        if self._spool.journal.unsynced():
            task = asyncio.create_task(self._sync_done(), name="relay-journal-sync")
            self._lazy_syncs.add(task)
            task.add_done_callback(self._lazy_syncs.discard)

    async def _sync_done(self) -> None:
        try:
            await self._journal_syncs.submit(None)
        except SpoolError as exc:
            delivery_log.error(
                "delivered messages not recorded as done (a restart after a power "
                "loss may send them again): %s",
                exc,
            )

    async def _leave_journal(self, entry_id: str, failure: str) -> None:
        """A done record for ``entry_id``, durable when this returns (or the
        failure logged: a restart may then send the message again)."""
        self._spool.journal.done(entry_id)
        try:
            await self._journal_syncs.submit(entry_id)
        except SpoolError as exc:
            delivery_log.error("%s: %s: %s", entry_id, failure, exc)

    def _message(self, entry_id: str) -> RawMessage:
        try:
            return self._spool.open_message(entry_id)
        except NoSuchEntry:
            if self._spool.find(entry_id) == QUEUE:  # the envelope is still there
                raise UnreadableEntry("its message file is missing") from None
            raise
