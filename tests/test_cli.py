"""The command line, run as a user runs it: a subprocess with an environment."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakeses import FakeSes, SesErrorReply

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No credentials or AWS settings from the machine running the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SES_RELAY_"))}
    env |= {"HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true"}
    return env | extra


def ses_env(tmp_path: Path, fake: FakeSes) -> dict[str, str]:
    return clean_env(
        tmp_path,
        AWS_ACCESS_KEY_ID=fake.access_key,
        AWS_SECRET_ACCESS_KEY=fake.secret_key,
        AWS_ENDPOINT_URL_SES=fake.url,
        AWS_CA_BUNDLE=fake.ca_pem_path,
        AWS_REGION=fake.region,
    )


async def test_quota_prints_the_account_limits(tmp_path: Path, fake_ses: FakeSes) -> None:
    code, out, err = await run_cli("quota", env=ses_env(tmp_path, fake_ses))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "Max24HourSend:   50000",
        "MaxSendRate:     14 per second",
        "SentLast24Hours: 127",
    ]
    assert [r.action for r in fake_ses.requests] == ["GetSendQuota"]


async def test_quota_says_when_the_daily_quota_is_unlimited(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    fake_ses.quota.update(max_24_hour_send=-1.0)
    code, out, err = await run_cli("quota", env=ses_env(tmp_path, fake_ses))
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "Max24HourSend:   -1 (unlimited)"


async def test_quota_reports_ses_refusal(tmp_path: Path, fake_ses: FakeSes) -> None:
    fake_ses.script(SesErrorReply(403, "AccessDenied", "User is not authorized"))
    code, out, err = await run_cli("quota", env=ses_env(tmp_path, fake_ses))
    assert (code, out) == (1, "")
    assert err == "ses-relay: quota: AccessDenied: User is not authorized\n"


async def test_quota_without_credentials_lists_what_was_tried(tmp_path: Path) -> None:
    code, out, err = await run_cli("quota", env=clean_env(tmp_path))
    assert (code, out) == (1, "")
    assert "no AWS credentials found" in err
    for source in ("environment", "shared credentials file", "EC2 instance metadata"):
        assert source in err


async def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[smtp]\nmax_recipients = 0\n[ses]\nendpoint = "ftp://x"\ntypo = 1\n')
    code, out, err = await run_cli("check-config", "-c", str(config), env=clean_env(tmp_path))
    assert (code, out) == (78, "")
    assert err.splitlines() == [
        "ses-relay: configuration is invalid (3 problems):",
        f"  {config}: [smtp] max_recipients: must be greater than 0",
        f"  {config}: [ses] typo: unknown key",
        f"  {config}: [ses] endpoint: must start with https:// "
        "(or http:// for a local test endpoint)",
    ]


@pytest.mark.parametrize("command", ["check-config", "serve"])
async def test_every_problem_is_reported_in_one_pass_files_included(
    tmp_path: Path, command: str
) -> None:
    """Files named by tls_cert, tls_key and users_file are checked along with
    every other key, not only once the rest is right; serve reports the same."""
    config = tmp_path / "relay.toml"
    cert, key, users = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "users"
    config.write_text(
        f'[smtp]\nlisen = ["127.0.0.1:0"]\nmax_recipients = 0\ntls_cert = "{cert}"\n'
        f'tls_key = "{key}"\n[auth]\nusers_file = "{users}"\n[spol]\n'
    )
    env = clean_env(tmp_path, SES_RELAY_SES_REGON="eu-west-1")
    code, out, err = await run_cli(command, "-c", str(config), env=env)
    assert (code, out) == (78, "")
    lines = err.splitlines()
    assert lines[:6] == [
        "ses-relay: warning: environment SES_RELAY_SES_REGON: names no setting "
        "(did you mean SES_RELAY_SES_REGION?)",
        "ses-relay: configuration is invalid (5 problems):",
        f"  {config}: [spol]: unknown section (did you mean spool?)",
        f"  {config}: [smtp] lisen: unknown key (did you mean listen?)",
        f"  {config}: [smtp] max_recipients: must be greater than 0",
        f"  {config}: [smtp] tls_cert, tls_key: cannot load the certificate and key "
        f"({cert}, {key}): [Errno 2] No such file or directory",
    ]
    assert lines[6:] == [f"  {users}: cannot read users file: No such file or directory"]


async def test_a_users_file_without_tls_settings_is_refused(tmp_path: Path) -> None:
    """Told only when tls_cert and tls_key are unset: when they are set but do
    not load, that problem is reported alone."""
    users = tmp_path / "users"
    users.write_text("")
    config = tmp_path / "relay.toml"
    config.write_text(f'[auth]\nusers_file = "{users}"\n')
    code, out, err = await run_cli("check-config", "-c", str(config), env=clean_env(tmp_path))
    assert (code, out) == (78, "")
    assert err.splitlines() == [
        "ses-relay: configuration is invalid (1 problem):",
        f"  {config}: [auth] users_file: AUTH is offered only under TLS: "
        "set [smtp] tls_cert and tls_key",
    ]


async def test_an_unknown_variable_is_a_warning_and_check_config_still_passes(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    env = ses_env(tmp_path, fake_ses) | {
        "SES_RELAY_SMTP_LISTN": "0.0.0.0:25",
        "SES_RELAY_SERVICE_HOST": "10.0.0.7",  # Kubernetes' link to a Service "ses-relay"
    }
    code, out, err = await run_cli("check-config", "-c", str(EXAMPLE), env=env)
    assert (code, out.splitlines()[0]) == (0, f"ses-relay: configuration OK ({EXAMPLE})")
    assert err.splitlines()[:2] == [
        "ses-relay: warning: environment SES_RELAY_SERVICE_HOST: names no setting",
        "ses-relay: warning: environment SES_RELAY_SMTP_LISTN: names no setting "
        "(did you mean SES_RELAY_SMTP_LISTEN?)",
    ]


async def test_check_config_requires_trusted_networks_for_proxy_protocol(
    tmp_path: Path,
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("[smtp]\nproxy_protocol = true\n")
    code, out, err = await run_cli("check-config", "-c", str(config), env=clean_env(tmp_path))
    assert (code, out) == (78, "")
    assert err.splitlines() == [
        "ses-relay: configuration is invalid (1 problem):",
        f"  {config}: [smtp] proxy_trusted_networks: required when proxy_protocol is true "
        "(the addresses of the load balancers that send the PROXY header)",
    ]


async def test_check_config_checks_the_write_and_auth_queue_bounds(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("[smtp]\nwrite_timeout = 0\n[auth]\nmax_queued_checks = -1\n")
    code, out, err = await run_cli("check-config", "-c", str(config), env=clean_env(tmp_path))
    assert (code, out) == (78, "")
    assert err.splitlines() == [
        "ses-relay: configuration is invalid (2 problems):",
        f"  {config}: [smtp] write_timeout: must be greater than 0",
        f"  {config}: [auth] max_queued_checks: must be 0 or greater",
    ]


@pytest.mark.parametrize("command", ["check-config", "serve", "quota"])
async def test_an_unreadable_ca_bundle_is_a_configuration_error(
    tmp_path: Path, command: str
) -> None:
    (tmp_path / "not-a-ca.pem").write_text("not a certificate\n")
    for bundle in (tmp_path / "missing.pem", tmp_path / "not-a-ca.pem"):
        config = tmp_path / "relay.toml"
        config.write_text(
            f'[smtp]\nlisten = ["127.0.0.1:0"]\n[ses]\nca_bundle = "{bundle}"\n'
            f'[spool]\npath = "{tmp_path / "spool"}"\n'
        )
        code, out, err = await run_cli(command, "-c", str(config), env=clean_env(tmp_path))
        assert (code, out) == (78, ""), err
        [head, problem] = err.splitlines()
        assert head == "ses-relay: configuration is invalid (1 problem):"
        assert problem.startswith(f"  {config}: [ses] ca_bundle: cannot load {bundle}: ")


async def test_check_config_accepts_the_example(tmp_path: Path) -> None:
    code, out, _ = await run_cli("check-config", "-c", str(EXAMPLE), env=clean_env(tmp_path))
    assert code == 0
    assert out == f"ses-relay: configuration OK ({EXAMPLE})\n"


def test_the_command_line_loads_the_daemon_only_for_the_commands_that_run_it() -> None:
    """`ses-relay queue` runs from scripts and cron: it starts without aiohttp."""
    heavy = ["aiohttp", "relay.app", "relay.delivery", "relay.ses.client"]
    probe = f"import sys, relay.__main__; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=30
    )
    assert done.stdout == "[]\n"


async def test_serve_names_the_key_of_a_spool_it_cannot_open(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file")
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[smtp]\nlisten = ["127.0.0.1:0"]\n[spool]\npath = "{tmp_path / "not-a-dir" / "spool"}"\n'
    )
    code, out, err = await run_cli("serve", "-c", str(config), env=clean_env(tmp_path))
    assert (code, out) == (1, "")
    assert err.startswith("ses-relay: serve: spool ")
    assert err.endswith(f"(spool.path in {config})\n")
    assert "Traceback" not in err


async def test_serve_names_metrics_listen_when_its_port_is_taken(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "relay.toml"
        config.write_text(
            f'[smtp]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
            f'[spool]\npath = "{tmp_path / "spool"}"\n[ses]\nmax_send_rate = 10\n'
        )
        code, out, err = await run_cli("serve", "-c", str(config), env=ses_env(tmp_path, fake_ses))
    assert (code, out) == (1, "")
    assert f"ses-relay: serve: cannot listen on 127.0.0.1:{port} (metrics.listen): " in err
    assert "Traceback" not in err


async def test_quota_under_v2_comes_from_get_account(tmp_path: Path, fake_ses: FakeSes) -> None:
    fake_ses.sending_enabled = False
    env = ses_env(tmp_path, fake_ses) | {"SES_RELAY_SES_API": "v2"}
    code, out, err = await run_cli("quota", env=env)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "Max24HourSend:   50000",
        "MaxSendRate:     14 per second",
        "SentLast24Hours: 127",
        "SendingEnabled:  false (SES has paused sending)",
    ]
    assert [r.action for r in fake_ses.requests] == ["GetAccount"]


async def test_quota_under_auto_comes_from_get_send_quota(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    env = ses_env(tmp_path, fake_ses) | {"SES_RELAY_SES_API": "auto"}
    code, _, err = await run_cli("quota", env=env)
    assert (code, err) == (0, "")
    assert [r.action for r in fake_ses.requests] == ["GetSendQuota"]


async def test_check_config_names_a_wrong_ses_api(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[ses]\napi = "v3"\n')
    code, out, err = await run_cli("check-config", "-c", str(config), env=clean_env(tmp_path))
    assert (code, out) == (78, "")
    assert f"{config}: [ses] api: must be one of 'v1', 'v2', 'auto'" in err


async def test_check_config_under_v2_checks_the_bounce_sender_with_v1s_call(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    fake_ses.verified = {"example.com"}
    config = tmp_path / "relay.toml"
    config.write_text('[ses]\napi = "v2"\n[delivery]\nbounce_sender = "bounces@example.com"\n')
    code, out, err = await run_cli(
        "check-config", "-c", str(config), env=ses_env(tmp_path, fake_ses)
    )
    assert (code, err) == (0, "")
    assert "SES identity example.com is verified" in out
    assert [r.action for r in fake_ses.requests] == ["GetIdentityVerificationAttributes"]
