"""relay.auth: the users file, hashing, the off-loop check, failure counting."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import argon2
import bcrypt
import pytest

from relay.__main__ import hash_password_command
from relay.auth import (
    Authenticator,
    AuthOutcome,
    FailureCounter,
    PasswordHash,
    Users,
    client_key,
    dummy_hash,
    hash_password,
    load_users,
    no_users,
    parse_hash,
    verify_password,
)
from relay.config import AuthConfig
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CHEAP_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ALICE_PW = "correct horse"
BOB_PW = "battery staple"


def cheap_argon2(password: str) -> str:
    return hash_password(password, argon2_hasher=CHEAP_ARGON2)


def cheap_bcrypt(password: str) -> str:
    return hash_password(password, "bcrypt", bcrypt_rounds=4)


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return cheap_argon2(ALICE_PW)


@pytest.fixture(scope="module")
def bob_hash() -> str:
    return cheap_bcrypt(BOB_PW)


@pytest.fixture
def users(alice_hash: str, bob_hash: str) -> Users:
    return Users.from_hashes(
        "users",
        {"alice": PasswordHash("argon2id", alice_hash), "bob": PasswordHash("bcrypt", bob_hash)},
    )


class Clock:
    """Time as a dependency: tests move it by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """An injected sleep that records what it was asked to wait, and waits for nothing."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(0)


class CountingVerify:
    """verify_password, counting which hashes it was asked about (thread-safe)."""

    def __init__(self) -> None:
        self.checked: list[PasswordHash] = []
        self._lock = threading.Lock()

    def __call__(self, stored: PasswordHash, password: bytes) -> bool:
        with self._lock:
            self.checked.append(stored)
        return verify_password(stored, password)


def make_authenticator(
    users: Users,
    *,
    max_failures: int = 3,
    window: float = 600.0,
    delay: float = 1.0,
    threads: int = 2,
    queued: int = 16,
    **kwargs: object,
) -> Authenticator:
    config = AuthConfig(
        max_failures=max_failures,
        failure_window=window,
        failure_delay=delay,
        hash_threads=threads,
        max_queued_checks=queued,
    )
    return Authenticator(users, config, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def closing() -> Iterator[list[Authenticator]]:
    made: list[Authenticator] = []
    yield made
    for authenticator in made:
        authenticator.close()


# --- the users file ----------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "users"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load_users(path)
    return caught.value.problems


def test_users_file_with_comments_blanks_and_both_schemes(
    tmp_path: Path, alice_hash: str, bob_hash: str
) -> None:
    path = write(
        tmp_path,
        f"# relay users\n\n   \nalice:{alice_hash}\n  # indented comment\nbob:{bob_hash}  \r\n",
    )
    users = load_users(path)
    assert sorted(users) == ["alice", "bob"]
    assert users.hash_for("alice") == PasswordHash("argon2id", alice_hash)
    assert users.hash_for("bob") == PasswordHash("bcrypt", bob_hash)
    assert users.path == str(path)
    assert users.hash_for("carol") is users.dummy


@pytest.mark.parametrize("prefix", ["$2a$", "$2y$", "$2b$"])
def test_every_bcrypt_prefix_is_accepted_and_verifies(prefix: str, bob_hash: str) -> None:
    stored = parse_hash(prefix + bob_hash[4:])
    assert stored is not None
    assert stored.scheme == "bcrypt"
    assert verify_password(stored, BOB_PW.encode())


def test_empty_file_means_no_users(tmp_path: Path) -> None:
    assert len(load_users(write(tmp_path, "# nobody yet\n"))) == 0


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("just-a-line-without-colon", "expected user:hash"),
        ("bad name:{hash}", "bad user name"),
        (":{hash}", "bad user name"),
        ("carol:plaintext-secret", "not an argon2id"),
        ("carol:$1$saltsalt$abcdefghijklmnopqrstuv", "not an argon2id"),
        ("carol:$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo", "not an argon2id"),
        ("carol:$2b$03$" + "a" * 53, "not an argon2id"),  # bcrypt cost below 4
        ("carol:$2b$12$tooshort", "not an argon2id"),
        ("carol:", "not an argon2id"),
    ],
)
def test_bad_lines_name_file_and_line_never_the_secret(
    tmp_path: Path, alice_hash: str, line: str, expected: str
) -> None:
    line = line.format(hash=alice_hash)
    path = write(tmp_path, f"# header\nalice:{alice_hash}\n{line}\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:3: ")
    assert expected in problems[0]
    secret = line.partition(":")[2] or line
    assert secret not in problems[0]
    assert alice_hash not in problems[0]


def test_duplicate_user_is_an_error_naming_both_lines(tmp_path: Path, alice_hash: str) -> None:
    path = write(tmp_path, f"alice:{alice_hash}\n\nalice:{alice_hash}\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:3: ")
    assert "'alice' is already defined on line 1" in problem
    assert alice_hash not in problem


def test_every_bad_line_is_reported_at_once(tmp_path: Path, alice_hash: str) -> None:
    path = write(tmp_path, f"oops\nalice:{alice_hash}\nbob:secret\nalice:{alice_hash}\n")
    problems = problems_of(path)
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:1", f"{path}:3", f"{path}:4"]


def test_unreadable_and_non_utf8_files(tmp_path: Path, alice_hash: str) -> None:
    missing = tmp_path / "missing"
    (problem,) = problems_of(missing)
    assert problem.startswith(f"{missing}: cannot read users file")
    path = tmp_path / "latin1"
    path.write_bytes(f"alice:{alice_hash}\nb\xf6b:x\n".encode("latin-1"))
    assert problems_of(path) == (f"{path}:2: not UTF-8",)


# --- hashing and verification ------------------------------------------------


def test_argon2id_and_bcrypt_round_trip() -> None:
    for stored in (cheap_argon2("s3cret"), cheap_bcrypt("s3cret")):
        parsed = parse_hash(stored)
        assert parsed is not None
        assert verify_password(parsed, b"s3cret")
        assert not verify_password(parsed, b"s3cret ")
        assert not verify_password(parsed, b"")


def test_default_hash_password_is_argon2id_with_library_defaults() -> None:
    stored = hash_password("pw")
    assert stored.startswith("$argon2id$")
    assert argon2.extract_parameters(stored) == argon2.profiles.RFC_9106_LOW_MEMORY
    parsed = parse_hash(stored)
    assert parsed is not None
    assert verify_password(parsed, b"pw")


def test_hash_password_refusals() -> None:
    with pytest.raises(ValueError, match="72 bytes"):
        hash_password("x" * 73, "bcrypt", bcrypt_rounds=4)
    with pytest.raises(ValueError, match="unknown hash scheme"):
        hash_password("x", "md5")
    with pytest.raises(ValueError, match="argon2id"):
        hash_password("x", argon2_hasher=argon2.PasswordHasher(type=argon2.Type.I))


def test_bcrypt_hashes_of_long_passwords_from_other_tools_still_verify() -> None:
    # htpasswd and older bcrypt versions hashed the first 72 bytes only.
    long_password = b"p" * 80
    made_elsewhere = bcrypt.hashpw(long_password[:72], bcrypt.gensalt(rounds=4)).decode()
    parsed = parse_hash(made_elsewhere)
    assert parsed is not None
    assert verify_password(parsed, long_password)


def test_corrupt_hash_verifies_false_instead_of_raising() -> None:
    bogus = PasswordHash("argon2id", "$argon2id$v=19$m=8,t=1,p=1$AAAA$AAAA")
    assert verify_password(bogus, b"x") is False


def test_non_utf8_password_bytes_round_trip_through_str() -> None:
    password = b"caf\xe9"  # latin-1, not UTF-8
    stored = parse_hash(cheap_argon2(password.decode("utf-8", "surrogateescape")))
    assert stored is not None
    assert verify_password(stored, password)


def test_dummy_hash_has_the_cost_most_users_have() -> None:
    cheap = [parse_hash(cheap_bcrypt(str(n))) for n in range(2)]
    other = parse_hash(hash_password("x", "bcrypt", bcrypt_rounds=5))
    stored = [h for h in [*cheap, other] if h is not None]
    dummy = dummy_hash(stored)
    assert dummy.scheme == "bcrypt"
    assert dummy.cost == ("bcrypt", 4)
    argon = parse_hash(cheap_argon2("x"))
    assert argon is not None
    assert dummy_hash([argon]).cost == argon.cost
    assert dummy_hash([]).scheme == "argon2id"


# --- the authenticator ---------------------------------------------------------


async def test_right_password_succeeds_wrong_fails(
    users: Users, closing: list[Authenticator]
) -> None:
    sleeps = Sleeps()
    auth = make_authenticator(users, sleep=sleeps)
    closing.append(auth)
    assert await auth.authenticate("alice", ALICE_PW, "192.0.2.1") == AuthOutcome(True, "alice")
    assert await auth.authenticate("bob", BOB_PW.encode(), "192.0.2.1") == AuthOutcome(True, "bob")
    assert sleeps.calls == []  # success is never held back
    assert await auth.authenticate("alice", BOB_PW, "192.0.2.1") == AuthOutcome(False, None)
    assert sleeps.calls == [1.0]


async def test_unknown_user_gets_a_dummy_check(users: Users, closing: list[Authenticator]) -> None:
    verify = CountingVerify()
    sleeps = Sleeps()
    auth = make_authenticator(users, verify=verify, sleep=sleeps)
    closing.append(auth)
    outcome = await auth.authenticate("mallory", ALICE_PW, "192.0.2.1")
    assert outcome == AuthOutcome(False, None)
    assert verify.checked == [users.dummy]
    assert sleeps.calls == [1.0]


async def test_unknown_user_and_wrong_password_take_about_as_long(
    closing: list[Authenticator],
) -> None:
    # A check costly enough to measure (tens of ms), far above scheduling noise.
    hasher = argon2.PasswordHasher(time_cost=2, memory_cost=16384, parallelism=1)
    stored = parse_hash(hash_password("right", argon2_hasher=hasher))
    assert stored is not None
    users = Users.from_hashes("users", {"alice": stored})
    auth = make_authenticator(users, max_failures=1000, delay=0)
    closing.append(auth)

    async def fastest(name: str) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            outcome = await auth.authenticate(name, "wrong", "192.0.2.1")
            times.append(time.perf_counter() - start)
            assert not outcome.success
        return min(times)

    wrong_password = await fastest("alice")
    unknown_user = await fastest("nobody")
    assert 0.5 < unknown_user / wrong_password < 2.0, (unknown_user, wrong_password)


async def test_lockout_after_max_failures_and_expiry_after_window(
    users: Users, closing: list[Authenticator]
) -> None:
    clock = Clock()
    verify = CountingVerify()
    observed: list[str] = []
    auth = make_authenticator(
        users,
        max_failures=3,
        window=60,
        clock=clock,
        verify=verify,
        sleep=Sleeps(),
        observe=observed.append,
    )
    closing.append(auth)
    ip = "198.51.100.7"
    outcomes = []
    for _ in range(3):
        outcomes.append(await auth.authenticate("alice", "guess", ip))
        clock.now += 10
    assert [o.locked_out for o in outcomes] == [False, False, True]
    assert auth.locked_out(ip)
    # Refused without a check, even with the right password.
    checks = len(verify.checked)
    refused = await auth.authenticate("alice", ALICE_PW, ip)
    assert refused == AuthOutcome(False, None, locked_out=True)
    assert len(verify.checked) == checks
    # Other clients are not affected.
    assert (await auth.authenticate("alice", ALICE_PW, "198.51.100.8")).success
    # The first failure (t=1000) leaves the window at t=1060: one slot frees up.
    clock.now = 1000 + 60
    assert not auth.locked_out(ip)
    again = await auth.authenticate("alice", "guess", ip)
    assert again.locked_out  # 2 old ones + this one
    clock.now = 1020 + 60 + 1
    assert not auth.locked_out(ip)
    assert (await auth.authenticate("alice", ALICE_PW, ip)).success
    # ses_relay_auth_attempts_total: the failure that reaches the limit is "failed".
    assert observed == ["failed"] * 3 + ["locked_out", "ok", "failed", "ok"]
    # Asked before the exchange: refused, and counted, only while locked out.
    assert not auth.refuses(ip)
    for _ in range(2):  # with the one at t=1060, still in the window
        await auth.authenticate("alice", "guess", ip)
    assert auth.refuses(ip)
    assert observed[-3:] == ["failed", "failed", "locked_out"]


async def test_attempts_in_flight_count_against_the_limit(
    users: Users, closing: list[Authenticator]
) -> None:
    release = threading.Event()

    def slow_verify(stored: PasswordHash, password: bytes) -> bool:
        release.wait(timeout=10)
        return False

    auth = make_authenticator(users, max_failures=2, verify=slow_verify, sleep=Sleeps())
    closing.append(auth)
    first = asyncio.create_task(auth.authenticate("alice", "a", "192.0.2.9"))
    second = asyncio.create_task(auth.authenticate("alice", "b", "192.0.2.9"))
    for _ in range(100):
        if auth.locked_out("192.0.2.9"):
            break
        await asyncio.sleep(0.01)
    third = await auth.authenticate("alice", ALICE_PW, "192.0.2.9")
    assert third == AuthOutcome(False, None, locked_out=True)
    release.set()
    results = await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
    assert [r.success for r in results] == [False, False]
    assert sorted(r.locked_out for r in results) == [False, True]  # whichever ended last


def test_client_keys_group_ipv6_by_64() -> None:
    assert client_key("192.0.2.1") == "192.0.2.1"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("not-an-ip") == "not-an-ip"


def test_failure_table_is_pruned_and_capped() -> None:
    counter = FailureCounter(max_failures=3, window=10, max_clients=3)
    for n in range(5):
        counter.record(f"10.0.0.{n}", now=float(n))
    assert len(counter) == 3
    assert counter.failures("10.0.0.0", now=5) == 0  # forgotten first: failed longest ago
    assert counter.failures("10.0.0.4", now=5) == 1
    for _ in range(10):
        counter.record("10.0.0.4", now=6)
    assert counter.failures("10.0.0.4", now=6) == 3  # never more than max_failures kept
    assert counter.locked_out("10.0.0.4", now=6)
    counter.prune(now=100)
    assert len(counter) == 0


async def test_the_loop_stays_responsive_while_hashes_are_checked(
    closing: list[Authenticator],
) -> None:
    # Real argon2 checks, each long enough that running one on the loop would show.
    hasher = argon2.PasswordHasher(time_cost=4, memory_cost=65536, parallelism=1)
    stored = parse_hash(hash_password("right", argon2_hasher=hasher))
    assert stored is not None
    start = time.perf_counter()
    assert verify_password(stored, b"wrong") is False
    one_check = time.perf_counter() - start
    users = Users.from_hashes("users", {"alice": stored})
    auth = make_authenticator(users, max_failures=100, delay=0, threads=2)
    closing.append(auth)

    checks = asyncio.gather(
        *(auth.authenticate("alice", "wrong", f"192.0.2.{n}") for n in range(4))
    )
    worst_lag = 0.0
    ticks = 0
    while not checks.done() and ticks < 1000:
        before = time.perf_counter()
        await asyncio.sleep(0.005)
        worst_lag = max(worst_lag, time.perf_counter() - before - 0.005)
        ticks += 1
    outcomes = await asyncio.wait_for(checks, timeout=30)
    assert not any(o.success for o in outcomes)
    assert ticks > 1
    assert worst_lag < one_check / 2, (worst_lag, one_check)


async def test_hash_threads_bound_concurrent_checks(
    users: Users, closing: list[Authenticator]
) -> None:
    lock = threading.Lock()
    running = 0
    most = 0

    def tracking_verify(stored: PasswordHash, password: bytes) -> bool:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return False

    auth = make_authenticator(users, max_failures=100, delay=0, threads=2, verify=tracking_verify)
    closing.append(auth)
    await asyncio.wait_for(
        asyncio.gather(*(auth.authenticate("bob", "x", f"192.0.2.{n}") for n in range(6))),
        timeout=10,
    )
    assert most == 2


async def test_checks_beyond_the_queue_are_unavailable_at_once_and_not_counted(
    users: Users, closing: list[Authenticator], caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()

    def held_verify(stored: PasswordHash, password: bytes) -> bool:
        release.wait(timeout=10)
        return verify_password(stored, password)

    sleeps = Sleeps()
    observed: list[str] = []
    auth = make_authenticator(
        users,
        max_failures=1,
        threads=1,
        queued=1,
        verify=held_verify,
        sleep=sleeps,
        observe=observed.append,
    )
    closing.append(auth)
    running = asyncio.ensure_future(auth.authenticate("alice", "wrong", "192.0.2.1"))
    waiting = asyncio.ensure_future(auth.authenticate("alice", ALICE_PW, "192.0.2.2"))
    async with asyncio.timeout(10):
        while auth.checks < 2:
            await asyncio.sleep(0.005)
    with caplog.at_level(logging.WARNING, logger="relay.smtp"):
        beyond = await asyncio.wait_for(auth.authenticate("alice", "guess", "192.0.2.3"), 1.0)
    assert beyond == AuthOutcome(False, None, unavailable=True)
    assert "client=192.0.2.3 user='alice' status=unavailable (2 checks running or waiting)" in (
        caplog.text
    )
    assert not running.done()  # answered while both checks still wait
    assert not waiting.done()
    assert sleeps.calls == []  # no failure_delay
    assert not auth.locked_out("192.0.2.3")  # max_failures=1: no failure was counted
    release.set()
    first, second = await asyncio.wait_for(asyncio.gather(running, waiting), timeout=10)
    assert (first.success, first.locked_out, second.success) == (False, True, True)
    assert auth.checks == 0
    assert (await auth.authenticate("alice", ALICE_PW, "192.0.2.3")).success
    assert observed == ["unavailable", "failed", "ok", "ok"]
    auth.close()  # the relay is stopping: no check can be made
    assert (await auth.authenticate("alice", ALICE_PW, "192.0.2.4")).unavailable
    assert observed[-1] == "unavailable"


async def test_reload_replaces_users_and_keeps_them_on_error(
    tmp_path: Path, alice_hash: str, bob_hash: str, closing: list[Authenticator]
) -> None:
    path = write(tmp_path, f"alice:{alice_hash}\n")
    config = AuthConfig(users_file=str(path), failure_delay=0)
    auth = Authenticator.from_config(config)
    closing.append(auth)
    assert list(auth.users) == ["alice"]
    path.write_text(f"bob:{bob_hash}\n")
    auth.users = load_users(path)  # what a reload does
    assert (await auth.authenticate("bob", BOB_PW, "192.0.2.1")).success
    path.write_text("bob\n")
    with pytest.raises(ConfigError):
        auth.users = load_users(path)
    assert list(auth.users) == ["bob"]


async def test_no_users_file_means_every_auth_fails(closing: list[Authenticator]) -> None:
    auth = Authenticator.from_config(AuthConfig(failure_delay=0))
    closing.append(auth)
    assert len(auth.users) == 0
    assert not (await auth.authenticate("anyone", "x", "192.0.2.1")).success
    assert len(no_users()) == 0


async def test_secrets_never_in_reprs_or_logs(
    users: Users,
    alice_hash: str,
    closing: list[Authenticator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth = make_authenticator(users, max_failures=2, sleep=Sleeps())
    closing.append(auth)
    caplog.set_level(logging.DEBUG)
    await auth.authenticate("alice", ALICE_PW, "192.0.2.1")
    await auth.authenticate("alice", "wrong-guess-1", "192.0.2.2")
    await auth.authenticate("alice", "wrong-guess-2", "192.0.2.2")
    await auth.authenticate("alice", "wrong-guess-3", "192.0.2.2")
    shown = " ".join(
        [
            repr(users),
            str(users),
            repr(users.hash_for("alice")),
            repr(users.dummy),
            repr(auth),
            caplog.text,
        ]
    )
    for secret in (alice_hash, users.dummy.value, ALICE_PW, "wrong-guess"):
        assert secret not in shown
    assert "user='alice' status=ok" in caplog.text
    assert "status=refused" in caplog.text


# --- ses-relay hash-password -------------------------------------------------------


@pytest.mark.parametrize(("scheme", "prefix"), [("argon2id", "$argon2id$"), ("bcrypt", "$2b$")])
def test_hash_password_cli_reads_stdin(scheme: str, prefix: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relay", "hash-password", "--scheme", scheme, "alice"],
        input="pässword with spaces \n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    name, _, stored = done.stdout.strip().partition(":")
    assert name == "alice"
    assert stored.startswith(prefix)
    parsed = parse_hash(stored)
    assert parsed is not None
    assert verify_password(parsed, "pässword with spaces ".encode())


def test_hash_password_cli_without_user_prints_the_hash_only() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relay", "hash-password"],
        input="pw\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("$argon2id$")
    assert done.stdout.count("\n") == 1


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_hash_password_on_a_terminal_asks_twice(capsys: pytest.CaptureFixture[str]) -> None:
    answers = iter(["secret", "secret"])
    prompts: list[str] = []

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return next(answers)

    assert hash_password_command("carol", "bcrypt", stdin=FakeTty(), ask=ask) == 0
    assert prompts == ["Password: ", "Retype password: "]
    line = capsys.readouterr().out.strip()
    parsed = parse_hash(line.removeprefix("carol:"))
    assert parsed is not None
    assert verify_password(parsed, b"secret")


def test_hash_password_refuses_mismatch_empty_and_bad_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    answers = iter(["one", "two"])
    assert (
        hash_password_command(None, "argon2id", stdin=FakeTty(), ask=lambda _: next(answers)) == 1
    )
    assert "differ" in capsys.readouterr().err
    assert hash_password_command(None, "argon2id", stdin=io.StringIO("\n")) == 1
    assert "empty password" in capsys.readouterr().err
    assert hash_password_command("bad name", "argon2id", stdin=io.StringIO("pw\n")) == 2
    assert "bad user name" in capsys.readouterr().err
    out = capsys.readouterr().out
    assert out == ""


async def test_log_lines_name_the_load_balancer_that_vouched_for_the_client(
    users: Users, closing: list[Authenticator], caplog: pytest.LogCaptureFixture
) -> None:
    auth = make_authenticator(users, sleep=Sleeps())
    closing.append(auth)
    caplog.set_level(logging.INFO, logger="relay.smtp")
    await auth.authenticate("alice", "wrong", "203.0.113.9", via="10.0.0.5")
    await auth.authenticate("alice", ALICE_PW, "198.51.100.7")
    assert "client=203.0.113.9 via=10.0.0.5 user='alice' status=failed" in caplog.text
    assert "client=198.51.100.7 user='alice' status=ok" in caplog.text
