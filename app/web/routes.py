"""HTTP handlers of ``/v1`` (SPEC §5, §22) and the operational endpoints."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from typing import Any

from aiohttp import web
from sqlalchemy import text

from app.aio import wait_event
from app.errors import AppError
from app.github.webhooks import check_delivery
from app.runner.bundle import BundleError, store_bundle
from app.web.keys import (
    BUS,
    CLOSING,
    GITHUB,
    INBOX,
    LEDGER,
    METRICS,
    OBJECT_STORE,
    PLATFORM,
    RATELIMIT_HEADERS,
    RELAY,
    SANDBOX_STATE,
    SETTINGS,
    TRACEPARENT,
)
from app.web.middlewares import optional_caller, require_caller
from app.web.openapi import openapi_document
from app.worker.consumer import WEBHOOK_KICK_DELAY

routes = web.RouteTableDef()

IDEMPOTENCY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
SORTS = ("popular", "recent", "price")


def base_url(request: web.Request) -> str:
    configured = request.app[SETTINGS].public_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"


async def read_body(request: web.Request, limit: int, what: str) -> bytes:
    """The whole body, at most ``limit`` bytes (413 beyond), whatever the transfer encoding."""
    if request.content_length is not None and request.content_length > limit:
        raise AppError("PAYLOAD_TOO_LARGE", f"{what} is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise AppError("PAYLOAD_TOO_LARGE", f"{what} is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> Any:
    """The JSON body, bounded in size; a clear 413/415/422 instead of a parser traceback."""
    limit = request.app[SETTINGS].max_body_bytes
    ctype = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise AppError(
            "UNSUPPORTED_MEDIA_TYPE", f"send JSON (Content-Type: application/json), not {ctype}"
        )
    raw = await read_body(request, limit, "the JSON body")
    if not raw.strip():
        raise AppError("VALIDATION_ERROR", "the request body is empty; send a JSON object")
    try:
        value = json.loads(raw, parse_constant=_no_constants)
        # Lone surrogates parse but cannot be stored or hashed as UTF-8: refuse them here.
        json.dumps(value, ensure_ascii=False).encode()
        return value
    except RecursionError:
        raise AppError("VALIDATION_ERROR", "the JSON body is nested too deeply") from None
    except UnicodeEncodeError:
        raise AppError("VALIDATION_ERROR", "the JSON body contains invalid Unicode") from None
    except ValueError as e:
        if not isinstance(e, json.JSONDecodeError | UnicodeDecodeError):
            raise AppError("VALIDATION_ERROR", f"malformed JSON: {e}") from None
        where = (
            f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        )
        raise AppError("VALIDATION_ERROR", f"malformed JSON{where}") from None


def idempotency_key(request: web.Request) -> str:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        raise AppError(
            "VALIDATION_ERROR",
            "the Idempotency-Key header is required on this request "
            "(any unique string up to 255 characters, e.g. a UUID)",
            detail={"header": "Idempotency-Key"},
        )
    if not IDEMPOTENCY_RE.match(key):
        raise AppError(
            "VALIDATION_ERROR",
            "the Idempotency-Key header must be 1-255 visible ASCII characters",
            detail={"header": "Idempotency-Key"},
        )
    return key


def _json(body: Any, *, status: int = 200, replayed: bool | None = None) -> web.Response:
    headers = {}
    if replayed is not None:
        headers["Idempotent-Replayed"] = "true" if replayed else "false"
    return web.json_response(body, status=status, headers=headers)


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise AppError("VALIDATION_ERROR", f"?{name} must be an integer") from None
    if not lo <= value <= hi:
        raise AppError("VALIDATION_ERROR", f"?{name} must be between {lo} and {hi}")
    return value


# ---------------------------------------------------------------------- operations


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, Any] = {}
    ok = True
    try:
        async with request.app[LEDGER].reader() as session:  # never waits for the write lock
            await asyncio.wait_for(session.execute(text("SELECT 1")), 2.0)
        checks["database"] = "ok"
    except Exception as e:
        ok = False
        checks["database"] = f"unavailable: {type(e).__name__}"
    sandbox = request.app[SANDBOX_STATE]
    if sandbox.get("ready"):
        checks["sandbox"] = "ok"
    else:  # fail closed: a server that cannot sandbox spells is not ready to take casts
        ok = False
        checks["sandbox"] = f"unavailable: {sandbox.get('reason')}"
    checks["sandbox_kind"] = sandbox.get("name")
    bus = request.app.get(BUS)
    if bus is not None:  # NATS_URL is set: casts are queued through JetStream
        if bus.connected:
            checks["nats"] = "ok"
        else:
            ok = False
            checks["nats"] = "disconnected"
    object_store = request.app.get(OBJECT_STORE)
    if object_store is not None:  # SPELL_ARTIFACTS_URL is set: artifacts live in a bucket
        problem = await object_store.ready()
        checks["artifacts"] = "ok" if problem is None else f"unavailable: {problem}"
        ok = ok and problem is None
    return web.json_response(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body, ctype = request.app[METRICS].render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = ctype
    return resp


@routes.get("/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(base_url(request)))


# ---------------------------------------------------------------------- spells


@routes.post("/v1/bundles")
async def upload_bundle(request: web.Request) -> web.Response:
    caller = require_caller(request)
    caller.require("spell:publish")
    settings = request.app[SETTINGS]
    limit = settings.max_bundle_bytes
    data = await read_body(request, limit, "the bundle")
    try:
        digest = await asyncio.to_thread(
            store_bundle, data, settings.data_dir / "bundles", max_bytes=limit
        )
    except BundleError as e:
        raise AppError("VALIDATION_ERROR", f"bad bundle: {e}") from None
    await request.app[PLATFORM].register_bundle(caller, digest, len(data))
    return web.json_response({"digest": digest, "size_bytes": len(data)}, status=201)


@routes.post("/v1/spells")
async def publish_spell(request: web.Request) -> web.Response:
    caller = require_caller(request)
    caller.require("spell:publish")
    body = await read_json(request)
    detail, created = await request.app[PLATFORM].publish_spell(caller, body)
    return web.json_response(detail, status=201 if created else 200)


async def _search(request: web.Request, *, catalog: bool) -> web.Response:
    caller = optional_caller(request) if catalog else require_caller(request)
    sort = request.query.get("sort", "popular" if catalog else "recent")
    if sort not in SORTS:
        raise AppError("VALIDATION_ERROR", f"?sort must be one of {', '.join(SORTS)}")
    q = request.query.get("q") or None
    tag = request.query.get("tag") or None
    if q is not None and len(q) > 200:
        raise AppError("VALIDATION_ERROR", "?q is limited to 200 characters")
    limit = _int_param(request, "limit", 20, 1, 100)
    offset = _int_param(request, "offset", 0, 0, 100_000)
    items = await request.app[PLATFORM].search(
        caller, q=q, tag=tag, sort=sort, limit=limit, offset=offset, include_own=not catalog
    )
    next_offset = offset + limit if len(items) == limit else None
    return web.json_response({"spells": items, "next_offset": next_offset})


@routes.get("/v1/spells")
async def list_spells(request: web.Request) -> web.Response:
    return await _search(request, catalog=False)


@routes.get("/v1/catalog/spells")
async def catalog(request: web.Request) -> web.Response:
    return await _search(request, catalog=True)


async def _detail(request: web.Request, *, catalog: bool) -> web.Response:
    caller = optional_caller(request) if catalog else require_caller(request)
    platform = request.app[PLATFORM]
    spell_id = request.match_info["spell_id"]
    spell, version = await platform.find_spell(
        spell_id, caller, request.query.get("version") or None
    )
    versions = await platform.ledger.list_versions(spell.id)
    return web.json_response(platform.spell_detail(spell, version, versions))


@routes.get("/v1/spells/{spell_id}")
async def get_spell(request: web.Request) -> web.Response:
    return await _detail(request, catalog=False)


@routes.get("/v1/catalog/spells/{spell_id}")
async def catalog_detail(request: web.Request) -> web.Response:
    return await _detail(request, catalog=True)


# ---------------------------------------------------------------------- casts


@routes.post("/v1/spells/{spell_id}:cast")
async def cast_spell(request: web.Request) -> web.Response:
    caller = require_caller(request)
    caller.require("cast:invoke")
    key = idempotency_key(request)
    body = await read_json(request)
    status, resp, replayed = await request.app[PLATFORM].cast(
        caller,
        request.match_info["spell_id"],
        body,
        idempotency_key=key,
        traceparent=request[TRACEPARENT],
        base_url=base_url(request),
    )
    return _json(resp, status=status, replayed=replayed)


@routes.get("/v1/casts/{cast_id}")
async def cast_status(request: web.Request) -> web.Response:
    caller = require_caller(request)
    body = await request.app[PLATFORM].cast_status(
        caller, request.match_info["cast_id"], base_url=base_url(request)
    )
    return web.json_response(body)


def _sse(seq: int, stage: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, separators=(",", ":"))
    return f"id: {seq}\nevent: {stage}\ndata: {payload}\n\n".encode()


@routes.get("/v1/casts/{cast_id}/events")
async def cast_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: every progress event in order; resumable with ``Last-Event-ID``."""
    caller = require_caller(request)
    platform = request.app[PLATFORM]
    cast = await platform.get_cast(caller, request.match_info["cast_id"])
    raw_last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or "0"
    try:
        last = max(0, int(raw_last))
    except ValueError:
        raise AppError("VALIDATION_ERROR", "Last-Event-ID must be an integer") from None
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **request.get(RATELIMIT_HEADERS, {}),
        }
    )
    await resp.prepare(request)
    await resp.write(b"retry: 1000\n\n")
    keepalive_at = time.monotonic() + 15
    closing = request.app[CLOSING]
    with platform.hub.listen(cast.id) as wake:
        while not closing.is_set():
            wake.clear()
            events = await platform.ledger.events_after(cast.id, last)
            for ev in events:
                data = {
                    "cast_id": cast.id,
                    "seq": ev.seq,
                    "stage": ev.stage,
                    "ts": ev.created_at.isoformat(),
                    **ev.data,
                }
                await resp.write(_sse(ev.seq, ev.stage, data))
                last = ev.seq
                if ev.stage in ("succeeded", "failed"):
                    await resp.write_eof()
                    return resp
            if events:
                continue
            current = await platform.ledger.get_cast(cast.id)
            if current is not None and current.status in ("succeeded", "failed"):
                if last < current.event_seq:
                    continue  # it ended between our two reads: send the remaining events
                # Resumed after the terminal event: nothing more will come.
                await resp.write_eof()
                return resp
            await wait_event(wake, 1.0)
            if time.monotonic() > keepalive_at:
                await resp.write(b": keep-alive\n\n")
                keepalive_at = time.monotonic() + 15
    # The server is shutting down: end the stream; clients reconnect with Last-Event-ID.
    await resp.write_eof()
    return resp


