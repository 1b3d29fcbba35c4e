"""Delivering accepted messages to SES: inline first, then from the spool.

``Delivery.accept`` is the DATA path: the message is committed to the spool
(``250`` is a promise), then SES is tried at once within
``delivery.inline_timeout``. Every batch's outcome is written to the spool as
soon as SES answers, so a restart never resends a batch SES accepted. What
is left pending is delivered in the background by ``delivery.concurrency``
workers on a retry schedule, at the account's sending rate, until
``delivery.max_age``; recipients that fail permanently after ``250`` get a
delivery status notification and the message moves to the dead-letter area.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from relay.clock import Clock, SystemClock, wait_for
from relay.config import Config
from relay.dsn import FailedRecipient, bounce_sender, build_dsn, should_bounce
from relay.errors import Disposition, SesError, SmtpReply
from relay.log import delivery_log
from relay.metrics import RelayMetrics
from relay.oneline import one_line
from relay.outage import Outage
from relay.ratelimit import SendRate
from relay.schedule import expired, next_attempt_at
from relay.ses.client import SendQuota, SesClient
from relay.ses.query import SendRawEmailRequest
from relay.spool import DEAD, MAX_HISTORY, QUEUE, Batch, Entry, NoSuchEntry, Spool, SpoolError

MAX_IDS_IN_REPLY = 5
PAUSE_SLACK = 0.05
LOG_TEXT_LIMIT = 500
"""Characters of an error's text kept in one log line."""
"""Seconds of a pause short enough to wait for in the sending-rate queue."""
SPACE_CHECK_INTERVAL = 1.0
SPACE_RECHECK_INTERVAL = 0.1
"""Seconds between fresh readings before a MAIL is refused for lack of space."""
STORAGE_FULL = SmtpReply(452, "4.3.1", "Insufficient system storage, try again later")


def new_queue_id() -> str:
    """A unique id for one message: time-ordered, like Postfix's long queue ids."""
    return f"{time.time_ns() // 1000:014X}{random.getrandbits(24):06X}"


def queue_id_time(queue_id: str) -> float | None:
    """The Unix time a ``new_queue_id`` was made; None for another kind of id."""
    if len(queue_id) != 20:
        return None
    try:
        return int(queue_id[:14], 16) / 1e6
    except ValueError:
        return None


def request_for(entry: Entry, message: bytes, batch: Batch) -> SendRawEmailRequest:
    ses = entry.ses
    return SendRawEmailRequest(
        raw_message=message,
        destinations=batch.recipients,
        source=entry.source,
        from_arn=ses.get("from_arn"),
        source_arn=ses.get("source_arn"),
        return_path_arn=ses.get("return_path_arn"),
        configuration_set=ses.get("configuration_set"),
        tags=tuple((str(k), str(v)) for k, v in ses.get("tags", ())),
    )


def sent_reply(entry: Entry) -> SmtpReply:
    ids = [b.message_id for b in entry.batches if b.message_id]
    shown = " ".join(ids[:MAX_IDS_IN_REPLY]) or "(SES gave no usable message id)"
    more = f" and {len(ids) - MAX_IDS_IN_REPLY} more" if len(ids) > MAX_IDS_IN_REPLY else ""
    return SmtpReply(250, "2.0.0", f"Ok: {entry.id} sent as {shown}{more}")


