"""Stripe webhook deliveries, sans-I/O: verify the signature over the raw body, then parse.

The order is the caller's job, as for GitHub (:mod:`app.github.webhooks`)::

    verify_stripe_signature(raw, header=..., secrets=..., now=...)   # raw bytes, constant time
    envelope = parse_envelope(raw)                                    # only after verification
    ... store the raw event in the inbox (deduplicated by its id), answer 200 ...

Stripe's docs: https://docs.stripe.com/webhooks#verify-manually (signatures, 300 s tolerance)
and https://docs.stripe.com/webhooks#handle-duplicate-events (events come more than once and
in any order).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from app.domain.billing import SignatureError, verify_stripe_signature

__all__ = ["BadEvent", "Envelope", "SignatureError", "parse_envelope", "verify_stripe_signature"]

SIGNATURE_HEADER: Final = "Stripe-Signature"
_EVENT_ID: Final = re.compile(r"evt_[A-Za-z0-9]{1,75}")
_TYPE: Final = re.compile(r"[a-z_]+(\.[a-z_]+){1,4}")


class BadEvent(Exception):
    """A verified body that is not a Stripe event."""


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    type: str
    created: int
    livemode: bool


def parse_envelope(body: bytes) -> Envelope:
    """The event's id, type and time; everything else is read by the handlers later."""
    try:
        event = json.loads(body)
    except ValueError:
        raise BadEvent("the body is not JSON") from None
    if not isinstance(event, dict) or event.get("object") != "event":
        raise BadEvent("not a Stripe event object")
    event_id, etype, created = event.get("id"), event.get("type"), event.get("created")
    if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        raise BadEvent("missing or malformed event id")
    if not isinstance(etype, str) or not _TYPE.fullmatch(etype):
        raise BadEvent("missing or malformed event type")
    if not isinstance(created, int) or isinstance(created, bool) or created < 0:
        raise BadEvent("missing or malformed created time")
    if not isinstance(event.get("data"), dict):
        raise BadEvent("missing data")
    return Envelope(event_id, etype, created, bool(event.get("livemode")))
