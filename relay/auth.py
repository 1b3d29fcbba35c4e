"""Password checks for SMTP AUTH: the users file, hashing, and failure counting.

The users file holds one ``user:hash`` line per user, where the hash is
argon2id (``$argon2id$...``, from argon2-cffi) or bcrypt (``$2b$``, ``$2a$``,
``$2y$``). ``#`` starts a comment line; blank lines are ignored.
``ses-relay hash-password`` writes such lines.

``Authenticator.authenticate`` is what the SMTP layer awaits:

- the hash is checked in a small thread pool (``auth.hash_threads``), so one
  slow argon2 check never stalls other sessions; at most
  ``auth.max_queued_checks`` more checks wait for a thread, and an attempt
  beyond them is answered "unavailable" at once, without a check or a
  failure counted (a flood from many addresses cannot queue a client's
  AUTH behind it for long);
- an unknown user gets a check against a dummy hash of the same scheme and
  cost as the users' own, so a wrong name and a wrong password take as long;
- failures are counted per client (an IPv4 address, or the /64 of an IPv6
  one) within ``auth.failure_window``; every failed answer is held back
  ``auth.failure_delay`` seconds; a client with ``auth.max_failures``
  failures in the window is refused without a check until the oldest one
  ages out. The table of counters is pruned and capped.

Each attempt's outcome (``AUTH_OUTCOMES``) is reported to ``observe``
(``ses_relay_auth_attempts_total``).

Clock and sleep are injected; nothing here patches or reads ``time`` on its own.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal, get_args

import argon2
import bcrypt

from relay.config import AuthConfig
from relay.errors import ConfigError
from relay.log import smtp_log

Scheme = Literal["argon2id", "bcrypt"]
SCHEMES: Final = ("argon2id", "bcrypt")
AuthAttempt = Literal["ok", "failed", "locked_out", "unavailable"]
"""How an AUTH attempt ended: accepted; refused after a check (unknown user or
wrong password); refused without one, the client being locked out; or no
check could be made now (too many waiting, or stopping)."""
AUTH_OUTCOMES: Final[tuple[AuthAttempt, ...]] = get_args(AuthAttempt)

BCRYPT_MAX_PASSWORD_BYTES: Final = 72
"""bcrypt reads only this many bytes of a password; every implementation truncates."""
DEFAULT_BCRYPT_ROUNDS: Final = 12
USER_LOG_LIMIT: Final = 64
"""Characters of a client-chosen user name in a log line."""
MAX_CLIENTS: Final = 10_000
"""Clients whose failures are remembered at once; the oldest are forgotten first."""

_ARGON2ID = re.compile(
    r"\$argon2id\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]+={0,2}"
)
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """One stored password hash. Its text never appears in a repr."""

    scheme: Scheme
    value: str = field(repr=False)

    @property
    def cost(self) -> tuple[object, ...]:
        """What decides how long a check takes: same cost, same time."""
        if self.scheme == "bcrypt":
            return ("bcrypt", int(self.value[4:6]))
        params = argon2.extract_parameters(self.value)
        return (
            "argon2id",
            params.version,
            params.time_cost,
            params.memory_cost,
            params.parallelism,
            params.hash_len,
        )


def parse_hash(text: str) -> PasswordHash | None:
    """``text`` as a PasswordHash, or None when it is not a supported hash."""
    if _BCRYPT.fullmatch(text):
        return PasswordHash("bcrypt", text)
    if _ARGON2ID.fullmatch(text):
        try:
            params = argon2.extract_parameters(text)
        except argon2.exceptions.InvalidHashError:
            return None
        if params.type is argon2.Type.ID:
            return PasswordHash("argon2id", text)
    return None


@dataclass(frozen=True, slots=True)
class Users:
    """The users file: name → hash, and the dummy hash checked for unknown names."""

    path: str
    hashes: Mapping[str, PasswordHash] = field(repr=False)
    dummy: PasswordHash = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hashes", MappingProxyType(dict(self.hashes)))

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, name: object) -> bool:
        return name in self.hashes

    def __iter__(self) -> Iterator[str]:
        return iter(self.hashes)

    def __repr__(self) -> str:
        return f"Users(path={self.path!r}, users={len(self.hashes)})"

    def hash_for(self, name: str) -> PasswordHash:
        """The user's hash, or the dummy one for an unknown name."""
        return self.hashes.get(name, self.dummy)

    @classmethod
    def from_hashes(cls, path: str, hashes: Mapping[str, PasswordHash]) -> Users:
        return cls(path=path, hashes=hashes, dummy=dummy_hash(hashes.values()))


