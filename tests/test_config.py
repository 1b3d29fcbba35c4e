"""Configuration loading: defaults, the file, the environment, every problem at once."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from relay.config import SECTIONS, load_config, split_host_port, unknown_variables
from relay.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def test_defaults_follow_the_contract() -> None:
    config = load_config(None, {})
    assert config.smtp.listen == ("127.0.0.1:2525",)
    assert config.smtp.max_message_size == 7_864_320
    assert config.metrics.listen == "127.0.0.1:9465"
    assert config.ses.region == "us-east-1"
    assert config.ses.endpoint == ""
    assert config.spool.path == "./spool"
    assert config.source == "defaults"


def test_example_file_documents_every_key_with_its_default() -> None:
    # Uncomment the keys that take their default from the environment.
    text = re.sub(r"^#(\w+ = )", r"\1", EXAMPLE.read_text(), flags=re.MULTILINE)
    document = tomllib.loads(text)
    defaults = load_config(None, {})
    assert set(document) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        names = {f.name for f in dataclasses.fields(cls)} - {"users"}
        assert set(document[section]) == names, section
        for name in names:
            expected = getattr(getattr(defaults, section), name)
            value = document[section][name]
            assert (tuple(value) if isinstance(value, list) else value) == expected, name


def test_example_file_loads_as_is() -> None:
    assert load_config(EXAMPLE, {}).source == str(EXAMPLE)


def test_aws_environment_supplies_region_endpoint_and_ca() -> None:
    env = {
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "ap-south-1",
        "AWS_ENDPOINT_URL": "https://generic.example",
        "AWS_ENDPOINT_URL_SES": "https://ses.example",
        "AWS_CA_BUNDLE": "/etc/ca.pem",
    }
    ses = load_config(None, env).ses
    assert (ses.region, ses.endpoint, ses.ca_bundle) == (
        "eu-west-1",
        "https://ses.example",
        "/etc/ca.pem",
    )
    assert load_config(None, {"AWS_DEFAULT_REGION": "ap-south-1"}).ses.region == "ap-south-1"
    assert load_config(None, {"AWS_ENDPOINT_URL": "https://g.example"}).ses.endpoint == (
        "https://g.example"
    )


def test_file_beats_aws_environment_and_relay_environment_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[ses]\nregion = "us-west-2"\nendpoint = "https://file.example"\n')
    env = {"AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL_SES": "https://env.example"}
    ses = load_config(path, env).ses
    assert (ses.region, ses.endpoint) == ("us-west-2", "https://file.example")
    env["SES_RELAY_SES_REGION"] = "eu-central-1"
    assert load_config(path, env).ses.region == "eu-central-1"


def test_environment_overrides_are_typed() -> None:
    env = {
        "SES_RELAY_SMTP_LISTEN": "0.0.0.0:25, [::]:25",
        "SES_RELAY_SMTP_MAX_RECIPIENTS": "50",
        "SES_RELAY_SMTP_PROXY_PROTOCOL": "true",
        "SES_RELAY_SMTP_PROXY_TRUSTED_NETWORKS": "10.0.0.5/32, 10.0.1.0/24",
        "SES_RELAY_SES_REQUEST_TIMEOUT": "2",
        "SES_RELAY_SMTP_ALLOWED_NETWORKS": '["10.0.0.0/8"]',
    }
    config = load_config(None, env)
    assert config.smtp.listen == ("0.0.0.0:25", "[::]:25")
    assert config.smtp.max_recipients == 50
    assert config.smtp.proxy_protocol is True
    assert config.smtp.proxy_trusted_networks == ("10.0.0.5/32", "10.0.1.0/24")
    assert config.ses.request_timeout == 2.0
    assert config.smtp.allowed_networks == ("10.0.0.0/8",)


def test_state_directory_is_the_default_spool() -> None:
    assert load_config(None, {"STATE_DIRECTORY": "/var/lib/ses-relay:/x"}).spool.path == (
        "/var/lib/ses-relay"
    )


def test_every_problem_is_reported_with_key_and_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[smtp]\n"
        'listen = ["1.2.3.4"]\n'
        'max_recipients = "many"\n'
        "lisen = 1\n"
        "[ses]\n"
        'endpoint = "ftp://x"\n'
        "max_attempts = true\n"
        "[bogus]\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"SES_RELAY_SES_REQUEST_TIMEOUT": "-1"})
    problems = caught.value.problems
    assert f"{path}: [bogus]: unknown section" in problems
    assert f"{path}: [smtp] lisen: unknown key (did you mean listen?)" in problems
    assert any(p.startswith(f"{path}: [smtp] listen: '1.2.3.4'") for p in problems)
    assert f"{path}: [smtp] max_recipients: expected an integer, got a string ('many')" in problems
    assert any(p.startswith(f"{path}: [ses] endpoint: must start with https://") for p in problems)
    assert f"{path}: [ses] max_attempts: expected an integer, got a boolean (True)" in problems
    assert "environment SES_RELAY_SES_REQUEST_TIMEOUT: must be greater than 0" in problems
    assert len(problems) == 7


def test_retry_max_below_retry_min_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "[delivery]\nretry_min = 600\nretry_max = 60\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.problems == (
        f"{path}: [delivery] retry_max: must be at least retry_min (600)",
    )


@pytest.mark.parametrize("value", ["mailer-daemon", "@example.com", "bounces @example.com"])
def test_a_bounce_sender_that_is_not_an_address_is_refused(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f'[delivery]\nbounce_sender = "{value}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.problems == (
        f"{path}: [delivery] bounce_sender: must be an address like "
        "MAILER-DAEMON@example.com (ASCII, no spaces), or empty",
    )


def test_proxy_protocol_needs_trusted_networks(tmp_path: Path) -> None:
    path = write(tmp_path, "[smtp]\nproxy_protocol = true\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.problems == (
        f"{path}: [smtp] proxy_trusted_networks: required when proxy_protocol is true "
        "(the addresses of the load balancers that send the PROXY header)",
    )
    path = write(tmp_path, '[smtp]\nproxy_protocol = true\nproxy_trusted_networks = ["lb"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.problems[0].startswith(f"{path}: [smtp] proxy_trusted_networks: 'lb': ")


def test_unreadable_and_malformed_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: cannot read")):
        load_config(missing, {})
    broken = write(tmp_path, "[smtp\n")
    with pytest.raises(ConfigError, match=re.escape(f"{broken}: not valid TOML")):
        load_config(broken, {})


def test_section_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ses: must be a table"):
        load_config(write(tmp_path, 'ses = "x"\n'), {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("[::1]:25", ("::1", 25)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text", ["::1:25", "host", ":25", "h:-1", "h:65536", "h:x", "[::1]"])
def test_split_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        split_host_port(text)


def test_user_policies_from_nested_tables(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[auth.users.alice]\n"
        'allowed_senders = ["alice@example.com", "@example.org"]\n'
        "identity_headers = true\n"
        "[auth.users.bob]\n",
    )
    auth = load_config(path, {}).auth
    alice = auth.user("alice")
    assert alice.allowed_senders == ("alice@example.com", "@example.org")
    assert alice.identity_headers is True
    assert auth.user("bob").allowed_senders == ()
    assert auth.user("nobody").identity_headers is False


def test_user_policy_problems_name_the_table(tmp_path: Path) -> None:
    path = write(tmp_path, "[auth.users.bob]\nidentity_headers = 1\ntypo = 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.problems == (
        f"{path}: [auth.users.bob] typo: unknown key",
        f"{path}: [auth.users.bob] identity_headers: expected true or false, got an integer (1)",
    )


def test_header_size_limit_defaults_to_postfix_and_must_be_positive(tmp_path: Path) -> None:
    assert load_config(None, {}).smtp.header_size_limit == 102_400
    path = write(tmp_path, "[smtp]\nheader_size_limit = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.problems == (f"{path}: [smtp] header_size_limit: must be greater than 0",)


def test_variables_that_name_no_key_are_told_with_the_closest_key() -> None:
    env = {
        "SES_RELAY_SMTP_MAX_MESAGE_SIZE": "1",
        "SES_RELAY_AUTH_USERS": "x",  # [auth.users.NAME] tables have no variable
        "SES_RELAY_SES_REGION": "eu-west-1",
        "SES_RELAY_PORT_2525_TCP": "tcp://10.0.0.7:2525",
        "OTHER_SMTP_LISTEN": "x",
    }
    assert unknown_variables(env) == [
        "environment SES_RELAY_AUTH_USERS: names no setting "
        "(did you mean SES_RELAY_AUTH_USERS_FILE?)",
        "environment SES_RELAY_PORT_2525_TCP: names no setting",
        "environment SES_RELAY_SMTP_MAX_MESAGE_SIZE: names no setting "
        "(did you mean SES_RELAY_SMTP_MAX_MESSAGE_SIZE?)",
    ]
    assert load_config(None, env).smtp.max_message_size == 7_864_320  # ignored, as told


@pytest.mark.parametrize(
    ("api", "size"), [("v1", 7_864_320), ("v2", 30_000_000), ("auto", 30_000_000)]
)
def test_the_message_size_limit_follows_ses_api_unless_set(
    tmp_path: Path, api: str, size: int
) -> None:
    path = write(tmp_path, f'[ses]\napi = "{api}"\n')
    assert load_config(path, {}).smtp.max_message_size == size
    env = {"SES_RELAY_SMTP_MAX_MESSAGE_SIZE": "1234"}
    assert load_config(path, env).smtp.max_message_size == 1234
    path = write(tmp_path, f'[smtp]\nmax_message_size = 999\n[ses]\napi = "{api}"\n')
    assert load_config(path, {}).smtp.max_message_size == 999
    assert load_config(None, {"SES_RELAY_SES_API": api}).smtp.max_message_size == size


def test_a_wrong_ses_api_names_the_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[ses]\napi = "v3"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert list(caught.value.problems) == [f"{path}: [ses] api: must be one of 'v1', 'v2', 'auto'"]
