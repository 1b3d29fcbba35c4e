"""Facts about one SMTP session that policy decisions and log lines need."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def authenticated_user(session: Any) -> str | None:
    """The AUTH user name of an aiosmtpd session, or None."""
    if getattr(session, "authenticated", None) and isinstance(session.auth_data, str):
        return session.auth_data
    return None


def client_address(session: Any) -> str:
    """The client's IP address: the PROXY header's source if any, else the peer.

    IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``, seen on dual-stack
    listeners) are given in their IPv4 form.
    """
    cached = getattr(session, "relay_client", None)
    if isinstance(cached, str):
        return cached
    return find_client_address(session)


def find_client_address(session: Any) -> str:
    proxy = getattr(session, "proxy_data", None)
    source = getattr(proxy, "src_addr", None) if proxy else None
    if isinstance(source, Address):
        return _shown(source)
    # no PROXY header, or one without addresses (LOCAL, UNKNOWN, AF_UNIX)
    return peer_address(session)


def peer_address(session: Any) -> str:
    """The IP address at the other end of the TCP connection (a load balancer
    when the session came through one), in the form ``client_address`` uses."""
    peer = getattr(session, "peer", None)
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    return _shown_host(host) if isinstance(host, str) else str(host)


@functools.lru_cache(maxsize=1024)
def _shown_host(host: str) -> str:
    """``peer_address`` of a host string; cached, as every line of a session
    asks again (a bounded cache: many clients only evict each other)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return _shown(address)


def vouching_peer(session: Any) -> str | None:
    """The peer (a load balancer) that named another client address in a
    PROXY header, or None when the client is the peer itself."""
    peer = peer_address(session)
    return None if client_address(session) == peer else peer


def client_label(session: Any) -> str:
    """The client as log lines name it after ``client=``.

    ``203.0.113.9 via=10.0.0.5`` when the peer 10.0.0.5 vouched for
    203.0.113.9 in a PROXY header, so that both can be traced; the address
    alone otherwise.
    """
    client, via = client_address(session), vouching_peer(session)
    return client if via is None else f"{client} via={via}"


def session_fields(session: Any) -> dict[str, str | None]:
    """The client of a session as the JSON log names it (``relay.log.FIELDS``):
    ``client``, ``via`` when a load balancer vouched for it, and ``user``."""
    fields = {"client": client_address(session), "user": authenticated_user(session)}
    via = vouching_peer(session)
    if via is not None:
        fields["via"] = via
    return fields


def _shown(address: Address) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
