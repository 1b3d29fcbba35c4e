"""The SES-side test harness itself works, and can fail.

The client here is aiohttp plus botocore's own SigV4 signer, so these tests say
nothing about relay's client: they prove that FakeSes accepts what AWS would
accept, refuses what AWS would refuse, and does what a test scripts. The last
tests check the moto harness the same way.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import botocore.exceptions
import defusedxml.ElementTree as SafeET
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from multidict import CIMultiDict

from tests.fakeses import (
    HTML_BODY,
    SES_XMLNS,
    CloseWithoutAnswer,
    Delay,
    FakeSes,
    HugeBody,
    KnownKey,
    RawReply,
    ResetMidBody,
    SesErrorReply,
    Trickle,
    errors_shape_body,
    make_client_ssl_context,
    verify_sigv4,
)
from tests.motoses import KeyPair, MotoSes

NS = {"ses": SES_XMLNS}
MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nhello +/= world\r\n"


def send_params(message: bytes = MESSAGE, **extra: str) -> dict[str, str]:
    return {
        "Action": "SendRawEmail",
        "Version": "2010-12-01",
        "RawMessage.Data": base64.b64encode(message).decode(),
        **extra,
    }


def botocore_signed(
    fake: FakeSes,
    params: dict[str, str],
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    token: str | None = None,
    region: str | None = None,
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a POST signed by botocore, as an AWS SDK would send it."""
    body = urlencode(params).encode()
    request = AWSRequest(
        method="POST",
        url=fake.url + "/",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
    )
    credentials = BotoCredentials(
        access_key or fake.access_key, secret_key or fake.secret_key, token
    )
    SigV4Auth(credentials, "ses", region or fake.region).add_auth(request)
    return dict(request.headers.items()), body


@pytest.fixture
async def http(ca_pem_path: Path) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=make_client_ssl_context(ca_pem_path))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def post(
    http: aiohttp.ClientSession, fake: FakeSes, headers: dict[str, str], body: bytes
) -> tuple[int, bytes]:
    async with http.post(fake.url + "/", data=body, headers=headers) as response:
        return response.status, await response.read()


def error_code(body: bytes) -> str:
    root = SafeET.fromstring(body)
    assert root.tag == f"{{{SES_XMLNS}}}ErrorResponse"
    code = root.find("ses:Error/ses:Code", NS)
    assert code is not None
    return str(code.text)


# --------------------------------------------------------------------------- signature


async def test_botocore_signed_send_is_accepted_and_recorded(
    fake_ses: FakeSes, http: aiohttp.ClientSession
) -> None:
    params = send_params(
        Source="a@example.com",
        **{
            "Destinations.member.1": "b@example.com",
            "Destinations.member.2": "c@example.com",
            "Tags.member.1.Name": "app",
            "Tags.member.1.Value": "billing",
        },
    )
    headers, body = botocore_signed(fake_ses, params)
    status, answer = await post(http, fake_ses, headers, body)

    assert status == 200, answer
    root = SafeET.fromstring(answer)
    message_id = root.find("ses:SendRawEmailResult/ses:MessageId", NS)
    request_id = root.find("ses:ResponseMetadata/ses:RequestId", NS)
    assert message_id is not None
    assert message_id.text
    assert request_id is not None
    assert request_id.text
    [seen] = fake_ses.requests
    assert seen.signature_ok
    assert seen.action == "SendRawEmail"
    assert seen.raw_message == MESSAGE
    assert seen.destinations == ["b@example.com", "c@example.com"]
    assert seen.tags == [("app", "billing")]
    assert seen.params["Source"] == "a@example.com"
    assert seen.unexpected_params() == []
    assert seen.body == body


