"""What SES receives, and in which batches. Pure: bytes in, values out.

The raw message reaches SES byte for byte as received, except that
``Bcc:``/``Resent-Bcc:`` are removed (their recipients travel in the envelope),
the ``X-SES-*`` headers of SES's SMTP interface are removed and become
SendRawEmail parameters, and a missing ``Date:`` or ``Message-ID:`` is added
at the end of the header block, and an empty line is added where the header
block ends without one.

Header fields are read as RFC 5322 (obsolete syntax included) allows, and the
fields that name who sends the message are read strictly
(``relay.addrlist``): exactly one From: field holding mailboxes only, at most
one Sender: field holding one mailbox, To: and Cc: fields that are valid
address lists. Anything else is refused with 550 5.6.0 naming the field, so
that the relay and every mail reader see the same senders. Time and memory
are linear in the size of the message, and the header block is at most
``header_size_limit`` bytes (552 5.3.4 beyond).

Only the header block is needed: a message arriving in pieces goes through
``HeaderSplitter``, which holds the header block alone (at most
``header_size_limit`` bytes and the start of the line after it) and says
where it ends; ``prepare_header`` then makes the header as SES gets it, and
the rest follows unchanged. ``prepare`` does both for a whole message.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from relay.addrlist import parse_address_list, parse_mailbox_list
from relay.errors import MessageRefused, SmtpReply
from relay.ses.sender import NO_PARAMETERS, SesParameters

SES_MAX_RECIPIENTS = 50
"""SendRawEmail's limit: To, Cc and Bcc together, group members counted."""

CONFIGURATION_SET = "x-ses-configuration-set"
MESSAGE_TAGS = "x-ses-message-tags"
SOURCE_ARN = "x-ses-source-arn"
FROM_ARN = "x-ses-from-arn"
RETURN_PATH_ARN = "x-ses-return-path-arn"
LIST_MANAGEMENT = "x-ses-list-management-options"
"""``contactListName; topic=topicName``: read, and left in the message (v1
has no parameter for it; v2 also gets it as ``ListManagementOptions``)."""
IDENTITY_HEADERS = (SOURCE_ARN, FROM_ARN, RETURN_PATH_ARN)
"""Headers that send as an authorized identity: a privilege (see policy)."""

_SES_HEADERS = frozenset({CONFIGURATION_SET, MESSAGE_TAGS, *IDENTITY_HEADERS})
_REMOVED = _SES_HEADERS | {"bcc", "resent-bcc"}

INLINE_HEADER_LIMIT = 8192
"""A header block of at most this many bytes is cheap to prepare
(``cheap_to_prepare``). The cost is in the address fields: a To: field of
8 KiB (some 300 addresses) takes about 5 ms, one GIL switch interval;
64 KiB of them about 45 ms."""

