"""The SES API v2 client: SendEmail with ``Content.Raw`` and GetAccount
(rest-json), over ``relay.ses.transport``, which signs, sends and retries
them as it does v1's calls (same host, same signing name ``ses``)."""

from __future__ import annotations

from relay.errors import SesError
from relay.ses.client import log_unusable_id
from relay.ses.http import Answer
from relay.ses.responses import parse_get_account, parse_send_email, v2_error_from_answer
from relay.ses.sender import SendQuota, SendRequest, SendResult
from relay.ses.transport import Call, SignedApi, message_body
from relay.ses.v2body import ACCOUNT_PATH, JSON_CONTENT_TYPE, SEND_EMAIL_PATH, send_email_chunks

__all__ = ["SesV2Client"]

_GET_ACCOUNT = Call("GetAccount", "GET", ACCOUNT_PATH, b"", None)


class SesV2Client(SignedApi):
    """Calls SES's API v2; a ``relay.ses.sender.SesSender``."""

    def _error(self, answer: Answer) -> SesError:
        return v2_error_from_answer(answer)

    async def send(self, request: SendRequest, *, deadline: float | None = None) -> SendResult:
        """SendEmail of one batch with the raw message; ``deadline`` (seconds)
        bounds the whole call, retries included. The body is made from the
        message's chunks (``relay.ses.transport.message_body``)."""
        raw = request.raw_message
        body = await message_body(lambda: send_email_chunks(request, raw.chunks()), raw.size)
        call = Call("SendEmail", "POST", SEND_EMAIL_PATH, body, JSON_CONTENT_TYPE)
        result = await self._call(call, parse_send_email, deadline, queue_id=request.queue_id)
        log_unusable_id(result)
        return result

    async def quota(self, *, deadline: float | None = None) -> SendQuota:
        """GetAccount's ``SendQuota`` and ``SendingEnabled``."""
        return await self._call(_GET_ACCOUNT, parse_get_account, deadline)
