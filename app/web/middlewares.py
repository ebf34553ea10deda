"""Request envelope: tracing, one error shape, rate limits and their headers, metrics."""

from __future__ import annotations

import json
import logging
import math
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from app.errors import AppError
from app.observability.tracing import new_traceparent, parse_traceparent
from app.services.tokens import Caller
from app.store.db import database_unavailable
from app.web.keys import (
    AUTH_ERROR,
    CALLER,
    LIMITER,
    METRICS,
    PLATFORM,
    RATELIMIT_HEADERS,
    TRACEPARENT,
)

log = logging.getLogger("spell.web")

#: seconds a client is told to wait (``Retry-After``) while the database cannot be reached
DB_RETRY_AFTER = 2

_HTTP_CODES = {
    400: "VALIDATION_ERROR",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def error_response(err: AppError) -> web.Response:
    headers = {}
    if err.retry_after is not None and err.status in (429, 503):
        headers["Retry-After"] = str(err.retry_after)
    return web.json_response(err.to_body(), status=err.status, headers=headers)


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: trace context, error mapping (never a stack trace), headers, metrics."""
    request[TRACEPARENT] = parse_traceparent(request.headers.get("traceparent")) or (
        new_traceparent()
    )
    try:
        resp = await handler(request)
    except AppError as e:
        resp = error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "INTERNAL" if e.status >= 500 else "VALIDATION_ERROR")
        message = e.reason or e.text or code
        if e.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif e.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        elif e.status == 413:
            message = "the request body is too large"
        resp = error_response(AppError(code, message, status=e.status))
    except Exception as e:
        if database_unavailable(e):  # an outage, not a bug: 503, the caller retries
            log.warning(
                "database unavailable on %s %s: %s", request.method, request.path, type(e).__name__
            )
            resp = error_response(
                AppError(
                    "UNAVAILABLE",
                    "the database is unavailable right now; retry shortly (a cast retried with "
                    "the same Idempotency-Key is accepted at most once)",
                    retry_after=DB_RETRY_AFTER,
                )
            )
        else:
            log.exception("unhandled error on %s %s", request.method, request.path)
            resp = error_response(
                AppError("INTERNAL", "internal error; retry, and contact support if it persists")
            )
    if resp.status >= 400 and isinstance(resp, web.Response) and resp.body is not None:
        _count_error(request, resp)
    rl = request.get(RATELIMIT_HEADERS)
    if rl and not resp.prepared:
        resp.headers.update(rl)
    if not resp.prepared:
        resp.headers["traceparent"] = request[TRACEPARENT]
    metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else ""
    metrics.http_requests.labels(
        method=request.method, route=route or "unmatched", status=str(resp.status)
    ).inc()
    return resp


def _count_error(request: web.Request, resp: web.Response) -> None:
    try:
        assert isinstance(resp.body, bytes)
        code = json.loads(resp.body)["error"]["code"]
    except Exception:  # not our error shape; nothing to count
        return
    request.app[METRICS].errors_by_code.labels(code=code).inc()


def bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@web.middleware
async def authenticate_and_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve the caller (if a token is sent) and apply the per-principal token bucket."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    token = bearer(request)
    caller: Caller | None = None
    if token is not None:
        try:
            caller = request.app[PLATFORM].authenticate(token)
        except AppError as e:
            request[AUTH_ERROR] = e
    request[CALLER] = caller
    key = f"p:{caller.principal_id}" if caller else f"ip:{request.remote or 'unknown'}"
    limiter = request.app[LIMITER]
    allowed, remaining, retry_after, full_in = limiter.take(key, time.monotonic())
    request[RATELIMIT_HEADERS] = {
        "X-RateLimit-Limit": str(limiter.capacity),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(int(time.time() + math.ceil(full_in))),
    }
    if not allowed:
        wait = max(1, math.ceil(retry_after))
        raise AppError(
            "RATE_LIMITED",
            f"too many requests; retry in {wait} s",
            retry_after=wait,
        )
    return await handler(request)


def require_caller(request: web.Request) -> Caller:
    caller = request.get(CALLER)
    if isinstance(caller, Caller):
        return caller
    err = request.get(AUTH_ERROR)
    if isinstance(err, AppError):
        raise err
    raise AppError(
        "UNAUTHORIZED",
        "missing bearer token: send `Authorization: Bearer <token>` "
        "(an operator issues one with `spell token issue`)",
    )


def optional_caller(request: web.Request) -> Caller | None:
    err = request.get(AUTH_ERROR)
    if isinstance(err, AppError):
        raise err
    caller = request.get(CALLER)
    return caller if isinstance(caller, Caller) else None
