"""A fake ``relay.clock.Clock``: time moves only when the test says so.

Modelled on trio's ``MockClock``. Wall and monotonic time move together
(``now`` is the monotonic reading, ``wall()`` is ``now`` plus a fixed
offset). With ``autojump`` a sleep moves the time forward by its length at
once; without it, a sleep waits until ``advance`` passes its end. Every sleep
is recorded in ``sleeps``; ``sleeping_until`` waits (as an event, not a poll)
for a sleeper that ends at a given moment, so a test can see that the code
under test is idle until then.
"""

from __future__ import annotations

import asyncio

START = 1_000.0
WALL_OFFSET = 1_800_000_000.0 - START
"""``wall()`` starts in 2027, so that spool timestamps look real."""


class FakeClock:
    """Time that moves only when the code under test sleeps (autojump) or
    when the test calls ``advance``. Records every sleep."""

    def __init__(self, start: float = START, *, autojump: bool = True) -> None:
        self.now = start
        self.autojump = autojump
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._changed = asyncio.Condition()

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + WALL_OFFSET

    def to_wall(self, monotonic: float) -> float:
        return monotonic + WALL_OFFSET

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        if self.autojump:
            self.now += max(0.0, delay)
            await asyncio.sleep(0)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + delay, done))
        async with self._changed:
            self._changed.notify_all()
        await done

    def advance(self, seconds: float) -> None:
        """Move the time on by ``seconds`` and wake every sleeper that is due."""
        self.now += seconds
        for deadline, done in list(self._sleepers):
            if deadline <= self.now or done.done():
                self._sleepers.remove((deadline, done))
                if not done.done():
                    done.set_result(None)

    def advance_to_wall(self, wall: float) -> None:
        """``advance`` to the wall time ``wall`` (not back)."""
        self.advance(max(0.0, wall - self.wall()))

    def sleeping_until(self) -> list[float]:
        """The wall times at which the current sleepers wake, earliest first."""
        return sorted(self.to_wall(d) for d, done in self._sleepers if not done.done())

    async def wait_for_sleeper(self, wall: float, within: float = 5.0) -> None:
        """Until something sleeps until the wall time ``wall`` (to a microsecond)."""

        def found() -> bool:
            return any(abs(w - wall) < 1e-6 for w in self.sleeping_until())

        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(found)
