"""SES's message size limits per API, and which API a message needs. Pure.

SES states its limits after base64 encoding (the raw message travels as
base64 in both APIs), and the relay's limit is on the message as received:
base64 turns every 3 bytes into 4, so a raw limit of ``L * 3 // 4`` keeps
the encoded message within ``L``.

- v1 ``SendRawEmail``: 10 MB, which its own error spells as "more than
  10485760 bytes" (10 MiB): 10485760 * 3 / 4 = 7864320 raw bytes.
- v2 ``SendEmail`` with ``Content.Raw``: 40 MB "after base64 encoding";
  whether that is MiB, and whether it counts the JSON around the message,
  is not documented. Read conservatively as 40,000,000 bytes (decimal MB,
  the smaller reading) of base64: 40,000,000 * 3 / 4 = 30,000,000 raw bytes.
  The JSON around it (addresses, ARNs, tags) adds a few KB, which the
  difference between 40 MiB (41,943,040) and 40 MB leaves room for.
"""

from __future__ import annotations

from typing import Final, Literal

Api = Literal["v1", "v2", "auto"]
APIS: Final = ("v1", "v2", "auto")

V1_MAX_ENCODED: Final = 10 * 1024 * 1024
V1_MAX_MESSAGE: Final = V1_MAX_ENCODED * 3 // 4
"""7,864,320: the largest raw message whose base64 fits SendRawEmail."""
V2_MAX_ENCODED: Final = 40_000_000
V2_MAX_MESSAGE: Final = V2_MAX_ENCODED * 3 // 4
"""30,000,000: the largest raw message whose base64 fits v2's 40 MB, read conservatively."""


def api_message_limit(api: str) -> int:
    """The largest message (raw bytes) the API takes: v1's under "v1", v2's
    under "v2" and "auto" (which sends what v1 cannot take through v2)."""
    return V1_MAX_MESSAGE if api == "v1" else V2_MAX_MESSAGE


def fits_v1(size: int) -> bool:
    """Whether a raw message of ``size`` bytes fits SendRawEmail."""
    return size <= V1_MAX_MESSAGE
