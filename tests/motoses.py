"""moto in server mode as an independent SES for tests.

``MotoSes.running()`` starts ``moto_server -H 127.0.0.1 -p PORT`` as a
subprocess on a free loopback port, waits (bounded) until it answers, and
terminates it on exit. Helpers talk to it the way an operator would:
botocore clients (test-only) for identities and IAM, and moto's own
``/moto-api`` for what it received and for switching on signature checking.

Facts relied on (see DESIGN.md, "Facts about moto as an independent SES"):
``GET /moto-api/data.json`` lists ``ses.RawMessage`` entries
``{id, source, destinations, raw_data}``; ``POST /moto-api/reset-auth`` with the
body ``0`` makes every later call need a valid signature from a known IAM key.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config

STARTUP_TIMEOUT = 30.0
"""Seconds moto may take to answer after it is started (it takes 2-4 s)."""

SES_ALL_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "ses:*", "Resource": "*"}],
    }
)

# Any key works while moto's signature checking is off.
BOOTSTRAP_KEY = ("AKIAMOTOBOOTSTRAP000", "bootstrap-secret")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class KeyPair:
    access_key_id: str
    secret_access_key: str


class MotoSes:
    """A running ``moto_server``; use ``MotoSes.running()``."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.region = "us-east-1"
        self.auth_key: KeyPair | None = None
        """The IAM key pair that signs calls once ``enable_auth`` ran."""
        self._session = botocore.session.Session()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle

    @classmethod
    @contextlib.contextmanager
    def running(cls, *, attempts: int = 3) -> Iterator[MotoSes]:
        executable = shutil.which("moto_server")
        if executable is None:
            raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
        with tempfile.TemporaryDirectory(prefix="motoses-") as tmp:
            moto = cls._start(executable, Path(tmp), attempts)
            try:
                yield moto
            finally:
                moto.stop()

    @classmethod
    def _start(cls, executable: str, tmp: Path, attempts: int) -> MotoSes:
        last_log = ""
        for attempt in range(attempts):
            port = free_port()
            log_path = tmp / f"moto-{attempt}.log"
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [executable, "-H", "127.0.0.1", "-p", str(port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            moto = cls(process, port, log_path)
            if moto._wait_ready(STARTUP_TIMEOUT):
                return moto
            moto.stop()
            last_log = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"moto_server did not start after {attempts} attempts:\n{last_log}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1.0) as answer:
                    if answer.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    # -- botocore clients (test-only)

    def client(self, service: str, key: KeyPair | None = None) -> Any:
        """A botocore client for ``service`` signed with ``key`` (default: the
        auth key once enabled, else the bootstrap key)."""
        key = key or self.auth_key or KeyPair(*BOOTSTRAP_KEY)
        return self._session.create_client(
            service,
            region_name=self.region,
            endpoint_url=self.url,
            aws_access_key_id=key.access_key_id,
            aws_secret_access_key=key.secret_access_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=10),
        )

    def verify_email_identity(self, address: str) -> None:
        self.client("ses").verify_email_identity(EmailAddress=address)

    def verify_domain_identity(self, domain: str) -> None:
        self.client("ses").verify_domain_identity(Domain=domain)

    # -- moto's own API

    def _moto_api(self, path: str, data: bytes | None = None) -> bytes:
        request = urllib.request.Request(
            f"{self.url}/moto-api/{path}",
            data=data,
            method="GET" if data is None else "POST",
            # Not form-encoded: moto reads the raw body of reset-auth.
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return bytes(answer.read())

    def raw_messages(self) -> list[dict[str, Any]]:
        """What moto received: ``{id, source, destinations, raw_data}`` entries."""
        data = json.loads(self._moto_api("data.json"))
        return list(data.get("ses", {}).get("RawMessage", []))

    def raw_message(self, message_id: str) -> dict[str, Any]:
        matches = [m for m in self.raw_messages() if m["id"] == message_id]
        if len(matches) != 1:
            raise LookupError(f"moto holds {len(matches)} raw messages with id {message_id!r}")
        return matches[0]

    def enable_auth(self, user_name: str = "ses-relay-test") -> KeyPair:
        """Create an IAM user allowed ``ses:*`` with an access key, then switch
        on moto's signature checking. Returns (and remembers) the key pair."""
        if self.auth_key is not None:
            return self.auth_key
        iam = self.client("iam")
        iam.create_user(UserName=user_name)
        policy = iam.create_policy(PolicyName=f"{user_name}-ses-all", PolicyDocument=SES_ALL_POLICY)
        iam.attach_user_policy(UserName=user_name, PolicyArn=policy["Policy"]["Arn"])
        created = iam.create_access_key(UserName=user_name)["AccessKey"]
        key = KeyPair(created["AccessKeyId"], created["SecretAccessKey"])
        answer = json.loads(self._moto_api("reset-auth", b"0"))
        if answer.get("status") != "ok":
            raise RuntimeError(f"moto refused reset-auth: {answer!r}")
        self.auth_key = key
        return key
