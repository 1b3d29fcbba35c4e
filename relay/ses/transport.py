"""Signed, retried calls to SES over one pooled aiohttp session: what the v1
(``relay.ses.client``) and v2 (``relay.ses.v2``) clients share.

Every failure of a call is a ``relay.errors.SesError``: SES's own errors,
and the transport's, translated once by ``relay.ses.http.fetch`` and
classified by ``relay.ses.classify``. Calls retry retryable errors quickly
(exponential backoff with full jitter) within the attempts and the deadline
they are given; long-term retrying is the spool's job.

Neither SendRawEmail nor SendEmail has an idempotency token. When an
attempt fails after its request was sent (a timeout, a reset while waiting
for the answer), SES may have accepted the message, and the retry can
deliver it twice. Connection failures before sending are retried without
that risk. The window is kept small by a short connect timeout, a generous
answer timeout (SES answers in well under a second), and retrying on a
pooled connection.
"""

from __future__ import annotations

import asyncio
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Self, TypeVar

import aiohttp
from yarl import URL

from relay.config import SesConfig
from relay.errors import CredentialsError, HttpTransportError, SesError
from relay.log import ses_log
from relay.ses.body import ChunkedBody
from relay.ses.classify import no_credentials, transport_error, unanswered
from relay.ses.credentials import CredentialProvider
from relay.ses.http import Answer, fetch, new_session
from relay.ses.sigv4 import payload_hash, sign_request
from relay.tls import client_tls_context

__all__ = ["Call", "SignedApi", "backoff_delay", "endpoint_url", "message_body"]

T = TypeVar("T")

SERVICE = "ses"
"""The signing name of both APIs (the host's prefix is ``email``)."""
WHOLE_BODY_MESSAGE = 256 * 1024
"""A message up to this size has its request body built whole, on the loop
(one read of its file, no thread hop: most mail); a larger one's body is
measured in a thread and made in chunks as it is sent."""


async def message_body(
    chunks: Callable[[], Iterable[bytes]], message_size: int
) -> bytes | ChunkedBody:
    """A request body carrying a message of ``message_size`` bytes, made by
    ``chunks()``: whole for a small message, else a ``ChunkedBody`` (its size
    and payload hash from a first pass in a thread; the chunks made again,
    a few at a time, as each attempt sends it)."""
    if message_size <= WHOLE_BODY_MESSAGE:
        return b"".join(chunks())
    return await asyncio.to_thread(ChunkedBody.measure, chunks)


def endpoint_url(config: SesConfig) -> URL:
    """The SES endpoint: the configured one, else the region's."""
    return URL(config.endpoint or f"https://email.{config.region}.amazonaws.com")


