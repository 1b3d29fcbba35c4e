"""``ses-relay queue``: list, show, retry and delete spooled messages.

Like Postfix's ``mailq`` and ``postsuper``, it works on the spool while the
daemon runs, on every spool partition of ``smtp.workers`` (``relay.partitions``):
it never takes a daemon's lock, changes envelopes only
through ``Spool.modify`` / ``Spool.requeue`` (which re-read them under the
entry's lock, so nothing the daemon writes is lost), and after ``retry``
sends the daemon SIGUSR1 so it re-reads the queue and tries those messages
now instead of at their scheduled time.

Formatting (``format_list``, ``format_show``, ``listing_json``) and the
envelope changes (``retry_queued``, ``revive``) are pure functions; the
``run_*`` functions do the I/O.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from relay.config import Config
from relay.errors import NoSuchEntry, SpoolError, UnreadableEntry
from relay.partitions import SpoolSet
from relay.queueid import as_typed
from relay.spool import AREAS, DEAD, MAX_HISTORY, QUEUE, Entry, Spool, ses_json

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
RACE_RETRIES = 3
"""Times an operation follows an entry the daemon moved meanwhile (queue → dead)."""
HANDLER_WAIT = 10.0
"""Seconds ``retry`` waits for a starting daemon to install its SIGUSR1
handler: before that, SIGUSR1 would kill it."""

AREA_NAMES = {QUEUE: "the queue", DEAD: "the dead-letter area"}


INLINE = "inline"
"""The area ``list`` shows for a message the daemon is trying inline (in
the spool's journal, ``relay.journal``): queued, not yet in ``queue/``."""
BEING_SENT = (
    "in the journal: the daemon is sending it now; "
    "a daemon that is not running moves it into the queue when it starts"
)


@dataclass(frozen=True, slots=True)
class Listed:
    """One spooled message as the command shows it."""

    entry: Entry
    area: str
    size: int | None
    """Bytes of the message file; None when it vanished meanwhile."""


# -- pure: text


def printable(text: str, *, keep_tabs: bool = False) -> str:
    """``text`` safe for a terminal: control and other invisible characters
    (escape sequences, bidi overrides, line breaks) become ``\\xNN`` escapes."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable() or (keep_tabs and char == "\t"):
            out.append(char)
        else:
            out.append(ascii(char)[1:-1])
    return "".join(out)


def utc(moment: float) -> str:
    try:
        return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):  # a hand-edited envelope
        return f"@{moment:g}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def batch_counts(entry: Entry) -> str:
    """``pending/sent/failed`` batch counts."""
    states = [b.state for b in entry.batches]
    return f"{states.count('pending')}/{states.count('sent')}/{states.count('failed')}"


def next_attempt_text(listed: Listed, now: float) -> str:
    if listed.area == DEAD:
        return "-"
    if listed.entry.next_attempt <= now:
        return "now"
    return utc(listed.entry.next_attempt)


def waiting(entry: Entry) -> list[tuple[str | None, list[str]]]:
    """The recipients not delivered yet, grouped by their batch's last error
    (in batch order)."""
    groups: dict[str | None, list[str]] = {}
    for batch in entry.batches:
        if batch.state != "sent":
            error = None if batch.error is None else str(batch.error)
            groups.setdefault(error, []).extend(batch.recipients)
    return list(groups.items())


def last_error(entry: Entry) -> str | None:
    """What went wrong last: an undelivered batch's error, else the newest
    history line."""
    for error, _ in waiting(entry):
        if error:
            return error
    return entry.history[-1] if entry.history else None


def format_list(messages: Sequence[Listed], now: float, spool: str) -> str:
    """The ``list`` output, like ``mailq``: a header, one line per message
    with its undelivered recipients (and why) indented below, a summary
    naming the ``spool`` read."""
    if not messages:
        return f"Mail queue is empty (spool {spool})\n"
    header = (
        "Queue ID",
        "Area",
        "Size",
        "Arrival (UTC)",
        "Batches p/s/f",
        "Next attempt (UTC)",
        "Sender",
    )
    rows = [header]
    for item in messages:
        entry = item.entry
        rows.append(
            (
                entry.id,
                item.area,
                "?" if item.size is None else str(item.size),
                utc(entry.received),
                batch_counts(entry),
                next_attempt_text(item, now),
                printable(f"<{entry.sender}>"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for number, row in enumerate(rows):
        cells = [
            cell.rjust(width) if column == 2 else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        if number > 1:
            lines.append("")
        lines.append("  ".join([*cells, row[-1]]))
        if number == 0:
            continue
        entry = messages[number - 1].entry
        groups = waiting(entry)
        if not any(error for error, _ in groups) and entry.history:
            lines.append(f"    ({printable(entry.history[-1])})")
        for error, recipients in groups:
            if error:
                lines.append(f"    ({printable(error)})")
            lines.extend(f"      {printable(r)}" for r in recipients)
    queued = sum(1 for m in messages if m.area != DEAD)
    dead = len(messages) - queued
    lines.append("")
    lines.append(f"{plural(queued, 'message')} in queue, {dead} dead (spool {spool})")
    return "\n".join(lines) + "\n"


def entry_data(item: Listed) -> dict[str, Any]:
    """An entry for ``--json``: its envelope (the spool's ``ID.json``
    fields) with ``area``, ``size`` and ``last_error``."""
    data: dict[str, Any] = json.loads(item.entry.to_json())
    data.pop("version", None)
    return (
        {"id": data.pop("id"), "area": item.area, "size": item.size}
        | data
        | {"last_error": last_error(item.entry)}
    )


def listing_json(messages: Sequence[Listed], spool: str) -> str:
    queued = sum(1 for m in messages if m.area != DEAD)
    document = {
        "spool": spool,
        "messages": [entry_data(m) for m in messages],
        "queued": queued,
        "dead": len(messages) - queued,
    }
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


def split_headers(message: bytes) -> tuple[list[bytes], bytes]:
    """The header lines (without line ends) and the rest after the blank line."""
    lines: list[bytes] = []
    rest = message
    while rest:
        line, newline, after = rest.partition(b"\n")
        text = line.removesuffix(b"\r")
        if not text:
            return lines, after
        lines.append(text)
        rest = after if newline else b""
    return lines, b""


def decode(line: bytes) -> str:
    return printable(line.decode("utf-8", "backslashreplace"), keep_tabs=True)


def envelope_fields(item: Listed, now: float) -> list[tuple[str, str]]:
    """``show``'s name-value lines for the envelope, up to the recipient count."""
    entry = item.entry
    size = "unknown (the message file is gone)" if item.size is None else f"{item.size} bytes"
    area = {
        QUEUE: "queue (waiting for delivery)",
        DEAD: "dead (given up on; 'ses-relay queue retry' sends it again)",
        INLINE: f"inline ({BEING_SENT})",
    }[item.area]
    if item.area == DEAD:
        next_try = "- (dead)"
    elif item.area == INLINE:
        next_try = "now (inline)"
    elif entry.next_attempt <= now:
        next_try = f"now (due since {utc(entry.next_attempt)} UTC)"
    else:
        next_try = f"{utc(entry.next_attempt)} UTC"
    fields = [
        ("Queue ID", entry.id),
        ("Area", area),
        ("Size", size),
        ("Arrival", f"{utc(entry.received)} UTC"),
        ("Client", printable(entry.client)),
        ("User", printable(entry.user) if entry.user is not None else "-"),
        ("Sender", printable(f"<{entry.sender}>")),
        ("Source", printable(entry.source)),
        ("Attempts", str(entry.attempts)),
        ("Next attempt", next_try),
    ]
    if entry.bounce is not None:
        fields.append(("Bounce", f"{entry.bounce} (to the sender)"))
    if entry.bounce_of is not None:
        fields.append(("Bounce of", entry.bounce_of))
    fields.append(("Recipients", str(len(entry.recipients))))
    return fields


def format_show(item: Listed, message: bytes | None, now: float, *, body: bool) -> str:
    """The ``show`` output: every envelope field, then the message's header
    (and body with ``body``)."""
    entry = item.entry
    fields = envelope_fields(item, now)
    lines = [f"{name + ':':<14}{value}" for name, value in fields]
    lines.extend(f"    {printable(r)}" for r in entry.recipients)
    if parameters := ses_json(entry.ses):
        lines.append("SES parameters:")
        for key, value in parameters.items():
            shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=True)
            lines.append(f"    {printable(key)}: {printable(shown)}")
    total = len(entry.batches)
    for number, batch in enumerate(entry.batches, 1):
        count = plural(len(batch.recipients), "recipient")
        lines.append(f"Batch {number} of {total}: {batch.state} ({count})")
        lines.extend(f"    {printable(r)}" for r in batch.recipients)
        if batch.message_id:
            lines.append(f"    SES message id: {printable(batch.message_id)}")
        if batch.error:
            lines.append(f"    error: {printable(str(batch.error))}")
    lines.append("History:" if entry.history else "History:      (none)")
    lines.extend(f"    {printable(line)}" for line in entry.history)
    lines.append("")
    if message is None:
        lines.append("(the message file is gone)")
        return "\n".join(lines) + "\n"
    headers, rest = split_headers(message)
    lines.append("Message:" if body else "Message header:")
    lines.extend(decode(line) for line in headers)
    if body:
        lines.append("")
        lines.extend(decode(line.removesuffix(b"\r")) for line in rest.split(b"\n"))
        if lines[-1] == "":
            lines.pop()  # the message's own final line end
    return "\n".join(lines) + "\n"


