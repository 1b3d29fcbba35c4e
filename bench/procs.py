"""Child processes of the benchmark: started with their output in a log file,
waited for with a bound, and always stopped and reaped.

Each child runs in its own session (a ^C in the terminal reaches only the
driver, which then stops the children itself) and, on Linux, gets SIGKILL
when the driver dies (``PR_SET_PDEATHSIG``), so even a killed driver leaves
nothing running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT = 10.0
"""Seconds a child may take to exit after SIGTERM, then again after SIGKILL."""
_POLL = 0.05
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


class ChildFailed(RuntimeError):
    """A child did not start, did not answer in time, or failed."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def python_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (this environment by default) with the repository importable
    and output unbuffered."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Child:
    """One child process whose stdout and stderr go to ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str],
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and modules
                list(argv),
                cwd=REPO,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=pass_fds,
                # The driver has no other threads when it starts a child.
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )

    @classmethod
    def python(
        cls, name: str, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> Child:
        """``python ARGS`` with this interpreter."""
        return cls(name, [sys.executable, *args], log_path, env or python_env())

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def failed(self, what: str) -> ChildFailed:
        status = self.process.poll()
        state = "running" if status is None else f"exit status {status}"
        return ChildFailed(
            f"{self.name} ({state}): {what}; last lines of its log:\n{self.log_tail()}"
        )

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in the log; ChildFailed if the child
        exits first or nothing matches within ``timeout`` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            exited = self.process.poll() is not None
            match = regex.search(self.log())
            if match is not None:
                return match
            if exited:
                raise self.failed(f"exited before logging {pattern!r}")
            if time.monotonic() >= deadline:
                raise self.failed(f"logged no {pattern!r} within {timeout:g}s")
            time.sleep(_POLL)

    def wait_exit(self, timeout: float) -> int:
        """The exit status; ChildFailed (the child still running) after ``timeout`` s."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self.failed(f"did not finish within {timeout:g}s") from None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to its process group (with ``perf stat``,
        the server under it too); always reaped. Never raises."""
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signum)  # its own session: the group is its pid
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT)


def _stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` from field 3 (state) on: the name may hold spaces."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def _children_by_parent() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def only_child(pid: int, timeout: float = 10.0) -> int:
    """The one child of ``pid`` (e.g. the server ``perf stat`` runs)."""
    deadline = time.monotonic() + timeout
    while not (children := _children_by_parent().get(pid)):
        if time.monotonic() >= deadline:
            raise ChildFailed(f"process {pid} started no child within {timeout:g}s")
        time.sleep(_POLL)
    return children[0]


class ProcessTree:
    """A server's processes: ``root`` and everything it started (Postfix's
    master and its daemons; the relay or the ceiling alone), read from
    ``/proc`` when asked."""

    def __init__(self, root: int) -> None:
        self.root = root

    def pids(self) -> list[int]:
        tree = _children_by_parent()
        found, pending = [], [self.root]
        while pending:
            pid = pending.pop()
            found.append(pid)
            pending.extend(tree.get(pid, []))
        return found

    def cpu_times(self) -> tuple[float, float]:
        """User and system CPU seconds so far of the live processes (fields
        14, 15) and of the children they reaped (16, 17): a daemon that exits
        moves its time into its parent's, so the sum only grows."""
        user = system = 0
        for pid in self.pids():
            try:
                fields = _stat_fields(pid)
            except OSError:
                continue  # exited meanwhile: counted in its parent's from now on
            user += int(fields[11]) + int(fields[13])
            system += int(fields[12]) + int(fields[14])
        return user / _CLOCK_TICKS, system / _CLOCK_TICKS

    def peak_rss_mb(self) -> float:
        """The sum of the live processes' peak resident set sizes (``VmHWM``),
        in MiB: for one process its peak; for several an upper bound of their
        peak together (shared pages count once per process)."""
        total_kb = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total_kb += sum(
                int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")
            )
        return total_kb / 1024


class Stoppable(Protocol):
    def stop(self) -> None:
        """Stop it, whatever its state; never raises."""


S = TypeVar("S", bound=Stoppable)


class Children:
    """Every child started through it is stopped when the ``with`` block ends
    (a server started under ``perf stat`` or by Postfix's master, first)."""

    def __init__(self) -> None:
        self._children: list[Stoppable] = []

    def add(self, child: S) -> S:
        self._children.append(child)
        return child

    def stop(self, child: Stoppable) -> None:
        child.stop()
        with contextlib.suppress(ValueError):
            self._children.remove(child)

    def stop_all(self) -> None:
        while self._children:
            self._children.pop().stop()

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt, so cleanup runs as on ^C."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_Result = TypeVar("_Result")


def run_in_temp_dir(
    name: str,
    prefix: str,
    parent: Path | None,
    keep: bool,
    work: Callable[[Path], _Result],
    *,
    mode: int | None = None,
) -> tuple[int, _Result | None]:
    """``work`` in a new temporary directory (removed after, unless ``keep``),
    SIGTERM and SIGHUP ending it as ^C does: ``(0, its result)``, or the exit
    status (1 for a child that failed, 130 when interrupted) and None, with
    one line on stderr saying why."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    if mode is not None:
        workdir.chmod(mode)
    try:
        with terminate_as_interrupt():
            return 0, work(workdir)
    except ChildFailed as failure:
        print(f"{name} failed: {failure}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print(f"{name} interrupted", file=sys.stderr)
        return 130, None
    finally:
        if keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
