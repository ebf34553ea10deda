"""Billing state in the ledger database: Stripe customers, pending lines, charges, refunds,
processed Stripe events and entitlements (issue #4).

The money rules that are SQL rules live here:

* pending lines are batched into a charge under a per-account lock (``SELECT … FOR UPDATE`` on
  the account's ``billing_customers`` row; SQLite writers are serialized anyway), and a line is
  claimed with ``UPDATE … WHERE charge_id IS NULL``, so no line is ever in two charges;
* a charge changes state with one conditional ``UPDATE`` (``pending`` → ``succeeded`` /
  ``failed``): of several concurrent workers exactly one reports the change;
* a refund row is created under the same lock with the sum of earlier refunds checked in the
  same transaction, so concurrent refunds can never return more than was paid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.domain.billing import (
    METERS,
    charge_key,
    meter_identifier,
    period_invoice_key,
    plan_collection,
    refund_amount,
    refund_key,
)
from app.domain.caps import month_period
from app.errors import AppError
from app.services.ports import Clock
from app.store import billing_hot, hot
from app.store.hot import AuditRow
from app.store.ids import new_id
from app.store.ledger import SqlLedger
from app.store.models import (
    AuditOutbox,
    BillingCharge,
    BillingCustomer,
    BillingMeter,
    BillingPending,
    BillingRefund,
    BillingUsage,
    Cast,
    Entitlement,
    LedgerLine,
    Outbox,
    StripeEvent,
)

#: subscription states in which usage is billed through the subscription (Stripe's names)
SUBSCRIBED = ("active", "trialing", "past_due")


@dataclass(frozen=True)
class PendingSummary:
    currency: str
    amount_cents: int
    lines: int


class BillingStore:
    def __init__(self, ledger: SqlLedger, clock: Clock) -> None:
        self.ledger = ledger
        self.clock = clock

    # ------------------------------------------------------------------ customers

    async def _lock_customer(self, s: AsyncSession, account_id: str) -> BillingCustomer:
        """The account's billing row, created if new, locked until the transaction ends."""
        now = self.clock.now()
        await s.execute(
            self.ledger._insert(BillingCustomer)
            .values(
                account_id=account_id,
                payment_method_status="none",
                past_due=False,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["account_id"])
        )
        row = await s.scalar(
            select(BillingCustomer)
            .where(BillingCustomer.account_id == account_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        assert row is not None
        return row

    async def customer(self, account_id: str) -> BillingCustomer | None:
        async with self.ledger.reader() as s:
            return await s.get(BillingCustomer, account_id)

    async def customer_by_stripe_id(self, customer_id: str) -> BillingCustomer | None:
        async with self.ledger.reader() as s:
            return await s.scalar(
                select(BillingCustomer).where(BillingCustomer.stripe_customer_id == customer_id)
            )

    async def set_stripe_customer(self, account_id: str, customer_id: str) -> str:
        """Record the account's Stripe customer; returns the one recorded (first one wins)."""
        async with self.ledger.write() as s:
            row = await self._lock_customer(s, account_id)
            if row.stripe_customer_id is None:
                row.stripe_customer_id = customer_id
                row.updated_at = self.clock.now()
            return row.stripe_customer_id

    async def save_payment_method(
        self,
        account_id: str,
        payment_method: str,
        *,
        audit: Callable[[list[str]], Sequence[AuditRow]] | None = None,
    ) -> list[str]:
        """A new default payment method: the account is in good standing again and every
        failed charge is tried once more (a new attempt, so a new idempotency key). Returns the
        ids of the charges queued again. ``audit`` (given them) builds the audit records
        written in the same transaction."""
        now = self.clock.now()
        async with self.ledger.write() as s:
            row = await self._lock_customer(s, account_id)
            row.payment_method_id = payment_method
            row.payment_method_status = "active"
            row.past_due = False
            row.past_due_reason = None
            row.past_due_since = None
            row.updated_at = now
            failed = list(
                (
                    await s.scalars(
                        select(BillingCharge).where(
                            BillingCharge.account_id == account_id,
                            BillingCharge.status == "failed",
                        )
                    )
                ).all()
            )
            for charge in failed:
                charge.attempt += 1
                charge.status = "pending"
                charge.failure_code = None
                charge.stripe_id = None  # the next attempt makes a new PaymentIntent
                charge.updated_at = now
                s.add(
                    Outbox(
                        subject="billing.retry",
                        msg_id=f"{charge.id}:{charge.attempt}"[-80:],
                        payload={"charge_id": charge.id},
                        created_at=now,
                    )
                )
            if audit is not None:
                s.add_all(AuditOutbox.of(r) for r in audit([c.id for c in failed]))
            return [c.id for c in failed]

    async def mark_past_due(self, account_id: str, reason: str) -> bool:
        """Flag the account (402 on its next paid cast); False if it already was."""
        now = self.clock.now()
        async with self.ledger.write() as s:
            row = await self._lock_customer(s, account_id)
            if row.past_due:
                return False
            row.past_due = True
            row.past_due_reason = reason[:64]
            row.past_due_since = now
            if reason in ("card_declined", "authentication_required", "expired_card"):
                row.payment_method_status = "failed"
            row.updated_at = now
            return True

    async def clear_past_due(self, account_id: str, *, only_reason: str | None = None) -> bool:
        async with self.ledger.write() as s:
            row = await self._lock_customer(s, account_id)
            if not row.past_due or (only_reason is not None and row.past_due_reason != only_reason):
                return False
            row.past_due = False
            row.past_due_reason = None
            row.past_due_since = None
            row.updated_at = self.clock.now()
            return True

    async def set_subscription(
        self,
        account_id: str,
        subscription_id: str,
        status: str,
        plan: str | None,
        *,
        audit: Sequence[AuditRow] = (),
    ) -> None:
        async with self.ledger.write() as s:
            row = await self._lock_customer(s, account_id)
            row.subscription_id = subscription_id
            row.subscription_status = status
            if plan is not None:
                row.plan = plan
            row.updated_at = self.clock.now()
            s.add_all(AuditOutbox.of(r) for r in audit)

    # ------------------------------------------------------------------ pending lines & charges

    async def add_pending(self, cast: Cast) -> billing_hot.Pending:
        """Record a settled cast's amount as a pending line and, when the account's pending
        lines in that currency reach Stripe's minimum, batch them into one new charge (named
        after this cast). Idempotent: a redelivered job gets the charge its line is in.

        One bare-driver program (app/store/billing_hot.py): the account's row is locked and
        read in the same transaction, so collecting needs no further read."""
        assert cast.cost_cents is not None and cast.cost_cents > 0
        now = self.clock.now()
        cast_id, account_id, amount = cast.id, cast.caster_id, cast.cost_cents
        currency, period = cast.currency, month_period(cast.finished_at or now)
        return await self.ledger.fast.run(
            lambda: billing_hot.add_pending(
                cast_id=cast_id,
                account_id=account_id,
                amount_cents=amount,
                currency=currency,
                period=period,
                charge_id=charge_key(cast_id),
                now=now,
            )
        )

    async def gate_row(self, account_id: str) -> dict[str, Any] | None:
        """The account's billing row for the cast gate (one bare-driver read: it runs before
        every paid cast)."""
        return await self.ledger.fast.run(lambda: billing_hot.customer(account_id), atomic=False)

    async def cancel_queued(
        self,
        account_id: str,
        *,
        error_code: str,
        error_message: str,
        audit: Callable[[list[dict[str, Any]]], Sequence[AuditRow]] | None = None,
    ) -> list[Cast]:
        """Fail the account's paid casts that have not started yet, releasing their
        reservations (a failed payment, SPEC §23.2). One transaction; exact: a cast that
        started meanwhile is left alone. ``audit`` (given the cast rows cancelled) builds the
        audit records written in that transaction."""
        now = self.clock.now()
        billing = self.ledger.billing_enabled

        def program() -> Any:
            ids = yield from billing_hot.queued_paid_casts(account_id)
            done = yield from hot.cancel_queued(
                ids,
                error_code=error_code,
                error_message=error_message,
                billing=billing,
                now=now,
            )
            for row in audit(done) if audit is not None else ():
                yield hot.audit_stmt(row)
            return done

        rows: list[dict[str, Any]] = await self.ledger.fast.run(program)
        return [Cast(**row) for row in rows]

    async def fail_charge(
        self,
        charge_id: str,
        account_id: str,
        code: str,
        *,
        stripe_id: str | None,
        error_code: str,
        error_message: str,
        audit: billing_hot.FailureAudit,
    ) -> tuple[bool, bool, list[Cast]]:
        """A charge's payment failed, its account marked past due already: charge ``failed``,
        queued paid casts cancelled and the audit records, in ONE transaction
        (``billing_hot.fail_charge``). Returns (the account still past due: False when a payment
        method was saved meanwhile and nothing was changed; charge changed; casts cancelled)."""
        now = self.clock.now()
        billing = self.ledger.billing_enabled
        for_share = self.ledger.dialect == "postgresql"
        past_due, changed, rows = await self.ledger.fast.run(
            lambda: billing_hot.fail_charge(
                charge_id=charge_id,
                account_id=account_id,
                code=code,
                stripe_id=stripe_id,
                now=now,
                error_message=error_message,
                error_code=error_code,
                billing=billing,
                for_share=for_share,
                audit=audit,
            )
        )
        return past_due, changed, [Cast(**row) for row in rows]

    async def _open_total(
        self, s: AsyncSession, account_id: str, currency: str, *, period: str | None = None
    ) -> int:
        stmt = select(func.coalesce(func.sum(BillingPending.amount_cents), 0)).where(
            BillingPending.account_id == account_id,
            BillingPending.currency == currency,
            BillingPending.charge_id.is_(None),
        )
        if period is not None:
            stmt = stmt.where(BillingPending.period == period)
        return int(await s.scalar(stmt) or 0)

    async def _batch(
        self,
        s: AsyncSession,
        charge_id: str,
        account_id: str,
        currency: str,
        kind: str,
        *,
        period: str | None = None,
    ) -> BillingCharge:
        now = self.clock.now()
        charge = BillingCharge(
            id=charge_id,
            account_id=account_id,
            kind=kind,
            currency=currency,
            amount_cents=0,
            status="pending",
            attempt=1,
            refunded_cents=0,
            created_at=now,
            updated_at=now,
        )
        s.add(charge)
        await s.flush()
        stmt = update(BillingPending).where(
            BillingPending.account_id == account_id,
            BillingPending.currency == currency,
            BillingPending.charge_id.is_(None),
        )
        if period is not None:
            stmt = stmt.where(BillingPending.period == period)
        claimed = await s.scalars(
            stmt.values(charge_id=charge_id)
            .returning(BillingPending.amount_cents)
            .execution_options(synchronize_session=False)
        )
        charge.amount_cents = sum(int(a) for a in claimed.all())
        return charge

    async def batch_ended_periods(self) -> list[BillingCharge]:
        """Pending lines of months that have ended: one charge per account, currency and month
        (a PaymentIntent when it reaches the minimum, else an invoice item)."""
        current = month_period(self.clock.now())
        async with self.ledger.reader() as s:
            groups = (
                await s.execute(
                    select(
                        BillingPending.account_id,
                        BillingPending.currency,
                        BillingPending.period,
                        func.sum(BillingPending.amount_cents),
                    )
                    .where(BillingPending.charge_id.is_(None), BillingPending.period < current)
                    .group_by(
                        BillingPending.account_id, BillingPending.currency, BillingPending.period
                    )
                )
            ).all()
        out: list[BillingCharge] = []
        for account_id, currency, period, total in groups:
            plan = plan_collection(int(total), currency, period_ended=True)
            if plan.action == "wait":
                continue
            kind = "payment_intent" if plan.action == "charge" else "invoice_item"
            base = period_invoice_key(account_id, period, currency)
            async with self.ledger.write() as s:
                await self._lock_customer(s, account_id)
                if await self._open_total(s, account_id, currency, period=period) == 0:
                    continue  # another process swept it meanwhile
                # lines that arrived after this month was swept get a further charge
                charge_id, k = base, 1
                while await s.get(BillingCharge, charge_id) is not None:
                    k += 1
                    charge_id = f"{base}:{k}"
                charge = await self._batch(s, charge_id, account_id, currency, kind, period=period)
                if charge.amount_cents > 0:
                    out.append(charge)
        return out

    async def pending_summary(self, account_id: str) -> list[PendingSummary]:
        async with self.ledger.reader() as s:
            rows = (
                await s.execute(
                    select(
                        BillingPending.currency,
                        func.sum(BillingPending.amount_cents),
                        func.count(),
                    )
                    .where(
                        BillingPending.account_id == account_id,
                        BillingPending.charge_id.is_(None),
                    )
                    .group_by(BillingPending.currency)
                )
            ).all()
        return [PendingSummary(c, int(a), int(n)) for c, a, n in rows]

    async def charge(self, charge_id: str) -> BillingCharge | None:
        async with self.ledger.reader() as s:
            return await s.get(BillingCharge, charge_id)

    async def charge_by_stripe_id(self, stripe_id: str) -> BillingCharge | None:
        async with self.ledger.reader() as s:
            return await s.scalar(select(BillingCharge).where(BillingCharge.stripe_id == stripe_id))

    async def charges(self, account_id: str | None = None) -> list[BillingCharge]:
        stmt = select(BillingCharge).order_by(BillingCharge.created_at, BillingCharge.id)
        if account_id is not None:
            stmt = stmt.where(BillingCharge.account_id == account_id)
        async with self.ledger.reader() as s:
            return list((await s.scalars(stmt)).all())

    async def lines_of(self, charge_id: str) -> list[BillingPending]:
        async with self.ledger.reader() as s:
            rows = await s.scalars(
                select(BillingPending)
                .where(BillingPending.charge_id == charge_id)
                .order_by(BillingPending.cast_id)
            )
            return list(rows.all())

    async def line(self, cast_id: str) -> BillingPending | None:
        async with self.ledger.reader() as s:
            return await s.get(BillingPending, cast_id)

    async def set_charge_state(
        self,
        charge_id: str,
        status: str,
        *,
        from_states: Sequence[str] = ("pending",),
        stripe_id: str | None = None,
        failure_code: str | None = None,
        event_created: int | None = None,
        audit: Sequence[AuditRow] = (),
    ) -> bool:
        """Move a charge to ``status`` if it is in one of ``from_states``: one conditional
        UPDATE, so of concurrent workers exactly one gets True; that one commits ``audit`` (the
        audit outbox) with the change."""
        now = self.clock.now()
        states = tuple(from_states)
        return await self.ledger.fast.run(
            lambda: billing_hot.set_charge_state(
                charge_id,
                status,
                from_states=states,
                now=now,
                stripe_id=stripe_id,
                failure_code=failure_code,
                set_failure_code=failure_code is not None or status == "succeeded",
                event_created=event_created,
                audit=tuple(audit),
            ),
            atomic=bool(audit),
        )

    async def note_stripe_id(self, charge_id: str, stripe_id: str) -> None:
        async with self.ledger.write() as s:
            await s.execute(
                update(BillingCharge)
                .where(BillingCharge.id == charge_id, BillingCharge.stripe_id.is_(None))
                .values(stripe_id=stripe_id, updated_at=self.clock.now())
                .execution_options(synchronize_session=False)
            )

    async def note_refunded(self, stripe_id: str, refunded_cents: int) -> bool:
        """``charge.refunded``: amounts only grow, so a late event never lowers them."""
        async with self.ledger.write() as s:
            res = await s.execute(
                update(BillingCharge)
                .where(
                    BillingCharge.stripe_id == stripe_id,
                    BillingCharge.refunded_cents < refunded_cents,
                )
                .values(refunded_cents=refunded_cents, updated_at=self.clock.now())
                .execution_options(synchronize_session=False)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ refunds

    async def start_refund(
        self,
        cast_id: str,
        *,
        amount: int | None,
        reason: str,
        n: int | None = None,
    ) -> tuple[BillingRefund, bool]:
        """Create the next refund of a cast (``cast:{id}:refund:{n}``), or return refund ``n``
        if it exists (a retried request). Returns ``(refund, created)``.

        Where the money is decides the method: a line still pending is reduced (nothing was
        collected yet); a collected PaymentIntent is refunded at Stripe; an invoice item is
        credited to the customer's balance.
        """
        now = self.clock.now()
        async with self.ledger.write() as s:
            cast = await s.get(Cast, cast_id)
            if cast is None:
                raise AppError("NOT_FOUND", f"cast {cast_id!r} not found")
            await self._lock_customer(s, cast.caster_id)
            existing = list(
                (
                    await s.scalars(select(BillingRefund).where(BillingRefund.cast_id == cast_id))
                ).all()
            )
            if n is not None:
                for r in existing:
                    if r.id == refund_key(cast_id, n):
                        return r, False
            unfinished = [r for r in existing if r.status == "pending"]
            if n is None and unfinished:
                # an earlier refund never finished (Stripe unreachable, a crash): resume it with
                # its own key rather than start another
                if amount is not None and amount != unfinished[0].amount_cents:
                    raise AppError(
                        "CONFLICT",
                        f"refund {unfinished[0].id} of {unfinished[0].amount_cents} cents is "
                        "unfinished; run the same refund again to finish it first",
                    )
                return unfinished[0], False
            if cast.status != "succeeded" or not cast.cost_cents:
                raise AppError("CONFLICT", f"cast {cast_id} was not charged; nothing to refund")
            done = sum(r.amount_cents for r in existing if r.status != "failed")
            try:
                value = refund_amount(cast.cost_cents, done, amount)
            except ValueError as e:
                raise AppError("VALIDATION_ERROR", str(e), detail={"path": "/amount"}) from None
            line = await s.get(BillingPending, cast_id)
            charge = None
            if line is not None and line.charge_id is not None:
                charge = await s.get(BillingCharge, line.charge_id)
            metered = line is None and await s.scalar(
                select(func.count()).where(BillingUsage.cast_id == cast_id)
            )
            if metered:
                method = "balance_credit"  # billed through the subscription: credit it
            elif line is None or charge is None:
                method = "pending_credit"
            elif charge.status == "succeeded" and charge.kind == "payment_intent":
                method = "stripe_refund"
            elif charge.status in ("invoiced",):
                method = "balance_credit"
            elif charge.status == "failed":
                method = "pending_credit"  # never collected: lower what is owed
            else:
                raise AppError(
                    "CONFLICT",
                    f"the charge of cast {cast_id} is being collected; retry the refund shortly",
                )
            number = n if n is not None else len(existing) + 1
            refund = BillingRefund(
                id=refund_key(cast_id, number),
                cast_id=cast_id,
                account_id=cast.caster_id,
                charge_id=charge.id if charge is not None else None,
                amount_cents=value,
                currency=cast.currency,
                method=method,
                reason=reason[:64],
                status="pending",
                created_at=now,
                updated_at=now,
            )
            s.add(refund)
            if method == "pending_credit" and line is not None:
                if charge is None:
                    line.amount_cents -= value
                else:  # a failed charge: what it will collect shrinks with it
                    line.amount_cents -= value
                    charge.amount_cents -= value
            await s.flush()
            return refund, True

    async def finish_refund(
        self,
        refund_id: str,
        *,
        status: str,
        stripe_id: str | None = None,
        audit: Callable[[BillingRefund], Sequence[AuditRow]] | None = None,
    ) -> BillingRefund | None:
        """Record a refund's outcome and, when it succeeded, its ledger line — exactly once,
        with the audit records ``audit`` builds of it (the audit outbox, same transaction)."""
        now = self.clock.now()
        async with self.ledger.write() as s:
            refund = await s.get(BillingRefund, refund_id, with_for_update=True)
            if refund is None or refund.status != "pending":
                return None
            refund.status = status
            refund.stripe_id = stripe_id
            refund.updated_at = now
            if status == "succeeded":
                s.add(
                    LedgerLine(
                        cast_id=refund.cast_id,
                        account_id=refund.account_id,
                        kind="refund" if refund.method == "stripe_refund" else "credit",
                        amount_cents=refund.amount_cents,
                        currency=refund.currency,
                        method=refund.method,
                        refund_ref=stripe_id,
                        idempotency_ref=refund.id,
                        created_at=now,
                    )
                )
                if refund.charge_id is not None and refund.method == "stripe_refund":
                    await s.execute(
                        update(BillingCharge)
                        .where(BillingCharge.id == refund.charge_id)
                        .values(refunded_cents=BillingCharge.refunded_cents + refund.amount_cents)
                        .execution_options(synchronize_session=False)
                    )
            elif refund.method == "pending_credit":
                line = await s.get(BillingPending, refund.cast_id)
                if line is not None:
                    line.amount_cents += refund.amount_cents
            if audit is not None:
                s.add_all(AuditOutbox.of(r) for r in audit(refund))
            await s.flush()
            return refund

    async def refunds(self, cast_id: str | None = None) -> list[BillingRefund]:
        stmt = select(BillingRefund).order_by(BillingRefund.created_at, BillingRefund.id)
        if cast_id is not None:
            stmt = stmt.where(BillingRefund.cast_id == cast_id)
        async with self.ledger.reader() as s:
            return list((await s.scalars(stmt)).all())

    # ------------------------------------------------------------------ Stripe events

    async def event_status(self, event_id: str) -> str | None:
        async with self.ledger.reader() as s:
            row = await s.get(StripeEvent, event_id)
            return None if row is None else row.status

    async def last_applied(self, object_id: str) -> int | None:
        """``created`` of the newest event applied to a Stripe object (out-of-order guard)."""
        async with self.ledger.reader() as s:
            value = await s.scalar(
                select(func.max(StripeEvent.created)).where(
                    StripeEvent.object_id == object_id, StripeEvent.status == "applied"
                )
            )
            return None if value is None else int(value)

    async def record_event(
        self, event_id: str, type_: str, object_id: str | None, created: int, status: str
    ) -> bool:
        async with self.ledger.write() as s:
            res = await s.execute(
                self.ledger._insert(StripeEvent)
                .values(
                    id=event_id,
                    type=type_[:80],
                    object_id=object_id[:80] if object_id else None,
                    created=created,
                    status=status,
                    processed_at=self.clock.now(),
                )
                .on_conflict_do_nothing(index_elements=["id"])
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ entitlements

    async def grant_entitlement(
        self,
        *,
        account_id: str,
        spell_id: str,
        checkout_session_id: str,
        payment_intent_id: str | None,
        amount_cents: int,
        currency: str,
        license_url: str | None,
        audit: Callable[[Entitlement], Sequence[AuditRow]] | None = None,
    ) -> tuple[Entitlement, bool]:
        """The entitlement of a completed one-time purchase (idempotent per Checkout Session);
        ``(entitlement, created)``. The one call that creates it commits the audit records
        ``audit`` builds of it in the same transaction."""
        now = self.clock.now()
        async with self.ledger.write() as s:
            res = await s.execute(
                self.ledger._insert(Entitlement)
                .values(
                    id=new_id("ent"),
                    account_id=account_id,
                    spell_id=spell_id,
                    checkout_session_id=checkout_session_id,
                    payment_intent_id=payment_intent_id,
                    amount_cents=amount_cents,
                    currency=currency,
                    status="active",
                    license_url=license_url,
                    created_at=now,
                )
                .on_conflict_do_nothing(index_elements=["checkout_session_id"])
            )
            ent = await s.scalar(
                select(Entitlement).where(Entitlement.checkout_session_id == checkout_session_id)
            )
            assert ent is not None
            created = bool(res.rowcount == 1)  # type: ignore[attr-defined]
            if created and audit is not None:
                s.add_all(AuditOutbox.of(r) for r in audit(ent))
            return ent, created

    async def revoke_entitlements(self, payment_intent_id: str) -> list[str]:
        """Revoke what a (failed) payment bought; the accounts of the entitlements revoked,
        one entry per entitlement (empty: nothing was active)."""
        async with self.ledger.write() as s:
            res = await s.scalars(
                update(Entitlement)
                .where(
                    Entitlement.payment_intent_id == payment_intent_id,
                    Entitlement.status == "active",
                )
                .values(status="revoked", revoked_at=self.clock.now())
                .returning(Entitlement.account_id)
                .execution_options(synchronize_session=False)
            )
            return [str(a) for a in res.all()]

    async def has_purchase(self, payment_intent_id: str) -> bool:
        """Whether a one-time purchase was paid with this PaymentIntent."""
        async with self.ledger.reader() as s:
            found = await s.scalar(
                select(Entitlement.id)
                .where(Entitlement.payment_intent_id == payment_intent_id)
                .limit(1)
            )
            return found is not None

    async def entitlements(self, account_id: str) -> list[Entitlement]:
        async with self.ledger.reader() as s:
            rows = await s.scalars(
                select(Entitlement)
                .where(Entitlement.account_id == account_id)
                .order_by(Entitlement.created_at)
            )
            return list(rows.all())

    async def has_entitlement(self, account_id: str, spell_id: str) -> bool:
        async with self.ledger.reader() as s:
            found = await s.scalar(
                select(Entitlement.id).where(
                    Entitlement.account_id == account_id,
                    Entitlement.spell_id == spell_id,
                    Entitlement.status == "active",
                )
            )
            return found is not None

    # ------------------------------------------------------------------ reporting

    async def collected_cents(self, since: datetime | None = None) -> int:
        stmt = select(func.coalesce(func.sum(BillingCharge.amount_cents), 0)).where(
            BillingCharge.status == "succeeded"
        )
        if since is not None:
            stmt = stmt.where(BillingCharge.created_at >= since)
        async with self.ledger.reader() as s:
            return int(await s.scalar(stmt) or 0)

    # ------------------------------------------------------------------ metered usage

    async def meters(self) -> dict[str, BillingMeter]:
        async with self.ledger.reader() as s:
            return {m.name: m for m in (await s.scalars(select(BillingMeter))).all()}

    async def save_meter(self, name: str, event_name: str, stripe_id: str) -> None:
        async with self.ledger.write() as s:
            await s.execute(
                self.ledger._insert(BillingMeter)
                .values(
                    name=name,
                    event_name=event_name,
                    stripe_id=stripe_id,
                    created_at=self.clock.now(),
                )
                .on_conflict_do_nothing(index_elements=["name"])
            )

    async def cast_usage(self, cast_id: str) -> dict[str, int] | None:
        """The meter quantities of a metered cast, as its settlement queued them (the
        ``billing.usage`` outbox row written with the cast's ``finish``); None: not metered."""
        async with self.ledger.reader() as s:
            payload = await s.scalar(
                select(Outbox.payload).where(Outbox.msg_id == f"cast:{cast_id}:usage")
            )
        if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
            return None
        return {str(k): int(v) for k, v in payload["usage"].items()}

    async def route_metered(self, cast: Cast, usage: dict[str, int], timestamp: int) -> str:
        """Decide ONCE, under the account's lock, how a metered cast is billed: ``meter`` (the
        account has a metered subscription: its usage rows are recorded, reported as meter
        events) or ``charge`` (no subscription: its cost is charged per cast like a flat one).
        A redelivered job gets the decision made the first time."""
        now = self.clock.now()
        async with self.ledger.write() as s:
            row = await self._lock_customer(s, cast.caster_id)
            if await s.get(BillingPending, cast.id) is not None:
                return "charge"
            if await s.scalar(select(func.count()).where(BillingUsage.cast_id == cast.id)):
                return "meter"
            if row.subscription_status not in SUBSCRIBED or row.stripe_customer_id is None:
                return "charge"
            for meter, value in usage.items():
                s.add(
                    BillingUsage(
                        identifier=meter_identifier(cast.id, meter),
                        account_id=cast.caster_id,
                        cast_id=cast.id,
                        meter=meter,
                        value=value,
                        timestamp=timestamp,
                        source="cast",
                        status="pending",
                        created_at=now,
                    )
                )
            if not usage:  # nothing to report, but the decision is still recorded
                s.add(
                    BillingUsage(
                        identifier=meter_identifier(cast.id, "casts"),
                        account_id=cast.caster_id,
                        cast_id=cast.id,
                        meter="casts",
                        value=0,
                        timestamp=timestamp,
                        source="cast",
                        status="sent",
                        created_at=now,
                        sent_at=now,
                    )
                )
            return "meter"

    async def record_usage(
        self,
        s: AsyncSession,
        *,
        account_id: str,
        ref: str,
        usage: dict[str, int],
        timestamp: int,
        report: bool,
    ) -> list[BillingUsage]:
        """Manual usage (``POST /v1/billing/usage``) inside the caller's transaction: one row per
        meter and, when it is to be reported to Stripe, its ``billing.meter`` job."""
        now = self.clock.now()
        rows = [
            BillingUsage(
                identifier=meter_identifier(ref, meter),
                account_id=account_id,
                cast_id=None,
                meter=meter,
                value=value,
                timestamp=timestamp,
                source="manual",
                status="pending" if report else "ledger",
                created_at=now,
            )
            for meter, value in usage.items()
        ]
        s.add_all(rows)
        if report:
            s.add(
                Outbox(
                    subject="billing.meter",
                    msg_id=f"usage:{ref}",
                    payload={"account_id": account_id, "ref": ref},
                    created_at=now,
                )
            )
        await s.flush()
        return rows

    async def unsent_usage(
        self, *, cast_id: str | None = None, ref: str | None = None, account_id: str | None = None
    ) -> list[BillingUsage]:
        stmt = select(BillingUsage).where(BillingUsage.status == "pending")
        if cast_id is not None:
            stmt = stmt.where(BillingUsage.cast_id == cast_id)
        if ref is not None:
            ids = [meter_identifier(ref, m) for m in METERS]
            stmt = stmt.where(BillingUsage.identifier.in_(ids))
        if account_id is not None:
            stmt = stmt.where(BillingUsage.account_id == account_id)
        async with self.ledger.reader() as s:
            return list((await s.scalars(stmt.order_by(BillingUsage.identifier))).all())

    async def mark_usage_sent(self, identifier: str) -> bool:
        async with self.ledger.write() as s:
            res = await s.execute(
                update(BillingUsage)
                .where(BillingUsage.identifier == identifier, BillingUsage.status == "pending")
                .values(status="sent", sent_at=self.clock.now())
                .execution_options(synchronize_session=False)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def usage_rows(
        self, *, since_ts: int | None = None, until_ts: int | None = None
    ) -> list[BillingUsage]:
        stmt = select(BillingUsage).order_by(BillingUsage.account_id, BillingUsage.identifier)
        if since_ts is not None:
            stmt = stmt.where(BillingUsage.timestamp >= since_ts)
        if until_ts is not None:
            stmt = stmt.where(BillingUsage.timestamp < until_ts)
        async with self.ledger.reader() as s:
            return list((await s.scalars(stmt)).all())

    async def usage_of(self, cast_id: str) -> list[BillingUsage]:
        async with self.ledger.reader() as s:
            rows = await s.scalars(
                select(BillingUsage)
                .where(BillingUsage.cast_id == cast_id)
                .order_by(BillingUsage.identifier)
            )
            return list(rows.all())

    # ------------------------------------------------------------------ SLA refunds

    async def queue_refund_job(self, cast_id: str, reason: str) -> bool:
        """Queue the automatic refund of a cast (one per cast and reason): a job, so a refund
        that cannot be made yet is retried without touching the charge's own job."""
        async with self.ledger.write() as s:
            res = await s.execute(
                self.ledger._insert(Outbox)
                .values(
                    subject="billing.refund",
                    msg_id=f"cast:{cast_id}:refund:{reason}"[:80],
                    payload={"cast_id": cast_id, "reason": reason},
                    created_at=self.clock.now(),
                )
                .on_conflict_do_nothing(index_elements=["msg_id"])
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def mark_subscription_past_due(self, subscription_id: str) -> bool:
        async with self.ledger.write() as s:
            res = await s.execute(
                update(BillingCustomer)
                .where(
                    BillingCustomer.subscription_id == subscription_id,
                    BillingCustomer.subscription_status.in_(["active", "trialing"]),
                )
                .values(subscription_status="past_due", updated_at=self.clock.now())
                .execution_options(synchronize_session=False)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def adopt_payment_method(self, account_id: str, payment_method: str) -> bool:
        """Record the payment method a subscription Checkout saved, unless one is on file."""
        async with self.ledger.write() as s:
            row = await self._lock_customer(s, account_id)
            if row.payment_method_id is not None:
                return False
            row.payment_method_id = payment_method
            row.payment_method_status = "active"
            row.updated_at = self.clock.now()
            return True

    async def subscribed_customers(self) -> list[BillingCustomer]:
        async with self.ledger.reader() as s:
            rows = await s.scalars(
                select(BillingCustomer).where(BillingCustomer.subscription_id.is_not(None))
            )
            return list(rows.all())
