"""What delivery needs of SES, whatever API and account serve it. Pure types.

``SesSender`` sends one batch (``SendRequest``) and reads the account's
quota. ``relay.ses.client.SesClient`` (the v1 Query API: SendRawEmail,
GetSendQuota), ``relay.ses.v2.SesV2Client`` (API v2: SendEmail with
``Content.Raw``, GetAccount) and ``relay.ses.api.AutoSender`` (one of the
two per message, by size) are the ones ``ses.api`` chooses from
(``relay.ses.api.connect``), so delivery never learns the wire format.

``SesParameters`` is the one typed form of the parameters a message carries
beside its sender and recipients: made from the ``X-SES-*`` headers and the
configuration (``relay.message``), kept in the spool entry (``relay.spool``
writes its JSON form), and sent with every batch of the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Protocol


@dataclass(frozen=True, slots=True)
class SesParameters:
    """A message's SES parameters; ``None`` and ``()`` are not sent.

    In API v1 terms ``ConfigurationSetName``, ``Tags``, ``SourceArn``,
    ``FromArn`` and ``ReturnPathArn``; in v2 ``ConfigurationSetName``,
    ``EmailTags``, ``FromEmailAddressIdentityArn`` (from ``source_arn``, which authorizes
    the envelope sender, else ``from_arn``), ``FeedbackForwardingEmailAddressIdentityArn`` and
    ``ListManagementOptions`` (``contact_list``, ``topic``; v1 has no
    parameter for them: its SES reads the header, which stays in the message).
    """

    configuration_set: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    """``(name, value)`` pairs, in order."""
    source_arn: str | None = None
    from_arn: str | None = None
    return_path_arn: str | None = None
    contact_list: str | None = None
    """``X-SES-LIST-MANAGEMENT-OPTIONS``' contact list name."""
    topic: str | None = None
    """... and its ``topic=`` (only with a contact list)."""


NO_PARAMETERS = SesParameters()


@dataclass(frozen=True, slots=True)
class SendRequest:
    """One batch: the complete MIME message (without ``Bcc:``) to some of its
    envelope recipients (at most 50, checked by the caller)."""

    raw_message: bytes
    destinations: tuple[str, ...] = ()
    source: str | None = None
    """The envelope sender SES uses (v1 ``Source``, v2 ``FromEmailAddress``)."""
    ses: SesParameters = NO_PARAMETERS
    queue_id: str = field(default="", compare=False)
    """The message's queue id, for log lines only (never sent; not compared)."""


@dataclass(frozen=True, slots=True)
class SendResult:
    """SES accepted a batch."""

    message_id: str | None
    """SES's MessageId; None when the answer's was not a token (see
    ``relay.ses.responses.parse_send_raw_email``)."""
    request_id: str | None
    unusable_id: str | None = None
    """The MessageId that was not a token, flattened and cut short, for a log line."""


@dataclass(frozen=True, slots=True)
class SendQuota:
    """The account's sending limits (v1 GetSendQuota, v2 GetAccount's ``SendQuota``)."""

    max_24_hour_send: float
    """``UNLIMITED`` (-1) for an account without a daily quota."""
    max_send_rate: float
    sent_last_24_hours: float
    sending_enabled: bool = True
    """v2 GetAccount's ``SendingEnabled``; GetSendQuota does not say (True)."""


UNLIMITED: Final = -1.0
"""``Max24HourSend`` of an account without a daily quota (SES API reference)."""


class SesSender(Protocol):
    """An SES account as delivery uses it. Every failure is a
    ``relay.errors.SesError``, classified by ``relay.ses.classify``."""

    async def send(self, request: SendRequest, *, deadline: float) -> SendResult:
        """Send one batch within ``deadline`` seconds, retries included."""
        ...

    async def quota(self) -> SendQuota:
        """The account's sending limits now."""
        ...
