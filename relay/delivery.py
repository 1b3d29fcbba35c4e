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
- ``relay.workers``: which queued message is attempted when (the due-time
  queue, ``relay.duequeue``), by ``delivery.concurrency`` workers;
- ``relay.account``: the SES account's sending rate, outage, pauses and quota;
- ``relay.record``: each entry's delivery state in the spool, and in memory
  where it could not be written;
- ``relay.bouncer``: the delivery status notifications;
- ``relay.space``: whether the spool has room for another message;
- ``relay.clock``: the one clock all of them read and sleep on.

SES is "a sender" (``relay.ses.sender.SesSender``): send one batch, read the
account's quota; which API and wire format serve it is the sender's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

from relay import msglog
from relay.account import Account
from relay.bouncer import Bouncer
from relay.clock import Clock, SystemClock
from relay.config import Config
from relay.errors import Disposition, NoSuchEntry, SesError, SpoolError, UnreadableEntry
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
    batch_refused,
    batch_sent,
    expire,
    queued_reply,
    sent_reply,
)
from relay.queueid import new_id
from relay.record import Record
from relay.schedule import expired
from relay.ses.sender import RawMessage, SendRequest, SesSender
from relay.space import FreeSpace
from relay.spool import DEAD, QUEUE, Batch, Entry, Spool
from relay.spoolfile import MessageFile
from relay.workers import Workers

RESCAN_CHUNK = 4096
"""Ids a rescan lists in a thread before scheduling them on the loop."""
COMMITS = 4
"""Commits of new entries running at once, each in its own thread: their
fsyncs overlap (the journal merges them), so a message never waits for
several others' fsyncs in a row."""


def request_for(entry: Entry, message: RawMessage, batch: Batch) -> SendRequest:
    return SendRequest(message, batch.recipients, entry.source, entry.ses, queue_id=entry.id)


