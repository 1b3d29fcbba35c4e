"""Point 13: the relay at SES's sending rate.

The relay runs with ``ses.max_send_rate = RATE`` against a fake SES that
answers ``Throttling`` above that rate (``bench/fakeses.py --max-rate``),
and with ``delivery.inline_timeout`` short, so its queue fills at once
instead of holding the clients. The queue is filled first with messages of
``RECIPIENTS`` recipients each (enough for the settling time and the
window, and a margin), then, with no SMTP load left, the recipients SES
accepted and the relay's CPU time are read at the start and the end of a
``window``-second span starting ``SETTLE`` s (or ``window`` s, if shorter)
after the fill:

* the delivered rate, recipients per second over the window;
* the Throttling answers over the whole run (fill included);
* the relay's CPU over the window as a share of one core: what it costs
  while it waits for tokens, the few SES calls a second it makes included
  (with ``RECIPIENTS`` per message, ``RATE / RECIPIENTS`` calls a second);
* whether the queue still held messages at the end (else the window ran
  dry and the rate means nothing).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from bench.procs import Children
from bench.scenarios import Settings
from bench.services import RelayDownstream, run_load, start_fake_ses, start_relay

RATE = 50.0
RECIPIENTS = 10
WINDOW = 30.0
SETTLE = 1.0
"""Seconds after the fill before the window: the relay's bucket, full at
start, has spent its burst by then."""
MARGIN = 1.2
FILL_SESSIONS = 4


def run_rate_limit(settings: Settings, workdir: Path, window: float) -> dict[str, Any]:
    settle = min(SETTLE, window)
    messages = math.ceil(RATE * (1 + settle + window) * MARGIN / RECIPIENTS)
    overrides = {"ses": {"max_send_rate": RATE}, "delivery": {"inline_timeout": 0.01}}
    with Children() as children:
        ses = start_fake_ses(children, workdir / "ses", 0.0, max_rate=RATE)
        relay = start_relay(children, workdir / "relay", ses, overrides)
        directory = workdir / "fill"
        directory.mkdir()
        fill = run_load(
            children, directory, "fill", relay.port, mode="persistent", sessions=FILL_SESSIONS,
            size=1024, warmup=0.0, duration=settings.drain_timeout, count=None,
            more=["--messages", str(messages), "--recipients", str(RECIPIENTS)],
        )  # fmt: skip
        time.sleep(settle)
        first, cpu_first, at_first = ses.stats(), sum(relay.tree.cpu_times()), time.monotonic()
        time.sleep(window)
        last, cpu_last, at_last = ses.stats(), sum(relay.tree.cpu_times()), time.monotonic()
        assert isinstance(relay.downstream, RelayDownstream)
        backlog_left = not relay.downstream.queue_empty()
        problems = relay.problems()
    span = at_last - at_first
    return {
        "max_send_rate": RATE,
        "recipients_per_message": RECIPIENTS,
        "messages_queued": fill["total_accepted"],
        "fill_errors": fill["errors"],
        "window_s": round(span, 2),
        "delivered_recipients": last["recipients"] - first["recipients"],
        "delivered_rate": round((last["recipients"] - first["recipients"]) / span, 2),
        "throttled": last["throttled"],
        "cpu_util_waiting": round((cpu_last - cpu_first) / span, 4),
        "backlog_left": backlog_left,
        "log_warnings_errors": problems[0],
        "log_examples": problems[1],
    }
