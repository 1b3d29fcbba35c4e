"""The durable spool (relay/spool.py) on real files.

What a crash leaves behind is produced two ways: by hand (the states named
in the module's docstring), and by a sweep that stops an operation before
each of its mutating OS calls in turn, copies the directory as it is at that
instant (what ``kill -9`` would leave) and recovers from the copy. Faults
(ENOSPC, EIO) are injected at ``os.write``/``os.fsync``; a full disk is also
made for real on a 1 MiB tmpfs (``tests/diskfull.py``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.errors import NoSuchEntry, SmtpReply, SpoolError, SpoolLocked, UnreadableEntry
from relay.ses.classify import ses_error
from relay.ses.sender import SesParameters
from relay.spool import (
    AREAS,
    DEAD,
    QUARANTINE,
    QUEUE,
    TMP,
    Batch,
    BatchError,
    Census,
    Entry,
    Spool,
    ses_json,
)
from tests import diskfull
from tests.fsyncgate import DirSyncGate

REPO = Path(__file__).resolve().parent.parent
MESSAGE = (
    b"From: App <app@example.com>\r\nTo: a@example.com\r\nSubject: =?utf-8?q?h=C3=A9?=\r\n\r\n"
    b"line\r\n.\r\nbare LF\n8-bit \xc3\xa9 \xff NUL \x00 end without newline"
)
WAIT = 20.0
"""Seconds any wait on another process may take before the test fails."""


def make_entry(entry_id: str = "ABC123", **changes: Any) -> Entry:
    recipients = ("a@example.com", "b@example.org")
    entry = Entry(
        id=entry_id,
        received=1_700_000_000.25,
        client="192.0.2.7",
        sender="app@example.com",
        source="app@example.com",
        recipients=recipients,
        batches=(Batch(recipients=recipients),),
        ses=SesParameters(configuration_set="transactional", tags=(("a", "b"),)),
    )
    return replace(entry, **changes)


def message_of(entry_id: str) -> bytes:
    return MESSAGE + entry_id.encode()


def progressed(entry: Entry) -> Entry:
    """The entry after one delivery attempt: a new envelope to write."""
    return replace(
        entry.with_batch(
            0,
            replace(
                entry.batches[0],
                state="failed",
                error=BatchError(SmtpReply(451, "4.4.5", "slow"), "Throttling", "slow"),
            ),
        ),
        attempts=entry.attempts + 1,
        next_attempt=entry.received + 300,
        history=(*entry.history, "Throttling: Maximum sending rate exceeded"),
    )


def names(spool: Spool, area: str) -> set[str]:
    return {p.name for p in spool.dir(area).iterdir()}


def entry_files(entry_ids: Iterator[str] | list[str]) -> set[str]:
    return {f"{i}.{suffix}" for i in entry_ids for suffix in ("eml", "json")}


def put_some(spool: Spool, count: int, prefix: str = "OLD") -> list[Entry]:
    entries = [make_entry(f"{prefix}{n:04d}") for n in range(count)]
    for entry in entries:
        spool.put(entry, message_of(entry.id))
    return entries


def assert_intact(spool: Spool, entries: list[Entry], area: str = QUEUE) -> None:
    for entry in entries:
        assert spool.load(entry.id, area) == entry
        assert spool.message(entry.id, area) == message_of(entry.id)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    opened = Spool(tmp_path / "spool")
    opened.open()
    yield opened
    opened.close()


# -- 1. the format -----------------------------------------------------------


def test_put_writes_the_documented_files(spool: Spool) -> None:
    entry = make_entry("Q1W2E3R4")
    spool.put(entry, MESSAGE)

    assert names(spool, QUEUE) == {"Q1W2E3R4.eml", "Q1W2E3R4.json"}
    assert names(spool, TMP) == set()
    assert names(spool, DEAD) == names(spool, QUARANTINE) == set()
    assert (spool.dir(QUEUE) / "Q1W2E3R4.eml").read_bytes() == MESSAGE
    for name in ("Q1W2E3R4.eml", "Q1W2E3R4.json"):
        assert (spool.dir(QUEUE) / name).stat().st_mode & 0o777 == 0o600
    for directory in (spool.path, *(spool.dir(a) for a in (TMP, QUEUE, DEAD, QUARANTINE))):
        assert directory.stat().st_mode & 0o077 == 0  # umask may only narrow 0o700

    text = (spool.dir(QUEUE) / "Q1W2E3R4.json").read_bytes()
    document = json.loads(text)  # ordinary JSON: no NaN, ASCII, one object
    assert text.isascii()
    assert document == {
        "version": 1,
        "id": "Q1W2E3R4",
        "received": 1_700_000_000.25,
        "client": "192.0.2.7",
        "user": None,
        "sender": "app@example.com",
        "source": "app@example.com",
        "recipients": ["a@example.com", "b@example.org"],
        "ses": {"configuration_set": "transactional", "tags": [["a", "b"]]},
        "batches": [
            {
                "recipients": ["a@example.com", "b@example.org"],
                "state": "pending",
                "message_id": None,
                "error": None,
            }
        ],
        "attempts": 0,
        "next_attempt": 0.0,
        "history": [],
        "bounce": None,
        "bounce_of": None,
    }
    assert Entry.from_json(text) == entry
    assert spool.load("Q1W2E3R4") == entry
    assert spool.message("Q1W2E3R4") == MESSAGE
    assert [e.id for e in spool.entries()] == ["Q1W2E3R4"]


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_envelope_reads_with_jq(spool: Spool) -> None:
    entry = make_entry("JQ0001", recipients=("ü@example.com",), sender="")
    spool.put(entry, MESSAGE)
    done = subprocess.run(
        [
            "jq",
            "-r",
            ".recipients[0], .batches[0].state, .sender",
            spool.dir(QUEUE) / "JQ0001.json",
        ],
        capture_output=True,
        check=True,
        timeout=WAIT,
    )
    assert done.stdout.decode() == "ü@example.com\npending\n\n"


def test_put_keeps_the_exact_bytes_of_an_empty_and_a_large_message(spool: Spool) -> None:
    large = bytes(range(256)) * 40_000 + b"\r\n.\r\n"  # 10 MB, more than one os.write may take
    spool.put(make_entry("EMPTY1"), b"")
    spool.put(make_entry("LARGE1"), large)
    assert spool.message("EMPTY1") == b""
    assert spool.message("LARGE1") == large


def test_put_survives_short_writes(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def short_write(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:7]))  # a nearly full disk takes a little at a time

    monkeypatch.setattr("relay.spool.os.write", short_write)
    spool.put(make_entry("SHORT1"), MESSAGE)
    monkeypatch.undo()
    assert spool.message("SHORT1") == MESSAGE
    assert spool.load("SHORT1") == make_entry("SHORT1")


_finite = st.floats(allow_nan=False, allow_infinity=False)
_batches = st.builds(
    Batch,
    recipients=st.lists(st.text(), max_size=5).map(tuple),
    state=st.sampled_from(["pending", "sent", "failed"]),
    message_id=st.none() | st.text(),
    error=st.none()
    | st.builds(
        BatchError,
        reply=st.builds(
            SmtpReply,
            code=st.integers(400, 599),
            enhanced=st.from_regex(r"[45]\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True),
            text=st.text(),
        ),
        code=st.none() | st.text(),
        message=st.none() | st.text(),
    ),
)
_optional_text = st.none() | st.text()
entries_strategy = st.builds(
    Entry,
    id=st.from_regex(r"[0-9A-Z]{6,32}", fullmatch=True),
    received=_finite,
    client=st.text(),
    sender=st.text(),
    source=st.text(),
    recipients=st.lists(st.text() | st.emails(), max_size=8).map(tuple),
    batches=st.lists(_batches, min_size=1, max_size=4).map(tuple),
    ses=st.builds(
        SesParameters,
        configuration_set=_optional_text,
        tags=st.lists(st.tuples(st.text(), st.text()), max_size=3).map(tuple),
        source_arn=_optional_text,
        from_arn=_optional_text,
        return_path_arn=_optional_text,
    ),
    user=st.none() | st.text(),
    attempts=st.integers(min_value=0),
    next_attempt=_finite,
    history=st.lists(st.text(), max_size=5).map(tuple),
)


@settings(max_examples=150, deadline=None)
@given(entry=entries_strategy)
def test_envelope_round_trips_and_is_plain_json(entry: Entry) -> None:
    text = entry.to_json()
    assert text.isascii()
    document = json.loads(text)  # the standard library's parser, default settings
    assert document["id"] == entry.id
    assert document["recipients"] == list(entry.recipients)
    assert document["ses"] == ses_json(entry.ses)
    assert [b["state"] for b in document["batches"]] == [b.state for b in entry.batches]
    assert Entry.from_json(text) == entry


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(entry=entries_strategy, message=st.binary(max_size=2000))
def test_put_load_update_round_trip_on_disk(entry: Entry, message: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="spool-") as tmp:
        spool = Spool(tmp)
        spool.open()
        try:
            spool.put(entry, message)
            assert spool.load(entry.id) == entry
            assert spool.message(entry.id) == message
            assert list(spool.entries()) == [entry]
            changed = progressed(entry)
            spool.update(changed)
            assert spool.load(entry.id) == changed
            spool.move(changed, QUEUE, DEAD)
            assert list(spool.entries(DEAD)) == [changed]
            assert spool.message(entry.id, DEAD) == message
            assert names(spool, TMP) == set()
        finally:
            spool.close()


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"id": "abc123"}, "lower-case id"),
        ({"id": "A1"}, "short id"),
        ({"id": "../../ETC0"}, "path in the id"),
        ({"batches": ()}, "no batches"),
        ({"received": math.nan}, "NaN"),
        ({"next_attempt": math.inf}, "infinity"),
        ({"ses": SesParameters(tags=(("a", 5),))}, "a tag that is not a string"),
    ],
)
def test_put_refuses_an_entry_that_would_not_read_back(
    spool: Spool, changes: dict[str, Any], why: str
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any ValueError; the point is nothing is written
        spool.put(make_entry(**changes), MESSAGE)
    for area in (TMP, QUEUE, DEAD, QUARANTINE):
        assert names(spool, area) == set(), why


LEGACY = Path(__file__).parent / "data" / "legacy-entry.json"
"""An envelope as the version before typed SES parameters wrote it: ``ses``
a plain object, each batch's ``error`` the SMTP reply as text."""
LEGACY_ID = "0005F1AAAAAAAAAA00000E"
IDENTITY = "arn:aws:ses:us-east-1:123456789012:identity/example.com"


