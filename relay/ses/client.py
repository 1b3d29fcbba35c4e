"""The SES client: signed Query API calls over one pooled aiohttp session.

Every failure of a call is a ``relay.errors.SesError``: SES's own errors,
and the transport's, translated once by ``relay.ses.http.request`` and
classified here. Calls retry retryable errors quickly (exponential backoff with
full jitter) within the attempts and the deadline they are given; long-term
retrying is the spool's job.

SendRawEmail has no idempotency token. When an attempt fails after its
request was sent (a timeout, a reset while waiting for the answer), SES may
have accepted the message, and the retry can deliver it twice. Connection
failures before sending are retried without that risk. The window is kept
small by a short connect timeout, a generous answer timeout (SES answers
in well under a second), and retrying on a pooled connection.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
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
from relay.ses.http import new_session, request
from relay.ses.query import (
    FORM_CONTENT_TYPE,
    get_identity_verification_attributes_body,
    get_send_quota_body,
    send_raw_email_body,
)
from relay.ses.responses import (
    error_from_answer,
    parse_identity_verification,
    parse_send_quota,
    parse_send_raw_email,
)
from relay.ses.sender import SendQuota, SendRequest, SendResult
from relay.ses.sigv4 import payload_hash, sign_request
from relay.tls import client_tls_context

__all__ = ["SendQuota", "SendResult", "SesClient", "backoff_delay", "endpoint_url"]

T = TypeVar("T")

SERVICE = "ses"


def endpoint_url(config: SesConfig) -> URL:
    """The SES endpoint: the configured one, else the region's."""
    return URL(config.endpoint or f"https://email.{config.region}.amazonaws.com")


def backoff_delay(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Full-jitter exponential backoff: ``jitter`` is uniform in [0, 1)."""
    return jitter * min(cap, base * (2.0 ** (attempt - 1)))


class SesClient:
    """Calls SES's v1 Query API; a ``relay.ses.sender.SesSender``. Use as
    ``async with SesClient(config, credentials) as ses``."""

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
        self._path = self._url.raw_path or "/"
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

    async def send(self, request: SendRequest, *, deadline: float | None = None) -> SendResult:
        """SendRawEmail of one batch; ``deadline`` (seconds) bounds the whole
        call, retries included.

        The body is made in chunks from the message (``relay.ses.body``):
        measured once in a thread (its size and payload hash), then made
        again as each attempt sends it, a chunk at a time on the loop."""
        raw = request.raw_message
        body = await asyncio.to_thread(
            ChunkedBody.measure,
            lambda: send_raw_email_body(request, raw.chunks()),
        )
        result = await self._call(
            "SendRawEmail", body, parse_send_raw_email, deadline, queue_id=request.queue_id
        )
        if result.unusable_id is not None:
            ses_log.warning(
                "SES accepted a message (request %s) with a MessageId that is not a token, "
                "not used: %r",
                result.request_id,
                result.unusable_id,
            )
        return result

    async def quota(self, *, deadline: float | None = None) -> SendQuota:
        """GetSendQuota."""
        return await self._call("GetSendQuota", get_send_quota_body(), parse_send_quota, deadline)

    async def get_identity_verification_attributes(
        self, identities: Sequence[str], *, deadline: float | None = None
    ) -> dict[str, str]:
        """Identity → SES's ``VerificationStatus`` ("Success" when verified);
        identities SES does not know are left out. Read-only."""
        body = get_identity_verification_attributes_body(identities)
        return await self._call(
            "GetIdentityVerificationAttributes", body, parse_identity_verification, deadline
        )

    async def _call(
        self,
        action: str,
        body: bytes | ChunkedBody,
        parse: Callable[[bytes], T],
        deadline: float | None,
        *,
        queue_id: str = "",
    ) -> T:
        """``action`` with its retries; a call that was retried is one log
        line when it ends (``queue_id``: the message it is for)."""
        failures: list[SesError] = []
        try:
            result = await self._retried(action, body, parse, deadline, failures)
        except SesError as error:
            if failures[:-1]:
                _log_retries(action, queue_id, failures[:-1], f"failed with {error.code}")
            raise
        if failures:
            _log_retries(action, queue_id, failures, "succeeded")
        return result

    async def _retried(
        self,
        action: str,
        body: bytes | ChunkedBody,
        parse: Callable[[bytes], T],
        deadline: float | None,
        failures: list[SesError],
    ) -> T:
        """``action``, retried quickly; each failed attempt is added to ``failures``."""
        config = self._config
        budget = deadline if deadline is not None else config.request_timeout * config.max_attempts
        ends = self._monotonic() + budget
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
                return await self._observed(action, body, body_sha256, parse, remaining)
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
        self,
        action: str,
        body: bytes | ChunkedBody,
        body_sha256: str,
        parse: Callable[[bytes], T],
        budget: float,
    ) -> T:
        """``_attempt``, told to ``observe``."""
        if self._observe is None:
            return await self._attempt(body, body_sha256, parse, budget)
        started = self._monotonic()
        try:
            result = await self._attempt(body, body_sha256, parse, budget)
        except SesError as error:
            self._observe(action, error.code, self._monotonic() - started)
            raise
        self._observe(action, "", self._monotonic() - started)
        return result

    async def _attempt(
        self,
        body: bytes | ChunkedBody,
        body_sha256: str,
        parse: Callable[[bytes], T],
        budget: float,
    ) -> T:
        config = self._config
        timeout = min(budget, config.request_timeout)
        try:
            credentials = await self._credentials.get()
        except CredentialsError as exc:
            raise no_credentials(str(exc)) from None
        headers = {"Content-Type": FORM_CONTENT_TYPE}
        headers |= sign_request(
            credentials=credentials,
            region=config.region,
            service=SERVICE,
            method="POST",
            host=self._host,
            path=self._path,
            headers=headers,
            payload_sha256=body_sha256,
            now=self._clock(),
        )
        headers["Host"] = self._host
        try:
            status, answer = await request(
                self.session,
                "POST",
                self._url,
                what="SES",
                headers=headers,
                data=body,
                seconds=timeout,
                connect_seconds=config.connect_timeout,
                limit=config.max_response_size,
            )
        except HttpTransportError as exc:
            raise unanswered(exc) from None
        if 200 <= status < 300:
            return parse(answer)
        raise error_from_answer(status, answer)


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
