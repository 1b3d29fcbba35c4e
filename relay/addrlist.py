"""The addresses of a From:, Sender:, To: or Cc: field (RFC 5322 3.4). Pure.

A strict parser that reads a field one way or refuses it. The standard
library is not used because it guesses where it should refuse, and guesses
differently from mail readers: ``email.utils.getaddresses`` (Python 3.11)
reads ``alice@a.example<eve@b.example>`` as two addresses and drops what it
cannot parse (CVE-2023-27043), and recurses once per nested comment, so a
deep one raises ``RecursionError``; ``email.headerregistry`` (the private
``email._header_value_parser``) also recurses per nested comment and repairs
broken input, recording "defects", instead of refusing it. A relay that
decides who may send as whom must see exactly the mailboxes a reader sees.

Accepted, and returned as ``local-part@domain`` in order (groups flattened):

- mailboxes: an addr-spec, or an optional display name (atoms, quoted
  strings and dots, as obs-phrase allows: ``John Q. Public``) and an
  addr-spec in ``<>``; in an address list (To:, Cc:) also groups
  ``name: mailbox, ...;``; empty list elements (obs-addr-list) are skipped;
- an addr-spec is a dot-atom or a quoted string of atext, dots and spaces,
  ``@``, and a dot-atom or a domain literal; white space and comments may
  stand around its parts; comments nest at most ``MAX_COMMENT_DEPTH`` deep;
- UTF-8 (RFC 6532) in atoms, quoted strings and comments, but no C1
  control characters and no Unicode line or paragraph separators.

Refused with ``ValueError`` saying why (in ASCII, quoting at most one
character of the input):
everything else, notably an address run into another (``a@b.example<c@d>``),
a name without an address, the obsolete local-part and domain forms with
space or comments inside (``a . b@example.com``), source routes
(``<@route:a@example.com>``), an encoded word in an addr-spec (RFC 2047
section 5 forbids it, and readers differ), a quoted local part holding
``@``, ``<`` or other specials, nested groups, and unclosed quotes,
comments, brackets or groups.

Time and memory are linear in the length of the field: one pass with
regular expressions that cannot backtrack, then one pass over the tokens;
no recursion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_COMMENT_DEPTH = 8
"""Nesting of ``(comments (in comments))``; mail uses one or two levels."""

_CONTROL = r"\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029"
"""Control characters, C1 controls and Unicode line breaks: never allowed."""
_UTF8 = r"\xa0-\u2027\u202a-\U0010ffff"
"""Non-ASCII characters allowed by RFC 6532, without C1 controls and line breaks."""
_ATEXT = rf"A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_UTF8}"
_TOKEN = re.compile(
    rf"(?P<space>[ \t]++)"
    rf"|(?P<atom>[{_ATEXT}]++)"
    rf'|(?P<quoted>"(?:[^"\\{_CONTROL}]|\\[^{_CONTROL}])*+")'
    rf"|(?P<literal>\[[!-Z^-~{_UTF8}]*+\])"
    r"|(?P<special>[<>@,;:.])"
    r"|(?P<comment>\()"
)
_COMMENT_PART = re.compile(rf"[^()\\{_CONTROL}]++|\\[^{_CONTROL}]|[()]")
_QUOTED_LOCAL = re.compile(rf'"[{_ATEXT}. ]+"')
_ENCODED_WORD = "=?"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    """``atom``, ``quoted``, ``literal``, or the special character itself."""
    text: str
    spaced: bool
    """White space or a comment comes right before it."""


def parse_mailbox_list(value: str) -> list[str]:
    """The addresses of an unfolded From: or Sender: value (no groups)."""
    return _Parser(_tokens(value), groups=False).address_list()


def parse_address_list(value: str) -> list[str]:
    """The addresses of an unfolded To: or Cc: value, group members included."""
    return _Parser(_tokens(value), groups=True).address_list()


def _tokens(value: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos, size, spaced = 0, len(value), False
    while pos < size:
        found = _TOKEN.match(value, pos)
        if found is None:
            raise ValueError(_bad_character(value[pos]))
        kind = found.lastgroup
        if kind == "space":
            spaced, pos = True, found.end()
        elif kind == "comment":
            spaced, pos = True, _comment_end(value, pos)
        else:
            text = found.group()
            tokens.append(_Token(text if kind == "special" else str(kind), text, spaced))
            spaced, pos = False, found.end()
    return tokens


def _bad_character(char: str) -> str:
    if char == '"':
        return "unclosed quoted string"
    if char == "[":
        return "unclosed or invalid domain literal"
    return f"character {char!a} not allowed here"


def _comment_end(value: str, pos: int) -> int:
    """Where the comment that opens at ``pos`` ends (just past its ``)``)."""
    depth = 0
    while True:
        part = _COMMENT_PART.match(value, pos)
        if part is None:
            if pos == len(value):
                raise ValueError("unclosed comment")
            raise ValueError(f"character {value[pos]!a} not allowed in a comment")
        pos = part.end()
        if part.group() == "(":
            depth += 1
            if depth > MAX_COMMENT_DEPTH:
                raise ValueError(f"comments nested more than {MAX_COMMENT_DEPTH} deep")
        elif part.group() == ")":
            depth -= 1
            if depth == 0:
                return pos


class _Parser:
    """One pass over the tokens; see the module docstring for the grammar."""

    def __init__(self, tokens: list[_Token], *, groups: bool) -> None:
        self._tokens = tokens
        self._at = 0
        self._groups = groups

    def _peek(self) -> str | None:
        return self._tokens[self._at].kind if self._at < len(self._tokens) else None

    def _take(self) -> _Token:
        token = self._tokens[self._at]
        self._at += 1
        return token

    def address_list(self) -> list[str]:
        found: list[str] = []
        in_group = False
        while (kind := self._peek()) is not None:
            if kind == ",":
                self._take()
                continue
            if kind == ";" and in_group:
                self._take()
                in_group = False
                self._expect_separator()
                continue
            phrase = self._phrase()
            if self._peek() == ":":
                self._open_group(phrase, in_group=in_group)
                in_group = True
                continue
            found.append(self._mailbox(phrase))
            if self._peek() != ";" or not in_group:
                self._expect_separator()
        if in_group:
            raise ValueError("a group not closed with ';'")
        return found

    def _open_group(self, name: list[_Token], *, in_group: bool) -> None:
        if not self._groups:
            raise ValueError("a group is not allowed here, only mailboxes")
        if in_group:
            raise ValueError("a group inside a group")
        if not name:
            raise ValueError("a group without a name")
        self._take()

    def _mailbox(self, phrase: list[_Token]) -> str:
        kind = self._peek()
        if kind == "<":
            _display_name(phrase)
            self._take()
            return self._angle_addr()
        if kind == "@":
            return self._addr_spec(phrase)
        if phrase:
            raise ValueError("a name without an address in <>")
        raise ValueError(f"unexpected {_describe(kind)}")

    def _expect_separator(self) -> None:
        kind = self._peek()
        if kind not in (None, ","):
            raise ValueError(f"unexpected {_describe(kind)} after an address: missing ','?")

    def _phrase(self) -> list[_Token]:
        """Words and dots: a display name or the local part of a bare addr-spec."""
        phrase: list[_Token] = []
        while self._peek() in ("atom", "quoted", "."):
            phrase.append(self._take())
        return phrase

    def _angle_addr(self) -> str:
        if self._peek() in ("@", ":"):
            raise ValueError("source routes (<@host:...>) are not allowed")
        if self._peek() == ">":
            raise ValueError("an empty address <>")
        address = self._addr_spec(self._phrase())
        if self._peek() != ">":
            raise ValueError(f"unexpected {_describe(self._peek())} in <>: missing '>'?")
        self._take()
        return address

    def _addr_spec(self, local: list[_Token]) -> str:
        """``local`` and then ``@`` domain, as one address."""
        if self._peek() != "@":
            raise ValueError("an address without '@'")
        self._take()
        domain: list[_Token] = []
        while self._peek() in ("atom", "literal", "."):
            domain.append(self._take())
        address = f"{_local_part(local)}@{_domain(domain)}"
        if _ENCODED_WORD in address:
            raise ValueError("an encoded word (=?...?=) inside an address")
        return address


def _display_name(phrase: list[_Token]) -> None:
    if phrase and phrase[0].kind == ".":
        raise ValueError("a display name starting with '.'")


def _local_part(tokens: list[_Token]) -> str:
    if len(tokens) == 1 and tokens[0].kind == "quoted":
        if not _QUOTED_LOCAL.fullmatch(tokens[0].text):
            raise ValueError("a quoted local part with special characters")
        return tokens[0].text
    return _dot_atom(tokens, "local part")


def _domain(tokens: list[_Token]) -> str:
    if len(tokens) == 1 and tokens[0].kind == "literal":
        return tokens[0].text
    return _dot_atom(tokens, "domain")


def _dot_atom(tokens: list[_Token], part: str) -> str:
    """``atom *("." atom)`` with nothing between its tokens."""
    if not tokens:
        raise ValueError(f"an address without a {part}")
    for index, token in enumerate(tokens):
        if index and token.spaced:
            raise ValueError(f"space or a comment inside the {part}")
        if token.kind != ("atom" if index % 2 == 0 else "."):
            raise ValueError(f"an invalid {part}")
    if len(tokens) % 2 == 0:
        raise ValueError(f"an invalid {part}")
    return "".join(token.text for token in tokens)


def _describe(kind: str | None) -> str:
    if kind is None:
        return "end"
    return {"atom": "word", "quoted": "quoted string", "literal": "domain literal"}.get(
        kind, repr(kind)
    )