# -- pure: envelope changes


def stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def retry_queued(now: float) -> Callable[[Entry], Entry]:
    """For a queued entry: try it now."""

    def change(entry: Entry) -> Entry:
        return replace(entry, next_attempt=now)

    return change


def revive(now: float) -> Callable[[Entry], Entry]:
    """For a dead entry going back to the queue: failed batches pending again,
    attempts reset, the age counted from now (``delivery.max_age`` starts
    again), due now. Sent batches stay sent. The failed batches' errors move
    to a history line saying so. A new failure gets a new bounce."""

    def change(entry: Entry) -> Entry:
        errors = [str(b.error) for b in entry.batches if b.state == "failed" and b.error]
        batches = tuple(
            replace(b, state="pending", error=None) if b.state == "failed" else b
            for b in entry.batches
        )
        was = f" (it had failed: {'; '.join(dict.fromkeys(errors))})" if errors else ""
        note = f"{stamp(now)} moved back to the queue by 'ses-relay queue retry'{was}"
        return replace(
            entry,
            batches=batches,
            attempts=0,
            received=now,
            next_attempt=now,
            history=(*entry.history, note)[-MAX_HISTORY:],
            bounce=None,
        )

    return change


# -- I/O


@dataclass(slots=True)
class Console:
    out: TextIO
    err: TextIO

    def say(self, text: str) -> None:
        print(text, file=self.out)

    def fail(self, text: str) -> None:
        print(f"ses-relay: queue: {text}", file=self.err)

    def warn(self, text: str) -> None:
        print(f"ses-relay: queue: warning: {text}", file=self.err)