def valid_username(name: str) -> bool:
    """Printable, without whitespace or ``:``, at most 255 characters."""
    return (
        0 < len(name) <= 255
        and name.isprintable()
        and ":" not in name
        and not any(char.isspace() for char in name)
    )


def parse_users(text: str, path: str) -> dict[str, PasswordHash]:
    """The ``user:hash`` lines of ``text``; a ConfigError lists every bad line.

    Messages name the file and line but never repeat a line's password
    part: a mistaken line may hold a plain-text password.
    """
    hashes: dict[str, PasswordHash] = {}
    defined: dict[str, int] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        name, sep, hashed = line.partition(":")
        name, hashed = name.strip(), hashed.strip()
        if not sep:
            problems.append(f"{where}: expected user:hash")
            continue
        if not valid_username(name):
            problems.append(
                f"{where}: bad user name (printable, no spaces or ':', 1 to 255 characters)"
            )
            continue
        if name in defined:
            problems.append(f"{where}: user {name!r} is already defined on line {defined[name]}")
            continue
        defined[name] = number
        parsed = parse_hash(hashed)
        if parsed is None:
            problems.append(
                f"{where}: user {name!r}: not an argon2id ($argon2id$...) or "
                "bcrypt ($2b$...) hash; make one with `ses-relay hash-password`"
            )
            continue
        hashes[name] = parsed
    if problems:
        raise ConfigError(problems)
    return hashes


