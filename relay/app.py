"""The daemon: configuration → listeners, SES client, handler; start and stop.

``Relay`` is the running relay (used by ``serve`` and by the tests);
``serve`` runs one in the foreground until SIGTERM or SIGINT, reloads it on
SIGHUP, and tells systemd how it is (``relay.sdnotify``). With
``smtp.workers > 1`` each worker process is a ``Relay`` with a
``WorkerRole`` (``relay.supervisor`` starts them): its own spool partition,
listeners shared with the others (SO_REUSEPORT), and a report socket the
parent reads for ``/metrics`` and ``/readyz`` in place of its own HTTP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from relay import reloadrecord
from relay.auth import Authenticator
from relay.bouncecheck import check_bounce_sender
from relay.clock import SystemClock
from relay.config import Config, load_config, split_host_port
from relay.delivery import Delivery
from relay.errors import ConfigError, RelayError, SpoolError, SpoolLocked
from relay.handler import RelayHandler
from relay.httpserver import HttpServer, Readiness
from relay.log import configure as configure_logging
from relay.log import delivery_log, smtp_log
from relay.metrics import RelayMetrics, State
from relay.partitions import adopt_orphans, partition_path, partition_paths
from relay.reload import Outcome, plan_reload
from relay.resources import Resources, load_resources
from relay.sdnotify import Notifier, keep_alive, ready, reloading, stopping, watchdog_interval
from relay.ses.api import connect
from relay.ses.client import SesClient
from relay.ses.credentials import RefreshingProvider, default_chain
from relay.ses.http import new_session
from relay.smtp import ConnectionLimiter, RelaySMTP, smtp_factory
from relay.space import FreeSpace, floor_for
from relay.spool import Census, Spool
from relay.workerstate import report_json

SHUTDOWN_GRACE = 30.0
"""Seconds in-flight SMTP sessions get to finish after SIGTERM."""
ADOPT_INTERVAL = 10.0
"""Seconds between a worker's looks for partitions whose worker is gone."""
PARTITION_LOCK_WAIT = 30.0
"""Seconds a worker waits for its partition's lock (another worker may be
adopting it, while this one was down)."""


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """Worker ``index`` of ``count`` (``smtp.workers``)."""

    index: int
    count: int
    listen: tuple[str, ...]
    """``smtp.listen`` with any port 0 replaced by the one the parent chose."""
    tls_listen: tuple[str, ...]
    report_path: str
    """The Unix socket where this worker tells the parent its state."""


