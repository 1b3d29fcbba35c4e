"""Who may relay, as whom, with which SES identity headers. Pure.

Not an open relay: a client in ``smtp.allowed_networks`` may relay without
AUTH; any other client must authenticate first. An authenticated user with
``allowed_senders`` may use only those addresses and domains, in MAIL FROM
and for every mailbox of the From: and Sender: headers. The identity headers
(``X-SES-SOURCE-ARN`` and friends) send as another identity: only clients in
``smtp.identity_header_networks`` and users with ``identity_headers = true``
may use them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from relay.config import AuthConfig, SmtpConfig, UserPolicy
from relay.errors import MessageRefused, SmtpReply

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

AUTH_REQUIRED = SmtpReply(530, "5.7.0", "Authentication required")
RELAY_DENIED = SmtpReply(554, "5.7.1", "Relay access denied: authenticate first")


def networks(texts: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


def in_networks(client_ip: str, nets: tuple[Network, ...]) -> bool:
    """Whether ``client_ip`` lies in one of ``nets`` (an IPv4-mapped IPv6
    address counts as its IPv4 address)."""
    try:
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in nets)


def sender_allowed(address: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``address`` matches an entry: ``a@example.com`` or ``@example.com``.

    An empty ``allowed`` allows every address.
    """
    if not allowed:
        return True
    lowered = address.lower()
    domain = "@" + lowered.rpartition("@")[2]
    return any(entry.lower() in (lowered, domain) for entry in allowed)


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The relay's access rules, built once from the configuration."""

    relay_networks: tuple[Network, ...]
    identity_networks: tuple[Network, ...]
    auth: AuthConfig

    @classmethod
    def from_config(cls, smtp: SmtpConfig, auth: AuthConfig) -> AccessPolicy:
        return cls(
            relay_networks=networks(smtp.allowed_networks),
            identity_networks=networks(smtp.identity_header_networks),
            auth=auth,
        )

    def may_relay(self, client_ip: str, user: str | None) -> bool:
        return user is not None or in_networks(client_ip, self.relay_networks)

    def user(self, name: str | None) -> UserPolicy | None:
        return None if name is None else self.auth.user(name)

    def check_sender(self, address: str, user: str | None, where: str = "MAIL FROM") -> None:
        """Raise ``MessageRefused`` when ``user`` may not send as ``address``."""
        policy = self.user(user)
        if policy is not None and not sender_allowed(address, policy.allowed_senders):
            raise MessageRefused(
                SmtpReply(553, "5.7.1", f"{where} <{address}> is not allowed for user {user}")
            )

    def check_header_senders(
        self, originators: Iterable[tuple[str, str]], user: str | None
    ) -> None:
        """Raise ``MessageRefused`` (553 5.7.1) for the first ``(header, address)``
        pair, from every mailbox of From: and Sender:, that ``user`` may not use."""
        for where, address in originators:
            self.check_sender(address, user, where=where)

    def check_identity_headers(self, used: list[str], client_ip: str, user: str | None) -> None:
        """Raise ``MessageRefused`` (550 5.7.1) naming the first identity header
        this client may not use."""
        if not used:
            return
        policy = self.user(user)
        if (policy is not None and policy.identity_headers) or in_networks(
            client_ip, self.identity_networks
        ):
            return
        raise MessageRefused(
            SmtpReply(550, "5.7.1", f"{used[0]} header is not allowed for this client")
        )
