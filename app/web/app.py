"""The aiohttp application factory: wires settings and adapters into one process.

``create_app(settings, overrides=...)`` is what ``spell serve`` runs and what tests build with
fakes. Resources are opened in cleanup contexts so teardown only runs for what was set up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from app.artifacts import open_object_store, route_artifacts
from app.artifacts.github import GitHubArtifactStore
from app.artifacts.local import LocalArtifactStore
from app.billing.routes import BILLING, billing_routes
from app.billing.service import BillingConfig, BillingService, RevenueCounter, reconcile_forever
from app.billing.stripe_client import StripeClient
from app.bus.jetstream import BusUnavailable, JetStreamBus, JetStreamConfig, SharedEventHub
from app.bus.memory import MemoryQueue
from app.config import Settings
from app.domain.ratelimit import RateLimiter
from app.errors import AppError
from app.github.client import GitHubClient
from app.github.service import GitHubConfig, GitHubService
from app.observability.metrics import Metrics
from app.runner.pool import WarmProfile
from app.runner.sandbox import (
    BwrapSandbox,
    Sandbox,
    SandboxUnavailable,
    detect_sandbox,
    process_budget_error,
)
from app.services.events import EventHub
from app.services.platform import Platform, PlatformConfig
from app.services.ports import ArtifactStore, Clock, Queue, SystemClock
from app.store.audit_outbox import AuditDrainer
from app.store.auditlog import AuditLog
from app.store.billing_store import BillingStore
from app.store.db import make_engine, upgrade
from app.store.github_store import GitHubStore
from app.store.inbox import Inbox
from app.store.ledger import SqlLedger
from app.web.ingest import FRONT, IngestFront, start_front
from app.web.keys import (
    BUS,
    CLOSING,
    CONSUMER,
    GITHUB,
    INBOX,
    JOBS,
    LEDGER,
    LIMITER,
    METRICS,
    OBJECT_STORE,
    PLATFORM,
    QUEUE,
    RELAY,
    SANDBOX_STATE,
    SETTINGS,
)
from app.web.middlewares import authenticate_and_limit, envelope
from app.web.oidc_routes import setup_oidc
from app.web.routes import routes
from app.worker.consumer import (
    WEBHOOK_KICK_DELAY,
    JobConsumer,
    JobHandler,
    LeaseReaper,
    OutboxRelay,
    RunConsumer,
)
from app.worker.retention import RETENTION, build_sweeper
from app.worker.runs import RunExecutor, RunnerConfig, sandbox_work_dir

log = logging.getLogger("spell.app")

AUDIT_LOG = "main"

ROLE = web.AppKey("role", str)  # "serve" (the API) | "worker" (`spell worker`: runs only)
#: the S3-compatible artifact store, when SPELL_ARTIFACTS_URL is set (readiness checks it)


@dataclass
class Overrides:
    """Test seams: replace an adapter, or keep the in-process worker from starting."""

    clock: Clock | None = None
    sandbox: Sandbox | None = None
    queue: Queue | None = None
    artifacts: ArtifactStore | None = None
    jobs: Queue | None = None
    github: GitHubClient | None = None
    job_backoff: float = 1.0
    run_worker: bool = True
    migrate: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def create_app(
    settings: Settings,
    *,
    overrides: Overrides | None = None,
    role: str = "serve",
    concurrency: int | None = None,
    drain_timeout: float = 60.0,
) -> web.Application:
    """``role="serve"``: the API (and, per ``SPELL_SERVE_RUNS``, the run worker);
    ``role="worker"``: no routes, ``concurrency`` runs, a drain of them on shutdown (the caller
    adds its health routes)."""
    ov = overrides or Overrides()
    app = web.Application(
        middlewares=[envelope, authenticate_and_limit],
        client_max_size=settings.max_bundle_bytes + 1024,
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[LIMITER] = RateLimiter(settings.rate_limit_burst, settings.rate_limit_per_sec)
    app[SANDBOX_STATE] = {"ready": False, "reason": "not probed yet", "name": None}
    app[CLOSING] = asyncio.Event()
    app[ROLE] = role

    async def _closing(app: web.Application) -> None:
        app[CLOSING].set()

    app.on_shutdown.append(_closing)
    if role == "serve":
        app.add_routes(routes)
        app.add_routes(billing_routes)
        setup_oidc(app)  # POST /v1/oidc/token (app/web/oidc_routes.py)
    app.cleanup_ctx.append(_object_store_ctx(ov))  # first: a bad bucket stops start-up early
    app.cleanup_ctx.append(
        _platform_ctx(
            ov,
            runs=role == "worker" or settings.embedded_runs,
            concurrency=concurrency or settings.workers,
            drain_timeout=drain_timeout if role == "worker" else None,
            run_jobs=role == "worker" or settings.serve_jobs,
        )
    )
    return app


async def _connect_bus(settings: Settings) -> JetStreamBus:
    lease = settings.run_lease_sec
    try:
        return await JetStreamBus.connect(
            JetStreamConfig(
                url=str(settings.nats_url),
                creds=settings.nats_creds,
                namespace=settings.nats_namespace,
                # well inside a lease: a run requeued after its worker died (a lease or more
                # after its first publish) goes out again with the same id and must not be
                # dropped as a duplicate; relays racing on one outbox row are milliseconds apart
                duplicate_window=lease / 2,
                runs_ack_wait=lease,  # heartbeats (in_progress) come every third of it
                runs_max_deliver=settings.max_deliver,
            )
        )
    except BusUnavailable as e:
        raise AppError("UNAVAILABLE", str(e)) from e


def _object_store_ctx(ov: Overrides) -> Callable[[web.Application], AsyncIterator[None]]:
    """Opens the S3-compatible artifact store (SPELL_ARTIFACTS_URL) and checks it can be
    written: unreachable, missing bucket or refused credentials → AppError UNAVAILABLE."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        store = None
        if ov.artifacts is None:
            store = await open_object_store(settings, ov.clock or SystemClock())
        if store is not None:
            app[OBJECT_STORE] = store
        try:
            yield
        finally:
            if store is not None:
                await store.aclose()

    return ctx


