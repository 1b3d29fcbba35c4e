"""Small blocking file-system steps the spool's modules share."""

from __future__ import annotations

import os
from pathlib import Path

from relay.errors import SpoolError


def spool_error(action: str, exc: OSError) -> SpoolError:
    """``exc`` as the spool's error: what was being done, and why it failed."""
    return SpoolError(f"{action}: {exc.strerror or exc}", errno=exc.errno)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (``os.write`` may take part of it)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def sync_dir(path: Path) -> None:
    """fsync the directory ``path``: its entries' creations, renames and
    removals are durable once it returns."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
