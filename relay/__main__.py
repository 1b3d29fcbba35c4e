"""The ``ses-relay`` command line."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TextIO, TypeVar

from relay import __version__
from relay.auth import SCHEMES, hash_password, valid_username
from relay.config import Config, load_config, read_config, unknown_variables
from relay.errors import ConfigError, RelayError
from relay.queuecmd import add_arguments as add_queue_arguments
from relay.queuecmd import queue_command as run_queue_command
from relay.reloadcmd import run_reload
from relay.ses.sender import UNLIMITED

# The daemon and the SES client (aiohttp) are imported by the commands that
# use them: `ses-relay queue` and `reload` run often, from scripts, and need neither.
if TYPE_CHECKING:
    from relay.bouncecheck import BounceSenderCheck
    from relay.ses.api import Ses
    from relay.ses.sender import SendQuota

T = TypeVar("T")

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # sysexits.h EX_CONFIG, as Postfix's tools use


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ses-relay", description="SMTP-to-Amazon-SES relay daemon."
    )
    parser.add_argument("--version", action="version", version=f"ses-relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "-c", "--config", metavar="FILE", help="TOML configuration file (default: built-in)"
        )
        return sub

    command("serve", "Run the relay in the foreground until SIGTERM or SIGINT.")
    command("check-config", "Check a configuration file and report every problem.")
    command("quota", "Print the SES account's sending quota.")
    command(
        "reload",
        "Check the configuration, have the running relay reload it (SIGHUP) and print "
        "what it applied.",
    )
    add_queue_arguments(
        command(
            "queue",
            "List, show, retry or delete queued and dead messages while the relay runs "
            "(like mailq and postsuper).",
        )
    )
    hashing = commands.add_parser(
        "hash-password",
        help="Hash a password for the users file ([auth] users_file).",
        description=(
            "Hash a password for the users file. The password is asked twice on the "
            "terminal, or read as one line from standard input when that is not a terminal. "
            "Prints a user:hash line (with USER) or the hash alone."
        ),
    )
    hashing.add_argument("--scheme", choices=SCHEMES, default="argon2id", help="default: argon2id")
    hashing.add_argument("user", nargs="?", metavar="USER", help="user name for the line")
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "hash-password":
        return hash_password_command(args.user, args.scheme)
    environment = os.environ if env is None else env
    for warning in unknown_variables(environment):
        print(f"ses-relay: warning: {warning}", file=sys.stderr)
    try:
        if args.command == "queue":
            return run_queue_command(load_config(args.config, environment), args)
        config = load_checked(args.config, environment)
        return COMMANDS[args.command](config, environment)
    except ConfigError as exc:
        return report_config_error(exc)
    except RelayError as exc:
        print(f"ses-relay: {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def load_checked(path: str | None, env: Mapping[str, str]) -> Config:
    """The configuration, and the files it names loaded: ``ConfigError`` lists
    every problem of both in one pass."""
    from relay.resources import load_resources

    config, problems = read_config(path, env)
    try:
        load_resources(config)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return config


def serve_command(config: Config, env: Mapping[str, str]) -> int:
    if config.smtp.workers > 1:
        from relay.metricsdir import metrics_dir

        with metrics_dir() as directory:
            # Every process of the relay keeps its metrics in files there
            # (relay.metrics): set before prometheus_client is imported.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
            from relay.supervisor import supervise

            return asyncio.run(supervise(config, os.environ, directory))
    from relay.app import serve

    return asyncio.run(serve(config, env))


def check_config_command(config: Config, env: Mapping[str, str]) -> int:
    """Problems fail (``main`` found them); what SES says of the bounce sender
    is told, never a failure."""
    from relay.bouncecheck import check_bounce_sender

    print(f"ses-relay: configuration OK ({config.source})")
    check = asyncio.run(with_ses(config, env, lambda ses: check_bounce_sender(config, ses.v1)))
    if check is not None:
        print_check(check)
    return 0


def print_check(check: BounceSenderCheck) -> None:
    if check.verified:
        print(f"ses-relay: {check.text}")
    else:
        kind = "warning" if check.verified is False else "note"
        print(f"ses-relay: {kind}: {check.text}", file=sys.stderr)


def quota_command(config: Config, env: Mapping[str, str]) -> int:
    print(format_quota(asyncio.run(fetch_quota(config, env))))
    return 0


def reload_command(config: Config, env: Mapping[str, str]) -> int:
    return run_reload(config)


COMMANDS: dict[str, Callable[[Config, Mapping[str, str]], int]] = {
    "serve": serve_command,
    "check-config": check_config_command,
    "quota": quota_command,
    "reload": reload_command,
}


def report_config_error(exc: ConfigError) -> int:
    count = len(exc.problems)
    noun = "problem" if count == 1 else "problems"
    print(f"ses-relay: configuration is invalid ({count} {noun}):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_CONFIG


def hash_password_command(
    user: str | None,
    scheme: str,
    *,
    stdin: TextIO | None = None,
    ask: Callable[[str], str] = getpass.getpass,
) -> int:
    """``ses-relay hash-password``: print ``user:hash`` (or the hash) for the users file."""
    if user is not None and not valid_username(user):
        print(
            "ses-relay: hash-password: bad user name (printable, no spaces or ':')",
            file=sys.stderr,
        )
        return EXIT_USAGE
    source = sys.stdin if stdin is None else stdin
    if source.isatty():
        password = ask("Password: ")
        if ask("Retype password: ") != password:
            print("ses-relay: hash-password: the passwords differ", file=sys.stderr)
            return EXIT_FAILURE
    else:
        password = source.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        print("ses-relay: hash-password: empty password", file=sys.stderr)
        return EXIT_FAILURE
    try:
        hashed = hash_password(password, scheme)
    except ValueError as exc:
        print(f"ses-relay: hash-password: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(hashed if user is None else f"{user}:{hashed}")
    return 0


async def fetch_quota(config: Config, env: Mapping[str, str]) -> SendQuota:
    return await with_ses(config, env, lambda ses: ses.sender.quota())


async def with_ses(
    config: Config, env: Mapping[str, str], call: Callable[[Ses], Awaitable[T]]
) -> T:
    """``call`` with the SES clients for ``config``, closed after."""
    from relay.resources import load_resources
    from relay.ses.api import connect
    from relay.ses.credentials import default_chain
    from relay.ses.http import new_session

    ses = config.ses
    tls = load_resources(config).ses_tls
    async with new_session(tls=tls, max_connections=2) as session:
        credentials = default_chain(env, session=session, region=ses.region)
        return await call(connect(ses, credentials, session=session))


def format_quota(quota: SendQuota) -> str:
    daily = (
        "-1 (unlimited)" if quota.max_24_hour_send == UNLIMITED else f"{quota.max_24_hour_send:g}"
    )
    return (
        f"Max24HourSend:   {daily}\n"
        f"MaxSendRate:     {quota.max_send_rate:g} per second\n"
        f"SentLast24Hours: {quota.sent_last_24_hours:g}"
        + ("" if quota.sending_enabled else "\nSendingEnabled:  false (SES has paused sending)")
    )


if __name__ == "__main__":
    sys.exit(main())
