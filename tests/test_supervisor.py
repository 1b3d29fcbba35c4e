"""``smtp.workers``: the relay as N processes on one port, run as a user runs
it (``python -m relay serve``) against the fake SES: mail through every
worker, one ``/metrics`` for all, signals to all, a worker killed and
restarted, partitions of gone workers adopted, ``queue list`` over every
partition, the sending rate the account's in total; and the adoption's
crash guarantees, the combination of the workers' states, the key's checks.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.config import read_config
from relay.httpserver import Readiness
from relay.metrics import State
from relay.metricsdir import PREFIX
from relay.partitions import SpoolSet, partition_path
from relay.spool import DEAD, QUEUE, Batch, Entry, Spool
from relay.workerstate import combine, combine_readiness, report_from_json, report_json
from tests.daemon import (
    Daemon,
    daemon_config,
    daemon_env,
    queue_command,
    running_daemon,
    second_on_the_same_spool,
)
from tests.fakeses import FakeSes, SesErrorReply

WAIT = 30.0
"""Seconds any wait for the daemon may take (they take a few)."""
UNREACHABLE = "https://127.0.0.1:9"
"""An SES endpoint nothing answers on: every message stays queued."""


def message(number: int) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = "app@example.com"
    mail["To"] = f"user{number}@example.net"
    mail["Subject"] = f"message {number}"
    mail.set_content(f"body {number}\n")
    return mail


async def send(daemon: Daemon, count: int, first: int = 0) -> list[str]:
    """``count`` messages, each on a connection of its own; the DATA replies."""
    assert daemon.smtp is not None
    host, port = daemon.smtp
    replies = []
    for number in range(first, first + count):
        _, reply = await aiosmtplib.send(message(number), hostname=host, port=port, timeout=WAIT)
        replies.append(reply)
    return replies


async def scrape(daemon: Daemon, path: str = "/metrics") -> tuple[int, str]:
    found = re.search(r"metrics on http://(\S+)/metrics", daemon.log)
    assert found is not None, daemon.log
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://{found[1]}{path}") as answer,
    ):
        return answer.status, await answer.text()


def samples(text: str) -> dict[tuple[str, str], float]:
    """name and the value of its first label (or "") → value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = next(iter(sample.labels.values()), "")
            found[(sample.name, label)] = sample.value
    return found


def worker_pids(daemon: Daemon) -> dict[int, int]:
    """Worker number → its latest pid, from the parent's log."""
    pids = {}
    for line in daemon.lines:
        if found := re.search(r"worker (\d+) started \(pid (\d+)\)", line):
            pids[int(found[1])] = int(found[2])
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def config(tmp_path: Path, fake: FakeSes, workers: int, **sections: dict[str, Any]) -> Path:
    smtp = {"workers": workers} | sections.pop("smtp", {})
    return daemon_config(
        tmp_path / "relay.toml", fake, spool=tmp_path / "spool", smtp=smtp, **sections
    )


