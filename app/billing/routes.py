"""HTTP endpoints of billing: ``POST /webhooks/stripe``, ``GET /v1/billing``,
``POST /v1/billing/setup``, ``GET /v1/billing/plans``, ``POST /v1/billing/subscribe`` and
``POST /v1/billing/usage``. Added to the app by ``app.web.app`` when present."""

from __future__ import annotations

from aiohttp import web

from app.billing.service import BillingService
from app.billing.usage import record_usage
from app.billing.webhooks import (
    SIGNATURE_HEADER,
    BadEvent,
    SignatureError,
    parse_envelope,
    verify_stripe_signature,
)
from app.errors import AppError
from app.web.keys import INBOX, PLATFORM, RELAY, SETTINGS
from app.web.middlewares import require_caller
from app.web.routes import _json, idempotency_key, read_body, read_json

BILLING = web.AppKey("billing", BillingService)

billing_routes = web.RouteTableDef()


def _billing(request: web.Request) -> BillingService:
    billing = request.app.get(BILLING)
    if billing is None:
        raise AppError(
            "UNAVAILABLE",
            "Stripe billing is not configured (STRIPE_API_KEY); this server records amounts in "
            "the ledger only",
        )
    return billing


@billing_routes.post("/webhooks/stripe")
async def stripe_webhook(request: web.Request) -> web.Response:
    """Verify (over the raw bytes, 300 s tolerance), store raw, acknowledge. Handlers run
    from the jobs queue; a redelivered event is acknowledged again and changes nothing."""
    settings = request.app[SETTINGS]
    secrets = settings.stripe_webhook_secrets()
    if not secrets or BILLING not in request.app:
        raise AppError(
            "UNAVAILABLE",
            "Stripe webhooks are not configured (STRIPE_API_KEY, STRIPE_WEBHOOK_SECRET)",
        )
    body = await read_body(request, settings.max_webhook_bytes, "the event")
    now = int(request.app[PLATFORM].clock.now().timestamp())
    try:
        verify_stripe_signature(
            body, header=request.headers.get(SIGNATURE_HEADER), secrets=secrets, now=now
        )
    except SignatureError as e:
        raise AppError("UNAUTHORIZED", f"Stripe signature rejected: {e}") from None
    try:
        env = parse_envelope(body)
    except BadEvent as e:
        raise AppError("VALIDATION_ERROR", f"not a Stripe event: {e}") from None
    fresh = await request.app[INBOX].accept("stripe", env.id, env.type, body)
    if fresh:
        request.app[RELAY].kick()
    return web.json_response({"received": True, "event_id": env.id, "duplicate": not fresh})


@billing_routes.get("/v1/billing")
async def billing_overview(request: web.Request) -> web.Response:
    """The caller's billing: payment method, past-due state, pending amounts, charges, caps."""
    caller = require_caller(request)
    platform = request.app[PLATFORM]
    account = request.query.get("account")
    caps = await platform.get_caps(caller, account)  # also: only operators see others
    billing = request.app.get(BILLING)
    if billing is None:
        body = {"account": caps["account"], "mode": "ledger", "caps": caps}
    else:
        body = {**await billing.view(str(caps["account"])), "caps": caps}
    return web.json_response(body)


@billing_routes.post("/v1/billing/setup")
async def billing_setup(request: web.Request) -> web.Response:
    """A Stripe Checkout (setup mode) URL where the caller saves a payment method."""
    caller = require_caller(request)
    return web.json_response(await _billing(request).setup_session(caller), status=201)


@billing_routes.get("/v1/billing/plans")
async def billing_plans(request: web.Request) -> web.Response:
    """The subscription plans configured (``SPELL_STRIPE_PLANS``)."""
    require_caller(request)
    plans = _billing(request).config.plans
    return web.json_response(
        {
            "plans": [
                {
                    "name": p.name,
                    "base_price": p.base_price,
                    "metered_prices": list(p.metered_prices),
                }
                for p in sorted(plans.values(), key=lambda p: p.name)
            ]
        }
    )


@billing_routes.post("/v1/billing/subscribe")
async def billing_subscribe(request: web.Request) -> web.Response:
    """A Stripe Checkout (subscription mode) URL for a metered plan."""
    caller = require_caller(request)
    body = await read_json(request)
    plan = body.get("plan") if isinstance(body, dict) else None
    if not isinstance(plan, str) or not plan:
        raise AppError(
            "VALIDATION_ERROR", 'give the plan: {"plan": "NAME"}', detail={"path": "/plan"}
        )
    return web.json_response(await _billing(request).subscribe_session(caller, plan), status=201)


@billing_routes.post("/v1/billing/usage")
async def billing_usage(request: web.Request) -> web.Response:
    """Report usage for a metered subscription (Idempotency-Key required)."""
    caller = require_caller(request)
    key = idempotency_key(request)
    body = await read_json(request)
    status, resp, replayed = await record_usage(
        request.app[PLATFORM], request.app.get(BILLING), caller, body, idempotency_key=key
    )
    return _json(resp, status=status, replayed=replayed)
