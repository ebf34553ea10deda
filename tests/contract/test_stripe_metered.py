"""Metered subscriptions, manual usage, SLA refunds, failed invoices and the wider reconciliation
against the contract-enforcing fake Stripe (SQLite and, with SPELL_TEST_DATABASE_URL,
PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from app.billing.routes import BILLING
from app.billing.service import BillingService, reconcile_once
from app.config import Settings
from app.store.models import BillingUsage, LedgerLine, Outbox
from app.web.app import Overrides, create_app
from app.web.keys import INBOX, METRICS
from tests.conftest import FakeSandbox, FrozenClock, Harness
from tests.contract.fake_stripe import API_KEY, FakeStripe, stripe_contract

SECRET = "whsec_test_metered_secret"
PLANS = {"pro": {"base": "price_base_pro", "metered": ["price_casts", "price_compute"]}}
METERED = "com.example.metered"
FLAT = "com.example.flat"


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripe]:
    f = FakeStripe(contract=stripe_contract())
    async with f.serve():
        yield f
    assert f.violations == []
    assert f.auth_failures == []
    assert f.idempotency_errors == []


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


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
        SPELL_STRIPE_PLANS=json.dumps(PLANS),
        SPELL_BILLING_RECONCILE_INTERVAL=0,
    )


@pytest.fixture
async def h(aiohttp_client: Any, settings: Settings, clock: FrozenClock) -> Harness:
    sandbox = FakeSandbox()
    app = create_app(settings, overrides=Overrides(sandbox=sandbox, clock=clock, job_backoff=0.05))
    client = await aiohttp_client(app)
    return Harness(client=client, settings=settings, sandbox=sandbox)


@pytest.fixture
async def plain(aiohttp_client: Any, settings: Settings) -> Harness:
    """The same platform in ledger-only mode (no Stripe)."""
    ledger_only = settings.model_copy(
        update={"stripe_api_key": None, "stripe_webhook_secret": None, "stripe_plans": None}
    )
    sandbox = FakeSandbox()
    app = create_app(ledger_only, overrides=Overrides(sandbox=sandbox))
    client = await aiohttp_client(app)
    return Harness(client=client, settings=ledger_only, sandbox=sandbox)


def billing_of(h: Harness) -> BillingService:
    return h.client.app[BILLING]  # type: ignore[index,no-any-return]


def auth(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


async def deliver(h: Harness, fake: FakeStripe, event: dict[str, Any]) -> None:
    headers, body = fake.signed(event, SECRET)
    r = await h.client.post("/webhooks/stripe", data=body, headers=headers)
    assert r.status == 200, await r.text()
    inbox = h.client.app[INBOX]  # type: ignore[index]

    async def done() -> bool:
        d = await inbox.get(event["id"])
        return d is not None and d.status in ("done", "ignored", "dead")

    await until(done)
    d = await inbox.get(event["id"])
    assert d is not None and d.status == "done", (d.status if d else None, d and d.last_error)


async def publish_metered(h: Harness, *, sla: int | None = None, base: int = 0) -> None:
    maker = await h.token("acme-labs", "maker")
    extra: dict[str, Any] = {"sla": {"max_duration_sec": sla}} if sla is not None else {}
    pricing = {
        "model": "metered",
        "currency": "USD",
        "base_cents": base,
        "meters": {
            "casts": {"unit_cents": 10, "per": 1, "max": 1},
            "compute_ms": {"unit_cents": 1, "per": 1, "max": 1000},
        },
    }
    await h.publish(maker, spell_id=METERED, pricing=pricing, **extra)


async def publish_flat(h: Harness, cents: int, *, sla: int | None = None) -> None:
    maker = await h.token("acme-labs", "maker")
    extra: dict[str, Any] = {"sla": {"max_duration_sec": sla}} if sla is not None else {}
    await h.publish(maker, spell_id=FLAT, flat_cents=cents, **extra)


async def subscribe(h: Harness, fake: FakeStripe, token: str) -> str:
    r = await h.client.post("/v1/billing/subscribe", json={"plan": "pro"}, headers=auth(token))
    assert r.status == 201, await r.text()
    got = await r.json()
    assert got["plan"] == "pro" and got["url"].startswith("https://checkout.stripe.com/")
    await deliver(h, fake, fake.complete_checkout(got["session_id"]))
    return str(got["customer"])


async def save_card(h: Harness, fake: FakeStripe, token: str) -> str:
    r = await h.client.post("/v1/billing/setup", headers=auth(token))
    assert r.status == 201, await r.text()
    got = await r.json()
    await deliver(h, fake, fake.complete_checkout(got["session_id"]))
    return str(got["customer"])


async def cast_ok(h: Harness, token: str, spell_id: str) -> str:
    r = await h.cast(token, spell_id)
    assert r.status == 202, await r.text()
    cast_id = str((await r.json())["cast_id"])
    assert (await h.wait_cast(token, cast_id))["status"] == "succeeded"
    return cast_id


async def usage_sent(h: Harness, cast_id: str) -> list[BillingUsage]:
    store = billing_of(h).store

    async def sent() -> bool:
        rows = await store.usage_of(cast_id)
        return bool(rows) and all(r.status == "sent" for r in rows)

    await until(sent)
    return await store.usage_of(cast_id)


async def slow_cast(h: Harness, clock: FrozenClock, token: str, spell_id: str, sec: int) -> str:
    """A cast that takes ``sec`` seconds from acceptance to completion (on the app's clock)."""
    h.sandbox.gate.clear()
    r = await h.cast(token, spell_id)
    assert r.status == 202, await r.text()
    cast_id = str((await r.json())["cast_id"])

    async def running() -> bool:
        return len(h.sandbox.runs) > 0 and any(
            str(s.env.get("SPELL_CAST_ID")) == cast_id for s in h.sandbox.runs
        )

    await until(running)
    clock.advance(sec)
    h.sandbox.gate.set()
    assert (await h.wait_cast(token, cast_id))["status"] == "succeeded"
    return cast_id


def audit_events(h: Harness) -> list[dict[str, Any]]:
    path = h.settings.data_dir / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def audited(h: Harness, event: str) -> list[dict[str, Any]]:
    async def seen() -> bool:
        return any(e.get("event") == event for e in audit_events(h))

    await until(seen)
    return [e for e in audit_events(h) if e.get("event") == event]


# ----------------------------------------------------------------------------- meters


async def test_meters_are_created_once_and_adopted_by_event_name(
    h: Harness, fake: FakeStripe
) -> None:
    # one meter already exists at Stripe (created by hand): it is adopted, not duplicated
    fake.meters["mtr_existing"] = {
        "id": "mtr_existing",
        "object": "billing.meter",
        "display_name": "casts",
        "event_name": "spell_casts",
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
        "value_settings": {"event_payload_key": "value"},
        "status": "active",
        "created": fake.now(),
        "livemode": False,
    }
    billing = billing_of(h)
    first, second = await asyncio.gather(billing.ensure_meters(), billing.ensure_meters())
    assert first == second
    assert set(first) == {"casts", "compute_ms", "egress_mb"}
    assert first["casts"] == ("spell_casts", "mtr_existing")
    assert sorted(m["event_name"] for m in fake.meters.values()) == [
        "spell_casts",
        "spell_compute_ms",
        "spell_egress_mb",
    ]
    creates = fake.requests_for("PostBillingMeters")
    assert [r.idempotency_key for r in creates] == [
        "meter:spell_compute_ms",
        "meter:spell_egress_mb",
    ]
    # a new process (empty cache) finds them in the ledger: no Stripe call at all
    billing._meters = {}
    before = len(fake.requests)
    assert await billing.ensure_meters() == first
    assert len(fake.requests) == before


# ----------------------------------------------------------------------------- subscriptions


async def test_a_subscribers_metered_casts_are_reported_as_meter_events(
    h: Harness, fake: FakeStripe
) -> None:
    await publish_metered(h)
    token = await h.token("bob", "caster")
    customer = await subscribe(h, fake, token)
    [checkout] = fake.requests_for("PostCheckoutSessions")
    assert checkout.params["mode"] == "subscription"
    assert checkout.params["line_items"] == [
        {"price": "price_base_pro", "quantity": 1},
        {"price": "price_casts"},
        {"price": "price_compute"},
    ]
    assert checkout.params["subscription_data"]["metadata"] == {"account_id": "bob", "plan": "pro"}
    view = await (await h.client.get("/v1/billing", headers=auth(token))).json()
    assert (view["plan"], view["subscription_status"]) == ("pro", "active")
    assert view["payment_method"]["status"] == "active"  # the card the subscription saved

    cast_id = await cast_ok(h, token, METERED)
    rows = await usage_sent(h, cast_id)
    async with billing_of(h).ledger.reader() as s:
        job = (await s.scalars(select(Outbox).where(Outbox.subject == "billing.usage"))).one()
    assert (job.msg_id, job.payload) == (
        f"cast:{cast_id}:usage",
        {"cast_id": cast_id, "usage": {"casts": 1, "compute_ms": 5}},
    )
    assert {(r.identifier, r.value) for r in rows} == {
        (f"{cast_id}:casts", 1),
        (f"{cast_id}:compute_ms", 5),  # the fake sandbox's duration
    }
    events = {e["identifier"]: e for e in fake.meter_events}
    assert set(events) == {f"{cast_id}:casts", f"{cast_id}:compute_ms"}
    assert events[f"{cast_id}:casts"]["event_name"] == "spell_casts"
    assert events[f"{cast_id}:compute_ms"]["payload"] == {
        "stripe_customer_id": customer,
        "value": "5",
    }
    # billed through the subscription: never charged per cast
    assert fake.payment_intents == {}
    assert await billing_of(h).store.line(cast_id) is None
    # both jobs of the cast, redelivered, change nothing
    billing = billing_of(h)
    assert await billing.settle(cast_id) == "meter"
    assert await billing.settle(cast_id) == "meter"
    assert len(fake.meter_events) == 2 and fake.duplicate_meter_events == 0


async def test_metered_casts_without_a_subscription_are_charged_per_cast(
    h: Harness, fake: FakeStripe
) -> None:
    await publish_metered(h, base=50)
    token = await h.token("carol", "caster")
    await save_card(h, fake, token)
    cast_id = await cast_ok(h, token, METERED)
    store = billing_of(h).store

    async def collected() -> bool:
        line = await store.line(cast_id)
        if line is None or line.charge_id is None:
            return False
        charge = await store.charge(line.charge_id)
        return charge is not None and charge.status == "succeeded"

    await until(collected)

    # both the charge job and the usage job ran; one PaymentIntent, no meter events
    async def both_sent() -> bool:
        async with billing_of(h).ledger.reader() as s:
            rows = (
                await s.scalars(
                    select(Outbox.sent_at).where(
                        Outbox.msg_id.in_([f"cast:{cast_id}:charge", f"cast:{cast_id}:usage"])
                    )
                )
            ).all()
        return len(rows) == 2 and all(rows)

    await until(both_sent)
    assert await billing_of(h).settle(cast_id) == "charge"
    [pi] = fake.payment_intents.values()
    assert pi["amount"] == 50 + 10 + 5  # base + 1 cast + 5 compute ms
    assert fake.meter_events == []
    assert await store.usage_of(cast_id) == []


async def test_subscribing_needs_a_known_plan_and_no_live_subscription(
    h: Harness, fake: FakeStripe
) -> None:
    token = await h.token("dave", "caster")
    r = await h.client.post("/v1/billing/subscribe", json={"plan": "gold"}, headers=auth(token))
    assert r.status == 422
    assert "pro" in (await r.json())["error"]["message"]
    plans = await (await h.client.get("/v1/billing/plans", headers=auth(token))).json()
    assert plans == {
        "plans": [
            {
                "name": "pro",
                "base_price": "price_base_pro",
                "metered_prices": ["price_casts", "price_compute"],
            }
        ]
    }
    await subscribe(h, fake, token)
    r = await h.client.post("/v1/billing/subscribe", json={"plan": "pro"}, headers=auth(token))
    assert r.status == 409
    assert len(fake.requests_for("PostCheckoutSessions")) == 1


# ----------------------------------------------------------------------------- manual usage


async def test_usage_reports_are_idempotent_recorded_and_sent(h: Harness, fake: FakeStripe) -> None:
    token = await h.token("erin", "caster")
    body = {"usage": {"compute_ms": 1200, "egress_mb": 3}}
    r = await h.client.post("/v1/billing/usage", json=body, headers=auth(token))
    assert r.status == 422  # no Idempotency-Key
    assert (await r.json())["error"]["detail"] == {"header": "Idempotency-Key"}
    r = await h.client.post(
        "/v1/billing/usage", json=body, headers=auth(token, **{"Idempotency-Key": "u-1"})
    )
    assert r.status == 409  # no subscription to report to
    assert (await r.json())["error"]["code"] == "CONFLICT"
    customer = await subscribe(h, fake, token)

    r = await h.client.post(
        "/v1/billing/usage", json=body, headers=auth(token, **{"Idempotency-Key": "u-1"})
    )
    assert r.status == 201, await r.text()
    got = await r.json()
    assert r.headers["Idempotent-Replayed"] == "false"
    uid = got["usage_id"]
    assert got["identifiers"] == [f"{uid}:compute_ms", f"{uid}:egress_mb"]
    again = await h.client.post(
        "/v1/billing/usage", json=body, headers=auth(token, **{"Idempotency-Key": "u-1"})
    )
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == got
    other = await h.client.post(
        "/v1/billing/usage",
        json={"usage": {"compute_ms": 1}},
        headers=auth(token, **{"Idempotency-Key": "u-1"}),
    )
    assert other.status == 409
    assert (await other.json())["error"]["code"] == "IDEMPOTENCY_CONFLICT"

    async def sent() -> bool:
        return len(fake.meter_events) == 2

    await until(sent)
    assert {(e["identifier"], e["payload"]["value"]) for e in fake.meter_events} == {
        (f"{uid}:compute_ms", "1200"),
        (f"{uid}:egress_mb", "3"),
    }
    assert fake.meter_total("spell_egress_mb", customer) == 3
    async with billing_of(h).ledger.reader() as s:
        rows = (await s.scalars(select(BillingUsage).where(BillingUsage.source == "manual"))).all()
    assert sorted((r.meter, r.value, r.account_id) for r in rows) == [
        ("compute_ms", 1200, "erin"),
        ("egress_mb", 3, "erin"),
    ]
    [record] = await audited(h, "billing.usage")
    assert record["data"]["usage"] == {"compute_ms": 1200, "egress_mb": 3}


async def test_usage_for_another_account_needs_an_operator(h: Harness, fake: FakeStripe) -> None:
    frank = await h.token("frank", "caster")
    await subscribe(h, fake, frank)
    mallory = await h.token("mallory", "caster")
    body = {"usage": {"casts": 2}, "account": "frank"}
    r = await h.client.post(
        "/v1/billing/usage", json=body, headers=auth(mallory, **{"Idempotency-Key": "k"})
    )
    assert r.status == 403
    ops = await h.token("ops", "operator")
    r = await h.client.post(
        "/v1/billing/usage", json=body, headers=auth(ops, **{"Idempotency-Key": "k"})
    )
    assert r.status == 201, await r.text()
    assert (await r.json())["account"] == "frank"
    r = await h.client.post(
        "/v1/billing/usage",
        json={"usage": {"casts": 0}},
        headers=auth(frank, **{"Idempotency-Key": "z"}),
    )
    assert r.status == 422  # nothing to report


async def test_usage_in_ledger_only_mode_is_recorded_not_sent(plain: Harness) -> None:
    harness = plain
    assert BILLING not in harness.client.app
    token = await harness.token("gina", "caster")
    r = await harness.client.post(
        "/v1/billing/usage",
        json={"usage": {"casts": 3}},
        headers=auth(token, **{"Idempotency-Key": "one"}),
    )
    assert r.status == 201, await r.text()
    got = await r.json()
    assert got["status"] == "recorded"
    async with harness.platform.ledger.reader() as s:
        rows = (await s.scalars(select(BillingUsage))).all()
        subjects = (await s.scalars(select(Outbox.subject))).all()
    assert [(r.meter, r.value, r.status) for r in rows] == [("casts", 3, "ledger")]
    assert "billing.meter" not in subjects


async def test_without_stripe_metered_casts_queue_no_usage_job(plain: Harness) -> None:
    harness = plain
    assert BILLING not in harness.client.app
    await publish_metered(harness)
    token = await harness.token("olga", "caster")
    await cast_ok(harness, token, METERED)
    async with harness.platform.ledger.reader() as s:
        subjects = (await s.scalars(select(Outbox.subject))).all()
        rows = (await s.scalars(select(BillingUsage))).all()
    assert "billing.usage" not in subjects and "billing.charge" not in subjects
    assert rows == []


# ----------------------------------------------------------------------------- SLA refunds


async def test_a_flat_cast_over_its_sla_is_refunded_in_full_once(
    h: Harness, fake: FakeStripe, clock: FrozenClock
) -> None:
    await publish_flat(h, 60, sla=2)
    token = await h.token("hana", "caster")
    await save_card(h, fake, token)
    cast_id = await slow_cast(h, clock, token, FLAT, 5)
    store = billing_of(h).store

    async def refunded() -> bool:
        return any(r.status == "succeeded" for r in await store.refunds(cast_id))

    await until(refunded)
    [refund] = await store.refunds(cast_id)
    assert (refund.id, refund.amount_cents, refund.method, refund.reason) == (
        f"cast:{cast_id}:refund:1",
        60,
        "stripe_refund",
        "sla_violation",
    )
    [stripe_refund] = fake.refunds.values()
    assert stripe_refund["amount"] == 60
    assert fake.requests_for("PostRefunds")[0].idempotency_key == f"cast:{cast_id}:refund:1"
    lines = await billing_of(h).ledger.ledger_lines("hana")
    assert [(ln.kind, ln.amount_cents) for ln in lines] == [("charge", 60), ("refund", 60)]
    [record] = await audited(h, "ledger.refund")
    assert record["cast_id"] == cast_id and record["data"]["reason"] == "sla_violation"
    metrics = h.client.app[METRICS]  # type: ignore[index]
    assert metrics.refunds_count._value.get() == 1
    # the job and the settlement again (redeliveries): still one refund
    billing = billing_of(h)
    await billing.settle(cast_id)
    from tests.contract.test_stripe_billing import Msg

    await billing.on_refund_job(
        Msg({"cast_id": cast_id, "reason": "sla_violation"}, subject="billing.refund")
    )
    assert len(fake.refunds) == 1 and len(await store.refunds(cast_id)) == 1
    assert metrics.refunds_count._value.get() == 1


async def test_a_cast_within_its_sla_is_not_refunded(
    h: Harness, fake: FakeStripe, clock: FrozenClock
) -> None:
    await publish_flat(h, 60, sla=10)
    token = await h.token("ivan", "caster")
    await save_card(h, fake, token)
    cast_id = await slow_cast(h, clock, token, FLAT, 3)
    store = billing_of(h).store

    async def collected() -> bool:
        line = await store.line(cast_id)
        return line is not None and line.charge_id is not None

    await until(collected)
    assert await billing_of(h).settle(cast_id) == "charge"
    async with billing_of(h).ledger.reader() as s:
        subjects = (await s.scalars(select(Outbox.subject))).all()
    assert "billing.refund" not in subjects
    assert await store.refunds(cast_id) == [] and fake.refunds == {}


async def test_a_subscribers_cast_over_its_sla_is_credited_to_the_balance(
    h: Harness, fake: FakeStripe, clock: FrozenClock
) -> None:
    await publish_metered(h, sla=1)
    token = await h.token("jade", "caster")
    customer = await subscribe(h, fake, token)
    cast_id = await slow_cast(h, clock, token, METERED, 4)
    store = billing_of(h).store

    async def credited() -> bool:
        return any(r.status == "succeeded" for r in await store.refunds(cast_id))

    await until(credited)
    [refund] = await store.refunds(cast_id)
    cost = 10 + 5  # 1 cast + 5 compute ms
    assert (refund.method, refund.amount_cents, refund.charge_id) == ("balance_credit", cost, None)
    [txn] = fake.balance_transactions.values()
    assert (txn["customer"], txn["amount"]) == (customer, -cost)
    assert fake.requests_for("PostCustomersCustomerBalanceTransactions")[0].idempotency_key == (
        f"cast:{cast_id}:refund:1"
    )
    async with billing_of(h).ledger.reader() as s:
        credit = (await s.scalars(select(LedgerLine).where(LedgerLine.kind == "credit"))).one()
    assert (credit.cast_id, credit.amount_cents, credit.method) == (
        cast_id,
        cost,
        "balance_credit",
    )
    assert fake.refunds == {} and fake.payment_intents == {}
    assert len(fake.meter_events) == 2  # the usage itself was still reported


# ----------------------------------------------------------------------------- invoices


async def test_a_failed_invoice_makes_the_account_past_due_until_paid(
    h: Harness, fake: FakeStripe
) -> None:
    await publish_metered(h)
    token = await h.token("kim", "caster")
    customer = await subscribe(h, fake, token)
    [sub_id] = fake.subscriptions
    # a one-time purchase paid by the same invoice's PaymentIntent is revoked with it
    ent, _ = await billing_of(h).store.grant_entitlement(
        account_id="kim",
        spell_id="com.example.clone",
        checkout_session_id="cs_test_x",
        payment_intent_id="pi_invoice",
        amount_cents=500,
        currency="USD",
        license_url=None,
    )
    await deliver(
        h,
        fake,
        fake.invoice_event(customer, paid=False, subscription=sub_id, payment_intent="pi_invoice"),
    )
    view = await (await h.client.get("/v1/billing", headers=auth(token))).json()
    assert view["past_due"] is True and view["past_due_reason"] == "invoice_payment_failed"
    assert view["subscription_status"] == "past_due"
    assert [e["status"] for e in view["entitlements"]] == ["revoked"]
    [record] = await audited(h, "billing.payment_failed")
    assert record["data"]["invoice"].startswith("in_")
    assert record["data"]["revoked_entitlements"] == 1
    r = await h.cast(token, METERED)
    assert r.status == 402
    assert (await r.json())["error"]["detail"]["reason"] == "invoice_payment_failed"
    fake.advance(1)
    await deliver(h, fake, fake.invoice_event(customer, paid=True))
    await deliver(h, fake, fake.update_subscription(sub_id, status="active"))
    view = await (await h.client.get("/v1/billing", headers=auth(token))).json()
    assert view["past_due"] is False and view["subscription_status"] == "active"
    await cast_ok(h, token, METERED)
    assert ent.spell_id == "com.example.clone"


# ----------------------------------------------------------------------------- reconciliation


async def test_reconcile_compares_usage_with_meter_event_summaries(
    h: Harness, fake: FakeStripe
) -> None:
    await publish_metered(h)
    token = await h.token("lee", "caster")
    await subscribe(h, fake, token)
    first = await cast_ok(h, token, METERED)
    second = await cast_ok(h, token, METERED)
    await usage_sent(h, first)
    await usage_sent(h, second)
    billing = billing_of(h)
    assert await billing.reconcile() == []
    # an event Stripe lost (or never received)
    fake.meter_events = [e for e in fake.meter_events if e["identifier"] != f"{second}:compute_ms"]
    problems = await billing.reconcile()
    assert len(problems) == 1
    assert problems[0].startswith(
        "lee: ledger reported 10 compute_ms, Stripe's meter summary says 5"
    )
    # 3 meters x 2 reconciliations, one customer
    assert len(fake.requests_for("GetBillingMetersIdEventSummaries")) == 6


async def test_reconcile_flags_usage_never_reported(
    h: Harness, fake: FakeStripe, clock: FrozenClock
) -> None:
    token = await h.token("max", "caster")
    await subscribe(h, fake, token)
    billing = billing_of(h)
    # usage recorded whose job was lost (no outbox row): it never reaches Stripe by itself
    async with billing.ledger.write() as s:
        s.add(
            BillingUsage(
                identifier="u_lost:casts",
                account_id="max",
                cast_id=None,
                meter="casts",
                value=4,
                timestamp=int(clock.now().timestamp()),
                source="manual",
                status="pending",
                created_at=clock.now(),
            )
        )
    assert await billing.reconcile() == []  # within the grace period: on its way
    clock.advance(2 * 3600)
    assert await billing.reconcile() == ["u_lost:casts: 4 casts never reported to Stripe"]
    assert await billing.report(await billing.store.unsent_usage(account_id="max")) == 1
    assert [e["identifier"] for e in fake.meter_events] == ["u_lost:casts"]
    assert await billing.reconcile() == []


async def test_reconcile_compares_invoice_items_both_ways(
    h: Harness, fake: FakeStripe, clock: FrozenClock
) -> None:
    await publish_flat(h, 10)
    token = await h.token("nina", "caster")
    customer = await save_card(h, fake, token)
    await cast_ok(h, token, FLAT)
    store = billing_of(h).store

    async def pending() -> bool:
        return bool(await store.pending_summary("nina"))

    await until(pending)
    clock.advance(40 * 24 * 3600)  # the month has ended: carried to the next invoice
    billing = billing_of(h)
    assert await billing.settle_ended_periods() == 1
    [item] = fake.invoice_items.values()
    assert item["amount"] == 10 and item["customer"] == customer
    assert await billing.reconcile() == []
    item["amount"] = 12
    fake.invoice_items["ii_stray"] = {
        **item,
        "id": "ii_stray",
        "amount": 7,
        "metadata": {"charge_id": "account:nina:pending:1999-01:usd", "account_id": "nina"},
    }
    problems = await billing.reconcile()
    assert len(problems) == 2
    assert "is 12 usd" in problems[0]
    assert problems[1].startswith("account:nina:pending:1999-01:usd: Stripe invoice item ii_stray")


async def test_the_worker_reconciles_on_a_schedule(
    aiohttp_client: Any, settings: Settings, fake: FakeStripe, clock: FrozenClock
) -> None:
    scheduled = settings.model_copy(update={"billing_reconcile_interval": 1})
    app = create_app(scheduled, overrides=Overrides(sandbox=FakeSandbox(), clock=clock))
    client = await aiohttp_client(app)
    billing: BillingService = client.app[BILLING]

    async def ran() -> bool:
        return billing.last_reconcile is not None

    await until(ran)
    assert billing.last_reconcile is not None
    assert billing.last_reconcile[1] == []
    assert await reconcile_once(billing) == []
