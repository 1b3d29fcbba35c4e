"""The aiosmtpd handler: hooks that turn policy decisions into SMTP replies.

Each hook is a thin adapter: the decisions live in ``relay.policy``,
``relay.space``, ``relay.message`` and ``relay.delivery``, which raise
``MessageRefused`` with the reply to give.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from relay.addresses import ascii_address
from relay.config import Config
from relay.delivery import Delivery
from relay.errors import MessageRefused, SpoolError
from relay.incoming import IncomingMessage
from relay.log import smtp_log
from relay.message import PreparedMessage, plan_batches, prepare_header
from relay.metrics import RelayMetrics
from relay.outcome import DataReply
from relay.policy import AUTH_REQUIRED, RELAY_DENIED, AccessPolicy
from relay.queueid import new_id
from relay.ses.sender import SesParameters
from relay.session import authenticated_user as session_user
from relay.session import client_address, client_label, session_fields
from relay.space import STORAGE_FULL, FreeSpace
from relay.spool import Batch, Entry

NULL_SENDER = ("", "<>")


class RelayHandler:
    """Decides MAIL, RCPT and DATA; delivers accepted messages to SES."""

    def __init__(
        self,
        config: Config,
        delivery: Delivery,
        space: FreeSpace,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        queue_id: Callable[[], str] = new_id,
        metrics: RelayMetrics,
    ) -> None:
        self._config = config
        self._delivery = delivery
        self._space = space
        self._metrics = metrics
        self._policy = AccessPolicy.from_config(config.smtp, config.auth)
        self._defaults = SesParameters(configuration_set=config.ses.configuration_set or None)
        self._clock = clock
        self._queue_id = queue_id

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        client, user = client_address(session), session_user(session)
        if not self._policy.may_relay(client, user):
            return str(AUTH_REQUIRED)
        if not await self._space.has_room():
            return str(STORAGE_FULL)
        if address not in NULL_SENDER:
            try:
                self._policy.check_sender(address, user)
            except MessageRefused as refused:
                return str(refused.reply)
        envelope.mail_from = "" if address in NULL_SENDER else address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if not self._policy.may_relay(client_address(session), session_user(session)):
            return str(RELAY_DENIED)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA_START(self, server: Any, session: Any, envelope: Any) -> IncomingMessage:
        """DATA starts: the message's file in the spool, which it goes to as it arrives."""
        queue_id = self._queue_id()
        file = self._delivery.new_message(queue_id)
        message_id = f"<{queue_id}@{self._config.smtp.hostname}>"

        def prepare(header: bytes, rest: bytes) -> PreparedMessage:
            return prepare_header(
                header,
                rest,
                now=self._clock(),
                message_id=lambda: message_id,
                defaults=self._defaults,
            )

        return IncomingMessage(
            queue_id,
            file,
            header_size_limit=self._config.smtp.header_size_limit,
            prepare=prepare,
        )

    async def handle_DATA(
        self, server: Any, session: Any, envelope: Any, message: IncomingMessage
    ) -> str:
        started = time.monotonic()
        queue_id = message.queue_id
        try:
            answer = await self._relay(queue_id, session, envelope, message)
        except MessageRefused as refused:
            answer = DataReply.refused(refused.reply)
        message.discard()  # refused before delivery took it: nothing is left
        size = message.size
        self._metrics.message(answer, size=size, recipients=len(envelope.rcpt_tos))
        delay = time.monotonic() - started
        if smtp_log.isEnabledFor(logging.INFO):  # its fields are built only when logged
            smtp_log.info(
                "%s: client=%s user=%s from=<%s> rcpts=%d size=%d status=%s delay=%.3f",
                queue_id,
                client_label(session),
                session_user(session) or "-",
                envelope.mail_from,
                len(envelope.rcpt_tos),
                size,
                answer.reply,
                delay,
                extra={
                    "event": "received",
                    "queue_id": queue_id,
                    **session_fields(session),
                    "from": envelope.mail_from,
                    "recipients": len(envelope.rcpt_tos),
                    "size": size,
                    "reply": str(answer.reply),
                    "delay": round(delay, 3),
                },
            )
        return str(answer.reply)

    async def _relay(
        self, queue_id: str, session: Any, envelope: Any, incoming: IncomingMessage
    ) -> DataReply:
        client, user = client_address(session), session_user(session)
        try:
            message = await incoming.finish()
        except SpoolError as exc:
            return DataReply.refused(self._space.refuse(queue_id, exc))
        self._policy.check_header_senders(message.originators, user)
        self._policy.check_identity_headers(message.identity_headers(), client, user)
        source = envelope.mail_from or ascii_address(message.from_address, "sender")
        batches = plan_batches(
            envelope.rcpt_tos,
            message.header_count,
            self._config.smtp.max_batch_recipients,
        )
        entry = Entry(
            id=queue_id,
            received=self._clock().timestamp(),
            client=client,
            user=user,
            sender=envelope.mail_from,
            source=source,
            recipients=tuple(envelope.rcpt_tos),
            batches=tuple(Batch(recipients=batch) for batch in batches),
            ses=message.ses,
        )
        return await self._delivery.accept(entry, incoming.take())
