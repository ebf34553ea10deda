"""The Stripe gateway against a fake Stripe that enforces Stripe's official OpenAPI contract —
and the fake itself: it must refuse what Stripe refuses, or the other tests prove nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from app.billing.stripe_client import STRIPE_API_VERSION, StripeClient
from app.errors import AppError
from tests.contract.fake_stripe import API_KEY, FakeStripe, stripe_contract


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripe]:
    f = FakeStripe(contract=stripe_contract())
    async with f.serve():
        yield f


@pytest.fixture
async def client(fake: FakeStripe) -> AsyncIterator[StripeClient]:
    c = StripeClient(API_KEY, base_url=fake.url, retry_delay=0.01)
    yield c
    await c.aclose()
    assert fake.violations == []


async def customer_with(fake: FakeStripe, client: StripeClient, method: str) -> tuple[str, str]:
    cus = await client.create_customer("acct-1", idempotency_key="account:acct-1:customer")
    return cus["id"], fake.attach_payment_method(cus["id"], method)


async def charge(client: StripeClient, cus: str, pm: str, key: str, amount: int = 60) -> dict:
    return await client.charge_off_session(
        amount=amount,
        currency="USD",
        customer=cus,
        payment_method=pm,
        idempotency_key=key,
        description="casts",
        metadata={"charge_id": key},
    )


# --------------------------------------------------------------------------- the contract


def test_the_pinned_api_version_is_the_contracts_version() -> None:
    assert stripe_contract().doc["info"]["version"] == STRIPE_API_VERSION


async def test_every_request_is_authenticated_versioned_and_keyed(
    fake: FakeStripe, client: StripeClient
) -> None:
    cus, pm = await customer_with(fake, client, "pm_card_visa")
    await charge(client, cus, pm, "cast:c_1:charge")
    assert fake.auth_failures == []
    assert set(fake.versions) == {STRIPE_API_VERSION}
    posts = [r for r in fake.requests if r.method == "POST"]
    assert [r.idempotency_key for r in posts] == ["account:acct-1:customer", "cast:c_1:charge"]
    assert all(r.headers["Authorization"] == "[redacted]" for r in fake.requests)
    pi = fake.requests_for("PostPaymentIntents")[0].params
    assert pi["confirm"] is True and pi["off_session"] is True and pi["amount"] == 60
    assert pi["currency"] == "usd"
    assert pi["metadata"] == {"charge_id": "cast:c_1:charge"}


@pytest.mark.parametrize(
    ("params", "code"),
    [
        pytest.param(
            {"amount": "60", "currency": "usd", "colour": "red"},
            "parameter_unknown",
            id="unknown-top-level",
        ),
        pytest.param(
            {
                "amount": "60",
                "currency": "usd",
                "automatic_payment_methods": {"enabled": "true", "x": "1"},
            },
            "parameter_unknown",
            id="unknown-nested",
        ),
        pytest.param(
            {"amount": "sixty", "currency": "usd"}, "parameter_invalid_integer", id="not-an-integer"
        ),
        pytest.param(
            {"amount": "60", "currency": "usd", "confirm": "yes"},
            "parameter_invalid_boolean",
            id="not-a-boolean",
        ),
        pytest.param(
            {"amount": "60", "currency": "usd", "capture_method": "later"},
            "parameter_invalid",
            id="not-in-enum",
        ),
        pytest.param({"currency": "usd"}, "parameter_missing", id="missing-amount"),
    ],
)
async def test_the_fake_refuses_what_the_contract_refuses(
    fake: FakeStripe, params: dict[str, object], code: str
) -> None:
    c = StripeClient(API_KEY, base_url=fake.url)
    try:
        with pytest.raises(AppError) as err:
            await c.request("POST", "/v1/payment_intents", params, idempotency_key="k1")
    finally:
        await c.aclose()
    assert err.value.code == "INTERNAL"
    assert err.value.detail is not None and err.value.detail["stripe_code"] == code
    assert err.value.detail["stripe_request_id"].startswith("req_")
    assert len(fake.violations) == 1 and code in fake.violations[0]


async def test_the_fake_refuses_unknown_paths_and_missing_keys(fake: FakeStripe) -> None:
    async with aiohttp.ClientSession() as http:
        r = await http.post(fake.url + "/v1/payment_intents", data={"amount": "60"})
        assert r.status == 401
        r = await http.post(
            fake.url + "/v1/spells",
            headers={"Authorization": f"Bearer {API_KEY}", "Stripe-Version": STRIPE_API_VERSION},
        )
        assert r.status == 404
    assert fake.auth_failures and any("no operation" in v for v in fake.violations)


async def test_a_wrong_key_is_unavailable_and_never_echoed(fake: FakeStripe) -> None:
    secret = "sk_test_wrongwrongwrongwrong1234"
    c = StripeClient(secret, base_url=fake.url)
    try:
        with pytest.raises(AppError) as err:
            await c.retrieve_customer("cus_1")
    finally:
        await c.aclose()
    assert err.value.code == "UNAVAILABLE"
    assert secret not in str(err.value.to_body())
    assert secret not in repr(c)


# --------------------------------------------------------------------------- idempotency


async def test_the_same_key_and_parameters_replay_the_first_answer(
    fake: FakeStripe, client: StripeClient
) -> None:
    cus, pm = await customer_with(fake, client, "pm_card_visa")
    first = await charge(client, cus, pm, "cast:c_1:charge")
    again = await charge(client, cus, pm, "cast:c_1:charge")
    assert first == again
    assert len(fake.payment_intents) == 1
    assert [r.replayed for r in fake.requests_for("PostPaymentIntents")] == [False, True]


async def test_the_same_key_with_other_parameters_is_a_conflict(
    fake: FakeStripe, client: StripeClient
) -> None:
    cus, pm = await customer_with(fake, client, "pm_card_visa")
    await charge(client, cus, pm, "cast:c_1:charge", amount=60)
    with pytest.raises(AppError) as err:
        await charge(client, cus, pm, "cast:c_1:charge", amount=70)
    assert err.value.code == "IDEMPOTENCY_CONFLICT"
    assert len(fake.payment_intents) == 1


async def test_concurrent_requests_with_one_key_make_one_payment(
    fake: FakeStripe, client: StripeClient
) -> None:
    cus, pm = await customer_with(fake, client, "pm_card_visa")
    got = await asyncio.gather(*(charge(client, cus, pm, "cast:c_9:charge") for _ in range(10)))
    assert len({g["id"] for g in got}) == 1
    assert len(fake.payment_intents) == 1 and len(fake.charges) == 1


async def test_transient_failures_are_retried_with_the_same_key(
    fake: FakeStripe, client: StripeClient
) -> None:
    cus, pm = await customer_with(fake, client, "pm_card_visa")
    fake.fail_next("PostPaymentIntents", 500, "An unknown error occurred")
    pi = await charge(client, cus, pm, "cast:c_2:charge")
    keys = [r.idempotency_key for r in fake.requests_for("PostPaymentIntents")]
    assert keys == ["cast:c_2:charge", "cast:c_2:charge"]
    assert pi["status"] == "succeeded" and len(fake.payment_intents) == 1


def test_a_mutation_without_a_key_is_refused_before_it_is_sent() -> None:
    c = StripeClient(API_KEY, base_url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="idempotency key"):
        asyncio.run(c.request("POST", "/v1/customers", {}))


# --------------------------------------------------------------------------- payments


@pytest.mark.parametrize(
    ("method", "code", "decline"),
    [
        pytest.param("pm_card_chargeDeclined", "card_declined", "card_declined", id="declined"),
        pytest.param(
            "pm_card_authenticationRequired",
            "authentication_required",
            "authentication_required",
            id="authentication-required",
        ),
    ],
)
async def test_a_refused_payment_is_payment_failed_with_stripes_reasons(
    fake: FakeStripe, client: StripeClient, method: str, code: str, decline: str
) -> None:
    cus, pm = await customer_with(fake, client, method)
    with pytest.raises(AppError) as err:
        await charge(client, cus, pm, "cast:c_3:charge")
    assert err.value.code == "PAYMENT_FAILED" and err.value.status == 402
    detail = err.value.detail or {}
    assert detail["stripe_code"] == code and detail["stripe_decline_code"] == decline
    assert detail["payment_intent"] in fake.payment_intents
    assert fake.payment_intents[detail["payment_intent"]]["status"] == "requires_payment_method"
    # Stripe stores the decline under the key: the same key answers the same decline
    with pytest.raises(AppError):
        await charge(client, cus, pm, "cast:c_3:charge")
    assert len(fake.payment_intents) == 1


async def test_amounts_below_the_minimum_are_refused_by_stripe(
    fake: FakeStripe, client: StripeClient
) -> None:
    cus, pm = await customer_with(fake, client, "pm_card_visa")
    with pytest.raises(AppError) as err:
        await charge(client, cus, pm, "cast:c_4:charge", amount=49)
    assert (err.value.detail or {})["stripe_code"] == "amount_too_small"


async def test_refunds_are_idempotent_and_never_exceed_the_charge(
    fake: FakeStripe, client: StripeClient
) -> None:
    cus, pm = await customer_with(fake, client, "pm_card_visa")
    pi = await charge(client, cus, pm, "cast:c_5:charge", amount=100)
    meta = {"cast_id": "c_5"}
    r1 = await client.refund(
        payment_intent=pi["id"], amount=40, idempotency_key="r1", metadata=meta
    )
    assert r1 == await client.refund(
        payment_intent=pi["id"], amount=40, idempotency_key="r1", metadata=meta
    )
    await client.refund(payment_intent=pi["id"], amount=60, idempotency_key="r2", metadata=meta)
    with pytest.raises(AppError):
        await client.refund(payment_intent=pi["id"], amount=1, idempotency_key="r3", metadata=meta)
    assert sum(r["amount"] for r in await client.list_refunds(pi["id"])) == 100
    assert [e["data"]["object"]["amount_refunded"] for e in fake.events_of("charge.refunded")] == [
        40,
        100,
    ]


async def test_meter_events_are_deduplicated_on_their_identifier(
    fake: FakeStripe, client: StripeClient
) -> None:
    cus, _ = await customer_with(fake, client, "pm_card_visa")
    await client.create_meter(
        event_name="compute_ms", display_name="Compute", idempotency_key="meter:compute_ms"
    )
    await client.meter_event(
        event_name="compute_ms",
        customer=cus,
        value=1500,
        identifier="c_6:compute_ms",
        timestamp=fake.now(),
    )
    # the same identifier under another idempotency key: Stripe counts it once
    await client.request(
        "POST",
        "/v1/billing/meter_events",
        {
            "event_name": "compute_ms",
            "identifier": "c_6:compute_ms",
            "payload": {"stripe_customer_id": cus, "value": "1500"},
        },
        idempotency_key="another-key",
    )
    assert fake.meter_total("compute_ms", cus) == 1500
    assert fake.duplicate_meter_events == 1
    assert [m["event_name"] for m in await client.list_meters()] == ["compute_ms"]
