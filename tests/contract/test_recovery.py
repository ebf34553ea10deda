"""Nothing is lost on a crash: casts accepted before a process died run after the restart."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from app.config import Settings
from app.web.app import Overrides, create_app
from tests.conftest import FakeSandbox, Harness


async def _harness(aiohttp_client: Any, settings: Settings, **ov: Any) -> Harness:
    sandbox = ov.pop("sandbox", FakeSandbox())
    client = await aiohttp_client(create_app(settings, overrides=Overrides(sandbox=sandbox, **ov)))
    return Harness(client=client, settings=settings, sandbox=sandbox)


async def test_a_cast_interrupted_mid_run_is_run_again_after_a_restart(
    aiohttp_client: Any, settings: Settings
) -> None:
    settings.run_lease_sec = 0.6  # the dead worker's lease lapses quickly
    first = await _harness(aiohttp_client, settings)
    maker = await first.token("m", "maker")
    caster = await first.token("c", "caster")
    await first.publish(maker, flat_cents=2)
    first.sandbox.gate.clear()  # the run starts and hangs
    cast_id = (await (await first.cast(caster)).json())["cast_id"]
    while not first.sandbox.runs:
        await asyncio.sleep(0.01)
    await first.client.close()  # the process goes away mid-run

    second = await _harness(aiohttp_client, settings)
    done = await second.wait_cast(caster, cast_id)
    assert done["status"] == "succeeded"
    assert done["cost_cents"] == 2
    caps = await (
        await second.client.get("/v1/billing/caps", headers={"Authorization": f"Bearer {caster}"})
    ).json()
    assert caps["monthly"]["used_cents"] == 2
    assert caps["monthly"]["reserved_cents"] == 0
    assert len(second.sandbox.runs) == 1


async def test_a_cast_whose_run_request_was_never_published_is_published_after_restart(
    aiohttp_client: Any, settings: Settings
) -> None:
    first = await _harness(aiohttp_client, settings, run_worker=False)
    maker = await first.token("m", "maker")
    caster = await first.token("c", "caster")
    await first.publish(maker)
    cast_id = (await (await first.cast(caster)).json())["cast_id"]
    assert len(await first.platform.ledger.unsent_outbox()) == 1
    await first.client.close()

    second = await _harness(aiohttp_client, settings)
    assert (await second.wait_cast(caster, cast_id))["status"] == "succeeded"
    assert await second.platform.ledger.unsent_outbox() == []


class _Later:
    def __init__(self, clock: Any, *, seconds: float) -> None:
        self.clock = clock
        self.delta = timedelta(seconds=seconds)

    def now(self) -> datetime:
        return self.clock.now() + self.delta  # type: ignore[no-any-return]


async def test_a_stale_attempt_can_neither_finish_nor_bill_a_cast(
    aiohttp_client: Any, settings: Settings
) -> None:
    h = await _harness(aiohttp_client, settings, run_worker=False)
    maker = await h.token("m", "maker")
    caster = await h.token("c", "caster")
    await h.publish(maker, flat_cents=3)
    cast_id = (await (await h.cast(caster)).json())["cast_id"]
    ledger = h.platform.ledger
    stale = await ledger.claim(cast_id)
    assert stale is not None and stale.attempt == 1
    assert await ledger.claim(cast_id) is None  # nobody else may claim a running cast
    assert await ledger.reap_expired() == []  # its lease is still live
    h.platform.clock = ledger.clock = _Later(ledger.clock, seconds=31)
    assert await ledger.reap_expired() == [cast_id]  # its worker was lost
    fresh = await ledger.claim(cast_id)
    assert fresh is not None and fresh.attempt == 2
    assert await ledger.finish(cast_id, 1, succeeded=True, cost_cents=3) is None
    done = await ledger.finish(cast_id, 2, succeeded=True, cost_cents=3)
    assert done is not None and done.status == "succeeded"
    assert await ledger.finish(cast_id, 2, succeeded=True, cost_cents=3) is None
    lines = await ledger.ledger_lines("c")
    assert [ln.amount_cents for ln in lines] == [3]
    view = await ledger.budget("c")
    assert view is not None and view.monthly.used_cents == 3 and view.monthly.reserved_cents == 0


async def test_queued_casts_already_handed_to_the_dead_queue_still_run_after_restart(
    aiohttp_client: Any, settings: Settings
) -> None:
    settings.workers = 1
    settings.run_lease_sec = 0.6
    first = await _harness(aiohttp_client, settings)
    maker = await first.token("m", "maker")
    caster = await first.token("c", "caster")
    await first.publish(maker, flat_cents=10)
    first.sandbox.gate.clear()
    ids = [(await (await first.cast(caster)).json())["cast_id"] for _ in range(3)]
    while not first.sandbox.runs or await first.platform.ledger.unsent_outbox():
        await asyncio.sleep(0.01)
    await first.client.close()

    second = await _harness(aiohttp_client, settings)
    for cast_id in ids:
        assert (await second.wait_cast(caster, cast_id))["status"] == "succeeded"
    caps = await (
        await second.client.get("/v1/billing/caps", headers={"Authorization": f"Bearer {caster}"})
    ).json()
    assert (caps["monthly"]["used_cents"], caps["monthly"]["reserved_cents"]) == (30, 0)
