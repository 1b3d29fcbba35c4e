"""Queue ids: the name of one spooled message, in its files, log lines and replies.

The relay makes ids of 20 upper-case hex digits: the microseconds since the
Unix epoch (14 digits) then 24 random bits (6), like Postfix's long queue
ids. They sort by arrival and tell when the message arrived. The spool and
``ses-relay queue`` take any id of 6 to 32 upper-case letters and digits
(an entry written by hand, or by another tool), so an id is also a safe file
name.
"""

from __future__ import annotations

import random
import re
import time

_VALID = re.compile(r"[0-9A-Z]{6,32}")
_TIME_DIGITS = 14
_RANDOM_BITS = 24
_MADE_HERE = re.compile(rf"[0-9A-F]{{{_TIME_DIGITS + _RANDOM_BITS // 4}}}")


def new_id() -> str:
    """A unique id for one message, made now."""
    return f"{time.time_ns() // 1000:0{_TIME_DIGITS}X}{random.getrandbits(_RANDOM_BITS):06X}"


def is_valid(text: str) -> bool:
    """Whether ``text`` is a queue id (and so a safe spool file name)."""
    return _VALID.fullmatch(text) is not None


def made_at(queue_id: str) -> float | None:
    """The Unix time a ``new_id`` was made; None for another kind of id."""
    if _MADE_HERE.fullmatch(queue_id) is None:
        return None
    return int(queue_id[:_TIME_DIGITS], 16) / 1e6


def as_typed(text: str) -> str:
    """An id typed by a person, upper-cased when that makes it one
    (``mailq`` output pasted in lower case still works); else as it was."""
    upper = text.strip().upper()
    return upper if is_valid(upper) else text
