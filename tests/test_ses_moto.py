"""relay's SES client against moto in server mode, an SES we did not write.

moto runs with signature checking on (``moto_ses`` fixture): our SigV4 must
satisfy a second, independent implementation. The endpoint is plain HTTP.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from relay.config import SesConfig
from relay.errors import Disposition, SesError
from relay.ses.client import SesClient
from relay.ses.credentials import StaticProvider
from relay.ses.sender import RawMessage, SendRequest, SesParameters
from relay.ses.sigv4 import Credentials
from tests.motoses import MotoSes


class CountingProvider(StaticProvider):
    def __init__(self, credentials: Credentials) -> None:
        super().__init__(credentials)
        self.invalidations = 0

    def invalidate(self) -> None:
        self.invalidations += 1


def moto_client(
    moto: MotoSes, credentials: Credentials | None = None, **overrides: object
) -> SesClient:
    assert moto.auth_key is not None
    settings: dict[str, object] = {
        "region": moto.region,
        "endpoint": moto.url,
        "connect_timeout": 2.0,
        "request_timeout": 10.0,
        "max_attempts": 2,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
    }
    settings.update(overrides)
    credentials = credentials or Credentials(
        moto.auth_key.access_key_id, moto.auth_key.secret_access_key
    )
    return SesClient(SesConfig(**settings), CountingProvider(credentials))  # type: ignore[arg-type]


def unique_domain() -> str:
    return f"t{uuid.uuid4().hex[:12]}.example.com"


async def test_sent_message_reads_back_from_moto(moto_ses: MotoSes) -> None:
    domain = unique_domain()
    await asyncio.to_thread(moto_ses.verify_domain_identity, domain)
    sender = f"app@{domain}"
    message = (
        f"From: App <{sender}>\r\n"
        "To: alice@example.net\r\n"
        "Cc: bob@example.org\r\n"
        "Subject: moto round trip\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Hello + / = & % caf\u00e9\r\n"
    ).encode()
    request = SendRequest(
        raw_message=RawMessage.of(message),
        destinations=("alice@example.net", "bob@example.org", "hidden-bcc@example.com"),
        source=sender,
    )
    async with moto_client(moto_ses) as client:
        result = await client.send(request, deadline=15)

    stored = await asyncio.to_thread(moto_ses.raw_message, result.message_id)
    assert stored["raw_data"].encode() == message
    assert stored["source"] == sender
    # moto's destinations: our Destinations plus the To/Cc header addresses.
    assert set(stored["destinations"]) == {
        "alice@example.net",
        "bob@example.org",
        "hidden-bcc@example.com",
    }


async def test_verified_email_identity_with_every_parameter(moto_ses: MotoSes) -> None:
    sender = f"ops@{unique_domain()}"
    await asyncio.to_thread(moto_ses.verify_email_identity, sender)
    message = f"From: {sender}\r\nTo: x@example.net\r\nSubject: tags\r\n\r\nbody\r\n".encode()
    request = SendRequest(
        raw_message=RawMessage.of(message),
        destinations=("x@example.net",),
        source=sender,
        # No spaces here: moto checks signatures over the form re-encoded with
        # urlencode (space as "+"), so a correct "%20" body fails there only.
        ses=SesParameters(tags=(("app", "relay"), ("run", "a.b_c-d~e"))),
    )
    async with moto_client(moto_ses) as client:
        result = await client.send(request, deadline=15)
    stored = await asyncio.to_thread(moto_ses.raw_message, result.message_id)
    assert stored["raw_data"].encode() == message


async def test_get_send_quota_from_moto(moto_ses: MotoSes) -> None:
    async with moto_client(moto_ses) as client:
        quota = await client.quota(deadline=15)
    assert quota.max_24_hour_send == 200.0
    assert quota.max_send_rate == 1.0
    assert quota.sent_last_24_hours >= 0


async def test_unverified_sender_is_permanent_message_rejected(moto_ses: MotoSes) -> None:
    sender = f"nobody@{unique_domain()}"
    request = SendRequest(
        raw_message=RawMessage.of(f"From: {sender}\r\nTo: x@example.net\r\n\r\nhi\r\n".encode()),
        destinations=("x@example.net",),
        source=sender,
    )
    async with moto_client(moto_ses) as client:
        with pytest.raises(SesError) as caught:
            await client.send(request, deadline=15)
    error = caught.value
    assert error.code == "MessageRejected"
    assert error.disposition is Disposition.PERMANENT
    assert (error.smtp_reply.code, error.smtp_reply.enhanced) == (554, "5.7.1")
    assert error.http_status == 400
    assert sender in error.message


async def test_too_many_recipients_is_permanent(moto_ses: MotoSes) -> None:
    domain = unique_domain()
    await asyncio.to_thread(moto_ses.verify_domain_identity, domain)
    request = SendRequest(
        raw_message=RawMessage.of(f"From: a@{domain}\r\nSubject: many\r\n\r\nhi\r\n".encode()),
        destinations=tuple(f"r{i}@example.net" for i in range(51)),
        source=f"a@{domain}",
    )
    async with moto_client(moto_ses) as client:
        with pytest.raises(SesError) as caught:
            await client.send(request, deadline=15)
    assert caught.value.code == "MessageRejected"
    assert caught.value.disposition is Disposition.PERMANENT


async def test_wrong_secret_is_a_deferrable_signature_error(moto_ses: MotoSes) -> None:
    assert moto_ses.auth_key is not None
    wrong = Credentials(moto_ses.auth_key.access_key_id, "definitely-not-the-secret")
    client = moto_client(moto_ses, wrong)
    async with client:
        with pytest.raises(SesError) as caught:
            await client.send(
                SendRequest(raw_message=RawMessage.of(b"Subject: x\r\n\r\nx\r\n")), deadline=15
            )
    error = caught.value
    assert error.code == "SignatureDoesNotMatch"
    assert error.http_status == 403
    assert error.disposition is Disposition.DEFERRABLE
    assert error.refresh_credentials
    assert client._credentials.invalidations >= 1  # type: ignore[attr-defined]


async def test_unknown_key_is_a_deferrable_credential_error(moto_ses: MotoSes) -> None:
    client = moto_client(moto_ses, Credentials("AKIAUNKNOWNKEY000000", "nope"))
    async with client:
        with pytest.raises(SesError) as caught:
            await client.quota(deadline=15)
    assert caught.value.code == "InvalidClientTokenId"
    assert caught.value.disposition is Disposition.DEFERRABLE
    assert caught.value.refresh_credentials
