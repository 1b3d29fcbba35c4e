"""``smtp.workers = 2`` as the operator drives it, with real processes: the
parent killed with SIGKILL (every worker stops, a new daemon on the same
spool delivers what was queued), ``ses-relay reload`` and ``ses-relay queue
retry`` reaching every worker, ``/readyz`` while a worker is restarted, and
the SMTP counters kept across a worker's restart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import aiosmtplib

from relay.partitions import partition_path
from relay.spool import QUEUE, Spool
from tests.daemon import Daemon, daemon_env, queue_command, running_daemon
from tests.fakeses import FakeSes, SesErrorReply
from tests.test_reloadcmd import MAX_RECIPIENTS, reload_command, signal_pending
from tests.test_supervisor import UNREACHABLE, WAIT, config, samples, scrape, send
from tests.test_supervisor import worker_pids as started_pids

FAILING = SesErrorReply(503, "ServiceUnavailable", "down", "Receiver")
"""What the fake SES answers to the messages that must stay queued."""


def worker_pids(daemon: Daemon) -> dict[int, int]:
    pids = started_pids(daemon)
    assert sorted(pids) == [0, 1], daemon.log
    return pids


async def wait_gone(pid: int, within: float) -> None:
    """Return once process ``pid`` has exited (its pidfd is readable);
    TimeoutError if it still runs after ``within`` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # exited and reaped already
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        async with asyncio.timeout(within):
            await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def queued(root: Path, index: int) -> int:
    return len(list((partition_path(root, index) / QUEUE).glob("*.json")))


async def queue_in_both(daemon: Daemon, fake: FakeSes, root: Path, count: int) -> None:
    """Send ``count`` messages that SES refuses for now (they stay queued)
    and check that both workers' partitions hold some."""
    fake.script(*[FAILING] * count)
    replies = await send(daemon, count)
    # Every reply came after its inline attempt: tried, or not tried once a
    # worker paused delivery after failures in a row (then SES saw fewer, and
    # what it was told to refuse is left over): SES is well again from here.
    assert all("queued" in reply.lower() for reply in replies), replies
    fake.clear_script()
    held = [queued(root, 0), queued(root, 1)]
    assert sum(held) == count
    assert all(held), held  # the kernel spread the connections over both


