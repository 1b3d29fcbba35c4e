"""SMTP smuggling: raw bytes (smtplib would rewrite line endings) against the listener.

Each case sends a message whose body holds a would-be end of DATA followed by
a smuggled transaction, then the real ``<CRLF>.<CRLF>`` and QUIT, all at
once. What the client reads must be exactly one reply for the DATA and one
for QUIT (no early reply, no reply to a smuggled command); what the handler
gets must be one message at most, with no bare CR or LF, and the smuggled
commands in it as content.
"""

from __future__ import annotations

import pytest

from tests.smtpserver import RawClient, Server, raw_client, smtp_server

SMUGGLED = (
    b"MAIL FROM:<ceo@example.com>\r\n"
    b"RCPT TO:<victim@example.net>\r\n"
    b"DATA\r\n"
    b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\nforged\r\n"
)
HEAD = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: innocent\r\n\r\nbody"

# Would-be ends of DATA that some servers accept (SEC Consult, CVE-2023-51764/5/6):
SEQUENCES = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r.\n",
    b"\r\n.\r\r\n",
    b"\r\n.\n\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n \r\n.\n",
]
ENDS_WITH_NUL = {b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"}
REPLY_354 = "354 End data with <CR><LF>.<CR><LF>"


async def open_transaction(client: RawClient) -> None:
    await client.greet()
    await client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    assert [await client.line() for _ in range(3)] == ["250 2.1.0 Ok", "250 2.1.5 Ok", REPLY_354]


def expected_reply(sequence: bytes, mode: str) -> str:
    if sequence in ENDS_WITH_NUL:
        return "550 5.6.0 NUL character not allowed in message"
    if mode == "reject":
        return "550 5.5.2 bare CR or LF not allowed"
    return "250 2.0.0 OK"


def check_handler(server: Server, reply: str) -> None:
    messages = server.handler.messages
    if not reply.startswith("250"):
        assert messages == []
        return
    [message] = messages
    content = message.content
    without_crlf = content.replace(b"\r\n", b"")
    assert b"\r" not in without_crlf
    assert b"\n" not in without_crlf
    assert b"\x00" not in content
    assert b"MAIL FROM:<ceo@example.com>" in content
    assert content.endswith(b"forged\r\n")
    assert server.handler.mail_froms == ["a@example.com"]
    assert server.handler.rcpts == ["b@example.net"]


@pytest.mark.parametrize("mode", ["normalize", "reject"])
@pytest.mark.parametrize("sequence", SEQUENCES, ids=repr)
async def test_smuggling_in_one_packet(sequence: bytes, mode: str) -> None:
    async with smtp_server(bare_newline=mode) as server, raw_client(server) as client:
        await open_transaction(client)
        await client.send(HEAD + sequence + SMUGGLED + b".\r\nQUIT\r\n")
        reply = expected_reply(sequence, mode)
        assert await client.replies_until_eof() == [reply, "221 2.0.0 Bye"]
    check_handler(server, reply)


@pytest.mark.parametrize("mode", ["normalize", "reject"])
@pytest.mark.parametrize("sequence", SEQUENCES, ids=repr)
async def test_smuggling_byte_by_byte(sequence: bytes, mode: str) -> None:
    """Every byte of the would-be end in its own write, so it spans reads."""
    async with smtp_server(bare_newline=mode) as server, raw_client(server) as client:
        await open_transaction(client)
        await client.send(HEAD)
        for byte in sequence + SMUGGLED[:40]:
            await client.send(bytes([byte]))
        await client.send(SMUGGLED[40:] + b".\r\nQUIT\r\n")
        reply = expected_reply(sequence, mode)
        assert await client.replies_until_eof() == [reply, "221 2.0.0 Bye"]
    check_handler(server, reply)


@pytest.mark.parametrize("mode", ["normalize", "reject"])
async def test_smuggled_end_then_a_pause_gets_no_early_reply(mode: str) -> None:
    """The would-be end is sent alone; then NOOP inside DATA is content, not a command.

    Had the server ended DATA at ``<LF>.<LF>``, the NOOP would get its own
    250 before the real end of DATA; it must not.
    """
    async with smtp_server(bare_newline=mode) as server, raw_client(server) as client:
        await open_transaction(client)
        await client.send(HEAD + b"\n.\n")
        await client.send(b"NOOP\r\n")
        await client.send(b".\r\nNOOP\r\n")
        reply = expected_reply(b"\n.\n", mode)
        assert await client.line() == reply
        assert await client.line() == "250 2.0.0 OK"
        assert await client.command("QUIT") == "221 2.0.0 Bye"
    if mode == "normalize":
        [message] = server.handler.messages
        assert message.content == HEAD.replace(b"body", b"body\r\n.\r\nNOOP\r\n")


@pytest.mark.parametrize("mode", ["normalize", "reject"])
async def test_bare_newlines_in_an_ordinary_message(mode: str) -> None:
    async with smtp_server(bare_newline=mode) as server, raw_client(server) as client:
        await open_transaction(client)
        await client.send(b"Subject: lf\n\nline one\nline two\r\nthree\rfour\r\n.\r\n")
        if mode == "normalize":
            assert await client.line() == "250 2.0.0 OK"
            [message] = server.handler.messages
            assert message.content == (
                b"Subject: lf\r\n\r\nline one\r\nline two\r\nthree\r\nfour\r\n"
            )
        else:
            assert await client.line() == "550 5.5.2 bare CR or LF not allowed"
            assert server.handler.messages == []
        # The transaction is over either way; the session is not.
        assert await client.command("DATA") == "503 5.5.1 Error: need MAIL command"
        assert await client.command("QUIT") == "221 2.0.0 Bye"


async def test_only_one_message_per_data_even_with_two_real_ends() -> None:
    """A second ``<CRLF>.<CRLF>`` after the first is a command line ("."), not a message."""
    async with smtp_server() as server, raw_client(server) as client:
        await open_transaction(client)
        await client.send(HEAD + b"\r\n.\r\n" + SMUGGLED + b".\r\nQUIT\r\n")
        replies = await client.replies_until_eof()
    # The smuggled commands come after a real end of DATA: they are commands
    # of this client's own session, answered one by one (nothing is hidden).
    assert replies == [
        "250 2.0.0 OK",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        REPLY_354,
        "250 2.0.0 OK",
        "221 2.0.0 Bye",
    ]
    first, second = server.handler.messages
    assert first.content == HEAD + b"\r\n"
    assert second.mail_from == "ceo@example.com"
