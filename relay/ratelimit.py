"""SES's sending rate as a token bucket: one token per recipient.

Time and waits come from an injected ``relay.clock.Clock`` (its monotonic
time); nothing here reads the time or sleeps on its own, so tests drive it
with a fake clock.

Bucket. Tokens refill at the effective rate ``r`` up to a capacity of
``max(1, r)`` (one second's worth); the bucket starts full. A request for
``n`` tokens waits until the bucket holds ``min(n, capacity)`` and then takes
all ``n``, leaving the bucket in debt when ``n`` is larger: a batch of 50
recipients passes at 14/s, and the next request waits until the debt is paid.
Over any span the recipients let through stay within
``capacity + r * elapsed`` plus the overshoot of the last request.

Waiting. A waiter computes its deficit and sleeps once for
``deficit / r`` (or until a pause ends); a change of rate, throttle, pause or
resume wakes it early to recompute. Waits under ``TOLERANCE`` are not slept
but taken as debt, so no clock resolution can make it spin. Waiters are
served strictly in arrival order (FIFO): a small request never overtakes a
large one.

Throttling (AIMD). ``throttled()`` multiplies the effective rate by
``decrease`` (0.5), at most once per ``cooldown`` seconds (SES's answers to
calls already in flight say the same thing once more) and never below
``floor`` times the configured rate; it also empties the bucket. The rate
then climbs back linearly, by the configured rate every ``recovery`` seconds
(with the defaults, from half to full in 30 s)::

    r(t) = min(rate, r_cut + rate * (t - t_cut) / recovery)

Pausing. ``pause_until(when)`` (all delivery paused: the daily quota, the
account, an outage) hands out no tokens before ``when``; waiters sleep until
then. ``resume()`` ends a pause early.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque

from relay.clock import Clock, wait_for

DEFAULT_RATE = 1.0
"""Recipients per second while the account's MaxSendRate is unknown."""
TOLERANCE = 1e-3
"""Seconds of waiting too short to sleep for: taken as debt instead."""


def _known(rate: float) -> float:
    return rate if 0 < rate < math.inf else DEFAULT_RATE


