"""``relay.ses.http.fetch``: the one place where aiohttp's and the OS's
errors become ``HttpTransportError``, against real hostile endpoints on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from yarl import URL

from relay.errors import HttpTransportError
from relay.ses.http import fetch, new_session

SECRET = "/creds/SECRET-PATH?token=SECRET-QUERY"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with new_session() as opened:
        yield opened


async def serve(handler: Handler) -> tuple[asyncio.Server, URL]:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(closing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, URL(f"http://127.0.0.1:{port}{SECRET}")


async def read_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def oversized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
    await writer.drain()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await reader.read()  # never answers; the client gives up


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)  # and closes without a word


async def fine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy")
    await writer.drain()


async def call(session: aiohttp.ClientSession, url: URL, seconds: float = 2.0) -> tuple[int, bytes]:
    answer = await fetch(
        session, "GET", url, what="the endpoint", headers={}, seconds=seconds, limit=50
    )
    return answer.status, answer.body


@pytest.mark.parametrize(
    ("handler", "cause", "status", "words"),
    [
        (oversized, "too-large", 200, "the endpoint answer from {origin} exceeds 50 bytes"),
        (silent, "timeout", None, "no answer from the endpoint at {origin} within 0.5s"),
        (hang_up, "io", None, "the endpoint at {origin} failed ("),
    ],
)
async def test_no_usable_answer_is_ours(
    session: aiohttp.ClientSession, handler: Handler, cause: str, status: int | None, words: str
) -> None:
    server, url = await serve(handler)
    async with server:
        with pytest.raises(HttpTransportError) as caught:
            await call(session, url, seconds=0.5)
    error = caught.value
    assert (error.cause, error.status, error.request_sent) == (cause, status, True)
    assert str(error).startswith(words.format(origin=url.origin()))
    assert "SECRET" not in str(error)


async def test_a_refused_connection_was_never_sent(session: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(HttpTransportError) as caught:
        await call(session, URL(f"http://127.0.0.1:{port}{SECRET}"))
    error = caught.value
    assert (error.cause, error.request_sent) == ("connect", False)
    assert str(error).startswith(f"cannot connect to the endpoint at http://127.0.0.1:{port} (")
    assert "SECRET" not in str(error)


async def test_an_answer_of_any_status_is_returned(session: aiohttp.ClientSession) -> None:
    server, url = await serve(fine)
    async with server:
        assert await call(session, url) == (503, b"busy")
