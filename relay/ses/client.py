"""The SES v1 client: signed Query API calls (SendRawEmail, GetSendQuota,
GetIdentityVerificationAttributes) over ``relay.ses.transport``, which
signs, sends and retries them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from relay.errors import SesError
from relay.log import ses_log
from relay.ses.body import ChunkedBody
from relay.ses.http import Answer
from relay.ses.query import (
    FORM_CONTENT_TYPE,
    get_identity_verification_attributes_body,
    get_send_quota_body,
    send_raw_email_body,
)
from relay.ses.responses import (
    error_from_answer,
    parse_identity_verification,
    parse_send_quota,
    parse_send_raw_email,
)
from relay.ses.sender import SendQuota, SendRequest, SendResult
from relay.ses.transport import Call, SignedApi, backoff_delay, endpoint_url, message_body

__all__ = ["SendQuota", "SendResult", "SesClient", "backoff_delay", "endpoint_url"]

T = TypeVar("T")


def _query(action: str, body: bytes | ChunkedBody) -> Call:
    return Call(action, "POST", "", body, FORM_CONTENT_TYPE)


def _body(parse: Callable[[bytes], T]) -> Callable[[Answer], T]:
    """A parser of the Query API, which reads only the answer's body."""
    return lambda answer: parse(answer.body)


class SesClient(SignedApi):
    """Calls SES's v1 Query API; a ``relay.ses.sender.SesSender``."""

    def _error(self, answer: Answer) -> SesError:
        return error_from_answer(answer.status, answer.body)

    async def send(self, request: SendRequest, *, deadline: float | None = None) -> SendResult:
        """SendRawEmail of one batch; ``deadline`` (seconds) bounds the whole
        call, retries included. The body is made from the message's chunks
        (``relay.ses.transport.message_body``), never as a whole copy of a
        large one."""
        raw = request.raw_message
        body = await message_body(lambda: send_raw_email_body(request, raw.chunks()), raw.size)
        call = _query("SendRawEmail", body)
        result = await self._call(
            call, _body(parse_send_raw_email), deadline, queue_id=request.queue_id
        )
        log_unusable_id(result)
        return result

    async def quota(self, *, deadline: float | None = None) -> SendQuota:
        """GetSendQuota."""
        call = _query("GetSendQuota", get_send_quota_body())
        return await self._call(call, _body(parse_send_quota), deadline)

    async def get_identity_verification_attributes(
        self, identities: Sequence[str], *, deadline: float | None = None
    ) -> dict[str, str]:
        """Identity → SES's ``VerificationStatus`` ("Success" when verified);
        identities SES does not know are left out. Read-only."""
        call = _query(
            "GetIdentityVerificationAttributes",
            get_identity_verification_attributes_body(identities),
        )
        return await self._call(call, _body(parse_identity_verification), deadline)


def log_unusable_id(result: SendResult) -> None:
    """Warn of an accepted batch whose MessageId was not a token."""
    if result.unusable_id is not None:
        ses_log.warning(
            "SES accepted a message (request %s) with a MessageId that is not a token, "
            "not used: %r",
            result.request_id,
            result.unusable_id,
        )
