"""A fake Amazon SES (Query API 2010-12-01, and API v2's SendEmail and
GetAccount) that speaks the real protocols.

``FakeSes`` is an aiohttp server on 127.0.0.1 (ephemeral port) over TLS with a
throwaway CA made by ``trustme``. For every request it:

* records it (``FakeSes.requests``: method, path, headers, raw body, parsed form
  parameters, decoded ``RawMessage.Data``, destinations, tags, the connection it
  came on);
* verifies its SigV4 signature with botocore as the oracle (the received
  request is rebuilt as an ``AWSRequest`` from the headers the client said it
  signed, and botocore's ``SigV4Auth`` computes the signature at the request's
  ``X-Amz-Date``); a bad signature gets a 403 ``SignatureDoesNotMatch``, an
  unknown key a 403 ``InvalidClientTokenId``, exactly as SES words them;
* answers with the next scripted behaviour (``FakeSes.script(...)``), or, when
  the script is empty, with SES's success answer for the action
  (``SendRawEmail``, ``GetSendQuota``, ``GetIdentityVerificationAttributes``:
  "Success" for the identities in ``FakeSes.verified``, the others left out).

Requests refused for their signature do not consume a scripted behaviour.

API v2 (rest-json) is served on the same host: ``POST /v2/email/outbound-emails``
(SendEmail; the fake demands ``Content.Raw.Data`` in valid base64 and
answers ``{"MessageId": ...}``) and ``GET /v2/email/account`` (GetAccount:
``FakeSes.quota`` and ``FakeSes.sending_enabled``). Its requests are
recorded alike (``RecordedRequest.action`` is "SendEmail" or "GetAccount",
``raw_message`` and ``destinations`` read from the JSON) and signed alike;
``V2ErrorReply`` answers a v2 error as SES does (JSON body and
``x-amzn-ErrorType`` header).

Behaviours (all in this module): ``Succeed``, ``SesErrorReply``, ``RawReply``,
``Delay``, ``Trickle``, ``ResetMidBody``, ``CloseWithoutAnswer``, ``HugeBody``.
Hostile bodies: ``billion_laughs_body``, ``xxe_body``, ``errors_shape_body``,
``success_without_message_id_body``, ``HTML_BODY``.

Nothing here sleeps for a fixed long time: delays wait on an ``asyncio.Event``
or a timeout, and every endless behaviour ends when the fake closes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import itertools
import json
import re
import ssl
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Protocol
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

import trustme
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from multidict import CIMultiDict

SES_XMLNS = "http://ses.amazonaws.com/doc/2010-12-01/"
API_VERSION = "2010-12-01"

DEFAULT_ACCESS_KEY = "AKIAFAKESES0EXAMPLE1"
DEFAULT_SECRET_KEY = "fakeSesSecret/K7MDENG/bPxRfiCYEXAMPLEKEY"

SIGNATURE_MISMATCH_MESSAGE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)
INVALID_TOKEN_MESSAGE = "The security token included in the request is invalid."

MAX_CLOCK_SKEW = 15 * 60.0
"""Seconds an X-Amz-Date may be off from the fake's clock, as at AWS."""

SEND_RAW_EMAIL_PARAMS = re.compile(
    r"Action|Version|RawMessage\.Data|Source|FromArn|SourceArn|ReturnPathArn"
    r"|ConfigurationSetName|Destinations\.member\.[1-9][0-9]*"
    r"|Tags\.member\.[1-9][0-9]*\.(Name|Value)"
)
GET_SEND_QUOTA_PARAMS = re.compile(r"Action|Version")
IDENTITY_VERIFICATION_PARAMS = re.compile(r"Action|Version|Identities\.member\.[1-9][0-9]*")

V2_ROUTES = {
    ("POST", "/v2/email/outbound-emails"): "SendEmail",
    ("GET", "/v2/email/account"): "GetAccount",
}
"""The v2 operations the fake serves, by method and path."""

ACTION = web.RequestKey("ses_action", str)
"""Where the handler leaves the request's Action for the behaviours."""
PARAMS = web.RequestKey("ses_params", dict[str, str])
"""... and its form parameters."""


# --------------------------------------------------------------------------- bodies


def new_request_id() -> str:
    return str(uuid.uuid4())


