"""SES answers as results or typed errors, of API v1 (XML) and v2 (JSON). Pure.

Nothing from an answer leaves here unchecked: it reaches SMTP replies, log
lines, the spool and metric labels. Identifiers (MessageId, RequestId, an
error's Code) must be short tokens; SES's prose (an error's Message) is
flattened to one bounded line; the quota's figures must be finite numbers.
Answers of both APIs are read whole only up to ``ses.max_response_size``
(``relay.ses.http.fetch``); JSON that is not an object, too deeply nested,
or otherwise unusable is a ``MalformedResponse``, never a crash.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any, Final

from relay.errors import SesError
from relay.oneline import one_line
from relay.ses.awsxml import local_name, xml_fields, xml_root
from relay.ses.classify import ses_error, transport_error
from relay.ses.http import Answer
from relay.ses.sender import UNLIMITED, SendQuota, SendResult

TOKEN: Final = re.compile(r"[A-Za-z0-9-]{1,128}")
"""A MessageId or RequestId as SES writes them (``0100018c...-000000``, a UUID)."""
ERROR_CODE: Final = re.compile(r"[A-Za-z0-9.]{1,64}")
"""An AWS error code (``MessageRejected``, ``AWS.SimpleQueueService.NonExistentQueue``)."""
MESSAGE_LIMIT: Final = 500
"""Characters kept of an error's Message (flattened to one line)."""


_ERROR_FIELDS = ("Code", "Message", "RequestId")


def error_from_answer(status: int, body: bytes) -> SesError:
    """The typed error for a non-2xx answer.

    SES wraps the fields in ``ErrorResponse/Error``; other AWS front ends use
    ``Errors/Error``; both are found. A body without a ``Code`` is judged by
    its status alone.
    """
    try:
        _, fields = xml_fields(body, _ERROR_FIELDS)
    except ValueError:
        fields = {}
    message = one_line(fields.get("Message", ""), MESSAGE_LIMIT)
    return _coded_error(fields.get("Code", ""), message, status, fields.get("RequestId"))


def v2_error_from_answer(answer: Answer) -> SesError:
    """The typed error for a non-2xx answer of API v2.

    As botocore's rest-json parser reads it: the code from the
    ``x-amzn-ErrorType`` header (cut at ``:``), else the body's ``__type``,
    ``code`` or ``Code`` (cut after a ``#`` namespace); the message from the
    body's ``message`` or ``Message``. Without a usable code the answer is
    judged by its status alone, as in v1.
    """
    fields = _json_object(answer.body) or {}
    code = answer.headers.get("x-amzn-errortype", "").partition(":")[0]
    if not code:
        found = fields.get("__type", fields.get("code", fields.get("Code")))
        code = found if isinstance(found, str) else ""
    code = code.strip().rpartition("#")[2]
    message = fields.get("message", fields.get("Message"))
    text = one_line(message, MESSAGE_LIMIT) if isinstance(message, str) else ""
    return _coded_error(code, text, answer.status, answer.headers.get("x-amzn-requestid"))


def _coded_error(code: str, message: str, status: int, request_id: str | None) -> SesError:
    if not ERROR_CODE.fullmatch(code):  # none, or not one a log line or a label may carry
        if status >= 500:
            return ses_error(f"HTTP{status}", f"HTTP {status} without an SES error", status, None)
        return transport_error(
            "MalformedResponse", f"HTTP {status} without an SES error body", http_status=status
        )
    return ses_error(code, message, status, _token(request_id))


def parse_send_email(answer: Answer) -> SendResult:
    """The MessageId of a 2xx v2 SendEmail answer (``{"MessageId": "..."}``),
    judged as ``parse_send_raw_email`` judges v1's."""
    fields = _success_object(answer.body)
    message_id = fields.get("MessageId")
    if not isinstance(message_id, str) or not message_id:
        raise transport_error("MalformedResponse", "SES answer has no MessageId", http_status=200)
    request_id = _token(answer.headers.get("x-amzn-requestid"))
    if not TOKEN.fullmatch(message_id):
        return SendResult(None, request_id, unusable_id=one_line(message_id, 100))
    return SendResult(message_id, request_id)