def _platform_ctx(
    ov: Overrides,
    *,
    runs: bool,
    concurrency: int,
    drain_timeout: float | None,
    run_jobs: bool = True,
) -> Callable[[web.Application], AsyncIterator[None]]:
    # ``run_jobs``: consume the jobs queue here (Stripe settlement, webhook handling, billing
    # schedules); a `spell serve` with NATS and Stripe leaves them to `spell worker`
    # (SPELL_BILLING_IN_SERVE), so its CPU serves requests.
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        settings.ensure_data_dir()
        bus: JetStreamBus | None = None
        if settings.nats_url and (ov.queue is None or ov.jobs is None):
            bus = await _connect_bus(settings)  # first: nothing to clean up if NATS is down
            app[BUS] = bus
        key = settings.signing_key()
        clock = ov.clock or SystemClock()
        engine = make_engine(settings.sqlalchemy_url)
        if ov.migrate:
            await upgrade(engine)
        ledger = SqlLedger(
            engine,
            clock,
            idempotency_ttl=settings.idempotency_ttl,
            hot_pool_size=settings.db_hot_pool,
        )
        await ledger.fast.warm()  # writer thread / connection pool ready before traffic
        head = _HeadWriter(ledger)
        audit = AuditLog(settings.data_dir / "audit" / "audit.jsonl", on_head=head, now=clock.now)
        await audit.start()
        # audit records committed with their state change (the audit outbox) go to the file
        audit_drainer = AuditDrainer(ledger.fast, audit)
        # the duplicate window inside a lease, as on JetStream (_connect_bus): a run the lease
        # reaper queues again (same msg id) must not be dropped as a duplicate
        queue: Queue = ov.queue or (
            bus.runs
            if bus is not None
            else MemoryQueue(duplicate_window=settings.run_lease_sec / 2)
        )
        jobs: Queue = ov.jobs or (
            bus.jobs if bus is not None else MemoryQueue(ack_wait=60.0, max_deliver=6)
        )
        relay = OutboxRelay(
            ledger, queue, routes={"webhook.": jobs, "github.": jobs, "billing.": jobs}
        )
        inbox = Inbox(ledger, clock)
        github = _github(settings, ov)
        store = GitHubStore(ledger, clock)
        local_artifacts = ov.artifacts or LocalArtifactStore(settings.data_dir / "artifacts")
        object_store = app.get(OBJECT_STORE)
        artifacts: ArtifactStore = route_artifacts(  # new ones to the bucket when there is one
            object_store or local_artifacts,
            local=local_artifacts,  # written before the bucket was configured: still served
            s3=object_store,
            github=GitHubArtifactStore(github) if github is not None else None,
        )
        state = app[SANDBOX_STATE]
        sandbox: Sandbox | None = None
        if runs or bus is None:
            sandbox = await _sandbox(settings, ov, state, runs=concurrency if runs else 0)
        else:  # casts are run by `spell worker` processes, each probing its own sandbox
            state.update(ready=True, reason=None, name="remote (spell worker)")
        if not runs and bus is None and ov.run_worker:
            log.warning(
                "this server runs no casts (SPELL_SERVE_RUNS=0 or SPELL_WORKERS=0) and has no "
                "NATS_URL: casts stay queued until a server that runs them starts"
            )
        if drain_timeout is not None and sandbox is None:
            raise AppError(
                "SANDBOX_UNAVAILABLE", f"this worker cannot sandbox spells: {state['reason']}"
            )
        stripe = _stripe(settings)
        platform = Platform(
            config=PlatformConfig(
                signing_key=key,
                artifact_ttl=settings.artifact_ttl,
                token_ttl=settings.token_ttl,
                default_monthly_cap_cents=settings.default_monthly_cap_cents,
                default_total_cap_cents=settings.default_total_cap_cents,
            ),
            ledger=ledger,
            audit=audit,
            artifacts=artifacts,
            clock=clock,
            # with NATS, cast events also wake the SSE streams of the other processes
            hub=SharedEventHub(bus) if bus is not None else EventHub(),
            metrics=app[METRICS],
            sandbox_ready=lambda: None if state["ready"] else str(state["reason"]),
            kick_outbox=relay.kick,
            repo_access=store.installation_for if github is not None else None,
        )
        if isinstance(platform.hub, SharedEventHub) and bus is not None:
            await bus.share_events(platform.hub)
        platform.kick_audit = audit_drainer.kick
        app[LEDGER] = ledger
        app[PLATFORM] = platform
        app[QUEUE] = queue
        app[RELAY] = relay
        app[INBOX] = inbox
        app[JOBS] = jobs
        billing: BillingService | None = None
        if stripe is not None:
            ledger.billing_enabled = True  # settled casts queue their billing.charge job
            metrics = app[METRICS]
            billing = BillingService(
                config=BillingConfig(
                    public_url=(settings.public_url or "http://127.0.0.1:8080").rstrip("/"),
                    plans=settings.plans(),
                ),
                stripe=stripe,
                store=BillingStore(ledger, clock),
                ledger=ledger,
                inbox=inbox,
                audit=audit,
                counters=RevenueCounter(
                    revenue=metrics.revenue_cents.inc, refund=metrics.refunds_count.inc
                ),
                kick_outbox=relay.kick,
                on_cast_ended=platform.hub.notify,
                kick_audit=audit_drainer.kick,
            )
            platform.payment_gate = billing.check_can_pay
            app[BILLING] = billing
        gh_service: GitHubService | None = None
        if github is not None:
            gh_service = GitHubService(
                config=GitHubConfig(
                    app_id=str(settings.github_app_id),
                    command_permission=settings.github_command_permission,
                    allow_edited_comments=settings.github_allow_edited_comments,
                    public_url=(settings.public_url or "http://127.0.0.1:8080").rstrip("/"),
                ),
                platform=platform,
                store=store,
                inbox=inbox,
                client=github,
            )
            app[GITHUB] = gh_service
        tasks: list[asyncio.Task[None]] = []
        executor: RunExecutor | None = None
        consumer: RunConsumer | None = None
        consumer_task: asyncio.Task[None] | None = None
        if not run_jobs and ov.run_worker and (gh_service is not None or billing is not None):
            log.info("background jobs (billing, webhooks) run in `spell worker` processes")
        if run_jobs and ov.run_worker and (gh_service is not None or billing is not None):
            handlers: dict[str, JobHandler] = {}
            if gh_service is not None:
                handlers.update(
                    {
                        "webhook.github": gh_service.on_webhook_job,
                        "github.dispatch": gh_service.on_dispatch_job,
                        "github.notify": gh_service.on_notify_job,
                    }
                )
            if billing is not None:
                handlers.update(
                    {
                        "webhook.stripe": billing.on_webhook_job,
                        "billing.charge": billing.on_charge_job,
                        "billing.retry": billing.on_retry_job,
                        "billing.usage": billing.on_usage_job,
                        "billing.meter": billing.on_meter_job,
                        "billing.refund": billing.on_refund_job,
                    }
                )
            job_consumer = JobConsumer(
                jobs,
                handlers,
                max_deliver=int(getattr(jobs, "max_deliver", 6)),
                backoff=ov.job_backoff,
                on_dead=_dead_letters(gh_service, billing),
            )
            tasks.append(asyncio.create_task(job_consumer.run(), name="jobs"))
            if gh_service is not None:
                tasks.append(
                    asyncio.create_task(_workflow_deadlines(gh_service), name="workflow-deadlines")
                )
            if billing is not None:
                tasks.append(asyncio.create_task(_billing_periods(billing), name="billing-periods"))
                if settings.billing_reconcile_interval > 0:
                    tasks.append(
                        asyncio.create_task(
                            reconcile_forever(billing, settings.billing_reconcile_interval),
                            name="billing-reconcile",
                        )
                    )
        if ov.run_worker:
            if isinstance(queue, MemoryQueue):
                # The in-process queue starts empty: publish every queued cast again (the
                # claim step makes a duplicate delivery harmless).
                n = await ledger.republish_queued()
                if n:
                    log.warning("republished %d queued casts after a restart", n)
            reaper = LeaseReaper(ledger, relay, every=max(0.2, settings.run_lease_sec / 2))
            await reaper.reap_once()
            tasks.append(asyncio.create_task(relay.run(), name="outbox-relay"))
            tasks.append(asyncio.create_task(reaper.run(), name="lease-reaper"))
            if sandbox is not None and runs:
                executor = RunExecutor(
                    platform=platform,
                    sandbox=sandbox,
                    config=RunnerConfig(
                        data_dir=settings.data_dir,
                        max_output_bytes=settings.max_output_bytes,
                        artifact_ttl=settings.artifact_ttl,
                        sandbox_uid=settings.sandbox_uid,
                        lease_sec=settings.run_lease_sec,
                        proxy_max_bytes=settings.proxy_max_bytes,
                    ),
                )
                consumer = RunConsumer(
                    queue,
                    executor,
                    concurrency=concurrency,
                    heartbeat_every=settings.run_lease_sec / 3,
                    max_deliver=getattr(queue, "max_deliver", 5),
                )
                app[CONSUMER] = consumer
                consumer_task = asyncio.create_task(consumer.run(), name="run-consumer")
                tasks.append(consumer_task)
            # retention (SPEC §8): inputs, artifacts, idempotency keys, audit segments
            sweeper = build_sweeper(
                settings,
                ledger=ledger,
                clock=clock,
                artifacts=artifacts,
                export_to=object_store or local_artifacts,
                audit=audit,
                staged_dirs=[executor.runs_dir] if executor is not None else [],
            )
            app[RETENTION] = sweeper
            if settings.retention_interval > 0:
                tasks.append(
                    asyncio.create_task(
                        sweeper.run_forever(settings.retention_interval), name="retention"
                    )
                )
            else:
                tasks.append(asyncio.create_task(_sweeper(ledger), name="sweeper"))
        front: IngestFront | None = None
        audit_drainer.start()
        try:
            if settings.webhook_port is not None and app[ROLE] == "serve":
                # the dedicated webhook ingest front (app/web/ingest.py) on its own port
                front = await start_front(
                    settings,
                    inbox,
                    on_fresh=lambda: relay.kick(WEBHOOK_KICK_DELAY),
                    github_ready=gh_service is not None,
                    metrics=app[METRICS],
                )
                app[FRONT] = front
            yield
        finally:
            if front is not None:  # first: its last batches commit while the ledger is open
                await front.aclose()
            if consumer is not None and consumer_task is not None and drain_timeout is not None:
                # graceful drain: fetch no more, finish the running casts (commit, then ack)
                if not await consumer.drain(consumer_task, drain_timeout):
                    log.warning("drain timed out: unfinished runs come back to other workers")
                with contextlib.suppress(Exception):  # else the next relay anywhere sends them
                    await relay.relay_once()  # the outbox rows of the last runs go out now
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            if isinstance(sandbox, BwrapSandbox):
                await sandbox.aclose()  # kills the warm sandboxes before their folder goes
            if executor is not None:
                await asyncio.to_thread(executor.close)
            await queue.close()
            await jobs.close()
            if bus is not None:
                await bus.close()
            if github is not None and ov.github is None:
                await github.aclose()
            if stripe is not None:
                await stripe.aclose()
            await audit_drainer.close()  # the last pending records, before the log closes
            await audit.close()
            await head.close()
            await ledger.aclose()
            await engine.dispose()

    return ctx


