"""relay's SES client against hostile or broken answers.

Every answer here must end as a typed, retryable ``SesError`` within the
call's bounds: no hang, no unbounded memory, no entity expansion, no file read.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from pathlib import Path

import pytest

from relay.config import SesConfig
from relay.errors import SesError, SesTransportError
from relay.ses.client import SesClient
from relay.ses.credentials import StaticProvider
from relay.ses.sender import RawMessage, SendRequest
from relay.ses.sigv4 import Credentials
from tests.fakeses import (
    GARBAGE_BODY,
    HTML_BODY,
    SES_XMLNS,
    Behaviour,
    CloseWithoutAnswer,
    FakeSes,
    HugeBody,
    RawReply,
    ResetMidBody,
    Trickle,
    billion_laughs_body,
    error_body,
    get_send_quota_body,
    send_raw_email_body,
    success_without_message_id_body,
    xxe_body,
)

REQUEST = SendRequest(
    raw_message=RawMessage.of(
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: t\r\n\r\nhi\r\n"
    ),
    destinations=("b@example.com",),
)

REQUEST_TIMEOUT = 1.0
SLACK = 1.0


def hostile_client(fake: FakeSes, **overrides: object) -> SesClient:
    settings: dict[str, object] = {
        "region": fake.region,
        "endpoint": fake.url,
        "ca_bundle": fake.ca_pem_path,
        "connect_timeout": 1.0,
        "request_timeout": REQUEST_TIMEOUT,
        "max_attempts": 1,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
    }
    settings.update(overrides)
    config = SesConfig(**settings)  # type: ignore[arg-type]
    return SesClient(config, StaticProvider(Credentials(fake.access_key, fake.secret_key)))


async def failing_send(fake: FakeSes, deadline: float = 3.0, **overrides: object) -> SesError:
    """Send once; return the SesError it must raise, checking the time bound."""
    async with hostile_client(fake, **overrides) as client:
        started = time.monotonic()
        with pytest.raises(SesError) as caught:
            await client.send(REQUEST, deadline=deadline)
        elapsed = time.monotonic() - started
    assert elapsed < deadline + SLACK, f"took {elapsed:.2f}s"
    assert caught.value.retryable, repr(caught.value)
    return caught.value


MALFORMED_CASES: list[tuple[str, Behaviour]] = [
    ("billion-laughs-200", RawReply(200, billion_laughs_body())),
    ("billion-laughs-400", RawReply(400, billion_laughs_body())),
    ("html-200", RawReply(200, HTML_BODY, "text/html")),
    ("html-400", RawReply(400, HTML_BODY, "text/html")),
    ("no-message-id-200", RawReply(200, success_without_message_id_body())),
    ("empty-message-id-200", RawReply(200, send_raw_email_body("", "req-1"))),
    ("garbage-200", RawReply(200, GARBAGE_BODY, "application/octet-stream")),
    ("garbage-400", RawReply(400, GARBAGE_BODY, "application/octet-stream")),
    ("empty-200", RawReply(200, b"", None)),
    ("empty-400", RawReply(400, b"", None)),
    ("truncated-xml-200", RawReply(200, send_raw_email_body("id-1", "req-1")[:60])),
    (
        "wrong-root-200",
        RawReply(200, f'<GetSendQuotaResponse xmlns="{SES_XMLNS}"/>'.encode()),
    ),
]


@pytest.mark.parametrize(
    "behaviour", [case[1] for case in MALFORMED_CASES], ids=[case[0] for case in MALFORMED_CASES]
)
async def test_unusable_answers_are_malformed_responses(
    fake_ses: FakeSes, behaviour: Behaviour
) -> None:
    fake_ses.script(behaviour)
    error = await failing_send(fake_ses)
    assert isinstance(error, SesTransportError)
    assert error.code == "MalformedResponse"
    assert (error.smtp_reply.code, error.smtp_reply.enhanced) == (451, "4.3.0")
    assert len(fake_ses.requests) == 1


@pytest.mark.parametrize(
    "behaviour",
    [
        RawReply(500, GARBAGE_BODY, "application/octet-stream"),
        RawReply(503, b"", None),
        RawReply(502, HTML_BODY, "text/html"),
        RawReply(504, billion_laughs_body()),
    ],
    ids=["garbage-500", "empty-503", "html-502", "billion-laughs-504"],
)
async def test_5xx_without_ses_error_is_retryable(fake_ses: FakeSes, behaviour: Behaviour) -> None:
    fake_ses.script(behaviour)
    error = await failing_send(fake_ses)
    assert error.http_status in (500, 502, 503, 504)
    assert error.smtp_reply.code == 451


async def test_xxe_never_reads_the_file(fake_ses: FakeSes, tmp_path: Path) -> None:
    canary = tmp_path / "secret.txt"
    canary.write_text("TOP-SECRET-CANARY-7f3a")
    fake_ses.script(RawReply(200, xxe_body(canary)), RawReply(403, xxe_body(canary)))
    for _ in range(2):
        error = await failing_send(fake_ses)
        assert isinstance(error, SesTransportError)
        assert error.code == "MalformedResponse"
        for text in (str(error), repr(error), error.message, str(error.smtp_reply)):
            assert "TOP-SECRET-CANARY" not in text


async def test_billion_laughs_is_refused_quickly_and_small(fake_ses: FakeSes) -> None:
    fake_ses.script(RawReply(200, billion_laughs_body()))
    tracemalloc.start()
    try:
        error = await failing_send(fake_ses, deadline=2.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.code == "MalformedResponse"
    assert peak < 10 * 1024 * 1024


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
@pytest.mark.parametrize("status", [200, 500])
async def test_100mb_answer_is_cut_off_with_bounded_memory(
    fake_ses: FakeSes, chunked: bool, status: int
) -> None:
    huge = HugeBody(size=100 * 1024 * 1024, chunked=chunked, status=status)
    fake_ses.script(huge)
    tracemalloc.start()
    try:
        error = await failing_send(fake_ses, deadline=5.0, request_timeout=5.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(error, SesTransportError)
    assert error.code == "ResponseTooLarge"
    assert (error.smtp_reply.code, error.smtp_reply.enhanced) == (451, "4.3.0")
    assert peak < 10 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
    # Let the fake notice the client left, then check how much it pushed out.
    for _ in range(100):
        if fake_ses.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert huge.bytes_sent < 20 * 1024 * 1024


async def test_answer_exactly_at_the_size_limit_is_accepted(fake_ses: FakeSes) -> None:
    limit = 4096
    body = send_raw_email_body("0100-at-the-limit", "req-limit")
    fake_ses.script(
        RawReply(200, body + b" " * (limit - len(body))),
        RawReply(200, body + b" " * (limit + 1 - len(body))),
    )
    async with hostile_client(fake_ses, max_response_size=limit) as client:
        result = await client.send(REQUEST, deadline=3)
        assert result.message_id == "0100-at-the-limit"
        with pytest.raises(SesTransportError) as caught:
            await client.send(REQUEST, deadline=3)
    assert caught.value.code == "ResponseTooLarge"


async def test_trickle_forever_is_bounded_by_the_request_timeout(fake_ses: FakeSes) -> None:
    """Bytes keep coming, so a per-read timeout never fires; the attempt's total must."""
    trickle = Trickle(interval=0.02)
    fake_ses.script(trickle)
    async with hostile_client(fake_ses) as client:
        started = time.monotonic()
        with pytest.raises(SesTransportError) as caught:
            await client.send(REQUEST, deadline=30.0)
        elapsed = time.monotonic() - started
    assert caught.value.code == "Timeout"
    assert caught.value.retryable
    assert (caught.value.smtp_reply.code, caught.value.smtp_reply.enhanced) == (451, "4.4.2")
    assert elapsed < REQUEST_TIMEOUT + SLACK, f"took {elapsed:.2f}s"
    assert trickle.bytes_sent > 10  # it really was trickling


