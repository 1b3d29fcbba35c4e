"""The sending-rate token bucket, on a fake clock: no real waiting."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.clock import SystemClock
from relay.ratelimit import DEFAULT_RATE, TOLERANCE, SendRate
from tests.fakeclock import START, FakeClock


def bucket(clock: FakeClock, rate: float, **kwargs: float) -> SendRate:
    return SendRate(clock=clock, rate=rate, **kwargs)


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(20):
        await asyncio.sleep(0)


# -- the rate


async def test_a_thousand_recipients_at_14_per_second_take_about_71_seconds() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 14)
    for _ in range(1000):
        await limiter.acquire(1)
    # a full bucket (14) at once, then 986 more at 14/s
    assert clock.now - START == pytest.approx(986 / 14, abs=0.01)
    assert len(clock.sleeps) <= 1000


async def test_a_batch_of_50_passes_at_14_per_second_and_is_paid_back() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 14)
    await limiter.acquire(50)
    assert clock.now == START
    assert limiter.tokens == pytest.approx(14 - 50)
    for _ in range(19):
        await limiter.acquire(50)
    assert clock.now - START == pytest.approx(19 * 50 / 14, abs=0.01)
    assert len(clock.sleeps) == 19, "one sleep per waiting acquisition"


async def test_an_idle_bucket_holds_one_second_at_most() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 10)
    clock.now += 3600
    assert limiter.tokens == 10
    for _ in range(10):
        await limiter.acquire(1)
    assert clock.sleeps == []
    await limiter.acquire(1)
    assert clock.sleeps == [pytest.approx(0.1)]


async def test_slow_rates_still_let_one_recipient_through() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 0.25)
    await limiter.acquire(1)
    await limiter.acquire(1)
    assert clock.now - START == pytest.approx(4)


@pytest.mark.parametrize("unknown", [0.0, -3.0, float("nan"), float("inf")])
def test_unknown_rates_mean_the_safe_default(unknown: float) -> None:
    limiter = bucket(FakeClock(), unknown)
    assert limiter.rate == DEFAULT_RATE == 1.0
    limiter.set_rate(14)
    assert limiter.rate == 14
    limiter.set_rate(unknown)
    assert limiter.rate == DEFAULT_RATE


async def test_set_rate_changes_the_pace() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 0)
    await limiter.acquire(1)
    await limiter.acquire(1)
    assert clock.now - START == pytest.approx(1)
    limiter.set_rate(100)
    clock.now += 1  # fills the bucket: a second's worth at the new rate
    for _ in range(200):
        await limiter.acquire(1)
    assert clock.now - START == pytest.approx(2 + 100 / 100, abs=0.02)


@settings(max_examples=60, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=200),
    batches=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=60),
)
def test_never_faster_than_the_rate_and_never_spinning(rate: float, batches: list[int]) -> None:
    clock = FakeClock()

    async def run() -> list[tuple[float, int]]:
        limiter = bucket(clock, rate)
        taken = []
        for size in batches:
            await limiter.acquire(size)
            taken.append((clock.now, size))
        return taken

    taken = asyncio.run(run())
    capacity = max(1.0, rate)
    total = 0
    for when, size in taken:
        total += size
        allowed = capacity + rate * (when - START) + max(0.0, size - capacity)
        assert total <= allowed + rate * TOLERANCE + 1e-6
    assert len(clock.sleeps) <= len(batches)
    # and not slower than needed: the last batch came as soon as the debt was paid
    last_when, last_size = taken[-1]
    owed = total - last_size - capacity + min(float(last_size), capacity)
    assert last_when - START <= max(0.0, owed) / rate + 1e-6


# -- throttling


async def test_throttle_halves_the_rate_then_it_recovers() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 14)
    limiter.throttled()
    assert limiter.effective_rate == 7
    assert limiter.rate == 14
    clock.now += 15  # 60 s to regain the whole rate: +3.5 in 15 s
    assert limiter.effective_rate == pytest.approx(10.5)
    clock.now += 15
    assert limiter.effective_rate == 14
    clock.now += 100
    assert limiter.effective_rate == 14


async def test_throttles_in_one_burst_count_once() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 14)
    for _ in range(5):
        limiter.throttled()
    assert limiter.effective_rate == 7
    clock.now += 2  # past the cooldown; recovered to 7 + 14 * 2 / 60
    limiter.throttled()
    assert limiter.effective_rate == pytest.approx((7 + 14 * 2 / 60) / 2)


def test_throttling_stops_at_the_floor() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 16)
    for _ in range(20):
        limiter.throttled()
        clock.now += 1.0
    assert limiter.effective_rate == pytest.approx(1 + 16 / 60)  # floor 1/16, +1 s of recovery


async def test_throttle_empties_the_bucket_and_slows_sending() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 14)
    limiter.throttled()
    await limiter.acquire(7)
    # nothing left in the bucket: 7 tokens at 7/s
    assert clock.now - START == pytest.approx(1.0)
    # recovery: from 7/s to 14/s over 30 s; so 300 recipients take clearly
    # longer than 300 / 14 and less than 300 / 7
    for _ in range(300):
        await limiter.acquire(1)
    elapsed = clock.now - START - 1.0
    assert 300 / 14 + 5 < elapsed < 300 / 7


async def test_rate_changes_keep_a_throttle_recovering() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 14)
    limiter.throttled()
    limiter.set_rate(14)  # the periodic GetSendQuota refresh
    assert limiter.effective_rate == 7
    limiter.set_rate(4)
    assert limiter.effective_rate == 4


# -- pausing


async def test_pause_blocks_until_its_end_with_one_sleep() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 14)
    limiter.pause_until(START + 3600)
    assert limiter.paused_until == START + 3600
    await limiter.acquire(1)
    assert clock.now == pytest.approx(START + 3600)
    assert clock.sleeps == [pytest.approx(3600)]
    assert limiter.paused_until is None
    await limiter.acquire(13)  # the bucket filled up meanwhile
    assert len(clock.sleeps) == 1


async def test_a_pause_is_extended_never_shortened() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 14)
    limiter.pause_until(START + 100)
    limiter.pause_until(START + 50)
    assert limiter.paused_until == START + 100
    limiter.pause_until(START + 200)
    assert limiter.paused_until == START + 200


async def test_waiters_wake_at_the_end_of_a_pause_not_before() -> None:
    clock = FakeClock(autojump=False)
    limiter = bucket(clock, 14)
    limiter.pause_until(START + 60)
    waiter = asyncio.create_task(limiter.acquire(1))
    await settle()
    clock.advance(59.5)
    await settle()
    assert not waiter.done()
    clock.advance(0.5)
    await settle()
    assert waiter.done()
    assert clock.sleeps == [60]


async def test_resume_ends_a_pause_early() -> None:
    clock = FakeClock(autojump=False)
    limiter = bucket(clock, 14)
    limiter.pause_until(START + 86_400)
    waiters = [asyncio.create_task(limiter.acquire(1)) for _ in range(3)]
    await settle()
    assert not any(w.done() for w in waiters)
    assert limiter.waiting == 3
    limiter.resume()
    await settle()
    assert all(w.done() for w in waiters)
    assert clock.now == START
    assert limiter.paused_until is None
    assert limiter.waiting == 0


async def test_a_rate_change_wakes_a_sleeper_to_recompute() -> None:
    clock = FakeClock(autojump=False)
    limiter = bucket(clock, 1)
    await limiter.acquire(1)
    waiter = asyncio.create_task(limiter.acquire(1))
    await settle()
    assert clock.sleeps == [1]
    limiter.set_rate(100)
    await settle()
    assert clock.sleeps == [1, pytest.approx(0.01)]
    clock.advance(0.01)
    await settle()
    assert waiter.done()


# -- fairness and cancellation


async def test_waiters_are_served_in_arrival_order() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 1)
    order: list[str] = []

    async def send(name: str, recipients: int) -> None:
        await limiter.acquire(recipients)
        order.append(name)

    await asyncio.gather(send("a", 1), send("b", 50), send("c", 1), send("d", 2))
    # c and d could have gone before b's 50, but b came first
    assert order == ["a", "b", "c", "d"]
    assert clock.sleeps == [pytest.approx(1), pytest.approx(50), pytest.approx(1)]
    assert clock.now - START == pytest.approx(52)


async def test_many_concurrent_waiters_keep_the_pace() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 14)
    order: list[int] = []

    async def send(number: int) -> None:
        await limiter.acquire(10)
        order.append(number)

    await asyncio.gather(*(send(n) for n in range(100)))
    assert order == list(range(100))
    assert clock.now - START == pytest.approx((1000 - 14) / 14, abs=0.01)
    assert len(clock.sleeps) <= 100


async def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    clock = FakeClock(autojump=False)
    limiter = bucket(clock, 1)
    await limiter.acquire(1)
    first = asyncio.create_task(limiter.acquire(1))
    second = asyncio.create_task(limiter.acquire(1))
    third = asyncio.create_task(limiter.acquire(1))
    await settle()
    assert limiter.waiting == 3
    second.cancel()  # waiting for its turn
    first.cancel()  # sleeping at the head
    await settle()
    assert first.cancelled()
    assert second.cancelled()
    assert limiter.waiting == 1
    clock.advance(1)
    await settle()
    assert third.done()
    assert limiter.waiting == 0


async def test_zero_recipients_never_wait() -> None:
    clock = FakeClock(autojump=False)
    limiter = bucket(clock, 1)
    limiter.pause_until(START + 100)
    await limiter.acquire(0)
    with pytest.raises(ValueError, match="0 or more"):
        await limiter.acquire(-1)


@pytest.mark.parametrize(
    "kwargs",
    [{"decrease": 1.0}, {"decrease": 0.0}, {"floor": 0.0}, {"recovery": 0.0}, {"cooldown": -1.0}],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        bucket(FakeClock(), 14, **kwargs)


# -- no spin


async def test_a_day_long_pause_is_one_sleep() -> None:
    clock = FakeClock()
    limiter = bucket(clock, 14)
    limiter.pause_until(START + 86_400)
    for _ in range(100):
        await limiter.acquire(1)
    # one sleep for the pause, then one per recipient beyond the full bucket
    assert len(clock.sleeps) == 1 + (100 - 14)
    assert clock.now - START == pytest.approx(86_400 + 86 / 14)


async def test_with_the_real_clock_and_sleep() -> None:
    sleeps: list[float] = []

    class RecordingClock(SystemClock):
        async def sleep(self, seconds: float) -> None:
            sleeps.append(seconds)
            await super().sleep(seconds)

    limiter = SendRate(clock=RecordingClock(), rate=1000)
    await limiter.acquire(1000)  # the full bucket, at once
    started = time.monotonic()
    for _ in range(4):
        await limiter.acquire(50)  # 50 ms each
    elapsed = time.monotonic() - started
    assert 0.2 * 0.95 <= elapsed < 2.0
    assert len(sleeps) == 4


async def test_try_acquire_takes_only_tokens_at_hand_and_never_jumps_the_queue() -> None:
    clock = FakeClock(autojump=False)
    limiter = bucket(clock, 14)
    assert limiter.try_acquire(10)
    assert not limiter.try_acquire(10)  # 4 left: nothing taken
    assert limiter.tokens == pytest.approx(4)
    waiter = asyncio.create_task(limiter.acquire(10))
    await settle()
    assert limiter.waiting == 1
    assert not limiter.try_acquire(1)  # tokens are there, but someone waits first
    assert limiter.tokens == pytest.approx(4)
    waiter.cancel()
    await settle()
    assert limiter.try_acquire(0)