def new_message_id() -> str:
    """An id shaped like SES's: ``010001...-uuid-000000``."""
    return f"0100{int(time.time() * 1000):012x}-{uuid.uuid4()}-000000"


def send_raw_email_body(message_id: str, request_id: str) -> bytes:
    return (
        f'<SendRawEmailResponse xmlns="{SES_XMLNS}">\n'
        f"  <SendRawEmailResult>\n"
        f"    <MessageId>{escape(message_id)}</MessageId>\n"
        f"  </SendRawEmailResult>\n"
        f"  <ResponseMetadata>\n"
        f"    <RequestId>{escape(request_id)}</RequestId>\n"
        f"  </ResponseMetadata>\n"
        f"</SendRawEmailResponse>\n"
    ).encode()


def get_send_quota_body(
    max_24_hour_send: float, max_send_rate: float, sent_last_24_hours: float, request_id: str
) -> bytes:
    return (
        f'<GetSendQuotaResponse xmlns="{SES_XMLNS}">\n'
        f"  <GetSendQuotaResult>\n"
        f"    <SentLast24Hours>{sent_last_24_hours!r}</SentLast24Hours>\n"
        f"    <Max24HourSend>{max_24_hour_send!r}</Max24HourSend>\n"
        f"    <MaxSendRate>{max_send_rate!r}</MaxSendRate>\n"
        f"  </GetSendQuotaResult>\n"
        f"  <ResponseMetadata>\n"
        f"    <RequestId>{escape(request_id)}</RequestId>\n"
        f"  </ResponseMetadata>\n"
        f"</GetSendQuotaResponse>\n"
    ).encode()


def identity_verification_body(statuses: dict[str, str], request_id: str) -> bytes:
    entries = "".join(
        f"      <entry>\n        <key>{escape(name)}</key>\n        <value>\n"
        f"          <VerificationStatus>{escape(status)}</VerificationStatus>\n"
        f"        </value>\n      </entry>\n"
        for name, status in statuses.items()
    )
    return (
        f'<GetIdentityVerificationAttributesResponse xmlns="{SES_XMLNS}">\n'
        f"  <GetIdentityVerificationAttributesResult>\n"
        f"    <VerificationAttributes>\n{entries}    </VerificationAttributes>\n"
        f"  </GetIdentityVerificationAttributesResult>\n"
        f"  <ResponseMetadata>\n"
        f"    <RequestId>{escape(request_id)}</RequestId>\n"
        f"  </ResponseMetadata>\n"
        f"</GetIdentityVerificationAttributesResponse>\n"
    ).encode()


def error_body(code: str, message: str, request_id: str, error_type: str = "Sender") -> bytes:
    """SES's real error document."""
    return (
        f'<ErrorResponse xmlns="{SES_XMLNS}">\n'
        f"  <Error>\n"
        f"    <Type>{escape(error_type)}</Type>\n"
        f"    <Code>{escape(code)}</Code>\n"
        f"    <Message>{escape(message)}</Message>\n"
        f"  </Error>\n"
        f"  <RequestId>{escape(request_id)}</RequestId>\n"
        f"</ErrorResponse>\n"
    ).encode()


