"""Delivering accepted messages to SES: inline first, then from the spool.

``Delivery.accept`` is the DATA path: the message is committed to the spool
(``250`` is a promise), then SES is tried at once within
``delivery.inline_timeout``. Every batch's outcome is written to the spool as
soon as SES answers, so a restart never resends a batch SES accepted. What
is left pending is delivered in the background by ``delivery.concurrency``
workers on a retry schedule, at the account's sending rate, until
``delivery.max_age``; recipients that fail permanently after ``250`` get a
delivery status notification and the message moves to the dead-letter area.

``Delivery`` is the driver, as Postfix's queue manager: it makes attempts
and carries out what its parts decide. The parts, each with one job:

- ``relay.outcome``: what follows an attempt (forget, retry at a time, give
  up and bounce, refuse before ``250``), a pure function;
- ``relay.duequeue``: which queued message is due when;
- ``relay.account``: the SES account's sending rate, outage, pauses and quota;
- ``relay.bouncer``: the delivery status notifications;
- ``relay.clock``: the one clock all of them read and sleep on.

SES is "a sender" (``relay.ses.sender.SesSender``): send one batch, read the
account's quota; which API and wire format serve it is the sender's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from relay import msglog
from relay.account import Account
from relay.bouncer import Bouncer
from relay.clock import Clock, SystemClock, wait_for
from relay.config import Config
from relay.duequeue import DueQueue
from relay.errors import (
    Disposition,
    NoSuchEntry,
    SesError,
    SmtpReply,
    SpoolError,
    UnreadableEntry,
)
from relay.groupcommit import GroupCommit
from relay.log import delivery_log
from relay.metrics import RelayMetrics
from relay.outcome import (
    DataReply,
    Forget,
    GiveUp,
    Refuse,
    Retry,
    Wait,
    after_attempt,
    expire,
)
from relay.queueid import new_id
from relay.schedule import expired
from relay.ses.sender import SendRequest, SesSender
from relay.spool import DEAD, QUEUE, Batch, BatchError, Entry, Spool

MAX_IDS_IN_REPLY = 5
PAUSE_SLACK = 0.05
"""Seconds of a pause short enough to wait for in the sending-rate queue."""
SPACE_CHECK_INTERVAL = 1.0
SPACE_RECHECK_INTERVAL = 0.1
"""Seconds between fresh readings before a MAIL is refused for lack of space."""
STORAGE_FULL = SmtpReply(452, "4.3.1", "Insufficient system storage, try again later")


def request_for(entry: Entry, message: bytes, batch: Batch) -> SendRequest:
    return SendRequest(message, batch.recipients, entry.source, entry.ses, queue_id=entry.id)


def sent_reply(entry: Entry) -> DataReply:
    ids = [b.message_id for b in entry.batches if b.message_id]
    shown = " ".join(ids[:MAX_IDS_IN_REPLY]) or "(SES gave no usable message id)"
    more = f" and {len(ids) - MAX_IDS_IN_REPLY} more" if len(ids) > MAX_IDS_IN_REPLY else ""
    return DataReply(SmtpReply(250, "2.0.0", f"Ok: {entry.id} sent as {shown}{more}"), "sent")


def queued_reply(entry: Entry) -> DataReply:
    return DataReply(SmtpReply(250, "2.0.0", f"Ok: queued as {entry.id}"), "queued")


@dataclass(slots=True)
class _Attempt:
    """One delivery attempt's view of an entry, updated as batches finish."""

    entry: Entry
    message: bytes
    errors: dict[int, SesError]
    starved: bool = False
    """A batch got no sending-rate token in time (not sent, not an error)."""


