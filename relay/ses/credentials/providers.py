"""Credential providers: the ``CredentialProvider`` protocol, ``StaticProvider``
for fixed keys, and ``RefreshingProvider``, which caches temporary credentials
and refreshes them (in the background, or with callers waiting) before they
expire."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from relay.errors import CredentialsError
from relay.log import ses_log
from relay.ses.sigv4 import Credentials

Clock = Callable[[], datetime]
Fetch = Callable[[], Awaitable[Credentials]]

ADVISORY_REFRESH = timedelta(minutes=15)
"""Less than this left: refresh in the background, keep serving the cached credentials."""
MANDATORY_REFRESH = timedelta(minutes=10)
"""Less than this left: callers wait for the refresh."""
KEEP_FRESH_INTERVAL = 60.0
"""Seconds between ``keep_fresh``'s looks at the credentials: well inside the
advisory window, so a refresh starts there even when no mail flows."""
REFRESH_RETRY_INTERVAL = timedelta(seconds=30)
"""After a refresh (failed, or returning short-lived credentials), the next
advisory or mandatory one waits this long, so a broken endpoint is not hammered."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class CredentialProvider(Protocol):
    """Hands out current credentials; cached, refreshed before they expire."""

    async def get(self) -> Credentials:
        """Current credentials. Cheap when cached: no I/O on the hot path."""
        ...

    def invalidate(self) -> None:
        """Forget cached credentials: the next ``get`` fetches fresh ones
        (after SES said the signature, token or key was bad)."""
        ...


class StaticProvider:
    """Fixed credentials (environment variables, tests)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def __repr__(self) -> str:
        return f"StaticProvider(access_key_id={self._credentials.access_key_id!r})"

    async def get(self) -> Credentials:
        return self._credentials

    def invalidate(self) -> None:
        """Static credentials cannot be refreshed."""


def _consume_result(task: asyncio.Task[Credentials]) -> None:
    """Mark a refresh task's exception as seen (it is logged, or raised to a waiter)."""
    if not task.cancelled():
        task.exception()


