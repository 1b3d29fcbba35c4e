"""Configuration: frozen dataclasses per TOML section, built and checked once.

``load_config`` reads the TOML file, applies ``SES_RELAY_<SECTION>_<KEY>``
environment overrides and the AWS variables the SDKs honour, and checks
everything in one pass: a ``ConfigError`` lists every problem with its key
and where the value came from, and a misspelt key or section is told the
closest right one. ``read_config`` gives the configuration and its problems
without raising, so that the files it names can be checked in the same pass
(``relay.resources.load_resources``). ``unknown_variables`` names the
``SES_RELAY_*`` variables that set nothing. Nothing else in the relay reads
the file or the environment for settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from relay.errors import ConfigError
from relay.log import FORMATS, LEVELS
from relay.ses.limits import APIS, V1_MAX_MESSAGE, api_message_limit

Check = Callable[[Any], str | None]
"""A field check: the problem with a value, or None when it is fine."""


def checked(default: Any, check: Check) -> Any:
    """A field whose values must pass ``check``."""
    return field(default=default, metadata={"check": check})


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def in_range(low: float, high: float) -> Check:
    def check_range(value: float) -> str | None:
        return None if low <= value <= high else f"must be from {low:g} to {high:g}"

    return check_range


def not_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def host_port(value: str) -> str | None:
    """``host:port`` or ``[v6]:port``."""
    try:
        split_host_port(value)
    except ValueError as exc:
        return str(exc)
    return None


def each(check: Check) -> Check:
    def check_all(values: tuple[Any, ...]) -> str | None:
        for value in values:
            problem = check(value)
            if problem:
                return f"{value!r}: {problem}"
        return None

    return check_all


def network(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return "not an IP network (like 10.0.0.0/8 or ::1/128)"
    return None


def one_of(*choices: str) -> Check:
    def check_choice(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"

    return check_choice


def url_or_empty(value: str) -> str | None:
    if value and not value.startswith(("https://", "http://")):
        return "must start with https:// (or http:// for a local test endpoint)"
    return None


def address_or_empty(value: str) -> str | None:
    """An ASCII mail address (SES's ``Source`` and a header's address), or ""."""
    local, at, domain = value.rpartition("@")
    if value and not (at and local and domain and all("!" <= c <= "~" for c in value)):
        return "must be an address like MAILER-DAEMON@example.com (ASCII, no spaces), or empty"
    return None


def split_host_port(value: str) -> tuple[str, int]:
    """``"127.0.0.1:2525"`` → ``("127.0.0.1", 2525)``; ``"[::1]:25"`` → ``("::1", 25)``."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
        if ":" in host:
            raise ValueError("write an IPv6 address in brackets, like [::1]:2525")
    if not sep or not host:
        raise ValueError("expected host:port, like 127.0.0.1:2525 or [::1]:2525")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"port {port!r} is not a number from 0 (any free port) to 65535")
    return host, int(port)


MAX_WORKERS = 64
"""The most ``smtp.workers`` there may be."""


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """The ``[smtp]`` section: the listener."""

    listen: tuple[str, ...] = checked(("127.0.0.1:2525",), each(host_port))
    tls_listen: tuple[str, ...] = checked((), each(host_port))
    hostname: str = "localhost"
    max_message_size: int = checked(V1_MAX_MESSAGE, positive)
    """Bytes of a message (SIZE, DATA); unset: the limit of ``ses.api``
    (``relay.ses.limits``), set by ``read_config``."""
    max_recipients: int = checked(1000, positive)
    allowed_networks: tuple[str, ...] = checked(("127.0.0.0/8", "::1/128"), each(network))
    tls_cert: str = ""
    tls_key: str = ""
    proxy_protocol: bool = False
    proxy_trusted_networks: tuple[str, ...] = checked((), each(network))
    """Peers whose PROXY header is believed (the load balancers); required with
    ``proxy_protocol``: a header from any other peer is refused."""
    proxy_protocol_timeout: float = checked(5.0, positive)
    """Seconds a client may take to send its PROXY header."""
    bare_newline: str = checked("normalize", one_of("normalize", "reject"))
    """Bare CR or LF in DATA: "normalize" to CRLF, or "reject" (550 5.5.2)."""
    idle_timeout: float = checked(300.0, positive)
    """Seconds a client may stay silent between commands."""
    data_timeout: float = checked(600.0, positive)
    """Seconds one DATA transfer may take in all."""
    session_timeout: float = checked(3600.0, positive)
    """Seconds one connection may last in all."""
    write_timeout: float = checked(60.0, positive)
    """Seconds a reply may wait to be sent to a client that does not read; a
    closing connection gets as long to take its last reply. Then it is dropped."""
    max_messages_per_session: int = checked(1000, positive)
    max_commands: int = checked(100, positive)
    """Times each other command (NOOP, RSET, EHLO, HELP, ...) is allowed per session."""
    max_connections: int = checked(1000, positive)
    max_connections_per_client: int = checked(100, positive)
    header_size_limit: int = checked(102_400, positive)
    """Bytes of header fields a message may have (Postfix's default); 552 5.3.4 beyond."""
    max_batch_recipients: int = checked(50, in_range(1, 50))
    """Recipients per SendRawEmail call, header addresses counted (SES: 50)."""
    identity_header_networks: tuple[str, ...] = checked((), each(network))
    """Clients that may use X-SES-SOURCE-ARN / -FROM-ARN / -RETURN-PATH-ARN."""
    workers: int = checked(1, in_range(1, MAX_WORKERS))
    """Processes sharing the listeners (SO_REUSEPORT), each with its own spool
    partition (``relay.supervisor``); 1 is one process and the plain spool."""


