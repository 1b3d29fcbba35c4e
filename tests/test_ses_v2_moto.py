"""The SES API v2 client, and the relay under ``ses.api = "v2"``, against
moto's sesv2 in server mode: an SES we did not write, with signature
checking on, that decodes the raw message, checks the sender's identity and
counts the recipients (``Destination`` plus the To/Cc/Bcc headers) against 50.

moto stores v2 raw sends where it stores v1's (``MotoSes.raw_message``).
It does not implement GetAccount nor check sizes: ``tests/test_ses_v2.py``
covers those against the fake SES.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.config import SesConfig
from relay.errors import Disposition, SesError
from relay.ses.credentials import StaticProvider
from relay.ses.sender import RawMessage, SendRequest, SesParameters
from relay.ses.sigv4 import Credentials
from relay.ses.v2 import SesV2Client
from tests.motoses import MotoSes
from tests.relayd import running_relay
from tests.test_e2e_moto import SENDER, message, send, sent_ids, target
from tests.test_ses_moto import unique_domain


def moto_v2_client(moto: MotoSes) -> SesV2Client:
    assert moto.auth_key is not None
    config = SesConfig(
        region=moto.region,
        endpoint=moto.url,
        connect_timeout=2.0,
        request_timeout=10.0,
        max_attempts=1,
    )
    key = Credentials(moto.auth_key.access_key_id, moto.auth_key.secret_access_key)
    return SesV2Client(config, StaticProvider(key))


async def test_send_email_reaches_moto_with_its_sender_and_recipients(moto_ses: MotoSes) -> None:
    domain = unique_domain()
    await asyncio.to_thread(moto_ses.verify_domain_identity, domain)
    sender = f"app@{domain}"
    raw = (
        f"From: App <{sender}>\r\nTo: alice@example.net\r\nSubject: v2 through moto\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Hello + / = & caf\u00e9\r\n"
    ).encode()
    request = SendRequest(
        raw_message=RawMessage.of(raw),
        destinations=("alice@example.net", "hidden@example.com"),
        source=sender,
        ses=SesParameters(configuration_set="ignored-by-moto", tags=(("app", "t"),)),
    )
    async with moto_v2_client(moto_ses) as client:
        result = await client.send(request, deadline=15)
    assert result.message_id is not None
    stored = await asyncio.to_thread(moto_ses.raw_message, result.message_id)
    assert stored["raw_data"].encode() == raw
    assert stored["source"] == sender
    # moto lists Destination and the To/Cc addresses of the message together.
    assert set(stored["destinations"]) == {"alice@example.net", "hidden@example.com"}


async def test_an_unverified_sender_is_a_permanent_refusal(moto_ses: MotoSes) -> None:
    sender = f"app@{unique_domain()}"
    raw = f"From: {sender}\r\nTo: a@example.net\r\nSubject: x\r\n\r\nbody\r\n".encode()
    async with moto_v2_client(moto_ses) as client:
        with pytest.raises(SesError) as caught:
            await client.send(
                SendRequest(RawMessage.of(raw), ("a@example.net",), sender), deadline=15
            )
    assert caught.value.code == "MessageRejected"
    assert caught.value.disposition is Disposition.PERMANENT


async def test_the_relay_under_v2_delivers_120_recipients_through_moto(
    tmp_path: Path, moto_ses: MotoSes
) -> None:
    recipients = [f"user{i}@example.net" for i in range(120)]
    raw = message("Team <team@example.org>")
    async with running_relay(
        tmp_path, target(moto_ses), ses={"api": "v2"}, smtp={"max_recipients": 200}
    ) as relay:
        text = await send(*relay.smtp_addresses[0], recipients, raw)
    ids = sent_ids(text)
    assert len(ids) == 3
    stored = [moto_ses.raw_message(i) for i in ids]
    assert all(s["source"] == SENDER for s in stored)
    assert all(s["raw_data"].encode() == raw for s in stored)
    delivered = sorted(d for s in stored for d in s["destinations"] if "team@example.org" not in d)
    assert delivered == sorted(recipients)
