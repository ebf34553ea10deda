"""Stripe settlement throughput, and what billing adds to the cast API's latency (issue #4).

Usage: .venv/bin/python bench/billing_settle.py [--quick] [--runs 3] [-n 300] [--concurrency 8]
                                                [--rate 10] [--duration 20]
                                                [--backends sqlite,postgresql]

Stripe is the contract-enforcing fake of the tests (tests/contract/fake_stripe.py: every request
validated against Stripe's OpenAPI description), started as a process of its own
(bench/_fake_stripe.py) on 127.0.0.1 and shared by every phase.

1. **settle** — casts settled per second. A `spell serve` without its worker
   (bench/_serve_noworker.py, Stripe configured) accepts N paid casts (flat 60 cents, above
   Stripe's USD minimum, so every cast is one PaymentIntent) from 8 caster accounts, each with a
   Stripe customer and a saved card; the server is stopped, and this process finishes every
   cast through the ledger's hot path (`claim` + `finish` with billing on: the `billing.charge`
   outbox row is written in the finish transaction, as the worker does). Then C concurrent
   workers run the `billing.charge` job of every cast (`BillingService.on_charge_job`: pending
   line under the account lock, off-session PaymentIntent with key `cast:{id}:charge`,
   conditional state change, audit record) and the wall time until all N charges are
   `succeeded` gives casts settled/s. Same-run baseline: the same C workers creating N
   PaymentIntents straight through the StripeClient (no ledger) — the fake's own ceiling. Every
   job is then delivered a second time: not one new PaymentIntent may appear (checked).
2. **latency** — `POST /v1/spells/{id}:cast` at a fixed rate (open loop, as cast_latency.py)
   against a real `spell serve` with SPELL_WORKERS=1 (hello runs in bubblewrap, then settles),
   billing **on** (STRIPE_API_KEY → the fake; every cast's charge is collected in the
   background by the same process) and **off** (ledger-only), in the same run, order alternating
   between runs. Billing is off the request path, so p95 must be the same within noise. The
   PaymentIntents created during the window are counted to show the billing work really ran
   concurrently.

Each phase gets a fresh data dir (and, for PostgreSQL, a throw-away database). Load averages are
recorded at the start and end of every phase: the machine (2 cores) is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
from cast_latency import open_loop

from app.billing.service import BillingConfig, BillingService, RevenueCounter
from app.billing.stripe_client import StripeClient
from app.cli.local import local_engine
from app.domain.billing import charge_key
from app.services.ports import SystemClock
from app.store.auditlog import AuditLog
from app.store.billing_store import BillingStore
from app.store.inbox import Inbox
from app.store.ledger import SqlLedger
from app.store.models import BillingCharge
from tests.contract.fake_stripe import API_KEY

PRICE_CENTS = 60
ACCOUNTS = 8
WEBHOOK_SECRET = "whsec_bench"
nan = float("nan")


# ---------------------------------------------------------------------------- fake Stripe


@contextlib.asynccontextmanager
async def fake_stripe() -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    port = c.free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "_fake_stripe.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=c.ROOT,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
        if not line:
            raise RuntimeError("the fake Stripe did not start (are the contracts installed?)")
        yield json.loads(line)["url"], proc
    finally:
        proc.terminate()  # by its pid
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def stripe_stats(s: Any, url: str) -> dict[str, Any]:
    async with s.get(url + "/_bench/stats") as r:
        return dict(await r.json())


def stripe_env(env: c.Env, url: str) -> None:
    env.extra.update(
        {
            "STRIPE_API_KEY": API_KEY,
            "STRIPE_API_BASE": url,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "SPELL_BILLING_RECONCILE_INTERVAL": "0",
        }
    )


async def save_cards(env: c.Env, s: Any, stripe_url: str, accounts: list[str]) -> None:
    """Each account gets a Stripe customer with a saved card, recorded in the ledger as
    `checkout.session.completed` (setup mode) records it."""
    async with local_engine(env.settings()) as engine:
        ledger = SqlLedger(engine, SystemClock())
        store = BillingStore(ledger, SystemClock())
        try:
            for account in accounts:
                async with s.post(stripe_url + "/_bench/customer") as r:
                    got = await r.json()
                await store.set_stripe_customer(account, got["customer"])
                await store.save_payment_method(account, got["payment_method"])
        finally:
            await ledger.aclose()


# ---------------------------------------------------------------------------- 1. settle


async def accept_paid_casts(
    s: Any, url: str, maker: str, casters: list[str], count: int
) -> list[str]:
    """Publish the paid hello and have ``count`` casts of it accepted (16 in flight, the
    casters taking turns); their ids."""
    digest = await c.upload_hello(s, url, maker)
    await c.publish_hello(s, url, maker, digest, spell_id="bench.paid", flat_cents=PRICE_CENTS)
    sem = asyncio.Semaphore(16)
    cast_ids: list[str] = []

    async def cast(i: int) -> None:
        async with (
            sem,
            s.post(
                f"{url}/v1/spells/bench.paid:cast",
                json={"input": {"name": f"b{i}"}},
                headers={**c.auth(casters[i % ACCOUNTS]), "Idempotency-Key": c.idem()},
            ) as r,
        ):
            body = await r.json()
            if r.status != 202:
                raise RuntimeError(f"cast refused: {r.status} {body}")
            cast_ids.append(str(body["cast_id"]))

    await asyncio.gather(*(cast(i) for i in range(count)))
    return cast_ids


async def settle_phase(backend: str, n: int, concurrency: int, stripe_url: str) -> dict[str, Any]:
    load_start = round(os.getloadavg()[0], 2)
    async with c.platform_env(backend) as env, c.session(timeout=120) as s:
        stripe_env(env, stripe_url)
        accounts = [f"bench-caster-{i}" for i in range(ACCOUNTS)]
        tokens = await c.issue_tokens(
            env, [("bench-maker", "maker")] + [(a, "caster") for a in accounts]
        )
        maker, casters = tokens[0], tokens[1:]
        await save_cards(env, s, stripe_url, accounts)
        argv = [
            sys.executable,
            str(Path(__file__).parent / "_serve_noworker.py"),
            "--port",
            "{port}",
        ]
        async with c.running_server(env, argv) as server:
            cast_ids = await accept_paid_casts(s, server.url, maker, casters, n)

        clock = SystemClock()
        async with local_engine(env.settings()) as engine:
            ledger = SqlLedger(engine, clock)
            ledger.billing_enabled = True
            audit = AuditLog(env.data_dir / "audit" / "audit.jsonl")
            await audit.start()
            stripe = StripeClient(API_KEY, base_url=stripe_url)
            try:
                # finish every cast as the worker does (hot path, billing row in the same tx)
                t0 = time.perf_counter()
                for cid in cast_ids:
                    claim = await ledger.claim(cid)
                    assert claim is not None
                    done = await ledger.finish(
                        cid, claim.attempt, succeeded=True, cost_cents=PRICE_CENTS
                    )
                    assert done is not None
                finish_s = time.perf_counter() - t0
                billing = BillingService(
                    config=BillingConfig(),
                    stripe=stripe,
                    store=BillingStore(ledger, clock),
                    ledger=ledger,
                    inbox=Inbox(ledger, clock),
                    audit=audit,
                    counters=RevenueCounter(revenue=lambda _n: None, refund=lambda: None),
                    kick_outbox=lambda: None,
                )
                customer = await billing.store.customer(accounts[0])
                assert customer is not None

                async def baseline(i: int) -> None:
                    await stripe.charge_off_session(
                        amount=PRICE_CENTS,
                        currency="usd",
                        customer=str(customer.stripe_customer_id),
                        payment_method=str(customer.payment_method_id),
                        idempotency_key=f"bench:{backend}:{time.time_ns()}:{i}",
                        description="bench baseline",
                        metadata={},
                    )

                async def settle(i: int) -> None:
                    msg = SimpleNamespace(
                        payload={"cast_id": cast_ids[i]}, subject="billing.charge"
                    )
                    await billing.on_charge_job(msg)  # type: ignore[arg-type]

                before = await stripe_stats(s, stripe_url)
                base_s = await drain(n, concurrency, baseline)
                mid = await stripe_stats(s, stripe_url)
                settle_s = await drain(n, concurrency, settle)
                after = await stripe_stats(s, stripe_url)
                charges = await billing.store.charges()
                succeeded = [ch for ch in charges if ch.status == "succeeded"]
                redeliver_s = await drain(n, concurrency, settle)  # every job delivered again
                again = await stripe_stats(s, stripe_url)
            finally:
                await stripe.aclose()
                await audit.close()
                await ledger.aclose()
    new_pis = after["payment_intents"] - mid["payment_intents"]
    ok = (
        len(succeeded) == n
        and new_pis == n
        and again["payment_intents"] == after["payment_intents"]
        and not after["violations"]
        and not after["idempotency_errors"]
    )
    return {
        "n": n,
        "concurrency": concurrency,
        "accounts": ACCOUNTS,
        "finish_hot_path_per_s": round(n / finish_s, 1),
        "settled_per_s": round(n / settle_s, 1),
        "settle_wall_s": round(settle_s, 2),
        "stripe_only_per_s": round(n / base_s, 1),
        "baseline_pis": mid["payment_intents"] - before["payment_intents"],
        "redelivery_per_s": round(n / redeliver_s, 1),
        "charges_succeeded": len(succeeded),
        "payment_intents_created": new_pis,
        "payment_intents_after_redelivery": again["payment_intents"] - after["payment_intents"],
        "violations": after["violations"],
        "correct": ok,
        "loadavg_start": load_start,
        "loadavg_end": round(os.getloadavg()[0], 2),
    }


async def drain(n: int, concurrency: int, job: Callable[[int], Awaitable[None]]) -> float:
    """Run job(0..n-1) on ``concurrency`` workers; the wall time in seconds."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await job(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


