"""The SES account's state, shared by every delivery: its sending rate,
an outage, a pause of all delivery, and its quota.

Every SES answer is reported here (``answered``, ``react``): throttling slows
the shared rate; an error of the whole account (daily quota, sending paused,
credentials refused) or an outage (``relay.outage``) pauses all delivery, so
that queued mail does not hammer SES with calls bound to fail. A batch takes
sending-rate tokens (``token``) before it is sent; how long it waited is
told to ``waited`` (``ses_relay_send_rate_wait_seconds``). With
``smtp.workers = N`` each worker sends at 1/N of the rate (configured or
MaxSendRate), so the account's rate holds in total. Time comes from the one
injected clock: pauses and the rate run on its monotonic time, ``resume_at``
says in wall time when sending may go on.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.clock import Clock, wait_for
from relay.config import Config
from relay.errors import SesError
from relay.log import delivery_log
from relay.oneline import LOG_TEXT_LIMIT, one_line
from relay.outage import Outage
from relay.ratelimit import SendRate
from relay.ses.classify import sending_disabled
from relay.ses.sender import SendQuota, SesSender

PAUSE_SLACK = 0.05
"""Seconds of a pause short enough to wait for in the sending-rate queue."""
PAUSE_LOG_SLACK = 1.0
"""Seconds by which a pause must outlast the current one to be logged again."""


class Account:
    """Rate, outage, pauses and quota of the SES account that delivery uses
    (through ``sender``)."""

    def __init__(
        self,
        config: Config,
        clock: Clock,
        sender: SesSender,
        *,
        waited: Callable[[float], None] | None = None,
    ) -> None:
        """``waited`` is told the seconds each batch waited for its tokens."""
        self._clock = clock
        self._sender = sender
        self._waited = waited
        self._share = config.smtp.workers
        """Each of ``smtp.workers`` processes sends at its share of the account's rate."""
        self.rate = SendRate(clock=clock, rate=config.ses.max_send_rate / self._share)
        self.outage = Outage(first=config.delivery.retry_min, longest=config.delivery.retry_max)
        self.quota: SendQuota | None = None
        """The account's quota as GetSendQuota last said (``ses.max_send_rate = 0``)."""

    # -- pauses

    def pause_left(self) -> float:
        """Seconds left of a pause of all delivery (quota, account, outage); 0
        when there is none."""
        paused_until = self.rate.paused_until
        return 0.0 if paused_until is None else max(0.0, paused_until - self._clock.monotonic())

    def paused(self) -> bool:
        """Whether all delivery is paused for longer than a batch waits for
        its sending-rate tokens (an attempt now would send nothing)."""
        return self.pause_left() > PAUSE_SLACK

    def resume_at(self) -> float:
        """When sending may go on (wall time): now, or the end of a pause."""
        return self._clock.wall() + self.pause_left()

    def retry_now(self) -> None:
        """``ses-relay queue retry``: end a pause of all delivery (an operator
        may have raised the quota or fixed the cause; SES says again if not);
        an outage is looked for afresh."""
        if self.rate.paused_until is not None:
            self.rate.resume()
            delivery_log.warning("delivery pause ended by 'ses-relay queue retry'")
        self.outage.answered()

    # -- sending

    async def token(self, recipients: int, ends: float) -> bool:
        """Take sending-rate tokens for ``recipients`` before ``ends``
        (monotonic); False, at once if a pause of all delivery outlasts it."""
        paused_until = self.rate.paused_until
        if paused_until is not None and paused_until > ends:
            return False
        if self.rate.try_acquire(recipients):  # most sends: no task, no timer
            if self._waited is not None:
                self._waited(0.0)
            return True
        asked = self._clock.monotonic()
        try:
            await wait_for(self._clock, self.rate.acquire(recipients), ends - asked)
        except TimeoutError:
            return False
        if self._waited is not None:
            self._waited(self._clock.monotonic() - asked)
        return True

    def answered(self) -> None:
        """SES took a batch: an outage, if any, is over."""
        self.outage.answered()

    def react(self, error: SesError) -> None:
        """SES refused a batch, or gave no usable answer: slow down or pause
        all delivery when the error says so."""
        if error.retryable and not error.throttled:
            now = self._clock.monotonic()
            pause = self.outage.failed(now)
            if pause is not None:
                self.rate.pause_until(now + pause)
                delivery_log.warning(
                    "SES unreachable (%d calls in a row failed, the last with %s): "
                    "pausing all delivery for %gs",
                    self.outage.failures,
                    one_line(str(error), 200),
                    pause,
                )
            return
        self.outage.answered()
        if error.pause > 0:
            ends = self._clock.monotonic() + error.pause
            if self.rate.paused_until is None or self.rate.paused_until < ends - PAUSE_LOG_SLACK:
                delivery_log.warning(
                    "pausing all delivery for %ds: %s",
                    error.pause,
                    one_line(str(error), LOG_TEXT_LIMIT),
                )
            self.rate.pause_until(ends)
        elif error.throttled:
            self.rate.throttled()

    # -- the quota

    async def follow_quota(self, every: float) -> None:
        """Keep the sending rate at the account's MaxSendRate, read every
        ``every`` seconds; runs until cancelled. An account whose sending is
        off (v2 GetAccount's ``SendingEnabled``) pauses all delivery, as
        SES's "sending paused" does; a quota that cannot be read (no
        ``ses:GetAccount`` or ``ses:GetSendQuota`` permission, say) is a
        warning, and the rate stays as it is."""
        while True:
            try:
                quota = await self._sender.quota()
            except SesError as exc:
                delivery_log.warning(
                    "cannot read the SES send quota: %s", one_line(str(exc), LOG_TEXT_LIMIT)
                )
            else:
                self.quota = quota
                self.rate.set_rate(quota.max_send_rate / self._share)
                if not quota.sending_enabled:
                    self.react(sending_disabled())
            await self._clock.sleep(every)
