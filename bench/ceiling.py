"""The ceiling: a do-nothing aiosmtpd server, run as its own process.

``python -m bench.ceiling`` listens on 127.0.0.1 (ephemeral port), accepts
every MAIL and RCPT, answers every DATA ``250 OK`` and drops the message. It
prints ``listening on 127.0.0.1:PORT`` when up and runs until SIGTERM or
SIGINT. It is the same SMTP stack the relay is built on, with nothing behind
it: the most the relay could take on this machine with this load.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiosmtpd.smtp import SMTP, Envelope, Session


class DropHandler:
    """aiosmtpd's handler hook: accept and forget."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


async def serve() -> None:
    loop = asyncio.get_running_loop()
    handler = DropHandler()
    # hostname= spares a getfqdn() per connection, as the relay does.
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="ceiling.bench"), "127.0.0.1", 0
    )
    print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__).parse_args()
    asyncio.run(serve())


if __name__ == "__main__":
    main()
