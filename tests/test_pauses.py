"""Errors of the whole SES account pause all delivery: queued mail does not
hammer SES with calls bound to fail, and new mail is queued at once.

An account whose sending is paused, or credentials SES refuses, get the same
answer for every message; a paused configuration set concerns only the
messages that use it. ``ses-relay queue retry`` (``Relay.retry_now``) ends
a pause. That no call is made while a pause lasts, and that it ends on time,
is shown on a fake clock in ``tests/test_delivery.py``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from relay.app import Relay
from tests.fakeses import FakeSes, SesErrorReply
from tests.relayd import running_relay
from tests.test_e2e import message, send, wait_until_gone

FAST_RETRY = {"retry_min": 0.05, "retry_max": 0.1, "inline_timeout": 3.0}


def queue_id(text: str) -> str:
    assert text.startswith("2.0.0 Ok: queued as "), text
    return text.rsplit(" ", 1)[1]


async def queued_ids(relay: Relay) -> set[str]:
    assert relay.spool is not None
    spool = relay.spool
    return await asyncio.to_thread(lambda: {e.id for e in spool.entries()})


@pytest.mark.parametrize(
    ("answers", "logged"),
    [
        (
            [SesErrorReply(400, "MessageRejected", "Sending paused for this account.")],
            "pausing all delivery for 900s: MessageRejected: Sending paused for this account.",
        ),
        (
            # refused twice: once more with credentials read again
            [SesErrorReply(403, "InvalidClientTokenId", "The security token is invalid.")] * 2,
            "pausing all delivery for 60s: InvalidClientTokenId: The security token is invalid.",
        ),
    ],
    ids=["account sending paused", "credentials refused"],
)
async def test_an_account_error_pauses_every_delivery_until_queue_retry(
    tmp_path: Path,
    fake_ses: FakeSes,
    caplog: pytest.LogCaptureFixture,
    answers: list[SesErrorReply],
    logged: str,
) -> None:
    fake_ses.script(*answers)
    async with running_relay(tmp_path, fake_ses, delivery=FAST_RETRY) as relay:
        code, text = await send(relay, ["first@example.net"], message())
        assert code == 250
        first = queue_id(text)
        assert logged in caplog.text
        calls = len(fake_ses.requests)
        assert calls == len(answers)

        started = time.monotonic()
        code, text = await send(relay, ["second@example.net"], message())
        assert code == 250
        second = queue_id(text)
        assert time.monotonic() - started < 2.0  # queued at once, not after inline_timeout
        assert len(fake_ses.requests) == calls
        assert await queued_ids(relay) == {first, second}
        assert caplog.text.count("pausing all delivery") == 1

        relay.retry_now()  # what `ses-relay queue retry` does through SIGUSR1
        await wait_until_gone(relay, first)
        await wait_until_gone(relay, second)
    delivered = [r.destinations for r in fake_ses.requests[calls:]]
    assert sorted(delivered) == [["first@example.net"], ["second@example.net"]]


async def test_a_paused_configuration_set_does_not_pause_other_mail(
    tmp_path: Path, fake_ses: FakeSes
) -> None:
    fake_ses.script(SesErrorReply(400, "ConfigurationSetSendingPausedException", "paused"))
    async with running_relay(tmp_path, fake_ses, delivery=FAST_RETRY) as relay:
        paused = message(extra_headers="X-SES-CONFIGURATION-SET: marketing\r\n")
        code, text = await send(relay, ["first@example.net"], paused)
        assert code == 250
        queue_id(text)
        code, text = await send(relay, ["second@example.net"], message())
        assert (code, text.split(":")[0]) == (250, "2.0.0 Ok"), text
        assert " sent as " in text
