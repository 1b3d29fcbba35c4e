"""relay's SES client against the fake SES: the wire, the errors, the retries.

Every request here crosses a real TLS socket to ``FakeSes``, which checks the
SigV4 signature with botocore as the oracle and records what it received.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from relay.config import SesConfig
from relay.errors import CredentialsError, Disposition, SesError, SesTransportError
from relay.ses.client import SendQuota, SendResult, SesClient
from relay.ses.credentials import StaticProvider
from relay.ses.sender import RawMessage, SendRequest, SesParameters
from relay.ses.sigv4 import Credentials
from tests.fakeses import (
    Delay,
    FakeSes,
    RawReply,
    SesErrorReply,
    Succeed,
    errors_shape_body,
)

R, D, P = Disposition.RETRYABLE, Disposition.DEFERRABLE, Disposition.PERMANENT

MESSAGE = (
    b"From: Ops <ops@example.com>\r\n"
    b"To: alice@example.net\r\n"
    b"Cc: bob@example.org\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"caf\xc3\xa9 + slash / equals = ampersand & percent %20 \xff\xfe\xfd>>>???\r\n"
    b"..leading dots stay\r\n"
)


def config_for(fake: FakeSes, **overrides: object) -> SesConfig:
    settings: dict[str, object] = {
        "region": fake.region,
        "endpoint": fake.url,
        "ca_bundle": fake.ca_pem_path,
        "connect_timeout": 2.0,
        "request_timeout": 5.0,
        "max_attempts": 3,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
    }
    settings.update(overrides)
    return SesConfig(**settings)  # type: ignore[arg-type]


def credentials_for(fake: FakeSes) -> Credentials:
    return Credentials(fake.access_key, fake.secret_key)


def client_for(fake: FakeSes, **overrides: object) -> SesClient:
    return SesClient(config_for(fake, **overrides), StaticProvider(credentials_for(fake)))


class CountingProvider:
    """Hands out ``sequence[i]``; ``invalidate`` moves to the next set (if any)."""

    def __init__(self, *sequence: Credentials) -> None:
        self.sequence = sequence
        self.index = 0
        self.gets = 0
        self.invalidations = 0

    async def get(self) -> Credentials:
        self.gets += 1
        return self.sequence[self.index]

    def invalidate(self) -> None:
        self.invalidations += 1
        self.index = min(self.index + 1, len(self.sequence) - 1)


def simple_request(**overrides: object) -> SendRequest:
    return replace(SendRequest(raw_message=RawMessage.of(MESSAGE)), **overrides)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- round trips


async def test_send_raw_email_round_trip_with_every_parameter(fake_ses: FakeSes) -> None:
    fake_ses.script(Succeed(message_id="0100018c-test-message-id-000000"))
    request = SendRequest(
        raw_message=RawMessage.of(MESSAGE),
        destinations=("alice@example.net", "bob@example.org", "carol+tag@xn--bcher-kva.example"),
        source="Ops Team <ops@example.com>",
        ses=SesParameters(
            from_arn="arn:aws:ses:us-east-1:123456789012:identity/example.com",
            source_arn="arn:aws:ses:us-east-1:123456789012:identity/ops@example.com",
            return_path_arn="arn:aws:ses:us-east-1:123456789012:identity/bounces.example.com",
            configuration_set="relay-set_1",
            tags=(("app", "billing"), ("team", "a b=c&d/e+f%")),
        ),
    )
    async with client_for(fake_ses) as client:
        result = await client.send(request, deadline=10.0)

    assert isinstance(result, SendResult)
    assert result.message_id == "0100018c-test-message-id-000000"
    assert result.request_id
    [seen] = fake_ses.requests
    assert seen.signature_ok
    assert seen.method == "POST"
    assert seen.action == "SendRawEmail"
    assert seen.params["Version"] == "2010-12-01"
    assert seen.raw_message == MESSAGE
    assert seen.destinations == list(request.destinations)
    assert seen.params["Source"] == "Ops Team <ops@example.com>"
    assert seen.params["FromArn"] == request.ses.from_arn
    assert seen.params["SourceArn"] == request.ses.source_arn
    assert seen.params["ReturnPathArn"] == request.ses.return_path_arn
    assert seen.params["ConfigurationSetName"] == "relay-set_1"
    assert seen.tags == [("app", "billing"), ("team", "a b=c&d/e+f%")]
    assert seen.unexpected_params() == []
    assert seen.duplicate_params == []


async def test_minimal_request_sends_only_what_is_set(fake_ses: FakeSes) -> None:
    async with client_for(fake_ses) as client:
        result = await client.send(SendRequest(raw_message=RawMessage.of(MESSAGE)))
    assert result.message_id
    [seen] = fake_ses.requests
    assert seen.signature_ok
    assert sorted(seen.params) == ["Action", "RawMessage.Data", "Version"]
    assert seen.raw_message == MESSAGE


async def test_large_message_round_trips_exactly(fake_ses: FakeSes) -> None:
    body = os.urandom(7_864_320 - 200)  # just under the relay's default size limit
    message = b"Subject: big\r\n\r\n" + body
    async with client_for(fake_ses) as client:
        await client.send(SendRequest(raw_message=RawMessage.of(message)), deadline=20)
    [seen] = fake_ses.requests
    assert seen.signature_ok
    assert seen.raw_message == message


async def test_session_token_is_sent_and_signed(fake_ses: FakeSes) -> None:
    fake_ses.add_key("ASIATEMPORARYKEY0001", "temporary-secret", "FwoGZXIvYXdzE//token+with/chars=")
    credentials = Credentials(
        "ASIATEMPORARYKEY0001", "temporary-secret", "FwoGZXIvYXdzE//token+with/chars="
    )
    async with SesClient(config_for(fake_ses), StaticProvider(credentials)) as client:
        await client.send(simple_request())
    [seen] = fake_ses.requests
    assert seen.signature_ok
    assert seen.headers["X-Amz-Security-Token"] == "FwoGZXIvYXdzE//token+with/chars="


async def test_get_send_quota_is_parsed(fake_ses: FakeSes) -> None:
    fake_ses.quota.update(max_24_hour_send=50000.0, max_send_rate=14.0, sent_last_24_hours=127.5)
    async with client_for(fake_ses) as client:
        quota = await client.quota()
    assert quota == SendQuota(
        max_24_hour_send=50000.0, max_send_rate=14.0, sent_last_24_hours=127.5
    )
    [seen] = fake_ses.requests
    assert seen.signature_ok
    assert seen.action == "GetSendQuota"
    assert seen.unexpected_params() == []


async def test_an_unlimited_daily_quota_is_minus_one(fake_ses: FakeSes) -> None:
    """SES: "A value of -1 signifies an unlimited quota" (Max24HourSend only)."""
    fake_ses.quota.update(max_24_hour_send=-1.0, max_send_rate=14.0, sent_last_24_hours=0.0)
    async with client_for(fake_ses) as client:
        quota = await client.quota()
    assert quota == SendQuota(max_24_hour_send=-1.0, max_send_rate=14.0, sent_last_24_hours=0.0)


async def test_clock_is_used_for_signing(fake_ses: FakeSes) -> None:
    """A clock 20 minutes off makes SES refuse the signature: deferrable, refresh."""
    skewed = SesClient(
        config_for(fake_ses, max_attempts=1),
        StaticProvider(credentials_for(fake_ses)),
        clock=lambda: datetime.now(UTC) - timedelta(minutes=20),
    )
    async with skewed as client:
        with pytest.raises(SesError) as caught:
            await client.send(simple_request())
    assert caught.value.code == "SignatureDoesNotMatch"
    assert caught.value.disposition is D
    assert "expired" in caught.value.message


# --------------------------------------------------------------------------- errors


ERROR_CASES = [
    (
        403,
        "MissingAuthenticationToken",
        "Request is missing Authentication Token",
        "Sender",
        D,
        451,
        "4.7.0",
        True,
    ),
    (400, "RequestExpired", "Request has expired.", "Sender", D, 451, "4.7.0", True),
    (
        400,
        "UnrecognizedClientException",
        "The security token is invalid.",
        "Sender",
        D,
        451,
        "4.7.0",
        True,
    ),
    (400, "AccountSendingPausedException", "Sending is paused.", "Sender", D, 451, "4.3.2", False),
    (400, "SomeFutureClientError", "new in 2030", "Sender", D, 451, "4.3.0", False),
    # status, code, message, type, disposition, smtp code, enhanced, refresh
    (400, "Throttling", "Maximum sending rate exceeded.", "Sender", R, 451, "4.4.5", False),
    (500, "InternalFailure", "An internal failure occurred.", "Receiver", R, 451, "4.3.0", False),
    (503, "ServiceUnavailable", "Service is unavailable.", "Receiver", R, 451, "4.3.0", False),
    (502, "BadGatewaySomething", "upstream trouble", "Receiver", R, 451, "4.3.0", False),
    (400, "Throttling", "Daily message quota exceeded.", "Sender", D, 451, "4.3.2", False),
    (
        400,
        "MessageRejected",
        "Sending paused for this account. For more information, "
        "please check the AWS Support Center.",
        "Sender",
        D,
        451,
        "4.3.2",
        False,
    ),
    (
        400,
        "MailFromDomainNotVerified",
        "The MAIL FROM domain mail.example.com is not verified.",
        "Sender",
        D,
        451,
        "4.7.1",
        False,
    ),
    (403, "SignatureDoesNotMatch", "The request signature ...", "Sender", D, 451, "4.7.0", True),
    (
        403,
        "ExpiredToken",
        "The security token included in the request is expired",
        "Sender",
        D,
        451,
        "4.7.0",
        True,
    ),
    (
        403,
        "InvalidClientTokenId",
        "The security token included in the request is invalid.",
        "Sender",
        D,
        451,
        "4.7.0",
        True,
    ),
    (
        400,
        "IncompleteSignature",
        "Authorization header requires ...",
        "Sender",
        D,
        451,
        "4.7.0",
        True,
    ),
    (
        400,
        "MessageRejected",
        "Email address is not verified. The following identities failed the check "
        "in region US-EAST-1: ops@example.com",
        "Sender",
        P,
        554,
        "5.7.1",
        False,
    ),
    (
        400,
        "ConfigurationSetDoesNotExist",
        "Configuration set <nope> does not exist.",
        "Sender",
        P,
        554,
        "5.3.5",
        False,
    ),
    (400, "InvalidParameterValue", "Illegal address", "Sender", P, 554, "5.6.0", False),
    (
        403,
        "AccessDenied",
        "User is not authorized to perform ses:SendRawEmail",
        "Sender",
        P,
        554,
        "5.7.1",
        False,
    ),
]


@pytest.mark.parametrize(
    ("status", "code", "message", "error_type", "disposition", "smtp", "enhanced", "refresh"),
    ERROR_CASES,
    ids=[f"{case[1]}-{case[0]}-{case[4].value}" for case in ERROR_CASES],
)
async def test_error_classes_and_smtp_replies(
    fake_ses: FakeSes,
    status: int,
    code: str,
    message: str,
    error_type: str,
    disposition: Disposition,
    smtp: int,
    enhanced: str,
    refresh: bool,
) -> None:
    fake_ses.script(SesErrorReply(status, code, message, error_type, request_id="req-12345"))
    async with client_for(fake_ses, max_attempts=1) as client:
        with pytest.raises(SesError) as caught:
            await client.send(simple_request(), deadline=5)
    error = caught.value
    assert not isinstance(error, SesTransportError)
    assert error.code == code
    assert error.message == message
    assert error.http_status == status
    assert error.request_id == "req-12345"
    assert error.disposition is disposition
    assert (error.smtp_reply.code, error.smtp_reply.enhanced) == (smtp, enhanced)
    assert error.refresh_credentials is refresh
    assert len(fake_ses.requests) == 1


async def test_permanent_reply_carries_ses_words(fake_ses: FakeSes) -> None:
    fake_ses.script(
        SesErrorReply(400, "MessageRejected", "Email address is not verified. ops@example.com")
    )
    async with client_for(fake_ses) as client:
        with pytest.raises(SesError) as caught:
            await client.send(simple_request())
    assert str(caught.value.smtp_reply).startswith("554 5.7.1 ")
    assert "Email address is not verified" in caught.value.smtp_reply.text


async def test_errors_shape_is_understood(fake_ses: FakeSes) -> None:
    fake_ses.script(
        RawReply(400, errors_shape_body("MessageRejected", "Email address is not verified."))
    )
    async with client_for(fake_ses) as client:
        with pytest.raises(SesError) as caught:
            await client.send(simple_request())
    assert caught.value.code == "MessageRejected"
    assert caught.value.disposition is P
    assert len(fake_ses.requests) == 1


# --------------------------------------------------------------------------- retries


async def test_503_then_success_is_one_result_and_two_requests(fake_ses: FakeSes) -> None:
    fake_ses.script(SesErrorReply(503, "ServiceUnavailable", "Service unavailable", "Receiver"))
    async with client_for(fake_ses) as client:
        result = await client.send(simple_request(), deadline=5)
    assert result.message_id
    assert len(fake_ses.requests) == 2
    assert all(r.signature_ok for r in fake_ses.requests)
    assert fake_ses.requests[0].raw_message == fake_ses.requests[1].raw_message == MESSAGE
    assert fake_ses.connection_count == 1  # an error answer does not cost the connection


async def test_throttling_then_success(fake_ses: FakeSes) -> None:
    fake_ses.script(SesErrorReply(400, "Throttling", "Maximum sending rate exceeded."))
    async with client_for(fake_ses) as client:
        assert (await client.send(simple_request(), deadline=5)).message_id
    assert len(fake_ses.requests) == 2


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("MessageRejected", "Email address is not verified. ops@example.com"),
        ("Throttling", "Daily message quota exceeded."),
        ("MessageRejected", "Sending paused for this account."),
    ],
)
async def test_permanent_and_deferrable_errors_are_not_retried(
    fake_ses: FakeSes, code: str, message: str
) -> None:
    fake_ses.script(SesErrorReply(400, code, message))
    async with client_for(fake_ses, max_attempts=5) as client:
        with pytest.raises(SesError) as caught:
            await client.send(simple_request(), deadline=5)
    assert caught.value.code == code
    assert len(fake_ses.requests) == 1


async def test_retries_are_bounded_by_max_attempts(fake_ses: FakeSes) -> None:
    fake_ses.script(*[SesErrorReply(503, "ServiceUnavailable", "busy", "Receiver")] * 10)
    async with client_for(fake_ses, max_attempts=3) as client:
        with pytest.raises(SesError) as caught:
            await client.send(simple_request(), deadline=10)
    assert caught.value.code == "ServiceUnavailable"
    assert caught.value.retryable
    assert len(fake_ses.requests) == 3


async def test_retries_are_bounded_by_the_deadline(fake_ses: FakeSes) -> None:
    fake_ses.script(*[SesErrorReply(503, "ServiceUnavailable", "busy", "Receiver")] * 200)
    async with client_for(fake_ses, max_attempts=100, backoff_base=0.1, backoff_max=0.2) as client:
        started = time.monotonic()
        with pytest.raises(SesError) as caught:
            await client.send(simple_request(), deadline=0.6)
        elapsed = time.monotonic() - started
    assert caught.value.retryable
    assert elapsed < 0.6 + 1.0
    assert 1 < len(fake_ses.requests) < 100


async def test_deadline_bounds_a_hanging_answer(fake_ses: FakeSes) -> None:
    fake_ses.script(*[Delay()] * 5)  # never answers until the fake closes
    async with client_for(fake_ses, request_timeout=30.0) as client:
        started = time.monotonic()
        with pytest.raises(SesTransportError) as caught:
            await client.send(simple_request(), deadline=0.5)
        elapsed = time.monotonic() - started
    assert caught.value.code == "Timeout"
    assert caught.value.retryable
    assert (caught.value.smtp_reply.code, caught.value.smtp_reply.enhanced) == (451, "4.4.2")
    assert elapsed < 0.5 + 1.0


async def test_request_timeout_bounds_one_attempt(fake_ses: FakeSes) -> None:
    fake_ses.script(Delay())  # the first attempt hangs; the retry succeeds
    async with client_for(fake_ses, request_timeout=0.3) as client:
        started = time.monotonic()
        result = await client.send(simple_request(), deadline=5)
        elapsed = time.monotonic() - started
    assert result.message_id
    assert len(fake_ses.requests) == 2
    assert elapsed < 0.3 + 1.0


# --------------------------------------------------------------------------- credentials


async def test_bad_signature_invalidates_credentials_and_retries_with_new_ones(
    fake_ses: FakeSes,
) -> None:
    provider = CountingProvider(
        Credentials(fake_ses.access_key, "rotated-away-secret"), credentials_for(fake_ses)
    )
    async with SesClient(config_for(fake_ses), provider) as client:
        result = await client.send(simple_request(), deadline=5)
    assert result.message_id
    assert provider.invalidations == 1
    assert [r.auth_error for r in fake_ses.requests] == ["SignatureDoesNotMatch", None]


async def test_wrong_secret_ends_as_deferrable_without_hammering(fake_ses: FakeSes) -> None:
    provider = CountingProvider(Credentials(fake_ses.access_key, "wrong-secret"))
    async with SesClient(config_for(fake_ses, max_attempts=4), provider) as client:
        with pytest.raises(SesError) as caught:
            await client.send(simple_request(), deadline=5)
    assert caught.value.code == "SignatureDoesNotMatch"
    assert caught.value.disposition is D
    assert caught.value.refresh_credentials
    assert provider.invalidations >= 1
    assert 1 <= len(fake_ses.requests) <= 2


async def test_unknown_key_is_a_credential_error(fake_ses: FakeSes) -> None:
    provider = CountingProvider(Credentials("AKIANOSUCHKEY0000000", "whatever"))
    async with SesClient(config_for(fake_ses), provider) as client:
        with pytest.raises(SesError) as caught:
            await client.send(simple_request(), deadline=5)
    assert caught.value.code == "InvalidClientTokenId"
    assert caught.value.disposition is D
    assert caught.value.refresh_credentials
    assert provider.invalidations >= 1


async def test_scripted_expired_token_invalidates(fake_ses: FakeSes) -> None:
    fake_ses.script(
        SesErrorReply(403, "ExpiredToken", "The security token included in the request is expired")
    )
    provider = CountingProvider(credentials_for(fake_ses))
    async with SesClient(config_for(fake_ses), provider) as client:
        result = await client.send(simple_request(), deadline=5)
    assert result.message_id
    assert provider.invalidations == 1
    assert provider.gets == 2
    assert len(fake_ses.requests) == 2


# --------------------------------------------------------------------------- connections


async def test_sequential_sends_reuse_one_connection(fake_ses: FakeSes) -> None:
    async with client_for(fake_ses) as client:
        for _ in range(25):
            await client.send(simple_request(), deadline=5)
        await client.quota()
    assert len(fake_ses.requests) == 26
    assert fake_ses.connection_count == 1


async def test_concurrent_sends_are_not_serialised(fake_ses: FakeSes) -> None:
    release = asyncio.Event()
    fake_ses.script(*[Delay(release=release, timeout=5) for _ in range(8)])
    async with client_for(fake_ses) as client:
        calls = [asyncio.create_task(client.send(simple_request(), deadline=10)) for _ in range(8)]
        await fake_ses.wait_for_requests(8, within=5)
        assert fake_ses.max_in_flight == 8
        release.set()
        results = await asyncio.gather(*calls)
    assert len({r.message_id for r in results}) == 8


async def test_connection_refused_is_retryable_and_not_sent(fake_ses: FakeSes) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on ``port`` now.
    client = client_for(fake_ses, endpoint=f"https://127.0.0.1:{port}", max_attempts=2)
    async with client:
        started = time.monotonic()
        with pytest.raises(SesTransportError) as caught:
            await client.send(simple_request(), deadline=3)
    assert caught.value.code == "ConnectionError"
    assert caught.value.retryable
    assert caught.value.request_sent is False  # type: ignore[attr-defined]
    assert time.monotonic() - started < 3


async def test_untrusted_certificate_is_a_connection_error(fake_ses: FakeSes) -> None:
    async with client_for(fake_ses, ca_bundle="", max_attempts=1) as client:
        with pytest.raises(SesTransportError) as caught:
            await client.send(simple_request(), deadline=3)
    assert caught.value.code == "ConnectionError"
    assert caught.value.retryable
    assert fake_ses.requests == []


class NoCredentialsProvider:
    async def get(self) -> Credentials:
        raise CredentialsError("no AWS credentials found; tried, in order: environment")

    def invalidate(self) -> None:
        """Nothing to forget."""


async def test_missing_credentials_defer_the_mail_without_calling_ses(fake_ses: FakeSes) -> None:
    async with SesClient(config_for(fake_ses), NoCredentialsProvider()) as client:
        with pytest.raises(SesError) as caught:
            await client.send(simple_request())
    error = caught.value
    assert error.code == "NoCredentials"
    assert error.disposition is Disposition.DEFERRABLE
    assert str(error.smtp_reply) == "451 4.7.0 relay cannot authenticate to SES"
    assert "no AWS credentials found" in error.message
    assert fake_ses.requests == []
