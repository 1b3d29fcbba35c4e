"""Hooks on the spool's fsyncs that commit entries: count, record, hold and fail them.

``DirSyncGate`` replaces ``os.fsync`` as ``relay.spool`` calls it: every
fsync of ``directory`` is counted, and covers the envelopes (``ID.json``)
in the directory when it began (the renames it makes durable).
``JournalSyncGate`` replaces ``os.fdatasync`` as ``relay.journal`` calls it:
every fdatasync of a journal segment that holds puts is counted, and covers
the puts in the segment that are not done when it began.
One that succeeds logs ``("synced", ID)`` in ``log`` for each entry it
covers, so a test that logs what its clients were told beside it can check
the order. While ``hold`` is set, each such fsync waits for ``release``;
with ``fail`` set it fails with that errno instead. Other fsyncs pass through
untouched.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.journal import DONE, decode_put, read_segment

WAIT = 20.0
"""Seconds a held fsync waits for ``release`` before the test fails."""


class _SyncGate:
    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        target: str,
        covered: Callable[[int], list[str] | None],
    ) -> None:
        """Replace the function ``target`` names; ``covered(fd)``: the entries
        a sync of ``fd`` covers, None for one to pass through."""
        self.calls = 0
        self.log: list[tuple[str, str]] = []
        self.hold = False
        self.fail: int | None = None
        self.entered = threading.Event()
        """Set when an fsync is being held."""
        self._opened = threading.Event()
        real = getattr(os, target.rsplit(".", 1)[1])

        def sync(fd: int) -> None:
            entries = covered(fd)
            if entries is None:
                return real(fd)  # type: ignore[no-any-return]
            self.calls += 1
            if self.hold:
                self.entered.set()
                if not self._opened.wait(WAIT):
                    raise AssertionError("the held fsync was never released")
            if self.fail is not None:
                raise OSError(self.fail, os.strerror(self.fail))
            real(fd)
            self.log.extend(("synced", entry_id) for entry_id in entries)
            return None

        monkeypatch.setattr(target, sync)

    def release(self, *, fail: int | None = None) -> None:
        """Let the held fsyncs go on (failing with ``fail``), and hold no more."""
        self.fail = fail
        self.hold = False
        self._opened.set()

    def synced(self, entry_id: str) -> int:
        """Where the first fsync covering ``entry_id`` is in ``log``."""
        return self.log.index(("synced", entry_id))


class DirSyncGate(_SyncGate):
    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        self.directory = directory

        def covered(fd: int) -> list[str] | None:
            if not os.path.samestat(os.fstat(fd), os.stat(directory)):
                return None
            return self.written()

        super().__init__(monkeypatch, "relay.spool.os.fsync", covered)

    def written(self) -> list[str]:
        """The entries renamed into the directory."""
        return [n[:-5] for n in os.listdir(self.directory) if n.endswith(".json")]


class JournalSyncGate(_SyncGate):
    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        self.directory = directory

        def covered(fd: int) -> list[str] | None:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if path.parent != directory:
                return None
            return _live_puts([path]) or None

        super().__init__(monkeypatch, "relay.journal.os.fdatasync", covered)

    def written(self) -> list[str]:
        """The entries written to the journal and not done."""
        return _live_puts(sorted(self.directory.glob("*.log")))


def _live_puts(segments: list[Path]) -> list[str]:
    puts: list[str] = []
    done: set[str] = set()
    for path in segments:
        for kind, payload in read_segment(path.read_bytes())[0]:
            if kind == DONE:
                done.add(payload.decode())
            else:
                puts.append(decode_put(payload).entry_id)
    return [p for p in puts if p not in done]
