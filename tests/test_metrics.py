"""/metrics, /healthz and /readyz of a running relay, read over HTTP after
real SMTP traffic through the fake SES: the values are exact."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from platform import python_version
from typing import Any

import aiohttp
import aiosmtplib
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from relay import __version__
from relay.app import Relay
from tests.fakeses import FakeSes, SesErrorReply
from tests.relayd import running_relay
from tests.smtpserver import EHLO, OVER_HIGH_WATER, RawClient, stalled_client
from tests.test_e2e import message, send

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@asynccontextmanager
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def url(relay: Relay, path: str) -> str:
    assert relay.metrics_address is not None
    host, port = relay.metrics_address
    return f"http://{host}:{port}{path}"


async def scrape(relay: Relay) -> Samples:
    async with http() as session, session.get(url(relay, "/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def get_json(relay: Relay, path: str) -> tuple[int, Any]:
    async with http() as session, session.get(url(relay, path)) as response:
        return response.status, await response.json()


async def test_metrics_count_what_happened(tmp_path: Path, fake_ses: FakeSes) -> None:
    async with running_relay(tmp_path, fake_ses, ses={"max_attempts": 1}) as relay:
        before = await scrape(relay)
        assert (
            value(before, "ses_relay_build_info", version=__version__, python=python_version()) == 1
        )
        for outcome in ("sent", "queued", "deferred", "rejected"):
            assert value(before, "ses_relay_messages_total", outcome=outcome) == 0

        assert (await send(relay, ["a@example.net"], message()))[0] == 250
        fake_ses.script(SesErrorReply(400, "MessageRejected", "Email address is not verified."))
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(relay, ["b@example.net"], message())
        assert refused.value.code == 554
        fake_ses.script(SesErrorReply(503, "ServiceUnavailable", "down", "Receiver"))
        code, text = await send(relay, ["c@example.net"], message())
        assert (code, " queued as " in text) == (250, True)

        after = await scrape(relay)
    counts = {
        outcome: value(after, "ses_relay_messages_total", outcome=outcome)
        for outcome in ("sent", "queued", "deferred", "rejected")
    }
    assert counts == {"sent": 1, "queued": 1, "deferred": 0, "rejected": 1}
    calls = {
        (outcome, code): value(
            after, "ses_relay_ses_requests_total", action="SendRawEmail", outcome=outcome, code=code
        )
        for outcome, code in (
            ("success", ""),
            ("error", "MessageRejected"),
            ("error", "ServiceUnavailable"),
        )
    }
    assert calls == {
        ("success", ""): 1,
        ("error", "MessageRejected"): 1,
        ("error", "ServiceUnavailable"): 1,
    }
    assert value(after, "ses_relay_ses_request_duration_seconds_count", action="SendRawEmail") == 3
    assert value(after, "ses_relay_spool_messages", area="queue") == 1
    assert value(after, "ses_relay_spool_messages", area="dead") == 0
    assert 0 < value(after, "ses_relay_spool_oldest_message_age_seconds") < 60
    assert value(after, "ses_relay_delivery_pause_remaining_seconds") == 0
    size = len(message())
    assert value(after, "ses_relay_message_size_bytes_count") == 3
    assert value(after, "ses_relay_message_size_bytes_sum") == 3 * size
    assert value(after, "ses_relay_message_size_bytes_bucket", le="1024.0") == 3
    assert value(after, "ses_relay_message_recipients_sum") == 3
    batches = {
        outcome: value(after, "ses_relay_batches_total", outcome=outcome)
        for outcome in ("sent", "failed", "deferred")
    }
    assert batches == {"sent": 1, "failed": 1, "deferred": 1}
    assert value(after, "ses_relay_delivery_retries_total") == 1  # the queued one
    for outcome in ("queued", "sent", "failed"):  # refused before 250: no bounce
        assert value(after, "ses_relay_bounces_total", outcome=outcome) == 0
    assert value(after, "ses_relay_smtp_connections_total", outcome="admitted") == 3
    assert value(after, "ses_relay_smtp_connections_total", outcome="refused") == 0
    assert value(after, "ses_relay_send_rate_recipients_per_second") == 1000  # ses.max_send_rate
    assert not any(name.startswith("ses_relay_ses_quota_") for name, _ in after)


async def test_unknown_ses_error_codes_share_one_label(tmp_path: Path, fake_ses: FakeSes) -> None:
    """A hostile endpoint answering a new code per call creates no new series."""
    async with running_relay(tmp_path, fake_ses, ses={"max_attempts": 1}) as relay:
        for number in range(3):
            fake_ses.script(SesErrorReply(400, f"Invented{number}", "whatever"))
            code, text = await send(relay, [f"user{number}@example.net"], message())
            assert (code, " queued as " in text) == (250, True)
        fake_ses.script(SesErrorReply(400, "MessageRejected", "Email address is not verified."))
        with pytest.raises(aiosmtplib.SMTPDataError):
            await send(relay, ["b@example.net"], message())
        samples = await scrape(relay)
    codes = {
        dict(labels)["code"]: number
        for (name, labels), number in samples.items()
        if name == "ses_relay_ses_requests_total" and dict(labels)["action"] == "SendRawEmail"
    }
    assert codes == {"other": 3, "MessageRejected": 1}


async def test_quota_gauges_follow_get_send_quota(tmp_path: Path, fake_ses: FakeSes) -> None:
    async with running_relay(tmp_path, fake_ses, ses={"max_send_rate": 0}) as relay:
        async with asyncio.timeout(10):
            while "GetSendQuota" not in [r.action for r in fake_ses.requests]:
                await asyncio.sleep(0.01)
            samples = await scrape(relay)
            while ("ses_relay_ses_quota_max_send_rate", ()) not in samples:
                await asyncio.sleep(0.01)
                samples = await scrape(relay)
    assert value(samples, "ses_relay_ses_quota_max_24_hour_send") == 50000
    assert value(samples, "ses_relay_ses_quota_sent_last_24_hours") == 127
    assert value(samples, "ses_relay_ses_quota_max_send_rate") == 14
    assert value(samples, "ses_relay_send_rate_recipients_per_second") == 14
    calls = value(
        samples, "ses_relay_ses_requests_total", action="GetSendQuota", outcome="success", code=""
    )
    assert calls == 1


async def test_a_pause_of_all_delivery_keeps_the_relay_ready_and_says_so(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    """Readiness is "accepts and keeps mail": a load balancer must keep sending
    mail to a relay that queues it while SES is paused; the pause is in the body."""
    async with running_relay(tmp_path, fake_ses, ses={"max_attempts": 1}) as relay:
        assert await get_json(relay, "/healthz") == (200, {"status": "ok"})
        assert await get_json(relay, "/readyz") == (
            200,
            {"ready": True, "checks": {"smtp": "ok", "spool": "ok"}, "ses": "ok"},
        )
        fake_ses.script(SesErrorReply(400, "Throttling", "Daily message quota exceeded."))
        assert (await send(relay, ["a@example.net"], message()))[0] == 250
        status, body = await get_json(relay, "/readyz")
        assert (status, body["ready"], body["checks"]) == (
            200,
            True,
            {"smtp": "ok", "spool": "ok"},
        )
        assert body["ses"].startswith("all delivery paused for 900s more")
        samples = await scrape(relay)
        assert 899 < value(samples, "ses_relay_delivery_pause_remaining_seconds") <= 900
        code, text = await send(relay, ["b@example.net"], message())  # still takes mail
        assert (code, " queued as " in text) == (250, True)
        assert await get_json(relay, "/healthz") == (200, {"status": "ok"})  # alive all along

        relay.retry_now()  # `ses-relay queue retry`
        async with asyncio.timeout(10):
            while (await get_json(relay, "/readyz"))[1]["ses"] != "ok":
                await asyncio.sleep(0.02)


async def test_readiness_says_stopping_while_a_transaction_finishes(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    async with running_relay(tmp_path, fake_ses) as relay:
        host, port = relay.smtp_addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        client = RawClient(reader, writer)
        try:
            await client.greet()
            assert (await client.command("MAIL FROM:<app@example.com>")).startswith("250")
            stopping = asyncio.create_task(relay.stop(grace=10))
            async with asyncio.timeout(10):
                while relay.limiter.draining is False:
                    await asyncio.sleep(0.01)
            status, body = await get_json(relay, "/readyz")
            assert (status, body["checks"]["smtp"]) == (503, "stopping")
            assert await client.command("RSET") == "250 2.0.0 OK"
            assert await client.replies_until_eof() == ["421 4.3.2 Service shutting down"]
            await asyncio.wait_for(stopping, 10)
        finally:
            writer.close()


async def test_clients_that_do_not_read_give_their_connections_back(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    smtp = {"max_connections": 2, "max_commands": 10_000, "write_timeout": 0.3}
    async with running_relay(tmp_path, fake_ses, smtp=smtp) as relay:
        assert value(await scrape(relay), "ses_relay_smtp_connections_open") == 0
        address = relay.smtp_addresses[0]
        async with (
            stalled_client(relay.limiter, address, EHLO * OVER_HIGH_WATER),
            stalled_client(relay.limiter, address, EHLO * OVER_HIGH_WATER),
        ):
            async with asyncio.timeout(10):
                while relay.limiter.active:
                    await asyncio.sleep(0.01)
            samples = await scrape(relay)
            assert value(samples, "ses_relay_smtp_connections_open") == 0
            assert value(samples, "ses_relay_smtp_connections_total", outcome="admitted") == 2
            reader, writer = await asyncio.open_connection(*address)
            try:
                assert await RawClient(reader, writer).line() == "220 relay.test ESMTP ses-relay"
            finally:
                writer.close()
