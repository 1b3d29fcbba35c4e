"""The directory where the processes of a relay with workers keep their metrics.

With ``smtp.workers > 1`` every process writes its metrics to files in one
directory (``PROMETHEUS_MULTIPROC_DIR``, see ``relay.metrics``), which the
supervisor also holds its workers' sockets in. It is a new temporary
directory for each start, removed when the relay stops. One left behind by
a relay that was killed (SIGKILL, the OOM killer) is removed by the next
start: each holds a lock file locked for as long as its relay runs, and a
directory whose lock can be taken is nobody's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PREFIX = "ses-relay-metrics-"
OWNER = "owner.lock"
"""The lock file; a directory without one is left alone."""
GRACE = 60.0
"""Seconds a directory is left alone after its last change: one being made
has no lock yet."""


@contextlib.contextmanager
def metrics_dir(parent: Path | None = None) -> Iterator[Path]:
    """A new directory, locked as this process's, removed at the end; the
    ones that relays killed earlier left in ``parent`` (the temporary
    directory by default) removed first."""
    parent = Path(tempfile.gettempdir()) if parent is None else parent
    remove_stale(parent)
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    try:
        fd = os.open(path / OWNER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield path
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale(parent: Path, *, now: float | None = None) -> list[Path]:
    """Remove the metrics directories in ``parent`` that no running relay
    holds (this user's only); the ones removed."""
    now = time.time() if now is None else now
    removed = []
    for path in parent.glob(f"{PREFIX}*"):
        try:
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            if now - info.st_mtime < GRACE:
                continue
            fd = os.open(path / OWNER, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:  # not a directory of ours, or no lock file: not ours to judge
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its relay runs
            continue
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
