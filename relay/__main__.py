"""The ``ses-relay`` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence

from relay import __version__
from relay.config import Config, load_config
from relay.errors import ConfigError, RelayError
from relay.ses.client import SendQuota, SesClient
from relay.ses.credentials import default_chain
from relay.ses.http import new_session

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

    command("check-config", "Check a configuration file and report every problem.")
    command("quota", "Print the SES account's sending quota.")
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    environment = os.environ if env is None else env
    try:
        config = load_config(args.config, environment)
    except ConfigError as exc:
        print(
            f"ses-relay: configuration is invalid ({len(exc.problems)} problems):", file=sys.stderr
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.command == "check-config":
            print(f"ses-relay: configuration OK ({config.source})")
            return 0
        if args.command == "quota":
            quota = asyncio.run(fetch_quota(config, environment))
            print(format_quota(quota))
            return 0
    except RelayError as exc:
        print(f"ses-relay: {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_USAGE


async def fetch_quota(config: Config, env: Mapping[str, str]) -> SendQuota:
    ses = config.ses
    async with new_session(ca_bundle=ses.ca_bundle, max_connections=2) as session:
        credentials = default_chain(env, session=session, region=ses.region)
        client = SesClient(ses, credentials, session=session)
        return await client.get_send_quota()


def format_quota(quota: SendQuota) -> str:
    return (
        f"Max24HourSend:   {quota.max_24_hour_send:g}\n"
        f"MaxSendRate:     {quota.max_send_rate:g} per second\n"
        f"SentLast24Hours: {quota.sent_last_24_hours:g}"
    )


if __name__ == "__main__":
    sys.exit(main())
