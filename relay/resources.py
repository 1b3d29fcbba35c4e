"""What the configuration points at, loaded and checked: the certificate and
key, the users file, the CA bundle for AWS. The daemon loads them at start
and at each reload; ``check-config`` and ``reload`` check them without
starting anything (and without aiohttp)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from relay.auth import Users, load_users
from relay.config import Config
from relay.errors import ConfigError
from relay.tls import client_tls_context, server_tls_context


@dataclass(frozen=True, slots=True)
class Resources:
    """What the configuration points at, loaded and checked."""

    tls_context: ssl.SSLContext | None
    users: Users | None
    ses_tls: ssl.SSLContext
    """TLS for the calls to AWS (``ses.ca_bundle`` or the system's CAs)."""


def load_resources(config: Config) -> Resources:
    """Load the certificates and the users file; ``ConfigError`` lists every problem."""
    smtp, source = config.smtp, config.source
    problems: list[str] = []
    try:
        ses_tls = client_tls_context(config.ses.ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        problems.append(f"{source}: [ses] ca_bundle: cannot load {config.ses.ca_bundle}: {exc}")
    tls_context = None
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        problems.append(f"{source}: [smtp] tls_cert, tls_key: set both or neither")
    elif smtp.tls_cert:
        try:
            tls_context = server_tls_context(smtp.tls_cert, smtp.tls_key)
        except (OSError, ssl.SSLError) as exc:
            problems.append(
                f"{source}: [smtp] tls_cert, tls_key: cannot load the certificate and key "
                f"({smtp.tls_cert}, {smtp.tls_key}): {exc}"
            )
    if smtp.tls_listen and not (smtp.tls_cert and smtp.tls_key):
        problems.append(f"{source}: [smtp] tls_listen: needs tls_cert and tls_key")
    if smtp.tls_listen and smtp.proxy_protocol:
        problems.append(
            f"{source}: [smtp] proxy_protocol: not supported with tls_listen "
            "(the PROXY header would come before the TLS handshake); "
            "terminate TLS at the load balancer or use STARTTLS on listen"
        )
    users = None
    if config.auth.users_file:
        try:
            users = load_users(config.auth.users_file)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if not (smtp.tls_cert and smtp.tls_key):
            problems.append(
                f"{source}: [auth] users_file: AUTH is offered only under TLS: "
                "set [smtp] tls_cert and tls_key"
            )
    if problems:
        raise ConfigError(problems)
    return Resources(tls_context=tls_context, users=users, ses_tls=ses_tls)
