"""relay.addrlist: the strict From:/Sender:/To:/Cc: parser. Pure, no sockets."""

from __future__ import annotations

import email.utils
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.addrlist import MAX_COMMENT_DEPTH, parse_address_list, parse_mailbox_list


@pytest.mark.parametrize(
    ("value", "mailboxes"),
    [
        ("alice@allowed.example", ["alice@allowed.example"]),
        ("Alice <alice@allowed.example>", ["alice@allowed.example"]),
        ('"Smith, J. <x@y>" <j@x.example>', ["j@x.example"]),
        ("John Q. Public <jqp@x.example>", ["jqp@x.example"]),
        ("alice@x.example (Alice (the (real) one))", ["alice@x.example"]),
        (" alice @ x.example ", ["alice@x.example"]),
        ("<a@x.example>, , Bob <b@y.example>,", ["a@x.example", "b@y.example"]),
        ("=?utf-8?q?Al=C3=AFce?= <a@x.example>", ["a@x.example"]),
        ("Ünïcode <ü@bücher.example>", ["ü@bücher.example"]),
        ('"john smith"@x.example', ['"john smith"@x.example']),
        ("a@[192.0.2.1]", ["a@[192.0.2.1]"]),
        ("", []),
    ],
)
def test_valid_mailbox_lists(value: str, mailboxes: list[str]) -> None:
    assert parse_mailbox_list(value) == mailboxes
    assert parse_address_list(value) == mailboxes


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        # each read differently by Python's getaddresses or by mail readers
        ("alice@allowed.example<eve@evil.example>", "unexpected '<' after an address"),
        ("alice@allowed.example eve@evil.example", "space or a comment inside the domain"),
        ('"alice@allowed.example"@evil.example', "quoted local part with special characters"),
        ("=?utf-8?q?alice@allowed.example?= <eve@evil.example>", "encoded word"),
        ("alice@=?utf-8?q?allowed.example?=", "encoded word"),
        ("alice@allowed.example (x) eve@evil.example", "space or a comment inside the domain"),
        ("Smith, John <j@x.example>", "a name without an address"),
        ("allowed: eve@evil.example;", "a group is not allowed here"),
        ("<@allowed.example:eve@evil.example>", "source routes"),
        ("a . b@x.example", "space or a comment inside the local part"),
        ('"a".b@x.example', "an invalid local part"),
        ("a@b.example.", "an invalid domain"),
        ("<>", "an empty address <>"),
        ("alice", "a name without an address"),
        ("a@x.example; b@y.example", "unexpected ';'"),
        ('"unclosed@x.example', "unclosed quoted string"),
        ("(unclosed a@x.example", "unclosed comment"),
        ("a@x.example\\", "character '\\\\' not allowed here"),
        ("a@x.example\r\nBcc: b@y.example", "character '\\r' not allowed here"),
        ("<a@x.example", "missing '>'"),
        ("a\u2028b@x.example", "character '\\u2028' not allowed here"),  # a line break to some
        ("(" * (MAX_COMMENT_DEPTH + 1) + ")" * (MAX_COMMENT_DEPTH + 1) + "a@x.example", "nested"),
        ("(" * 100_000 + "a@x.example", f"comments nested more than {MAX_COMMENT_DEPTH} deep"),
    ],
)
def test_hostile_or_ambiguous_fields_are_refused(value: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as caught:
        parse_mailbox_list(value)
    assert str(caught.value).isascii()


def test_comments_as_deep_as_allowed_are_fine() -> None:
    depth = MAX_COMMENT_DEPTH
    assert parse_mailbox_list("(" * depth + ")" * depth + "a@x.example") == ["a@x.example"]


@pytest.mark.parametrize(
    ("value", "addresses"),
    [
        ("undisclosed-recipients:;", []),
        (
            "list: a@x.example, B <b@y.example>;, c@z.example",
            ["a@x.example", "b@y.example", "c@z.example"],
        ),
        ("a@x.example, a@x.example", ["a@x.example", "a@x.example"]),  # repeats kept
    ],
)
def test_address_lists_take_groups(value: str, addresses: list[str]) -> None:
    assert parse_address_list(value) == addresses


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("g: h: a@b.example;;", "a group inside a group"),
        ("g: a@b.example", "a group not closed with ';'"),
        ("g: a@b.example; c@d.example", "unexpected word after an address"),
        (": a@b.example;", "a group without a name"),
    ],
)
def test_bad_groups_are_refused(value: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_address_list(value)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='ab@.<>,;:"() \\=?[]\t', max_size=40))
def test_what_is_accepted_reads_the_same_to_python_and_anything_else_is_refused(
    value: str,
) -> None:
    try:
        ours = parse_address_list(value)
    except ValueError:
        return  # refused: the only other outcome, never another exception
    theirs = [address for _, address in email.utils.getaddresses([value]) if address]
    assert ours == theirs


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_parsed_or_refused_with_value_error(value: str) -> None:
    try:
        parse_address_list(value)
    except ValueError as problem:
        refusal = str(problem)
    else:
        return
    assert refusal.isascii()


def seconds(value: str) -> float:
    started = time.process_time()
    with pytest.raises(ValueError, match=r"missing '>'|an address without"):
        parse_address_list(value)
    return time.process_time() - started


@pytest.mark.parametrize(
    "unit",
    [
        "Name <a@x.example>, ",  # a long list
        "(" * MAX_COMMENT_DEPTH + "c" + ")" * MAX_COMMENT_DEPTH,  # comments
        '"q\\"" ',  # quoted strings with escapes
    ],
)
def test_time_is_linear_in_the_length(unit: str) -> None:
    """Four times the input takes about four times as long, not sixteen
    (the refusal at the end makes every case scan the whole value)."""
    n = 50_000 // len(unit)  # 50 KB, then 200 KB
    small = min(seconds(unit * n + "<") for _ in range(3))
    large = min(seconds(unit * 4 * n + "<") for _ in range(3))
    assert large < 8 * small
