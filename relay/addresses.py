"""Envelope addresses: RFC 5321 syntax, and the 7-bit form SES needs. Pure.

SES takes ASCII addresses only: an internationalized domain becomes its
punycode (IDNA) form; a non-ASCII local part cannot be converted and is
refused with 553 5.6.7.
"""

from __future__ import annotations

import re
from typing import Literal

from relay.errors import MessageRefused, SmtpReply

Role = Literal["sender", "recipient"]

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ADDRESS_LITERAL = re.compile(r"\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]")

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# RFC 3463: X.1.3 bad destination mailbox syntax, X.1.7 bad sender's
# mailbox syntax; RFC 6531: X.6.7 non-ASCII address not permitted.
_SYNTAX = {"recipient": "5.1.3", "sender": "5.1.7"}


def _refuse(enhanced: str, text: str) -> MessageRefused:
    return MessageRefused(SmtpReply(553, enhanced, text))


def ascii_address(address: str, role: Role) -> str:
    """The address as SES must get it, or ``MessageRefused`` (553) saying why."""
    syntax = _SYNTAX[role]
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise _refuse(syntax, f"{role} address must be local-part@domain")
    if not local.isascii():
        raise _refuse(
            "5.6.7",
            f"non-ASCII {role} local part {local!r} is not supported: "
            "Amazon SES accepts 7-bit ASCII addresses only",
        )
    if len(local) > MAX_LOCAL_PART:
        raise _refuse(syntax, f"{role} local part is longer than {MAX_LOCAL_PART} characters")
    if not (_DOT_ATOM.fullmatch(local) or _QUOTED.fullmatch(local)):
        raise _refuse(syntax, f"{role} local part {local!r} is not valid RFC 5321 syntax")
    domain = ascii_domain(domain, role)
    result = f"{local}@{domain}"
    if len(result) > MAX_PATH - 2:
        raise _refuse(syntax, f"{role} address is longer than {MAX_PATH - 2} characters")
    return result


def ascii_domain(domain: str, role: Role) -> str:
    """The domain in ASCII (punycode for IDN), or ``MessageRefused``."""
    syntax = _SYNTAX[role]
    if domain.startswith("["):
        if _ADDRESS_LITERAL.fullmatch(domain):
            return domain
        raise _refuse(syntax, f"{role} domain {domain!r} is not a valid address literal")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise _refuse(
                syntax, f"{role} domain {domain!r} is not a valid internationalized domain"
            ) from None
    labels = domain.rstrip(".").split(".") if domain != "." else [""]
    if len(domain) > MAX_DOMAIN or not all(_LABEL.fullmatch(label) for label in labels):
        raise _refuse(syntax, f"{role} domain {domain!r} is not a valid domain name")
    return domain.rstrip(".")
