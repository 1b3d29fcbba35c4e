"""Request bodies of SES API v2 (rest-json, 2019-09-27). Pure: no I/O.

``send_email_chunks`` is the body of a SendEmail call as a generator over
the raw message's chunks (any iterable of bytes-like pieces): the JSON
fields, then the message's base64 as ``Content.Raw.Data``, encoded a piece
at a time (cut at multiples of 3 bytes, so the pieces join into one base64
text), then the JSON that closes it. ``send_email_body`` is the same body
whole, as their join. ``Content`` comes last so that the fields before it
are written once, whatever the message's size.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any, Final

from relay.ses.sender import SendRequest

__all__ = [
    "ACCOUNT_PATH",
    "JSON_CONTENT_TYPE",
    "SEND_EMAIL_PATH",
    "base64_chunks",
    "join",
    "message_chunks",
    "send_email_body",
    "send_email_chunks",
    "send_email_fields",
]

SEND_EMAIL_PATH: Final = "/v2/email/outbound-emails"
ACCOUNT_PATH: Final = "/v2/email/account"
JSON_CONTENT_TYPE: Final = "application/json"

CHUNK: Final = 3 * 256 * 1024
"""Message bytes encoded at a time (a multiple of 3)."""
_CONTENT_OPEN: Final = b'"Content":{"Raw":{"Data":"'
_CONTENT_CLOSE: Final = b'"}}}'


def send_email_fields(request: SendRequest) -> dict[str, Any]:
    """SendEmail's fields but ``Content``, for one batch: the batch's
    recipients in ``ToAddresses`` only (the headers say who the message is
    to; SES counts every address of ``Destination``), the envelope sender as
    ``FromEmailAddress``, and the message's SES parameters."""
    fields: dict[str, Any] = {}
    if request.source is not None:
        fields["FromEmailAddress"] = request.source
    ses = request.ses
    identity_arn = ses.source_arn or ses.from_arn
    if identity_arn is not None:
        fields["FromEmailAddressIdentityArn"] = identity_arn
    if request.destinations:
        fields["Destination"] = {"ToAddresses": list(request.destinations)}
    if ses.return_path_arn is not None:
        fields["FeedbackForwardingEmailAddressIdentityArn"] = ses.return_path_arn
    if ses.tags:
        fields["EmailTags"] = [{"Name": name, "Value": value} for name, value in ses.tags]
    if ses.configuration_set is not None:
        fields["ConfigurationSetName"] = ses.configuration_set
    if ses.contact_list is not None:
        options = {"ContactListName": ses.contact_list}
        if ses.topic is not None:
            options["TopicName"] = ses.topic
        fields["ListManagementOptions"] = options
    return fields


def base64_chunks(chunks: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    """The base64 of the chunks' concatenation, a piece per chunk: each
    chunk's bytes are encoded up to a multiple of 3, and the 1 or 2 left over
    go before the next chunk."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk if carry else chunk
        cut = len(data) - len(data) % 3
        if cut:
            yield base64.b64encode(memoryview(data)[:cut])
        carry = bytes(data[cut:])
    if carry:
        yield base64.b64encode(carry)


def send_email_chunks(
    request: SendRequest, message: Iterable[bytes | memoryview]
) -> Iterator[bytes]:
    """The SendEmail body for ``request`` with the raw message given as
    ``message``'s chunks (``request.raw_message`` is not read)."""
    fields = json.dumps(send_email_fields(request), separators=(",", ":")).encode("ascii")
    yield fields[:-1] + (b"," if len(fields) > 2 else b"") + _CONTENT_OPEN
    yield from base64_chunks(message)
    yield _CONTENT_CLOSE


def message_chunks(raw: bytes, size: int = CHUNK) -> Iterator[memoryview]:
    """``raw`` in pieces of ``size`` bytes, without copying."""
    view = memoryview(raw)
    for start in range(0, len(view), size):
        yield view[start : start + size]


def join(chunks: Iterable[bytes]) -> bytes:
    """The chunks as one bytes object, built in a BytesIO (whose getvalue()
    hands over its buffer, so the body is held once, not twice as a list
    and its join would)."""
    out = io.BytesIO()
    for chunk in chunks:
        out.write(chunk)
    return out.getvalue()


def send_email_body(request: SendRequest) -> bytes:
    """The whole SendEmail body for one batch: ``send_email_chunks`` joined."""
    return join(send_email_chunks(request, message_chunks(request.raw_message)))
