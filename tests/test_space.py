"""The spool's free-space floor (``relay.space``) on a fake clock: when it
reads the free space, and what it answers, as a table.

Through a real listener: ``tests/test_faults.py`` (MAIL gets 452 on a full
1 MiB file system) and ``tests/test_metrics.py`` (``/readyz``).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from relay.errors import SpoolError
from relay.space import CHECK_INTERVAL, RECHECK_INTERVAL, FreeSpace, floor_for
from tests.fakeclock import FakeClock

FLOOR = floor_for(1_000)
ROOM = FLOOR
FULL = FLOOR - 1


class Disk:
    """The free bytes of a file system, counting its readings."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.reads = 0
        self.error: SpoolError | None = None

    def __call__(self) -> int:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.free


async def settled() -> None:
    """Until the readings ``ok`` started in the background have ended."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    await asyncio.gather(*others)


def test_the_floor_is_one_and_a_half_messages() -> None:
    assert floor_for(1_000) == 1_500
    assert floor_for(7_864_320) == 11_796_480


# (seconds on the clock, free bytes on the disk, asked with, answer, readings so far)
Step = tuple[float, int, str, bool, int]


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param(
            [(0.0, FULL, "ok", True, 1), (0.0, FULL, "ok", False, 1)],
            id="room until the first reading says otherwise",
        ),
        pytest.param(
            [(0.0, ROOM, "ok", True, 1), (0.0, FULL, "ok", True, 1)],
            id="exactly the floor is room",
        ),
        pytest.param(
            [
                (0.0, ROOM, "ok", True, 1),
                (CHECK_INTERVAL - 0.01, FULL, "ok", True, 1),
                (CHECK_INTERVAL - 0.01, FULL, "has_room", True, 1),
                (CHECK_INTERVAL, FULL, "ok", True, 2),
                (CHECK_INTERVAL, FULL, "ok", False, 2),
            ],
            id="read again once a second while mail comes in",
        ),
        pytest.param(
            [
                (0.0, FULL, "ok", True, 1),
                (RECHECK_INTERVAL - 0.001, FULL, "has_room", False, 1),
                (RECHECK_INTERVAL, FULL, "has_room", False, 2),
                (2 * RECHECK_INTERVAL - 0.001, ROOM, "has_room", False, 2),
                (2 * RECHECK_INTERVAL, ROOM, "has_room", True, 3),
            ],
            id="a refusal is confirmed by a fresh reading, at most every 0.1 s",
        ),
        pytest.param(
            [
                (0.0, FULL, "ok", True, 1),
                (0.0, FULL, "look_again", True, 1),
                (0.0, ROOM, "ok", False, 2),
                (0.0, ROOM, "ok", True, 2),
            ],
            id="a failed write to the spool reads again at once",
        ),
    ],
)
async def test_when_the_free_space_is_read_and_what_is_answered(steps: list[Step]) -> None:
    clock = FakeClock()
    disk = Disk(ROOM)
    space = FreeSpace(disk, FLOOR, clock)
    start = clock.monotonic()
    for at, free, asked, answer, reads in steps:
        clock.advance(start + at - clock.monotonic())
        disk.free = free
        if asked == "ok":
            assert space.ok() is answer
        elif asked == "has_room":
            assert await space.has_room() is answer
        else:
            space.look_again()
        await settled()
        assert disk.reads == reads, (at, asked)


async def test_a_failed_reading_keeps_the_last_one_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    disk = Disk(FULL)
    space = FreeSpace(disk, FLOOR, clock)
    await space.refresh()
    disk.error = SpoolError("spool /var/spool/ses-relay: Input/output error")
    disk.free = ROOM
    with caplog.at_level(logging.WARNING, logger="relay"):
        assert space.ok() is False
        await settled()
        assert space.ok() is False
    assert disk.reads == 2
    assert (
        "cannot read free space of the spool: spool /var/spool/ses-relay: Input/output error"
        in caplog.text
    )
