"""SES error classification and the SMTP replies it implies: pure."""

from __future__ import annotations

import pytest

from relay.errors import Disposition, SesTransportError, SmtpReply
from relay.oneline import one_line
from relay.ses.awsxml import xml_fields
from relay.ses.classify import metric_code, no_credentials, ses_error, transport_error
from relay.ses.responses import (
    error_from_answer,
    parse_send_quota,
    parse_send_raw_email,
)

R, D, P = Disposition.RETRYABLE, Disposition.DEFERRABLE, Disposition.PERMANENT


@pytest.mark.parametrize(
    ("code", "message", "status", "disposition", "reply", "refresh", "pause"),
    [
        ("Throttling", "Maximum sending rate exceeded.", 400, R, "451 4.4.5", False, 0),
        ("Throttling", "Daily message quota exceeded.", 400, D, "451 4.3.2", False, 900),
        ("InternalFailure", "", 500, R, "451 4.3.0", False, 0),
        ("ServiceUnavailable", "", 503, R, "451 4.3.0", False, 0),
        ("SomethingNew", "", 502, R, "451 4.3.0", False, 0),
        ("MessageRejected", "Sending paused for this account.", 400, D, "451 4.3.2", False, 900),
        ("AccountSendingPausedException", "", 400, D, "451 4.3.2", False, 900),
        ("ConfigurationSetSendingPausedException", "", 400, D, "451 4.3.2", False, 0),
        ("MessageRejected", "Email address is not verified.", 400, P, "554 5.7.1", False, 0),
        ("MailFromDomainNotVerified", "", 400, D, "451 4.7.1", False, 0),
        ("SignatureDoesNotMatch", "", 403, D, "451 4.7.0", True, 60),
        ("ExpiredToken", "", 403, D, "451 4.7.0", True, 60),
        ("InvalidClientTokenId", "", 403, D, "451 4.7.0", True, 60),
        ("IncompleteSignature", "", 403, D, "451 4.7.0", True, 60),
        ("ConfigurationSetDoesNotExist", "", 400, P, "554 5.3.5", False, 0),
        ("InvalidParameterValue", "Illegal address", 400, P, "554 5.6.0", False, 0),
        ("AccessDenied", "not authorized", 403, P, "554 5.7.1", False, 0),
        ("SomethingNew", "", 400, D, "451 4.3.0", False, 0),
    ],
)
def test_error_classes(
    code: str,
    message: str,
    status: int,
    disposition: Disposition,
    reply: str,
    refresh: bool,
    pause: float,
) -> None:
    error = ses_error(code, message, status, "req-1")
    assert error.disposition is disposition
    assert str(error.smtp_reply).startswith(reply + " ")
    assert error.refresh_credentials is refresh
    assert error.pause == pause  # seconds all delivery waits: the account's error
    assert (error.code, error.message, error.http_status, error.request_id) == (
        code,
        message,
        status,
        "req-1",
    )
    assert error.retryable is (disposition is R)
    assert error.smtp_reply.code // 100 == (5 if disposition is P else 4)


def test_missing_credentials_defer_and_pause() -> None:
    error = no_credentials("no credentials found: environment, shared file, IMDS")
    assert (error.disposition, error.pause) == (D, 60)
    assert str(error.smtp_reply) == "451 4.7.0 relay cannot authenticate to SES"


def test_permanent_reply_carries_ses_text_on_one_line() -> None:
    error = ses_error(
        "MessageRejected", "Email address is not verified.\n  The following", 400, None
    )
    assert str(error.smtp_reply) == (
        "554 5.7.1 message rejected by SES: Email address is not verified. The following"
    )


@pytest.mark.parametrize(
    ("code", "reply"),
    [
        ("Timeout", "451 4.4.2"),
        ("ConnectionError", "451 4.4.1"),
        ("ResponseTooLarge", "451 4.3.0"),
        ("MalformedResponse", "451 4.3.0"),
    ],
)
def test_transport_errors_are_retryable(code: str, reply: str) -> None:
    error = transport_error(code, "why", request_sent=False)
    assert isinstance(error, SesTransportError)
    assert error.retryable
    assert error.request_sent is False
    assert str(error.smtp_reply).startswith(reply)


SES_ERROR = b"""<ErrorResponse xmlns="http://ses.amazonaws.com/doc/2010-12-01/">
  <Error><Type>Sender</Type><Code>MessageRejected</Code>
  <Message>Email address is not verified.</Message></Error>
  <RequestId>abc-123</RequestId></ErrorResponse>"""

OTHER_FRONT_END = b"""<?xml version="1.0"?><Response><Errors><Error>
  <Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated
  does not match</Message></Error></Errors><RequestID>x</RequestID><RequestId>r-9</RequestId>
  </Response>"""


