"""Estimates and actual costs from a spell's pricing model. Integer cents only, never floats."""

from __future__ import annotations

from dataclasses import dataclass

from app.domain.spells import Meter, Pricing


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _meter_cost(meter: Meter, units: int) -> int:
    return _ceil_div(min(units, meter.max) * meter.unit_cents, meter.per)


@dataclass(frozen=True)
class Usage:
    """What one run used, as measured by the runner."""

    compute_ms: int = 0
    egress_bytes: int = 0

    @property
    def egress_mb(self) -> int:
        return _ceil_div(self.egress_bytes, 1024 * 1024)


def estimate_cents(pricing: Pricing) -> int:
    """The most one cast can cost: what the cap must have room for before anything runs."""
    if pricing.model == "flat":
        return pricing.flat_cents or 0
    if pricing.model == "one_time":
        return pricing.one_time_cents or 0
    total = pricing.base_cents or 0
    m = pricing.meters
    assert m is not None
    for meter in (m.casts, m.compute_ms, m.egress_mb):
        if meter is not None:
            total += _meter_cost(meter, meter.max)
    return total


def actual_cents(pricing: Pricing, usage: Usage) -> int:
    """The cost of a finished run; never above :func:`estimate_cents` (meters are clamped)."""
    if pricing.model != "metered":
        return estimate_cents(pricing)
    m = pricing.meters
    assert m is not None
    total = pricing.base_cents or 0
    if m.casts is not None:
        total += _meter_cost(m.casts, 1)
    if m.compute_ms is not None:
        total += _meter_cost(m.compute_ms, usage.compute_ms)
    if m.egress_mb is not None:
        total += _meter_cost(m.egress_mb, usage.egress_mb)
    return min(total, estimate_cents(pricing))
