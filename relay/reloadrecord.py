"""The outcome of the daemon's last reload, kept next to the spool's lock
(``spool.path``/``reload.json``) for ``ses-relay reload`` to read.

The daemon writes it after each reload (a temporary file renamed over the
old one, so a reader sees one or the other whole) with its pid and the
``CLOCK_MONOTONIC`` time at which the reload began. The command reads that
clock before it sends SIGHUP and takes as its answer the first record of
that pid whose reload began later: such a reload read the configuration
after the signal. A reload already in progress when the signal came, or an
older record, is never taken for the answer; SIGHUPs that come during a
reload make one more reload (``relay.app``), so a later one always comes.
``CLOCK_MONOTONIC`` is one clock for every process of a machine (systemd
matches ``RELOADING=1`` to its signal by it the same way); the wall clock
could step between the two readings.

``to_json``, ``from_json`` and ``answers`` are pure; ``write`` and ``read``
do the I/O.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relay.errors import SpoolError
from relay.log import smtp_log
from relay.reload import Outcome

NAME = "reload.json"
_LISTS = ("applied", "need_restart", "read_again", "problems")


@dataclass(frozen=True, slots=True)
class Record:
    pid: int
    """The daemon's."""
    began: int
    """``time.monotonic_ns()`` when the reload began."""
    outcome: Outcome


def to_json(record: Record) -> str:
    outcome = asdict(record.outcome)
    return json.dumps({"pid": record.pid, "began": record.began} | outcome, indent=2) + "\n"


def from_json(text: str) -> Record | None:
    """The record, or None for text that is not one (hand-edited, another version)."""
    try:
        data: Any = json.loads(text)
        pid, began, source = data["pid"], data["began"], data["source"]
        lists = {key: data[key] for key in _LISTS}
    except (ValueError, TypeError, KeyError):
        return None
    if not (isinstance(pid, int) and isinstance(began, int) and isinstance(source, str)):
        return None
    if not all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in lists.values()):
        return None
    fields = {key: tuple(value) for key, value in lists.items()}
    return Record(pid=pid, began=began, outcome=Outcome(source=source, **fields))


def answers(record: Record | None, pid: int, sent: int) -> bool:
    """Whether ``record`` is the answer to a SIGHUP sent to ``pid`` once the
    monotonic clock read ``sent``."""
    return record is not None and record.pid == pid and record.began >= sent


def write(spool: Path, record: Record) -> None:
    """Replace the record; a failure is logged (the reload itself stands)."""
    path = spool / NAME
    temporary = spool / f".{NAME}.tmp"
    try:
        temporary.write_text(to_json(record))
        os.replace(temporary, path)
    except OSError as exc:
        smtp_log.warning("cannot record the reload's outcome in %s: %s", path, exc.strerror or exc)


def read(spool: Path) -> Record | None:
    """The record in ``spool``; None when there is none (or not a readable one)."""
    path = spool / NAME
    try:
        return from_json(path.read_text(errors="replace"))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SpoolError(f"cannot read {path}: {exc.strerror or exc}", errno=exc.errno) from None
