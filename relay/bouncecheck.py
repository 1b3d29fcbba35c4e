"""Will SES take bounces from ``delivery.bounce_sender``? Asked at start and by
``check-config``, never blocking either.

SES sends only from a verified identity: the address itself, its domain, or
a parent domain. ``GetIdentityVerificationAttributes`` (read-only, v1's
Query API under every ``ses.api``: see ``relay.ses.api``) says which of
them are verified. Credentials that may not ask (``AccessDenied``), none
at all, or no answer in time mean "cannot tell": a note, never a failure.
An empty ``delivery.bounce_sender`` is not checked: bounces then come from
``MAILER-DAEMON@`` the failed message's own sender domain, verified since SES
took mail from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from relay.config import Config
from relay.errors import SesError
from relay.oneline import one_line
from relay.ses.client import SesClient

CHECK_DEADLINE = 10.0
"""Seconds the check may take, credentials included."""


@dataclass(frozen=True, slots=True)
class BounceSenderCheck:
    """What SES said of the bounce sender: ``verified`` is None when it cannot tell."""

    verified: bool | None
    text: str


def identities_of(address: str) -> list[str]:
    """The identities that let SES send as ``address``: itself, its domain
    and each parent domain (``a@mail.example.com`` → the address,
    ``mail.example.com``, ``example.com``)."""
    domain = address.rpartition("@")[2].lower()
    labels = domain.split(".")
    return [address, *(".".join(labels[i:]) for i in range(len(labels) - 1))]


def judge(address: str, region: str, statuses: Mapping[str, str]) -> BounceSenderCheck:
    """The verdict on ``address`` from GetIdentityVerificationAttributes' answer."""
    known = {name.lower(): status for name, status in statuses.items()}
    identities = identities_of(address)
    verified = [name for name in identities if known.get(name.lower()) == "Success"]
    if verified:
        return BounceSenderCheck(
            True, f"delivery.bounce_sender {address}: SES identity {verified[0]} is verified"
        )
    seen = ", ".join(
        f"{name} is {known[name.lower()]}" for name in identities if name.lower() in known
    )
    return BounceSenderCheck(
        False,
        f"delivery.bounce_sender {address} is not a verified identity in SES (region "
        f"{region}{': ' + seen if seen else ''}): SES will refuse every bounce, and the "
        "senders of failed mail will not be told. Verify the address or its domain in SES, "
        "or leave delivery.bounce_sender empty to send bounces from MAILER-DAEMON@ the "
        "failed message's own sender domain",
    )


async def check_bounce_sender(config: Config, ses: SesClient) -> BounceSenderCheck | None:
    """Ask SES about ``delivery.bounce_sender``; None when there is nothing
    to check (bounces off, or the default sender)."""
    address = config.delivery.bounce_sender
    if not config.delivery.bounces or not address:
        return None
    try:
        async with asyncio.timeout(CHECK_DEADLINE):
            statuses = await ses.get_identity_verification_attributes(
                identities_of(address), deadline=CHECK_DEADLINE
            )
    except SesError as error:
        reason = one_line(f"{error.code}: {error.message}", 300)
        return BounceSenderCheck(None, _cannot_tell(address, reason))
    except TimeoutError:
        return BounceSenderCheck(
            None, _cannot_tell(address, f"no answer within {CHECK_DEADLINE:g}s")
        )
    return judge(address, config.ses.region, statuses)


def _cannot_tell(address: str, reason: str) -> str:
    return (
        f"cannot tell whether delivery.bounce_sender {address} is a verified SES identity "
        f"({reason}); SES refuses bounces from an unverified one"
    )
