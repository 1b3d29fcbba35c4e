"""AWS credentials: providers and the SDKs' default chain.

``default_chain(env, session=..., region=...)`` looks for credentials where the
AWS SDKs do, in botocore's order:

1. environment: ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY``
   (+ ``AWS_SECURITY_TOKEN`` / ``AWS_SESSION_TOKEN``, ``AWS_CREDENTIAL_EXPIRATION``);
2. the selected profile's ``role_arn`` (with ``source_profile`` or
   ``credential_source``): STS ``AssumeRole``, signed with the source's credentials;
3. web identity: ``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN`` (or the
   profile's ``web_identity_token_file`` + ``role_arn``): STS
   ``AssumeRoleWithWebIdentity``, unsigned;
4. static keys of the profile in the shared credentials file (``~/.aws/credentials``);
5. static keys of the profile in the shared config file (``~/.aws/config``);
6. container credentials (``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` / ``_FULL_URI``);
7. EC2 instance metadata (IMDSv2, IMDSv1 only as botocore's fallback).

A source that is not configured is skipped; a configured source that fails
raises. Finding nothing raises ``CredentialsError`` listing every source and
why it was skipped. Profiles that use SSO, ``login_session`` or
``credential_process`` are refused with a clear "not supported" error rather
than silently skipped.

Parsing (environment, INI files, STS XML, container and IMDS JSON, endpoint
rules) is done by plain functions; I/O lives in the fetch closures. No secret
(secret key, session token, web identity token, container authorization token)
ever appears in a message, a repr or a log line.

``RefreshingProvider`` caches temporary credentials: ``get()`` does no I/O
while more than 15 minutes remain; inside that advisory window it starts one
background refresh; inside the 10-minute mandatory window, once expired, or
after ``invalidate()``, callers await one shared refresh.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import ipaddress
import json
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from yarl import URL

from relay.errors import CredentialsError
from relay.log import ses_log
from relay.ses.awsxml import xml_fields
from relay.ses.http import read_capped
from relay.ses.query import FORM_CONTENT_TYPE, encode_form
from relay.ses.sigv4 import Credentials, payload_hash, sign_request

__all__ = [
    "ADVISORY_REFRESH",
    "MANDATORY_REFRESH",
    "MAX_RESPONSE_SIZE",
    "CredentialProvider",
    "RefreshingProvider",
    "SharedFiles",
    "StaticProvider",
    "container_endpoint",
    "credentials_from_env",
    "credentials_from_profile",
    "default_chain",
    "imds_endpoint",
    "load_shared_files",
    "parse_container_credentials",
    "parse_expiration",
    "parse_imds_credentials",
    "parse_profiles",
    "parse_sts_credentials",
    "select_profile",
    "sts_endpoint",
]


Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]
Fetch = Callable[[], Awaitable[Credentials]]

ADVISORY_REFRESH = timedelta(minutes=15)
"""Less than this left: refresh in the background, keep serving the cached credentials."""
MANDATORY_REFRESH = timedelta(minutes=10)
"""Less than this left: callers wait for the refresh."""
REFRESH_RETRY_INTERVAL = timedelta(seconds=30)
"""After a refresh (failed, or returning short-lived credentials), the next
advisory or mandatory one waits this long, so a broken endpoint is not hammered."""
IMDS_EXTENSION = timedelta(minutes=20)
"""IMDS credentials closer than this to expiry are used as if valid this long
(botocore's static stability during an IMDS outage)."""

MAX_RESPONSE_SIZE = 64 * 1024
"""Answers from STS, container and IMDS endpoints are read up to this size."""
MAX_FILE_SIZE = 1024 * 1024
"""Shared config/credentials files and token files are read up to this size."""

STS_API_VERSION = "2011-06-15"
STS_TIMEOUT = aiohttp.ClientTimeout(total=10.0, sock_connect=3.0)
CONTAINER_HOST = "169.254.170.2"
CONTAINER_ALLOWED_HOSTS = frozenset({CONTAINER_HOST, "169.254.170.23", "fd00:ec2::23", "localhost"})
CONTAINER_TIMEOUT = 2.0
CONTAINER_ATTEMPTS = 3
CONTAINER_RETRY_DELAY = 1.0
IMDS_DEFAULT_ENDPOINT = "http://169.254.169.254/"
IMDS_IPV6_ENDPOINT = "http://[fd00:ec2::254]/"
IMDS_DEFAULT_TIMEOUT = 1.0
IMDS_DEFAULT_ATTEMPTS = 2
IMDS_SESSION_TTL_SECONDS = "21600"
_IMDS_SESSION_PATH = "latest/api/token"
_IMDS_ROLE_PATH = "latest/meta-data/iam/security-credentials/"

_REGION = re.compile(r"[a-z0-9][a-z0-9-]*")
_HEADER_VALUE = re.compile(r"[\t -~]+")
_ROLE_NAME = re.compile(r"[\w+=,.@-]+")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _NotConfigured(CredentialsError):
    """A source that has nothing to offer: the chain moves on to the next one.

    Raised during a refresh (IMDS gone away), it is an ordinary failure.
    """


# --------------------------------------------------------------------------- providers


class CredentialProvider(Protocol):
    """Hands out current credentials; cached, refreshed before they expire."""

    async def get(self) -> Credentials:
        """Current credentials. Cheap when cached: no I/O on the hot path."""
        ...

    def invalidate(self) -> None:
        """Forget cached credentials: the next ``get`` fetches fresh ones
        (after SES said the signature, token or key was bad)."""
        ...


class StaticProvider:
    """Fixed credentials (environment variables, tests)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def __repr__(self) -> str:
        return f"StaticProvider(access_key_id={self._credentials.access_key_id!r})"

    async def get(self) -> Credentials:
        return self._credentials

    def invalidate(self) -> None:
        """Static credentials cannot be refreshed."""


def _consume_result(task: asyncio.Task[Credentials]) -> None:
    """Mark a refresh task's exception as seen (it is logged, or raised to a waiter)."""
    if not task.cancelled():
        task.exception()


class RefreshingProvider:
    """Credentials from ``fetch``, cached and refreshed before they expire.

    * no credentials yet, expired ones, or ``invalidate()`` called: ``get()``
      awaits a refresh (concurrent callers share it) and raises
      ``CredentialsError`` if it fails;
    * more than ``advisory`` left, or credentials without expiration: ``get()``
      returns the cached ones, no I/O;
    * between ``advisory`` and ``mandatory`` left: one refresh starts in the
      background, ``get()`` returns the cached credentials at once;
    * ``mandatory`` or less left: ``get()`` awaits the shared refresh; if it
      fails, the still-valid cached credentials are returned (and a warning
      logged).

    After every refresh attempt the next non-forced one waits
    ``retry_interval``, so a failing endpoint sees one request per interval,
    not one per ``get()``. ``clock`` returns timezone-aware datetimes.
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        name: str = "credentials",
        clock: Clock = _utcnow,
        advisory: timedelta = ADVISORY_REFRESH,
        mandatory: timedelta = MANDATORY_REFRESH,
        retry_interval: timedelta = REFRESH_RETRY_INTERVAL,
    ) -> None:
        self._fetch = fetch
        self._name = name
        self._clock = clock
        self._advisory = advisory
        self._mandatory = mandatory
        self._retry_interval = retry_interval
        self._credentials: Credentials | None = None
        self._generation = 0  # bumped by invalidate(): older refreshes may not satisfy callers
        self._stale = False
        self._not_before: datetime | None = None
        self._task: asyncio.Task[Credentials] | None = None
        self._task_generation = -1

    def __repr__(self) -> str:
        creds = self._credentials
        state = "empty" if creds is None else f"access_key_id={creds.access_key_id!r}"
        expiration = None if creds is None else creds.expiration
        return f"RefreshingProvider({self._name!r}, {state}, expiration={expiration!r})"

    @property
    def name(self) -> str:
        return self._name

    async def get(self) -> Credentials:
        now = self._clock()
        creds = self._credentials
        if creds is None or self._stale or _expired(creds, now):
            return await self._join()
        step = self._next_step(creds, now)
        if step == "background":
            self._start()
        elif step == "wait":
            with contextlib.suppress(CredentialsError):  # still valid; the failure was logged
                return await self._join()
        return creds

    def _next_step(self, creds: Credentials, now: datetime) -> str:
        """``use`` the cached credentials, refresh in the ``background``, or ``wait``."""
        if creds.expiration is None:
            return "use"
        remaining = creds.expiration - now
        if remaining > self._advisory:
            return "use"
        if self._not_before is not None and now < self._not_before:
            return "use"
        return "background" if remaining > self._mandatory else "wait"

    def invalidate(self) -> None:
        self._stale = True
        self._generation += 1
        self._not_before = None

    async def wait_for_refresh(self) -> None:
        """Wait for a refresh in progress, if any (shutdown, tests); never raises its error."""
        task = self._task
        if task is not None:
            await asyncio.wait([task])

    async def aclose(self) -> None:
        """Cancel a refresh in progress."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    def _start(self) -> asyncio.Task[Credentials]:
        task = self._task
        if task is None or task.done() or self._task_generation != self._generation:
            task = asyncio.create_task(self._refresh(self._generation))
            task.add_done_callback(_consume_result)
            self._task = task
            self._task_generation = self._generation
        return task

    async def _join(self) -> Credentials:
        # shield: a caller that is cancelled does not cancel the refresh others wait for.
        return await asyncio.shield(self._start())

    async def _refresh(self, generation: int) -> Credentials:
        started = self._clock()
        had_credentials = self._credentials is not None
        try:
            try:
                creds = await self._fetch()
            except CredentialsError:
                raise
            except Exception as exc:
                ses_log.exception("%s: unexpected error while fetching credentials", self._name)
                raise CredentialsError(
                    f"{self._name}: unexpected {type(exc).__name__} while fetching credentials"
                ) from exc
            now = self._clock()
            _check_fresh(creds, now, self._name)
        except CredentialsError as exc:
            if generation == self._generation:
                self._not_before = started + self._retry_interval
            if had_credentials:
                ses_log.warning("%s: refreshing credentials failed: %s", self._name, exc)
            raise
        if generation == self._generation:
            self._credentials = creds
            self._stale = False
            self._not_before = now + self._retry_interval
        if creds.expiration is not None:
            ses_log.info(
                "%s: credentials %s valid until %s",
                self._name,
                creds.access_key_id,
                creds.expiration.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
        return creds


def _expired(creds: Credentials, now: datetime) -> bool:
    return creds.expiration is not None and now >= creds.expiration


def _check_fresh(creds: Credentials, now: datetime, name: str) -> None:
    if creds.expiration is not None and now >= creds.expiration:
        expired = creds.expiration.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        raise CredentialsError(f"{name}: the fetched credentials expired at {expired}")


# --------------------------------------------------------------------------- pure parsing


def parse_expiration(text: str) -> datetime:
    """An ISO 8601 timestamp (``2024-05-01T12:00:00Z``) as an aware UTC datetime."""
    value = text.strip()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise CredentialsError(f"unreadable expiration time {value[:40]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def credentials_from_env(env: Mapping[str, str]) -> Credentials | None:
    """Credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``; None if neither is set.

    The session token comes from ``AWS_SECURITY_TOKEN``, else ``AWS_SESSION_TOKEN``
    (botocore's order); ``AWS_CREDENTIAL_EXPIRATION`` sets the expiration.
    """
    key = env.get("AWS_ACCESS_KEY_ID", "")
    secret = env.get("AWS_SECRET_ACCESS_KEY", "")
    if not key and not secret:
        return None
    if not secret:
        raise CredentialsError("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not")
    if not key:
        raise CredentialsError("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not")
    token = env.get("AWS_SECURITY_TOKEN") or env.get("AWS_SESSION_TOKEN") or None
    expiry = env.get("AWS_CREDENTIAL_EXPIRATION")
    expiration = parse_expiration(expiry) if expiry else None
    return Credentials(key, secret, token, expiration)


def credentials_from_profile(section: Mapping[str, str], where: str) -> Credentials | None:
    """Static keys of one profile section; None when it has none.

    ``where`` names the profile and file in error messages.
    """
    key = section.get("aws_access_key_id", "")
    secret = section.get("aws_secret_access_key", "")
    if not key and not secret:
        return None
    if not secret:
        raise CredentialsError(
            f"{where}: aws_access_key_id is set but aws_secret_access_key is not"
        )
    if not key:
        raise CredentialsError(
            f"{where}: aws_secret_access_key is set but aws_access_key_id is not"
        )
    token = section.get("aws_security_token") or section.get("aws_session_token") or None
    return Credentials(key, secret, token)


def parse_profiles(
    text: str, *, config_file: bool, where: str = "file"
) -> dict[str, dict[str, str]]:
    """The profiles of a shared credentials (``[name]``) or config file
    (``[profile name]`` and ``[default]``) as ``{name: {key: value}}``.

    Parsed like botocore (``configparser.RawConfigParser``: keys lower-cased,
    no interpolation, ``[DEFAULT]`` values inherited). Errors name the file and
    line, never the line's text (it may hold a secret).
    """
    parser = configparser.RawConfigParser()
    try:
        parser.read_string(text, source=where)
    except configparser.Error as exc:
        line = getattr(exc, "lineno", None)
        at = f" near line {line}" if line else ""
        raise CredentialsError(f"cannot parse {where}{at}: {type(exc).__name__}") from None
    profiles: dict[str, dict[str, str]] = {}
    for section in parser.sections():
        values = dict(parser.items(section))
        if not config_file or section == "default":
            profiles[section] = values
        elif section.startswith("profile"):
            parts = section.split()
            if len(parts) == 2 and parts[0] == "profile":
                profiles[parts[1]] = values
    return profiles


def select_profile(env: Mapping[str, str]) -> tuple[str, str | None]:
    """The profile name and the variable that chose it (None for ``default``)."""
    for variable in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        name = env.get(variable, "").strip()
        if name:
            return name, variable
    return "default", None


_STS_FIELDS = ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration", "Code", "Message")


def parse_sts_credentials(body: bytes, action: str, *, status: int = 200) -> Credentials:
    """The credentials in an STS ``AssumeRole`` / ``AssumeRoleWithWebIdentity``
    answer, or ``CredentialsError`` with STS's error code and message."""
    try:
        root, fields = xml_fields(body, _STS_FIELDS)
    except ValueError as exc:
        raise CredentialsError(f"STS answer is {exc}") from None
    if status != 200 or root == "ErrorResponse":
        code = fields.get("Code") or "no error code"
        message = fields.get("Message", "")[:300]
        detail = f"{code}: {message}" if message else code
        raise CredentialsError(f"STS {action} failed (HTTP {status}): {detail}")
    if root != f"{action}Response":
        raise CredentialsError(f"STS {action}: unexpected answer <{root[:60]}>")
    return _credentials_from_fields(fields, "SessionToken", f"STS {action} answer")


def _credentials_from_fields(fields: Mapping[str, Any], token_field: str, what: str) -> Credentials:
    required = ("AccessKeyId", "SecretAccessKey", token_field, "Expiration")
    missing = [
        name for name in required if not isinstance(fields.get(name), str) or not fields[name]
    ]
    if missing:
        raise CredentialsError(f"{what} lacks {', '.join(missing)}")
    return Credentials(
        access_key_id=fields["AccessKeyId"],
        secret_access_key=fields["SecretAccessKey"],
        session_token=fields[token_field],
        expiration=parse_expiration(fields["Expiration"]),
    )


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise CredentialsError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise CredentialsError(f"{what} is not a JSON object")
    return value


def parse_container_credentials(body: bytes) -> Credentials:
    """The container endpoint's JSON: AccessKeyId, SecretAccessKey, Token, Expiration."""
    data = _json_object(body, "container credentials answer")
    return _credentials_from_fields(data, "Token", "container credentials answer")


def parse_imds_credentials(body: bytes) -> Credentials:
    """IMDS ``iam/security-credentials/<role>`` JSON (``Code`` must be ``Success``)."""
    data = _json_object(body, "IMDS credentials answer")
    code = data.get("Code", "Success")
    if code != "Success":
        raise CredentialsError(f"IMDS credentials answer has Code {str(code)[:60]!r}")
    return _credentials_from_fields(data, "Token", "IMDS credentials answer")


def _http_url(value: str, variable: str) -> URL:
    try:
        url = URL(value)
    except ValueError:
        raise CredentialsError(f"{variable} is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise CredentialsError(f"{variable} must be an http:// or https:// URL with a host")
    return url


def sts_endpoint(env: Mapping[str, str], region: str) -> URL:
    """``AWS_ENDPOINT_URL_STS``, else ``AWS_ENDPOINT_URL``, else the regional STS endpoint."""
    if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() != "true":
        for variable in ("AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL"):
            value = env.get(variable, "").strip()
            if value:
                return _http_url(value, variable)
    if not region:
        return URL("https://sts.amazonaws.com/")
    if not _REGION.fullmatch(region):
        raise CredentialsError(f"bad region for STS: {region[:40]!r}")
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return URL(f"https://sts.{region}.{suffix}/")


def container_endpoint(env: Mapping[str, str]) -> URL | None:
    """The container credentials URL, or None when neither variable is set.

    ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` goes to 169.254.170.2;
    ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` must be https, or http to a loopback
    address or an ECS / EKS Pod Identity address.
    """
    relative = env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "")
    if relative:
        if not relative.startswith("/"):
            raise CredentialsError("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI must start with '/'")
        return URL(f"http://{CONTAINER_HOST}{relative}", encoded=True)
    full = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI", "")
    if not full:
        return None
    url = _http_url(full, "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if url.scheme == "https" or _is_loopback(url.host or "") or url.host in CONTAINER_ALLOWED_HOSTS:
        return url
    raise CredentialsError(
        f"AWS_CONTAINER_CREDENTIALS_FULL_URI: host {url.host!r} is not allowed over http "
        f"(use https, a loopback address or one of {', '.join(sorted(CONTAINER_ALLOWED_HOSTS))})"
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def imds_endpoint(env: Mapping[str, str]) -> URL | None:
    """The IMDS base URL, or None when ``AWS_EC2_METADATA_DISABLED`` is true."""
    if env.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() == "true":
        return None
    custom = env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "").strip()
    if custom:
        url = _http_url(custom, "AWS_EC2_METADATA_SERVICE_ENDPOINT")
    elif env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "").strip().lower() == "ipv6":
        url = URL(IMDS_IPV6_ENDPOINT)
    else:
        url = URL(IMDS_DEFAULT_ENDPOINT)
    return url if url.path.endswith("/") else url.with_path(url.path + "/")


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


# --------------------------------------------------------------------------- shared files


@dataclass(frozen=True, slots=True)
class SharedFiles:
    """The shared credentials and config files, parsed. Paths are None when
    they cannot be located (``~`` without ``HOME``)."""

    credentials_path: Path | None
    config_path: Path | None
    credentials: Mapping[str, Mapping[str, str]]
    config: Mapping[str, Mapping[str, str]]

    def has_profile(self, name: str) -> bool:
        return name in self.credentials or name in self.config

    def profile(self, name: str) -> dict[str, str]:
        """A profile's settings, credentials file over config file (botocore's ``full_config``)."""
        merged = dict(self.config.get(name, {}))
        merged.update(self.credentials.get(name, {}))
        return merged


def _expand_home(path: str, env: Mapping[str, str]) -> Path | None:
    if path == "~" or path.startswith("~/"):
        home = env.get("HOME", "")
        if not home:
            return None
        return Path(home) / path[2:]
    return Path(path)


def _read_small_file(path: Path, what: str) -> str | None:
    """A file's text; None if it does not exist."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialsError(
            f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    if len(data) > MAX_FILE_SIZE:
        raise CredentialsError(f"{what} {path} is larger than {MAX_FILE_SIZE} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialsError(f"{what} {path} is not UTF-8") from None


def load_shared_files(env: Mapping[str, str]) -> SharedFiles:
    """Read ``AWS_SHARED_CREDENTIALS_FILE`` (``~/.aws/credentials``) and
    ``AWS_CONFIG_FILE`` (``~/.aws/config``), ``~`` being ``HOME`` from ``env``.
    Missing files are empty; unreadable or malformed ones raise."""
    credentials_path = _expand_home(
        env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials", env
    )
    config_path = _expand_home(env.get("AWS_CONFIG_FILE") or "~/.aws/config", env)
    credentials: dict[str, dict[str, str]] = {}
    config: dict[str, dict[str, str]] = {}
    if credentials_path is not None:
        text = _read_small_file(credentials_path, "shared credentials file")
        if text is not None:
            credentials = parse_profiles(text, config_file=False, where=str(credentials_path))
    if config_path is not None:
        text = _read_small_file(config_path, "shared config file")
        if text is not None:
            config = parse_profiles(text, config_file=True, where=str(config_path))
    return SharedFiles(credentials_path, config_path, credentials, config)


# --------------------------------------------------------------------------- I/O helpers


@dataclass(frozen=True, slots=True)
class _Context:
    env: Mapping[str, str]
    session: aiohttp.ClientSession
    region: str
    clock: Clock
    sleep: Sleep


class _HttpFailure(CredentialsError):
    """No answer: ``kind`` is ``connect`` (never reached the server), ``timeout``
    (reached it, no answer in time) or ``io``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


async def _http(
    ctx: _Context,
    method: str,
    url: URL,
    *,
    what: str,
    headers: Mapping[str, str],
    limits: aiohttp.ClientTimeout,
    data: bytes | None = None,
) -> tuple[int, bytes]:
    """One request; the status and the body (capped). Every transport problem
    becomes ``_HttpFailure`` whose message names ``what`` and the origin only."""
    origin = str(url.origin())
    try:
        async with ctx.session.request(
            method, url, headers=headers, data=data, timeout=limits, allow_redirects=False
        ) as response:
            body = await read_capped(response, MAX_RESPONSE_SIZE)
            if body is None:
                raise _HttpFailure(
                    f"{what} answer from {origin} exceeds {MAX_RESPONSE_SIZE} bytes", "io"
                )
            return response.status, body
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        raise _HttpFailure(
            f"cannot connect to {what} at {origin} ({type(exc).__name__})", "connect"
        ) from None
    except TimeoutError:
        raise _HttpFailure(f"no answer from {what} at {origin} in time", "timeout") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise _HttpFailure(f"{what} at {origin} failed ({type(exc).__name__})", "io") from None


def _read_token_file(path: str, what: str) -> str:
    text = _read_small_file(Path(path), what)
    if text is None:
        raise CredentialsError(f"{what} {path} does not exist")
    token = text.strip()
    if not token:
        raise CredentialsError(f"{what} {path} is empty")
    return token


async def _sts_call(
    ctx: _Context,
    action: str,
    params: list[tuple[str, str]],
    *,
    signed_with: Credentials | None,
) -> Credentials:
    url = sts_endpoint(ctx.env, ctx.region)
    host = url.host_port_subcomponent or ""
    body = encode_form([("Action", action), ("Version", STS_API_VERSION), *params])
    headers = {"Content-Type": FORM_CONTENT_TYPE}
    if signed_with is not None:
        try:
            headers |= sign_request(
                credentials=signed_with,
                region=ctx.region or "us-east-1",
                service="sts",
                method="POST",
                host=host,
                path=url.raw_path or "/",
                headers=headers,
                payload_sha256=payload_hash(body),
                now=ctx.clock(),
            )
        except ValueError as exc:
            raise CredentialsError(f"cannot sign STS {action} request: {exc}") from None
    headers["Host"] = host
    status, answer = await _http(
        ctx, "POST", url, what=f"STS {action}", headers=headers, limits=STS_TIMEOUT, data=body
    )
    return parse_sts_credentials(answer, action, status=status)


def _session_name(ctx: _Context) -> str:
    return f"ses-relay-{int(ctx.clock().timestamp())}"


# --------------------------------------------------------------------------- sources
#
# A "plan" looks at configuration only and either raises _NotConfigured (skip
# me), raises CredentialsError (configured but wrong), or returns the Fetch that
# gets credentials (and refreshes them later).


def _env_plan(ctx: _Context) -> Fetch:
    creds = credentials_from_env(ctx.env)
    if creds is None:
        raise _NotConfigured("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set")
    env = ctx.env

    async def fetch() -> Credentials:
        found = credentials_from_env(env)
        if found is None:  # pragma: no cover - the mapping is a private copy
            raise CredentialsError("environment: credentials disappeared")
        return found

    return fetch


def _web_identity_plan(ctx: _Context, files: SharedFiles, profile: str, *, use_env: bool) -> Fetch:
    section = files.profile(profile)

    def setting(variable: str, key: str) -> str:
        value = ctx.env.get(variable, "").strip() if use_env else ""
        return value or section.get(key, "").strip()

    token_file = setting("AWS_WEB_IDENTITY_TOKEN_FILE", "web_identity_token_file")
    if not token_file:
        where = "AWS_WEB_IDENTITY_TOKEN_FILE is not set and " if use_env else ""
        raise _NotConfigured(f"{where}profile {profile!r} has no web_identity_token_file")
    role_arn = setting("AWS_ROLE_ARN", "role_arn")
    if not role_arn:
        raise CredentialsError(
            f"web identity: a token file is configured but no role ARN "
            f"(set AWS_ROLE_ARN or role_arn in profile {profile!r})"
        )
    session_name = setting("AWS_ROLE_SESSION_NAME", "role_session_name") or _session_name(ctx)

    async def fetch() -> Credentials:
        token = _read_token_file(token_file, "web identity token file")
        params = [
            ("RoleArn", role_arn),
            ("RoleSessionName", session_name),
            ("WebIdentityToken", token),
        ]
        return await _sts_call(ctx, "AssumeRoleWithWebIdentity", params, signed_with=None)

    return fetch


def _has_static(section: Mapping[str, str]) -> bool:
    return "aws_access_key_id" in section or "aws_secret_access_key" in section


def _has_assume_role(section: Mapping[str, str]) -> bool:
    return "role_arn" in section and "web_identity_token_file" not in section


def _file_static_plan(ctx: _Context, files: SharedFiles, profile: str, *, config: bool) -> Fetch:
    path = files.config_path if config else files.credentials_path
    sections = files.config if config else files.credentials
    what = "shared config file" if config else "shared credentials file"
    if path is None:
        raise _NotConfigured(f"{what} cannot be located: HOME is not set")
    section = sections.get(profile)
    if section is None:
        raise _NotConfigured(f"no profile {profile!r} in {path}")
    where = f"profile {profile!r} in {path}"
    if credentials_from_profile(section, where) is None:
        raise _NotConfigured(f"{where} has no aws_access_key_id")
    env = ctx.env

    async def fetch() -> Credentials:
        # Re-read: after invalidate(), rotated keys in the file are picked up.
        fresh = load_shared_files(env)
        found = credentials_from_profile(
            (fresh.config if config else fresh.credentials).get(profile, {}), where
        )
        if found is None:
            raise CredentialsError(f"{where}: the keys were removed")
        return found

    return fetch


_SSO_KEYS = ("sso_role_name", "sso_account_id")


def _refuse_unsupported(section: Mapping[str, str], profile: str, keys: Iterable[str]) -> None:
    for key in keys:
        if key in section:
            raise CredentialsError(
                f"profile {profile!r} uses {key}, which ses-relay does not support; "
                "give it static keys or a role_arn with source_profile instead"
            )


def _profile_chain(
    ctx: _Context, files: SharedFiles, profile: str, *, use_env: bool
) -> Iterable[tuple[str, Callable[[], Fetch]]]:
    """botocore's profile providers, in order: web identity, (SSO), shared
    credentials file, (login, process), shared config file."""
    section = files.profile(profile)

    def credentials_file() -> Fetch:
        _refuse_unsupported(section, profile, _SSO_KEYS)
        return _file_static_plan(ctx, files, profile, config=False)

    def config_file() -> Fetch:
        _refuse_unsupported(section, profile, ("login_session", "credential_process"))
        return _file_static_plan(ctx, files, profile, config=True)

    yield "web identity", lambda: _web_identity_plan(ctx, files, profile, use_env=use_env)
    yield "shared credentials file", credentials_file
    yield "shared config file", config_file


def _assume_role_plan(ctx: _Context, files: SharedFiles, profile: str, visited: list[str]) -> Fetch:
    """STS AssumeRole for a profile with ``role_arn``; botocore's rules for
    ``source_profile`` (loops refused, a profile may source its own static keys)
    and ``credential_source``."""
    section = files.profile(profile)
    role_arn = section["role_arn"]
    source_profile = section.get("source_profile", "").strip()
    credential_source = section.get("credential_source", "").strip()
    if source_profile and credential_source:
        raise CredentialsError(f"profile {profile!r} has both source_profile and credential_source")
    if not source_profile and not credential_source:
        raise CredentialsError(
            f"profile {profile!r} has role_arn but no source_profile or credential_source"
        )
    _refuse_unsupported(section, profile, ("mfa_serial",))
    source: CredentialProvider
    if credential_source:
        source = _named_source(ctx, credential_source, profile)
    else:
        if not files.has_profile(source_profile):
            raise CredentialsError(
                f"source_profile {source_profile!r} of profile {profile!r} does not exist"
            )
        if source_profile in visited and (
            source_profile != profile or not _has_static(files.profile(source_profile))
        ):
            chain = " -> ".join([*visited, source_profile])
            raise CredentialsError(f"source_profile loop: {chain}")
        visited.append(source_profile)
        source = _source_profile_provider(ctx, files, source_profile, visited)

    params = [
        ("RoleArn", role_arn),
        ("RoleSessionName", section.get("role_session_name") or _session_name(ctx)),
    ]
    if section.get("duration_seconds", "").strip().isdigit():
        params.append(("DurationSeconds", section["duration_seconds"].strip()))
    if section.get("external_id"):
        params.append(("ExternalId", section["external_id"]))

    async def fetch() -> Credentials:
        return await _sts_call(ctx, "AssumeRole", params, signed_with=await source.get())

    return fetch


def _source_profile_provider(
    ctx: _Context, files: SharedFiles, profile: str, visited: list[str]
) -> CredentialProvider:
    section = files.profile(profile)
    if _has_static(section) or not _has_assume_role(section):
        for _label, plan in _profile_chain(ctx, files, profile, use_env=False):
            try:
                fetch = plan()
            except _NotConfigured:
                continue
            return RefreshingProvider(fetch, name=f"source profile {profile!r}", clock=ctx.clock)
        raise CredentialsError(f"source profile {profile!r} has no credentials")
    return RefreshingProvider(
        _assume_role_plan(ctx, files, profile, visited),
        name=f"role of profile {profile!r}",
        clock=ctx.clock,
    )


def _named_source(ctx: _Context, name: str, profile: str) -> CredentialProvider:
    key = name.lower()
    plan: Callable[[_Context], Fetch]
    if key == "environment":
        plan = _env_plan
    elif key == "ecscontainer":
        plan = _container_plan
    elif key == "ec2instancemetadata":
        plan = _imds_plan
    else:
        raise CredentialsError(
            f"credential_source {name!r} in profile {profile!r} is not one of "
            "Environment, EcsContainer, Ec2InstanceMetadata"
        )
    try:
        fetch = plan(ctx)
    except _NotConfigured as exc:
        raise CredentialsError(f"credential_source {name} of profile {profile!r}: {exc}") from None
    return RefreshingProvider(fetch, name=f"credential_source {name}", clock=ctx.clock)


def _container_token(env: Mapping[str, str]) -> str | None:
    token_file = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "")
    if token_file:
        token: str | None = _read_token_file(token_file, "container authorization token file")
    else:
        token = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN") or None
    if token is not None and not _HEADER_VALUE.fullmatch(token):
        raise CredentialsError("container authorization token is not a legal header value")
    return token


def _container_plan(ctx: _Context) -> Fetch:
    url = container_endpoint(ctx.env)
    if url is None:
        raise _NotConfigured("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI and _FULL_URI are not set")
    limits = aiohttp.ClientTimeout(total=CONTAINER_TIMEOUT)
    what = "container credentials endpoint"

    async def fetch() -> Credentials:
        headers = {"Accept": "application/json"}
        token = _container_token(ctx.env)
        if token is not None:
            headers["Authorization"] = token
        problem = ""
        for attempt in range(1, CONTAINER_ATTEMPTS + 1):
            if attempt > 1:
                await ctx.sleep(CONTAINER_RETRY_DELAY)
            try:
                status, body = await _http(
                    ctx, "GET", url, what=what, headers=headers, limits=limits
                )
            except _HttpFailure as exc:
                problem = str(exc)
                continue
            if status == 200:
                return parse_container_credentials(body)
            problem = f"{what} at {url.origin()} answered HTTP {status}"
            if status < 500 and status != 429:
                raise CredentialsError(problem)
        raise CredentialsError(f"{problem} ({CONTAINER_ATTEMPTS} attempts)")

    return fetch


def _imds_plan(ctx: _Context) -> Fetch:
    base = imds_endpoint(ctx.env)
    if base is None:
        raise _NotConfigured("disabled by AWS_EC2_METADATA_DISABLED")
    settings = _imds_settings(ctx.env, base)

    async def fetch() -> Credentials:
        creds = await _imds_fetch(ctx, settings)
        return _extend_for_outage(creds, ctx.clock())

    return fetch


async def _imds_request(
    ctx: _Context, settings: _ImdsSettings, method: str, path: str, headers: dict[str, str]
) -> tuple[int, bytes]:
    """One IMDS request, retried on connection errors and 5xx; the last answer
    or failure wins."""
    limits = aiohttp.ClientTimeout(
        total=2 * settings.timeout, sock_connect=settings.timeout, sock_read=settings.timeout
    )
    url = settings.base.join(URL(path))
    result: tuple[int, bytes] | None = None
    for attempt in range(1, settings.attempts + 1):
        try:
            result = await _http(
                ctx, method, url, what="EC2 instance metadata", headers=headers, limits=limits
            )
        except _HttpFailure as exc:
            if exc.kind == "timeout" or attempt == settings.attempts:
                raise
            continue
        if result[0] < 500:
            break
    assert result is not None
    return result


async def _imds_token(ctx: _Context, settings: _ImdsSettings) -> str | None:
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
    except _HttpFailure as exc:
        if exc.kind == "timeout":
            return None
        raise _NotConfigured(str(exc)) from None
    if status == 200:
        token = body.decode("ascii", "replace").strip()
        if not _HEADER_VALUE.fullmatch(token):
            raise _NotConfigured("IMDS token answer is not a usable token")
        return token
    if status in (403, 404, 405) or status >= 500:
        return None
    raise _NotConfigured(f"IMDS refused the token request (HTTP {status})")


async def _imds_fetch(ctx: _Context, settings: _ImdsSettings) -> Credentials:
    budget = 2 * settings.timeout * settings.attempts * 3 + 1
    origin = settings.base.origin()
    try:
        async with asyncio.timeout(budget):
            token = await _imds_token(ctx, settings)
            if token is None and not settings.v1_allowed:
                raise _NotConfigured(f"no IMDSv2 token from {origin} and IMDSv1 is disabled")
            headers = {"X-aws-ec2-metadata-token": token} if token else {}
            status, body = await _imds_request(ctx, settings, "GET", _IMDS_ROLE_PATH, headers)
            if status == 404:
                raise _NotConfigured(f"no IAM role attached to this instance ({origin})")
            if status != 200:
                raise _NotConfigured(f"IMDS at {origin} answered HTTP {status} for the role name")
            lines = body.decode("utf-8", "replace").split()
            role = lines[0] if lines else ""
            if not _ROLE_NAME.fullmatch(role):
                raise _NotConfigured(f"IMDS at {origin} gave no usable role name")
            status, body = await _imds_request(
                ctx, settings, "GET", _IMDS_ROLE_PATH + role, headers
            )
            if status != 200:
                raise _NotConfigured(
                    f"IMDS at {origin} answered HTTP {status} for the credentials of role {role}"
                )
    except _HttpFailure as exc:
        raise _NotConfigured(str(exc)) from None
    except TimeoutError:
        raise _NotConfigured(
            f"no complete answer from IMDS at {origin} within {budget:.0f}s"
        ) from None
    try:
        return parse_imds_credentials(body)
    except CredentialsError as exc:
        raise _NotConfigured(str(exc)) from None


# --------------------------------------------------------------------------- the chain


class _Chain:
    """The default chain as one Fetch: the first call finds the source, later
    calls (refreshes) ask that source again."""

    def __init__(self, ctx: _Context) -> None:
        self._ctx = ctx
        self._selected: Fetch | None = None

    async def fetch(self) -> Credentials:
        if self._selected is not None:
            return await self._selected()
        fetch, creds = await self._resolve()
        self._selected = fetch
        return creds

    def _steps(self) -> Iterable[tuple[str, Callable[[], Fetch]]]:
        ctx = self._ctx
        yield "environment", lambda: _env_plan(ctx)
        files = load_shared_files(ctx.env)
        profile, chosen_by = select_profile(ctx.env)
        if chosen_by is not None and not files.has_profile(profile):
            raise CredentialsError(
                f"profile {profile!r} (from {chosen_by}) is not in "
                f"{files.credentials_path} or {files.config_path}"
            )

        def assume_role() -> Fetch:
            if not _has_assume_role(files.profile(profile)):
                raise _NotConfigured(f"profile {profile!r} has no role_arn")
            return _assume_role_plan(ctx, files, profile, [profile])

        yield "assume role", assume_role
        yield from _profile_chain(ctx, files, profile, use_env=True)
        yield "container credentials", lambda: _container_plan(ctx)
        yield "EC2 instance metadata", lambda: _imds_plan(ctx)

    async def _resolve(self) -> tuple[Fetch, Credentials]:
        skipped: list[str] = []
        for label, plan in self._steps():
            try:
                fetch = plan()
                creds = await fetch()
            except _NotConfigured as exc:
                ses_log.debug("credentials: %s skipped: %s", label, exc)
                skipped.append(f"{label}: {exc}")
                continue
            except CredentialsError as exc:
                raise CredentialsError(f"{label} is configured but failed: {exc}") from None
            ses_log.info("AWS credentials from %s (access key %s)", label, creds.access_key_id)
            return fetch, creds
        raise CredentialsError(
            "no AWS credentials found; tried, in order:\n  " + "\n  ".join(skipped)
        )


def default_chain(
    env: Mapping[str, str],
    *,
    session: aiohttp.ClientSession,
    region: str,
    clock: Clock = _utcnow,
    sleep: Sleep = asyncio.sleep,
) -> RefreshingProvider:
    """The AWS SDKs' default credential chain (see the module docstring).

    No I/O here: the first ``get()`` finds the source (await it at start-up to
    fail early); later refreshes ask the same source. ``env`` is copied;
    ``session`` is the caller's (its SSL context is used for https endpoints);
    ``region`` picks the regional STS endpoint and signs AssumeRole; ``clock``
    returns aware datetimes; ``sleep`` paces container endpoint retries.
    """
    ctx = _Context(dict(env), session, region, clock, sleep)
    return RefreshingProvider(_Chain(ctx).fetch, name="AWS credential chain", clock=clock)
