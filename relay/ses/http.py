"""HTTP plumbing shared by the SES client and the credential providers."""

from __future__ import annotations

import ssl

import aiohttp

from relay import __version__

USER_AGENT = f"ses-relay/{__version__}"


def client_tls_context(ca_bundle: str = "") -> ssl.SSLContext:
    """TLS for AWS calls: the system's CAs, or instead those in ``ca_bundle``
    (a PEM file); ``OSError`` or ``ssl.SSLError`` when it cannot be loaded."""
    return ssl.create_default_context(cafile=ca_bundle or None)


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
