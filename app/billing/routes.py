"""HTTP endpoints of billing: ``POST /webhooks/stripe``, ``GET /v1/billing`` and
``POST /v1/billing/setup``. Added to the app by ``app.web.app`` when present."""

from __future__ import annotations

from aiohttp import web

from app.billing.service import BillingService
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
from app.web.routes import read_body

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
