"""The I/O groundwork the sources share: the ``Context`` a source works in
(environment, HTTP session, region, clock, sleep), ``NotConfigured`` (skip this
source), one HTTP request with a capped answer whose failures name only the
endpoint's origin, and the STS call, signed or not."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from relay.errors import CredentialsError
from relay.ses.credentials.parsing import parse_sts_credentials, sts_endpoint
from relay.ses.credentials.providers import Clock
from relay.ses.http import read_capped
from relay.ses.query import FORM_CONTENT_TYPE, encode_form
from relay.ses.sigv4 import Credentials, payload_hash, sign_request

Sleep = Callable[[float], Awaitable[None]]

MAX_RESPONSE_SIZE = 64 * 1024
"""Answers from STS, container and IMDS endpoints are read up to this size."""

STS_API_VERSION = "2011-06-15"
STS_TIMEOUT = aiohttp.ClientTimeout(total=10.0, sock_connect=3.0)

HEADER_VALUE = re.compile(r"[\t -~]+")


class NotConfigured(CredentialsError):
    """A source that has nothing to offer: the chain moves on to the next one.

    Raised during a refresh (IMDS gone away), it is an ordinary failure.
    """


@dataclass(frozen=True, slots=True)
class Context:
    env: Mapping[str, str]
    session: aiohttp.ClientSession
    region: str
    clock: Clock
    sleep: Sleep


class HttpFailure(CredentialsError):
    """No answer: ``kind`` is ``connect`` (never reached the server), ``timeout``
    (reached it, no answer in time) or ``io``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


async def http(
    ctx: Context,
    method: str,
    url: URL,
    *,
    what: str,
    headers: Mapping[str, str],
    limits: aiohttp.ClientTimeout,
    data: bytes | None = None,
) -> tuple[int, bytes]:
    """One request; the status and the body (capped). Every transport problem
    becomes ``HttpFailure`` whose message names ``what`` and the origin only."""
    origin = str(url.origin())
    try:
        async with ctx.session.request(
            method, url, headers=headers, data=data, timeout=limits, allow_redirects=False
        ) as response:
            body = await read_capped(response, MAX_RESPONSE_SIZE)
            if body is None:
                raise HttpFailure(
                    f"{what} answer from {origin} exceeds {MAX_RESPONSE_SIZE} bytes", "io"
                )
            return response.status, body
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        raise HttpFailure(
            f"cannot connect to {what} at {origin} ({type(exc).__name__})", "connect"
        ) from None
    except TimeoutError:
        raise HttpFailure(f"no answer from {what} at {origin} in time", "timeout") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise HttpFailure(f"{what} at {origin} failed ({type(exc).__name__})", "io") from None


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
        ctx, "POST", url, what=f"STS {action}", headers=headers, limits=STS_TIMEOUT, data=body
    )
    return parse_sts_credentials(answer, action, status=status)
