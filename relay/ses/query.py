"""Form bodies for the SES v1 Query API (version 2010-12-01). Pure: no I/O.

Bodies are built by hand: the message goes in as base64 with only ``+``, ``/``
and ``=`` escaped, which is far cheaper than ``urllib.parse.urlencode``.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from urllib.parse import quote

from relay.ses.sender import SendRequest

__all__ = [
    "API_VERSION",
    "FORM_CONTENT_TYPE",
    "encode_form",
    "get_identity_verification_attributes_body",
    "get_send_quota_body",
    "percent_encode",
    "send_raw_email_body",
]

API_VERSION = "2010-12-01"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"

_GET_SEND_QUOTA = b"Action=GetSendQuota&Version=" + API_VERSION.encode()
_SEND_RAW_EMAIL = b"Action=SendRawEmail&Version=" + API_VERSION.encode()
_BARE = re.compile(r"[A-Za-z0-9._~-]*").fullmatch  # needs no escaping
_BASE64_CHUNK = 3 * 256 * 1024
"""Message bytes encoded at a time (a multiple of 3: the pieces join into one
base64 text): the body is built with one chunk's worth of temporary copies."""


def percent_encode(value: str) -> str:
    """RFC 3986 encoding of the UTF-8 bytes: only ``A-Za-z0-9-_.~`` stay bare.

    Space becomes ``%20`` (never ``+``). Lone surrogates raise UnicodeEncodeError.
    """
    return value if _BARE(value) else quote(value, safe="")


def encode_form(params: Sequence[tuple[str, str]]) -> bytes:
    """``name=value&name=value`` in the given order, both sides percent-encoded."""
    pairs = [f"{percent_encode(name)}={percent_encode(value)}" for name, value in params]
    return "&".join(pairs).encode("ascii")


def _write_raw_message_data(out: io.BytesIO, raw_message: bytes) -> None:
    """Base64 of the message, form-escaped (the only non-bare base64 bytes are
    ``+/=``), written to ``out`` a chunk at a time."""
    view = memoryview(raw_message)
    for start in range(0, len(view), _BASE64_CHUNK):
        out.write(
            base64.b64encode(view[start : start + _BASE64_CHUNK])
            .replace(b"+", b"%2B")
            .replace(b"/", b"%2F")
            .replace(b"=", b"%3D")
        )


def send_raw_email_body(request: SendRequest) -> bytes:
    """The form body of a SendRawEmail call for one batch.

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
    # Built in a BytesIO: getvalue() hands over its buffer without a copy, so a
    # 10 MB message costs its encoded size once, not twice.
    body = io.BytesIO()
    body.write(head)
    body.write(b"RawMessage.Data=")
    _write_raw_message_data(body, request.raw_message)
    return body.getvalue()


def get_send_quota_body() -> bytes:
    """The form body of a GetSendQuota call."""
    return _GET_SEND_QUOTA


def get_identity_verification_attributes_body(identities: Sequence[str]) -> bytes:
    """The form body of a GetIdentityVerificationAttributes call (at most
    100 identities: addresses or domains)."""
    params = [("Action", "GetIdentityVerificationAttributes"), ("Version", API_VERSION)]
    params.extend((f"Identities.member.{i}", name) for i, name in enumerate(identities, 1))
    return encode_form(params)