# ---------------------------------------------------------------------- billing


@routes.get("/v1/billing/caps")
async def get_caps(request: web.Request) -> web.Response:
    caller = require_caller(request)
    body = await request.app[PLATFORM].get_caps(caller, request.query.get("account") or None)
    return web.json_response(body)


@routes.post("/v1/billing/caps")
async def set_caps(request: web.Request) -> web.Response:
    caller = require_caller(request)
    key = idempotency_key(request)
    body = await read_json(request)
    status, resp, replayed = await request.app[PLATFORM].set_caps(caller, body, idempotency_key=key)
    return _json(resp, status=status, replayed=replayed)


# ---------------------------------------------------------------------- artifacts


@routes.get("/v1/artifacts/{artifact_id}")
async def download_artifact(request: web.Request) -> web.StreamResponse:
    """The signed, expiring artifact link (no bearer token: the signature is the credential)."""
    q = request.query
    if "exp" not in q or "sig" not in q:
        raise AppError("UNAUTHORIZED", "artifact links need their exp and sig parameters")
    art, path = await request.app[PLATFORM].open_artifact(
        request.match_info["artifact_id"], q["exp"], q["sig"]
    )
    if isinstance(path, str):  # kept by GitHub: a freshly minted, one-minute download URL
        raise web.HTTPFound(path, headers={"Cache-Control": "private, no-store"})
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="{art.cast_id}.zip"',
            "Digest": "sha-256="
            + base64.b64encode(bytes.fromhex(art.digest.removeprefix("sha256:"))).decode(),
            "Cache-Control": "private, no-store",
        },
    )


