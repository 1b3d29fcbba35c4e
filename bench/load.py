"""The load generator, run as its own process (asyncio + aiosmtplib).

``python -m bench.load --port PORT --out FILE [options]`` runs ``--sessions``
concurrent SMTP sessions against 127.0.0.1:PORT, each sending messages of
``--size`` bytes to one recipient, one after the other, either many per
connection (``--mode persistent``) or one per connection (``--mode
per-message``: connect, EHLO, MAIL, RCPT, DATA, QUIT).

Replies that arrive during the ``--warmup`` seconds are not measured; then
either ``--duration`` seconds or the first ``--count`` replies are. At the
end of the window no session starts another message; messages in flight
finish (they count in ``total_accepted`` but not in the rate). SIGTERM
ends the window at once, the same way (the driver's latency probe runs so,
beside ``smtp-source``). ``--pace S`` makes each session start a message
at most every S seconds, the sessions' first messages spread over the first
S seconds. ``--messages N`` starts no more than N messages in all (the run
ends when they are answered or the window ends). ``--recipients N`` gives
each message N recipients (``rcpt1@recipient.example`` ...). ``--digests``
adds the SHA-256 of every accepted message to the result.

Latency is taken around aiosmtplib's ``data()``: from the DATA command to
the final reply to the message. It includes the DATA/354 round trip (a
fraction of a millisecond on loopback) besides the transfer and the reply.

A persistent session the server ends between messages (a ``421`` at MAIL or
a closed connection after at least one message, e.g. the relay's
``smtp.max_messages_per_session``) reconnects and counts a ``reconnect``,
not an error. Every other failure counts as an error by kind (reply code and
exception), with the first message of each kind kept as an example; the
session then reconnects after a short pause.

The result is written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiosmtplib

SENDER = "bench@sender.example"
RECIPIENT = "rcpt@recipient.example"
ERROR_PAUSE = 0.05
"""Seconds a session waits after an error before it reconnects."""
QUIT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Options:
    host: str
    port: int
    sessions: int
    mode: str
    size: int
    warmup: float
    duration: float
    count: int | None
    timeout: float
    max_seconds: float
    pace: float = 0.0
    messages: int | None = None
    recipients: int = 1
    digests: bool = False


class SessionEnded(Exception):
    """The server ended a persistent session between messages."""


class Messages:
    """Messages of about ``size`` bytes (CRLF lines, no line starts with a dot),
    each with its own Message-ID."""

    def __init__(self, size: int) -> None:
        self._serial = 0
        self._date = formatdate()
        line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
        filler_size = max(0, size - len(self._head(0)))
        self._body = (line * (filler_size // len(line) + 1))[:filler_size]
        if self._body:  # ends with CRLF; no bare CR where the cut fell
            self._body = self._body[:-2].rstrip(b"\r") + b"\r\n"

    def _head(self, serial: int) -> bytes:
        return (
            f"From: Bench <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
            f"Subject: bench message {serial:08d}\r\nDate: {self._date}\r\n"
            f"Message-ID: <{serial:08d}.{os.getpid()}@loadgen.bench>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        ).encode()

    def next(self) -> bytes:
        self._serial += 1
        return self._head(self._serial) + self._body


@dataclass
class Recorder:
    """What the sessions saw; decides when they stop."""

    measure_from: float
    ends: float
    count: int | None
    messages: int | None = None
    """Messages to start in all (None: no bound)."""
    keep_digests: bool = False
    latencies: list[float] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    started: int = 0
    total_accepted: int = 0
    queued_replies: int = 0
    reconnects: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        """End the window now."""
        self.ends = min(self.ends, time.perf_counter())

    def finished(self) -> bool:
        spent = self.messages is not None and self.started >= self.messages
        return spent or time.perf_counter() >= self.ends

    def start_message(self) -> bool:
        """Whether a session may start one more message (it counts it)."""
        if self.finished():
            return False
        self.started += 1
        return True

    def accepted(self, sent: float, replied: float, reply: str, message: bytes) -> None:
        self.total_accepted += 1
        if self.keep_digests:
            self.digests.append(hashlib.sha256(message).hexdigest())
        if "queued" in reply:
            self.queued_replies += 1
        if self.measure_from <= replied < self.ends:
            self.latencies.append(replied - sent)
            if self.count is not None and len(self.latencies) >= self.count:
                self.ends = replied

    def error(self, error: BaseException) -> None:
        if isinstance(error, aiosmtplib.SMTPResponseException):
            kind = f"{error.code} {type(error).__name__}"
            text = f"{error.code} {error.message}"
        else:
            kind = type(error).__name__
            text = str(error)
        self.errors[kind] += 1
        self.examples.setdefault(kind, text[:200])


def client(options: Options) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname=options.host,
        port=options.port,
        local_hostname="loadgen.bench",  # no getfqdn() per connection
        timeout=options.timeout,
        use_tls=False,
        start_tls=False,
    )


def recipients(count: int) -> list[str]:
    """The envelope recipients of each message."""
    if count == 1:
        return [RECIPIENT]
    return [f"rcpt{i}@recipient.example" for i in range(1, count + 1)]


async def send_one(
    smtp: aiosmtplib.SMTP, message: bytes, to: list[str], recorder: Recorder
) -> None:
    await smtp.mail(SENDER)
    for recipient in to:
        await smtp.rcpt(recipient)
    sent = time.perf_counter()
    response = await smtp.data(message)
    recorder.accepted(sent, time.perf_counter(), response.message, message)


async def paced(options: Options, started: float) -> None:
    """With ``--pace``, wait out the rest of this message's interval."""
    if options.pace > 0:
        await asyncio.sleep(max(0.0, started + options.pace - time.perf_counter()))


