"""The spool's free-space floor: mail is taken only while the spool's file
system has room for one more message.

Below the floor (``FLOOR_FACTOR`` x ``smtp.max_message_size`` free) MAIL gets
``452 4.3.1`` before the client sends any data, and ``/readyz`` says so. The
reading (``Spool.free_bytes``, a ``statvfs``) is taken off the event loop and
renewed about once every ``CHECK_INTERVAL`` while it is asked for (``ok``);
a refusal is confirmed by a fresh reading at most every ``RECHECK_INTERVAL``
(``has_room``), so that space which came back (the queue drained, an
operator cleaned up) is seen at once. The intervals run on the injected
clock (``relay.clock``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from relay.clock import Clock
from relay.errors import SmtpReply, SpoolError
from relay.log import delivery_log

CHECK_INTERVAL = 1.0
"""Seconds between readings while mail comes in."""
RECHECK_INTERVAL = 0.1
"""Seconds between fresh readings before a MAIL is refused for lack of space."""
FLOOR_FACTOR = 1.5
"""The floor, in messages of ``smtp.max_message_size``."""
STORAGE_FULL = SmtpReply(452, "4.3.1", "Insufficient system storage, try again later")


def floor_for(max_message_size: int) -> int:
    """The free bytes below which no message is taken."""
    return int(max_message_size * FLOOR_FACTOR)


class FreeSpace:
    """The last reading of the spool's free space against the floor."""

    def __init__(self, free_bytes: Callable[[], int], floor: int, clock: Clock) -> None:
        """``free_bytes`` reads the free space (blocking; run in a thread)."""
        self._free_bytes = free_bytes
        self.floor = floor
        self._clock = clock
        self._free: int | None = None
        """The last reading; None until one succeeds (then there is room)."""
        self._checked: float | None = None
        """When ``ok`` last started a reading (monotonic); None: read at the next."""
        self._read: float | None = None
        """When the last reading ended (monotonic)."""
        self._checks: set[asyncio.Task[None]] = set()

    def ok(self) -> bool:
        """Whether there is room, as last read; starts a new reading in the
        background when the last one is ``CHECK_INTERVAL`` old."""
        if self._due(self._checked, CHECK_INTERVAL):
            self._checked = self._clock.monotonic()
            task = asyncio.create_task(self.refresh())
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)
        return self._room()

    async def has_room(self) -> bool:
        """``ok``, but a refusal is confirmed by a fresh reading (at most every
        ``RECHECK_INTERVAL``)."""
        if self.ok():
            return True
        if self._due(self._read, RECHECK_INTERVAL):
            await self.refresh()
        return self._room()

    def look_again(self) -> None:
        """A write to the spool failed: the next ``ok`` reads afresh."""
        self._checked = None

    def refuse(self, entry_id: str, error: OSError | SpoolError) -> SmtpReply:
        """A message could not be written to the spool: logged, the free space
        read afresh next time, and the reply its client gets."""
        delivery_log.error("%s: not accepted: %s", entry_id, error)
        self.look_again()
        return STORAGE_FULL

    async def refresh(self) -> None:
        """Read the free space now (a failed reading keeps the last one)."""
        try:
            self._free = await asyncio.to_thread(self._free_bytes)
        except (OSError, SpoolError) as exc:
            delivery_log.warning("cannot read free space of the spool: %s", exc)
        self._read = self._clock.monotonic()

    def _due(self, last: float | None, interval: float) -> bool:
        return last is None or self._clock.monotonic() - last >= interval

    def _room(self) -> bool:
        return self._free is None or self._free >= self.floor
