"""The parent of ``smtp.workers = N > 1`` worker processes.

It holds the lock of ``spool.path`` (a second daemon on the same spool stops
there, and ``ses-relay queue retry`` / ``reload`` signal it), moves the
spool's own queue (mail queued before workers were enabled) into
``worker-0/``, picks a port for each listener given port 0 (a bound socket
with SO_REUSEPORT that never listens keeps it for the workers and their
restarts), then starts the workers (``relay.workerproc``): each listens on
every address with SO_REUSEPORT, so the kernel spreads connections over
them, and delivers from its own partition (``relay.partitions``).

It forwards SIGTERM, SIGINT, SIGUSR1 and SIGHUP to every worker; a SIGHUP's
answer for ``ses-relay reload`` is what the workers answered. It restarts a
worker that dies unexpectedly after a back-off that doubles, up to
``RESTART_MAX`` seconds, and gives up on one that failed ``MAX_RESTARTS``
times in a row without running ``STABLE`` seconds (the others adopt its
partition). A worker that fails before the relay was first ready stops the
relay: it cannot start. systemd gets READY=1 once every worker listens,
STOPPING=1, WATCHDOG=1 and RELOADING=1 from here (workers do not talk to it).

``/metrics``, ``/healthz`` and ``/readyz`` are served here for all workers:
the counters and histograms of every process come from prometheus_client's
multiprocess files, the gauges read at scrape from each worker's report
socket (``relay.workerstate``). ``/healthz`` is 200 while this process
runs; ``/readyz`` is 200 when every worker runs and is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from relay import reloadrecord
from relay.app import PARTITION_LOCK_WAIT, REPEATED_SIGNAL, WorkerRole, shown
from relay.config import Config, load_config, split_host_port
from relay.errors import ConfigError, RelayError, SpoolError, SpoolLocked
from relay.httpserver import HttpServer, Readiness
from relay.log import configure as configure_logging
from relay.log import delivery_log, smtp_log
from relay.metrics import RelayMetrics, State
from relay.partitions import partition_path
from relay.reload import Outcome, plan_reload
from relay.sdnotify import Notifier, keep_alive, ready, reloading, stopping, watchdog_interval
from relay.spool import DEAD, QUEUE, Spool
from relay.workerstate import combine, combine_readiness, report_from_json

RESTART_FIRST = 0.5
"""Seconds before the first restart of a worker that died."""
RESTART_MAX = 30.0
MAX_RESTARTS = 5
"""Restarts in a row (each ran less than ``STABLE`` seconds) before giving up."""
STABLE = 60.0
REPORT_TIMEOUT = 5.0
"""Seconds a worker may take to answer on its report socket."""
RELOAD_WAIT = 8.0
"""Seconds the workers may take to answer a reload (``ses-relay reload`` waits 10)."""
POLL = 0.05
"""Seconds between two readings of a worker's reload record."""
_SYSTEMD = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    gave_up: bool = False
    started: float = field(default=0.0)


