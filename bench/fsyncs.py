"""fsync and fdatasync calls of a server, counted with ``perf stat``.

The same count for every target (the relay, Postfix's daemons, the ceiling),
without touching any of them: the server's command runs under ``perf stat``,
which counts the kernel's ``sys_enter_fsync`` and ``sys_enter_fdatasync``
tracepoints in the server and every process it forks. Counting in the
kernel slows nothing down (``strace -c`` would stop the server at every
system call). The counters start disabled and are switched on and off over
``perf stat --control``, so only the measured window counts; ``perf stat``
writes the totals when the server exits.

Needs ``perf`` (Debian: ``linux-perf``) and the right to read syscall
tracepoints (root, or ``kernel.perf_event_paranoid`` = -1). Without them
``counter()`` returns None and the benchmark reports no fsync figures.
"""

from __future__ import annotations

import functools
import os
import select
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from bench.procs import ChildFailed

EVENTS = ("syscalls:sys_enter_fsync", "syscalls:sys_enter_fdatasync")
ACK_TIMEOUT = 10.0
"""Seconds ``perf stat`` may take to acknowledge enable or disable."""


@functools.cache
def perf() -> str | None:
    """The ``perf`` command when it can count the syscall tracepoints here."""
    command = shutil.which("perf")
    if command is None:
        return None
    try:
        probe = subprocess.run(  # noqa: S603 - perf found on PATH, fixed arguments
            [command, "stat", "-x,", "-e", ",".join(EVENTS), "--", "true"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return command if probe.returncode == 0 else None


class FsyncCounter:
    """Wraps one server's command; counts while enabled."""

    def __init__(self, command: str, output: Path) -> None:
        self.output = output
        self._command = command
        # perf reads control words from one pipe and writes acks to the other.
        self._control_theirs, self._control = os.pipe()
        self._ack, self._ack_theirs = os.pipe()

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return [
            self._command, "stat", "-x,", "-D", "-1",
            "--control", f"fd:{self._control_theirs},{self._ack_theirs}",
            "-e", ",".join(EVENTS), "-o", str(self.output), "--", *argv,
        ]  # fmt: skip

    @property
    def pass_fds(self) -> tuple[int, int]:
        return self._control_theirs, self._ack_theirs

    def started(self) -> None:
        """The child has its ends of the pipes: close ours of them."""
        for fd in self.pass_fds:
            os.close(fd)

    def _say(self, word: str) -> None:
        os.write(self._control, word.encode() + b"\n")
        ready, _, _ = select.select([self._ack], [], [], ACK_TIMEOUT)
        if not ready or not os.read(self._ack, 16).startswith(b"ack"):
            raise ChildFailed(f"perf stat did not acknowledge {word!r}")

    def enable(self) -> None:
        self._say("enable")

    def disable(self) -> None:
        self._say("disable")

    def close(self) -> None:
        for fd in (self._control, self._ack):
            os.close(fd)

    def count(self) -> int:
        """The calls counted while enabled; once perf stat has exited."""
        total = 0
        for line in self.output.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] in EVENTS:
                total += int(fields[0]) if fields[0].isdigit() else 0
        return total


def counter(output: Path) -> FsyncCounter | None:
    command = perf()
    return None if command is None else FsyncCounter(command, output)
