"""A fast fake SES for the benchmark, run as its own process.

``python -m bench.fakeses --dir DIR [--delay-ms N]`` makes a throwaway CA
with ``trustme``, writes it to ``DIR/ca.pem`` (for the relay's
``ses.ca_bundle``), and serves HTTPS on 127.0.0.1 (ephemeral port). Every
POST is answered, after ``--delay-ms``, with a valid SendRawEmailResponse
carrying a fresh MessageId (a GetSendQuota gets a generous quota). Nothing is
verified or decoded: recipients are counted from the number of
``Destinations.member.N`` parameter names in the form body (base64 and its
``%2B %2F %3D`` escapes never contain a ``.``, so the message cannot fake one).
An SES API v2 SendEmail (``POST /v2/email/outbound-emails``, raw content) is
answered with a fresh MessageId too, and counted with the SendRawEmails
(recipients from ``Destination.ToAddresses``; no Throttling).

``--max-rate R`` makes it SES's sending rate: a token bucket of R recipients
per second holding ``R * (1 + BURST_SLACK)`` (one second's worth, plus room
for the jitter between the relay's clock and this one); a SendRawEmail with
more recipients than the bucket holds is answered ``400 Throttling`` (SES's
"Maximum sending rate exceeded.") and counted in ``throttled``.
``--digests`` decodes each SendRawEmail's ``RawMessage.Data`` (a v2
SendEmail's ``Content.Raw.Data``) and keeps its SHA-256 (hex) in
``digests``, so the driver can compare what arrived with what was sent.

A second, plain-HTTP listener serves ``GET /stats`` as JSON, so reading the
counts costs no TLS connection on the listener being measured: requests,
SendRawEmail calls, recipients, bytes received, TCP connections accepted, TLS
handshakes completed and resumed (OpenSSL's server counters), Throttling
answers, and with ``--digests`` the messages' digests.

When both listeners are up it prints ``ses on 127.0.0.1:PORT`` and
``stats on 127.0.0.1:PORT``. It runs until killed (SIGTERM or SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import signal
import ssl
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

XMLNS = "http://ses.amazonaws.com/doc/2010-12-01/"
RECIPIENT_PARAM = b"Destinations.member."
V2_SEND_PATH = "/v2/email/outbound-emails"
BURST_SLACK = 0.2
"""With ``--max-rate``: the bucket holds this fraction of a second's worth
more than one second's, for the jitter between two clocks and a network."""
THROTTLING = (
    f'<ErrorResponse xmlns="{XMLNS}"><Error><Type>Sender</Type><Code>Throttling</Code>'
    "<Message>Maximum sending rate exceeded.</Message></Error>"
    "<RequestId>{request_id}</RequestId></ErrorResponse>"
)


@dataclass
class Stats:
    requests: int = 0
    send_raw_email: int = 0
    recipients: int = 0
    other_actions: int = 0
    bytes_received: int = 0
    connections: int = 0
    tls_handshakes: int = 0
    tls_resumed: int = 0
    throttled: int = 0
    digests: list[str] = field(default_factory=list)


