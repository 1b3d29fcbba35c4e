"""AWS credentials: providers and the SDKs' default chain.

(Stub: the provider interface is fixed here so the client can use it.)
"""

from __future__ import annotations

from typing import Protocol

from relay.ses.sigv4 import Credentials


class CredentialProvider(Protocol):
    """Hands out current credentials; cached, refreshed before they expire."""

    async def get(self) -> Credentials:
        """Current credentials. Cheap when cached: no I/O on the hot path."""
        ...

    def invalidate(self) -> None:
        """Forget cached credentials: the next ``get`` fetches fresh ones
        (after SES said the signature, token or key was bad)."""
        ...


class StaticProvider:
    """Fixed credentials (environment variables, tests)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    async def get(self) -> Credentials:
        return self._credentials

    def invalidate(self) -> None:
        """Static credentials cannot be refreshed."""