@dataclass(slots=True)
class _Attempt:
    """One delivery attempt's view of an entry, updated as batches finish."""

    entry: Entry
    message: RawMessage
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
        space: FreeSpace,
        clock: Clock | None = None,
        jitter: Callable[[], float] = random.random,
        metrics: RelayMetrics,
    ) -> None:
        self._config = config
        self._spool = spool
        self._space = space
        self._metrics = metrics
        self._sender = sender
        self._clock = clock = clock or SystemClock()
        self._jitter = jitter
        self.account = Account(config, clock, sender, waited=metrics.send_rate_wait)
        self._bouncer = Bouncer(config, spool, clock, metrics)
        self._record = Record(spool)
        self._commits = GroupCommit(spool.commit, concurrency=COMMITS)
        """New entries staged on the loop are made durable together: one
        thread hop and one fsync of ``queue/`` for the messages that arrive
        while the commits run (no thread runs Python per message)."""
        self._journal_commits = GroupCommit(begin=spool.journal.begin, concurrency=COMMITS)
        """Small new messages, likewise: one write of the journal (on the
        loop) and one fdatasync (in a thread) for those that arrive together
        (``relay.journal``)."""
        self._workers = Workers(clock, self._deliver_queued)
        self._tasks: list[asyncio.Task[None]] = []
        """Following the account's quota (``ses.max_send_rate = 0``)."""
        self._accepting: set[asyncio.Task[None]] = set()
        """Commits and inline attempts: they outlive a client that hangs up."""

    # -- life cycle

    async def start(self) -> None:
        """Start the scheduler and workers, and resume the queued entries in
        the background: the spool is open, so mail is accepted and kept
        while the queue is read (the caller listens at once)."""
        self._workers.start(self._config.delivery.concurrency)
        if self._config.ses.max_send_rate <= 0:
            follow = self.account.follow_quota(self._config.delivery.quota_refresh)
            self._tasks.append(asyncio.create_task(follow, name="relay-quota"))
        self._tasks.append(asyncio.create_task(self.rescan(), name="relay-rescan"))

    async def quiesce(self) -> None:
        """Start no new attempt; return when the attempts in flight are done
        (the caller bounds the wait, then calls ``stop``)."""
        await self._workers.quiesce()

    async def stop(self) -> None:
        """Cancel whatever still runs; what is not done stays queued."""
        # Inline attempts still running belong to clients that hung up or were
        # cut off: their entries are on disk and resume at the next start.
        tasks = [*self._tasks, *self._accepting]
        for task in tasks:
            task.cancel()
        await self._workers.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        # A commit or removal already in a thread ends before the spool may be closed.
        await self._commits.idle()
        await self._journal_commits.idle()
        await self._record.idle()

    async def retry_now(self) -> None:
        """``ses-relay queue retry`` (SIGUSR1): end a pause of all delivery and
        an outage (``Account.retry_now``) and try what is due."""
        self.account.retry_now()
        await self.rescan()

    def take_over(self, entry_ids: Iterable[str]) -> None:
        """Deliver entries moved into the spool while it runs (a partition
        adopted, ``relay.partitions``), from now."""
        for entry_id in entry_ids:
            self._workers.schedule(entry_id, 0.0)

    async def rescan(self) -> None:
        """Schedule every entry in the queue (start-up, and ``ses-relay queue
        retry`` through SIGUSR1) by its id alone, from a streamed listing:
        each is due at once, oldest first (ids sort by arrival), and its
        envelope is read when it comes up; one whose ``next_attempt`` is
        later is then kept for that time (``_not_due``)."""
        ids = self._spool.ids(QUEUE)  # closed when dropped, if a stop cuts this short
        count = 0
        while chunk := await asyncio.to_thread(_take, ids, RESCAN_CHUNK):
            for entry_id in chunk:
                self._workers.schedule(entry_id, 0.0)
            count += len(chunk)
        if count:
            delivery_log.info("queue: %d messages to deliver", count)

    # -- the DATA path

    def new_message(self, entry_id: str) -> MessageFile:
        """The file a message arriving by DATA is written to (created with its first write)."""
        return self._spool.new_message(entry_id)

    async def accept(self, entry: Entry, message: MessageFile) -> DataReply:
        """Commit, then try SES inline; the reply for the client's DATA.

        The work runs in its own task: if the client hangs up (aiosmtpd then
        cancels the DATA hook), a message already committed is still tried
        and scheduled; it is ours from the fsync on."""
        reply: asyncio.Future[DataReply] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._answer(reply, entry, message), name=f"relay-accept-{entry.id}"
        )
        self._accepting.add(task)
        task.add_done_callback(self._accepting.discard)
        try:
            return await reply  # a client that hangs up cancels this future, not the task
        except asyncio.CancelledError:
            task.add_done_callback(_log_orphan_failure)
            raise

    async def _answer(
        self, reply: asyncio.Future[DataReply], entry: Entry, message: MessageFile
    ) -> None:
        """``_accept``, its outcome handed to ``reply`` as soon as it is known:
        the client's session wakes in the next turn of the event loop (through
        the task's end and ``asyncio.shield``, two turns later). An error of a
        client that is gone is the task's, for ``_log_orphan_failure``."""
        try:
            answer = await self._accept(entry, message)
        except asyncio.CancelledError:
            reply.cancel()
            raise
        except Exception as exc:
            if reply.done():
                raise
            reply.set_exception(exc)
            return
        if not reply.done():
            reply.set_result(answer)

    async def _accept(self, entry: Entry, message: MessageFile) -> DataReply:
        try:
            raw = await self._commit(entry, message)
        except (OSError, SpoolError) as exc:
            return DataReply.refused(self._space.refuse(entry.id, exc))
        with raw:
            self._workers.claim(entry.id)
            try:
                attempt = await self._attempt(entry, raw, self._config.delivery.inline_timeout)
                return await self._settle(attempt, inline=True)
            except Exception:
                # Committed: the background keeps the promise, so 250 is the truth.
                delivery_log.exception("%s: inline delivery failed unexpectedly", entry.id)
                self._workers.schedule(entry.id, self._later())
                return queued_reply(entry)
            finally:
                self._workers.release(entry.id)

    async def _commit(self, entry: Entry, message: MessageFile) -> RawMessage:
        """Make a new entry durable (``SpoolError``, ``OSError``: nothing
        kept); the message to send. A message still wholly in memory goes to
        the journal, a larger one (already partly in its file) into the
        queue; the file is closed either way, whatever becomes of this task."""
        held = message.held()
        if held is not None:
            message.discard()
            await self._journal_commits.submit(self._spool.journal_put(entry, held))
            self._record.journaled(entry, held)
            return RawMessage.of(held)
        try:
            raw = message.reader()  # its own descriptor of the file
        except OSError:
            message.discard()
            raise
        try:
            await self._commits.submit(self._spool.stage(entry, message))
        except BaseException:
            raw.close()
            raise
        return raw

    # -- the background

    async def _deliver_queued(self, entry_id: str) -> None:
        """A worker's attempt of a queued entry that is due."""
        try:
            await self._attempt_queued(entry_id)
        except Exception:
            delivery_log.exception("%s: delivery failed unexpectedly", entry_id)
            self._workers.schedule(entry_id, self._later())

    async def _attempt_queued(self, entry_id: str) -> None:
        if self.account.paused():  # all delivery paused: not an attempt
            self._workers.schedule(entry_id, self.account.resume_at())
            return
        try:
            entry = await self._record.envelope(entry_id)
            if self._not_due(entry):
                return
            message = await self._record.message(entry_id)
        except NoSuchEntry:
            return  # delivered or deleted meanwhile
        except UnreadableEntry as exc:
            # Garbled while queued: set aside for a person, as at start-up.
            await asyncio.to_thread(self._spool.quarantine, entry_id, QUEUE, reason=str(exc))
            return
        except SpoolError as exc:
            delivery_log.error("%s: cannot load: %s", entry_id, exc)
            self._workers.schedule(entry_id, self._later())
            return
        with message:
            if expired(entry.received, self._clock.wall(), self._config.delivery.max_age):
                # Given up on: what is still pending fails, and is bounced.
                pending = entry.pending()
                entry = expire(entry)
                for index in pending:
                    msglog.expired(entry, entry.batches[index])
                await self._record.save(entry)
                await self._settle(_Attempt(entry, message, {}))
                return
            budget = self._config.ses.request_timeout * self._config.ses.max_attempts
            await self._settle(await self._attempt(entry, message, budget))

    # -- attempts

    async def _attempt(self, entry: Entry, message: RawMessage, budget: float) -> _Attempt:
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
                new = batch_refused(batch, error)
                self._metrics.batch("failed" if new.state == "failed" else "deferred")
            else:
                self.account.answered()
                self._metrics.batch("sent")
                new = batch_sent(batch, result.message_id)
                msglog.sent(entry, new)
            async with lock:
                attempt.entry = attempt.entry.with_batch(index, new)
                if all(b.state == "sent" for b in attempt.entry.batches):
                    return  # removed next: the same crash window, one fsync fewer
                await self._record.save(attempt.entry)

        pending = entry.pending()
        if len(pending) == 1:  # most mail: no task, and no loop turns to start and join one
            await send(pending[0])
        else:
            await asyncio.gather(*(send(i) for i in pending))
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
                # Closed first: the removal's unlink then frees the file in its
                # thread, not a close of the last descriptor on the loop.
                attempt.message.close()
                await self._record.remove(entry)
                if inline:
                    return sent_reply(entry)  # the handler logs the outcome with the reply
                self._log(entry, "sent", "removed")
                if entry.bounce_of is not None:
                    self._bouncer.sent()
            case Refuse(reply):
                # SES took none of it: the client gets SES's refusal and keeps
                # the message; nothing of ours remains.
                attempt.message.close()
                await self._record.remove(entry)
                return DataReply.refused(reply)
            case Wait(at):
                # Nothing was sent: waiting for the sending rate (or the end of
                # a pause of all delivery) is not a failed attempt.
                await self._record.keep(entry)
                self._workers.schedule(entry.id, at)
                delivery_log.debug("%s: waiting for the SES sending rate", entry.id)
            case Retry(retried, why):
                await self._record.save(retried)
                self._workers.schedule(entry.id, retried.next_attempt)
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

    async def _give_up(self, entry: Entry, message: RawMessage, failed: Sequence[Batch]) -> None:
        """Bounce the failed recipients and move the entry to the dead-letter area.

        Exactly one bounce, across crashes: its id is recorded in the entry
        before it is written; a recorded bounce that is still in the spool is
        not written again; and a bounce is not delivered while its message is
        still in the queue (``_not_due``), so one that is not in the spool
        was never written. Anything that cannot be written
        now is tried again after ``delivery.retry_min``."""
        if not await self._record.keep(entry):
            self._workers.schedule(entry.id, self._later())
            return
        if self._bouncer.wanted(entry):
            if entry.bounce is None:
                entry = replace(entry, bounce=new_id())
                if not await self._record.save(entry):
                    self._workers.schedule(entry.id, self._later())
                    return
            queued = await self._bouncer.queue(entry, message, failed)
            if queued is None:
                self._workers.schedule(entry.id, self._later())
                return
            entry = queued
        try:
            await asyncio.to_thread(self._spool.move, entry, QUEUE, DEAD)
        except NoSuchEntry:
            delivery_log.warning("%s: deleted while being delivered", entry.id)
        except SpoolError as exc:
            delivery_log.error("%s: cannot move to the dead-letter area: %s", entry.id, exc)
            self._workers.schedule(entry.id, self._later())
            return
        self._record.left(entry.id)
        if entry.bounce is not None:
            self._workers.schedule(entry.bounce, 0.0)
        if entry.bounce_of is not None:
            self._bouncer.failed(entry, failed)
            return
        self._log(entry, f"bounced ({sum(len(b.recipients) for b in failed)} recipients)", "dead")

    def _later(self) -> float:
        """When to try again after a fault of ours (wall time)."""
        return self._clock.wall() + self._config.delivery.retry_min

    def _not_due(self, entry: Entry) -> bool:
        """Whether ``entry``, just read, is not to be tried now: its
        ``next_attempt`` is later (it is kept for then), or it is the
        notification of a message still queued (scheduled when that message
        leaves the queue: ``_give_up``). A rescan schedules entries before
        reading them; this is where they wait.

        The second check runs on the loop (one ``stat``, notifications only)
        and nothing is awaited between it and the end of the attempt: a
        move that ends after it schedules the notification afresh."""
        if entry.next_attempt > self._clock.wall():
            self._workers.schedule(entry.id, entry.next_attempt)
            return True
        return entry.bounce_of is not None and self._spool.find(entry.bounce_of) == QUEUE

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


def _take(ids: Iterator[str], count: int) -> list[str]:
    """The next ``count`` ids (fewer at the end)."""
    return list(itertools.islice(ids, count))


def _log_failures(attempt: _Attempt) -> None:
    """A line for each batch SES refused for good in ``attempt``."""
    for index, error in attempt.errors.items():
        if error.disposition is Disposition.PERMANENT:
            msglog.bounced(attempt.entry, attempt.entry.batches[index], error)


def _log_orphan_failure(task: asyncio.Task[None]) -> None:
    """What became of an inline attempt whose client is gone (no one else sees it)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        delivery_log.error("%s failed unexpectedly", task.get_name(), exc_info=error)
