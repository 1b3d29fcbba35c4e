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
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")

Commit = Callable[[list[Request]], Sequence[Exception | None]]
"""Commits a batch in order; per request None (done) or the error to raise
to its waiter. Blocking: it runs in a worker thread."""


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

    Up to ``concurrency`` commits run at once, each in its own thread: a
    request that arrives while fewer run starts one at once (a lone message
    waits for no one else's fsyncs), one that arrives while all run waits
    for the first to end, and goes with the others that waited meanwhile."""

    def __init__(self, commit: Commit[Request], name: str, *, concurrency: int = 1) -> None:
        self._commit = commit
        self._name = name
        self._concurrency = concurrency
        self._waiting: list[tuple[Request, asyncio.Future[None]]] = []
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, request: Request) -> None:
        """Return once a commit covering ``request`` succeeded; raise its error
        when it failed. A waiter cancelled before its commit starts is left
        out of it; one cancelled later is committed all the same."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if len(self._running) < self._concurrency:
            self._running.add(asyncio.create_task(self._run(), name=self._name))
        await future

    async def idle(self) -> None:
        """Wait until no commit runs (requests whose waiters are gone included)."""
        while self._running:
            await asyncio.wait(list(self._running))

    async def _run(self) -> None:
        batch: list[tuple[Request, asyncio.Future[None]]] = []
        try:
            while batch := [(r, f) for r, f in self._waiting if not f.done()]:
                self._waiting = []
                try:
                    outcomes = await asyncio.to_thread(self._commit, [r for r, _ in batch])
                except Exception as exc:  # the commit broke: every request shares its fate
                    outcomes = [exc] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if outcome is None:
                        future.set_result(None)
                    else:
                        future.set_exception(outcome)
        except asyncio.CancelledError:
            # Only when the loop ends: the waiters learn nothing, as if their
            # thread were cut off.
            for _, future in (*batch, *self._waiting):
                future.cancel()
            self._waiting = []
            raise
        finally:
            # At once, not in a done callback: a request that arrives after
            # the loop above found nothing waiting must start a commit of its
            # own, which it would not while this task still counted as running.
            self._running.discard(asyncio.current_task())