@dataclass(frozen=True, slots=True)
class UserPolicy:
    """An ``[auth.users.NAME]`` table: what one AUTH user may do."""

    name: str = ""
    allowed_senders: tuple[str, ...] = ()
    """Addresses (``a@example.com``) and domains (``@example.com``) this user
    may use in MAIL FROM and From:; empty allows any."""
    identity_headers: bool = False
    """May use X-SES-SOURCE-ARN / -FROM-ARN / -RETURN-PATH-ARN."""


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """The ``[auth]`` section."""

    users_file: str = ""
    max_failures: int = checked(10, positive)
    """Failed AUTH attempts per client IP within ``failure_window`` before it is cut off."""
    failure_window: float = checked(600.0, positive)
    failure_delay: float = checked(1.0, not_negative)
    """Seconds each failed AUTH reply is held back."""
    hash_threads: int = checked(2, positive)
    """Threads that check password hashes, off the event loop."""
    max_queued_checks: int = checked(16, not_negative)
    """Checks that may wait for a hash thread (beyond the ``hash_threads``
    running); AUTH beyond them gets ``454 4.7.0`` at once."""
    users: tuple[UserPolicy, ...] = ()
    """From the ``[auth.users.NAME]`` tables."""

    def user(self, name: str) -> UserPolicy:
        """The policy for ``name`` (the default policy if it has no table)."""
        for policy in self.users:
            if policy.name == name:
                return policy
        return UserPolicy(name=name)