def load_users(path: str | Path) -> Users:
    """Read and check the users file (once, at start or on ``reload``)."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read users file: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{name}:{line}: not UTF-8"]) from None
    return Users.from_hashes(name, parse_users(text, name))


def no_users() -> Users:
    """An empty user list: every AUTH fails (no users file configured)."""
    return Users.from_hashes("", {})


def hash_password(
    password: str,
    scheme: str = "argon2id",
    *,
    argon2_hasher: argon2.PasswordHasher | None = None,
    bcrypt_rounds: int = DEFAULT_BCRYPT_ROUNDS,
) -> str:
    """A new hash of ``password`` for the users file.

    argon2id uses argon2-cffi's defaults (RFC 9106's low-memory profile)
    unless ``argon2_hasher`` is given. bcrypt refuses passwords over 72
    bytes rather than silently ignoring the rest.
    """
    secret = password.encode("utf-8", "surrogateescape")
    if scheme == "argon2id":
        hasher = argon2_hasher or argon2.PasswordHasher()
        if hasher.type is not argon2.Type.ID:
            raise ValueError("argon2_hasher must make argon2id hashes")
        return hasher.hash(secret)
    if scheme == "bcrypt":
        if len(secret) > BCRYPT_MAX_PASSWORD_BYTES:
            raise ValueError(
                f"bcrypt uses only the first {BCRYPT_MAX_PASSWORD_BYTES} bytes of a password; "
                "use argon2id for a longer one"
            )
        return bcrypt.hashpw(secret, bcrypt.gensalt(rounds=bcrypt_rounds)).decode("ascii")
    raise ValueError(f"unknown hash scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def verify_password(stored: PasswordHash, password: bytes) -> bool:
    """True when ``password`` matches. CPU-bound: run it off the event loop."""
    if stored.scheme == "bcrypt":
        try:
            return bcrypt.checkpw(
                password[:BCRYPT_MAX_PASSWORD_BYTES], stored.value.encode("ascii")
            )
        except ValueError:
            return False
    try:
        return argon2.PasswordHasher().verify(stored.value, password)
    except argon2.exceptions.Argon2Error:
        return False


def dummy_hash(hashes: Iterable[PasswordHash]) -> PasswordHash:
    """A hash of a random password with the cost most users' hashes have.

    Checked for unknown names, so that they take as long as known ones.
    """
    stored = list(hashes)
    secret = secrets.token_bytes(32)
    if not stored:
        return PasswordHash("argon2id", argon2.PasswordHasher().hash(secret))
    by_cost = collections.Counter(h.cost for h in stored)
    cost, _ = by_cost.most_common(1)[0]
    model = next(h for h in stored if h.cost == cost)
    if model.scheme == "bcrypt":
        rounds = int(model.value[4:6])
        value = bcrypt.hashpw(secret, bcrypt.gensalt(rounds=rounds)).decode("ascii")
        return PasswordHash("bcrypt", value)
    params = argon2.extract_parameters(model.value)
    return PasswordHash("argon2id", argon2.PasswordHasher.from_parameters(params).hash(secret))


def client_key(client_ip: str) -> str:
    """Whose failures these are: the IPv4 address, or the /64 of an IPv6 one.

    One IPv6 host usually holds a whole /64, so counting single addresses
    would let it try again from the next one.
    """
    try:
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return client_ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class FailureCounter:
    """Failed attempts per client within a sliding window (pure: no clock of its own).

    Keeps at most ``max_failures`` timestamps for each of at most
    ``max_clients`` clients; clients whose newest failure has left the
    window are dropped, and when the table is full the client that failed
    longest ago is forgotten first.
    """

    def __init__(self, *, max_failures: int, window: float, max_clients: int = MAX_CLIENTS) -> None:
        if max_failures < 1 or window <= 0 or max_clients < 1:
            raise ValueError("max_failures, window and max_clients must be positive")
        self.max_failures = max_failures
        self.window = window
        self.max_clients = max_clients
        # Ordered by each client's newest failure, oldest first.
        self._table: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._table)

    def prune(self, now: float) -> None:
        horizon = now - self.window
        while self._table:
            key, times = next(iter(self._table.items()))
            if times[-1] > horizon:
                break
            del self._table[key]

    def failures(self, key: str, now: float) -> int:
        """Failures of ``key`` within the window ending at ``now``."""
        self.prune(now)
        times = self._table.get(key)
        if times is None:
            return 0
        horizon = now - self.window
        while times and times[0] <= horizon:
            times.popleft()
        return len(times)

    def record(self, key: str, now: float) -> int:
        """Count one failure of ``key``; return its failures within the window."""
        count = self.failures(key, now)
        times = self._table.pop(key, None)
        if times is None:
            times = collections.deque(maxlen=self.max_failures)
        times.append(now)
        self._table[key] = times
        while len(self._table) > self.max_clients:
            self._table.popitem(last=False)
        return min(count + 1, self.max_failures)

    def locked_out(self, key: str, now: float) -> bool:
        return self.failures(key, now) >= self.max_failures


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """The answer to one AUTH attempt."""

    success: bool
    username: str | None
    """The authenticated name; None unless ``success``."""
    locked_out: bool = False
    """The client has reached ``max_failures`` (now or before): refuse further AUTH."""
    unavailable: bool = False
    """No check was made: too many are waiting, or the relay is stopping. Try later."""


Verify = Callable[[PasswordHash, bytes], bool]
Sleep = Callable[[float], Awaitable[object]]


def _unobserved(outcome: AuthAttempt) -> None:
    """The default ``observe``: outcomes are not counted."""


class Authenticator:
    """Checks AUTH credentials off the event loop, and slows and counts failures."""

    def __init__(
        self,
        users: Users,
        config: AuthConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        verify: Verify = verify_password,
        max_clients: int = MAX_CLIENTS,
        observe: Callable[[AuthAttempt], None] = _unobserved,
    ) -> None:
        """``observe`` is told each attempt's outcome (the relay's metrics)."""
        self.config = config
        self._observe = observe
        self._users = users
        self._clock = clock
        self._sleep = sleep
        self._verify = verify
        self._failures = FailureCounter(
            max_failures=config.max_failures,
            window=config.failure_window,
            max_clients=max_clients,
        )
        self._pending: collections.Counter[str] = collections.Counter()
        self._checks = 0
        """Checks running or waiting for a hash thread."""
        self._max_checks = config.hash_threads + config.max_queued_checks
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.hash_threads, thread_name_prefix="relay-auth"
        )

    @classmethod
    def from_config(cls, config: AuthConfig) -> Authenticator:
        """Load ``config.users_file`` (no file: no users, every AUTH fails)."""
        users = load_users(config.users_file) if config.users_file else no_users()
        return cls(users, config)

    def __repr__(self) -> str:
        return f"Authenticator({self._users!r}, clients={len(self._failures)})"

    @property
    def users(self) -> Users:
        return self._users

    @users.setter
    def users(self, users: Users) -> None:
        """Check the next attempts against ``users`` (a reload); failure counts stay."""
        self._users = users

    @property
    def checks(self) -> int:
        """Password checks running or waiting for a hash thread now."""
        return self._checks

    def close(self) -> None:
        """Stop the hash threads (checks already running finish in the background)."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    def locked_out(self, client_ip: str) -> bool:
        """True when ``client_ip`` may not try AUTH now."""
        key = client_key(client_ip)
        failures = self._failures.failures(key, self._clock())
        return failures + self._pending[key] >= self.config.max_failures

    def refuses(self, client_ip: str, *, via: str | None = None) -> bool:
        """``locked_out``, asked before the exchange so that a locked-out client
        never sends its password: True counts as a "locked_out" attempt."""
        if not self.locked_out(client_ip):
            return False
        self._log(logging.WARNING, "refused (locked out)", client_ip, via, None)
        self._observe("locked_out")
        return True

    def _log(
        self,
        level: int,
        status: str,
        client_ip: str,
        via: str | None,
        username: str | None,
        *args: object,
    ) -> None:
        """``auth: client=... user=... status=STATUS``: one line per AUTH
        attempt that got an answer; ``args`` fill ``status``'s ``%`` fields."""
        key = client_key(client_ip)
        shown = key if via is None else f"{key} via={via}"
        user = None if username is None else username[:USER_LOG_LIMIT]
        fields = {"client": key, "user": user} | ({} if via is None else {"via": via})
        smtp_log.log(
            level,
            "auth: client=%s user=%s status=" + status,
            shown,
            "-" if username is None else _shown(username),
            *args,
            extra={
                "event": "auth",
                "command": "AUTH",
                "status": status.split(maxsplit=1)[0],
                **fields,
            },
        )

    async def authenticate(
        self, username: str, password: str | bytes, client_ip: str, *, via: str | None = None
    ) -> AuthOutcome:
        """Check one AUTH attempt from ``client_ip``.

        A ``str`` password is encoded as UTF-8 (with surrogateescape, so
        bytes decoded that way come back unchanged). ``via`` is the load
        balancer that vouched for ``client_ip`` in a PROXY header, for the log.
        """
        key = client_key(client_ip)
        if self.locked_out(client_ip):
            self._log(logging.WARNING, "refused (locked out)", client_ip, via, username)
            self._observe("locked_out")
            return AuthOutcome(success=False, username=None, locked_out=True)
        secret = (
            password if isinstance(password, bytes) else password.encode("utf-8", "surrogateescape")
        )
        if self.checks >= self._max_checks:
            self._log(
                logging.WARNING,
                "unavailable (%d checks running or waiting)",
                client_ip,
                via,
                username,
                self.checks,
            )
            self._observe("unavailable")
            return AuthOutcome(success=False, username=None, unavailable=True)
        stored = self._users.hash_for(username)
        known = username in self._users
        self._pending[key] += 1
        self._checks += 1
        try:
            loop = asyncio.get_running_loop()
            matched = await loop.run_in_executor(self._executor, self._verify, stored, secret)
        except RuntimeError:
            if not self._closed:
                raise
            # The hash threads are shut down: the relay is stopping.
            self._log(logging.WARNING, "unavailable (stopping)", client_ip, via, username)
            self._observe("unavailable")
            return AuthOutcome(success=False, username=None, unavailable=True)
        finally:
            self._checks -= 1
            self._pending[key] -= 1
            if self._pending[key] <= 0:
                del self._pending[key]
        if matched and known:
            self._log(logging.INFO, "ok", client_ip, via, username)
            self._observe("ok")
            return AuthOutcome(success=True, username=username)
        failures = self._failures.record(key, self._clock())
        locked = failures >= self.config.max_failures
        self._log(
            logging.WARNING,
            "failed failures=%d/%d%s",
            client_ip,
            via,
            username,
            failures,
            self.config.max_failures,
            " (locked out)" if locked else "",
        )
        self._observe("failed")
        if self.config.failure_delay > 0:
            await self._sleep(self.config.failure_delay)
        return AuthOutcome(success=False, username=None, locked_out=locked)


def _shown(username: str) -> str:
    """A client-chosen name, safe for one log line."""
    return repr(username[:USER_LOG_LIMIT] + ("…" if len(username) > USER_LOG_LIMIT else ""))
