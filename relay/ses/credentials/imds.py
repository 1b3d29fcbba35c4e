"""The EC2 instance metadata source: its settings from the environment, an
IMDSv2 session token (IMDSv1 only where botocore falls back to it), the role
name and its credentials, and botocore's static stability, which keeps nearly
expired credentials in use during an IMDS outage."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from yarl import URL

from relay.errors import CredentialsError, CredentialsNotConfigured, CredentialsUnreachable
from relay.log import ses_log
from relay.ses.credentials.fetch import HEADER_VALUE, Context, http
from relay.ses.credentials.parsing import imds_endpoint, parse_imds_credentials
from relay.ses.credentials.providers import Fetch
from relay.ses.sigv4 import Credentials

IMDS_EXTENSION = timedelta(minutes=20)
"""IMDS credentials closer than this to expiry are used as if valid this long
(botocore's static stability during an IMDS outage)."""

IMDS_DEFAULT_TIMEOUT = 1.0
IMDS_DEFAULT_ATTEMPTS = 2
IMDS_SESSION_TTL_SECONDS = "21600"
_IMDS_SESSION_PATH = "latest/api/token"
_IMDS_ROLE_PATH = "latest/meta-data/iam/security-credentials/"

_ROLE_NAME = re.compile(r"[\w+=,.@-]+")


@dataclass(frozen=True, slots=True)
class _ImdsSettings:
    base: URL
    timeout: float
    attempts: int
    v1_allowed: bool


def _imds_settings(env: Mapping[str, str], base: URL) -> _ImdsSettings:
    raw_timeout = env.get("AWS_METADATA_SERVICE_TIMEOUT", "").strip()
    raw_attempts = env.get("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "").strip()
    try:
        timeout = float(raw_timeout) if raw_timeout else IMDS_DEFAULT_TIMEOUT
        attempts = int(raw_attempts) if raw_attempts else IMDS_DEFAULT_ATTEMPTS
    except ValueError:
        raise CredentialsError(
            "AWS_METADATA_SERVICE_TIMEOUT / AWS_METADATA_SERVICE_NUM_ATTEMPTS must be numbers"
        ) from None
    if not (math.isfinite(timeout) and 0 < timeout <= 60 and 1 <= attempts <= 10):
        raise CredentialsError(
            "AWS_METADATA_SERVICE_TIMEOUT must be in (0, 60] and "
            "AWS_METADATA_SERVICE_NUM_ATTEMPTS in [1, 10]"
        )
    v1_disabled = env.get("AWS_EC2_METADATA_V1_DISABLED", "").strip().lower() == "true"
    return _ImdsSettings(base, timeout, attempts, not v1_disabled)


def _extend_for_outage(creds: Credentials, now: datetime) -> Credentials:
    """botocore's IMDS static stability: nearly expired credentials are kept in
    use for a while rather than refreshed in a tight loop."""
    if creds.expiration is not None and creds.expiration - now < IMDS_EXTENSION:
        ses_log.info(
            "IMDS returned credentials expiring at %s; using them and retrying in %d minutes",
            creds.expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
            IMDS_EXTENSION.total_seconds() // 60,
        )
        return replace(creds, expiration=now + IMDS_EXTENSION)
    return creds


def imds_plan(ctx: Context) -> Fetch:
    base = imds_endpoint(ctx.env)
    if base is None:
        raise CredentialsNotConfigured("disabled by AWS_EC2_METADATA_DISABLED")
    settings = _imds_settings(ctx.env, base)

    async def fetch() -> Credentials:
        creds = await _imds_fetch(ctx, settings)
        return _extend_for_outage(creds, ctx.clock())

    return fetch


async def _imds_request(
    ctx: Context, settings: _ImdsSettings, method: str, path: str, headers: dict[str, str]
) -> tuple[int, bytes]:
    """One IMDS request, retried on connection errors and 5xx; the last answer
    or failure wins."""
    url = settings.base.join(URL(path))
    result: tuple[int, bytes] | None = None
    for attempt in range(1, settings.attempts + 1):
        try:
            result = await http(
                ctx,
                method,
                url,
                what="EC2 instance metadata",
                headers=headers,
                seconds=2 * settings.timeout,
                connect_seconds=settings.timeout,
                read_seconds=settings.timeout,
            )
        except CredentialsUnreachable as exc:
            if exc.cause == "timeout" or attempt == settings.attempts:
                raise
            continue
        if result[0] < 500:
            break
    assert result is not None
    return result


async def _imds_token(ctx: Context, settings: _ImdsSettings) -> str | None:
    """An IMDSv2 session token; None when IMDS does not give one and botocore
    would fall back to IMDSv1 (403/404/405, or no answer: a hop limit of 1
    drops the answer to a container)."""
    try:
        status, body = await _imds_request(
            ctx,
            settings,
            "PUT",
            _IMDS_SESSION_PATH,
            {"X-aws-ec2-metadata-token-ttl-seconds": IMDS_SESSION_TTL_SECONDS},
        )
    except CredentialsUnreachable as exc:
        if exc.cause == "timeout":
            return None
        raise CredentialsNotConfigured(str(exc)) from None
    if status == 200:
        token = body.decode("ascii", "replace").strip()
        if not HEADER_VALUE.fullmatch(token):
            raise CredentialsNotConfigured("IMDS token answer is not a usable token")
        return token
    if status in (403, 404, 405) or status >= 500:
        return None
    raise CredentialsNotConfigured(f"IMDS refused the token request (HTTP {status})")


async def _imds_fetch(ctx: Context, settings: _ImdsSettings) -> Credentials:
    budget = 2 * settings.timeout * settings.attempts * 3 + 1
    origin = settings.base.origin()
    try:
        async with asyncio.timeout(budget):
            token = await _imds_token(ctx, settings)
            if token is None and not settings.v1_allowed:
                raise CredentialsNotConfigured(
                    f"no IMDSv2 token from {origin} and IMDSv1 is disabled"
                )
            headers = {"X-aws-ec2-metadata-token": token} if token else {}
            status, body = await _imds_request(ctx, settings, "GET", _IMDS_ROLE_PATH, headers)
            if status == 404:
                raise CredentialsNotConfigured(f"no IAM role attached to this instance ({origin})")
            if status != 200:
                raise CredentialsNotConfigured(
                    f"IMDS at {origin} answered HTTP {status} for the role name"
                )
            lines = body.decode("utf-8", "replace").split()
            role = lines[0] if lines else ""
            if not _ROLE_NAME.fullmatch(role):
                raise CredentialsNotConfigured(f"IMDS at {origin} gave no usable role name")
            status, body = await _imds_request(
                ctx, settings, "GET", _IMDS_ROLE_PATH + role, headers
            )
            if status != 200:
                raise CredentialsNotConfigured(
                    f"IMDS at {origin} answered HTTP {status} for the credentials of role {role}"
                )
    except CredentialsUnreachable as exc:
        raise CredentialsNotConfigured(str(exc)) from None
    except TimeoutError:
        raise CredentialsNotConfigured(
            f"no complete answer from IMDS at {origin} within {budget:.0f}s"
        ) from None
    try:
        return parse_imds_credentials(body)
    except CredentialsError as exc:
        raise CredentialsNotConfigured(str(exc)) from None
