"""relay.smtpsyntax: command lines, MAIL and RCPT arguments and EHLO, without sockets.

Each table row is what a client sends and what the listener does with it:
the parsed value, or the reply that refuses it (the same replies the
socket tests in test_smtp_protocol.py see).
"""

from __future__ import annotations

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP

from relay.aiosmtpd_compat import CHECKED_VERSION
from relay.smtpsyntax import (
    REPLY_BAD_BODY,
    REPLY_BAD_SYNTAX,
    REPLY_LINE_TOO_LONG,
    REPLY_MAIL_MALFORMED,
    REPLY_MAIL_PARAMETERS,
    REPLY_MAIL_SYNTAX,
    REPLY_RCPT_MALFORMED,
    REPLY_RCPT_PARAMETERS,
    REPLY_RCPT_SYNTAX,
    REPLY_TOO_BIG,
    PathArgument,
    ehlo_reply,
    parse_command,
    parse_mail,
    parse_rcpt,
)

MAX_SIZE = 1000


@pytest.mark.parametrize(
    ("line", "extended", "expected"),
    [
        (b"NOOP\r\n", False, ("NOOP", None, None)),
        (b"NOOP\n", False, ("NOOP", None, None)),
        (b"noop\r\n", False, ("NOOP", None, None)),
        (b"mail FROM:<a@example.com>\r\n", True, ("MAIL", "FROM:<a@example.com>", None)),
        (b"VRFY   someone  \r\n", False, ("VRFY", "someone", None)),
        (b"NOOP \r\n", False, ("NOOP", None, None)),
        # an IDN argument is UTF-8: decoded here, judged by relay.addresses
        ("RCPT TO:<a@bücher.example>\r\n".encode(), True, ("RCPT", "TO:<a@bücher.example>", None)),
        (None, False, ("", None, REPLY_LINE_TOO_LONG)),
        (b"\r\n", False, ("", None, REPLY_BAD_SYNTAX)),
        (b" NOOP\r\n", False, ("", None, REPLY_BAD_SYNTAX)),
        (b"N\xc3\x96OP\r\n", False, ("", None, REPLY_BAD_SYNTAX)),
        (b"NOOP \xff\r\n", False, ("", None, REPLY_BAD_SYNTAX)),
        # RFC 5321 4.5.3.1.4: 512 octets without CRLF
        (b"NOOP " + b"x" * 507 + b"\r\n", False, ("NOOP", "x" * 507, None)),
        (b"NOOP " + b"x" * 508 + b"\r\n", False, ("", None, REPLY_LINE_TOO_LONG)),
        (b"NOOP " + b"x" * 508 + b"\r\n", True, ("", None, REPLY_LINE_TOO_LONG)),
        # RFC 1870: MAIL may be 26 longer after EHLO, not after HELO
        (b"MAIL " + b"x" * 533 + b"\r\n", True, ("MAIL", "x" * 533, None)),
        (b"MAIL " + b"x" * 534 + b"\r\n", True, ("", None, REPLY_LINE_TOO_LONG)),
        (b"MAIL " + b"x" * 508 + b"\r\n", False, ("", None, REPLY_LINE_TOO_LONG)),
        # RFC 4954: AUTH up to aiosmtpd's line limit after EHLO
        (b"AUTH " + b"x" * 995 + b"\r\n", True, ("AUTH", "x" * 995, None)),
        (b"AUTH " + b"x" * 996 + b"\r\n", True, ("", None, REPLY_LINE_TOO_LONG)),
        (b"AUTH " + b"x" * 508 + b"\r\n", False, ("", None, REPLY_LINE_TOO_LONG)),
    ],
)
def test_command_lines(
    line: bytes | None, extended: bool, expected: tuple[str, str | None, str | None]
) -> None:
    assert parse_command(line, extended=extended) == expected