def open_spool(config: Config) -> SpoolSet:
    """The configured spool and its workers' partitions (``smtp.workers``),
    without any daemon's lock. A missing spool is an error (a wrong ``-c``
    or ``$STATE_DIRECTORY`` would otherwise show an empty queue)."""
    path = Path(config.spool.path).absolute()
    if not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist"
        raise SpoolError(f"spool {path} {problem} ({spool_origin(config)})")
    spools = SpoolSet(Spool(path))
    spools.open()
    return spools


def spool_origin(config: Config) -> str:
    """Where the spool's path came from, for a message about it."""
    if config.source == "defaults":
        return "the default spool.path; give the daemon's configuration with -c FILE"
    return f"spool.path in {config.source}"


def warn_if_unused(spool: SpoolSet, config: Config, console: Console) -> None:
    """Say so when no daemon has ever used the spool read: likely not the
    daemon's (a ``./spool`` left behind, a missing ``-c``)."""
    if not spool.used_by_daemon():
        console.warn(
            f"no ses-relay daemon has ever used spool {spool.path}: it has no lock file "
            f"({spool_origin(config)})"
        )


def collect(spool: SpoolSet, areas: Iterable[str] = AREAS) -> list[Listed]:
    """Every readable entry, queue first, each area oldest first; in the
    queue's place, the messages being tried inline too (area ``inline``)."""
    found: list[Listed] = []
    for area in areas:
        entries = sorted(spool.entries(area), key=lambda e: (e.received, e.id))
        found.extend(Listed(e, area, spool.message_size(e.id, area)) for e in entries)
        if area == QUEUE:
            inline = sorted(
                ((e, len(message)) for e, message in spool.inline()),
                key=lambda item: (item[0].received, item[0].id),
            )
            found.extend(Listed(e, INLINE, size) for e, size in inline)
    return found


def no_such(entry_id: str) -> str:
    return f"{printable(entry_id)}: no such message in the queue or the dead-letter area"


def find_inline(spool: SpoolSet, entry_id: str) -> tuple[Entry, bytes] | None:
    """The entry and message the journal holds for ``entry_id`` (area ``inline``)."""
    return next(((e, m) for e, m in spool.inline() if e.id == entry_id), None)


def run_list(spool: SpoolSet, console: Console, now: float, *, as_json: bool) -> int:
    messages = collect(spool)
    path = str(spool.path)
    console.out.write(listing_json(messages, path) if as_json else format_list(messages, now, path))
    return EXIT_OK