class SendRate:
    """A token bucket at SES's MaxSendRate, shared by every delivery worker."""

    def __init__(
        self,
        *,
        clock: Clock,
        rate: float = 0.0,
        decrease: float = 0.5,
        recovery: float = 60.0,
        floor: float = 1 / 16,
        cooldown: float = 1.0,
    ) -> None:
        """``rate``: recipients per second; 0 (unknown) means ``DEFAULT_RATE``."""
        if not 0 < decrease < 1:
            raise ValueError("decrease must be between 0 and 1")
        if not 0 < floor <= 1:
            raise ValueError("floor must be above 0 and at most 1")
        if not (0 < recovery < math.inf and 0 <= cooldown < math.inf):
            raise ValueError("recovery must be positive and cooldown 0 or more")
        self._clock = clock
        self._decrease = decrease
        self._recovery = recovery
        self._floor = floor
        self._cooldown = cooldown
        self._rate = _known(rate)
        self._cut: tuple[float, float] | None = None
        """(effective rate right after the last throttle, when)."""
        now = clock.monotonic()
        self._updated = now
        self._tokens = self._capacity(now)
        self._paused_until: float | None = None
        self._queue: deque[asyncio.Future[None]] = deque()
        self._wake: asyncio.Future[None] | None = None

    # -- read-only state, for metrics

    @property
    def rate(self) -> float:
        """The configured rate (recipients per second)."""
        return self._rate

    @property
    def effective_rate(self) -> float:
        """The rate in force now, below ``rate`` after a throttle."""
        return self._effective(self._clock.monotonic())

    @property
    def paused_until(self) -> float | None:
        """The end of the current pause (clock time), or None."""
        if self._paused_until is None or self._clock.monotonic() >= self._paused_until:
            return None
        return self._paused_until

    @property
    def tokens(self) -> float:
        """Tokens available now; negative while a large batch's debt is paid."""
        now = self._clock.monotonic()
        elapsed = max(0.0, now - self._updated)
        return min(self._capacity(now), self._tokens + elapsed * self._effective(self._updated))

    @property
    def waiting(self) -> int:
        """Callers waiting in ``acquire``."""
        return len(self._queue)

    # -- control

    def set_rate(self, per_second: float) -> None:
        """Set the configured rate (GetSendQuota's MaxSendRate, or config).

        0, negative or non-finite means unknown: ``DEFAULT_RATE``. A throttle
        in progress keeps recovering towards the new rate.
        """
        self._settle()
        self._rate = _known(per_second)
        self._poke()

    def throttled(self) -> None:
        """SES said "Maximum sending rate exceeded": slow down (see module doc)."""
        now = self._settle()
        if self._cut is not None and now - self._cut[1] < self._cooldown:
            return
        lowered = max(self._effective(now) * self._decrease, self._rate * self._floor)
        self._cut = (lowered, now)
        self._tokens = min(self._tokens, 0.0)
        self._poke()

    def pause_until(self, when: float) -> None:
        """Hand out no tokens before ``when`` (clock time); extends, never shortens."""
        self._settle()
        if self._paused_until is None or when > self._paused_until:
            self._paused_until = when
        self._poke()

    def resume(self) -> None:
        """End a pause now."""
        self._settle()
        self._paused_until = None
        self._poke()

    # -- waiting

    def try_acquire(self, tokens: int) -> bool:
        """Take ``tokens`` (recipients) if they are there now and no one waits
        before; False, and nothing taken, otherwise (then ``acquire``)."""
        if tokens < 0:
            raise ValueError("tokens must be 0 or more")
        return tokens == 0 or (not self._queue and self._take_or_wait(tokens) == 0)

    async def acquire(self, tokens: int) -> None:
        """Wait for ``tokens`` (recipients) and take them, after earlier callers."""
        if self.try_acquire(tokens):
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        try:
            if self._queue[0] is not turn:
                await turn
            while (delay := self._take_or_wait(tokens)) > 0:
                await self._nap(delay)
        finally:
            first = self._queue[0] is turn
            self._queue.remove(turn)
            if first and self._queue and not self._queue[0].done():
                self._queue[0].set_result(None)

    # -- arithmetic

    def _effective(self, now: float) -> float:
        if self._cut is None:
            return self._rate
        lowered, since = self._cut
        return min(self._rate, lowered + self._rate * max(0.0, now - since) / self._recovery)

    def _capacity(self, now: float) -> float:
        return max(1.0, self._effective(now))

    def _settle(self) -> float:
        """Bring the bucket up to now, at the rate in force since the last update.

        The rate can only have grown since then (recovery), so this errs low.
        """
        now = self._clock.monotonic()
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(
                self._capacity(now), self._tokens + elapsed * self._effective(self._updated)
            )
            self._updated = now
        if self._cut is not None and self._effective(now) >= self._rate:
            self._cut = None
        return now

    def _take_or_wait(self, tokens: int) -> float:
        """Take ``tokens`` and return 0, or return how long to sleep first."""
        now = self._settle()
        need = min(float(tokens), self._capacity(now))
        rate = self._effective(now)
        deficit = need - self._tokens
        wait = deficit / rate if deficit > 0 else 0.0
        if self._paused_until is not None:
            if now < self._paused_until - TOLERANCE:
                # tokens keep filling while paused, so one sleep covers both
                return max(wait, self._paused_until - now)
            self._paused_until = None
        if wait > TOLERANCE:
            return wait
        self._tokens -= tokens
        return 0.0

    async def _nap(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if something changes the arithmetic."""
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake = wake
        try:
            with contextlib.suppress(TimeoutError):
                await wait_for(self._clock, wake, delay)
        finally:
            self._wake = None

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
