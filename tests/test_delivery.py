"""The delivery service on a fake clock: the real ``Delivery`` with a real
spool in a temporary directory and the real SES client talking to the fake
SES over loopback, while time moves only when the test says
(``tests/fakeclock.py``). Retries and their schedule, expiry at ``max_age``
and the bounce, each kind of pause and its end, throttling and recovery,
partial failure and ``queue retry``, each in milliseconds of real time.

What is asserted is what a user sees: the reply to DATA, the spool's
entries (what ``ses-relay queue show`` prints), what SES was sent, the log,
and when the relay sleeps until (the next moment anything happens).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import random
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relay.delivery import Delivery
from relay.errors import Disposition, SesError, SmtpReply
from relay.metrics import RelayMetrics
from relay.outcome import DataReply
from relay.queuecmd import retry_one
from relay.ses.classify import RATE_EXCEEDED, ses_error
from relay.ses.client import SesClient
from relay.ses.credentials.providers import StaticProvider
from relay.ses.sender import (
    NO_PARAMETERS,
    SendQuota,
    SendRequest,
    SendResult,
    SesParameters,
    SesSender,
)
from relay.ses.sigv4 import Credentials
from relay.space import FreeSpace, floor_for
from relay.spool import DEAD, QUEUE, Batch, Entry, Spool
from tests.fakeclock import FakeClock
from tests.fakeses import ACTION, PARAMS, FakeSes, SesErrorReply
from tests.relayd import relay_config

SENDER = "app@example.com"
MESSAGE = b"From: App <app@example.com>\r\nTo: x@example.net\r\nSubject: hi\r\n\r\nHello\r\n"
WAIT = 5.0
"""Seconds of real time any wait may take (they take milliseconds)."""
UNAVAILABLE = SesErrorReply(503, "ServiceUnavailable", "down", "Receiver")
_ids = itertools.count(1)


@dataclass
class Harness:
    delivery: Delivery
    spool: Spool
    clock: FakeClock
    ses: FakeSes
    metrics: RelayMetrics

    async def send(self, recipients: Iterable[str], batch_size: int = 50) -> tuple[SmtpReply, str]:
        """Give ``delivery.accept`` a message, as the DATA handler does; its reply."""
        answer, queue_id = await self.accept(recipients, batch_size)
        return answer.reply, queue_id

    async def accept(
        self, recipients: Iterable[str], batch_size: int = 50, ses: SesParameters = NO_PARAMETERS
    ) -> tuple[DataReply, str]:
        """``delivery.accept``'s answer, and the queue id."""
        to = tuple(recipients)
        entry = Entry(
            id=f"{0xD0000000000000 + next(_ids):020X}",
            received=self.clock.wall(),
            client="127.0.0.1",
            sender=SENDER,
            source=SENDER,
            recipients=to,
            batches=tuple(Batch(to[n : n + batch_size]) for n in range(0, len(to), batch_size)),
            ses=ses,
        )
        file = self.delivery.new_message(entry.id)  # as DATA writes it
        file.write(MESSAGE)
        async with asyncio.timeout(WAIT):  # the fake clock never moves by itself
            return await self.delivery.accept(entry, file), entry.id

    async def load(self, entry_id: str, area: str = QUEUE) -> Entry:
        return await asyncio.to_thread(self.spool.load, entry_id, area)

    async def until(self, what: str, predicate: Callable[[], bool]) -> None:
        """Until ``predicate`` (it reads the spool) holds."""
        try:
            async with asyncio.timeout(WAIT):
                while not await asyncio.to_thread(predicate):
                    await asyncio.sleep(0.005)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None

    async def gone(self, entry_id: str) -> None:
        await self.until(f"{entry_id} to leave the queue", lambda: not self.queued(entry_id))

    def queued(self, entry_id: str) -> bool:
        return self.spool.find(entry_id) == QUEUE

    async def attempts(self, entry_id: str, count: int) -> Entry:
        """Until ``entry_id`` has had ``count`` attempts; the entry then."""
        await self.until(
            f"attempt {count} of {entry_id}",
            lambda: (
                self.spool.find(entry_id) == QUEUE and self.spool.load(entry_id).attempts >= count
            ),
        )
        return await self.load(entry_id)

    async def idle_until(self, wall: float) -> None:
        """Until the relay sleeps until ``wall`` and nothing before."""
        await self.clock.wait_for_sleeper(wall, within=WAIT)
        assert min(self.clock.sleeping_until()) == pytest.approx(wall, abs=1e-6)

    def calls(self) -> list[list[str]]:
        return [r.destinations for r in self.ses.requests if r.action == "SendRawEmail"]


