"""``POST /v1/oidc/token``: trade a GitHub Actions OIDC token for a short-lived platform token.

Added to the app by :func:`setup_oidc` (from ``app.web.app``). The issuer's JWKS client lives as
long as the app (one cache per process); the use case is :class:`app.services.oidc.OidcSignIn`.
"""

from __future__ import annotations

from aiohttp import web

from app.services.oidc import JwksClient, OidcSignIn
from app.store.oidc_store import OidcStore
from app.web.keys import PLATFORM, SETTINGS, TRACEPARENT
from app.web.routes import read_json

JWKS = web.AppKey("oidc_jwks", JwksClient)

oidc_routes = web.RouteTableDef()


@oidc_routes.post("/v1/oidc/token")
async def oidc_token(request: web.Request) -> web.Response:
    """No bearer token: the OIDC token in the body is the credential."""
    settings = request.app[SETTINGS]
    platform = request.app[PLATFORM]
    sign_in = OidcSignIn(
        issuer=settings.oidc_issuer,
        audience=settings.oidc_audience,
        keys=request.app[JWKS],
        links=OidcStore(platform.ledger, platform.clock),
        platform=platform,
    )
    body = await sign_in.exchange(await read_json(request), traceparent=request[TRACEPARENT])
    return web.json_response(body, headers={"Cache-Control": "no-store"})


def setup_oidc(app: web.Application) -> None:
    """Add the route and the app-wide JWKS cache (closed with the app)."""
    app[JWKS] = JwksClient(app[SETTINGS].oidc_jwks)

    async def _close(app: web.Application) -> None:
        await app[JWKS].aclose()

    app.on_cleanup.append(_close)
    app.add_routes(oidc_routes)
