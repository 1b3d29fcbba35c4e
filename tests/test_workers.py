"""Background attempts (``relay.workers``) on a fake clock: each entry is
attempted when it is due, by at most ``concurrency`` workers, never twice at
once; ``quiesce`` starts nothing new and waits for what is in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from relay.workers import Workers
from tests.fakeclock import FakeClock

WAIT = 5.0
"""Seconds of real time any wait may take (they take milliseconds)."""


class Attempts:
    """Attempts that last until the test lets them end."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running: set[str] = set()
        self.most_at_once = 0
        self.gate = asyncio.Event()
        self._changed = asyncio.Condition()

    async def __call__(self, entry_id: str) -> None:
        self.started.append(entry_id)
        self.running.add(entry_id)
        self.most_at_once = max(self.most_at_once, len(self.running))
        async with self._changed:
            self._changed.notify_all()
        try:
            await self.gate.wait()
        finally:
            self.running.discard(entry_id)

    async def until_started(self, count: int) -> None:
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: len(self.started) >= count)


@asynccontextmanager
async def working(concurrency: int) -> AsyncIterator[tuple[Workers, Attempts, FakeClock]]:
    clock = FakeClock(autojump=False)
    attempts = Attempts()
    workers = Workers(clock, attempts)
    workers.start(concurrency)
    try:
        yield workers, attempts, clock
    finally:
        await workers.stop()


async def test_entries_are_attempted_when_due_earliest_first_by_at_most_concurrency_workers() -> (
    None
):
    async with working(2) as (workers, attempts, clock):
        now = clock.wall()
        workers.schedule("late", now + 20)
        workers.schedule("soon", now + 10)
        workers.schedule("later", now + 30)
        await clock.wait_for_sleeper(now + 10, within=WAIT)
        assert attempts.started == []
        clock.advance(30)
        await attempts.until_started(2)
        assert attempts.started == ["soon", "late"]  # "later" waits for a free worker
        attempts.gate.set()
        await attempts.until_started(3)
    assert attempts.started == ["soon", "late", "later"]
    assert attempts.most_at_once == 2


async def test_an_entry_in_flight_inline_is_not_attempted_again_when_it_falls_due() -> None:
    async with working(2) as (workers, attempts, clock):
        now = clock.wall()
        workers.claim("inline")
        workers.schedule("inline", now)
        workers.schedule("other", now)
        await attempts.until_started(1)  # due together: "inline" came up first
        assert attempts.started == ["other"]
        workers.release("inline")  # its attempt schedules it again if it has to
        workers.schedule("inline", now)
        await attempts.until_started(2)
    assert attempts.started == ["other", "inline"]


async def test_quiesce_starts_nothing_new_and_waits_for_the_attempts_in_flight() -> None:
    async with working(1) as (workers, attempts, clock):
        now = clock.wall()
        workers.schedule("first", now)
        workers.schedule("next", now + 10)
        await attempts.until_started(1)
        quiet = asyncio.create_task(workers.quiesce())
        await asyncio.sleep(0)  # quiesce begins
        clock.advance(10)  # "next" falls due
        await asyncio.sleep(0)
        assert not quiet.done()  # "first" is still in flight
        attempts.gate.set()
        async with asyncio.timeout(WAIT):
            await quiet
    assert attempts.started == ["first"]
