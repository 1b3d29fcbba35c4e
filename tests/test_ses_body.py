"""Request bodies made in chunks (issue 15 point 5, issue 16 point 4): the
streamed body is the body built whole, and so are its size and payload hash."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import tempfile
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.ses.body import ChunkedBody, base64_chunks
from relay.ses.query import send_raw_email_body, send_raw_email_head
from relay.ses.sender import RawMessage, SendRequest, SesParameters
from relay.ses.sigv4 import payload_hash

messages = st.one_of(
    st.binary(max_size=2000),
    st.integers(0, 300_000).map(lambda n: random.Random(n).randbytes(n)),
)
chunk_sizes = st.integers(1, 70_000)


def built_whole(request: SendRequest, raw: bytes) -> bytes:
    """The form body as one piece, with the standard library's encoders."""
    return send_raw_email_head(request) + quote(base64.b64encode(raw), safe="").encode()


@settings(max_examples=150, deadline=None)
@given(messages, chunk_sizes, st.lists(st.sampled_from(["a@example.com", "b+c@x.example"])))
def test_the_streamed_body_is_the_body_built_whole(
    raw: bytes, chunk_size: int, destinations: list[str]
) -> None:
    request = SendRequest(
        RawMessage.of(raw),
        tuple(destinations),
        source="s@example.com",
        ses=SesParameters(configuration_set="set", tags=(("k", "v=1"),)),
    )
    whole = built_whole(request, raw)
    body = ChunkedBody.measure(
        lambda: send_raw_email_body(request, request.raw_message.chunks(chunk_size))
    )
    assert b"".join(body.chunks()) == whole
    assert b"".join(body.chunks()) == whole  # made afresh for every pass
    assert body.size == len(whole)
    assert body.sha256 == hashlib.sha256(whole).hexdigest() == payload_hash(whole)


@settings(max_examples=100, deadline=None)
@given(messages, chunk_sizes)
def test_a_message_read_from_its_file_gives_the_same_body(raw: bytes, chunk_size: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "m.eml")
        path.write_bytes(raw)
        with RawMessage.open(path) as message:
            assert message.size == len(raw)
            request = SendRequest(message)
            body = ChunkedBody.measure(
                lambda: send_raw_email_body(request, message.chunks(chunk_size))
            )
            whole = built_whole(request, raw)
            assert b"".join(body.chunks()) == whole
            assert body.sha256 == hashlib.sha256(whole).hexdigest()
            assert message.head(5) == raw[:5]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=10))
def test_base64_of_chunks_of_any_size_is_one_base64_text(chunks: list[bytes]) -> None:
    pieces = list(base64_chunks(chunks))
    assert b"".join(pieces) == base64.b64encode(b"".join(chunks))
    assert all(b"=" not in piece for piece in pieces[:-1])  # padding only at the end


def test_a_pass_outlives_close_and_deletion(tmp_path: Path) -> None:
    """A pass has its own descriptor: ``close`` (a delivery that ended) and
    an operator's delete (the file unlinked) do not cut it short."""
    raw = random.Random(1).randbytes(200_000)
    path = tmp_path / "m.eml"
    path.write_bytes(raw)
    message = RawMessage.open(path)
    chunks = message.chunks(1000)
    first = next(chunks)
    message.close()
    path.unlink()
    assert first + b"".join(chunks) == raw
    with pytest.raises(ValueError, match="closed"):
        message.chunks()


def test_a_file_shorter_than_its_size_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    with RawMessage(10, fd=fd) as message, pytest.raises(OSError, match="ends at 3 bytes of 10"):
        b"".join(message.chunks())
