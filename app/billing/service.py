"""Stripe billing flows: settle casts, take webhooks, refund, reconcile (issue #4, SPEC §7).

Everything that talks to Stripe runs from the jobs queue, never on a request path:

* ``billing.charge`` (queued by the ledger in the transaction that settles a cast with a cost):
  add the cast's pending line; when the account's pending lines reach Stripe's minimum, collect
  them with ONE off-session PaymentIntent (:mod:`app.domain.billing` documents the rule). A
  decline or a card that needs authentication marks the account ``past_due``: its next paid
  cast is refused with ``402 PAYMENT_REQUIRED`` until a new payment method is saved.
* ``billing.retry``: a charge tried again after a new payment method was saved (new attempt,
  new idempotency key — Stripe would replay the stored decline for the old one).
* ``webhook.stripe``: a verified Stripe event stored in the inbox; deduplicated by event id,
  applied only if not older than what we already know about its object.
* ``billing.usage`` (queued with the ``finish`` of a metered cast, carrying its meter
  quantities): an account with a metered subscription gets the quantities recorded and reported
  as Billing Meter events (``identifier`` = ``{cast_id}:{meter}``, deduplicated by Stripe); an
  account without one is charged the cast's cost per cast, like a flat cast. The decision is
  taken once, under the account's lock (``BillingStore.route_metered``); ``billing.charge`` and
  ``billing.usage`` of one cast both run :meth:`BillingService.settle`, whichever comes first.
* ``billing.meter``: usage reported through ``POST /v1/billing/usage``, sent as meter events.
* ``billing.refund``: the automatic refund of a cast that broke its spell's SLA
  (``sla.max_duration_sec``): a full refund of a per-cast charge, or a customer balance credit
  for a cast billed through a subscription (``cast:{id}:refund:{n}``).

Handlers are idempotent (delivery is at-least-once): charges are created under a lock and keyed
by a domain id, state changes are conditional updates, Stripe calls carry idempotency keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from app.billing.stripe_client import StripeClient
from app.domain.billing import (
    METERS,
    SLA_REFUND_REASON,
    Plan,
    charge_key,
    customer_key,
    minimum_charge,
    minute_floor,
    should_apply,
    sla_breached,
)
from app.domain.spells import SpellDocument
from app.errors import AppError
from app.services.ports import AuditSink, Message
from app.services.tokens import Caller
from app.store.billing_store import SUBSCRIBED, BillingStore
from app.store.hot import AuditRow
from app.store.inbox import Inbox
from app.store.ledger import SqlLedger
from app.store.models import BillingCharge, BillingRefund, BillingUsage, Cast

log = logging.getLogger("spell.billing")

#: the error code of a queued cast cancelled because its account's payment failed (§23.2)
PAYMENT_FAILED = "PAYMENT_FAILED"

#: the webhook events handled; anything else is acknowledged and ignored
HANDLED_EVENTS = frozenset(
    {
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "invoice.paid",
        "invoice.payment_failed",
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "charge.refunded",
    }
)


@dataclass(frozen=True)
class BillingConfig:
    public_url: str = "http://127.0.0.1:8080"
    #: subscription plans (``SPELL_STRIPE_PLANS``), by name
    plans: Mapping[str, Plan] = field(default_factory=dict)
    #: usage still unreported this long after it was recorded is a reconciliation difference
    unreported_grace_sec: int = 3600


class RevenueCounter:
    """What the service needs from the process metrics (``revenue_cents``, ``refunds_count``)."""

    def __init__(self, revenue: Callable[[int], None], refund: Callable[[], None]) -> None:
        self.revenue = revenue
        self.refund = refund


class BillingService:
    def __init__(
        self,
        *,
        config: BillingConfig,
        stripe: StripeClient,
        store: BillingStore,
        ledger: SqlLedger,
        inbox: Inbox,
        audit: AuditSink,
        counters: RevenueCounter,
        kick_outbox: Callable[[], None],
        on_cast_ended: Callable[[str], None] | None = None,
        kick_audit: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.stripe = stripe
        self.store = store
        self.ledger = ledger
        self.inbox = inbox
        self.audit = audit
        self.counters = counters
        self.kick_outbox = kick_outbox
        #: told the id of every cast billing ends (cancelled after a failed payment), so the
        #: process's waiters (SSE, ``wait``) wake up
        self.on_cast_ended = on_cast_ended
        #: wakes the process's audit outbox drainer (app/store/audit_outbox.py): billing's
        #: audit records are committed with the state change they record, not appended after
        self.kick_audit: Callable[[], None] = kick_audit or (lambda: None)
        self._meters: dict[str, tuple[str, str]] = {}  # name → (event_name, Stripe meter id)
        self._meters_lock = asyncio.Lock()
        self._terms_cache: dict[tuple[str, str], tuple[str | None, int | None]] = {}
        #: the last scheduled reconciliation: when, and the differences it found
        self.last_reconcile: tuple[datetime, list[str]] | None = None

    def _record(self, event: str, **fields: Any) -> AuditRow:
        """An audit record for the audit outbox: written in the transaction of the state change
        it records (a crash after that commit cannot lose it), appended to the file by the
        drainer (``ts`` = now, ``data.event_id`` added)."""
        return AuditRow(event=event, at=self.store.clock.now(), **fields)

    # ------------------------------------------------------------------ the cast gate

    async def check_can_pay(self, account_id: str) -> None:
        """Refuse a paid cast (402 ``PAYMENT_REQUIRED``) for an account that is past due or has
        no payment method: nothing runs unpaid. Free casts are never refused here."""
        row = await self.store.gate_row(account_id)  # bare driver: runs before every paid cast
        fix = "save a payment method with `spell billing setup` (or POST /v1/billing/setup)"
        if row is not None and row["past_due"]:
            raise AppError(
                "PAYMENT_REQUIRED",
                f"the account is past due ({row['past_due_reason']}): a payment was refused; "
                f"{fix}, then cast again",
                detail={"account": account_id, "reason": row["past_due_reason"]},
            )
        if row is not None and row["subscription_status"] in ("active", "trialing"):
            return  # the subscription collects (its invoices); usage goes to its meters
        if row is None or row["payment_method_id"] is None:
            raise AppError(
                "PAYMENT_REQUIRED",
                f"paid casts need a payment method on file; {fix}",
                detail={"account": account_id, "reason": "no_payment_method"},
            )

    # ------------------------------------------------------------------ customers & setup

    async def ensure_customer(self, account_id: str) -> str:
        row = await self.store.customer(account_id)
        if row is not None and row.stripe_customer_id is not None:
            return row.stripe_customer_id
        created = await self.stripe.create_customer(
            account_id, idempotency_key=customer_key(account_id)
        )
        return await self.store.set_stripe_customer(account_id, str(created["id"]))

    async def setup_session(self, caller: Caller) -> dict[str, Any]:
        """A Checkout Session in ``setup`` mode: the URL where the caster saves a card."""
        if not (caller.is_operator or "cast:invoke" in caller.scopes):
            raise AppError("FORBIDDEN", "saving a payment method needs a caster token")
        customer = await self.ensure_customer(caller.account_id)
        base = self.config.public_url.rstrip("/")
        session = await self.stripe.create_checkout_session(
            {
                "mode": "setup",
                "currency": "usd",
                "customer": customer,
                "client_reference_id": caller.account_id,
                "success_url": f"{base}/billing/setup/done?session_id={{CHECKOUT_SESSION_ID}}",
                "cancel_url": f"{base}/billing/setup/cancelled",
                "metadata": {"account_id": caller.account_id, "purpose": "setup"},
                "setup_intent_data": {"metadata": {"account_id": caller.account_id}},
            },
            # each request is its own session; the key still names the account it is for
            idempotency_key=f"account:{caller.account_id}:setup:{secrets.token_hex(8)}",
        )
        return {"url": session["url"], "session_id": session["id"], "customer": customer}

    async def view(self, account_id: str) -> dict[str, Any]:
        """``GET /v1/billing``: plan, payment method status, what is owed and collected."""
        row = await self.store.customer(account_id)
        pending = await self.store.pending_summary(account_id)
        charges = await self.store.charges(account_id)
        ents = await self.store.entitlements(account_id)
        return {
            "account": account_id,
            "mode": "stripe",
            "customer": row.stripe_customer_id if row else None,
            "payment_method": {
                "status": row.payment_method_status if row else "none",
                "id": row.payment_method_id if row else None,
            },
            "past_due": bool(row and row.past_due),
            "past_due_reason": row.past_due_reason if row else None,
            "plan": row.plan if row else None,
            "subscription_status": row.subscription_status if row else None,
            "pending": [
                {
                    "currency": p.currency,
                    "amount_cents": p.amount_cents,
                    "lines": p.lines,
                    "minimum_charge_cents": minimum_charge(p.currency),
                }
                for p in pending
            ],
            "charges": [
                {
                    "id": c.id,
                    "kind": c.kind,
                    "amount_cents": c.amount_cents,
                    "currency": c.currency,
                    "status": c.status,
                    "refunded_cents": c.refunded_cents,
                    "failure_code": c.failure_code,
                    "created_at": c.created_at.isoformat(),
                }
                for c in charges[-20:]
            ],
            "entitlements": [
                {"spell_id": e.spell_id, "status": e.status, "license_url": e.license_url}
                for e in ents
            ],
        }

    # ------------------------------------------------------------------ settlement jobs

    async def on_charge_job(self, msg: Message) -> None:
        await self.settle(str(msg.payload["cast_id"]))

    async def on_usage_job(self, msg: Message) -> None:
        await self.settle(str(msg.payload["cast_id"]))

    async def settle(self, cast_id: str) -> str | None:
        """Bill a succeeded cast: through the account's metered subscription (meter events) or
        per cast (a pending line, collected by the minimum-charge rule); then queue its SLA
        refund if it broke the spell's SLA. Idempotent. Returns the route taken."""
        cast = await self.ledger.get_cast(cast_id)
        if cast is None or cast.status != "succeeded":
            return None
        model, sla_limit = await self._terms(cast)
        usage = await self.store.cast_usage(cast_id) if model == "metered" else None
        route = "charge"
        if usage is not None:
            when = cast.finished_at or self.store.clock.now()
            route = await self.store.route_metered(cast, usage, int(when.timestamp()))
        if route == "meter":
            await self.report(await self.store.unsent_usage(cast_id=cast_id))
        elif cast.cost_cents:
            pending = await self.store.add_pending(cast)
            if pending.charge is None:
                log.info("cast %s: %d cents pending (below the minimum)", cast_id, cast.cost_cents)
            else:
                await self.collect(
                    BillingCharge(**pending.charge),
                    customer=pending.customer,
                    casts=pending.casts if pending.created else None,
                )
        took = (cast.finished_at - cast.created_at).total_seconds() if cast.finished_at else 0.0
        if (
            cast.cost_cents
            and sla_breached(sla_limit, took)
            and await self.store.queue_refund_job(cast_id, SLA_REFUND_REASON)
        ):
            self.kick_outbox()
        return route

    async def _terms(self, cast: Cast) -> tuple[str | None, int | None]:
        """The pricing model and SLA (``max_duration_sec``) of the cast's spell version;
        published versions never change, so they are cached."""
        key = (cast.spell_id, cast.spell_version)
        hit = self._terms_cache.get(key)
        if hit is not None:
            return hit
        found = await self.ledger.get_spell(cast.spell_id, cast.spell_version)
        if found is None:
            return None, None
        doc = SpellDocument.model_validate(found[1].document)
        terms = (doc.pricing.model, doc.sla.max_duration_sec if doc.sla is not None else None)
        if len(self._terms_cache) >= 4096:
            self._terms_cache.pop(next(iter(self._terms_cache)))
        self._terms_cache[key] = terms
        return terms

    async def on_refund_job(self, msg: Message) -> None:
        """The automatic (SLA) refund of a cast: all that is left of its charge."""
        cast_id = str(msg.payload["cast_id"])
        reason = str(msg.payload.get("reason") or SLA_REFUND_REASON)
        mine = [r for r in await self.store.refunds(cast_id) if r.reason == reason]
        if mine and mine[0].status != "pending":
            return  # done already (a redelivered job)
        n = int(mine[0].id.rsplit(":", 1)[1]) if mine else None
        try:
            await self.refund_cast(cast_id, amount=None, reason=reason, actor="billing:sla", n=n)
        except AppError as e:
            if e.code != "VALIDATION_ERROR":
                raise  # e.g. its charge is being collected right now: the job is retried
            log.info("cast %s: no SLA refund, %s", cast_id, e.message)

    # ------------------------------------------------------------------ metered usage

    async def ensure_meters(self) -> dict[str, tuple[str, str]]:
        """The platform's Billing Meters (``casts``, ``compute_ms``, ``egress_mb``): found in
        the ledger, else adopted from Stripe by ``event_name``, else created (idempotency key
        ``meter:{event_name}``). Name → (event_name, meter id)."""
        if len(self._meters) == len(METERS):
            return self._meters
        async with self._meters_lock:
            known = {
                m.name: (m.event_name, m.stripe_id) for m in (await self.store.meters()).values()
            }
            missing = [name for name in METERS if name not in known]
            if missing:
                existing = {
                    str(m["event_name"]): str(m["id"])
                    for m in await self.stripe.list_meters()
                    if m.get("status", "active") == "active"
                }
                for name in missing:
                    event_name = METERS[name]
                    meter_id = existing.get(event_name)
                    if meter_id is None:
                        created = await self.stripe.create_meter(
                            event_name=event_name,
                            display_name=f"Spell Platform {name}",
                            idempotency_key=f"meter:{event_name}",
                        )
                        meter_id = str(created["id"])
                    await self.store.save_meter(name, event_name, meter_id)
                    known[name] = (event_name, meter_id)
            self._meters = known
            return known

    async def report(self, rows: list[BillingUsage]) -> int:
        """Send usage rows as meter events (each row once: Stripe dedupes its identifier)."""
        if not rows:
            return 0
        meters = await self.ensure_meters()
        customers: dict[str, str] = {}
        sent = 0
        for row in rows:
            customer = customers.get(row.account_id)
            if customer is None:
                c = await self.store.customer(row.account_id)
                if c is None or c.stripe_customer_id is None:
                    raise AppError("CONFLICT", f"account {row.account_id} has no Stripe customer")
                customer = customers[row.account_id] = c.stripe_customer_id
            await self.stripe.meter_event(
                event_name=meters[row.meter][0],
                customer=customer,
                value=row.value,
                identifier=row.identifier,
                timestamp=row.timestamp,
            )
            sent += await self.store.mark_usage_sent(row.identifier)
        return sent

    async def on_meter_job(self, msg: Message) -> None:
        await self.report(await self.store.unsent_usage(ref=str(msg.payload["ref"])))

    async def subscribe_session(self, caller: Caller, plan_name: str) -> dict[str, Any]:
        """A Checkout Session in ``subscription`` mode for a configured plan."""
        if not (caller.is_operator or "cast:invoke" in caller.scopes):
            raise AppError("FORBIDDEN", "subscribing needs a caster token")
        plan = self.config.plans.get(plan_name)
        if plan is None:
            known = ", ".join(sorted(self.config.plans)) or "none configured (SPELL_STRIPE_PLANS)"
            raise AppError(
                "VALIDATION_ERROR",
                f"unknown plan {plan_name!r}; plans: {known}",
                detail={"path": "/plan"},
            )
        row = await self.store.customer(caller.account_id)
        if row is not None and row.subscription_status in SUBSCRIBED:
            raise AppError(
                "CONFLICT",
                f"the account already has a {row.subscription_status} subscription "
                f"({row.plan or row.subscription_id})",
            )
        customer = await self.ensure_customer(caller.account_id)
        base = self.config.public_url.rstrip("/")
        meta = {"account_id": caller.account_id, "plan": plan.name, "purpose": "subscription"}
        session = await self.stripe.create_checkout_session(
            {
                "mode": "subscription",
                "customer": customer,
                "client_reference_id": caller.account_id,
                "line_items": plan.line_items(),
                "success_url": f"{base}/billing/subscribe/done?session_id={{CHECKOUT_SESSION_ID}}",
                "cancel_url": f"{base}/billing/subscribe/cancelled",
                "metadata": meta,
                "subscription_data": {
                    "metadata": {"account_id": caller.account_id, "plan": plan.name}
                },
            },
            idempotency_key=f"account:{caller.account_id}:subscribe:{secrets.token_hex(8)}",
        )
        return {
            "url": session["url"],
            "session_id": session["id"],
            "customer": customer,
            "plan": plan.name,
        }

    async def on_retry_job(self, msg: Message) -> None:
        charge = await self.store.charge(str(msg.payload["charge_id"]))
        if charge is not None:
            await self.collect(charge)

    async def settle_ended_periods(self) -> int:
        """Collect pending lines of months that have ended (run on a schedule)."""
        charges = await self.store.batch_ended_periods()
        for charge in charges:
            await self.collect(charge)
        return len(charges)

    async def collect(
        self,
        charge: BillingCharge,
        *,
        customer: Mapping[str, Any] | None = None,
        casts: Sequence[str] | None = None,
    ) -> None:
        """Collect a pending charge from Stripe. Safe to repeat: the same attempt always uses
        the same idempotency key, and the state change is conditional. ``customer`` (the
        account's billing row, read under the lock that created the charge) and ``casts`` (the
        lines it covers) spare the reads when the caller has them."""
        if charge.status != "pending":
            return
        if customer is None:
            found = await self.store.customer(charge.account_id)
            customer = (
                None
                if found is None
                else {
                    "stripe_customer_id": found.stripe_customer_id,
                    "payment_method_id": found.payment_method_id,
                }
            )
        if (
            customer is None
            or customer["stripe_customer_id"] is None
            or customer["payment_method_id"] is None
        ):
            await self._failed(charge, "no_payment_method", None)
            return
        stripe_customer = str(customer["stripe_customer_id"])
        payment_method = str(customer["payment_method_id"])
        key = charge.id if charge.attempt <= 1 else f"{charge.id}:{charge.attempt}"
        meta = {"charge_id": charge.id, "account_id": charge.account_id}
        if charge.kind == "invoice_item":
            item = await self.stripe.create_invoice_item(
                customer=stripe_customer,
                amount=charge.amount_cents,
                currency=charge.currency,
                description="Spell Platform casts below the minimum charge, carried over",
                idempotency_key=key,
                metadata=meta,
            )
            if await self.store.set_charge_state(
                charge.id,
                "invoiced",
                stripe_id=str(item["id"]),
                audit=[await self._charged(charge, "invoice_item", str(item["id"]))],
            ):
                self.kick_audit()
            return
        try:
            pi = await self.stripe.charge_off_session(
                amount=charge.amount_cents,
                currency=charge.currency,
                customer=stripe_customer,
                payment_method=payment_method,
                idempotency_key=key,
                description=f"Spell Platform casts ({charge.id})",
                metadata=meta,
            )
        except AppError as e:
            if e.code != "PAYMENT_FAILED":
                raise  # transient or our bug: the job is retried (same key: no double charge)
            detail = e.detail or {}
            code = str(detail.get("stripe_code") or "card_declined")
            if code != "authentication_required":
                code = str(detail.get("stripe_decline_code") or code)
            await self._failed(charge, code, detail.get("payment_intent"))
            return
        status = str(pi.get("status"))
        if status == "succeeded":
            if await self.store.set_charge_state(
                charge.id,
                "succeeded",
                stripe_id=str(pi["id"]),
                audit=[await self._charged(charge, "stripe_pi", str(pi["id"]), casts)],
            ):
                self.kick_audit()
                self.counters.revenue(charge.amount_cents)
        elif status == "processing":
            await self.store.note_stripe_id(charge.id, str(pi["id"]))  # the webhook finishes it
        else:  # requires_action etc.: off-session, nobody can act on it
            await self._failed(charge, "authentication_required", str(pi["id"]))

    async def _failed(self, charge: BillingCharge, code: str, stripe_id: Any) -> None:
        """The charge's payment failed: the account is marked past due (committed first, so a
        cast accepted meanwhile is refused or swept, SPEC §23.2); then, in one transaction, the
        charge ``failed``, its queued paid casts cancelled and the audit records of it all."""
        message = _cancel_message(code)
        newly = await self.store.mark_past_due(charge.account_id, code)

        def audit(changed: bool, rows: list[dict[str, Any]]) -> list[AuditRow]:
            out = self._cast_failed(rows, code, message)
            if changed or newly or rows:
                out.append(
                    self._record(
                        "billing.payment_failed",
                        actor="billing",
                        amount_cents=charge.amount_cents,
                        currency=charge.currency,
                        data={
                            "charge_id": charge.id,
                            "account": charge.account_id,
                            "code": code,
                            "cancelled_casts": [str(r["id"]) for r in rows],
                        },
                    )
                )
            return out

        past_due, changed, cancelled = await self.store.fail_charge(
            charge.id,
            charge.account_id,
            code,
            stripe_id=str(stripe_id) if stripe_id else None,
            error_code=PAYMENT_FAILED,
            error_message=message,
            audit=audit,
        )
        if not past_due:
            # a payment method was saved between the two transactions: it found this charge
            # still pending, so did not retry it. Nothing was changed; the job runs again (the
            # same attempt's answer, then the account is past due until a card is saved again)
            raise AppError(
                "UNAVAILABLE",
                f"charge {charge.id}: a payment method was saved while its failure was being "
                "recorded; retried",
            )
        ids = self._cancelled(charge.account_id, code, cancelled)
        if changed or newly or cancelled:
            self.kick_audit()
            log.warning(
                "charge %s failed (%s): account %s is past due, %d queued casts cancelled",
                charge.id,
                code,
                charge.account_id,
                len(ids),
            )

    def _cast_failed(
        self, rows: Sequence[Mapping[str, Any]], code: str, message: str
    ) -> list[AuditRow]:
        """The ``cast.failed`` records of casts cancelled after a failed payment."""
        return [
            self._record(
                "cast.failed",
                actor="billing",
                cast_id=str(r["id"]),
                input_hash=r["input_hash"],
                amount_cents=0,
                currency=r["currency"],
                traceparent=r["traceparent"],
                data={
                    "error": {"code": PAYMENT_FAILED, "message": message},
                    "released_cents": r["estimate_cents"],
                    "payment_failure": code,
                },
            )
            for r in rows
        ]

    def _cancelled(self, account_id: str, code: str, cancelled: Sequence[Cast]) -> list[str]:
        """After casts were cancelled: wake their waiters and their GitHub feedback."""
        for cast in cancelled:
            if self.on_cast_ended is not None:
                self.on_cast_ended(cast.id)
        if cancelled:
            self.kick_outbox()  # their GitHub feedback, if they came from GitHub
            log.warning(
                "account %s: %d queued casts cancelled (payment failed: %s)",
                account_id,
                len(cancelled),
                code,
            )
        return [cast.id for cast in cancelled]

    async def cancel_queued_casts(
        self,
        account_id: str,
        code: str,
        *,
        audit: Callable[[list[str]], Sequence[AuditRow]] | None = None,
    ) -> list[str]:
        """A payment of the account failed (SPEC §23.2): its paid casts that have not started
        are cancelled — ``failed`` with ``PAYMENT_FAILED``, their reservations released, one
        ``cast.failed`` audit record each, committed with them (plus the records ``audit``
        builds from the ids cancelled). A running cast finishes (and is billed like any
        other); new paid casts get 402 ``PAYMENT_REQUIRED`` while the account is past due, so
        call this after marking it. Idempotent: a repeat finds nothing left to cancel.
        Returns the ids of the casts cancelled."""
        message = _cancel_message(code)
        wrote = False

        def records(rows: list[dict[str, Any]]) -> list[AuditRow]:
            nonlocal wrote
            out = self._cast_failed(rows, code, message)
            if audit is not None:
                out += audit([str(r["id"]) for r in rows])
            wrote = bool(out)
            return out

        cancelled = await self.store.cancel_queued(
            account_id, error_code=PAYMENT_FAILED, error_message=message, audit=records
        )
        if wrote:
            self.kick_audit()
        return self._cancelled(account_id, code, cancelled)

    async def _charged(
        self,
        charge: BillingCharge,
        method: str,
        stripe_id: str,
        casts: Sequence[str] | None = None,
    ) -> AuditRow:
        """The ``billing.charged`` record of a charge, to commit with its state change."""
        if casts is None:  # a charge's lines never change once it claimed them
            casts = [line.cast_id for line in await self.store.lines_of(charge.id)]
        return self._record(
            "billing.charged",
            actor="billing",
            amount_cents=charge.amount_cents,
            currency=charge.currency,
            data={
                "charge_id": charge.id,
                "account": charge.account_id,
                "method": method,
                "stripe_id": stripe_id,
                "casts": list(casts),
            },
        )

    async def on_dead_job(self, msg: Message, error: str) -> None:
        if msg.subject.startswith("webhook."):
            await self.inbox.finish(str(msg.payload["delivery_id"]), "dead", error)
            return
        if msg.subject not in ("billing.charge", "billing.retry"):
            log.error("billing job %s gave up: %s", msg.msg_id, error)
            return
        charge_id = msg.payload.get("charge_id")
        if charge_id is None and "cast_id" in msg.payload:
            line = await self.store.line(str(msg.payload["cast_id"]))
            charge_id = line.charge_id if line is not None else None
        if charge_id is not None:
            await self.store.set_charge_state(str(charge_id), "error", failure_code="job_failed")
        log.error("billing job %s gave up: %s", msg.msg_id, error)

    # ------------------------------------------------------------------ refunds

    async def refund_cast(
        self, cast_id: str, *, amount: int | None, reason: str, actor: str, n: int | None = None
    ) -> dict[str, Any]:
        """Refund (part of) a cast: a Stripe refund of the PaymentIntent that collected it, a
        lower pending line if nothing was collected yet, or a balance credit if it went on an
        invoice. ``n`` names an existing refund to finish (a retry)."""
        refund, _created = await self.store.start_refund(cast_id, amount=amount, reason=reason, n=n)
        if refund.status != "pending":
            return _refund_json(refund)
        stripe_id: str | None = None
        if refund.method == "stripe_refund":
            charge = await self.store.charge(str(refund.charge_id))
            assert charge is not None and charge.stripe_id is not None
            got = await self.stripe.refund(
                payment_intent=charge.stripe_id,
                amount=refund.amount_cents,
                idempotency_key=refund.id,
                reason="requested_by_customer",
                metadata={"cast_id": cast_id, "refund_id": refund.id, "reason": reason[:100]},
            )
            stripe_id = str(got["id"])
        elif refund.method == "balance_credit":
            row = await self.store.customer(refund.account_id)
            assert row is not None and row.stripe_customer_id is not None
            got = await self.stripe.credit_balance(
                customer=row.stripe_customer_id,
                amount=refund.amount_cents,
                currency=refund.currency,
                description=f"Refund of cast {cast_id}",
                idempotency_key=refund.id,
                metadata={"cast_id": cast_id, "refund_id": refund.id},
            )
            stripe_id = str(got["id"])
        done = await self.store.finish_refund(
            refund.id,
            status="succeeded",
            stripe_id=stripe_id,
            audit=lambda r: [
                self._record(
                    "ledger.refund",
                    actor=actor,
                    cast_id=cast_id,
                    amount_cents=r.amount_cents,
                    currency=r.currency,
                    data={
                        "refund_id": r.id,
                        "method": r.method,
                        "reason": reason,
                        "stripe_id": stripe_id,
                        "account": r.account_id,
                    },
                )
            ],
        )
        if done is not None:
            self.kick_audit()
            self.counters.refund()
            return _refund_json(done)
        again = [r for r in await self.store.refunds(cast_id) if r.id == refund.id]
        return _refund_json(again[0])

    # ------------------------------------------------------------------ webhooks

    async def on_webhook_job(self, msg: Message) -> None:
        delivery_id = str(msg.payload["delivery_id"])
        delivery = await self.inbox.get(delivery_id)
        if delivery is None or delivery.status in ("done", "ignored"):
            return
        await self.inbox.start_attempt(delivery_id)
        event = json.loads(delivery.payload)
        status = await self.handle_event(event)
        await self.inbox.finish(delivery_id, "ignored" if status == "ignored" else "done")

    async def handle_event(self, event: dict[str, Any]) -> str:
        """Apply one Stripe event; returns ``applied``, ``stale``, ``ignored`` or ``duplicate``."""
        event_id = str(event["id"])
        if await self.store.event_status(event_id) is not None:
            return "duplicate"
        etype = str(event.get("type", ""))
        obj = event.get("data", {}).get("object", {})
        object_id = obj.get("id") if isinstance(obj, dict) else None
        created = int(event.get("created", 0))
        if etype not in HANDLED_EVENTS or not isinstance(obj, dict):
            await self.store.record_event(event_id, etype, object_id, created, "ignored")
            return "ignored"
        handler = _HANDLERS[etype]
        applied = await handler(self, obj, created)
        status = "ignored" if applied is None else "applied" if applied else "stale"
        await self.store.record_event(event_id, etype, object_id, created, status)
        return status

    async def _newer(self, object_id: str, created: int) -> bool:
        last = await self.store.last_applied(object_id)
        return last is None or created >= last

    # Event handlers return True (applied), False (stale: older than what we know) or None
    # (not about anything of ours).

    async def on_checkout_completed(self, cs: dict[str, Any], created: int) -> bool | None:
        account = (cs.get("metadata") or {}).get("account_id") or cs.get("client_reference_id")
        if not account:
            return None
        mode = cs.get("mode")
        if mode == "setup":
            seti = await self.stripe.retrieve_setup_intent(str(cs["setup_intent"]))
            pm = str(seti["payment_method"])
            customer = str(cs.get("customer") or seti.get("customer"))
            await self.store.set_stripe_customer(account, customer)
            await self.stripe.set_default_payment_method(
                customer, pm, idempotency_key=f"checkout:{cs['id']}:default_payment_method"
            )
            retried = await self.store.save_payment_method(
                account,
                pm,
                audit=lambda ids: [
                    self._record(
                        "billing.payment_method_saved",
                        actor="stripe",
                        data={"account": account, "retried_charges": ids},
                    )
                ],
            )
            self.kick_audit()
            if retried:
                self.kick_outbox()
            return True
        if mode == "payment":
            meta = cs.get("metadata") or {}
            spell_id = meta.get("spell_id")
            if not spell_id:
                return None
            ent, created = await self.store.grant_entitlement(
                account_id=account,
                spell_id=str(spell_id),
                checkout_session_id=str(cs["id"]),
                payment_intent_id=cs.get("payment_intent"),
                amount_cents=int(cs.get("amount_total") or 0),
                currency=str(cs.get("currency") or "usd").upper(),
                license_url=meta.get("license_url"),
                audit=lambda e: [
                    self._record(
                        "billing.entitlement_granted",
                        actor="stripe",
                        amount_cents=e.amount_cents,
                        currency=e.currency,
                        data={"account": account, "spell_id": e.spell_id, "session": cs["id"]},
                    )
                ],
            )
            if not created:
                return True
            self.kick_audit()
            self.counters.revenue(ent.amount_cents)
            return True
        if mode == "subscription" and cs.get("subscription"):
            if cs.get("customer"):
                await self.store.set_stripe_customer(account, str(cs["customer"]))
            plan = (cs.get("metadata") or {}).get("plan")
            await self.store.set_subscription(
                account,
                str(cs["subscription"]),
                "active",
                plan,
                audit=[
                    self._record(
                        "billing.subscribed",
                        actor="stripe",
                        data={
                            "account": account,
                            "subscription": cs["subscription"],
                            "plan": plan,
                        },
                    )
                ],
            )
            self.kick_audit()
            sub = await self.stripe.retrieve_subscription(str(cs["subscription"]))
            sub_pm: Any = sub.get("default_payment_method")
            if isinstance(sub_pm, dict):
                sub_pm = sub_pm.get("id")
            if sub_pm:  # per-cast (flat) charges of a subscriber use the card it saved
                await self.store.adopt_payment_method(account, str(sub_pm))
            return True
        return None

    async def on_subscription(self, sub: dict[str, Any], created: int) -> bool | None:
        row = await self.store.customer_by_stripe_id(str(sub.get("customer")))
        if row is None:
            return None
        if not await self._newer(str(sub["id"]), created):
            return False
        if row.subscription_status == "canceled" and row.subscription_id == sub["id"]:
            return False  # a deleted subscription never comes back
        plan = (sub.get("metadata") or {}).get("plan")
        await self.store.set_subscription(row.account_id, str(sub["id"]), str(sub["status"]), plan)
        return True

    async def on_invoice(self, invoice: dict[str, Any], created: int, *, paid: bool) -> bool | None:
        row = await self.store.customer_by_stripe_id(str(invoice.get("customer")))
        if row is None:
            return None
        if not await self._newer(str(invoice["id"]), created):
            return False
        if paid:
            await self.store.clear_past_due(row.account_id, only_reason="invoice_payment_failed")
            return True
        # Like a failed PaymentIntent (SPEC §23.2): the account is past due (its paid and
        # metered casts get 402 until the invoice is paid or a new card is saved), the
        # subscription's entitlement to usage billing lapses, and whatever this invoice's
        # payment bought is revoked.
        newly = await self.store.mark_past_due(row.account_id, "invoice_payment_failed")
        sub = invoice.get("subscription")
        lapsed = bool(sub) and await self.store.mark_subscription_past_due(str(sub))
        revoked = 0
        if invoice.get("payment_intent"):
            revoked = len(await self.store.revoke_entitlements(str(invoice["payment_intent"])))

        def failed(cancelled: list[str]) -> list[AuditRow]:
            if not (newly or lapsed or revoked or cancelled):
                return []
            return [
                self._record(
                    "billing.payment_failed",
                    actor="stripe",
                    amount_cents=int(invoice.get("amount_due") or 0),
                    currency=str(invoice.get("currency") or "usd").upper(),
                    data={
                        "account": row.account_id,
                        "invoice": invoice["id"],
                        "subscription": sub,
                        "code": "invoice_payment_failed",
                        "revoked_entitlements": revoked,
                        "cancelled_casts": cancelled,
                    },
                )
            ]

        # the record commits with the last of these changes: the cancellations
        cancelled = await self.cancel_queued_casts(
            row.account_id, "invoice_payment_failed", audit=failed
        )
        if newly or lapsed or revoked or cancelled:
            log.warning("invoice %s failed: account %s is past due", invoice["id"], row.account_id)
        return True

    async def on_payment_intent(self, pi: dict[str, Any], created: int, *, ok: bool) -> bool | None:
        pi_id = str(pi["id"])
        charge = await self.store.charge_by_stripe_id(pi_id)
        if charge is None:
            charge_id = (pi.get("metadata") or {}).get("charge_id")
            charge = await self.store.charge(str(charge_id)) if charge_id else None
        if charge is None:
            return await self._on_purchase_payment(pi, created, ok=ok)
        # Only the PaymentIntent of the charge's current attempt may change it: a late event
        # about an earlier attempt (declined, then retried with a new card) is stale. A
        # success we have not recorded yet (we crashed before writing it) is taken.
        if charge.stripe_id != pi_id and (not ok or charge.stripe_id is not None):
            return False
        last = await self.store.last_applied(pi_id)
        incoming = "succeeded" if ok else "failed"
        if not should_apply(
            last_created=last, incoming_created=created, current=charge.status, incoming=incoming
        ):
            return False
        if ok:
            if await self.store.set_charge_state(
                charge.id,
                "succeeded",
                from_states=("pending", "failed", "error"),
                stripe_id=str(pi["id"]),
                event_created=created,
                audit=[await self._charged(charge, "stripe_pi", str(pi["id"]))],
            ):
                self.kick_audit()
                self.counters.revenue(charge.amount_cents)
            return True
        err = pi.get("last_payment_error") or {}
        code = str(err.get("code") or "card_declined")
        if code != "authentication_required":
            code = str(err.get("decline_code") or code)
        await self._failed(charge, code, pi_id)
        return True

    async def _on_purchase_payment(
        self, pi: dict[str, Any], created: int, *, ok: bool
    ) -> bool | None:
        """A PaymentIntent that is not one of our charges: a one-time purchase's (Checkout
        ``payment`` mode). Its failure after the purchase completed (e.g. a debit that bounced)
        revokes what it bought, and the buyer's account is past due like after a decline: its
        queued paid casts are cancelled, new ones get 402 until it is fixed."""
        pi_id = str(pi["id"])
        if not await self.store.has_purchase(pi_id):
            return None
        if not await self._newer(pi_id, created):
            return False  # older than what we applied (e.g. a failure before the success)
        if ok:
            return True  # recorded, so a stale failure delivered later is recognized
        err = pi.get("last_payment_error") or {}
        code = str(err.get("decline_code") or err.get("code") or "payment_failed")
        accounts = await self.store.revoke_entitlements(pi_id)
        for account in sorted(set(accounts)):
            await self.store.mark_past_due(account, code)
            # the record commits with the last of these changes: the cancellations
            await self.cancel_queued_casts(
                account,
                code,
                audit=lambda cancelled, account=account: [  # type: ignore[misc]
                    self._record(
                        "billing.payment_failed",
                        actor="stripe",
                        amount_cents=int(pi.get("amount") or 0),
                        currency=str(pi.get("currency") or "usd").upper(),
                        data={
                            "account": account,
                            "payment_intent": pi_id,
                            "code": code,
                            "revoked_entitlements": accounts.count(account),
                            "cancelled_casts": cancelled,
                        },
                    )
                ],
            )
            log.warning(
                "purchase payment %s failed (%s): account %s is past due", pi_id, code, account
            )
        return True

    async def on_charge_refunded(self, ch: dict[str, Any], created: int) -> bool | None:
        pi = ch.get("payment_intent")
        if not pi or await self.store.charge_by_stripe_id(str(pi)) is None:
            return None
        # refunded amounts only grow: a late event never lowers them
        await self.store.note_refunded(str(pi), int(ch.get("amount_refunded") or 0))
        return True

    # ------------------------------------------------------------------ reconciliation

    async def reconcile(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[str]:
        """Every difference between the ledger and Stripe, as readable lines (empty: none)."""
        problems: list[str] = []
        # read once: the charges (both kinds) and the refunds (when a charge first needs them)
        charges = [c for c in await self.store.charges() if since is None or c.created_at >= since]
        refunds: list[BillingRefund] | None = None
        for charge in charges:
            lines = await self.store.lines_of(charge.id)
            owed = sum(line.amount_cents for line in lines)
            if charge.kind == "payment_intent" and charge.status == "succeeded":
                if charge.stripe_id is None:
                    problems.append(f"{charge.id}: succeeded without a PaymentIntent id")
                    continue
                pi = await self.stripe.retrieve_payment_intent(charge.stripe_id)
                if pi.get("status") != "succeeded":
                    problems.append(
                        f"{charge.id}: ledger says succeeded, Stripe {pi['id']} is "
                        f"{pi.get('status')}"
                    )
                if int(pi.get("amount_received", 0)) != charge.amount_cents:
                    problems.append(
                        f"{charge.id}: ledger {charge.amount_cents} {charge.currency}, Stripe "
                        f"received {pi.get('amount_received')} on {pi['id']}"
                    )
                refunded = sum(
                    int(r["amount"])
                    for r in await self.stripe.list_refunds(charge.stripe_id)
                    if r.get("status") in ("succeeded", "pending")
                )
                if refunds is None:
                    refunds = await self.store.refunds()
                ours = sum(
                    r.amount_cents
                    for r in refunds
                    if r.charge_id == charge.id
                    and r.method == "stripe_refund"
                    and r.status == "succeeded"
                )
                if refunded != ours:
                    problems.append(
                        f"{charge.id}: ledger refunded {ours}, Stripe refunded {refunded} "
                        f"on {charge.stripe_id}"
                    )
            if charge.kind == "payment_intent" and owed != charge.amount_cents:
                problems.append(
                    f"{charge.id}: its casts add up to {owed}, the charge is {charge.amount_cents}"
                )
            if charge.status == "error":
                problems.append(f"{charge.id}: collection failed for good (see the logs)")
        problems += await self._reconcile_invoice_items(charges, since)
        problems += await self._reconcile_usage(since, until)
        return problems

    async def _reconcile_invoice_items(
        self, recent: Sequence[BillingCharge], since: datetime | None
    ) -> list[str]:
        """Charges carried to an invoice (below the minimum at month end) against the
        customer's invoice items at Stripe, both ways. ``recent``: the ledger's charges
        created since ``since``, of both kinds (:meth:`reconcile` read them)."""
        problems: list[str] = []
        ours = [c for c in recent if c.kind == "invoice_item"]
        by_account: dict[str, list[BillingCharge]] = {}
        for c in ours:
            by_account.setdefault(c.account_id, []).append(c)
        for account, charges in sorted(by_account.items()):
            row = await self.store.customer(account)
            if row is None or row.stripe_customer_id is None:
                problems.append(f"{account}: invoice item charges without a Stripe customer")
                continue
            items = {
                str(i["id"]): i
                for i in await self.stripe.list_invoice_items(row.stripe_customer_id)
            }
            known = {c.stripe_id for c in charges}
            for c in charges:
                if c.status != "invoiced":
                    if c.status == "pending" and c.stripe_id is None:
                        continue  # not sent yet
                    problems.append(f"{c.id}: invoice item charge is {c.status}")
                    continue
                item = items.get(str(c.stripe_id))
                if item is None:
                    problems.append(f"{c.id}: invoice item {c.stripe_id} is missing at Stripe")
                elif (
                    int(item.get("amount", 0)) != c.amount_cents
                    or str(item.get("currency", "")).lower() != c.currency.lower()
                ):
                    problems.append(
                        f"{c.id}: ledger {c.amount_cents} {c.currency}, Stripe invoice item "
                        f"{item['id']} is {item.get('amount')} {item.get('currency')}"
                    )
            for item_id, item in items.items():
                charge_id = (item.get("metadata") or {}).get("charge_id")
                if (
                    charge_id
                    and item_id not in known
                    and (since is None or int(item.get("created", 0)) >= since.timestamp())
                ):
                    problems.append(
                        f"{charge_id}: Stripe invoice item {item_id} ({item.get('amount')} "
                        f"{item.get('currency')}) is not in the ledger"
                    )
        return problems

    async def _reconcile_usage(self, since: datetime | None, until: datetime | None) -> list[str]:
        """Usage recorded in the ledger against Stripe's meter event summaries, per account and
        meter over the same minute-aligned window; and usage never reported."""
        now = self.store.clock.now()
        start = minute_floor(int((since or now - timedelta(days=35)).timestamp()))
        end = minute_floor(int((until or now).timestamp())) + (0 if until else 60)
        rows = await self.store.usage_rows(since_ts=start, until_ts=end)
        problems: list[str] = []
        grace = now - timedelta(seconds=self.config.unreported_grace_sec)
        sent: dict[tuple[str, str], int] = {}
        for r in rows:
            if r.status == "pending" and r.created_at < grace:
                problems.append(f"{r.identifier}: {r.value} {r.meter} never reported to Stripe")
            if r.status == "sent":
                sent[(r.account_id, r.meter)] = sent.get((r.account_id, r.meter), 0) + r.value
        accounts = {a for a, _ in sent} | {
            c.account_id for c in await self.store.subscribed_customers()
        }
        meters = await self.store.meters()  # read only: reconciling never creates meters
        for account in sorted(accounts):
            row = await self.store.customer(account)
            if row is None or row.stripe_customer_id is None:
                continue
            for name in METERS:
                meter = meters.get(name)
                if meter is None:  # never created, so nothing was ever sent to it
                    continue
                theirs = await self.stripe.meter_event_summary(
                    meter.stripe_id, customer=row.stripe_customer_id, start_time=start, end_time=end
                )
                mine = sent.get((account, name), 0)
                if theirs != mine:
                    problems.append(
                        f"{account}: ledger reported {mine} {name}, Stripe's meter summary "
                        f"says {theirs} ({start}-{end})"
                    )
        return problems


#: how far back the scheduled reconciliation looks, and how long it leaves Stripe to
#: aggregate the newest meter events (its summaries lag a little behind)
RECONCILE_LOOKBACK = timedelta(days=7)
RECONCILE_LAG = timedelta(minutes=5)


async def reconcile_once(billing: BillingService) -> list[str]:
    """One scheduled reconciliation: the last week, logged difference by difference."""
    now = billing.store.clock.now()
    problems = await billing.reconcile(since=now - RECONCILE_LOOKBACK, until=now - RECONCILE_LAG)
    for line in problems:
        log.warning("billing reconcile: %s", line)
    billing.last_reconcile = (now, problems)
    return problems


async def reconcile_forever(billing: BillingService, every: float) -> None:
    """The worker's reconciliation schedule (``SPELL_BILLING_RECONCILE_INTERVAL`` seconds)."""
    while True:
        await asyncio.sleep(every)
        try:
            problems = await reconcile_once(billing)
            log.info("billing reconcile: %d differences", len(problems))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("billing reconcile failed")


def _cancel_message(code: str) -> str:
    """The error message of a cast cancelled because a payment of its account failed."""
    return (
        f"cancelled before it started: a payment of this account failed ({code}); "
        "nothing was charged for it. Save a payment method with `spell billing setup`, "
        "then cast again"
    )


def _refund_json(refund: Any) -> dict[str, Any]:
    return {
        "refund_id": refund.id,
        "cast_id": refund.cast_id,
        "amount_cents": refund.amount_cents,
        "currency": refund.currency,
        "method": refund.method,
        "status": refund.status,
        "stripe_id": refund.stripe_id,
    }


Handler = Callable[[BillingService, dict[str, Any], int], Awaitable[bool | None]]

_HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": BillingService.on_checkout_completed,
    "customer.subscription.created": BillingService.on_subscription,
    "customer.subscription.updated": BillingService.on_subscription,
    "customer.subscription.deleted": BillingService.on_subscription,
    "invoice.paid": lambda svc, o, c: svc.on_invoice(o, c, paid=True),
    "invoice.payment_failed": lambda svc, o, c: svc.on_invoice(o, c, paid=False),
    "payment_intent.succeeded": lambda svc, o, c: svc.on_payment_intent(o, c, ok=True),
    "payment_intent.payment_failed": lambda svc, o, c: svc.on_payment_intent(o, c, ok=False),
    "charge.refunded": BillingService.on_charge_refunded,
}

__all__ = [
    "HANDLED_EVENTS",
    "BillingConfig",
    "BillingService",
    "RevenueCounter",
    "charge_key",
    "reconcile_forever",
    "reconcile_once",
]
