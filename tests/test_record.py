"""Delivery state in the spool, and in memory where it cannot be written
(``relay.record``): ``recall`` as a table, then ``Record`` on a real spool
whose writes fail (its ``tmp/`` is a file: ENOTDIR, for root too).

Through the real daemon on a full disk: ``tests/test_faults.py``
(``test_full_disk_never_resends_a_batch_ses_accepted``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from relay.errors import SmtpReply
from relay.record import Record, recall
from relay.spool import TMP, Batch, BatchError, Entry, Spool

A, B = ("a@example.net",), ("b@example.net",)
PENDING_A, PENDING_B = Batch(A), Batch(B)
SENT_A = Batch(A, "sent", "0100-a")
FAILED_B = Batch(B, "failed", None, BatchError(SmtpReply(554, "5.7.1", "rejected")))
MESSAGE = b"Subject: hi\r\n\r\nHello\r\n"


def entry(*batches: Batch) -> Entry:
    return Entry(
        id="0006A1B2C3D4E5F60000AA",
        received=1_800_000_000.0,
        client="192.0.2.7",
        sender="app@example.com",
        source="app@example.com",
        recipients=tuple(r for b in batches for r in b.recipients),
        batches=batches,
    )


@pytest.mark.parametrize(
    ("on_disk", "known", "recalled"),
    [
        pytest.param(entry(PENDING_A), None, entry(PENDING_A), id="nothing known"),
        pytest.param(
            entry(PENDING_A, PENDING_B),
            entry(SENT_A, FAILED_B),
            entry(SENT_A, FAILED_B),
            id="outcomes not written come back",
        ),
        pytest.param(
            entry(SENT_A, PENDING_B),
            entry(PENDING_A, PENDING_B),
            entry(SENT_A, PENDING_B),
            id="what is on disk is newer",
        ),
        pytest.param(
            entry(PENDING_A, PENDING_B),
            entry(Batch(B, "sent", "0100-b"), PENDING_A),
            entry(PENDING_A, PENDING_B),
            id="other recipients are another batch",
        ),
        pytest.param(
            entry(PENDING_A, PENDING_B),
            entry(SENT_A),
            entry(SENT_A, PENDING_B),
            id="batches beyond what is known stay",
        ),
    ],
)
def test_recall(on_disk: Entry, known: Entry | None, recalled: Entry) -> None:
    assert recall(on_disk, known) == recalled


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    store = Spool(tmp_path / "spool")
    store.open(lock=False)
    return store


def break_writes(spool: Spool) -> None:
    shutil.rmtree(spool.dir(TMP))
    spool.dir(TMP).write_bytes(b"")


def mend_writes(spool: Spool) -> None:
    spool.dir(TMP).unlink()
    spool.dir(TMP).mkdir()


async def test_an_outcome_that_cannot_be_written_is_remembered_until_it_is(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    record = Record(spool)
    queued = entry(PENDING_A, PENDING_B)
    spool.put(queued, MESSAGE)
    decided = queued.with_batch(0, SENT_A)
    break_writes(spool)
    with caplog.at_level(logging.ERROR, logger="relay"):
        assert await record.save(decided) is False
    assert f"{queued.id}: cannot record delivery state: " in caplog.text
    assert spool.load(queued.id) == queued  # not on disk
    assert await record.envelope(queued.id) == decided  # but not forgotten
    with await record.message(queued.id) as message:
        assert b"".join(message.chunks()) == MESSAGE

    mend_writes(spool)
    assert await record.save(decided) is True
    assert spool.load(queued.id) == decided
    spool.update(queued)  # say, `ses-relay queue retry` wrote it meanwhile
    assert await record.envelope(queued.id) == queued  # nothing held in memory now


async def test_an_entry_that_left_the_queue_is_forgotten(spool: Spool) -> None:
    record = Record(spool)
    queued = entry(PENDING_A)
    spool.put(queued, MESSAGE)
    break_writes(spool)
    assert await record.save(queued.with_batch(0, SENT_A)) is False
    mend_writes(spool)
    record.left(queued.id)
    assert await record.envelope(queued.id) == queued
    await record.remove(queued)
    assert spool.find(queued.id) is None


async def test_an_entry_deleted_meanwhile_is_not_written_back(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    record = Record(spool)
    queued = entry(PENDING_A)
    spool.put(queued, MESSAGE)
    spool.remove(queued.id)
    with caplog.at_level(logging.WARNING, logger="relay"):
        assert await record.save(queued.with_batch(0, SENT_A)) is False
    assert f"{queued.id}: deleted while being delivered" in caplog.text
    assert spool.find(queued.id) is None