# ------------------------------------------------------------------------ 1b. CPU per settlement


class LegacyBillingStore(BillingStore):
    """Settlement's database work as it was before app/store/billing_hot.py (ORM sessions,
    ``SELECT … FOR UPDATE``), kept here only to measure the difference on the same machine."""

    async def legacy_add_pending(self, cast: Any) -> BillingCharge | None:
        from sqlalchemy import func, select, update

        from app.domain.billing import plan_collection
        from app.domain.caps import month_period
        from app.store.models import BillingPending

        now = self.clock.now()
        async with self.ledger.write() as s:
            await self._lock_customer(s, cast.caster_id)
            await s.execute(
                self.ledger._insert(BillingPending)
                .values(
                    cast_id=cast.id,
                    account_id=cast.caster_id,
                    amount_cents=cast.cost_cents,
                    currency=cast.currency,
                    period=month_period(cast.finished_at or now),
                    created_at=now,
                )
                .on_conflict_do_nothing(index_elements=["cast_id"])
            )
            charge_id = await s.scalar(
                select(BillingPending.charge_id).where(BillingPending.cast_id == cast.id)
            )
            if charge_id is not None:
                return await s.get(BillingCharge, charge_id)
            total = int(
                await s.scalar(
                    select(func.coalesce(func.sum(BillingPending.amount_cents), 0)).where(
                        BillingPending.account_id == cast.caster_id,
                        BillingPending.currency == cast.currency,
                        BillingPending.charge_id.is_(None),
                    )
                )
                or 0
            )
            if plan_collection(total, cast.currency, period_ended=False).action != "charge":
                return None
            charge = BillingCharge(
                id=charge_key(cast.id),
                account_id=cast.caster_id,
                kind="payment_intent",
                currency=cast.currency,
                amount_cents=0,
                status="pending",
                attempt=1,
                refunded_cents=0,
                created_at=now,
                updated_at=now,
            )
            s.add(charge)
            await s.flush()
            claimed = await s.scalars(
                update(BillingPending)
                .where(
                    BillingPending.account_id == cast.caster_id,
                    BillingPending.currency == cast.currency,
                    BillingPending.charge_id.is_(None),
                )
                .values(charge_id=charge.id)
                .returning(BillingPending.amount_cents)
                .execution_options(synchronize_session=False)
            )
            charge.amount_cents = sum(int(a) for a in claimed.all())
            return charge

    async def set_charge_state(  # type: ignore[override]
        self,
        charge_id: str,
        status: str,
        *,
        from_states: Any = ("pending",),
        stripe_id: str | None = None,
        failure_code: str | None = None,
        event_created: int | None = None,
    ) -> bool:
        from sqlalchemy import update

        values: dict[str, Any] = {"status": status, "updated_at": self.clock.now()}
        if stripe_id is not None:
            values["stripe_id"] = stripe_id
        if failure_code is not None or status == "succeeded":
            values["failure_code"] = failure_code
        async with self.ledger.write() as s:
            res = await s.execute(
                update(BillingCharge)
                .where(BillingCharge.id == charge_id, BillingCharge.status.in_(list(from_states)))
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            return bool(res.rowcount == 1)


class LegacyBillingService(BillingService):
    store: LegacyBillingStore

    async def settle(self, cast_id: str) -> str | None:
        cast = await self.ledger.get_cast(cast_id)
        if cast is None or cast.status != "succeeded":
            return None
        await self._terms(cast)
        charge = await self.store.legacy_add_pending(cast)
        if charge is not None:
            await self.collect(charge)  # reads the customer, then the lines for the audit
        return "charge"


async def cpu_phase(backend: str, n: int, concurrency: int, stripe_url: str) -> dict[str, Any]:
    """CPU of this process per settled cast: the ORM settlement (before) against the
    bare-driver one (now), on two sets of N casts of one database, plus the CPU of the Stripe
    calls alone (the StripeClient's HTTP). The fake Stripe is another process."""
    load_start = round(os.getloadavg()[0], 2)
    async with c.platform_env(backend) as env, c.session(timeout=120) as s:
        stripe_env(env, stripe_url)
        accounts = [f"bench-caster-{i}" for i in range(ACCOUNTS)]
        tokens = await c.issue_tokens(
            env, [("bench-maker", "maker")] + [(a, "caster") for a in accounts]
        )
        maker, casters = tokens[0], tokens[1:]
        await save_cards(env, s, stripe_url, accounts)
        argv = [sys.executable, str(Path(__file__).parent / "_serve_noworker.py"), "--port"]
        async with c.running_server(env, [*argv, "{port}"]) as server:
            cast_ids = await accept_paid_casts(s, server.url, maker, casters, 3 * n)

        clock = SystemClock()
        async with local_engine(env.settings()) as engine:
            ledger = SqlLedger(engine, clock)
            ledger.billing_enabled = True
            audit = AuditLog(env.data_dir / "audit" / "audit.jsonl")
            await audit.start()
            stripe = StripeClient(API_KEY, base_url=stripe_url)
            try:
                for cid in cast_ids:
                    claim = await ledger.claim(cid)
                    assert claim is not None
                    assert await ledger.finish(
                        cid, claim.attempt, succeeded=True, cost_cents=PRICE_CENTS
                    )
                common: dict[str, Any] = {
                    "config": BillingConfig(),
                    "stripe": stripe,
                    "ledger": ledger,
                    "inbox": Inbox(ledger, clock),
                    "audit": audit,
                    "counters": RevenueCounter(revenue=lambda _n: None, refund=lambda: None),
                    "kick_outbox": lambda: None,
                }
                now_svc = BillingService(store=BillingStore(ledger, clock), **common)
                old_svc = LegacyBillingService(store=LegacyBillingStore(ledger, clock), **common)
                customer = await now_svc.store.customer(accounts[0])
                assert customer is not None

                async def stripe_only(i: int) -> None:
                    await stripe.charge_off_session(
                        amount=PRICE_CENTS,
                        currency="usd",
                        customer=str(customer.stripe_customer_id),
                        payment_method=str(customer.payment_method_id),
                        idempotency_key=f"bench:cpu:{time.time_ns()}:{i}",
                        description="bench baseline",
                        metadata={},
                    )

                def job(svc: BillingService, ids: list[str]) -> Callable[[int], Awaitable[None]]:
                    async def run(i: int) -> None:
                        msg = SimpleNamespace(payload={"cast_id": ids[i]}, subject="billing.charge")
                        await svc.on_charge_job(msg)  # type: ignore[arg-type]

                    return run

                async def measure(fn: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
                    cpu0 = time.process_time()
                    wall = await drain(n, concurrency, fn)
                    return (time.process_time() - cpu0) * 1000 / n, wall

                await drain(min(n, 20), concurrency, stripe_only)  # warm the connection pool
                stripe_cpu, _ = await measure(stripe_only)
                old_cpu, old_wall = await measure(job(old_svc, cast_ids[:n]))
                new_cpu, new_wall = await measure(job(now_svc, cast_ids[n : 2 * n]))
                old_cpu2, _ = await measure(job(old_svc, cast_ids[2 * n :]))
                charges = await now_svc.store.charges()

                # the payment gate every paid cast passes on the request path: the account's
                # billing row, read through the ORM (before) or the bare driver (now)
                async def gate_orm(i: int) -> None:
                    await now_svc.store.customer(accounts[i % ACCOUNTS])

                async def gate_fast(i: int) -> None:
                    await now_svc.check_can_pay(accounts[i % ACCOUNTS])

                gate_orm_cpu, _ = await measure(gate_orm)
                gate_fast_cpu, _ = await measure(gate_fast)
            finally:
                await stripe.aclose()
                await audit.close()
                await ledger.aclose()
    ok = len([ch for ch in charges if ch.status == "succeeded"]) == 3 * n
    return {
        "backend": backend,
        "n": n,
        "concurrency": concurrency,
        "cpu_ms_per_settle_orm": round(c.median([old_cpu, old_cpu2]), 2),
        "cpu_ms_per_settle_orm_runs": [round(old_cpu, 2), round(old_cpu2, 2)],
        "cpu_ms_per_settle_fastsql": round(new_cpu, 2),
        "cpu_ms_per_stripe_call_alone": round(stripe_cpu, 2),
        "cpu_ms_per_payment_gate_orm": round(gate_orm_cpu, 3),
        "cpu_ms_per_payment_gate_fastsql": round(gate_fast_cpu, 3),
        "settled_per_s_orm": round(n / old_wall, 1),
        "settled_per_s_fastsql": round(n / new_wall, 1),
        "all_charged": ok,
        "loadavg_start": load_start,
        "loadavg_end": round(os.getloadavg()[0], 2),
    }


# ---------------------------------------------------------------------------- 2. latency


async def latency_phase(
    backend: str, billing: bool, rate: float, duration: float, warmup: float, stripe_url: str
) -> dict[str, Any]:
    load_start = round(os.getloadavg()[0], 2)
    async with c.platform_env(backend, workers=1) as env, c.session(timeout=60) as s:
        if billing:
            stripe_env(env, stripe_url)
        maker, caster = await c.issue_tokens(
            env, [("bench-maker", "maker"), ("bench-caster", "caster")]
        )
        if billing:
            await save_cards(env, s, stripe_url, ["bench-caster"])
        async with c.running_server(env) as server:
            url = server.url
            digest = await c.upload_hello(s, url, maker)
            await c.publish_hello(
                s, url, maker, digest, spell_id="bench.paid", flat_cents=PRICE_CENTS
            )
            bad: list[str] = []

            async def cast(i: int) -> bool:
                async with s.post(
                    f"{url}/v1/spells/bench.paid:cast",
                    json={"input": {"name": f"b{i}"}},
                    headers={**c.auth(caster), "Idempotency-Key": c.idem()},
                ) as r:
                    body = await r.json()
                    good = r.status == 202
                    if not good and len(bad) < 5:
                        bad.append(f"{r.status} {body}"[:300])
                    return good

            await open_loop(rate, warmup, cast)
            before = await stripe_stats(s, stripe_url)
            counts0 = await c.scrape_cast_counts(s, url)
            assert server.proc is not None
            cpu0 = c.proc_cpu_ms(server.proc.pid)
            result = await open_loop(rate, duration, cast)
            cpu1 = c.proc_cpu_ms(server.proc.pid)
            counts1 = await c.scrape_cast_counts(s, url)
            after = await stripe_stats(s, stripe_url)
            result.update(
                backend=backend,
                billing="on" if billing else "off",
                server_cpu_ms_per_req=round((cpu1 - cpu0) / result["sent"], 2),
                casts_succeeded_during_window=counts1.get("succeeded", 0)
                - counts0.get("succeeded", 0),
                payment_intents_during_window=after["payment_intents"] - before["payment_intents"],
                bad_responses=bad,
                server_alive=server.alive(),
                server_errors=server.errors_in_log()[:5],
                loadavg_start=load_start,
                loadavg_end=round(os.getloadavg()[0], 2),
            )
            return result


# ---------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    """c.machine_info() without its git calls (`git status` may rewrite the index while
    someone else commits); the tree's state is recorded by whoever runs it."""
    import platform

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


async def cpu_main(args: argparse.Namespace) -> int:
    n = 100 if args.quick else args.n
    backends = args.backends.split(",")
    if "postgresql" in backends and await c.pg_available():
        backends = [b for b in backends if b != "postgresql"]
    info = machine()
    results = []
    async with fake_stripe() as (stripe_url, _proc):
        for run in range(args.runs):
            for backend in backends:
                res = await cpu_phase(backend, n, args.concurrency, stripe_url)
                res["run"] = run
                results.append(res)
                print(
                    f"# run {run} {backend:<10} CPU ms per settled cast: ORM "
                    f"{res['cpu_ms_per_settle_orm']:.2f} {res['cpu_ms_per_settle_orm_runs']}, "
                    f"bare driver {res['cpu_ms_per_settle_fastsql']:.2f}, Stripe call alone "
                    f"{res['cpu_ms_per_stripe_call_alone']:.2f}; settled/s ORM "
                    f"{res['settled_per_s_orm']} vs {res['settled_per_s_fastsql']}; payment gate "
                    f"ORM {res['cpu_ms_per_payment_gate_orm']} vs "
                    f"{res['cpu_ms_per_payment_gate_fastsql']} ms; "
                    f"correct={res['all_charged']} load {res['loadavg_start']}->"
                    f"{res['loadavg_end']}",
                    file=sys.stderr,
                )
    out = c.write_json(
        "billing_settle_cpu",
        {
            "benchmark": "billing_settle --cpu",
            "command": " ".join([".venv/bin/python", "bench/billing_settle.py", *sys.argv[1:]]),
            "machine": info,
            "results": results,
        },
    )
    print(f"wrote {out.relative_to(c.ROOT)}")
    return 0 if all(r["all_charged"] for r in results) else 1


async def main(args: argparse.Namespace) -> int:
    if args.cpu:
        return await cpu_main(args)
    n = 100 if args.quick else args.n
    duration = 5.0 if args.quick else args.duration
    warmup = 1.0 if args.quick else 2.0
    backends = args.backends.split(",")
    if "postgresql" in backends:
        reason = await c.pg_available()
        if reason:
            print(f"# PostgreSQL unavailable ({reason}); skipping it", file=sys.stderr)
            backends = [b for b in backends if b != "postgresql"]
    info = machine()
    t0 = time.monotonic()
    settles: list[dict[str, Any]] = []
    lats: list[dict[str, Any]] = []
    async with fake_stripe() as (stripe_url, _proc):
        for run in range(args.runs):
            for backend in backends:
                res = await settle_phase(backend, n, args.concurrency, stripe_url)
                res.update(run=run, backend=backend)
                settles.append(res)
                print(
                    f"# run {run} {backend:<10} settle: {res['settled_per_s']:7.1f} casts/s "
                    f"(stripe only {res['stripe_only_per_s']:.1f}/s) correct={res['correct']} "
                    f"load {res['loadavg_start']}->{res['loadavg_end']}",
                    file=sys.stderr,
                )
                order = [True, False] if run % 2 == 0 else [False, True]
                for billing in order:
                    lat = await latency_phase(
                        backend, billing, args.rate, duration, warmup, stripe_url
                    )
                    lat.update(run=run)
                    lats.append(lat)
                    q = lat["latency_ms"]
                    print(
                        f"# run {run} {backend:<10} billing {lat['billing']:<3}: "
                        f"p50 {q.get('p50', nan):7.2f} p95 {q.get('p95', nan):7.2f} "
                        f"p99 {q.get('p99', nan):7.2f} ms, "
                        f"PIs {lat['payment_intents_during_window']}, "
                        f"errors {lat['errors']} load {lat['loadavg_start']}->{lat['loadavg_end']}",
                        file=sys.stderr,
                    )

    rows_s, summary_s = [], []
    for backend in backends:
        rs = [r for r in settles if r["backend"] == backend]
        item = {
            "backend": backend,
            "runs": len(rs),
            "median_settled_per_s": c.median([r["settled_per_s"] for r in rs]),
            "per_run_settled_per_s": [r["settled_per_s"] for r in rs],
            "median_stripe_only_per_s": c.median([r["stripe_only_per_s"] for r in rs]),
            "median_finish_hot_path_per_s": c.median([r["finish_hot_path_per_s"] for r in rs]),
            "median_redelivery_per_s": c.median([r["redelivery_per_s"] for r in rs]),
            "all_correct": all(r["correct"] for r in rs),
        }
        summary_s.append(item)
        rows_s.append(
            [
                backend,
                item["median_settled_per_s"],
                item["median_stripe_only_per_s"],
                f"{item['median_settled_per_s'] / item['median_stripe_only_per_s']:.2f}x",
                item["median_redelivery_per_s"],
                "yes" if item["all_correct"] else "NO",
            ]
        )
    rows_l, summary_l = [], []
    for backend in backends:
        per_run = {}
        for r in lats:
            if r["backend"] == backend:
                per_run.setdefault(r["run"], {})[r["billing"]] = r
        for mode in ("off", "on"):
            rs = [runs[mode] for runs in per_run.values() if mode in runs]
            med = {
                k: c.median([r["latency_ms"].get(k, nan) for r in rs])
                for k in ("p50", "p95", "p99")
            }
            ratios = [
                runs["on"]["latency_ms"]["p95"] / runs["off"]["latency_ms"]["p95"]
                for runs in per_run.values()
                if "on" in runs and "off" in runs and runs["off"]["latency_ms"].get("p95")
            ]
            item = {
                "backend": backend,
                "billing": mode,
                "runs": len(rs),
                "median_p50_ms": med["p50"],
                "median_p95_ms": med["p95"],
                "median_p99_ms": med["p99"],
                "per_run_p95_ms": [r["latency_ms"].get("p95") for r in rs],
                "p95_on_over_off_same_run": c.median(ratios) if mode == "on" else None,
                "server_cpu_ms_per_req": c.median([r["server_cpu_ms_per_req"] for r in rs]),
                "payment_intents_during_window": [r["payment_intents_during_window"] for r in rs],
                "errors": sum(r["errors"] for r in rs),
            }
            summary_l.append(item)
            rows_l.append(
                [
                    backend,
                    mode,
                    med["p50"],
                    med["p95"],
                    med["p99"],
                    "-" if mode == "off" else f"{item['p95_on_over_off_same_run']:.2f}x",
                    item["server_cpu_ms_per_req"],
                    sum(item["payment_intents_during_window"]),
                    item["errors"],
                ]
            )
    print(
        f"\nbilling_settle: {n} paid casts ({PRICE_CENTS} cents) from {ACCOUNTS} accounts, "
        f"{args.concurrency} job workers, median of {args.runs} runs; "
        f"{info['cpus']} CPUs {info['cpu_model']}; load avg {os.getloadavg()[0]:.2f}"
    )
    print(
        c.table(
            ["backend", "settled/s", "stripe only/s", "ratio", "redelivery/s", "correct"], rows_s
        )
    )
    print(
        f"\ncast latency at {args.rate:g}/s, {duration:g} s windows, billing on vs off (same run)"
    )
    print(
        c.table(
            [
                "backend",
                "billing",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "p95 on/off",
                "srv CPU ms/req",
                "PIs",
                "errors",
            ],
            rows_l,
        )
    )
    out = c.write_json(
        "billing_settle",
        {
            "benchmark": "billing_settle",
            "command": " ".join([".venv/bin/python", "bench/billing_settle.py", *sys.argv[1:]]),
            "quick": args.quick,
            "n": n,
            "concurrency": args.concurrency,
            "rate": args.rate,
            "duration_s": duration,
            "warmup_s": warmup,
            "runs": args.runs,
            "machine": info,
            "wall_s": round(time.monotonic() - t0, 1),
            "settle_summary": summary_s,
            "latency_summary": summary_l,
            "settle_raw": settles,
            "latency_raw": lats,
        },
    )
    print(f"wrote {out.relative_to(c.ROOT)}")
    wrong = [r for r in settles if not r["correct"]]
    crashed = [r for r in lats if not r["server_alive"]]
    failed = sum(r["errors"] for r in lats)
    if wrong or crashed or failed:
        print(
            f"PROBLEM: {len(wrong)} incorrect settlements, {len(crashed)} server crashes, "
            f"{failed} failed casts",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100 casts, 5 s windows")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("-n", type=int, default=300, help="paid casts settled per run")
    p.add_argument("--concurrency", type=int, default=8, help="billing job workers")
    p.add_argument("--rate", type=float, default=10.0, help="casts per second (latency)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per latency window")
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument(
        "--cpu",
        action="store_true",
        help="only CPU per settled cast: ORM settlement (before) vs bare-driver (now)",
    )
    sys.exit(asyncio.run(main(p.parse_args())))