class RefreshingProvider:
    """Credentials from ``fetch``, cached and refreshed before they expire.

    * no credentials yet, expired ones, or ``invalidate()`` called: ``get()``
      awaits a refresh (concurrent callers share it) and raises
      ``CredentialsError`` if it fails;
    * more than ``advisory`` left, or credentials without expiration: ``get()``
      returns the cached ones, no I/O;
    * between ``advisory`` and ``mandatory`` left: one refresh starts in the
      background, ``get()`` returns the cached credentials at once;
    * ``mandatory`` or less left: ``get()`` awaits the shared refresh; if it
      fails, the still-valid cached credentials are returned (and a warning
      logged).

    After every refresh attempt the next non-forced one waits
    ``retry_interval``, so a failing endpoint sees one request per interval,
    not one per ``get()``. ``clock`` returns timezone-aware datetimes.
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        name: str = "credentials",
        clock: Clock = utcnow,
        advisory: timedelta = ADVISORY_REFRESH,
        mandatory: timedelta = MANDATORY_REFRESH,
        retry_interval: timedelta = REFRESH_RETRY_INTERVAL,
    ) -> None:
        self._fetch = fetch
        self._name = name
        self._clock = clock
        self._advisory = advisory
        self._mandatory = mandatory
        self._retry_interval = retry_interval
        self._credentials: Credentials | None = None
        self._generation = 0  # bumped by invalidate(): older refreshes may not satisfy callers
        self._stale = False
        self._not_before: datetime | None = None
        self._task: asyncio.Task[Credentials] | None = None
        self._task_generation = -1
        self._running: set[asyncio.Task[Credentials]] = set()
        """Every refresh not finished: one superseded by ``invalidate`` runs on."""

    def __repr__(self) -> str:
        creds = self._credentials
        state = "empty" if creds is None else f"access_key_id={creds.access_key_id!r}"
        expiration = None if creds is None else creds.expiration
        return f"RefreshingProvider({self._name!r}, {state}, expiration={expiration!r})"

    @property
    def name(self) -> str:
        return self._name

    def seconds_left(self) -> float | None:
        """Seconds until the cached credentials expire (negative once they
        have); None before any are fetched, or for keys that never expire."""
        creds = self._credentials
        if creds is None or creds.expiration is None:
            return None
        return (creds.expiration - self._clock()).total_seconds()

    async def keep_fresh(
        self,
        every: float = KEEP_FRESH_INTERVAL,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """``get`` every ``every`` seconds until cancelled, so that temporary
        credentials are refreshed in the advisory window even while no mail
        flows, and a refresh that keeps failing shows (in the log, and in
        ``seconds_left`` running down) before they expire. A failure is
        logged by the refresh, or raised to the next SES call."""
        while True:
            with contextlib.suppress(CredentialsError):
                await self.get()
            await sleep(every)

    async def get(self) -> Credentials:
        now = self._clock()
        creds = self._credentials
        if creds is None or self._stale or _expired(creds, now):
            return await self._join()
        step = self._next_step(creds, now)
        if step == "background":
            self._start()
        elif step == "wait":
            with contextlib.suppress(CredentialsError):  # still valid; the failure was logged
                return await self._join()
        return creds

    def _next_step(self, creds: Credentials, now: datetime) -> str:
        """``use`` the cached credentials, refresh in the ``background``, or ``wait``."""
        if creds.expiration is None:
            return "use"
        remaining = creds.expiration - now
        if remaining > self._advisory:
            return "use"
        if self._not_before is not None and now < self._not_before:
            return "use"
        return "background" if remaining > self._mandatory else "wait"

    def invalidate(self) -> None:
        self._stale = True
        self._generation += 1
        self._not_before = None

    async def wait_for_refresh(self) -> None:
        """Wait for a refresh in progress, if any (shutdown, tests); never raises its error."""
        task = self._task
        if task is not None:
            await asyncio.wait([task])

    async def aclose(self) -> None:
        """Cancel every refresh in progress and wait until they have ended
        (before the HTTP session they use is closed)."""
        self._task = None
        running = list(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)

    def _start(self) -> asyncio.Task[Credentials]:
        task = self._task
        if task is None or task.done() or self._task_generation != self._generation:
            task = asyncio.create_task(self._refresh(self._generation))
            task.add_done_callback(_consume_result)
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            self._task = task
            self._task_generation = self._generation
        return task

    async def _join(self) -> Credentials:
        # shield: a caller that is cancelled does not cancel the refresh others wait for.
        return await asyncio.shield(self._start())

    async def _refresh(self, generation: int) -> Credentials:
        started = self._clock()
        had_credentials = self._credentials is not None
        try:
            try:
                creds = await self._fetch()
            except CredentialsError:
                raise
            except Exception as exc:
                ses_log.exception("%s: unexpected error while fetching credentials", self._name)
                raise CredentialsError(
                    f"{self._name}: unexpected {type(exc).__name__} while fetching credentials"
                ) from exc
            now = self._clock()
            _check_fresh(creds, now, self._name)
        except CredentialsError as exc:
            if generation == self._generation:
                self._not_before = started + self._retry_interval
            if had_credentials:
                ses_log.warning("%s: refreshing credentials failed: %s", self._name, exc)
            raise
        if generation == self._generation:
            self._credentials = creds
            self._stale = False
            self._not_before = now + self._retry_interval
        if creds.expiration is not None:
            ses_log.info(
                "%s: credentials %s valid until %s",
                self._name,
                creds.key_shown,
                creds.expiration.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
        return creds


def _expired(creds: Credentials, now: datetime) -> bool:
    return creds.expiration is not None and now >= creds.expiration


def _check_fresh(creds: Credentials, now: datetime, name: str) -> None:
    if creds.expiration is not None and now >= creds.expiration:
        expired = creds.expiration.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        raise CredentialsError(f"{name}: the fetched credentials expired at {expired}")
