"""The spool's journal: puts made durable together, resumed after a stop,
and never forged by a message's bytes."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

import relay.journal as journal_module
from relay.errors import SpoolError
from relay.journal import MARK_SIZE, RECYCLE_SIZE, Journal, JournalPut, encode_put, read_segment
from relay.spool import QUEUE, Spool
from tests.fsyncgate import JournalSyncGate
from tests.test_spool import make_entry


def put(entry_id: str, message: bytes = b"Subject: hi\r\n\r\nbody\r\n") -> JournalPut:
    return JournalPut(entry_id, make_entry(entry_id).to_json(), message)


def restarted(directory: Path) -> list[JournalPut]:
    """What a new process finds in the journal (the old one never closed it)."""
    return list(Journal(directory).pending())


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.log"))


def test_puts_not_done_are_found_after_a_stop(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    puts = [put(f"ABC{n}") for n in range(3)]
    assert journal.append(puts[:2]) == [None, None]
    assert journal.append(puts[2:]) == [None]
    journal.done("ABC1")
    assert restarted(tmp_path) == [puts[0], puts[2]]


def test_a_write_cut_short_loses_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(tmp_path)
    assert journal.append([put("ABC1")]) == [None]
    assert journal.append([put("ABC2", b"x" * 1000)]) == [None]
    [segment] = segments(tmp_path)
    os.truncate(segment, segment.stat().st_size - 10)
    with caplog.at_level(logging.WARNING):
        assert restarted(tmp_path) == [put("ABC1")]
    assert "bytes that are not whole records skipped" in caplog.text


def test_records_after_a_damaged_one_are_still_read(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.append([put("ABC1")]) == [None]
    assert journal.append([put("ABC2")]) == [None]
    assert journal.append([put("ABC3")]) == [None]
    [segment] = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    second = data.index(b"ABC2")
    data[second : second + 4] = b"\0\0\0\0"  # as a stretch the disk never got
    segment.write_bytes(bytes(data))
    assert restarted(tmp_path) == [put("ABC1"), put("ABC3")]


def test_a_message_cannot_pass_for_a_record(tmp_path: Path) -> None:
    """A client's message holding records of every mark it could guess, and
    the record holding it damaged: nothing of the message is read as a put."""
    forged = b"".join(
        encode_put(bytes([n]) * MARK_SIZE, put("EVIL1", b"forged")) for n in range(256)
    )
    journal = Journal(tmp_path)
    assert journal.append([put("ABC1", b"Subject: x\r\n\r\n" + forged)]) == [None]
    [segment] = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    at = data.index(b"ABC1")
    data[at - 20 : at] = b"\xff" * 20  # the real record's header and sizes
    segment.write_bytes(bytes(data))
    assert restarted(tmp_path) == []
    records, skipped = read_segment(bytes(data))
    assert records == []
    assert skipped == len(data) - 16


def test_a_failed_fdatasync_fails_every_put_it_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path)
    assert journal.append([put("ABC0")]) == [None]
    gate = JournalSyncGate(monkeypatch, tmp_path)
    gate.fail = errno.EIO
    outcomes = journal.append([put("ABC1"), put("ABC2")])
    assert all(isinstance(o, SpoolError) and o.errno == errno.EIO for o in outcomes)
    assert "cannot write spool entry ABC1" in str(outcomes[0])
    gate.fail = None
    assert journal.append([put("ABC3")]) == [None]
    assert len(segments(tmp_path)) == 2  # a new segment after the failure
    # The failed ones are done: never resumed; the others are.
    assert restarted(tmp_path) == [put("ABC0"), put("ABC3")]


def test_begin_writes_at_once_and_leaves_only_the_fdatasync_for_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``begin`` (on the event loop) writes the puts; what it returns (for a
    thread) makes them durable: the fdatasync that covers them comes after
    the write, and a failure of it fails every put it covered."""
    journal = Journal(tmp_path)
    assert journal.append([put("ABC0")]) == [None]  # the first put makes the first segment
    journal.done("ABC0")
    gate = JournalSyncGate(monkeypatch, tmp_path)
    rest = journal.begin([put("ABC1"), put("ABC2")])
    assert gate.calls == 0
    [segment] = segments(tmp_path)
    assert len(read_segment(segment.read_bytes())[0]) == 4  # written already
    assert rest() == [None, None]
    assert gate.log == [("synced", "ABC1"), ("synced", "ABC2")]
    gate.fail = errno.EIO
    failing = journal.begin([put("ABC3")])
    [outcome] = failing()
    assert isinstance(outcome, SpoolError)
    assert outcome.errno == errno.EIO
    gate.fail = None
    assert journal.begin([put("ABC4")])() == [None]
    assert len(segments(tmp_path)) == 2  # a new segment after the failure
    assert restarted(tmp_path) == [put("ABC1"), put("ABC2"), put("ABC4")]


