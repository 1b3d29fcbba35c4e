"""relay.dataread: the DATA state machine, byte for byte, split anywhere."""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.dataread import DataReader

END = b"\r\n.\r\n"


@dataclass
class Outcome:
    done: bool
    used: int
    message: bytes
    size: int
    too_big: bool
    bare_newline: bool
    has_nul: bool


def reference(data: bytes, limit: int, mode: str = "normalize") -> Outcome:
    """The rules read slowly: split at CRLF, one line at a time."""
    out = bytearray()
    bare = nul = False
    pos = 0
    while True:
        cut = data.find(b"\r\n", pos)
        if cut < 0:
            return Outcome(False, len(data), b"", -1, False, bare, nul)
        line = data[pos:cut]
        pos = cut + 2
        if line == b".":
            break
        if line.startswith(b"."):
            line = line[1:]
        if b"\r" in line or b"\n" in line:
            bare = True
            line = line.replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        nul = nul or b"\x00" in line
        out += line + b"\r\n"
    size = len(out)
    return Outcome(True, pos, bytes(out), size, size > limit, bare, nul)


def run(chunks: list[bytes], limit: int, mode: str = "normalize") -> tuple[DataReader, int, bytes]:
    """Feed ``chunks``; the reader, bytes used, and the bytes it left."""
    reader = DataReader(limit, mode)  # type: ignore[arg-type]
    used = 0
    left = bytearray()
    for chunk in chunks:
        took = reader.feed(chunk)
        assert 0 <= took <= len(chunk)
        assert took == len(chunk) or reader.done
        used += took
        left += chunk[took:]
    return reader, used, bytes(left)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a] or [data]


PIECES = [b"\r", b"\n", b".", b"\x00", b"a", b"\r\n", b"\r\n.", b"..", b" ", b"\xff"]
raw_data = st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join)
cut_points = st.lists(st.integers(min_value=0, max_value=200), max_size=12)


@settings(max_examples=1500)
@given(
    body=raw_data,
    tail=raw_data,
    cuts=cut_points,
    limit=st.integers(min_value=0, max_value=60),
    mode=st.sampled_from(["normalize", "reject"]),
)
@example(body=b"\n.\n", tail=b"", cuts=[1, 2], limit=50, mode="normalize")
@example(body=b"x\r", tail=b"", cuts=[2], limit=50, mode="normalize")
@example(body=b".", tail=b"", cuts=[1], limit=50, mode="normalize")
def test_matches_the_reference_whatever_the_chunks(
    body: bytes, tail: bytes, cuts: list[int], limit: int, mode: str
) -> None:
    data = body + END + tail
    expected = reference(data, limit, mode)
    reader, used, left = run(split(data, cuts), limit, mode)
    assert reader.done
    assert used == expected.used
    assert left == data[expected.used :]
    assert reader.size == expected.size
    assert reader.too_big == expected.too_big
    assert reader.bare_newline_seen == expected.bare_newline
    assert reader.bad_newline == (expected.bare_newline and mode == "reject")
    assert reader.has_nul == expected.has_nul
    assert reader.failed == (reader.too_big or reader.has_nul or reader.bad_newline)
    if not reader.failed:
        assert reader.message == expected.message
    else:
        assert len(reader.message) <= limit
    assert b"\r" not in reader.message.replace(b"\r\n", b"")
    assert b"\n" not in reader.message.replace(b"\r\n", b"")


@settings(max_examples=500)
@given(body=raw_data, cuts=cut_points)
def test_without_an_end_marker_it_never_finishes(body: bytes, cuts: list[int]) -> None:
    if END in b"\r\n" + body:
        return
    reader, used, left = run(split(body, cuts), 1000)
    assert not reader.done
    assert used == len(body)
    assert left == b""


@settings(max_examples=300)
@given(lines=st.lists(st.binary(max_size=20).filter(lambda b: not {13, 10, 0} & set(b))))
def test_dot_stuffing_round_trips(lines: list[bytes]) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    reader, _, left = run([stuffed + b".\r\nQUIT\r\n"], 10_000)
    assert reader.done
    assert left == b"QUIT\r\n"
    assert reader.message == message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b".\r\n", b""),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n"),
        (b"a\r\n...\r\n.\r\n", b"a\r\n..\r\n"),
        (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n"),  # a lone stuffed dot is removed too
    ],
)
def test_end_marker_and_unstuffing(data: bytes, message: bytes) -> None:
    reader, used, left = run([data + b"MAIL FROM:<x@y>\r\n"], 100)
    assert reader.done
    assert used == len(data)
    assert left == b"MAIL FROM:<x@y>\r\n"
    assert reader.message == message


SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r.\r\n",
    b"\r\n\x00.\r\n",
    b"\n.\r",
    b".\n",
    b"\r\n.\r\r\n",
]


@pytest.mark.parametrize("marker", SMUGGLING)
@pytest.mark.parametrize("mode", ["normalize", "reject"])
def test_smuggling_sequences_do_not_end_data(marker: bytes, mode: str) -> None:
    smuggled = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<v@example.net>\r\nDATA\r\n"
    data = b"Subject: x\r\n\r\nbody" + marker + smuggled + b"forged\r\n"
    for size in (1, 2, 3, 7, len(data)):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        reader, used, _ = run(chunks, 10_000, mode)
        assert not reader.done, (marker, size)
        assert used == len(data)
        reader.feed(END[2:])  # the client's real end: ".\r\n" after its last CRLF
        assert reader.done
        if reader.failed:
            assert mode == "reject" or reader.has_nul
            continue
        message = reader.message
        assert message.replace(b"\r\n", b"").count(b"\r") == 0
        assert message.replace(b"\r\n", b"").count(b"\n") == 0
        assert b"MAIL FROM:<evil@example.com>" in message


def test_bare_newlines_are_normalized() -> None:
    reader, _, _ = run([b"a\nb\rc\r\r\nd\n\r\r\n.\r\n"], 100)
    assert reader.done
    assert reader.bare_newline_seen
    assert not reader.failed
    assert reader.message == b"a\r\nb\r\nc\r\n\r\nd\r\n\r\n\r\n"


def test_bare_newline_refused_in_reject_mode_after_the_end() -> None:
    reader, _, left = run([b"a\nb\r\n", b"more\r\n.\r\nNOOP\r\n"], 100, "reject")
    assert reader.done
    assert reader.bad_newline
    assert reader.failed
    assert left == b"NOOP\r\n"
    assert reader.message == b""


def test_nul_is_refused_in_both_modes() -> None:
    for mode in ("normalize", "reject"):
        reader, _, _ = run([b"a\x00b\r\n.\r\n"], 100, mode)
        assert reader.has_nul
        assert reader.failed


def test_over_the_limit_keeps_reading_but_holds_nothing() -> None:
    written: list[bytes] = []
    reader = DataReader(1000, write=written.append)
    line = b"x" * 98 + b"\r\n"
    for _ in range(50):
        assert reader.feed(line) == len(line)
    assert reader.too_big
    assert sum(map(len, written)) <= 1000
    assert not reader.done
    assert reader.feed(b".\r\nQUIT\r\n") == 3
    assert reader.done
    assert reader.size == 50 * 100


def test_internal_buffer_is_dropped_once_too_big() -> None:
    reader = DataReader(10)
    reader.feed(b"0123456789")
    assert reader.message == b"0123456789"
    reader.feed(b"\r\nx")
    assert reader.too_big
    assert reader.message == b""


def test_limit_is_inclusive() -> None:
    reader, _, _ = run([b"12345678\r\n.\r\n"], 10)
    assert not reader.too_big
    assert reader.message == b"12345678\r\n"


def test_writes_to_a_file_like_sink() -> None:
    sink = io.BytesIO()
    reader = DataReader(100, write=sink.write)
    reader.feed(b"..a\r\n")
    reader.feed(b"b\r\n.")
    reader.feed(b"\r\n")
    assert reader.done
    assert sink.getvalue() == b".a\r\nb\r\n"
    with pytest.raises(RuntimeError):
        _ = reader.message


def test_feed_after_done_takes_nothing() -> None:
    reader = DataReader(100)
    assert reader.feed(b".\r\n") == 3
    assert reader.feed(b"more") == 0
    assert reader.feed(b"") == 0


def test_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="bare_newline"):
        DataReader(100, "strip")  # type: ignore[arg-type]


def test_large_message_in_chunks_is_fast_enough() -> None:
    line = b"The quick brown fox jumps over the lazy dog 0123456789 ~!@#$%^&*()\r\n"
    body = line * (10_000_000 // len(line)) + b"..stuffed\r\n"
    data = body + END[2:]
    reader = DataReader(len(body) + 10)
    for i in range(0, len(data), 65536):
        reader.feed(data[i : i + 65536])
    assert reader.done
    assert reader.size == len(body) - 1
