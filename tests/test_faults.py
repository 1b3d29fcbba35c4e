"""Faults, with the real daemon as a subprocess (``tests/daemon.py``): SES
down or refusing connections, ``kill -9`` at each point of a message's life,
a throttling storm, a batch refused after ``250``, a full disk (a real 1 MiB
tmpfs in a private mount namespace), garbled spool entries, SIGTERM, and a
second daemon on the same spool.

Every test counts what the SES model (``SesModel``, answering every request
the fake SES gets) accepted, per recipient, and compares it with what the
SMTP clients were told: every message that got ``250`` is delivered exactly
once per recipient (at least once where a ``kill -9`` fell in the lost-reply
window), and nothing that did not get ``250`` is delivered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import aiosmtplib
import pytest
from aiohttp import web

from relay.spool import Batch, Entry, Spool
from tests import diskfull
from tests.daemon import (
    Daemon,
    daemon_config,
    daemon_env,
    queue_command,
    running_daemon,
    second_on_the_same_spool,
    tmpfs_wrapper,
)
from tests.fakeses import ACTION, FakeSes, SesErrorReply

SENDER = "app@example.com"
BOUNCE_SENDER = "MAILER-DAEMON@example.com"  # the sender's domain (bounce_sender unset)
WAIT = 15.0
"""Seconds any wait for the daemon or the fake SES may take."""


# --------------------------------------------------------------------------- the SES model


@dataclass
class Sent:
    """A SendRawEmail the model accepted: SES would deliver it."""

    source: str
    destinations: list[str]
    raw: bytes


@dataclass
class SesModel:
    """Answers every request of a ``FakeSes`` (``install``), and counts.

    ``down``: every SendRawEmail gets 503 ServiceUnavailable; ``failing``, a
    predicate on the destinations, chooses the calls that do. ``hold``: a
    predicate on the destinations; a request it selects is held until
    ``release()``, then answered 503 (never delivered: it stands for a call
    whose answer was lost), or handled as if it had just arrived with
    ``release(deliver=True)``. ``quota_exhausted``: Throttling "Daily message
    quota exceeded". ``reject``: recipients whose call gets a
    permanent MessageRejected. ``throttle``: most recipients per second (a
    sliding one-second window) before SES answers Throttling "Maximum
    sending rate exceeded".
    """

    down: bool = False
    failing: Callable[[list[str]], bool] | None = None
    hold: Callable[[list[str]], bool] | None = None
    reject: frozenset[str] = frozenset()
    throttle: float | None = None
    quota_exhausted: bool = False
    sent: list[Sent] = field(default_factory=list)
    arrivals: list[list[str]] = field(default_factory=list)
    """Destinations of every SendRawEmail that arrived, in order."""
    refused: int = 0
    throttled: int = 0
    _gate: asyncio.Event = field(default_factory=asyncio.Event)
    _deliver_held: bool = False
    _window: list[tuple[float, int]] = field(default_factory=list)

    def install(self, fake: FakeSes) -> SesModel:
        fake.script(*[self] * 100_000)  # one behaviour per request: this one, always
        return self

    def hold_all(self) -> None:
        self.hold = lambda _destinations: True

    def release(self, *, deliver: bool = False) -> None:
        """Answer every held request (503, or as usual with ``deliver``) and
        hold nothing more."""
        self.hold = None
        self._deliver_held = deliver
        self._gate.set()

    @property
    def delivered(self) -> Counter[str]:
        """Recipient → SendRawEmail calls accepted for it."""
        return Counter(d for s in self.sent for d in s.destinations)

    def arrived(self, recipient: str) -> int:
        return sum(recipient in a for a in self.arrivals)

    def bounces(self) -> list[Sent]:
        return [s for s in self.sent if s.source == BOUNCE_SENDER]

    async def respond(self, request: web.Request, fake: FakeSes) -> web.StreamResponse:
        if request[ACTION] != "SendRawEmail":
            return fake.success_response(request)
        params = dict(parse_qsl((await request.read()).decode("ascii")))
        destinations = [
            value
            for _, value in sorted(
                (int(k.rsplit(".", 1)[1]), v)
                for k, v in params.items()
                if k.startswith("Destinations.member.")
            )
        ]
        self.arrivals.append(destinations)
        if self.hold is not None and self.hold(destinations):
            await self._gate.wait()  # cancelled if the fake closes first
            if not self._deliver_held:
                return await self._error(
                    request, fake, 503, "ServiceUnavailable", "held", "Receiver"
                )
        if self.quota_exhausted:
            return await self._error(
                request, fake, 400, "Throttling", "Daily message quota exceeded."
            )
        if self.down or (self.failing is not None and self.failing(destinations)):
            return await self._error(request, fake, 503, "ServiceUnavailable", "down", "Receiver")
        if self.throttle is not None:
            now = time.monotonic()
            self._window = [(t, n) for t, n in self._window if now - t < 1.0]
            if sum(n for _, n in self._window) + len(destinations) > self.throttle:
                self.throttled += 1
                return await self._error(
                    request, fake, 400, "Throttling", "Maximum sending rate exceeded."
                )
            self._window.append((now, len(destinations)))
        rejected = self.reject.intersection(destinations)
        if rejected:
            return await self._error(
                request,
                fake,
                400,
                "MessageRejected",
                f"Email address is not verified: {min(rejected)}",
            )
        raw = base64.b64decode(params.get("RawMessage.Data", ""))
        self.sent.append(Sent(params.get("Source", ""), destinations, raw))
        return fake.success_response(request)

    async def _error(
        self,
        request: web.Request,
        fake: FakeSes,
        status: int,
        code: str,
        message: str,
        kind: str = "Sender",
    ) -> web.StreamResponse:
        self.refused += 1
        return await SesErrorReply(status, code, message, kind).respond(request, fake)


@pytest.fixture
def model(fake_ses: FakeSes) -> SesModel:
    return SesModel().install(fake_ses)


# --------------------------------------------------------------------------- SMTP clients


@dataclass
class Reply:
    code: int
    text: str
    stage: str
    """The command that got this reply: MAIL, RCPT or DATA."""

    @property
    def queued(self) -> bool:
        """``250 ... queued as ID``: accepted, to be delivered in the background."""
        return self.code == 250 and " queued as " in self.text

    @property
    def sent(self) -> bool:
        """``250 ... ID sent as MESSAGE-ID``: SES took it while the client waited."""
        return self.code == 250 and " sent as " in self.text

    @property
    def queue_id(self) -> str:
        words = self.text.split()
        return words[words.index("as") + 1] if "queued" in words else words[2]


def message(subject: str, *, to: str = "undisclosed-recipients:;", size: int = 0) -> bytes:
    body = "Hello.\r\n" + ("x" * 76 + "\r\n") * (size // 78)
    return (
        f"From: App <{SENDER}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{subject}@example.com>\r\n"
        f"\r\n{body}"
    ).encode()


def recipients(tag: str, count: int = 1) -> list[str]:
    return [f"{tag}-{n}@example.net" for n in range(count)]


async def send(daemon: Daemon, to: list[str], raw: bytes, *, sender: str = SENDER) -> Reply:
    """One transaction; the first refusal (MAIL, RCPT or DATA) or DATA's reply."""
    assert daemon.smtp is not None
    host, port = daemon.smtp
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=WAIT) as smtp:
        stage = "MAIL"
        try:
            await smtp.mail(sender)
            stage = "RCPT"
            for address in to:
                await smtp.rcpt(address)
            stage = "DATA"
            response = await smtp.data(raw)
        except aiosmtplib.SMTPResponseException as exc:
            return Reply(exc.code, exc.message, stage)
    return Reply(response.code, response.message, "DATA")