@pytest.mark.parametrize(
    ("arg", "extended", "expected"),
    [
        ("FROM:<a@example.com>", True, PathArgument("a@example.com", [])),
        ("from: <a@example.com>", True, PathArgument("a@example.com", [])),
        ("FROM:<>", True, PathArgument("<>", [])),
        ("FROM:a@example.com", True, PathArgument("a@example.com", [])),
        ("FROM:<@r.example:a@example.com>", True, PathArgument("a@example.com", [])),
        ('FROM:<"x y"@example.com>', True, PathArgument('"x y"@example.com', [])),
        ("FROM:<a@[192.0.2.1]>", True, PathArgument("a@[192.0.2.1]", [])),
        ("FROM:<a@example.com> SIZE=1000", True, PathArgument("a@example.com", ["SIZE=1000"])),
        ("FROM:<a@example.com> size=10", True, PathArgument("a@example.com", ["SIZE=10"])),
        ("FROM:<a@example.com> (c) SIZE=10", True, PathArgument("a@example.com", ["SIZE=10"])),
        (
            "FROM:<a@example.com>\tBODY=8bitmime",
            True,
            PathArgument("a@example.com", ["BODY=8BITMIME"]),
        ),
        ("FROM:<a@example.com> BODY=7BIT", True, PathArgument("a@example.com", ["BODY=7BIT"])),
        ("FROM:<a@example.com> AUTH=<>", True, PathArgument("a@example.com", ["AUTH=<>"])),
        (None, True, REPLY_MAIL_SYNTAX),
        ("", True, REPLY_MAIL_SYNTAX),
        ("FROM:", True, REPLY_MAIL_SYNTAX),
        ("TO:<a@example.com>", True, REPLY_MAIL_SYNTAX),
        ("FROM:<@bad", True, REPLY_MAIL_MALFORMED),
        ("FROM:<a@example.com> SIZE=1000", False, REPLY_MAIL_SYNTAX),
        ("FROM:<a@example.com> SIZE=1001", True, REPLY_TOO_BIG),
        ("FROM:<a@example.com> SIZE=", True, REPLY_MAIL_SYNTAX),
        ("FROM:<a@example.com> SIZE=ten", True, REPLY_MAIL_SYNTAX),
        ("FROM:<a@example.com> SIZE", True, REPLY_MAIL_SYNTAX),
        # digits to str.isdigit(), not to RFC 1870
        ("FROM:<a@example.com> SIZE=\u0661\u0660", True, REPLY_MAIL_SYNTAX),
        ("FROM:<a@example.com> BODY=BINARYMIME", True, REPLY_BAD_BODY),
        ("FROM:<a@example.com> SMTPUTF8", True, REPLY_MAIL_PARAMETERS),
        ("FROM:<a@example.com> RET=HDRS", True, REPLY_MAIL_PARAMETERS),
    ],
)
def test_mail_arguments(arg: str | None, extended: bool, expected: PathArgument | str) -> None:
    assert parse_mail(arg, extended=extended, max_message_size=MAX_SIZE) == expected


@pytest.mark.parametrize(
    ("arg", "extended", "expected"),
    [
        ("TO:<b@example.net>", True, PathArgument("b@example.net", [])),
        ("to:<b@example.net>", False, PathArgument("b@example.net", [])),
        ("TO: <b@example.net>", True, PathArgument("b@example.net", [])),
        (None, True, REPLY_RCPT_SYNTAX),
        ("FROM:<b@example.net>", True, REPLY_RCPT_SYNTAX),
        ("TO:<@bad", True, REPLY_RCPT_MALFORMED),
        ("TO:<b@example.net> NOTIFY=NEVER", True, REPLY_RCPT_PARAMETERS),
        ("TO:<b@example.net> =x", True, REPLY_RCPT_SYNTAX),
        ("TO:<b@example.net> X", False, REPLY_RCPT_SYNTAX),
    ],
)
def test_rcpt_arguments(arg: str | None, extended: bool, expected: PathArgument | str) -> None:
    assert parse_rcpt(arg, extended=extended) == expected


def test_ehlo_reply_lists_starttls_and_auth_when_given() -> None:
    assert ehlo_reply("relay.test", 10, starttls=False, auth=None) == (
        "250-relay.test\r\n250-SIZE 10\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES"
    )
    assert ehlo_reply("relay.test", 10, starttls=True, auth=["PLAIN", "LOGIN"]).endswith(
        "250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN"
    )


PRIVATE_METHODS = (
    "_call_handler_hook",
    "_cb_client_connected",
    "_create_envelope",
    "_create_session",
    "_getaddr",
    "_getparams",
    "_handle_client",
    "_reset_timeout",
    "_set_post_data_state",
    "_set_rset_state",
    "_strip_command_keyword",
    "_timeout_cb",
)


def test_aiosmtpd_still_has_the_private_methods_the_relay_relies_on() -> None:
    """A release without one of them fails here, naming the file to check
    (relay/aiosmtpd_compat.py); the protocol tests check how they behave.
    Not an exact version pin: a new release that keeps them should not stop
    the relay from installing and running."""
    missing = [name for name in PRIVATE_METHODS if not callable(getattr(SMTP, name, None))]
    assert not missing, (
        f"aiosmtpd {aiosmtpd.__version__} lacks {missing}: check each private name listed "
        f"in relay/aiosmtpd_compat.py (checked against {CHECKED_VERSION})"
    )
