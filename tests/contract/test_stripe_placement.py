"""Where Stripe settlement runs (SPELL_BILLING_IN_SERVE): with NATS a `spell serve` leaves the
billing jobs to `spell worker` processes, so its CPU serves requests; embedded (no NATS) it
runs them itself. Two apps of one deployment share the database and the queues here (the
in-process queues stand in for JetStream's, as the Overrides seam allows)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.billing.routes import BILLING
from app.billing.service import BillingService
from app.bus.memory import MemoryQueue
from app.config import Settings
from app.web.app import Overrides, create_app
from app.web.keys import METRICS
from tests.conftest import FakeSandbox, Harness
from tests.contract.fake_stripe import API_KEY, FakeStripe, stripe_contract
from tests.contract.test_stripe_billing import processed, until

SECRET = "whsec_test_placement"
PAID = "com.example.paid"
BILLING_TASKS = {"jobs", "billing-periods", "billing-reconcile"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripe]:
    f = FakeStripe(contract=stripe_contract())
    async with f.serve():
        yield f
    assert f.violations == []
    assert f.idempotency_errors == []


def make_settings(
    tmp_path: Any, database_url: str | None, fake: FakeStripe, **env: Any
) -> Settings:
    return Settings(
        SPELL_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=database_url,
        SPELL_SECRET_KEY="s" * 40,
        SPELL_PUBLIC_URL="http://spell.test",
        SPELL_RATE_LIMIT_BURST=10_000,
        SPELL_RATE_LIMIT_PER_SEC=10_000,
        STRIPE_API_KEY=API_KEY,
        STRIPE_API_BASE=fake.url,
        STRIPE_WEBHOOK_SECRET=SECRET,
        **env,
    )


def background_tasks() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks() if not t.done()}


@pytest.mark.parametrize(
    ("nats", "stripe", "flag", "expected"),
    [
        pytest.param(None, True, None, True, id="embedded"),
        pytest.param(None, True, "0", True, id="embedded-ignores-off"),
        pytest.param("nats://127.0.0.1:4222", True, None, False, id="nats-default-off"),
        pytest.param("nats://127.0.0.1:4222", True, "1", True, id="nats-asked-on"),
        pytest.param("nats://127.0.0.1:4222", False, None, True, id="nats-no-stripe"),
    ],
)
def test_the_placement_rule(
    tmp_path: Any, nats: str | None, stripe: bool, flag: str | None, expected: bool
) -> None:
    env: dict[str, Any] = {"SPELL_DATA_DIR": str(tmp_path), "NATS_URL": nats}
    if stripe:
        env["STRIPE_API_KEY"] = API_KEY
    if flag is not None:
        env["SPELL_BILLING_IN_SERVE"] = flag
    assert Settings(**env).serve_jobs is expected


async def test_serve_with_nats_leaves_settlement_to_the_worker(
    aiohttp_client: Any, tmp_path: Any, database_url: str | None, fake: FakeStripe
) -> None:
    settings = make_settings(
        tmp_path,
        database_url,
        fake,
        NATS_URL="nats://127.0.0.1:4222",  # never dialled: both queues are given below
        SPELL_BILLING_RECONCILE_INTERVAL=3600,
    )
    runs, jobs = MemoryQueue(), MemoryQueue(ack_wait=60.0, max_deliver=6)
    serve_sandbox, worker_sandbox = FakeSandbox(), FakeSandbox()
    serve = await aiohttp_client(
        create_app(settings, overrides=Overrides(sandbox=serve_sandbox, queue=runs, jobs=jobs))
    )
    assert not BILLING_TASKS & background_tasks()  # serve consumes no jobs, runs no schedule
    h = Harness(client=serve, settings=settings, sandbox=serve_sandbox)
    maker = await h.token("acme-labs", "maker")
    await h.publish(maker, spell_id=PAID, flat_cents=60)
    worker_app = create_app(
        settings,
        role="worker",
        concurrency=1,
        overrides=Overrides(sandbox=worker_sandbox, queue=runs, jobs=jobs, job_backoff=0.05),
    )
    await aiohttp_client(worker_app)
    assert background_tasks() >= BILLING_TASKS  # the worker runs the jobs and the schedules

    # the card is saved through serve's webhook endpoint (verified, stored, acknowledged
    # there) and handled by the worker
    bob = await h.token("bob", "caster")
    r = await serve.post("/v1/billing/setup", headers={"Authorization": f"Bearer {bob}"})
    assert r.status == 201, await r.text()
    event = fake.complete_checkout((await r.json())["session_id"])
    headers, body = fake.signed(event, SECRET)
    r = await serve.post("/webhooks/stripe", data=body, headers=headers)
    assert r.status == 200 and (await r.json())["duplicate"] is False
    assert await processed(h, event["id"]) == "done"

    # a paid cast accepted by serve, run by the worker, charged by the worker
    r = await h.cast(bob, PAID)
    assert r.status == 202, await r.text()
    cast_id = str((await r.json())["cast_id"])
    assert (await h.wait_cast(bob, cast_id))["status"] == "succeeded"
    billing: BillingService = serve.app[BILLING]

    async def charged() -> bool:
        return any(c.status == "succeeded" for c in await billing.store.charges())

    await until(charged)
    assert serve_sandbox.runs == [] and len(worker_sandbox.runs) == 1
    [pi] = fake.requests_for("PostPaymentIntents")
    assert pi.idempotency_key == f"cast:{cast_id}:charge"
    # the revenue was counted by the process that collected it: the worker, not serve
    assert worker_app[METRICS].revenue_cents._value.get() == 60
    assert serve.app[METRICS].revenue_cents._value.get() == 0


async def test_embedded_serve_settles_by_itself(
    aiohttp_client: Any, tmp_path: Any, database_url: str | None, fake: FakeStripe
) -> None:
    settings = make_settings(tmp_path, database_url, fake, SPELL_BILLING_IN_SERVE="0")
    assert settings.serve_jobs  # without NATS nobody else could
    client = await aiohttp_client(create_app(settings, overrides=Overrides(sandbox=FakeSandbox())))
    assert {"jobs", "billing-periods"} <= background_tasks()
    assert client.app[BILLING] is not None
