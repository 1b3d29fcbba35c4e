"""Request bodies made in chunks from a message, never whole. Pure: no I/O.

A 10 MB message becomes a body of some 14 MB (base64, then escaped): built
whole, a send would hold both, and every message sent at once its own pair.
Instead a body is a generator of chunks over the message's chunks
(``relay.ses.sender.RawMessage.chunks``), run once to learn its exact
length and SHA-256 (``ChunkedBody.measure``: Content-Length and the SigV4
payload hash, sent ahead), then again for each attempt to send it. Memory
is a few chunks, whatever the size of the message.

``base64_chunks`` is the piece every wire format shares: the v1 form
(``relay.ses.query``) escapes it; a JSON body puts it in a string as it is
(base64 has no character JSON escapes).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

__all__ = ["ChunkedBody", "base64_chunks"]


def base64_chunks(raw: Iterable[bytes]) -> Iterator[bytes]:
    """The base64 of the concatenated ``raw`` chunks, in pieces that join
    into one base64 text: each piece encodes a multiple of 3 bytes (the
    remainder waits for the next chunk), the last one the rest, with its
    padding. Chunks of any size work; multiples of 3 are never copied."""
    carry = b""
    for piece in raw:
        chunk = carry + piece if carry else piece
        cut = len(chunk) - len(chunk) % 3
        if cut:
            yield base64.b64encode(memoryview(chunk)[:cut])
        carry = chunk[cut:]
    if carry:
        yield base64.b64encode(carry)


@dataclass(frozen=True, slots=True)
class ChunkedBody:
    """A request body that ``chunks()`` produces afresh for each pass, with
    its exact ``size`` and hex ``sha256`` known before it is sent."""

    chunks: Callable[[], Iterable[bytes]]
    size: int
    sha256: str

    @classmethod
    def measure(cls, chunks: Callable[[], Iterable[bytes]]) -> ChunkedBody:
        """Run ``chunks()`` once to learn the size and the hash (as blocking
        as reading the message: run it in a thread for a file)."""
        digest = hashlib.sha256()
        size = 0
        for chunk in chunks():
            digest.update(chunk)
            size += len(chunk)
        return cls(chunks, size, digest.hexdigest())
