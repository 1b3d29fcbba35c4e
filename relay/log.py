"""The relay's named loggers, one per stage, created here only, and the two
formats of its log: text (the default) and JSON (``log.format = "json"``).

Log events, not prose: one line per stage of a message with its queue id, as
Postfix does (``3F2A1B: to=<a@b> status=sent (ses id 0100...)``), and one
per refusal before DATA. Nothing is logged per accepted SMTP command.

An event line passes its facts as ``extra=`` fields, whose names and
meanings are ``FIELDS`` (a stable contract: the README lists them). The text
format prints the message alone; the JSON format prints one object per line
with ``time``, ``level``, ``logger``, ``message``, the event's fields as keys
and, after an error, ``exception``, for Loki or Elasticsearch. Times are ISO
8601 with the local offset in both formats.

The JSON object is written with ``json.dumps``: a formatter package
(python-json-logger) would be one more dependency for these few lines, and
the field names would still be ours.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

smtp_log = logging.getLogger("relay.smtp")
delivery_log = logging.getLogger("relay.delivery")
ses_log = logging.getLogger("relay.ses")

FIELDS: Final[Mapping[str, str]] = {
    "event": "what happened: received (DATA answered), sent, deferred, bounced, expired "
    "(a batch), removed (every batch sent), dead (moved to the dead-letter area), "
    "bounce_queued, refused (before DATA), auth, retried (an SES call), stopped",
    "queue_id": "the message's queue id",
    "client": "the client's IP address (the PROXY header's source, if any)",
    "via": "the load balancer that named client in a PROXY header",
    "user": "the AUTH user; null when the client did not authenticate",
    "command": "the SMTP command refused: MAIL, RCPT or AUTH",
    "arg": "what followed the refused command (of AUTH, the mechanism only)",
    "reply": "the SMTP reply given to the client",
    "status": "how an AUTH attempt ended: ok, failed, refused (locked out), unavailable",
    "from": 'the envelope sender ("" for the null sender)',
    "to": "the recipients of one SES batch (a list)",
    "recipients": "how many recipients the message has",
    "size": "bytes of the message as received",
    "delay": "seconds from the end of DATA to its reply",
    "attempts": "delivery attempts so far that failed",
    "ses_message_id": "SES's MessageId of a sent batch",
    "reason": "why a batch was deferred, bounced or expired, or a call retried",
    "next_attempt": "when a deferred batch is tried again (ISO 8601)",
    "bounce_id": "the queue id of the delivery status notification to the sender",
    "action": "the SES API action of a retried call",
    "retries": "how many times an SES call was retried inside the client",
}
"""The JSON format's event fields. Names and meanings are stable: a field may
be added, never renamed or given another meaning."""

FORMATS: Final = ("text", "json")
LEVELS: Final = ("debug", "info", "warning", "error")

_RECORD_ATTRIBUTES: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
}


def timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 in the local time zone, with its offset, to the millisecond."""
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of ``record``."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE``, or ``TIME LEVEL LOGGER[PID]: MESSAGE``
    (a worker of ``smtp.workers``)."""

    def __init__(self, *, pid: bool = False) -> None:
        process = "[%(process)d]" if pid else ""
        super().__init__(f"%(asctime)s %(levelname)s %(name)s{process}: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (with ``pid`` from a worker of
    ``smtp.workers``)."""

    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self._pid = pid

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._pid:
            document["pid"] = record.process
        document |= event_fields(record)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exception"] = record.exc_text
        return json.dumps(document, ensure_ascii=False, default=str)


_handler: logging.Handler | None = None


def configure(format: str = "text", level: str = "info", *, pid: bool = False) -> None:
    """Log to stderr (journald and container runtimes collect it there) in
    ``format`` from ``level`` up, each line with the process id with ``pid``
    (the workers of ``smtp.workers``, whose lines go to the same stream).
    Called again (a reload), it changes the format and level of the same
    handler."""
    global _handler  # noqa: PLW0603 (one handler per process)
    root = logging.getLogger()
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        root.addHandler(_handler)
    _handler.setFormatter(JsonFormatter(pid=pid) if format == "json" else TextFormatter(pid=pid))
    root.setLevel(level.upper())
    # aiosmtpd logs every command and connection at INFO on "mail.log", and
    # AUTH exchanges at DEBUG: never below WARNING, whatever log.level says.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
