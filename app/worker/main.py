"""``spell worker``: a process that only runs casts, pulling run requests from NATS JetStream.

It shares PostgreSQL (``DATABASE_URL``), NATS (``NATS_URL``) and the data directory (bundles,
artifacts, audit log; ``SPELL_DATA_DIR``) with the ``spell serve`` processes. Start-up:

1. refuse without ``NATS_URL`` — the in-process queue cannot cross processes;
2. probe the sandbox and refuse (exit 1) when bubblewrap cannot run here: fail closed;
3. connect to NATS (create or update the streams), migrate the database, start ``concurrency``
   run loops, the outbox relay, the lease reaper, the retention sweeper (every
   ``SPELL_RETENTION_INTERVAL``) and the job consumers that are configured
   (with STRIPE_API_KEY: Stripe settlement ``billing.*``, ``webhook.stripe``, the billing-period
   sweep and the reconcile schedule — a `spell serve` with NATS leaves them to the workers,
   ``SPELL_BILLING_IN_SERVE``);
4. serve ``/healthz`` (alive) and ``/readyz`` (database, sandbox, NATS, object store, not
   draining) on the health port.

SIGTERM (or Ctrl-C) drains: no more fetches, the running casts finish, commit and ack, then the
process exits 0. Runs still going after ``--drain-timeout`` are cancelled; their casts come back
to another worker through the lease (nothing is billed for a run that did not finish).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from sqlalchemy import text

from app.config import Settings
from app.errors import AppError
from app.runner.sandbox import BwrapSandbox, SandboxUnavailable, detect_sandbox
from app.web.app import Overrides, create_app
from app.web.keys import BUS, CONSUMER, LEDGER, OBJECT_STORE, SANDBOX_STATE

health_routes = web.RouteTableDef()


@health_routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "role": "worker"})


@health_routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    app = request.app
    checks: dict[str, Any] = {}
    ok = True
    try:
        async with app[LEDGER].reader() as session:
            await asyncio.wait_for(session.execute(text("SELECT 1")), 2.0)
        checks["database"] = "ok"
    except Exception as e:
        ok = False
        checks["database"] = f"unavailable: {type(e).__name__}"
    sandbox = app[SANDBOX_STATE]
    if sandbox.get("ready"):
        checks["sandbox"] = "ok"
    else:
        ok = False
        checks["sandbox"] = f"unavailable: {sandbox.get('reason')}"
    bus = app.get(BUS)
    if bus is not None and bus.connected:
        checks["nats"] = "ok"
    else:
        ok = False
        checks["nats"] = "disconnected"
    object_store = app.get(OBJECT_STORE)
    if object_store is not None:  # SPELL_ARTIFACTS_URL: artifacts go to the bucket
        problem = await object_store.ready()
        checks["artifacts"] = "ok" if problem is None else f"unavailable: {problem}"
        ok = ok and problem is None
    consumer = app.get(CONSUMER)
    if consumer is None or consumer.stopping.is_set():
        ok = False
        checks["runs"] = "draining"
    else:
        checks["runs"] = f"{consumer.busy}/{consumer.concurrency} busy"
    return web.json_response(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503
    )


async def probe_sandbox(settings: Settings) -> str | None:
    """None when spells can be sandboxed here, else why not."""
    try:
        sandbox = detect_sandbox(
            uid=settings.sandbox_uid,
            allow_unsafe=settings.unsafe_no_sandbox,
            uid_pool=settings.uid_pool(),
        )
        try:
            await sandbox.probe()
        finally:
            if isinstance(sandbox, BwrapSandbox):
                await sandbox.aclose()
    except SandboxUnavailable as e:
        return str(e)
    return None


def build_worker_app(
    settings: Settings,
    *,
    concurrency: int,
    drain_timeout: float,
    overrides: Overrides | None = None,
) -> web.Application:
    if not settings.nats_url:
        raise AppError(
            "VALIDATION_ERROR",
            "spell worker needs NATS_URL (NATS with JetStream): the in-process queue cannot "
            "cross processes. Without NATS, `spell serve` runs casts itself.",
        )
    app = create_app(
        settings,
        overrides=overrides,
        role="worker",
        concurrency=concurrency,
        drain_timeout=drain_timeout,
    )
    app.add_routes(health_routes)
    return app


def run_worker(
    settings: Settings,
    *,
    concurrency: int,
    host: str,
    port: int,
    drain_timeout: float,
    announce: Callable[[str], None],
) -> None:
    """Run until SIGTERM / SIGINT, then drain. Raises AppError when it must not start."""
    app = build_worker_app(settings, concurrency=concurrency, drain_timeout=drain_timeout)
    reason = asyncio.run(probe_sandbox(settings))
    if reason is not None:
        raise AppError("SANDBOX_UNAVAILABLE", f"refusing to run spells unsandboxed: {reason}")
    web.run_app(
        app,
        host=host,
        port=port,
        print=announce,
        access_log=None,
        shutdown_timeout=5,
        handle_signals=True,
    )