async def _sandbox(
    settings: Settings, ov: Overrides, state: dict[str, Any], *, runs: int
) -> Sandbox | None:
    """Probe the sandbox once at start; service runs are refused (fail closed) if it fails.

    ``runs``: how many casts this process runs at once (``spell worker --concurrency``, else
    ``SPELL_WORKERS``; 0 when it runs none), each in a sandbox of its own."""
    warm = settings.sandbox_warm if ov.run_worker else 0
    if ov.sandbox is None and not settings.unsafe_no_sandbox:
        problem = process_budget_error(
            warm=warm,
            workers=runs if ov.run_worker else 0,
            uid_pool=settings.uid_pool(),
        )
        if problem is not None:  # fail closed with the reason (503 + /readyz), as below
            state.update(ready=False, reason=problem, name=None)
            log.error("sandbox settings refused, service runs are refused: %s", problem)
            return None
    try:
        sandbox = ov.sandbox or detect_sandbox(
            uid=settings.sandbox_uid,
            allow_unsafe=settings.unsafe_no_sandbox,
            uid_pool=settings.uid_pool(),
            warm=warm,
            # next to the run folders, so a run's output is renamed out of its warm sandbox
            warm_dir=sandbox_work_dir(settings.data_dir, settings.sandbox_uid) / "warm"
            if warm
            else None,
            warm_profile=WarmProfile(max_output_bytes=settings.max_output_bytes),
        )
        await sandbox.probe()
    except SandboxUnavailable as e:
        state.update(ready=False, reason=str(e), name=None)
        log.error("sandbox unavailable, service runs are refused: %s", e)
        return None
    state.update(ready=True, reason=None, name=sandbox.name)
    if sandbox.name == "unsafe-subprocess":
        log.warning(
            "SPELL_UNSAFE_NO_SANDBOX=1: spells run WITHOUT isolation. Local development only!"
        )
    return sandbox