class RawClient:
    """SMTP by hand, for what aiosmtplib will not do (stop in the middle of DATA)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, daemon: Daemon) -> AsyncIterator[RawClient]:
        """A connection that got its 220 banner; closed on the way out."""
        assert daemon.smtp is not None
        reader, writer = await asyncio.open_connection(*daemon.smtp)
        client = cls(reader, writer)
        try:
            code, _ = await client.reply()
            assert code == 220
            yield client
        finally:
            writer.transport.abort()

    async def reply(self, within: float = WAIT) -> tuple[int, str]:
        """The next reply; (0, "") when the connection is closed first."""
        lines = []
        async with asyncio.timeout(within):
            while True:
                line = await self.reader.readline()
                if not line:
                    return 0, ""
                lines.append(line.decode().rstrip("\r\n"))
                if line[3:4] != b"-":
                    break
        return int(lines[-1][:3]), "\n".join(x[4:] for x in lines)

    async def command(self, line: str) -> tuple[int, str]:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def start_data(self, to: list[str]) -> None:
        assert (await self.command("EHLO client.test"))[0] == 250
        assert (await self.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
        for address in to:
            assert (await self.command(f"RCPT TO:<{address}>"))[0] == 250
        assert (await self.command("DATA"))[0] == 354

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


# --------------------------------------------------------------------------- waiting, spool


async def wait_until(predicate: Callable[[], bool], what: str, within: float = WAIT) -> None:
    """Poll ``predicate`` every 10 ms for at most ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {within}s waiting for {what}") from None


def queued(spool: Path, area: str = "queue") -> list[str]:
    """Ids of the committed entries of an area; for ``queue``, with those
    committed in the journal while they are tried inline (``relay.journal``)."""
    directory = spool / area
    if not directory.exists():
        return []
    ids = [p.name[:-5] for p in directory.iterdir() if p.name.endswith(".json")]
    if area == "queue":
        ids += [entry.id for entry, _ in Spool(spool).inline()]
    return sorted(ids)


def entry(spool: Path, entry_id: str, area: str = "queue") -> Entry:
    return Entry.from_json((spool / area / f"{entry_id}.json").read_bytes())


def check_spool(spool: Path) -> list[str]:
    """Problems with the spool as a crash or a full disk left it: every
    envelope readable with its message, nothing left in tmp/."""
    problems = []
    for area in ("queue", "dead"):
        names = {p.name for p in (spool / area).iterdir()}
        for name in sorted(names):
            stem, _, suffix = name.rpartition(".")
            if suffix == "json":
                try:
                    Entry.from_json((spool / area / name).read_bytes())
                except ValueError as exc:
                    problems.append(f"{area}/{name}: {exc}")
                if f"{stem}.eml" not in names:
                    problems.append(f"{area}/{name} without its message")
    leftovers = list((spool / "tmp").iterdir())
    if leftovers:
        problems.append(f"tmp/ holds {sorted(p.name for p in leftovers)}")
    return problems


async def spool_drained(spool: Path, daemon: Daemon, within: float = WAIT) -> None:
    try:
        await wait_until(lambda: not queued(spool), "the queue to empty", within)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the daemon's log:\n{daemon.log}") from None


