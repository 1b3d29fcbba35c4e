"""Background attempts: each queued entry's attempt is made when it is due.

A scheduler sleeps on the injected clock (``relay.clock``) until the next
entry of the due-time queue (``relay.duequeue``) is due and hands it to one
of ``delivery.concurrency`` workers, which make the attempt. An entry is
never attempted twice at once: one attempted outside the workers (inline,
while its client waits) is ``claim``ed for that time, and an entry that
falls due meanwhile is left to the attempt in flight (which schedules it
again if it has to).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from relay.clock import Clock, wait_for
from relay.duequeue import DueQueue


class Workers:
    """The scheduler and workers of one delivery service."""

    def __init__(self, clock: Clock, attempt: Callable[[str], Awaitable[None]]) -> None:
        """``attempt`` makes an attempt of a queued entry, by id; it does not raise."""
        self._clock = clock
        self._attempt = attempt
        self._due = DueQueue()
        self._in_flight: set[str] = set()
        self._idle = asyncio.Event()
        """Set when the last attempt in flight ends."""
        self._work: asyncio.Queue[str] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []

    def start(self, concurrency: int) -> None:
        self._scheduler = asyncio.create_task(self._schedule_loop(), name="relay-scheduler")
        self._workers = [
            asyncio.create_task(self._work_loop(), name=f"relay-worker-{number}")
            for number in range(concurrency)
        ]

    def schedule(self, entry_id: str, when: float) -> None:
        """Attempt ``entry_id`` at ``when`` (wall time), or sooner if it is due sooner."""
        if self._due.schedule(entry_id, when):
            self._wake.set()

    def claim(self, entry_id: str) -> None:
        """An attempt of ``entry_id`` outside the workers begins."""
        self._in_flight.add(entry_id)

    def release(self, entry_id: str) -> None:
        """The attempt of ``entry_id`` in flight has ended."""
        self._in_flight.discard(entry_id)
        if not self._in_flight:
            self._idle.set()

    async def quiesce(self) -> None:
        """Start no new attempt; return when the attempts in flight are done."""
        if self._scheduler is not None:
            self._scheduler.cancel()
        if self._in_flight:
            self._idle.clear()
            await self._idle.wait()

    async def stop(self) -> None:
        """Cancel the scheduler and the attempts of the workers."""
        tasks = [task for task in (self._scheduler, *self._workers) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._scheduler, self._workers = None, []

    async def _schedule_loop(self) -> None:
        """Hand due entries to the workers; sleep until the next one is due."""
        while True:
            now = self._clock.wall()
            for entry_id in self._due.pop_due(now):
                if entry_id in self._in_flight:
                    continue  # the attempt in flight settles it
                self.claim(entry_id)
                self._work.put_nowait(entry_id)
            self._wake.clear()
            due = self._due.next_due()
            with contextlib.suppress(TimeoutError):
                await wait_for(self._clock, self._wake.wait(), None if due is None else due - now)

    async def _work_loop(self) -> None:
        while True:
            entry_id = await self._work.get()
            try:
                await self._attempt(entry_id)
            finally:
                self.release(entry_id)
