"""Bounces that reach the sender, or say loudly that they cannot.

By default a bounce comes from ``MAILER-DAEMON@`` the failed message's own
sender domain (verified in SES, since SES took mail from it). A configured
``delivery.bounce_sender`` is checked with SES at start and by
``check-config``: a warning when SES says it is not verified, a note when
SES cannot be asked. A bounce SES refuses is logged at ERROR with both queue
ids and SES's reason, counted in ``ses_relay_bounces_total{outcome="failed"}``
and kept in the dead-letter area with that reason; it is never bounced again.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from relay.bouncecheck import identities_of, judge
from relay.dsn import bounce_sender
from relay.errors import SesError
from relay.ses.responses import parse_identity_verification
from relay.spool import DEAD, QUEUE, Spool
from tests.fakeses import (
    HTML_BODY,
    FakeSes,
    SesErrorReply,
    Succeed,
    identity_verification_body,
)
from tests.motoses import MotoSes
from tests.relayd import running_relay, write_config
from tests.test_cli import clean_env, run_cli
from tests.test_e2e import SENDER, message, send
from tests.test_e2e_moto import target
from tests.test_metrics import scrape, value

WAIT = 10.0
UNDISCLOSED = message(to="undisclosed-recipients:;")
NOT_AUTHORIZED = "Did not have authority to send from email MAILER-DAEMON@example.com"


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("configured", "source", "expected"),
    [
        ("", "app@example.com", "MAILER-DAEMON@example.com"),
        ("", "app@mail.example.org", "MAILER-DAEMON@mail.example.org"),
        ("", "no-domain", "MAILER-DAEMON@relay.test"),
        ("bounces@example.net", "app@example.com", "bounces@example.net"),
    ],
)
def test_the_default_bounce_sender_is_in_the_failed_messages_domain(
    configured: str, source: str, expected: str
) -> None:
    assert bounce_sender(configured, source, "relay.test") == expected


def test_an_address_is_verified_by_itself_its_domain_or_a_parent_domain() -> None:
    address = "MAILER-DAEMON@mail.example.com"
    assert identities_of(address) == [address, "mail.example.com", "example.com"]
    for identity in identities_of(address):
        assert judge(address, "eu-west-1", {identity: "Success"}).verified is True
    refused = judge(address, "eu-west-1", {"example.com": "Pending", "other.com": "Success"})
    assert refused.verified is False
    assert "delivery.bounce_sender MAILER-DAEMON@mail.example.com" in refused.text
    assert "example.com is Pending" in refused.text


def test_verification_statuses_are_read_per_identity() -> None:
    body = identity_verification_body(
        {"example.com": "Success", "a@example.org": "Pending"}, "req-1"
    )
    assert parse_identity_verification(body) == {
        "example.com": "Success",
        "a@example.org": "Pending",
    }
    with pytest.raises(SesError) as caught:
        parse_identity_verification(HTML_BODY)
    assert caught.value.code == "MalformedResponse"


# --------------------------------------------------------------------------- log waits


class LogWaiter(logging.Handler):
    """Records ``relay`` log lines; ``wait`` until one matches (no polling)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._arrived.set()  # records come from the event loop's thread

    async def wait(self, match: Callable[[logging.LogRecord], bool]) -> logging.LogRecord:
        async with asyncio.timeout(WAIT):
            while True:
                found = [r for r in self.records if match(r)]
                if found:
                    return found[0]
                self._arrived.clear()
                await self._arrived.wait()

    def lines(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@asynccontextmanager
async def relay_log() -> AsyncIterator[LogWaiter]:
    waiter = LogWaiter()
    logger = logging.getLogger("relay")
    old_level = logger.level
    logger.addHandler(waiter)
    logger.setLevel(logging.DEBUG)
    try:
        yield waiter
    finally:
        logger.removeHandler(waiter)
        logger.setLevel(old_level)


def mentions(*parts: str) -> Callable[[logging.LogRecord], bool]:
    return lambda record: all(part in record.getMessage() for part in parts)


# --------------------------------------------------------------------------- a refused bounce


async def test_a_bounce_ses_refuses_is_loud_counted_and_kept_with_its_reason(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    """carol's batch is refused after 250; the bounce to the sender is refused too."""
    fake_ses.script(
        Succeed(message_id="0100-bob"),
        SesErrorReply(400, "MessageRejected", "Address blacklisted."),
        SesErrorReply(400, "MessageRejected", NOT_AUTHORIZED),
    )
    async with (
        relay_log() as log,
        running_relay(
            tmp_path, fake_ses, smtp={"max_batch_recipients": 1}, delivery={"retry_min": 0.05}
        ) as relay,
    ):
        code, text = await send(relay, ["bob@example.net", "carol@example.org"], UNDISCLOSED)
        assert code == 250, text
        queue_id = text.rsplit(" ", 1)[1]
        error = await log.wait(lambda r: r.levelno == logging.ERROR)
        samples = await scrape(relay)
        assert relay.spool is not None
        spool: Spool = relay.spool
        dead = [await asyncio.to_thread(spool.load, i, DEAD) for i in spool_ids(spool, DEAD)]
        queued = spool_ids(spool, QUEUE)
    original, bounce = sorted(dead, key=lambda e: e.bounce_of is not None)
    assert original.id == queue_id
    assert bounce.bounce_of == queue_id
    assert queued == []
    # The bounce came from the sender's own domain, not from smtp.hostname (relay.test).
    *_, dsn_request = fake_ses.requests
    assert len(fake_ses.requests) == 3  # not bounced again
    assert dsn_request.params["Source"] == "MAILER-DAEMON@example.com"
    assert dsn_request.raw_message is not None
    dsn = email.message_from_bytes(dsn_request.raw_message, policy=email.policy.default)
    assert dsn["From"].addresses[0].addr_spec == "MAILER-DAEMON@example.com"
    assert dsn_request.destinations == [SENDER]
    # Loud: one ERROR line with both queue ids and SES's reason.
    assert log.lines(logging.ERROR) == [error.getMessage()]
    for part in (bounce.id, queue_id, f"<{SENDER}>", NOT_AUTHORIZED, "delivery.bounce_sender"):
        assert part in error.getMessage()
    # Kept in the dead-letter area with its reason.
    [failed] = bounce.batches
    assert failed.state == "failed"
    assert failed.error is not None
    assert NOT_AUTHORIZED in str(failed.error)
    # Counted by outcome.
    assert value(samples, "ses_relay_bounces_total", outcome="queued") == 1
    assert value(samples, "ses_relay_bounces_total", outcome="failed") == 1
    assert value(samples, "ses_relay_bounces_total", outcome="sent") == 0


async def test_a_bounce_ses_takes_is_counted_as_sent(tmp_path: Path, fake_ses: FakeSes) -> None:
    fake_ses.script(
        Succeed(message_id="0100-bob"),
        SesErrorReply(400, "MessageRejected", "Address blacklisted."),
    )
    batch_of_one = {"max_batch_recipients": 1}
    async with relay_log() as log, running_relay(tmp_path, fake_ses, smtp=batch_of_one) as relay:
        code, text = await send(relay, ["bob@example.net", "carol@example.org"], UNDISCLOSED)
        assert code == 250, text
        await log.wait(mentions("from=<>", "status=sent"))
        samples = await scrape(relay)
    assert value(samples, "ses_relay_bounces_total", outcome="queued") == 1
    assert value(samples, "ses_relay_bounces_total", outcome="sent") == 1
    assert value(samples, "ses_relay_bounces_total", outcome="failed") == 0
    assert log.lines(logging.ERROR) == []
    assert fake_ses.requests[-1].params["Source"] == "MAILER-DAEMON@example.com"


def spool_ids(spool: Spool, area: str) -> list[str]:
    return sorted(p.stem for p in spool.dir(area).glob("*.json"))


# --------------------------------------------------------------------------- at start


async def test_start_says_when_ses_cannot_tell_and_still_relays(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    fake_ses.script(SesErrorReply(403, "AccessDenied", "not authorized to perform GetIdentity"))
    async with (
        relay_log() as log,
        running_relay(
            tmp_path, fake_ses, delivery={"bounce_sender": "bounces@example.com"}
        ) as relay,
    ):
        note = await log.wait(mentions("cannot tell"))
        code, _ = await send(relay, ["bob@example.net"], message())
    assert code == 250
    assert note.levelno == logging.INFO
    assert "delivery.bounce_sender bounces@example.com" in note.getMessage()
    assert "AccessDenied" in note.getMessage()
    assert fake_ses.requests[0].action == "GetIdentityVerificationAttributes"
    assert fake_ses.requests[0].unexpected_params() == []
    assert log.lines(logging.WARNING) == []


def unique_domain() -> str:
    return f"b{uuid.uuid4().hex[:12]}.example.com"


@pytest.mark.parametrize("verified", ["domain", "address", None])
async def test_start_warns_when_moto_says_the_bounce_sender_is_not_verified(
    tmp_path: Path, moto_ses: MotoSes, verified: str | None
) -> None:
    domain = unique_domain()
    sender = f"bounces@{domain}"
    if verified == "domain":
        await asyncio.to_thread(moto_ses.verify_domain_identity, domain)
    elif verified == "address":
        await asyncio.to_thread(moto_ses.verify_email_identity, sender)
    delivery = {"bounce_sender": sender}
    async with relay_log() as log, running_relay(tmp_path, target(moto_ses), delivery=delivery):
        said = await log.wait(mentions(f"delivery.bounce_sender {sender}"))
    if verified is None:
        assert said.levelno == logging.WARNING
        assert "is not a verified identity in SES" in said.getMessage()
    else:
        assert said.levelno == logging.INFO
        assert said.getMessage().endswith(" is verified")
        assert log.lines(logging.WARNING) == []


# --------------------------------------------------------------------------- check-config


def moto_env(tmp_path: Path, moto: MotoSes) -> dict[str, str]:
    assert moto.auth_key is not None
    return clean_env(
        tmp_path,
        AWS_ACCESS_KEY_ID=moto.auth_key.access_key_id,
        AWS_SECRET_ACCESS_KEY=moto.auth_key.secret_access_key,
        AWS_ENDPOINT_URL_SES=moto.url,
        AWS_REGION=moto.region,
    )


@pytest.mark.parametrize("verified", [True, False])
async def test_check_config_asks_moto_about_the_bounce_sender(
    tmp_path: Path, moto_ses: MotoSes, verified: bool
) -> None:
    domain = unique_domain()
    if verified:
        await asyncio.to_thread(moto_ses.verify_domain_identity, domain)
    config = write_config(
        tmp_path / "relay.toml", {"delivery": {"bounce_sender": f"bounces@{domain}"}}
    )
    code, out, err = await run_cli(
        "check-config", "-c", str(config), env=moto_env(tmp_path, moto_ses)
    )
    assert code == 0  # never a failure
    lines = out.splitlines()
    assert lines[0] == f"ses-relay: configuration OK ({config})"
    if verified:
        assert lines[1:] == [
            f"ses-relay: delivery.bounce_sender bounces@{domain}: SES identity {domain} is verified"
        ]
        assert err == ""
    else:
        assert lines[1:] == []
        assert err.startswith(
            f"ses-relay: warning: delivery.bounce_sender bounces@{domain} is not a verified "
            "identity in SES (region us-east-1)"
        )


async def test_check_config_without_credentials_cannot_tell(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "relay.toml", {"delivery": {"bounce_sender": "bounces@example.com"}}
    )
    code, out, err = await run_cli("check-config", "-c", str(config), env=clean_env(tmp_path))
    assert code == 0
    assert out == f"ses-relay: configuration OK ({config})\n"
    assert err.startswith(
        "ses-relay: note: cannot tell whether delivery.bounce_sender bounces@example.com "
        "is a verified SES identity (NoCredentials: "
    )
