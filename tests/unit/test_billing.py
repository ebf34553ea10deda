"""Billing's pure logic: Stripe signatures, the minimum-charge rule, event ordering, refunds,
form encoding and error mapping."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from app.billing.stripe_client import (
    StripeResponse,
    encode_form,
    error_from_response,
    is_transient,
)
from app.billing.webhooks import BadEvent, parse_envelope
from app.domain.billing import (
    SignatureError,
    charge_key,
    minimum_charge,
    plan_collection,
    refund_amount,
    should_apply,
    stripe_signature,
    verify_stripe_signature,
)

SECRET = "whsec_test_secret"
BODY = b'{"id": "evt_1", "object": "event"}'
NOW = 1_800_000_000


def header_for(body: bytes, secret: str, t: int) -> str:
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


# ---------------------------------------------------------------------------- signatures


def test_a_signature_made_as_stripe_makes_it_is_accepted() -> None:
    header = header_for(BODY, SECRET, NOW)
    assert stripe_signature(BODY, SECRET, NOW) == header
    assert verify_stripe_signature(BODY, header=header, secrets=[SECRET], now=NOW + 10) == NOW


def test_any_of_several_secrets_and_signatures_may_match() -> None:
    good = header_for(BODY, "whsec_new", NOW).split(",")[1]
    header = f"t={NOW},v1={'0' * 64},{good},v0=deadbeef"
    assert verify_stripe_signature(BODY, header=header, secrets=["whsec_old", "whsec_new"], now=NOW)


@pytest.mark.parametrize(
    ("header", "now", "reason"),
    [
        pytest.param(None, NOW, "missing", id="missing"),
        pytest.param("", NOW, "missing", id="empty"),
        pytest.param("v1=" + "a" * 64, NOW, "no timestamp", id="no-timestamp"),
        pytest.param(f"t={NOW}", NOW, "no v1", id="no-v1"),
        pytest.param(f"t=abc,v1={'a' * 64}", NOW, "bad timestamp", id="bad-timestamp"),
        pytest.param(
            header_for(BODY, "whsec_other", NOW), NOW, "does not match", id="other-secret"
        ),
        pytest.param(header_for(BODY + b" ", SECRET, NOW), NOW, "does not match", id="other-body"),
        pytest.param(header_for(BODY, SECRET, NOW), NOW + 301, "tolerance", id="stale"),
        pytest.param(header_for(BODY, SECRET, NOW), NOW - 301, "tolerance", id="from-the-future"),
    ],
)
def test_bad_signatures_are_refused_with_a_reason(
    header: str | None, now: int, reason: str
) -> None:
    with pytest.raises(SignatureError, match=reason) as err:
        verify_stripe_signature(BODY, header=header, secrets=[SECRET], now=now)
    assert SECRET not in str(err.value)


def test_the_tolerance_boundary_is_inclusive() -> None:
    header = header_for(BODY, SECRET, NOW)
    assert verify_stripe_signature(BODY, header=header, secrets=[SECRET], now=NOW + 300)


def test_an_empty_secret_is_a_configuration_error_not_an_open_door() -> None:
    with pytest.raises(ValueError):
        verify_stripe_signature(BODY, header=header_for(BODY, "", NOW), secrets=[""], now=NOW)


# ---------------------------------------------------------------------------- the minimum rule


@pytest.mark.parametrize(
    ("pending", "currency", "ended", "action"),
    [
        pytest.param(0, "USD", False, "wait", id="nothing"),
        pytest.param(49, "USD", False, "wait", id="below-min"),
        pytest.param(50, "USD", False, "charge", id="at-min"),
        pytest.param(51, "usd", False, "charge", id="above-min-lowercase"),
        pytest.param(49, "USD", True, "invoice", id="below-min-period-ended"),
        pytest.param(29, "GBP", False, "wait", id="gbp-below-30"),
        pytest.param(30, "GBP", False, "charge", id="gbp-30"),
        pytest.param(50, "XYZ", False, "charge", id="unknown-currency-default-50"),
    ],
)
def test_pending_amounts_are_charged_once_they_reach_the_minimum(
    pending: int, currency: str, ended: bool, action: str
) -> None:
    plan = plan_collection(pending, currency, period_ended=ended)
    assert plan.action == action
    assert plan.amount_cents == pending


def test_usd_minimum_is_fifty_cents() -> None:
    assert minimum_charge("USD") == minimum_charge("usd") == 50


def test_negative_pending_amounts_are_a_bug() -> None:
    with pytest.raises(ValueError):
        plan_collection(-1, "USD", period_ended=False)


def test_a_new_attempt_gets_a_new_idempotency_key() -> None:
    assert charge_key("c_1") == "cast:c_1:charge"
    assert charge_key("c_1", 2) == "cast:c_1:charge:2"


# ---------------------------------------------------------------------------- event ordering


@pytest.mark.parametrize(
    ("last", "incoming_created", "current", "incoming", "apply"),
    [
        pytest.param(None, 10, "pending", "succeeded", True, id="first-event"),
        pytest.param(20, 10, "succeeded", "failed", False, id="older-failure-after-success"),
        pytest.param(10, 20, "failed", "succeeded", True, id="newer-success"),
        pytest.param(10, 10, "succeeded", "failed", False, id="same-second-less-final"),
        pytest.param(10, 10, "failed", "succeeded", True, id="same-second-more-final"),
        pytest.param(10, 20, "succeeded", "failed", False, id="success-is-final"),
    ],
)
def test_events_never_move_a_charge_backwards(
    last: int | None, incoming_created: int, current: str, incoming: str, apply: bool
) -> None:
    assert (
        should_apply(
            last_created=last, incoming_created=incoming_created, current=current, incoming=incoming
        )
        is apply
    )


# ---------------------------------------------------------------------------- refunds


def test_refunds_never_exceed_what_was_charged() -> None:
    assert refund_amount(100, 0, None) == 100
    assert refund_amount(100, 30, None) == 70
    assert refund_amount(100, 30, 70) == 70
    with pytest.raises(ValueError, match="only 70"):
        refund_amount(100, 30, 71)
    with pytest.raises(ValueError, match="nothing left"):
        refund_amount(100, 100, None)
    with pytest.raises(ValueError, match="positive"):
        refund_amount(100, 0, 0)


# ---------------------------------------------------------------------------- form encoding


def test_parameters_are_encoded_in_stripes_bracket_notation() -> None:
    form = encode_form(
        {
            "amount": 60,
            "confirm": True,
            "off_session": True,
            "metadata": {"cast_id": "c_1"},
            "expand": ["latest_charge"],
            "line_items": [{"price": "price_1", "quantity": 2}],
            "description": None,
        }
    )
    assert form == [
        ("amount", "60"),
        ("confirm", "true"),
        ("off_session", "true"),
        ("metadata[cast_id]", "c_1"),
        ("expand[0]", "latest_charge"),
        ("line_items[0][price]", "price_1"),
        ("line_items[0][quantity]", "2"),
    ]


def test_floats_are_refused_for_money() -> None:
    with pytest.raises(TypeError, match="never floats"):
        encode_form({"amount": 0.5})


# ---------------------------------------------------------------------------- error mapping


def resp(status: int, error: dict[str, object], retry: bool | None = None) -> StripeResponse:
    return StripeResponse(status, {"error": error}, "req_123", retry)


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        pytest.param(
            402,
            {"type": "card_error", "code": "card_declined", "decline_code": "generic_decline"},
            "PAYMENT_FAILED",
            id="decline",
        ),
        pytest.param(400, {"type": "idempotency_error"}, "IDEMPOTENCY_CONFLICT", id="idem"),
        pytest.param(404, {"code": "resource_missing"}, "NOT_FOUND", id="missing"),
        pytest.param(429, {"type": "invalid_request_error"}, "UNAVAILABLE", id="rate-limited"),
        pytest.param(401, {"type": "invalid_request_error"}, "UNAVAILABLE", id="bad-key"),
        pytest.param(500, {"type": "api_error"}, "UNAVAILABLE", id="stripe-down"),
        pytest.param(400, {"code": "parameter_unknown"}, "INTERNAL", id="our-bug"),
    ],
)
def test_stripe_errors_map_to_platform_errors_with_the_request_id(
    status: int, error: dict[str, object], code: str
) -> None:
    err = error_from_response(resp(status, error))
    assert err.code == code
    assert err.detail is not None and err.detail["stripe_request_id"] == "req_123"


def test_decline_details_are_kept() -> None:
    err = error_from_response(
        resp(402, {"type": "card_error", "code": "card_declined", "decline_code": "x"})
    )
    assert err.detail is not None
    assert (err.detail["stripe_code"], err.detail["stripe_decline_code"]) == ("card_declined", "x")


def test_stripes_retry_advice_wins_over_the_status() -> None:
    assert is_transient(resp(500, {}))
    assert is_transient(resp(409, {}))
    assert not is_transient(resp(500, {}, retry=False))
    assert is_transient(resp(400, {}, retry=True))
    assert not is_transient(resp(402, {}))


# ---------------------------------------------------------------------------- envelopes


def test_a_verified_body_is_parsed_into_its_envelope() -> None:
    body = json.dumps(
        {"id": "evt_1Abc", "object": "event", "type": "invoice.paid", "created": 5, "data": {}}
    ).encode()
    env = parse_envelope(body)
    assert (env.id, env.type, env.created, env.livemode) == ("evt_1Abc", "invoice.paid", 5, False)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[]", id="not-object"),
        pytest.param(b'{"object": "charge"}', id="not-an-event"),
        pytest.param(
            b'{"object": "event", "id": "x", "type": "a.b", "created": 1, "data": {}}', id="bad-id"
        ),
        pytest.param(
            b'{"object": "event", "id": "evt_1", "type": "A", "created": 1, "data": {}}',
            id="bad-type",
        ),
        pytest.param(
            b'{"object": "event", "id": "evt_1", "type": "a.b", "created": true, "data": {}}',
            id="bad-created",
        ),
    ],
)
def test_malformed_events_are_refused(body: bytes) -> None:
    with pytest.raises(BadEvent):
        parse_envelope(body)