class Supervisor:
    """Starts, watches and stops the workers."""

    def __init__(self, config: Config, env: Mapping[str, str], metrics_dir: Path) -> None:
        self.config = config
        self._env = env
        self._metrics_dir = metrics_dir
        self._count = config.smtp.workers
        self._workers = [_Worker(index) for index in range(self._count)]
        self._reserved: list[socket.socket] = []
        self._listen: tuple[str, ...] = ()
        self._tls_listen: tuple[str, ...] = ()
        self.metrics = RelayMetrics(multiprocess_dir=str(metrics_dir))
        self._state = combine([])
        self.metrics.add_state(lambda: self._state)
        self._http: HttpServer | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.stopping = False
        self.failure: str | None = None
        self.ever_ready = False
        """Every worker was ready once: from then on, one that dies is restarted."""
        self._changed = asyncio.Condition()
        """Notified when a worker becomes ready or exits, and at a stop."""
        self._watchers: list[asyncio.Task[None]] = []

    # -- start

    def take_root(self) -> Spool:
        """Lock ``spool.path`` and move its queue into worker 0's partition."""
        root = Spool(self.config.spool.path)
        try:
            root.open()
        except SpoolLocked:
            raise
        except SpoolError as exc:
            raise SpoolError(
                f"{exc} (spool.path in {self.config.source})", errno=exc.errno
            ) from None
        try:
            first = Spool(partition_path(root.path, 0))
            first.open(lock_wait=PARTITION_LOCK_WAIT)
            try:
                queued, dead = first.adopt(root, QUEUE), first.adopt(root, DEAD)
            finally:
                first.close()
        except BaseException:
            root.close()
            raise
        if queued or dead:
            delivery_log.warning(
                "moved %d queued and %d dead messages from %s to %s (smtp.workers = %d)",
                len(queued),
                len(dead),
                root.path,
                first.path,
                self._count,
            )
        return root

    def reserve_ports(self) -> None:
        """Choose the port of each listener given port 0, for every worker."""
        self._listen = tuple(self._reserve(a) for a in self.config.smtp.listen)
        self._tls_listen = tuple(self._reserve(a) for a in self.config.smtp.tls_listen)

    def _reserve(self, address: str) -> str:
        host, port = split_host_port(address)
        if port != 0:
            return address
        try:
            family, kind, proto, _, where = socket.getaddrinfo(
                host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(where)
        except OSError as exc:
            raise RelayError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        self._reserved.append(sock)
        bound_host, bound_port = sock.getsockname()[:2]
        return shown(bound_host, bound_port)

    async def start_http(self) -> None:
        self._http = HttpServer(self._exposition, self._checks)
        self.metrics_address = await self._http.start(self.config.metrics.listen)
        smtp_log.info("metrics on http://%s:%d/metrics", *self.metrics_address)

    def start_workers(self) -> None:
        self._watchers = [
            asyncio.create_task(self._keep(worker), name=f"relay-worker-{worker.index}")
            for worker in self._workers
        ]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_ready(self) -> bool:
        """True once every worker listens; False if one failed first (or a stop came)."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    self.stopping
                    or self.failure is not None
                    or all(worker.ready for worker in self._workers)
                )
            )
        return not self.stopping and self.failure is None

    async def wait_failed(self) -> None:
        """Return when the workers cannot run (``failure``)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.failure is not None)

    # -- the workers

    def _role(self, index: int) -> WorkerRole:
        return WorkerRole(
            index=index,
            count=self._count,
            listen=self._listen,
            tls_listen=self._tls_listen,
            report_path=str(self._report_path(index)),
        )

    def _report_path(self, index: int) -> Path:
        return self._metrics_dir / f"worker-{index}.sock"

    def _worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in self._env.items() if k not in _SYSTEMD}
        return env | {"PROMETHEUS_MULTIPROC_DIR": str(self._metrics_dir)}

    async def _spawn(self, worker: _Worker) -> asyncio.subprocess.Process:
        self._report_path(worker.index).unlink(missing_ok=True)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay.workerproc",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self._worker_env(),
        )
        assert process.stdin is not None
        process.stdin.write(pickle.dumps((self.config, self._role(worker.index))))
        with contextlib.suppress(ConnectionError):
            await process.stdin.drain()  # left open: the worker stops when it closes
        smtp_log.info("worker %d started (pid %d)", worker.index, process.pid)
        return process

    async def _keep(self, worker: _Worker) -> None:
        """Run ``worker``, restarting it when it dies unexpectedly."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            process = worker.process = await self._spawn(worker)
            worker.started = loop.time()
            assert process.stdin is not None
            assert process.stdout is not None
            if await process.stdout.readline() == b"ready\n":
                worker.ready = True
                smtp_log.info("worker %d (pid %d) ready", worker.index, process.pid)
                await self._notify()
            status = await process.wait()
            process.stdin.close()
            worker.ready, worker.process = False, None
            mark_process_dead(process.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
            if self.stopping:
                return
            if not self.ever_ready:
                self.failure = f"worker {worker.index} exited with status {status} at start"
                await self._notify()
                return
            ran = loop.time() - worker.started
            worker.restarts = 1 if ran >= STABLE else worker.restarts + 1
            if worker.restarts > MAX_RESTARTS:
                worker.gave_up = True
                smtp_log.error(
                    "worker %d (pid %d) exited with status %d, %d times in a row: not "
                    "restarted again; the other workers adopt its spool partition",
                    worker.index,
                    process.pid,
                    status,
                    MAX_RESTARTS + 1,
                )
                if all(w.gave_up for w in self._workers):
                    self.failure = "every worker failed"
                    await self._notify()
                return
            delay = min(RESTART_MAX, RESTART_FIRST * 2 ** (worker.restarts - 1))
            smtp_log.error(
                "worker %d (pid %d) exited unexpectedly with status %d: restarting it in %gs",
                worker.index,
                process.pid,
                status,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay), self._changed:
                    await self._changed.wait_for(lambda: self.stopping)

    def signal_all(self, signum: int, *, ready_only: bool = False) -> None:
        """Send ``signum`` to every worker (only those that handle it yet:
        SIGHUP or SIGUSR1 would end one that is still starting)."""
        for worker in self._workers:
            if worker.process is not None and (worker.ready or not ready_only):
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    def retry_now(self) -> None:
        """``ses-relay queue retry`` (SIGUSR1): every worker re-reads its queue."""
        self.signal_all(signal.SIGUSR1, ready_only=True)

    async def stop(self) -> None:
        """Stop every worker (SIGTERM) and wait for them all to exit."""
        self.stopping = True
        await self._notify()
        self.signal_all(signal.SIGTERM)
        await asyncio.gather(*self._watchers, return_exceptions=True)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.stop()
            self._http = None
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()

    # -- what the workers say

    async def _report(self, index: int) -> tuple[State, Readiness] | None:
        try:
            async with asyncio.timeout(REPORT_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(self._report_path(index))
                try:
                    return report_from_json(await reader.read())
                finally:
                    writer.close()
        except (OSError, TimeoutError, ValueError, KeyError, TypeError):
            return None

    async def _reports(self) -> dict[int, tuple[State, Readiness] | None]:
        running = [w.index for w in self._workers if w.ready]
        answers = await asyncio.gather(*(self._report(index) for index in running))
        return dict(zip(running, answers, strict=True))

    async def _exposition(self) -> bytes:
        reports = await self._reports()
        self._state = combine([report[0] for report in reports.values() if report is not None])
        return await asyncio.to_thread(self.metrics.exposition)

    async def _checks(self) -> Readiness:
        reports = await self._reports()
        readiness = combine_readiness(
            {i: None if r is None else r[1] for i, r in reports.items()}, self._count
        )
        if self.stopping:
            return replace(readiness, checks=dict(readiness.checks) | {"smtp": "stopping"})
        return readiness

    # -- reload

    async def reload(self, env: Mapping[str, str]) -> Outcome | None:
        """SIGHUP every worker and wait for their answers; the first refusal,
        else what they applied; None when none answered."""
        began = time.monotonic_ns()
        running = [(w.index, w.process.pid) for w in self._workers if w.ready and w.process]
        self.signal_all(signal.SIGHUP, ready_only=True)
        root = Path(self.config.spool.path)
        outcomes = await asyncio.gather(
            *(_answer(partition_path(root, index), pid, began) for index, pid in running)
        )
        answered = [outcome for outcome in outcomes if outcome is not None]
        if len(answered) < len(running):
            smtp_log.warning(
                "reload: %d of %d workers did not answer within %gs",
                len(running) - len(answered),
                len(running),
                RELOAD_WAIT,
            )
        if not answered:
            return None
        outcome = next((o for o in answered if o.refused), answered[0])
        if not outcome.refused:
            with contextlib.suppress(ConfigError):  # for the workers started from now on
                source = self.config.source
                new = await asyncio.to_thread(
                    load_config, None if source == "defaults" else source, env
                )
                self.config = plan_reload(self.config, new).config
        record = reloadrecord.Record(os.getpid(), began, outcome)
        await asyncio.to_thread(reloadrecord.write, root, record)
        self.metrics.config_reload(refused=outcome.refused)
        return outcome

    def summary(self) -> str:
        places = [f"SMTP on {address}" for address in self._listen]
        places += [f"SMTPS on {address}" for address in self._tls_listen]
        if self.metrics_address is not None:
            places.append(f"metrics on {shown(*self.metrics_address)}")
        return f"{self._count} workers; " + ", ".join(places)


async def _answer(partition: Path, pid: int, began: int) -> Outcome | None:
    """A worker's answer to the SIGHUP sent at ``began`` (its reload record)."""
    deadline = time.monotonic() + RELOAD_WAIT
    while time.monotonic() < deadline:
        record = await asyncio.to_thread(reloadrecord.read, partition)
        if reloadrecord.answers(record, pid, began):
            assert record is not None
            return record.outcome
        await asyncio.sleep(POLL)
    return None


