"""The SES API v2 client against the fake SES: the SendEmail body, GetAccount,
the errors and their classes, garbage answers, retries; and the body
builder's chunked form against its whole form.

Every request crosses a real TLS socket to ``FakeSes``, which checks the
SigV4 signature with botocore as the oracle and records what it received.
"""

from __future__ import annotations

import base64
import itertools
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import Disposition, SesError
from relay.ses.api import AutoSender, connect
from relay.ses.credentials import StaticProvider
from relay.ses.limits import V1_MAX_MESSAGE
from relay.ses.sender import RawMessage, SendQuota, SendRequest, SesParameters
from relay.ses.sigv4 import Credentials
from relay.ses.v2 import SesV2Client
from relay.ses.v2body import send_email_chunks, send_email_fields
from tests.fakeses import (
    Delay,
    FakeSes,
    RawReply,
    SesErrorReply,
    Succeed,
    V2ErrorReply,
)
from tests.test_clients import ROOT, readme_snippet
from tests.test_ses_client import MESSAGE, config_for, credentials_for

R, D, P = Disposition.RETRYABLE, Disposition.DEFERRABLE, Disposition.PERMANENT

PARAMETERS = SesParameters(
    configuration_set="transactional",
    tags=(("app", "billing"), ("kind", "invoice")),
    source_arn="arn:aws:ses:us-east-1:123456789012:identity/example.com",
    from_arn="arn:aws:ses:us-east-1:123456789012:identity/other.example.com",
    return_path_arn="arn:aws:ses:us-east-1:123456789012:identity/bounces.example.com",
    contact_list="Newsletter",
    topic="Sports",
)
REQUEST = SendRequest(
    raw_message=RawMessage.of(MESSAGE),
    destinations=("alice@example.net", "bob@example.org", "hidden@example.com"),
    source="ops@example.com",
    ses=PARAMETERS,
)


def v2_client(fake: FakeSes, **overrides: object) -> SesV2Client:
    return SesV2Client(config_for(fake, **overrides), StaticProvider(credentials_for(fake)))


# --------------------------------------------------------------------------- the wire


async def test_send_email_carries_the_batch_as_ses_v2_defines_it(fake_ses: FakeSes) -> None:
    observed: list[tuple[str, str]] = []
    fake_ses.script(Succeed(message_id="0100-v2-message"))
    config = config_for(fake_ses)
    client = SesV2Client(
        config,
        StaticProvider(credentials_for(fake_ses)),
        observe=lambda action, code, _: observed.append((action, code)),
    )
    async with client:
        result = await client.send(REQUEST, deadline=10)
    assert result.message_id == "0100-v2-message"
    assert result.request_id is not None
    [request] = fake_ses.requests
    assert request.signature_ok
    assert (request.method, request.path_qs) == ("POST", "/v2/email/outbound-emails")
    assert request.headers["Content-Type"] == "application/json"
    body = json.loads(request.body)
    assert body == {
        "FromEmailAddress": "ops@example.com",
        "FromEmailAddressIdentityArn": PARAMETERS.source_arn,
        "Destination": {"ToAddresses": list(REQUEST.destinations)},
        "FeedbackForwardingEmailAddressIdentityArn": PARAMETERS.return_path_arn,
        "EmailTags": [{"Name": "app", "Value": "billing"}, {"Name": "kind", "Value": "invoice"}],
        "ConfigurationSetName": "transactional",
        "ListManagementOptions": {"ContactListName": "Newsletter", "TopicName": "Sports"},
        "Content": {"Raw": {"Data": base64.b64encode(MESSAGE).decode()}},
    }
    assert request.raw_message == MESSAGE  # 8-bit bytes intact
    assert observed == [("SendEmail", "")]


async def test_the_from_arn_is_the_identity_arn_without_a_source_arn(fake_ses: FakeSes) -> None:
    ses = SesParameters(from_arn="arn:aws:ses:us-east-1:1:identity/a.example")
    async with v2_client(fake_ses) as client:
        await client.send(
            SendRequest(RawMessage.of(MESSAGE), ("a@example.net",), "o@a.example", ses), deadline=5
        )
    body = fake_ses.requests[0].json
    assert body["FromEmailAddressIdentityArn"] == ses.from_arn
    assert "ConfigurationSetName" not in body
    assert "EmailTags" not in body