def test_an_entry_written_by_the_previous_version_loads_typed(spool: Spool) -> None:
    shutil.copyfile(LEGACY, spool.dir(QUEUE) / f"{LEGACY_ID}.json")
    (spool.dir(QUEUE) / f"{LEGACY_ID}.eml").write_bytes(MESSAGE)

    [entry] = spool.entries()  # not quarantined
    assert entry.ses == SesParameters(
        configuration_set="transactional",
        tags=(("team", "ops"), ("app", "billing")),
        source_arn=IDENTITY,
        from_arn=IDENTITY,
        return_path_arn="arn:aws:ses:us-east-1:123456789012:identity/bounces.example.com",
    )
    assert [b.error for b in entry.batches] == [
        None,
        BatchError(
            SmtpReply(554, "5.7.1", "message rejected by SES: Email address is not verified.")
        ),
        BatchError(SmtpReply(451, "4.4.5", "SES sending rate exceeded, try again later")),
    ]
    # Written again, it says the same in the same words: the previous version
    # reads what this one writes.
    spool.update(entry)
    assert json.loads((spool.dir(QUEUE) / f"{LEGACY_ID}.json").read_bytes()) == json.loads(
        LEGACY.read_bytes()
    )


def test_batch_errors_keep_ses_code_and_message(spool: Spool) -> None:
    refused = ses_error("MessageRejected", "Email address is not verified.", 400, "r1")
    failed = BatchError.of(refused)
    entry = make_entry(batches=(Batch(("a@example.com",), "failed", None, failed),))
    spool.put(entry, MESSAGE)

    [batch] = json.loads((spool.dir(QUEUE) / f"{entry.id}.json").read_bytes())["batches"]
    assert batch["error"] == "554 5.7.1 message rejected by SES: Email address is not verified."
    assert (batch["error_code"], batch["error_message"]) == (
        "MessageRejected",
        "Email address is not verified.",
    )
    loaded = spool.load(entry.id).batches[0].error
    assert loaded == failed
    assert loaded is not None
    assert (loaded.reply.code, loaded.reply.enhanced) == (554, "5.7.1")


@pytest.mark.parametrize(
    ("state", "reply"),
    [
        ("failed", SmtpReply(554, "5.0.0", "slow down")),
        ("pending", SmtpReply(451, "4.0.0", "slow down")),
    ],
)
def test_an_error_that_is_not_a_reply_reads_with_a_generic_status(
    spool: Spool, state: str, reply: SmtpReply
) -> None:
    document = json.loads(make_entry().to_json())
    document["batches"][0] |= {"state": state, "error": "slow down"}
    (spool.dir(QUEUE) / "ABC123.json").write_text(json.dumps(document))
    (spool.dir(QUEUE) / "ABC123.eml").write_bytes(MESSAGE)
    assert spool.load("ABC123").batches[0].error == BatchError(reply)


def test_put_refuses_an_id_already_queued_and_keeps_the_first(spool: Spool) -> None:
    first = make_entry("DUP001")
    spool.put(first, b"first")
    with pytest.raises(SpoolError, match="DUP001") as raised:
        spool.put(make_entry("DUP001", client="elsewhere"), b"second")
    assert raised.value.errno == errno.EEXIST
    assert spool.load("DUP001") == first
    assert spool.message("DUP001") == b"first"
    assert names(spool, TMP) == set()


# -- 2. crash windows, by hand -----------------------------------------------


def reopen(spool: Spool) -> Spool:
    """What the next daemon sees: a new ``Spool`` after this one stopped."""
    spool.close()
    again = Spool(spool.path)
    again.open()
    return again


def write_raw(path: Path, data: bytes, mtime_ns: int | None = None) -> None:
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


SECOND = 1_000_000_000
T0 = 1_700_000_000 * SECOND


@pytest.mark.parametrize(
    "crashed_at",
    ["message written", "both written", "message renamed", "both renamed"],
)
def test_put_interrupted(spool: Spool, crashed_at: str, caplog: pytest.LogCaptureFixture) -> None:
    kept = put_some(spool, 2)
    entry = make_entry("NEW001")
    tmp, queue = spool.dir(TMP), spool.dir(QUEUE)
    eml_tmp, json_tmp = tmp / "NEW001.eml.77.0", tmp / "NEW001.json.77.1"
    write_raw(eml_tmp, MESSAGE[:20] if crashed_at == "message written" else MESSAGE)
    if crashed_at != "message written":
        write_raw(json_tmp, entry.to_json())
    if crashed_at in ("message renamed", "both renamed"):
        eml_tmp.rename(queue / "NEW001.eml")
    if crashed_at == "both renamed":
        json_tmp.rename(queue / "NEW001.json")

    spool = reopen(spool)
    listed = list(spool.entries())

    assert names(spool, TMP) == set()
    assert_intact(spool, kept)
    if crashed_at == "both renamed":  # committed: it may have been acknowledged
        assert [e.id for e in listed] == ["NEW001", "OLD0000", "OLD0001"]
        assert spool.load("NEW001") == entry
        assert spool.message("NEW001") == MESSAGE
    else:  # never acknowledged: never delivered, nothing left of it
        assert [e.id for e in listed] == ["OLD0000", "OLD0001"]
        assert names(spool, QUEUE) == entry_files(["OLD0000", "OLD0001"])
        assert spool.find("NEW001") is None
    assert names(spool, QUARANTINE) == set()
    assert errors(caplog) == []


def test_a_listing_during_put_does_not_take_the_message_away(spool: Spool) -> None:
    """The daemon's own scan, or ``queue list`` while the daemon runs, must
    not remove a message whose envelope is about to be committed."""
    entry = make_entry("INFLT1")
    write_raw(spool.dir(QUEUE) / "INFLT1.eml", MESSAGE)  # put renamed the message...
    write_raw(spool.dir(TMP) / "INFLT1.json.9.9", entry.to_json())  # ...not yet the envelope
    cli = Spool(spool.path)
    cli.open(lock=False)

    assert list(cli.entries()) == []
    assert list(spool.entries()) == []
    assert cli.find("INFLT1") is None

    os.rename(spool.dir(TMP) / "INFLT1.json.9.9", spool.dir(QUEUE) / "INFLT1.json")  # commit
    assert list(spool.entries()) == [entry]
    assert spool.message("INFLT1") == MESSAGE


@pytest.mark.parametrize("renamed", [False, True])
def test_update_interrupted(spool: Spool, renamed: bool) -> None:
    old = make_entry("UPD001")
    spool.put(old, MESSAGE)
    new = progressed(old)
    staged = spool.dir(TMP) / "UPD001.json.123.4"
    write_raw(staged, new.to_json())
    if renamed:
        staged.rename(spool.dir(QUEUE) / "UPD001.json")

    spool = reopen(spool)

    assert list(spool.entries()) == [new if renamed else old]
    assert spool.message("UPD001") == MESSAGE
    assert names(spool, TMP) == set()


