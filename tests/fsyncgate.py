"""A hook on the spool's fsyncs of one directory: counts, records, holds and fails them.

``DirSyncGate`` replaces ``os.fsync`` as ``relay.spool`` calls it. Every
fsync of ``directory`` is counted; one that succeeds logs ``("synced", ID)``
in ``log`` for each envelope (``ID.json``) in the directory when it began
(the renames it covers), so a test that logs what its clients were told
beside it can check the order.
While ``hold`` is set, each such fsync waits for ``release``; with ``fail``
set it fails with that errno instead. Other fsyncs pass through untouched.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

WAIT = 20.0
"""Seconds a held fsync waits for ``release`` before the test fails."""


class DirSyncGate:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        self.directory = directory
        self.calls = 0
        self.log: list[tuple[str, str]] = []
        self.hold = False
        self.fail: int | None = None
        self.entered = threading.Event()
        """Set when an fsync is being held."""
        self._opened = threading.Event()
        real = os.fsync

        def fsync(fd: int) -> None:
            if not os.path.samestat(os.fstat(fd), os.stat(directory)):
                return real(fd)
            self.calls += 1
            covered = [n[:-5] for n in os.listdir(directory) if n.endswith(".json")]
            if self.hold:
                self.entered.set()
                if not self._opened.wait(WAIT):
                    raise AssertionError("the held fsync was never released")
            if self.fail is not None:
                raise OSError(self.fail, os.strerror(self.fail))
            real(fd)
            self.log.extend(("synced", entry_id) for entry_id in covered)
            return None

        monkeypatch.setattr("relay.spool.os.fsync", fsync)

    def release(self, *, fail: int | None = None) -> None:
        """Let the held fsyncs go on (failing with ``fail``), and hold no more."""
        self.fail = fail
        self.hold = False
        self._opened.set()

    def synced(self, entry_id: str) -> int:
        """Where the first fsync covering ``entry_id`` is in ``log``."""
        return self.log.index(("synced", entry_id))
