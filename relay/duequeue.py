"""Which queued message is due when: a heap of (due time, id). Pure.

An id is due at the earliest time it was scheduled for: scheduling it later
than it already is changes nothing, earlier moves it forward (the entry left
behind in the heap is skipped when it comes up).
"""

from __future__ import annotations

import heapq


class DueQueue:
    """Ids of queued entries by the (wall) time they are next due."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}

    def schedule(self, entry_id: str, when: float) -> bool:
        """Make ``entry_id`` due at ``when`` unless it is due sooner already;
        True when that moved it forward (or added it)."""
        current = self._due.get(entry_id)
        if current is not None and current <= when:
            return False
        self._due[entry_id] = when
        heapq.heappush(self._heap, (when, entry_id))
        return True

    def pop_due(self, now: float) -> list[str]:
        """The ids due at ``now``, earliest first, taken out of the queue."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            when, entry_id = heapq.heappop(self._heap)
            if self._due.get(entry_id) != when:
                continue  # superseded by an earlier schedule
            del self._due[entry_id]
            due.append(entry_id)
        return due

    def next_due(self) -> float | None:
        """When the next id is due (perhaps one superseded: waking early is harmless)."""
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._due)