def test_begin_leaves_a_segment_that_must_be_replaced_to_the_thread(tmp_path: Path) -> None:
    """A full segment is replaced in the thread (its new segment's fsyncs
    never block the event loop): ``begin`` then writes nothing itself."""
    journal = Journal(tmp_path, segment_size=200)
    assert journal.begin([put("ABC1", b"x" * 300)])() == [None]  # fills the first segment
    rest = journal.begin([put("ABC2")])
    assert len(segments(tmp_path)) == 1  # no new segment made yet, nothing written
    assert rest() == [None]
    assert len(segments(tmp_path)) == 2
    assert restarted(tmp_path) == [put("ABC1", b"x" * 300), put("ABC2")]


def test_a_write_that_fails_in_begin_fails_its_puts_and_starts_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up in the middle of a write: its first record reached
    the file whole. Neither put is resumed at a restart (their client got
    no ``250``): each gets a done record."""
    journal = Journal(tmp_path)
    assert journal.begin([put("ABC1")])() == [None]
    real = journal_module.write_all
    cut: list[int] = []

    def full(fd: int, data: bytes) -> None:
        if cut:  # the done records that follow go through
            real(fd, data)
            return
        cut.append(len(data) // 2)
        real(fd, data[: cut[0]])  # the first of two records of the same size
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(journal_module, "write_all", full)
    outcomes = journal.begin([put("ABC2"), put("ABC3")])()
    assert all(isinstance(o, SpoolError) and o.errno == errno.ENOSPC for o in outcomes)
    assert "cannot write spool entry ABC2" in str(outcomes[0])
    monkeypatch.undo()
    assert journal.begin([put("ABC4")])() == [None]
    assert len(segments(tmp_path)) == 2
    assert restarted(tmp_path) == [put("ABC1"), put("ABC4")]


def test_segments_all_done_are_removed(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_size=200)
    for n in range(4):
        assert journal.append([put(f"ABC{n}", b"x" * 300)]) == [None]
    assert len(segments(tmp_path)) == 4  # each put fills a segment
    for n in range(3):
        journal.done(f"ABC{n}")
    assert journal.sync(["x"]) == [None]
    [left] = segments(tmp_path)  # the current one, with its live put
    assert restarted(tmp_path) == [put("ABC3", b"x" * 300)]
    journal.done("ABC3")
    journal.close()
    assert not left.exists()
    assert segments(tmp_path) == []


def test_opening_the_spool_moves_the_journal_into_the_queue(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    message = b"Subject: kept\r\n\r\nbody\r\n"
    entries = [make_entry(f"ABC12{n}") for n in range(3)]
    assert spool.journal.append([spool.journal_put(e, message) for e in entries]) == [None] * 3
    spool.put(entries[0], message)  # moved before the stop, and changed since
    spool.update(replace(entries[0], attempts=3))
    spool.journal.done("ABC122")
    spool.close()  # keeps the segment: it has puts not done
    again = Spool(tmp_path / "spool")
    again.open()
    assert sorted(again.ids(QUEUE)) == ["ABC120", "ABC121"]
    assert again.load("ABC120").attempts == 3  # the queue's, not the journal's
    assert again.load("ABC121") == entries[1]
    assert again.message("ABC121") == message
    assert segments(tmp_path / "spool" / "journal") == []
    again.close()


def test_done_records_wait_for_the_next_fdatasync_of_either_kind(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_size=5000)
    assert journal.append([put("ABC1"), put("ABC2")]) == [None, None]
    assert not journal.unsynced()
    journal.done("ABC1")
    assert journal.unsynced()
    assert journal.append([put("ABC3", b"x" * 6000)]) == [None]  # fills the segment
    assert not journal.unsynced()  # the new message's fdatasync covered the done record
    journal.done("ABC2")
    assert journal.sync([None]) == [None]
    assert not journal.unsynced()
    assert journal.append([put("ABC4")]) == [None]  # in a new segment
    [first, _] = segments(tmp_path)
    journal.done("ABC3")  # the last put of the first segment: removed by the next sync
    assert journal.unsynced()
    assert journal.sync([None]) == [None]
    assert not journal.unsynced()
    assert not first.exists()
    assert restarted(tmp_path) == [put("ABC4")]


def test_a_quiet_journal_gives_its_space_back(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.append([put("ABC1", b"x" * RECYCLE_SIZE)]) == [None]
    assert journal.append([put("ABC2")]) == [None]
    journal.done("ABC1")
    assert journal.sync([None]) == [None]
    assert len(segments(tmp_path)) == 1  # ABC2 is not done yet
    [full] = segments(tmp_path)
    journal.done("ABC2")
    assert journal.sync([None]) == [None]
    # The full segment is gone, replaced by an empty one made there and then:
    # the next put does not wait for a new segment's fsyncs.
    [fresh] = segments(tmp_path)
    assert fresh != full
    assert fresh.stat().st_size < 100
    assert journal.append([put("ABC3")]) == [None]
    assert segments(tmp_path) == [fresh]
    assert restarted(tmp_path) == [put("ABC3")]


def test_a_quiet_journal_gives_its_space_back_when_no_new_segment_can_be_made(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    assert journal.append([put("ABC1", b"x" * RECYCLE_SIZE)]) == [None]
    [full] = segments(tmp_path)
    blocker = full.with_name(f"{int(full.stem) + 1:020d}.log")
    blocker.mkdir()  # where the next segment would be made
    journal.done("ABC1")
    assert journal.sync([None]) == [None]
    assert not full.exists()
    blocker.rmdir()
    assert journal.append([put("ABC2")]) == [None]  # the next put makes one
    assert restarted(tmp_path) == [put("ABC2")]


def test_a_put_whose_segment_filled_up_before_its_write_goes_to_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread's append makes a new segment (if needed) without the lock:
    another thread may fill the segment before the write. The write then
    goes to a new segment, under its mark."""
    journal = Journal(tmp_path, segment_size=4096)
    assert journal.append([put("ABC0")]) == [None]
    write = Journal._write

    def write_after_another_thread_fills_the_segment(
        self: Journal, puts: Sequence[JournalPut]
    ) -> Callable[[], list[SpoolError | None]] | None:
        if puts[0].entry_id == "ABC1" and len(segments(tmp_path)) == 1:
            assert journal.append([put("ABC9", b"z" * 5000)]) == [None]
        return write(self, puts)

    monkeypatch.setattr(Journal, "_write", write_after_another_thread_fills_the_segment)
    assert journal.append([put("ABC1")]) == [None]
    first, second = segments(tmp_path)
    assert [p.entry_id for p in Journal(first.parent).pending()] == ["ABC0", "ABC9", "ABC1"]
    assert [kind for kind, _ in read_segment(second.read_bytes())[0]] == [b"P"]
    assert b"ABC1" not in first.read_bytes()


