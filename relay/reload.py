"""What a reload (SIGHUP) may change in a running relay. Pure.

A setting in ``LIVE`` is read when an SMTP session starts (or, for the
connection limits, when a connection arrives): a reload gives new sessions
the new value, and sessions in flight keep the one they started with. Every
other setting belongs to something built once at start (the listeners, the
spool, the SES client and delivery, the AUTH threads and failure counts):
a reload keeps its old value and names it, and a restart applies it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from relay.config import SECTIONS, Config

LIVE = frozenset(
    {
        # A new TLS context for new handshakes.
        "smtp.tls_cert",
        "smtp.tls_key",
        # The access policy and the message checks (a new handler).
        "smtp.allowed_networks",
        "smtp.identity_header_networks",
        "smtp.header_size_limit",
        "smtp.max_batch_recipients",
        "auth.users",
        "ses.configuration_set",
        # Per-session settings (new session factories).
        "smtp.proxy_trusted_networks",
        "smtp.proxy_protocol_timeout",
        "smtp.bare_newline",
        "smtp.idle_timeout",
        "smtp.data_timeout",
        "smtp.session_timeout",
        "smtp.write_timeout",
        "smtp.max_recipients",
        "smtp.max_messages_per_session",
        "smtp.max_commands",
        # The connection limiter's limits.
        "smtp.max_connections",
        "smtp.max_connections_per_client",
        # The users AUTH checks against.
        "auth.users_file",
        # The log's handler (``relay.app.serve`` sets it again after a reload).
        "log.format",
        "log.level",
    }
)
SWITCHES = frozenset({"smtp.tls_cert", "smtp.tls_key", "auth.users_file"})
"""Live when one file replaces another; turning TLS or AUTH on or off needs a restart."""


@dataclass(frozen=True, slots=True)
class Reload:
    """The outcome of comparing the configuration in force with a new one."""

    config: Config
    """What is in force after the reload: the new live values, the old others."""
    applied: tuple[str, ...]
    """Changed keys (``section.key``) that new sessions get."""
    need_restart: tuple[str, ...]
    """Changed keys whose old values stay in force until a restart."""


def plan_reload(old: Config, new: Config) -> Reload:
    """Which of ``new``'s changes apply now; both configurations are valid."""
    applied: list[str] = []
    need_restart: list[str] = []
    sections: dict[str, Any] = {}
    for name in SECTIONS:
        before, after = getattr(old, name), getattr(new, name)
        kept: dict[str, Any] = {}
        for spec in dataclasses.fields(before):
            key = f"{name}.{spec.name}"
            was, now = getattr(before, spec.name), getattr(after, spec.name)
            if was == now:
                continue
            if is_live(key, was, now):
                applied.append(key)
            else:
                need_restart.append(key)
                kept[spec.name] = was
        sections[name] = dataclasses.replace(after, **kept)
    return Reload(
        config=Config(source=new.source, **sections),
        applied=tuple(applied),
        need_restart=tuple(need_restart),
    )


def is_live(key: str, was: object, now: object) -> bool:
    if key in SWITCHES:
        return bool(was) and bool(now)
    return key in LIVE


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one reload did: what the daemon tells systemd and counts, and
    what ``ses-relay reload`` prints."""

    source: str
    """The configuration file read again (``defaults``: none)."""
    applied: tuple[str, ...] = ()
    need_restart: tuple[str, ...] = ()
    read_again: tuple[str, ...] = ()
    """The files it names that were read again ("the users file", ...)."""
    problems: tuple[str, ...] = ()
    """Why the reload was refused; empty when it was applied."""

    @property
    def refused(self) -> bool:
        return bool(self.problems)

    def status(self) -> str:
        """One line for systemd's ``STATUS=``."""
        if self.refused:
            return "reload refused (see the log)"
        return (
            f"reloaded: {len(self.applied)} changed, {len(self.need_restart)} waiting for a restart"
        )