async def test_get_account_gives_the_quota_and_sending_enabled(fake_ses: FakeSes) -> None:
    fake_ses.quota = {"max_24_hour_send": -1.0, "max_send_rate": 25.0, "sent_last_24_hours": 3.0}
    fake_ses.sending_enabled = False
    async with v2_client(fake_ses) as client:
        quota = await client.quota()
    assert quota == SendQuota(-1.0, 25.0, 3.0, sending_enabled=False)
    [request] = fake_ses.requests
    assert (request.method, request.path_qs, request.body) == ("GET", "/v2/email/account", b"")
    assert request.signature_ok


async def test_an_endpoint_with_a_path_prefixes_the_v2_paths(fake_ses: FakeSes) -> None:
    async with v2_client(fake_ses, endpoint=f"{fake_ses.url}/ses/") as client:
        with pytest.raises(SesError) as caught:
            await client.quota()
    # The fake serves v2 at the root only (its Query API's XML refusal is no
    # v2 answer): the prefix was used, and signed.
    assert fake_ses.requests[0].path_qs == "/ses/v2/email/account"
    assert fake_ses.requests[0].signature_ok
    assert caught.value.code == "MalformedResponse"


async def test_auto_sends_what_fits_v1_through_send_raw_email_and_the_rest_through_v2(
    fake_ses: FakeSes,
) -> None:
    config = config_for(fake_ses, api="auto")
    credentials = StaticProvider(credentials_for(fake_ses))
    async with v2_client(fake_ses) as owner:  # only for its session
        ses = connect(config, credentials, session=owner.session)
        assert isinstance(ses.sender, AutoSender)
        fits = b"x" * (V1_MAX_MESSAGE - len(MESSAGE))
        await ses.sender.send(
            SendRequest(RawMessage.of(MESSAGE + fits), ("a@example.net",), "o@e.com"), deadline=10
        )
        await ses.sender.send(
            SendRequest(RawMessage.of(MESSAGE + fits + b"y"), ("a@example.net",), "o@e.com"),
            deadline=10,
        )
        quota = await ses.sender.quota()
    assert [r.action for r in fake_ses.requests] == ["SendRawEmail", "SendEmail", "GetSendQuota"]
    assert len(fake_ses.requests[1].raw_message or b"") == V1_MAX_MESSAGE + 1
    assert quota.max_send_rate == fake_ses.quota["max_send_rate"]


# --------------------------------------------------------------------------- errors

ERRORS = [
    # status, code, message, class, SMTP reply, account pause
    (429, "TooManyRequestsException", "Maximum sending rate exceeded.", R, "451 4.4.5", 0.0),
    (429, "TooManyRequestsException", "Daily message quota exceeded.", D, "451 4.3.2", 900.0),
    (400, "LimitExceededException", "Daily message quota exceeded.", D, "451 4.3.2", 900.0),
    (400, "LimitExceededException", "Maximum sending rate exceeded.", R, "451 4.4.5", 0.0),
    (400, "LimitExceededException", "Limit exceeded.", D, "451 4.3.2", 900.0),
    (400, "SendingPausedException", "Sending is paused for this account.", D, "451 4.3.2", 900.0),
    (
        400,
        "SendingPausedException",
        "Sending is paused for this configuration set.",
        D,
        "451 4.3.2",
        0.0,
    ),
    (400, "AccountSuspendedException", "The account is suspended.", D, "451 4.3.2", 900.0),
    (400, "MailFromDomainNotVerifiedException", "MAIL FROM unverified.", D, "451 4.7.1", 0.0),
    (400, "MessageRejected", "Email address is not verified.", P, "554 5.7.1", 0.0),
    (404, "NotFoundException", "Configuration set <x> does not exist.", P, "554 5.3.5", 0.0),
    (400, "BadRequestException", "Invalid tag value.", P, "554 5.6.0", 0.0),
    (
        403,
        "AccessDeniedException",
        "not authorized to perform ses:SendRawEmail",
        P,
        "554 5.7.1",
        0.0,
    ),
    (400, "ThrottlingException", "Rate exceeded", R, "451 4.4.5", 0.0),
    (403, "UnrecognizedClientException", "The security token is invalid.", D, "451 4.7.0", 60.0),
    (500, "InternalFailure", "Internal failure.", R, "451 4.3.0", 0.0),
    (503, "ServiceUnavailableException", "Unavailable.", R, "451 4.3.0", 0.0),
    (400, "SomethingNewException", "New to us.", D, "451 4.3.0", 0.0),
]