def errors_shape_body(code: str, message: str, request_id: str = "req-errors-shape") -> bytes:
    """The ``Response/Errors/Error`` shape (EC2-style) some AWS front ends answer."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(code)}</Code>"
        f"<Message>{escape(message)}</Message></Error></Errors>"
        f"<RequestID>{escape(request_id)}</RequestID></Response>\n"
    ).encode()


def success_without_message_id_body(request_id: str = "req-no-message-id") -> bytes:
    return (
        f'<SendRawEmailResponse xmlns="{SES_XMLNS}">'
        f"<SendRawEmailResult></SendRawEmailResult>"
        f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>"
        f"</SendRawEmailResponse>"
    ).encode()


HTML_BODY = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>The proxy could not reach upstream.</p></body></html>\n"
)

GARBAGE_BODY = bytes(range(256)) * 4


def billion_laughs_body(depth: int = 10) -> bytes:
    """The classic exponential entity expansion (10 levels: 10**9 'lol's)."""
    entities = ['  <!ENTITY lol0 "lol">']
    entities += [f'  <!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, depth)]
    return (
        '<?xml version="1.0"?>\n<!DOCTYPE SendRawEmailResponse [\n'
        + "\n".join(entities)
        + f'\n]>\n<SendRawEmailResponse xmlns="{SES_XMLNS}"><SendRawEmailResult>'
        f"<MessageId>&lol{depth - 1};</MessageId></SendRawEmailResult>"
        "<ResponseMetadata><RequestId>laughs</RequestId></ResponseMetadata>"
        "</SendRawEmailResponse>\n"
    ).encode()


def xxe_body(path: str | Path) -> bytes:
    """An external entity that would put the file at ``path`` into the MessageId."""
    uri = Path(path).resolve().as_uri()
    return (
        '<?xml version="1.0"?>\n'
        f'<!DOCTYPE SendRawEmailResponse [ <!ENTITY xxe SYSTEM "{uri}"> ]>\n'
        f'<SendRawEmailResponse xmlns="{SES_XMLNS}"><SendRawEmailResult>'
        "<MessageId>&xxe;</MessageId></SendRawEmailResult>"
        "<ResponseMetadata><RequestId>xxe</RequestId></ResponseMetadata>"
        "</SendRawEmailResponse>\n"
    ).encode()


# --------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes
    params: dict[str, str]
    """Form parameters (``application/x-www-form-urlencoded`` body)."""
    duplicate_params: list[str]
    """Names that appeared more than once in the form (SES would not expect any)."""
    peer: tuple[str, int]
    connection: int
    """Serial number of the connection (1, 2, ...) the request arrived on."""
    auth_error: str | None = None
    """Error code the fake answered for authentication, or None if it verified."""
    received_at: float = field(default_factory=time.monotonic)
    v2_action: str | None = None
    """The API v2 operation (by method and path), or None for a Query API call."""

    @property
    def action(self) -> str | None:
        return self.v2_action or self.params.get("Action")

    @property
    def json(self) -> dict[str, object]:
        """A v2 request's JSON body ({} when it is not a JSON object)."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def signature_ok(self) -> bool:
        return self.auth_error is None

    @property
    def raw_message(self) -> bytes | None:
        """``RawMessage.Data`` (v2: ``Content.Raw.Data``) base64-decoded, or
        None if absent or not base64."""
        data = _v2_raw_data(self.json) if self.v2_action else self.params.get("RawMessage.Data")
        if data is None:
            return None
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error:
            return None

    @property
    def destinations(self) -> list[str]:
        """``Destinations`` (v2: ``Destination.ToAddresses``)."""
        if self.v2_action:
            destination = self.json.get("Destination")
            found = destination.get("ToAddresses") if isinstance(destination, dict) else None
            return list(found) if isinstance(found, list) else []
        return _members(self.params, "Destinations.member.")

    @property
    def tags(self) -> list[tuple[str, str]]:
        names = _members(self.params, "Tags.member.", ".Name")
        values = _members(self.params, "Tags.member.", ".Value")
        return list(zip(names, values, strict=False))

    def unexpected_params(self) -> list[str]:
        """Parameter names the action does not define."""
        pattern = {
            "SendRawEmail": SEND_RAW_EMAIL_PARAMS,
            "GetSendQuota": GET_SEND_QUOTA_PARAMS,
            "GetIdentityVerificationAttributes": IDENTITY_VERIFICATION_PARAMS,
        }
        allowed = pattern.get(self.action or "")
        if allowed is None:
            return sorted(self.params)
        return sorted(name for name in self.params if not allowed.fullmatch(name))


def _v2_raw_data(body: dict[str, object]) -> str | None:
    content = body.get("Content")
    raw = content.get("Raw") if isinstance(content, dict) else None
    data = raw.get("Data") if isinstance(raw, dict) else None
    return data if isinstance(data, str) else None


def _members(params: dict[str, str], prefix: str, suffix: str = "") -> list[str]:
    """Values of ``prefix<N>suffix`` parameters, in order of N."""
    found: list[tuple[int, str]] = []
    for name, value in params.items():
        if name.startswith(prefix) and name.endswith(suffix):
            index = name[len(prefix) : len(name) - len(suffix)]
            if index.isdigit():
                found.append((int(index), value))
    return [value for _, value in sorted(found)]


# --------------------------------------------------------------------------- signature


@dataclass(frozen=True)
class AuthFailure:
    status: int
    code: str
    message: str