async def test_trickle_with_retries_is_bounded_by_the_deadline(fake_ses: FakeSes) -> None:
    fake_ses.script(*[Trickle(interval=0.02) for _ in range(10)])
    async with hostile_client(fake_ses, max_attempts=10) as client:
        started = time.monotonic()
        with pytest.raises(SesTransportError) as caught:
            await client.send(REQUEST, deadline=1.5)
        elapsed = time.monotonic() - started
    assert caught.value.code == "Timeout"
    assert elapsed < 1.5 + SLACK, f"took {elapsed:.2f}s"


@pytest.mark.parametrize(
    "behaviour",
    [ResetMidBody(), ResetMidBody(status=400), CloseWithoutAnswer()],
    ids=["reset-mid-body-200", "reset-mid-body-400", "close-without-answer"],
)
async def test_connection_dropped_mid_answer(fake_ses: FakeSes, behaviour: Behaviour) -> None:
    fake_ses.script(behaviour)
    error = await failing_send(fake_ses)
    assert isinstance(error, SesTransportError)
    assert error.code == "ConnectionError"
    assert (error.smtp_reply.code, error.smtp_reply.enhanced) == (451, "4.4.1")
    assert error.request_sent is True  # type: ignore[attr-defined]


async def test_reset_then_success_is_retried(fake_ses: FakeSes) -> None:
    fake_ses.script(ResetMidBody())
    async with hostile_client(fake_ses, max_attempts=3) as client:
        result = await client.send(REQUEST, deadline=5)
    assert result.message_id
    assert len(fake_ses.requests) == 2


