"""``ses.api``: which SES API sends. ``connect`` makes the clients for it.

- "v1": ``SesClient`` (SendRawEmail, GetSendQuota).
- "v2": ``SesV2Client`` (SendEmail with ``Content.Raw``, GetAccount).
- "auto": ``AutoSender``: SendRawEmail for every message that fits it
  (``relay.ses.limits.fits_v1``), SendEmail for larger ones; the quota from
  GetSendQuota (so the IAM policy of "v1" serves: v2 raw sends are
  authorized as ``ses:SendRawEmail``).

The check of ``delivery.bounce_sender`` (``relay.bouncecheck``) asks the v1
Query API's GetIdentityVerificationAttributes under every choice: it is
read-only, served on the same endpoint with the same signing, and answers
for an address, its domain and the parent domains in one call, where v2's
GetEmailIdentity takes one call per identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from relay.config import SesConfig
from relay.ses.client import SesClient
from relay.ses.credentials import CredentialProvider
from relay.ses.limits import fits_v1
from relay.ses.sender import SendQuota, SendRequest, SendResult, SesSender
from relay.ses.v2 import SesV2Client

__all__ = ["AutoSender", "Ses", "connect"]


class AutoSender:
    """A ``SesSender`` that sends through v1 what fits it and through v2 the rest."""

    def __init__(self, v1: SesClient, v2: SesV2Client) -> None:
        self._v1 = v1
        self._v2 = v2

    async def send(self, request: SendRequest, *, deadline: float) -> SendResult:
        if fits_v1(request.raw_message.size):
            return await self._v1.send(request, deadline=deadline)
        return await self._v2.send(request, deadline=deadline)

    async def quota(self) -> SendQuota:
        return await self._v1.quota()


@dataclass(frozen=True, slots=True)
class Ses:
    """The clients of one account: ``sender`` for delivery and the quota,
    ``v1`` for the check of the bounce sender."""

    sender: SesSender
    v1: SesClient


def connect(
    config: SesConfig,
    credentials: CredentialProvider,
    *,
    session: aiohttp.ClientSession,
    observe: Callable[[str, str, float], None] | None = None,
) -> Ses:
    """The clients ``config.api`` asks for, over the one pooled ``session``."""
    v1 = SesClient(config, credentials, session=session, observe=observe)
    if config.api == "v1":
        return Ses(v1, v1)
    v2 = SesV2Client(config, credentials, session=session, observe=observe)
    return Ses(v2 if config.api == "v2" else AutoSender(v1, v2), v1)
