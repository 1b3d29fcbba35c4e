"""Text from outside made safe for one SMTP reply line or one log line. Pure."""

from __future__ import annotations

LOG_TEXT_LIMIT = 500
"""Characters of a text from outside (an SES error, a reason) kept in one log line."""


def one_line(text: str, limit: int) -> str:
    """``text`` on one line of at most ``limit`` characters.

    Every character that is not printable becomes a space: C0 and C1
    controls (CR and LF among them), DEL, Unicode line and paragraph
    separators, format characters such as bidirectional overrides. Runs of
    white space are then one space; a longer text is cut and ends in "...".
    Printable text within ``limit`` is returned as it is.
    """
    if text.isprintable() and len(text) <= limit:
        return text
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: max(0, limit - 3)] + "..."
