"""SES answers as results or typed errors. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from relay.errors import SesError
from relay.ses.awsxml import local_name, xml_fields, xml_root
from relay.ses.classify import ses_error, transport_error


@dataclass(frozen=True, slots=True)
class SendResult:
    """SES accepted a SendRawEmail call."""

    message_id: str
    request_id: str | None


@dataclass(frozen=True, slots=True)
class SendQuota:
    """The account's sending limits (GetSendQuota)."""

    max_24_hour_send: float
    max_send_rate: float
    sent_last_24_hours: float


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
    code = fields.get("Code")
    if not code:
        if status >= 500:
            return ses_error(f"HTTP{status}", f"HTTP {status} without an SES error", status, None)
        return transport_error(
            "MalformedResponse", f"HTTP {status} without an SES error body", http_status=status
        )
    return ses_error(code, fields.get("Message", ""), status, fields.get("RequestId") or None)


def parse_send_raw_email(body: bytes) -> SendResult:
    """The MessageId of a 2xx SendRawEmail answer."""
    fields = _success_fields(body, ("MessageId", "RequestId"))
    message_id = fields.get("MessageId")
    if not message_id:
        raise transport_error("MalformedResponse", "SES answer has no MessageId", http_status=200)
    return SendResult(message_id=message_id, request_id=fields.get("RequestId") or None)


_QUOTA_FIELDS = ("Max24HourSend", "MaxSendRate", "SentLast24Hours")


def parse_send_quota(body: bytes) -> SendQuota:
    """The figures of a 2xx GetSendQuota answer."""
    fields = _success_fields(body, _QUOTA_FIELDS)
    try:
        values = [float(fields[name]) for name in _QUOTA_FIELDS]
    except (KeyError, ValueError):
        raise transport_error(
            "MalformedResponse", "SES quota answer lacks a figure", http_status=200
        ) from None
    return SendQuota(*values)


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
                status = (element.text or "").strip()
        if key and status:
            statuses[key] = status
    return statuses


def _success_fields(body: bytes, names: Iterable[str]) -> dict[str, str]:
    try:
        _, fields = xml_fields(body, names)
    except ValueError as exc:
        raise transport_error(
            "MalformedResponse", f"SES answer is {exc}", http_status=200
        ) from None
    return fields
