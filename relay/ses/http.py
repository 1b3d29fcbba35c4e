"""HTTP plumbing shared by the SES client and the credential providers.

``request`` is the one place where aiohttp's and the operating system's
errors of a call to AWS become ours (``HttpTransportError``), as httpx maps
httpcore's in ``map_httpcore_exceptions``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiohttp.abc
import aiohttp.payload
from yarl import URL

from relay import __version__
from relay.errors import HttpTransportError
from relay.ses.body import ChunkedBody
from relay.tls import client_tls_context

USER_AGENT = f"ses-relay/{__version__}"


def new_session(
    *, tls: ssl.SSLContext | None = None, max_connections: int = 64
) -> aiohttp.ClientSession:
    """One pooled keep-alive session for every AWS call (``tls``: default
    ``client_tls_context()``)."""
    context = tls if tls is not None else client_tls_context()
    connector = aiohttp.TCPConnector(limit=max_connections, ssl=context, keepalive_timeout=30.0)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT},
        auto_decompress=False,
        raise_for_status=False,
        skip_auto_headers=("Accept-Encoding",),
    )


class _ChunkedPayload(aiohttp.payload.Payload):
    """A ``ChunkedBody`` as aiohttp sends it: ``Content-Length`` from its size
    (never chunked transfer encoding), the chunks written as they are made,
    afresh each time it is sent."""

    _autoclose = True

    def __init__(self, body: ChunkedBody) -> None:
        super().__init__(body)
        self._size = body.size
        self._body = body

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        for chunk in self._body.chunks():
            await writer.write(chunk)

    async def write_with_length(
        self, writer: aiohttp.abc.AbstractStreamWriter, content_length: int | None
    ) -> None:
        await self.write(writer)  # its length is the Content-Length it declared

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a chunked request body is never read whole")


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None as soon as it would exceed ``limit`` bytes.

    An oversized body is never held: the connection is closed instead.
    """
    if (response.content_length or 0) > limit:
        response.close()
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            response.close()
            return None
        chunks.append(chunk)


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer: its status, headers (names lower-cased; of a repeated
    header, the last) and whole body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


async def fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    *,
    what: str,
    headers: Mapping[str, str],
    data: bytes | ChunkedBody | None = None,
    seconds: float,
    connect_seconds: float | None = None,
    read_seconds: float | None = None,
    limit: int,
) -> Answer:
    """One call to an AWS endpoint: the status, headers and whole answer (at most
    ``limit`` bytes), within ``seconds`` in all (connecting within
    ``connect_seconds``, no silence longer than ``read_seconds``); redirects
    are not followed.

    Every way of getting no usable answer is an ``HttpTransportError`` whose
    message names ``what`` and the endpoint's origin, never its path or query
    (a container endpoint's may hold a secret)."""
    origin = url.origin()
    payload: Any = _ChunkedPayload(data) if isinstance(data, ChunkedBody) else data
    limits = aiohttp.ClientTimeout(
        total=seconds, sock_connect=connect_seconds, sock_read=read_seconds
    )
    try:
        async with (
            asyncio.timeout(seconds),
            session.request(
                method, url, headers=headers, data=payload, timeout=limits, allow_redirects=False
            ) as response,
        ):
            body = await read_capped(response, limit)
            if body is None:
                raise HttpTransportError(
                    f"{what} answer from {origin} exceeds {limit} bytes",
                    "too-large",
                    status=response.status,
                )
            names = {name.lower(): value for name, value in response.headers.items()}
            return Answer(response.status, names, body)
    except aiohttp.ClientConnectorError as exc:
        raise HttpTransportError(
            f"cannot connect to {what} at {origin} ({type(exc).__name__}: {exc.os_error})",
            "connect",
        ) from None
    except aiohttp.ConnectionTimeoutError:  # before TimeoutError: it is one
        raise HttpTransportError(
            f"timed out connecting to {what} at {origin}", "connect-timeout"
        ) from None
    except TimeoutError:
        raise HttpTransportError(
            f"no answer from {what} at {origin} within {seconds:.1f}s", "timeout"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise HttpTransportError(
            f"{what} at {origin} failed ({type(exc).__name__})", "io"
        ) from None
