"""Metered billing rules, pure: meter quantities, SLA breaches, plans."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from app.config import Settings
from app.domain.billing import (
    METERS,
    Plan,
    meter_identifier,
    meter_quantities,
    minute_floor,
    parse_plans,
    sla_breached,
)
from app.domain.pricing import Usage, actual_cents
from app.domain.spells import Pricing


def metered(**meters: dict[str, int]) -> Pricing:
    return Pricing.model_validate(
        {"model": "metered", "currency": "USD", "base_cents": 1, "meters": meters}
    )


def test_quantities_cover_only_the_declared_meters_clamped_like_the_cost() -> None:
    pricing = metered(
        casts={"unit_cents": 5, "max": 1},
        compute_ms={"unit_cents": 1, "per": 100, "max": 1000},
    )
    used = Usage(compute_ms=2500, egress_bytes=5 * 1024 * 1024)
    assert meter_quantities(pricing, used) == {"casts": 1, "compute_ms": 1000}
    # the cost is computed from the same clamped quantities: 1 + 5 + ceil(1000 / 100)
    assert actual_cents(pricing, used) == 16
    egress = metered(egress_mb={"unit_cents": 2, "max": 10})
    assert meter_quantities(egress, Usage(egress_bytes=1)) == {"egress_mb": 1}
    assert meter_quantities(egress, Usage(egress_bytes=0)) == {}


def test_flat_and_one_time_spells_have_no_meter_quantities() -> None:
    flat = Pricing.model_validate({"model": "flat", "flat_cents": 5})
    once = Pricing.model_validate({"model": "one_time", "one_time_cents": 500})
    assert meter_quantities(flat, Usage(compute_ms=10)) is None
    assert meter_quantities(once, Usage(compute_ms=10)) is None


def test_meter_event_identifiers_and_names() -> None:
    assert meter_identifier("c_abc", "compute_ms") == "c_abc:compute_ms"
    assert set(METERS) == {"casts", "compute_ms", "egress_mb"}
    assert all(len(name) <= 100 for name in METERS.values())
    assert len(meter_identifier("c_" + "f" * 24, "compute_ms")) <= 100  # Stripe's limit


def test_minute_floor_aligns_summary_bounds() -> None:
    assert minute_floor(1_700_000_039) == 1_700_000_040 - 60
    assert minute_floor(120) == 120


@pytest.mark.parametrize(
    ("limit", "took", "breached"),
    [(None, 10_000.0, False), (5, 5.0, False), (5, 5.001, True), (1, 0.5, False)],
)
def test_sla_breach_is_strictly_longer_than_declared(
    limit: int | None, took: float, breached: bool
) -> None:
    assert sla_breached(limit, took) is breached


def test_plans_parse_to_checkout_line_items() -> None:
    plans = parse_plans(json.dumps({"pro": {"base": "price_A", "metered": ["price_B"]}}))
    assert plans == {"pro": Plan("pro", "price_A", ("price_B",))}
    assert plans["pro"].line_items() == [
        {"price": "price_A", "quantity": 1},
        {"price": "price_B"},
    ]
    assert parse_plans(None) == {} and parse_plans("  ") == {}
    only_metered = parse_plans('{"usage": {"metered": ["price_X", "price_Y"]}}')["usage"]
    assert only_metered.line_items() == [{"price": "price_X"}, {"price": "price_Y"}]


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        '{"Pro": {"base": "price_A"}}',
        '{"pro": {"base": "prod_A"}}',
        '{"pro": {"metered": "price_A"}}',
        '{"pro": {}}',
        '{"pro": {"base": "price_A", "extra": 1}}',
    ],
)
def test_bad_plans_are_refused(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_plans(raw)


def test_bad_plans_stop_the_settings_from_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPELL_STRIPE_PLANS", '{"pro": {"base": "nope"}}')
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("SPELL_STRIPE_PLANS", '{"pro": {"base": "price_1"}}')
    assert Settings().plans()["pro"].base_price == "price_1"
