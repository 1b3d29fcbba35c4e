"""Delivery status notifications: built as bytes, read back with ``email``."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
import string
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.dsn import MAX_HEADER_BYTES, SUBJECT, FailedRecipient, build_dsn, should_bounce
from relay.errors import SmtpReply

ARRIVAL = datetime(2026, 11, 23, 11, 0, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 23, 12, 30, 0, tzinfo=UTC)
BODY_MARKER = b"Zq9-BODY-NEVER-RETURNED-Xk2"
HEADERS = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net, carol@example.org\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <m1@example.com>\r\n"
)
ORIGINAL = HEADERS + b"\r\n" + BODY_MARKER + b"\r\nmore body\r\n"
UNVERIFIED = (
    "smtp; 554 5.7.1 message rejected by SES: Email address is not verified. "
    "The following identities failed the check in region US-EAST-1: bob@example.net"
)


def dsn(
    failed: Sequence[FailedRecipient] = (FailedRecipient("bob@example.net", "5.7.1", UNVERIFIED),),
    *,
    original: bytes = ORIGINAL,
    sender: str = "alice@example.com",
    message_id: str = "<dsn-1@relay.example.com>",
) -> bytes:
    return build_dsn(
        original=original,
        queue_id="3F2A1B9C",
        sender=sender,
        failed=failed,
        reporting_mta="relay.example.com",
        bounce_from="MAILER-DAEMON@relay.example.com",
        arrival=ARRIVAL,
        now=NOW,
        message_id=message_id,
    )


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> list[EmailMessage]:
    return list(message.iter_parts())  # type: ignore[arg-type]


def status_blocks(message: EmailMessage) -> list[EmailMessage]:
    blocks = parts(message)[1].get_payload()
    assert isinstance(blocks, list)
    found = [block for block in blocks if isinstance(block, EmailMessage)]
    assert len(found) == len(blocks)
    return found


def assert_wire_safe(data: bytes) -> None:
    """7-bit, CRLF only, no line over 998 bytes, no control characters."""
    assert data.isascii()
    assert data.endswith(b"\r\n")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", data.replace(b"\r\n", b""))


def assert_no_defects(message: EmailMessage) -> None:
    assert message.defects == []
    for part in parts(message):
        assert part.defects == [], part.get_content_type()
    for block in status_blocks(message):
        assert block.defects == []


def unescape(xtext: str) -> str:
    return re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: chr(int(m.group(1), 16)), xtext)


# -- structure


def test_structure_and_headers() -> None:
    data = dsn()
    assert_wire_safe(data)
    message = parse(data)
    assert_no_defects(message)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.com>"
    assert message["To"] == "alice@example.com"
    assert message["Subject"] == SUBJECT == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Message-ID"] == "<dsn-1@relay.example.com>"
    assert message["Date"].datetime == NOW


def test_delivery_status_fields() -> None:
    failed = [
        FailedRecipient("bob@example.net", "5.7.1", UNVERIFIED),
        FailedRecipient("carol@example.org", "5.1.1", "smtp; 550 5.1.1 no such user"),
        FailedRecipient("dave@example.org", "4.4.7", "554 4.4.7 message expired in queue"),
    ]
    message = parse(dsn(failed))
    per_message, *per_recipient = status_blocks(message)
    assert per_message["Reporting-MTA"] == "dns; relay.example.com"
    assert per_message["X-SES-Relay-Queue-ID"] == "3F2A1B9C"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL
    assert [dict(block.items()) for block in per_recipient] == [
        {
            "Final-Recipient": "rfc822; bob@example.net",
            "Action": "failed",
            "Status": "5.7.1",
            "Diagnostic-Code": UNVERIFIED,
            "Last-Attempt-Date": "Mon, 23 Nov 2026 12:30:00 +0000",
        },
        {
            "Final-Recipient": "rfc822; carol@example.org",
            "Action": "failed",
            "Status": "5.1.1",
            "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
            "Last-Attempt-Date": "Mon, 23 Nov 2026 12:30:00 +0000",
        },
        {
            "Final-Recipient": "rfc822; dave@example.org",
            "Action": "failed",
            "Status": "4.4.7",
            "Diagnostic-Code": "smtp; 554 4.4.7 message expired in queue",
            "Last-Attempt-Date": "Mon, 23 Nov 2026 12:30:00 +0000",
        },
    ]


def test_the_text_part_names_recipients_and_reasons() -> None:
    failed = [
        FailedRecipient("bob@example.net", "5.7.1", UNVERIFIED),
        FailedRecipient("carol@example.org", "5.1.1", "smtp; 550 5.1.1 no such user"),
    ]
    text_part = parts(parse(dsn(failed)))[0]
    assert text_part["Content-Transfer-Encoding"] == "7bit"
    assert text_part.get_content_charset() == "us-ascii"
    text = text_part.get_content()
    flat = " ".join(text.split())
    assert "<bob@example.net>: 554 5.7.1 message rejected by SES: Email address is not" in flat
    assert "<carol@example.org>: 550 5.1.1 no such user (status 5.1.1)" in flat
    assert "3F2A1B9C" in flat
    assert max(len(line) for line in text.splitlines()) <= 76


def test_non_ascii_text_is_quoted_printable_utf8() -> None:
    failed = [FailedRecipient("jöhn@例え.jp", "5.1.1", "smtp; 550 5.1.1 Ünknown user «jöhn»")]
    data = dsn(failed)
    assert_wire_safe(data)
    message = parse(data)
    assert_no_defects(message)
    text_part = parts(message)[0]
    assert text_part["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_part.get_content_charset() == "utf-8"
    assert "<jöhn@例え.jp>: 550 5.1.1 Ünknown user «jöhn» (status 5.1.1)" in text_part.get_content()
    (block,) = status_blocks(message)[1:]
    assert block["Final-Recipient"] == r"utf-8; j\x{F6}hn@\x{4F8B}\x{3048}.jp"
    assert unescape(block["Final-Recipient"].removeprefix("utf-8; ")) == "jöhn@例え.jp"
    assert block["Diagnostic-Code"] == r"smtp; 550 5.1.1 \x{DC}nknown user \x{AB}j\x{F6}hn\x{BB}"


def test_addresses_with_xtext_specials_use_the_utf8_type() -> None:
    failed = [FailedRecipient("a+tag=x@example.com", "5.1.1", "smtp; 550 no")]
    (block,) = status_blocks(parse(dsn(failed)))[1:]
    assert block["Final-Recipient"] == r"utf-8; a\x{2B}tag\x{3D}x@example.com"


# -- the original message


def test_only_the_original_headers_are_returned() -> None:
    data = dsn()
    assert BODY_MARKER not in data
    headers_part = parts(parse(data))[2]
    assert headers_part.get_payload(decode=True) == HEADERS
    for part in parts(parse(data)):
        assert BODY_MARKER not in part.as_bytes()


def test_bare_newlines_in_the_original_become_crlf() -> None:
    original = HEADERS.replace(b"\r\n", b"\n") + b"\n" + BODY_MARKER + b"\n"
    data = dsn(original=original)
    assert_wire_safe(data)
    assert BODY_MARKER not in data
    assert parts(parse(data))[2].get_payload(decode=True) == HEADERS


def test_8bit_original_headers_are_quoted_printable_and_survive() -> None:
    headers = (
        "From: Jörg <jorg@example.de>\r\n".encode()
        + b"Subject: caf\xe9 latin-1 \x00 nul and a lone \r cr\r\n"
        + b"X-Long: "
        + b"y" * 1500
        + b"\r\n"
    )
    data = dsn(original=headers + b"\r\n" + BODY_MARKER)
    assert_wire_safe(data)
    message = parse(data)
    assert_no_defects(message)
    headers_part = parts(message)[2]
    assert headers_part["Content-Transfer-Encoding"] == "quoted-printable"
    assert headers_part.get_payload(decode=True) == headers
    assert BODY_MARKER not in data


def test_the_returned_header_block_is_bounded() -> None:
    fields = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"z" * 60) for i in range(2000))
    data = dsn(original=b"Subject: big\r\n" + fields + b"\r\n" + BODY_MARKER)
    returned = parts(parse(data))[2].get_payload(decode=True)
    assert isinstance(returned, bytes)
    assert len(returned) <= MAX_HEADER_BYTES
    assert returned.startswith(b"Subject: big\r\nX-Filler-00000: ")
    assert returned.endswith(b"z" * 60 + b"\r\n"), "whole fields only"
    assert len(data) < MAX_HEADER_BYTES + 8192


def test_a_message_without_headers_still_bounces() -> None:
    data = dsn(original=b"")
    assert_wire_safe(data)
    assert parts(parse(data))[2].get_payload(decode=True) == b""


# -- arguments


def test_message_id_gets_brackets() -> None:
    assert parse(dsn(message_id="dsn-2@relay.example.com"))["Message-ID"] == (
        "<dsn-2@relay.example.com>"
    )


@pytest.mark.parametrize(
    "sender", ["", "alice@example.com\r\nBcc: victim@example.org", "jörg@example.de"]
)
def test_header_values_must_be_printable_ascii(sender: str) -> None:
    with pytest.raises(ValueError, match="sender must be printable ASCII"):
        dsn(sender=sender)


def test_at_least_one_recipient() -> None:
    with pytest.raises(ValueError, match="at least one"):
        dsn([])


@pytest.mark.parametrize("status", ["550", "2.0.0", "5.1", "5.1.1 ", "x.y.z", ""])
def test_status_must_be_an_enhanced_failure_code(status: str) -> None:
    with pytest.raises(ValueError, match="status must"):
        FailedRecipient("bob@example.net", status, "smtp; 550 no")


def test_failed_recipient_from_an_smtp_reply() -> None:
    reply = SmtpReply(554, "5.7.1", "message rejected by SES: Email address is not verified.")
    assert FailedRecipient.from_reply("bob@example.net", reply) == FailedRecipient(
        "bob@example.net",
        "5.7.1",
        "smtp; 554 5.7.1 message rejected by SES: Email address is not verified.",
    )


# -- should_bounce


@pytest.mark.parametrize(
    ("sender", "enabled", "expected"),
    [
        ("alice@example.com", True, True),
        ("alice@example.com", False, False),
        ("", True, False),
        ("<>", True, False),
        ("  ", True, False),
        ("MAILER-DAEMON@example.com", True, False),
        ("mailer-daemon@example.com", True, False),
        ("<MAILER-DAEMON@example.com>", True, False),
        ("Mailer-Daemon+bounce@example.com", True, False),
        ("postmaster@example.com", True, False),
        ("POSTMASTER", True, False),
        ("double-bounce@example.com", True, False),
        ("postmaster-team@example.com", True, True),
        ("list-bounces@lists.example.com", True, True),
    ],
)
def test_should_bounce(sender: str, enabled: bool, expected: bool) -> None:
    assert should_bounce(sender, enabled) is expected


# -- properties

statuses = st.builds(
    "{}.{}.{}".format,
    st.sampled_from("45"),
    st.integers(min_value=0, max_value=999),
    st.integers(min_value=0, max_value=999),
)
any_text = st.text(min_size=0, max_size=3000)
address_chars = string.ascii_letters + string.digits + ".-_+=!#"
addresses = st.one_of(
    st.builds(
        "{}@{}".format,
        st.text(alphabet=address_chars, min_size=1, max_size=64),
        st.text(alphabet=string.ascii_lowercase + string.digits + ".-", min_size=1, max_size=60),
    ),
    st.text(min_size=1, max_size=300),
)
diagnostics = st.one_of(
    any_text,
    any_text.map(lambda text: f"smtp; 554 5.7.1 {text}"),
    st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=900, max_size=5000
    ),
)
recipients = st.builds(FailedRecipient, address=addresses, status=statuses, diagnostic=diagnostics)
header_names = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=20)
header_values = st.binary(max_size=2000).map(
    lambda value: value.replace(b"\r", b"").replace(b"\n", b"")
)


@settings(max_examples=100, deadline=None)
@given(
    failed=st.lists(recipients, min_size=1, max_size=8),
    headers=st.lists(st.tuples(header_names, header_values), max_size=10),
    body=st.binary(max_size=500),
)
def test_any_report_is_parseable_and_wire_safe(
    failed: list[FailedRecipient], headers: list[tuple[str, bytes]], body: bytes
) -> None:
    block = b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers)
    data = dsn(failed, original=block + b"\r\n" + BODY_MARKER + body)
    assert_wire_safe(data)
    assert BODY_MARKER not in data
    message = parse(data)
    assert_no_defects(message)
    assert [p.get_content_type() for p in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert parts(message)[2].get_payload(decode=True) == block
    text = " ".join(parts(message)[0].get_content().split())
    per_recipient = status_blocks(message)[1:]
    assert len(per_recipient) == len(failed)
    for recipient, fields in zip(failed, per_recipient, strict=True):
        assert fields["Action"] == "failed"
        assert fields["Status"] == recipient.status
        kind, _, address = str(fields["Final-Recipient"]).partition("; ")
        if kind == "rfc822":
            assert address == recipient.address
        else:
            assert kind == "utf-8"
            expected = "".join(
                "\ufffd" if 0xD800 <= ord(c) < 0xE000 else c for c in recipient.address
            )
            assert unescape(address.replace(" ", "")) == expected
        assert re.match(r"[A-Za-z][A-Za-z0-9-]*;( |$)", str(fields["Diagnostic-Code"]))
        assert f"(status {recipient.status})" in text