@dataclass(frozen=True)
class KnownKey:
    secret_access_key: str
    session_token: str | None = None


_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<signature>[0-9a-f]{64})\s*"
)


def verify_sigv4(
    *,
    method: str,
    url: str,
    headers: CIMultiDict[str],
    body: bytes,
    keys: dict[str, KnownKey],
    region: str,
    service: str = "ses",
    now: datetime | None = None,
    max_skew: float | None = MAX_CLOCK_SKEW,
) -> AuthFailure | None:
    """Check a received request's SigV4 signature; None if it is valid.

    botocore is the oracle: the request is rebuilt from the headers the client
    listed in ``SignedHeaders`` (plus, for temporary credentials, the security
    token header, which botocore always signs) and signed with the known secret
    at the request's own timestamp.
    """
    authorization = headers.get("Authorization")
    if authorization is None:
        return AuthFailure(
            403, "MissingAuthenticationToken", "Request is missing Authentication Token"
        )
    match = _AUTH_RE.fullmatch(authorization.strip())
    if match is None:
        return AuthFailure(
            400,
            "IncompleteSignature",
            "Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' "
            f"parameters. Authorization={authorization.split(' ', 1)[0]}",
        )
    credential = match["credential"].split("/")
    if len(credential) != 5:
        return AuthFailure(
            400, "IncompleteSignature", f"Credential is malformed: {match['credential']}"
        )
    access_key, date, cred_region, cred_service, terminator = credential
    known = keys.get(access_key)
    if known is None:
        return AuthFailure(403, "InvalidClientTokenId", INVALID_TOKEN_MESSAGE)
    amz_date = headers.get("X-Amz-Date")
    if amz_date is None:
        return AuthFailure(
            400,
            "IncompleteSignature",
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
        )
    try:
        stamp = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return AuthFailure(
            400,
            "IncompleteSignature",
            f"Date must be in ISO-8601 'basic format'. Got '{amz_date}'.",
        )
    if terminator != "aws4_request" or date != amz_date[:8]:
        return AuthFailure(
            403,
            "SignatureDoesNotMatch",
            f"Credential should be scoped correctly: {match['credential']}",
        )
    if cred_region != region:
        return AuthFailure(
            403,
            "SignatureDoesNotMatch",
            f"Credential should be scoped to a valid region, not '{cred_region}'.",
        )
    if cred_service != service:
        return AuthFailure(
            403,
            "SignatureDoesNotMatch",
            f"Credential should be scoped to correct service: '{service}'.",
        )
    if max_skew is not None:
        now = now or datetime.now(UTC)
        if abs((now - stamp).total_seconds()) > max_skew:
            return AuthFailure(
                403,
                "SignatureDoesNotMatch",
                f"Signature expired: {amz_date} is now earlier than "
                f"{now.strftime('%Y%m%dT%H%M%SZ')} (15 min. skew allowed).",
            )
    token = headers.get("X-Amz-Security-Token")
    if known.session_token is not None and token != known.session_token:
        return AuthFailure(403, "InvalidClientTokenId", INVALID_TOKEN_MESSAGE)
    if known.session_token is None and token is not None:
        return AuthFailure(403, "InvalidClientTokenId", INVALID_TOKEN_MESSAGE)
    declared_hash = headers.get("X-Amz-Content-SHA256")
    if declared_hash is not None and declared_hash != hashlib.sha256(body).hexdigest():
        return AuthFailure(
            403,
            "SignatureDoesNotMatch",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        )

    signed_names = match["signed"].split(";")
    if signed_names != sorted(set(signed_names)) or not {"host", "x-amz-date"} <= set(signed_names):
        return AuthFailure(403, "SignatureDoesNotMatch", SIGNATURE_MISMATCH_MESSAGE)
    rebuilt: dict[str, str] = {}
    for name in signed_names:
        values = headers.getall(name, [])
        if not values:
            return AuthFailure(403, "SignatureDoesNotMatch", SIGNATURE_MISMATCH_MESSAGE)
        rebuilt[name] = ",".join(values)
    if known.session_token is not None:
        # botocore always adds and signs the token header; demand the same.
        rebuilt["x-amz-security-token"] = known.session_token
    request = AWSRequest(method=method, url=url, headers=rebuilt, data=body)
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(
        BotoCredentials(access_key, known.secret_access_key, known.session_token), service, region
    )
    canonical = signer.canonical_request(request)
    expected_signed = signer.signed_headers(signer.headers_to_sign(request))
    expected_signature = signer.signature(signer.string_to_sign(request, canonical), request)
    if expected_signed != match["signed"] or expected_signature != match["signature"]:
        return AuthFailure(403, "SignatureDoesNotMatch", SIGNATURE_MISMATCH_MESSAGE)
    return None


