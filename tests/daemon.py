"""The relay daemon as a user runs it: ``python -m relay serve -c FILE`` in a
subprocess, pointed at a fake SES.

``daemon_config`` writes the TOML (SMTP on a free loopback port, the spool
under ``tmp_path``, the fake's endpoint, CA bundle and region, an explicit
``ses.max_send_rate`` so no GetSendQuota call happens unless a test asks for
one) and ``daemon_env`` the environment (the fake's keys, nothing of the
host's AWS settings). ``running_daemon`` starts the process, waits for its
log to say ``listening on HOST:PORT`` and ``ses-relay ready`` (bounded), and
always leaves no process behind: whatever the test did, the daemon is killed
and reaped on the way out.

``Daemon`` keeps every line the process wrote (stdout and stderr together),
and offers ``kill`` (SIGKILL, as ``kill -9``), ``terminate`` (SIGTERM),
``wait_exit``, ``wait_for_log`` and ``cpu_seconds`` (from
``/proc/PID/stat``). ``wrapper`` runs the daemon under another command, such
as ``unshare -m sh -c '...'`` (``tmpfs_wrapper``); that command must
``exec`` the daemon so that the PID is the daemon's. ``host_path`` names a
path as the daemon sees it, through ``/proc/PID/root`` (which follows the
daemon's mount namespace: a tmpfs mounted only there is visible through it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.relayd import SesTarget, ses_env, write_config

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 20.0
"""Seconds a daemon may take to say it is ready."""
EXIT_TIMEOUT = 20.0
"""Seconds any wait for a daemon to exit may take by default."""
_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def clean_env() -> dict[str, str]:
    """This environment without AWS or ses-relay settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SES_RELAY_"))}


def queue_command(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``python -m relay queue -c CONFIG ARGS``: exit status, stdout, stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env or clean_env(),
        cwd=REPO,
    )
    return done.returncode, done.stdout, done.stderr


class DaemonFailed(AssertionError):
    """The daemon did not start (or not as expected); the message holds its log."""


