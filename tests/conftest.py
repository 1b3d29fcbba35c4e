"""Shared fixtures: a throwaway CA, the fake SES (per test), moto (per session),
and a temporary directory of their own for the processes the tests start."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme

from tests.fakeses import FakeSes
from tests.motoses import MotoSes


@pytest.fixture(scope="session", autouse=True)
def _children_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The daemons the tests start, and often kill, keep their temporary
    files (a relay with workers: its metrics directory) under pytest's
    temporary directory, not in the machine's ``/tmp``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        yield


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway certificate authority for every TLS server in the tests."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_pem_path(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA certificate as a PEM file, for clients (``ses.ca_bundle``)."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def fake_ses(tls_ca: trustme.CA, ca_pem_path: Path) -> AsyncIterator[FakeSes]:
    """A fresh fake SES over TLS on 127.0.0.1; see ``tests/fakeses.py``."""
    async with FakeSes(ca=tls_ca, ca_pem_path=ca_pem_path) as fake:
        yield fake
    assert not fake.handler_errors, f"the fake SES itself failed: {fake.handler_errors!r}"


@pytest.fixture(scope="session")
def moto_ses() -> Iterator[MotoSes]:
    """moto_server on 127.0.0.1 with signature checking on (``moto_ses.auth_key``).

    Shared by the whole session: tests use their own identities and find their
    messages by SES MessageId.
    """
    with MotoSes.running() as moto:
        moto.enable_auth()
        yield moto