async def test_two_workers_share_the_port_deliver_and_count_once_and_stop_together(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    path = config(tmp_path, fake_ses, 2)
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        pids = worker_pids(daemon)
        assert sorted(pids) == [0, 1]
        replies = await send(daemon, 20)
        assert all(reply.startswith("2.0.0") or "queued" in reply for reply in replies), replies
        requests = await fake_ses.wait_for_requests(20, within=WAIT)
        assert sorted(r.raw_message is not None for r in requests).count(True) == 20
        # Both workers took connections: their log lines carry their pids.
        received = [line for line in daemon.lines if "from=<" in line]
        assert {int(m[1]) for line in received if (m := re.search(r"\[(\d+)\]", line))} == set(
            pids.values()
        )
        status, text = await scrape(daemon)
        assert status == 200
        values = samples(text)
        messages = sum(v for (name, _), v in values.items() if name == "ses_relay_messages_total")
        assert messages == 20
        assert values[("ses_relay_smtp_connections_total", "admitted")] == 20
        assert [v for (name, _), v in values.items() if name == "ses_relay_build_info"] == [1]
        status, body = await scrape(daemon, "/readyz")
        assert (status, json.loads(body)["ready"]) == (200, True)

        daemon.terminate()
        assert await daemon.wait_exit() == 0
    assert not any(alive(pid) for pid in pids.values())
    assert daemon.count_log("ses-relay stopped") == 1


async def test_a_killed_worker_is_restarted_and_its_queued_mail_delivered(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    # The first calls fail: those messages stay queued for an hour.
    fake_ses.script(*[SesErrorReply(503, "ServiceUnavailable", "down", "Receiver")] * 8)
    path = config(tmp_path, fake_ses, 2, delivery={"retry_min": 3600.0, "retry_max": 3600.0})
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        await send(daemon, 8)
        root = tmp_path / "spool"
        holders = {i: len(list((partition_path(root, i) / QUEUE).glob("*.json"))) for i in (0, 1)}
        assert sum(holders.values()) == 8
        victim = max(holders, key=lambda i: holders[i])
        old = worker_pids(daemon)[victim]

        code, out, _ = queue_command(path, "list", "--json")
        assert code == 0
        assert json.loads(out)["queued"] == 8  # every partition's entries

        os.kill(old, signal.SIGKILL)
        await daemon.wait_for_log(rf"worker {victim} \(pid {old}\) exited unexpectedly", WAIT)
        await daemon.wait_for_log(rf"worker {victim} started \(pid (?!{old}\))\d+", WAIT)
        await daemon.wait_for_log(rf"ses-relay worker {victim} ready", WAIT, start=0)
        new = worker_pids(daemon)[victim]
        assert new != old
        while daemon.count_log(rf"\[{new}\].*ses-relay worker {victim} ready") == 0:
            await daemon.wait_for_log(rf"\[{new}\].*ready", WAIT)

        code, out, _ = queue_command(path, "retry", "--all")
        assert code == 0, out
        requests = await fake_ses.wait_for_requests(16, within=WAIT)
        delivered = {r.raw_message for r in requests[8:]}
        assert len(delivered) == 8
        code, out, _ = queue_command(path, "list", "--json")
        assert json.loads(out)["queued"] == 0
        daemon.terminate()
        assert await daemon.wait_exit() == 0


async def test_when_workers_shrink_from_3_to_2_the_third_partition_is_delivered(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    ses = {"endpoint": UNREACHABLE, "max_attempts": 1}  # none still backing off at the stop
    path = config(tmp_path, fake_ses, 3, ses=ses)
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        await send(daemon, 30)
        daemon.terminate()
        assert await daemon.wait_exit() == 0
    third = partition_path(tmp_path / "spool", 2) / QUEUE
    stranded = len(list(third.glob("*.json")))
    assert stranded > 0  # 30 connections spread over 3 workers

    code, out, _ = queue_command(path, "list", "--json")
    assert (code, json.loads(out)["queued"]) == (0, 30)

    path = config(tmp_path, fake_ses, 2, delivery={"retry_min": 0.05})
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        requests = await fake_ses.wait_for_requests(30, within=WAIT)
        assert len({r.raw_message for r in requests}) == 30
        adopted = rf"adopted {stranded} queued and 0 dead messages from .*worker-2"
        assert daemon.count_log(adopted) == 1
    assert not list(third.glob("*.json"))


async def test_the_queue_of_a_single_process_spool_moves_to_the_workers(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    path = config(tmp_path, fake_ses, 1, ses={"endpoint": UNREACHABLE, "max_attempts": 1})
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        await send(daemon, 3)
        daemon.terminate()
        assert await daemon.wait_exit() == 0
    assert len(list((tmp_path / "spool" / QUEUE).glob("*.json"))) == 3

    path = config(tmp_path, fake_ses, 2)
    async with running_daemon(path, daemon_env(fake_ses)):
        requests = await fake_ses.wait_for_requests(3, within=WAIT)
        assert len({r.raw_message for r in requests}) == 3
    assert not list((tmp_path / "spool" / QUEUE).glob("*.json"))


async def test_two_workers_send_at_the_accounts_rate_in_total(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    rate = 4.0
    path = config(tmp_path, fake_ses, 2, ses={"max_send_rate": rate}, delivery={"retry_min": 0.05})
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        _, text = await scrape(daemon)
        assert samples(text)[("ses_relay_send_rate_recipients_per_second", "")] == rate
        count = 24
        await asyncio.gather(send(daemon, count // 2), send(daemon, count // 2, count // 2))
        requests = await fake_ses.wait_for_requests(count, within=WAIT)
    times = sorted(r.received_at for r in requests if r.action == "SendRawEmail")
    # At 4/s with a bucket of 2 per worker: at least (24 - 4) / 4 = 5 s; at
    # twice the rate it would be 2.5 s.
    assert times[-1] - times[0] >= 0.75 * (count - 2 * rate) / rate


# -- adoption, without processes


def entry(number: int) -> Entry:
    recipients = (f"user{number}@example.net",)
    entry_id = f"0000000000{number:02d}AAAA"
    return Entry(
        id=entry_id,
        received=1.0,
        client="127.0.0.1",
        sender="app@example.com",
        source="app@example.com",
        recipients=recipients,
        batches=(Batch(recipients),),
    )


def test_adopt_moves_every_entry_once_and_a_crash_between_loses_nothing(tmp_path: Path) -> None:
    orphan, mine = Spool(tmp_path / "worker-2"), Spool(tmp_path / "worker-0")
    orphan.open()
    mine.open()
    try:
        entries = [entry(n) for n in range(3)]
        for item in entries:
            orphan.put(item, b"Subject: x\r\n\r\nbody\r\n")
        orphan.move(entries[2], QUEUE, DEAD)
        assert sorted(mine.adopt(orphan, QUEUE)) == [entries[0].id, entries[1].id]
        assert mine.adopt(orphan, DEAD) == [entries[2].id]
        assert sorted(mine.ids(QUEUE)) == [entries[0].id, entries[1].id]
        assert list(orphan.ids(QUEUE)) == list(orphan.ids(DEAD)) == []
        assert mine.message(entries[0].id) == b"Subject: x\r\n\r\nbody\r\n"
        assert not list(orphan.dir(QUEUE).iterdir())
    finally:
        orphan.close()
        mine.close()

    # A crash after the message was linked, before the envelope moved: the
    # entry is whole in the orphan; the adopter's next open drops its link.
    orphan.open()
    orphan.put(entry(5), b"five")
    os.link(orphan.dir(QUEUE) / f"{entry(5).id}.eml", mine.dir(QUEUE) / f"{entry(5).id}.eml")
    mine.open()
    assert not (mine.dir(QUEUE) / f"{entry(5).id}.eml").exists()
    # A crash after the envelope moved: whole in the adopter; the orphan's
    # next open drops the message left behind.
    os.link(orphan.dir(QUEUE) / f"{entry(5).id}.eml", mine.dir(QUEUE) / f"{entry(5).id}.eml")
    os.rename(orphan.dir(QUEUE) / f"{entry(5).id}.json", mine.dir(QUEUE) / f"{entry(5).id}.json")
    orphan.close()
    orphan.open()
    assert not list(orphan.dir(QUEUE).iterdir())
    assert mine.message(entry(5).id) == b"five"
    assert entry(5).id in set(mine.ids(QUEUE))
    orphan.close()
    mine.close()


def test_the_spool_set_finds_entries_in_every_partition(tmp_path: Path) -> None:
    root = Spool(tmp_path)
    root.open(lock=False)
    root.put(entry(1), b"one")
    part = Spool(partition_path(tmp_path, 3))
    part.open(lock=False)
    part.put(entry(2), b"two")
    spools = SpoolSet(root)
    spools.open()
    assert sorted(e.id for e in spools.entries(QUEUE)) == [entry(1).id, entry(2).id]
    assert spools.find(entry(2).id) == QUEUE
    assert spools.message(entry(2).id) == b"two"
    spools.remove(entry(2).id)
    assert spools.find(entry(2).id) is None


# -- the workers' states, combined


def state(**values: Any) -> State:
    base = State(
        queued=1, dead=0, oldest_age=5.0, pause_remaining=0.0, send_rate=2.0, quota=None,
        smtp_open=1, smtp_max=10, credentials_expiry=None,
    )  # fmt: skip
    return replace(base, **values)


def test_states_combine_into_the_relays_totals() -> None:
    first = state(oldest_age=9.0, credentials_expiry=100.0)
    second = state(queued=4, smtp_open=3, credentials_expiry=50.0)
    assert report_from_json(report_json(first, Readiness({"smtp": "ok"}, "ok")))[0] == first
    total = combine([first, second])
    assert (total.queued, total.send_rate, total.smtp_max, total.smtp_open) == (5, 4.0, 20, 4)
    assert (total.oldest_age, total.credentials_expiry) == (9.0, 50.0)
    ok = Readiness({"smtp": "ok", "spool": "ok"}, "ok")
    assert combine_readiness({0: ok, 1: ok}, 2).checks == {"smtp": "ok", "spool": "ok"}
    assert combine_readiness({0: ok}, 2).checks["smtp"] == "worker 1: not running"


# -- the key


@pytest.mark.parametrize("value", ["0", "65", "1.5"])
def test_workers_out_of_range_is_an_error_naming_the_key_and_file(
    tmp_path: Path, value: str
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[smtp]\nworkers = {value}\n")
    _, problems = read_config(path, {})
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: [smtp] workers: ")


async def test_a_relay_with_workers_that_cannot_start_leaves_no_metrics_directory(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    """The metrics directory goes when the relay stops, and also when it
    stops before its workers start (its spool held by another relay). One
    left by a killed relay: ``tests/test_metricsdir.py``."""
    path = config(tmp_path, fake_ses, 2)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = daemon_env(fake_ses, TMPDIR=str(temp))
    async with running_daemon(path, env) as first:
        [mine] = temp.iterdir()
        assert mine.name.startswith(PREFIX)
        await second_on_the_same_spool(first, path, env)
        assert list(temp.iterdir()) == [mine]
        first.terminate()
        assert await first.wait_exit() == 0
        assert list(temp.iterdir()) == []