async def test_get_send_quota_answer(fake_ses: FakeSes, http: aiohttp.ClientSession) -> None:
    fake_ses.quota.update(max_24_hour_send=200.0, max_send_rate=1.0, sent_last_24_hours=3.0)
    headers, body = botocore_signed(fake_ses, {"Action": "GetSendQuota", "Version": "2010-12-01"})
    status, answer = await post(http, fake_ses, headers, body)
    assert status == 200
    result = SafeET.fromstring(answer).find("ses:GetSendQuotaResult", NS)
    assert result is not None
    values = {child.tag.split("}")[1]: float(child.text or "nan") for child in result}
    assert values == {"Max24HourSend": 200.0, "MaxSendRate": 1.0, "SentLast24Hours": 3.0}


async def test_tampered_body_is_refused(fake_ses: FakeSes, http: aiohttp.ClientSession) -> None:
    headers, body = botocore_signed(fake_ses, send_params())
    tampered = body.replace(b"Version=2010-12-01", b"Version=2010-12-02")
    assert tampered != body
    status, answer = await post(http, fake_ses, headers, tampered)
    assert status == 403
    assert error_code(answer) == "SignatureDoesNotMatch"
    assert fake_ses.requests[0].auth_error == "SignatureDoesNotMatch"


async def test_wrong_secret_is_refused(fake_ses: FakeSes, http: aiohttp.ClientSession) -> None:
    headers, body = botocore_signed(fake_ses, send_params(), secret_key="not-the-secret")
    status, answer = await post(http, fake_ses, headers, body)
    assert (status, error_code(answer)) == (403, "SignatureDoesNotMatch")


async def test_unknown_key_is_refused(fake_ses: FakeSes, http: aiohttp.ClientSession) -> None:
    headers, body = botocore_signed(fake_ses, send_params(), access_key="AKIAUNKNOWN000000000")
    status, answer = await post(http, fake_ses, headers, body)
    assert (status, error_code(answer)) == (403, "InvalidClientTokenId")


async def test_wrong_region_and_unsigned_request_are_refused(
    fake_ses: FakeSes, http: aiohttp.ClientSession
) -> None:
    headers, body = botocore_signed(fake_ses, send_params(), region="eu-west-1")
    status, answer = await post(http, fake_ses, headers, body)
    assert (status, error_code(answer)) == (403, "SignatureDoesNotMatch")

    status, answer = await post(
        http, fake_ses, {"Content-Type": "application/x-www-form-urlencoded"}, body
    )
    assert (status, error_code(answer)) == (403, "MissingAuthenticationToken")


async def test_session_token_is_required_and_checked(
    fake_ses: FakeSes, http: aiohttp.ClientSession
) -> None:
    fake_ses.add_key("ASIATEMPORARY0000001", "temp-secret", "the-session-token")
    ok_headers, body = botocore_signed(
        fake_ses,
        send_params(),
        access_key="ASIATEMPORARY0000001",
        secret_key="temp-secret",
        token="the-session-token",
    )
    assert (await post(http, fake_ses, ok_headers, body))[0] == 200

    no_token_headers, body = botocore_signed(
        fake_ses, send_params(), access_key="ASIATEMPORARY0000001", secret_key="temp-secret"
    )
    status, answer = await post(http, fake_ses, no_token_headers, body)
    assert (status, error_code(answer)) == (403, "InvalidClientTokenId")

    wrong_headers, body = botocore_signed(
        fake_ses,
        send_params(),
        access_key="ASIATEMPORARY0000001",
        secret_key="temp-secret",
        token="another-token",
    )
    status, answer = await post(http, fake_ses, wrong_headers, body)
    assert (status, error_code(answer)) == (403, "InvalidClientTokenId")


def test_content_hash_header_must_match_the_body() -> None:
    body = urlencode(send_params()).encode()
    keys = {"AKID": KnownKey("secret")}
    request = AWSRequest(
        method="POST",
        url="https://127.0.0.1:1/",
        data=body,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            # botocore trusts this header instead of hashing: the fake must not.
            "X-Amz-Content-SHA256": hashlib.sha256(b"something else").hexdigest(),
        },
    )
    SigV4Auth(BotoCredentials("AKID", "secret"), "ses", "us-east-1").add_auth(request)
    headers = CIMultiDict(request.headers.items())
    headers["Host"] = "127.0.0.1:1"
    failure = verify_sigv4(
        method="POST",
        url="https://127.0.0.1:1/",
        headers=headers,
        body=body,
        keys=keys,
        region="us-east-1",
    )
    assert failure is not None
    assert failure.code == "SignatureDoesNotMatch"


