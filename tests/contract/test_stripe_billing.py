"""Stripe billing end to end against the contract-enforcing fake Stripe (on SQLite and, with
SPELL_TEST_DATABASE_URL, PostgreSQL): payment method setup through Checkout, settlement off the
request path, the minimum-charge rule, declines → past_due → 402, concurrency, refunds,
reconciliation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import select

from app.billing.routes import BILLING
from app.billing.service import BillingService
from app.config import Settings
from app.errors import AppError
from app.store.audit_outbox import AuditDrainer
from app.store.models import BillingCharge, Outbox
from app.web.app import Overrides, create_app
from app.web.keys import INBOX, METRICS
from tests.conftest import FakeSandbox, Harness
from tests.contract.fake_stripe import API_KEY, FakeStripe, stripe_contract

SECRET = "whsec_test_billing_secret"
PAID = "com.example.paid"


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripe]:
    f = FakeStripe(contract=stripe_contract())
    async with f.serve():
        yield f
    assert f.violations == []
    assert f.auth_failures == []
    assert f.idempotency_errors == []


@pytest.fixture
def settings(tmp_path: Any, database_url: str | None, fake: FakeStripe) -> Settings:
    return Settings(
        SPELL_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=database_url,
        SPELL_SECRET_KEY="s" * 40,
        SPELL_PUBLIC_URL="http://spell.test",
        SPELL_RATE_LIMIT_BURST=10_000,
        SPELL_RATE_LIMIT_PER_SEC=10_000,
        STRIPE_API_KEY=API_KEY,
        STRIPE_API_BASE=fake.url,
        STRIPE_WEBHOOK_SECRET=SECRET,
    )


@pytest.fixture
async def h(aiohttp_client: Any, settings: Settings) -> Harness:
    sandbox = FakeSandbox()
    app = create_app(settings, overrides=Overrides(sandbox=sandbox, job_backoff=0.05))
    client = await aiohttp_client(app)
    return Harness(client=client, settings=settings, sandbox=sandbox)


def billing_of(h: Harness) -> BillingService:
    return h.client.app[BILLING]  # type: ignore[index,no-any-return]


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


async def deliver(h: Harness, fake: FakeStripe, event: dict[str, Any], **kw: Any) -> Any:
    headers, body = fake.signed(event, SECRET, **kw)
    return await h.client.post("/webhooks/stripe", data=body, headers=headers)


async def processed(h: Harness, event_id: str) -> str:
    inbox = h.client.app[INBOX]  # type: ignore[index]

    async def done() -> bool:
        d = await inbox.get(event_id)
        return d is not None and d.status in ("done", "ignored", "dead")

    await until(done)
    d = await inbox.get(event_id)
    return str(d.status)


async def save_card(h: Harness, fake: FakeStripe, token: str, method: str = "pm_card_visa") -> str:
    """The caster opens the setup URL and saves a card; Stripe tells us with a webhook."""
    r = await h.client.post("/v1/billing/setup", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 201, await r.text()
    setup = await r.json()
    assert setup["url"].startswith("https://checkout.stripe.com/")
    event = fake.complete_checkout(setup["session_id"], method)
    r = await deliver(h, fake, event)
    assert r.status == 200, await r.text()
    assert await processed(h, event["id"]) == "done"
    return str(setup["customer"])


@dataclass
class Caster:
    token: str
    account: str


async def paid_spell(h: Harness, cents: int, spell_id: str = PAID) -> None:
    maker = await h.token("acme-labs", "maker")
    await h.publish(maker, spell_id=spell_id, flat_cents=cents)


async def caster(h: Harness, fake: FakeStripe, method: str | None = "pm_card_visa") -> Caster:
    account = "bob"
    token = await h.token(account, "caster")
    if method is not None:
        await save_card(h, fake, token, method)
    return Caster(token, account)


async def cast_ok(h: Harness, who: Caster, spell_id: str = PAID) -> str:
    r = await h.cast(who.token, spell_id)
    assert r.status == 202, await r.text()
    cast_id = str((await r.json())["cast_id"])
    assert (await h.wait_cast(who.token, cast_id))["status"] == "succeeded"
    return cast_id


async def charges(h: Harness) -> list[BillingCharge]:
    return await billing_of(h).store.charges()


async def charge_settled(h: Harness, cast_id: str) -> None:
    """Wait until the cast's billing.charge job has run (its line exists and, if batched,
    its charge left ``pending``)."""
    store = billing_of(h).store

    async def settled() -> bool:
        line = await store.line(cast_id)
        if line is None:
            return False
        if line.charge_id is None:
            return True
        charge = await store.charge(line.charge_id)
        return charge is not None and charge.status != "pending"

    await until(settled)


@dataclass
class Msg:
    """A job delivery, for calling a handler directly."""

    payload: dict[str, Any]
    subject: str = "billing.charge"
    msg_id: str = "m"
    headers: dict[str, str] = field(default_factory=dict)
    num_delivered: int = 1
    dead: bool = False

    async def ack(self) -> None: ...
    async def nak(self, delay: float | None = None) -> None: ...
    async def in_progress(self) -> None: ...


# ----------------------------------------------------------------------------- setup & gate


async def test_a_paid_cast_needs_a_payment_method_first(h: Harness, fake: FakeStripe) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake, method=None)
    r = await h.cast(bob.token, PAID)
    assert r.status == 402
    err = (await r.json())["error"]
    assert err["code"] == "PAYMENT_REQUIRED" and err["detail"]["reason"] == "no_payment_method"
    assert "spell billing setup" in err["message"]
    assert fake.payment_intents == {}


async def test_free_casts_never_need_a_payment_method(h: Harness, fake: FakeStripe) -> None:
    await paid_spell(h, 0)
    bob = await caster(h, fake, method=None)
    await cast_ok(h, bob)
    async with billing_of(h).ledger.reader() as s:
        subjects = (await s.scalars(select(Outbox.subject))).all()
    assert "billing.charge" not in subjects


async def test_saving_a_card_through_checkout_makes_it_the_default(
    h: Harness, fake: FakeStripe
) -> None:
    bob = await caster(h, fake)
    r = await h.client.get("/v1/billing", headers={"Authorization": f"Bearer {bob.token}"})
    view = await r.json()
    assert view["mode"] == "stripe" and view["past_due"] is False
    assert view["payment_method"]["status"] == "active"
    customer = fake.customers[view["customer"]]
    assert customer["invoice_settings"]["default_payment_method"] == view["payment_method"]["id"]
    assert customer["metadata"] == {"account_id": "bob"}
    setup = fake.requests_for("PostCheckoutSessions")[0].params
    assert setup["mode"] == "setup" and setup["customer"] == view["customer"]
    assert [r.idempotency_key for r in fake.requests_for("PostCustomers")] == [
        "account:bob:customer"
    ]
    assert view["caps"]["account"] == "bob"


# ----------------------------------------------------------------------------- settlement


async def test_a_settled_cast_is_charged_off_session_once(h: Harness, fake: FakeStripe) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake)
    cast_id = await cast_ok(h, bob)
    await charge_settled(h, cast_id)
    [pi_req] = fake.requests_for("PostPaymentIntents")
    assert pi_req.idempotency_key == f"cast:{cast_id}:charge"
    params = pi_req.params
    assert (params["amount"], params["currency"], params["confirm"], params["off_session"]) == (
        60,
        "usd",
        True,
        True,
    )
    [charge] = await charges(h)
    assert (charge.status, charge.amount_cents, charge.stripe_id) == (
        "succeeded",
        60,
        next(iter(fake.payment_intents)),
    )
    metrics = h.client.app[METRICS]  # type: ignore[index]
    assert metrics.revenue_cents._value.get() == 60


async def test_amounts_below_the_minimum_are_collected_together(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 20)
    bob = await caster(h, fake)
    first = [await cast_ok(h, bob) for _ in range(2)]
    for cast_id in first:
        await charge_settled(h, cast_id)
    assert fake.payment_intents == {}
    r = await h.client.get("/v1/billing", headers={"Authorization": f"Bearer {bob.token}"})
    assert (await r.json())["pending"] == [
        {"currency": "USD", "amount_cents": 40, "lines": 2, "minimum_charge_cents": 50}
    ]
    third = await cast_ok(h, bob)
    await charge_settled(h, third)
    [pi] = fake.payment_intents.values()
    assert pi["amount"] == 60 and pi["status"] == "succeeded"
    assert fake.requests_for("PostPaymentIntents")[0].idempotency_key == f"cast:{third}:charge"
    [charge] = await charges(h)
    lines = await billing_of(h).store.lines_of(charge.id)
    assert sorted(line.cast_id for line in lines) == sorted([*first, third])


async def test_pending_amounts_of_an_ended_month_go_on_the_next_invoice(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 20)
    bob = await caster(h, fake)
    cast_id = await cast_ok(h, bob)
    await charge_settled(h, cast_id)
    billing = billing_of(h)
    async with billing.ledger.write() as s:  # the line belongs to last month
        line = await s.get(type(await billing.store.line(cast_id)), cast_id)
        line.period = "2000-01"
    assert await billing.settle_ended_periods() == 1
    assert await billing.settle_ended_periods() == 0  # never twice
    [item] = fake.invoice_items.values()
    assert item["amount"] == 20 and item["currency"] == "usd"
    [req] = fake.requests_for("PostInvoiceitems")
    assert req.idempotency_key == "account:bob:pending:2000-01:usd"
    [charge] = await charges(h)
    assert (charge.kind, charge.status) == ("invoice_item", "invoiced")


async def test_concurrent_settlement_of_one_cast_never_double_charges(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake)
    cast_id = await cast_ok(h, bob)
    await charge_settled(h, cast_id)
    billing = billing_of(h)
    # the job delivered again, many times at once (at-least-once queues do this)
    await asyncio.gather(*(billing.on_charge_job(Msg({"cast_id": cast_id})) for _ in range(8)))
    assert len(fake.payment_intents) == 1 and len(fake.charges) == 1
    [charge] = await charges(h)
    assert charge.status == "succeeded"
    metrics = h.client.app[METRICS]  # type: ignore[index]
    assert metrics.revenue_cents._value.get() == 60


async def test_concurrent_settlement_of_many_casts_charges_each_cent_once(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 30)
    bob = await caster(h, fake)
    billing = billing_of(h)
    billing.ledger.billing_enabled = False  # settle now, run the billing jobs below, at once
    ids = [await cast_ok(h, bob) for _ in range(7)]
    billing.ledger.billing_enabled = True
    # every job at the same moment, each delivered three times (at-least-once queues do this)
    await asyncio.gather(*(billing.on_charge_job(Msg({"cast_id": c})) for c in ids * 3))
    collected = sum(pi["amount_received"] for pi in fake.payment_intents.values())
    pending = sum(p.amount_cents for p in await billing.store.pending_summary("bob"))
    assert collected + pending == 7 * 30
    assert pending < 50  # nothing that could be collected is left waiting
    assert all(pi["amount"] >= 50 for pi in fake.payment_intents.values())
    batched = [
        line.cast_id for c in await charges(h) for line in await billing.store.lines_of(c.id)
    ]
    assert len(batched) == len(set(batched))


# ----------------------------------------------------------------------------- declines


@pytest.mark.parametrize(
    ("method", "reason"),
    [
        pytest.param("pm_card_chargeDeclined", "card_declined", id="declined"),
        pytest.param(
            "pm_card_authenticationRequired",
            "authentication_required",
            id="authentication-required",
        ),
    ],
)
async def test_a_refused_payment_makes_the_account_past_due_until_a_new_card(
    h: Harness, fake: FakeStripe, method: str, reason: str
) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake, method)
    cast_id = await cast_ok(h, bob)
    await charge_settled(h, cast_id)
    [charge] = await charges(h)
    assert (charge.status, charge.failure_code) == ("failed", reason)

    r = await h.cast(bob.token, PAID)
    assert r.status == 402
    err = (await r.json())["error"]
    assert err["code"] == "PAYMENT_REQUIRED" and err["detail"]["reason"] == reason
    assert "past due" in err["message"]
    view = await (
        await h.client.get("/v1/billing", headers={"Authorization": f"Bearer {bob.token}"})
    ).json()
    assert view["past_due"] is True and view["past_due_reason"] == reason

    # a new card: good standing again, and the failed charge is collected (a new attempt key)
    await save_card(h, fake, bob.token, "pm_card_visa")

    async def collected() -> bool:
        c = await billing_of(h).store.charge(charge.id)
        return c is not None and c.status == "succeeded"

    await until(collected)
    keys = [r.idempotency_key for r in fake.requests_for("PostPaymentIntents")]
    assert keys == [f"cast:{cast_id}:charge", f"cast:{cast_id}:charge:2"]
    await cast_ok(h, bob)


async def test_a_retried_cast_accepted_before_the_decline_is_still_replayed(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake, "pm_card_chargeDeclined")
    r = await h.cast(bob.token, PAID, key="retry-me")
    cast_id = (await r.json())["cast_id"]
    await h.wait_cast(bob.token, cast_id)
    await charge_settled(h, cast_id)
    again = await h.cast(bob.token, PAID, key="retry-me")
    assert again.status == 202 and (await again.json())["cast_id"] == cast_id
    assert again.headers.get("Idempotent-Replayed") == "true"


# ----------------------------------------------------------------------------- webhooks (T6)


async def test_a_good_signature_is_accepted_and_a_redelivery_is_harmless(
    h: Harness, fake: FakeStripe
) -> None:
    bob = await caster(h, fake, method=None)
    r = await h.client.post("/v1/billing/setup", headers={"Authorization": f"Bearer {bob.token}"})
    event = fake.complete_checkout((await r.json())["session_id"])
    first = await deliver(h, fake, event)
    assert first.status == 200 and (await first.json())["duplicate"] is False
    assert await processed(h, event["id"]) == "done"
    again = await deliver(h, fake, event)
    assert again.status == 200 and (await again.json())["duplicate"] is True
    assert await billing_of(h).handle_event(event) == "duplicate"
    assert len(fake.requests_for("PostCustomersCustomer")) == 1  # handled once


@pytest.mark.parametrize(
    ("secret", "age", "reason"),
    [
        pytest.param("whsec_wrong", 0, "does not match", id="bad-signature"),
        pytest.param(SECRET, 301, "tolerance", id="stale-timestamp"),
    ],
)
async def test_bad_or_stale_signatures_are_refused_before_parsing(
    h: Harness, fake: FakeStripe, secret: str, age: int, reason: str
) -> None:
    event = fake.event("invoice.paid", {"id": "in_1", "customer": "cus_1", "created": 1})
    headers, body = fake.signed(event, secret, timestamp=fake.now() - age)
    r = await h.client.post("/webhooks/stripe", data=body, headers=headers)
    assert r.status == 401
    assert reason in (await r.json())["error"]["message"]
    assert await h.client.app[INBOX].get(event["id"]) is None  # type: ignore[index]


async def test_a_missing_signature_or_a_non_event_is_refused(h: Harness, fake: FakeStripe) -> None:
    r = await h.client.post("/webhooks/stripe", data=b"{}")
    assert r.status == 401
    headers, body = fake.signed(b'{"object": "charge"}', SECRET)
    r = await h.client.post("/webhooks/stripe", data=body, headers=headers)
    assert r.status == 422


async def test_unknown_event_types_are_acknowledged_and_ignored(
    h: Harness, fake: FakeStripe
) -> None:
    event = fake.event("customer.tax_id.created", {"id": "txi_1"})
    r = await deliver(h, fake, event)
    assert r.status == 200
    assert await processed(h, event["id"]) == "ignored"
    assert await billing_of(h).store.event_status(event["id"]) == "ignored"


async def test_an_old_failure_arriving_after_the_success_changes_nothing(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake)
    cast_id = await cast_ok(h, bob)
    await charge_settled(h, cast_id)
    [pi] = fake.payment_intents.values()
    succeeded = fake.events_of("payment_intent.succeeded")[-1]
    # a failure Stripe recorded earlier for the same PaymentIntent, delivered late
    failed = fake.event(
        "payment_intent.payment_failed",
        {
            **pi,
            "status": "requires_payment_method",
            "last_payment_error": {"code": "card_declined"},
        },
    )
    failed["created"] = succeeded["created"] - 5
    assert (await deliver(h, fake, succeeded)).status == 200
    assert await processed(h, succeeded["id"]) == "done"
    assert (await deliver(h, fake, failed)).status == 200
    assert await processed(h, failed["id"]) == "done"
    assert await billing_of(h).store.event_status(failed["id"]) == "stale"
    [charge] = await charges(h)
    assert charge.status == "succeeded"
    row = await billing_of(h).store.customer("bob")
    assert row is not None and row.past_due is False


async def test_subscription_events_out_of_order_keep_the_newest_state(
    h: Harness, fake: FakeStripe
) -> None:
    bob = await caster(h, fake)
    row = await billing_of(h).store.customer("bob")
    assert row is not None and row.stripe_customer_id is not None
    sub = {"id": "sub_1", "object": "subscription", "customer": row.stripe_customer_id}
    created = fake.event("customer.subscription.created", {**sub, "status": "active"})
    deleted = fake.event("customer.subscription.deleted", {**sub, "status": "canceled"})
    updated = fake.event("customer.subscription.updated", {**sub, "status": "past_due"})
    created["created"], updated["created"], deleted["created"] = 100, 200, 300
    for event in (deleted, created, updated):  # delivered out of order
        assert (await deliver(h, fake, event, timestamp=fake.now())).status == 200
        await processed(h, event["id"])
    row = await billing_of(h).store.customer("bob")
    assert row is not None and row.subscription_status == "canceled"
    statuses = [await billing_of(h).store.event_status(e["id"]) for e in (created, updated)]
    assert statuses == ["stale", "stale"]
    assert bob.account == "bob"


async def test_a_failed_invoice_marks_the_account_past_due_and_a_paid_one_clears_it(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake)
    row = await billing_of(h).store.customer("bob")
    assert row is not None and row.stripe_customer_id is not None
    failed = fake.invoice_event(row.stripe_customer_id, paid=False)
    await deliver(h, fake, failed)
    await processed(h, failed["id"])
    assert (await h.cast(bob.token, PAID)).status == 402
    fake.advance(5)
    paid = fake.invoice_event(row.stripe_customer_id, paid=True)
    await deliver(h, fake, paid)
    await processed(h, paid["id"])
    await cast_ok(h, bob)


async def test_a_one_time_purchase_grants_an_entitlement_once(h: Harness, fake: FakeStripe) -> None:
    bob = await caster(h, fake)
    row = await billing_of(h).store.customer("bob")
    assert row is not None
    session = await billing_of(h).stripe.create_checkout_session(
        {
            "mode": "payment",
            "customer": row.stripe_customer_id,
            "success_url": "http://spell.test/done",
            "line_items": [
                {
                    "price_data": {
                        "currency": "usd",
                        "unit_amount": 1500,
                        "product_data": {"name": "Clone of com.example.tpl"},
                    },
                    "quantity": 1,
                }
            ],
            "metadata": {
                "account_id": "bob",
                "spell_id": "com.example.tpl",
                "license_url": "https://example.com/license",
            },
        },
        idempotency_key="purchase:bob:com.example.tpl:1",
    )
    event = fake.complete_checkout(session["id"])
    for _ in range(2):
        await deliver(h, fake, event)
    await processed(h, event["id"])
    [ent] = await billing_of(h).store.entitlements("bob")
    assert (ent.spell_id, ent.status, ent.amount_cents) == ("com.example.tpl", "active", 1500)
    assert ent.license_url == "https://example.com/license"
    assert bob.account == "bob"


# ----------------------------------------------------------------------------- refunds


async def test_refunds_are_idempotent_and_capped_by_the_charge(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 100)
    bob = await caster(h, fake)
    cast_id = await cast_ok(h, bob)
    await charge_settled(h, cast_id)
    billing = billing_of(h)
    # the same refund requested concurrently (a retried operator command): one refund
    got = await asyncio.gather(
        *(
            billing.refund_cast(cast_id, amount=40, reason="sla", actor="operator", n=1)
            for _ in range(5)
        ),
        return_exceptions=True,
    )
    ok = [g for g in got if isinstance(g, dict)]
    assert ok and {g["refund_id"] for g in ok} == {f"cast:{cast_id}:refund:1"}
    assert len(fake.refunds) == 1
    [refund] = fake.refunds.values()
    assert refund["amount"] == 40
    assert fake.requests_for("PostRefunds")[0].idempotency_key == f"cast:{cast_id}:refund:1"
    second = await billing.refund_cast(cast_id, amount=None, reason="sla", actor="operator")
    assert (second["refund_id"], second["amount_cents"]) == (f"cast:{cast_id}:refund:2", 60)
    with pytest.raises(Exception, match="nothing left"):
        await billing.refund_cast(cast_id, amount=None, reason="again", actor="operator")
    assert sum(r["amount"] for r in fake.refunds.values()) == 100
    lines = await billing.ledger.ledger_lines("bob")
    assert [(line.kind, line.amount_cents) for line in lines] == [
        ("charge", 100),
        ("refund", 40),
        ("refund", 60),
    ]
    metrics = h.client.app[METRICS]  # type: ignore[index]
    assert metrics.refunds_count._value.get() == 2
    assert await billing.reconcile() == []
    # one audit record per refund, however many requests raced for it
    refunded = await audit_records(h, "ledger.refund")
    assert [(r["data"]["refund_id"], r["amount_cents"]) for r in refunded] == [
        (f"cast:{cast_id}:refund:1", 40),
        (f"cast:{cast_id}:refund:2", 60),
    ]


async def test_a_refund_of_an_uncollected_cast_lowers_what_is_owed(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 20)
    bob = await caster(h, fake)
    cast_id = await cast_ok(h, bob)
    await charge_settled(h, cast_id)
    done = await billing_of(h).refund_cast(cast_id, amount=5, reason="sla", actor="operator")
    assert (done["method"], done["status"]) == ("pending_credit", "succeeded")
    assert fake.refunds == {}
    [pending] = await billing_of(h).store.pending_summary("bob")
    assert pending.amount_cents == 15


# ----------------------------------------------------------------------------- reconciliation


async def test_reconcile_finds_an_injected_discrepancy(h: Harness, fake: FakeStripe) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake)
    cast_id = await cast_ok(h, bob)
    await charge_settled(h, cast_id)
    billing = billing_of(h)
    assert await billing.reconcile() == []
    [pi] = fake.payment_intents.values()
    pi["amount_received"] = 55  # Stripe and the ledger disagree
    problems = await billing.reconcile()
    assert len(problems) == 1 and "55" in problems[0] and pi["id"] in problems[0]


async def test_reconcile_reads_the_charges_and_the_refunds_once(
    h: Harness, fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake)
    billing = billing_of(h)
    for _ in range(2):  # two charges at Stripe, each partly refunded
        cast_id = await cast_ok(h, bob)
        await charge_settled(h, cast_id)
        await billing.refund_cast(cast_id, amount=10, reason="sla", actor="operator")
    store = billing.store
    reads = {"charges": 0, "refunds": 0}  # whole-table reads (no account or cast filter)

    def counted(name: str) -> Any:
        real = getattr(store, name)

        async def read(key: str | None = None) -> Any:
            reads[name] += key is None
            return await real(key)

        return read

    for name in reads:
        monkeypatch.setattr(store, name, counted(name))
    assert [c.kind for c in await store.charges("bob")] == ["payment_intent"] * 2
    assert await billing.reconcile() == []
    assert reads == {"charges": 1, "refunds": 1}
    [refund, _] = fake.refunds.values()
    refund["amount"] = 11  # Stripe refunded more than the ledger knows of
    problems = await billing.reconcile()
    assert len(problems) == 1 and "ledger refunded 10, Stripe refunded 11" in problems[0]


async def test_an_unfinished_refund_is_resumed_with_its_own_key(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 100)
    bob = await caster(h, fake)
    cast_id = await cast_ok(h, bob)
    await charge_settled(h, cast_id)
    billing = billing_of(h)
    billing.stripe.retry_delay = 0.01
    for _ in range(billing.stripe.max_retries + 1):
        fake.fail_next("PostRefunds", 500, "An unknown error occurred")
    with pytest.raises(AppError) as err:
        await billing.refund_cast(cast_id, amount=30, reason="sla", actor="operator")
    assert err.value.code == "UNAVAILABLE"
    with pytest.raises(AppError) as conflict:  # another amount while one is unfinished
        await billing.refund_cast(cast_id, amount=50, reason="sla", actor="operator")
    assert conflict.value.code == "CONFLICT"
    done = await billing.refund_cast(cast_id, amount=None, reason="sla", actor="operator")
    assert (done["refund_id"], done["amount_cents"], done["status"]) == (
        f"cast:{cast_id}:refund:1",
        30,
        "succeeded",
    )
    assert [r["amount"] for r in fake.refunds.values()] == [30]
    assert {r.idempotency_key for r in fake.requests_for("PostRefunds")} == {
        f"cast:{cast_id}:refund:1"
    }


# ----------------------------------------------------------------------------- failed payments
# SPEC §23.2: a failed payment cancels the account's runs that have not started and revokes
# what the payment bought; running casts finish; new paid casts get 402 until it is fixed.


def audit_file(h: Harness) -> list[dict[str, Any]]:
    path = h.settings.data_dir / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def audit_records(h: Harness, event: str) -> list[dict[str, Any]]:
    """The audit file's ``event`` records, once every record committed so far (the audit
    outbox) is in it."""
    billing = billing_of(h)
    await AuditDrainer(billing.ledger.fast, billing.audit).drain(wait=True)  # type: ignore[arg-type]
    return [r for r in audit_file(h) if r.get("event") == event]


async def cast_status(h: Harness, who: Caster, cast_id: str) -> dict[str, Any]:
    r = await h.client.get(f"/v1/casts/{cast_id}", headers={"Authorization": f"Bearer {who.token}"})
    assert r.status == 200, await r.text()
    return dict(await r.json())


async def queue_behind_busy_runs(
    h: Harness, who: Caster, n: int, spell_id: str = PAID
) -> tuple[list[str], list[str]]:
    """Hold the sandbox, cast ``n`` paid casts: SPELL_WORKERS (2) of them start and wait in the
    sandbox, the rest stay queued. Returns (running ids, queued ids)."""
    h.sandbox.gate.clear()
    before = len(h.sandbox.runs)
    ids = []
    for _ in range(n):
        r = await h.cast(who.token, spell_id)
        assert r.status == 202, await r.text()
        ids.append(str((await r.json())["cast_id"]))

    async def two_started() -> bool:
        return len(h.sandbox.runs) - before == h.settings.workers

    await until(two_started)
    statuses = {c: (await cast_status(h, who, c))["status"] for c in ids}
    running = [c for c in ids if statuses[c] == "running"]
    queued = [c for c in ids if statuses[c] == "queued"]
    assert (len(running), len(queued)) == (h.settings.workers, n - h.settings.workers)
    return running, queued


async def reserved_cents(h: Harness, account: str) -> tuple[int, int]:
    view = await billing_of(h).ledger.budget(account)
    assert view is not None
    return view.monthly.reserved_cents, view.monthly.used_cents


async def assert_cancelled(h: Harness, who: Caster, queued: list[str], code: str) -> None:
    for cast_id in queued:
        body = await cast_status(h, who, cast_id)
        assert body["status"] == "failed"
        assert body["error"]["code"] == "PAYMENT_FAILED"
        assert code in body["error"]["message"]
    failed = [r for r in await audit_records(h, "cast.failed") if r.get("cast_id") in queued]
    assert sorted(r["cast_id"] for r in failed) == sorted(queued)
    assert all(r["data"]["error"]["code"] == "PAYMENT_FAILED" for r in failed)
    assert all(r["data"]["released_cents"] == 60 for r in failed)


async def test_a_declined_charge_cancels_the_queued_casts_and_running_ones_finish(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake)
    billing = billing_of(h)
    billing.ledger.billing_enabled = False  # its charge job is run by hand below
    first = await cast_ok(h, bob)
    billing.ledger.billing_enabled = True
    running, queued = await queue_behind_busy_runs(h, bob, 5)
    assert await reserved_cents(h, "bob") == (5 * 60, 60)

    fake.decline_next("card_declined")
    await billing.on_charge_job(Msg({"cast_id": first}))

    [charge] = await charges(h)
    assert (charge.status, charge.failure_code) == ("failed", "card_declined")
    await assert_cancelled(h, bob, queued, "card_declined")
    for cast_id in running:
        assert (await cast_status(h, bob, cast_id))["status"] == "running"
    # exactly the queued casts' reservations were released; the running ones still hold theirs
    assert await reserved_cents(h, "bob") == (2 * 60, 60)
    [failed] = await audit_records(h, "billing.payment_failed")
    assert sorted(failed["data"]["cancelled_casts"]) == sorted(queued)
    assert failed["data"]["code"] == "card_declined"

    r = await h.cast(bob.token, PAID)  # new paid casts are refused until a card is saved
    assert r.status == 402
    assert (await r.json())["error"]["code"] == "PAYMENT_REQUIRED"

    # the job delivered again: nothing more is cancelled, charged or recorded
    await billing.on_charge_job(Msg({"cast_id": first}))
    assert len(await audit_records(h, "billing.payment_failed")) == 1

    h.sandbox.gate.set()  # the running casts finish and are billed; the cancelled never run
    for cast_id in running:
        assert (await h.wait_cast(bob.token, cast_id))["status"] == "succeeded"
    for cast_id in queued:  # their run requests are dropped: a cancelled cast cannot start
        assert await billing.ledger.claim(cast_id) is None
    assert len(h.sandbox.runs) == 1 + len(running)
    assert await reserved_cents(h, "bob") == (0, 3 * 60)
    for cast_id in queued:
        assert (await cast_status(h, bob, cast_id))["status"] == "failed"


async def test_a_failed_invoice_cancels_queued_casts_and_revokes_what_it_paid_for(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake)
    billing = billing_of(h)
    row = await billing.store.customer("bob")
    assert row is not None and row.stripe_customer_id is not None
    ent, _ = await billing.store.grant_entitlement(
        account_id="bob",
        spell_id="com.example.tpl",
        checkout_session_id="cs_test_invoice_paid",
        payment_intent_id="pi_invoice_1",
        amount_cents=1000,
        currency="USD",
        license_url=None,
    )
    _running, queued = await queue_behind_busy_runs(h, bob, 4)

    failed = fake.invoice_event(row.stripe_customer_id, paid=False, payment_intent="pi_invoice_1")
    for _ in range(2):  # delivered twice: handled once
        assert (await deliver(h, fake, failed)).status == 200
    assert await processed(h, failed["id"]) == "done"

    await assert_cancelled(h, bob, queued, "invoice_payment_failed")
    assert await reserved_cents(h, "bob") == (2 * 60, 0)
    [revoked] = await billing.store.entitlements("bob")
    assert (revoked.id, revoked.status) == (ent.id, "revoked")
    [record] = await audit_records(h, "billing.payment_failed")
    assert record["data"]["revoked_entitlements"] == 1
    assert sorted(record["data"]["cancelled_casts"]) == sorted(queued)
    assert (await h.cast(bob.token, PAID)).status == 402
    h.sandbox.gate.set()


async def test_a_purchase_whose_payment_fails_later_is_revoked_and_the_account_past_due(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake)
    billing = billing_of(h)
    row = await billing.store.customer("bob")
    assert row is not None
    session = await billing.stripe.create_checkout_session(
        {
            "mode": "payment",
            "customer": row.stripe_customer_id,
            "success_url": "http://spell.test/done",
            "line_items": [
                {
                    "price_data": {
                        "currency": "usd",
                        "unit_amount": 1500,
                        "product_data": {"name": "Clone of com.example.tpl"},
                    },
                    "quantity": 1,
                }
            ],
            "metadata": {"account_id": "bob", "spell_id": "com.example.tpl"},
        },
        idempotency_key="purchase:bob:com.example.tpl:2",
    )
    completed = fake.complete_checkout(session["id"])
    await deliver(h, fake, completed)
    await processed(h, completed["id"])
    succeeded = fake.events_of("payment_intent.succeeded")[-1]
    pi = succeeded["data"]["object"]
    await deliver(h, fake, succeeded)
    assert await processed(h, succeeded["id"]) == "done"
    assert await billing.store.event_status(succeeded["id"]) == "applied"

    failure = {
        **pi,
        "status": "requires_payment_method",
        "last_payment_error": {"code": "card_declined", "decline_code": "insufficient_funds"},
    }
    # a failure from before the success, delivered late: stale, nothing is revoked
    stale = fake.event("payment_intent.payment_failed", failure)
    stale["created"] = succeeded["created"] - 5
    await deliver(h, fake, stale)
    await processed(h, stale["id"])
    assert await billing.store.event_status(stale["id"]) == "stale"
    [ent] = await billing.store.entitlements("bob")
    assert ent.status == "active"

    _running, queued = await queue_behind_busy_runs(h, bob, 3)
    fake.advance(5)
    later = fake.event("payment_intent.payment_failed", failure)  # e.g. a debit that bounced
    await deliver(h, fake, later)
    await processed(h, later["id"])
    assert await billing.store.event_status(later["id"]) == "applied"
    [ent] = await billing.store.entitlements("bob")
    assert ent.status == "revoked"
    await assert_cancelled(h, bob, queued, "insufficient_funds")
    after = await billing.store.customer("bob")
    assert after is not None and after.past_due and after.past_due_reason == "insufficient_funds"
    assert (await h.cast(bob.token, PAID)).status == 402
    h.sandbox.gate.set()


async def test_free_casts_of_a_past_due_account_are_not_cancelled(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 0, spell_id="com.example.free")
    bob = await caster(h, fake)
    running, queued = await queue_behind_busy_runs(h, bob, 4, "com.example.free")
    assert await billing_of(h).cancel_queued_casts("bob", "card_declined") == []
    h.sandbox.gate.set()
    for cast_id in running + queued:
        assert (await h.wait_cast(bob.token, cast_id))["status"] == "succeeded"


async def test_settlement_rows_written_on_the_bare_driver_read_back_through_the_orm(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 20)
    bob = await caster(h, fake)
    billing = billing_of(h)
    before = await billing.store.customer("bob")
    assert before is not None
    ids = [await cast_ok(h, bob) for _ in range(3)]  # 60 cents together: one charge
    for cast_id in ids:
        await charge_settled(h, cast_id)
    [charge] = await charges(h)
    assert (charge.kind, charge.amount_cents, charge.currency, charge.status) == (
        "payment_intent",
        60,
        "USD",
        "succeeded",
    )
    assert charge.id == f"cast:{ids[2]}:charge" and charge.attempt == 1
    assert charge.created_at.utcoffset() is not None  # aware UTC, as the ORM stores it
    lines = await billing.store.lines_of(charge.id)
    assert sorted(line.cast_id for line in lines) == sorted(ids)
    cast = await billing.ledger.get_cast(ids[0])
    assert cast is not None and cast.finished_at is not None
    assert {line.period for line in lines} == {cast.finished_at.strftime("%Y-%m")}
    # taking the account's lock does not change its row
    after = await billing.store.customer("bob")
    assert after is not None
    assert (after.updated_at, after.past_due, after.payment_method_status) == (
        before.updated_at,
        False,
        "active",
    )
    [record] = await audit_records(h, "billing.charged")
    assert record["data"]["casts"] == sorted(ids)
    assert record["data"]["stripe_id"] == charge.stripe_id


# ----------------------------------------------------------------------------- audit outbox
# A billing audit record commits with the money state change it records (an ``audit_outbox``
# row in the same transaction), never appended after the commit: a crash in between cannot
# leave money moved with no audit trail. The drainer then appends it to the file exactly once.


async def test_a_charge_commits_its_audit_record_with_it(h: Harness, fake: FakeStripe) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake)
    async with h.drains_held():
        cast_id = await cast_ok(h, bob)
        await charge_settled(h, cast_id)
        [charge] = await charges(h)
        assert charge.status == "succeeded"
        [row] = await h.pending_audit("billing.charged")  # committed with the charge...
        assert (row["actor"], row["cast_id"], row["amount_cents"], row["currency"]) == (
            "billing",
            None,
            60,
            "USD",
        )
        assert row["data"] == {
            "charge_id": charge.id,
            "account": "bob",
            "method": "stripe_pi",
            "stripe_id": charge.stripe_id,
            "casts": [cast_id],
        }
        # ... and not appended behind the drainer's back
        assert [r for r in audit_file(h) if r["event"] == "billing.charged"] == []
        # the job delivered again changes nothing and records nothing more
        await billing_of(h).on_charge_job(Msg({"cast_id": cast_id}))
        assert len(await h.pending_audit("billing.charged")) == 1
    [record] = await audit_records(h, "billing.charged")  # once in the file, as committed
    assert record["data"] == {**row["data"], "event_id": row["event_id"]}
    assert (record["actor"], record["amount_cents"], record["currency"]) == ("billing", 60, "USD")
    assert await h.pending_audit("billing.charged") == []


async def test_a_refund_commits_its_audit_record_with_it(h: Harness, fake: FakeStripe) -> None:
    await paid_spell(h, 100)
    bob = await caster(h, fake)
    cast_id = await cast_ok(h, bob)
    await charge_settled(h, cast_id)
    billing = billing_of(h)
    async with h.drains_held():
        done = await billing.refund_cast(cast_id, amount=40, reason="sla", actor="operator")
        assert (done["method"], done["status"]) == ("stripe_refund", "succeeded")
        [row] = await h.pending_audit("ledger.refund")
        assert (row["actor"], row["cast_id"], row["amount_cents"], row["currency"]) == (
            "operator",
            cast_id,
            40,
            "USD",
        )
        assert row["data"] == {
            "refund_id": f"cast:{cast_id}:refund:1",
            "method": "stripe_refund",
            "reason": "sla",
            "stripe_id": done["stripe_id"],
            "account": "bob",
        }
        assert [r for r in audit_file(h) if r["event"] == "ledger.refund"] == []
        # the same refund again (a retried command): no second refund, no second record
        again = await billing.refund_cast(cast_id, amount=40, reason="sla", actor="operator", n=1)
        assert again == done
        assert len(await h.pending_audit("ledger.refund")) == 1
    [record] = await audit_records(h, "ledger.refund")
    assert record["data"] == {**row["data"], "event_id": row["event_id"]}
    assert (record["cast_id"], record["amount_cents"]) == (cast_id, 40)
    assert await h.pending_audit("ledger.refund") == []


async def test_a_declined_charge_commits_its_audit_record_with_it(
    h: Harness, fake: FakeStripe
) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake, "pm_card_chargeDeclined")
    async with h.drains_held():
        cast_id = await cast_ok(h, bob)
        await charge_settled(h, cast_id)
        [charge] = await charges(h)
        assert (charge.status, charge.failure_code) == ("failed", "card_declined")
        # the charge failed, the account is past due and the record of it is committed, in
        # one transaction
        [row] = await h.pending_audit("billing.payment_failed")
        assert row["data"] == {
            "charge_id": charge.id,
            "account": "bob",
            "code": "card_declined",
            "cancelled_casts": [],
        }
        assert (await h.cast(bob.token, PAID)).status == 402
    [record] = await audit_records(h, "billing.payment_failed")
    assert record["data"]["event_id"] == row["event_id"]
    assert (record["actor"], record["amount_cents"]) == ("billing", 60)


async def test_a_card_saved_while_a_failure_is_recorded_changes_nothing_and_is_retried(
    h: Harness, fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    await paid_spell(h, 60)
    bob = await caster(h, fake)
    billing = billing_of(h)
    billing.ledger.billing_enabled = False  # its charge is made by hand below
    cast_id = await cast_ok(h, bob)
    cast = await billing.ledger.get_cast(cast_id)
    assert cast is not None
    pending = await billing.store.add_pending(cast)
    assert pending.charge is not None and pending.charge["status"] == "pending"
    charge = BillingCharge(**pending.charge)
    mark = billing.store.mark_past_due

    async def card_saved_right_after(account_id: str, reason: str) -> bool:
        newly = await mark(account_id, reason)
        await billing.store.save_payment_method(account_id, "pm_card_visa")
        return newly

    monkeypatch.setattr(billing.store, "mark_past_due", card_saved_right_after)
    async with h.drains_held():
        with pytest.raises(AppError) as err:
            await billing._failed(charge, "card_declined", None)
        assert err.value.code == "UNAVAILABLE"  # the job runs again
        # nothing was failed, cancelled or recorded: the new card's save saw a pending charge
        got = await billing.store.charge(charge.id)
        assert got is not None and (got.status, got.failure_code) == ("pending", None)
        assert await h.pending_audit("billing.payment_failed") == []
    monkeypatch.undo()
    await billing._failed(charge, "card_declined", None)  # the repeat records the failure
    [record] = await audit_records(h, "billing.payment_failed")
    assert record["data"]["charge_id"] == charge.id
    got = await billing.store.charge(charge.id)
    assert got is not None and got.status == "failed"
