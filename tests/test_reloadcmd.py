"""``ses-relay reload`` as an operator runs it (``python -m relay reload -c
FILE`` in a subprocess) against the real daemon: it prints what the daemon
applied, what waits for a restart, or why the daemon refused; an invalid
file is reported at once and nothing is sent; no daemon is an error. Also
the record the daemon leaves for it (pure), and the reload metrics."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from relay.reload import Outcome
from relay.reloadrecord import Record, answers, from_json, to_json
from tests.daemon import REPO, Daemon, clean_env, daemon_config, daemon_env, running_daemon
from tests.fakeses import FakeSes
from tests.test_reload import tls_session, write_cert, write_users

MAX_RECIPIENTS = "[smtp] max_recipients: must be greater than 0"


async def reload_command(config: Path, **env: str) -> tuple[int, str, str]:
    """``python -m relay reload -c CONFIG``: exit status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "reload",
        "-c",
        str(config),
        cwd=REPO,
        env=clean_env() | env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def reload_metrics(daemon: Daemon) -> tuple[float, float, float]:
    """``ses_relay_config_reloads_total`` applied and refused, and
    ``ses_relay_config_last_reload_successful``, from the daemon's /metrics."""
    found = re.search(r"metrics on (http://\S+/metrics)", daemon.log)
    assert found is not None, daemon.log
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(found[1]) as answer:
        text = await answer.text()
    samples = {
        (sample.name, sample.labels.get("outcome")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return (
        samples[("ses_relay_config_reloads_total", "applied")],
        samples[("ses_relay_config_reloads_total", "refused")],
        samples[("ses_relay_config_last_reload_successful", None)],
    )


def write_config(tmp_path: Path, fake_ses: FakeSes, **smtp: Any) -> Path:
    return daemon_config(tmp_path / "relay.toml", fake_ses, spool=tmp_path / "spool", smtp=smtp)


async def test_reload_applies_a_new_users_file_and_says_so(
    tmp_path: Path, fake_ses: FakeSes, tls_ca: trustme.CA, ca_pem_path: Path
) -> None:
    write_cert(tls_ca.issue_cert("relay.test", "127.0.0.1"), tmp_path)
    users = tmp_path / "users"
    write_users(users, "old-secret")
    path = daemon_config(
        tmp_path / "relay.toml",
        fake_ses,
        spool=tmp_path / "spool",
        smtp={"tls_cert": str(tmp_path / "relay.pem"), "tls_key": str(tmp_path / "relay.key")},
        auth={"users_file": str(users), "failure_delay": 0.0},
    )
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        assert daemon.smtp is not None
        assert await reload_metrics(daemon) == (0, 0, 1)
        write_users(users, "new-secret")

        code, out, err = await reload_command(path)
        assert (code, err) == (0, "")
        assert out == (
            f"ses-relay: reload: the ses-relay daemon (pid {daemon.pid}) reloaded {path}\n"
            "  new sessions get: the same settings\n"
            "  read again: the TLS certificate and key, the users file\n"
        )
        # Applied by the time the command said so.
        smtp, _ = await tls_session(daemon.smtp, ca_pem_path, implicit=False)
        async with smtp:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                await smtp.login("alice", "old-secret")
            assert refused.value.code == 535
            assert (await smtp.login("alice", "new-secret")).code == 235
        assert await reload_metrics(daemon) == (1, 0, 1)
        assert daemon.count_log("reloaded ") == 1


def signal_pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` waits for the process (``/proc/PID/status``)."""
    masks = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        masks[name] = int(value.strip(), 16) if name in ("SigPnd", "ShdPnd") else 0
    return bool((masks["SigPnd"] | masks["ShdPnd"]) >> (signum - 1) & 1)


async def test_an_invalid_file_exits_78_and_sends_nothing(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    path = write_config(tmp_path, fake_ses)
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        write_config(tmp_path, fake_ses, max_recipients=0)
        # Stopped, the daemon keeps whatever signal comes pending, for us to see.
        daemon.signal(signal.SIGSTOP)
        try:
            code, out, err = await reload_command(path)
            pending = signal_pending(daemon.pid, signal.SIGHUP)
        finally:
            daemon.signal(signal.SIGCONT)
        assert (code, out) == (78, "")
        assert err == (
            f"ses-relay: configuration is invalid (1 problem):\n  {path}: {MAX_RECIPIENTS}\n"
        )
        assert not pending

        write_config(tmp_path, fake_ses)
        code, out, err = await reload_command(path)
        assert (code, err) == (0, "")
        assert out.endswith("  new sessions get: the same settings\n")
        assert daemon.count_log("reload") == 1  # this one's "reloaded ..." only
        assert await reload_metrics(daemon) == (1, 0, 1)


async def test_a_reload_the_daemon_refuses_exits_78_with_its_problems(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    """The command checks with its environment; the daemon reloads with its
    own (an ``EnvironmentFile=``, say), and its answer is what counts."""
    path = write_config(tmp_path, fake_ses)
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        write_config(tmp_path, fake_ses, max_recipients=0)
        code, out, err = await reload_command(path, SES_RELAY_SMTP_MAX_RECIPIENTS="5")
        assert (code, out) == (78, "")
        assert err == (
            f"ses-relay: reload: the ses-relay daemon (pid {daemon.pid}) refused to reload "
            f"{path}; the configuration in force is unchanged\n"
            "ses-relay: configuration is invalid (1 problem):\n"
            f"  {path}: {MAX_RECIPIENTS}\n"
        )
        assert daemon.count_log("reload refused") == 1
        assert await reload_metrics(daemon) == (0, 1, 0)


async def test_settings_that_need_a_restart_are_named(tmp_path: Path, fake_ses: FakeSes) -> None:
    path = write_config(tmp_path, fake_ses)
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        write_config(tmp_path, fake_ses, listen=["127.0.0.1:2"], max_connections=50)
        code, out, err = await reload_command(path)
        assert code == 0
        assert out == (
            f"ses-relay: reload: the ses-relay daemon (pid {daemon.pid}) reloaded {path}\n"
            "  new sessions get: smtp.max_connections\n"
        )
        assert err == (
            "ses-relay: reload: warning: smtp.listen changed but need a restart; "
            "the old values stay in force until then\n"
        )


async def test_no_daemon_running_is_an_error(tmp_path: Path, fake_ses: FakeSes) -> None:
    path = write_config(tmp_path, fake_ses)
    spool = tmp_path / "spool"
    expected = (
        f"ses-relay: reload: no ses-relay daemon is running on spool {spool} "
        f"(spool.path in {path}): nothing to reload\n"
    )
    assert await reload_command(path) == (1, "", expected)  # never started
    async with running_daemon(path, daemon_env(fake_ses)) as daemon:
        daemon.terminate()
        assert await daemon.wait_exit() == 0
    assert (spool / "lock").exists()
    assert await reload_command(path) == (1, "", expected)  # stopped


def test_reload_runs_without_loading_the_daemon(tmp_path: Path, fake_ses: FakeSes) -> None:
    """Like `ses-relay queue`, `reload` starts without aiohttp or the daemon."""
    path = write_config(tmp_path, fake_ses)
    heavy = ["aiohttp", "relay.app", "relay.delivery", "relay.ses.client", "relay.ses.http"]
    probe = (
        "import sys; from relay.__main__ import main; "
        f"code = main(['reload', '-c', {str(path)!r}]); "
        f"print(code, [m for m in {heavy!r} if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        cwd=REPO,
        env=clean_env(),
    )
    assert done.stdout == "1 []\n"
    assert "no ses-relay daemon is running" in done.stderr


# The record the daemon leaves next to its lock (pure).

OUTCOME = Outcome(
    "/etc/ses-relay/config.toml",
    applied=("smtp.max_connections",),
    need_restart=("smtp.listen",),
    read_again=("the users file",),
)


@pytest.mark.parametrize("outcome", [OUTCOME, Outcome("defaults", problems=("a", "b"))])
def test_a_record_reads_back_as_written(outcome: Outcome) -> None:
    record = Record(pid=42, began=123_456_789, outcome=outcome)
    assert from_json(to_json(record)) == record


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"pid": 42}',
        '{"pid": "42", "began": 1, "source": "x", "applied": [], "need_restart": [], '
        '"read_again": [], "problems": []}',
        '{"pid": 42, "began": 1, "source": "x", "applied": "smtp.listen", "need_restart": [], '
        '"read_again": [], "problems": []}',
    ],
)
def test_what_is_not_a_record_is_none(text: str) -> None:
    assert from_json(text) is None


def test_only_a_reload_that_began_after_the_signal_answers_it() -> None:
    record = Record(pid=42, began=1000, outcome=OUTCOME)
    assert answers(record, 42, sent=1000)
    assert answers(record, 42, sent=999)
    assert not answers(record, 42, sent=1001)  # in progress when the signal came
    assert not answers(record, 43, sent=999)  # another daemon's (an earlier one)
    assert not answers(None, 42, sent=999)