@dataclass(frozen=True, slots=True)
class SesConfig:
    """The ``[ses]`` section, with the AWS environment already applied."""

    region: str = "us-east-1"
    api: str = checked("v1", one_of(*APIS))
    """"v1": SendRawEmail; "v2": SendEmail (API v2) for every batch; "auto":
    SendRawEmail for what fits it, v2 for larger messages."""
    endpoint: str = checked("", url_or_empty)
    """Base URL of SES; empty means ``https://email.{region}.amazonaws.com``."""
    ca_bundle: str = ""
    """PEM file of CAs to trust instead of the system's (``AWS_CA_BUNDLE``)."""
    configuration_set: str = ""
    max_send_rate: float = checked(0.0, not_negative)
    connect_timeout: float = checked(5.0, positive)
    """Seconds to open a connection (TCP + TLS)."""
    request_timeout: float = checked(30.0, positive)
    """Seconds one HTTP attempt may take in all, body included."""
    max_connections: int = checked(64, positive)
    """Size of the HTTP connection pool."""
    max_attempts: int = checked(4, positive)
    """Quick attempts inside the client for retryable errors."""
    backoff_base: float = checked(0.1, positive)
    backoff_max: float = checked(5.0, positive)
    max_response_size: int = checked(65536, positive)
    """Bytes of an SES answer read at most; a larger one is an error."""


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    """The ``[spool]`` section."""

    path: str = ""
    """Empty means ``$STATE_DIRECTORY`` or ``./spool``."""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The ``[metrics]`` section."""

    listen: str = checked("127.0.0.1:9465", host_port)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """The ``[delivery]`` section."""

    inline_timeout: float = checked(10.0, positive)
    """Seconds the relay tries SES while the client waits for its DATA reply."""
    concurrency: int = checked(16, positive)
    """Queued messages delivered at once in the background."""
    retry_min: float = checked(60.0, positive)
    """Seconds before the first background retry; each later wait doubles."""
    retry_max: float = checked(3600.0, positive)
    """Longest wait between two attempts."""
    max_age: float = checked(432000.0, positive)
    """Seconds a message may stay queued before it bounces (5 days, as Postfix)."""
    bounces: bool = True
    """Send a delivery status notification (RFC 3464) for mail that fails after 250."""
    bounce_sender: str = checked("", address_or_empty)
    """From: and Source of bounces; must be verified in SES (checked at start and by
    ``check-config``). Empty: MAILER-DAEMON@ the failed message's sender domain."""
    quota_refresh: float = checked(300.0, positive)
    """Seconds between GetSendQuota calls that set the sending rate."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    """The ``[log]`` section."""

    format: str = checked("text", one_of(*FORMATS))
    """"text": ``TIME LEVEL LOGGER: MESSAGE``; "json": one object per line
    (``relay.log.FIELDS``)."""
    level: str = checked("info", one_of(*LEVELS))


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    smtp: SmtpConfig
    auth: AuthConfig
    ses: SesConfig
    spool: SpoolConfig
    metrics: MetricsConfig
    delivery: DeliveryConfig
    log: LogConfig = LogConfig()
    source: str = "defaults"
    """The file it came from, or "defaults"."""


SECTIONS: dict[str, type[Any]] = {
    "smtp": SmtpConfig,
    "auth": AuthConfig,
    "ses": SesConfig,
    "spool": SpoolConfig,
    "metrics": MetricsConfig,
    "delivery": DeliveryConfig,
    "log": LogConfig,
}

ENV_PREFIX = "SES_RELAY_"
_NESTED = frozenset({"users"})
"""Fields built from nested tables, not from one key."""


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Config:
    """The configuration from ``path`` (None: defaults only) and ``env``."""
    config, problems = read_config(path, env)
    if problems:
        raise ConfigError(problems)
    return config


def read_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str]
) -> tuple[Config, list[str]]:
    """The configuration from ``path`` and ``env`` with the default in place of
    each wrong value, and every problem found; ``ConfigError`` only when the
    file cannot be read or parsed."""
    source = str(path) if path is not None else "defaults"
    document = read_toml(Path(path)) if path is not None else {}
    problems: list[str] = []
    sections: dict[str, Any] = {}
    given: dict[str, dict[str, Any]] = {}  # each section's values the file or environment set
    for name in document:
        if name not in SECTIONS:
            problems.append(f"{source}: [{name}]: unknown section{_did_you_mean(name, SECTIONS)}")
    for name, cls in SECTIONS.items():
        table = document.get(name, {})
        if not isinstance(table, dict):
            problems.append(f"{source}: {name}: must be a table ([{name}])")
            table = {}
        table = dict(table)
        users = table.pop("users", {}) if name == "auth" else {}
        values = _section_values(
            name, cls=cls, table=table, env=env, source=source, problems=problems
        )
        if name == "auth":
            values["users"] = _user_policies(users, source, problems)
        given[name] = values
        sections[name] = cls(**values)
    if "max_message_size" not in given["smtp"]:
        limit = api_message_limit(sections["ses"].api)
        sections["smtp"] = dataclasses.replace(sections["smtp"], max_message_size=limit)
    smtp = sections["smtp"]
    if smtp.proxy_protocol and not smtp.proxy_trusted_networks:
        problems.append(
            f"{source}: [smtp] proxy_trusted_networks: required when proxy_protocol is true "
            "(the addresses of the load balancers that send the PROXY header)"
        )
    delivery = sections["delivery"]
    if delivery.retry_max < delivery.retry_min:
        problems.append(
            f"{source}: [delivery] retry_max: must be at least retry_min ({delivery.retry_min:g})"
        )
    return Config(source=source, **sections), problems


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """The ``SES_RELAY_*`` variables in ``env`` that name no key, each with the
    closest one that does. A warning, not an error as an unknown key in the
    file is: the environment is shared, and others put names there that begin
    the same way (Kubernetes adds ``SES_RELAY_SERVICE_HOST`` and
    ``SES_RELAY_PORT...`` to every pod of a namespace with a Service named
    ses-relay)."""
    known = [
        f"{section}_{spec.name}".upper()
        for section, cls in SECTIONS.items()
        for spec in dataclasses.fields(cls)
        if spec.name not in _NESTED
    ]
    unknown = (
        variable.removeprefix(ENV_PREFIX)
        for variable in sorted(env)
        if variable.startswith(ENV_PREFIX)
    )
    return [
        f"environment {ENV_PREFIX}{name}: names no setting"
        + _did_you_mean(name, known, prefix=ENV_PREFIX)
        for name in unknown
        if name not in known
    ]


def _did_you_mean(name: str, choices: Iterable[str], *, prefix: str = "") -> str:
    """`` (did you mean X?)`` for the choice closest to a misspelt ``name``
    (shown after ``prefix``), or ""."""
    closest = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {prefix}{closest[0]}?)" if closest else ""


def _user_policies(tables: Any, source: str, problems: list[str]) -> tuple[UserPolicy, ...]:
    if not isinstance(tables, dict):
        problems.append(f"{source}: [auth] users: must be tables ([auth.users.NAME])")
        return ()
    policies = []
    for user, table in tables.items():
        section = f"auth.users.{user}"
        if not isinstance(table, dict):
            problems.append(f"{source}: {section}: must be a table ([{section}])")
            continue
        values = _section_values(
            section,
            cls=UserPolicy,
            table={k: v for k, v in table.items() if k != "name"},
            env={},
            source=source,
            problems=problems,
        )
        policies.append(UserPolicy(**(values | {"name": user})))
    return tuple(policies)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


def _section_values(
    section: str,
    *,
    cls: type[Any],
    table: Mapping[str, Any],
    env: Mapping[str, str],
    source: str,
    problems: list[str],
) -> dict[str, Any]:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _NESTED}
    for key in table:
        if key not in fields:
            problems.append(f"{source}: [{section}] {key}: unknown key{_did_you_mean(key, fields)}")
    values = _aws_defaults(section, env)
    for name, spec in fields.items():
        expected = hints[name]
        origin = f"{source}: [{section}] {name}"
        raw: Any = table.get(name, dataclasses.MISSING)
        variable = f"{ENV_PREFIX}{section}_{name}".upper()
        if variable in env:
            origin = f"environment {variable}"
            raw = _from_env(env[variable], expected)
        if raw is dataclasses.MISSING:
            continue
        value, problem = _coerce(raw, expected)
        check = spec.metadata.get("check")
        if problem is None and check is not None:
            problem = check(value)
        if problem is not None:
            problems.append(f"{origin}: {problem}")
            continue
        values[name] = value
    return values


def _aws_defaults(section: str, env: Mapping[str, str]) -> dict[str, Any]:
    """What the AWS SDK variables say, below the file and our own variables."""
    if section == "ses":
        found: dict[str, Any] = {}
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            found["region"] = region
        endpoint = env.get("AWS_ENDPOINT_URL_SES") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            found["endpoint"] = endpoint
        if env.get("AWS_CA_BUNDLE"):
            found["ca_bundle"] = env["AWS_CA_BUNDLE"]
        return found
    if section == "spool" and env.get("STATE_DIRECTORY"):
        # systemd's StateDirectory= may list several, colon-separated.
        return {"path": env["STATE_DIRECTORY"].split(":")[0]}
    if section == "spool":
        return {"path": "./spool"}
    return {}


def _from_env(text: str, expected: Any) -> Any:
    if expected is str:
        return text
    if _is_str_tuple(expected) and not text.lstrip().startswith("["):
        return [item.strip() for item in text.split(",") if item.strip()]
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _coerce(raw: Any, expected: Any) -> tuple[Any, str | None]:
    """The value as the field's type, or the problem with it."""
    if _is_str_tuple(expected):
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            return tuple(raw), None
        return None, f"expected a list of strings, got {_describe(raw)}"
    if expected is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw), None
    if isinstance(raw, expected) and not (expected is int and isinstance(raw, bool)):
        return raw, None
    return None, f"expected {_TYPE_NAMES[expected]}, got {_describe(raw)}"


def _describe(raw: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number"}
    name = names.get(type(raw), "a list" if isinstance(raw, list) else "a table")
    return f"{name} ({raw!r})" if not isinstance(raw, dict) else name


def _is_str_tuple(expected: Any) -> bool:
    return (
        isinstance(expected, types.GenericAlias)
        and expected.__origin__ is tuple
        and expected.__args__ == (str, ...)
    )
