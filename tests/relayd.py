"""The relay under test: in-process (``running_relay``) with a configuration
written as TOML, the way an operator writes one, and pointed at a fake SES."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from relay.app import Relay
from relay.config import Config, load_config


class SesTarget(Protocol):
    """What the relay needs to reach an SES: ``FakeSes``, or moto's ``MotoTarget``."""

    @property
    def url(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def access_key(self) -> str: ...
    @property
    def secret_key(self) -> str: ...
    @property
    def ca_pem_path(self) -> str: ...


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table: auth={"users": {"alice": {...}}}
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def ses_env(fake: SesTarget, **extra: str) -> dict[str, str]:
    """An environment with the fake SES's credentials and nothing from the host."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SES_RELAY_"))}
    return (
        env
        | {
            "AWS_ACCESS_KEY_ID": fake.access_key,
            "AWS_SECRET_ACCESS_KEY": fake.secret_key,
            "AWS_EC2_METADATA_DISABLED": "true",
            "HOME": "/nonexistent",
        }
        | extra
    )


def relay_config(
    tmp_path: Path,
    fake: SesTarget,
    *,
    env: Mapping[str, str] | None = None,
    **sections: Mapping[str, Any],
) -> tuple[Config, dict[str, str]]:
    """A configuration listening on free loopback ports, delivering to ``fake``;
    ``env`` adds to (or overrides) the environment ``ses_env`` gives."""
    merged: dict[str, dict[str, Any]] = {
        "smtp": {"listen": ["127.0.0.1:0"], "hostname": "relay.test"},
        "ses": {
            "endpoint": fake.url,
            "ca_bundle": fake.ca_pem_path,
            "region": fake.region,
            "backoff_base": 0.01,
            "backoff_max": 0.05,
            "max_send_rate": 1000.0,
        },
        "spool": {"path": str(tmp_path / "spool")},
        "metrics": {"listen": "127.0.0.1:0"},
        "delivery": {"inline_timeout": 5.0},
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    environment = ses_env(fake, **(env or {}))
    path = write_config(tmp_path / "relay.toml", merged)
    return load_config(path, environment), environment


@asynccontextmanager
async def running_relay(
    tmp_path: Path,
    fake: SesTarget,
    *,
    env: Mapping[str, str] | None = None,
    **sections: Mapping[str, Any],
) -> AsyncIterator[Relay]:
    config, environment = relay_config(tmp_path, fake, env=env, **sections)
    relay = Relay(config, environment)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop(grace=1.0)


REPLY_WAIT = 15.0
"""Seconds a raw session waits for each reply line."""


async def last_reply_line(reader: asyncio.StreamReader) -> bytes:
    """The last line of the next SMTP reply."""
    while True:
        line = await asyncio.wait_for(reader.readline(), REPLY_WAIT)
        if line[3:4] != b"-":
            return line


async def in_data(
    relay: Relay, sender: str, recipient: str = "b@x.net"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to ``relay`` that has said EHLO, MAIL, RCPT and DATA
    (each answered as it should be): what is written next is the message."""
    host, port = relay.smtp_addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await last_reply_line(reader)
        for line in ("EHLO c.test", f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>"):
            writer.write(f"{line}\r\n".encode())
            assert (await last_reply_line(reader)).startswith(b"250")
        writer.write(b"DATA\r\n")
        assert (await last_reply_line(reader)).startswith(b"354 ")
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer
