"""``relay.groupcommit.GroupCommit``: requests that arrive together share a
commit, and every request gets one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from relay.groupcommit import GroupCommit

WAIT = 5.0


def recording(commits: list[list[str]]) -> GroupCommit[str]:
    def commit(batch: list[str]) -> list[Exception | None]:
        commits.append(list(batch))
        return [None] * len(batch)

    return GroupCommit(commit)


async def test_a_request_made_as_the_last_commit_ends_gets_a_commit_of_its_own() -> None:
    """The waiter of a commit wakes before the commit's task is done: what it
    submits then must still start a commit (it once waited forever, and with
    it a delivered message's removal and the relay's shutdown)."""
    commits: list[list[str]] = []
    group = recording(commits)
    async with asyncio.timeout(WAIT):
        await group.submit("first")
        await group.submit("second")  # in the same step as the first's wake-up
    assert commits == [["first"], ["second"]]
    await asyncio.wait_for(group.idle(), WAIT)


async def test_requests_that_arrive_together_share_a_commit() -> None:
    commits: list[list[str]] = []
    group = recording(commits)
    await asyncio.wait_for(asyncio.gather(*(group.submit(f"r{n}") for n in range(5))), WAIT)
    assert commits == [["r0", "r1", "r2", "r3", "r4"]]


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


async def test_up_to_concurrency_commits_run_at_once_and_the_next_waits() -> None:
    started: list[str] = []
    release = threading.Event()

    def commit(batch: list[str]) -> list[Exception | None]:
        started.extend(batch)
        assert release.wait(WAIT)
        return [None] * len(batch)

    group: GroupCommit[str] = GroupCommit(commit, concurrency=3)
    waiters = []
    for n in range(3):  # each starts a commit of its own while the others run
        waiters.append(asyncio.create_task(group.submit(f"r{n}")))
        await until(lambda n=n: len(started) == n + 1)
    waiters += [asyncio.create_task(group.submit(f"r{n}")) for n in (3, 4)]
    await asyncio.sleep(0.05)
    assert started == ["r0", "r1", "r2"]  # three run: the others wait for one to end
    release.set()
    await asyncio.wait_for(asyncio.gather(*waiters), WAIT)
    assert started == ["r0", "r1", "r2", "r3", "r4"]
