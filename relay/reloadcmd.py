"""``ses-relay reload``: have the running daemon reload, and say what it did.

``relay.__main__`` checks the configuration first, as ``check-config``
does: an invalid file is reported on the spot and nothing is sent. Then the
daemon holding the lock of the configuration's spool gets SIGHUP (once it
handles it: before, SIGHUP would kill it) and the command waits, up to
``RELOAD_WAIT`` seconds, for that reload's record (``relay.reloadrecord``):
applied (naming the keys that wait for a restart) or refused (naming the
problems, as the daemon saw them: its environment and its user may differ
from the command's).

The ``format_*`` functions are pure; ``run_reload`` does the I/O.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from relay import reloadrecord
from relay.config import Config
from relay.errors import ConfigError, RelayError
from relay.queuecmd import HANDLER_WAIT, proc_status, spool_origin, wait_for_handler
from relay.reload import Outcome
from relay.spool import Spool

RELOAD_WAIT = 10.0
"""Seconds to wait for the daemon to say how the reload went."""
POLL = 0.05
"""Seconds between two readings of the record."""


def format_applied(pid: int, outcome: Outcome) -> str:
    """What an applied reload changed, for standard output."""
    lines = [
        f"ses-relay: reload: the ses-relay daemon (pid {pid}) reloaded {outcome.source}",
        f"  new sessions get: {', '.join(outcome.applied) or 'the same settings'}",
    ]
    if outcome.read_again:
        lines.append(f"  read again: {', '.join(outcome.read_again)}")
    return "\n".join(lines) + "\n"


def format_need_restart(outcome: Outcome) -> str:
    return (
        f"ses-relay: reload: warning: {', '.join(outcome.need_restart)} changed but need "
        "a restart; the old values stay in force until then\n"
    )


def run_reload(config: Config) -> int:
    """Signal the daemon and print its answer: 0 applied; ``ConfigError``
    (exit 78) refused; ``RelayError`` (exit 1) no daemon, no answer."""
    spool = Path(config.spool.path)
    pid = Spool(spool).daemon_pid()
    if pid is None:
        raise RelayError(
            f"no ses-relay daemon is running on spool {spool} ({spool_origin(config)}): "
            "nothing to reload"
        )
    if not wait_for_handler(pid, signal.SIGHUP, HANDLER_WAIT, proc_status):
        raise RelayError(
            f"the ses-relay daemon (pid {pid}) does not handle SIGHUP yet (still starting?); "
            "not signalled: run the reload again once it is ready"
        )
    sent = time.monotonic_ns()
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise RelayError(f"the ses-relay daemon (pid {pid}) has stopped") from None
    except OSError as exc:
        raise RelayError(
            f"cannot signal the ses-relay daemon (pid {pid}): {exc.strerror or exc}"
        ) from None
    record = wait_for_record(spool, pid, sent, RELOAD_WAIT)
    if record is None:
        raise RelayError(
            f"signalled the ses-relay daemon (pid {pid}), but it did not say within "
            f"{RELOAD_WAIT:g} s whether it reloaded: see its log"
        )
    outcome = record.outcome
    if outcome.refused:
        print(
            f"ses-relay: reload: the ses-relay daemon (pid {pid}) refused to reload "
            f"{outcome.source}; the configuration in force is unchanged",
            file=sys.stderr,
        )
        raise ConfigError(outcome.problems)
    sys.stdout.write(format_applied(pid, outcome))
    if outcome.need_restart:
        sys.stderr.write(format_need_restart(outcome))
    return 0


def wait_for_record(spool: Path, pid: int, sent: int, wait: float) -> reloadrecord.Record | None:
    """The record answering a SIGHUP sent to ``pid`` at ``sent``, or None
    when none came within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        record = reloadrecord.read(spool)
        if reloadrecord.answers(record, pid, sent):
            return record
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL)