def backoff_delay(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Full-jitter exponential backoff: ``jitter`` is uniform in [0, 1)."""
    return jitter * min(cap, base * (2.0 ** (attempt - 1)))


@dataclass(frozen=True, slots=True)
class Call:
    """One SES operation as HTTP: ``path`` is added to the endpoint's path
    ("" for the v1 Query API, which posts to the endpoint itself)."""

    action: str
    """The operation's name, for metrics and log lines."""
    method: str
    path: str
    body: bytes | ChunkedBody
    content_type: str | None


class SignedApi(ABC):
    """Signed calls to one SES endpoint, retried; a client of one API
    subclasses it (``_error`` reads that API's error answers). Use as
    ``async with Client(config, credentials) as ses``."""

    def __init__(
        self,
        config: SesConfig,
        credentials: CredentialProvider,
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        observe: Callable[[str, str, float], None] | None = None,
    ) -> None:
        """``observe(action, code, seconds)`` hears of every HTTP call (``code``:
        SES's error code, "" on success), for metrics."""
        self._config = config
        self._credentials = credentials
        self._url = endpoint_url(config)
        self._host = self._url.host_port_subcomponent or ""
        self._base_path = self._url.raw_path.rstrip("/")
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._jitter = jitter
        self._observe = observe

    @property
    def url(self) -> URL:
        return self._url

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled HTTP session."""
        if self._session is None:
            self._session = new_session(
                tls=client_tls_context(self._config.ca_bundle),
                max_connections=self._config.max_connections,
            )
        return self._session

    async def __aenter__(self) -> Self:
        _ = self.session
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @abstractmethod
    def _error(self, answer: Answer) -> SesError:
        """The typed error for a non-2xx answer of this API."""

    async def _call(
        self,
        call: Call,
        parse: Callable[[Answer], T],
        deadline: float | None,
        *,
        queue_id: str = "",
    ) -> T:
        """``call`` with its retries; a call that was retried is one log
        line when it ends (``queue_id``: the message it is for)."""
        failures: list[SesError] = []
        try:
            result = await self._retried(call, parse, deadline, failures)
        except SesError as error:
            if failures[:-1]:
                _log_retries(call.action, queue_id, failures[:-1], f"failed with {error.code}")
            raise
        if failures:
            _log_retries(call.action, queue_id, failures, "succeeded")
        return result

    async def _retried(
        self,
        call: Call,
        parse: Callable[[Answer], T],
        deadline: float | None,
        failures: list[SesError],
    ) -> T:
        """``call``, retried quickly; each failed attempt is added to ``failures``."""
        config = self._config
        budget = deadline if deadline is not None else config.request_timeout * config.max_attempts
        ends = self._monotonic() + budget
        body = call.body
        body_sha256 = body.sha256 if isinstance(body, ChunkedBody) else payload_hash(body)
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            remaining = ends - self._monotonic()
            if remaining <= 0:
                failures.append(transport_error("Timeout", "deadline passed before SES answered"))
                raise failures[-1]
            try:
                return await self._observed(call, body_sha256, parse, remaining)
            except SesError as error:
                failures.append(error)
                if error.refresh_credentials and not refreshed:
                    # Rotated or expired credentials: fetch new ones and try once more.
                    self._credentials.invalidate()
                    refreshed = True
                    if attempt < config.max_attempts:
                        continue
                if not error.retryable or attempt >= config.max_attempts:
                    raise
                delay = backoff_delay(
                    attempt, config.backoff_base, config.backoff_max, self._jitter()
                )
                if self._monotonic() + delay >= ends:
                    raise
                await self._sleep(delay)

    async def _observed(
        self, call: Call, body_sha256: str, parse: Callable[[Answer], T], budget: float
    ) -> T:
        """``_attempt``, told to ``observe``."""
        if self._observe is None:
            return await self._attempt(call, body_sha256, parse, budget)
        started = self._monotonic()
        try:
            result = await self._attempt(call, body_sha256, parse, budget)
        except SesError as error:
            self._observe(call.action, error.code, self._monotonic() - started)
            raise
        self._observe(call.action, "", self._monotonic() - started)
        return result

    async def _attempt(
        self, call: Call, body_sha256: str, parse: Callable[[Answer], T], budget: float
    ) -> T:
        config = self._config
        timeout = min(budget, config.request_timeout)
        try:
            credentials = await self._credentials.get()
        except CredentialsError as exc:
            raise no_credentials(str(exc)) from None
        path = self._base_path + call.path or "/"
        headers = {"Content-Type": call.content_type} if call.content_type else {}
        headers |= sign_request(
            credentials=credentials,
            region=config.region,
            service=SERVICE,
            method=call.method,
            host=self._host,
            path=path,
            headers=headers,
            payload_sha256=body_sha256,
            now=self._clock(),
        )
        headers["Host"] = self._host
        data = call.body or None
        try:
            answer = await fetch(
                self.session,
                call.method,
                self._url.with_path(path, encoded=True),
                what="SES",
                headers=headers,
                data=data,
                seconds=timeout,
                connect_seconds=config.connect_timeout,
                limit=config.max_response_size,
            )
        except HttpTransportError as exc:
            raise unanswered(exc) from None
        if 200 <= answer.status < 300:
            return parse(answer)
        raise self._error(answer)


def _log_retries(action: str, queue_id: str, failures: Sequence[SesError], outcome: str) -> None:
    """One line for a call retried inside the client: ``failures`` are the
    attempts that were retried, ``outcome`` how the last one ended."""
    codes = ", ".join(error.code for error in failures)
    ses_log.info(
        "%sSES %s retried after %s; %s",
        f"{queue_id}: " if queue_id else "",
        action,
        codes,
        outcome,
        extra={
            "event": "retried",
            "action": action,
            "retries": len(failures),
            "reason": codes,
            **({"queue_id": queue_id} if queue_id else {}),
        },
    )
