"""/metrics, /healthz and /readyz of a running relay, read over HTTP after
real SMTP traffic through the fake SES: the values are exact."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from platform import python_version
from typing import Any

import aiohttp
import aiosmtplib
import pytest
import trustme
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from relay import __version__
from relay.app import Relay
from relay.auth import hash_password
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
    # Every batch tried took its tokens at once (1000/s; the bucket starts full).
    assert value(after, "ses_relay_send_rate_wait_seconds_count") == 3
    assert value(after, "ses_relay_send_rate_wait_seconds_bucket", le="0.005") == 3
    # Static keys never expire: no expiry to report.
    assert ("ses_relay_credentials_expiry_seconds", ()) not in after


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


async def test_below_the_free_space_floor_the_relay_is_not_ready_and_mail_gets_452(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    """No file system holds 1.5 x 1 PB: the spool is below its floor from the start."""
    async with running_relay(tmp_path, fake_ses, smtp={"max_message_size": 10**15}) as relay:
        status, body = await get_json(relay, "/readyz")
        assert (status, body["ready"], body["checks"]) == (
            503,
            False,
            {"smtp": "ok", "spool": "no room: free space is below 1.5 x smtp.max_message_size"},
        )
        host, port = relay.smtp_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10) as smtp:
            with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
                await smtp.mail("app@example.com")
    assert (refused.value.code, refused.value.message) == (
        452,
        "4.3.1 Insufficient system storage, try again later",
    )
    assert fake_ses.requests == []


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


async def ended_sessions(relay: Relay) -> dict[str, float]:
    """``ses_relay_smtp_sessions_total`` by outcome, once every connection has closed."""
    assert await relay.limiter.wait_idle(10)
    samples = await scrape(relay)
    return {
        dict(labels)["outcome"]: number
        for (name, labels), number in samples.items()
        if name == "ses_relay_smtp_sessions_total"
    }


async def ended_sessions_so_far(relay: Relay, outcome: str) -> float:
    """``ses_relay_smtp_sessions_total{outcome}`` now (some connections still open)."""
    return value(await scrape(relay), "ses_relay_smtp_sessions_total", outcome=outcome)


NO_SESSIONS = dict.fromkeys(
    ("quit", "disconnected", "timeout", "refused", "dropped", "tls_failed", "shutdown", "error"),
    0.0,
)


async def test_smtp_sessions_are_counted_by_how_they_ended(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    smtp = {
        "idle_timeout": 0.3,
        "write_timeout": 0.3,
        "max_connections": 5,
        "max_connections_per_client": 3,
        "max_commands": 10_000,
    }
    async with running_relay(tmp_path, fake_ses, smtp=smtp) as relay:
        assert await ended_sessions(relay) == NO_SESSIONS
        assert value(await scrape(relay), "ses_relay_smtp_connections_max") == 5
        address = relay.smtp_addresses[0]

        assert (await send(relay, ["a@example.net"], message()))[0] == 250  # QUIT

        gone = RawClient(*await asyncio.open_connection(*address))
        await gone.greet()
        await gone.close()  # no QUIT

        silent = RawClient(*await asyncio.open_connection(*address))
        assert await silent.line() == "220 relay.test ESMTP ses-relay"
        assert await silent.replies_until_eof() == ["421 4.4.2 idle timeout"]
        await silent.close()

        garbling = RawClient(*await asyncio.open_connection(*address))
        await garbling.greet()
        for _ in range(4):
            assert (await garbling.command("FOO")).startswith("500 ")
        assert await garbling.command("FOO") == "421 4.7.0 too many bad commands"
        assert await garbling.at_eof()
        await garbling.close()

        async with stalled_client(relay.limiter, address, EHLO * OVER_HIGH_WATER):
            assert await relay.limiter.wait_idle(10)  # dropped after write_timeout

        clients = [RawClient(*await asyncio.open_connection(*address)) for _ in range(4)]
        for client in clients[:3]:
            await client.greet()
        assert await clients[3].replies_until_eof() == ["421 4.7.0 too many connections"]
        assert await ended_sessions_so_far(relay, "refused") == 2
        await relay.stop(grace=0)
        for client in clients[:3]:
            assert await client.replies_until_eof() == ["421 4.3.2 Service shutting down"]
            await client.close()
        await clients[3].close()
        registry = relay.metrics.registry
        ended = {
            outcome: registry.get_sample_value(
                "ses_relay_smtp_sessions_total", {"outcome": outcome}
            )
            for outcome in NO_SESSIONS
        }
    assert ended == NO_SESSIONS | {
        "quit": 1,
        "disconnected": 1,
        "timeout": 1,
        "refused": 2,
        "dropped": 1,
        "shutdown": 3,
    }


def auth_plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def tls_client(address: tuple[str, int], ca_pem_path: Path) -> RawClient:
    """Connected to an implicit-TLS listener, after the banner and EHLO."""
    context = ssl.create_default_context(cafile=str(ca_pem_path))
    opened = asyncio.open_connection(*address, ssl=context, server_hostname="relay.test")
    client = RawClient(*await asyncio.wait_for(opened, 10))
    await client.greet()
    return client


async def test_auth_attempts_are_counted_by_outcome(
    tmp_path: Path, fake_ses: FakeSes, tls_ca: trustme.CA, ca_pem_path: Path
) -> None:
    cert = tls_ca.issue_cert("relay.test", "127.0.0.1")
    cert_path, key_path = tmp_path / "relay.pem", tmp_path / "relay.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('s3cret', 'bcrypt', bcrypt_rounds=4)}\n")
    smtp = {"tls_cert": str(cert_path), "tls_key": str(key_path), "tls_listen": ["127.0.0.1:0"]}
    auth = {"users_file": str(users), "failure_delay": 0.0, "max_failures": 2}
    async with running_relay(tmp_path, fake_ses, smtp=smtp, auth=auth) as relay:
        attempts = {
            outcome: value(await scrape(relay), "ses_relay_auth_attempts_total", outcome=outcome)
            for outcome in ("ok", "failed", "locked_out", "unavailable")
        }
        assert attempts == {"ok": 0, "failed": 0, "locked_out": 0, "unavailable": 0}
        address = relay.tls_addresses[0]

        alice = await tls_client(address, ca_pem_path)
        ok = await alice.command(auth_plain("alice", "s3cret"))
        assert ok == "235 2.7.0 Authentication successful"
        assert await alice.command("QUIT") == "221 2.0.0 Bye"
        await alice.close()

        guesser = await tls_client(address, ca_pem_path)
        wrong = "535 5.7.8 Authentication credentials invalid"
        assert await guesser.command(auth_plain("alice", "guess1")) == wrong
        assert await guesser.command(auth_plain("alice", "guess2")) == wrong
        assert await guesser.replies_until_eof() == ["421 4.7.0 too many failed AUTH attempts"]
        await guesser.close()

        again = await tls_client(address, ca_pem_path)
        assert await again.command(auth_plain("alice", "s3cret")) == (
            "421 4.7.0 too many failed AUTH attempts"
        )
        await again.close()

        plain = RawClient(*await asyncio.open_connection(*relay.smtp_addresses[0]))
        await plain.greet()
        assert await plain.command("STARTTLS") == "220 Ready to start TLS"
        await plain.send(b"\x16\x03\x01\x00\x05hello")  # not a ClientHello
        assert await plain.at_eof()
        await plain.close()

        sessions = await ended_sessions(relay)
        samples = await scrape(relay)
    attempts = {
        outcome: value(samples, "ses_relay_auth_attempts_total", outcome=outcome)
        for outcome in ("ok", "failed", "locked_out", "unavailable")
    }
    assert attempts == {"ok": 1, "failed": 2, "locked_out": 1, "unavailable": 0}
    assert sessions == NO_SESSIONS | {"quit": 1, "refused": 2, "tls_failed": 1}


async def test_credentials_expiry_counts_down_to_the_expiration(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    expiration = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    env = {"AWS_CREDENTIAL_EXPIRATION": expiration.strftime("%Y-%m-%dT%H:%M:%SZ")}
    async with running_relay(tmp_path, fake_ses, env=env) as relay:
        assert (await send(relay, ["a@example.net"], message()))[0] == 250
        samples = await scrape(relay)
        left = (expiration - datetime.now(UTC)).total_seconds()
    assert left <= value(samples, "ses_relay_credentials_expiry_seconds") <= 7200
    assert value(samples, "ses_relay_credentials_expiry_seconds") > 7200 - 60