class Relay:
    """A running relay. ``async with Relay(config, env) as relay: ...``"""

    def __init__(
        self, config: Config, env: Mapping[str, str], role: WorkerRole | None = None
    ) -> None:
        self.config = config
        self._env = env
        self.role = role
        self._report: asyncio.Server | None = None
        self._servers: list[asyncio.Server] = []
        self._http: aiohttp.ClientSession | None = None
        self._credentials: RefreshingProvider | None = None
        self.spool: Spool | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._grace_over = asyncio.Event()
        """Set by ``end_grace``: ``stop`` waits no longer."""
        self.delivery: Delivery | None = None
        self.space: FreeSpace | None = None
        """The spool's free space against its floor (set with the spool)."""
        self._authenticator: Authenticator | None = None
        self._tls_context: ssl.SSLContext | None = None
        """The certificate loaded last: every new TLS handshake uses it."""
        self._factories: list[Callable[[], RelaySMTP]] = []
        """Sessions of each listener (``smtp.listen``, then ``smtp.tls_listen``),
        made from the configuration in force; ``reload`` replaces them."""
        self.metrics = RelayMetrics()
        self.limiter = ConnectionLimiter(
            config.smtp.max_connections, config.smtp.max_connections_per_client, self.metrics
        )
        self.smtp_addresses: list[tuple[str, int]] = []
        """Where the plain (STARTTLS) listeners are, in ``smtp.listen`` order."""
        self.tls_addresses: list[tuple[str, int]] = []
        """Where the implicit-TLS listeners are, in ``smtp.tls_listen`` order."""
        self.metrics.add_state(self._state)
        self._http_server: HttpServer | None = None
        self.metrics_address: tuple[str, int] | None = None
        """Where /metrics, /healthz and /readyz are served (``metrics.listen``)."""

    async def start(self) -> None:
        """Open the spool (its lock first: a second daemon stops here, before
        anything else is set up), resume its queue, then listen. A failure
        undoes whatever was started."""
        config, role = self.config, self.role
        resources = load_resources(config)
        root = Path(config.spool.path)
        try:
            self.spool = Spool(root if role is None else partition_path(root, role.index))
            wait = PARTITION_LOCK_WAIT if role is not None else 0.05
            try:
                await asyncio.to_thread(functools.partial(self.spool.open, lock_wait=wait))
            except SpoolLocked:
                raise
            except SpoolError as exc:
                raise SpoolError(
                    f"{exc} (spool.path in {config.source})", errno=exc.errno
                ) from None
            self._http = new_session(
                tls=resources.ses_tls, max_connections=config.ses.max_connections
            )
            self._credentials = default_chain(
                self._env, session=self._http, region=config.ses.region
            )
            self._in_background(self._credentials.keep_fresh())
            ses = connect(
                config.ses, self._credentials, session=self._http, observe=self.metrics.ses_call
            )
            self.space = FreeSpace(
                self.spool.free_bytes, floor_for(config.smtp.max_message_size), SystemClock()
            )
            await self.space.refresh()
            await self._adopt(every=role is None, reason="left from a run with more workers")
            self.delivery = Delivery(
                config, self.spool, ses.sender, space=self.space, metrics=self.metrics
            )
            await self.delivery.start()
            self._in_background(self._check_bounce_sender(ses.v1))
            if resources.users is not None:
                self._authenticator = Authenticator(
                    resources.users, config.auth, observe=self.metrics.auth_attempt
                )
            self._use(config, resources)
            loop = asyncio.get_running_loop()
            for address in config.smtp.listen if role is None else role.listen:
                self.smtp_addresses.append(
                    await self._listen(loop, address, resources, implicit_tls=False)
                )
            for address in config.smtp.tls_listen if role is None else role.tls_listen:
                self.tls_addresses.append(
                    await self._listen(loop, address, resources, implicit_tls=True)
                )
            if role is not None:
                self._report = await asyncio.start_unix_server(self._tell, role.report_path)
                self._in_background(self._adopt_now_and_then())
                return
            self._http_server = HttpServer(self._exposition, self._checks)
            self.metrics_address = await self._http_server.start(config.metrics.listen)
            smtp_log.info("metrics on http://%s:%d/metrics", *self.metrics_address)
        except BaseException:
            await self.stop(grace=0)
            raise

    def _use(self, config: Config, resources: Resources) -> None:
        """Make ``config`` and ``resources`` what new connections get."""
        assert self.delivery is not None
        self.config = config
        self.limiter.max_connections = config.smtp.max_connections
        self.limiter.max_per_client = config.smtp.max_connections_per_client
        if self._authenticator is not None and resources.users is not None:
            self._authenticator.users = resources.users
        if resources.tls_context is not None:
            resources.tls_context.sni_callback = self._use_current_tls
        self._tls_context = resources.tls_context
        assert self.space is not None
        handler = RelayHandler(config, self.delivery, self.space, metrics=self.metrics)
        kinds = [False] * len(config.smtp.listen) + [True] * len(config.smtp.tls_listen)
        self._factories = [
            smtp_factory(
                config.smtp,
                handler,
                tls_context=resources.tls_context,
                limiter=self.limiter,
                implicit_tls=implicit_tls,
                authenticator=self._authenticator,
            )
            for implicit_tls in kinds
        ]

    def _use_current_tls(
        self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        """Every server context's ``sni_callback``, run at each handshake (on
        an implicit-TLS listener, whose context is fixed when it starts
        listening, and at STARTTLS alike): switch to the one loaded last."""
        current = self._tls_context
        if current is not None and current is not context:
            connection.context = current

    def _new_session(self, listener: int) -> RelaySMTP:
        """A session for a connection to ``listener``, as the configuration in force says."""
        return self._factories[listener]()

    async def _listen(
        self,
        loop: asyncio.AbstractEventLoop,
        address: str,
        resources: Resources,
        *,
        implicit_tls: bool,
    ) -> tuple[str, int]:
        host, port = split_host_port(address)
        listener = len(self._servers)
        try:
            server = await loop.create_server(
                functools.partial(self._new_session, listener),
                host,
                port,
                ssl=resources.tls_context if implicit_tls else None,
                reuse_address=True,
                reuse_port=self.role is not None,
            )
        except OSError as exc:
            raise RelayError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        self._servers.append(server)
        bound_host, bound_port = server.sockets[0].getsockname()[:2]
        smtp_log.info(
            "listening on %s%s",
            shown(bound_host, bound_port),
            " (implicit TLS)" if implicit_tls else "",
        )
        return bound_host, bound_port

    async def reload(self) -> Outcome:
        """Read the configuration file again, and the files it names (TLS
        certificate and key, users file). New sessions get what changed;
        sessions in flight keep what they started with; settings built once
        at start keep their old values and are named in the log. An invalid
        configuration changes nothing."""
        source = self.config.source
        try:
            new = await asyncio.to_thread(
                load_config, None if source == "defaults" else source, self._env
            )
            resources = await asyncio.to_thread(load_resources, new)
            change = plan_reload(self.config, new)
            if change.config != new:
                resources = await asyncio.to_thread(load_resources, change.config)
        except ConfigError as exc:
            smtp_log.error(
                "reload refused, the configuration in force is unchanged: %s",
                "; ".join(exc.problems),
            )
            return Outcome(source, problems=tuple(exc.problems))
        self._use(change.config, resources)
        files = [
            name
            for name, loaded in (
                ("the TLS certificate and key", resources.tls_context),
                ("the users file", resources.users),
            )
            if loaded is not None
        ]
        smtp_log.info(
            "reloaded %s: new sessions get %s%s",
            source,
            ", ".join(change.applied) or "the same settings",
            f"; read again: {', '.join(files)}" if files else "",
        )
        if change.need_restart:
            smtp_log.warning(
                "reload: %s changed but need a restart; the old values stay in force until then",
                ", ".join(change.need_restart),
            )
        return Outcome(source, change.applied, change.need_restart, tuple(files))

    def summary(self) -> str:
        """Where the relay listens, for ``systemctl status``."""
        places = [f"SMTP on {shown(*address)}" for address in self.smtp_addresses]
        places += [f"SMTPS on {shown(*address)}" for address in self.tls_addresses]
        if self.metrics_address is not None:
            places.append(f"metrics on {shown(*self.metrics_address)}")
        return ", ".join(places)

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop: new connections and idle sessions get 421; transactions and SES
        calls in flight may finish for up to ``grace`` seconds, then everything
        is closed; what is not delivered stays queued."""
        ends = asyncio.get_running_loop().time() + grace
        # Idle sessions and new connections get 421 at once; sessions inside a
        # transaction get it when the transaction ends.
        self.limiter.drain()
        await self._within_grace(self.limiter.wait_idle(grace), ends)
        for server in self._servers:
            server.close()
        self.limiter.close_all()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self.delivery is not None:
            await self._within_grace(self.delivery.quiesce(), ends)
            await self.delivery.stop()
            self.delivery = None
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.spool is not None:
            self.spool.close()
            self.spool = None
            self.space = None
        if self._authenticator is not None:
            self._authenticator.close()
            self._authenticator = None
        if self._credentials is not None:
            await self._credentials.aclose()  # its refreshes use the session
            self._credentials = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._http_server is not None:
            await self._http_server.stop()
            self._http_server = None
        if self._report is not None:
            self._report.close()
            await self._report.wait_closed()
            self._report = None

    async def _adopt(self, *, every: bool, reason: str) -> None:
        """Take over the partitions (``relay.partitions``) whose lock is free:
        with ``every``, all of them but this worker's own; else those of
        workers beyond ``smtp.workers``."""
        spool, role = self.spool, self.role
        assert spool is not None
        root = Path(self.config.spool.path)
        own = None if role is None else partition_path(root, role.index)
        count = 0 if role is None else role.count
        candidates = [
            path
            for path in await asyncio.to_thread(partition_paths, root)
            if path != own and (every or int(path.name.rpartition("-")[2]) >= count)
        ]
        if not candidates:
            return
        adopted = await asyncio.to_thread(adopt_orphans, spool, candidates, reason=reason)
        if self.delivery is not None:
            self.delivery.take_over(adopted)

    async def _adopt_now_and_then(self) -> None:
        """A worker: adopt, every ``ADOPT_INTERVAL``, the partitions of
        workers that are gone (crashed and not restarted)."""
        while True:
            await asyncio.sleep(ADOPT_INTERVAL)
            try:
                await self._adopt(every=True, reason="its worker is gone")
            except SpoolError as exc:
                delivery_log.error("%s", exc)

    async def _tell(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The report socket: this worker's state and readiness, then close."""
        try:
            state = await asyncio.to_thread(self._state)
            writer.write(report_json(state, self._readiness()))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _exposition(self) -> bytes:
        return await asyncio.to_thread(self.metrics.exposition)

    async def _checks(self) -> Readiness:
        return self._readiness()

    def _state(self) -> State:
        """The spool's contents, delivery and connections, for a scrape (runs in
        a thread: it lists the spool)."""
        spool, delivery, limiter = self.spool, self.delivery, self.limiter
        credentials = self._credentials
        census = spool.census() if spool is not None else Census(0, 0, None)
        arrived = census.oldest_arrival
        return State(
            queued=census.queued,
            dead=census.dead,
            oldest_age=max(0.0, time.time() - arrived) if arrived is not None else 0.0,
            pause_remaining=delivery.account.pause_left() if delivery is not None else 0.0,
            send_rate=delivery.account.rate.effective_rate if delivery is not None else 0.0,
            quota=delivery.account.quota if delivery is not None else None,
            smtp_open=limiter.active,
            smtp_max=limiter.max_connections,
            credentials_expiry=credentials.seconds_left() if credentials is not None else None,
        )

    def _readiness(self) -> Readiness:
        """``/readyz``: whether this relay accepts and keeps mail, and SES's state."""
        delivery = self.delivery
        smtp = "ok"
        if self.limiter.draining:
            smtp = "stopping"
        elif not (self.smtp_addresses or self.tls_addresses):
            smtp = "not listening"
        spool = "ok"
        if delivery is None:
            spool = "not open"
        elif self.space is not None and not self.space.ok():
            spool = "no room: free space is below 1.5 x smtp.max_message_size"
        pause = delivery.account.pause_left() if delivery is not None else 0.0
        ses = "ok" if pause <= 0 else f"all delivery paused for {pause:.0f}s more (see the log)"
        return Readiness(checks={"smtp": smtp, "spool": spool}, ses=ses)

    def end_grace(self) -> None:
        """Cut a ``stop`` in progress short: what is open is closed at once
        (a second SIGTERM or SIGINT)."""
        if not self._grace_over.is_set():
            smtp_log.warning(
                "stopping now: open sessions get 421; SES calls in flight are abandoned "
                "and their messages stay queued"
            )
        self._grace_over.set()

    async def _within_grace(self, waiting: Awaitable[object], ends: float) -> None:
        """Await ``waiting`` until ``ends`` (loop time) or ``end_grace``."""
        work = asyncio.ensure_future(waiting)
        cut = asyncio.ensure_future(self._grace_over.wait())
        try:
            await asyncio.wait(
                (work, cut),
                timeout=max(0.0, ends - asyncio.get_running_loop().time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for task in (work, cut):
                task.cancel()
            await asyncio.gather(work, cut, return_exceptions=True)

    def retry_now(self) -> None:
        """Re-read the queue and try what is due (``ses-relay queue retry``);
        a worker first adopts the partitions of workers that are gone."""
        if self.delivery is None:
            return
        if self.role is not None:
            self._in_background(self._adopt(every=True, reason="its worker is gone"))
        self._in_background(self.delivery.retry_now())

    def _in_background(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _check_bounce_sender(self, ses: SesClient) -> None:
        """Tell the operator when SES will refuse the bounces (start goes on)."""
        check = await check_bounce_sender(self.config, ses)
        if check is None:
            return
        if check.verified is False:
            delivery_log.warning("%s", check.text)
        else:
            delivery_log.info("%s", check.text)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def shown(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


REPEATED_SIGNAL = 1.0
"""Seconds after the first SIGTERM/SIGINT before another one ends the grace."""


async def serve(config: Config, env: Mapping[str, str], role: WorkerRole | None = None) -> int:
    """Run until SIGTERM or SIGINT; then stop gracefully and return 0.

    A worker (``role``) says "ready" on its standard output, a pipe from the
    parent, instead of to systemd, and leaves counting reloads to the parent.

    Logs to stderr as ``config.log`` says, and as the new configuration says
    after each reload. SIGHUP reloads (``Relay.reload``). Under systemd (``$NOTIFY_SOCKET``)
    it says READY=1 once the spool is open and every listener accepts,
    RELOADING=1 and READY=1 around each reload, STOPPING=1 when it begins to
    stop, and WATCHDOG=1 from the event loop when ``WatchdogSec=`` asks.
    """
    worker = role is not None
    configure_logging(config.log.format, config.log.level, pid=worker)
    name = "ses-relay" if role is None else f"ses-relay worker {role.index}"
    stop = asyncio.Event()
    reload_wanted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    relay = Relay(config, env, role)
    notifier = Notifier.from_env(env)
    # Before the spool lock is taken: `ses-relay queue retry` signals whoever holds it.
    loop.add_signal_handler(signal.SIGUSR1, relay.retry_now)
    # One that comes while the relay starts is done once it is ready.
    loop.add_signal_handler(signal.SIGHUP, reload_wanted.set)
    interval = watchdog_interval(env, os.getpid())
    watchdog: asyncio.Task[None] | None = None
    try:
        async with relay:
            # What start-up made (modules, configuration, clients) lives as
            # long as the process: out of the collector's way, so that a full
            # collection under load scans the objects of the mail in flight,
            # not 40 000 of them (tens of ms of frozen event loop, the p99).
            gc.freeze()
            smtp_log.info("%s ready", name)
            notifier.send(ready(relay.summary()))
            if worker:
                sys.stdout.write("ready\n")
                sys.stdout.flush()
            if interval is not None:  # until the relay has stopped
                watchdog = asyncio.create_task(keep_alive(notifier, interval))
            reloads = asyncio.create_task(_reloads(relay, reload_wanted, notifier))
            try:
                await stop.wait()
            finally:
                await _cancel(reloads)
            first = loop.time()

            def second_signal() -> None:
                # One ^C can arrive twice (a wrapper forwards what the terminal
                # already sent to the whole process group): only a later one counts.
                if loop.time() - first >= REPEATED_SIGNAL:
                    relay.end_grace()

            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, second_signal)
            smtp_log.info(
                "stopping: 421 to new and idle sessions; transactions in flight may finish "
                "(a second SIGTERM or SIGINT stops at once)"
            )
            notifier.send(stopping("stopping: transactions in flight may finish"))
    finally:
        if watchdog is not None:
            await _cancel(watchdog)
    smtp_log.info("%s stopped", name, extra={"event": "stopped"})
    return 0


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it; what it raised before is raised."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _reloads(relay: Relay, wanted: asyncio.Event, notifier: Notifier) -> None:
    """Reload on each SIGHUP; those that come during a reload make one more."""
    while True:
        await wanted.wait()
        wanted.clear()
        began = time.monotonic_ns()
        notifier.send(reloading(began // 1000, "reloading"))
        outcome = await relay.reload()
        if relay.role is None:  # the parent of workers counts each reload once
            relay.metrics.config_reload(refused=outcome.refused)
        if relay.spool is not None:  # for `ses-relay reload`
            record = reloadrecord.Record(os.getpid(), began, outcome)
            await asyncio.to_thread(reloadrecord.write, relay.spool.path, record)
        configure_logging(
            relay.config.log.format, relay.config.log.level, pid=relay.role is not None
        )
        notifier.send(ready(f"{outcome.status()}; {relay.summary()}"))
