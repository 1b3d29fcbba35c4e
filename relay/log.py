"""The relay's named loggers, one per stage, created here only.

Log events, not prose: one line per message with its queue id, as Postfix
does. Nothing is logged per SMTP command.
"""

from __future__ import annotations

import logging
import sys

smtp_log = logging.getLogger("relay.smtp")
delivery_log = logging.getLogger("relay.delivery")
ses_log = logging.getLogger("relay.ses")

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: int = logging.INFO) -> None:
    """Log to stderr (journald and container runtimes collect it there)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    # aiosmtpd logs every command and connection at INFO on "mail.log".
    logging.getLogger("mail.log").setLevel(logging.WARNING)