_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
"""RFC 5322 ftext (printable US-ASCII but ':'), then obs-optional's white space."""
_MAY_BE_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]*|[\x21-\x39\x3b-\x7e]+[ \t]*")
"""The start of a line that more bytes could still make a field (``_FIELD_NAME``)."""
_CONTINUATION = frozenset(b" \t")
_LABELS = {"from": "From:", "sender": "Sender:", "to": "To:", "cc": "Cc:"}


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field exactly as received: folded lines and line end included."""

    name: str
    raw: bytes

    @property
    def value(self) -> str:
        """The unfolded value, decoded as UTF-8 (invalid bytes replaced)."""
        return " ".join(self.unfolded.split())

    @property
    def unfolded(self) -> str:
        """The value with its line breaks removed (RFC 5322 unfolding), as UTF-8."""
        _, _, value = self.raw.partition(b":")
        return value.replace(b"\r\n", b"").replace(b"\n", b"").decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class PreparedMessage:
    """A message ready for SES."""

    raw: bytes
    """The message as SES gets it (``prepare``); from ``prepare_header``, only
    its header block, up to and with the empty line (the rest follows as it came)."""
    from_address: str
    """The first mailbox of the From: field."""
    originators: tuple[tuple[str, str], ...]
    """Every mailbox of the From: and Sender: fields, as ``("From:", address)``."""
    header_count: int
    """How many addresses the To and Cc headers name, every occurrence counted:
    what an SES may count beside ``Destinations`` (see ``plan_batches``)."""
    ses: SesParameters

    def identity_headers(self) -> list[str]:
        """The identity headers the message used, by name."""
        ses = self.ses
        used = zip(
            IDENTITY_HEADERS, (ses.source_arn, ses.from_arn, ses.return_path_arn), strict=True
        )
        return [f"X-SES-{name[6:].upper()}" for name, value in used if value]


def refuse(code: int, enhanced: str, text: str) -> MessageRefused:
    return MessageRefused(SmtpReply(code, enhanced, text))


def cheap_to_prepare(header: bytes) -> bool:
    """Whether ``prepare_header`` of this header block is bounded, cheap work
    (at most ``INLINE_HEADER_LIMIT`` bytes): the caller runs it on the event
    loop (a thread hop would cost more than the work), any other in a thread."""
    return len(header) <= INLINE_HEADER_LIMIT


def split_header(raw: bytes) -> tuple[list[HeaderField], bytes]:
    """The header fields, and the rest: the empty line and the body.

    A line that is neither a field nor a continuation ends the header block.
    """
    splitter = HeaderSplitter()
    splitter.feed(raw, final=True)
    fields = header_fields(splitter.header)
    return fields, raw[len(splitter.header) :]


def header_fields(header: bytes) -> list[HeaderField]:
    """The fields of a header block (as ``HeaderSplitter`` cuts it out).

    A field starts with a line ``name:`` (``name :`` too, RFC 5322 obs-optional)
    and goes on with the lines that start with a space or a tab. Linear: each
    field is cut out of ``header`` once.
    """
    fields: list[HeaderField] = []
    name = ""  # of the field being read
    field_start = start = 0
    size = len(header)
    while start < size:
        end = header.find(b"\n", start)
        end = size if end < 0 else end + 1
        if not (name and header[start] in _CONTINUATION):
            if name:
                fields.append(HeaderField(name, header[field_start:start]))
            found = _FIELD_NAME.match(header, start, end)
            if found is None:  # not a header block: nothing more of it is a field
                return fields
            name, field_start = found.group(1).decode("ascii"), start
        start = end
    if name:
        fields.append(HeaderField(name, header[field_start:start]))
    return fields


class HeaderSplitter:
    """Finds where the header block of a message arriving in pieces ends,
    holding no more than the header block and the start of the line after it.

    A header field starts with a line ``name:`` and goes on with the lines
    that start with a space or a tab; the first other line ends the header
    block (it is where the rest, usually the empty line and the body, starts).
    With ``size_limit``, every line of the header block must end within the
    first ``size_limit`` bytes, and the line after it must show within them
    (and one more byte) that it is no field; otherwise ``MessageRefused``
    (552 5.3.4), as soon as the bytes that decide it have arrived, whatever
    the pieces. So at most ``size_limit + 1`` bytes are held before the end
    is known, and at most one piece more when it is.
    """

    __slots__ = ("_buffer", "_in_field", "_limit", "_start", "header", "split")

    def __init__(self, size_limit: int | None = None) -> None:
        self._limit = size_limit
        self._buffer = bytearray()
        self._start = 0
        """Where the first line not classified yet starts."""
        self._in_field = False
        self.split = False
        """The end of the header block is known: ``header`` holds it."""
        self.header = b""

    def feed(self, piece: bytes, *, final: bool = False) -> bytes:
        """Take the next piece (``final``: the last); once the header block's
        end is known (``split``), return what follows it so far, and every
        later piece as it is. ``MessageRefused`` when the header block is too long."""
        if self.split:
            return piece
        buffer = self._buffer
        buffer += piece
        size, limit, start = len(buffer), self._limit, self._start
        while start < size:
            end = buffer.find(b"\n", start) + 1
            if not end:
                # An unfinished line is classified only at the end, or once
                # the bytes that decide it under the limit have arrived.
                if not final and (limit is None or size <= limit or size - start < 2):
                    break
                end = size
            if not (self._in_field and buffer[start] in _CONTINUATION):
                if _FIELD_NAME.match(buffer, start, end) is None:
                    if (
                        limit is not None
                        and end > limit
                        and _MAY_BE_FIELD.fullmatch(buffer, start, limit + 1)
                    ):
                        raise _header_too_big(limit)
                    return self._split_at(start)
                self._in_field = True
            if limit is not None and end > limit:
                raise _header_too_big(limit)
            start = end
        self._start = start
        return self._split_at(start) if final else b""

    def _split_at(self, end: int) -> bytes:
        buffer = self._buffer
        self.header = bytes(buffer[:end])
        rest = bytes(buffer[end:])
        self._buffer = bytearray()
        self.split = True
        return rest


def _header_too_big(limit: int) -> MessageRefused:
    return refuse(552, "5.3.4", f"message header exceeds {limit} bytes")


def prepare(
    raw: bytes,
    *,
    now: datetime,
    message_id: Callable[[], str],
    defaults: SesParameters = NO_PARAMETERS,
    header_size_limit: int | None = None,
) -> PreparedMessage:
    """The whole message as SES gets it (``raw`` itself when nothing
    changes); see ``prepare_header``."""
    splitter = HeaderSplitter(header_size_limit)
    rest = splitter.feed(raw, final=True)
    prepared = prepare_header(
        splitter.header, rest, now=now, message_id=message_id, defaults=defaults
    )
    if prepared.raw == splitter.header:
        return replace(prepared, raw=raw)
    return replace(prepared, raw=prepared.raw + rest)


def prepare_header(
    header: bytes,
    rest: bytes,
    *,
    now: datetime,
    message_id: Callable[[], str],
    defaults: SesParameters = NO_PARAMETERS,
) -> PreparedMessage:
    """The header block as SES gets it, up to the rest of the message, which
    follows unchanged; ``MessageRefused`` (5xx) if the message is unusable.

    ``header`` is the header block (``HeaderSplitter.header``); ``rest`` the
    start of what follows it (at least the line after it, when there is one:
    ``HeaderSplitter.feed`` returns that much). ``message_id`` makes a
    ``<unique@host>`` id for a message without one. ``defaults`` are the
    configured parameters that headers may override.
    """
    fields = header_fields(header)
    by_name: dict[str, list[HeaderField]] = {}
    for field in fields:
        by_name.setdefault(field.name.lower(), []).append(field)

    senders = _mailboxes(_only(by_name, "from"))
    if not senders:
        raise refuse(550, "5.6.0", "message has no From: header with an address")
    sender_field = _only(by_name, "sender")
    sender = _mailboxes(sender_field)
    if sender_field is not None and len(sender) != 1:
        raise refuse(550, "5.6.0", "Sender: header must hold exactly one mailbox")
    ses = _ses_parameters(by_name, defaults)
    crlf = b"\r\n" in header or b"\r\n" in rest or not (header or rest)
    newline = b"\r\n" if crlf else b"\n"
    headers = [f.raw for f in fields if f.name.lower() not in _REMOVED]
    changed = len(headers) < len(fields)
    if headers and not headers[-1].endswith(b"\n"):
        headers[-1] += newline
        changed = True
    if "date" not in by_name:
        headers.append(b"Date: " + email.utils.format_datetime(now).encode() + newline)
        changed = True
    if "message-id" not in by_name:
        headers.append(b"Message-ID: " + message_id().encode() + newline)
        changed = True
    if not rest.startswith((b"\r\n", b"\n")):  # no empty line: make one
        headers.append(newline)
        changed = True
    return PreparedMessage(
        raw=b"".join(headers) if changed else header,
        from_address=senders[0],
        originators=(
            *(("From:", address) for address in senders),
            *(("Sender:", address) for address in sender),
        ),
        header_count=len(addresses([*by_name.get("to", ()), *by_name.get("cc", ())])),
        ses=ses,
    )


def addresses(fields: Iterable[HeaderField]) -> list[str]:
    """The addresses of address-list fields (To:, Cc:), in order, groups
    flattened, repeats kept; ``MessageRefused`` (550 5.6.0) names a field
    that is not a valid address list."""
    found: list[str] = []
    for field in fields:
        found.extend(_parsed(field, parse_address_list, "address list"))
    return found


def _mailboxes(field: HeaderField | None) -> list[str]:
    """The mailboxes of a From: or Sender: field (none when it is absent)."""
    return [] if field is None else _parsed(field, parse_mailbox_list, "mailbox list")


def _parsed(field: HeaderField, parse: Callable[[str], list[str]], what: str) -> list[str]:
    label = _LABELS.get(field.name.lower(), f"{field.name}:")
    try:
        return parse(field.unfolded)
    except ValueError as problem:
        raise refuse(550, "5.6.0", f"{label} header is not a valid {what}: {problem}") from None


def _only(by_name: dict[str, list[HeaderField]], name: str) -> HeaderField | None:
    """The one field called ``name``, if any; ``MessageRefused`` when repeated."""
    found = by_name.get(name, [])
    if len(found) > 1:
        raise refuse(
            550, "5.6.0", f"message has {len(found)} {_LABELS[name]} header fields; one is allowed"
        )
    return found[0] if found else None


def address_key(address: str) -> str:
    """Compare addresses case-insensitively, as mail systems in practice do."""
    return address.lower()


def _first(by_name: dict[str, list[HeaderField]], name: str) -> str | None:
    found = by_name.get(name)
    return found[0].value or None if found else None


def _ses_parameters(
    by_name: dict[str, list[HeaderField]], defaults: SesParameters
) -> SesParameters:
    tags = defaults.tags
    tag_header = _first(by_name, MESSAGE_TAGS)
    if tag_header is not None:
        tags = parse_tags(tag_header)
    contact_list, topic = parse_list_management(_first(by_name, LIST_MANAGEMENT) or "")
    return SesParameters(
        configuration_set=_first(by_name, CONFIGURATION_SET) or defaults.configuration_set,
        tags=tags,
        source_arn=_first(by_name, SOURCE_ARN) or defaults.source_arn,
        from_arn=_first(by_name, FROM_ARN) or defaults.from_arn,
        return_path_arn=_first(by_name, RETURN_PATH_ARN) or defaults.return_path_arn,
        contact_list=contact_list,
        topic=topic,
    )


def parse_list_management(value: str) -> tuple[str | None, str | None]:
    """``X-SES-LIST-MANAGEMENT-OPTIONS: contactListName; topic=topicName`` as
    the contact list and topic; ``(None, None)`` without a contact list name
    (the header then only travels in the message, for SES to judge)."""
    name, _, rest = value.partition(";")
    contact_list = name.strip()
    if not contact_list:
        return None, None
    topic = None
    for item in rest.split(";"):
        key, equals, found = item.partition("=")
        if equals and key.strip().lower() == "topic" and found.strip():
            topic = found.strip()
    return contact_list, topic


def parse_tags(value: str) -> tuple[tuple[str, str], ...]:
    """``X-SES-MESSAGE-TAGS: name1=value1, name2=value2`` as pairs."""
    tags: list[tuple[str, str]] = []
    for item in value.split(","):
        name, equals, tag_value = item.partition("=")
        name, tag_value = name.strip(), tag_value.strip()
        if not item.strip():
            continue
        if not equals or not name:
            raise refuse(
                550, "5.6.0", "X-SES-MESSAGE-TAGS must be name=value pairs separated by commas"
            )
        tags.append((name, tag_value))
    return tuple(tags)


def plan_batches(
    recipients: Sequence[str],
    header_count: int,
    limit: int = SES_MAX_RECIPIENTS,
) -> list[tuple[str, ...]]:
    """Envelope recipients in SendRawEmail batches, in order, each address once.

    ``header_count`` is how many addresses the To and Cc headers name, every
    occurrence counted. SES counts every recipient across To, Cc and Bcc
    against ``limit``, but how it counts an address named both in
    ``Destinations`` and in a header is not documented: moto counts the
    ``Destinations`` plus every To/Cc occurrence, duplicates included. A
    batch of ``limit - header_count`` recipients passes whichever way they
    are counted (the union is never larger than that sum). Raises
    ``MessageRefused`` (550 5.5.3) when the headers alone leave no room.
    """
    room = limit - header_count
    if room < 1:
        raise refuse(
            550,
            "5.5.3",
            f"the To/Cc headers name {header_count} addresses, which leaves no room for "
            f"recipients within SES's {limit} per message: put the list in Bcc or address "
            "it to undisclosed-recipients:; and send it again",
        )
    first: dict[str, str] = {}
    for recipient in recipients:
        first.setdefault(address_key(recipient), recipient)
    unique = list(first.values())
    return [tuple(unique[i : i + room]) for i in range(0, len(unique), room)]
