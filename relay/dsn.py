"""Delivery status notifications (RFC 3464) for mail that failed after ``250``.

Pure: the notification is built from values and returned as bytes, ready to
be queued with the null sender. Its shape, as Postfix's bounces::

    multipart/report; report-type=delivery-status
    ├── text/plain                 what happened, for a person
    ├── message/delivery-status    the same for programs: Reporting-MTA,
    │                              Arrival-Date, then per recipient
    │                              Final-Recipient, Action, Status, Diagnostic-Code
    └── text/rfc822-headers        the original header block, never the body

The whole notification is 7-bit with CRLF line ends and no line over 998
bytes (SES and every hop take it as is):

- the text part is ``us-ascii`` 7bit when it can be, otherwise ``utf-8``
  quoted-printable;
- the delivery-status fields are ASCII: an address that is not plain ASCII
  is given as ``utf-8;`` type with non-ASCII, control and ``+ = \\`` space
  characters as ``\\x{HEX}`` (RFC 6533's utf-8-addr-xtext); diagnostics keep
  their ASCII and write other characters the same way; long values are
  folded at spaces and words over 900 characters are split;
- the original headers go verbatim (7bit) when they are ASCII with short
  lines, otherwise quoted-printable (RFC 6522 allows it for this part), so
  8-bit header bytes survive unchanged after decoding. At most
  ``MAX_HEADER_BYTES`` of whole header fields are included.
"""

from __future__ import annotations

import email.utils
import hashlib
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from relay.errors import SmtpReply
from relay.message import split_header

SUBJECT = "Undelivered Mail Returned to Sender"
MAX_HEADER_BYTES = 32 * 1024
"""Most bytes of the original header block returned."""
ORIGINAL_NEEDED = MAX_HEADER_BYTES + 1
"""Bytes of the original message ``build_dsn`` reads: given its first
``ORIGINAL_NEEDED`` bytes, it makes the same notification as given all of it
(a field is returned only if it ends within ``MAX_HEADER_BYTES``, and one more
byte says whether the next line goes on with it)."""
MAX_DIAGNOSTIC = 1000
"""Most characters of one recipient's diagnostic kept."""
_WIDTH = 76
_TEXT_WIDTH = 72
"""Of the text part: short enough that quoted-printable never breaks its lines."""
_LONGEST_WORD = 900
_STATUS = re.compile(r"[45]\.\d{1,3}\.\d{1,3}")
_DIAGNOSTIC_TYPE = re.compile(r"([A-Za-z][A-Za-z0-9-]*);\s*")
_DAEMONS = frozenset({"mailer-daemon", "mailer_daemon", "postmaster", "double-bounce"})
_QCHAR = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"+", "=", "\\"}


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """A recipient given up on: its address, RFC 3463 status and diagnostic.

    ``status`` is ``5.x.y`` (or ``4.x.y`` for mail that expired in the
    queue). ``diagnostic`` is ``smtp; <reply>``; one without a type gets
    ``smtp; `` put in front.
    """

    address: str
    status: str
    diagnostic: str

    def __post_init__(self) -> None:
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"status must look like 5.1.1 (or 4.4.7), not {self.status!r}")

    @classmethod
    def from_reply(cls, address: str, reply: SmtpReply) -> FailedRecipient:
        """The recipient failed with the relay's SMTP reply for an SES error."""
        return cls(address, reply.enhanced, f"smtp; {reply}")


def should_bounce(sender: str, bounces_enabled: bool) -> bool:
    """Whether a permanent failure for mail from ``sender`` gets a DSN.

    Never for the null sender (``""`` or ``<>``), never when bounces are off,
    and never to a mailer-daemon or postmaster address: that is another
    system's bounce, and answering it could loop.
    """
    address = sender.strip().removeprefix("<").removesuffix(">").strip()
    if not bounces_enabled or not address:
        return False
    local = address.rpartition("@")[0] if "@" in address else address
    return local.split("+", 1)[0].lower() not in _DAEMONS


def bounce_sender(configured: str, source: str, hostname: str) -> str:
    """The address a bounce for a message sent as ``source`` comes from.

    ``delivery.bounce_sender`` when set; otherwise ``MAILER-DAEMON@`` the
    domain of the failed message's SES ``Source`` (its envelope sender), an
    identity SES took that message from, so it will most likely take the
    bounce too; ``MAILER-DAEMON@<hostname>`` when ``source`` has no domain.
    """
    if configured:
        return configured
    domain = source.rpartition("@")[2].strip().rstrip(">")
    return f"MAILER-DAEMON@{domain if '@' in source and domain else hostname}"


