"""AWS Signature Version 4 for Query API requests. Pure: no I/O, no clock.

The signer returns the headers to add (``X-Amz-Date``, ``Authorization`` and,
with temporary credentials, ``X-Amz-Security-Token``); the caller sends them
together with ``Host`` and the headers it passed in, unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote, unquote_to_bytes

__all__ = [
    "ALGORITHM",
    "Credentials",
    "derive_signing_key",
    "payload_hash",
    "sign_request",
]


@dataclass(frozen=True, slots=True)
class Credentials:
    """One set of AWS credentials. ``expiration`` is None for long-term keys."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    expiration: datetime | None = None

    @property
    def key_shown(self) -> str:
        """The access key id as log lines show it: ``AKIA…WXYZ``, enough to
        tell keys apart."""
        return shorten_key_id(self.access_key_id)


def shorten_key_id(key_id: str) -> str:
    """``AKIAIOSFODNN7EXAMPLE`` → ``AKIA…MPLE``; a short one is hidden entirely."""
    return f"{key_id[:4]}…{key_id[-4:]}" if len(key_id) >= 12 else "…"


ALGORITHM = "AWS4-HMAC-SHA256"

# Hop-by-hop and proxy-rewritten headers: never signed (a proxy or the HTTP
# client may change or drop them). Content-Length is left out as well: the
# client computes it, and SigV4 does not require it.
_UNSIGNED_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "x-amzn-trace-id",
    }
)
# Set by the signer (or, for Host, passed as ``host``): not accepted in ``headers``.
_RESERVED_HEADERS = frozenset({"host", "authorization", "x-amz-date", "x-amz-security-token"})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token (header names, methods)
_FIELD_VALUE = re.compile(r"[\t -~]*")  # printable ASCII, space, tab
_VISIBLE = re.compile(r"[!-~]+")  # printable ASCII, no space
_ACCESS_KEY_ID = re.compile(r"[!-+\-.0-~]+")  # visible ASCII except "," and "/"
_SCOPE_PART = re.compile(r"[A-Za-z0-9._-]+")  # region, service
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_PATH = re.compile(r"/[!-\"$->@-~]*")  # visible ASCII without "?" or "#"
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def payload_hash(body: bytes) -> str:
    """Hex SHA-256 of the exact body bytes, as SigV4 expects it."""
    return hashlib.sha256(body).hexdigest()