# --------------------------------------------------------------------------- behaviours


class Behaviour(Protocol):
    async def respond(self, request: web.Request, fake: FakeSes) -> web.StreamResponse: ...


@dataclass
class Succeed:
    """SES's success answer for the request's action (the default behaviour)."""

    message_id: str | None = None

    async def respond(self, request: web.Request, fake: FakeSes) -> web.StreamResponse:
        return fake.success_response(request, self.message_id)


@dataclass
class SesErrorReply:
    """An SES error document: ``SesErrorReply(400, "MessageRejected", "Email address ...")``."""

    status: int
    code: str
    message: str
    type: str = "Sender"
    request_id: str | None = None

    async def respond(self, request: web.Request, fake: FakeSes) -> web.StreamResponse:
        request_id = self.request_id or new_request_id()
        return web.Response(
            status=self.status,
            body=error_body(self.code, self.message, request_id, self.type),
            content_type="text/xml",
            headers={"x-amzn-RequestId": request_id},
        )


@dataclass
class V2ErrorReply:
    """An API v2 error as SES answers it: ``V2ErrorReply(429,
    "TooManyRequestsException", "Maximum sending rate exceeded.")``. The
    code travels in the ``x-amzn-ErrorType`` header (``header_suffix`` is
    added after a colon, as AWS front ends do) unless ``in_header`` is
    False, and in the body's ``__type`` with a namespace unless ``in_body``
    is False."""

    status: int
    code: str
    message: str
    in_header: bool = True
    in_body: bool = True
    header_suffix: str = "http://internal.amazon.com/coral/com.amazonaws.sesv2/"
    message_key: str = "message"

    async def respond(self, request: web.Request, fake: FakeSes) -> web.StreamResponse:
        return v2_error_response(
            self.status,
            self.code,
            self.message,
            in_header=self.in_header,
            in_body=self.in_body,
            header_suffix=self.header_suffix,
            message_key=self.message_key,
        )


def v2_error_response(
    status: int,
    code: str,
    message: str,
    *,
    in_header: bool = True,
    in_body: bool = True,
    header_suffix: str = "",
    message_key: str = "message",
) -> web.Response:
    request_id = new_request_id()
    headers = {"x-amzn-RequestId": request_id}
    if in_header:
        headers["x-amzn-ErrorType"] = f"{code}:{header_suffix}" if header_suffix else code
    body: dict[str, str] = {message_key: message}
    if in_body:
        body["__type"] = f"com.amazonaws.sesv2#{code}"
    return web.json_response(body, status=status, headers=headers)


@dataclass
class RawReply:
    """Any status, body and content type (HTML, garbage, empty, other XML shapes)."""

    status: int
    body: bytes = b""
    content_type: str | None = "text/xml"
    headers: dict[str, str] = field(default_factory=dict)

    async def respond(self, request: web.Request, fake: FakeSes) -> web.StreamResponse:
        response = web.Response(status=self.status, body=self.body, headers=self.headers)
        if self.content_type is not None:
            response.headers["Content-Type"] = self.content_type
        return response


