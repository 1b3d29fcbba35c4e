"""The outage detector: pure, driven with explicit times."""

from __future__ import annotations

import pytest

from relay.outage import Outage


def test_a_pause_only_after_threshold_failures_in_a_row() -> None:
    outage = Outage(first=60, longest=3600, threshold=3)
    assert [outage.failed(0), outage.failed(1)] == [None, None]
    outage.answered()  # SES answered in between: start again
    assert [outage.failed(2), outage.failed(3)] == [None, None]
    assert outage.failed(4) == 60
    assert outage.ongoing


def test_pauses_double_up_to_longest_and_end_with_an_answer() -> None:
    outage = Outage(first=60, longest=200, threshold=1)
    assert outage.failed(0) == 60
    assert outage.failed(60) == 120
    assert outage.failed(180) == 200
    assert outage.failed(380) == 200
    outage.answered()
    assert not outage.ongoing
    assert outage.failed(1000) == 60


def test_failures_during_a_pause_do_not_lengthen_it() -> None:
    """Calls in flight when the pause began fail moments later: one pause."""
    outage = Outage(first=60, longest=3600, threshold=2)
    assert outage.failed(0) is None
    assert outage.failed(0.1) == 60
    assert [outage.failed(0.1 + i / 100) for i in range(15)] == [None] * 15
    assert outage.failed(60.2) == 120


@pytest.mark.parametrize(
    ("first", "longest", "threshold"), [(0, 1, 1), (2, 1, 1), (1, 2, 0), (-1, 2, 1)]
)
def test_bad_settings_are_refused(first: float, longest: float, threshold: int) -> None:
    with pytest.raises(ValueError, match="threshold must be"):
        Outage(first=first, longest=longest, threshold=threshold)