@functools.lru_cache(maxsize=16)
def derive_signing_key(secret_access_key: str, datestamp: str, region: str, service: str) -> bytes:
    """The SigV4 signing key for one day (``YYYYMMDD``), region and service.

    Cached: the key changes once a day per credential, so a request pays only
    for the final HMAC.
    """
    key = hmac.digest(("AWS4" + secret_access_key).encode(), datestamp.encode(), "sha256")
    key = hmac.digest(key, region.encode(), "sha256")
    key = hmac.digest(key, service.encode(), "sha256")
    return hmac.digest(key, b"aws4_request", "sha256")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 dot-segment removal; empty segments (``//``) dropped as AWS expects."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment and segment != ".":
            out.append(segment)
    trailing = "/" if out and path.endswith("/") else ""
    return "/" + "/".join(out) + trailing


def _canonical_uri(path: str) -> str:
    """Normalised path with every segment URI-encoded (once more, as non-S3 services want)."""
    if path == "/":
        return path
    if not _PATH.fullmatch(path):
        raise ValueError(f"path must be an absolute, already-encoded ASCII path: {path!r}")
    return quote(_remove_dot_segments(path), safe="/")


def _reencode(component: str) -> str:
    if "+" in component:
        raise ValueError("query: '+' is ambiguous; encode a plus as %2B and a space as %20")
    if _BAD_PERCENT.search(component):
        raise ValueError(f"query: bad percent-escape in {component!r}")
    return quote(unquote_to_bytes(component), safe="")


def _canonical_query(query: str) -> str:
    """Sorted ``name=value`` pairs, each re-encoded per RFC 3986."""
    if not query:
        return ""
    pairs: list[tuple[str, str]] = []
    for part in query.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((_reencode(name), _reencode(value)))
    pairs.sort()
    return "&".join([f"{name}={value}" for name, value in pairs])


def _check(
    *,
    credentials: Credentials,
    region: str,
    service: str,
    method: str,
    host: str,
    payload_sha256: str,
    now: datetime,
) -> None:
    """Reject input that would yield a malformed request or an unusable signature."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    if not _ACCESS_KEY_ID.fullmatch(credentials.access_key_id):
        raise ValueError("access key id must be visible ASCII without ',' or '/'")
    if not _SCOPE_PART.fullmatch(region):
        raise ValueError(f"bad region: {region!r}")
    if not _SCOPE_PART.fullmatch(service):
        raise ValueError(f"bad service: {service!r}")
    if not _TOKEN.fullmatch(method):
        raise ValueError(f"bad HTTP method: {method!r}")
    if not _VISIBLE.fullmatch(host):
        raise ValueError(f"bad host: {host!r}")
    if not _SHA256_HEX.fullmatch(payload_sha256):
        raise ValueError("payload_sha256 must be 64 lower-case hex digits")
    if credentials.session_token and not _VISIBLE.fullmatch(credentials.session_token):
        raise ValueError("session token must be visible ASCII")


def _add_headers(signed: dict[str, str], headers: Mapping[str, str]) -> None:
    """Add the signable ``headers`` to ``signed``, lower-cased names, trimmed values."""
    for name, value in headers.items():
        lname = name.lower()
        if lname in _UNSIGNED_HEADERS:
            continue
        if lname in signed or lname in _RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is duplicated or set by the signer")
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"bad header name: {name!r}")
        if not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"header {name!r}: value must be printable ASCII")
        signed[lname] = " ".join(value.split())


def sign_request(
    *,
    credentials: Credentials,
    region: str,
    service: str,
    method: str,
    host: str,
    path: str,
    query: str = "",
    headers: Mapping[str, str],
    payload_sha256: str,
    now: datetime,
) -> dict[str, str]:
    """Sign one request with SigV4; return the headers to add to it.

    ``host`` is the ``Host`` header value exactly as it is sent: the port only
    when it is not the scheme's default (``email.us-east-1.amazonaws.com``,
    ``127.0.0.1:4566``). ``service`` is the signing name (``ses``), which is
    not the host's prefix (``email``). ``path`` and ``query`` are the
    request-target parts as sent (already percent-encoded; ``query`` without
    ``?``). ``headers`` are the other headers sent unchanged; all are signed
    except hop-by-hop ones, ``User-Agent`` and ``Content-Length``.
    ``payload_sha256`` is the hex SHA-256 of the body (see `payload_hash`).
    ``now`` must be timezone-aware. Raises ValueError on malformed input.
    """
    _check(
        credentials=credentials,
        region=region,
        service=service,
        method=method,
        host=host,
        payload_sha256=payload_sha256,
        now=now,
    )
    token = credentials.session_token
    utc = now.astimezone(UTC)
    datestamp = f"{utc.year:04d}{utc.month:02d}{utc.day:02d}"
    amz_date = f"{datestamp}T{utc.hour:02d}{utc.minute:02d}{utc.second:02d}Z"

    signed: dict[str, str] = {"host": host, "x-amz-date": amz_date}
    if token:
        signed["x-amz-security-token"] = token
    _add_headers(signed, headers)
    names = sorted(signed)
    signed_headers = ";".join(names)
    canonical_headers = "".join([f"{n}:{signed[n]}\n" for n in names])

    canonical_request = (
        f"{method.upper()}\n{_canonical_uri(path)}\n{_canonical_query(query)}\n"
        f"{canonical_headers}\n{signed_headers}\n{payload_sha256}"
    )
    scope = f"{datestamp}/{region}/{service}/aws4_request"
    string_to_sign = (
        f"{ALGORITHM}\n{amz_date}\n{scope}\n"
        f"{hashlib.sha256(canonical_request.encode()).hexdigest()}"
    )
    key = derive_signing_key(credentials.secret_access_key, datestamp, region, service)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()

    added = {"X-Amz-Date": amz_date}
    if token:
        added["X-Amz-Security-Token"] = token
    added["Authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return added
