"""Billing rules, pure: Stripe webhook signatures, the minimum-charge rule, idempotency keys,
event ordering and refund arithmetic. No I/O; money is integer minor units + ISO currency.

**The minimum-charge rule.** Stripe refuses charges below a per-currency minimum (USD 50 cents;
https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts). A settled cast adds a
*pending line* for its cost. Whenever an account's pending lines in one currency reach the
minimum together, all of them are collected by ONE off-session PaymentIntent, named after the
cast that completed the batch (idempotency key ``cast:{id}:charge``). Lines still below the
minimum when their month (UTC) has ended are put on the customer's next Stripe invoice as one
invoice item (``account:{id}:pending:{period}:{currency}``) — Stripe collects them with that
invoice (and itself carries an invoice below the minimum over to the customer's balance).
Nothing is ever dropped or rounded.

**Webhook signatures.** ``Stripe-Signature: t=<unix>,v1=<hex>[,v1=…][,v0=…]``; ``v1`` is
HMAC-SHA256(endpoint secret, ``"{t}.{raw body}"``). A delivery is accepted when any ``v1``
matches any configured secret (compared in constant time) and ``t`` is within the tolerance
(300 s) of now — https://docs.stripe.com/webhooks#verify-manually.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from app.domain.pricing import Usage
from app.domain.spells import Pricing

#: Stripe's minimum charge amount per currency, in minor units (lower-case ISO codes as Stripe
#: writes them). Currencies not listed use :data:`DEFAULT_MINIMUM_CENTS`.
MINIMUM_CHARGE_CENTS: Final[dict[str, int]] = {
    "usd": 50,
    "eur": 50,
    "gbp": 30,
    "aud": 50,
    "cad": 50,
    "chf": 50,
    "nzd": 50,
    "sgd": 50,
    "dkk": 250,
    "nok": 300,
    "sek": 300,
    "pln": 200,
    "czk": 1500,
    "huf": 17500,
    "hkd": 400,
    "mxn": 1000,
    "brl": 50,
    "inr": 50,
    "jpy": 50,
}
DEFAULT_MINIMUM_CENTS: Final = 50
SIGNATURE_TOLERANCE_SEC: Final = 300


def minimum_charge(currency: str) -> int:
    """The smallest amount Stripe charges in ``currency`` (minor units)."""
    return MINIMUM_CHARGE_CENTS.get(currency.lower(), DEFAULT_MINIMUM_CENTS)


@dataclass(frozen=True)
class ChargePlan:
    """What to do with an account's pending lines in one currency."""

    action: str  # "charge" (one PaymentIntent) | "invoice" (an invoice item) | "wait"
    amount_cents: int


def plan_collection(pending_cents: int, currency: str, *, period_ended: bool) -> ChargePlan:
    """The minimum-charge rule for ``pending_cents`` not yet collected (see the module doc)."""
    if pending_cents < 0:
        raise ValueError("pending amounts are never negative")
    if pending_cents == 0:
        return ChargePlan("wait", 0)
    if pending_cents >= minimum_charge(currency):
        return ChargePlan("charge", pending_cents)
    if period_ended:
        return ChargePlan("invoice", pending_cents)
    return ChargePlan("wait", pending_cents)


# ------------------------------------------------------------------------ idempotency keys


def charge_key(cast_id: str, attempt: int = 1) -> str:
    """The Stripe idempotency key of the charge a cast completed; a new attempt (after the
    customer fixed their payment method) needs a new key — Stripe replays a stored decline."""
    return f"cast:{cast_id}:charge" if attempt <= 1 else f"cast:{cast_id}:charge:{attempt}"


def refund_key(cast_id: str, n: int) -> str:
    return f"cast:{cast_id}:refund:{n}"


def customer_key(account_id: str) -> str:
    return f"account:{account_id}:customer"


def period_invoice_key(account_id: str, period: str, currency: str) -> str:
    return f"account:{account_id}:pending:{period}:{currency.lower()}"