@dataclass
class Delay:
    """Hold the answer until ``release`` is set or ``timeout`` passes, then ``then``.

    With neither, it holds until the fake closes. ``arrived`` is set when a
    request reaches this behaviour.
    """

    release: asyncio.Event | None = None
    timeout: float | None = None
    then: Behaviour | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def respond(self, request: web.Request, fake: FakeSes) -> web.StreamResponse:
        self.arrived.set()
        waiters = [asyncio.ensure_future(fake.closing.wait())]
        if self.release is not None:
            waiters.append(asyncio.ensure_future(self.release.wait()))
        try:
            await asyncio.wait(waiters, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return await (self.then or Succeed()).respond(request, fake)


@dataclass
class Trickle:
    """A 200 whose body arrives one byte per ``interval``, never ending.

    Ends only when the client goes away, the fake closes, or after
    ``max_seconds`` (a safety bound, far beyond any sane client timeout).
    ``bytes_sent`` counts what was written.
    """

    interval: float = 0.02
    status: int = 200
    prefix: bytes = f'<SendRawEmailResponse xmlns="{SES_XMLNS}">'.encode()
    byte: bytes = b" "
    max_seconds: float = 30.0
    bytes_sent: int = 0

    async def respond(self, request: web.Request, fake: FakeSes) -> web.StreamResponse:
        response = web.StreamResponse(status=self.status, headers={"Content-Type": "text/xml"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        deadline = time.monotonic() + self.max_seconds
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(self.prefix)
            self.bytes_sent += len(self.prefix)
            while not fake.closing.is_set() and time.monotonic() < deadline:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                await response.write(self.byte)
                self.bytes_sent += len(self.byte)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fake.closing.wait(), self.interval)
        _abort(request)
        return response


@dataclass
class ResetMidBody:
    """Headers and part of the body, then the connection is aborted."""

    status: int = 200
    partial: bytes = (
        f'<SendRawEmailResponse xmlns="{SES_XMLNS}"><SendRawEmailResult><MessageId>0100'
    ).encode()
    declared_length: int = 4096

    async def respond(self, request: web.Request, fake: FakeSes) -> web.StreamResponse:
        response = web.StreamResponse(
            status=self.status,
            headers={"Content-Type": "text/xml", "Content-Length": str(self.declared_length)},
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(self.partial)
        _abort(request)
        return response


@dataclass
class CloseWithoutAnswer:
    """Read the request, then drop the connection without a status line."""

    async def respond(self, request: web.Request, fake: FakeSes) -> web.StreamResponse:
        _abort(request)
        return web.Response(status=500)


@dataclass
class HugeBody:
    """A ``size``-byte answer streamed in ``chunk_size`` pieces (never held in memory).

    The body opens like a SendRawEmail answer and goes on with filler inside
    the MessageId. ``chunked`` chooses chunked encoding over a Content-Length.
    ``bytes_sent`` counts what the client let through.
    """

    size: int = 100 * 1024 * 1024
    chunk_size: int = 64 * 1024
    chunked: bool = True
    status: int = 200
    bytes_sent: int = 0

    async def respond(self, request: web.Request, fake: FakeSes) -> web.StreamResponse:
        response = web.StreamResponse(status=self.status, headers={"Content-Type": "text/xml"})
        if self.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = self.size
        await response.prepare(request)
        head = f'<SendRawEmailResponse xmlns="{SES_XMLNS}"><SendRawEmailResult><MessageId>'.encode()
        filler = b"x" * self.chunk_size
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(head)
            self.bytes_sent = len(head)
            while self.bytes_sent < self.size and not fake.closing.is_set():
                piece = filler[: self.size - self.bytes_sent]
                await response.write(piece)
                self.bytes_sent += len(piece)
            await response.write_eof()
            return response
        _abort(request)
        return response


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


# --------------------------------------------------------------------------- server


def make_server_ssl_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


def make_client_ssl_context(ca_pem_path: str | Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_pem_path))


class FakeSes:
    """A fake SES endpoint on ``https://127.0.0.1:PORT``. Use ``async with``."""

    def __init__(
        self,
        *,
        ca: trustme.CA | None = None,
        ca_pem_path: str | Path | None = None,
        region: str = "us-east-1",
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        max_skew: float | None = MAX_CLOCK_SKEW,
        client_max_size: int = 64 * 1024 * 1024,
    ) -> None:
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if ca is None:
            ca = trustme.CA()
            ca_pem_path = None
        if ca_pem_path is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="fakeses-")
            ca_pem_path = Path(self._tempdir.name) / "ca.pem"
            ca.cert_pem.write_to_path(str(ca_pem_path))
        self.ca = ca
        self.ca_pem_path = str(ca_pem_path)
        self.region = region
        self.access_key = access_key
        self.secret_key = secret_key
        self.keys: dict[str, KnownKey] = {access_key: KnownKey(secret_key)}
        self.max_skew = max_skew
        self.quota = {
            "max_24_hour_send": 50000.0,
            "max_send_rate": 14.0,
            "sent_last_24_hours": 127.0,
        }
        self.sending_enabled = True
        """GetAccount's ``SendingEnabled``."""
        self.verified: set[str] = set()
        """Identities GetIdentityVerificationAttributes calls verified."""
        self.requests: list[RecordedRequest] = []
        self.handler_errors: list[BaseException] = []
        self.closing = asyncio.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self._script: deque[Behaviour] = deque()
        self._connections: dict[object, int] = {}
        self._connection_serial = itertools.count(1)
        self._arrival = asyncio.Condition()
        self._tasks: set[asyncio.Task[object]] = set()
        self._client_max_size = client_max_size
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=self._client_max_size)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, "127.0.0.1", 0, ssl_context=make_server_ssl_context(self.ca)
        )
        await site.start()
        server = site._server  # the bound port is only known here
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def close(self) -> None:
        self.closing.set()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    async def __aenter__(self) -> FakeSes:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- scripting and inspection

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours; each answers one (validly signed) request, in order."""
        self._script.extend(behaviours)

    @property
    def pending_script(self) -> int:
        return len(self._script)

    def clear_script(self) -> None:
        """Forget the behaviours not used yet: every request succeeds again."""
        self._script.clear()

    def add_key(self, access_key: str, secret_key: str, session_token: str | None = None) -> None:
        self.keys[access_key] = KnownKey(secret_key, session_token)

    @property
    def connection_count(self) -> int:
        """How many distinct connections requests arrived on."""
        return len(self._connections)

    async def wait_for_requests(self, count: int, within: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least ``count`` requests arrived (TimeoutError after ``within`` s)."""
        async with asyncio.timeout(within), self._arrival:
            await self._arrival.wait_for(lambda: len(self.requests) >= count)
        return self.requests

    def success_response(
        self, request: web.Request, message_id: str | None = None
    ) -> web.StreamResponse:
        request_id = new_request_id()
        action = request.get(ACTION)
        if action in ("SendEmail", "GetAccount"):
            return web.json_response(
                self._v2_success(action, message_id), headers={"x-amzn-RequestId": request_id}
            )
        if action == "SendRawEmail":
            body = send_raw_email_body(message_id or new_message_id(), request_id)
        elif action == "GetSendQuota":
            body = get_send_quota_body(
                self.quota["max_24_hour_send"],
                self.quota["max_send_rate"],
                self.quota["sent_last_24_hours"],
                request_id,
            )
        elif action == "GetIdentityVerificationAttributes":
            asked = _members(request[PARAMS], "Identities.member.")
            statuses = {name: "Success" for name in asked if name in self.verified}
            body = identity_verification_body(statuses, request_id)
        else:
            body = error_body("InvalidAction", f"Unsupported action {action}", request_id)
            return web.Response(status=400, body=body, content_type="text/xml")
        return web.Response(
            status=200, body=body, content_type="text/xml", headers={"x-amzn-RequestId": request_id}
        )

    def _v2_success(self, action: str, message_id: str | None) -> dict[str, object]:
        if action == "SendEmail":
            return {"MessageId": message_id or new_message_id()}
        quota = self.quota
        return {
            "DedicatedIpAutoWarmupEnabled": False,
            "EnforcementStatus": "HEALTHY",
            "ProductionAccessEnabled": True,
            "SendQuota": {
                "Max24HourSend": quota["max_24_hour_send"],
                "MaxSendRate": quota["max_send_rate"],
                "SentLast24Hours": quota["sent_last_24_hours"],
            },
            "SendingEnabled": self.sending_enabled,
        }

    # -- the handler

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.handler_errors.append(error)
            raise
        finally:
            self.in_flight -= 1
            self._tasks.discard(task)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        transport = request.transport
        if transport not in self._connections:
            self._connections[transport] = next(self._connection_serial)
        peer = transport.get_extra_info("peername") if transport is not None else ("?", 0)
        params, duplicates = _parse_form(request.headers.get("Content-Type", ""), body)
        v2_action = V2_ROUTES.get((request.method, request.path))
        record = RecordedRequest(
            method=request.method,
            path_qs=request.path_qs,
            headers=CIMultiDict(request.headers),
            body=body,
            params=params,
            duplicate_params=duplicates,
            peer=tuple(peer[:2]),
            connection=self._connections[transport],
            v2_action=v2_action,
        )
        failure = verify_sigv4(
            method=request.method,
            url=f"https://{request.host}{request.raw_path}",
            headers=record.headers,
            body=body,
            keys=self.keys,
            region=self.region,
            max_skew=self.max_skew,
        )
        if failure is not None:
            record.auth_error = failure.code
        async with self._arrival:
            self.requests.append(record)
            self._arrival.notify_all()
        if failure is not None and request.path.startswith("/v2/"):
            return v2_error_response(failure.status, failure.code, failure.message)
        if failure is not None:
            request_id = new_request_id()
            return web.Response(
                status=failure.status,
                body=error_body(failure.code, failure.message, request_id),
                content_type="text/xml",
                headers={"x-amzn-RequestId": request_id},
            )
        if request.path.startswith("/v2/"):
            v2_problem = _v2_request_problem(v2_action, record)
            if v2_problem is not None:
                return v2_error_response(*v2_problem)
            request[ACTION] = v2_action or ""
            request[PARAMS] = {}
            behaviour: Behaviour = self._script.popleft() if self._script else Succeed()
            return await behaviour.respond(request, self)
        problem = _request_problem(request.method, params)
        if problem is not None:
            code, message = problem
            return web.Response(
                status=400,
                body=error_body(code, message, new_request_id()),
                content_type="text/xml",
            )
        request[ACTION] = params["Action"]
        request[PARAMS] = params
        behaviour = self._script.popleft() if self._script else Succeed()
        return await behaviour.respond(request, self)