async def test_client_survives_hostile_answers_on_one_pool(fake_ses: FakeSes) -> None:
    """After every kind of bad answer, the same client still delivers."""
    fake_ses.script(
        ResetMidBody(),
        RawReply(200, HTML_BODY, "text/html"),
        HugeBody(size=10 * 1024 * 1024),
        RawReply(200, billion_laughs_body()),
        CloseWithoutAnswer(),
    )
    async with hostile_client(fake_ses) as client:
        for _ in range(5):
            with pytest.raises(SesError):
                await client.send(REQUEST, deadline=3)
        result = await client.send(REQUEST, deadline=3)
    assert result.message_id
    assert len(fake_ses.requests) == 6


CRLF_FORGERY = b"&#13;&#10;250 forged&#13;&#10;"


async def test_message_id_that_is_not_a_token_is_accepted_without_it(
    fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    body = send_raw_email_body("0100-ok", "req-1").replace(b"0100-ok", b"0100-ok" + CRLF_FORGERY)
    fake_ses.script(RawReply(200, body))
    async with hostile_client(fake_ses) as client:
        result = await client.send(REQUEST)
    assert (result.message_id, result.request_id) == (None, "req-1")
    assert result.unusable_id == "0100-ok 250 forged"
    assert len(fake_ses.requests) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "relay.ses"] == [
        "SES accepted a message (request req-1) with a MessageId that is not a token, "
        "not used: '0100-ok 250 forged'"
    ]


@pytest.mark.parametrize(
    "request_id", [b"req&#13;&#10;forged", b"r" * 129, b"req id"], ids=["crlf", "long", "space"]
)
async def test_request_id_that_is_not_a_token_is_dropped(
    fake_ses: FakeSes, request_id: bytes
) -> None:
    body = send_raw_email_body("0100-ok", "REQ").replace(b"REQ", request_id)
    fake_ses.script(RawReply(200, body))
    async with hostile_client(fake_ses) as client:
        result = await client.send(REQUEST)
    assert (result.message_id, result.request_id) == ("0100-ok", None)


async def test_error_message_is_flattened_and_bounded(fake_ses: FakeSes) -> None:
    text = "Email address is not verified.MARK" + "x" * 5000
    body = error_body("MessageRejected", text, "req-1").replace(
        b"MARK", CRLF_FORGERY + b"&#x9B;[31m&#x202E;&#x2028;"
    )
    fake_ses.script(RawReply(400, body))
    async with hostile_client(fake_ses) as client:
        with pytest.raises(SesError) as caught:
            await client.send(REQUEST)
    error = caught.value
    assert error.message.startswith("Email address is not verified. 250 forged [31m xxx")
    assert len(error.message) == 500
    assert error.message.isprintable()
    reply = str(error.smtp_reply)
    assert reply.startswith("554 5.7.1 message rejected by SES: Email address is not verified. ")
    assert reply.isprintable()
    assert len(reply) <= 510


@pytest.mark.parametrize(
    ("status", "code"), [(400, "MalformedResponse"), (503, "HTTP503")], ids=["4xx", "5xx"]
)
async def test_error_code_that_is_not_a_token_is_judged_by_status(
    fake_ses: FakeSes, status: int, code: str
) -> None:
    body = error_body("Throttling", "Maximum sending rate exceeded.", "req-1").replace(
        b"<Code>Throttling", b"<Code>Throttling" + CRLF_FORGERY
    )
    fake_ses.script(RawReply(status, body))
    error = await failing_send(fake_ses)
    assert error.code == code


@pytest.mark.parametrize("figure", ["nan", "inf", "-1", "1e999"])
async def test_quota_figures_must_be_finite(fake_ses: FakeSes, figure: str) -> None:
    body = get_send_quota_body(50000, 14, 127, "req-1").replace(b"14", figure.encode(), 1)
    fake_ses.script(RawReply(200, body))
    async with hostile_client(fake_ses) as client:
        with pytest.raises(SesTransportError) as caught:
            await client.quota()
    assert caught.value.code == "MalformedResponse"
