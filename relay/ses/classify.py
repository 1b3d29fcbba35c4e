"""What an SES error means for the mail: retry, defer or reject. Pure.

The codes of API v1 and v2 are told apart by name (v2's end in
``Exception``, but for ``MessageRejected``). The tables here are the ones
in the README ("SES errors and SMTP replies"); keep them in step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from relay.errors import Disposition, HttpTransportError, SesError, SesTransportError, SmtpReply
from relay.oneline import one_line

RETRYABLE = Disposition.RETRYABLE
DEFERRABLE = Disposition.DEFERRABLE
PERMANENT = Disposition.PERMANENT


@dataclass(frozen=True, slots=True)
class Rule:
    disposition: Disposition
    code: int
    enhanced: str
    text: str
    refresh_credentials: bool = False
    pause: float = 0.0
    """Seconds every delivery waits: the error is the account's, not the message's."""
    throttled: bool = False
    """The account's sending rate was exceeded: every delivery slows down."""

    def reply(self) -> SmtpReply:
        return SmtpReply(self.code, self.enhanced, self.text)


RATE_EXCEEDED = Rule(
    RETRYABLE, 451, "4.4.5", "SES sending rate exceeded, try again later", throttled=True
)
ACCOUNT_PAUSE = 900.0
"""Seconds delivery waits after the daily quota is spent or the account is paused."""
CREDENTIALS_PAUSE = 60.0
"""Seconds delivery waits after SES refused the relay's credentials."""

DAILY_QUOTA = Rule(
    DEFERRABLE,
    451,
    "4.3.2",
    "SES daily sending quota exceeded, try again later",
    pause=ACCOUNT_PAUSE,
)
SENDING_PAUSED = Rule(
    DEFERRABLE, 451, "4.3.2", "SES sending is paused for this account", pause=ACCOUNT_PAUSE
)
CONFIGURATION_SET_PAUSED = Rule(
    DEFERRABLE, 451, "4.3.2", "SES sending is paused for this configuration set"
)
MAIL_FROM_UNVERIFIED = Rule(DEFERRABLE, 451, "4.7.1", "SES custom MAIL FROM domain is not verified")
CREDENTIALS = Rule(
    DEFERRABLE,
    451,
    "4.7.0",
    "relay cannot authenticate to SES",
    refresh_credentials=True,
    pause=CREDENTIALS_PAUSE,
)
ACCOUNT_SUSPENDED = Rule(DEFERRABLE, 451, "4.3.2", "SES account is suspended", pause=ACCOUNT_PAUSE)
REJECTED = Rule(PERMANENT, 554, "5.7.1", "message rejected by SES")
NOT_FOUND = Rule(PERMANENT, 554, "5.3.5", "SES resource named for the message does not exist")
NO_CONFIGURATION_SET = Rule(PERMANENT, 554, "5.3.5", "SES configuration set does not exist")
INVALID_PARAMETER = Rule(PERMANENT, 554, "5.6.0", "SES refused a message parameter")
ACCESS_DENIED = Rule(PERMANENT, 554, "5.7.1", "not authorized to send as this identity")
SERVER_FAILURE = Rule(RETRYABLE, 451, "4.3.0", "SES temporary failure, try again later")
UNKNOWN_CLIENT_ERROR = Rule(DEFERRABLE, 451, "4.3.0", "SES refused the call, message kept")
TIMEOUT = Rule(RETRYABLE, 451, "4.4.2", "SES did not answer in time, try again later")
CONNECTION = Rule(RETRYABLE, 451, "4.4.1", "cannot connect to SES, try again later")
BAD_ANSWER = Rule(RETRYABLE, 451, "4.3.0", "unusable answer from SES, try again later")

# Error codes of the AWS front end that mean "these credentials (or this
# clock) are not accepted": an operator can fix them without losing mail.
CREDENTIAL_CODES = frozenset(
    {
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidClientTokenId",
        "ExpiredToken",
        "ExpiredTokenException",
        "UnrecognizedClientException",
        "MissingAuthenticationToken",
        "InvalidSignatureException",
        "RequestExpired",
        "AuthFailure",
    }
)

BY_CODE: dict[str, Rule] = {
    "InternalFailure": SERVER_FAILURE,
    "ServiceUnavailable": SERVER_FAILURE,
    "MailFromDomainNotVerified": MAIL_FROM_UNVERIFIED,
    "MailFromDomainNotVerifiedException": MAIL_FROM_UNVERIFIED,
    "AccountSendingPausedException": SENDING_PAUSED,
    "ConfigurationSetSendingPausedException": CONFIGURATION_SET_PAUSED,
    "ConfigurationSetDoesNotExist": NO_CONFIGURATION_SET,
    "ConfigurationSetDoesNotExistException": NO_CONFIGURATION_SET,
    "InvalidParameterValue": INVALID_PARAMETER,
    "AccessDenied": ACCESS_DENIED,
    "AccessDeniedException": ACCESS_DENIED,
    # API v2 (SendEmail, GetAccount); TooManyRequestsException,
    # LimitExceededException and SendingPausedException are read by message.
    "ThrottlingException": RATE_EXCEEDED,
    "AccountSuspendedException": ACCOUNT_SUSPENDED,
    "NotFoundException": NOT_FOUND,
    "BadRequestException": INVALID_PARAMETER,
    "InternalFailureException": SERVER_FAILURE,
    "ServiceUnavailableException": SERVER_FAILURE,
} | dict.fromkeys(CREDENTIAL_CODES, CREDENTIALS)