def queued_reply(entry: Entry) -> SmtpReply:
    return SmtpReply(250, "2.0.0", f"Ok: queued as {entry.id}")


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
        ses: SesClient,
        *,
        clock: Clock | None = None,
        jitter: Callable[[], float] = random.random,
        metrics: RelayMetrics,
    ) -> None:
        self._config = config
        self._spool = spool
        self._metrics = metrics
        self.quota: SendQuota | None = None
        """The account's quota as GetSendQuota last said (``ses.max_send_rate = 0``)."""
        self._ses = ses
        self._time = clock = clock or SystemClock()
        self._clock = clock.wall
        self._jitter = jitter
        self.rate = SendRate(clock=clock, rate=config.ses.max_send_rate)
        self.outage = Outage(first=config.delivery.retry_min, longest=config.delivery.retry_max)
        self._monotonic = clock.monotonic
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._in_flight: set[str] = set()
        self._idle = asyncio.Event()
        """Set when the last attempt in flight ends."""
        self._work: asyncio.Queue[str] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._checks: set[asyncio.Task[None]] = set()
        self._accepting: set[asyncio.Task[SmtpReply]] = set()
        """Commits and inline attempts: they outlive a client that hangs up."""
        self._unsaved: dict[str, Entry] = {}
        """Entries whose latest batch outcomes could not be written (full
        disk): what SES accepted is remembered here until a write succeeds."""
        self._free_bytes: int | None = None
        self._free_checked = -SPACE_CHECK_INTERVAL
        self._free_read = -SPACE_RECHECK_INTERVAL
        self._space_floor = int(config.smtp.max_message_size * 1.5)

    # -- life cycle

    async def start(self) -> None:
        """Resume every queued entry, then start the scheduler and workers."""
        await self.rescan()
        await self._refresh_free_space()
        self._tasks.append(asyncio.create_task(self._scheduler(), name="relay-scheduler"))
        for number in range(self._config.delivery.concurrency):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"relay-worker-{number}"))
        if self._config.ses.max_send_rate <= 0:
            self._tasks.append(asyncio.create_task(self._follow_quota(), name="relay-quota"))

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

    async def retry_now(self) -> None:
        """``ses-relay queue retry`` (SIGUSR1): end a pause of all delivery (an
        operator may have raised the quota or fixed the cause; SES says again
        if not) and try what is due."""
        if self.rate.paused_until is not None:
            self.rate.resume()
            delivery_log.warning("delivery pause ended by 'ses-relay queue retry'")
        self.outage.answered()  # an outage is looked for afresh: a pause after 10 failures
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
        now = self._monotonic()
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
        if self._monotonic() - self._free_read >= SPACE_RECHECK_INTERVAL:
            await self._refresh_free_space()
        return self._free_bytes is None or self._free_bytes >= self._space_floor

    async def _refresh_free_space(self) -> None:
        try:
            self._free_bytes = await asyncio.to_thread(self._spool.free_bytes)
        except (OSError, SpoolError) as exc:
            delivery_log.warning("cannot read free space of the spool: %s", exc)
        self._free_read = self._monotonic()

    async def accept(self, entry: Entry, message: bytes) -> SmtpReply:
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

    async def _accept(self, entry: Entry, message: bytes) -> SmtpReply:
        try:
            await asyncio.to_thread(self._spool.put, entry, message)
        except SpoolError as exc:
            delivery_log.error("%s: not accepted: %s", entry.id, exc)
            self._free_checked = -SPACE_CHECK_INTERVAL
            return STORAGE_FULL
        self._in_flight.add(entry.id)
        try:
            attempt = await self._attempt(entry, message, self._config.delivery.inline_timeout)
            return await self._after_inline(attempt)
        except Exception:
            # Committed: the background keeps the promise, so 250 is the truth.
            delivery_log.exception("%s: inline delivery failed unexpectedly", entry.id)
            self._schedule(entry.id, self._clock() + self._config.delivery.retry_min)
            return queued_reply(entry)
        finally:
            self._done(entry.id)

    async def _after_inline(self, attempt: _Attempt) -> SmtpReply:
        entry = attempt.entry
        states = {b.state for b in entry.batches}
        if states == {"sent"}:
            await self._forget(entry)  # the handler logs the outcome with the reply
            return sent_reply(entry)
        if states == {"failed"}:
            # SES took none of it: the client gets SES's refusal and keeps
            # the message; nothing of ours remains.
            await self._forget(entry)
            return attempt.errors[min(attempt.errors)].smtp_reply
        await self._settle(attempt)
        return queued_reply(entry)

    # -- attempts

    async def _attempt(self, entry: Entry, message: bytes, budget: float) -> _Attempt:
        """Send every pending batch at once, each within ``budget`` seconds;
        write each outcome to the spool as it arrives."""
        attempt = _Attempt(entry, message, {})
        ends = self._monotonic() + budget
        lock = asyncio.Lock()

        async def send(index: int) -> None:
            batch = attempt.entry.batches[index]
            if not await self._token(len(batch.recipients), ends):
                attempt.starved = True  # stays pending; nothing was sent
                return
            try:
                result = await self._ses.send_raw_email(
                    request_for(entry, message, batch),
                    deadline=max(0.1, ends - self._monotonic()),
                )
            except SesError as error:
                self._react(error)
                attempt.errors[index] = error
                permanent = error.disposition is Disposition.PERMANENT
                self._metrics.batch("failed" if permanent else "deferred")
                new = replace(
                    batch,
                    state="failed" if permanent else "pending",
                    error=str(error.smtp_reply),
                )
            else:
                self.outage.answered()
                self._metrics.batch("sent")
                new = replace(batch, state="sent", message_id=result.message_id, error=None)
            async with lock:
                attempt.entry = attempt.entry.with_batch(index, new)
                if all(b.state == "sent" for b in attempt.entry.batches):
                    return  # removed next: the same crash window, one fsync fewer
                await self._save(attempt.entry)

        await asyncio.gather(*(send(i) for i in entry.pending()))
        return attempt

    async def _token(self, recipients: int, ends: float) -> bool:
        """Take sending-rate tokens for ``recipients`` before ``ends``
        (monotonic); False, at once if a pause of all delivery outlasts it."""
        paused_until = self.rate.paused_until
        if paused_until is not None and paused_until > ends:
            return False
        try:
            await wait_for(self._time, self.rate.acquire(recipients), ends - self._monotonic())
        except TimeoutError:
            return False
        return True

    def pause_left(self) -> float:
        """Seconds left of a pause of all delivery (quota, account, outage); 0
        when there is none."""
        paused_until = self.rate.paused_until
        return 0.0 if paused_until is None else max(0.0, paused_until - self._monotonic())

    def _resume_at(self) -> float:
        """When sending may go on (clock time): now, or the end of a pause."""
        return self._clock() + self.pause_left()

    def _react(self, error: SesError) -> None:
        """Throttling slows the shared rate; an error of the whole account
        (daily quota, sending paused, credentials refused) or an outage
        pauses it, so that queued mail does not hammer SES with calls bound
        to fail."""
        if error.retryable and error.code != "Throttling":
            now = self._monotonic()
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
            ends = self._monotonic() + error.pause
            if self.rate.paused_until is None or self.rate.paused_until < ends - 1:
                delivery_log.warning(
                    "pausing all delivery for %ds: %s",
                    error.pause,
                    one_line(str(error), LOG_TEXT_LIMIT),
                )
            self.rate.pause_until(ends)
        elif error.code == "Throttling":
            self.rate.throttled()

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

    async def _settle(self, attempt: _Attempt) -> None:
        """After an attempt: schedule what is pending, or finish the entry."""
        entry = attempt.entry
        if entry.pending() and not attempt.errors and attempt.starved:
            # Nothing was sent: waiting for the sending rate (or the end of a
            # pause of all delivery) is not a failed attempt.
            self._schedule(entry.id, self._resume_at())
            delivery_log.debug("%s: waiting for the SES sending rate", entry.id)
            return
        if entry.pending():
            now = self._clock()
            errors = "; ".join(
                one_line(f"{e.code}: {e.message}", 200) for e in attempt.errors.values()
            )
            history = (*entry.history, f"{_stamp(now)} {errors or 'no answer in time'}")
            retry_at = next_attempt_at(
                received=entry.received,
                now=now,
                attempt=entry.attempts + 1,
                minimum=self._config.delivery.retry_min,
                maximum=self._config.delivery.retry_max,
                max_age=self._config.delivery.max_age,
                jitter=self._jitter(),
            )
            entry = replace(
                entry,
                attempts=entry.attempts + 1,
                next_attempt=retry_at,
                history=history[-MAX_HISTORY:],
            )
            await self._save(entry)
            self._schedule(entry.id, retry_at)
            self._metrics.retry()
            self._log(entry, f"deferred ({errors or 'no answer in time'})")
            return
        failed = [b for b in entry.batches if b.state == "failed"]
        if not failed:
            await self._forget(entry)
            self._log(entry, "sent")
            if entry.bounce_of is not None:
                self._metrics.bounce("sent")
            return
        await self._give_up(entry, attempt.message, failed)

    async def _give_up(self, entry: Entry, message: bytes, failed: Sequence[Batch]) -> None:
        """Bounce the failed recipients and move the entry to the dead-letter area.

        Exactly one bounce, across crashes: its id is recorded in the entry
        before it is written; a recorded bounce that is still in the spool is
        not written again; and a bounce is not delivered (nor scheduled by
        ``rescan``) while its message is still in the queue, so one that is
        not in the spool was never written. Anything that cannot be written
        now is tried again after ``delivery.retry_min``."""
        retry_at = self._clock() + self._config.delivery.retry_min
        if should_bounce(entry.sender, self._config.delivery.bounces):
            if entry.bounce is None:
                entry = replace(entry, bounce=new_queue_id())
                if not await self._save(entry):
                    self._schedule(entry.id, retry_at)
                    return
            queued = await self._queue_bounce(entry, message, failed)
            if queued is None:
                self._schedule(entry.id, retry_at)
                return
            entry = queued
        try:
            await asyncio.to_thread(self._spool.move, entry, QUEUE, DEAD)
        except NoSuchEntry:
            delivery_log.warning("%s: deleted while being delivered", entry.id)
        except SpoolError as exc:
            delivery_log.error("%s: cannot move to the dead-letter area: %s", entry.id, exc)
            self._schedule(entry.id, retry_at)
            return
        self._unsaved.pop(entry.id, None)
        if entry.bounce is not None:
            self._schedule(entry.bounce, 0.0)
        if entry.bounce_of is not None:
            self._bounce_failed(entry, failed)
            return
        self._log(entry, f"bounced ({sum(len(b.recipients) for b in failed)} recipients)")

    def _bounce_failed(self, bounce: Entry, failed: Sequence[Batch]) -> None:
        """A bounce given up on (now in the dead-letter area): its recipient,
        the failed message's sender, will not be told. Said loudly, once."""
        reason = "; ".join(dict.fromkeys(b.error or "no reason given" for b in failed))
        delivery_log.error(
            "%s: the bounce for %s to <%s> failed, so its sender is not told: %s; kept in the "
            "dead-letter area (ses-relay queue show %s); bounces come from <%s>: if SES "
            "refuses that sender, verify it or set delivery.bounce_sender to an identity "
            "verified in SES",
            bounce.id,
            bounce.bounce_of,
            ", ".join(bounce.recipients),
            one_line(reason, LOG_TEXT_LIMIT),
            bounce.id,
            bounce.source,
        )
        self._metrics.bounce("failed")

    async def _forget(self, entry: Entry) -> None:
        self._unsaved.pop(entry.id, None)
        try:
            await asyncio.to_thread(self._spool.remove, entry.id)
        except SpoolError as exc:
            delivery_log.error("%s: delivered but not removed: %s", entry.id, exc)

    async def _queue_bounce(
        self, entry: Entry, message: bytes, failed: Sequence[Batch]
    ) -> Entry | None:
        """Write the DSN ``entry.bounce`` to the envelope sender (sent with the
        null sender) unless it is in the spool already. The entry to move to
        the dead-letter area (without ``bounce`` if none can be built), or
        None to try again later."""
        dsn_id = entry.bounce
        assert dsn_id is not None
        try:
            if await asyncio.to_thread(self._spool.find, dsn_id) is not None:
                return entry  # written before a crash or a failed move
        except SpoolError as exc:
            delivery_log.error("%s: cannot look for its bounce %s: %s", entry.id, dsn_id, exc)
            return None
        now = self._clock()
        bounce_from = bounce_sender(
            self._config.delivery.bounce_sender, entry.source, self._config.smtp.hostname
        )
        try:
            report = build_dsn(
                original=message,
                queue_id=entry.id,
                sender=entry.sender,
                failed=[
                    _failed_recipient(address, batch)
                    for batch in failed
                    for address in batch.recipients
                ],
                reporting_mta=self._config.smtp.hostname,
                bounce_from=bounce_from,
                arrival=datetime.fromtimestamp(entry.received, UTC),
                now=datetime.fromtimestamp(now, UTC),
                message_id=f"<{dsn_id}@{self._config.smtp.hostname}>",
            )
        except ValueError as exc:
            delivery_log.error("%s: cannot build a bounce: %s", entry.id, exc)
            return replace(entry, bounce=None)  # nothing to send; dead all the same
        bounce = Entry(
            id=dsn_id,
            received=now,
            client="localhost",
            sender="",
            source=bounce_from,
            recipients=(entry.sender,),
            batches=(Batch(recipients=(entry.sender,)),),
            bounce_of=entry.id,
        )
        try:
            await asyncio.to_thread(self._spool.put, bounce, report)
        except SpoolError as exc:
            delivery_log.error("%s: cannot queue the bounce: %s", entry.id, exc)
            return None
        delivery_log.info("%s: bounce queued as %s to <%s>", entry.id, dsn_id, entry.sender)
        self._metrics.bounce("queued")
        return entry

    def _log(self, entry: Entry, status: str) -> None:
        delivery_log.info(
            "%s: from=<%s> rcpts=%d attempts=%d status=%s",
            entry.id,
            entry.sender,
            len(entry.recipients),
            entry.attempts,
            status,
        )

    def _done(self, entry_id: str) -> None:
        self._in_flight.discard(entry_id)
        if not self._in_flight:
            self._idle.set()

    # -- background

    def _schedule(self, entry_id: str, when: float) -> None:
        current = self._due.get(entry_id)
        if current is not None and current <= when:
            return
        self._due[entry_id] = when
        heapq.heappush(self._heap, (when, entry_id))
        self._wake.set()

    async def _scheduler(self) -> None:
        """Hand due entries to the workers; sleep until the next one is due."""
        while True:
            now = self._clock()
            while self._heap and self._heap[0][0] <= now:
                when, entry_id = heapq.heappop(self._heap)
                if self._due.get(entry_id) != when:
                    continue  # superseded by an earlier schedule
                del self._due[entry_id]
                if entry_id in self._in_flight:
                    continue  # the attempt in flight settles it
                self._in_flight.add(entry_id)
                self._work.put_nowait(entry_id)
            self._wake.clear()
            wait = self._heap[0][0] - now if self._heap else None
            with contextlib.suppress(TimeoutError):
                await wait_for(self._time, self._wake.wait(), wait)

    async def _worker(self) -> None:
        while True:
            entry_id = await self._work.get()
            try:
                await self._deliver_queued(entry_id)
            except Exception:
                delivery_log.exception("%s: delivery failed unexpectedly", entry_id)
                self._schedule(entry_id, self._clock() + self._config.delivery.retry_min)
            finally:
                self._done(entry_id)

    async def _deliver_queued(self, entry_id: str) -> None:
        if self.pause_left() > PAUSE_SLACK:  # all delivery paused: not an attempt
            self._schedule(entry_id, self._resume_at())
            return
        try:
            entry, message = await asyncio.to_thread(self._load, entry_id)
        except NoSuchEntry:
            return  # delivered or deleted meanwhile
        except ValueError as exc:
            # Garbled while queued: set aside for a person, as at start-up.
            await asyncio.to_thread(self._spool.quarantine, entry_id, QUEUE, reason=str(exc))
            return
        except SpoolError as exc:
            delivery_log.error("%s: cannot load: %s", entry_id, exc)
            self._schedule(entry_id, self._clock() + self._config.delivery.retry_min)
            return
        entry = self._recall(entry)
        now = self._clock()
        if expired(entry.received, now, self._config.delivery.max_age):
            await self._expire(entry, message)
            return
        budget = self._config.ses.request_timeout * self._config.ses.max_attempts
        await self._settle(await self._attempt(entry, message, budget))

    def _load(self, entry_id: str) -> tuple[Entry, bytes]:
        entry = self._spool.load(entry_id)
        try:
            message = self._spool.message(entry_id)
        except NoSuchEntry:
            if self._spool.find(entry_id) == QUEUE:  # the envelope is still there
                raise ValueError("its message file is missing") from None
            raise
        return entry, message

    async def _expire(self, entry: Entry, message: bytes) -> None:
        """Give up on what is still pending after ``delivery.max_age``."""
        last = entry.history[-1] if entry.history else "no delivery attempt succeeded"
        reply = SmtpReply(554, "5.4.7", f"message expired in queue; last error: {last}")
        for index in entry.pending():
            entry = entry.with_batch(
                index, replace(entry.batches[index], state="failed", error=str(reply))
            )
        await self._save(entry)
        await self._settle(_Attempt(entry, message, {}))

    async def _follow_quota(self) -> None:
        """Keep the sending rate at the account's MaxSendRate."""
        while True:
            try:
                quota = await self._ses.get_send_quota()
            except SesError as exc:
                delivery_log.warning(
                    "cannot read the SES send quota: %s", one_line(str(exc), LOG_TEXT_LIMIT)
                )
            else:
                self.quota = quota
                self.rate.set_rate(quota.max_send_rate)
            await self._time.sleep(self._config.delivery.quota_refresh)


def _failed_recipient(address: str, batch: Batch) -> FailedRecipient:
    reply = batch.error or "554 5.0.0 delivery failed"
    _, _, rest = reply.partition(" ")
    enhanced = rest.split(" ", 1)[0] if rest else "5.0.0"
    if enhanced[:1] not in ("4", "5") or enhanced.count(".") != 2:
        enhanced = "5.0.0"
    return FailedRecipient(address, enhanced, f"smtp; {reply}")


def _log_orphan_failure(task: asyncio.Task[SmtpReply]) -> None:
    """What became of an inline attempt whose client is gone (no one else sees it)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        delivery_log.error("%s failed unexpectedly", task.get_name(), exc_info=error)


def _stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
