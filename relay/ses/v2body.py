"""Request bodies of SES API v2 (rest-json, 2019-09-27). Pure: no I/O.

``send_email_chunks`` is the body of a SendEmail call as a generator over
the raw message's chunks: the JSON fields, then the message's base64 as
``Content.Raw.Data``, encoded a piece at a time (``relay.ses.body``), then
the JSON that closes it. ``Content`` comes last so that the fields before it
are written once, whatever the message's size.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, Final

from relay.ses.body import base64_chunks
from relay.ses.sender import SendRequest

__all__ = [
    "ACCOUNT_PATH",
    "JSON_CONTENT_TYPE",
    "SEND_EMAIL_PATH",
    "send_email_chunks",
    "send_email_fields",
]

SEND_EMAIL_PATH: Final = "/v2/email/outbound-emails"
ACCOUNT_PATH: Final = "/v2/email/account"
JSON_CONTENT_TYPE: Final = "application/json"

_CONTENT_OPEN: Final = b'"Content":{"Raw":{"Data":"'
_CONTENT_CLOSE: Final = b'"}}}'


def send_email_fields(request: SendRequest) -> dict[str, Any]:
    """SendEmail's fields but ``Content``, for one batch: the batch's
    recipients in ``ToAddresses`` only (the headers say who the message is
    to; SES counts every address of ``Destination``), the envelope sender as
    ``FromEmailAddress``, and the message's SES parameters."""
    fields: dict[str, Any] = {}
    if request.source is not None:
        fields["FromEmailAddress"] = request.source
    ses = request.ses
    identity_arn = ses.source_arn or ses.from_arn
    if identity_arn is not None:
        fields["FromEmailAddressIdentityArn"] = identity_arn
    if request.destinations:
        fields["Destination"] = {"ToAddresses": list(request.destinations)}
    if ses.return_path_arn is not None:
        fields["FeedbackForwardingEmailAddressIdentityArn"] = ses.return_path_arn
    if ses.tags:
        fields["EmailTags"] = [{"Name": name, "Value": value} for name, value in ses.tags]
    if ses.configuration_set is not None:
        fields["ConfigurationSetName"] = ses.configuration_set
    if ses.contact_list is not None:
        options = {"ContactListName": ses.contact_list}
        if ses.topic is not None:
            options["TopicName"] = ses.topic
        fields["ListManagementOptions"] = options
    return fields


def send_email_chunks(request: SendRequest, message: Iterable[bytes]) -> Iterator[bytes]:
    """The SendEmail body for ``request`` with the raw message given as
    ``message``'s chunks (``request.raw_message`` is not read)."""
    fields = json.dumps(send_email_fields(request), separators=(",", ":")).encode("ascii")
    yield fields[:-1] + (b"," if len(fields) > 2 else b"") + _CONTENT_OPEN
    yield from base64_chunks(message)
    yield _CONTENT_CLOSE
