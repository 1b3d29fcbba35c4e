"""Queue ids: made, checked, dated and read back as typed (pure)."""

from __future__ import annotations

import time

import pytest

from relay.queueid import as_typed, is_valid, made_at, new_id


def test_new_ids_are_valid_sortable_and_tell_their_time() -> None:
    before = time.time()
    ids = [new_id() for _ in range(200)]
    after = time.time()
    assert len(set(ids)) == len(ids)
    assert all(is_valid(i) and len(i) == 20 for i in ids)
    times = [i[:14] for i in ids]  # time first: the listing order is the arrival order
    assert times == sorted(times)
    for queue_id in ids:
        made = made_at(queue_id)
        assert made is not None
        assert before - 1e-6 <= made <= after + 1e-6


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("ABC123", True),
        ("0" * 32, True),
        ("ABC12", False),  # too short
        ("0" * 33, False),
        ("abc123", False),  # typed ids are upper-cased by as_typed, not here
        ("../ETC", False),
        ("ABC123.json", False),
        ("ABC 123", False),
        ("ABC123\n", False),
        ("", False),
    ],
)
def test_what_is_an_id(text: str, valid: bool) -> None:
    assert is_valid(text) is valid


@pytest.mark.parametrize(
    "queue_id",
    [
        "ABC123",  # valid, not made by new_id
        "0" * 19,
        "0" * 21,
        "0X" + "0" * 18,  # int(..., 16) would take the 0x prefix
        "000000000000ZZ000000",
    ],
)
def test_ids_not_made_here_have_no_time(queue_id: str) -> None:
    assert made_at(queue_id) is None


def test_made_at_reads_the_microseconds() -> None:
    assert made_at(f"{1_700_000_000_250_000:014X}ABCDEF") == 1_700_000_000.25


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("0661a2b3c4d5e6f70809", "0661A2B3C4D5E6F70809"),
        (" ABC123\n", "ABC123"),
        ("abc", "abc"),  # no id either way: shown as typed in the error
        ("../etc", "../etc"),
    ],
)
def test_ids_as_typed(typed: str, meant: str) -> None:
    assert as_typed(typed) == meant