class _HeadWriter:
    """Records the audit log's head in the ledger, coalescing bursts into one write."""

    def __init__(self, ledger: SqlLedger, delay: float = 0.05) -> None:
        self.ledger = ledger
        self.delay = delay
        self.pending: tuple[int, str] | None = None
        self.task: asyncio.Task[None] | None = None

    async def __call__(self, seq: int, digest: str) -> None:
        self.pending = (seq, digest)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._flush(self.delay))

    async def _flush(self, delay: float) -> None:
        await asyncio.sleep(delay)
        while self.pending is not None:
            seq, digest = self.pending
            self.pending = None
            try:
                await self.ledger.set_audit_head(AUDIT_LOG, seq, digest)
            except Exception as e:  # e.g. the database is briefly down: the next append retries
                if self.pending is None:
                    self.pending = (seq, digest)
                log.warning("recording the audit head failed: %s: %s", type(e).__name__, e)
                return

    async def close(self) -> None:
        if self.task is not None:
            with contextlib.suppress(Exception):
                await self.task
        if self.pending is not None:
            await self._flush(0)


def _github(settings: Settings, ov: Overrides) -> GitHubClient | None:
    if ov.github is not None:
        return ov.github
    if not settings.github_enabled:
        return None
    pem = settings.github_key_pem()
    assert pem is not None and settings.github_app_id is not None
    return GitHubClient(settings.github_api_url, settings.github_app_id, pem)


