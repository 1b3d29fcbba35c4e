"""Pure parsing, no I/O: credentials from environment variables and profile
sections, the profiles of the shared files' INI text, the profile selection,
STS XML and container / IMDS JSON answers, expiration times, and the endpoint
rules for STS, container credentials and IMDS."""

from __future__ import annotations

import configparser
import ipaddress
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from yarl import URL

from relay.errors import CredentialsError
from relay.ses.awsxml import xml_fields
from relay.ses.sigv4 import Credentials

CONTAINER_HOST = "169.254.170.2"
CONTAINER_ALLOWED_HOSTS = frozenset({CONTAINER_HOST, "169.254.170.23", "fd00:ec2::23", "localhost"})
IMDS_DEFAULT_ENDPOINT = "http://169.254.169.254/"
IMDS_IPV6_ENDPOINT = "http://[fd00:ec2::254]/"

_REGION = re.compile(r"[a-z0-9][a-z0-9-]*")


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
