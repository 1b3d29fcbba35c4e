"""Envelope address syntax and the ASCII form SES needs: pure."""

from __future__ import annotations

import pytest

from relay.addresses import ascii_address
from relay.errors import MessageRefused


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("user@example.com", "user@example.com"),
        ("first.last+tag@sub.example.co.uk", "first.last+tag@sub.example.co.uk"),
        ('"odd person"@example.com', '"odd person"@example.com'),
        ("user@bücher.de", "user@xn--bcher-kva.de"),
        ("user@例え.テスト", "user@xn--r8jz45g.xn--zckzah"),
        ("user@[192.0.2.1]", "user@[192.0.2.1]"),
        ("user@example.com.", "user@example.com"),
    ],
)
def test_accepted(address: str, expected: str) -> None:
    assert ascii_address(address, "recipient") == expected


def test_non_ascii_local_part_is_refused_with_5_6_7() -> None:
    with pytest.raises(MessageRefused) as caught:
        ascii_address("jürgen@example.com", "recipient")
    reply = caught.value.reply
    assert (reply.code, reply.enhanced) == (553, "5.6.7")
    assert "ASCII" in reply.text


@pytest.mark.parametrize(
    ("address", "role", "enhanced"),
    [
        ("no-at-sign", "recipient", "5.1.3"),
        ("@example.com", "recipient", "5.1.3"),
        ("user@", "sender", "5.1.7"),
        ("two..dots@example.com", "recipient", "5.1.3"),
        ("user@-bad-.com", "recipient", "5.1.3"),
        ("user@exa_mple.com", "sender", "5.1.7"),
        ("a" * 65 + "@example.com", "recipient", "5.1.3"),
        ("user@[999.bad", "recipient", "5.1.3"),
    ],
)
def test_bad_syntax_is_refused(address: str, role: str, enhanced: str) -> None:
    with pytest.raises(MessageRefused) as caught:
        ascii_address(address, role)  # type: ignore[arg-type]
    assert (caught.value.reply.code, caught.value.reply.enhanced) == (553, enhanced)
    assert role in caught.value.reply.text
