"""Background loops of a process: the outbox relay and the run-request consumers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from app.aio import wait_event
from app.bus.jetstream import BusUnavailable
from app.services.ports import Message, Queue
from app.store import hot
from app.store.db import database_unavailable as _db_unavailable
from app.store.ledger import SqlLedger
from app.worker.runs import RunExecutor

log = logging.getLogger("spell.worker")


#: how soon a stored webhook delivery is relayed: its handler runs from the queue anyway, and
#: at a steady trickle (200/s) one pass then publishes several deliveries, not one each
WEBHOOK_KICK_DELAY = 0.02


class OutboxRelay:
    """Publishes outbox rows (written with the cast in one transaction), then marks them sent.

    ``msg_id`` is the cast id, so a row published twice (crash between publish and mark) is
    dropped by the queue's duplicate window; the claim step guards against anything older.
    """

    def __init__(
        self,
        ledger: SqlLedger,
        queue: Queue,
        *,
        poll_interval: float = 1.0,
        routes: dict[str, Queue] | None = None,
    ) -> None:
        self.ledger = ledger
        self.queue = queue
        self.poll_interval = poll_interval
        #: subject prefix → queue (e.g. "webhook." → the jobs queue); the rest go to ``queue``
        self.routes = routes or {}
        #: while publishing keeps failing, say so again at most this often (seconds)
        self.report_every = 30.0
        self._kick = asyncio.Event()
        self._kick_later: asyncio.TimerHandle | None = None

    def kick(self, delay: float = 0.0) -> None:
        """Relay now; with ``delay``, within that many seconds (what others kick meanwhile
        joins the same pass: the webhook front kicks this way, so at a steady trickle of
        deliveries one pass publishes several instead of one read + one write each)."""
        if delay <= 0:
            self._kick.set()
        elif self._kick_later is None and not self._kick.is_set():
            self._kick_later = asyncio.get_running_loop().call_later(delay, self._kick_now)

    def _kick_now(self) -> None:
        self._kick_later = None
        self._kick.set()

    def queue_for(self, subject: str) -> Queue:
        for prefix, queue in self.routes.items():
            if subject.startswith(prefix):
                return queue
        return self.queue

    #: rows one pass reads at most; a full page means more may be waiting
    PAGE = 100

    async def relay_once(self) -> int:
        rows = await self.ledger.unsent_outbox(self.PAGE)
        sent: list[int] = []
        try:
            for row in rows:
                headers = {}
                tp = row.payload.get("traceparent")
                if tp:
                    headers["traceparent"] = str(tp)
                await self.queue_for(row.subject).publish(
                    row.subject, row.payload, msg_id=row.msg_id, headers=headers
                )
                sent.append(row.id)
        except BaseException:
            # the rows published before the failure are not sent again (best effort: if this
            # fails too, they go out once more and the queue drops them as duplicates)
            if sent:
                with contextlib.suppress(Exception):
                    await self.ledger.mark_sent(sent)
            raise
        await self.ledger.mark_sent(sent)
        return len(sent)

    async def run(self) -> None:
        failures = 0
        last_report = 0.0
        while True:
            try:
                n = await self.relay_once()
                if failures:
                    log.info("outbox relay recovered after %d failed attempts", failures)
                    failures = 0
                if n >= self.PAGE:
                    continue  # a full page: more may be waiting (else a kick says so)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                now = asyncio.get_running_loop().time()
                if failures == 1 or now - last_report >= self.report_every:
                    last_report = now
                    if isinstance(e, BusUnavailable) or _db_unavailable(e):
                        # an outage, not a bug: the rows stay in the outbox until it is over
                        log.warning(
                            "outbox relay: %s; the messages stay in the outbox, retrying "
                            "(failed %d times so far)",
                            e,
                            failures,
                        )
                    else:
                        log.exception("outbox relay failed; retrying")
                await asyncio.sleep(self.poll_interval)
            await wait_event(self._kick, self.poll_interval)
            self._kick.clear()


def is_dead_letter(msg: Message) -> bool:
    """A delivery the queue hands out after ``max_deliver`` ran out (JetStream's MAX_DELIVERIES
    advisory): whoever owns the subject ends what it was for, then acks it."""
    return msg.dead


async def consume(
    queue: Queue,
    handle: Callable[[Message], Awaitable[None]],
    *,
    concurrency: int,
    stop: asyncio.Event | None = None,
) -> None:
    """``concurrency`` loops, each fetching one message at a time and handling it; once ``stop``
    is set they fetch no more (a message fetched meanwhile is given back with a nak)."""

    async def loop() -> None:
        while stop is None or not stop.is_set():
            try:
                msgs = await queue.fetch(1, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except BusUnavailable as e:
                log.warning("%s; retrying", e)
                await asyncio.sleep(1.0)
                continue
            except Exception:
                log.exception("fetching from the queue failed; retrying")
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                if stop is not None and stop.is_set():
                    await msg.nak()
                    continue
                await handle(msg)

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(loop())


class RunConsumer:
    """N concurrent runners pulling run requests; heartbeat while running; ack after commit."""

    def __init__(
        self,
        queue: Queue,
        executor: RunExecutor,
        *,
        concurrency: int,
        heartbeat_every: float = 10.0,
        max_deliver: int = 5,
    ) -> None:
        self.queue = queue
        self.executor = executor
        self.concurrency = concurrency
        self.heartbeat_every = heartbeat_every
        self.max_deliver = max_deliver
        self.busy = 0
        self.stopping = asyncio.Event()
        self._idle = asyncio.Event()  # set while no run request is being handled
        self._idle.set()

    async def run(self) -> None:
        await consume(self.queue, self.handle, concurrency=self.concurrency, stop=self.stopping)

    async def drain(self, task: asyncio.Task[None], timeout: float) -> bool:
        """Graceful stop: fetch no more, let the running casts finish (commit, then ack), then
        end ``task`` (the one running :meth:`run`). False if runs were still going at
        ``timeout``: they are cancelled, and their casts come back through the lease reaper."""
        self.stopping.set()
        await wait_event(self._idle, timeout)
        drained = self.busy == 0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return drained

    async def handle(self, msg: Message) -> None:
        cast_id = str(msg.payload.get("cast_id", ""))
        if is_dead_letter(msg):
            await self._dead_letter(msg, cast_id)
            return
        log.debug(
            "run request for cast %s (delivery %d)",
            cast_id,
            msg.num_delivered,
            extra={"cast_id": cast_id, "traceparent": msg.headers.get("traceparent")},
        )
        self.busy += 1  # until the ack is sent: a drain waits for it
        self._idle.clear()
        try:
            beat = asyncio.create_task(self._heartbeat(msg))
            try:
                await self.executor.execute(cast_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                beat.cancel()
                if msg.num_delivered >= self.max_deliver:
                    log.exception(
                        "run request for cast %s failed for good; failing the cast", cast_id
                    )
                    await self._give_up(msg, cast_id)
                    return
                if _db_unavailable(e):
                    log.warning(
                        "run request for cast %s: the database is unavailable (%s); it will be "
                        "delivered again",
                        cast_id,
                        e,
                    )
                else:
                    log.exception(
                        "run request for cast %s failed; it will be delivered again", cast_id
                    )
                await msg.nak(delay=2.0)
                return
            finally:
                beat.cancel()
            await msg.ack()  # after the result is committed (the queue's ack is synchronous)
        finally:
            self.busy -= 1
            if self.busy == 0:
                self._idle.set()

    async def _dead_letter(self, msg: Message, cast_id: str) -> None:
        """Its deliveries ran out without an ack (workers died or hung on it every time): fail
        the cast unless a live worker holds it (then its lease decides)."""
        try:
            cast = await self.executor.ledger.get_cast(cast_id) if cast_id else None
        except Exception:
            log.exception("reading cast %s for its dead letter failed; retrying", cast_id)
            await msg.nak(delay=5.0)
            return
        if cast is None or cast.status not in ("queued", "running"):
            await msg.ack()
            return
        now = self.executor.platform.clock.now()
        if cast.status == "running" and cast.lease_until is not None and cast.lease_until > now:
            log.warning("dead letter for cast %s, which a live worker runs: dropped", cast_id)
            await msg.ack()
            return
        log.error(
            "the run request of cast %s was delivered %d times without completing; failing it",
            cast_id,
            msg.num_delivered,
        )
        await self._give_up(
            msg,
            cast_id,
            message=f"the run request was delivered {msg.num_delivered} times and never "
            "completed (dead-lettered); nothing was charged",
        )

    async def _give_up(
        self,
        msg: Message,
        cast_id: str,
        *,
        message: str = "the platform could not run this cast; nothing was charged",
    ) -> None:
        """The last delivery failed too: end the cast (releasing its money), then drop it."""
        now = self.executor.platform.clock.now()

        def audit(c: dict[str, Any]) -> list[hot.AuditRow]:
            """``cast.failed``, committed with the failure (the audit outbox)."""
            return [
                hot.AuditRow(
                    event="cast.failed",
                    at=now,
                    actor="worker",
                    cast_id=cast_id,
                    input_hash=c["input_hash"],
                    amount_cents=0,
                    currency=c["currency"],
                    traceparent=c["traceparent"],
                    data={
                        "error": {"code": "INTERNAL", "message": message},
                        "released_cents": c["estimate_cents"],
                    },
                )
            ]

        try:
            done = await self.executor.ledger.fail_unfinished(
                cast_id, error_code="INTERNAL", error_message=message, audit=audit
            )
            if done is not None:
                self.executor.platform.kick_audit()
                self.executor.platform.hub.notify(cast_id)
                self.executor.platform.kick_outbox()
        except Exception:
            log.exception("could not fail cast %s; the lease reaper will retry it", cast_id)
            await msg.nak(delay=5.0)
            return
        await msg.ack()

    async def _heartbeat(self, msg: Message) -> None:
        cast_id = str(msg.payload.get("cast_id", ""))
        while True:
            await asyncio.sleep(self.heartbeat_every)
            await msg.in_progress()
            try:
                await self.executor.heartbeat(cast_id)
            except Exception:
                log.warning("renewing the lease of cast %s failed; retrying", cast_id)


class LeaseReaper:
    """Requeues runs whose worker stopped renewing its lease (crashed, hung, partitioned)."""

    def __init__(self, ledger: SqlLedger, relay: OutboxRelay, *, every: float) -> None:
        self.ledger = ledger
        self.relay = relay
        self.every = every

    async def reap_once(self) -> list[str]:
        ids = await self.ledger.reap_expired()
        if ids:
            log.warning("requeued %d casts whose worker lease expired", len(ids))
            self.relay.kick()
        return ids

    async def run(self) -> None:
        while True:
            try:
                await self.reap_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if _db_unavailable(e):
                    log.warning("lease reaper: the database is unavailable (%s); retrying", e)
                else:
                    log.exception("lease reaper failed; retrying")
            await asyncio.sleep(self.every)


JobHandler = Callable[[Message], Awaitable[None]]
DeadHandler = Callable[[Message, str], Awaitable[None]]


class JobConsumer:
    """Background jobs (webhook handling, GitHub dispatches): retries with backoff, then a
    dead-letter record through ``on_dead``. Handlers must be idempotent: delivery is
    at-least-once."""

    def __init__(
        self,
        queue: Queue,
        handlers: dict[str, JobHandler],
        *,
        concurrency: int = 4,
        max_deliver: int = 5,
        backoff: float = 1.0,
        on_dead: DeadHandler | None = None,
    ) -> None:
        self.queue = queue
        self.handlers = handlers
        self.concurrency = concurrency
        self.max_deliver = max_deliver
        self.backoff = backoff
        self.on_dead = on_dead

    async def run(self) -> None:
        await consume(self.queue, self.handle, concurrency=self.concurrency)

    def _handler(self, subject: str) -> JobHandler | None:
        for prefix, handler in self.handlers.items():
            if subject.startswith(prefix):
                return handler
        return None

    async def handle(self, msg: Message) -> None:
        if is_dead_letter(msg):
            log.error("job %s was delivered %d times without an ack", msg.msg_id, msg.num_delivered)
            if self.on_dead is not None:
                try:
                    await self.on_dead(
                        msg, f"delivered {msg.num_delivered} times without completing"
                    )
                except Exception:
                    log.exception("recording dead job %s failed", msg.msg_id)
                    await msg.nak(delay=self.backoff)
                    return
            await msg.ack()
            return
        handler = self._handler(msg.subject)
        if handler is None:
            log.error("no handler for job subject %s; dropping it", msg.subject)
            await msg.ack()
            return
        try:
            await handler(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if msg.num_delivered >= self.max_deliver:
                log.exception(
                    "job %s failed %d times; dead-lettered", msg.msg_id, msg.num_delivered
                )
                if self.on_dead is not None:
                    try:
                        await self.on_dead(msg, f"{type(e).__name__}: {e}"[:2000])
                    except Exception:
                        log.exception("recording dead job %s failed", msg.msg_id)
                await msg.ack()
                return
            delay = self.backoff * (2 ** (msg.num_delivered - 1))
            log.warning(
                "job %s failed (attempt %d), retrying in %.1f s: %s: %s",
                msg.msg_id,
                msg.num_delivered,
                delay,
                type(e).__name__,
                str(e)[:300],
            )
            await msg.nak(delay=delay)
            return
        await msg.ack()