@pytest.mark.parametrize(
    ("status", "code", "message", "disposition", "reply", "pause"),
    ERRORS,
    ids=[f"{e[1]}:{e[2][:20]}" for e in ERRORS],
)
async def test_v2_errors_fall_in_their_class_with_their_reply(
    fake_ses: FakeSes,
    status: int,
    code: str,
    message: str,
    disposition: Disposition,
    reply: str,
    pause: float,
) -> None:
    fake_ses.script(*[V2ErrorReply(status, code, message)] * 3)
    async with v2_client(fake_ses, max_attempts=1) as client:
        with pytest.raises(SesError) as caught:
            await client.send(REQUEST, deadline=5)
    error = caught.value
    assert (error.code, error.message, error.http_status) == (code, message, status)
    assert error.disposition is disposition
    assert f"{error.smtp_reply.code} {error.smtp_reply.enhanced}" == reply
    assert error.pause == pause
    assert error.request_id is not None
    if disposition is P:
        assert message in error.smtp_reply.text


@pytest.mark.parametrize(
    "reply",
    [
        V2ErrorReply(400, "MessageRejected", "Email address is not verified.", in_body=False),
        V2ErrorReply(400, "MessageRejected", "Email address is not verified.", in_header=False),
        V2ErrorReply(
            400, "MessageRejected", "Email address is not verified.", message_key="Message"
        ),
        V2ErrorReply(400, "MessageRejected", "Email address is not verified.", header_suffix=""),
    ],
    ids=["header only", "body only", "Message", "header without suffix"],
)
async def test_the_code_is_read_from_the_header_or_the_body(
    fake_ses: FakeSes, reply: V2ErrorReply
) -> None:
    fake_ses.script(reply)
    async with v2_client(fake_ses, max_attempts=1) as client:
        with pytest.raises(SesError) as caught:
            await client.send(REQUEST, deadline=5)
    assert (caught.value.code, caught.value.message) == (
        "MessageRejected",
        "Email address is not verified.",
    )
    assert caught.value.disposition is P


async def test_a_code_in_the_body_as_code_is_read(fake_ses: FakeSes) -> None:
    body = json.dumps({"code": "NotFoundException", "message": "no such set"}).encode()
    fake_ses.script(RawReply(404, body, "application/json"))
    async with v2_client(fake_ses, max_attempts=1) as client:
        with pytest.raises(SesError) as caught:
            await client.send(REQUEST, deadline=5)
    assert (caught.value.code, caught.value.disposition) == ("NotFoundException", P)


GARBAGE = [
    (200, b"not json at all \xff\xfe"),
    (200, b"[" * 50_000 + b"]" * 50_000),  # nesting deep enough to exhaust the recursion limit
    (200, b'{"MessageId": ' + b"9" * 5000 + b"}"),  # an integer too long to convert
    (200, b'["MessageId"]'),
    (200, b'{"MessageId": 12}'),
    (400, b"<html>Bad Request</html>"),
    (400, b'{"message": "no code anywhere"}'),
    (400, b"[" * 50_000),
    (502, b"<html>Bad Gateway</html>"),
]


@pytest.mark.parametrize(("status", "body"), GARBAGE, ids=range(len(GARBAGE)))
async def test_garbage_json_is_a_usable_error_never_a_crash(
    fake_ses: FakeSes, status: int, body: bytes
) -> None:
    fake_ses.script(RawReply(status, body, "application/json"))
    async with v2_client(fake_ses, max_attempts=1, max_response_size=200_000) as client:
        with pytest.raises(SesError) as caught:
            await client.send(REQUEST, deadline=5)
    assert caught.value.retryable, repr(caught.value)
    assert caught.value.code in ("MalformedResponse", f"HTTP{status}")


async def test_a_message_id_that_is_no_token_counts_as_sent_without_it(fake_ses: FakeSes) -> None:
    fake_ses.script(RawReply(200, b'{"MessageId": "a\\r\\n250 forged"}', "application/json"))
    async with v2_client(fake_ses, max_attempts=1) as client:
        result = await client.send(REQUEST, deadline=5)
    assert (result.message_id, result.unusable_id) == (None, "a 250 forged")


