"""systemd's notify protocol: the messages and the environment (pure), the
datagrams as a socket the test made receives them, and the real daemon
(``python -m relay serve``) telling its state to such a socket as systemd
would see it: READY=1 only once the port accepts, WATCHDOG=1 while it runs,
RELOADING=1 (with MONOTONIC_USEC) and READY=1 around a SIGHUP, STOPPING=1 at
SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from relay.sdnotify import (
    WATCHDOG,
    Notifier,
    notify_address,
    ready,
    reloading,
    status,
    stopping,
    watchdog_interval,
)
from tests.daemon import daemon_config, daemon_env, running_daemon
from tests.fakeses import FakeSes

WAIT = 15.0
"""Seconds any one datagram may take to come."""


class NotifySocket:
    """The datagram socket systemd would listen on (``$NOTIFY_SOCKET``)."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        """What NOTIFY_SOCKET says: a path, or ``@name`` (abstract)."""

    async def receive(self, within: float = WAIT) -> str:
        async with asyncio.timeout(within):
            data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        return data.decode()

    async def receive_other_than_watchdog(self) -> str:
        """The next message that is not WATCHDOG=1 (bounded: each waits ``WAIT``)."""
        for _ in range(10_000):
            message = await self.receive()
            if message != WATCHDOG:
                return message
        raise AssertionError("only WATCHDOG=1 came")


@contextmanager
def notify_socket(path: Path | None = None) -> Iterator[NotifySocket]:
    """Bound at ``path``, or in the abstract namespace when None."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        if path is None:
            name = f"ses-relay-test-{uuid.uuid4().hex}"
            sock.bind(b"\0" + name.encode())
            shown = f"@{name}"
        else:
            sock.bind(str(path))
            shown = str(path)
        sock.setblocking(False)
        yield NotifySocket(sock, shown)


def fields(message: str) -> dict[str, str]:
    lines = message.split("\n")
    return dict(line.split("=", 1) for line in lines)


def test_the_socket_is_a_path_or_an_abstract_name() -> None:
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": ""}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@/org/systemd/x"}) == b"\0/org/systemd/x"
    with pytest.raises(ValueError, match="vsock:2:1234"):
        notify_address({"NOTIFY_SOCKET": "vsock:2:1234"})


def test_the_watchdog_is_pinged_at_half_its_period_if_it_is_ours() -> None:
    assert watchdog_interval({}, pid=42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, pid=42) is None


def test_the_messages() -> None:
    assert ready("SMTP on 127.0.0.1:25") == "READY=1\nSTATUS=SMTP on 127.0.0.1:25"
    assert reloading(123456789, "reloading") == (
        "RELOADING=1\nMONOTONIC_USEC=123456789\nSTATUS=reloading"
    )
    assert stopping("bye") == "STOPPING=1\nSTATUS=bye"
    assert WATCHDOG == "WATCHDOG=1"
    # A status is one line: a newline in it would start a new assignment.
    assert status("a\nREADY=1") == "STATUS=a READY=1"
    assert len(status("x" * 1000)) == len("STATUS=") + 200


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_a_notifier_sends_one_datagram_per_message(tmp_path: Path, abstract: bool) -> None:
    with notify_socket(None if abstract else tmp_path / "notify") as systemd:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": systemd.name})
        notifier.send(ready("up"))
        notifier.send(WATCHDOG)
        assert await systemd.receive() == "READY=1\nSTATUS=up"
        assert await systemd.receive() == "WATCHDOG=1"


def test_a_socket_that_is_gone_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING):
        notifier.send(ready("up"))
    assert caplog.messages == ["cannot tell systemd READY=1: No such file or directory"]


def test_an_address_it_cannot_speak_to_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert notifier.address is None
    assert caplog.messages == [
        "not telling systemd our state: NOTIFY_SOCKET='vsock:2:1234': "
        "only a path or an @abstract address is supported"
    ]


WATCHDOG_USEC = 200_000
"""The daemon then pings every 0.1 s."""
AS_SYSTEMD = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh"]
"""systemd sets WATCHDOG_PID to the service's pid: the shell's, which execs the daemon."""


async def test_the_daemon_tells_systemd_its_state_in_order(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    config = daemon_config(tmp_path / "relay.toml", fake_ses, spool=tmp_path / "spool")
    with notify_socket() as systemd:
        env = daemon_env(fake_ses, NOTIFY_SOCKET=systemd.name, WATCHDOG_USEC=str(WATCHDOG_USEC))
        async with running_daemon(config, env, wrapper=AS_SYSTEMD, ready=False) as daemon:
            first = fields(await systemd.receive())
            # Nothing before READY=1: the watchdog counts from then.
            assert first.keys() == {"READY", "STATUS"}, first
            assert first["READY"] == "1"
            found = re.search(r"SMTP on ([\d.]+):(\d+)", first["STATUS"])
            assert found is not None, first
            assert re.search(r"metrics on 127\.0\.0\.1:\d+$", first["STATUS"]), first
            # The port accepts the moment READY=1 comes, and the spool is open.
            reader, writer = await asyncio.open_connection(found[1], int(found[2]))
            try:
                banner = await asyncio.wait_for(reader.readline(), WAIT)
                assert banner.startswith(b"220 relay.test "), banner
            finally:
                writer.close()
            assert (tmp_path / "spool" / "lock").read_text() == f"{daemon.pid}\n"

            assert await systemd.receive() == WATCHDOG
            assert await systemd.receive() == WATCHDOG

            before = time.monotonic_ns() // 1000
            daemon.signal(signal.SIGHUP)
            reload = fields(await systemd.receive_other_than_watchdog())
            after = time.monotonic_ns() // 1000
            assert reload.keys() == {"RELOADING", "MONOTONIC_USEC", "STATUS"}
            assert reload["RELOADING"] == "1"
            assert before <= int(reload["MONOTONIC_USEC"]) <= after
            done = fields(await systemd.receive_other_than_watchdog())
            assert done["READY"] == "1"
            assert done["STATUS"].startswith("reloaded: 0 changed, 0 waiting for a restart; ")

            daemon.terminate()
            assert fields(await systemd.receive_other_than_watchdog()) == {
                "STOPPING": "1",
                "STATUS": "stopping: transactions in flight may finish",
            }
            assert await daemon.wait_exit() == 0
        assert daemon.count_log("cannot tell systemd") == 0