@asynccontextmanager
async def delivering(
    tmp_path: Path, fake_ses: FakeSes, sender: SesSender | None = None, **sections: dict[str, Any]
) -> AsyncIterator[Harness]:
    """The delivery service on ``sender``, by default the SES client to ``fake_ses``."""
    merged: dict[str, dict[str, Any]] = {
        "ses": {"max_attempts": 1, "max_send_rate": 1000.0},
        "delivery": {"retry_min": 60.0, "retry_max": 600.0, "inline_timeout": 5.0},
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    config, _ = relay_config(tmp_path, fake_ses, **merged)
    clock = FakeClock(autojump=False)
    spool = Spool(config.spool.path)
    spool.open()
    credentials = StaticProvider(Credentials(fake_ses.access_key, fake_ses.secret_key))
    try:
        async with SesClient(config.ses, credentials) as ses:
            metrics = RelayMetrics()
            delivery = Delivery(
                config,
                spool,
                sender or ses,
                space=FreeSpace(spool.free_bytes, floor_for(config.smtp.max_message_size), clock),
                clock=clock,
                jitter=lambda: 0.0,
                metrics=metrics,
            )
            await delivery.start()
            try:
                yield Harness(delivery, spool, clock, fake_ses, metrics)
            finally:
                await delivery.stop()
    finally:
        spool.close()


class Refusing:
    """Answers SendRawEmail with ``reply`` when ``refused(destinations)``, else
    accepts it: one behaviour for every request, whatever their order."""

    def __init__(self, reply: SesErrorReply, refused: Callable[[list[str]], bool]) -> None:
        self.reply = reply
        self.refused = refused

    def install(self, fake: FakeSes) -> None:
        fake.script(*[self] * 1000)

    async def respond(self, request: web.Request, fake: FakeSes) -> web.StreamResponse:
        params = request[PARAMS]
        destinations = [
            value
            for _, value in sorted(
                (int(key.rsplit(".", 1)[1]), value)
                for key, value in params.items()
                if key.startswith("Destinations.member.")
            )
        ]
        if request[ACTION] == "SendRawEmail" and self.refused(destinations):
            return await self.reply.respond(request, fake)
        return fake.success_response(request)


# -- retries


async def test_retries_follow_the_schedule_until_ses_takes_the_message(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    fake_ses.script(UNAVAILABLE, UNAVAILABLE, UNAVAILABLE)
    async with delivering(tmp_path, fake_ses) as relay:
        start = relay.clock.wall()
        reply, queue_id = await relay.send(["bob@example.net"])
        assert str(reply) == f"250 2.0.0 Ok: queued as {queue_id}"
        # jitter 0: the low edge of an envelope doubling from retry_min (60 s)
        for attempt, due in [(1, 60.0), (2, 180.0), (3, 420.0)]:
            entry = await relay.attempts(queue_id, attempt)
            assert entry.next_attempt == pytest.approx(start + due)
            assert entry.history[-1].endswith(" ServiceUnavailable: down")
            await relay.idle_until(start + due)
            assert len(relay.calls()) == attempt  # nothing before it is due
            relay.clock.advance_to_wall(start + due)
        await relay.gone(queue_id)
    assert relay.calls() == [["bob@example.net"]] * 4


async def test_an_entry_is_given_up_at_max_age_and_its_sender_gets_one_bounce(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    Refusing(UNAVAILABLE, lambda to: to == ["bob@example.net"]).install(fake_ses)
    async with delivering(
        tmp_path, fake_ses, delivery={"retry_min": 60.0, "retry_max": 60.0, "max_age": 150.0}
    ) as relay:
        start = relay.clock.wall()
        reply, queue_id = await relay.send(["bob@example.net"])
        assert reply.code == 250
        # the last attempt is planned at the expiry moment itself, not after
        for attempt, due in [(1, 60.0), (2, 120.0), (3, 150.0)]:
            entry = await relay.attempts(queue_id, attempt)
            assert entry.next_attempt == pytest.approx(start + due)
            await relay.idle_until(start + due)
            relay.clock.advance_to_wall(start + due)
        await relay.until("the bounce to be sent", lambda: len(relay.calls()) == 4)
        await relay.until("the queue to empty", lambda: not list(relay.spool.entries(QUEUE)))
        dead = await relay.load(queue_id, DEAD)
    assert relay.calls() == [["bob@example.net"]] * 3 + [[SENDER]]  # none at the expiry
    [batch] = dead.batches
    assert batch.state == "failed"
    assert batch.error is not None
    assert str(batch.error).startswith("554 5.4.7 message expired in queue; last error: ")
    assert str(batch.error).endswith(" ServiceUnavailable: down")
    bounce = relay.ses.requests[-1].raw_message
    assert bounce is not None
    assert b"Final-Recipient: rfc822; bob@example.net\r\n" in bounce
    assert b"Status: 5.4.7\r\n" in bounce


# -- pauses of all delivery


@pytest.mark.parametrize(
    ("answer", "failures", "logged", "pause", "tried_for"),
    [
        (
            SesErrorReply(400, "Throttling", "Daily message quota exceeded."),
            1,
            "pausing all delivery for 900s: Throttling: Daily message quota exceeded.",
            900.0,
            "Throttling: Daily message quota exceeded.",
        ),
        (
            SesErrorReply(400, "MessageRejected", "Sending paused for this account."),
            1,
            "pausing all delivery for 900s: MessageRejected: Sending paused for this account.",
            900.0,
            "MessageRejected: Sending paused for this account.",
        ),
        (
            SesErrorReply(403, "InvalidClientTokenId", "The security token is invalid."),
            1,
            "pausing all delivery for 60s: InvalidClientTokenId: The security token is invalid.",
            60.0,
            "InvalidClientTokenId: The security token is invalid.",
        ),
        (
            UNAVAILABLE,
            10,
            "SES unreachable (10 calls in a row failed, the last with ServiceUnavailable: "
            "down): pausing all delivery for 60s",
            60.0,
            "ServiceUnavailable: down",
        ),
    ],
    ids=["daily quota", "account sending paused", "credentials refused", "outage"],
)
async def test_a_pause_of_all_delivery_queues_at_once_and_ends_on_time(
    tmp_path: Path,
    fake_ses: FakeSes,
    caplog: pytest.LogCaptureFixture,
    answer: SesErrorReply,
    failures: int,
    logged: str,
    pause: float,
    tried_for: str,
) -> None:
    fake_ses.script(*[answer] * failures)
    async with delivering(tmp_path, fake_ses, delivery={"retry_min": 60.0}) as relay:
        start = relay.clock.wall()
        failed = [await relay.send([f"first{n}@example.net"]) for n in range(failures)]
        assert caplog.text.count(logged) == 1
        assert len(relay.calls()) == failures

        reply, waiting = await relay.send(["second@example.net"])
        assert str(reply) == f"250 2.0.0 Ok: queued as {waiting}"  # without waiting for SES
        assert len(relay.calls()) == failures
        entry = await relay.load(waiting)
        assert (entry.attempts, entry.history) == (0, ())  # waiting is not a failed attempt
        tried = await relay.load(failed[-1][1])
        assert tried.attempts == 1
        assert [line.split(" ", 1)[1] for line in tried.history] == [tried_for]

        # Retries fall due inside the pause: no call, they wait for its end.
        if pause > 60:
            await relay.idle_until(start + 60)
            relay.clock.advance_to_wall(start + 60)
        await relay.idle_until(start + pause)
        assert len(relay.calls()) == failures
        relay.clock.advance_to_wall(start + pause)
        for _, queue_id in [*failed, (reply, waiting)]:
            await relay.gone(queue_id)
    delivered = sorted(to for to in relay.calls()[failures:])
    assert delivered == sorted(
        [[f"first{n}@example.net"] for n in range(failures)] + [["second@example.net"]]
    )


async def test_queue_retry_ends_a_pause_at_once(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ses.script(SesErrorReply(400, "Throttling", "Daily message quota exceeded."))
    async with delivering(tmp_path, fake_ses) as relay:
        start = relay.clock.wall()
        _, first = await relay.send(["first@example.net"])
        _, second = await relay.send(["second@example.net"])
        await relay.idle_until(start + 60)
        assert len(relay.calls()) == 1
        # `ses-relay queue retry --all`: every entry due now, then SIGUSR1
        for queue_id in (first, second):
            assert await asyncio.to_thread(retry_one, relay.spool, queue_id, start) == QUEUE
        with caplog.at_level(logging.WARNING, logger="relay"):
            await relay.delivery.retry_now()
            await relay.gone(first)
            await relay.gone(second)
        assert relay.clock.wall() == start  # no time passed
    assert "delivery pause ended by 'ses-relay queue retry'" in caplog.text
    assert sorted(relay.calls()[1:]) == [["first@example.net"], ["second@example.net"]]


# -- throttling


async def test_throttling_halves_the_sending_rate_which_then_recovers(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    fake_ses.script(SesErrorReply(400, "Throttling", "Maximum sending rate exceeded."))
    async with delivering(tmp_path, fake_ses, ses={"max_send_rate": 10.0}) as relay:
        rate = relay.delivery.account.rate
        start = relay.clock.wall()
        reply, queue_id = await relay.send(["bob@example.net"])
        assert reply.code == 250
        assert rate.effective_rate == pytest.approx(5.0)  # the ses_relay_send_rate gauge
        entry = await relay.attempts(queue_id, 1)
        assert entry.history[-1].endswith(" Throttling: Maximum sending rate exceeded.")
        relay.clock.advance(15)
        assert rate.effective_rate == pytest.approx(7.5)  # linear climb: full in 30 s
        relay.clock.advance(15)
        assert rate.effective_rate == pytest.approx(10.0)
        await relay.idle_until(start + 60)  # the retry is a retry, on its schedule
        relay.clock.advance_to_wall(start + 60)
        await relay.gone(queue_id)
    assert relay.calls() == [["bob@example.net"]] * 2


async def test_each_batch_s_wait_for_the_sending_rate_is_measured(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    """ses_relay_send_rate_wait_seconds: one observation per batch sent, its
    wait on the delivery clock."""
    async with delivering(tmp_path, fake_ses, ses={"max_send_rate": 10.0}) as relay:
        crowd = [f"r{n}@example.net" for n in range(25)]
        # The bucket starts full (10): the 25 pass at once and leave it 15 in debt.
        assert (await relay.send(crowd))[0].code == 250
        sending = asyncio.create_task(relay.send(["late@example.net"]))
        await relay.clock.wait_for_sleeper(relay.clock.wall() + 1.6, within=WAIT)
        relay.clock.advance(1.6)  # 16 tokens at 10/s: the debt, then its own
        assert (await sending)[0].code == 250

    def sample(suffix: str, **labels: str) -> float | None:
        name = f"ses_relay_send_rate_wait_seconds_{suffix}"
        return relay.metrics.registry.get_sample_value(name, labels)

    assert sample("count") == 2
    assert sample("sum") == pytest.approx(1.6)
    assert sample("bucket", le="0.005") == 1
    assert sample("bucket", le="1.0") == 1
    assert sample("bucket", le="2.5") == 2
    assert relay.calls() == [crowd, ["late@example.net"]]


# -- partial failure


async def test_a_batch_refused_after_250_is_bounced_and_the_rest_delivered(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    everyone = [f"part{n}@example.net" for n in range(120)]
    refused = everyone[50:100]
    Refusing(
        SesErrorReply(400, "MessageRejected", "Email address is not verified."),
        lambda to: to == refused,
    ).install(fake_ses)
    async with delivering(tmp_path, fake_ses, smtp={"max_recipients": 200}) as relay:
        reply, queue_id = await relay.send(everyone)
        assert str(reply) == f"250 2.0.0 Ok: queued as {queue_id}"
        await relay.until("the bounce to be sent", lambda: len(relay.calls()) == 4)
        await relay.until("the queue to empty", lambda: not list(relay.spool.entries(QUEUE)))
        dead = await relay.load(queue_id, DEAD)
    assert [b.state for b in dead.batches] == ["sent", "failed", "sent"]
    calls = relay.calls()
    assert sorted(calls[:3]) == sorted([everyone[:50], refused, everyone[100:]])
    assert calls[3] == [SENDER]
    report = relay.ses.requests[-1].raw_message
    assert report is not None
    named = {a for a in everyone if f"Final-Recipient: rfc822; {a}\r\n".encode() in report}
    assert named == set(refused)


async def test_every_batch_refused_inline_gets_the_refusal_and_keeps_nothing(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    fake_ses.script(SesErrorReply(400, "MessageRejected", "Email address is not verified."))
    async with delivering(tmp_path, fake_ses) as relay:
        reply, queue_id = await relay.send(["bob@example.net"])
        assert str(reply) == ("554 5.7.1 message rejected by SES: Email address is not verified.")
        assert await asyncio.to_thread(relay.spool.find, queue_id) is None


# -- any SES sender: the interface a second API or per-route clients plug into


class FakeSender:
    """An SES sender without a wire (``relay.ses.sender.SesSender``): raises
    ``errors`` for the first batches, then takes every batch."""

    def __init__(self, *errors: SesError, max_send_rate: float = 14.0) -> None:
        self.requests: list[SendRequest] = []
        self.messages: list[bytes] = []
        """Each request's message, read as a sender reads it."""
        self.errors = list(errors)
        self.max_send_rate = max_send_rate

    async def send(self, request: SendRequest, *, deadline: float) -> SendResult:
        self.requests.append(request)
        self.messages.append(b"".join(request.raw_message.chunks()))
        if self.errors:
            raise self.errors.pop(0)
        return SendResult(f"0100-fake-{len(self.requests)}", "req")

    async def quota(self) -> SendQuota:
        return SendQuota(50_000.0, self.max_send_rate, 10.0)


PARAMETERS = SesParameters(
    configuration_set="transactional",
    tags=(("team", "ops"),),
    source_arn="arn:aws:ses:us-east-1:123456789012:identity/example.com",
)


async def test_a_sender_gets_every_batch_with_the_messages_ses_parameters(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    sender = FakeSender()
    async with delivering(tmp_path, fake_ses, sender) as relay:
        answer, queue_id = await relay.accept(["a@example.net", "b@example.net"], 1, PARAMETERS)
    assert answer.outcome == "sent"
    assert answer.reply.text.startswith(f"Ok: {queue_id} sent as 0100-fake-")
    assert sorted((r.destinations, r.source, r.ses) for r in sender.requests) == [
        (("a@example.net",), SENDER, PARAMETERS),
        (("b@example.net",), SENDER, PARAMETERS),
    ]
    assert sender.messages == [MESSAGE, MESSAGE]
    assert fake_ses.requests == []


@pytest.mark.parametrize(
    ("error", "outcome", "reply"),
    [
        (
            ses_error("MessageRejected", "Email address is not verified.", 400, "r1"),
            "rejected",
            "554 5.7.1 message rejected by SES: Email address is not verified.",
        ),
        (ses_error("ServiceUnavailable", "down", 503, "r2"), "queued", "250 2.0.0 Ok: queued as"),
    ],
)
async def test_accept_says_what_became_of_the_message(
    tmp_path: Path, fake_ses: FakeSes, error: SesError, outcome: str, reply: str
) -> None:
    async with delivering(tmp_path, fake_ses, FakeSender(error)) as relay:
        answer, _ = await relay.accept(["a@example.net"])
    assert answer.outcome == outcome
    assert str(answer.reply).startswith(reply)


async def test_throttling_is_what_the_classification_says_not_a_code(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    # SES API v2 says "TooManyRequestsException" where v1 says "Throttling":
    # the sender's classification decides, delivery reads no code.
    too_many = SesError(
        code="TooManyRequestsException",
        message="Maximum sending rate exceeded.",
        http_status=429,
        request_id="r1",
        disposition=Disposition.RETRYABLE,
        smtp_reply=RATE_EXCEEDED.reply(),
        throttled=True,
    )
    sender = FakeSender(too_many)
    async with delivering(tmp_path, fake_ses, sender, ses={"max_send_rate": 10.0}) as relay:
        answer, queue_id = await relay.accept(["bob@example.net"])
        assert answer.outcome == "queued"
        assert relay.delivery.account.rate.effective_rate == pytest.approx(5.0)
        assert relay.delivery.account.pause_left() == 0  # slowed down, not an outage
        entry = await relay.attempts(queue_id, 1)
    assert entry.batches[0].error is not None
    assert entry.batches[0].error.code == "TooManyRequestsException"
    assert str(entry.batches[0].error) == "451 4.4.5 SES sending rate exceeded, try again later"


async def test_the_sending_rate_follows_the_senders_quota(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    sender = FakeSender(max_send_rate=14.0)
    async with delivering(tmp_path, fake_ses, sender, ses={"max_send_rate": 0}) as relay:
        start = relay.clock.wall()
        await relay.idle_until(start + 300)  # delivery.quota_refresh
        rate = relay.delivery.account.rate
        assert rate.rate == 14.0
        assert relay.delivery.account.quota == SendQuota(50_000.0, 14.0, 10.0)
        sender.max_send_rate = 20.0
        relay.clock.advance(300)
        await relay.idle_until(start + 600)
        assert rate.rate == 20.0


# -- start-up over a long queue


class CountingSpool(Spool):
    """A spool that counts the envelopes read through it, by id."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.reads: collections.Counter[str] = collections.Counter()

    def load(self, entry_id: str, area: str = QUEUE) -> Entry:
        self.reads[entry_id] += 1
        return super().load(entry_id, area)

    def entries(self, area: str = QUEUE) -> Iterator[Entry]:
        for entry in super().entries(area):
            self.reads[entry.id] += 1
            yield entry


async def test_start_reads_no_envelope_and_the_queue_is_delivered_in_due_order(
    tmp_path: Path, fake_ses: FakeSes, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 200
    config, _ = relay_config(
        tmp_path, fake_ses, ses={"max_send_rate": 100_000.0}, delivery={"concurrency": 1}
    )
    clock = FakeClock(autojump=False)
    now = clock.wall()
    # Ids in arrival order; next attempts in another order. The first tenth
    # is due already, in no order of next attempt either.
    ids = [f"{0xE0000000000000 + n:020X}" for n in range(count)]
    order = list(range(count))
    random.Random(15).shuffle(order)
    due = {
        entry_id: now - 1 - rank if rank < count // 10 else now + rank
        for entry_id, rank in zip(ids, order, strict=True)
    }
    spool = CountingSpool(config.spool.path)
    spool.open()
    with monkeypatch.context() as fast:  # only the fill: fsync is not what is tested
        fast.setattr(os, "fsync", lambda fd: None)
        for entry_id in ids:
            to = (f"{entry_id.lower()}@example.net",)
            entry = Entry(
                id=entry_id,
                received=now - 60,
                client="127.0.0.1",
                sender=SENDER,
                source=SENDER,
                recipients=to,
                batches=(Batch(to),),
                attempts=1,
                next_attempt=due[entry_id],
            )
            spool.put(entry, MESSAGE)
    sender = FakeSender()
    delivery = Delivery(
        config,
        spool,
        sender,
        clock=clock,
        jitter=lambda: 0.0,
        metrics=RelayMetrics(),
        space=FreeSpace(spool.free_bytes, floor_for(config.smtp.max_message_size), clock),
    )
    try:
        await delivery.start()
        assert sum(spool.reads.values()) == 0  # ready before a single envelope is read
        async with asyncio.timeout(60):
            while len(sender.requests) < count // 10 or sum(spool.reads.values()) < count:
                await asyncio.sleep(0.01)
        assert len(sender.requests) == count // 10  # the due ones, nothing early
        clock.advance_to_wall(now + count)
        async with asyncio.timeout(60):
            while len(sender.requests) < count or list(spool.ids()):
                await asyncio.sleep(0.01)
    finally:
        await delivery.stop()
        spool.close()
    sent = [request.queue_id for request in sender.requests]
    already_due = sorted(entry_id for entry_id in ids if due[entry_id] <= now)
    assert sent[: count // 10] == already_due  # oldest first
    assert sent[count // 10 :] == sorted(set(ids) - set(already_due), key=due.__getitem__)
    assert len(set(sent)) == count
