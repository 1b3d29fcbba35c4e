"""The shared credentials and config files (``~/.aws/credentials``,
``~/.aws/config``), located from the environment and parsed into
``SharedFiles``; files, token files included, are read with a size cap."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from relay.errors import CredentialsError
from relay.ses.credentials.parsing import parse_profiles

MAX_FILE_SIZE = 1024 * 1024
"""Shared config/credentials files and token files are read up to this size."""


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


def read_token_file(path: str, what: str) -> str:
    text = _read_small_file(Path(path), what)
    if text is None:
        raise CredentialsError(f"{what} {path} does not exist")
    token = text.strip()
    if not token:
        raise CredentialsError(f"{what} {path} is empty")
    return token
