"""The I/O groundwork the sources share: the ``Context`` a source works in
(environment, HTTP session, region, clock, sleep), one HTTP request with a
capped answer whose failures name only the endpoint's origin, and the STS
call, signed or not."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from relay.errors import CredentialsError, CredentialsUnreachable, HttpTransportError
from relay.ses.credentials.parsing import parse_sts_credentials, sts_endpoint
from relay.ses.credentials.providers import Clock
from relay.ses.http import fetch
from relay.ses.query import FORM_CONTENT_TYPE, encode_form
from relay.ses.sigv4 import Credentials, payload_hash, sign_request

Sleep = Callable[[float], Awaitable[None]]

MAX_RESPONSE_SIZE = 64 * 1024
"""Answers from STS, container and IMDS endpoints are read up to this size."""

STS_API_VERSION = "2011-06-15"
STS_TIMEOUT = 10.0
STS_CONNECT_TIMEOUT = 3.0

HEADER_VALUE = re.compile(r"[\t -~]+")


@dataclass(frozen=True, slots=True)
class Context:
    env: Mapping[str, str]
    session: aiohttp.ClientSession
    region: str
    clock: Clock
    sleep: Sleep


async def http(
    ctx: Context,
    method: str,
    url: URL,
    *,
    what: str,
    headers: Mapping[str, str],
    seconds: float,
    connect_seconds: float | None = None,
    read_seconds: float | None = None,
    data: bytes | None = None,
) -> tuple[int, bytes]:
    """One request; the status and the body (capped at ``MAX_RESPONSE_SIZE``).
    No answer is ``CredentialsUnreachable``, a credentials error."""
    try:
        answer = await fetch(
            ctx.session,
            method,
            url,
            what=what,
            headers=headers,
            data=data,
            seconds=seconds,
            connect_seconds=connect_seconds,
            read_seconds=read_seconds,
            limit=MAX_RESPONSE_SIZE,
        )
    except HttpTransportError as exc:
        raise CredentialsUnreachable(str(exc), exc.cause) from None
    return answer.status, answer.body


async def sts_call(
    ctx: Context,
    action: str,
    params: list[tuple[str, str]],
    *,
    signed_with: Credentials | None,
) -> Credentials:
    url = sts_endpoint(ctx.env, ctx.region)
    host = url.host_port_subcomponent or ""
    body = encode_form([("Action", action), ("Version", STS_API_VERSION), *params])
    headers = {"Content-Type": FORM_CONTENT_TYPE}
    if signed_with is not None:
        try:
            headers |= sign_request(
                credentials=signed_with,
                region=ctx.region or "us-east-1",
                service="sts",
                method="POST",
                host=host,
                path=url.raw_path or "/",
                headers=headers,
                payload_sha256=payload_hash(body),
                now=ctx.clock(),
            )
        except ValueError as exc:
            raise CredentialsError(f"cannot sign STS {action} request: {exc}") from None
    headers["Host"] = host
    status, answer = await http(
        ctx,
        "POST",
        url,
        what=f"STS {action}",
        headers=headers,
        seconds=STS_TIMEOUT,
        connect_seconds=STS_CONNECT_TIMEOUT,
        data=body,
    )
    return parse_sts_credentials(answer, action, status=status)
