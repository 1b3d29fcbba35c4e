"""When SES cannot be reached at all, the whole queue waits together. Pure.

Each message has its own retry schedule; during an outage (connections
refused, timeouts, 5xx answers) that would still make every queued message
fail on its own, over and over. ``Outage`` counts SES calls in a row that got
no usable answer; at ``threshold`` it asks for a pause of all delivery,
``first`` seconds long and doubling, up to ``longest``, each time a call let
through after a pause fails again (calls that fail during a pause, already in
flight when it began, change nothing). Any usable answer from SES (a success,
or a refusal of the message) ends the outage. Time is passed in (``now``,
seconds, monotonic).
"""

from __future__ import annotations

OUTAGE_THRESHOLD = 10
"""SES calls failing in a row (each after its quick retries) that make an outage."""


class Outage:
    """Consecutive SES calls without a usable answer, and the pause they call for."""

    def __init__(self, *, first: float, longest: float, threshold: int = OUTAGE_THRESHOLD) -> None:
        if threshold < 1 or first <= 0 or longest < first:
            raise ValueError("threshold must be 1 or more and 0 < first <= longest")
        self.threshold = threshold
        self.first = first
        self.longest = longest
        self.failures = 0
        """Calls in a row without a usable answer."""
        self._pauses = 0
        self._until = float("-inf")

    @property
    def ongoing(self) -> bool:
        return self.failures >= self.threshold

    def answered(self) -> None:
        """SES answered (accepted or refused): the outage, if any, is over."""
        self.failures = 0
        self._pauses = 0
        self._until = float("-inf")

    def failed(self, now: float) -> float | None:
        """One more call without an answer: the seconds to pause all delivery
        for from ``now``, or None (under the threshold, or paused already)."""
        self.failures += 1
        if not self.ongoing or now < self._until:
            return None
        pause = min(self.longest, self.first * 2.0**self._pauses)
        self._pauses += 1
        self._until = now + pause
        return pause
