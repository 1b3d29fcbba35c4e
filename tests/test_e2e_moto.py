"""The end-to-end happy path and batching against moto, an SES we did not write.

moto checks our signatures (``moto_ses`` turns its IAM auth on), refuses a
call whose Destinations and To/Cc addresses together exceed 50, and refuses
unverified senders: the relay's batching must satisfy it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from tests.motoses import MotoSes
from tests.relayd import running_relay

SENDER = "app@moto-e2e.example.com"


@dataclass(frozen=True)
class MotoTarget:
    url: str
    region: str
    access_key: str
    secret_key: str
    ca_pem_path: str = ""


def target(moto: MotoSes) -> MotoTarget:
    assert moto.auth_key is not None
    moto.verify_domain_identity("moto-e2e.example.com")
    return MotoTarget(
        moto.url, moto.region, moto.auth_key.access_key_id, moto.auth_key.secret_access_key
    )


def message(to: str) -> bytes:
    return (
        f"From: App <{SENDER}>\r\nTo: {to}\r\nSubject: moto e2e\r\n"
        "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <moto-e2e@example.com>\r\n"
        "\r\nHello, moto.\r\n"
    ).encode()


def sent_ids(reply: str) -> list[str]:
    return reply.split(" sent as ", 1)[1].split()


async def send(host: str, port: int, recipients: list[str], raw: bytes) -> str:
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as client:
        _, text = await client.sendmail(SENDER, recipients, raw)
    return text


async def test_one_recipient_through_moto(tmp_path: Path, moto_ses: MotoSes) -> None:
    raw = message("Bob <bob@example.net>")
    async with running_relay(tmp_path, target(moto_ses)) as relay:
        text = await send(*relay.smtp_addresses[0], ["bob@example.net"], raw)
    [message_id] = sent_ids(text)
    stored = moto_ses.raw_message(message_id)
    assert stored["source"] == SENDER
    assert stored["raw_data"].encode() == raw
    assert "bob@example.net" in stored["destinations"]


async def test_120_recipients_through_moto(tmp_path: Path, moto_ses: MotoSes) -> None:
    recipients = [f"user{i}@example.net" for i in range(120)]
    raw = message("Team <team@example.org>")
    async with running_relay(tmp_path, target(moto_ses), smtp={"max_recipients": 200}) as relay:
        text = await send(*relay.smtp_addresses[0], recipients, raw)
    ids = sent_ids(text)
    assert len(ids) == 3
    stored = [moto_ses.raw_message(i) for i in ids]
    delivered = [d for s in stored for d in s["destinations"] if "team@example.org" not in d]
    assert sorted(delivered) == sorted(recipients)
    assert all(len(s["destinations"]) <= 50 for s in stored)


async def test_120_recipients_named_in_to_and_cc_through_moto(
    tmp_path: Path, moto_ses: MotoSes
) -> None:
    """moto counts Destinations plus every To/Cc address, duplicates included:
    each batch leaves a seat for each of them, so none is refused after 250."""
    recipients = [f"listed{i}@example.net" for i in range(120)]
    named = recipients[:2]
    raw = (
        f"From: App <{SENDER}>\r\nTo: {named[0]}\r\nCc: {named[1]}\r\n"
        "Subject: moto e2e\r\n"
        "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <moto-e2e-cc@example.com>\r\n"
        "\r\nHello, moto.\r\n"
    ).encode()
    async with running_relay(tmp_path, target(moto_ses), smtp={"max_recipients": 200}) as relay:
        text = await send(*relay.smtp_addresses[0], recipients, raw)
        assert relay.spool is not None
        assert list(relay.spool.entries()) == []  # nothing queued, nothing bounced
    ids = sent_ids(text)
    assert len(ids) == 3
    stored = [moto_ses.raw_message(i) for i in ids]
    assert all(len(s["destinations"]) <= 50 for s in stored)
    assert all(s["destinations"][-2:] == named for s in stored)  # moto's header copies
    delivered = [d for s in stored for d in s["destinations"][:-2]]
    assert sorted(delivered) == sorted(recipients)
