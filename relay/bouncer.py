"""Bouncing: the delivery status notification (``relay.dsn``) for the
recipients of a message given up on after ``250``, queued in the spool as a
message of its own (sent with the null sender), and the loud log line when a
bounce itself fails.

The crash-safe order around it (record the bounce's id, queue the bounce,
move the message to the dead-letter area, then deliver the bounce) is
``relay.delivery``'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from relay.clock import Clock
from relay.config import Config
from relay.dsn import ORIGINAL_NEEDED, FailedRecipient, bounce_sender, build_dsn, should_bounce
from relay.errors import SmtpReply, SpoolError
from relay.log import delivery_log
from relay.metrics import RelayMetrics
from relay.oneline import LOG_TEXT_LIMIT, one_line
from relay.ses.sender import RawMessage
from relay.spool import Batch, Entry, Spool

NO_REASON = SmtpReply(554, "5.0.0", "delivery failed")
"""What a failed batch without a recorded error says."""


class Bouncer:
    """Writes the bounces of one relay's spool."""

    def __init__(self, config: Config, spool: Spool, clock: Clock, metrics: RelayMetrics) -> None:
        self._config = config
        self._spool = spool
        self._clock = clock
        self._metrics = metrics

    def wanted(self, entry: Entry) -> bool:
        """Whether a failure of ``entry`` is reported to its sender."""
        return should_bounce(entry.sender, self._config.delivery.bounces)

    async def queue(
        self, entry: Entry, message: RawMessage, failed: Sequence[Batch]
    ) -> Entry | None:
        """Write the DSN ``entry.bounce`` to the envelope sender (sent with the
        null sender) unless it is in the spool already. The entry to move to
        the dead-letter area (without ``bounce`` if none can be built), or
        None to try again later."""
        dsn_id = entry.bounce
        assert dsn_id is not None
        try:
            if await asyncio.to_thread(self._spool.find, dsn_id) is not None:
                return entry  # written before a crash or a failed move
        except SpoolError as exc:
            delivery_log.error("%s: cannot look for its bounce %s: %s", entry.id, dsn_id, exc)
            return None
        try:
            original = await asyncio.to_thread(message.head, ORIGINAL_NEEDED)
        except OSError as exc:
            delivery_log.error("%s: cannot read it for its bounce: %s", entry.id, exc)
            return None
        now = self._clock.wall()
        hostname = self._config.smtp.hostname
        bounce_from = bounce_sender(self._config.delivery.bounce_sender, entry.source, hostname)
        try:
            report = build_dsn(
                original=original,
                queue_id=entry.id,
                sender=entry.sender,
                failed=[
                    _failed_recipient(address, batch)
                    for batch in failed
                    for address in batch.recipients
                ],
                reporting_mta=hostname,
                bounce_from=bounce_from,
                arrival=datetime.fromtimestamp(entry.received, UTC),
                now=datetime.fromtimestamp(now, UTC),
                message_id=f"<{dsn_id}@{hostname}>",
            )
        except ValueError as exc:
            delivery_log.error("%s: cannot build a bounce: %s", entry.id, exc)
            return replace(entry, bounce=None)  # nothing to send; dead all the same
        bounce = Entry(
            id=dsn_id,
            received=now,
            client="localhost",
            sender="",
            source=bounce_from,
            recipients=(entry.sender,),
            batches=(Batch(recipients=(entry.sender,)),),
            bounce_of=entry.id,
        )
        try:
            await asyncio.to_thread(self._spool.put, bounce, report)
        except SpoolError as exc:
            delivery_log.error("%s: cannot queue the bounce: %s", entry.id, exc)
            return None
        delivery_log.info(
            "%s: bounce queued as %s to <%s>",
            entry.id,
            dsn_id,
            entry.sender,
            extra={
                "event": "bounce_queued",
                "queue_id": entry.id,
                "bounce_id": dsn_id,
                "to": [entry.sender],
            },
        )
        self._metrics.bounce("queued")
        return entry

    def sent(self) -> None:
        """A bounce was delivered."""
        self._metrics.bounce("sent")

    def failed(self, bounce: Entry, failed: Sequence[Batch]) -> None:
        """A bounce given up on (now in the dead-letter area): its recipient,
        the failed message's sender, will not be told. Said loudly, once."""
        reason = "; ".join(dict.fromkeys(str(b.error or "no reason given") for b in failed))
        delivery_log.error(
            "%s: the bounce for %s to <%s> failed, so its sender is not told: %s; kept in the "
            "dead-letter area (ses-relay queue show %s); bounces come from <%s>: if SES "
            "refuses that sender, verify it or set delivery.bounce_sender to an identity "
            "verified in SES",
            bounce.id,
            bounce.bounce_of,
            ", ".join(bounce.recipients),
            one_line(reason, LOG_TEXT_LIMIT),
            bounce.id,
            bounce.source,
        )
        self._metrics.bounce("failed")


def _failed_recipient(address: str, batch: Batch) -> FailedRecipient:
    reply = NO_REASON if batch.error is None else batch.error.reply
    return FailedRecipient(address, reply.enhanced, f"smtp; {reply}")
