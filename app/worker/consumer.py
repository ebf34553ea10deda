"""Background loops of a process: the outbox relay and the run-request consumers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from app.services.ports import Message, Queue
from app.store.ledger import SqlLedger
from app.worker.runs import RunExecutor

log = logging.getLogger("spell.worker")


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
        self._kick = asyncio.Event()

    def kick(self) -> None:
        self._kick.set()

    def queue_for(self, subject: str) -> Queue:
        for prefix, queue in self.routes.items():
            if subject.startswith(prefix):
                return queue
        return self.queue

    async def relay_once(self) -> int:
        rows = await self.ledger.unsent_outbox()
        sent: list[int] = []
        for row in rows:
            headers = {}
            tp = row.payload.get("traceparent")
            if tp:
                headers["traceparent"] = str(tp)
            await self.queue_for(row.subject).publish(
                row.subject, row.payload, msg_id=row.msg_id, headers=headers
            )
            sent.append(row.id)
        await self.ledger.mark_sent(sent)
        return len(sent)

    async def run(self) -> None:
        while True:
            try:
                n = await self.relay_once()
                if n:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay failed; retrying")
                await asyncio.sleep(self.poll_interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.poll_interval)
            self._kick.clear()


async def consume(
    queue: Queue, handle: Callable[[Message], Awaitable[None]], *, concurrency: int
) -> None:
    """``concurrency`` loops, each fetching one message at a time and handling it."""

    async def loop() -> None:
        while True:
            try:
                msgs = await queue.fetch(1, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fetching from the queue failed; retrying")
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
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

    async def run(self) -> None:
        await consume(self.queue, self.handle, concurrency=self.concurrency)

    async def handle(self, msg: Message) -> None:
        cast_id = str(msg.payload.get("cast_id", ""))
        self.busy += 1
        beat = asyncio.create_task(self._heartbeat(msg))
        try:
            await self.executor.execute(cast_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            beat.cancel()
            if msg.num_delivered >= self.max_deliver:
                log.exception("run request for cast %s failed for good; failing the cast", cast_id)
                await self._give_up(msg, cast_id)
                return
            log.exception("run request for cast %s failed; it will be delivered again", cast_id)
            await msg.nak(delay=2.0)
            return
        finally:
            self.busy -= 1
            beat.cancel()
        await msg.ack()

    async def _give_up(self, msg: Message, cast_id: str) -> None:
        """The last delivery failed too: end the cast (releasing its money), then drop it."""
        try:
            done = await self.executor.ledger.fail_unfinished(
                cast_id,
                error_code="INTERNAL",
                error_message="the platform could not run this cast; nothing was charged",
            )
            if done is not None:
                self.executor.platform.hub.notify(cast_id)
                self.executor.platform.kick_outbox()
                await self.executor.platform.audit.append(
                    "cast.failed",
                    actor="worker",
                    cast_id=cast_id,
                    input_hash=done.input_hash,
                    amount_cents=0,
                    currency=done.currency,
                    traceparent=done.traceparent,
                    data={"error": {"code": "INTERNAL"}, "released_cents": done.estimate_cents},
                )
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
            except Exception:
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