async def test_a_parent_killed_with_sigkill_takes_its_workers_and_a_new_one_delivers(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    # One attempt per call: no SES call to the unreachable endpoint is still
    # backing off when the workers stop (they would wait for it).
    path = config(tmp_path, fake_ses, 2, ses={"endpoint": UNREACHABLE, "max_attempts": 1})
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        pids = worker_pids(daemon)
        await send(daemon, 10)
        daemon.kill()
        # The log pipe is shared with the workers: its end means they exited too.
        assert await daemon.wait_exit() == -signal.SIGKILL
        for pid in pids.values():
            await wait_gone(pid, WAIT)
        assert daemon.count_log(r"worker \d stopped") == 2
    root = tmp_path / "spool"
    assert queued(root, 0) + queued(root, 1) == 10

    path = config(tmp_path, fake_ses, 2)
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        requests = await fake_ses.wait_for_requests(10, within=WAIT)
        assert len({r.raw_message for r in requests}) == 10
        code, out, _ = queue_command(path, "list", "--json")
        assert (code, json.loads(out)["queued"]) == (0, 0)
        daemon.terminate()
        assert await daemon.wait_exit() == 0


async def rcpt_limits(daemon: Daemon, connections: int) -> set[int]:
    """The reply codes to a second RCPT TO, one per new connection."""
    assert daemon.smtp is not None
    host, port = daemon.smtp
    codes = set()
    for number in range(connections):
        async with aiosmtplib.SMTP(hostname=host, port=port, timeout=WAIT) as smtp:
            await smtp.mail("app@example.com")
            await smtp.rcpt(f"a{number}@example.net")
            reply = await smtp.execute_command(f"RCPT TO:<b{number}@example.net>".encode())
            codes.add(reply.code)
    return codes


async def test_reload_applies_in_every_worker_and_a_bad_file_signals_none(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    path = config(tmp_path, fake_ses, 2)
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        pids = worker_pids(daemon)
        assert await rcpt_limits(daemon, 6) == {250}

        config(tmp_path, fake_ses, 2, smtp={"max_recipients": 1})
        code, out, err = await reload_command(path)
        assert (code, err) == (0, "")
        assert out == (
            f"ses-relay: reload: the ses-relay daemon (pid {daemon.pid}) reloaded {path}\n"
            "  new sessions get: smtp.max_recipients\n"
        )
        for pid in pids.values():
            assert daemon.count_log(rf"\[{pid}\].*reloaded .*smtp\.max_recipients") == 1
        # Applied by the time the command said so, whichever worker answers.
        assert await rcpt_limits(daemon, 12) == {452}

        config(tmp_path, fake_ses, 2, smtp={"max_recipients": 0})
        # Stopped, the processes keep whatever signal comes pending, for us to see.
        everyone = [daemon.pid, *pids.values()]
        for pid in everyone:
            os.kill(pid, signal.SIGSTOP)
        try:
            code, out, err = await reload_command(path)
            pending = [signal_pending(pid, signal.SIGHUP) for pid in everyone]
        finally:
            for pid in everyone:
                os.kill(pid, signal.SIGCONT)
        assert (code, out) == (78, "")
        assert err == (
            f"ses-relay: configuration is invalid (1 problem):\n  {path}: {MAX_RECIPIENTS}\n"
        )
        assert pending == [False, False, False]

        config(tmp_path, fake_ses, 2)
        code, out, err = await reload_command(path)
        assert (code, err) == (0, "")
        assert await rcpt_limits(daemon, 6) == {250}
        # One "reloaded" per worker per reload: the refused file reached none.
        assert daemon.count_log(r"reloaded ") == 4
        assert daemon.count_log(r"reload refused") == 0
        _, text = await scrape(daemon)
        values = samples(text)
        assert values[("ses_relay_config_reloads_total", "applied")] == 2
        assert values[("ses_relay_config_reloads_total", "refused")] == 0


async def test_readyz_is_503_while_a_worker_is_restarted_and_200_once_it_is_back(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    path = config(tmp_path, fake_ses, 2)
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        assert (await scrape(daemon, "/readyz"))[0] == 200
        old = worker_pids(daemon)[1]
        os.kill(old, signal.SIGKILL)
        await daemon.wait_for_log(rf"worker 1 \(pid {old}\) exited unexpectedly", WAIT)
        # Holding its partition's lock keeps the new worker starting (it waits
        # for the lock) for as long as this test needs.
        held = Spool(partition_path(tmp_path / "spool", 1))
        await asyncio.to_thread(held.open)
        try:
            status, body = await scrape(daemon, "/readyz")
            assert status == 503
            assert json.loads(body)["checks"]["smtp"] == "worker 1: not running"
            await daemon.wait_for_log(rf"worker 1 started \(pid (?!{old}\))\d+", WAIT)
            status, body = await scrape(daemon, "/readyz")
            assert (status, json.loads(body)["checks"]["smtp"]) == (503, "worker 1: not running")
        finally:
            held.close()
        new = worker_pids(daemon)[1]
        await daemon.wait_for_log(rf"worker 1 \(pid {new}\) ready", WAIT)
        status, body = await scrape(daemon, "/readyz")
        assert (status, json.loads(body)["ready"]) == (200, True)


async def test_queue_retry_reaches_every_worker(tmp_path: Path, fake_ses: FakeSes) -> None:
    path = config(tmp_path, fake_ses, 2, delivery={"retry_min": 3600.0, "retry_max": 3600.0})
    root = tmp_path / "spool"
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        pids = worker_pids(daemon)
        await queue_in_both(daemon, fake_ses, root, 12)
        mark, tried = len(daemon.lines), len(fake_ses.requests)

        code, _, err = queue_command(path, "retry", "--all")
        assert code == 0, err
        requests = await fake_ses.wait_for_requests(tried + 12, within=WAIT)
        assert len({r.raw_message for r in requests[tried:]}) == 12
        for pid in pids.values():
            retried = rf"\[{pid}\].*queue: \d+ messages to deliver"
            assert sum(1 for line in daemon.lines[mark:] if re.search(retried, line)) == 1


async def smtp_counts(daemon: Daemon) -> tuple[float, float]:
    """``ses_relay_smtp_connections_total{admitted}`` and the sum of
    ``ses_relay_smtp_sessions_total`` over its outcomes."""
    _, text = await scrape(daemon)
    values = samples(text)
    sessions = sum(v for (name, _), v in values.items() if name == "ses_relay_smtp_sessions_total")
    return values[("ses_relay_smtp_connections_total", "admitted")], sessions


async def test_smtp_counters_keep_a_restarted_workers_counts(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    path = config(tmp_path, fake_ses, 2)
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        assert daemon.smtp is not None
        await send(daemon, 11)
        before = await smtp_counts(daemon)
        assert before == (11, 11)

        for index, old in worker_pids(daemon).items():
            os.kill(old, signal.SIGKILL)
            await daemon.wait_for_log(rf"worker {index} \(pid {old}\) exited unexpectedly", WAIT)
            new = await daemon.wait_for_log(rf"worker {index} \(pid (?!{old}\))\d+\) ready", WAIT)
            assert new
        assert await smtp_counts(daemon) == before
        await send(daemon, 2)
        assert await smtp_counts(daemon) == (13, 13)
