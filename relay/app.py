"""The daemon: configuration → listeners, SES client, handler; start and stop.

``Relay`` is the running relay (used by ``serve`` and by the tests);
``serve`` runs one in the foreground until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import Awaitable, Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import aiohttp

from relay.auth import Authenticator, Users, load_users
from relay.bouncecheck import check_bounce_sender
from relay.config import Config, split_host_port
from relay.delivery import Delivery
from relay.errors import ConfigError, RelayError, SpoolError, SpoolLocked
from relay.handler import RelayHandler
from relay.httpserver import HttpServer, Readiness
from relay.log import delivery_log, smtp_log
from relay.metrics import RelayMetrics, State
from relay.ses.client import SesClient
from relay.ses.credentials import RefreshingProvider, default_chain
from relay.ses.http import client_tls_context, new_session
from relay.smtp import ConnectionLimiter, smtp_factory
from relay.spool import Census, Spool

SHUTDOWN_GRACE = 30.0
"""Seconds in-flight SMTP sessions get to finish after SIGTERM."""


@dataclass(frozen=True, slots=True)
class Resources:
    """What the configuration points at, loaded and checked."""

    tls_context: ssl.SSLContext | None
    users: Users | None
    ses_tls: ssl.SSLContext
    """TLS for the calls to AWS (``ses.ca_bundle`` or the system's CAs)."""


def load_resources(config: Config) -> Resources:
    """Load the certificates and the users file; ``ConfigError`` lists every problem."""
    smtp, source = config.smtp, config.source
    problems: list[str] = []
    try:
        ses_tls = client_tls_context(config.ses.ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        problems.append(f"{source}: [ses] ca_bundle: cannot load {config.ses.ca_bundle}: {exc}")
    tls_context = None
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        problems.append(f"{source}: [smtp] tls_cert, tls_key: set both or neither")
    elif smtp.tls_cert:
        try:
            tls_context = server_tls_context(smtp.tls_cert, smtp.tls_key)
        except (OSError, ssl.SSLError) as exc:
            problems.append(
                f"{source}: [smtp] tls_cert, tls_key: cannot load the certificate and key "
                f"({smtp.tls_cert}, {smtp.tls_key}): {exc}"
            )
    if smtp.tls_listen and not (smtp.tls_cert and smtp.tls_key):
        problems.append(f"{source}: [smtp] tls_listen: needs tls_cert and tls_key")
    if smtp.tls_listen and smtp.proxy_protocol:
        problems.append(
            f"{source}: [smtp] proxy_protocol: not supported with tls_listen "
            "(the PROXY header would come before the TLS handshake); "
            "terminate TLS at the load balancer or use STARTTLS on listen"
        )
    users = None
    if config.auth.users_file:
        try:
            users = load_users(config.auth.users_file)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if not (smtp.tls_cert and smtp.tls_key):
            problems.append(
                f"{source}: [auth] users_file: AUTH is offered only under TLS: "
                "set [smtp] tls_cert and tls_key"
            )
    if problems:
        raise ConfigError(problems)
    return Resources(tls_context=tls_context, users=users, ses_tls=ses_tls)


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class Relay:
    """A running relay. ``async with Relay(config, env) as relay: ...``"""

    def __init__(self, config: Config, env: Mapping[str, str]) -> None:
        self.config = config
        self._env = env
        self._servers: list[asyncio.Server] = []
        self._http: aiohttp.ClientSession | None = None
        self._credentials: RefreshingProvider | None = None
        self.spool: Spool | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._grace_over = asyncio.Event()
        """Set by ``end_grace``: ``stop`` waits no longer."""
        self.delivery: Delivery | None = None
        self._authenticator: Authenticator | None = None
        self.limiter = ConnectionLimiter(
            config.smtp.max_connections, config.smtp.max_connections_per_client
        )
        self.smtp_addresses: list[tuple[str, int]] = []
        """Where the plain (STARTTLS) listeners are, in ``smtp.listen`` order."""
        self.tls_addresses: list[tuple[str, int]] = []
        """Where the implicit-TLS listeners are, in ``smtp.tls_listen`` order."""
        self.metrics = RelayMetrics()
        self.metrics.add_state(self._state)
        self._http_server: HttpServer | None = None
        self.metrics_address: tuple[str, int] | None = None
        """Where /metrics, /healthz and /readyz are served (``metrics.listen``)."""

    async def start(self) -> None:
        """Open the spool (its lock first: a second daemon stops here, before
        anything else is set up), resume its queue, then listen. A failure
        undoes whatever was started."""
        config = self.config
        resources = load_resources(config)
        try:
            self.spool = Spool(config.spool.path)
            try:
                await asyncio.to_thread(self.spool.open)
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
            ses = SesClient(
                config.ses, self._credentials, session=self._http, observe=self.metrics.ses_call
            )
            self.delivery = Delivery(config, self.spool, ses, metrics=self.metrics)
            await self.delivery.start()
            self._in_background(self._check_bounce_sender(ses))
            handler = RelayHandler(config, self.delivery, metrics=self.metrics)
            if resources.users is not None:
                self._authenticator = Authenticator(
                    resources.users, config.auth, observe=self.metrics.auth_attempt
                )
            loop = asyncio.get_running_loop()
            for address in config.smtp.listen:
                self.smtp_addresses.append(
                    await self._listen(loop, address, handler, resources, implicit_tls=False)
                )
            for address in config.smtp.tls_listen:
                self.tls_addresses.append(
                    await self._listen(loop, address, handler, resources, implicit_tls=True)
                )
            self._http_server = HttpServer(self.metrics, self._readiness)
            self.metrics_address = await self._http_server.start(config.metrics.listen)
            smtp_log.info("metrics on http://%s:%d/metrics", *self.metrics_address)
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _listen(
        self,
        loop: asyncio.AbstractEventLoop,
        address: str,
        handler: RelayHandler,
        resources: Resources,
        *,
        implicit_tls: bool,
    ) -> tuple[str, int]:
        host, port = split_host_port(address)
        factory = smtp_factory(
            self.config.smtp,
            handler,
            tls_context=resources.tls_context,
            limiter=self.limiter,
            implicit_tls=implicit_tls,
            authenticator=self._authenticator,
        )
        try:
            server = await loop.create_server(
                factory,
                host,
                port,
                ssl=resources.tls_context if implicit_tls else None,
                reuse_address=True,
            )
        except OSError as exc:
            raise RelayError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        self._servers.append(server)
        bound_host, bound_port = server.sockets[0].getsockname()[:2]
        smtp_log.info(
            "listening on %s:%d%s",
            f"[{bound_host}]" if ":" in bound_host else bound_host,
            bound_port,
            " (implicit TLS)" if implicit_tls else "",
        )
        return bound_host, bound_port

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
            smtp_admitted=limiter.admitted,
            smtp_refused=limiter.refused,
            smtp_sessions=dict(limiter.sessions),
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
        elif not delivery.space_ok():
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
        """Re-read the queue and try what is due (``ses-relay queue retry``)."""
        if self.delivery is not None:
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


REPEATED_SIGNAL = 1.0
"""Seconds after the first SIGTERM/SIGINT before another one ends the grace."""


def _reload_not_supported() -> None:
    smtp_log.warning("SIGHUP: reloading the configuration is not supported yet; restart to apply")


async def serve(config: Config, env: Mapping[str, str]) -> int:
    """Run until SIGTERM or SIGINT; then stop gracefully and return 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    relay = Relay(config, env)
    # Before the spool lock is taken: `ses-relay queue retry` signals whoever holds it.
    loop.add_signal_handler(signal.SIGUSR1, relay.retry_now)
    # SIGHUP would end the process (log rotation scripts send it): not yet a reload.
    loop.add_signal_handler(signal.SIGHUP, _reload_not_supported)
    async with relay:
        smtp_log.info("ses-relay ready")
        await stop.wait()
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
    return 0
