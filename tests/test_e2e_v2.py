"""SMTP in, SES API v2 out: real SMTP clients against the running relay under
``ses.api = "v2"`` and ``"auto"``, the fake SES checking every signature.

What the relay does under v1 holds under v2: batching, Bcc, pauses,
throttling, bounces, metrics (``action="SendEmail"``); and the size limit
follows the API (EHLO SIZE, MAIL SIZE=, DATA).
"""

from __future__ import annotations

import email
import email.policy
import logging
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from relay.ses.limits import V1_MAX_MESSAGE, V2_MAX_MESSAGE
from tests.fakeses import Delay, FakeSes, Succeed, V2ErrorReply
from tests.relayd import running_relay
from tests.test_e2e import SENDER, message, send, wait_until_gone
from tests.test_pauses import FAST_RETRY, queue_id, queued_ids

V2 = {"api": "v2"}


def ses_calls(relay: Relay, action: str, outcome: str = "success", code: str = "") -> float:
    value = relay.metrics.registry.get_sample_value(
        "ses_relay_ses_requests_total", {"action": action, "outcome": outcome, "code": code}
    )
    return value or 0.0


async def test_a_message_goes_through_send_email_under_v2(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    listed = "X-SES-LIST-MANAGEMENT-OPTIONS: Newsletter; topic=Sports\r\n"
    raw = message(
        extra_headers=f"Bcc: hidden@example.com\r\nX-SES-CONFIGURATION-SET: tx\r\n{listed}"
    )
    fake_ses.script(Succeed(message_id="0100-v2-e2e"))
    async with running_relay(tmp_path, fake_ses, ses=V2) as relay:
        code, text = await send(relay, ["bob@example.net", "hidden@example.com"], raw)
        assert code == 250
        assert text.endswith(" sent as 0100-v2-e2e"), text
        assert ses_calls(relay, "SendEmail") == 1
        assert ses_calls(relay, "SendRawEmail") == 0
    [request] = fake_ses.requests
    assert request.action == "SendEmail"
    assert request.signature_ok
    body = request.json
    assert body["FromEmailAddress"] == SENDER
    assert body["Destination"] == {"ToAddresses": ["bob@example.net", "hidden@example.com"]}
    assert body["ConfigurationSetName"] == "tx"
    assert body["ListManagementOptions"] == {"ContactListName": "Newsletter", "TopicName": "Sports"}
    sent = request.raw_message or b""
    assert b"Bcc:" not in sent
    assert b"X-SES-CONFIGURATION-SET" not in sent
    assert sent == message(extra_headers=listed)  # byte for byte, less the removed headers


async def test_auto_sends_a_small_message_raw_and_a_15_mb_one_through_v2(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    large_body = ("x" * 998 + "\r\n") * (15 * 1024 * 1024 // 1000)
    large = message(body=large_body)
    assert V1_MAX_MESSAGE < len(large) < V2_MAX_MESSAGE
    async with running_relay(
        tmp_path, fake_ses, ses={"api": "auto"}, delivery={"inline_timeout": 20.0}
    ) as relay:
        assert (await send(relay, ["bob@example.net"], message()))[0] == 250
        code, text = await send(relay, ["bob@example.net"], large)
        assert code == 250
        assert " sent as " in text, text
        assert ses_calls(relay, "SendRawEmail") == 1
        assert ses_calls(relay, "SendEmail") == 1
    small_request, large_request = fake_ses.requests
    assert small_request.action == "SendRawEmail"
    assert small_request.raw_message == message()
    assert large_request.action == "SendEmail"
    assert large_request.signature_ok
    assert large_request.raw_message == large


async def test_120_recipients_go_in_batches_of_at_most_50_under_v2(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    recipients = [f"user{i}@example.net" for i in range(120)]
    raw = message(to="Team <team@example.org>")
    async with running_relay(tmp_path, fake_ses, ses=V2, smtp={"max_recipients": 200}) as relay:
        code, text = await send(relay, recipients, raw)
    assert code == 250, text
    assert len(text.split(" sent as ", 1)[1].split()) == 3
    sent = [r.destinations for r in fake_ses.requests]
    assert all(r.action == "SendEmail" for r in fake_ses.requests)
    assert all(len(batch) <= 49 for batch in sent)  # 50 less the one To: address
    assert sorted(a for batch in sent for a in batch) == sorted(recipients)
    assert all(set(r.json["Destination"]) == {"ToAddresses"} for r in fake_ses.requests)


async def test_throttling_under_v2_is_retried_and_slows_the_rate(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    fake_ses.script(
        V2ErrorReply(429, "TooManyRequestsException", "Maximum sending rate exceeded."),
        Succeed(message_id="0100-after-throttle"),
    )
    async with running_relay(tmp_path, fake_ses, ses=V2) as relay:
        code, text = await send(relay, ["bob@example.net"], message())
        assert code == 250
        assert text.endswith(" sent as 0100-after-throttle"), text
        assert ses_calls(relay, "SendEmail", "error", "TooManyRequestsException") == 1
        assert ses_calls(relay, "SendEmail") == 1
    assert [r.action for r in fake_ses.requests] == ["SendEmail", "SendEmail"]


async def test_sending_paused_under_v2_pauses_every_delivery(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ses.script(V2ErrorReply(400, "SendingPausedException", "Sending is paused."))
    async with running_relay(tmp_path, fake_ses, ses=V2, delivery=FAST_RETRY) as relay:
        code, text = await send(relay, ["first@example.net"], message())
        first = queue_id(text)
        assert code == 250
        assert "pausing all delivery for 900s: SendingPausedException: Sending is paused." in (
            caplog.text
        )
        code, text = await send(relay, ["second@example.net"], message())
        second = queue_id(text)
        assert len(fake_ses.requests) == 1  # queued at once, SES not asked
        relay.retry_now()
        await wait_until_gone(relay, first)
        await wait_until_gone(relay, second)
    assert [r.action for r in fake_ses.requests] == ["SendEmail"] * 3


async def test_get_account_sending_disabled_pauses_delivery(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ses.sending_enabled = False
    quota_read = Delay(timeout=0.0)
    fake_ses.script(quota_read)
    async with running_relay(
        tmp_path, fake_ses, ses=V2 | {"max_send_rate": 0.0}, delivery=FAST_RETRY
    ) as relay:
        await quota_read.arrived.wait()
        code, text = await send(relay, ["bob@example.net"], message())
        assert code == 250
        assert queue_id(text) in await queued_ids(relay)
        assert "pausing all delivery for 900s: SendingDisabled" in caplog.text
    assert [r.action for r in fake_ses.requests] == ["GetAccount"]


async def test_get_account_refused_is_a_warning_and_mail_flows(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    denied = V2ErrorReply(403, "AccessDeniedException", "not authorized to perform ses:GetAccount")
    fake_ses.script(denied)
    caplog.set_level(logging.WARNING)
    async with running_relay(tmp_path, fake_ses, ses=V2 | {"max_send_rate": 0.0}) as relay:
        code, text = await send(relay, ["bob@example.net"], message())
        assert code == 250
        assert " sent as " in text, text
    assert "cannot read the SES send quota: AccessDeniedException" in caplog.text
    assert [r.action for r in fake_ses.requests] == ["GetAccount", "SendEmail"]


async def test_a_refusal_after_250_under_v2_bounces_through_send_email(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    fake_ses.script(
        V2ErrorReply(400, "MailFromDomainNotVerifiedException", "MAIL FROM not verified."),
        V2ErrorReply(400, "MessageRejected", "Email address is not verified."),
    )
    async with running_relay(tmp_path, fake_ses, ses=V2, delivery=FAST_RETRY) as relay:
        code, text = await send(relay, ["bob@example.net"], message())
        assert code == 250
        queue_id(text)
        await fake_ses.wait_for_requests(3, within=10)
    bounce = fake_ses.requests[2]
    assert bounce.action == "SendEmail"
    assert bounce.destinations == [SENDER]
    report = email.message_from_bytes(bounce.raw_message or b"", policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert "rfc822; bob@example.net\r\n" in (bounce.raw_message or b"").decode("ascii")


# --------------------------------------------------------------------------- the size limit


async def mail_from_size(relay: Relay, size: int) -> tuple[int, str, dict[str, str]]:
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=15) as client:
        await client.ehlo()
        extensions = dict(client.esmtp_extensions)
        reply = await client.execute_command(f"MAIL FROM:<{SENDER}> SIZE={size}".encode())
    return reply.code, reply.message, extensions


@pytest.mark.parametrize(
    ("api", "limit"), [("v1", V1_MAX_MESSAGE), ("v2", V2_MAX_MESSAGE), ("auto", V2_MAX_MESSAGE)]
)
async def test_the_size_limit_follows_the_api(
    tmp_path: Path, fake_ses: FakeSes, api: str, limit: int
) -> None:
    async with running_relay(tmp_path, fake_ses, ses={"api": api}) as relay:
        code, text, extensions = await mail_from_size(relay, limit + 1)
        assert extensions["size"] == str(limit)
        assert (code, text) == (552, "5.3.4 Message size exceeds fixed maximum message size")
        code, _, _ = await mail_from_size(relay, limit)
        assert code == 250


async def test_max_message_size_overrides_the_api_limit(tmp_path: Path, fake_ses: FakeSes) -> None:
    async with running_relay(tmp_path, fake_ses, ses=V2, smtp={"max_message_size": 5000}) as relay:
        code, _, extensions = await mail_from_size(relay, 5001)
    assert extensions["size"] == "5000"
    assert code == 552


@pytest.mark.parametrize(("api", "accepted"), [("v1", False), ("v2", True), ("auto", True)])
async def test_data_over_v1s_limit_is_refused_only_under_v1(
    tmp_path: Path, fake_ses: FakeSes, api: str, accepted: bool
) -> None:
    raw = message(body=("y" * 998 + "\r\n") * (V1_MAX_MESSAGE // 1000 + 1))
    assert len(raw) > V1_MAX_MESSAGE
    settings: dict[str, Any] = {"api": api}
    async with running_relay(tmp_path, fake_ses, ses=settings) as relay:
        host, port = relay.smtp_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as client:
            await client.ehlo()
            client.esmtp_extensions.pop("size")  # send it whole, as a client that ignores SIZE
            await client.mail(SENDER)
            await client.rcpt("bob@example.net")
            try:
                reply = await client.data(raw)
            except aiosmtplib.SMTPDataError as refused:
                reply = aiosmtplib.SMTPResponse(refused.code, refused.message)
    if accepted:
        assert reply.code == 250, reply
        assert [r.action for r in fake_ses.requests] == ["SendEmail"]
    else:
        assert (reply.code, reply.message[:5]) == (552, "5.3.4"), reply
        assert fake_ses.requests == []
