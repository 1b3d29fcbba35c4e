"""The log lines of a message's stages after DATA, one per batch, each with
the queue id, as Postfix writes them::

    3F2A1B: to=<a@example.net>,<b@example.net> status=sent (ses id 0100...)
    3F2A1B: to=<c@example.net> status=deferred (Throttling: Maximum sending
        rate exceeded.) next_attempt=2026-01-05T12:01:00+00:00 attempts=1
    3F2A1B: to=<d@example.net> status=bounced (MessageRejected: ...)
    3F2A1B: to=<e@example.net> status=expired (554 5.4.7 message expired ...)

Each carries its facts as ``extra=`` fields (``relay.log.FIELDS``) for the
JSON format. The message's own lines (received: ``relay.handler``; left the
queue, bounce queued: ``relay.delivery``, ``relay.bouncer``) are elsewhere.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from relay.errors import SesError
from relay.log import delivery_log
from relay.oneline import LOG_TEXT_LIMIT, one_line
from relay.spool import Batch, Entry

NO_MESSAGE_ID = "SES gave no usable message id"
NOT_TRIED = "not tried: no sending-rate token in time"
"""Why a batch is deferred that SES was not asked about in an attempt."""


def error_text(error: SesError) -> str:
    """An SES error on one bounded line: ``CODE: message``."""
    return one_line(f"{error.code}: {error.message}", LOG_TEXT_LIMIT)


def sent(entry: Entry, batch: Batch) -> None:
    """SES took ``batch`` (its ``message_id`` set)."""
    shown = f"ses id {batch.message_id}" if batch.message_id else NO_MESSAGE_ID
    _batch_line(logging.INFO, entry, batch, "sent", shown, ses_message_id=batch.message_id)


def deferred(entry: Entry, batch: Batch, reason: str) -> None:
    """``batch`` is tried again at ``entry.next_attempt``."""
    when = datetime.fromtimestamp(entry.next_attempt).astimezone().isoformat(timespec="seconds")
    _batch_line(
        logging.INFO,
        entry,
        batch,
        "deferred",
        reason,
        suffix=f" next_attempt={when} attempts={entry.attempts}",
        next_attempt=when,
        attempts=entry.attempts,
    )


def bounced(entry: Entry, batch: Batch, error: SesError) -> None:
    """SES refused ``batch`` for good: its recipients are bounced."""
    _batch_line(logging.WARNING, entry, batch, "bounced", error_text(error))


def expired(entry: Entry, batch: Batch) -> None:
    """``batch`` was still pending at ``delivery.max_age``: bounced."""
    reason = str(batch.error) if batch.error is not None else "expired"
    _batch_line(logging.WARNING, entry, batch, "expired", one_line(reason, LOG_TEXT_LIMIT))


def _batch_line(
    level: int,
    entry: Entry,
    batch: Batch,
    event: str,
    detail: str,
    *,
    suffix: str = "",
    **fields: Any,
) -> None:
    if not delivery_log.isEnabledFor(level):  # one line per batch: built only when logged
        return
    delivery_log.log(
        level,
        "%s: to=%s status=%s (%s)%s",
        entry.id,
        ",".join(f"<{address}>" for address in batch.recipients),
        event,
        detail,
        suffix,
        extra={
            "event": event,
            "queue_id": entry.id,
            "to": list(batch.recipients),
            **({"reason": detail} if event != "sent" else {}),
            **fields,
        },
    )
