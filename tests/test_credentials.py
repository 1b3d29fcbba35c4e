"""The credential chain: pure parsing, each source against a local fake of its
endpoint (``tests/fake_aws_endpoints.py``), precedence, caching and refresh.

Every chain test passes its own ``env`` with ``HOME`` in ``tmp_path`` and IMDS
disabled or pointed at a fake, so nothing here looks at the real machine.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from relay.app import Relay
from relay.errors import CredentialsError
from relay.ses.credentials import (
    RefreshingProvider,
    StaticProvider,
    container_endpoint,
    credentials_from_env,
    credentials_from_profile,
    default_chain,
    imds_endpoint,
    parse_container_credentials,
    parse_expiration,
    parse_imds_credentials,
    parse_profiles,
    parse_sts_credentials,
    select_profile,
    sts_endpoint,
)
from relay.ses.sigv4 import Credentials
from tests.fake_aws_endpoints import FakeClock, FakeContainer, FakeImds, FakeSts, issue
from tests.fakeses import FakeSes, KnownKey
from tests.relayd import relay_config

REGION = "eu-west-1"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzEXAMPLE-session-token"

# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def sts(clock: FakeClock) -> AsyncIterator[FakeSts]:
    async with FakeSts(clock, region=REGION) as fake:
        yield fake


@pytest.fixture
async def container(clock: FakeClock) -> AsyncIterator[FakeContainer]:
    async with FakeContainer(clock) as fake:
        yield fake


@pytest.fixture
async def imds(clock: FakeClock) -> AsyncIterator[FakeImds]:
    async with FakeImds(clock) as fake:
        yield fake


async def no_sleep(_delay: float) -> None:
    return None


def env_for(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: HOME in tmp_path, IMDS off unless a test turns it on."""
    return {"HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true", **extra}


def write_aws(home: Path, *, credentials: str | None = None, config: str | None = None) -> None:
    aws = home / ".aws"
    aws.mkdir(exist_ok=True)
    if credentials is not None:
        (aws / "credentials").write_text(credentials)
    if config is not None:
        (aws / "config").write_text(config)


def chain(
    env: Mapping[str, str], session: aiohttp.ClientSession, clock: FakeClock
) -> RefreshingProvider:
    return default_chain(env, session=session, region=REGION, clock=clock, sleep=no_sleep)


def container_env(container: FakeContainer, home: Path, **extra: str) -> dict[str, str]:
    return env_for(home, AWS_CONTAINER_CREDENTIALS_FULL_URI=f"{container.url}/v2/creds", **extra)


def imds_env(imds: FakeImds, home: Path, **extra: str) -> dict[str, str]:
    env = env_for(home, AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url)
    del env["AWS_EC2_METADATA_DISABLED"]
    return {**env, **extra}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- pure parsing


def test_env_credentials_and_token_precedence() -> None:
    assert credentials_from_env({}) is None
    plain = credentials_from_env({"AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": SECRET})
    assert plain == Credentials("AKIAENV", SECRET, None, None)
    both = credentials_from_env(
        {
            "AWS_ACCESS_KEY_ID": "ASIAENV",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_SESSION_TOKEN": "session",
            "AWS_SECURITY_TOKEN": "security",  # botocore looks at this one first
            "AWS_CREDENTIAL_EXPIRATION": "2025-01-15T13:00:00Z",
        }
    )
    assert both is not None
    assert both.session_token == "security"
    assert both.expiration == datetime(2025, 1, 15, 13, 0, tzinfo=UTC)
    session_only = credentials_from_env(
        {"AWS_ACCESS_KEY_ID": "ASIAENV", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": "t"}
    )
    assert session_only is not None
    assert session_only.session_token == "t"


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
        ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
    ],
)
def test_env_half_pair_names_the_missing_variable(present: str, missing: str) -> None:
    with pytest.raises(CredentialsError) as caught:
        credentials_from_env({present: SECRET})
    message = str(caught.value)
    assert f"{missing} is not" in message
    assert SECRET not in message


def test_parse_profiles_config_and_credentials_sections() -> None:
    config = parse_profiles(
        "[default]\nregion = eu-west-1\n[profile work]\nrole_arn = arn:x\n"
        "[work2]\nignored = 1\n[sso-session corp]\nsso_region = eu-west-1\n",
        config_file=True,
    )
    assert config == {"default": {"region": "eu-west-1"}, "work": {"role_arn": "arn:x"}}
    creds = parse_profiles(
        "[default]\nAWS_Access_Key_ID = AKIA1\naws_secret_access_key = s\n[profile x]\na = b\n",
        config_file=False,
    )
    assert creds == {
        "default": {"aws_access_key_id": "AKIA1", "aws_secret_access_key": "s"},
        "profile x": {"a": "b"},
    }


def test_parse_profiles_errors_never_quote_the_file() -> None:
    with pytest.raises(CredentialsError) as caught:
        parse_profiles(
            f"[default]\naws_access_key_id = AKIA1\n{SECRET}\n",
            config_file=False,
            where="/h/.aws/credentials",
        )
    assert "/h/.aws/credentials" in str(caught.value)
    assert SECRET not in str(caught.value)
    with pytest.raises(CredentialsError, match="line 1"):
        parse_profiles(f"aws_secret_access_key = {SECRET}\n", config_file=False)