def meter_identifier(cast_id: str, meter: str) -> str:
    """Stripe dedupes meter events on ``identifier`` (≤ 100 characters)."""
    return f"{cast_id}:{meter}"


# ------------------------------------------------------------------------ webhook signatures


class SignatureError(Exception):
    """The ``Stripe-Signature`` header is missing, malformed, stale or does not match.

    The reason never contains a secret, an expected digest or the header's value.
    """


_HEX64: Final = re.compile(r"[0-9a-fA-F]{64}")


def stripe_signature(body: bytes, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` header Stripe sends for ``body`` at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_stripe_signature(
    body: bytes,
    *,
    header: str | None,
    secrets: Sequence[str],
    now: int,
    tolerance: int = SIGNATURE_TOLERANCE_SEC,
) -> int:
    """Check a delivery's ``Stripe-Signature`` over the exact raw ``body``; returns ``t``.

    Several secrets are accepted while one is rotated. Raises :class:`SignatureError`;
    ``ValueError`` when no secret is configured (an empty one would accept anyone).
    """
    keys = [s.encode() for s in secrets if s]
    if not keys:
        raise ValueError("a non-empty Stripe webhook secret is required to verify deliveries")
    if header is None or not header.strip():
        raise SignatureError("missing Stripe-Signature header")
    timestamp: int | None = None
    candidates: list[bytes] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            if not value.isdigit() or len(value) > 12:
                raise SignatureError("malformed Stripe-Signature header: bad timestamp")
            timestamp = int(value)
        elif name == "v1" and _HEX64.fullmatch(value):
            candidates.append(bytes.fromhex(value))
    if timestamp is None:
        raise SignatureError("malformed Stripe-Signature header: no timestamp")
    if not candidates:
        raise SignatureError("no v1 signature in the Stripe-Signature header")
    signed = f"{timestamp}.".encode() + body
    matched = False
    for key in keys:  # every secret and signature is checked: timing does not tell which
        expected = hmac.new(key, signed, hashlib.sha256).digest()
        for candidate in candidates:
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("signature does not match the payload")
    if abs(now - timestamp) > tolerance:
        raise SignatureError(f"timestamp outside the tolerance of {tolerance} s (replayed?)")
    return timestamp


# ------------------------------------------------------------------------ event ordering

#: how final a PaymentIntent status is: an event never moves a charge to a less final state
PAYMENT_STATE_RANK: Final[dict[str, int]] = {
    "pending": 0,
    "requires_action": 1,
    "failed": 2,
    "succeeded": 3,
}


def should_apply(
    *, last_created: int | None, incoming_created: int, current: str, incoming: str
) -> bool:
    """Whether a webhook about an object changes our record of it.

    Events may arrive late, twice and out of order: an event older than the last one applied to
    the object is stale; at the same second (Stripe's ``created`` has one-second resolution)
    the more final state wins, so ``payment_failed`` never overwrites ``succeeded``.
    """
    if last_created is not None and incoming_created < last_created:
        return False
    if last_created is not None and incoming_created == last_created:
        return PAYMENT_STATE_RANK.get(incoming, 0) >= PAYMENT_STATE_RANK.get(current, 0)
    return not (current == "succeeded" and incoming != "succeeded")


# ------------------------------------------------------------------------ refunds


def refundable_cents(cost_cents: int, refunded_cents: int) -> int:
    return max(0, cost_cents - refunded_cents)


def refund_amount(cost_cents: int, refunded_cents: int, requested: int | None) -> int:
    """How much to refund: all that is left, or ``requested`` when it fits; ValueError else."""
    left = refundable_cents(cost_cents, refunded_cents)
    if left == 0:
        raise ValueError("nothing left to refund on this cast")
    if requested is None:
        return left
    if requested <= 0:
        raise ValueError("a refund amount must be a positive number of cents")
    if requested > left:
        raise ValueError(f"only {left} cents of this cast can still be refunded")
    return requested


# ------------------------------------------------------------------------ metered usage

#: the platform's Billing Meters: meter name → Stripe ``event_name`` (SPEC §7)
METERS: Final[dict[str, str]] = {
    "casts": "spell_casts",
    "compute_ms": "spell_compute_ms",
    "egress_mb": "spell_egress_mb",
}


def meter_quantities(pricing: Pricing, usage: Usage) -> dict[str, int] | None:
    """What a metered cast reports to a metered subscription: one quantity per meter the spell
    declares, clamped at the meter's ``max`` like its cost; zero quantities are left out.
    ``None`` for spells that are not metered."""
    if pricing.model != "metered" or pricing.meters is None:
        return None
    m = pricing.meters
    measured = {"casts": 1, "compute_ms": usage.compute_ms, "egress_mb": usage.egress_mb}
    out: dict[str, int] = {}
    declared = {"casts": m.casts, "compute_ms": m.compute_ms, "egress_mb": m.egress_mb}
    for name, meter in declared.items():
        if meter is not None and min(measured[name], meter.max) > 0:
            out[name] = min(measured[name], meter.max)
    return out


def minute_floor(ts: int) -> int:
    """Meter event summaries take minute-aligned bounds."""
    return ts - ts % 60


# ------------------------------------------------------------------------ SLA


def sla_breached(max_duration_sec: int | None, duration_sec: float) -> bool:
    """A succeeded cast broke its spell's declared SLA: it took longer, from acceptance to
    completion, than ``sla.max_duration_sec``."""
    return max_duration_sec is not None and duration_sec > max_duration_sec


SLA_REFUND_REASON: Final = "sla_violation"


# ------------------------------------------------------------------------ plans


@dataclass(frozen=True)
class Plan:
    """A subscription plan (``SPELL_STRIPE_PLANS``): an optional licensed base price (quantity
    1) and the metered prices attached to the platform's meters."""

    name: str
    base_price: str | None
    metered_prices: tuple[str, ...]

    def line_items(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        if self.base_price:
            items.append({"price": self.base_price, "quantity": 1})
        items += [{"price": p} for p in self.metered_prices]  # metered: no quantity
        return items


_PLAN_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_PRICE_ID: Final = re.compile(r"price_[A-Za-z0-9_]{1,120}")


def parse_plans(raw: str | None) -> dict[str, Plan]:
    """``SPELL_STRIPE_PLANS``: JSON ``{"PLAN": {"base": "price_…", "metered": ["price_…"]}}``.
    Raises ValueError on anything else (checked when the settings load)."""
    if raw is None or not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise ValueError("SPELL_STRIPE_PLANS must be a JSON object") from None
    if not isinstance(data, dict):
        raise ValueError("SPELL_STRIPE_PLANS must be a JSON object of plans")
    plans: dict[str, Plan] = {}
    for name, spec in data.items():
        if not isinstance(name, str) or not _PLAN_NAME.fullmatch(name):
            raise ValueError(f"plan name {name!r}: lower-case letters, digits, - and _")
        if not isinstance(spec, dict) or set(spec) - {"base", "metered"}:
            raise ValueError(f"plan {name}: an object with `base` and/or `metered`")
        base = spec.get("base")
        metered = spec.get("metered", [])
        if base is not None and (not isinstance(base, str) or not _PRICE_ID.fullmatch(base)):
            raise ValueError(f"plan {name}: `base` must be a Stripe price id (price_…)")
        if not isinstance(metered, list) or not all(
            isinstance(p, str) and _PRICE_ID.fullmatch(p) for p in metered
        ):
            raise ValueError(f"plan {name}: `metered` must be a list of Stripe price ids")
        if base is None and not metered:
            raise ValueError(f"plan {name}: give a `base` price, `metered` prices or both")
        plans[name] = Plan(name, base, tuple(metered))
    return plans