def test_threads_appending_across_many_rotations_lose_nothing(tmp_path: Path) -> None:
    """Four threads append at once while segments fill every few puts, and
    the loop's side marks every other put done as it returns."""
    journal = Journal(tmp_path, segment_size=4096)
    done: list[str] = []

    def writer(n: int) -> list[str]:
        kept = []
        for k in range(100):
            entry_id = f"ABC{n}X{k}"
            assert journal.append([put(entry_id, b"y" * 700)]) == [None]
            if k % 2:
                journal.done(entry_id)
                done.append(entry_id)
            else:
                kept.append(entry_id)
        return kept

    with ThreadPoolExecutor(max_workers=4) as threads:
        kept = [i for ids in threads.map(writer, range(4)) for i in ids]
    assert journal.sync([None]) == [None]
    assert len(segments(tmp_path)) > 20
    assert sorted(p.entry_id for p in restarted(tmp_path)) == sorted(kept)
    for entry_id in kept:
        journal.done(entry_id)
    assert journal.sync([None]) == [None]
    journal.close()
    assert segments(tmp_path) == []


@pytest.mark.parametrize(
    "envelope",
    [b"not json", make_entry("ABC124").to_json()],  # garbage; another entry's envelope
)
def test_an_unreadable_journal_entry_is_quarantined_at_start(
    tmp_path: Path, envelope: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    bad = JournalPut("ABC123", envelope, b"Subject: odd\r\n\r\nbody\r\n")
    assert spool.journal.append([bad, spool.journal_put(make_entry("ABC125"), b"ok")]) == [None] * 2
    spool.close()
    again = Spool(tmp_path / "spool")
    with caplog.at_level(logging.ERROR):
        again.open()
    assert list(again.ids(QUEUE)) == ["ABC125"]
    quarantine = tmp_path / "spool" / "quarantine"
    assert (quarantine / "ABC123.eml").read_bytes() == bad.message
    assert (quarantine / "ABC123.json").read_bytes() == envelope
    assert "ABC123: an unreadable entry in the journal" in caplog.text
    again.close()


def test_a_spool_made_before_the_journal_has_nothing_in_it(tmp_path: Path) -> None:
    assert list(Journal(tmp_path / "journal").pending()) == []
    assert list(Spool(tmp_path).inline()) == []
