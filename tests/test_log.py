"""The log an operator follows: one line per stage of each message and per
refusal before DATA, in text or JSON (``log.format``), with times that carry
their offset, and never a secret.

The daemon tests run ``python -m relay serve`` as an operator does, through
AUTH under TLS and an SES call with temporary credentials, at DEBUG level,
and read every line it wrote. The others drive an in-process relay over a
real loopback socket and read its records.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from relay.config import load_config
from relay.errors import ConfigError
from relay.log import FIELDS, JsonFormatter, TextFormatter, configure
from relay.ses.sigv4 import shorten_key_id
from relay.smtp import refusal_logged, shown_argument
from tests.daemon import REPO, daemon_config, daemon_env, running_daemon
from tests.fakeses import FakeSes, SesErrorReply, Succeed
from tests.relayd import running_relay
from tests.test_bounce_sender import mentions, relay_log
from tests.test_e2e import read_reply
from tests.test_reload import message, tls_session, write_cert, write_users

SENDER = "app@example.com"
PASSWORD = "pass-word-never-logged"
ACCESS_KEY = "ASIATEMPORARYKEY7XYZ"
SECRET_KEY = "temporary/secret/never/logged/EXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEBoaDNeverLoggedSessionToken"
ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
JSON_KEYS = {"time", "level", "logger", "message", "exception"} | set(FIELDS)
WAIT = 15.0
THROTTLED = SesErrorReply(400, "Throttling", "Maximum sending rate exceeded.")


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("command", "reply", "logged"),
    [
        ("MAIL", "530 5.7.0 Authentication required", True),
        ("MAIL", "553 5.1.7 Bad sender address syntax", True),
        ("MAIL", "452 4.3.1 Insufficient system storage, try again later", True),
        ("MAIL", "554 5.7.0 Command refused due to lack of security", True),
        ("RCPT", "554 5.7.1 Relay access denied: authenticate first", True),
        ("RCPT", "553 5.1.3 Bad recipient address syntax", True),
        ("MAIL", "503 5.5.1 Error: nested MAIL command", False),
        ("RCPT", "501 5.5.4 Syntax: RCPT TO:<address>", False),
        ("MAIL", "250 2.1.0 OK", False),
        ("AUTH", "538 5.7.11 Encryption required for requested authentication mechanism", True),
        ("AUTH", "535 5.7.8 Authentication credentials invalid", False),  # relay.auth's line
        ("AUTH", "334 VXNlcm5hbWU6", False),
        ("DATA", "554 5.7.1 message rejected", False),  # the message's received line
    ],
)
def test_which_replies_are_refusals_with_a_line(command: str, reply: str, logged: bool) -> None:
    assert refusal_logged(command, reply) is logged


def test_a_refused_auth_shows_its_mechanism_only() -> None:
    assert shown_argument("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==") == "PLAIN"
    assert shown_argument("MAIL", "FROM:<a@b>\x1b[31m" + "x" * 300).startswith("FROM:<a@b> [31m")
    assert len(shown_argument("RCPT", "TO:<" + "x" * 300)) == 200


def test_an_access_key_id_is_shortened() -> None:
    assert shorten_key_id("AKIAIOSFODNN7EXAMPLE") == "AKIA…MPLE"
    assert shorten_key_id("short") == "…"


def record(**extra: Any) -> logging.LogRecord:
    return logging.getLogger("relay.delivery").makeRecord(
        "relay.delivery", logging.INFO, __file__, 1, "%s: sent", ("Q1",), None, extra=extra
    )


def test_json_is_one_object_per_line_with_the_event_fields_as_keys() -> None:
    line = JsonFormatter().format(record(queue_id="Q1", to=["a@b"], **{"from": "x@y"}))
    assert "\n" not in line
    document = json.loads(line)
    assert ISO_TIME.match(document.pop("time"))
    assert document == {
        "level": "info",
        "logger": "relay.delivery",
        "message": "Q1: sent",
        "queue_id": "Q1",
        "to": ["a@b"],
        "from": "x@y",
    }


def test_json_carries_an_exception_on_the_same_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        made = logging.getLogger("relay").makeRecord(
            "relay", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = JsonFormatter().format(made)
    assert "\n" not in line
    assert "ValueError: boom\nsecond line" in json.loads(line)["exception"]


def test_text_times_carry_their_offset() -> None:
    line = TextFormatter().format(record())
    stamp, rest = line.split(" ", 1)
    assert ISO_TIME.match(stamp), line
    assert rest == "INFO relay.delivery: Q1: sent"


def test_configure_again_changes_the_format_of_one_handler() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        configure("text", "info")
        configure("json", "debug")
        added = [h for h in root.handlers if h not in handlers]
        assert len(added) == 1
        assert isinstance(added[0].formatter, JsonFormatter)
        assert root.level == logging.DEBUG
        assert logging.getLogger("mail.log").level == logging.WARNING
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


# --------------------------------------------------------------------------- in-process relay


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


async def test_each_refusal_before_data_is_one_line_naming_client_user_and_command(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    credential = base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode()
    commands = [
        b"EHLO client.test",
        f"AUTH PLAIN {credential}".encode(),  # 538: no TLS
        b"MAIL FROM:<app@example.com>",  # 530: not in allowed_networks
        b"MAIL FROM:<a@>",  # 553: malformed (parsed before the policy)
        b"MAIL TO:<app@example.com>",  # 501: a syntax error, no line
    ]
    async with running_relay(
        tmp_path, fake_ses, smtp={"allowed_networks": ["192.0.2.0/24"]}
    ) as relay:
        host, port = relay.smtp_addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        replies = [await read_reply(reader)]
        for command in commands:
            writer.write(command + b"\r\n")
            replies.append(await read_reply(reader))
        writer.close()
        await writer.wait_closed()
    assert [reply[:4] for reply in replies] == [
        b"220 ",
        b"250-",
        b"538 ",
        b"530 ",
        b"553 ",
        b"501 ",
    ]
    refusals = lines(caplog, "NOQUEUE: reject:")
    assert [r.getMessage() for r in refusals] == [
        "NOQUEUE: reject: AUTH from client=127.0.0.1 user=-: 538 5.7.11 Encryption required "
        "for requested authentication mechanism; arg=PLAIN",
        "NOQUEUE: reject: MAIL from client=127.0.0.1 user=-: 530 5.7.0 Authentication "
        "required; arg=FROM:<app@example.com>",
        "NOQUEUE: reject: MAIL from client=127.0.0.1 user=-: "
        + replies[4].decode().strip()
        + "; arg=FROM:<a@>",
    ]
    assert [(r.command, r.client, r.user, r.reply[:3]) for r in refusals] == [  # type: ignore[attr-defined]
        ("AUTH", "127.0.0.1", None, "538"),
        ("MAIL", "127.0.0.1", None, "530"),
        ("MAIL", "127.0.0.1", None, "553"),
    ]
    assert credential not in caplog.text
    assert PASSWORD not in caplog.text


async def test_deferred_sent_and_bounced_batches_are_a_line_each(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    """Two batches: SES throttles both at DATA; on the retry it takes one and
    refuses the other for good, which is bounced to the sender."""
    rejected = SesErrorReply(400, "MessageRejected", "Email address is not verified.")
    fake_ses.script(THROTTLED, THROTTLED, Succeed(message_id="0100-first"), rejected)
    recipients = ["a@example.net", "b@example.net"]
    async with (
        relay_log() as log,
        running_relay(
            tmp_path,
            fake_ses,
            smtp={"max_batch_recipients": 2},  # the To: header takes one place
            ses={"max_attempts": 1},
            delivery={"retry_min": 0.05, "retry_max": 0.1},
        ) as relay,
    ):
        host, port = relay.smtp_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, timeout=WAIT) as smtp:
            _, text = await smtp.sendmail(SENDER, recipients, message("two"))
        queue_id = text.rsplit(" ", 1)[1]
        await log.wait(mentions(f"{queue_id}: bounce queued as"))
    got = [r.getMessage() for r in log.records if r.getMessage().startswith(f"{queue_id}: ")]
    deferred = sorted(line for line in got if "status=deferred" in line)
    assert len(deferred) == 2, got
    for line, recipient in zip(deferred, recipients, strict=True):
        assert re.fullmatch(
            rf"{queue_id}: to=<{recipient}> status=deferred \(Throttling: Maximum sending rate "
            r"exceeded\.\) next_attempt=\S+[+-]\d\d:\d\d attempts=1",
            line,
        ), line
    [received] = [line for line in got if " client=" in line]
    assert received.startswith(f"{queue_id}: client=127.0.0.1 user=- from=<{SENDER}> rcpts=2 ")
    [sent] = [line for line in got if "status=sent" in line]
    [bounced] = [line for line in got if " to=<" in line and "status=bounced" in line]
    sent_to, bounced_to = sent.split(" ")[1], bounced.split(" ")[1]
    assert {sent_to, bounced_to} == {f"to=<{r}>" for r in recipients}
    assert sent == f"{queue_id}: {sent_to} status=sent (ses id 0100-first)"
    assert bounced == (
        f"{queue_id}: {bounced_to} status=bounced (MessageRejected: Email address is not verified.)"
    )


async def test_a_failed_ses_call_retried_inside_the_client_is_one_line_with_the_queue_id(
    tmp_path: Path, fake_ses: FakeSes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="relay")
    fake_ses.script(THROTTLED, THROTTLED, Succeed(message_id="0100-third"))
    async with running_relay(tmp_path, fake_ses, ses={"max_attempts": 3}) as relay:
        host, port = relay.smtp_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, timeout=WAIT) as smtp:
            _, text = await smtp.sendmail(SENDER, ["a@example.net"], message("retried"))
    queue_id = text.split(" ")[2]
    assert len(fake_ses.requests) == 3
    retried = [r for r in caplog.records if r.name == "relay.ses" and "retried" in r.getMessage()]
    assert [r.getMessage() for r in retried] == [
        f"{queue_id}: SES SendRawEmail retried after Throttling, Throttling; succeeded"
    ]
    assert retried[0].queue_id == queue_id  # type: ignore[attr-defined]
    [sent] = lines(caplog, "status=sent")
    assert sent.getMessage() == f"{queue_id}: to=<a@example.net> status=sent (ses id 0100-third)"


# --------------------------------------------------------------------------- the daemon


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_the_daemon_log_keeps_every_secret_out_and_ends_with_a_stopped_line(
    tmp_path: Path,
    fake_ses: FakeSes,
    tls_ca: trustme.CA,
    ca_pem_path: Path,
    log_format: str,
) -> None:
    """AUTH (a wrong password, then the right one), a refused sender, a
    message sent with temporary credentials after a retry inside the
    client, at DEBUG, then SIGTERM; every line the daemon wrote is read."""
    fake_ses.add_key(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)
    fake_ses.script(THROTTLED, Succeed(message_id="0100-daemon"))
    write_cert(tls_ca.issue_cert("relay.test", "127.0.0.1"), tmp_path)
    users = tmp_path / "users"
    write_users(users, PASSWORD)
    path = daemon_config(
        tmp_path / "relay.toml",
        fake_ses,
        spool=tmp_path / "spool",
        smtp={
            "tls_cert": str(tmp_path / "relay.pem"),
            "tls_key": str(tmp_path / "relay.key"),
            "allowed_networks": ["192.0.2.0/24"],
        },
        ses={"max_attempts": 2},
        auth={
            "users_file": str(users),
            "failure_delay": 0.0,
            "users": {"alice": {"allowed_senders": [SENDER]}},
        },
        log={"format": log_format, "level": "debug"},
    )
    env = daemon_env(
        fake_ses,
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_SESSION_TOKEN=SESSION_TOKEN,
    )
    async with running_daemon(path, env) as daemon:
        assert daemon.smtp is not None
        smtp, _ = await tls_session(daemon.smtp, ca_pem_path, implicit=False)
        async with smtp:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await smtp.login("alice", "wrong-" + PASSWORD)
            await smtp.login("alice", PASSWORD)
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.mail("other@example.com")
            assert refused.value.code == 553
            await smtp.rset()
            _, text = await smtp.sendmail(SENDER, ["bob@example.net"], message("secret"))
        queue_id = text.split(" ")[2]
        daemon.terminate()
        assert await daemon.wait_exit() == 0
    # throttled once, then sent: retried inside the client
    assert [r.destinations for r in fake_ses.requests] == [["bob@example.net"]] * 2
    log = daemon.log
    for secret in (PASSWORD, SECRET_KEY, SESSION_TOKEN, ACCESS_KEY):
        assert secret not in log, secret
    assert shorten_key_id(ACCESS_KEY) in log
    if log_format == "json":
        documents = [json.loads(line) for line in daemon.lines]
        assert all(ISO_TIME.match(d["time"]) for d in documents)
        assert set().union(*documents) <= JSON_KEYS
        events = [d for d in documents if "event" in d]
        assert events[-1] == {**events[-1], "event": "stopped", "message": "ses-relay stopped"}
        assert documents[-1] is events[-1]
        by_event = {d["event"]: d for d in events if d.get("queue_id", queue_id) == queue_id}
        received = by_event["received"]
        assert {k: received[k] for k in ("client", "user", "from", "recipients")} == {
            "client": "127.0.0.1",
            "user": "alice",
            "from": SENDER,
            "recipients": 1,
        }
        assert received["size"] > 0
        assert received["reply"].startswith("250 2.0.0 Ok: ")
        assert by_event["retried"]["retries"] == 1
        assert by_event["sent"]["ses_message_id"] == "0100-daemon"
        assert by_event["sent"]["to"] == ["bob@example.net"]
        refusal = by_event["refused"]
        assert (refusal["command"], refusal["user"], refusal["reply"][:9]) == (
            "MAIL",
            "alice",
            "553 5.7.1",
        )
        auth = [(d["status"], d["user"]) for d in events if d["event"] == "auth"]
        assert auth[-1] == ("ok", "alice")  # aiosmtplib tries each mechanism: failed ones first
        assert set(auth[:-1]) == {("failed", "alice")}
    else:
        stamps = [line.split(" ", 1)[0] for line in daemon.lines]
        assert all(ISO_TIME.match(stamp) for stamp in stamps), log
        assert daemon.lines[-1].endswith(" INFO relay.smtp: ses-relay stopped")
        assert f"{queue_id}: client=127.0.0.1 user=alice from=<{SENDER}> rcpts=1 " in log
        assert f"{queue_id}: SES SendRawEmail retried after Throttling; succeeded" in log
        assert f"{queue_id}: to=<bob@example.net> status=sent (ses id 0100-daemon)" in log
        assert "NOQUEUE: reject: MAIL from client=127.0.0.1 user=alice: 553 5.7.1 " in log


# --------------------------------------------------------------------------- configuration, README


def test_a_wrong_format_or_level_is_named_with_its_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[log]\nformat = "xml"\nlevel = "loud"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert list(caught.value.problems) == [
        f"{path}: [log] format: must be one of 'text', 'json'",
        f"{path}: [log] level: must be one of 'debug', 'info', 'warning', 'error'",
    ]
    assert load_config(None, {"SES_RELAY_LOG_FORMAT": "json"}).log.format == "json"


def test_the_readme_lists_every_json_field() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Logs") :]
    section = section[: section.index("\n## ")]
    assert [key for key in FIELDS if f"| `{key}` |" not in section] == []
