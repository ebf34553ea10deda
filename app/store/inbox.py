"""The webhook inbox: raw deliveries stored durably before anything parses them.

A delivery row and its outbox message commit together, so an acknowledged delivery is never
lost; the delivery id is the primary key, so a redelivered one is recognised and dropped.
On SQLite bodies are stored lz4-compressed when that pays (app/store/bodies.py); PostgreSQL
compresses them itself. Read them back with ``WebhookDelivery.payload``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update

from app.services.ports import Clock
from app.store import hot
from app.store.bodies import pack
from app.store.fastsql import SqliteRunner
from app.store.ledger import SqlLedger
from app.store.models import WebhookDelivery


class Inbox:
    def __init__(self, ledger: SqlLedger, clock: Clock) -> None:
        self.ledger = ledger
        self.clock = clock
        #: SQLite stores what it is given; PostgreSQL compresses bodies itself (lz4 TOAST,
        #: migration 0007), where compressing them here first measured no better, only
        #: different (bench/README.md, session 5)
        self.compresses = isinstance(ledger.fast, SqliteRunner)

    def pack(self, body: bytes) -> tuple[bytes, str | None]:
        """``(stored bytes, body_encoding)`` of a raw body for this ledger."""
        return pack(body) if self.compresses else (body, None)

    def pack_many(self, deliveries: Sequence[tuple[str, str, bytes]]) -> list[Packed]:
        """``(delivery_id, event, raw body)`` → :data:`Packed` for :meth:`store_many`."""
        return [(d, e, *self.pack(b)) for d, e, b in deliveries]

    async def accept(self, source: str, delivery_id: str, event: str, body: bytes) -> bool:
        """Store a verified delivery; False if this delivery id was seen before.

        On the bare-driver hot path (app/store/fastsql.py): on SQLite, deliveries arriving
        together share one group-committed transaction."""
        now = self.clock.now()
        stored, encoding = self.pack(body)
        return await self.ledger.fast.run(
            lambda: hot.accept_delivery(source, delivery_id, event, stored, encoding, now)
        )

    async def accept_many(
        self, source: str, deliveries: Sequence[tuple[str, str, bytes]]
    ) -> set[str]:
        """Store a batch of verified ``(delivery_id, event, body)`` (distinct ids) in ONE
        transaction, the same rows :meth:`accept` writes; returns the ids that were new."""
        return await self.store_many(source, self.pack_many(deliveries))

    async def store_many(self, source: str, deliveries: Sequence[Packed]) -> set[str]:
        """:meth:`accept_many` for bodies already packed (:meth:`pack_many`)."""
        now = self.clock.now()
        return await self.ledger.fast.run(lambda: hot.accept_deliveries(source, deliveries, now))

    def try_store_many_now(self, source: str, deliveries: Sequence[Packed]) -> set[str] | None:
        """:meth:`store_many` right here when SQLite's writer is idle (no thread hand-off;
        see ``SqliteRunner.try_now``); ``None`` when it is not (or on PostgreSQL): then call
        :meth:`store_many`. A storage error is raised as from :meth:`store_many`."""
        now = self.clock.now()
        done, fresh = self.ledger.fast.try_now(
            lambda: hot.accept_deliveries(source, deliveries, now)
        )
        return fresh if done else None

    async def get(self, delivery_id: str) -> WebhookDelivery | None:
        async with self.ledger.reader() as s:
            return await s.get(WebhookDelivery, delivery_id)

    async def status(self, delivery_id: str) -> tuple[str, str] | None:
        """``(source, status)`` of a stored delivery, without reading its body (and on any
        schema revision: the CLI asks before the server has migrated)."""
        async with self.ledger.reader() as s:
            row = (
                await s.execute(
                    select(WebhookDelivery.source, WebhookDelivery.status).where(
                        WebhookDelivery.delivery_id == delivery_id
                    )
                )
            ).first()
        return None if row is None else (str(row[0]), str(row[1]))

    async def start_attempt(self, delivery_id: str) -> int:
        async with self.ledger.write() as s:
            n = await s.scalar(
                update(WebhookDelivery)
                .where(WebhookDelivery.delivery_id == delivery_id)
                .values(attempts=WebhookDelivery.attempts + 1)
                .returning(WebhookDelivery.attempts)
                .execution_options(synchronize_session=False)
            )
            return int(n or 0)

    async def finish(self, delivery_id: str, status: str, error: str | None = None) -> None:
        async with self.ledger.write() as s:
            await s.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.delivery_id == delivery_id)
                .values(status=status, last_error=error, processed_at=self.clock.now())
                .execution_options(synchronize_session=False)
            )

    async def by_status(
        self, statuses: Sequence[str], *, since: datetime | None = None, limit: int = 500
    ) -> list[WebhookDelivery]:
        stmt = select(WebhookDelivery).where(WebhookDelivery.status.in_(list(statuses)))
        if since is not None:
            stmt = stmt.where(WebhookDelivery.received_at >= since)
        async with self.ledger.reader() as s:
            rows = await s.scalars(stmt.order_by(WebhookDelivery.received_at).limit(limit))
            return list(rows.all())


#: ``(delivery_id, event, stored body, body encoding)``: a delivery as the inbox stores it
Packed = tuple[str, str, bytes, str | None]
