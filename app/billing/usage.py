"""``POST /v1/billing/usage``: usage reported by hand for metered subscriptions (SPEC §5, §7).

Usage that a cast does not measure itself (work a spell did elsewhere, a correction) is
reported here in the meters' units. It is recorded in the ledger (``billing_usage``, one row per
meter, in the same transaction as the Idempotency-Key) and, with Stripe billing on, sent as
Billing Meter events by a ``billing.meter`` job, off the request path, with ``identifier`` =
``{usage_id}:{meter}`` so Stripe counts each quantity once. Quantities are not cents: the
subscription's metered prices decide what they cost, and budget caps, which are in cents and
enforced before every cast, do not apply to them.

Who may report: the account itself (a caster token) or an operator for any account (``account``).
With Stripe billing the account must have a metered subscription (``spell plan subscribe``);
without it (ledger-only mode) the usage is only recorded.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.billing.service import BillingService
from app.domain.casts import request_hash
from app.errors import AppError
from app.services.platform import Platform, pydantic_error
from app.services.tokens import Caller
from app.store.billing_store import SUBSCRIBED, BillingStore
from app.store.hot import AuditRow
from app.store.ids import new_id
from app.store.models import AuditOutbox

#: Stripe accepts meter events up to 35 days old and 5 minutes ahead
MAX_AGE_SEC = 35 * 24 * 3600
MAX_AHEAD_SEC = 300


class UsageQuantities(BaseModel):
    model_config = ConfigDict(extra="forbid")

    casts: int | None = Field(default=None, ge=0, le=10**12)
    compute_ms: int | None = Field(default=None, ge=0, le=10**12)
    egress_mb: int | None = Field(default=None, ge=0, le=10**12)


class UsageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    usage: UsageQuantities
    account: str | None = Field(default=None, min_length=1, max_length=64)
    timestamp: int | None = Field(default=None, ge=0, description="Unix seconds; default now.")


async def record_usage(
    platform: Platform,
    billing: BillingService | None,
    caller: Caller,
    body: Any,
    *,
    idempotency_key: str,
) -> tuple[int, dict[str, Any], bool]:
    """Record (with Stripe: and queue the reporting of) manual usage.

    Returns ``(status, body, replayed)``."""
    if not (caller.is_operator or "cast:invoke" in caller.scopes):
        raise AppError("FORBIDDEN", "reporting usage needs a caster or operator token")
    if not isinstance(body, dict):
        raise AppError("VALIDATION_ERROR", "the request body must be a JSON object")
    ledger = platform.ledger
    rhash = request_hash("POST", "/v1/billing/usage", body)
    stored = await ledger.stored_response(caller.principal_id, idempotency_key, rhash)
    if stored is not None:
        return stored[0], stored[1], True
    try:
        req = UsageRequest.model_validate(body)
    except ValidationError as e:
        raise pydantic_error(e) from None
    quantities = {k: v for k, v in req.usage.model_dump().items() if v}
    if not quantities:
        raise AppError(
            "VALIDATION_ERROR",
            "give at least one positive quantity: casts, compute_ms or egress_mb",
            detail={"path": "/usage"},
        )
    account = req.account or caller.account_id
    if account != caller.account_id and not caller.is_operator:
        raise AppError("FORBIDDEN", "only an operator may report another account's usage")
    now = platform.clock.now()
    ts = req.timestamp if req.timestamp is not None else int(now.timestamp())
    if not now.timestamp() - MAX_AGE_SEC <= ts <= now.timestamp() + MAX_AHEAD_SEC:
        raise AppError(
            "VALIDATION_ERROR",
            "timestamp must be within the past 35 days (and at most 5 minutes ahead)",
            detail={"path": "/timestamp"},
        )
    if await ledger.budget(account) is None:
        raise AppError("NOT_FOUND", f"account {account!r} not found")
    store = billing.store if billing is not None else BillingStore(ledger, platform.clock)
    if billing is not None:
        row = await store.customer(account)
        if row is None or row.subscription_status not in SUBSCRIBED:
            raise AppError(
                "CONFLICT",
                f"account {account} has no metered subscription to report usage to; "
                "subscribe first with `spell plan subscribe PLAN`",
                detail={"account": account},
            )
    ref = new_id("u")
    report = billing is not None

    async def work(s: Any) -> tuple[int, dict[str, Any]]:
        rows = await store.record_usage(
            s, account_id=account, ref=ref, usage=quantities, timestamp=ts, report=report
        )
        # its audit record commits with it (the audit outbox), not after
        s.add(
            AuditOutbox.of(
                AuditRow(
                    event="billing.usage",
                    at=now,
                    actor=caller.principal_id,
                    data={"account": account, "usage_id": ref, "usage": quantities},
                )
            )
        )
        return 201, {
            "usage_id": ref,
            "account": account,
            "usage": quantities,
            "timestamp": ts,
            "identifiers": [r.identifier for r in rows],
            "status": "queued" if report else "recorded",
        }

    status, resp, replayed = await ledger.run_idempotent(
        caller.principal_id, idempotency_key, rhash, work
    )
    if not replayed:
        platform.kick_outbox()
        platform.kick_audit()
    return status, resp, replayed


__all__ = ["MAX_AGE_SEC", "UsageRequest", "record_usage"]
