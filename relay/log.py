"""The relay's named loggers, one per stage, created here only."""

from __future__ import annotations

import logging

smtp_log = logging.getLogger("relay.smtp")
delivery_log = logging.getLogger("relay.delivery")
ses_log = logging.getLogger("relay.ses")
