"""The relay's HTTP server on ``metrics.listen``: /metrics, /healthz, /readyz.

``/metrics`` is the Prometheus text format (built in a thread: it reads the
spool). ``/healthz`` answers 200 while the process runs. ``/readyz`` says
whether this instance accepts and keeps mail: 200 when every check passes
and 503 otherwise, with a JSON body naming each check, ``smtp`` (listening
and not stopping) and ``spool`` (room for a message). SES's state is in the
body too (``ses``: "ok", or the pause of all delivery) but never makes the
relay unready: during a pause, mail is accepted and queued, which is when a
load balancer must keep sending it here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from relay.config import split_host_port
from relay.errors import RelayError


@dataclass(frozen=True, slots=True)
class Readiness:
    """What ``/readyz`` answers."""

    checks: Mapping[str, str]
    """What readiness needs: name → "ok" or what is wrong."""
    ses: str
    """SES delivery: "ok" or what pauses it; shown, never a reason to be unready."""


Checks = Callable[[], Awaitable[Readiness]]
Exposition = Callable[[], Awaitable[bytes]]
"""The ``/metrics`` page (``RelayMetrics.exposition``, off the event loop)."""


class HttpServer:
    """Serves the metrics and health endpoints of one relay (of the parent,
    for all its workers, with ``smtp.workers > 1``)."""

    def __init__(self, exposition: Exposition, checks: Checks) -> None:
        self._exposition = exposition
        self._checks = checks
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.address: tuple[str, int] | None = None

    async def start(self, listen: str) -> tuple[str, int]:
        host, port = split_host_port(listen)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise RelayError(
                f"cannot listen on {listen} (metrics.listen): {exc.strerror or exc}"
            ) from None
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.address = (bound_host, bound_port)
        return self.address

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _metrics_page(self, request: web.Request) -> web.Response:
        body = await self._exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        readiness = await self._checks()
        checks = dict(readiness.checks)
        ready = all(result == "ok" for result in checks.values())
        return web.json_response(
            {"ready": ready, "checks": checks, "ses": readiness.ses}, status=200 if ready else 503
        )