# Each state: (files in queue/, files in dead/) as {name: mtime offset in
# seconds}, "old"/"new" naming which envelope a .json holds; and the area and
# envelope that must survive.
MOVE_STATES = {
    "target message linked": (
        {"eml": 0, "json:old": 0},
        {"eml": 0},
        QUEUE,
        "old",
    ),
    "target envelope staged in tmp": (
        {"eml": 0, "json:old": 0},
        {"eml": 0},
        QUEUE,
        "old",
    ),
    "target committed, newer": (
        {"eml": 0, "json:old": 0},
        {"eml": 0, "json:new": 5},
        DEAD,
        "new",
    ),
    "source envelope removed": (
        {"eml": 0},
        {"eml": 0, "json:new": 5},
        DEAD,
        "new",
    ),
    "a retry (dead to queue): queue newer": (
        {"eml": 0, "json:new": 9},
        {"eml": 0, "json:old": 3},
        QUEUE,
        "new",
    ),
    "target committed, its message missing": (
        {"eml": 0, "json:old": 0},
        {"json:new": 5},
        DEAD,
        "new",
    ),
}


@pytest.mark.parametrize("state", list(MOVE_STATES))
def test_move_interrupted(spool: Spool, state: str, caplog: pytest.LogCaptureFixture) -> None:
    in_queue, in_dead, survivor, which = MOVE_STATES[state]
    old = make_entry("MOV001")
    new = progressed(old)
    envelopes = {"old": old.to_json(), "new": new.to_json()}
    spool.put(old, MESSAGE)
    queue_eml = spool.dir(QUEUE) / "MOV001.eml"
    if "eml" in in_dead:
        os.link(queue_eml, spool.dir(DEAD) / "MOV001.eml")
    if state == "target envelope staged in tmp":
        write_raw(spool.dir(TMP) / "MOV001.json.5.5", new.to_json())
    for area, files in ((QUEUE, in_queue), (DEAD, in_dead)):
        for key, offset in files.items():
            if key.startswith("json:"):
                write_raw(spool.dir(area) / "MOV001.json", envelopes[key[5:]], T0 + offset * SECOND)
    if "json:old" not in in_queue and "json:new" not in in_queue:
        (spool.dir(QUEUE) / "MOV001.json").unlink()
    if "eml" not in in_queue:
        queue_eml.unlink()

    spool = reopen(spool)
    queued, dead = list(spool.entries(QUEUE)), list(spool.entries(DEAD))

    expected = new if which == "new" else old
    assert (queued, dead) == (([expected], []) if survivor == QUEUE else ([], [expected]))
    other = DEAD if survivor == QUEUE else QUEUE
    assert names(spool, other) == set()
    assert names(spool, survivor) == entry_files(["MOV001"])
    assert spool.message("MOV001", survivor) == MESSAGE
    assert spool.find("MOV001") == survivor
    assert names(spool, TMP) == names(spool, QUARANTINE) == set()
    assert errors(caplog) == []


def test_move_retried_after_the_message_was_linked(spool: Spool) -> None:
    entry = make_entry("RETRY1")
    spool.put(entry, MESSAGE)
    os.link(spool.dir(QUEUE) / "RETRY1.eml", spool.dir(DEAD) / "RETRY1.eml")  # first try got here

    spool.move(progressed(entry), QUEUE, DEAD)

    assert spool.find("RETRY1") == DEAD
    assert names(spool, QUEUE) == set()
    assert spool.message("RETRY1", DEAD) == MESSAGE
    assert spool.load("RETRY1", DEAD) == progressed(entry)
    spool.move(progressed(entry), QUEUE, DEAD)  # and once more: already done, not an error
    assert spool.message("RETRY1", DEAD) == MESSAGE


def test_move_replaces_a_stale_message_in_the_target(spool: Spool) -> None:
    entry = make_entry("STALE1")
    spool.put(entry, MESSAGE)
    write_raw(spool.dir(DEAD) / "STALE1.eml", b"not this one")

    spool.move(entry, QUEUE, DEAD)

    assert spool.message("STALE1", DEAD) == MESSAGE
    assert names(spool, QUEUE) == names(spool, TMP) == set()


def test_move_makes_the_target_newer_even_when_the_clock_went_back(spool: Spool) -> None:
    entry = make_entry("CLOCK1")
    spool.put(entry, MESSAGE)
    future = T0 + 10**6 * SECOND  # the source was written before the clock was stepped back
    os.utime(spool.dir(QUEUE) / "CLOCK1.json", ns=(future, future))
    spool.move(entry, QUEUE, DEAD)
    assert (spool.dir(DEAD) / "CLOCK1.json").stat().st_mtime_ns > future


# -- 2b. crash windows, swept: stop before every mutating OS call ------------


class Crash(BaseException):
    """``kill -9`` here: nothing after it runs, no cleanup, no except clause."""


