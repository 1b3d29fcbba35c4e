"""Form bodies for the SES v1 Query API (version 2010-12-01). Pure: no I/O.

Bodies are built by hand: the message goes in as base64 with only ``+``, ``/``
and ``=`` escaped, which is far cheaper than ``urllib.parse.urlencode``.
A SendRawEmail body is produced in chunks from the message's chunks
(``send_raw_email_body``; see ``relay.ses.body``), never whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from urllib.parse import quote

from relay.ses.body import base64_chunks
from relay.ses.sender import SendRequest

__all__ = [
    "API_VERSION",
    "FORM_CONTENT_TYPE",
    "encode_form",
    "get_identity_verification_attributes_body",
    "get_send_quota_body",
    "percent_encode",
    "raw_message_data",
    "send_raw_email_body",
    "send_raw_email_head",
]

API_VERSION = "2010-12-01"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"

_GET_SEND_QUOTA = b"Action=GetSendQuota&Version=" + API_VERSION.encode()
_SEND_RAW_EMAIL = b"Action=SendRawEmail&Version=" + API_VERSION.encode()
_BARE = re.compile(r"[A-Za-z0-9._~-]*").fullmatch  # needs no escaping


def percent_encode(value: str) -> str:
    """RFC 3986 encoding of the UTF-8 bytes: only ``A-Za-z0-9-_.~`` stay bare.

    Space becomes ``%20`` (never ``+``). Lone surrogates raise UnicodeEncodeError.
    """
    return value if _BARE(value) else quote(value, safe="")


def encode_form(params: Sequence[tuple[str, str]]) -> bytes:
    """``name=value&name=value`` in the given order, both sides percent-encoded."""
    pairs = [f"{percent_encode(name)}={percent_encode(value)}" for name, value in params]
    return "&".join(pairs).encode("ascii")


def raw_message_data(raw: Iterable[bytes]) -> Iterator[bytes]:
    """``RawMessage.Data``'s value for the message in ``raw`` chunks: its
    base64, form-escaped (the only base64 bytes that are not bare are
    ``+/=``), a piece per chunk."""
    for piece in base64_chunks(raw):
        yield piece.replace(b"+", b"%2B").replace(b"/", b"%2F").replace(b"=", b"%3D")


def send_raw_email_head(request: SendRequest) -> bytes:
    """The form body of a SendRawEmail call for one batch up to the message:
    it ends with ``RawMessage.Data=``.

    Parameters follow the SES model's order, except ``RawMessage.Data``,
    which comes last. Unset (``None``) parameters are omitted; an empty
    string is sent as given.
    """
    params: list[tuple[str, str]] = []
    if request.source is not None:
        params.append(("Source", request.source))
    params.extend(
        (f"Destinations.member.{i}", address) for i, address in enumerate(request.destinations, 1)
    )
    ses = request.ses
    if ses.from_arn is not None:
        params.append(("FromArn", ses.from_arn))
    if ses.source_arn is not None:
        params.append(("SourceArn", ses.source_arn))
    if ses.return_path_arn is not None:
        params.append(("ReturnPathArn", ses.return_path_arn))
    for i, (name, value) in enumerate(ses.tags, 1):
        params.append((f"Tags.member.{i}.Name", name))
        params.append((f"Tags.member.{i}.Value", value))
    if ses.configuration_set is not None:
        params.append(("ConfigurationSetName", ses.configuration_set))
    head = _SEND_RAW_EMAIL + b"&" + encode_form(params) + b"&" if params else _SEND_RAW_EMAIL + b"&"
    return head + b"RawMessage.Data="


def send_raw_email_body(request: SendRequest, raw: Iterable[bytes]) -> Iterator[bytes]:
    """The form body of a SendRawEmail call for one batch, in chunks:
    ``send_raw_email_head``, then ``raw_message_data`` of ``raw`` (the
    chunks of ``request.raw_message``)."""
    yield send_raw_email_head(request)
    yield from raw_message_data(raw)


def get_send_quota_body() -> bytes:
    """The form body of a GetSendQuota call."""
    return _GET_SEND_QUOTA


def get_identity_verification_attributes_body(identities: Sequence[str]) -> bytes:
    """The form body of a GetIdentityVerificationAttributes call (at most
    100 identities: addresses or domains)."""
    params = [("Action", "GetIdentityVerificationAttributes"), ("Version", API_VERSION)]
    params.extend((f"Identities.member.{i}", name) for i, name in enumerate(identities, 1))
    return encode_form(params)
