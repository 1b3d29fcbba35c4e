"""Fakes of the AWS credential endpoints, over real HTTP on 127.0.0.1.

* ``FakeSts``: the STS Query API (``AssumeRole``, signed, checked with
  botocore's ``SigV4Auth`` as the oracle through ``tests.fakeses.verify_sigv4``;
  ``AssumeRoleWithWebIdentity``, unsigned, checked for its token).
* ``FakeContainer``: the ECS / EKS Pod Identity credentials endpoint, which
  demands its ``Authorization`` header.
* ``FakeImds``: EC2 instance metadata, IMDSv2 (token demanded, IMDSv1 only if
  ``allow_v1``), with a token endpoint that can hang.

Each fake hands out fresh credentials on every request (``hits`` counts them),
expiring ``lifetime`` after the fake's ``clock``; ``fail_with`` scripts error
statuses for the next requests; ``hold`` (an ``asyncio.Event``) keeps requests
waiting until it is set, and ``arrived`` is set whenever a request comes in.
Nothing waits for longer than the fake lives: ``close()`` releases every
held or hanging request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Self
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import CIMultiDict

from tests.fakeses import KnownKey, verify_sigv4

STS_XMLNS = "https://sts.amazonaws.com/doc/2011-06-15/"


class FakeClock:
    """An injectable clock: call it for the time, ``advance`` to move it."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2025, 1, 15, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_serial = itertools.count(1)


def issue(prefix: str) -> tuple[str, str, str]:
    """A fresh (access key id, secret, token) triple, recognisably fake."""
    n = next(_serial)
    return (
        f"ASIA{prefix.upper()}{n:08d}",
        f"{prefix}-secret-{n:04d}-wJalrXUtnFEMI/K7MDENG",
        f"{prefix}-session-token-{n:04d}-FwoGZXIvYXdzEBY",
    )


class _Fake:
    """The server plumbing shared by the fakes."""

    name = "fake"

    def __init__(self, clock: FakeClock, lifetime: timedelta = timedelta(hours=1)) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.hits = 0
        self.requests: list[web.Request] = []
        self.bodies: list[bytes] = []
        self.fail_with: deque[int] = deque()
        self.hold: asyncio.Event | None = None
        self.arrived = asyncio.Event()
        self.closing = asyncio.Event()
        self.issued: list[tuple[str, str, str]] = []
        self.handler_errors: list[str] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.closing.set()
        if self.hold is not None:
            self.hold.set()
        assert self._runner is not None
        await self._runner.cleanup()

    async def _arrive(self, request: web.Request) -> web.Response | None:
        """Record the request, wait while held; an error answer if one is scripted."""
        self.requests.append(request)
        self.bodies.append(await request.read())
        self.arrived.set()
        if self.hold is not None:
            await asyncio.wait_for(self.hold.wait(), 10)
        if self.fail_with:
            status = self.fail_with.popleft()
            return web.Response(status=status, text=f"scripted failure {status}")
        return None

    def _new_credentials(self) -> tuple[str, str, str, str]:
        self.hits += 1
        key, secret, token = issue(self.name)
        self.issued.append((key, secret, token))
        return key, secret, token, iso(self.clock() + self.lifetime)


# --------------------------------------------------------------------------- STS


