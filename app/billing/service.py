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

Handlers are idempotent (delivery is at-least-once): charges are created under a lock and keyed
by a domain id, state changes are conditional updates, Stripe calls carry idempotency keys.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.billing.stripe_client import StripeClient
from app.domain.billing import (
    charge_key,
    customer_key,
    minimum_charge,
    should_apply,
)
from app.errors import AppError
from app.services.ports import AuditSink, Message
from app.services.tokens import Caller
from app.store.billing_store import BillingStore
from app.store.inbox import Inbox
from app.store.ledger import SqlLedger
from app.store.models import BillingCharge

log = logging.getLogger("spell.billing")

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
    ) -> None:
        self.config = config
        self.stripe = stripe
        self.store = store
        self.ledger = ledger
        self.inbox = inbox
        self.audit = audit
        self.counters = counters
        self.kick_outbox = kick_outbox

    # ------------------------------------------------------------------ the cast gate

    async def check_can_pay(self, account_id: str) -> None:
        """Refuse a paid cast (402 ``PAYMENT_REQUIRED``) for an account that is past due or has
        no payment method: nothing runs unpaid. Free casts are never refused here."""
        row = await self.store.customer(account_id)
        fix = "save a payment method with `spell billing setup` (or POST /v1/billing/setup)"
        if row is not None and row.past_due:
            raise AppError(
                "PAYMENT_REQUIRED",
                f"the account is past due ({row.past_due_reason}): a payment was refused; "
                f"{fix}, then cast again",
                detail={"account": account_id, "reason": row.past_due_reason},
            )
        if row is None or row.payment_method_id is None:
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
        cast_id = str(msg.payload["cast_id"])
        cast = await self.ledger.get_cast(cast_id)
        if cast is None or cast.status != "succeeded" or not cast.cost_cents:
            return
        charge = await self.store.add_pending(cast)
        if charge is None:
            log.info("cast %s: %d cents pending (below the minimum)", cast_id, cast.cost_cents)
            return
        await self.collect(charge)

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

    async def collect(self, charge: BillingCharge) -> None:
        """Collect a pending charge from Stripe. Safe to repeat: the same attempt always uses
        the same idempotency key, and the state change is conditional."""
        if charge.status != "pending":
            return
        row = await self.store.customer(charge.account_id)
        if row is None or row.stripe_customer_id is None or row.payment_method_id is None:
            await self._failed(charge, "no_payment_method", None)
            return
        key = charge.id if charge.attempt <= 1 else f"{charge.id}:{charge.attempt}"
        meta = {"charge_id": charge.id, "account_id": charge.account_id}
        if charge.kind == "invoice_item":
            item = await self.stripe.create_invoice_item(
                customer=row.stripe_customer_id,
                amount=charge.amount_cents,
                currency=charge.currency,
                description="Spell Platform casts below the minimum charge, carried over",
                idempotency_key=key,
                metadata=meta,
            )
            if await self.store.set_charge_state(charge.id, "invoiced", stripe_id=str(item["id"])):
                await self._audit_charge(charge, "invoice_item", str(item["id"]))
            return
        try:
            pi = await self.stripe.charge_off_session(
                amount=charge.amount_cents,
                currency=charge.currency,
                customer=row.stripe_customer_id,
                payment_method=row.payment_method_id,
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
            if await self.store.set_charge_state(charge.id, "succeeded", stripe_id=str(pi["id"])):
                self.counters.revenue(charge.amount_cents)
                await self._audit_charge(charge, "stripe_pi", str(pi["id"]))
        elif status == "processing":
            await self.store.note_stripe_id(charge.id, str(pi["id"]))  # the webhook finishes it
        else:  # requires_action etc.: off-session, nobody can act on it
            await self._failed(charge, "authentication_required", str(pi["id"]))

    async def _failed(self, charge: BillingCharge, code: str, stripe_id: Any) -> None:
        changed = await self.store.set_charge_state(
            charge.id,
            "failed",
            stripe_id=str(stripe_id) if stripe_id else None,
            failure_code=code,
        )
        newly = await self.store.mark_past_due(charge.account_id, code)
        if changed or newly:
            log.warning(
                "charge %s failed (%s): account %s is past due", charge.id, code, charge.account_id
            )
            await self.audit.append(
                "billing.payment_failed",
                actor="billing",
                amount_cents=charge.amount_cents,
                currency=charge.currency,
                data={"charge_id": charge.id, "account": charge.account_id, "code": code},
            )

    async def _audit_charge(self, charge: BillingCharge, method: str, stripe_id: str) -> None:
        lines = await self.store.lines_of(charge.id)
        await self.audit.append(
            "billing.charged",
            actor="billing",
            amount_cents=charge.amount_cents,
            currency=charge.currency,
            data={
                "charge_id": charge.id,
                "account": charge.account_id,
                "method": method,
                "stripe_id": stripe_id,
                "casts": [line.cast_id for line in lines],
            },
        )

    async def on_dead_job(self, msg: Message, error: str) -> None:
        if msg.subject.startswith("webhook."):
            await self.inbox.finish(str(msg.payload["delivery_id"]), "dead", error)
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
        done = await self.store.finish_refund(refund.id, status="succeeded", stripe_id=stripe_id)
        if done is not None:
            self.counters.refund()
            await self.audit.append(
                "ledger.refund",
                actor=actor,
                cast_id=cast_id,
                amount_cents=done.amount_cents,
                currency=done.currency,
                data={
                    "refund_id": done.id,
                    "method": done.method,
                    "reason": reason,
                    "stripe_id": stripe_id,
                    "account": done.account_id,
                },
            )
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
        event = json.loads(delivery.body)
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
            retried = await self.store.save_payment_method(account, pm)
            if retried:
                self.kick_outbox()
            await self.audit.append(
                "billing.payment_method_saved",
                actor="stripe",
                data={"account": account, "retried_charges": retried},
            )
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
            )
            if not created:
                return True
            self.counters.revenue(ent.amount_cents)
            await self.audit.append(
                "billing.entitlement_granted",
                actor="stripe",
                amount_cents=ent.amount_cents,
                currency=ent.currency,
                data={"account": account, "spell_id": ent.spell_id, "session": cs["id"]},
            )
            return True
        if mode == "subscription" and cs.get("subscription"):
            if cs.get("customer"):
                await self.store.set_stripe_customer(account, str(cs["customer"]))
            await self.store.set_subscription(
                account, str(cs["subscription"]), "active", (cs.get("metadata") or {}).get("plan")
            )
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
        else:
            await self.store.mark_past_due(row.account_id, "invoice_payment_failed")
        return True

    async def on_payment_intent(self, pi: dict[str, Any], created: int, *, ok: bool) -> bool | None:
        pi_id = str(pi["id"])
        charge = await self.store.charge_by_stripe_id(pi_id)
        if charge is None:
            charge_id = (pi.get("metadata") or {}).get("charge_id")
            charge = await self.store.charge(str(charge_id)) if charge_id else None
        if charge is None:
            if not ok:  # a one-time purchase whose payment failed later
                await self.store.revoke_entitlements(pi_id)
            return None
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
            ):
                self.counters.revenue(charge.amount_cents)
                await self._audit_charge(charge, "stripe_pi", str(pi["id"]))
            return True
        err = pi.get("last_payment_error") or {}
        code = str(err.get("code") or "card_declined")
        if code != "authentication_required":
            code = str(err.get("decline_code") or code)
        await self._failed(charge, code, pi_id)
        return True

    async def on_charge_refunded(self, ch: dict[str, Any], created: int) -> bool | None:
        pi = ch.get("payment_intent")
        if not pi or await self.store.charge_by_stripe_id(str(pi)) is None:
            return None
        # refunded amounts only grow: a late event never lowers them
        await self.store.note_refunded(str(pi), int(ch.get("amount_refunded") or 0))
        return True

    # ------------------------------------------------------------------ reconciliation

    async def reconcile(self, since: datetime | None = None) -> list[str]:
        """Every difference between the ledger and Stripe, as readable lines (empty: none)."""
        problems: list[str] = []
        for charge in await self.store.charges():
            if since is not None and charge.created_at < since:
                continue
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
                ours = sum(
                    r.amount_cents
                    for r in await self.store.refunds()
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
        return problems


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

__all__ = ["HANDLED_EVENTS", "BillingConfig", "BillingService", "RevenueCounter", "charge_key"]
