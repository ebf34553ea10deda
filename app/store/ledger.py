"""The SQL ledger: every read and write of platform state, one transaction per use-case step.

The money-safety rules live here because they are SQL rules:

* a budget reservation is ONE conditional ``UPDATE … WHERE used + reserved + est <= cap
  RETURNING`` — never read-then-write — so no interleaving can overspend;
* a reservation is settled or released exactly once, guarded by the cast's ``reservation`` column
  flipping from ``held`` in the same transaction;
* an Idempotency-Key row is inserted in the same transaction as the work it protects, so two
  concurrent requests with one key can never both do the work (the database's unique key decides).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, case, delete, func, or_, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.domain.caps import CapView, month_period
from app.domain.spells import SpellDocument, semver_key
from app.errors import AppError
from app.services.ports import Clock
from app.store import hot
from app.store.fastsql import Program, Runner, runner_for_url
from app.store.ids import new_id
from app.store.models import (
    Account,
    Artifact,
    AuditOutbox,
    AuditPointer,
    Budget,
    Bundle,
    Cast,
    CastEvent,
    IdempotencyKey,
    IssuedToken,
    LedgerLine,
    Outbox,
    Principal,
    Spell,
    SpellVersion,
)

Work = Callable[[AsyncSession], Awaitable[tuple[int, dict[str, Any]]]]


T = TypeVar("T")


@dataclass(frozen=True)
class BudgetView:
    account_id: str
    period: str
    monthly: CapView
    total: CapView


@dataclass(frozen=True)
class Claim:
    cast: Cast
    attempt: int


class SqlLedger:
    #: Stripe billing is on (set at wiring time): a settled cast with a cost also queues its
    #: ``billing.charge`` job, in the same transaction (app/store/hot.py ``finish``).
    billing_enabled: bool = False

    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        *,
        idempotency_ttl: int = 24 * 3600,
        hot_pool_size: int = 4,
    ) -> None:
        self.engine = engine
        self.idempotency_ttl = idempotency_ttl
        self.clock = clock
        #: write transactions (BEGIN IMMEDIATE on SQLite)
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        #: read-only work: a deferred BEGIN on SQLite, so reads never queue behind writers
        self.reader = async_sessionmaker(
            engine.execution_options(spell_readonly=True), expire_on_commit=False
        )
        self.dialect = engine.dialect.name
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None
        self._fast: Runner | None = None
        self.hot_pool_size = hot_pool_size

    @property
    def fast(self) -> Runner:
        """The bare-driver runner of the hot paths (app/store/fastsql.py), created on first use."""
        if self._fast is None:
            self._fast = runner_for_url(
                self.engine.url.render_as_string(hide_password=False),
                pool_size=self.hot_pool_size,
            )
        return self._fast

    async def aclose(self) -> None:
        """Stop the hot-path runner (its writer thread or connection pool)."""
        if self._fast is not None:
            await self._fast.aclose()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction. On SQLite, writers of this process queue on an asyncio lock
        first: SQLite's own busy handler sleeps in coarse steps (up to 100 ms) whenever two
        connections contend, so in-process contention must never reach it. Never nest."""
        if self._write_lock is None:
            async with self.sessions.begin() as s:
                yield s
            return
        async with self._write_lock, self._exclusive(), self.sessions.begin() as s:
            yield s

    def _exclusive(self) -> contextlib.AbstractAsyncContextManager[None]:
        # The hot-path writer thread keeps still (outside any transaction) meanwhile.
        if self._fast is None:
            return contextlib.nullcontext()
        return self._fast.exclusive()

    def _insert(self, model: Any) -> Any:
        mod = postgresql if self.dialect == "postgresql" else sqlite
        return mod.insert(model)

    # ------------------------------------------------------------------ accounts & principals

    async def ensure_principal(
        self,
        account_id: str,
        role: str,
        *,
        monthly_cap: int | None,
        total_cap: int | None,
    ) -> str:
        """Create the account (with its budget row and default caps) and the principal if new."""
        now = self.clock.now()
        async with self.write() as s:
            await s.execute(
                self._insert(Account)
                .values(id=account_id, status="active", created_at=now)
                .on_conflict_do_nothing(index_elements=["id"])
            )
            await s.execute(
                self._insert(Budget)
                .values(
                    account_id=account_id,
                    monthly_cap_cents=monthly_cap,
                    total_cap_cents=total_cap,
                    period=month_period(now),
                    monthly_used_cents=0,
                    monthly_reserved_cents=0,
                    total_used_cents=0,
                    total_reserved_cents=0,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["account_id"])
            )
            await s.execute(
                self._insert(Principal)
                .values(id=new_id("p"), account_id=account_id, role=role, created_at=now)
                .on_conflict_do_nothing(index_elements=["account_id", "role"])
            )
            pid = await s.scalar(
                select(Principal.id).where(
                    Principal.account_id == account_id, Principal.role == role
                )
            )
            assert pid is not None
            return pid

    async def record_token(
        self,
        jti: str,
        principal_id: str,
        issued_at: datetime,
        expires_at: datetime,
        *,
        audit: Sequence[AuditOutbox] = (),
    ) -> None:
        """The token's row, and ``audit`` (its audit outbox rows) in the same transaction."""
        async with self.write() as s:
            s.add(
                IssuedToken(
                    jti=jti, principal_id=principal_id, issued_at=issued_at, expires_at=expires_at
                )
            )
            s.add_all(audit)

    async def account_exists(self, account_id: str) -> bool:
        async with self.reader() as s:
            return (await s.get(Account, account_id)) is not None

    # ------------------------------------------------------------------ idempotency

    async def run_idempotent(
        self,
        principal_id: str,
        key: str,
        req_hash: str,
        work: Work,
        *,
        response: tuple[int, dict[str, Any]] | None = None,
    ) -> tuple[int, dict[str, Any], bool]:
        """Do ``work`` once per (principal, key); replay its stored answer afterwards.

        Returns ``(status, body, replayed)``. Only successful answers are stored: when ``work``
        raises, the key is rolled back with everything else, so the caller may retry with it.
        When the answer is known before the work (``response``), it is stored with the key in
        one statement and ``work``'s own answer is ignored.
        """
        initial_status, initial_body = response if response is not None else (0, {})
        now = self.clock.now()
        expires = now + timedelta(seconds=self.idempotency_ttl)
        pk = (IdempotencyKey.principal_id == principal_id, IdempotencyKey.key == key)
        async with self.write() as s:
            for _ in range(3):
                res = await s.execute(
                    self._insert(IdempotencyKey)
                    .values(
                        principal_id=principal_id,
                        key=key,
                        request_hash=req_hash,
                        response_status=initial_status,
                        response_body=initial_body,
                        created_at=now,
                        expires_at=expires,
                    )
                    .on_conflict_do_nothing(index_elements=["principal_id", "key"])
                )
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    break
                # An expired key is free again: take it over with ONE conditional statement,
                # so of several concurrent requests exactly one wins it.
                took = await s.execute(
                    update(IdempotencyKey)
                    .where(*pk, IdempotencyKey.expires_at <= now)
                    .values(
                        request_hash=req_hash,
                        response_status=initial_status,
                        response_body=initial_body,
                        created_at=now,
                        expires_at=expires,
                    )
                    .execution_options(synchronize_session=False)
                )
                if took.rowcount == 1:  # type: ignore[attr-defined]
                    break
                row = (
                    await s.execute(
                        select(
                            IdempotencyKey.request_hash,
                            IdempotencyKey.response_status,
                            IdempotencyKey.response_body,
                        ).where(*pk)
                    )
                ).first()
                if row is None:
                    continue  # swept between our statements: try to insert again
                if row.request_hash != req_hash:
                    raise _idempotency_conflict()
                return row.response_status, row.response_body, True
            else:
                raise AppError("CONFLICT", "this Idempotency-Key is busy; retry the request")
            status, body = await work(s)
            if response is not None:
                return initial_status, initial_body, False
            await s.execute(
                update(IdempotencyKey)
                .where(*pk)
                .values(response_status=status, response_body=body)
                .execution_options(synchronize_session=False)
            )
            return status, body, False

    async def stored_response(
        self, principal_id: str, key: str, req_hash: str
    ) -> tuple[int, dict[str, Any]] | None:
        """The stored answer for a live key (a 409 if it was used for another request).

        Checked before a request is validated, so a replay answers what was answered then,
        whatever has changed since (a new spell version, a cap, the sandbox).
        """
        async with self.reader() as s:
            row = (
                await s.execute(
                    select(
                        IdempotencyKey.request_hash,
                        IdempotencyKey.response_status,
                        IdempotencyKey.response_body,
                        IdempotencyKey.expires_at,
                    ).where(IdempotencyKey.principal_id == principal_id, IdempotencyKey.key == key)
                )
            ).first()
        if row is None or row.expires_at <= self.clock.now():
            return None
        if row.request_hash != req_hash:
            raise _idempotency_conflict()
        return row.response_status, row.response_body

    async def sweep_idempotency(self) -> int:
        async with self.write() as s:
            res = await s.execute(
                delete(IdempotencyKey).where(IdempotencyKey.expires_at < self.clock.now())
            )
            return int(res.rowcount)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ bundles & spells

    async def add_bundle(
        self, digest: str, size: int, account_id: str, *, audit: Sequence[AuditOutbox] = ()
    ) -> None:
        """Record an uploaded bundle, and ``audit`` (its audit outbox rows) in the same
        transaction."""
        async with self.write() as s:
            await s.execute(
                self._insert(Bundle)
                .values(
                    digest=digest,
                    size_bytes=size,
                    uploaded_by=account_id,
                    created_at=self.clock.now(),
                )
                .on_conflict_do_nothing(index_elements=["digest", "uploaded_by"])
            )
            s.add_all(audit)

    async def bundle_owned(self, digest: str, account_id: str) -> bool:
        async with self.reader() as s:
            return (await s.get(Bundle, (digest, account_id))) is not None

    async def publish_spell(
        self,
        doc: SpellDocument,
        *,
        author_id: str,
        doc_hash: str,
        price_cents: int,
        audit: Sequence[AuditOutbox] = (),
    ) -> tuple[Spell, SpellVersion, bool]:
        """Store a spell version. Returns ``(spell, version, created)``.

        Re-publishing an identical version is a no-op; a different document under an existing
        version is a 409; only the author may publish new versions of a spell. ``audit`` (its
        audit outbox rows) is committed with a new version only.
        """
        now = self.clock.now()
        dumped = doc.model_dump(mode="json", exclude_none=True)
        try:
            async with self.write() as s:
                spell = await s.get(Spell, doc.id, with_for_update=self.dialect == "postgresql")
                if spell is not None and spell.author_id != author_id:
                    raise AppError("FORBIDDEN", f"spell {doc.id!r} belongs to another account")
                existing = await s.scalar(
                    select(SpellVersion).where(
                        SpellVersion.spell_id == doc.id, SpellVersion.version == doc.version
                    )
                )
                if existing is not None:
                    if existing.document_hash != doc_hash:
                        raise AppError(
                            "CONFLICT",
                            f"{doc.id}@{doc.version} is already published with other content; "
                            "bump `version`",
                        )
                    assert spell is not None
                    return spell, existing, False
                version = SpellVersion(
                    spell_id=doc.id,
                    version=doc.version,
                    document=dumped,
                    document_hash=doc_hash,
                    bundle_digest=doc.execution.bundle,
                    published_at=now,
                )
                tags_text = "," + ",".join(doc.tags) + ","
                if spell is None:
                    spell = Spell(
                        id=doc.id,
                        author_id=author_id,
                        name=doc.name,
                        description=doc.description,
                        latest_version=doc.version,
                        visibility=doc.visibility,
                        tags=list(doc.tags),
                        tags_text=tags_text,
                        mode=doc.execution.mode,
                        price_model=doc.pricing.model,
                        price_cents=price_cents,
                        currency=doc.pricing.currency,
                        status="published",
                        cast_count=0,
                        published_at=now,
                        updated_at=now,
                    )
                    s.add(spell)
                    await s.flush()
                elif semver_key(doc.version) > semver_key(spell.latest_version):
                    spell.latest_version = doc.version
                    spell.name = doc.name
                    spell.description = doc.description
                    spell.visibility = doc.visibility
                    spell.tags = list(doc.tags)
                    spell.tags_text = tags_text
                    spell.mode = doc.execution.mode
                    spell.price_model = doc.pricing.model
                    spell.price_cents = price_cents
                    spell.currency = doc.pricing.currency
                    spell.updated_at = now
                s.add(version)
                s.add_all(audit)
                await s.flush()
                return spell, version, True
        except IntegrityError:
            # A concurrent publish of the same spell/version won the race: report it as such.
            raise AppError(
                "CONFLICT", f"{doc.id}@{doc.version} was published concurrently; retry"
            ) from None

    async def get_spell(
        self, spell_id: str, version: str | None = None
    ) -> tuple[Spell, SpellVersion] | None:
        async with self.reader() as s:
            spell = await s.get(Spell, spell_id)
            if spell is None:
                return None
            ver = await s.scalar(
                select(SpellVersion).where(
                    SpellVersion.spell_id == spell_id,
                    SpellVersion.version == (version or spell.latest_version),
                )
            )
            if ver is None:
                return None
            return spell, ver

    async def list_versions(self, spell_id: str) -> list[str]:
        async with self.reader() as s:
            rows = (
                await s.scalars(
                    select(SpellVersion.version).where(SpellVersion.spell_id == spell_id)
                )
            ).all()
        return sorted(rows, key=semver_key, reverse=True)

    async def search_spells(
        self,
        *,
        q: str | None,
        tag: str | None,
        sort: str,
        limit: int,
        offset: int,
        viewer_account: str | None,
        include_own: bool,
    ) -> list[Spell]:
        stmt = select(Spell).where(Spell.status == "published")
        visible = Spell.visibility == "public"
        if include_own and viewer_account is not None:
            visible = or_(visible, Spell.author_id == viewer_account)
        stmt = stmt.where(visible)
        if q:
            like = f"%{_escape_like(q.lower())}%"
            stmt = stmt.where(
                or_(
                    func.lower(Spell.name).like(like, escape="\\"),
                    func.lower(Spell.description).like(like, escape="\\"),
                    func.lower(Spell.id).like(like, escape="\\"),
                    func.lower(Spell.tags_text).like(like, escape="\\"),
                )
            )
        if tag:
            stmt = stmt.where(Spell.tags_text.like(f"%,{_escape_like(tag)},%", escape="\\"))
        if sort == "popular":
            stmt = stmt.order_by(Spell.cast_count.desc(), Spell.id)
        elif sort == "price":
            stmt = stmt.order_by(Spell.price_cents.asc(), Spell.id)
        else:
            stmt = stmt.order_by(Spell.published_at.desc(), Spell.id)
        stmt = stmt.limit(limit).offset(offset)
        async with self.reader() as s:
            return list((await s.scalars(stmt)).all())

    # ------------------------------------------------------------------ budgets

    async def budget(self, account_id: str, s: AsyncSession | None = None) -> BudgetView | None:
        """The account's caps and usage; pass ``s`` to read inside an open transaction."""
        if s is not None:
            b = await s.get(Budget, account_id, populate_existing=True)
            return None if b is None else _budget_view(b, month_period(self.clock.now()))
        async with self.reader() as rs:
            b = await rs.get(Budget, account_id)
            return None if b is None else _budget_view(b, month_period(self.clock.now()))

    async def set_caps(
        self,
        s: AsyncSession,
        account_id: str,
        *,
        monthly: int | None,
        total: int | None,
        set_monthly: bool,
        set_total: bool,
    ) -> BudgetView:
        values: dict[str, Any] = {"updated_at": self.clock.now()}
        if set_monthly:
            values["monthly_cap_cents"] = monthly
        if set_total:
            values["total_cap_cents"] = total
        res = await s.execute(
            update(Budget).where(Budget.account_id == account_id).values(**values)
        )
        if res.rowcount == 0:  # type: ignore[attr-defined]
            raise AppError("NOT_FOUND", f"account {account_id!r} not found")
        b = await s.get(Budget, account_id, populate_existing=True)
        assert b is not None
        return _budget_view(b, month_period(self.clock.now()))

    async def reserve(
        self, s: AsyncSession, account_id: str, estimate: int, period: str
    ) -> str | None:
        """Reserve ``estimate`` cents against both caps in ONE conditional statement.

        Returns the period the reservation counts in (None: refused). The stored period only
        ever moves forward: a request computed for an older month (a slow transaction, a
        skewed clock) counts in the stored, newer month and never resets its counters.
        """
        newer = Budget.period < period
        monthly_used = case((newer, 0), else_=Budget.monthly_used_cents)
        monthly_reserved = case((newer, 0), else_=Budget.monthly_reserved_cents)
        stmt = (
            update(Budget)
            .where(
                Budget.account_id == account_id,
                or_(
                    Budget.monthly_cap_cents.is_(None),
                    monthly_used + monthly_reserved + estimate <= Budget.monthly_cap_cents,
                ),
                or_(
                    Budget.total_cap_cents.is_(None),
                    Budget.total_used_cents + Budget.total_reserved_cents + estimate
                    <= Budget.total_cap_cents,
                ),
            )
            .values(
                period=case((newer, period), else_=Budget.period),
                monthly_used_cents=monthly_used,
                monthly_reserved_cents=monthly_reserved + estimate,
                total_reserved_cents=Budget.total_reserved_cents + estimate,
                updated_at=self.clock.now(),
            )
            .returning(Budget.period)
            .execution_options(synchronize_session=False)
        )
        row = (await s.execute(stmt)).first()
        return None if row is None else str(row[0])

    async def accept_cast(
        self,
        cast: hot.NewCast,
        *,
        key: str,
        req_hash: str,
        response: tuple[int, dict[str, Any]],
    ) -> tuple[int, dict[str, Any], bool]:
        """Accept a new cast in ONE transaction on the bare driver (the API's hot path):
        Idempotency-Key, cast row, first event, outbox message, target, reservation.

        Returns ``(status, body, replayed)``; raises :class:`app.store.hot.CapRefused` when
        the estimate does not fit under a cap (nothing is written then, not even the key).
        """
        now = self.clock.now()
        k = hot.IdemKey(
            principal_id=cast.principal_id,
            key=key,
            request_hash=req_hash,
            status=response[0],
            body=response[1],
            now=now,
            expires_at=now + timedelta(seconds=self.idempotency_ttl),
        )
        if self.dialect == "postgresql":
            # One round trip for the usual case; a replay/conflict takes the general path.
            try:
                return await self.fast.run(lambda: hot.accept_cast_one_statement(cast, k))
            except hot.KeyTaken:
                pass
        return await self.fast.run(lambda: hot.accept_cast(cast, k))

    async def insert_cast(self, s: AsyncSession, cast: Cast, *, subject: str | None) -> None:
        """Add a new cast, its first event and (for queued runs) its outbox message."""
        cast.event_seq = 1  # its first event, added here: no counter round trip needed
        s.add(cast)
        s.add(
            CastEvent(
                cast_id=cast.id,
                seq=1,
                stage="queued",
                data={"status": "queued"},
                created_at=cast.created_at,
            )
        )
        await s.execute(
            update(Spell)
            .where(Spell.id == cast.spell_id)
            .values(cast_count=Spell.cast_count + 1)
            .execution_options(synchronize_session=False)
        )
        if subject is not None:
            s.add(
                Outbox(
                    subject=subject,
                    msg_id=cast.id,
                    payload={"cast_id": cast.id, "traceparent": cast.traceparent},
                    created_at=cast.created_at,
                )
            )

    async def add_event(
        self, s: AsyncSession, cast_id: str, stage: str, data: dict[str, Any]
    ) -> int:
        seq = await s.scalar(
            update(Cast)
            .where(Cast.id == cast_id)
            .values(event_seq=Cast.event_seq + 1)
            .returning(Cast.event_seq)
            .execution_options(synchronize_session=False)
        )
        assert seq is not None
        s.add(
            CastEvent(cast_id=cast_id, seq=seq, stage=stage, data=data, created_at=self.clock.now())
        )
        return int(seq)

    async def append_events(
        self, cast_id: str, events: Sequence[tuple[str, dict[str, Any]]], *, attempt: int
    ) -> bool:
        """Progress/log events of a running attempt; dropped if the attempt was superseded."""
        now = self.clock.now()
        evs = list(events)
        return await self.fast.run(lambda: hot.append_events(cast_id, attempt, evs, now))

    async def events_after(self, cast_id: str, after: int, limit: int = 500) -> list[CastEvent]:
        rows = await self.fast.run(lambda: hot.events_after(cast_id, after, limit), atomic=False)
        return [
            CastEvent(id=i, cast_id=cast_id, seq=seq, stage=stage, data=data, created_at=at)
            for i, seq, stage, data, at in rows
        ]

    async def get_cast(self, cast_id: str) -> Cast | None:
        row = await self.fast.run(lambda: hot.get_cast(cast_id), atomic=False)
        return None if row is None else Cast(**row)

    async def get_artifact(self, artifact_id: str) -> Artifact | None:
        async with self.reader() as s:
            return await s.get(Artifact, artifact_id)

    async def claim(
        self,
        cast_id: str,
        *,
        lease_sec: float = 30.0,
        now: datetime | None = None,
        audit: hot.AuditOf | None = None,
    ) -> Claim | None:
        """queued → running with a new attempt number and a lease the worker must renew.

        None if someone else has it or it ended. A run whose lease lapses (its worker died) is
        queued again by :meth:`reap_expired`; its old attempt can then change nothing.
        ``audit`` makes the audit records committed with the claim (the audit outbox).
        """
        now = now or self.clock.now()
        until = now + timedelta(seconds=lease_sec)
        row = await self.fast.run(lambda: hot.claim(cast_id, now, until, audit))
        if row is None:
            return None
        return Claim(cast=Cast(**row), attempt=int(row["attempt"]))

    async def finish(
        self,
        cast_id: str,
        attempt: int,
        *,
        succeeded: bool,
        cost_cents: int = 0,
        error_code: str | None = None,
        error_message: str | None = None,
        artifact: Artifact | None = None,
        extra_event: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
        now: datetime | None = None,
        audit: hot.AuditOf | None = None,
    ) -> Cast | None:
        """End a run: status, artifact, settle or release, ledger line, final event — atomically
        (app/store/hot.py ``finish``), with the audit records ``audit`` makes (the outbox).

        Guarded by ``attempt``: a stale worker whose attempt was superseded changes nothing and
        gets ``None``. ``usage`` (meter → quantity) marks a metered cast: with Stripe billing on,
        its ``billing.usage`` job is queued in the same transaction.
        """
        now = now or self.clock.now()
        art = None
        if artifact is not None:
            art = hot.NewArtifact(
                id=artifact.id,
                location=artifact.location,
                digest=artifact.digest,
                size_bytes=artifact.size_bytes,
                created_at=artifact.created_at,
                expires_at=artifact.expires_at,
            )
        billing = self.billing_enabled
        row = await self.fast.run(
            lambda: hot.finish(
                cast_id,
                attempt,
                succeeded=succeeded,
                cost_cents=cost_cents,
                error_code=error_code,
                error_message=error_message,
                artifact=art,
                extra_event=extra_event,
                billing=billing,
                now=now,
                usage=usage,
                audit=audit,
            )
        )
        return None if row is None else Cast(**row)

    async def extend_lease(self, cast_id: str, attempt: int, *, lease_sec: float) -> bool:
        """Renew a running attempt's lease (the worker's heartbeat). False: it was superseded."""
        async with self.write() as s:
            res = await s.execute(
                update(Cast)
                .where(Cast.id == cast_id, Cast.attempt == attempt, Cast.status == "running")
                .values(lease_until=self.clock.now() + timedelta(seconds=lease_sec))
                .execution_options(synchronize_session=False)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def fail_unfinished(
        self,
        cast_id: str,
        *,
        error_code: str,
        error_message: str,
        audit: hot.AuditOf | None = None,
    ) -> Cast | None:
        """Fail a cast that cannot be run (e.g. its run request was dead-lettered); releases
        its reservation. Works whether it is still queued or stranded as running. ``audit``
        makes the audit records committed with it (the audit outbox)."""
        now = self.clock.now()
        billing = self.billing_enabled

        row = await self.fast.run(
            lambda: hot.fail_unfinished(
                cast_id,
                error_code=error_code,
                error_message=error_message,
                billing=billing,
                now=now,
                audit=audit,
            )
        )
        return None if row is None else Cast(**row)

    async def set_run_url(self, cast_id: str, run_url: str) -> None:
        async with self.write() as s:
            await s.execute(
                update(Cast)
                .where(Cast.id == cast_id)
                .values(run_url=run_url[:2000])
                .execution_options(synchronize_session=False)
            )

    async def overdue_workflow_casts(self, limit: int = 100) -> list[Cast]:
        """Running workflow-mode casts past their deadline (their lease is the spell timeout)."""
        async with self.reader() as s:
            rows = await s.scalars(
                select(Cast)
                .where(
                    Cast.status == "running",
                    Cast.mode == "workflow",
                    Cast.lease_until < self.clock.now(),
                )
                .limit(limit)
            )
            return list(rows.all())

    async def reap_expired(self) -> list[str]:
        """Running casts whose lease lapsed (their worker died or hung) go back to ``queued``
        and their run request is published again. Safe with many processes: a live worker
        renews its lease, so only abandoned runs are taken."""
        now = self.clock.now()
        async with self.write() as s:
            ids = list(
                (
                    await s.scalars(
                        update(Cast)
                        .where(
                            Cast.status == "running",
                            Cast.mode == "service",
                            Cast.lease_until < now,
                        )
                        .values(status="queued", lease_until=None)
                        .returning(Cast.id)
                        .execution_options(synchronize_session=False)
                    )
                ).all()
            )
            for cid in ids:
                await self.add_event(
                    s, cid, "requeued", {"status": "queued", "reason": "worker lease expired"}
                )
            await self._republish(s, ids)
            return ids

    async def republish_queued(self) -> int:
        """Publish every queued service cast again (a fresh in-process queue is empty)."""
        async with self.write() as s:
            ids = list(
                (
                    await s.scalars(
                        select(Cast.id).where(Cast.status == "queued", Cast.mode == "service")
                    )
                ).all()
            )
            await self._republish(s, ids)
            return len(ids)

    async def _republish(self, s: AsyncSession, cast_ids: Sequence[str]) -> None:
        if cast_ids:
            await s.execute(
                update(Outbox)
                .where(Outbox.msg_id.in_(list(cast_ids)))
                .values(sent_at=None)
                .execution_options(synchronize_session=False)
            )

    # ------------------------------------------------------------------ outbox

    async def run_small(self, factory: Callable[[], Program[T]], *, atomic: bool = True) -> T:
        """A small program, right away on this thread when SQLite's writer is idle (see
        :meth:`SqliteRunner.try_now`), else through the runner: for callers that batch for
        themselves (the outbox relay, the webhook front)."""
        done, out = self.fast.try_now(factory)
        if done:
            return out  # type: ignore[return-value]
        return await self.fast.run(factory, atomic=atomic)

    async def unsent_outbox(self, limit: int = 100) -> list[Outbox]:
        rows = await self.run_small(lambda: hot.unsent_outbox(limit), atomic=False)
        return [Outbox(id=i, subject=subj, msg_id=mid, payload=p) for i, subj, mid, p in rows]

    async def mark_sent(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        now = self.clock.now()
        chosen = list(ids)
        await self.run_small(lambda: hot.mark_sent(chosen, now), atomic=False)

    async def ledger_lines(self, account_id: str) -> list[LedgerLine]:
        async with self.reader() as s:
            rows = await s.scalars(
                select(LedgerLine)
                .where(LedgerLine.account_id == account_id)
                .order_by(LedgerLine.id)
            )
            return list(rows.all())

    async def count_casts(self, **filters: Any) -> int:
        conds = [getattr(Cast, k) == v for k, v in filters.items()]
        async with self.reader() as s:
            return int(
                await s.scalar(select(func.count()).select_from(Cast).where(and_(true(), *conds)))
                or 0
            )

    async def set_audit_head(self, log: str, seq: int, digest: str) -> None:
        """Move the audit head pointer forward (never back); on the hot-path runner."""
        now = self.clock.now()
        await self.fast.run(lambda: hot.set_audit_head(log, seq, digest, now), atomic=False)

    async def audit_head(self, log: str) -> tuple[int, str] | None:
        async with self.reader() as s:
            row = await s.get(AuditPointer, log)
            return None if row is None else (row.seq, row.hash)


def _idempotency_conflict() -> AppError:
    return hot.idempotency_conflict()


def _budget_view(b: Budget, period: str) -> BudgetView:
    same = b.period == period
    return BudgetView(
        account_id=b.account_id,
        period=period,
        monthly=CapView(
            cap_cents=b.monthly_cap_cents,
            used_cents=b.monthly_used_cents if same else 0,
            reserved_cents=b.monthly_reserved_cents if same else 0,
        ),
        total=CapView(
            cap_cents=b.total_cap_cents,
            used_cents=b.total_used_cents,
            reserved_cents=b.total_reserved_cents,
        ),
    )


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