class FakeSts(_Fake):
    """STS Query API. ``keys`` are the access keys it accepts for AssumeRole
    (credentials it issued are added); ``web_identity_token`` the token it
    accepts for AssumeRoleWithWebIdentity."""

    name = "sts"

    def __init__(self, clock: FakeClock, *, region: str = "eu-west-1", **kwargs: timedelta) -> None:
        super().__init__(clock, **kwargs)
        self.region = region
        self.keys: dict[str, KnownKey] = {}
        self.web_identity_token: str | None = None
        self.params: list[dict[str, str]] = []
        self.signed_by: list[str | None] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/", self.handle)

    def error(self, status: int, code: str, message: str) -> web.Response:
        body = (
            f'<ErrorResponse xmlns="{STS_XMLNS}"><Error><Type>Sender</Type>'
            f"<Code>{code}</Code><Message>{message}</Message></Error>"
            "<RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>"
        )
        return web.Response(status=status, body=body.encode(), content_type="text/xml")

    async def handle(self, request: web.Request) -> web.Response:
        scripted = await self._arrive(request)
        body = self.bodies[-1]
        if (
            request.headers.get("Content-Type")
            != "application/x-www-form-urlencoded; charset=utf-8"
        ):
            return self.error(400, "InvalidParameterValue", "bad content type")
        try:
            pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            return self.error(400, "MalformedQueryString", "bad form")
        params = dict(pairs)
        if len(params) != len(pairs):
            return self.error(400, "MalformedQueryString", "duplicate parameter")
        self.params.append(params)
        if params.get("Version") != "2011-06-15":
            return self.error(400, "InvalidAction", "bad version")
        action = params.get("Action")
        if action == "AssumeRole":
            refused = self._check_signature(request, body)
        elif action == "AssumeRoleWithWebIdentity":
            refused = self._check_web_identity(request, params)
        else:
            return self.error(400, "InvalidAction", f"unknown action {action}")
        if refused is not None:
            return refused
        if scripted is not None:
            return scripted
        for name in ("RoleArn", "RoleSessionName"):
            if not params.get(name):
                return self.error(400, "ValidationError", f"missing {name}")
        key, secret, token, expiration = self._new_credentials()
        self.keys[key] = KnownKey(secret, token)
        body_xml = (
            f'<{action}Response xmlns="{STS_XMLNS}"><{action}Result>'
            "<AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/r/s</Arn>"
            "<AssumedRoleId>AROA3XFRBF535PLBIFPI4:s</AssumedRoleId></AssumedRoleUser>"
            f"<Credentials><AccessKeyId>{key}</AccessKeyId>"
            f"<SecretAccessKey>{secret}</SecretAccessKey>"
            f"<SessionToken>{token}</SessionToken>"
            f"<Expiration>{expiration}</Expiration></Credentials>"
            f"</{action}Result><ResponseMetadata><RequestId>r-1</RequestId></ResponseMetadata>"
            f"</{action}Response>"
        )
        return web.Response(body=body_xml.encode(), content_type="text/xml")

    def _check_signature(self, request: web.Request, body: bytes) -> web.Response | None:
        failure = verify_sigv4(
            method=request.method,
            url=f"http://{request.host}{request.path_qs}",
            headers=CIMultiDict(request.headers),
            body=body,
            keys=self.keys,
            region=self.region,
            service="sts",
            now=self.clock(),
        )
        if failure is not None:
            self.signed_by.append(None)
            return self.error(failure.status, failure.code, failure.message)
        credential = request.headers["Authorization"].split("Credential=", 1)[1]
        self.signed_by.append(credential.split("/", 1)[0])
        return None

    def _check_web_identity(
        self, request: web.Request, params: dict[str, str]
    ) -> web.Response | None:
        if "Authorization" in request.headers:
            return self.error(400, "InvalidParameterCombination", "web identity calls are unsigned")
        if params.get("WebIdentityToken") != self.web_identity_token:
            return self.error(400, "InvalidIdentityToken", "The ID token provided is not valid")
        return None


# --------------------------------------------------------------------------- container


class FakeContainer(_Fake):
    """The container credentials endpoint (``GET`` any path). When
    ``authorization`` is set, requests must carry exactly that header."""

    name = "ctr"

    def __init__(self, clock: FakeClock, **kwargs: timedelta) -> None:
        super().__init__(clock, **kwargs)
        self.authorization: str | None = None
        self.seen_authorization: list[str | None] = []
        self.answer: Callable[[], web.Response] | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        scripted = await self._arrive(request)
        self.seen_authorization.append(request.headers.get("Authorization"))
        if self.authorization is not None and (
            request.headers.get("Authorization") != self.authorization
        ):
            return web.json_response({"code": "AccessDenied", "message": "bad token"}, status=401)
        if scripted is not None:
            return scripted
        if self.answer is not None:
            return self.answer()
        key, secret, token, expiration = self._new_credentials()
        return web.json_response(
            {
                "AccessKeyId": key,
                "SecretAccessKey": secret,
                "Token": token,
                "Expiration": expiration,
                "RoleArn": "arn:aws:iam::123456789012:role/task",
            }
        )


# --------------------------------------------------------------------------- IMDS


class FakeImds(_Fake):
    """EC2 instance metadata. ``role`` None answers 404 (no role attached).
    ``hang_token`` keeps the token PUT unanswered until the fake closes, as
    a hop limit of 1 does to a container's requests."""

    name = "imds"

    def __init__(self, clock: FakeClock, **kwargs: timedelta) -> None:
        super().__init__(clock, **kwargs)
        self.role: str | None = "relay-instance-role"
        self.allow_v1 = False
        self.hang_token = False
        self.tokens: list[str] = []
        self.token_requests = 0
        self.unauthorized = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_put("/latest/api/token", self.token)
        app.router.add_get("/latest/meta-data/iam/security-credentials/", self.role_name)
        app.router.add_get("/latest/meta-data/iam/security-credentials/{role}", self.credentials)

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        if self.hang_token:
            await asyncio.wait_for(self.closing.wait(), 10)
            return web.Response(status=503)
        ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return web.Response(status=400)
        token = f"imds-session-{len(self.tokens) + 1}-AQAEAKg"
        self.tokens.append(token)
        return web.Response(text=token)

    def _authorized(self, request: web.Request) -> bool:
        token = request.headers.get("X-aws-ec2-metadata-token")
        ok = token in self.tokens if token is not None else self.allow_v1
        if not ok:
            self.unauthorized += 1
        return ok

    async def role_name(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401)
        if self.role is None:
            return web.Response(status=404)
        return web.Response(text=self.role)

    async def credentials(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401)
        scripted = await self._arrive(request)
        if scripted is not None:
            return scripted
        if request.match_info["role"] != self.role:
            return web.Response(status=404)
        key, secret, token, expiration = self._new_credentials()
        body = {
            "Code": "Success",
            "LastUpdated": iso(self.clock()),
            "Type": "AWS-HMAC",
            "AccessKeyId": key,
            "SecretAccessKey": secret,
            "Token": token,
            "Expiration": expiration,
        }
        return web.Response(text=json.dumps(body), content_type="text/plain")