def expect_once(model: SesModel, addresses: Iterable[str]) -> None:
    wanted = list(addresses)
    counts = model.delivered
    wrong = {a: counts[a] for a in wanted if counts[a] != 1}
    assert not wrong, f"recipients not delivered exactly once: {wrong}"


def expect_never(model: SesModel, addresses: Iterable[str]) -> None:
    counts = model.delivered
    delivered = {a: counts[a] for a in addresses if counts[a]}
    assert not delivered, f"delivered although never acknowledged: {delivered}"


def setup(tmp_path: Path, fake: FakeSes, **sections: dict[str, object]) -> tuple[Path, Path]:
    """A daemon configuration and its spool directory."""
    spool = tmp_path / "spool"
    config = daemon_config(tmp_path / "relay.toml", fake, spool=spool, **sections)
    return config, spool


# --------------------------------------------------------------------------- 10. SES down


async def test_ses_503_queues_then_delivers_each_recipient_once(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    model.down = True
    config, spool = setup(tmp_path, fake_ses, smtp={"max_recipients": 200})
    sizes = {"one": 1, "few": 3, "two-batches": 60, "three-batches": 120}
    async with running_daemon(config, daemon_env(fake_ses)) as daemon:
        replies = await asyncio.gather(
            *(send(daemon, recipients(tag, n), message(tag)) for tag, n in sizes.items())
        )
        for reply in replies:
            assert (reply.code, reply.text.split(":")[0]) == (250, "2.0.0 Ok"), reply
            assert " queued as " in reply.text, reply
        assert len(queued(spool)) == len(sizes)
        await wait_until(lambda: model.refused >= 20, "the relay to keep retrying")
        model.down = False
        await spool_drained(spool, daemon)
    expect_once(model, (a for tag, n in sizes.items() for a in recipients(tag, n)))
    assert sum(len(s.destinations) for s in model.sent) == sum(sizes.values())
    assert model.bounces() == []


async def test_an_ses_outage_pauses_the_whole_queue_instead_of_hammering(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    """Past 10 failed calls in a row the whole queue waits on one schedule
    (retry_min doubling): a few calls per pause, not one per message. (That
    retries falling due inside the pause make no call is shown on a fake
    clock in ``tests/test_delivery.py``.)"""
    model.down = True
    config, spool = setup(
        tmp_path,
        fake_ses,
        delivery={"inline_timeout": 0.3, "retry_min": 0.5, "retry_max": 1.0, "concurrency": 4},
    )
    tags = [f"outage{n}" for n in range(20)]
    async with running_daemon(config, daemon_env(fake_ses)) as daemon:
        replies = await asyncio.gather(
            *(send(daemon, recipients(tag), message(tag)) for tag in tags)
        )
        assert all(r.queued for r in replies), replies
        line = await daemon.wait_for_log(r"SES unreachable \(10 calls in a row failed")
        assert line.endswith("pausing all delivery for 0.5s"), line
        start, mark = model.refused, len(daemon.lines)
        # After the pause, the calls let through probe SES; they fail, and the
        # next pause is twice as long: a few calls in between (at most the
        # workers' concurrency, each with its quick retries), not one per
        # message due meanwhile.
        line = await daemon.wait_for_log(r"pausing all delivery for 1s", start=mark)
        assert model.refused - start <= 4 * 4, model.refused - start  # concurrency per pause
        # `queue retry` ends the pause; the outage is looked for afresh.
        mark = len(daemon.lines)
        code, _, err = await asyncio.to_thread(queue_command, config, "retry", "--all")
        assert (code, err) == (0, ""), err
        line = await daemon.wait_for_log(r"SES unreachable \(10 calls in a row failed", start=mark)
        assert line.endswith("pausing all delivery for 0.5s"), line
        model.down = False
        await spool_drained(spool, daemon)
    expect_once(model, (a for tag in tags for a in recipients(tag)))


class TcpGate:
    """A loopback port that forwards to the fake SES while open and refuses
    connections (ECONNREFUSED) while closed: SES unreachable, then back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(
            self._forward, "127.0.0.1", self.port, reuse_address=True
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._pipes):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._pipes |= {writer, up_writer}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._pipes -= {writer, up_writer}


async def test_ses_refusing_connections_queues_then_delivers_each_recipient_once(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    gate = TcpGate(fake_ses.port)
    spool = tmp_path / "spool"
    config = daemon_config(
        tmp_path / "relay.toml",
        fake_ses,
        spool=spool,
        ses={"endpoint": f"https://127.0.0.1:{gate.port}"},
        smtp={"max_recipients": 200},
    )
    sizes = {"a": 1, "b": 2, "c": 75}
    try:
        async with running_daemon(config, daemon_env(fake_ses)) as daemon:
            replies = await asyncio.gather(
                *(send(daemon, recipients(tag, n), message(tag)) for tag, n in sizes.items())
            )
            assert all(r.code == 250 and " queued as " in r.text for r in replies), replies
            await wait_until(
                lambda: daemon.count_log(r"status=deferred \(ConnectionError: cannot connect") >= 6,
                "retries against a closed port",
            )
            assert fake_ses.requests == []
            await gate.open()
            await spool_drained(spool, daemon)
            # And once more: down while the relay runs, back again.
            await gate.close()
            reply = await send(daemon, recipients("d", 3), message("d"))
            assert reply.queued, reply
            await gate.open()
            await spool_drained(spool, daemon)
    finally:
        await gate.close()
    expect_once(model, [*recipients("a"), *recipients("b", 2), *recipients("c", 75)])
    expect_once(model, recipients("d", 3))


# --------------------------------------------------------------------------- 11. kill -9


async def test_kill_mid_data_never_delivers_that_message(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    config, spool = setup(tmp_path, fake_ses)
    env = daemon_env(fake_ses)
    async with running_daemon(config, env) as daemon, RawClient.connect(daemon) as client:
        await client.start_data(recipients("cut"))
        raw = message("cut", size=200_000)
        await client.write(raw[: len(raw) // 2])
        await asyncio.sleep(0.2)  # let it read what was sent
        assert await daemon.kill_and_wait() == -9
        assert await client.reply() == (0, "")
    assert queued(spool) == []
    async with running_daemon(config, env) as daemon:
        reply = await send(daemon, recipients("canary"), message("canary"))
        assert reply.sent, reply
        assert check_spool(spool) == []
    expect_never(model, recipients("cut"))
    expect_once(model, recipients("canary"))


async def test_kill_mid_data_leaves_only_a_partial_file_that_start_removes(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    """DATA goes to the spool as it arrives (issue 15 point 5): a kill -9 in
    the middle leaves the part received in tmp/, never in queue/, and the
    next start removes it."""
    config, spool = setup(tmp_path, fake_ses)
    env = daemon_env(fake_ses)
    raw = message("partial", size=400_000)
    async with running_daemon(config, env) as daemon, RawClient.connect(daemon) as client:
        await client.start_data(recipients("partial"))
        await client.write(raw[: len(raw) // 2])
        await wait_until(
            lambda: sum(p.stat().st_size for p in (spool / "tmp").iterdir()) >= len(raw) // 4,
            "the message to reach its file in tmp/",
        )
        assert await daemon.kill_and_wait() == -9
    assert queued(spool) == []
    [partial] = list((spool / "tmp").iterdir())
    assert partial.read_bytes().startswith(b"From: App <app@example.com>\r\n")
    async with running_daemon(config, env) as daemon:
        assert check_spool(spool) == []  # tmp/ emptied at start
        reply = await send(daemon, recipients("after"), message("after"))
        assert reply.sent, reply
    expect_never(model, recipients("partial"))
    expect_once(model, recipients("after"))


async def test_kill_after_spooling_before_the_reply_still_delivers(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    """The lost-reply window: the client never saw 250, but the message was
    committed; it is delivered after the restart (a duplicate is allowed by
    the design, a loss is not)."""
    model.hold_all()
    config, spool = setup(tmp_path, fake_ses, delivery={"inline_timeout": 10.0})
    env = daemon_env(fake_ses)
    async with running_daemon(config, env) as daemon, RawClient.connect(daemon) as client:
        await client.start_data(recipients("window"))
        await client.write(message("window") + b".\r\n")
        await wait_until(lambda: model.arrived("window-0@example.net") == 1, "the inline attempt")
        [entry_id] = queued(spool)
        assert await daemon.kill_and_wait() == -9
        assert await client.reply() == (0, "")  # no reply: the connection dropped
    model.release()
    async with running_daemon(config, env) as daemon:
        await spool_drained(spool, daemon)
        assert check_spool(spool) == []
    expect_once(model, recipients("window"))
    assert entry_id not in queued(spool, "dead")


async def test_kill_between_batches_resends_no_accepted_batch(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    everyone = recipients("big", 120)
    first = everyone[0]
    model.hold = lambda destinations: first not in destinations  # batch 1 goes, 2 and 3 hang
    config, spool = setup(
        tmp_path, fake_ses, smtp={"max_recipients": 200}, delivery={"inline_timeout": 0.5}
    )
    env = daemon_env(fake_ses)
    async with running_daemon(config, env) as daemon:
        reply = await send(daemon, everyone, message("big"))
        assert reply.queued, reply
        states = [b.state for b in entry(spool, reply.queue_id).batches]
        assert states == ["sent", "pending", "pending"]
        # The background attempt of batches 2 and 3 is at SES: kill it there.
        await wait_until(lambda: model.arrived(everyone[-1]) >= 2, "the background attempt")
        assert await daemon.kill_and_wait() == -9
    model.release()
    async with running_daemon(config, env) as daemon:
        await spool_drained(spool, daemon)
    expect_once(model, everyone)
    assert sum(first in s.destinations for s in model.sent) == 1


async def test_kill_during_background_ses_call_delivers_after_restart(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    model.hold_all()
    config, spool = setup(tmp_path, fake_ses, delivery={"inline_timeout": 0.3})
    env = daemon_env(fake_ses)
    async with running_daemon(config, env) as daemon:
        reply = await send(daemon, recipients("bg", 2), message("bg"))
        assert reply.queued, reply
        await wait_until(lambda: model.arrived("bg-0@example.net") >= 2, "a background attempt")
        assert await daemon.kill_and_wait() == -9
    model.release()
    async with running_daemon(config, env) as daemon:
        await spool_drained(spool, daemon)
        assert check_spool(spool) == []
    expect_once(model, recipients("bg", 2))


async def test_client_gone_during_the_inline_attempt_is_still_delivered(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    """The client's side of the lost-reply window: it hangs up while the
    relay is trying SES inline. The message is committed, so the running
    relay delivers it (no restart needed)."""
    model.hold_all()
    config, spool = setup(tmp_path, fake_ses, delivery={"inline_timeout": 5.0})
    async with running_daemon(config, daemon_env(fake_ses)) as daemon:
        async with RawClient.connect(daemon) as client:
            await client.start_data(recipients("hangup"))
            await client.write(message("hangup") + b".\r\n")
            await wait_until(
                lambda: model.arrived("hangup-0@example.net") == 1, "the inline attempt"
            )
        await asyncio.sleep(0.1)
        model.release()
        await spool_drained(spool, daemon)
        reply = await send(daemon, recipients("after"), message("after"))
        assert reply.code == 250, reply
    expect_once(model, recipients("hangup"))


# --------------------------------------------------------------------------- 12. throttling


async def test_throttling_storm_converges_without_loss_duplicates_or_spin(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    limit = 40.0
    model.throttle = limit
    config, spool = setup(
        tmp_path,
        fake_ses,
        ses={"max_send_rate": 4 * limit},
        delivery={"inline_timeout": 0.5, "concurrency": 8},
    )
    tags = [f"storm{n}" for n in range(16)]
    async with running_daemon(config, daemon_env(fake_ses)) as daemon:
        cpu_before = daemon.cpu_seconds()
        started = time.monotonic()
        replies = await asyncio.gather(
            *(send(daemon, recipients(tag, 10), message(tag)) for tag in tags)
        )
        assert all(r.code == 250 for r in replies), replies
        await spool_drained(spool, daemon, within=30)
        storm = time.monotonic() - started
        cpu_storm = daemon.cpu_seconds() - cpu_before
        idle_from = daemon.cpu_seconds()
        await asyncio.sleep(1.0)
        cpu_idle = daemon.cpu_seconds() - idle_from
    expect_once(model, (a for tag in tags for a in recipients(tag, 10)))
    assert model.throttled > 0, "the storm never happened"
    # Converging, not hammering: throttled calls stay a fraction of the load.
    assert model.throttled <= 2 * len(model.sent), (model.throttled, len(model.sent))
    assert storm >= len(tags) * 10 / limit - 1.5
    assert cpu_storm < 0.5 * storm, (cpu_storm, storm)
    assert cpu_idle < 0.1, cpu_idle


async def test_daily_quota_pauses_delivery_until_queue_retry(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    """ "Daily message quota exceeded": the mail stays queued and the relay
    stops calling SES; waiting for the pause is not a failed attempt;
    ``queue retry`` (SIGUSR1) ends the pause. (That no retry falling due
    inside the pause makes a call, and that the relay sleeps until the
    pause's end with nothing to do before it, is shown on a fake clock in
    ``tests/test_delivery.py``.)"""
    model.quota_exhausted = True
    config, spool = setup(tmp_path, fake_ses, delivery={"inline_timeout": 5.0, "retry_min": 0.2})
    async with running_daemon(config, daemon_env(fake_ses)) as daemon:
        first = await send(daemon, recipients("quota1"), message("quota1"))
        assert first.queued, first
        await daemon.wait_for_log(
            "pausing all delivery for 900s: Throttling: Daily message quota exceeded."
        )
        started = time.monotonic()
        second = await send(daemon, recipients("quota2"), message("quota2"))
        assert second.queued, second
        assert time.monotonic() - started < 2.5, "the inline attempt waited for the pause"
        assert len(model.arrivals) == 1
        assert sorted(queued(spool)) == sorted([first.queue_id, second.queue_id])
        tried = entry(spool, first.queue_id)
        assert tried.attempts == 1
        assert [line.split(" ", 1)[1] for line in tried.history] == [
            "Throttling: Daily message quota exceeded."
        ]
        waiting = entry(spool, second.queue_id)
        assert (waiting.attempts, waiting.history) == (0, ())
        assert "no answer in time" not in daemon.log

        model.quota_exhausted = False
        code, _, err = await asyncio.to_thread(queue_command, config, "retry", "--all")
        assert (code, err) == (0, ""), err
        await daemon.wait_for_log("delivery pause ended by 'ses-relay queue retry'")
        await spool_drained(spool, daemon)
    expect_once(model, [*recipients("quota1"), *recipients("quota2")])


# --------------------------------------------------------------------------- 13. partial failure


async def test_batch_refused_after_250_bounces_once_and_the_rest_is_delivered(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    everyone = recipients("part", 120)
    batch1, batch2, batch3 = everyone[:50], everyone[50:100], everyone[100:]
    model.hold_all()
    config, spool = setup(
        tmp_path, fake_ses, smtp={"max_recipients": 200}, delivery={"inline_timeout": 0.3}
    )
    async with running_daemon(config, daemon_env(fake_ses)) as daemon:
        reply = await send(daemon, everyone, message("part"))
        assert reply.queued, reply
        model.reject = frozenset(batch2)
        model.release()
        await wait_until(lambda: queued(spool, "dead") == [reply.queue_id], "the dead letter")
        await spool_drained(spool, daemon)
        dead = entry(spool, reply.queue_id, "dead")
        assert [b.state for b in dead.batches] == ["sent", "failed", "sent"]
        assert check_spool(spool) == []
    expect_once(model, [*batch1, *batch3])
    expect_never(model, batch2)
    [bounce] = model.bounces()
    assert bounce.destinations == [SENDER]
    report = email.message_from_bytes(bounce.raw, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = bounce.raw.decode("ascii")
    named = {a for a in everyone if f"rfc822; {a}\r\n" in status}
    assert named == set(batch2)


# --------------------------------------------------------------------------- 14. disk full


def _tmpfs_or_skip() -> None:
    reason = diskfull.unavailable()
    if reason is not None:
        pytest.skip(reason)


@contextlib.asynccontextmanager
async def daemon_on_tmpfs(
    tmp_path: Path, fake: FakeSes, size: str = "1m", **sections: dict[str, object]
) -> AsyncIterator[tuple[Daemon, Path]]:
    """A daemon whose spool is on a fresh tmpfs of ``size`` (visible to us
    through ``/proc/PID/root`` only); yields it and the spool as we see it."""
    _tmpfs_or_skip()
    mount = tmp_path / "mnt"
    mount.mkdir()
    config = daemon_config(tmp_path / "relay.toml", fake, spool=mount / "spool", **sections)
    async with running_daemon(
        config, daemon_env(fake), wrapper=tmpfs_wrapper(mount, size)
    ) as daemon:
        spool = daemon.host_path(mount / "spool")
        assert os.statvfs(spool).f_blocks * os.statvfs(spool).f_frsize <= 1 << 20
        yield daemon, spool


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; the filler's path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        chunk = b"\0" * 65536
        while chunk:
            try:
                os.write(fd, chunk)
            except OSError:
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    return filler


async def test_full_disk_gives_452_never_250_or_5xx_and_recovers(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    model.down = True
    async with daemon_on_tmpfs(tmp_path, fake_ses, smtp={"max_message_size": 100_000}) as (
        daemon,
        spool,
    ):
        accepted, refused = [], []
        for n in range(60):
            tag = f"fill{n}"
            reply = await send(daemon, recipients(tag), message(tag, size=60_000))
            assert reply.code in (250, 452), reply
            if reply.code == 452:
                assert reply.text.startswith("4.3.1 "), reply
                refused.append((tag, reply.stage))
                if len(refused) >= 3:
                    break
            else:
                accepted.append(tag)
        assert refused, "the 1 MiB spool never filled up"
        assert 5 <= len(accepted) < 20
        assert check_spool(spool) == []
        assert len(queued(spool)) == len(accepted)
        # Space comes back as SES takes the queue.
        model.down = False
        await spool_drained(spool, daemon)
        reply = await send(daemon, recipients("later"), message("later", size=60_000))
        assert reply.code == 250, reply
        assert check_spool(spool) == []
    expect_once(model, (a for tag in accepted for a in recipients(tag)))
    expect_never(model, (a for tag, _ in refused for a in recipients(tag)))
    expect_once(model, recipients("later"))


async def test_enospc_while_spooling_data_gives_452_and_service_resumes(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    """The disk fills between MAIL (which saw room) and the end of DATA: the
    write fails for real with ENOSPC."""
    async with daemon_on_tmpfs(tmp_path, fake_ses, smtp={"max_message_size": 100_000}) as (
        daemon,
        spool,
    ):
        async with RawClient.connect(daemon) as client:
            await client.start_data(recipients("enospc"))
            filler = await asyncio.to_thread(fill, spool)
            await client.write(message("enospc", size=50_000) + b".\r\n")
            code, text = await client.reply()
            assert (code, text[:6]) == (452, "4.3.1 "), (code, text)
            assert (await client.command("QUIT"))[0] == 221
        assert check_spool(spool) == []
        assert queued(spool) == []
        filler.unlink()
        reply = await send(daemon, recipients("resumed"), message("resumed"))
        assert reply.sent, reply
    expect_never(model, recipients("enospc"))
    expect_once(model, recipients("resumed"))


async def test_full_disk_never_resends_a_batch_ses_accepted(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    """SES accepts batch 1 while the disk is full, so that state cannot be
    written; batches 2 and 3 keep failing for a while. The running relay
    must not send batch 1 again."""
    everyone = recipients("nospace", 120)
    model.hold_all()
    async with daemon_on_tmpfs(
        tmp_path,
        fake_ses,
        smtp={"max_recipients": 200, "max_message_size": 100_000},
        delivery={"inline_timeout": 0.3},
    ) as (daemon, spool):
        reply = await send(daemon, everyone, message("nospace"))
        assert reply.queued, reply
        filler = await asyncio.to_thread(fill, spool)
        model.failing = lambda destinations: everyone[0] not in destinations
        model.release()
        await wait_until(lambda: model.delivered[everyone[0]] >= 1, "batch 1 accepted")
        await wait_until(lambda: model.arrived(everyone[-1]) >= 6, "more attempts at batch 3")
        assert daemon.count_log("cannot record delivery state") >= 1
        model.failing = None
        filler.unlink()
        await spool_drained(spool, daemon)
    expect_once(model, everyone)


async def test_below_the_free_space_floor_mail_gets_452_before_any_data(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    # 1.5 x 800 000 bytes is more than the whole 1 MiB file system holds.
    async with daemon_on_tmpfs(tmp_path, fake_ses, smtp={"max_message_size": 800_000}) as (
        daemon,
        spool,
    ):
        async with RawClient.connect(daemon) as client:
            assert (await client.command("EHLO client.test"))[0] == 250
            code, text = await client.command(f"MAIL FROM:<{SENDER}>")
            assert (code, text[:6]) == (452, "4.3.1 "), (code, text)
            assert (await client.command("QUIT"))[0] == 221
        assert queued(spool) == []
    assert model.arrivals == []


# --------------------------------------------------------------------------- 15. garbled entries


def _garbled_spool(spool: Path) -> dict[str, str]:
    """A spool with good entries and damaged ones, as a crash or a disk
    error might leave it. Returns id → what is wrong with it."""
    store = Spool(spool)
    store.open(lock=False)
    now = time.time()

    def put(entry_id: str, tag: str) -> None:
        rcpt = recipients(tag)
        store.put(
            Entry(
                id=entry_id,
                received=now,
                client="127.0.0.1",
                sender=SENDER,
                source=SENDER,
                recipients=tuple(rcpt),
                batches=(Batch(recipients=tuple(rcpt)),),
            ),
            message(tag),
        )

    put("GOOD000001", "good1")
    put("GOOD000002", "good2")
    put("TRUNC00001", "trunc")
    put("JUNK000001", "junk")
    put("NOEML00001", "noeml")
    queue = spool / "queue"
    text = (queue / "TRUNC00001.json").read_bytes()
    (queue / "TRUNC00001.json").write_bytes(text[: len(text) // 2])
    (queue / "JUNK000001.json").write_bytes(os.urandom(300))
    (queue / "NOEML00001.eml").unlink()
    (queue / "ORPHAN0001.eml").write_bytes(message("orphan"))  # never committed
    return {"TRUNC00001": "truncated", "JUNK000001": "garbage", "NOEML00001": "no message"}


async def test_garbled_entries_are_quarantined_and_the_rest_delivered(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    config, spool = setup(tmp_path, fake_ses)
    damaged = await asyncio.to_thread(_garbled_spool, spool)
    async with running_daemon(config, daemon_env(fake_ses)) as daemon:
        await spool_drained(spool, daemon)
        for entry_id in damaged:
            line = await daemon.wait_for_log(f"{entry_id}: quarantined")
            assert "ERROR" in line
        reply = await send(daemon, recipients("new"), message("new"))
        assert reply.code == 250, reply
        assert daemon.returncode is None
    expect_once(model, [*recipients("good1"), *recipients("good2"), *recipients("new")])
    expect_never(model, [*recipients("trunc"), *recipients("junk"), *recipients("noeml")])
    expect_never(model, recipients("orphan"))
    kept = sorted(p.name for p in (spool / "quarantine").iterdir())
    assert {name.split(".")[0] for name in kept} == set(damaged)
    assert not (spool / "queue" / "ORPHAN0001.eml").exists()


async def test_an_entry_garbled_while_queued_is_quarantined_by_the_running_daemon(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    model.down = True
    config, spool = setup(
        tmp_path, fake_ses, delivery={"inline_timeout": 0.3, "retry_min": 1.0, "retry_max": 1.0}
    )
    async with running_daemon(config, daemon_env(fake_ses)) as daemon:
        replies = await asyncio.gather(
            *(send(daemon, recipients(tag), message(tag)) for tag in ("rot", "lost", "kept"))
        )
        assert all(r.queued for r in replies), replies
        garbled, lost, _ = replies
        # The next attempts are a second away: damage two entries meanwhile.
        (spool / "queue" / f"{garbled.queue_id}.json").write_bytes(b'{"version": 1, "id": ')
        (spool / "queue" / f"{lost.queue_id}.eml").unlink()
        model.down = False
        for queue_id in (garbled.queue_id, lost.queue_id):
            line = await daemon.wait_for_log(f"{queue_id}: quarantined")
            assert "ERROR" in line
        await spool_drained(spool, daemon)
        assert daemon.returncode is None
    expect_once(model, recipients("kept"))
    expect_never(model, [*recipients("rot"), *recipients("lost")])
    names = {p.name.split(".")[0] for p in (spool / "quarantine").iterdir()}
    assert names == {garbled.queue_id, lost.queue_id}


# --------------------------------------------------------------------------- SIGTERM, lock


async def new_connection_banner(daemon: Daemon) -> bytes:
    assert daemon.smtp is not None
    reader, writer = await asyncio.open_connection(*daemon.smtp)
    try:
        return await asyncio.wait_for(reader.readline(), WAIT)
    finally:
        writer.transport.abort()


async def test_sigterm_lets_data_in_flight_finish_and_keeps_the_queue(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    model.hold_all()
    config, spool = setup(tmp_path, fake_ses, delivery={"inline_timeout": 1.0})
    env = daemon_env(fake_ses)
    async with running_daemon(config, env) as daemon:
        async with RawClient.connect(daemon) as client:
            await client.start_data(recipients("term"))
            await client.write(message("term") + b".\r\n")
            await wait_until(lambda: model.arrived("term-0@example.net") == 1, "the inline attempt")
            daemon.terminate()
            await daemon.wait_for_log("stopping")
            # New connections are told at once while the transaction finishes.
            assert (await new_connection_banner(daemon)).startswith(b"421 4.3.2 ")
            reply = Reply(*await client.reply(), "DATA")
            assert reply.queued, reply
            # The transaction is over: the session is told, unasked.
            assert await client.reply() == (421, "4.3.2 Service shutting down")
            assert await client.reply() == (0, "")
        assert await daemon.wait_exit(within=10) == 0
    assert len(queued(spool)) == 1
    model.release()
    async with running_daemon(config, env) as daemon:
        await spool_drained(spool, daemon)
    expect_once(model, recipients("term"))


async def test_sigterm_lets_an_open_transaction_finish_its_message(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    config, spool = setup(tmp_path, fake_ses)
    async with running_daemon(config, daemon_env(fake_ses)) as daemon:
        async with RawClient.connect(daemon) as client, RawClient.connect(daemon) as idle:
            assert (await idle.command("EHLO idle.test"))[0] == 250
            assert (await client.command("EHLO client.test"))[0] == 250
            assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
            daemon.terminate()
            # The idle session is told at once; the one inside a transaction is not.
            assert await idle.reply(within=3) == (421, "4.3.2 Service shutting down")
            for address in recipients("open"):
                assert (await client.command(f"RCPT TO:<{address}>"))[0] == 250
            assert (await client.command("DATA"))[0] == 354
            await client.write(message("open") + b".\r\n")
            code, text = await client.reply()
            assert code == 250, text
            assert " sent as " in text, text
            assert await client.reply() == (421, "4.3.2 Service shutting down")
        assert await daemon.wait_exit(within=10) == 0
    assert queued(spool) == []
    expect_once(model, recipients("open"))


async def test_sigterm_lets_a_background_ses_call_finish_and_records_it(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    model.down = True
    config, spool = setup(tmp_path, fake_ses, delivery={"inline_timeout": 0.3})
    async with running_daemon(config, daemon_env(fake_ses)) as daemon:
        reply = await send(daemon, recipients("flight", 2), message("flight"))
        assert reply.queued, reply
        model.hold_all()
        model.down = False
        calls = len(model.arrivals)
        await wait_until(lambda: len(model.arrivals) > calls, "a background attempt")
        daemon.terminate()
        await daemon.wait_for_log("stopping")
        await asyncio.sleep(0.2)  # the daemon waits for SES, not the other way round
        assert daemon.returncode is None
        model.release(deliver=True)
        assert await daemon.wait_exit(within=10) == 0
    assert queued(spool) == []  # SES's answer was recorded before the exit
    expect_once(model, recipients("flight", 2))


async def test_sigterm_with_an_idle_client_exits_promptly(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    config, _ = setup(tmp_path, fake_ses)
    env = daemon_env(fake_ses)
    async with running_daemon(config, env) as daemon, RawClient.connect(daemon) as client:
        assert (await client.command("EHLO client.test"))[0] == 250
        daemon.terminate()
        assert await client.reply(within=3) == (421, "4.3.2 Service shutting down")
        assert await daemon.wait_exit(within=3) == 0


async def test_a_second_sigterm_stops_at_once_and_keeps_the_queue(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    model.down = True
    config, spool = setup(tmp_path, fake_ses, delivery={"inline_timeout": 0.3})
    env = daemon_env(fake_ses)
    async with running_daemon(config, env) as daemon:
        reply = await send(daemon, recipients("again"), message("again"))
        assert reply.queued, reply
        model.hold_all()
        model.down = False
        calls = len(model.arrivals)
        await wait_until(lambda: len(model.arrivals) > calls, "a background attempt")
        async with RawClient.connect(daemon) as client:
            assert (await client.command("EHLO client.test"))[0] == 250
            assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
            daemon.terminate()
            await daemon.wait_for_log("stopping")
            await asyncio.sleep(1.1)  # the first SIGTERM waits for both (and one 1 s later counts)
            assert daemon.returncode is None
            daemon.terminate()
            assert await client.reply(within=3) == (421, "4.3.2 Service shutting down")
            assert await daemon.wait_exit(within=3) == 0
        assert "stopping now" in daemon.log
        assert "Traceback" not in daemon.log
    assert queued(spool) == [reply.queue_id]
    model.release()
    async with running_daemon(config, env) as daemon:
        await spool_drained(spool, daemon)
    expect_once(model, recipients("again"))


async def test_a_signal_repeated_at_once_is_not_a_second_one(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    """One ^C through a wrapper arrives twice: the grace is kept."""
    config, _ = setup(tmp_path, fake_ses)
    async with running_daemon(config, daemon_env(fake_ses)) as daemon:
        async with RawClient.connect(daemon) as client:
            assert (await client.command("EHLO client.test"))[0] == 250
            assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
            daemon.signal(signal.SIGINT)
            daemon.signal(signal.SIGINT)
            await daemon.wait_for_log("stopping")
            for address in recipients("twice"):
                assert (await client.command(f"RCPT TO:<{address}>"))[0] == 250
            assert (await client.command("DATA"))[0] == 354
            await client.write(message("twice") + b".\r\n")
            assert (await client.reply())[0] == 250
            assert await client.reply() == (421, "4.3.2 Service shutting down")
        assert await daemon.wait_exit(within=10) == 0
        assert "stopping now" not in daemon.log
    expect_once(model, recipients("twice"))


async def test_sighup_is_not_fatal(tmp_path: Path, fake_ses: FakeSes, model: SesModel) -> None:
    config, _ = setup(tmp_path, fake_ses)
    async with running_daemon(config, daemon_env(fake_ses)) as daemon:
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for_log("reloaded .*: new sessions get the same settings")
        reply = await send(daemon, recipients("hup"), message("hup"))
        assert reply.code == 250, reply
        assert daemon.returncode is None
    expect_once(model, recipients("hup"))


async def test_a_second_daemon_on_the_same_spool_exits_with_a_clear_message(
    tmp_path: Path, fake_ses: FakeSes, model: SesModel
) -> None:
    config, _ = setup(tmp_path, fake_ses)
    env = daemon_env(fake_ses)
    async with running_daemon(config, env) as first:
        second = await second_on_the_same_spool(first, config, env)
        assert "Traceback" not in second.log
        assert "Unclosed" not in second.log
        reply = await send(first, recipients("still"), message("still"))
        assert reply.code == 250, reply
    expect_once(model, recipients("still"))
