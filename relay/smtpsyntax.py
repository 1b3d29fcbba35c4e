"""SMTP command and parameter syntax: pure functions from what the client sent to
what the session does with it, or the reply refusing it. No sockets, no session.

``parse_command`` splits a command line and applies the line length limits
(RFC 5321 4.5.3.1.4, with the ESMTP exceptions); ``parse_mail`` and
``parse_rcpt`` parse the path and parameters of MAIL and RCPT (RFC 5321 4.1.2,
RFC 1870 SIZE, RFC 6152 BODY, RFC 4954 5 AUTH); ``ehlo_reply`` writes the
EHLO reply. What depends on the session's state (HELO first, one MAIL per
transaction, the recipient limit) is ``relay.smtp``'s; turning an address into
what SES takes is ``relay.addresses``'.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from aiosmtpd.smtp import SMTP

from relay.aiosmtpd_compat import getaddr, getparams, strip_command_keyword

REPLY_LINE_TOO_LONG: Final = "500 5.5.2 Line too long"
REPLY_BAD_SYNTAX: Final = "500 5.5.2 Error: bad syntax"
REPLY_TOO_BIG: Final = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_MAIL_SYNTAX: Final = "501 5.5.4 Syntax: MAIL FROM:<address>"
REPLY_RCPT_SYNTAX: Final = "501 5.5.4 Syntax: RCPT TO:<address>"
REPLY_MAIL_MALFORMED: Final = "553 5.1.7 Error: malformed address"
REPLY_RCPT_MALFORMED: Final = "553 5.1.3 Error: malformed address"
REPLY_BAD_BODY: Final = "501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME"
REPLY_MAIL_PARAMETERS: Final = "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
REPLY_RCPT_PARAMETERS: Final = "555 5.5.4 RCPT TO parameters not recognized or not implemented"

COMMAND_LINE_LIMIT: Final = 512
"""RFC 5321 4.5.3.1.4 (aiosmtpd's ``command_size_limit``); the line without CRLF."""
COMMAND_LINE_LIMITS: Final = {"MAIL": 512 + 26, "AUTH": SMTP.line_length_limit - 1}
"""ESMTP exceptions: RFC 1870 SIZE adds 26 to MAIL; RFC 4954 lets AUTH be long."""

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_PLAIN_PATH: Final = re.compile(rf"<({_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")
"""``<local@domain>`` with a dot-atom local part and a plain ASCII domain."""


@dataclass(frozen=True, slots=True)
class PathArgument:
    """The argument of MAIL or RCPT: the address as sent, and its parameters upper-cased."""

    address: str
    """``<>`` for the null reverse-path; not yet checked for what SES takes."""
    options: list[str]


def parse_command(line: bytes | None, *, extended: bool) -> tuple[str, str | None, str | None]:
    """``(COMMAND, argument, None)``, or ``("", None, reply)`` for a bad line.

    ``line`` is what the stream gave, with its line end; None when it was too
    long (and skipped). ``extended``: the session began with EHLO, so the
    ESMTP line length exceptions apply.
    """
    if line is None:
        return "", None, REPLY_LINE_TOO_LONG
    line = line.rstrip(b"\r\n")
    command_bytes, _, arg_bytes = line.partition(b" ")
    try:
        command = command_bytes.upper().decode("ascii")
        # Arguments may be UTF-8 (an IDN domain) although SMTPUTF8 is not
        # offered: relay.addresses turns them into what SES takes, or refuses.
        arg = arg_bytes.strip().decode("utf-8") if arg_bytes else None
    except UnicodeDecodeError:
        return "", None, REPLY_BAD_SYNTAX
    if not command:
        return "", None, REPLY_BAD_SYNTAX
    limit = COMMAND_LINE_LIMIT
    if extended:
        limit = COMMAND_LINE_LIMITS.get(command, COMMAND_LINE_LIMIT)
    if len(line) > limit:
        return "", None, REPLY_LINE_TOO_LONG
    return command, arg, None


def parse_mail(arg: str | None, *, extended: bool, max_message_size: int) -> PathArgument | str:
    """``MAIL FROM:<address> [BODY=...] [SIZE=...] [AUTH=...]``, or the reply refusing it."""
    parsed = _path_argument("FROM:", arg, extended, REPLY_MAIL_SYNTAX, REPLY_MAIL_MALFORMED)
    if isinstance(parsed, str):
        return parsed
    return _mail_parameters_refusal(parsed.options, max_message_size) or parsed


def _mail_parameters_refusal(options: list[str], max_message_size: int) -> str | None:
    params = getparams(options)
    if params is None:
        return REPLY_MAIL_SYNTAX
    if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
        return REPLY_BAD_BODY
    size = params.pop("SIZE", None)
    if size is not None:
        if not (isinstance(size, str) and size.isascii() and size.isdigit()):
            return REPLY_MAIL_SYNTAX
        if int(size) > max_message_size:
            return REPLY_TOO_BIG
    params.pop("AUTH", None)  # RFC 4954 5: accepted; the session's AUTH is what counts
    if params:
        return REPLY_MAIL_PARAMETERS
    return None


def parse_rcpt(arg: str | None, *, extended: bool) -> PathArgument | str:
    """``RCPT TO:<address>`` (no parameters are offered), or the reply refusing it."""
    parsed = _path_argument("TO:", arg, extended, REPLY_RCPT_SYNTAX, REPLY_RCPT_MALFORMED)
    if isinstance(parsed, str):
        return parsed
    params = getparams(parsed.options)
    if params:
        return REPLY_RCPT_PARAMETERS
    if params is None:
        return REPLY_RCPT_SYNTAX
    return parsed


def _path_argument(
    keyword: str, arg: str | None, extended: bool, syntax: str, malformed: str
) -> PathArgument | str:
    """The path and options of ``FROM:<address> options``, or the reply refusing it."""
    path = strip_command_keyword(keyword, arg) if arg else None
    if path is None:
        return syntax
    address, rest = parse_path(path)
    if address is None:
        return malformed
    if not address or (rest and not extended):
        return syntax
    return PathArgument(address, rest.upper().split())


def parse_path(path: str) -> tuple[str | None, str]:
    """``(address, parameters)`` from ``<local@domain> PARAMS``, as aiosmtpd parses it.

    Plain ``<dot-atom@domain>`` paths take a regular expression; anything
    else (source routes, quoted local parts, comments, address literals,
    non-ASCII, no angle brackets) goes to aiosmtpd's own parser, so the
    same paths are accepted either way (tests compare the two).
    """
    match = _PLAIN_PATH.match(path)
    if match is not None:
        rest = path[match.end() :].lstrip(" \t")
        if not rest.startswith("("):  # a comment: aiosmtpd's parser skips it
            return match.group(1), rest
    address, params = getaddr(path)
    return address, params or ""


def ehlo_reply(
    hostname: str, max_message_size: int, *, starttls: bool, auth: Sequence[str] | None
) -> str:
    """The multi-line EHLO reply; ``auth``: the mechanisms to list, None for no AUTH line."""
    lines = [
        hostname,
        f"SIZE {max_message_size}",
        "8BITMIME",
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
    ]
    if starttls:
        lines.append("STARTTLS")
    if auth is not None:
        lines.append("AUTH " + " ".join(auth))
    last = len(lines) - 1
    return "\r\n".join(f"250{' ' if i == last else '-'}{text}" for i, text in enumerate(lines))