def _stripe(settings: Settings) -> StripeClient | None:
    """The process's one Stripe client; None in ledger-only mode (no STRIPE_API_KEY)."""
    if not settings.stripe_enabled:
        return None
    assert settings.stripe_api_key is not None
    return StripeClient(
        settings.stripe_api_key.get_secret_value(), base_url=settings.stripe_api_base
    )


def _dead_letters(
    gh: GitHubService | None, billing: BillingService | None
) -> Callable[[Any, str], Any]:
    """Dead jobs go to the feature that queued them."""

    async def on_dead(msg: Any, error: str) -> None:
        subject = str(msg.subject)
        if billing is not None and (subject.startswith("billing.") or subject == "webhook.stripe"):
            await billing.on_dead_job(msg, error)
        elif gh is not None:
            await gh.on_dead_job(msg, error)

    return on_dead


async def _billing_periods(billing: BillingService, every: float = 3600.0) -> None:
    """Collect what is still pending from months that have ended (the minimum-charge rule)."""
    while True:
        try:
            n = await billing.settle_ended_periods()
            if n:
                log.info("collected %d pending balances of ended months", n)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("billing period sweep failed")
        await asyncio.sleep(every)


async def _workflow_deadlines(gh: GitHubService, every: float = 5.0) -> None:
    while True:
        try:
            await gh.expire_overdue()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("workflow deadline sweep failed")
        await asyncio.sleep(every)


async def _sweeper(ledger: SqlLedger, every: float = 3600.0) -> None:
    while True:
        try:
            n = await ledger.sweep_idempotency()
            if n:
                log.info("swept %d expired idempotency keys", n)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("idempotency sweep failed")
        await asyncio.sleep(every)