def run_show(
    spool: SpoolSet, console: Console, entry_id: str, now: float, *, body: bool, as_json: bool
) -> int:
    entry_id = as_typed(entry_id)
    found: tuple[Entry, str, bytes] | None = None
    for _ in range(RACE_RETRIES):
        area = spool.find(entry_id)
        if area is None:
            break
        try:
            entry = spool.load(entry_id, area)
            message = spool.message(entry_id, area)
        except NoSuchEntry:
            continue  # moved (queue → dead) or removed meanwhile: look again
        except UnreadableEntry as exc:
            console.fail(f"{entry_id}: unreadable envelope in {area}/: {exc}")
            return EXIT_FAILURE
        found = entry, area, message
        break
    if found is None and (inline := find_inline(spool, entry_id)) is not None:
        found = inline[0], INLINE, inline[1]
    if found is None:
        console.fail(no_such(entry_id))
        return EXIT_FAILURE
    entry, area, message = found
    item = Listed(entry, area, len(message))
    if as_json:
        console.out.write(json.dumps(entry_data(item), indent=2, ensure_ascii=True) + "\n")
    else:
        console.out.write(format_show(item, message, now, body=body))
    return EXIT_OK


def retry_one(spool: SpoolSet, entry_id: str, now: float) -> str | None:
    """Make one entry due now; the area it was in, or None when not found."""
    for _ in range(RACE_RETRIES):
        area = spool.find(entry_id)
        try:
            if area == QUEUE:
                spool.modify(entry_id, retry_queued(now), QUEUE)
            elif area == DEAD:
                spool.requeue(entry_id, revive(now))
            else:
                return None
        except NoSuchEntry:
            continue  # the daemon moved it to dead/ meanwhile (or delivered it)
        return area
    return None


def run_retry(
    spool: SpoolSet,
    console: Console,
    ids: Sequence[str],
    now: float,
    *,
    every: bool,
    areas: Sequence[str] = AREAS,
    kill: Callable[[int, int], None] = os.kill,
    status_of: Callable[[int], str | None] | None = None,
) -> int:
    if every:
        targets = [item.entry.id for item in collect(spool, areas)]
        if not targets:
            console.say(f"Mail queue is empty (spool {spool.path}): nothing to retry")
            return EXIT_OK
    else:
        targets = [as_typed(i) for i in ids]
    code = EXIT_OK
    retried = 0
    for entry_id in dict.fromkeys(targets):
        try:
            area = retry_one(spool, entry_id, now)
        except SpoolError as exc:
            console.fail(f"{printable(entry_id)}: {exc}")
            code = EXIT_FAILURE
            continue
        if area is None:
            if every:  # with --all, one delivered or being sent meanwhile is no failure
                continue
            if find_inline(spool, entry_id) is not None:
                console.say(f"{entry_id}: {BEING_SENT}; nothing to retry")
            else:
                console.fail(no_such(entry_id))
                code = EXIT_FAILURE
            continue
        retried += 1
        if area == QUEUE:
            console.say(f"{entry_id}: due now")
        else:
            console.say(f"{entry_id}: moved from the dead-letter area back to the queue")
    if retried and not notify_daemon(spool, console, retried, kill=kill, status_of=status_of):
        code = EXIT_FAILURE
    return code


def notify_daemon(
    spool: Spool | SpoolSet,
    console: Console,
    count: int,
    *,
    kill: Callable[[int, int], None] = os.kill,
    status_of: Callable[[int], str | None] | None = None,
    wait: float = HANDLER_WAIT,
) -> bool:
    """Ask the running daemon (if any) to re-read the queue now (SIGUSR1)."""
    they, them = ("it", "it") if count == 1 else ("they", "them")
    pid = spool.daemon_pid()
    if pid is None:
        console.say(
            f"no ses-relay daemon is running on this spool: {they} will be tried when it starts"
        )
        return True
    if not wait_for_handler(pid, signal.SIGUSR1, wait, status_of or proc_status):
        console.fail(
            f"the ses-relay daemon (pid {pid}) does not handle SIGUSR1 yet (still starting?); "
            f"not signalled: run the retry again once it is ready"
        )
        return False
    try:
        kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        console.say(
            f"the ses-relay daemon (pid {pid}) has stopped: {they} will be tried when it starts"
        )
        return True
    except OSError as exc:
        console.fail(f"cannot signal the ses-relay daemon (pid {pid}): {exc.strerror or exc}")
        return False
    console.say(f"signalled the ses-relay daemon (pid {pid}) to deliver {them} now")
    return True