def _parse_form(content_type: str, body: bytes) -> tuple[dict[str, str], list[str]]:
    if content_type.split(";", 1)[0].strip().lower() != "application/x-www-form-urlencoded":
        return {}, []
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        return {}, []
    params: dict[str, str] = {}
    duplicates: list[str] = []
    for name, value in parse_qsl(text, keep_blank_values=True):
        if name in params:
            duplicates.append(name)
        params[name] = value
    return params, duplicates


SEND_EMAIL_FIELDS = frozenset(
    {
        "FromEmailAddress",
        "FromEmailAddressIdentityArn",
        "Destination",
        "FeedbackForwardingEmailAddressIdentityArn",
        "EmailTags",
        "ConfigurationSetName",
        "ListManagementOptions",
        "Content",
    }
)
"""The SendEmail fields a relay of raw messages may send."""


def _v2_request_problem(action: str | None, record: RecordedRequest) -> tuple[int, str, str] | None:
    """What SES v2 would refuse about a correctly signed request, if anything."""
    if action is None:
        return 404, "NotFoundException", f"No route for {record.method} {record.path_qs}"
    if action == "GetAccount":
        return None if not record.body else (400, "BadRequestException", "GetAccount has no body")
    if record.headers.get("Content-Type") != "application/json":
        return 400, "BadRequestException", "Content-Type must be application/json"
    body = record.json
    unknown = sorted(set(body) - SEND_EMAIL_FIELDS)
    if unknown:
        return 400, "BadRequestException", f"Unexpected fields {unknown}"
    if record.raw_message is None:
        return 400, "BadRequestException", "Content.Raw.Data must be valid base64"
    return None


def _request_problem(method: str, params: dict[str, str]) -> tuple[str, str] | None:
    """What SES would refuse about a correctly signed request, if anything."""
    if method != "POST":
        return "InvalidAction", f"The fake SES only takes POST, not {method}"
    action = params.get("Action")
    if action is None:
        return "MissingAction", "The request must contain the parameter Action"
    if action not in ("SendRawEmail", "GetSendQuota", "GetIdentityVerificationAttributes"):
        return "InvalidAction", f"The action {action} is not valid for this web service."
    version = params.get("Version")
    if version is None:
        return "MissingParameter", "The request must contain the parameter Version"
    if version != API_VERSION:
        return "InvalidParameterValue", f"Unsupported API version {version}"
    if action == "SendRawEmail":
        data = params.get("RawMessage.Data")
        if data is None:
            return "MissingParameter", "The request must contain the parameter RawMessage.Data"
        try:
            base64.b64decode(data, validate=True)
        except binascii.Error:
            return "InvalidParameterValue", "RawMessage.Data is not valid base64"
    return None
