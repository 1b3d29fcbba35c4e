"""Group commit: requests that arrive together share one blocking commit.

The classic scheme of databases and of Postfix's queue writers: the first
request starts a commit at once (no added latency when the relay is idle);
the requests that arrive while it runs wait, and go together in the next
one. The blocking work of a commit runs in one thread hop, and each waiter
learns the outcome of the commit that covered its request: under load one
fsync of the spool directory (and one executor hop) serves many messages.

``GroupCommit`` knows nothing of the spool: it is given a blocking function
that commits a batch and reports one outcome per request (see
``Spool.put_many`` and ``Spool.remove_many``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")

Commit = Callable[[list[Request]], Sequence[Exception | None]]
"""Commits a batch in order; per request None (done) or the error to raise
to its waiter. Blocking: it runs in a worker thread."""


class GroupCommit(Generic[Request]):
    """Batches the requests that arrive while a commit runs."""

    def __init__(self, commit: Commit[Request], name: str) -> None:
        self._commit = commit
        self._name = name
        self._waiting: list[tuple[Request, asyncio.Future[None]]] = []
        self._running: asyncio.Task[None] | None = None

    async def submit(self, request: Request) -> None:
        """Return once a commit covering ``request`` succeeded; raise its error
        when it failed. A waiter cancelled before its commit starts is left
        out of it; one cancelled later is committed all the same."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._running is None:
            self._running = asyncio.create_task(self._run(), name=self._name)
        await future

    async def idle(self) -> None:
        """Wait until no commit runs (requests whose waiters are gone included)."""
        while self._running is not None:
            await asyncio.shield(self._running)

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
        finally:
            self._running = None
            # Left over only when this task is cancelled (the loop ends): the
            # waiters learn nothing, as if their thread were cut off.
            for _, future in (*batch, *self._waiting):
                future.cancel()
            self._waiting = []
