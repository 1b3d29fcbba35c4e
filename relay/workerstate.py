"""What each worker tells the parent (``smtp.workers > 1``), and the whole
relay's view made of them. Pure.

A worker answers on its report socket with ``report_json``: its ``State``
(the gauges read at scrape, ``relay.metrics``) and its ``Readiness``. The
parent's ``/metrics`` shows ``combine`` of every worker's state: counts
that add up across workers are summed (spool entries, open connections, the
sending rate, since each worker sends at its share), the age of the oldest
message and a pause of all delivery are the longest, the account's quota
is the same for all (the latest any worker read), and the credentials'
expiry is the soonest. ``/readyz`` is ready when every worker runs and is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from relay.httpserver import Readiness
from relay.metrics import State
from relay.ses.sender import SendQuota


def report_json(state: State, readiness: Readiness) -> bytes:
    document = {
        "state": asdict(state),
        "readiness": {"checks": dict(readiness.checks), "ses": readiness.ses},
    }
    return json.dumps(document).encode()


def report_from_json(text: bytes) -> tuple[State, Readiness]:
    """``ValueError`` (or ``KeyError``, ``TypeError``) for what is not a report."""
    document: dict[str, Any] = json.loads(text)
    state = dict(document["state"])
    quota = state.pop("quota")
    ready = document["readiness"]
    return (
        State(**state, quota=None if quota is None else SendQuota(**quota)),
        Readiness(checks=dict(ready["checks"]), ses=str(ready["ses"])),
    )


def combine(states: Sequence[State]) -> State:
    """The relay's state from its workers' (none answered: all zero)."""
    quotas = [s.quota for s in states if s.quota is not None]
    expiries = [s.credentials_expiry for s in states if s.credentials_expiry is not None]
    return State(
        queued=sum(s.queued for s in states),
        dead=sum(s.dead for s in states),
        oldest_age=max((s.oldest_age for s in states), default=0.0),
        pause_remaining=max((s.pause_remaining for s in states), default=0.0),
        send_rate=sum(s.send_rate for s in states),
        quota=max(quotas, key=lambda q: q.sent_last_24_hours) if quotas else None,
        smtp_open=sum(s.smtp_open for s in states),
        smtp_max=sum(s.smtp_max for s in states),
        credentials_expiry=min(expiries) if expiries else None,
    )


def combine_readiness(reports: Mapping[int, Readiness | None], count: int) -> Readiness:
    """``/readyz`` of ``count`` workers from the reports of those that answered
    (None: it runs but did not answer); each check names the workers it fails for."""
    names = ("smtp", "spool")
    problems: dict[str, list[str]] = {name: [] for name in names}
    ses = "ok"
    for index in range(count):
        report = reports.get(index)
        if report is None:
            problems["smtp"].append(f"worker {index}: not running")
            continue
        for name in names:
            result = report.checks.get(name, "unknown")
            if result != "ok":
                problems[name].append(f"worker {index}: {result}")
        if report.ses != "ok":
            ses = report.ses
    checks = {name: "; ".join(found) or "ok" for name, found in problems.items()}
    return Readiness(checks=checks, ses=ses)