async def staggered(options: Options, index: int) -> None:
    """With ``--pace``, session ``index`` starts its first message a fraction
    of the interval after the first session, so the paced load is even."""
    if options.pace > 0:
        await asyncio.sleep(index * options.pace / options.sessions)


async def persistent_session(
    options: Options, messages: Messages, recorder: Recorder, index: int
) -> None:
    to = recipients(options.recipients)
    await staggered(options, index)
    while not recorder.finished():
        smtp = client(options)
        sent = 0
        try:
            await smtp.connect()
            while recorder.start_message():
                started = time.perf_counter()
                try:
                    await send_one(smtp, messages.next(), to, recorder)
                except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPServerDisconnected) as error:
                    ended = sent > 0 and (
                        isinstance(error, aiosmtplib.SMTPServerDisconnected) or error.code == 421
                    )
                    if ended:
                        raise SessionEnded from error
                    raise
                sent += 1
                await paced(options, started)
            await _quit(smtp)
        except SessionEnded:
            recorder.reconnects += 1
        except (aiosmtplib.SMTPException, OSError) as error:
            recorder.error(error)
            await asyncio.sleep(ERROR_PAUSE)
        finally:
            smtp.close()


async def per_message_session(
    options: Options, messages: Messages, recorder: Recorder, index: int
) -> None:
    to = recipients(options.recipients)
    await staggered(options, index)
    while recorder.start_message():
        smtp = client(options)
        started = time.perf_counter()
        try:
            await smtp.connect()
            await send_one(smtp, messages.next(), to, recorder)
            await _quit(smtp)
            await paced(options, started)
        except (aiosmtplib.SMTPException, OSError) as error:
            recorder.error(error)
            await asyncio.sleep(ERROR_PAUSE)
        finally:
            smtp.close()


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    await smtp.quit(timeout=QUIT_TIMEOUT)


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


async def run(options: Options) -> dict[str, Any]:
    messages = Messages(options.size)
    start = time.perf_counter()
    measure_from = start + options.warmup
    window = options.duration if options.count is None else options.max_seconds
    recorder = Recorder(
        measure_from=measure_from,
        ends=measure_from + window,
        count=options.count,
        messages=options.messages,
        keep_digests=options.digests,
    )
    session = persistent_session if options.mode == "persistent" else per_message_session
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, recorder.stop)
    print(f"sending to {options.host}:{options.port}", flush=True)
    cpu_before = time.process_time()
    tasks = [
        asyncio.create_task(session(options, messages, recorder, index))
        for index in range(options.sessions)
    ]
    bound = options.warmup + window + 2 * options.timeout + QUIT_TIMEOUT + 5
    try:
        async with asyncio.timeout(bound):
            await asyncio.gather(*tasks)
    except TimeoutError:
        recorder.errors["sessions did not finish in time"] += 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    measured = min(recorder.ends, start + wall) - measure_from
    latencies = sorted(recorder.latencies)
    return {
        "generator": "aiosmtplib",
        "mode": options.mode,
        "sessions": options.sessions,
        "message_size": len(messages.next()),
        "recipients": options.recipients,
        "warmup_s": options.warmup,
        "window_s": round(measured, 3),
        "accepted": len(latencies),
        "msgs_per_s": round(len(latencies) / measured, 1) if measured > 0 else None,
        "latency_ms": {
            "p50": _ms(percentile(latencies, 50)),
            "p99": _ms(percentile(latencies, 99)),
            "max": _ms(latencies[-1] if latencies else None),
            "mean": _ms(sum(latencies) / len(latencies) if latencies else None),
        },
        "total_accepted": recorder.total_accepted,
        "queued_replies": recorder.queued_replies,
        "reconnects": recorder.reconnects,
        "errors": dict(recorder.errors),
        "error_examples": recorder.examples,
        "wall_s": round(wall, 3),
        "loadgen_cpu_util": round(cpu / wall, 3) if wall > 0 else None,
        **({"digests": recorder.digests} if options.digests else {}),
    }


def parse_args(argv: list[str] | None = None) -> tuple[Options, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="write the JSON result here")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--mode", choices=("persistent", "per-message"), default="persistent")
    parser.add_argument("--size", type=int, default=10 * 1024, help="message size in bytes")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not measured")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--count", type=int, help="measure this many replies instead")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds per SMTP command")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="with --count: give up measuring after this long",
    )
    parser.add_argument(
        "--pace", type=float, default=0.0, help="each session starts a message at most every S s"
    )
    parser.add_argument("--messages", type=int, help="start at most this many messages in all")
    parser.add_argument("--recipients", type=int, default=1, help="recipients per message")
    parser.add_argument(
        "--digests", action="store_true", help="report the SHA-256 of every accepted message"
    )
    args = parser.parse_args(argv)
    options = Options(
        host=args.host,
        port=args.port,
        sessions=args.sessions,
        mode=args.mode,
        size=args.size,
        warmup=args.warmup,
        duration=args.duration,
        count=args.count,
        timeout=args.timeout,
        max_seconds=args.max_seconds,
        pace=args.pace,
        messages=args.messages,
        recipients=args.recipients,
        digests=args.digests,
    )
    return options, args.out


def main() -> None:
    options, out = parse_args()
    result = asyncio.run(run(options))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