def parse_get_account(answer: Answer) -> SendQuota:
    """The ``SendQuota`` figures and ``SendingEnabled`` of a 2xx v2 GetAccount answer."""
    fields = _success_object(answer.body)
    quota = fields.get("SendQuota")
    figures = quota if isinstance(quota, dict) else {}
    enabled = fields.get("SendingEnabled", True)
    values = [_figure(figures.get(name)) for name in _QUOTA_FIELDS]
    if not isinstance(enabled, bool):
        raise transport_error(
            "MalformedResponse", "SES account answer has no usable SendingEnabled", http_status=200
        )
    return _quota([value for value in values if value is not None], enabled)


def _figure(value: object) -> float | None:
    """A JSON number as a float; None for anything else (true and false
    included) and for an integer too large for one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object; None when it is not one."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep, a huge number
        return None
    return value if isinstance(value, dict) else None


def _success_object(body: bytes) -> dict[str, Any]:
    fields = _json_object(body)
    if fields is None:
        raise transport_error(
            "MalformedResponse", "SES answer is not a JSON object", http_status=200
        )
    return fields


def parse_send_raw_email(body: bytes) -> SendResult:
    """The MessageId of a 2xx SendRawEmail answer.

    An answer without a MessageId is not usable (``MalformedResponse``,
    retried). One whose MessageId is not a token (CR LF and a forged reply
    line, say) still says SES accepted the message: sending it again could
    deliver it twice, so the batch counts as sent, without that id
    (``unusable_id`` holds it flattened, for the caller to log).
    """
    fields = _success_fields(body, ("MessageId", "RequestId"))
    message_id = fields.get("MessageId")
    if not message_id:
        raise transport_error("MalformedResponse", "SES answer has no MessageId", http_status=200)
    request_id = _token(fields.get("RequestId"))
    if not TOKEN.fullmatch(message_id):
        return SendResult(None, request_id, unusable_id=one_line(message_id, 100))
    return SendResult(message_id, request_id)


_QUOTA_FIELDS = ("Max24HourSend", "MaxSendRate", "SentLast24Hours")


def parse_send_quota(body: bytes) -> SendQuota:
    """The figures of a 2xx GetSendQuota answer."""
    fields = _success_fields(body, _QUOTA_FIELDS)
    try:
        values = [float(fields[name]) for name in _QUOTA_FIELDS]
    except (KeyError, ValueError):
        values = []
    return _quota(values)


def _quota(values: list[float], sending_enabled: bool = True) -> SendQuota:
    """The quota of ``_QUOTA_FIELDS``' figures, in order, if each is usable."""
    if len(values) != len(_QUOTA_FIELDS) or not all(
        math.isfinite(value) and (value >= 0 or (name == "Max24HourSend" and value == UNLIMITED))
        for name, value in zip(_QUOTA_FIELDS, values, strict=True)
    ):
        raise transport_error(
            "MalformedResponse", "SES quota answer lacks a figure", http_status=200
        )
    daily, rate, sent = values
    return SendQuota(daily, rate, sent, sending_enabled)


def parse_identity_verification(body: bytes) -> dict[str, str]:
    """Identity → ``VerificationStatus`` ("Success", "Pending", "Failed", ...)
    of a 2xx GetIdentityVerificationAttributes answer. SES leaves out the
    identities it does not know."""
    try:
        root = xml_root(body)
    except ValueError as exc:
        raise transport_error(
            "MalformedResponse", f"SES answer is {exc}", http_status=200
        ) from None
    statuses: dict[str, str] = {}
    for entry in root.iter():
        if local_name(entry.tag) != "entry":
            continue
        key = status = None
        for element in entry.iter():
            name = local_name(element.tag)
            if name == "key":
                key = (element.text or "").strip()
            elif name == "VerificationStatus":
                status = one_line((element.text or "").strip(), 32)
        if key and status:
            statuses[key] = status
    return statuses


def _token(value: str | None) -> str | None:
    return value if value and TOKEN.fullmatch(value) else None


def _success_fields(body: bytes, names: Iterable[str]) -> dict[str, str]:
    try:
        _, fields = xml_fields(body, names)
    except ValueError as exc:
        raise transport_error(
            "MalformedResponse", f"SES answer is {exc}", http_status=200
        ) from None
    return fields
