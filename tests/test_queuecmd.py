"""``ses-relay queue``: the real command line on a real spool, and once with
the daemon running (``python -m relay serve``) against the fake SES."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from io import StringIO
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay import queuecmd
from relay.errors import SmtpReply
from relay.ses.sender import SesParameters
from relay.spool import DEAD, QUEUE, Batch, BatchError, Entry, Spool
from tests.daemon import clean_env
from tests.daemon import queue_command as run
from tests.fakeses import FakeSes, SesErrorReply
from tests.relayd import ses_env, write_config

ARRIVAL = 1_795_435_200.0  # 2026-11-23 12:00:00 UTC
LATER = 4_102_444_800.0  # 2100-01-01 00:00:00 UTC: never "now" in a test
QUEUED_ID = "0005F1AAAAAAAAAA000001"
DEAD_ID = "0005F1AAAAAAAAAA000002"
OTHER_ID = "0005F1AAAAAAAAAA000003"
INLINE_ID = "0005F1AAAAAAAAAA000004"
MOVED_ID = "0005F1AAAAAAAAAA000005"
DONE_ID = "0005F1AAAAAAAAAA000006"
UNKNOWN_ID = "0005F1FFFFFFFFFF000009"
MESSAGE = (
    b"From: App <app@example.com>\r\nTo: bob@example.net\r\n"
    b"Subject: hi \x1b]0;owned\x07 there\r\nMessage-ID: <m1@example.com>\r\n"
    b"\r\nHello from a legacy app.\r\nSecond line.\r\n"
)
UNVERIFIED = "Email address is not verified."
WAIT = 20.0
"""Seconds any wait on the daemon or the fake SES may take."""


# -- a spool and the command line


@dataclass
class Setup:
    config: Path
    spool: Spool


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    config = write_config(tmp_path / "relay.toml", {"spool": {"path": str(tmp_path / "spool")}})
    used = Spool(tmp_path / "spool")
    used.open()  # as a daemon that ran and stopped: its lock file stays
    used.close()
    spool = Spool(tmp_path / "spool")
    spool.open(lock=False)
    yield Setup(config, spool)
    spool.close()


def queued_entry(entry_id: str = QUEUED_ID, **changes: Any) -> Entry:
    entry = Entry(
        id=entry_id,
        received=ARRIVAL,
        client="192.0.2.7",
        sender="app@example.com",
        source="app@example.com",
        recipients=("bob@example.net", "carol@example.org", "dan@example.org"),
        batches=(
            Batch(("bob@example.net",), "sent", "0100-sent-1"),
            Batch(
                ("carol@example.org", "dan@example.org"),
                "pending",
                None,
                BatchError(SmtpReply(451, "4.3.0", "SES is unavailable: down")),
            ),
        ),
        ses=SesParameters(configuration_set="transactional", tags=(("team", "ops"),)),
        attempts=2,
        next_attempt=LATER,
        history=("2026-11-23T12:00:05Z ServiceUnavailable: down",),
    )
    return replace(entry, **changes)


def dead_entry(entry_id: str = DEAD_ID, **changes: Any) -> Entry:
    entry = Entry(
        id=entry_id,
        received=ARRIVAL - 3600,
        client="192.0.2.8",
        user="billing",
        sender="",
        source="billing@example.com",
        recipients=("eve@example.net", "frank@example.net"),
        batches=(
            Batch(("eve@example.net",), "sent", "0100-sent-2"),
            Batch(
                ("frank@example.net",),
                "failed",
                None,
                BatchError(SmtpReply(554, "5.7.1", f"message rejected by SES: {UNVERIFIED}")),
            ),
        ),
        attempts=1,
        next_attempt=ARRIVAL - 3500,
    )
    return replace(entry, **changes)


def put(spool: Spool, entry: Entry, area: str = QUEUE, message: bytes = MESSAGE) -> None:
    spool.put(entry, message)
    if area == DEAD:
        spool.move(entry, QUEUE, DEAD)


def put_both(spool: Spool) -> None:
    put(spool, queued_entry())
    put(spool, dead_entry(), DEAD, b"Subject: refused\r\n\r\nbody\r\n")


# -- list


def test_empty_spool(setup: Setup) -> None:
    path = setup.spool.path
    assert run(setup.config, "list") == (0, f"Mail queue is empty (spool {path})\n", "")
    code, out, err = run(setup.config, "list", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"spool": str(path), "messages": [], "queued": 0, "dead": 0}


def test_list_shows_queued_and_dead_messages_like_mailq(setup: Setup) -> None:
    put_both(setup.spool)
    code, out, err = run(setup.config, "list")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "Queue ID                Area   Size  Arrival (UTC)        Batches p/s/f  "
        "Next attempt (UTC)   Sender",
        f"{QUEUED_ID}  queue   {len(MESSAGE)}  2026-11-23 12:00:00  1/1/0          "
        "2100-01-01 00:00:00  <app@example.com>",
        "    (451 4.3.0 SES is unavailable: down)",
        "      carol@example.org",
        "      dan@example.org",
        "",
        f"{DEAD_ID}  dead     26  2026-11-23 11:00:00  0/1/1          -                    <>",
        "    (554 5.7.1 message rejected by SES: Email address is not verified.)",
        "      frank@example.net",
        "",
        f"1 message in queue, 1 dead (spool {setup.spool.path})",
    ]


def test_list_shows_the_messages_being_tried_inline(setup: Setup) -> None:
    """A message committed to the journal while the daemon tries SES at once
    is listed (area ``inline``); one whose done record is written, or that
    was moved into the queue, is not listed twice."""
    put_both(setup.spool)
    inline = replace(queued_entry(), id=INLINE_ID, next_attempt=0.0, attempts=0)
    moved = replace(inline, id=MOVED_ID)
    journal = setup.spool.journal
    puts = [
        setup.spool.journal_put(e, MESSAGE) for e in (inline, moved, replace(inline, id=DONE_ID))
    ]
    assert journal.append(puts) == [None] * 3
    journal.done(DONE_ID)
    setup.spool.put(moved, MESSAGE)  # moved into the queue, its done record not written yet
    code, out, err = run(setup.config, "list")
    assert (code, err) == (0, "")
    rows = [line.split()[:3] for line in out.splitlines() if line[:1].isalnum()]
    assert rows == [
        ["Queue", "ID", "Area"],
        [QUEUED_ID, "queue", str(len(MESSAGE))],
        [MOVED_ID, "queue", str(len(MESSAGE))],
        [INLINE_ID, "inline", str(len(MESSAGE))],
        [DEAD_ID, "dead", "26"],
        ["3", "messages", "in"],
    ]
    code, out, err = run(setup.config, "list", "--json")
    listed = json.loads(out)
    assert [(m["id"], m["area"]) for m in listed["messages"]] == [
        (QUEUED_ID, "queue"),
        (MOVED_ID, "queue"),
        (INLINE_ID, "inline"),
        (DEAD_ID, "dead"),
    ]
    assert (listed["queued"], listed["dead"]) == (3, 1)


def test_list_shows_the_last_attempt_when_no_batch_has_an_error(setup: Setup) -> None:
    recipients = ("bob@example.net",)
    put(
        setup.spool,
        queued_entry(
            recipients=recipients,
            batches=(Batch(recipients),),
            next_attempt=0.0,
            history=("2026-11-23T12:00:05Z no answer in time",),
        ),
    )
    code, out, _ = run(setup.config, "list")
    assert code == 0
    lines = out.splitlines()
    assert re.fullmatch(rf"{QUEUED_ID}  queue .* 1/0/0 +now +<app@example.com>", lines[1])
    assert lines[2:5] == [
        "    (2026-11-23T12:00:05Z no answer in time)",
        "      bob@example.net",
        "",
    ]
    assert lines[-1] == f"1 message in queue, 0 dead (spool {setup.spool.path})"


def test_list_survives_absurd_times_in_a_hand_edited_envelope(setup: Setup) -> None:
    put(setup.spool, queued_entry(received=1e300, next_attempt=1e300))
    code, out, err = run(setup.config, "list")
    assert (code, err) == (0, "")
    assert "@1e+300" in out.splitlines()[1]


def test_list_json_holds_every_envelope_field(setup: Setup) -> None:
    put_both(setup.spool)
    code, out, err = run(setup.config, "list", "--json")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert (document["queued"], document["dead"]) == (1, 1)
    queued, dead = document["messages"]
    assert queued == {
        "id": QUEUED_ID,
        "area": "queue",
        "size": len(MESSAGE),
        "received": ARRIVAL,
        "client": "192.0.2.7",
        "user": None,
        "sender": "app@example.com",
        "source": "app@example.com",
        "recipients": ["bob@example.net", "carol@example.org", "dan@example.org"],
        "ses": {"configuration_set": "transactional", "tags": [["team", "ops"]]},
        "batches": [
            {
                "recipients": ["bob@example.net"],
                "state": "sent",
                "message_id": "0100-sent-1",
                "error": None,
            },
            {
                "recipients": ["carol@example.org", "dan@example.org"],
                "state": "pending",
                "message_id": None,
                "error": "451 4.3.0 SES is unavailable: down",
            },
        ],
        "attempts": 2,
        "next_attempt": LATER,
        "history": ["2026-11-23T12:00:05Z ServiceUnavailable: down"],
        "bounce": None,
        "bounce_of": None,
        "last_error": "451 4.3.0 SES is unavailable: down",
    }
    assert (dead["id"], dead["area"], dead["user"], dead["sender"]) == (
        DEAD_ID,
        "dead",
        "billing",
        "",
    )
    assert [b["state"] for b in dead["batches"]] == ["sent", "failed"]


def test_list_skips_a_garbled_entry_and_quarantines_it(setup: Setup) -> None:
    put(setup.spool, queued_entry())
    garbled = setup.spool.dir(QUEUE) / f"{OTHER_ID}.json"
    (setup.spool.dir(QUEUE) / f"{OTHER_ID}.eml").write_bytes(MESSAGE)
    garbled.write_text('{"version": 1, "id": ')
    code, out, err = run(setup.config, "list")
    assert code == 0
    assert out.splitlines()[-1] == f"1 message in queue, 0 dead (spool {setup.spool.path})"
    assert OTHER_ID in err
    assert "quarantined" in err
    assert (setup.spool.dir("quarantine") / f"{OTHER_ID}.json").exists()


# -- show


def test_show_retry_and_delete_a_message_being_tried_inline(setup: Setup) -> None:
    """A message in the journal (area ``inline``) is shown like a queued one;
    ``retry`` says it is being sent and changes nothing; ``delete`` refuses
    it, naming why, and the message stays listed."""
    inline = replace(queued_entry(), id=INLINE_ID, next_attempt=0.0, attempts=0, history=())
    assert setup.spool.journal.append([setup.spool.journal_put(inline, MESSAGE)]) == [None]
    code, out, err = run(setup.config, "show", "--body", INLINE_ID.lower())
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:4] == [
        f"Queue ID:     {INLINE_ID}",
        "Area:         inline (in the journal: the daemon is sending it now; "
        "a daemon that is not running moves it into the queue when it starts)",
        f"Size:         {len(MESSAGE)} bytes",
        "Arrival:      2026-11-23 12:00:00 UTC",
    ]
    assert "Next attempt: now (inline)" in lines
    assert lines[-2:] == ["Hello from a legacy app.", "Second line."]
    code, out, err = run(setup.config, "show", "--json", INLINE_ID)
    assert (code, err) == (0, "")
    assert (json.loads(out)["id"], json.loads(out)["area"]) == (INLINE_ID, "inline")

    being_sent = (
        f"{INLINE_ID}: in the journal: the daemon is sending it now; "
        "a daemon that is not running moves it into the queue when it starts"
    )
    code, out, err = run(setup.config, "retry", INLINE_ID)
    assert (code, out, err) == (0, f"{being_sent}; nothing to retry\n", "")
    code, out, err = run(setup.config, "delete", INLINE_ID)
    assert (code, out) == (1, "")
    assert err == f"ses-relay: queue: {being_sent}; it cannot be deleted from the journal\n"
    code, out, err = run(setup.config, "list", "--json")
    assert [(m["id"], m["area"]) for m in json.loads(out)["messages"]] == [(INLINE_ID, "inline")]


def test_show_prints_the_envelope_and_the_header_only(setup: Setup) -> None:
    put(setup.spool, queued_entry())
    code, out, err = run(setup.config, "show", QUEUED_ID.lower())
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"Queue ID:     {QUEUED_ID}",
        "Area:         queue (waiting for delivery)",
        f"Size:         {len(MESSAGE)} bytes",
        "Arrival:      2026-11-23 12:00:00 UTC",
        "Client:       192.0.2.7",
        "User:         -",
        "Sender:       <app@example.com>",
        "Source:       app@example.com",
        "Attempts:     2",
        "Next attempt: 2100-01-01 00:00:00 UTC",
        "Recipients:   3",
        "    bob@example.net",
        "    carol@example.org",
        "    dan@example.org",
        "SES parameters:",
        "    configuration_set: transactional",
        '    tags: [["team", "ops"]]',
        "Batch 1 of 2: sent (1 recipient)",
        "    bob@example.net",
        "    SES message id: 0100-sent-1",
        "Batch 2 of 2: pending (2 recipients)",
        "    carol@example.org",
        "    dan@example.org",
        "    error: 451 4.3.0 SES is unavailable: down",
        "History:",
        "    2026-11-23T12:00:05Z ServiceUnavailable: down",
        "",
        "Message header:",
        "From: App <app@example.com>",
        "To: bob@example.net",
        # a terminal escape sequence from the client is shown, not obeyed
        "Subject: hi \\x1b]0;owned\\x07 there",
        "Message-ID: <m1@example.com>",
    ]
    assert "Hello" not in out


def test_show_body_and_a_dead_entry(setup: Setup) -> None:
    put_both(setup.spool)
    code, out, err = run(setup.config, "show", "--body", DEAD_ID)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert "Area:         dead (given up on; 'ses-relay queue retry' sends it again)" in lines
    assert "User:         billing" in lines
    assert "Sender:       <>" in lines
    assert "Next attempt: - (dead)" in lines
    assert "History:      (none)" in lines
    assert lines[-4:] == ["Message:", "Subject: refused", "", "body"]
    code, out, _ = run(setup.config, "show", "--json", DEAD_ID)
    assert code == 0
    data = json.loads(out)
    assert (data["id"], data["area"], data["size"]) == (DEAD_ID, "dead", 26)
    assert data["last_error"].startswith("554 5.7.1")


LEGACY = Path(__file__).parent / "data" / "legacy-entry.json"
"""An envelope as the version before typed SES parameters wrote it."""
LEGACY_ID = "0005F1AAAAAAAAAA00000E"


def test_show_and_list_an_entry_written_by_the_previous_version(setup: Setup) -> None:
    shutil.copyfile(LEGACY, setup.spool.dir(QUEUE) / f"{LEGACY_ID}.json")
    (setup.spool.dir(QUEUE) / f"{LEGACY_ID}.eml").write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    identity = "arn:aws:ses:us-east-1:123456789012:identity"
    code, out, err = run(setup.config, "show", LEGACY_ID)
    assert (code, err) == (0, "")
    # What the previous version printed for it, line for line.
    assert out.splitlines()[11:] == [
        "    bob@example.net",
        "    carol@example.org",
        "    dan@example.org",
        "SES parameters:",
        "    configuration_set: transactional",
        '    tags: [["team", "ops"], ["app", "billing"]]',
        f"    source_arn: {identity}/example.com",
        f"    from_arn: {identity}/example.com",
        f"    return_path_arn: {identity}/bounces.example.com",
        "Batch 1 of 3: sent (1 recipient)",
        "    bob@example.net",
        "    SES message id: 0100-sent-1",
        "Batch 2 of 3: failed (1 recipient)",
        "    carol@example.org",
        f"    error: 554 5.7.1 message rejected by SES: {UNVERIFIED}",
        "Batch 3 of 3: pending (1 recipient)",
        "    dan@example.org",
        "    error: 451 4.4.5 SES sending rate exceeded, try again later",
        "History:",
        "    2026-11-23T12:00:05Z Throttling: Maximum sending rate exceeded.",
        "",
        "Message header:",
        "Subject: x",
    ]
    code, out, err = run(setup.config, "list", "--json")
    assert (code, err) == (0, "")
    [listed] = json.loads(out)["messages"]
    legacy = json.loads(LEGACY.read_bytes())
    assert (listed["ses"], listed["batches"]) == (legacy["ses"], legacy["batches"])
    assert listed["last_error"] == f"554 5.7.1 message rejected by SES: {UNVERIFIED}"


@pytest.mark.parametrize("entry_id", [UNKNOWN_ID, "../../etc/passwd", "x"])
def test_show_an_unknown_id_fails(setup: Setup, entry_id: str) -> None:
    put(setup.spool, queued_entry())
    code, out, err = run(setup.config, "show", entry_id)
    assert (code, out) == (1, "")
    assert err == (
        f"ses-relay: queue: {entry_id}: no such message in the queue or the dead-letter area\n"
    )


# -- retry without a daemon


def test_retry_a_queued_message_makes_it_due_now(setup: Setup) -> None:
    put_both(setup.spool)
    before = time.time()
    code, out, err = run(setup.config, "retry", QUEUED_ID)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{QUEUED_ID}: due now",
        "no ses-relay daemon is running on this spool: it will be tried when it starts",
    ]
    entry = setup.spool.load(QUEUED_ID, QUEUE)
    assert before <= entry.next_attempt <= time.time()
    assert entry == queued_entry(next_attempt=entry.next_attempt)  # nothing else changed
    assert setup.spool.find(DEAD_ID) == DEAD


def test_retry_a_dead_message_moves_it_back_to_the_queue(setup: Setup) -> None:
    put_both(setup.spool)
    before = time.time()
    code, out, err = run(setup.config, "retry", DEAD_ID)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"{DEAD_ID}: moved from the dead-letter area back to the queue"
    assert setup.spool.find(DEAD_ID) == QUEUE
    assert not list(setup.spool.dir(DEAD).iterdir())
    entry = setup.spool.load(DEAD_ID, QUEUE)
    now = time.time()
    assert before <= entry.received <= now  # delivery.max_age starts again
    assert entry.next_attempt == entry.received
    assert entry.attempts == 0
    sent, failed = dead_entry().batches
    assert entry.batches == (sent, replace(failed, state="pending", error=None))
    [note] = entry.history
    assert note.endswith(
        "moved back to the queue by 'ses-relay queue retry' (it had failed: "
        "554 5.7.1 message rejected by SES: Email address is not verified.)"
    )
    assert setup.spool.message(DEAD_ID, QUEUE) == b"Subject: refused\r\n\r\nbody\r\n"
    code, out, _ = run(setup.config, "list")
    assert out.splitlines()[-1] == f"2 messages in queue, 0 dead (spool {setup.spool.path})"


def test_show_names_a_bounce_and_what_it_reports_on(setup: Setup) -> None:
    put(setup.spool, dead_entry(sender="app@example.com", bounce=OTHER_ID), DEAD)
    put(setup.spool, queued_entry(OTHER_ID, sender="", bounce_of=DEAD_ID))
    _, out, _ = run(setup.config, "show", DEAD_ID)
    assert f"Bounce:       {OTHER_ID} (to the sender)" in out.splitlines()
    _, out, _ = run(setup.config, "show", OTHER_ID)
    assert f"Bounce of:    {DEAD_ID}" in out.splitlines()


def test_retry_of_a_dead_message_forgets_its_old_bounce(setup: Setup) -> None:
    put(setup.spool, dead_entry(sender="app@example.com", bounce=OTHER_ID), DEAD)
    code, _, err = run(setup.config, "retry", DEAD_ID)
    assert (code, err) == (0, "")
    entry = setup.spool.load(DEAD_ID, QUEUE)
    assert entry.bounce is None  # a new failure is reported by a new bounce
    assert entry.sender == "app@example.com"


def test_retry_all_and_by_area(setup: Setup) -> None:
    put_both(setup.spool)
    put(setup.spool, dead_entry(OTHER_ID), DEAD)
    code, out, err = run(setup.config, "retry", "--all", "--area", "dead")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{DEAD_ID}: moved from the dead-letter area back to the queue",
        f"{OTHER_ID}: moved from the dead-letter area back to the queue",
        "no ses-relay daemon is running on this spool: they will be tried when it starts",
    ]
    assert setup.spool.load(QUEUED_ID).next_attempt == LATER  # --area dead left it alone
    code, out, err = run(setup.config, "retry", "--all")
    assert (code, err) == (0, "")
    assert sorted(out.splitlines()[:-1]) == sorted(
        f"{i}: due now" for i in (QUEUED_ID, DEAD_ID, OTHER_ID)
    )
    assert all(e.next_attempt <= time.time() for e in setup.spool.entries(QUEUE))


def test_retry_all_on_an_empty_spool(setup: Setup) -> None:
    assert run(setup.config, "retry", "--all") == (
        0,
        f"Mail queue is empty (spool {setup.spool.path}): nothing to retry\n",
        "",
    )


def test_retry_an_unknown_id_fails_and_the_others_are_retried(setup: Setup) -> None:
    put_both(setup.spool)
    code, out, err = run(setup.config, "retry", UNKNOWN_ID, DEAD_ID)
    assert code == 1
    assert err == (
        f"ses-relay: queue: {UNKNOWN_ID}: no such message in the queue or the dead-letter area\n"
    )
    assert out.splitlines()[0] == f"{DEAD_ID}: moved from the dead-letter area back to the queue"
    assert setup.spool.find(DEAD_ID) == QUEUE


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ((), "retry: give message IDs or --all (not both)"),
        (("--all", QUEUED_ID), "retry: give message IDs or --all (not both)"),
        (("--area", "dead", QUEUED_ID), "retry: --area goes with --all"),
    ],
)
def test_retry_usage(setup: Setup, args: tuple[str, ...], problem: str) -> None:
    put(setup.spool, queued_entry())
    assert run(setup.config, "retry", *args) == (2, "", f"ses-relay: queue: {problem}\n")
    assert setup.spool.load(QUEUED_ID).next_attempt == LATER


# -- delete


def test_delete_from_the_queue_and_the_dead_letter_area(setup: Setup) -> None:
    put_both(setup.spool)
    put(setup.spool, queued_entry(OTHER_ID))
    code, out, err = run(setup.config, "delete", QUEUED_ID, UNKNOWN_ID, DEAD_ID)
    assert code == 1
    assert out.splitlines() == [
        f"{QUEUED_ID}: deleted from the queue",
        f"{DEAD_ID}: deleted from the dead-letter area",
    ]
    assert err == (
        f"ses-relay: queue: {UNKNOWN_ID}: no such message in the queue or the dead-letter area\n"
    )
    assert [e.id for e in setup.spool.entries(QUEUE)] == [OTHER_ID]
    assert not list(setup.spool.dir(DEAD).iterdir())
    assert not list(setup.spool.dir(QUEUE).glob(f"{QUEUED_ID}.*"))
    assert run(setup.config, "delete", OTHER_ID) == (0, f"{OTHER_ID}: deleted from the queue\n", "")
    assert run(setup.config, "list") == (0, f"Mail queue is empty (spool {setup.spool.path})\n", "")


# -- which spool


@pytest.mark.parametrize("as_json", [False, True])
def test_without_c_the_spool_read_is_named_and_one_no_daemon_used_is_told(
    tmp_path: Path, as_json: bool
) -> None:
    """Without -c the queue of ./spool is read, not the daemon's: the output
    says which spool, and that no daemon ever used it; --json stays JSON."""
    stray = Spool(tmp_path / "spool")
    stray.open(lock=False)  # left by an earlier `ses-relay queue` or a test run
    put(stray, queued_entry())
    env = {k: v for k, v in clean_env().items() if k != "STATE_DIRECTORY"}
    done = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "list", *(["--json"] if as_json else [])],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        cwd=tmp_path,
    )
    assert done.returncode == 0
    assert done.stderr == (
        f"ses-relay: queue: warning: no ses-relay daemon has ever used spool {tmp_path}/spool: "
        "it has no lock file "
        "(the default spool.path; give the daemon's configuration with -c FILE)\n"
    )
    if as_json:
        document = json.loads(done.stdout)
        assert (document["spool"], document["queued"]) == (f"{tmp_path}/spool", 1)
    else:
        assert (
            done.stdout.splitlines()[-1] == f"1 message in queue, 0 dead (spool {tmp_path}/spool)"
        )


# -- failures


def test_a_missing_spool_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    config = write_config(tmp_path / "relay.toml", {"spool": {"path": str(missing)}})
    code, out, err = run(config, "list")
    assert (code, out) == (1, "")
    assert err == (f"ses-relay: queue: spool {missing} does not exist (spool.path in {config})\n")
    assert not missing.exists()


def test_an_unreadable_spool_is_an_error(setup: Setup) -> None:
    queue = setup.spool.dir(QUEUE)
    queue.rmdir()
    queue.write_text("not a directory")
    code, out, err = run(setup.config, "list")
    assert (code, out) == (1, "")
    assert err.startswith(f"ses-relay: queue: spool {setup.spool.path}: ")


def test_a_bad_configuration_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("[spool]\npath = 5\n")
    code, out, err = run(config, "list")
    assert (code, out) == (78, "")
    assert err.startswith("ses-relay: configuration is invalid (1 problem):\n")


def test_config_may_follow_the_action(setup: Setup) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "list", "-c", str(setup.config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=clean_env(),
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"Mail queue is empty (spool {setup.spool.path})\n",
        "",
    )


# -- telling the daemon (in-process: signalling is injected)


def sig_cgt(*signals: int) -> str:
    mask = sum(1 << (s - 1) for s in signals)
    return f"Name:\tpython\nSigBlk:\t0000000000000000\nSigCgt:\t{mask:016x}\n"


def test_catches_reads_the_signal_mask() -> None:
    assert queuecmd.catches(sig_cgt(signal.SIGINT, signal.SIGUSR1), signal.SIGUSR1) is True
    assert queuecmd.catches(sig_cgt(signal.SIGINT), signal.SIGUSR1) is False
    assert queuecmd.catches(None, signal.SIGUSR1) is None
    assert queuecmd.catches("Name:\tx\n", signal.SIGUSR1) is None


def test_our_own_process_mask_is_read() -> None:
    status = queuecmd.proc_status(os.getpid())
    if status is None:
        pytest.skip("no /proc here")
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        assert queuecmd.catches(queuecmd.proc_status(os.getpid()), signal.SIGUSR1) is True
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_daemon_is_signalled_only_once_it_handles_sigusr1(tmp_path: Path) -> None:
    daemon = Spool(tmp_path / "spool")
    daemon.open()  # holds the lock, as the daemon does: daemon_pid() is ours
    try:
        sent: list[tuple[int, int]] = []
        out, err = StringIO(), StringIO()
        console = queuecmd.Console(out, err)

        def kill(pid: int, signum: int) -> None:
            sent.append((pid, signum))

        starting = queuecmd.notify_daemon(
            daemon, console, 1, kill=kill, status_of=lambda _: sig_cgt(), wait=0.1
        )
        assert (starting, sent) == (False, [])
        assert "does not handle SIGUSR1 yet" in err.getvalue()
        ready = queuecmd.notify_daemon(
            daemon, console, 2, kill=kill, status_of=lambda _: sig_cgt(signal.SIGUSR1)
        )
        assert (ready, sent) == (True, [(os.getpid(), signal.SIGUSR1)])
        assert out.getvalue() == (
            f"signalled the ses-relay daemon (pid {os.getpid()}) to deliver them now\n"
        )
    finally:
        daemon.close()


# -- with the daemon running


@dataclass
class Daemon:
    process: asyncio.subprocess.Process
    config: Path
    smtp_port: int
    log: list[str]


@contextlib.asynccontextmanager
async def running_daemon(tmp_path: Path, fake: FakeSes) -> AsyncIterator[Daemon]:
    """``python -m relay serve`` on a free port; nothing retries on its own
    (``delivery.retry_min`` is an hour). Always terminated and reaped."""
    config = write_config(
        tmp_path / "relay.toml",
        {
            "smtp": {"listen": ["127.0.0.1:0"], "hostname": "relay.test"},
            "ses": {
                "endpoint": fake.url,
                "ca_bundle": fake.ca_pem_path,
                "region": fake.region,
                "max_send_rate": 1000.0,
                "max_attempts": 2,
                "backoff_base": 0.01,
                "backoff_max": 0.05,
            },
            "spool": {"path": str(tmp_path / "spool")},
            "metrics": {"listen": "127.0.0.1:0"},
            "delivery": {"inline_timeout": 5.0, "retry_min": 3600.0, "retry_max": 7200.0},
        },
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "serve",
        "-c",
        str(config),
        env=ses_env(fake),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    log: list[str] = []
    ready = asyncio.Event()
    port: list[int] = []

    async def read_log() -> None:  # keeps the pipe drained for the daemon's life
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            log.append(line)
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if found:
                port.append(int(found.group(1)))
            if "ses-relay ready" in line:
                ready.set()

    reader = asyncio.create_task(read_log())
    try:
        async with asyncio.timeout(WAIT):
            await asyncio.wait(
                [asyncio.create_task(ready.wait()), reader], return_when=asyncio.FIRST_COMPLETED
            )
        assert ready.is_set(), "the daemon did not start:\n" + "\n".join(log)
        assert port, "the daemon did not say where it listens:\n" + "\n".join(log)
        yield Daemon(process, config, port[0], log)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), WAIT)
            except TimeoutError:
                process.kill()
                await process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, WAIT)
        reader.cancel()


async def run_async(config: Path, *args: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(run, config, *args)


async def wait_until_empty(config: Path) -> None:
    async with asyncio.timeout(WAIT):
        while not (await run_async(config, "list"))[1].startswith("Mail queue is empty (spool "):
            await asyncio.sleep(0.05)


async def test_retry_makes_the_running_daemon_deliver_now(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    async with running_daemon(tmp_path, fake_ses) as daemon:
        fake_ses.script(*[SesErrorReply(503, "ServiceUnavailable", "down", "Receiver")] * 2)
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=daemon.smtp_port, start_tls=False, timeout=WAIT
        ) as client:
            response = await client.sendmail("app@example.com", ["bob@example.net"], MESSAGE)
        reply = response[1]
        assert reply.startswith("2.0.0 Ok: queued as "), reply
        queue_id = reply.rsplit(" ", 1)[1]
        assert (len(fake_ses.requests), fake_ses.pending_script) == (2, 0)  # SES is fine now

        code, out, _ = await run_async(daemon.config, "list")
        assert code == 0
        assert re.search(rf"^{queue_id}  queue .* 1/0/0 .* <app@example.com>$", out, re.M)
        assert "now" not in out.splitlines()[1]  # next attempt in an hour

        started = time.monotonic()
        code, out, err = await run_async(daemon.config, "retry", queue_id)
        assert (code, err) == (0, "")
        assert out.splitlines() == [
            f"{queue_id}: due now",
            f"signalled the ses-relay daemon (pid {daemon.process.pid}) to deliver it now",
        ]
        requests = await fake_ses.wait_for_requests(3, within=WAIT)
        assert time.monotonic() - started < 10  # not the hour retry_min says
        assert requests[2].destinations == ["bob@example.net"]
        assert requests[2].raw_message is not None
        assert requests[2].raw_message.startswith(b"From: App <app@example.com>\r\n")
        await wait_until_empty(daemon.config)
        assert daemon.process.returncode is None  # SIGUSR1 did not kill it
    assert daemon.process.returncode == 0
    assert len(fake_ses.requests) == 3


async def test_retry_brings_a_dead_message_back_to_the_running_daemon(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    async with running_daemon(tmp_path, fake_ses) as daemon:
        spool = Spool(tmp_path / "spool")  # as another process sees it: no lock
        dead = dead_entry(sender="app@example.com", source="app@example.com")
        await asyncio.to_thread(put, spool, dead, DEAD)
        code, out, err = await run_async(daemon.config, "retry", DEAD_ID)
        assert (code, err) == (0, "")
        assert out.splitlines() == [
            f"{DEAD_ID}: moved from the dead-letter area back to the queue",
            f"signalled the ses-relay daemon (pid {daemon.process.pid}) to deliver it now",
        ]
        [request] = await fake_ses.wait_for_requests(1, within=WAIT)
        assert request.destinations == ["frank@example.net"]  # the sent batch is not resent
        await wait_until_empty(daemon.config)
    assert len(fake_ses.requests) == 1