def build_dsn(
    *,
    original: bytes,
    queue_id: str,
    sender: str,
    failed: Sequence[FailedRecipient],
    reporting_mta: str,
    bounce_from: str,
    arrival: datetime,
    now: datetime,
    message_id: str,
) -> bytes:
    """The DSN to ``sender`` for the ``failed`` recipients of ``original``
    (the message, or its first ``ORIGINAL_NEEDED`` bytes or more).

    ``message_id`` is the DSN's own Message-ID (``<id@host>``; brackets are
    added when missing). ``sender``, ``bounce_from``, ``reporting_mta``,
    ``queue_id`` and ``message_id`` go into header fields: ``ValueError``
    when one is empty or not printable ASCII.
    """
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    for name, value in (
        ("sender", sender),
        ("bounce_from", bounce_from),
        ("reporting_mta", reporting_mta),
        ("queue_id", queue_id),
        ("message_id", message_id),
    ):
        if not value or not all(" " <= c <= "~" for c in value):
            raise ValueError(f"{name} must be printable ASCII, not {value!r}")
    if not message_id.startswith("<"):
        message_id = f"<{message_id}>"
    parts = [
        _text_part(queue_id=queue_id, failed=failed, reporting_mta=reporting_mta, arrival=arrival),
        _status_part(
            queue_id=queue_id, failed=failed, reporting_mta=reporting_mta, arrival=arrival, now=now
        ),
        _headers_part(original),
    ]
    boundary = _boundary(parts)
    head = _lines(
        f"From: Mail Delivery System <{bounce_from}>",
        f"To: <{sender}>",
        f"Subject: {SUBJECT}",
        f"Date: {email.utils.format_datetime(now)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    )
    delimiter = f"--{boundary}\r\n".encode()
    body = b"".join(delimiter + part + b"\r\n" for part in parts)
    return head + body + f"--{boundary}--\r\n".encode()


def _lines(*lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode("ascii")


def _boundary(parts: Sequence[bytes]) -> str:
    """A boundary found in none of the parts (a digest of them, checked)."""
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    for counter in range(100):
        boundary = f"=_dsn_{digest[:32]}_{counter}"
        if not any(boundary.encode() in part for part in parts):
            return boundary
    raise AssertionError("no boundary found")  # pragma: no cover - sha256 collision


# -- the human-readable part


def _text_part(
    *,
    queue_id: str,
    failed: Sequence[FailedRecipient],
    reporting_mta: str,
    arrival: datetime,
) -> bytes:
    intro = (
        f"This is the mail relay at {reporting_mta}.\n\n"
        f"Your message of {email.utils.format_datetime(arrival)} (queue ID {queue_id}) "
        "was accepted for delivery, but it could not be delivered to the recipients "
        "below. The relay has given up on them and will not try again. The headers "
        "of your message are attached.\n\n"
        "If you need help, forward this notice to your postmaster.\n"
    )
    paragraphs = [
        textwrap.fill(" ".join(part.split()), _TEXT_WIDTH) for part in intro.split("\n\n")
    ]
    for recipient in failed:
        reason = _diagnostic_text(recipient.diagnostic)
        paragraphs.append(
            textwrap.fill(
                _readable(f"<{recipient.address}>: {reason} (status {recipient.status})"),
                _TEXT_WIDTH,
                subsequent_indent="    ",
                break_long_words=True,
                break_on_hyphens=False,
            )
        )
    text = "\n\n".join(paragraphs) + "\n"
    if text.isascii():
        head = _lines(
            "Content-Description: Notification",
            "Content-Type: text/plain; charset=us-ascii",
            "Content-Transfer-Encoding: 7bit",
            "",
        )
        return head + text.replace("\n", "\r\n").encode("ascii")
    head = _lines(
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
        "",
    )
    return head + _quoted_printable(text.encode("utf-8"))


def _readable(text: str) -> str:
    """``text`` with any white space as a space and other unprintable characters
    (controls, lone surrogates) as U+FFFD."""
    return "".join(" " if c.isspace() else c if c.isprintable() else "\ufffd" for c in text)


def _quoted_printable(data: bytes) -> bytes:
    """Quoted-printable (RFC 2045) with CRLF line ends and lines of at most 76
    characters. Line breaks are LF or CRLF; any other CR is encoded."""
    out: list[str] = []
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for line in lines:
        current = ""
        for i, byte in enumerate(line):
            literal = (33 <= byte <= 126 and byte != 61) or (byte in (9, 32) and i < len(line) - 1)
            token = chr(byte) if literal else f"={byte:02X}"
            if len(current) + len(token) > 75:
                out.append(current + "=")
                current = ""
            current += token
        out.append(current)
    return "".join(f"{line}\r\n" for line in out).encode("ascii")


# -- the machine-readable part


def _status_part(
    *,
    queue_id: str,
    failed: Sequence[FailedRecipient],
    reporting_mta: str,
    arrival: datetime,
    now: datetime,
) -> bytes:
    blocks = [
        [
            *_field("Reporting-MTA", f"dns; {reporting_mta}"),
            *_field("X-SES-Relay-Queue-ID", queue_id),
            *_field("Arrival-Date", email.utils.format_datetime(arrival)),
        ]
    ]
    for recipient in failed:
        blocks.append(
            [
                *_field("Final-Recipient", _address_field(recipient.address)),
                *_field("Action", "failed"),
                *_field("Status", recipient.status),
                *_field("Diagnostic-Code", _diagnostic_field(recipient.diagnostic)),
                *_field("Last-Attempt-Date", email.utils.format_datetime(now)),
            ]
        )
    head = _lines(
        "Content-Description: Delivery report", "Content-Type: message/delivery-status", ""
    )
    return head + b"\r\n".join(_lines(*block) for block in blocks)


def _address_field(address: str) -> str:
    """``rfc822; addr``, or ``utf-8; <xtext>`` for addresses that need escaping."""
    if address and all(c in _QCHAR for c in address):
        return f"rfc822; {address}"
    return "utf-8; " + "".join(c if c in _QCHAR else _escape(c) for c in address)


def _escape(char: str) -> str:
    code = ord(char)
    if 0xD800 <= code <= 0xDFFF:  # a lone surrogate (undecodable input)
        code = 0xFFFD
    return f"\\x{{{code:02X}}}"


def _split_type(diagnostic: str) -> tuple[str, str]:
    """``smtp; 554 ...`` → ``("smtp", "554 ...")``; no type → ``smtp``."""
    text = " ".join(diagnostic.split())[:MAX_DIAGNOSTIC]
    match = _DIAGNOSTIC_TYPE.match(text)
    if match:
        return match.group(1), text[match.end() :]
    return "smtp", text


def _diagnostic_field(diagnostic: str) -> str:
    kind, text = _split_type(diagnostic)
    ascii_text = "".join(c if " " <= c <= "~" else _escape(c) for c in text)
    return f"{kind}; {ascii_text}"


def _diagnostic_text(diagnostic: str) -> str:
    return _split_type(diagnostic)[1] or "no reason given"


def _field(name: str, value: str) -> list[str]:
    """``name: value`` folded at spaces into lines of about 76 characters.

    ``value`` is printable ASCII. Words over ``_LONGEST_WORD`` characters
    are cut, which adds spaces when the field is unfolded.
    """
    words: list[str] = []
    for word in value.split():
        words.extend(word[i : i + _LONGEST_WORD] for i in range(0, len(word), _LONGEST_WORD))
    lines: list[str] = []
    line = f"{name}:"
    for number, word in enumerate(words):
        if number and len(line) + 1 + len(word) > _WIDTH:
            lines.append(line)
            line = ""
        line += f" {word}"
    lines.append(line)
    return lines


# -- the original headers


def _headers_part(original: bytes) -> bytes:
    fields, _ = split_header(original)
    kept: list[bytes] = []
    size = 0
    for field in fields:
        size += len(field.raw)
        if size > MAX_HEADER_BYTES:
            break
        kept.append(field.raw)
    block = b"".join(kept).replace(b"\r\n", b"\n")
    if block and not block.endswith(b"\n"):
        block += b"\n"
    verbatim = all(
        len(line) <= 998 and all(0x20 <= b < 0x7F or b == 0x09 for b in line)
        for line in block.split(b"\n")
    )
    if verbatim:
        head = _lines(
            "Content-Description: Undelivered Message Headers",
            "Content-Type: text/rfc822-headers",
            "Content-Transfer-Encoding: 7bit",
            "",
        )
        return head + block.replace(b"\n", b"\r\n")
    head = _lines(
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        "Content-Transfer-Encoding: quoted-printable",
        "",
    )
    return head + _quoted_printable(block)
