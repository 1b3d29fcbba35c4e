"""What follows a delivery attempt (``relay.outcome``): a table, no I/O."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from relay.config import DeliveryConfig
from relay.errors import SesError, SmtpReply
from relay.outcome import (
    DataReply,
    Decision,
    Forget,
    GiveUp,
    Refuse,
    Retry,
    Wait,
    after_attempt,
    batch_refused,
    batch_sent,
    expire,
    queued_reply,
    sent_reply,
)
from relay.ses.classify import ses_error, transport_error
from relay.spool import MAX_HISTORY, Batch, BatchError, Entry

RECEIVED = 1_800_000_000.0  # 2027-01-15T08:00:00Z
NOW = RECEIVED + 600
RESUME = NOW + 900
CONFIG = DeliveryConfig(retry_min=60.0, retry_max=3600.0, max_age=86_400.0)

REJECTED = ses_error("MessageRejected", "Email address is not verified.", 400, "r1")
ILLEGAL = ses_error("InvalidParameterValue", "Illegal address", 400, "r2")
UNAVAILABLE = ses_error("ServiceUnavailable", "down", 503, "r3")
QUOTA = ses_error("Throttling", "Daily message quota exceeded.", 400, "r4")
TIMEOUT = transport_error("Timeout", "no answer within 30s")

SENT = Batch(("a@example.net",), "sent", "0100-id")
PENDING = Batch(("b@example.net",))
FAILED = Batch(("c@example.net",), "failed", None, BatchError.of(REJECTED))


def entry(*batches: Batch, **changes: Any) -> Entry:
    recipients = tuple(r for b in batches for r in b.recipients)
    fields: dict[str, Any] = {
        "id": "0006A1B2C3D4E5F60000AA",
        "received": RECEIVED,
        "client": "192.0.2.7",
        "sender": "app@example.com",
        "source": "app@example.com",
        "recipients": recipients,
        "batches": batches,
    }
    return Entry(**(fields | changes))


def retry(reason: str, at: float, attempts: int = 1, history: tuple[str, ...] = ()) -> Retry:
    return Retry(
        replace(
            entry(SENT, PENDING, **({"attempts": attempts - 1, "history": history[:-1]})),
            attempts=attempts,
            next_attempt=at,
            history=history,
        ),
        reason,
    )


def decide(
    subject: Entry,
    errors: dict[int, SesError],
    *,
    starved: bool = False,
    inline: bool = False,
    now: float = NOW,
    jitter: float = 0.0,
) -> Decision:
    return after_attempt(
        subject,
        errors,
        starved=starved,
        inline=inline,
        config=CONFIG,
        now=now,
        resume_at=RESUME,
        jitter=jitter,
    )


STAMP = "2027-01-15T08:10:00Z"

TABLE: list[tuple[str, Entry, dict[int, SesError], dict[str, Any], Decision]] = [
    ("all sent, inline", entry(SENT, SENT), {}, {"inline": True}, Forget()),
    ("all sent, queued", entry(SENT, SENT), {}, {}, Forget()),
    (
        "inline, SES refused every batch: the first batch's refusal",
        entry(FAILED, FAILED),
        {1: ILLEGAL, 0: REJECTED},
        {"inline": True},
        Refuse(REJECTED.smtp_reply),
    ),
    (
        "queued, every batch refused for good: bounce",
        entry(FAILED, FAILED),
        {0: REJECTED, 1: REJECTED},
        {},
        GiveUp((FAILED, FAILED)),
    ),
    (
        "inline, part sent and part refused: bounce the refused part",
        entry(SENT, FAILED),
        {1: REJECTED},
        {"inline": True},
        GiveUp((FAILED,)),
    ),
    (
        "no token in time and no error: wait, no attempt counted",
        entry(SENT, PENDING),
        {},
        {"starved": True},
        Wait(RESUME),
    ),
    (
        "no token for one batch, an error for another: a failed attempt",
        entry(SENT, PENDING),
        {1: QUOTA},
        {"starved": True},
        retry(
            "Throttling: Daily message quota exceeded.",
            NOW + 60,
            history=(f"{STAMP} Throttling: Daily message quota exceeded.",),
        ),
    ),
    (
        "no answer in time: retry after retry_min (jitter 0)",
        entry(SENT, PENDING),
        {},
        {},
        retry("no answer in time", NOW + 60, history=(f"{STAMP} no answer in time",)),
    ),
    (
        "a transport error: retry, its text in the history",
        entry(SENT, PENDING),
        {1: TIMEOUT},
        {"inline": True},
        retry(
            "Timeout: no answer within 30s",
            NOW + 60,
            history=(f"{STAMP} Timeout: no answer within 30s",),
        ),
    ),
    (
        "the third failure, jitter 1: the envelope's top, 8 x retry_min",
        entry(SENT, PENDING, attempts=2, history=("one", "two")),
        {1: UNAVAILABLE},
        {"jitter": 1.0},
        retry(
            "ServiceUnavailable: down",
            NOW + 480,
            attempts=3,
            history=("one", "two", f"{STAMP} ServiceUnavailable: down"),
        ),
    ),
    (
        "near max_age: the last attempt at the expiry moment",
        entry(SENT, PENDING, attempts=9),
        {1: UNAVAILABLE},
        {"now": RECEIVED + 86_400 - 10},
        Retry(
            entry(
                SENT,
                PENDING,
                attempts=10,
                next_attempt=RECEIVED + 86_400,
                history=("2027-01-16T07:59:50Z ServiceUnavailable: down",),
            ),
            "ServiceUnavailable: down",
        ),
    ),
    (
        "two errors in one attempt: both in one history line",
        entry(PENDING, PENDING),
        {0: UNAVAILABLE, 1: TIMEOUT},
        {},
        Retry(
            entry(
                PENDING,
                PENDING,
                attempts=1,
                next_attempt=NOW + 60,
                history=(f"{STAMP} ServiceUnavailable: down; Timeout: no answer within 30s",),
            ),
            "ServiceUnavailable: down; Timeout: no answer within 30s",
        ),
    ),
]


@pytest.mark.parametrize(
    ("subject", "errors", "options", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_after_attempt(
    subject: Entry, errors: dict[int, SesError], options: dict[str, Any], expected: Decision
) -> None:
    assert decide(subject, errors, **options) == expected


def test_the_history_keeps_the_latest_lines() -> None:
    old = tuple(f"line {n}" for n in range(MAX_HISTORY))
    decision = decide(entry(PENDING, history=old, attempts=MAX_HISTORY), {0: UNAVAILABLE})
    assert isinstance(decision, Retry)
    assert decision.entry.history == (*old[1:], f"{STAMP} ServiceUnavailable: down")
    assert decision.entry.attempts == MAX_HISTORY + 1


def test_a_long_error_is_cut_to_one_short_line() -> None:
    noisy = ses_error("ServiceUnavailable", "x\r\n" * 200, 503, "r9")
    decision = decide(entry(PENDING), {0: noisy})
    assert isinstance(decision, Retry)
    assert decision.reason.isprintable()
    assert len(decision.reason) <= 200


@pytest.mark.parametrize(
    ("history", "reason"),
    [
        ((), "no delivery attempt succeeded"),
        (("2027-01-15T08:10:00Z ServiceUnavailable: down",), STAMP + " ServiceUnavailable: down"),
    ],
)
def test_expire_fails_what_is_pending_with_the_last_error(
    history: tuple[str, ...], reason: str
) -> None:
    expired = expire(entry(SENT, PENDING, FAILED, history=history))
    reply = BatchError(SmtpReply(554, "5.4.7", f"message expired in queue; last error: {reason}"))
    assert expired.batches == (SENT, replace(PENDING, state="failed", error=reply), FAILED)
    assert decide(expired, {}) == GiveUp(expired.batches[1:])


@pytest.mark.parametrize(
    ("message_ids", "text"),
    [
        (["0100-a"], "Ok: 0006A1B2C3D4E5F60000AA sent as 0100-a"),
        ([None], "Ok: 0006A1B2C3D4E5F60000AA sent as (SES gave no usable message id)"),
        (
            [f"0100-{n}" for n in range(7)],
            "Ok: 0006A1B2C3D4E5F60000AA sent as 0100-0 0100-1 0100-2 0100-3 0100-4 and 2 more",
        ),
    ],
    ids=["one", "no usable id", "more than five"],
)
def test_the_reply_to_data_names_what_ses_sent_it_as(
    message_ids: list[str | None], text: str
) -> None:
    batches = [Batch((f"r{n}@example.net",), "sent", mid) for n, mid in enumerate(message_ids)]
    assert sent_reply(entry(*batches)) == DataReply(SmtpReply(250, "2.0.0", text), "sent")
    assert queued_reply(entry(*batches)) == DataReply(
        SmtpReply(250, "2.0.0", "Ok: queued as 0006A1B2C3D4E5F60000AA"), "queued"
    )


@pytest.mark.parametrize(
    ("error", "state"),
    [(REJECTED, "failed"), (ILLEGAL, "failed"), (UNAVAILABLE, "pending"), (TIMEOUT, "pending")],
    ids=["rejected", "illegal address", "unavailable", "no answer"],
)
def test_a_batch_refused_fails_for_good_only_when_the_error_is_permanent(
    error: SesError, state: str
) -> None:
    refused = batch_refused(PENDING, error)
    assert (refused.recipients, refused.state, refused.message_id) == (
        PENDING.recipients,
        state,
        None,
    )
    assert refused.error == BatchError.of(error)


def test_a_batch_sent_keeps_its_message_id_and_no_error() -> None:
    retried = batch_refused(PENDING, UNAVAILABLE)
    assert batch_sent(retried, "0100-b") == Batch(PENDING.recipients, "sent", "0100-b", None)