async def supervise(config: Config, env: Mapping[str, str], metrics_dir: Path) -> int:
    """Run the workers until SIGTERM or SIGINT; 0 when stopped, 1 when they could
    not run. ``metrics_dir`` is ``PROMETHEUS_MULTIPROC_DIR`` (set before
    prometheus_client was imported; ``relay.metricsdir``)."""
    configure_logging(config.log.format, config.log.level)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload_wanted = asyncio.Event()
    supervisor = Supervisor(config, env, metrics_dir)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, supervisor.retry_now)
    loop.add_signal_handler(signal.SIGHUP, reload_wanted.set)
    notifier = Notifier.from_env(env)
    interval = watchdog_interval(env, os.getpid())
    tasks: list[asyncio.Task[None]] = []
    root = await asyncio.to_thread(supervisor.take_root)
    try:
        supervisor.reserve_ports()
        await supervisor.start_http()
        supervisor.start_workers()
        if interval is not None:
            tasks.append(asyncio.create_task(keep_alive(notifier, interval)))
        stopped = asyncio.create_task(stop.wait())
        readying = asyncio.create_task(supervisor.wait_ready())
        await asyncio.wait((stopped, readying), return_when=asyncio.FIRST_COMPLETED)
        if readying.done() and readying.result():
            supervisor.ever_ready = True
            smtp_log.info("ses-relay ready")
            notifier.send(ready(supervisor.summary()))
            tasks.append(asyncio.create_task(_reloads(supervisor, reload_wanted, notifier, env)))
            failed = asyncio.create_task(supervisor.wait_failed())
            await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
            failed.cancel()
        readying.cancel()
        stopped.cancel()
        first = loop.time()

        def second_signal() -> None:
            if loop.time() - first >= REPEATED_SIGNAL:
                supervisor.signal_all(signal.SIGTERM)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, second_signal)
        smtp_log.info("stopping: every worker is told to stop")
        notifier.send(stopping("stopping: transactions in flight may finish"))
        await supervisor.stop()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await supervisor.close()
        root.close()
    if supervisor.failure is not None:
        smtp_log.error("ses-relay stopped: %s", supervisor.failure)
        return 1
    smtp_log.info("ses-relay stopped", extra={"event": "stopped"})
    return 0


async def _reloads(
    supervisor: Supervisor, wanted: asyncio.Event, notifier: Notifier, env: Mapping[str, str]
) -> None:
    """Reload on each SIGHUP; those that come during a reload make one more."""
    while True:
        await wanted.wait()
        wanted.clear()
        notifier.send(reloading(time.monotonic_ns() // 1000, "reloading"))
        outcome = await supervisor.reload(env)
        configure_logging(supervisor.config.log.format, supervisor.config.log.level)
        status = "no worker answered" if outcome is None else outcome.status()
        notifier.send(ready(f"{status}; {supervisor.summary()}"))