def _daily(lowered: str) -> bool:
    return "daily message quota" in lowered or "daily sending quota" in lowered


def _too_many_requests(lowered: str) -> Rule:
    return DAILY_QUOTA if _daily(lowered) else RATE_EXCEEDED


def _limit_exceeded(lowered: str) -> Rule:
    return RATE_EXCEEDED if "rate" in lowered and not _daily(lowered) else DAILY_QUOTA


def _message_rejected(lowered: str) -> Rule:
    return SENDING_PAUSED if "sending paused" in lowered else REJECTED


def _sending_paused(lowered: str) -> Rule:
    return CONFIGURATION_SET_PAUSED if "configuration set" in lowered else SENDING_PAUSED


_BY_MESSAGE: Final[dict[str, Callable[[str], Rule]]] = {
    "Throttling": _too_many_requests,
    "TooManyRequestsException": _too_many_requests,
    "LimitExceededException": _limit_exceeded,
    "MessageRejected": _message_rejected,
    "SendingPausedException": _sending_paused,
}
"""Codes whose meaning depends on SES's message (lower-cased)."""

TRANSPORT: dict[str, Rule] = {
    "Timeout": TIMEOUT,
    "ConnectionError": CONNECTION,
    "ResponseTooLarge": BAD_ANSWER,
    "MalformedResponse": BAD_ANSWER,
}

NO_CREDENTIALS: Final = "NoCredentials"
"""The code of a call that could not be signed."""

KNOWN_CODES: Final = frozenset(
    {NO_CREDENTIALS, *_BY_MESSAGE, *BY_CODE, *TRANSPORT}
    | {f"HTTP{status}" for status in range(500, 600)}  # a 5xx without an SES error
)
"""The codes this module tells apart, and ours; any other is "other" in metrics."""

REPLY_MESSAGE_LIMIT: Final = 300
"""Characters of SES's message kept in an SMTP reply."""


def metric_code(code: str) -> str:
    """``code`` as a metric label: "" (success) and known codes as they are,
    any other as "other", so that an endpoint cannot create series at will."""
    return code if not code or code in KNOWN_CODES else "other"


def rule_for(code: str, message: str, http_status: int | None) -> Rule:
    """The rule for one SES error answer.

    v2's code for an exceeded daily quota is not documented: a
    ``TooManyRequestsException`` or ``LimitExceededException`` whose message
    names the daily quota is taken for it, and any other
    ``LimitExceededException`` too unless its message names the rate (a
    pause is the safe reading: the mail is kept, SES is not hammered).
    """
    read = _BY_MESSAGE.get(code)
    if read is not None:
        return read(message.lower())
    rule = BY_CODE.get(code)
    if rule is not None:
        return rule
    if http_status is None or http_status >= 500:
        return SERVER_FAILURE
    return UNKNOWN_CLIENT_ERROR


def ses_error(code: str, message: str, http_status: int | None, request_id: str | None) -> SesError:
    """The typed error for an SES error answer."""
    rule = rule_for(code, message, http_status)
    reply = rule.reply()
    if rule.disposition is PERMANENT and message:
        # SES's own words tell the sender what to fix ("Email address is
        # not verified. ..."); they never hold secrets.
        text = one_line(message, REPLY_MESSAGE_LIMIT)
        reply = SmtpReply(rule.code, rule.enhanced, f"{rule.text}: {text}")
    return SesError(
        code=code,
        message=message,
        http_status=http_status,
        request_id=request_id,
        disposition=rule.disposition,
        smtp_reply=reply,
        refresh_credentials=rule.refresh_credentials,
        pause=rule.pause,
        throttled=rule.throttled,
    )


def no_credentials(message: str) -> SesError:
    """The typed error for a call that could not be signed: no credentials.

    Deferrable: the mail is kept while an operator fixes the credentials.
    """
    rule = CREDENTIALS
    return SesError(
        code=NO_CREDENTIALS,
        message=message,
        http_status=None,
        request_id=None,
        disposition=rule.disposition,
        smtp_reply=rule.reply(),
        pause=rule.pause,
    )


def transport_error(
    code: str, message: str, *, http_status: int | None = None, request_sent: bool = True
) -> SesTransportError:
    """The typed error for a call that got no usable SES answer."""
    rule = TRANSPORT[code]
    return SesTransportError(
        code=code,
        message=message,
        http_status=http_status,
        request_id=None,
        disposition=rule.disposition,
        smtp_reply=rule.reply(),
        request_sent=request_sent,
    )


_UNANSWERED_CODES: Final = {
    "connect": "ConnectionError",
    "connect-timeout": "Timeout",
    "timeout": "Timeout",
    "io": "ConnectionError",
    "too-large": "ResponseTooLarge",
}


def unanswered(error: HttpTransportError) -> SesTransportError:
    """The typed error for an SES call that got no usable answer."""
    return transport_error(
        _UNANSWERED_CODES[error.cause],
        str(error),
        http_status=error.status,
        request_sent=error.request_sent,
    )


SENDING_DISABLED: Final = "SendingDisabled"
"""The code of ``sending_disabled``: v2 GetAccount's ``SendingEnabled`` is false."""


def sending_disabled() -> SesError:
    """The account's sending is off (GetAccount's ``SendingEnabled`` false):
    all delivery pauses as for "sending paused"."""
    rule = SENDING_PAUSED
    return SesError(
        code=SENDING_DISABLED,
        message="SES GetAccount says SendingEnabled is false",
        http_status=None,
        request_id=None,
        disposition=rule.disposition,
        smtp_reply=rule.reply(),
        pause=rule.pause,
    )