class Bucket:
    """SES's sending rate: ``rate`` tokens a second, up to ``capacity``."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.at = time.monotonic()

    def take(self, tokens: int) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if tokens > self.tokens:
            return False
        self.tokens -= tokens
        return True


def raw_message_digest(body: bytes) -> str:
    """SHA-256 (hex) of the decoded ``RawMessage.Data`` of a form body."""
    form = urllib.parse.parse_qs(body.decode("ascii"), strict_parsing=True)
    return hashlib.sha256(base64.b64decode(form["RawMessage.Data"][0], validate=True)).hexdigest()


def v2_raw_message_digest(body: bytes) -> str:
    """SHA-256 (hex) of the decoded ``Content.Raw.Data`` of a v2 SendEmail body."""
    data = json.loads(body)["Content"]["Raw"]["Data"]
    return hashlib.sha256(base64.b64decode(data, validate=True)).hexdigest()


def send_raw_email_body(message_id: str, request_id: str) -> bytes:
    return (
        f'<SendRawEmailResponse xmlns="{XMLNS}"><SendRawEmailResult>'
        f"<MessageId>{message_id}</MessageId></SendRawEmailResult>"
        f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>"
        f"</SendRawEmailResponse>"
    ).encode()


def send_quota_body(request_id: str) -> bytes:
    return (
        f'<GetSendQuotaResponse xmlns="{XMLNS}"><GetSendQuotaResult>'
        "<SentLast24Hours>0.0</SentLast24Hours><Max24HourSend>10000000.0</Max24HourSend>"
        "<MaxSendRate>100000.0</MaxSendRate></GetSendQuotaResult>"
        f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>"
        "</GetSendQuotaResponse>"
    ).encode()


class FastFakeSes:
    """The SES listener's request handler and its counters."""

    def __init__(
        self, delay: float, tls: ssl.SSLContext, max_rate: float = 0.0, digests: bool = False
    ) -> None:
        self.delay = delay
        self.tls = tls
        self.bucket = Bucket(max_rate, max_rate * (1 + BURST_SLACK)) if max_rate > 0 else None
        self.digests = digests
        self.stats = Stats()
        self._serial = itertools.count(1)
        self._epoch = f"{int(time.time() * 1000):012x}"

    def new_ids(self) -> tuple[str, str]:
        serial = next(self._serial)
        request_id = str(uuid.uuid4())
        return f"0100{self._epoch}-{request_id}-{serial:06x}", request_id

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.content.read()  # no size limit: 10 MB requests are SES's
        self.stats.requests += 1
        self.stats.bytes_received += len(body)
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        message_id, request_id = self.new_ids()
        if request.path == V2_SEND_PATH:
            return self._send_email(body, message_id, request_id)
        if b"Action=SendRawEmail" in body:
            recipients = body.count(RECIPIENT_PARAM)
            if self.bucket is not None and not self.bucket.take(recipients):
                self.stats.throttled += 1
                return web.Response(
                    status=400,
                    body=THROTTLING.format(request_id=request_id).encode(),
                    content_type="text/xml",
                    headers={"x-amzn-RequestId": request_id},
                )
            self.stats.send_raw_email += 1
            self.stats.recipients += recipients
            if self.digests:
                self.stats.digests.append(raw_message_digest(body))
            answer = send_raw_email_body(message_id, request_id)
        else:
            self.stats.other_actions += 1
            answer = send_quota_body(request_id)
        return web.Response(
            body=answer, content_type="text/xml", headers={"x-amzn-RequestId": request_id}
        )

    def _send_email(self, body: bytes, message_id: str, request_id: str) -> web.StreamResponse:
        """SES API v2 SendEmail (raw content): counted with the SendRawEmails."""
        self.stats.send_raw_email += 1
        self.stats.recipients += len(json.loads(body)["Destination"]["ToAddresses"])
        if self.digests:
            self.stats.digests.append(v2_raw_message_digest(body))
        return web.json_response(
            {"MessageId": message_id}, headers={"x-amzn-RequestId": request_id}
        )

    def snapshot(self) -> dict[str, Any]:
        counters = self.tls.session_stats()
        self.stats.tls_handshakes = counters["accept_good"]
        self.stats.tls_resumed = counters["hits"]
        return asdict(self.stats)


def make_tls(directory: Path) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 from a new CA, whose
    certificate is written to ``directory/ca.pem``."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def serve(directory: Path, delay: float, max_rate: float, digests: bool) -> None:
    loop = asyncio.get_running_loop()
    fake = FastFakeSes(delay, make_tls(directory), max_rate, digests)
    ses_server = web.Server(fake.handle, access_log=None)

    def count_connection() -> RequestHandler:
        fake.stats.connections += 1
        return ses_server()

    async def stats(request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response(fake.snapshot())

    stats_server = web.Server(stats, access_log=None)
    ses = await loop.create_server(count_connection, "127.0.0.1", 0, ssl=fake.tls)
    plain = await loop.create_server(stats_server, "127.0.0.1", 0)
    print(f"ses on 127.0.0.1:{ses.sockets[0].getsockname()[1]}", flush=True)
    print(f"stats on 127.0.0.1:{plain.sockets[0].getsockname()[1]}", flush=True)

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    print(json.dumps(fake.snapshot() | {"digests": len(fake.stats.digests)}), flush=True)
    for server in (ses, plain):
        server.close()
    for web_server in (ses_server, stats_server):
        with contextlib.suppress(Exception):
            await web_server.shutdown(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fakeses", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True, help="where to write ca.pem")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="answer after this delay")
    parser.add_argument(
        "--max-rate", type=float, default=0.0, help="recipients per second before Throttling"
    )
    parser.add_argument(
        "--digests", action="store_true", help="keep the SHA-256 of every message received"
    )
    args = parser.parse_args()
    asyncio.run(serve(args.dir, args.delay_ms / 1000, args.max_rate, args.digests))


if __name__ == "__main__":
    main()
