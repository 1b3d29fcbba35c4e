"""The container image's HEALTHCHECK: ``GET /healthz`` on the relay's metrics
address, read from its configuration the way ``ses-relay serve -c FILE`` reads
it (the file named as the only argument, then the ``SES_RELAY_*``
environment), so that the check follows ``metrics.listen`` wherever it is set.

A wildcard address (``0.0.0.0``, ``::``) is checked on the loopback of the same
family. Proxies from the environment (``http_proxy``) are ignored: the check
must reach this container, not a proxy. Exits 0 on a 200, else 1 with one line
saying why (Docker keeps it in ``docker inspect``).
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Sequence

from relay.config import load_config, split_host_port
from relay.errors import ConfigError

TIMEOUT = 4.0
"""Seconds; below the HEALTHCHECK's --timeout."""
LOOPBACK_OF = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 (what to connect to, no bind)


def healthz_url(listen: str) -> str:
    """The URL of /healthz for a ``metrics.listen`` value."""
    host, port = split_host_port(listen)
    host = LOOPBACK_OF.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz"


def main(argv: Sequence[str]) -> int:
    try:
        config = load_config(argv[0] if argv else None, os.environ)
    except ConfigError as exc:
        print(f"unhealthy: invalid configuration: {'; '.join(exc.problems)}", file=sys.stderr)
        return 1
    url = healthz_url(config.metrics.listen)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT) as response:
            status = response.status
    except OSError as exc:  # URLError and HTTPError (a status other than 2xx) included
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"healthy: {url}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