# ---------------------------------------------------------------------- webhooks


@routes.get("/github/setup")
async def github_setup(request: web.Request) -> web.Response:
    """Where GitHub sends the installer after installing the App (the manifest's setup_url)."""
    installation = request.query.get("installation_id", "")
    shown = installation if installation.isdigit() else "(unknown)"
    page = (
        "<!doctype html><meta charset=utf-8><title>Spell Platform installed</title>"
        "<h1>Spell Platform is installed</h1>"
        f"<p>Installation {shown} is recorded as soon as GitHub's webhook arrives.</p>"
        "<p>To cast with <code>/cast</code> comments, an operator links your GitHub account to a "
        "caster account: <code>spell github link --account ACCOUNT --user LOGIN</code>.</p>"
    )
    return web.Response(
        text=page,
        content_type="text/html",
        headers={"Content-Security-Policy": "default-src 'none'", "X-Frame-Options": "DENY"},
    )


@routes.post("/webhooks/github")
async def github_webhook(request: web.Request) -> web.Response:
    """Verify, store raw, acknowledge. No JSON parsing and no GitHub call on this path:
    handlers run from the jobs queue (``app.github.handlers``)."""
    settings = request.app[SETTINGS]
    secrets = settings.webhook_secrets()
    if not secrets or GITHUB not in request.app:
        raise AppError(
            "UNAVAILABLE",
            "the GitHub App is not configured (GITHUB_APP_ID, GITHUB_APP_PRIVATE_KEY[_PATH], "
            "GITHUB_WEBHOOK_SECRET); run `spell app create`",
        )
    body = await read_body(request, settings.max_webhook_bytes, "the delivery")
    hdr = check_delivery(
        body,
        signature=request.headers.get("X-Hub-Signature-256"),
        headers=request.headers,
        secret=secrets,
    )
    if hdr.event == "ping":
        return web.json_response({"ok": True, "pong": hdr.delivery_id})
    fresh = await request.app[INBOX].accept("github", hdr.delivery_id, hdr.event, body)
    if fresh:
        request.app[RELAY].kick(WEBHOOK_KICK_DELAY)
    return web.json_response(
        {"delivery_id": hdr.delivery_id, "duplicate": not fresh}, status=202 if fresh else 200
    )
