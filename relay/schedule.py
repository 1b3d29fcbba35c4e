"""The retry schedule of queued mail. Pure: numbers in, numbers out.

After the ``attempt``-th failed attempt (1 for the first), the wait before the
next one is drawn from an envelope that doubles with each attempt::

    high(attempt) = min(maximum, minimum * 2**attempt)
    low(attempt)  = max(minimum, high(attempt) / 2)
    delay         = low + (high - low) * jitter          # jitter uniform in [0, 1]

While ``high`` is uncapped this is "equal jitter": half of the ceiling is
fixed, half is random, so delays never collapse towards 0 and still spread
(the first retry waits between ``minimum`` and ``2 * minimum``). Once capped,
delays spread over ``[max(minimum, maximum / 2), maximum]``. Every delay lies
in ``[minimum, maximum]``; ``low`` and ``high`` never decrease from one
attempt to the next. A ``maximum`` below ``minimum`` is taken as ``minimum``.

A message expires ``max_age`` seconds after it was received. The schedule
never plans an attempt after that moment: when the next delay would pass it,
the last attempt is planned at the expiry moment itself; a failure then (when
``expired`` holds) gives the message up.
"""

from __future__ import annotations

import math


def envelope(attempt: int, *, minimum: float, maximum: float) -> tuple[float, float]:
    """The lowest and highest delay after failed attempt number ``attempt`` (from 1)."""
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more, not {attempt}")
    if not (0 < minimum < math.inf and 0 < maximum < math.inf):
        raise ValueError("minimum and maximum must be positive, finite numbers of seconds")
    maximum = max(maximum, minimum)
    try:
        high = min(maximum, math.ldexp(minimum, attempt))
    except OverflowError:
        high = maximum
    return max(minimum, high / 2), high


def next_delay(attempt: int, *, minimum: float, maximum: float, jitter: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (from 1).

    ``jitter`` is a uniform random number in [0, 1] (``random.random()``).
    """
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be from 0 to 1, not {jitter!r}")
    low, high = envelope(attempt, minimum=minimum, maximum=maximum)
    return min(high, low + (high - low) * jitter)


def expires_at(received: float, max_age: float) -> float:
    """The moment a message received at ``received`` is given up on."""
    return received + max_age


def expired(received: float, now: float, max_age: float) -> bool:
    """Whether a message received at ``received`` is too old to try again at ``now``."""
    return now >= expires_at(received, max_age)


def next_attempt_at(
    *,
    received: float,
    now: float,
    attempt: int,
    minimum: float,
    maximum: float,
    max_age: float,
    jitter: float,
) -> float:
    """When to try again after failed attempt number ``attempt``, which ended at ``now``.

    ``now + next_delay(...)``, but never after the expiry moment: a message
    that would otherwise wait past it gets its last attempt exactly then.
    For a message already expired this is the (past) expiry moment; check
    ``expired`` first and give it up instead.
    """
    delay = next_delay(attempt, minimum=minimum, maximum=maximum, jitter=jitter)
    return min(now + delay, expires_at(received, max_age))
