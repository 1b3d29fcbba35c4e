"""Time as a dependency: wall time, monotonic time and sleeping, from one clock.

Delivery and its parts (the scheduler, the sending rate, the pauses of all
delivery, quota polling) read the time and wait only through a ``Clock``
passed in, never through ``time`` or ``asyncio.sleep`` themselves, so that
tests drive them with a fake clock (``tests/fakeclock.py``), as trio's
``MockClock`` does. ``SystemClock`` is the real one.

Wall time (``wall``, Unix seconds) dates what is written down: a message's
arrival, its next attempt, its expiry. Monotonic time (``monotonic``) measures
spans in this process: pauses, the sending rate, deadlines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    """Where time comes from."""

    def wall(self) -> float:
        """Seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (any origin)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The machine's clocks and the event loop's sleep."""

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def wait_for(clock: Clock, awaitable: Awaitable[T], seconds: float | None) -> T:
    """``asyncio.wait_for`` on ``clock``'s time: ``awaitable``'s result, or
    TimeoutError (``awaitable`` cancelled) once ``seconds`` have passed.
    None waits as long as it takes."""
    work = asyncio.ensure_future(awaitable)
    if seconds is None:
        return await work
    nap = asyncio.ensure_future(clock.sleep(max(0.0, seconds)))
    try:
        await asyncio.wait((work, nap), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, nap):
            if not task.done():
                task.cancel()
        # a cancelled sleep or piece of work has ended before we look at either
        await asyncio.gather(work, nap, return_exceptions=True)
    if work.done() and not work.cancelled():
        return work.result()
    nap.result()  # the sleep's own error, if any
    raise TimeoutError
