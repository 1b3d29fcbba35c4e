"""Group commit: changes made together share one blocking commit.

The classic scheme of databases and of Postfix's queue writers: the first
request starts a commit at once (no added latency when the relay is idle);
the requests that arrive while it runs wait, and go together in the next
one. Two forms, for two kinds of work:

* ``GroupCommit``, for coroutines: the requests that arrive together go to
  one blocking commit in one thread hop (new entries staged on the event
  loop, fsync'd and renamed together; delivered entries unlinked), which
  ends with one fsync of the directory. The relay's threads then run almost
  no Python per message: threads that do, each hop its own, cost more CPU
  fighting the event loop for the GIL than the file system work itself.
* ``SharedSync``, for threads: callers that change a directory in threads
  of their own (a ``queue`` command, a bounce) wait for one fsync of it that
  covers them all, which a single caller runs for all the callers that
  finished their change meanwhile.

Neither knows the spool: they are given the blocking functions to run (see
``Spool.commit``, ``Spool.remove_many``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")

Outcomes = Sequence[Exception | None]
"""Per request of a batch, in order: None (done) or the error to raise to its waiter."""

Commit = Callable[[list[Request]], Outcomes]
"""Commits a batch in order. Blocking: it runs in a worker thread."""

Begin = Callable[[list[Request]], Callable[[], Outcomes]]
"""Starts committing a batch on the event loop (what is cheap there, such as
a write to the page cache), and returns the blocking rest (an fsync) for a
worker thread: the fewer steps a thread takes, the fewer times it waits for
the interpreter's lock while the loop is busy."""


class _Round:
    """The callers one sync covers, and how it went."""

    __slots__ = ("callers", "done", "error")

    def __init__(self) -> None:
        self.callers = 0
        self.done = False
        self.error: BaseException | None = None


class SharedSync:
    """One blocking sync (an fsync of a directory) shared by the threads that
    need it at the same time. Thread-safe; blocking."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._changed = threading.Condition()
        self._next = _Round()
        """The callers whose change is made and no sync started since."""
        self._running = False

    @property
    def waiting(self) -> int:
        """Callers waiting for a sync that has not started yet."""
        with self._changed:
            return self._next.callers

    def __call__(self) -> None:
        """Return once a sync that started after this call began succeeded;
        raise the error of that sync when it failed (every caller it covered
        gets the same error). The first caller while no sync runs
        syncs at once; later ones wait for it to end, and one of them then
        syncs for them all."""
        with self._changed:
            mine = self._next
            mine.callers += 1
            while self._running and not mine.done:
                self._changed.wait()
            if not mine.done:  # no sync runs: this caller runs the one for ``mine``
                self._running = True
                self._next = _Round()
        if not mine.done:
            try:
                self._sync()
            except BaseException as exc:  # every caller it covered shares its fate
                mine.error = exc
            finally:
                with self._changed:
                    mine.done = True
                    self._running = False
                    self._changed.notify_all()
        if mine.error is not None:
            raise mine.error


class GroupCommit(Generic[Request]):
    """Batches the requests that arrive while a commit runs.

    Up to ``concurrency`` commits run at once, each in a thread of the
    loop's default executor: the requests made in one turn of the event loop
    while fewer run start one together in the next turn (a lone message
    waits for no one else's fsyncs); those made while all run wait for the
    first to end, and go with the others that waited meanwhile. A commit
    hands its outcomes back to the loop in one callback, which wakes its
    waiters (no task per commit: fewer turns of the loop before a reply).
    Given ``begin`` rather than ``commit``, a commit starts on the loop and
    only its blocking rest runs in the thread."""

    def __init__(
        self,
        commit: Commit[Request] | None = None,
        *,
        begin: Begin[Request] | None = None,
        concurrency: int = 1,
    ) -> None:
        """Either ``commit``, all of it in a thread, or ``begin``."""
        if begin is None:
            if commit is None:
                raise TypeError("GroupCommit takes commit or begin")
            whole = commit

            def begin(batch: list[Request]) -> Callable[[], Outcomes]:
                return functools.partial(whole, batch)

        elif commit is not None:
            raise TypeError("GroupCommit takes commit or begin, not both")
        self._begin = begin
        self._concurrency = concurrency
        self._waiting: list[tuple[Request, asyncio.Future[None]]] = []
        self._running = 0
        self._start_soon: asyncio.Handle | None = None
        self._idle: list[asyncio.Future[None]] = []
        """Callers of ``idle`` waiting for the running commits to end."""

    async def submit(self, request: Request) -> None:
        """Return once a commit covering ``request`` succeeded; raise its error
        when it failed. A waiter cancelled before its commit starts is left
        out of it; one cancelled later is committed all the same."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append((request, future))
        if self._running < self._concurrency and self._start_soon is None:
            self._start_soon = loop.call_soon(self._start, loop)
        await future

    async def idle(self) -> None:
        """Wait until no commit runs (requests whose waiters are gone included)."""
        while self._running or self._start_soon is not None:
            future = asyncio.get_running_loop().create_future()
            self._idle.append(future)
            await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start a commit of the requests waiting (on the loop)."""
        self._start_soon = None
        batch = [(r, f) for r, f in self._waiting if not f.done()]
        self._waiting = []
        if batch:
            self._running += 1
            try:
                rest = self._begin([r for r, _ in batch])
            except Exception as exc:  # could not begin: every request shares its fate
                self._finished(loop, batch, [exc] * len(batch))
                return
            loop.run_in_executor(None, self._run, loop, batch, rest)
        elif not self._running:
            self._wake_idle()

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[Request, asyncio.Future[None]]],
        rest: Callable[[], Outcomes],
    ) -> None:
        """The commit's blocking rest (in its thread); its outcomes go back to the loop."""
        outcomes: Sequence[BaseException | None]
        try:
            outcomes = rest()
        except Exception as exc:  # the commit broke: every request shares its fate
            outcomes = [exc] * len(batch)
        with contextlib.suppress(RuntimeError):  # the loop is closed: no one waits any more
            loop.call_soon_threadsafe(self._finished, loop, batch, outcomes)

    def _finished(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[Request, asyncio.Future[None]]],
        outcomes: Sequence[BaseException | None],
    ) -> None:
        """A commit ended (on the loop): its waiters learn how, and the
        requests that waited meanwhile start the next one at once."""
        self._running -= 1
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if outcome is None:
                future.set_result(None)
            else:
                future.set_exception(outcome)
        if self._waiting and self._start_soon is None:
            self._start(loop)
        elif not self._running:
            self._wake_idle()

    def _wake_idle(self) -> None:
        idle, self._idle = self._idle, []
        for future in idle:
            if not future.done():
                future.set_result(None)