def test_profile_static_keys() -> None:
    assert credentials_from_profile({"region": "x"}, "p") is None
    found = credentials_from_profile(
        {"aws_access_key_id": "AKIA", "aws_secret_access_key": SECRET, "aws_session_token": TOKEN},
        "p",
    )
    assert found == Credentials("AKIA", SECRET, TOKEN)
    with pytest.raises(CredentialsError, match="aws_secret_access_key is not"):
        credentials_from_profile({"aws_access_key_id": "AKIA"}, "profile 'p' in f")


def test_select_profile_order() -> None:
    assert select_profile({}) == ("default", None)
    assert select_profile({"AWS_DEFAULT_PROFILE": "b"}) == ("b", "AWS_DEFAULT_PROFILE")
    assert select_profile({"AWS_PROFILE": "a", "AWS_DEFAULT_PROFILE": "b"}) == ("a", "AWS_PROFILE")


def sts_success(action: str, *, expiration: str = "2025-01-15T13:00:00.123Z") -> bytes:
    return (
        f'<{action}Response xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><{action}Result>'
        f"<Credentials><AccessKeyId>ASIASTS</AccessKeyId><SecretAccessKey>{SECRET}"
        f"</SecretAccessKey><SessionToken>{TOKEN}</SessionToken>"
        f"<Expiration>{expiration}</Expiration></Credentials></{action}Result></{action}Response>"
    ).encode()


def test_parse_sts_success_and_errors() -> None:
    creds = parse_sts_credentials(sts_success("AssumeRole"), "AssumeRole")
    assert creds.access_key_id == "ASIASTS"
    assert creds.session_token == TOKEN
    assert creds.expiration == datetime(2025, 1, 15, 13, 0, 0, 123000, tzinfo=UTC)
    error = (
        b'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
        b"<Type>Sender</Type><Code>AccessDenied</Code><Message>not authorized</Message>"
        b"</Error><RequestId>x</RequestId></ErrorResponse>"
    )
    with pytest.raises(CredentialsError, match=r"HTTP 403\): AccessDenied: not authorized"):
        parse_sts_credentials(error, "AssumeRole", status=403)
    with pytest.raises(CredentialsError, match="unexpected answer"):
        parse_sts_credentials(sts_success("AssumeRole"), "AssumeRoleWithWebIdentity")
    with pytest.raises(CredentialsError, match="not usable XML"):
        parse_sts_credentials(b"<html>oops", "AssumeRole")
    missing = (
        sts_success("AssumeRole")
        .replace(b"<SessionToken>", b"<Other>")
        .replace(b"</SessionToken>", b"</Other>")
    )
    with pytest.raises(CredentialsError, match="lacks SessionToken") as caught:
        parse_sts_credentials(missing, "AssumeRole")
    assert SECRET not in str(caught.value)


def test_parse_sts_refuses_dtds() -> None:
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><AssumeRoleResponse>&lol2;</AssumeRoleResponse>'
    )
    with pytest.raises(CredentialsError, match="not usable XML"):
        parse_sts_credentials(laughs, "AssumeRole")
    xxe = (
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<AssumeRoleResponse>&x;</AssumeRoleResponse>"
    )
    with pytest.raises(CredentialsError, match="not usable XML"):
        parse_sts_credentials(xxe, "AssumeRole")


def test_parse_container_and_imds_json() -> None:
    body = (
        b'{"AccessKeyId":"ASIAC","SecretAccessKey":"%s","Token":"%s",'
        b'"Expiration":"2025-01-15T13:00:00Z"}' % (SECRET.encode(), TOKEN.encode())
    )
    creds = parse_container_credentials(body)
    assert creds == Credentials("ASIAC", SECRET, TOKEN, datetime(2025, 1, 15, 13, tzinfo=UTC))
    assert parse_imds_credentials(body) == creds
    with pytest.raises(CredentialsError, match="lacks Token, Expiration") as caught:
        parse_container_credentials(b'{"AccessKeyId":"A","SecretAccessKey":"%s"}' % SECRET.encode())
    assert SECRET not in str(caught.value)
    with pytest.raises(CredentialsError, match="not valid JSON"):
        parse_container_credentials(b"<html>")
    with pytest.raises(CredentialsError, match="not a JSON object"):
        parse_imds_credentials(b"[]")
    with pytest.raises(CredentialsError, match="Code 'AssumeRoleUnauthorizedAccess'"):
        parse_imds_credentials(b'{"Code":"AssumeRoleUnauthorizedAccess","Message":"m"}')
    with pytest.raises(CredentialsError, match="unreadable expiration"):
        parse_expiration("tomorrow")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/c?x=1"}, "http://169.254.170.2/v2/c?x=1"),
        ({"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:9/c"}, "http://127.0.0.1:9/c"),
        ({"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://[::1]/c"}, "http://[::1]/c"),
        ({"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://localhost/c"}, "http://localhost/c"),
        (
            {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials"},
            "http://169.254.170.23/v1/credentials",
        ),
        (
            {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://[fd00:ec2::23]/v1/credentials"},
            "http://[fd00:ec2::23]/v1/credentials",
        ),
        (
            {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "https://creds.example.com/c"},
            "https://creds.example.com/c",
        ),
        # the relative URI wins, as in botocore
        (
            {
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/r",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1/f",
            },
            "http://169.254.170.2/r",
        ),
    ],
)
def test_container_endpoint(env: dict[str, str], expected: str | None) -> None:
    url = container_endpoint(env)
    assert (None if url is None else str(url)) == expected


