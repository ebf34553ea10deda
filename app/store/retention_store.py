"""Ledger queries of the retention sweeper (SPEC §8): find and purge what is past its period.

Where inputs live in the ledger, and what happens to each:

* ``casts.input`` — the cast's input payload: set to SQL NULL once the cast is finished and
  ``inputs`` old (``input_hash`` stays, so the audit trail still identifies it).
* ``webhook_deliveries.body`` — the raw delivery (a slash-command comment carries the input):
  emptied once handled (``done``/``ignored``/``dead``) and ``inputs`` old; the row stays, it is
  the redelivery dedupe.
* ``idempotency_keys`` — the request is kept only as a hash, the response holds ids and amounts;
  rows past ``expires_at`` (``SPELL_IDEMPOTENCY_TTL``) are deleted.
* ``outbox.payload`` — ids (cast, delivery, charge) and meter quantities only, never an input;
  rows are kept (billing reads them back and their ``msg_id`` dedupes refunds and charges).

Every purge is one bounded statement per batch, guarded by its own condition, so two sweepers
(or a retry after a crash) never do anything twice; the sweeper also holds
:meth:`RetentionStore.exclusive` (a PostgreSQL advisory lock) so only one sweeps at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

from sqlalchemy import (
    ColumnElement,
    case,
    delete,
    func,
    null,
    or_,
    select,
    text,
    tuple_,
    update,
)

from app.domain.casts import TERMINAL
from app.store.ledger import SqlLedger
from app.store.models import Artifact, Cast, IdempotencyKey, WebhookDelivery

#: ``pg_try_advisory_lock`` key of the retention sweep ("SPELLRT" in ASCII)
ADVISORY_KEY = 0x5350454C4C5254
DELETED = "deleted:"  # location of an artifact whose object was deleted by retention
HANDLED = ("done", "ignored", "dead")  # webhook deliveries nobody will process again
BATCH = 500


class RetentionStore:
    def __init__(self, ledger: SqlLedger, *, batch: int = BATCH) -> None:
        self.ledger = ledger
        self.batch = batch

    # ------------------------------------------------------------------ one sweeper at a time

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[bool]:
        """PostgreSQL: hold a session advisory lock on a connection of its own for the block;
        yields False (at once) when another process holds it. SQLite: yields True (the caller
        serialises processes with a file lock)."""
        if self.ledger.dialect != "postgresql":
            yield True
            return
        async with self.ledger.engine.connect() as conn:
            got = bool(
                await conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_KEY})
            )
            await conn.commit()  # the lock is the session's: no transaction stays open
            try:
                yield got
            finally:
                if got:
                    await conn.scalar(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_KEY})
                    await conn.commit()

    # ------------------------------------------------------------------ inputs

    def _inputs_due(self, cutoff: datetime) -> list[ColumnElement[bool]]:
        return [
            Cast.input.is_not(None),
            Cast.created_at <= cutoff,
            Cast.status.in_(sorted(TERMINAL)),
        ]

    async def purge_inputs(self, cutoff: datetime, *, dry_run: bool = False) -> int:
        """Drop the stored input of finished casts created at or before ``cutoff``."""
        where = self._inputs_due(cutoff)
        if dry_run:
            return await self._count(select(func.count()).select_from(Cast).where(*where))
        total = 0
        while True:
            ids = select(Cast.id).where(*where).limit(self.batch).scalar_subquery()
            async with self.ledger.write() as s:
                res = await s.execute(
                    update(Cast)
                    .where(Cast.id.in_(ids), Cast.input.is_not(None))
                    .values(input=null())
                    .execution_options(synchronize_session=False)
                )
            n = int(res.rowcount)  # type: ignore[attr-defined]
            total += n
            if n < self.batch:
                return total

    async def inputs_held(self, cutoff: datetime) -> int:
        """Casts past the inputs period that keep their input because they are unfinished."""
        return await self._count(
            select(func.count())
            .select_from(Cast)
            .where(
                Cast.input.is_not(None),
                Cast.created_at <= cutoff,
                Cast.status.not_in(sorted(TERMINAL)),
            )
        )

    async def unfinished_casts(self, cast_ids: set[str]) -> set[str]:
        """Which of ``cast_ids`` exist and are not finished."""
        ids = sorted(cast_ids)
        out: set[str] = set()
        async with self.ledger.reader() as s:
            for i in range(0, len(ids), self.batch):
                rows = await s.scalars(
                    select(Cast.id).where(
                        Cast.id.in_(ids[i : i + self.batch]),
                        Cast.status.not_in(sorted(TERMINAL)),
                    )
                )
                out.update(rows.all())
        return out

    async def purge_delivery_bodies(self, cutoff: datetime, *, dry_run: bool = False) -> int:
        """Empty the raw body of handled webhook deliveries received at or before ``cutoff``."""
        where = [
            WebhookDelivery.status.in_(HANDLED),
            WebhookDelivery.received_at <= cutoff,
            func.length(WebhookDelivery.body) > 0,
        ]
        if dry_run:
            return await self._count(
                select(func.count()).select_from(WebhookDelivery).where(*where)
            )
        total = 0
        while True:
            ids = (
                select(WebhookDelivery.delivery_id)
                .where(*where)
                .limit(self.batch)
                .scalar_subquery()
            )
            async with self.ledger.write() as s:
                res = await s.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.delivery_id.in_(ids), *where)
                    .values(body=b"", body_encoding=None)
                    .execution_options(synchronize_session=False)
                )
            n = int(res.rowcount)  # type: ignore[attr-defined]
            total += n
            if n < self.batch:
                return total

    # ------------------------------------------------------------------ artifacts

    async def due_artifacts(
        self, cutoff: datetime, now: datetime, *, limit: int | None = None
    ) -> list[tuple[str, str]]:
        """``(id, location)`` of stored artifacts created at or before ``cutoff`` or whose URL
        expired by ``now``, oldest first."""
        stmt = (
            select(Artifact.id, Artifact.location)
            .where(
                ~Artifact.location.startswith(DELETED),
                or_(Artifact.created_at <= cutoff, Artifact.expires_at <= now),
            )
            .order_by(Artifact.created_at, Artifact.id)
            .limit(limit or self.batch)
        )
        async with self.ledger.reader() as s:
            return [(str(i), str(loc)) for i, loc in (await s.execute(stmt)).all()]

    async def count_due_artifacts(self, cutoff: datetime, now: datetime) -> int:
        return await self._count(
            select(func.count())
            .select_from(Artifact)
            .where(
                ~Artifact.location.startswith(DELETED),
                or_(Artifact.created_at <= cutoff, Artifact.expires_at <= now),
            )
        )

    async def mark_artifact_deleted(self, artifact_id: str, location: str, now: datetime) -> bool:
        """After its object is gone: the row says so, and its URL has expired (410)."""
        async with self.ledger.write() as s:
            res = await s.execute(
                update(Artifact)
                .where(Artifact.id == artifact_id, Artifact.location == location)
                .values(
                    location=DELETED + artifact_id,
                    expires_at=case((Artifact.expires_at > now, now), else_=Artifact.expires_at),
                )
                .execution_options(synchronize_session=False)
            )
            return int(res.rowcount) == 1  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ idempotency keys

    async def purge_idempotency(self, now: datetime, *, dry_run: bool = False) -> int:
        """Delete Idempotency-Key rows (and their stored answers) expired by ``now``, at most
        ``batch`` per transaction (a backlog never holds the writer for long); the count."""
        where = IdempotencyKey.expires_at <= now
        if dry_run:
            return await self._count(select(func.count()).select_from(IdempotencyKey).where(where))
        pk = tuple_(IdempotencyKey.principal_id, IdempotencyKey.key)
        total = 0
        while True:
            due = (
                select(IdempotencyKey.principal_id, IdempotencyKey.key)
                .where(where)
                .limit(self.batch)
            )
            async with self.ledger.write() as s:
                res = await s.execute(
                    delete(IdempotencyKey)
                    .where(pk.in_(due), where)
                    .execution_options(synchronize_session=False)
                )
            n = int(res.rowcount)  # type: ignore[attr-defined]
            total += n
            if n < self.batch:
                return total

    # ------------------------------------------------------------------ audit anchor

    async def set_audit_anchor(self, log: str, seq: int, digest: str) -> None:
        """Record the retention anchor (moves forward only, like the head pointer)."""
        await self.ledger.set_audit_head(log, seq, digest)

    # ------------------------------------------------------------------

    async def _count(self, stmt: object) -> int:
        async with self.ledger.reader() as s:
            return int(await s.scalar(stmt) or 0)  # type: ignore[call-overload]
