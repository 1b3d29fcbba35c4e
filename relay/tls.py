"""TLS contexts: the relay's own (STARTTLS and ``smtp.tls_listen``) and its
calls to AWS. The standard library's ``ssl`` only, so that the commands
which check a configuration (``check-config``, ``reload``) start without
loading aiohttp."""

from __future__ import annotations

import ssl


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def client_tls_context(ca_bundle: str = "") -> ssl.SSLContext:
    """TLS for AWS calls: the system's CAs, or instead those in ``ca_bundle``
    (a PEM file); ``OSError`` or ``ssl.SSLError`` when it cannot be loaded."""
    return ssl.create_default_context(cafile=ca_bundle or None)
