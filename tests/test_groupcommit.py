"""``relay.groupcommit.GroupCommit``: requests that arrive together share a
commit, and every request gets one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

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


async def test_a_commit_begun_on_the_loop_ends_in_a_thread() -> None:
    """``begin`` runs on the event loop with the batch; what it returns runs
    in a worker thread, and its outcomes reach the waiters."""
    loop_thread = threading.get_ident()
    began: list[tuple[list[str], int]] = []
    ended_in: list[int] = []

    def begin(batch: list[str]) -> Callable[[], list[Exception | None]]:
        began.append((list(batch), threading.get_ident()))

        def rest() -> list[Exception | None]:
            ended_in.append(threading.get_ident())
            return [None if r != "bad" else OSError("no") for r in batch]

        return rest

    group: GroupCommit[str] = GroupCommit(begin=begin)
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(group.submit(r) for r in ("a", "bad", "b")), return_exceptions=True),
        WAIT,
    )
    assert outcomes[0] is None
    assert outcomes[2] is None
    assert isinstance(outcomes[1], OSError)
    assert began == [(["a", "bad", "b"], loop_thread)]
    assert len(ended_in) == 1
    assert ended_in[0] != loop_thread


async def test_a_commit_that_cannot_begin_fails_its_waiters_and_the_next_one_runs() -> None:
    calls: list[list[str]] = []

    def begin(batch: list[str]) -> Callable[[], list[Exception | None]]:
        calls.append(list(batch))
        if batch == ["first"]:
            raise OSError("cannot begin")
        return lambda: [None] * len(batch)

    group: GroupCommit[str] = GroupCommit(begin=begin)
    with pytest.raises(OSError, match="cannot begin"):
        await asyncio.wait_for(group.submit("first"), WAIT)
    await asyncio.wait_for(group.submit("second"), WAIT)
    assert calls == [["first"], ["second"]]
    await asyncio.wait_for(group.idle(), WAIT)


def test_a_group_commit_takes_a_commit_or_a_begin() -> None:
    with pytest.raises(TypeError):
        GroupCommit()
    with pytest.raises(TypeError):
        GroupCommit(lambda batch: [], begin=lambda batch: lambda: [])
