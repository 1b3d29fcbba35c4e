"""Reading the content of SMTP DATA: an incremental state machine without I/O.

Bytes go in (``feed``), in chunks of any size split anywhere; the message
comes out, dot-unstuffed (RFC 5321 4.5.2), through a ``write`` callable (an
internal ``bytearray`` by default; a spool file's ``write`` later).

The rules, chosen so that no SMTP-smuggling sequence can end DATA early:

- Only ``<CRLF>.<CRLF>`` ends DATA, where the first ``<CRLF>`` may be the
  one that ended the ``DATA`` command itself (an empty message). ``<LF>.<LF>``,
  ``<CR>.<CR>``, ``<LF>.<CRLF>``, ``<CRLF>.<LF>`` and the like are content.
  ``feed`` stops at the end marker and says how many bytes it used; the rest
  (pipelined commands) belongs to the caller.
- Lines are delimited by ``<CRLF>`` only. A line that starts with "." loses
  that dot (transparency, RFC 5321 4.5.2); a dot after a bare CR or LF is not
  at the start of a line and is kept.
- A bare CR or bare LF (one not part of a ``<CRLF>`` pair) is, by
  ``bare_newline``: ``"normalize"``: written as ``<CRLF>`` (as Postfix 3.9's
  ``smtpd_forbid_bare_newline = normalize``), or ``"reject"``: the message is
  refused (``bad_newline``). Either way nothing with a bare CR or LF is written.
- NUL is never allowed in a message (RFC 5321 2.3.8, RFC 6152): ``has_nul``
  refuses it in both modes. Stripping it silently would change a message the
  sender signed (DKIM) and hide a broken client.
- Size is counted on what would be written (after unstuffing and
  normalization). Past ``limit`` the message is ``too_big``: nothing more is
  written (the internal buffer is dropped at once) but reading goes on to the
  end marker, so the reply comes at the end of DATA as RFC 5321 4.2.5 wants.

Once a message is refused (``failed``) nothing more is written; a caller
with its own ``write`` discards what it got. Lines are not limited in length:
the size limit bounds memory, and a long line is SES's to judge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal

BareNewline = Literal["normalize", "reject"]

END_OF_DATA: Final = b"\r\n.\r\n"
# Proper prefixes of END_OF_DATA, longest first: a chunk ending in one of
# them is held back until the next chunk says whether the marker completes.
_PARTIAL_ENDS: Final = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")
_DOT_LINE: Final = b"\r\n."


class DataReader:
    """Incremental reader of one DATA transfer; see the module docstring."""

    __slots__ = (
        "_buffer",
        "_carry",
        "_limit",
        "_reject",
        "_skip",
        "_write",
        "bare_newline_seen",
        "done",
        "has_nul",
        "size",
        "too_big",
    )

    def __init__(
        self,
        limit: int,
        bare_newline: BareNewline = "normalize",
        *,
        write: Callable[[bytes], object] | None = None,
    ) -> None:
        if bare_newline not in ("normalize", "reject"):
            raise ValueError(f"bare_newline must be 'normalize' or 'reject', not {bare_newline!r}")
        self._limit = limit
        self._reject = bare_newline == "reject"
        self._buffer: bytearray | None = None
        if write is None:
            self._buffer = bytearray()
            write = self._buffer.extend
        self._write: Callable[[bytes], object] = write
        # Raw bytes not yet processed, always a proper prefix of END_OF_DATA.
        # It starts as the CRLF that ended the DATA command, so that ".\r\n"
        # at the very start ends DATA and a leading "." is unstuffed; ``_skip``
        # says how many of its bytes are that virtual CRLF, never to be written.
        self._carry = b"\r\n"
        self._skip = 2
        self.done = False
        """True once the end marker has been read; ``feed`` takes nothing more."""
        self.size = 0
        """Bytes of message so far (written or not), after unstuffing and normalizing."""
        self.too_big = False
        """The message is longer than ``limit`` bytes."""
        self.bare_newline_seen = False
        """A bare CR or LF was in the data (normalized unless ``bad_newline``)."""
        self.has_nul = False
        """A NUL byte was in the data."""

    @property
    def bad_newline(self) -> bool:
        """A bare CR or LF was seen and ``bare_newline`` is ``"reject"``."""
        return self._reject and self.bare_newline_seen

    @property
    def failed(self) -> bool:
        """The message is refused: too big, a bare CR/LF in reject mode, or NUL."""
        return self.too_big or self.has_nul or (self._reject and self.bare_newline_seen)

    @property
    def message(self) -> bytes:
        """The message written so far to the internal buffer (a copy)."""
        if self._buffer is None:
            raise RuntimeError("this DataReader writes to its own write callable")
        return bytes(self._buffer)

    def feed(self, chunk: bytes) -> int:
        """Take bytes of the DATA stream; return how many of ``chunk`` were used.

        Fewer than ``len(chunk)`` only when the end marker is in ``chunk``: the
        bytes after it are not DATA. After ``done``, returns 0.
        """
        if self.done or not chunk:
            return 0
        carry = self._carry
        buf = carry + chunk if carry else chunk
        skip = self._skip
        end = buf.find(END_OF_DATA)
        if end >= 0:
            self.done = True
            self._carry = b""
            self._skip = 0
            stop = end + 2  # the CRLF before the "." ends the message's last line
            used = end + len(END_OF_DATA) - len(carry)
        else:
            stop = len(buf)
            for partial in _PARTIAL_ENDS:
                if buf.endswith(partial):
                    stop -= len(partial)
                    break
            used = len(chunk)
            if stop < skip:  # all of it may still be the start of the end marker
                self._carry = buf
                return used
            self._carry = buf[stop:]
            self._skip = 0
        if stop > skip:
            self._unstuff(buf, skip, stop)
        return used

    def _unstuff(self, buf: bytes, start: int, stop: int) -> None:
        """Write ``buf[start:stop]`` without the dot that starts each line."""
        # Every "\r\n." whose dot lies before ``stop`` starts a line that is
        # not the end marker (that one was cut off by ``stop``). The search
        # starts at 0: when ``start`` is 2, buf[0:2] is the virtual CRLF.
        pos = start
        found = buf.find(_DOT_LINE, 0, stop)
        while found >= 0:
            dot = found + 2
            self._emit(buf[pos:dot])
            pos = dot + 1
            found = buf.find(_DOT_LINE, pos, stop)
        self._emit(buf[pos:stop])

    def _emit(self, piece: bytes) -> None:
        # A piece never splits a CRLF pair and never ends in a CR that a later
        # LF completes (``feed`` holds a trailing CR back), so bare CR and LF
        # can be counted piece by piece.
        if not piece:
            return
        size = len(piece)
        crs = piece.count(b"\r")
        lfs = piece.count(b"\n")
        if crs or lfs:
            pairs = piece.count(b"\r\n")
            if crs != pairs or lfs != pairs:
                self.bare_newline_seen = True
                size += crs + lfs - 2 * pairs  # each bare CR or LF becomes CRLF
                if not self._reject:
                    piece = (
                        piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
                    )
        if b"\x00" in piece:
            self.has_nul = True
        self.size += size
        if self.size > self._limit:
            self.too_big = True
        if self.failed:
            if self._buffer:
                self._buffer.clear()  # give the memory back now, not at the end of DATA
            return
        self._write(piece)