async def test_a_json_answer_larger_than_max_response_size_is_not_read(fake_ses: FakeSes) -> None:
    body = json.dumps({"MessageId": "x" * 10_000}).encode()
    fake_ses.script(RawReply(200, body, "application/json"))
    async with v2_client(fake_ses, max_attempts=1, max_response_size=4096) as client:
        with pytest.raises(SesError) as caught:
            await client.send(REQUEST, deadline=5)
    assert caught.value.code == "ResponseTooLarge"


@pytest.mark.parametrize(
    "body",
    [
        b'{"SendQuota": {"Max24HourSend": 1, "MaxSendRate": "fast", "SentLast24Hours": 0}}',
        b'{"SendQuota": {"Max24HourSend": 1, "MaxSendRate": 1e999, "SentLast24Hours": 0}}',
        b'{"SendQuota": {"Max24HourSend": 1, "MaxSendRate": true, "SentLast24Hours": 0}}',
        b'{"SendQuota": {"Max24HourSend": -5, "MaxSendRate": 1, "SentLast24Hours": 0}}',
        b'{"SendQuota": {"Max24HourSend": 1, "MaxSendRate": 1, "SentLast24Hours": 0},'
        b' "SendingEnabled": "no"}',
        b'{"SendingEnabled": true}',
        b"{}",
    ],
)
async def test_an_unusable_account_answer_is_malformed(fake_ses: FakeSes, body: bytes) -> None:
    fake_ses.script(RawReply(200, body, "application/json"))
    async with v2_client(fake_ses, max_attempts=1) as client:
        with pytest.raises(SesError) as caught:
            await client.quota()
    assert caught.value.code == "MalformedResponse"


async def test_throttling_is_retried_inside_the_client(fake_ses: FakeSes) -> None:
    fake_ses.script(
        V2ErrorReply(429, "TooManyRequestsException", "Maximum sending rate exceeded."),
        Delay(timeout=0.01, then=Succeed(message_id="0100-after-retry")),
    )
    async with v2_client(fake_ses) as client:
        result = await client.send(REQUEST, deadline=10)
    assert result.message_id == "0100-after-retry"
    assert [r.action for r in fake_ses.requests] == ["SendEmail", "SendEmail"]
    assert all(r.signature_ok for r in fake_ses.requests)


async def test_a_refused_signature_on_v2_is_a_credentials_error(fake_ses: FakeSes) -> None:
    async with SesV2Client(
        config_for(fake_ses, max_attempts=1),
        StaticProvider(Credentials(fake_ses.access_key, "wrong-secret")),
    ) as client:
        with pytest.raises(SesError) as caught:
            await client.send(REQUEST, deadline=5)
    assert caught.value.code == "SignatureDoesNotMatch"
    assert caught.value.disposition is D
    assert not fake_ses.requests[0].signature_ok


async def test_a_query_api_error_shape_on_v2_is_judged_by_status(fake_ses: FakeSes) -> None:
    fake_ses.script(SesErrorReply(400, "MessageRejected", "xml, not json"))
    async with v2_client(fake_ses, max_attempts=1) as client:
        with pytest.raises(SesError) as caught:
            await client.send(REQUEST, deadline=5)
    assert caught.value.code == "MalformedResponse"


# --------------------------------------------------------------------------- the body


@given(
    message=st.binary(max_size=2000),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_the_chunked_body_equals_the_whole_body(message: bytes, cuts: list[int]) -> None:
    points = sorted({0, len(message), *(c for c in cuts if c <= len(message))})
    chunks = [message[a:b] for a, b in itertools.pairwise(points)]
    request = SendRequest(RawMessage.of(message), ("a@example.net",), "o@example.com", PARAMETERS)
    streamed = b"".join(send_email_chunks(request, chunks))
    whole = send_email_fields(request) | {
        "Content": {"Raw": {"Data": base64.b64encode(message).decode()}}
    }
    assert json.loads(streamed) == whole


def test_the_v2_iam_policy_allows_what_the_v2_client_calls() -> None:
    policy = json.loads(readme_snippet("iam-policy-v2"))
    allowed = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"]
        allowed.update([actions] if isinstance(actions, str) else actions)
    source = (ROOT / "relay" / "ses" / "v2.py").read_text()
    assert set(re.findall(r'Call\(\s*"(\w+)"', source)) == {"SendEmail", "GetAccount"}
    # A raw SendEmail is authorized as ses:SendRawEmail; the bounce-sender check is v1's.
    assert allowed == {
        "ses:SendRawEmail",
        "ses:GetAccount",
        "ses:GetIdentityVerificationAttributes",
    }