def proc_status(pid: int) -> str | None:
    """``/proc/PID/status`` (Linux), or None where there is none."""
    try:
        return Path(f"/proc/{pid}/status").read_text(errors="replace")
    except OSError:
        return None


def catches(status: str | None, signum: int) -> bool | None:
    """Whether a process with that ``/proc/PID/status`` has a handler for
    ``signum`` (its ``SigCgt`` mask); None when unknown."""
    if status is None:
        return None
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name == "SigCgt":
            try:
                return bool(int(value.strip(), 16) >> (signum - 1) & 1)
            except ValueError:
                return None
    return None


def wait_for_handler(
    pid: int, signum: int, wait: float, status_of: Callable[[int], str | None]
) -> bool:
    """True once the process catches ``signum`` (or when that cannot be
    known); False when it did not within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        caught = catches(status_of(pid), signum)
        if caught is None or caught:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def delete_one(spool: SpoolSet, entry_id: str) -> list[str]:
    """Remove an entry wherever it is; the areas it was removed from."""
    removed: list[str] = []
    for _ in range(RACE_RETRIES):
        area = spool.find(entry_id)
        if area is None:
            break
        spool.remove(entry_id, area)  # a move racing it leaves it in the other area: look again
        if area not in removed:
            removed.append(area)
    return removed


def run_delete(spool: SpoolSet, console: Console, ids: Sequence[str]) -> int:
    code = EXIT_OK
    for entry_id in dict.fromkeys(as_typed(i) for i in ids):
        try:
            removed = delete_one(spool, entry_id)
        except SpoolError as exc:
            console.fail(f"{printable(entry_id)}: {exc}")
            code = EXIT_FAILURE
            continue
        if not removed:
            if find_inline(spool, entry_id) is not None:
                console.fail(f"{entry_id}: {BEING_SENT}; it cannot be deleted from the journal")
            else:
                console.fail(no_such(entry_id))
            code = EXIT_FAILURE
            continue
        console.say(f"{entry_id}: deleted from {AREA_NAMES[removed[-1]]}")
    return code


def add_arguments(queue: argparse.ArgumentParser) -> None:
    """The ``queue`` subcommand's actions, on its parser."""
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        # -c also after the action; SUPPRESS keeps one given before it.
        sub.add_argument(
            "-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        return sub

    listing = action("list", "List queued and dead messages (like mailq).")
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")
    show = action("show", "Show a message's envelope, delivery state and header.")
    show.add_argument("id", metavar="ID")
    show.add_argument("--body", action="store_true", help="show the body too")
    show.add_argument("--json", action="store_true", help="print the envelope as JSON")
    retry = action(
        "retry",
        "Deliver messages now: queued ones at once, dead ones back to the queue "
        "(like postsuper -r); tells a running daemon (SIGUSR1).",
    )
    retry.add_argument("ids", nargs="*", metavar="ID")
    retry.add_argument("--all", action="store_true", help="every queued and dead message")
    retry.add_argument(
        "--area", choices=AREAS, help="with --all: only the queue, or only the dead-letter area"
    )
    delete = action(
        "delete", "Delete messages from the queue or the dead-letter area (like postsuper -d)."
    )
    delete.add_argument("ids", nargs="+", metavar="ID")


def queue_command(
    config: Config,
    args: argparse.Namespace,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """``ses-relay queue ACTION``: 0 done, 1 a failure, 2 bad usage."""
    console = Console(out or sys.stdout, err or sys.stderr)
    problem = usage_problem(args)
    if problem:
        console.fail(problem)
        return EXIT_USAGE
    try:
        spool = open_spool(config)
        warn_if_unused(spool, config, console)
        now = clock()
        if args.action == "list":
            return run_list(spool, console, now, as_json=args.json)
        if args.action == "show":
            return run_show(spool, console, args.id, now, body=args.body, as_json=args.json)
        if args.action == "retry":
            areas = (args.area,) if args.area else AREAS
            return run_retry(spool, console, args.ids, now, every=args.all, areas=areas)
        return run_delete(spool, console, args.ids)
    except SpoolError as exc:
        console.fail(str(exc))
    except OSError as exc:  # e.g. a spool directory we may not read
        console.fail(f"spool {config.spool.path}: {exc.strerror or exc}")
    return EXIT_FAILURE


def usage_problem(args: argparse.Namespace) -> str | None:
    """What argparse cannot check about the arguments."""
    if args.action != "retry":
        return None
    if bool(args.ids) == bool(args.all):
        return "retry: give message IDs or --all (not both)"
    if args.area and not args.all:
        return "retry: --area goes with --all"
    return None