_MUTATING = ("open", "write", "pwrite", "fsync", "rename", "link", "unlink", "utime", "ftruncate")


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` with its bytes and mtime (directories as b"/")."""
    state: dict[str, tuple[bytes, int]] = {}
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            path = Path(directory, name)
            state[str(path.relative_to(root)) + "/"] = (b"/", path.stat().st_mtime_ns)
        for name in files:
            path = Path(directory, name)
            with path.open("rb") as file:
                state[str(path.relative_to(root))] = (file.read(), path.stat().st_mtime_ns)
    return state


def restore(state: dict[str, tuple[bytes, int]], root: Path) -> None:
    root.mkdir()
    for name, (data, mtime) in sorted(state.items()):
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.write_bytes(data)
        os.utime(path, ns=(mtime, mtime))


class Crasher:
    """Stops the ``step``-th mutating OS call (0-based), after snapshotting ``root``."""

    def __init__(self, step: int, root: Path) -> None:
        self.step, self.root = step, root
        self.calls = 0
        self.state: dict[str, tuple[bytes, int]] | None = None

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        real = {name: getattr(os, name) for name in _MUTATING}
        for name, function in real.items():
            setattr(os, name, self._wrap(name, function))
        try:
            yield
        finally:
            for name, function in real.items():
                setattr(os, name, function)

    def _wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            reading = name == "open" and not (args[1] & os.O_CREAT)
            if self.state is None and not reading:
                if self.calls == self.step:
                    self.state = snapshot(self.root)
                    raise Crash(name)
                self.calls += 1
            return function(*args, **kwargs)

        return call


def crash_sweep(
    tmp_path: Path,
    prepare: Callable[[Spool], None],
    operation: Callable[[Spool], object],
    check: Callable[[Spool, dict[str, tuple[bytes, int]]], None],
    caplog: pytest.LogCaptureFixture,
    *,
    open_first: bool = True,
) -> int:
    """Crash ``operation`` at every step; after each, recover and ``check``.
    Returns how many crash points there were. With ``open_first`` false the
    operation gets the spool unopened (to crash ``open`` itself)."""
    base = tmp_path / "base"
    spool = Spool(base)
    spool.open()
    prepare(spool)
    spool.close()
    for step in range(200):
        work = tmp_path / f"work{step}"
        shutil.copytree(base, work)
        spool = Spool(work)
        if open_first:
            spool.open()
        crasher = Crasher(step, work)
        with crasher.armed(), contextlib.suppress(Crash):
            operation(spool)
        spool.close()
        state = crasher.state if crasher.state is not None else snapshot(work)
        after = tmp_path / f"after{step}"
        restore(state, after)
        caplog.clear()
        recovered = Spool(after)
        recovered.open()
        try:
            check(recovered, state)
            assert names(recovered, TMP) == names(recovered, QUARANTINE) == set(), step
            assert errors(caplog) == [], step
        finally:
            recovered.close()
        if crasher.state is None:
            return step
    pytest.fail("the operation never finished")


def only_in(spool: Spool, entry_id: str) -> str:
    """The one area holding any file of ``entry_id``."""
    holding = [a for a in AREAS if any(n.startswith(f"{entry_id}.") for n in names(spool, a))]
    assert len(holding) == 1, holding
    return holding[0]


def test_put_crash_sweep(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    new = make_entry("NEW001")
    kept: list[Entry] = []

    def check(spool: Spool, state: dict[str, tuple[bytes, int]]) -> None:
        listed = {e.id: e for e in spool.entries()}
        assert_intact(spool, kept)
        if "queue/NEW001.json" in state:
            assert listed["NEW001"] == new
            assert spool.message("NEW001") == message_of("NEW001")
        else:
            assert "NEW001" not in listed
            assert spool.find("NEW001") is None
            assert names(spool, QUEUE) == entry_files([e.id for e in kept])

    points = crash_sweep(
        tmp_path,
        lambda s: kept.extend(put_some(s, 2)),
        lambda s: s.put(new, message_of("NEW001")),
        check,
        caplog,
    )
    assert points >= 9  # create, write, fsync twice; two renames; fsync queue/


@pytest.mark.parametrize("how", ["update", "modify"])
def test_update_crash_sweep(tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    old = make_entry("UPD001")
    new = progressed(old)

    def operation(spool: Spool) -> None:
        if how == "update":
            spool.update(new)
        else:
            spool.modify("UPD001", progressed)

    def check(spool: Spool, state: dict[str, tuple[bytes, int]]) -> None:
        committed = state["queue/UPD001.json"][0] == new.to_json()
        assert list(spool.entries()) == [new if committed else old]
        assert spool.message("UPD001") == message_of("UPD001")

    points = crash_sweep(
        tmp_path, lambda s: s.put(old, message_of("UPD001")), operation, check, caplog
    )
    assert points >= 4


@pytest.mark.parametrize(
    ("source", "target", "prelinked", "source_in_future"),
    [
        (QUEUE, DEAD, False, False),
        (DEAD, QUEUE, False, False),
        (QUEUE, DEAD, True, False),  # a retried move: the target has the link already
        (DEAD, QUEUE, False, True),  # the clock was stepped back since the source was written
    ],
)
def test_move_crash_sweep(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    source: str,
    target: str,
    prelinked: bool,
    source_in_future: bool,
) -> None:
    old = make_entry("MOV001")
    new = progressed(old)

    def prepare(spool: Spool) -> None:
        spool.put(old, message_of("MOV001"))
        if source == DEAD:
            spool.move(old, QUEUE, DEAD)
        if prelinked:
            os.link(spool.dir(source) / "MOV001.eml", spool.dir(target) / "MOV001.eml")
        if source_in_future:
            future = T0 + 10**6 * SECOND
            os.utime(spool.dir(source) / "MOV001.json", ns=(future, future))
        put_some(spool, 1)

    def check(spool: Spool, state: dict[str, tuple[bytes, int]]) -> None:
        area = only_in(spool, "MOV001")
        committed = f"{target}/MOV001.json" in state
        assert area == (target if committed else source)
        assert spool.load("MOV001", area) == (new if committed else old)
        assert [e.id for e in spool.entries(area)] == (
            ["MOV001", "OLD0000"] if area == QUEUE else ["MOV001"]
        )
        assert spool.message("MOV001", area) == message_of("MOV001")
        assert_intact(spool, [make_entry("OLD0000")])

    points = crash_sweep(tmp_path, prepare, lambda s: s.move(new, source, target), check, caplog)
    assert points >= 7


def test_remove_crash_sweep(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entry = make_entry("DEL001")

    def check(spool: Spool, state: dict[str, tuple[bytes, int]]) -> None:
        if "queue/DEL001.json" in state:
            assert list(spool.entries()) == [entry]
            assert spool.message("DEL001") == message_of("DEL001")
        else:  # gone entirely: never half there, never quarantined
            assert list(spool.entries()) == []
            assert names(spool, QUEUE) == set()

    crash_sweep(
        tmp_path,
        lambda s: s.put(entry, message_of("DEL001")),
        lambda s: s.remove("DEL001"),
        check,
        caplog,
    )


def test_recovery_crash_sweep(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A daemon killed while it recovers recovers on the next start."""
    old, new = make_entry("MOV001"), progressed(make_entry("MOV001"))
    kept, dead = make_entry("OLD0000"), make_entry("DEAD02")

    def prepare(spool: Spool) -> None:
        spool.put(kept, message_of("OLD0000"))
        spool.put(dead, message_of("DEAD02"))
        spool.move(dead, QUEUE, DEAD)
        spool.put(old, message_of("MOV001"))  # a move to dead/ cut short after the commit:
        os.link(spool.dir(QUEUE) / "MOV001.eml", spool.dir(DEAD) / "MOV001.eml")
        write_raw(spool.dir(DEAD) / "MOV001.json", new.to_json(), T0 + 5 * SECOND)
        os.utime(spool.dir(QUEUE) / "MOV001.json", ns=(T0, T0))
        write_raw(spool.dir(QUEUE) / "ORPHN1.eml", MESSAGE)  # a put cut short
        write_raw(spool.dir(TMP) / "ORPHN1.json.1.1", old.to_json())
        write_raw(spool.dir(TMP) / "UPD001.json.1.2", b"{half")

    def operation(spool: Spool) -> None:
        spool.open()

    def check(spool: Spool, state: dict[str, tuple[bytes, int]]) -> None:
        assert list(spool.entries(QUEUE)) == [kept]
        assert list(spool.entries(DEAD)) == [dead, new]
        assert names(spool, QUEUE) == entry_files(["OLD0000"])
        assert names(spool, DEAD) == entry_files(["DEAD02", "MOV001"])
        assert spool.message("MOV001", DEAD) == message_of("MOV001")

    points = crash_sweep(tmp_path, prepare, operation, check, caplog, open_first=False)
    assert points >= 6


# -- 3. garbled entries ------------------------------------------------------

_DELETE = object()


def _edit(_batch: bool = False, **changes: Any) -> bytes:
    document: dict[str, Any] = json.loads(make_entry("BAD001").to_json())
    target = document["batches"][0] if _batch else document
    for key, value in changes.items():
        if value is _DELETE:
            del target[key]
        else:
            target[key] = value
    return json.dumps(document).encode()


def _literal(old: bytes, new: bytes) -> bytes:
    """The valid envelope with one piece of text replaced (for what json.dumps won't write)."""
    text = make_entry("BAD001").to_json()
    assert old in text
    return text.replace(old, new)


_RECEIVED = b'"received":1700000000.25'
GARBLED: dict[str, bytes] = {
    "empty": b"",
    "truncated": make_entry("BAD001").to_json()[:60],
    "truncated at the last brace": make_entry("BAD001").to_json()[:-2],
    "not UTF-8": b'{"version": 1, "id": "\xff\xfe"}',
    "not JSON": b"From: someone\r\n\r\n",
    "a list": b"[1, 2, 3]",
    "a string": b'"BAD001"',
    "null": b"null",
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "version 2": _edit(version=2),
    "version as text": _edit(version="1"),
    "version true": _edit(version=True),
    "version 1.0": _edit(version=1.0),
    "no version": _edit(version=_DELETE),
    "no id": _edit(id=_DELETE),
    "no received": _edit(received=_DELETE),
    "no client": _edit(client=_DELETE),
    "no sender": _edit(sender=_DELETE),
    "no source": _edit(source=_DELETE),
    "no recipients": _edit(recipients=_DELETE),
    "no batches": _edit(batches=_DELETE),
    "empty batches": _edit(batches=[]),
    "batches an object": _edit(batches={"0": {}}),
    "batch a string": _edit(batches=["a@example.com"]),
    "batch without state": _edit(True, state=_DELETE),
    "batch without recipients": _edit(True, recipients=_DELETE),
    "batch state unknown": _edit(True, state="done"),
    "batch recipients a string": _edit(True, recipients="a@example.com"),
    "batch message_id a number": _edit(True, message_id=5),
    "batch error a list": _edit(True, error=["x"]),
    "id a number": _edit(id=123456),
    "id lower case": _edit(id="bad001"),
    "received a string": _edit(received="yesterday"),
    "received true": _edit(received=True),
    "received NaN": _literal(_RECEIVED, b'"received": NaN'),
    "received -Infinity": _literal(_RECEIVED, b'"received": -Infinity'),
    "received too large": _literal(_RECEIVED, b'"received": 1e999'),
    "received an enormous integer": _literal(_RECEIVED, b'"received": ' + b"9" * 400),
    "client a number": _edit(client=5),
    "user a number": _edit(user=5),
    "recipients a string": _edit(recipients="a@example.com"),
    "recipients with a number": _edit(recipients=["a@example.com", 5]),
    "ses a list": _edit(ses=[["ConfigurationSetName", "x"]]),
    "NaN inside ses": _literal(b'"transactional"', b"NaN"),
    "attempts negative": _edit(attempts=-1),
    "attempts a float": _edit(attempts=1.5),
    "next_attempt a string": _edit(next_attempt="soon"),
    "history a string": _edit(history="tried"),
    "bounce a number": _edit(bounce=5),
    "bounce not a queue id": _edit(bounce="../BAD002"),
    "bounce_of a list": _edit(bounce_of=["BAD002"]),
    "another entry's id": _edit(id="OTHER1"),
}


@pytest.mark.parametrize("case", list(GARBLED))
def test_garbled_envelope_is_quarantined(
    spool: Spool, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    kept = put_some(spool, 2)
    write_raw(spool.dir(QUEUE) / "BAD001.eml", MESSAGE)
    write_raw(spool.dir(QUEUE) / "BAD001.json", GARBLED[case])

    with pytest.raises(UnreadableEntry, match="not a spool entry"):
        Entry.from_json(GARBLED[case]) if case != "another entry's id" else spool.load("BAD001")
    listed = list(spool.entries())

    assert listed == kept
    assert names(spool, QUARANTINE) == {"BAD001.eml", "BAD001.json"}
    assert (spool.dir(QUARANTINE) / "BAD001.json").read_bytes() == GARBLED[case]
    assert (spool.dir(QUARANTINE) / "BAD001.eml").read_bytes() == MESSAGE
    assert names(spool, QUEUE) == entry_files(["OLD0000", "OLD0001"])
    logged = errors(caplog)
    assert len(logged) == 1
    assert "BAD001" in logged[0]
    assert "quarantine" in logged[0]

    caplog.clear()  # once: the next listing is quiet, the daemon does not loop on it
    assert list(spool.entries()) == kept
    assert errors(caplog) == []


def test_garbled_entry_found_at_start_is_quarantined(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    kept = put_some(spool, 1)
    write_raw(spool.dir(DEAD) / "BAD002.eml", MESSAGE)
    write_raw(spool.dir(DEAD) / "BAD002.json", GARBLED["truncated"])
    spool = reopen(spool)
    assert list(spool.entries(DEAD)) == []
    assert list(spool.entries(QUEUE)) == kept
    assert names(spool, QUARANTINE) == {"BAD002.eml", "BAD002.json"}
    assert any("BAD002" in line for line in errors(caplog))


def test_envelope_without_message_is_quarantined(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    kept = put_some(spool, 2)
    spool.put(make_entry("NOMSG1"), MESSAGE)
    (spool.dir(QUEUE) / "NOMSG1.eml").unlink()

    assert list(spool.entries()) == kept
    assert names(spool, QUARANTINE) == {"NOMSG1.json"}
    assert len(errors(caplog)) == 1
    assert "NOMSG1" in errors(caplog)[0]
    assert "message file is missing" in errors(caplog)[0]


def test_unreadable_envelope_file_is_quarantined(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    kept = put_some(spool, 1)
    (spool.dir(QUEUE) / "DIR001.json").mkdir()  # reading it fails with EISDIR
    write_raw(spool.dir(QUEUE) / "DIR001.eml", MESSAGE)
    assert list(spool.entries()) == kept
    assert names(spool, QUARANTINE) == {"DIR001.json", "DIR001.eml"}
    assert any("DIR001" in line for line in errors(caplog))


def test_a_second_quarantine_of_the_same_id_keeps_the_first(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    for content in (b"first", b"second", b"third"):
        write_raw(spool.dir(QUEUE) / "TWICE1.eml", content)
        write_raw(spool.dir(QUEUE) / "TWICE1.json", content)
        assert list(spool.entries()) == []
    assert {(spool.dir(QUARANTINE) / n).read_bytes() for n in names(spool, QUARANTINE)} == {
        b"first",
        b"second",
        b"third",
    }
    assert len(names(spool, QUARANTINE)) == 6
    assert len(errors(caplog)) == 3


def test_quarantine_that_cannot_move_logs_and_does_not_raise(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    kept = put_some(spool, 2)
    write_raw(spool.dir(QUEUE) / "STUCK1.eml", MESSAGE)
    write_raw(spool.dir(QUEUE) / "STUCK1.json", b"{")
    spool.dir(QUARANTINE).rmdir()
    spool.dir(QUARANTINE).write_bytes(b"")  # renames into it fail: ENOTDIR

    assert list(spool.entries()) == kept
    assert names(spool, QUEUE) == entry_files(["OLD0000", "OLD0001", "STUCK1"])  # kept, not lost
    assert len(errors(caplog)) == 1
    assert "STUCK1" in errors(caplog)[0]
    assert "cannot be quarantined" in errors(caplog)[0]


def test_message_without_envelope_is_skipped_and_removed_at_start(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    kept = put_some(spool, 1)
    write_raw(spool.dir(QUEUE) / "ORPHN1.eml", MESSAGE)
    write_raw(spool.dir(DEAD) / "ORPHN2.eml", MESSAGE)
    assert list(spool.entries()) == kept  # maybe a put in progress: leave it alone
    assert (spool.dir(QUEUE) / "ORPHN1.eml").exists()

    spool = reopen(spool)  # at start nothing is in progress: it was never acknowledged
    assert list(spool.entries()) == kept
    assert names(spool, QUEUE) == entry_files(["OLD0000"])
    assert names(spool, DEAD) == set()
    assert errors(caplog) == []


def test_unrelated_files_are_left_alone(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    kept = put_some(spool, 1)
    for name in ("README", "OLD0000.json~", ".OLD0000.json.swp"):
        write_raw(spool.dir(QUEUE) / name, b"x")
    assert list(spool.entries()) == kept
    assert {"README", "OLD0000.json~", ".OLD0000.json.swp"} <= names(spool, QUEUE)
    assert errors(caplog) == []


def test_load_of_garbled_and_missing_entries(spool: Spool) -> None:
    write_raw(spool.dir(QUEUE) / "BAD001.eml", MESSAGE)
    write_raw(spool.dir(QUEUE) / "BAD001.json", GARBLED["truncated"])
    with pytest.raises(UnreadableEntry, match="not a spool entry") as unreadable:
        spool.load("BAD001")
    assert isinstance(unreadable.value, SpoolError)
    write_raw(spool.dir(QUEUE) / "BAD002.eml", MESSAGE)
    write_raw(spool.dir(QUEUE) / "BAD002.json", make_entry("OTHER1").to_json())
    with pytest.raises(UnreadableEntry, match=r"BAD002\.json holds id 'OTHER1'"):
        spool.load("BAD002")
    with pytest.raises(NoSuchEntry):
        spool.load("NOPE01")
    with pytest.raises(NoSuchEntry):
        spool.message("NOPE01")
    with pytest.raises(NoSuchEntry):
        spool.load("../../etc/passwd")
    assert names(spool, QUARANTINE) == set()  # load reports; only listings quarantine


# -- 4. the lock ---------------------------------------------------------------


def test_second_open_in_the_same_process_is_refused(spool: Spool) -> None:
    second = Spool(spool.path)
    with pytest.raises(SpoolLocked, match=rf"pid {os.getpid()}\b") as raised:
        second.open()
    assert raised.value.pid == os.getpid()
    assert second.daemon_pid() == os.getpid()
    assert Spool(spool.path).daemon_pid() == os.getpid()
    assert (spool.path / "lock").read_text() == f"{os.getpid()}\n"

    cli = Spool(spool.path)
    cli.open(lock=False)  # the queue command works while the daemon runs
    assert cli.daemon_pid() == os.getpid()

    spool.open()  # opening again what we hold already is harmless
    spool.close()
    assert second.daemon_pid() is None
    second.open()
    assert second.daemon_pid() == os.getpid()
    second.close()
    second.close()  # twice is harmless
    assert Spool(spool.path).daemon_pid() is None


def test_daemon_pid_without_a_spool(tmp_path: Path) -> None:
    assert Spool(tmp_path / "nothing").daemon_pid() is None


def test_a_queue_command_probing_the_lock_does_not_stop_a_daemon_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``daemon_pid`` holds the lock shared for a moment; a daemon starting
    in that moment must not take it for another daemon."""
    real_flock = fcntl.flock
    busy = [2]

    def flock(fd: int, operation: int) -> None:
        if operation & fcntl.LOCK_EX and busy[0]:
            busy[0] -= 1
            raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")
        real_flock(fd, operation)

    monkeypatch.setattr("relay.spool.fcntl.flock", flock)
    spool = Spool(tmp_path)
    spool.open()
    monkeypatch.undo()
    assert busy == [0]
    assert spool.daemon_pid() == os.getpid()
    spool.close()


def test_a_lock_held_by_something_else_is_reported_without_a_pid(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open(lock=False)
    (tmp_path / "lock").write_bytes(b"")
    with (tmp_path / "lock").open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SpoolLocked, match="pid unknown") as raised:
            spool.open()
        assert raised.value.pid is None
        assert spool.daemon_pid() is None  # held, but no pid to tell


HOLDER = """
import sys
from relay.spool import Spool
spool = Spool(sys.argv[1])
spool.open()
print("ready", flush=True)
sys.stdin.read()
spool.close()
print("closed", flush=True)
"""


def read_line(stream: IO[bytes], timeout: float = WAIT) -> bytes:
    """One line from a child's pipe, or fail after ``timeout`` seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "the child process did not answer in time"
    return stream.readline()


def start_child(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )


@pytest.mark.parametrize("ending", ["close", "kill -9"])
def test_lock_across_processes(tmp_path: Path, ending: str) -> None:
    child = start_child(HOLDER, str(tmp_path))
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        assert read_line(child.stdout) == b"ready\n"
        with pytest.raises(SpoolLocked, match=rf"pid {child.pid}\b") as raised:
            Spool(tmp_path).open()
        assert raised.value.pid == child.pid
        assert Spool(tmp_path).daemon_pid() == child.pid
        if ending == "close":
            child.stdin.close()
            assert read_line(child.stdout) == b"closed\n"
        else:
            child.kill()
        assert child.wait(timeout=WAIT) == (0 if ending == "close" else -9)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=WAIT)
        child.stdin.close()
        child.stdout.close()

    assert Spool(tmp_path).daemon_pid() is None  # a dead daemon's pid is not reported
    spool = Spool(tmp_path)
    spool.open()
    assert spool.daemon_pid() == os.getpid()
    spool.close()


# -- 5. injected faults --------------------------------------------------------


class Fault:
    """Makes the ``step``-th call of ``os.<function>`` fail with ``code``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, function: str, code: int, step: int):
        self.hit = False
        self.calls = 0
        real = getattr(os, function)

        def failing(*args: Any) -> Any:
            self.calls += 1
            if self.calls - 1 == step:
                self.hit = True
                raise OSError(code, os.strerror(code))
            return real(*args)

        monkeypatch.setattr(f"relay.spool.os.{function}", failing)


FAULTS = [
    ("write", errno.ENOSPC),
    ("fsync", errno.EIO),
    ("write", errno.EIO),
    ("fsync", errno.ENOSPC),
]


def fault_sweep(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    function: str,
    code: int,
    operation: Callable[[Spool], object],
    check: Callable[[Spool], None],
    prepare: Callable[[Spool], None] = lambda s: None,
) -> int:
    """Fail ``operation`` at each call of ``os.<function>`` in turn; returns how many."""
    for step in range(50):
        spool = Spool(tmp_path / f"spool{step}")
        spool.open()
        prepare(spool)
        fault = Fault(monkeypatch, function, code, step)
        failure: SpoolError | None = None
        try:
            operation(spool)
        except SpoolError as exc:
            failure = exc
        finally:
            monkeypatch.undo()
        if failure is None:
            assert not fault.hit, "the fault was swallowed"
            spool.close()
            return step
        assert fault.hit
        assert failure.errno == code
        assert os.strerror(code) in str(failure)
        check(spool)
        spool.close()
    pytest.fail("the operation never finished")


@pytest.mark.parametrize(("function", "code"), FAULTS)
def test_put_fault_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, function: str, code: int
) -> None:
    new = make_entry("NEW001")
    kept: list[Entry] = []

    def check(spool: Spool) -> None:
        assert names(spool, QUEUE) == entry_files(["OLD0000", "OLD0001"])
        assert names(spool, TMP) == set()
        assert spool.find("NEW001") is None
        assert_intact(spool, [make_entry("OLD0000"), make_entry("OLD0001")])
        spool = reopen(spool)
        assert [e.id for e in spool.entries()] == ["OLD0000", "OLD0001"]
        spool.put(new, MESSAGE)  # the fault is gone: it works again
        assert spool.load("NEW001") == new
        assert spool.message("NEW001") == MESSAGE

    steps = fault_sweep(
        tmp_path,
        monkeypatch,
        function,
        code,
        lambda s: s.put(new, MESSAGE),
        check,
        lambda s: kept.extend(put_some(s, 2)),
    )
    assert steps == (2 if function == "write" else 3)


@pytest.mark.parametrize("how", ["update", "modify"])
@pytest.mark.parametrize(("function", "code"), FAULTS)
def test_update_fault_keeps_a_whole_envelope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, function: str, code: int, how: str
) -> None:
    old = make_entry("UPD001")
    new = progressed(old)

    def operation(spool: Spool) -> None:
        if how == "update":
            spool.update(new)
        else:
            spool.modify("UPD001", progressed)

    def check(spool: Spool) -> None:
        # Failing at the directory's fsync, the new envelope is in place but
        # maybe not durable: either envelope is whole, the message intact.
        assert spool.load("UPD001") in (old, new)
        assert names(spool, QUEUE) == entry_files(["UPD001"])
        assert names(spool, TMP) == set()
        assert spool.message("UPD001") == MESSAGE
        spool.update(new)
        assert spool.load("UPD001") == new

    fault_sweep(
        tmp_path, monkeypatch, function, code, operation, check, lambda s: s.put(old, MESSAGE)
    )


@pytest.mark.parametrize(("function", "code"), FAULTS)
def test_move_fault_keeps_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, function: str, code: int
) -> None:
    old = make_entry("MOV001")
    new = progressed(old)

    def check(spool: Spool) -> None:
        assert names(spool, TMP) == set()
        assert spool.find("MOV001") is not None
        spool = reopen(spool)
        area = only_in(spool, "MOV001")
        assert spool.message("MOV001", area) == MESSAGE
        assert list(spool.entries(area)) == [old if area == QUEUE else new]
        spool.move(spool.load("MOV001", area), area, DEAD if area == QUEUE else QUEUE)

    fault_sweep(
        tmp_path,
        monkeypatch,
        function,
        code,
        lambda s: s.move(new, QUEUE, DEAD),
        check,
        lambda s: s.put(old, MESSAGE),
    )


def test_remove_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def check(spool: Spool) -> None:
        assert list(spool.entries()) == []  # the envelope went first: not half there
        spool.remove("DEL001")
        assert names(spool, QUEUE) == set()

    fault_sweep(
        tmp_path,
        monkeypatch,
        "fsync",
        errno.EIO,
        lambda s: s.remove("DEL001"),
        check,
        lambda s: s.put(make_entry("DEL001"), MESSAGE),
    )


# -- 6. a full disk, for real ------------------------------------------------------

DISKFULL_SCRIPT = r"""
import dataclasses, errno, json, os, sys
from relay.errors import SpoolError
from relay.spool import Batch, Entry, Spool

root = os.path.join(sys.argv[1], "spool")

def entry(n):
    return Entry(id=f"F{n:07d}", received=1.5, client="192.0.2.1", sender="s@example.com",
                 source="s@example.com", recipients=("r@example.com",),
                 batches=(Batch(recipients=("r@example.com",)),))

def message(n, size):
    return (f"Subject: {n}\r\n\r\n".encode() + bytes(range(256)) * (size // 256 + 1))[:size]

spool = Spool(root)
spool.open()
committed, failures, n = {}, [], 0
for size in (65536, 16384, 4096, 1024, 64):
    for _ in range(2000):
        try:
            spool.put(entry(n), message(n, size))
        except SpoolError as exc:
            failures.append({"size": size, "errno": exc.errno, "text": str(exc)})
            n += 1
            break
        committed[entry(n).id] = (n, size)
        n += 1
free_full = spool.free_bytes()
# Take the last few pages too (a file beside the spool), so nothing at all is free.
with open(os.path.join(sys.argv[1], "filler"), "wb", buffering=0) as filler:
    for _ in range(4096):
        try:
            filler.write(b"x" * 256)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            break
free_zero = spool.free_bytes()
try:
    spool.put(entry(n), b"")
    last_put = None
except SpoolError as exc:
    last_put = exc.errno
statvfs = os.statvfs(root)

def damaged(s):
    listed = {e.id: e for e in s.entries()}
    bad = sorted(set(listed) ^ set(committed))
    for i, (k, size) in committed.items():
        if listed.get(i) != entry(k) or s.message(i) != message(k, size):
            bad.append(i)
    return bad

first = next(iter(committed))
try:
    spool.update(dataclasses.replace(entry(committed[first][0]), attempts=1))
    update = None
    committed_first = dataclasses.replace(entry(committed[first][0]), attempts=1)
except SpoolError as exc:
    update = exc.errno
    committed_first = entry(committed[first][0])
after_update = spool.load(first) == committed_first
result = {
    "committed": len(committed),
    "failures": failures,
    "free_full": free_full,
    "free_zero": free_zero,
    "last_put_errno": last_put,
    "statvfs_free": statvfs.f_bavail * statvfs.f_frsize,
    "queue": sorted(os.listdir(spool.dir("queue"))),
    "tmp": os.listdir(spool.dir("tmp")),
    "damaged": damaged(spool),
    "update_errno": update,
    "update_whole": after_update,
}
if update is None:
    spool.update(entry(committed[first][0]))
spool.close()
again = Spool(root)  # a restart on the full disk
again.open()
with open(os.path.join(root, "lock")) as lock:
    result["lock_pid"] = lock.read() == f"{os.getpid()}\n"
result["damaged_after_restart"] = damaged(again)
result["quarantine"] = os.listdir(again.dir("quarantine"))
for i in list(committed)[:3]:
    again.remove(i)
    del committed[i]
result["free_after_delete"] = again.free_bytes()
try:
    again.put(entry(10**6), message(10**6, 65536))
    committed[entry(10**6).id] = (10**6, 65536)
    result["put_after_delete"] = None
except SpoolError as exc:
    result["put_after_delete"] = str(exc)
result["damaged_at_end"] = damaged(again)
result["expected_queue"] = sorted(f"{i}.{s}" for i in committed for s in ("eml", "json"))
result["queue_at_end"] = sorted(os.listdir(again.dir("queue")))
again.close()
print(json.dumps(result))
"""


def test_disk_full_for_real(tmp_path: Path) -> None:
    reason = diskfull.unavailable()
    if reason is not None:
        pytest.skip(reason)
    result = diskfull.run(DISKFULL_SCRIPT, tmp_path, size="1m")

    assert result["committed"] >= 10
    assert len(result["failures"]) == 5  # every size ran until the disk was full
    for failure in result["failures"]:
        assert failure["errno"] == errno.ENOSPC, failure
        assert "No space left on device" in failure["text"]
    assert result["free_full"] == result["statvfs_free"]
    assert result["free_full"] < 16 * 1024  # a few pages at most
    assert result["free_zero"] == 0
    assert result["last_put_errno"] == errno.ENOSPC
    assert result["tmp"] == []
    expected = sorted(
        f"F{n:07d}.{s}" for n in range(200) for s in ("eml", "json")
        if f"F{n:07d}.json" in result["queue"]
    )  # fmt: skip
    assert result["queue"] == expected  # only whole entries, in pairs
    assert len(result["queue"]) == 2 * result["committed"]
    assert result["damaged"] == []
    assert result["update_errno"] == errno.ENOSPC
    assert result["update_whole"]
    assert result["lock_pid"]  # restarting on the full disk works and records the pid
    assert result["damaged_after_restart"] == []
    assert result["quarantine"] == []
    assert result["free_after_delete"] > 3 * 65536
    assert result["put_after_delete"] is None
    assert result["damaged_at_end"] == []
    assert result["queue_at_end"] == result["expected_queue"]


# -- 7. free_bytes, find, remove, and the other small promises -------------------


def test_free_bytes_is_the_file_systems_free_space(spool: Spool) -> None:
    free = spool.free_bytes()
    usage = shutil.disk_usage(spool.path)
    assert 0 < free <= usage.total
    assert abs(free - usage.free) < 256 * 1024 * 1024  # others write to this disk too


def test_free_bytes_of_a_missing_spool(tmp_path: Path) -> None:
    with pytest.raises(SpoolError):
        Spool(tmp_path / "missing").free_bytes()


def test_census_counts_each_area_and_dates_the_oldest_queued(spool: Spool) -> None:
    assert spool.census() == Census(queued=0, dead=0, oldest_arrival=None)
    older, newer = f"{1_700_000_000_250_000:014X}000001", f"{1_700_000_100_000_000:014X}000002"
    for entry_id in (newer, "HANDMADE1", older, "DEAD01", "DEAD02"):
        spool.put(make_entry(entry_id), message_of(entry_id))
    for entry_id in ("DEAD01", "DEAD02"):
        spool.move(spool.load(entry_id), QUEUE, DEAD)
    write_raw(spool.dir(QUEUE) / "UNCOMMITTED1.eml", MESSAGE)  # no envelope: not counted
    write_raw(spool.dir(QUEUE) / "notes.txt", b"left by a person")
    assert spool.census() == Census(queued=3, dead=2, oldest_arrival=1_700_000_000.25)


def test_census_of_a_queue_of_ids_not_made_here(spool: Spool) -> None:
    put_some(spool, 2)
    assert spool.census() == Census(queued=2, dead=0, oldest_arrival=None)


def test_census_of_a_spool_it_cannot_list(tmp_path: Path) -> None:
    assert Spool(tmp_path / "missing").census() == Census(queued=0, dead=0, oldest_arrival=None)


def test_message_size(spool: Spool) -> None:
    spool.put(make_entry("SIZE01"), MESSAGE)
    assert spool.message_size("SIZE01") == len(MESSAGE)
    assert spool.message_size("SIZE01", DEAD) is None
    assert spool.message_size("NOPE01") is None
    assert spool.message_size("../queue/SIZE01") is None


def test_find_across_areas(spool: Spool) -> None:
    entry = make_entry("FIND01")
    assert spool.find("FIND01") is None
    spool.put(entry, MESSAGE)
    assert spool.find("FIND01") == QUEUE
    spool.move(entry, QUEUE, DEAD)
    assert spool.find("FIND01") == DEAD
    assert spool.message("FIND01", DEAD) == MESSAGE
    spool.move(entry, DEAD, QUEUE)
    assert spool.find("FIND01") == QUEUE
    write_raw(spool.dir(DEAD) / "FIND02.eml", MESSAGE)  # a message alone is not an entry
    assert spool.find("FIND02") is None
    for bad in ("", "find01", "../queue/FIND01", "FIND01.json", "X" * 33):
        assert spool.find(bad) is None
    spool.remove("FIND01")
    assert spool.find("FIND01") is None


def test_remove_is_idempotent(spool: Spool, tmp_path: Path) -> None:
    kept = put_some(spool, 1)
    spool.put(make_entry("DEL001"), MESSAGE)
    spool.remove("DEL001")
    spool.remove("DEL001")
    spool.remove("NEVER1")
    spool.remove("NEVER1", DEAD)
    assert names(spool, QUEUE) == entry_files(["OLD0000"])
    assert_intact(spool, kept)

    write_raw(spool.dir(QUEUE) / "HALF01.json", make_entry("HALF01").to_json())  # no message
    write_raw(spool.dir(QUEUE) / "HALF02.eml", MESSAGE)  # no envelope
    spool.remove("HALF01")
    spool.remove("HALF02")
    assert names(spool, QUEUE) == entry_files(["OLD0000"])

    outside = tmp_path / "spool" / "x.json"
    write_raw(outside, b"keep")
    spool.remove("../x")  # not an id: names nothing
    assert outside.read_bytes() == b"keep"


def test_update_never_brings_back_a_removed_entry(spool: Spool) -> None:
    entry = make_entry("GONE01")
    spool.put(entry, MESSAGE)
    spool.remove("GONE01")  # an operator's "queue delete" while a delivery was under way
    with pytest.raises(NoSuchEntry):
        spool.update(progressed(entry))
    with pytest.raises(NoSuchEntry):
        spool.modify("GONE01", progressed)
    with pytest.raises(NoSuchEntry):
        spool.move(entry, QUEUE, DEAD)
    for area in (QUEUE, DEAD, TMP, QUARANTINE):
        assert names(spool, area) == set()


def test_update_of_an_entry_in_another_area(spool: Spool) -> None:
    entry = make_entry("AREA01")
    spool.put(entry, MESSAGE)
    spool.move(entry, QUEUE, DEAD)
    with pytest.raises(NoSuchEntry):
        spool.update(progressed(entry))  # the queue/ one is gone
    spool.update(progressed(entry), DEAD)
    assert spool.load("AREA01", DEAD) == progressed(entry)
    assert names(spool, QUEUE) == set()


def test_areas_are_checked(spool: Spool) -> None:
    entry = make_entry("AREA02")
    spool.put(entry, MESSAGE)
    for call in (
        lambda: spool.load("AREA02", "../queue"),
        lambda: spool.update(entry, TMP),
        lambda: spool.remove("AREA02", QUARANTINE),
        lambda: spool.move(entry, QUEUE, QUEUE),
        lambda: list(spool.entries(TMP)),
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - a programming error, any ValueError
            call()
    assert spool.load("AREA02") == entry


def test_modify_sees_the_latest_envelope(spool: Spool) -> None:
    entry = make_entry("MOD001")
    spool.put(entry, MESSAGE)
    spool.update(replace(entry, next_attempt=0.0, attempts=3))  # e.g. "queue retry"
    result = spool.modify("MOD001", lambda e: e.with_batch(0, replace(e.batches[0], state="sent")))
    assert result.attempts == 3
    assert spool.load("MOD001") == result
    with pytest.raises(ValueError, match="changed the id"):
        spool.modify("MOD001", lambda e: replace(e, id="OTHER1"))
    assert spool.load("MOD001") == result


def test_open_clears_tmp_including_directories(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "deep" / "spool")
    spool.open()
    (spool.dir(TMP) / "sub" / "dir").mkdir(parents=True)
    write_raw(spool.dir(TMP) / "sub" / "dir" / "f", b"x")
    write_raw(spool.dir(TMP) / "ABC123.json.1.2", b"x")
    spool = reopen(spool)
    assert names(spool, TMP) == set()
    spool.close()


# -- concurrent writers ----------------------------------------------------------


def appending(line: str) -> Callable[[Entry], Entry]:
    return lambda entry: replace(entry, history=(*entry.history, line))


def test_concurrent_modifies_from_threads_lose_nothing(spool: Spool) -> None:
    spool.put(make_entry("CONC01"), MESSAGE)
    failures: list[BaseException] = []

    def worker(tag: str) -> None:
        try:
            for n in range(25):
                spool.modify("CONC01", appending(f"{tag}{n}"))
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(tag,)) for tag in "abcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    history = spool.load("CONC01").history
    assert sorted(history) == sorted(f"{t}{n}" for t in "abcd" for n in range(25))
    for tag in "abcd":
        assert [h for h in history if h[0] == tag] == [f"{tag}{n}" for n in range(25)]
    assert names(spool, TMP) == set()
    assert spool.message("CONC01") == MESSAGE


MODIFIER = """
import sys
from dataclasses import replace
from relay.spool import Spool
spool = Spool(sys.argv[1])
spool.open(lock=False)
tag, count = sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
for n in range(count):
    spool.modify("CONC02", lambda e: replace(e, history=(*e.history, f"{tag}{n}")))
print("done", flush=True)
"""


def test_concurrent_modifies_from_processes_lose_nothing(spool: Spool) -> None:
    """The daemon and the queue command changing one entry at once."""
    spool.put(make_entry("CONC02"), MESSAGE)
    children = [start_child(MODIFIER, str(spool.path), tag, "40") for tag in "xy"]
    try:
        for child in children:
            assert child.stdout is not None
            assert read_line(child.stdout) == b"ready\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            child.stdin.close()
        for n in range(40):  # and this process too, meanwhile
            spool.modify("CONC02", appending(f"z{n}"))
        for child in children:
            assert child.stdout is not None
            assert read_line(child.stdout) == b"done\n"
            assert child.wait(timeout=WAIT) == 0
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=WAIT)
            assert child.stdin is not None
            assert child.stdout is not None
            child.stdin.close()
            child.stdout.close()
    history = spool.load("CONC02").history
    assert sorted(history) == sorted(f"{t}{n}" for t in "xyz" for n in range(40))
    assert names(spool, TMP) == set()


# -- 8. group commit: entries written together share the fsync of queue/ ----------


@contextlib.contextmanager
def held_puts(
    spool: Spool, gate: DirSyncGate, count: int
) -> Iterator[tuple[Future[None], list[Future[None]]]]:
    """A first put held in its fsync of ``queue/``, and ``count`` more, each
    in its own thread, whose files are written and renamed meanwhile: they
    all wait for the next fsync (none of them has returned)."""
    gate.hold = True
    with ThreadPoolExecutor(max_workers=count + 1) as threads:
        first = threads.submit(spool.put, make_entry("FIRST1"), message_of("FIRST1"))
        assert gate.entered.wait(WAIT)
        later = [
            threads.submit(spool.put, e, message_of(e.id))
            for e in (make_entry(f"LATER{n}") for n in range(count))
        ]
        deadline = time.monotonic() + WAIT
        while spool.waiting_for_sync() < count:
            assert time.monotonic() < deadline, "the puts never waited for the fsync"
            assert not any(f.done() for f in later), [f.exception() for f in later if f.done()]
            time.sleep(0.001)
        assert gate.calls == 1
        assert not any(f.done() for f in (first, *later))
        yield first, later


def test_puts_made_during_an_fsync_share_the_next_one(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = DirSyncGate(monkeypatch, spool.dir(QUEUE))
    with held_puts(spool, gate, 8) as (first, later):
        gate.release()
        for put in (first, *later):
            assert put.result(WAIT) is None
    assert gate.calls == 2  # nine puts: the first's fsync, and one for the eight after it
    ids = ["FIRST1", *(f"LATER{n}" for n in range(8))]
    assert gate.log[0] == ("synced", "FIRST1")  # the held fsync covered the first put only
    assert sorted(gate.log[1:]) == [("synced", i) for i in sorted(ids)]
    assert_intact(spool, [make_entry(i) for i in ids])
    assert names(spool, QUEUE) == entry_files(ids)
    assert spool.remove_many(ids) == [None] * 9
    assert gate.calls == 3
    assert names(spool, QUEUE) == names(spool, TMP) == set()


def test_a_failed_fsync_fails_every_put_it_covered_and_the_next_put_recovers(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = put_some(spool, 2)
    gate = DirSyncGate(monkeypatch, spool.dir(QUEUE))
    with held_puts(spool, gate, 5) as (first, later):
        gate.release(fail=errno.EIO)
        for put in (first, *later):
            error = put.exception(WAIT)
            assert isinstance(error, SpoolError), error
            assert error.errno == errno.EIO
            assert os.strerror(errno.EIO) in str(error)
    assert gate.log == []
    assert names(spool, QUEUE) == entry_files([e.id for e in kept])  # none half-visible
    assert names(spool, TMP) == set()
    gate.fail = None
    spool = reopen(spool)
    assert list(spool.entries()) == kept
    spool.put(make_entry("AFTER1"), MESSAGE)
    assert spool.load("AFTER1") == make_entry("AFTER1")
    assert spool.message("AFTER1") == MESSAGE


def test_list_management_options_survive_the_spool(spool: Spool) -> None:
    ses = SesParameters(contact_list="Newsletter", topic="Sports")
    spool.put(make_entry("LIST01", ses=ses), MESSAGE)
    [entry] = spool.entries()
    assert entry.ses == ses


# -- stage and commit: entries written on the event loop, made durable together


def test_entries_committed_together_share_one_fsync_of_the_queue(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = DirSyncGate(monkeypatch, spool.dir(QUEUE))
    staged = [spool.stage(make_entry(f"ABC10{n}"), f"message {n}\r\n".encode()) for n in range(3)]
    assert sorted(os.listdir(spool.dir(QUEUE))) == []  # nothing visible before the commit
    assert spool.commit(staged) == [None, None, None]
    assert gate.calls == 1
    assert sorted(entry_id for _, entry_id in gate.log) == ["ABC100", "ABC101", "ABC102"]
    assert [spool.message(f"ABC10{n}") for n in range(3)] == [
        f"message {n}\r\n".encode() for n in range(3)
    ]
    assert os.listdir(spool.dir(TMP)) == []


def test_a_staged_entry_that_cannot_be_committed_fails_alone(spool: Spool) -> None:
    good, bad = (
        spool.stage(make_entry("C00D01"), b"kept\r\n"),
        spool.stage(make_entry("BAD001"), b"x"),
    )
    bad.json_tmp.unlink()  # its envelope is gone: the rename into queue/ fails
    outcomes = spool.commit([good, bad])
    assert outcomes[0] is None
    assert isinstance(outcomes[1], SpoolError)
    assert "cannot write spool entry BAD001" in str(outcomes[1])
    assert sorted(os.listdir(spool.dir(QUEUE))) == ["C00D01.eml", "C00D01.json"]
    assert os.listdir(spool.dir(TMP)) == []


def test_a_failed_fsync_of_the_queue_fails_every_entry_it_covered(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = DirSyncGate(monkeypatch, spool.dir(QUEUE))
    gate.fail = errno.EIO
    staged = [spool.stage(make_entry(f"E10{n}00"), b"lost\r\n") for n in range(2)]
    outcomes = spool.commit(staged)
    assert [type(outcome) for outcome in outcomes] == [SpoolError, SpoolError]
    assert sorted(os.listdir(spool.dir(QUEUE))) == []
    assert os.listdir(spool.dir(TMP)) == []


def test_unlink_now_leaves_an_entry_whose_lock_is_held(spool: Spool) -> None:
    spool.put(make_entry("AB0001"), b"held\r\n")
    spool.put(make_entry("AB0002"), b"free\r\n")
    holder = os.open(spool.dir(QUEUE) / "AB0001.eml", os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert spool.unlink_now("AB0001") is False  # an operator's command holds it
        assert spool.unlink_now("AB0002") is True
        assert spool.sync_queue(["AB0002"]) == [None]
        assert sorted(os.listdir(spool.dir(QUEUE))) == ["AB0001.eml", "AB0001.json"]
    finally:
        os.close(holder)
    assert spool.remove_many(["AB0001"]) == [None]
    assert os.listdir(spool.dir(QUEUE)) == []