@pytest.mark.parametrize(
    "full_uri",
    ["http://creds.example.com/c", "http://169.254.169.254/c", "ftp://127.0.0.1/c", "not a url"],
)
def test_container_endpoint_refuses_other_hosts(full_uri: str) -> None:
    with pytest.raises(CredentialsError, match="AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        container_endpoint({"AWS_CONTAINER_CREDENTIALS_FULL_URI": full_uri})


def test_sts_endpoint() -> None:
    assert str(sts_endpoint({}, "eu-west-1")) == "https://sts.eu-west-1.amazonaws.com/"
    assert str(sts_endpoint({}, "cn-north-1")) == "https://sts.cn-north-1.amazonaws.com.cn/"
    assert str(sts_endpoint({}, "")) == "https://sts.amazonaws.com/"
    both = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ENDPOINT_URL_STS": "http://127.0.0.1:2"}
    assert str(sts_endpoint(both, "eu-west-1")) == "http://127.0.0.1:2"
    assert (
        str(sts_endpoint({"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}, "x")) == "http://127.0.0.1:1"
    )
    ignored = {**both, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}
    assert str(sts_endpoint(ignored, "eu-west-1")) == "https://sts.eu-west-1.amazonaws.com/"
    with pytest.raises(CredentialsError, match="AWS_ENDPOINT_URL_STS"):
        sts_endpoint({"AWS_ENDPOINT_URL_STS": "sts.internal"}, "eu-west-1")


def test_imds_endpoint() -> None:
    assert str(imds_endpoint({})) == "http://169.254.169.254/"
    assert imds_endpoint({"AWS_EC2_METADATA_DISABLED": "TRUE"}) is None
    assert str(imds_endpoint({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"})) == (
        "http://[fd00:ec2::254]/"
    )
    for custom in ("http://127.0.0.1:8080", "http://127.0.0.1:8080/"):
        base = imds_endpoint({"AWS_EC2_METADATA_SERVICE_ENDPOINT": custom})
        assert base is not None
        assert str(base.join(URL("latest/api/token"))) == "http://127.0.0.1:8080/latest/api/token"
    prefixed = imds_endpoint({"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1/imds"})
    assert prefixed is not None
    assert str(prefixed.join(URL("latest/api/token"))) == "http://127.0.0.1/imds/latest/api/token"


# --------------------------------------------------------------------------- precedence


async def test_environment_beats_profile_and_container(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, container: FakeContainer
) -> None:
    write_aws(
        tmp_path,
        credentials=f"[default]\naws_access_key_id=AKIAFILE\naws_secret_access_key={SECRET}\n",
    )
    env = container_env(
        container,
        tmp_path,
        AWS_ACCESS_KEY_ID="AKIAENV",
        AWS_SECRET_ACCESS_KEY="env-secret",
        AWS_PROFILE="default",
    )
    creds = await chain(env, session, clock).get()
    assert creds == Credentials("AKIAENV", "env-secret")
    assert container.requests == []


async def test_profile_beats_container_beats_imds(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    container: FakeContainer,
    imds: FakeImds,
) -> None:
    env = imds_env(imds, tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI=f"{container.url}/v2/creds")
    write_aws(
        tmp_path, config=f"[default]\naws_access_key_id=AKIACFG\naws_secret_access_key={SECRET}\n"
    )
    assert (await chain(env, session, clock).get()).access_key_id == "AKIACFG"
    assert container.requests == []

    (tmp_path / ".aws" / "config").unlink()
    creds = await chain(env, session, clock).get()
    assert creds.access_key_id == container.issued[0][0]
    assert imds.token_requests == 0

    del env["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
    creds = await chain(env, session, clock).get()
    assert creds.access_key_id == imds.issued[0][0]


async def test_profile_selection_and_file_precedence(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    write_aws(
        tmp_path,
        credentials=(
            f"[default]\naws_access_key_id=AKIADEFAULT\naws_secret_access_key={SECRET}\n"
            f"[work]\naws_access_key_id=AKIAWORK\naws_secret_access_key={SECRET}\n"
            f"aws_session_token={TOKEN}\n"
        ),
        config=(
            f"[profile work]\naws_access_key_id=AKIAWORKCFG\naws_secret_access_key={SECRET}\n"
            f"[profile cfg]\naws_access_key_id=AKIACFG\naws_secret_access_key={SECRET}\n"
        ),
    )

    async def key_for(**extra: str) -> str:
        return (await chain(env_for(tmp_path, **extra), session, clock).get()).access_key_id

    assert await key_for() == "AKIADEFAULT"
    assert await key_for(AWS_PROFILE="work") == "AKIAWORK"  # credentials file first
    assert await key_for(AWS_PROFILE="cfg") == "AKIACFG"
    assert await key_for(AWS_DEFAULT_PROFILE="cfg") == "AKIACFG"
    assert await key_for(AWS_PROFILE="work", AWS_DEFAULT_PROFILE="cfg") == "AKIAWORK"
    with pytest.raises(CredentialsError, match=r"profile 'nope' \(from AWS_PROFILE\)"):
        await key_for(AWS_PROFILE="nope")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(
        f"[default]\naws_access_key_id=AKIAOTHER\naws_secret_access_key={SECRET}\n"
    )
    assert await key_for(AWS_SHARED_CREDENTIALS_FILE=str(elsewhere)) == "AKIAOTHER"


async def test_rotated_profile_keys_are_read_again_after_invalidate(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    write_aws(
        tmp_path,
        credentials=f"[default]\naws_access_key_id=AKIAOLD\naws_secret_access_key={SECRET}\n",
    )
    provider = chain(env_for(tmp_path), session, clock)
    assert (await provider.get()).access_key_id == "AKIAOLD"
    write_aws(
        tmp_path,
        credentials=f"[default]\naws_access_key_id=AKIANEW\naws_secret_access_key={SECRET}\n",
    )
    assert (await provider.get()).access_key_id == "AKIAOLD"  # cached, no I/O
    provider.invalidate()
    assert (await provider.get()).access_key_id == "AKIANEW"


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("credential_process = /usr/bin/creds", "credential_process"),
        ("sso_account_id = 123456789012\nsso_role_name = r", "sso_"),
        ("login_session = arn:aws:iam::1:user/x", "login_session"),
        (
            "role_arn = arn:aws:iam::1:role/r\nsource_profile = b\nmfa_serial = arn:mfa",
            "mfa_serial",
        ),
    ],
)
async def test_unsupported_profile_features_are_refused(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, setting: str, key: str
) -> None:
    write_aws(
        tmp_path,
        config=f"[default]\n{setting}\n[profile b]\naws_access_key_id=A\naws_secret_access_key=s\n",
    )
    with pytest.raises(CredentialsError, match=f"uses {key}.*, which ses-relay does not support"):
        await chain(env_for(tmp_path), session, clock).get()


# --------------------------------------------------------------------------- assume role


async def test_assume_role_via_source_profile_is_signed(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, sts: FakeSts
) -> None:
    sts.keys["AKIABASE"] = KnownKey(SECRET)
    write_aws(
        tmp_path,
        credentials=f"[base]\naws_access_key_id=AKIABASE\naws_secret_access_key={SECRET}\n",
        config=(
            "[profile app]\nrole_arn = arn:aws:iam::123456789012:role/relay\n"
            "source_profile = base\nexternal_id = ext-42\nduration_seconds = 900\n"
            "role_session_name = relay-host-1\n"
        ),
    )
    env = env_for(tmp_path, AWS_PROFILE="app", AWS_ENDPOINT_URL_STS=sts.url)
    creds = await chain(env, session, clock).get()
    key, secret, token = sts.issued[0]
    assert creds == Credentials(key, secret, token, clock() + timedelta(hours=1))
    assert sts.signed_by == ["AKIABASE"]
    assert sts.params == [
        {
            "Action": "AssumeRole",
            "Version": "2011-06-15",
            "RoleArn": "arn:aws:iam::123456789012:role/relay",
            "RoleSessionName": "relay-host-1",
            "DurationSeconds": "900",
            "ExternalId": "ext-42",
        }
    ]


async def test_chained_source_profiles(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, sts: FakeSts
) -> None:
    sts.keys["AKIABASE"] = KnownKey(SECRET)
    write_aws(
        tmp_path,
        credentials=f"[base]\naws_access_key_id=AKIABASE\naws_secret_access_key={SECRET}\n",
        config=(
            "[profile app]\nrole_arn = arn:aws:iam::1:role/app\nsource_profile = mid\n"
            "[profile mid]\nrole_arn = arn:aws:iam::1:role/mid\nsource_profile = base\n"
        ),
    )
    env = env_for(tmp_path, AWS_PROFILE="app", AWS_ENDPOINT_URL=sts.url)
    creds = await chain(env, session, clock).get()
    mid_key = sts.issued[0][0]
    assert creds.access_key_id == sts.issued[1][0]
    # the second call was signed with mid's temporary credentials, token included
    assert sts.signed_by == ["AKIABASE", mid_key]
    assert [p["RoleArn"] for p in sts.params] == [
        "arn:aws:iam::1:role/mid",
        "arn:aws:iam::1:role/app",
    ]
    assert all(p["RoleSessionName"].startswith("ses-relay-") for p in sts.params)


async def test_profile_may_source_its_own_static_keys(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, sts: FakeSts
) -> None:
    sts.keys["AKIASELF"] = KnownKey(SECRET)
    write_aws(
        tmp_path,
        credentials=f"[self]\naws_access_key_id=AKIASELF\naws_secret_access_key={SECRET}\n",
        config="[profile self]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = self\n",
    )
    env = env_for(tmp_path, AWS_PROFILE="self", AWS_ENDPOINT_URL_STS=sts.url)
    assert (await chain(env, session, clock).get()).access_key_id == sts.issued[0][0]
    assert sts.signed_by == ["AKIASELF"]


async def test_source_profile_loop_is_refused(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, sts: FakeSts
) -> None:
    write_aws(
        tmp_path,
        config=(
            "[profile a]\nrole_arn = arn:aws:iam::1:role/a\nsource_profile = b\n"
            "[profile b]\nrole_arn = arn:aws:iam::1:role/b\nsource_profile = a\n"
        ),
    )
    env = env_for(tmp_path, AWS_PROFILE="a", AWS_ENDPOINT_URL_STS=sts.url)
    with pytest.raises(CredentialsError, match="source_profile loop: a -> b -> a"):
        await chain(env, session, clock).get()
    assert sts.requests == []


async def test_credential_source_ecs_container_signs_assume_role(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    sts: FakeSts,
    container: FakeContainer,
) -> None:
    key, secret, token = issue("ctrsrc")
    sts.keys[key] = KnownKey(secret, token)
    container.answer = lambda: web.json_response(
        {
            "AccessKeyId": key,
            "SecretAccessKey": secret,
            "Token": token,
            "Expiration": (clock() + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    write_aws(
        tmp_path,
        config="[default]\nrole_arn = arn:aws:iam::1:role/r\ncredential_source = EcsContainer\n",
    )
    env = container_env(container, tmp_path, AWS_ENDPOINT_URL_STS=sts.url)
    creds = await chain(env, session, clock).get()
    assert creds.access_key_id == sts.issued[0][0]
    assert sts.signed_by == [key]


async def test_assume_role_refused_by_sts_raises(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    sts: FakeSts,
    container: FakeContainer,
) -> None:
    # AKIABASE is unknown to the fake STS: InvalidClientTokenId; the chain stops there.
    write_aws(
        tmp_path,
        credentials=f"[base]\naws_access_key_id=AKIABASE\naws_secret_access_key={SECRET}\n",
        config="[default]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = base\n",
    )
    env = container_env(container, tmp_path, AWS_ENDPOINT_URL_STS=sts.url)
    with pytest.raises(CredentialsError, match="InvalidClientTokenId") as caught:
        await chain(env, session, clock).get()
    assert SECRET not in str(caught.value)
    assert container.requests == []


# --------------------------------------------------------------------------- web identity


async def test_web_identity_rereads_the_token_file(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, sts: FakeSts
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("eyJ.first-jwt.sig\n")
    sts.web_identity_token = "eyJ.first-jwt.sig"
    env = env_for(
        tmp_path,
        AWS_WEB_IDENTITY_TOKEN_FILE=str(token_file),
        AWS_ROLE_ARN="arn:aws:iam::1:role/web",
        AWS_ROLE_SESSION_NAME="pod-1",
        AWS_ENDPOINT_URL_STS=sts.url,
    )
    provider = chain(env, session, clock)
    creds = await provider.get()
    assert creds.access_key_id == sts.issued[0][0]
    assert sts.params[0] == {
        "Action": "AssumeRoleWithWebIdentity",
        "Version": "2011-06-15",
        "RoleArn": "arn:aws:iam::1:role/web",
        "RoleSessionName": "pod-1",
        "WebIdentityToken": "eyJ.first-jwt.sig",
    }
    assert "Authorization" not in sts.requests[0].headers

    token_file.write_text("eyJ.second-jwt.sig")  # the kubelet rotated it
    sts.web_identity_token = "eyJ.second-jwt.sig"
    provider.invalidate()
    assert (await provider.get()).access_key_id == sts.issued[1][0]
    assert sts.params[1]["WebIdentityToken"] == "eyJ.second-jwt.sig"


async def test_web_identity_from_profile_and_its_errors(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, sts: FakeSts
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("eyJ.profile-jwt.sig")
    write_aws(
        tmp_path,
        config=(
            f"[default]\nweb_identity_token_file = {token_file}\nrole_arn = arn:aws:iam::1:role/p\n"
        ),
    )
    sts.web_identity_token = "not-this-one"
    env = env_for(tmp_path, AWS_ENDPOINT_URL_STS=sts.url)
    with pytest.raises(CredentialsError, match="InvalidIdentityToken") as caught:
        await chain(env, session, clock).get()
    assert "profile-jwt" not in str(caught.value)
    assert sts.params[0]["RoleArn"] == "arn:aws:iam::1:role/p"

    no_role = env_for(tmp_path, AWS_WEB_IDENTITY_TOKEN_FILE=str(token_file), AWS_PROFILE="default")
    write_aws(tmp_path, config="[default]\nregion = eu-west-1\n")
    with pytest.raises(CredentialsError, match="no role ARN"):
        await chain(no_role, session, clock).get()


# --------------------------------------------------------------------------- container


async def test_container_authorization_token_and_token_file(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, container: FakeContainer
) -> None:
    container.authorization = "Bearer env-token"
    env = container_env(container, tmp_path, AWS_CONTAINER_AUTHORIZATION_TOKEN="Bearer env-token")
    assert (await chain(env, session, clock).get()).access_key_id == container.issued[0][0]

    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text("pod-token-1")
    container.authorization = "pod-token-1"
    env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] = str(token_file)  # the file wins
    provider = chain(env, session, clock)
    await provider.get()
    token_file.write_text("pod-token-2")
    container.authorization = "pod-token-2"
    provider.invalidate()
    assert (await provider.get()).access_key_id == container.issued[2][0]
    assert container.seen_authorization == ["Bearer env-token", "pod-token-1", "pod-token-2"]
    assert container.requests[0].path == "/v2/creds"


async def test_configured_container_that_fails_raises(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    container: FakeContainer,
    imds: FakeImds,
) -> None:
    container.authorization = "right"
    env = imds_env(
        imds,
        tmp_path,
        AWS_CONTAINER_CREDENTIALS_FULL_URI=f"{container.url}/v2/creds",
        AWS_CONTAINER_AUTHORIZATION_TOKEN="wrong-token",
    )
    with pytest.raises(CredentialsError, match="HTTP 401") as caught:
        await chain(env, session, clock).get()
    assert "wrong-token" not in str(caught.value)
    assert len(container.requests) == 1  # a 4xx is not retried
    assert imds.token_requests == 0  # a configured source that fails stops the chain

    container.authorization = None
    container.fail_with.extend([503, 503])
    assert (await chain(env, session, clock).get()).access_key_id == container.issued[0][0]


async def test_container_full_uri_to_a_foreign_host_is_refused(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    env = env_for(tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI="http://metadata.example.com/c")
    with pytest.raises(CredentialsError, match="not allowed over http"):
        await chain(env, session, clock).get()


# --------------------------------------------------------------------------- IMDS


async def test_imds_v2_demands_its_token(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, imds: FakeImds
) -> None:
    provider = chain(imds_env(imds, tmp_path), session, clock)
    creds = await provider.get()
    key, secret, token = imds.issued[0]
    assert creds == Credentials(key, secret, token, clock() + timedelta(hours=1))
    assert imds.tokens == ["imds-session-1-AQAEAKg"]
    assert imds.unauthorized == 0


async def test_imds_without_role_or_disabled_is_skipped(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, imds: FakeImds
) -> None:
    imds.role = None
    with pytest.raises(CredentialsError, match="no IAM role attached"):
        await chain(imds_env(imds, tmp_path), session, clock).get()
    disabled = imds_env(imds, tmp_path, AWS_EC2_METADATA_DISABLED="true")
    with pytest.raises(CredentialsError, match="disabled by AWS_EC2_METADATA_DISABLED"):
        await chain(disabled, session, clock).get()
    assert imds.token_requests == 1


async def test_imds_hanging_token_endpoint_is_bounded(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, imds: FakeImds
) -> None:
    imds.hang_token = True
    env = imds_env(
        imds, tmp_path, AWS_METADATA_SERVICE_TIMEOUT="0.2", AWS_EC2_METADATA_V1_DISABLED="true"
    )
    started = time.monotonic()
    with pytest.raises(CredentialsError, match=r"no IMDSv2 token .* IMDSv1 is disabled"):
        await asyncio.wait_for(chain(env, session, clock).get(), 5)
    assert time.monotonic() - started < 1.5
    assert imds.token_requests == 1  # a read timeout is not retried

    # botocore's fallback: without a token answer, IMDSv1 (if allowed) still works.
    imds.allow_v1 = True
    del env["AWS_EC2_METADATA_V1_DISABLED"]
    creds = await asyncio.wait_for(chain(env, session, clock).get(), 5)
    assert creds.access_key_id == imds.issued[0][0]


async def test_imds_extends_nearly_expired_credentials(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, imds: FakeImds
) -> None:
    imds.lifetime = timedelta(minutes=5)
    creds = await chain(imds_env(imds, tmp_path), session, clock).get()
    assert creds.expiration == clock() + timedelta(minutes=20)


# --------------------------------------------------------------------------- nothing found


async def test_nothing_found_lists_every_source(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    env = {
        "HOME": str(tmp_path),
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
    }
    with pytest.raises(CredentialsError) as caught:
        await chain(env, session, clock).get()
    message = str(caught.value)
    expected = [
        "environment: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set",
        "assume role: profile 'default' has no role_arn",
        "web identity: AWS_WEB_IDENTITY_TOKEN_FILE is not set",
        f"shared credentials file: no profile 'default' in {tmp_path}/.aws/credentials",
        f"shared config file: no profile 'default' in {tmp_path}/.aws/config",
        "container credentials: AWS_CONTAINER_CREDENTIALS_RELATIVE_URI and _FULL_URI are not set",
        "EC2 instance metadata: cannot connect to EC2 instance metadata at http://127.0.0.1:",
    ]
    positions = [message.find(line) for line in expected]
    assert -1 not in positions, message
    assert positions == sorted(positions)


# --------------------------------------------------------------------------- caching and refresh


async def test_cached_credentials_hit_the_endpoint_once(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, container: FakeContainer
) -> None:
    provider = chain(container_env(container, tmp_path), session, clock)
    first = await asyncio.gather(*[provider.get() for _ in range(20)])
    assert len(set(first)) == 1
    for _ in range(100):
        assert await provider.get() == first[0]
    clock.advance(timedelta(minutes=44))  # 16 minutes left: still outside the advisory window
    assert await provider.get() == first[0]
    assert len(container.requests) == 1


async def test_advisory_refresh_runs_in_the_background(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, container: FakeContainer
) -> None:
    provider = chain(container_env(container, tmp_path), session, clock)
    old = await provider.get()
    clock.advance(timedelta(minutes=46))  # 14 minutes left
    container.hold = asyncio.Event()
    container.arrived.clear()
    for _ in range(10):  # none of these waits for the refresh
        assert await asyncio.wait_for(provider.get(), 1) == old
    await asyncio.wait_for(container.arrived.wait(), 5)
    assert await provider.get() == old
    assert len(container.requests) == 2  # one refresh, however many callers

    container.hold.set()
    await asyncio.wait_for(provider.wait_for_refresh(), 5)
    new = await provider.get()
    assert new != old
    assert new.access_key_id == container.issued[1][0]
    assert new.expiration == clock() + timedelta(hours=1)


async def test_mandatory_refresh_is_awaited_and_shared(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, container: FakeContainer
) -> None:
    provider = chain(container_env(container, tmp_path), session, clock)
    old = await provider.get()
    clock.advance(timedelta(minutes=51))  # 9 minutes left
    container.hold = asyncio.Event()
    container.arrived.clear()
    waiters = [asyncio.create_task(provider.get()) for _ in range(10)]
    await asyncio.wait_for(container.arrived.wait(), 5)
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    container.hold.set()
    results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert {r.access_key_id for r in results} == {container.issued[1][0]}
    assert results[0] != old
    assert len(container.requests) == 2


async def test_invalidate_forces_a_refresh(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, container: FakeContainer
) -> None:
    provider = chain(container_env(container, tmp_path), session, clock)
    old = await provider.get()
    provider.invalidate()
    new = await provider.get()
    assert new != old
    assert await provider.get() == new
    assert len(container.requests) == 2


async def test_keep_fresh_refreshes_while_no_one_asks_and_seconds_left_follows(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, container: FakeContainer
) -> None:
    """An idle relay (no SES call) still refreshes in the advisory window, so
    ``ses_relay_credentials_expiry_seconds`` runs down only when refreshing fails."""
    provider = chain(container_env(container, tmp_path), session, clock)
    assert provider.seconds_left() is None  # nothing fetched yet
    naps: asyncio.Queue[tuple[float, asyncio.Event]] = asyncio.Queue()

    async def sleep(seconds: float) -> None:
        woken = asyncio.Event()
        await naps.put((seconds, woken))
        await woken.wait()

    keeping = asyncio.create_task(provider.keep_fresh(every=60, sleep=sleep))
    try:
        seconds, woken = await asyncio.wait_for(naps.get(), 5)
        assert seconds == 60
        assert len(container.requests) == 1
        assert provider.seconds_left() == 3600
        clock.advance(timedelta(minutes=46))
        assert provider.seconds_left() == 14 * 60  # inside the advisory window
        woken.set()
        _, woken = await asyncio.wait_for(naps.get(), 5)
        await asyncio.wait_for(provider.wait_for_refresh(), 5)
        assert len(container.requests) == 2
        assert provider.seconds_left() == 3600

        container.fail_with.extend([500] * 20)  # refreshing fails: the gauge runs down
        clock.advance(timedelta(minutes=50))
        woken.set()
        _, woken = await asyncio.wait_for(naps.get(), 5)
        await asyncio.wait_for(provider.wait_for_refresh(), 5)
        assert len(container.requests) > 2
        assert provider.seconds_left() == 10 * 60
    finally:
        keeping.cancel()
        await asyncio.gather(keeping, return_exceptions=True)


async def test_keys_that_never_expire_have_no_seconds_left(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    env = env_for(tmp_path, AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY=SECRET)
    provider = chain(env, session, clock)
    await provider.get()
    assert provider.seconds_left() is None


@pytest.mark.parametrize("minutes_left", [14, 9])
async def test_failed_refresh_keeps_the_old_credentials_while_valid(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    container: FakeContainer,
    caplog: pytest.LogCaptureFixture,
    minutes_left: int,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.ses")
    provider = chain(container_env(container, tmp_path), session, clock)
    old = await provider.get()
    clock.advance(timedelta(minutes=60 - minutes_left))
    container.fail_with.append(403)
    assert await provider.get() == old
    await asyncio.wait_for(provider.wait_for_refresh(), 5)
    assert await provider.get() == old  # within the retry interval: no new request
    assert len(container.requests) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "HTTP 403" in warnings[0].getMessage()

    clock.advance(timedelta(seconds=31))  # the endpoint recovered
    await provider.get()
    await asyncio.wait_for(provider.wait_for_refresh(), 5)
    assert (await provider.get()).access_key_id == container.issued[1][0]

    clock.advance(timedelta(hours=1))  # expired and the endpoint down: no credentials
    container.fail_with.append(403)
    with pytest.raises(CredentialsError, match="HTTP 403"):
        await provider.get()
    assert all(secret not in caplog.text for _key, secret, _token in container.issued)


async def test_refreshed_credentials_already_expired_are_refused(
    tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock, container: FakeContainer
) -> None:
    container.lifetime = -timedelta(minutes=1)
    with pytest.raises(CredentialsError, match="expired at"):
        await chain(container_env(container, tmp_path), session, clock).get()


async def test_cancelled_caller_does_not_cancel_the_shared_refresh(
    clock: FakeClock,
) -> None:
    release = asyncio.Event()
    calls = 0

    async def fetch() -> Credentials:
        nonlocal calls
        calls += 1
        await asyncio.wait_for(release.wait(), 5)
        return Credentials("ASIAX", SECRET, TOKEN, clock() + timedelta(hours=1))

    provider = RefreshingProvider(fetch, clock=clock)
    first = asyncio.create_task(provider.get())
    second = asyncio.create_task(provider.get())
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert (await asyncio.wait_for(second, 5)).access_key_id == "ASIAX"
    assert calls == 1
    with pytest.raises(asyncio.CancelledError):
        await first


# --------------------------------------------------------------------------- secrets


async def test_secrets_stay_out_of_reprs_errors_and_logs(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    container: FakeContainer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.ses")
    creds = Credentials("ASIAREPR", SECRET, TOKEN, clock())
    provider = chain(container_env(container, tmp_path), session, clock)
    got = await provider.get()
    texts = [repr(creds), str(creds), repr(StaticProvider(creds)), repr(provider), repr(got)]
    container.authorization = "Bearer very-secret-container-token"
    bad = container_env(
        container, tmp_path, AWS_CONTAINER_AUTHORIZATION_TOKEN="Bearer guessed-token"
    )
    with pytest.raises(CredentialsError) as caught:
        await chain(bad, session, clock).get()
    texts += [str(caught.value), repr(caught.value), caplog.text]
    secrets = [SECRET, TOKEN, "guessed-token", "very-secret", got.secret_access_key]
    secrets.append(got.session_token or "")
    for text in texts:
        for secret in secrets:
            assert secret not in text, (secret, text)
    assert "ASIAREPR" in repr(creds)  # the key id is not a secret: it helps debugging


# --------------------------------------------------------------------------- the relay's shutdown


async def test_aclose_ends_every_refresh_including_superseded_ones(clock: FakeClock) -> None:
    begun: asyncio.Queue[int] = asyncio.Queue()
    ended: list[int] = []
    serial = iter(range(1, 10))

    async def fetch() -> Credentials:
        number = next(serial)
        await begun.put(number)
        try:
            await asyncio.Event().wait()  # an endpoint that never answers
        finally:
            ended.append(number)
        raise AssertionError("unreachable")

    provider = RefreshingProvider(fetch, clock=clock)
    first = asyncio.create_task(provider.get())
    assert await asyncio.wait_for(begun.get(), 5) == 1
    provider.invalidate()  # the next get() starts a second refresh; the first runs on
    second = asyncio.create_task(provider.get())
    assert await asyncio.wait_for(begun.get(), 5) == 2
    await provider.aclose()
    assert sorted(ended) == [1, 2]
    for waiter in (first, second):
        with pytest.raises(asyncio.CancelledError):
            await waiter


REFRESH = "RefreshingProvider._refresh"


async def test_stop_ends_a_credential_refresh_in_flight(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay stopped while it waits for its credentials leaves no refresh
    running on a closed session (that would log an unexpected error later)."""
    asked = asyncio.Event()
    hung_up = asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.set()
        await reader.read()  # until the relay closes the connection
        hung_up.set()
        writer.close()

    endpoint = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = endpoint.sockets[0].getsockname()[1]
    # Checking bounce_sender with SES at start needs credentials.
    config, env = relay_config(tmp_path, fake_ses, delivery={"bounce_sender": "dsn@relay.test"})
    env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = f"http://127.0.0.1:{port}/creds"
    async with endpoint:
        relay = Relay(config, env)
        await relay.start()
        await asyncio.wait_for(asked.wait(), 5)
        await relay.stop(grace=0)
        coroutines = [t.get_coro() for t in asyncio.all_tasks() if not t.done()]
        refreshing = [c for c in coroutines if getattr(c, "__qualname__", "") == REFRESH]
        assert refreshing == []
        await asyncio.wait_for(hung_up.wait(), 5)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