class Delivery:
    """The delivery service of one running relay."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        sender: SesSender,
        *,
        clock: Clock | None = None,
        jitter: Callable[[], float] = random.random,
        metrics: RelayMetrics,
    ) -> None:
        self._config = config
        self._spool = spool
        self._metrics = metrics
        self._sender = sender
        self._clock = clock = clock or SystemClock()
        self._jitter = jitter
        self.account = Account(config, clock, sender, waited=metrics.send_rate_wait)
        self._bouncer = Bouncer(config, spool, clock, metrics)
        self._due = DueQueue()
        self._in_flight: set[str] = set()
        self._idle = asyncio.Event()
        """Set when the last attempt in flight ends."""
        self._work: asyncio.Queue[str] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._checks: set[asyncio.Task[None]] = set()
        self._accepting: set[asyncio.Task[DataReply]] = set()
        """Commits and inline attempts: they outlive a client that hangs up."""
        self._unsaved: dict[str, Entry] = {}
        """Entries whose latest batch outcomes could not be written (full
        disk): what SES accepted is remembered here until a write succeeds."""
        self._free_bytes: int | None = None
        self._free_checked = -SPACE_CHECK_INTERVAL
        self._free_read = -SPACE_RECHECK_INTERVAL
        self._space_floor = int(config.smtp.max_message_size * 1.5)
        self._removes = GroupCommit(spool.remove_many, "relay-spool-removes")
        """Delivered entries removed together share one thread hop and the
        spool's fsync of ``queue/`` (accepted messages share it in ``put``)."""

    # -- life cycle

    async def start(self) -> None:
        """Resume every queued entry, then start the scheduler and workers."""
        await self.rescan()
        await self._refresh_free_space()
        self._tasks.append(asyncio.create_task(self._scheduler(), name="relay-scheduler"))
        for number in range(self._config.delivery.concurrency):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"relay-worker-{number}"))
        if self._config.ses.max_send_rate <= 0:
            follow = self.account.follow_quota(self._config.delivery.quota_refresh)
            self._tasks.append(asyncio.create_task(follow, name="relay-quota"))

    async def quiesce(self) -> None:
        """Start no new attempt; return when the attempts in flight are done
        (the caller bounds the wait, then calls ``stop``)."""
        if self._tasks:
            self._tasks[0].cancel()  # the scheduler: no new attempts
        if self._in_flight:
            self._idle.clear()
            await self._idle.wait()

    async def stop(self) -> None:
        """Cancel whatever still runs; what is not done stays queued."""
        # Inline attempts still running belong to clients that hung up or were
        # cut off: their entries are on disk and resume at the next start.
        tasks = [*self._tasks, *self._accepting]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        # A commit already in a thread ends before the spool may be closed.
        await self._removes.idle()

    async def retry_now(self) -> None:
        """``ses-relay queue retry`` (SIGUSR1): end a pause of all delivery and
        an outage (``Account.retry_now``) and try what is due."""
        self.account.retry_now()
        await self.rescan()

    async def rescan(self) -> None:
        """Schedule every entry in the queue at its ``next_attempt`` (start-up,
        and ``ses-relay queue retry`` through SIGUSR1)."""
        entries = await asyncio.to_thread(lambda: list(self._spool.entries(QUEUE)))
        queued = {entry.id for entry in entries}
        for entry in entries:
            if entry.bounce_of in queued:
                continue  # scheduled when the message it reports on leaves the queue
            self._schedule(entry.id, entry.next_attempt)
        if entries:
            delivery_log.info("queue: %d messages to deliver", len(entries))

    # -- the DATA path

    def space_ok(self) -> bool:
        """Whether the spool has room for another message (checked about once a
        second, off the event loop); below the floor MAIL gets 452."""
        now = self._clock.monotonic()
        if now - self._free_checked >= SPACE_CHECK_INTERVAL:
            self._free_checked = now
            task = asyncio.create_task(self._refresh_free_space())
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)
        return self._free_bytes is None or self._free_bytes >= self._space_floor

    async def has_space(self) -> bool:
        """``space_ok``, but a refusal is confirmed by a fresh reading (at most
        every ``SPACE_RECHECK_INTERVAL``): space that came back (the queue
        drained, an operator cleaned up) is seen at once."""
        if self.space_ok():
            return True
        if self._clock.monotonic() - self._free_read >= SPACE_RECHECK_INTERVAL:
            await self._refresh_free_space()
        return self._free_bytes is None or self._free_bytes >= self._space_floor

    async def _refresh_free_space(self) -> None:
        try:
            self._free_bytes = await asyncio.to_thread(self._spool.free_bytes)
        except (OSError, SpoolError) as exc:
            delivery_log.warning("cannot read free space of the spool: %s", exc)
        self._free_read = self._clock.monotonic()

    async def accept(self, entry: Entry, message: bytes) -> DataReply:
        """Commit, then try SES inline; the reply for the client's DATA.

        The work runs in its own task: if the client hangs up (aiosmtpd then
        cancels the DATA hook), a message already committed is still tried
        and scheduled; it is ours from the fsync on."""
        task = asyncio.create_task(self._accept(entry, message), name=f"relay-accept-{entry.id}")
        self._accepting.add(task)
        task.add_done_callback(self._accepting.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_orphan_failure)
            raise

    async def _accept(self, entry: Entry, message: bytes) -> DataReply:
        try:
            await asyncio.to_thread(self._spool.put, entry, message)
        except SpoolError as exc:
            delivery_log.error("%s: not accepted: %s", entry.id, exc)
            self._free_checked = -SPACE_CHECK_INTERVAL
            return DataReply.refused(STORAGE_FULL)
        self._in_flight.add(entry.id)
        try:
            attempt = await self._attempt(entry, message, self._config.delivery.inline_timeout)
            return await self._settle(attempt, inline=True)
        except Exception:
            # Committed: the background keeps the promise, so 250 is the truth.
            delivery_log.exception("%s: inline delivery failed unexpectedly", entry.id)
            self._schedule(entry.id, self._later())
            return queued_reply(entry)
        finally:
            self._done(entry.id)

    # -- attempts

    async def _attempt(self, entry: Entry, message: bytes, budget: float) -> _Attempt:
        """Send every pending batch at once, each within ``budget`` seconds;
        write each outcome to the spool as it arrives."""
        attempt = _Attempt(entry, message, {})
        ends = self._clock.monotonic() + budget
        lock = asyncio.Lock()

        async def send(index: int) -> None:
            batch = attempt.entry.batches[index]
            if not await self.account.token(len(batch.recipients), ends):
                attempt.starved = True  # stays pending; nothing was sent
                return
            try:
                result = await self._sender.send(
                    request_for(entry, message, batch),
                    deadline=max(0.1, ends - self._clock.monotonic()),
                )
            except SesError as error:
                self.account.react(error)
                attempt.errors[index] = error
                permanent = error.disposition is Disposition.PERMANENT
                self._metrics.batch("failed" if permanent else "deferred")
                new = replace(
                    batch, state="failed" if permanent else "pending", error=BatchError.of(error)
                )
            else:
                self.account.answered()
                self._metrics.batch("sent")
                new = replace(batch, state="sent", message_id=result.message_id, error=None)
                msglog.sent(entry, new)
            async with lock:
                attempt.entry = attempt.entry.with_batch(index, new)
                if all(b.state == "sent" for b in attempt.entry.batches):
                    return  # removed next: the same crash window, one fsync fewer
                await self._save(attempt.entry)

        await asyncio.gather(*(send(i) for i in entry.pending()))
        return attempt

    async def _settle(self, attempt: _Attempt, *, inline: bool = False) -> DataReply:
        """Carry out what ``relay.outcome`` decides after ``attempt``; the
        reply to DATA (``inline``: the client waits for it)."""
        entry = attempt.entry
        decision = after_attempt(
            entry,
            attempt.errors,
            starved=attempt.starved,
            inline=inline,
            config=self._config.delivery,
            now=self._clock.wall(),
            resume_at=self.account.resume_at(),
            jitter=self._jitter(),
        )
        match decision:
            case Forget():
                await self._forget(entry)
                if inline:
                    return sent_reply(entry)  # the handler logs the outcome with the reply
                self._log(entry, "sent", "removed")
                if entry.bounce_of is not None:
                    self._bouncer.sent()
            case Refuse(reply):
                # SES took none of it: the client gets SES's refusal and keeps
                # the message; nothing of ours remains.
                await self._forget(entry)
                return DataReply.refused(reply)
            case Wait(at):
                # Nothing was sent: waiting for the sending rate (or the end of
                # a pause of all delivery) is not a failed attempt.
                self._schedule(entry.id, at)
                delivery_log.debug("%s: waiting for the SES sending rate", entry.id)
            case Retry(retried, why):
                await self._save(retried)
                self._schedule(entry.id, retried.next_attempt)
                self._metrics.retry()
                _log_failures(attempt)
                for index in retried.pending():
                    error = attempt.errors.get(index)
                    reason = msglog.NOT_TRIED if attempt.starved else why
                    if error is not None:
                        reason = msglog.error_text(error)
                    msglog.deferred(retried, retried.batches[index], reason)
            case GiveUp(failed):
                _log_failures(attempt)
                await self._give_up(entry, attempt.message, failed)
        return queued_reply(entry)

    async def _give_up(self, entry: Entry, message: bytes, failed: Sequence[Batch]) -> None:
        """Bounce the failed recipients and move the entry to the dead-letter area.

        Exactly one bounce, across crashes: its id is recorded in the entry
        before it is written; a recorded bounce that is still in the spool is
        not written again; and a bounce is not delivered (nor scheduled by
        ``rescan``) while its message is still in the queue, so one that is
        not in the spool was never written. Anything that cannot be written
        now is tried again after ``delivery.retry_min``."""
        if self._bouncer.wanted(entry):
            if entry.bounce is None:
                entry = replace(entry, bounce=new_id())
                if not await self._save(entry):
                    self._schedule(entry.id, self._later())
                    return
            queued = await self._bouncer.queue(entry, message, failed)
            if queued is None:
                self._schedule(entry.id, self._later())
                return
            entry = queued
        try:
            await asyncio.to_thread(self._spool.move, entry, QUEUE, DEAD)
        except NoSuchEntry:
            delivery_log.warning("%s: deleted while being delivered", entry.id)
        except SpoolError as exc:
            delivery_log.error("%s: cannot move to the dead-letter area: %s", entry.id, exc)
            self._schedule(entry.id, self._later())
            return
        self._unsaved.pop(entry.id, None)
        if entry.bounce is not None:
            self._schedule(entry.bounce, 0.0)
        if entry.bounce_of is not None:
            self._bouncer.failed(entry, failed)
            return
        self._log(entry, f"bounced ({sum(len(b.recipients) for b in failed)} recipients)", "dead")

    def _later(self) -> float:
        """When to try again after a fault of ours (wall time)."""
        return self._clock.wall() + self._config.delivery.retry_min

    # -- the spool

    async def _save(self, entry: Entry) -> bool:
        """Write ``entry``'s state; True when it is on disk."""
        try:
            await asyncio.to_thread(self._spool.update, entry)
        except NoSuchEntry:
            self._unsaved.pop(entry.id, None)
            delivery_log.warning("%s: deleted while being delivered", entry.id)
            return False
        except SpoolError as exc:
            # The outcome is known but not on disk: kept in memory so that this
            # process does not resend the batch; a restart before a write
            # succeeds may.
            self._unsaved[entry.id] = entry
            delivery_log.error("%s: cannot record delivery state: %s", entry.id, exc)
            return False
        self._unsaved.pop(entry.id, None)
        return True

    def _recall(self, entry: Entry) -> Entry:
        """``entry`` as loaded, with the batch outcomes that could not be written."""
        known = self._unsaved.get(entry.id)
        if known is None:
            return entry
        for index, (on_disk, remembered) in enumerate(
            zip(entry.batches, known.batches, strict=False)
        ):
            if (
                on_disk.state == "pending"
                and remembered.state != "pending"
                and on_disk.recipients == remembered.recipients
            ):
                entry = entry.with_batch(index, remembered)
        return entry

    async def _forget(self, entry: Entry) -> None:
        self._unsaved.pop(entry.id, None)
        try:
            await self._removes.submit(entry.id)
        except SpoolError as exc:
            delivery_log.error("%s: delivered but not removed: %s", entry.id, exc)

    def _load(self, entry_id: str) -> tuple[Entry, bytes]:
        entry = self._spool.load(entry_id)
        try:
            message = self._spool.message(entry_id)
        except NoSuchEntry:
            if self._spool.find(entry_id) == QUEUE:  # the envelope is still there
                raise UnreadableEntry("its message file is missing") from None
            raise
        return entry, message

    def _log(self, entry: Entry, status: str, event: str) -> None:
        """The line of a message that left the queue (``event``: "removed",
        every batch sent; "dead", moved to the dead-letter area)."""
        delivery_log.info(
            "%s: from=<%s> rcpts=%d attempts=%d status=%s",
            entry.id,
            entry.sender,
            len(entry.recipients),
            entry.attempts,
            status,
            extra={
                "event": event,
                "queue_id": entry.id,
                "from": entry.sender,
                "recipients": len(entry.recipients),
                "attempts": entry.attempts,
                "bounce_id": entry.bounce,
            },
        )

    def _done(self, entry_id: str) -> None:
        self._in_flight.discard(entry_id)
        if not self._in_flight:
            self._idle.set()

    # -- background

    def _schedule(self, entry_id: str, when: float) -> None:
        if self._due.schedule(entry_id, when):
            self._wake.set()

    async def _scheduler(self) -> None:
        """Hand due entries to the workers; sleep until the next one is due."""
        while True:
            now = self._clock.wall()
            for entry_id in self._due.pop_due(now):
                if entry_id in self._in_flight:
                    continue  # the attempt in flight settles it
                self._in_flight.add(entry_id)
                self._work.put_nowait(entry_id)
            self._wake.clear()
            due = self._due.next_due()
            with contextlib.suppress(TimeoutError):
                await wait_for(self._clock, self._wake.wait(), None if due is None else due - now)

    async def _worker(self) -> None:
        while True:
            entry_id = await self._work.get()
            try:
                await self._deliver_queued(entry_id)
            except Exception:
                delivery_log.exception("%s: delivery failed unexpectedly", entry_id)
                self._schedule(entry_id, self._later())
            finally:
                self._done(entry_id)

    async def _deliver_queued(self, entry_id: str) -> None:
        if self.account.pause_left() > PAUSE_SLACK:  # all delivery paused: not an attempt
            self._schedule(entry_id, self.account.resume_at())
            return
        try:
            entry, message = await asyncio.to_thread(self._load, entry_id)
        except NoSuchEntry:
            return  # delivered or deleted meanwhile
        except UnreadableEntry as exc:
            # Garbled while queued: set aside for a person, as at start-up.
            await asyncio.to_thread(self._spool.quarantine, entry_id, QUEUE, reason=str(exc))
            return
        except SpoolError as exc:
            delivery_log.error("%s: cannot load: %s", entry_id, exc)
            self._schedule(entry_id, self._later())
            return
        entry = self._recall(entry)
        if expired(entry.received, self._clock.wall(), self._config.delivery.max_age):
            # Given up on: what is still pending fails, and is bounced.
            pending = entry.pending()
            entry = expire(entry)
            for index in pending:
                msglog.expired(entry, entry.batches[index])
            await self._save(entry)
            await self._settle(_Attempt(entry, message, {}))
            return
        budget = self._config.ses.request_timeout * self._config.ses.max_attempts
        await self._settle(await self._attempt(entry, message, budget))


def _log_failures(attempt: _Attempt) -> None:
    """A line for each batch SES refused for good in ``attempt``."""
    for index, error in attempt.errors.items():
        if error.disposition is Disposition.PERMANENT:
            msglog.bounced(attempt.entry, attempt.entry.batches[index], error)


def _log_orphan_failure(task: asyncio.Task[DataReply]) -> None:
    """What became of an inline attempt whose client is gone (no one else sees it)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        delivery_log.error("%s failed unexpectedly", task.get_name(), exc_info=error)
