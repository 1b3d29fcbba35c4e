"""One worker of ``smtp.workers`` (``python -m relay.workerproc``), started
by ``relay.supervisor``: its configuration and ``WorkerRole`` come pickled
on standard input from the parent (the same program, so nothing is
re-read that could differ), "ready" goes back on standard output, the log
to the standard error the parent shares. It serves as ``relay.app.serve``
does until SIGTERM or SIGINT, or until the parent is gone (its end of
standard input closes: even killed with SIGKILL), which stops it as
SIGTERM does."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sys
import threading

from relay.app import WorkerRole, serve
from relay.config import Config
from relay.errors import ConfigError, RelayError

EXIT_FAILURE = 1


def main() -> int:
    # The parent wrote it through a pipe only it and this process hold.
    config, role = pickle.load(sys.stdin.buffer)  # noqa: S301
    assert isinstance(config, Config)
    assert isinstance(role, WorkerRole)
    threading.Thread(target=_stop_when_orphaned, name="relay-parent", daemon=True).start()
    try:
        return asyncio.run(serve(config, os.environ, role))
    except ConfigError as exc:
        print(f"ses-relay: worker {role.index}: {'; '.join(exc.problems)}", file=sys.stderr)
    except RelayError as exc:
        print(f"ses-relay: worker {role.index}: {exc}", file=sys.stderr)
    return EXIT_FAILURE


def _stop_when_orphaned() -> None:
    """Wait for the end of standard input (the parent's pipe), then stop.

    Reads the descriptor itself: a daemon thread blocked in
    ``sys.stdin.buffer.read()`` holds the buffer's lock, and the interpreter
    aborts ("could not acquire lock ... at interpreter shutdown") when it
    finalizes standard input at the worker's normal exit."""
    while os.read(sys.stdin.fileno(), 4096):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
