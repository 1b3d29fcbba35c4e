"""Spool partitions of ``smtp.workers``: where they are, adopting the
partition of a worker that is gone, and the spool as a whole for
``ses-relay queue``.

With ``smtp.workers = N > 1`` worker K (0 ≤ K < N) keeps its queue in
``spool.path/worker-K/``, a complete ``relay.spool.Spool`` with its own
lock; the parent holds the lock of ``spool.path`` itself, whose own queue
(mail queued before workers were enabled) it moves into ``worker-0/`` at
start. A partition whose lock is free has no worker (N shrank, or its
worker died): a live worker takes its lock and moves its entries into its
own partition (``Spool.adopt``), so nothing is stranded. With N = 1 the
one process uses ``spool.path`` as before and adopts every partition left
from a run with workers.

Blocking: call these in a thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

from relay.errors import NoSuchEntry, SpoolLocked
from relay.log import delivery_log
from relay.spool import DEAD, QUEUE, Entry, Spool

PREFIX = "worker-"
_NAME = re.compile(r"worker-(0|[1-9][0-9]{0,5})")


def partition_path(root: Path, index: int) -> Path:
    return root / f"{PREFIX}{index}"


def partition_paths(root: Path) -> list[Path]:
    """The partitions under ``root``, by worker number."""
    try:
        names = [p.name for p in root.iterdir() if _NAME.fullmatch(p.name) and p.is_dir()]
    except FileNotFoundError:
        return []
    return [root / name for name in sorted(names, key=lambda n: int(n[len(PREFIX) :]))]


def adopt_orphans(spool: Spool, candidates: list[Path], *, reason: str) -> list[str]:
    """Move the entries of each spool in ``candidates`` whose lock is free
    into ``spool``; the queued ids moved (to schedule). One whose lock is
    held (its worker runs) is left alone."""
    adopted: list[str] = []
    for path in candidates:
        orphan = Spool(path)
        try:
            orphan.open()
        except SpoolLocked:
            continue
        try:
            queued = spool.adopt(orphan, QUEUE)
            dead = spool.adopt(orphan, DEAD)
        finally:
            orphan.close()
        if queued or dead:
            delivery_log.warning(
                "adopted %d queued and %d dead messages from %s (%s)",
                len(queued),
                len(dead),
                path,
                reason,
            )
        adopted.extend(queued)
    return adopted


class SpoolSet:
    """The spool and its partitions as one, for ``ses-relay queue``: each
    operation on an entry goes to the partition holding it."""

    def __init__(self, root: Spool) -> None:
        self.root = root
        self.path = root.path
        self.parts = [root, *(Spool(path) for path in partition_paths(root.path))]

    def open(self) -> None:
        for spool in self.parts:
            spool.open(lock=False)

    def used_by_daemon(self) -> bool:
        return any(spool.used_by_daemon() for spool in self.parts)

    def daemon_pid(self) -> int | None:
        """The daemon's: the one process, or the parent of the workers."""
        return self.root.daemon_pid()

    def find(self, entry_id: str) -> str | None:
        for spool in self.parts:
            if (area := spool.find(entry_id)) is not None:
                return area
        return None

    def holder(self, entry_id: str, area: str) -> Spool:
        """The partition with ``entry_id`` in ``area``; ``NoSuchEntry`` if none."""
        for spool in self.parts:
            if spool.find(entry_id) == area:
                return spool
        raise NoSuchEntry(f"no spool entry {entry_id} in {area}/")

    def entries(self, area: str = QUEUE) -> Iterator[Entry]:
        for spool in self.parts:
            yield from spool.entries(area)

    def inline(self) -> Iterator[tuple[Entry, bytes]]:
        for spool in self.parts:
            yield from spool.inline()

    def message_size(self, entry_id: str, area: str = QUEUE) -> int | None:
        try:
            return self.holder(entry_id, area).message_size(entry_id, area)
        except NoSuchEntry:
            return None

    def load(self, entry_id: str, area: str = QUEUE) -> Entry:
        return self.holder(entry_id, area).load(entry_id, area)

    def message(self, entry_id: str, area: str = QUEUE) -> bytes:
        return self.holder(entry_id, area).message(entry_id, area)

    def modify(self, entry_id: str, change: Callable[[Entry], Entry], area: str = QUEUE) -> Entry:
        return self.holder(entry_id, area).modify(entry_id, change, area)

    def requeue(self, entry_id: str, change: Callable[[Entry], Entry]) -> Entry:
        return self.holder(entry_id, DEAD).requeue(entry_id, change)

    def remove(self, entry_id: str, area: str = QUEUE) -> None:
        for spool in self.parts:
            if spool.find(entry_id) == area:
                spool.remove(entry_id, area)
