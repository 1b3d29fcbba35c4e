"""The retry schedule: pure arithmetic, checked by examples and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relay.schedule import envelope, expired, expires_at, next_attempt_at, next_delay

seconds = st.floats(min_value=1e-3, max_value=1e7, allow_nan=False, allow_infinity=False)
jitters = st.floats(min_value=0.0, max_value=1.0)
attempts = st.integers(min_value=1, max_value=10_000)


def test_defaults_double_from_the_minimum_up_to_the_maximum() -> None:
    # delivery defaults: retry_min 60 s, retry_max 3600 s
    windows = [envelope(a, minimum=60, maximum=3600) for a in range(1, 9)]
    assert windows == [
        (60, 120),
        (120, 240),
        (240, 480),
        (480, 960),
        (960, 1920),
        (1800, 3600),
        (1800, 3600),
        (1800, 3600),
    ]


def test_equal_jitter_keeps_half_the_ceiling() -> None:
    assert next_delay(3, minimum=60, maximum=3600, jitter=0.0) == 240
    assert next_delay(3, minimum=60, maximum=3600, jitter=0.5) == 360
    assert next_delay(3, minimum=60, maximum=3600, jitter=1.0) == 480


def test_a_maximum_below_the_minimum_means_the_minimum() -> None:
    assert envelope(1, minimum=60, maximum=10) == (60, 60)
    assert next_delay(5, minimum=60, maximum=10, jitter=0.7) == 60


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    assert envelope(10**9, minimum=1e-300, maximum=100) == (50, 100)


@pytest.mark.parametrize(
    ("attempt", "jitter", "minimum", "maximum"),
    [(0, 0.5, 1, 2), (-1, 0.5, 1, 2), (1, -0.1, 1, 2), (1, 1.5, 1, 2), (1, math.nan, 1, 2),
     (1, 0.5, 0, 2), (1, 0.5, 1, math.inf), (1, 0.5, -1, 2)],
)  # fmt: skip
def test_bad_arguments_are_refused(
    attempt: int, jitter: float, minimum: float, maximum: float
) -> None:
    with pytest.raises(ValueError, match="must be"):
        next_delay(attempt, minimum=minimum, maximum=maximum, jitter=jitter)


@given(attempt=attempts, minimum=seconds, maximum=seconds, jitter=jitters)
def test_delays_stay_within_bounds(
    attempt: int, minimum: float, maximum: float, jitter: float
) -> None:
    delay = next_delay(attempt, minimum=minimum, maximum=maximum, jitter=jitter)
    low, high = envelope(attempt, minimum=minimum, maximum=maximum)
    assert minimum <= low <= delay <= high <= max(minimum, maximum)
    # equal jitter: never below half the ceiling, so never near 0
    assert delay >= high / 2


@given(attempt=attempts, minimum=seconds, maximum=seconds, jitter=jitters)
def test_envelope_and_delays_never_shrink(
    attempt: int, minimum: float, maximum: float, jitter: float
) -> None:
    this = envelope(attempt, minimum=minimum, maximum=maximum)
    following = envelope(attempt + 1, minimum=minimum, maximum=maximum)
    assert this[0] <= following[0]
    assert this[1] <= following[1]
    now = next_delay(attempt, minimum=minimum, maximum=maximum, jitter=jitter)
    later = next_delay(attempt + 1, minimum=minimum, maximum=maximum, jitter=jitter)
    assert now <= later


@given(attempt=attempts, minimum=seconds, maximum=seconds)
def test_jitter_spreads_delays_wherever_the_envelope_is_open(
    attempt: int, minimum: float, maximum: float
) -> None:
    low, high = envelope(attempt, minimum=minimum, maximum=maximum)
    early = next_delay(attempt, minimum=minimum, maximum=maximum, jitter=0.0)
    late = next_delay(attempt, minimum=minimum, maximum=maximum, jitter=1.0)
    assert early == low
    assert late == high
    if maximum >= 2 * minimum:
        assert late >= 2 * early * (1 - 1e-12)


def test_expired_at_exactly_max_age() -> None:
    assert not expired(1000.0, 1000.0 + 99.9, 100.0)
    assert expired(1000.0, 1100.0, 100.0)
    assert expired(1000.0, 5000.0, 100.0)


def test_the_last_attempt_is_at_expiry() -> None:
    # received at 0, max age 1000 s, 900 s in, the next delay would be 3600 s
    when = next_attempt_at(
        received=0.0, now=900.0, attempt=9, minimum=60, maximum=3600, max_age=1000, jitter=1.0
    )
    assert when == 1000.0
    assert expired(0.0, when, 1000.0)
    # well before expiry the delay is used as is
    when = next_attempt_at(
        received=0.0, now=10.0, attempt=1, minimum=60, maximum=3600, max_age=1000, jitter=0.0
    )
    assert when == 70.0


@given(
    received=st.floats(min_value=0, max_value=2e9),
    elapsed=st.floats(min_value=0, max_value=1e6),
    max_age=seconds,
    attempt=attempts,
    minimum=seconds,
    maximum=seconds,
    jitter=jitters,
)
def test_never_scheduled_beyond_max_age(
    received: float,
    elapsed: float,
    max_age: float,
    attempt: int,
    minimum: float,
    maximum: float,
    jitter: float,
) -> None:
    now = received + elapsed
    when = next_attempt_at(
        received=received,
        now=now,
        attempt=attempt,
        minimum=minimum,
        maximum=maximum,
        max_age=max_age,
        jitter=jitter,
    )
    assert when <= expires_at(received, max_age)
    if not expired(received, now, max_age):
        assert when > now or when == expires_at(received, max_age)


@given(
    minimum=st.floats(min_value=1, max_value=1e4),
    maximum=st.floats(min_value=1, max_value=1e5),
    lifetimes=st.floats(min_value=0.01, max_value=500),
    jitter=st.lists(jitters, min_size=1, max_size=50),
)
@example(minimum=131.59655023473238, maximum=1.0, lifetimes=125.0, jitter=[0.0])
def test_a_whole_life_ends_with_an_attempt_at_expiry(
    minimum: float, maximum: float, lifetimes: float, jitter: list[float]
) -> None:
    """Attempt until given up: times grow, the last one is the expiry moment."""
    max_age = minimum * lifetimes
    received = 1_700_000_000.0
    now, attempt, times = received, 1, [received]
    while not expired(received, now, max_age):
        now = next_attempt_at(
            received=received,
            now=now,
            attempt=attempt,
            minimum=minimum,
            maximum=maximum,
            max_age=max_age,
            jitter=jitter[attempt % len(jitter)],
        )
        times.append(now)
        attempt += 1
    assert times == sorted(times)
    assert len(set(times)) == len(times)
    assert times[-1] == expires_at(received, max_age)
    # never more attempts than the minimum spacing allows, plus the last one
    # (ceil: a sum of float delays may fall a hair short of the expiry moment)
    assert attempt - 1 <= math.ceil(max_age / minimum) + 1
