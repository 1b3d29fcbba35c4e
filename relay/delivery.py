"""Delivering one accepted message to SES, batch by batch.

(Slice 1: inline only. The durable spool and background retries come next;
until then a message that SES does not take at once gets a 4xx and the
client keeps it.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from relay.errors import Disposition, SesError, SmtpReply
from relay.message import PreparedMessage
from relay.ses.client import SendResult, SesClient
from relay.ses.query import SendRawEmailRequest

MAX_IDS_IN_REPLY = 5


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What SES said to one batch: a result or an error."""

    recipients: tuple[str, ...]
    result: SendResult | None = None
    error: SesError | None = None


def requests_for(
    message: PreparedMessage, source: str, batches: Sequence[tuple[str, ...]]
) -> list[SendRawEmailRequest]:
    """One SendRawEmail request per batch, all with the same raw bytes."""
    ses = message.ses
    return [
        SendRawEmailRequest(
            raw_message=message.raw,
            destinations=batch,
            source=source,
            from_arn=ses.from_arn,
            source_arn=ses.source_arn,
            return_path_arn=ses.return_path_arn,
            configuration_set=ses.configuration_set,
            tags=ses.tags,
        )
        for batch in batches
    ]


async def send_batches(
    ses: SesClient, requests: Sequence[SendRawEmailRequest], *, deadline: float
) -> list[BatchOutcome]:
    """Send every batch at once; each outcome in the order of ``requests``."""

    async def send(request: SendRawEmailRequest) -> BatchOutcome:
        try:
            result = await ses.send_raw_email(request, deadline=deadline)
        except SesError as error:
            return BatchOutcome(request.destinations, error=error)
        return BatchOutcome(request.destinations, result=result)

    return list(await asyncio.gather(*(send(request) for request in requests)))


def reply_for(queue_id: str, outcomes: Sequence[BatchOutcome]) -> SmtpReply:
    """The DATA reply for a message whose batches ended as ``outcomes``.

    All accepted → 250 with the SES MessageIds. Any batch that may still
    succeed later → its 4xx, so the client tries again. Otherwise (every
    failure permanent) → the first permanent 5xx, with SES's text; when some
    batches were delivered the text says so, never a silent partial send.
    """
    sent = [o for o in outcomes if o.result is not None]
    failed = [o.error for o in outcomes if o.error is not None]
    if not failed:
        ids = [o.result.message_id for o in sent if o.result is not None]
        shown = " ".join(ids[:MAX_IDS_IN_REPLY])
        more = f" and {len(ids) - MAX_IDS_IN_REPLY} more" if len(ids) > MAX_IDS_IN_REPLY else ""
        return SmtpReply(250, "2.0.0", f"Ok: {queue_id} sent as {shown}{more}")
    temporary = [e for e in failed if e.disposition is not Disposition.PERMANENT]
    error = temporary[0] if temporary else failed[0]
    reply = error.smtp_reply
    if sent:
        delivered = sum(len(o.recipients) for o in sent)
        total = sum(len(o.recipients) for o in outcomes)
        reply = SmtpReply(
            reply.code,
            reply.enhanced,
            f"{reply.text} ({delivered} of {total} recipients were already delivered)",
        )
    return reply