def daemon_config(
    path: Path, target: SesTarget, *, spool: Path | str, **sections: Mapping[str, Any]
) -> Path:
    """Write a daemon configuration to ``path``; ``sections`` override keys."""
    merged: dict[str, dict[str, Any]] = {
        "smtp": {"listen": ["127.0.0.1:0"], "hostname": "relay.test"},
        "ses": {
            "endpoint": target.url,
            "ca_bundle": target.ca_pem_path,
            "region": target.region,
            "max_send_rate": 1000.0,
            "max_attempts": 1,
            "backoff_base": 0.01,
            "backoff_max": 0.05,
            "request_timeout": 2.0,
            "connect_timeout": 1.0,
        },
        "spool": {"path": str(spool)},
        "metrics": {"listen": "127.0.0.1:0"},
        "delivery": {
            "inline_timeout": 2.0,
            "retry_min": 0.05,
            "retry_max": 0.2,
            "concurrency": 4,
        },
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return write_config(path, merged)


def daemon_env(target: SesTarget, **extra: str) -> dict[str, str]:
    """The fake's credentials, this checkout importable, output unbuffered."""
    env = ses_env(target, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def tmpfs_wrapper(mount_point: Path, size: str = "1m") -> list[str]:
    """Run the daemon with a fresh ``size`` tmpfs on ``mount_point``, mounted in
    a private mount namespace (nothing leaks to the host; it vanishes with the
    daemon). Needs root: check ``tests.diskfull.unavailable()`` first."""
    unshare = shutil.which("unshare") or "unshare"
    script = 'mount -t tmpfs -o size="$1",mode=0700 tmpfs "$2" && shift 2 && exec "$@"'
    return [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh",
            size, str(mount_point)]  # fmt: skip


class Daemon:
    """One daemon process and what it logged."""

    def __init__(self, process: asyncio.subprocess.Process, config: Path) -> None:
        self.process = process
        self.config = config
        self.lines: list[str] = []
        self.smtp: tuple[str, int] | None = None
        self._changed = asyncio.Condition()
        self._eof = False
        self._reader = asyncio.create_task(self._read(), name=f"daemon-{process.pid}-log")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def host_path(self, path: Path | str) -> Path:
        """``path`` as the daemon sees it (its mount namespace), from here."""
        return Path(f"/proc/{self.pid}/root") / Path(path).relative_to("/")

    async def _read(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the stream's limit: keep what fits
                raw = await stream.read(65536)
            if not raw:
                break
            line = raw.decode("utf-8", "replace").rstrip("\n")
            async with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        async with self._changed:
            self._eof = True
            self._changed.notify_all()

    async def wait_for_log(self, pattern: str, within: float = 10.0, *, start: int = 0) -> str:
        """The first line (from line ``start`` on) matching the regular
        expression ``pattern``; DaemonFailed if none comes within ``within`` s."""
        regex = re.compile(pattern)

        def found() -> str | None:
            return next((x for x in self.lines[start:] if regex.search(x)), None)

        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(lambda: found() is not None or self._eof)
        except TimeoutError:
            pass
        line = found()
        if line is None:
            raise DaemonFailed(f"no log line matching {pattern!r} within {within}s:\n{self.log}")
        return line

    def count_log(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for line in self.lines if regex.search(line))

    async def wait_ready(self, within: float = READY_TIMEOUT) -> tuple[str, int]:
        try:
            listening = await self.wait_for_log(_LISTENING.pattern, within)
            await self.wait_for_log(r"ses-relay ready", within)
        except DaemonFailed:
            await self.stop()
            raise DaemonFailed(
                f"the daemon did not become ready within {within}s "
                f"(exit status {self.returncode}):\n{self.log}"
            ) from None
        match = _LISTENING.search(listening)
        assert match is not None
        self.smtp = (match[1].strip("[]"), int(match[2]))
        return self.smtp

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    def kill(self) -> None:
        """``kill -9``."""
        self.signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    async def wait_exit(self, within: float = EXIT_TIMEOUT) -> int:
        """The exit status (negative: killed by that signal); DaemonFailed if
        it is still running after ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                status = await self.process.wait()
                await self._reader
        except TimeoutError:
            raise DaemonFailed(f"the daemon did not exit within {within}s:\n{self.log}") from None
        return status

    async def kill_and_wait(self) -> int:
        self.kill()
        return await self.wait_exit()

    async def stop(self) -> None:
        """Make sure the process is gone and reaped (cleanup; never raises)."""
        self.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.process.wait(), EXIT_TIMEOUT)
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon has used (``/proc/PID/stat``)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
        return (utime + stime) / _CLOCK_TICKS


async def spawn(config: Path, env: Mapping[str, str], *, wrapper: Sequence[str] = ()) -> Daemon:
    """Start ``python -m relay serve -c config`` (under ``wrapper``), not waiting."""
    process = await asyncio.create_subprocess_exec(
        *wrapper,
        sys.executable,
        "-m",
        "relay",
        "serve",
        "-c",
        str(config),
        cwd=REPO,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # a ^C of pytest does not reach it; we stop it
    )
    return Daemon(process, config)


async def second_on_the_same_spool(first: Daemon, config: Path, env: Mapping[str, str]) -> Daemon:
    """A second daemon started on ``first``'s spool, exited: it failed,
    naming the daemon that holds the spool."""
    second = await spawn(config, env)
    try:
        status = await second.wait_exit()
    finally:
        await second.stop()
    assert status not in (0, None)
    assert f"in use by another ses-relay (pid {first.pid})" in second.log
    return second


@contextlib.asynccontextmanager
async def running_daemon(
    config: Path,
    env: Mapping[str, str],
    *,
    wrapper: Sequence[str] = (),
    ready: bool = True,
) -> AsyncIterator[Daemon]:
    """A started daemon (ready unless ``ready=False``), killed and reaped on exit."""
    daemon = await spawn(config, env, wrapper=wrapper)
    try:
        if ready:
            await daemon.wait_ready()
        yield daemon
    finally:
        await daemon.stop()