def test_stale_timestamp_is_refused() -> None:
    body = urlencode(send_params()).encode()
    request = AWSRequest(
        method="POST",
        url="https://127.0.0.1:1/",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    SigV4Auth(BotoCredentials("AKID", "secret"), "ses", "us-east-1").add_auth(request)
    headers = CIMultiDict(request.headers.items())
    headers["Host"] = "127.0.0.1:1"
    common = {
        "method": "POST",
        "url": "https://127.0.0.1:1/",
        "headers": headers,
        "body": body,
        "keys": {"AKID": KnownKey("secret")},
        "region": "us-east-1",
    }
    assert verify_sigv4(**common) is None  # type: ignore[arg-type]
    later = datetime.now(UTC) + timedelta(minutes=20)
    failure = verify_sigv4(**common, now=later)  # type: ignore[arg-type]
    assert failure is not None
    assert failure.message.startswith("Signature expired")


# --------------------------------------------------------------------------- scripting


async def test_scripted_answers_come_back_in_order_then_success(
    fake_ses: FakeSes, http: aiohttp.ClientSession
) -> None:
    fake_ses.script(
        SesErrorReply(400, "MessageRejected", "Email address is not verified. a@example.com"),
        SesErrorReply(503, "ServiceUnavailable", "Service is unavailable", type="Receiver"),
        RawReply(200, HTML_BODY, "text/html"),
        RawReply(400, errors_shape_body("Throttling", "Rate exceeded")),
        RawReply(502, b"", None),
    )
    # A refused signature does not consume the script.
    bad_headers, bad_body = botocore_signed(fake_ses, send_params(), secret_key="wrong")
    assert (await post(http, fake_ses, bad_headers, bad_body))[0] == 403

    answers = []
    for _ in range(6):
        headers, body = botocore_signed(fake_ses, send_params())
        answers.append(await post(http, fake_ses, headers, body))

    assert [status for status, _ in answers] == [400, 503, 200, 400, 502, 200]
    assert error_code(answers[0][1]) == "MessageRejected"
    root = SafeET.fromstring(answers[1][1])
    assert root.find("ses:Error/ses:Type", NS).text == "Receiver"  # type: ignore[union-attr]
    assert answers[2][1] == HTML_BODY
    assert b"<Errors><Error><Code>Throttling</Code>" in answers[3][1]
    assert answers[4][1] == b""
    assert b"<MessageId>" in answers[5][1]
    assert fake_ses.pending_script == 0


async def test_delay_holds_until_released(fake_ses: FakeSes, http: aiohttp.ClientSession) -> None:
    release = asyncio.Event()
    delay = Delay(
        release=release, then=SesErrorReply(400, "Throttling", "Maximum sending rate exceeded.")
    )
    fake_ses.script(delay)
    headers, body = botocore_signed(fake_ses, send_params())
    call = asyncio.create_task(post(http, fake_ses, headers, body))
    await asyncio.wait_for(delay.arrived.wait(), 5)
    await asyncio.sleep(0.05)
    assert not call.done()
    release.set()
    status, answer = await asyncio.wait_for(call, 5)
    assert (status, error_code(answer)) == (400, "Throttling")


async def test_delay_with_timeout_then_answers(
    fake_ses: FakeSes, http: aiohttp.ClientSession
) -> None:
    fake_ses.script(Delay(timeout=0.2))
    headers, body = botocore_signed(fake_ses, send_params())
    started = time.monotonic()
    status, _ = await post(http, fake_ses, headers, body)
    assert status == 200
    assert 0.15 < time.monotonic() - started < 3


async def test_trickle_keeps_sending_until_client_leaves(
    fake_ses: FakeSes, http: aiohttp.ClientSession
) -> None:
    trickle = Trickle(interval=0.01)
    fake_ses.script(trickle)
    headers, body = botocore_signed(fake_ses, send_params())
    received = b""
    async with http.post(fake_ses.url + "/", data=body, headers=headers) as response:
        assert response.status == 200
        # Each read gets something well within a per-read timeout: only a bound
        # on the whole response catches this.
        for _ in range(len(trickle.prefix) + 10):
            received += await asyncio.wait_for(response.content.read(1), 1)
        response.close()
    assert received.startswith(b"<SendRawEmailResponse")
    assert received == trickle.prefix + b" " * 10


async def test_reset_mid_body(fake_ses: FakeSes, http: aiohttp.ClientSession) -> None:
    fake_ses.script(ResetMidBody())
    headers, body = botocore_signed(fake_ses, send_params())
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(http, fake_ses, headers, body)


async def test_close_without_answer(fake_ses: FakeSes, http: aiohttp.ClientSession) -> None:
    fake_ses.script(CloseWithoutAnswer())
    headers, body = botocore_signed(fake_ses, send_params())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(http, fake_ses, headers, body)


async def test_huge_body_streams_without_end(
    fake_ses: FakeSes, http: aiohttp.ClientSession
) -> None:
    huge = HugeBody()
    fake_ses.script(huge)
    headers, body = botocore_signed(fake_ses, send_params())
    async with http.post(fake_ses.url + "/", data=body, headers=headers) as response:
        got = 0
        for _ in range(10_000):
            chunk = await response.content.read(65536)
            got += len(chunk)
            if got >= 1_000_000 or not chunk:
                break
        response.close()
    assert got >= 1_000_000
    assert huge.bytes_sent < huge.size  # the fake stopped when the client left


async def test_keep_alive_connections_are_counted(
    fake_ses: FakeSes, http: aiohttp.ClientSession, ca_pem_path: Path
) -> None:
    for _ in range(3):
        headers, body = botocore_signed(fake_ses, send_params())
        assert (await post(http, fake_ses, headers, body))[0] == 200
    assert fake_ses.connection_count == 1
    connector = aiohttp.TCPConnector(ssl=make_client_ssl_context(ca_pem_path), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as other:
        for _ in range(2):
            headers, body = botocore_signed(fake_ses, send_params())
            assert (await post(other, fake_ses, headers, body))[0] == 200
    assert fake_ses.connection_count == 3
    assert [r.connection for r in fake_ses.requests] == [1, 1, 1, 2, 3]


async def test_untrusted_client_cannot_connect(fake_ses: FakeSes) -> None:
    """The fake's certificate is only trusted through the test CA."""
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.post(fake_ses.url + "/", data=b"")
    assert fake_ses.requests == []


# --------------------------------------------------------------------------- moto harness


def test_moto_checks_signatures_and_keeps_messages(moto_ses: MotoSes) -> None:
    assert moto_ses.auth_key is not None
    moto_ses.verify_email_identity("harness@moto-harness.example")
    ses = moto_ses.client("ses")
    sent = ses.send_raw_email(
        Source="harness@moto-harness.example",
        Destinations=["rcpt@example.net"],
        RawMessage={"Data": MESSAGE},
    )
    stored = moto_ses.raw_message(sent["MessageId"])
    assert stored["raw_data"].encode() == MESSAGE
    assert stored["source"] == "harness@moto-harness.example"
    assert "rcpt@example.net" in stored["destinations"]

    wrong_secret = moto_ses.client("ses", KeyPair(moto_ses.auth_key.access_key_id, "wrong"))
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        wrong_secret.get_send_quota()
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"

    unknown = moto_ses.client("ses", KeyPair("AKIAUNKNOWN000000000", "whatever"))
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        unknown.get_send_quota()
    assert refused.value.response["Error"]["Code"] == "InvalidClientTokenId"