def test_error_fields_found_at_any_depth() -> None:
    error = error_from_answer(400, SES_ERROR)
    assert (error.code, error.message, error.request_id) == (
        "MessageRejected",
        "Email address is not verified.",
        "abc-123",
    )
    assert error.disposition is P
    other = error_from_answer(403, OTHER_FRONT_END)
    assert (other.code, other.request_id, other.refresh_credentials) == (
        "SignatureDoesNotMatch",
        "r-9",
        True,
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html><body>Bad gateway</body></html>",
        b"\x00\xff garbage",
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>',
    ],
)
@pytest.mark.parametrize("status", [400, 403, 502])
def test_unusable_error_bodies_are_retryable(body: bytes, status: int) -> None:
    error = error_from_answer(status, body)
    assert error.retryable
    assert error.http_status == status


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<SendRawEmailResponse><SendRawEmailResult><MessageId>&lol3;</MessageId>
</SendRawEmailResult></SendRawEmailResponse>"""

XXE = b"""<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<SendRawEmailResponse><SendRawEmailResult><MessageId>&x;</MessageId>
</SendRawEmailResult></SendRawEmailResponse>"""


@pytest.mark.parametrize("body", [BILLION_LAUGHS, XXE])
def test_dtds_are_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match="not usable XML"):
        xml_fields(body, ["MessageId"])
    with pytest.raises(SesTransportError) as caught:
        parse_send_raw_email(body)
    assert caught.value.code == "MalformedResponse"


def test_send_raw_email_answer() -> None:
    body = b"""<SendRawEmailResponse xmlns="http://ses.amazonaws.com/doc/2010-12-01/">
      <SendRawEmailResult><MessageId>0100-abc</MessageId></SendRawEmailResult>
      <ResponseMetadata><RequestId>req-7</RequestId></ResponseMetadata>
    </SendRawEmailResponse>"""
    result = parse_send_raw_email(body)
    assert (result.message_id, result.request_id) == ("0100-abc", "req-7")


def test_success_without_message_id_is_an_error() -> None:
    with pytest.raises(SesTransportError, match="no MessageId"):
        parse_send_raw_email(b"<SendRawEmailResponse><ResponseMetadata/></SendRawEmailResponse>")


def test_quota_answer() -> None:
    body = b"""<GetSendQuotaResponse xmlns="http://ses.amazonaws.com/doc/2010-12-01/">
      <GetSendQuotaResult><SentLast24Hours>127.0</SentLast24Hours>
      <Max24HourSend>200.0</Max24HourSend><MaxSendRate>1.0</MaxSendRate>
      </GetSendQuotaResult></GetSendQuotaResponse>"""
    quota = parse_send_quota(body)
    assert (quota.max_24_hour_send, quota.max_send_rate, quota.sent_last_24_hours) == (
        200.0,
        1.0,
        127.0,
    )
    with pytest.raises(SesTransportError, match="lacks a figure"):
        parse_send_quota(body.replace(b"<MaxSendRate>1.0</MaxSendRate>", b""))


@pytest.mark.parametrize(
    "text",
    ["a\r\n250 forged", "a\n250 forged", "a\r250 forged", "a\x85250 forged", "a\u2028250 forged"],
)
def test_a_reply_is_one_line_whatever_its_text(text: str) -> None:
    reply = SmtpReply(554, "5.7.1", text)
    assert str(reply) == "554 5.7.1 a 250 forged"


def test_a_reply_fits_the_line_limit_in_ascii() -> None:
    reply = str(SmtpReply(554, "5.7.1", "\u00e9" * 1000))
    assert len(reply) == 510
    assert reply.isascii()
    assert reply.startswith("554 5.7.1 \\xe9\\xe9")
    assert reply.endswith("...")


def test_one_line_keeps_printable_text_and_flattens_the_rest() -> None:
    assert one_line("Email  address is fine", 100) == "Email  address is fine"
    assert one_line("Email  address\tis fine", 100) == "Email address is fine"
    assert one_line("a\u202e\u200bb\x9b[2J", 100) == "a b [2J"
    assert one_line("abcdef", 5) == "ab..."


@pytest.mark.parametrize(
    ("code", "label"),
    [
        ("", ""),
        ("MessageRejected", "MessageRejected"),
        ("Throttling", "Throttling"),
        ("SignatureDoesNotMatch", "SignatureDoesNotMatch"),
        ("NoCredentials", "NoCredentials"),
        ("Timeout", "Timeout"),
        ("MalformedResponse", "MalformedResponse"),
        ("HTTP503", "HTTP503"),
        ("HTTP600", "other"),
        ("Invented42", "other"),
    ],
)
def test_metric_code_knows_its_codes_and_calls_the_rest_other(code: str, label: str) -> None:
    assert metric_code(code) == label
