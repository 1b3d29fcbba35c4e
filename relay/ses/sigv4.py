"""AWS Signature Version 4 for Query API requests. Pure: no I/O, no clock.

(Stub: the Credentials type is fixed here so other modules can import it.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Credentials:
    """One set of AWS credentials. ``expiration`` is None for long-term keys."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    expiration: datetime | None = None
