"""What follows a delivery attempt. Pure: an entry, its errors, the
configuration and the time in; a decision out.

The queue manager (``relay.delivery.Delivery``) makes an attempt, writes
each batch's outcome into the entry, then asks ``after_attempt`` what to do
and does it:

- ``Forget``: every batch was sent; the entry leaves the spool.
- ``Refuse``: an inline attempt (the client still waits for its reply to
  DATA) where SES refused every batch: the client gets SES's refusal instead
  of ``250`` and keeps the message; nothing of ours remains.
- ``Wait``: nothing was tried (no sending-rate token in time, or all delivery
  is paused): not a failed attempt; try again when sending may go on.
- ``Retry``: batches are still pending after a failed attempt: the entry,
  with one attempt more, its history and its next attempt, is written and
  tried again then (``relay.schedule``).
- ``GiveUp``: nothing is pending and some batch failed for good: bounce its
  recipients and move the entry to the dead-letter area.

``batch_sent`` and ``batch_refused`` are a batch's state after SES's answer.

``DataReply`` is what an attempt made while the client waits
(``Delivery.accept``) comes to: the reply to DATA and what became of the
message, which the handler logs and metrics count as they are;
``sent_reply`` and ``queued_reply`` are its two ``250`` forms.

``expire`` is the decision before an attempt on a message older than
``delivery.max_age``: what is pending fails, and ``after_attempt`` then gives
it up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

from relay.config import DeliveryConfig
from relay.errors import Disposition, SesError, SmtpReply
from relay.oneline import one_line
from relay.schedule import next_attempt_at
from relay.spool import MAX_HISTORY, Batch, BatchError, BatchState, Entry

MAX_IDS_IN_REPLY = 5
"""SES message ids named in the reply to DATA."""
ERROR_TEXT_LIMIT = 200
"""Characters of one error's text kept in the entry's history."""
NO_ANSWER = "no answer in time"


@dataclass(frozen=True, slots=True)
class Forget:
    """Every batch was sent."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Inline, SES refused every batch: ``reply`` instead of ``250``."""

    reply: SmtpReply


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing was tried: try again at ``at`` (wall time); no attempt counted."""

    at: float


@dataclass(frozen=True, slots=True)
class Retry:
    """Write ``entry`` (one attempt more) and try again at ``entry.next_attempt``."""

    entry: Entry
    reason: str
    """Why the attempt failed, for the log line."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Bounce the recipients of ``failed`` and move the entry to the dead letters."""

    failed: tuple[Batch, ...]


Decision = Forget | Refuse | Wait | Retry | GiveUp

MessageOutcome = Literal["sent", "queued", "deferred", "rejected"]


@dataclass(frozen=True, slots=True)
class DataReply:
    """The reply to a message's DATA, and what it means for the message:
    sent (SES took every batch at once), queued (``250``, delivery goes on
    in the background), deferred (``4xx``) or rejected (``5xx``)."""

    reply: SmtpReply
    outcome: MessageOutcome

    @classmethod
    def refused(cls, reply: SmtpReply) -> DataReply:
        """The message is not taken: deferred (``4xx``) or rejected (``5xx``)."""
        return cls(reply, "deferred" if reply.code // 100 == 4 else "rejected")


def batch_sent(batch: Batch, message_id: str | None) -> Batch:
    """``batch`` after SES took it as ``message_id``."""
    return replace(batch, state="sent", message_id=message_id, error=None)


def batch_refused(batch: Batch, error: SesError) -> Batch:
    """``batch`` after SES refused it: failed for good when the error is
    permanent, pending otherwise; the error kept either way."""
    state: BatchState = "failed" if error.disposition is Disposition.PERMANENT else "pending"
    return replace(batch, state=state, error=BatchError.of(error))


def sent_reply(entry: Entry) -> DataReply:
    """SES took every batch while the client waited: the ids it gave them."""
    ids = [b.message_id for b in entry.batches if b.message_id]
    shown = " ".join(ids[:MAX_IDS_IN_REPLY]) or "(SES gave no usable message id)"
    more = f" and {len(ids) - MAX_IDS_IN_REPLY} more" if len(ids) > MAX_IDS_IN_REPLY else ""
    return DataReply(SmtpReply(250, "2.0.0", f"Ok: {entry.id} sent as {shown}{more}"), "sent")


def queued_reply(entry: Entry) -> DataReply:
    """The message is ours; delivery goes on in the background."""
    return DataReply(SmtpReply(250, "2.0.0", f"Ok: queued as {entry.id}"), "queued")


def after_attempt(
    entry: Entry,
    errors: Mapping[int, SesError],
    *,
    starved: bool,
    inline: bool,
    config: DeliveryConfig,
    now: float,
    resume_at: float,
    jitter: float,
) -> Decision:
    """What to do with ``entry`` after an attempt that ended at ``now``.

    ``entry`` holds every batch's outcome; ``errors`` maps the index of each
    batch SES refused in this attempt to SES's error. ``starved``: some batch
    got no sending-rate token in time (it was not sent, and is no error).
    ``inline``: the client is waiting for the reply to DATA. ``resume_at``:
    when sending may go on (now, or the end of a pause of all delivery).
    ``jitter``: uniform in [0, 1], for the retry schedule. Times are wall
    times (Unix seconds).
    """
    states = {batch.state for batch in entry.batches}
    if states == {"sent"}:
        return Forget()
    if inline and states == {"failed"} and errors:
        return Refuse(errors[min(errors)].smtp_reply)
    pending = entry.pending()
    if pending and starved and not errors:
        return Wait(resume_at)
    if pending:
        reason = "; ".join(
            one_line(f"{e.code}: {e.message}", ERROR_TEXT_LIMIT) for e in errors.values()
        )
        reason = reason or NO_ANSWER
        history = (*entry.history, f"{_stamp(now)} {reason}")
        retry_at = next_attempt_at(
            received=entry.received,
            now=now,
            attempt=entry.attempts + 1,
            minimum=config.retry_min,
            maximum=config.retry_max,
            max_age=config.max_age,
            jitter=jitter,
        )
        retried = replace(
            entry,
            attempts=entry.attempts + 1,
            next_attempt=retry_at,
            history=history[-MAX_HISTORY:],
        )
        return Retry(retried, reason)
    return GiveUp(tuple(batch for batch in entry.batches if batch.state == "failed"))


def expire(entry: Entry) -> Entry:
    """``entry`` after ``delivery.max_age``: whatever is pending has failed."""
    last = entry.history[-1] if entry.history else "no delivery attempt succeeded"
    reply = SmtpReply(554, "5.4.7", f"message expired in queue; last error: {last}")
    for index in entry.pending():
        entry = entry.with_batch(
            index, replace(entry.batches[index], state="failed", error=BatchError(reply))
        )
    return entry


def _stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
