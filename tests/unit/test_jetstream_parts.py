"""The JetStream wiring's own logic, without a NATS server: names, settings, and what the run
consumer does with a dead letter and on a drain (on the embedded ledger, with the fake sandbox).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from app.bus.jetstream import JetStreamConfig
from app.bus.memory import MemoryQueue
from app.config import Settings
from app.web.app import Overrides, create_app
from app.web.keys import CONSUMER
from app.worker.consumer import RunConsumer, is_dead_letter
from app.worker.runs import RunExecutor, RunnerConfig
from tests.conftest import DeadMessage, Harness


def test_names_and_subjects_follow_the_namespace() -> None:
    plain = JetStreamConfig(url="nats://x")
    assert [plain.stream(k) for k in ("runs", "jobs", "dead")] == [
        "SPELL_RUNS",
        "SPELL_JOBS",
        "SPELL_DEAD",
    ]
    assert plain.subject_prefix == ""
    ns = JetStreamConfig(url="nats://x", namespace="t1a")
    assert ns.stream("runs") == "SPELL_T1A_RUNS"
    assert ns.subject_prefix == "t1a."


def test_serve_runs_casts_itself_only_without_nats_unless_asked(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NATS_URL", "SPELL_SERVE_RUNS", "SPELL_WORKERS", "SPELL_NATS_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    base = {"SPELL_DATA_DIR": str(tmp_path)}
    assert Settings(**base).embedded_runs
    assert not Settings(**base, NATS_URL="nats://127.0.0.1:4222").embedded_runs
    assert Settings(**base, NATS_URL="nats://127.0.0.1:4222", SPELL_SERVE_RUNS="1").embedded_runs
    assert not Settings(**base, SPELL_SERVE_RUNS="0").embedded_runs
    assert not Settings(**base, SPELL_WORKERS=0).embedded_runs
    empty = Settings(**base, SPELL_SERVE_RUNS="", NATS_URL="")
    assert empty.serve_runs is None and empty.nats_url is None and empty.embedded_runs
    with pytest.raises(ValidationError):
        Settings(**base, SPELL_NATS_NAMESPACE="Has.Dots")


def _consumer(h: Harness) -> RunConsumer:
    consumer = h.client.app[CONSUMER]  # type: ignore[index]
    assert isinstance(consumer, RunConsumer)
    return consumer


def _standalone(h: Harness) -> RunConsumer:
    """A run consumer of a server that runs no worker of its own (nothing claims casts)."""
    executor = RunExecutor(
        platform=h.platform,
        sandbox=h.sandbox,
        config=RunnerConfig(
            data_dir=h.settings.data_dir,
            max_output_bytes=h.settings.max_output_bytes,
            artifact_ttl=h.settings.artifact_ttl,
            sandbox_uid=h.settings.sandbox_uid,
        ),
    )
    return RunConsumer(MemoryQueue(), executor, concurrency=1)


@pytest.fixture
def idle(aiohttp_client: Any, settings: Settings, fake_sandbox: Any) -> Any:
    async def make() -> Harness:
        app = create_app(settings, overrides=Overrides(sandbox=fake_sandbox, run_worker=False))
        return Harness(await aiohttp_client(app), settings, fake_sandbox)

    return make


async def test_a_dead_letter_fails_a_queued_cast_and_releases_its_money(idle: Any) -> None:
    h = await idle()
    maker, caster = await h.token("m", "maker"), await h.token("c", "caster")
    await h.publish(maker, flat_cents=8)
    cast_id = (await (await h.cast(caster)).json())["cast_id"]
    ledger = h.platform.ledger
    view = await ledger.budget("c")
    assert view is not None and view.monthly.reserved_cents == 8
    msg = DeadMessage({"cast_id": cast_id}, num_delivered=3)
    assert is_dead_letter(msg)  # type: ignore[arg-type]
    await _standalone(h).handle(msg)  # type: ignore[arg-type]
    row = await ledger.get_cast(cast_id)
    assert row is not None and row.status == "failed"
    assert row.error_code == "INTERNAL"
    assert "delivered 3 times" in (row.error_message or "")
    assert "dead-lettered" in (row.error_message or "")
    view = await ledger.budget("c")
    assert view is not None
    assert (view.monthly.used_cents, view.monthly.reserved_cents) == (0, 0)
    assert await ledger.ledger_lines("c") == []
    assert msg.acks == ["ack"]
    assert h.sandbox.runs == []


async def test_a_dead_letter_leaves_a_cast_under_a_live_lease_alone(idle: Any) -> None:
    h = await idle()
    maker, caster = await h.token("m", "maker"), await h.token("c", "caster")
    await h.publish(maker, flat_cents=8)
    cast_id = (await (await h.cast(caster)).json())["cast_id"]
    ledger = h.platform.ledger
    assert await ledger.claim(cast_id, lease_sec=60) is not None  # a live worker runs it
    msg = DeadMessage({"cast_id": cast_id})
    await _standalone(h).handle(msg)  # type: ignore[arg-type]
    row = await ledger.get_cast(cast_id)
    assert row is not None and row.status == "running"
    assert msg.acks == ["ack"]
    # a lapsed lease is a dead worker's: then the dead letter ends the cast
    h.platform.clock = ledger.clock = _Later(ledger.clock, seconds=61)
    again = DeadMessage({"cast_id": cast_id})
    await _standalone(h).handle(again)  # type: ignore[arg-type]
    row = await ledger.get_cast(cast_id)
    assert row is not None and row.status == "failed" and row.error_code == "INTERNAL"
    assert again.acks == ["ack"]


async def test_a_dead_letter_of_a_finished_cast_is_only_acked(harness: Harness) -> None:
    maker, caster = await harness.token("m", "maker"), await harness.token("c", "caster")
    await harness.publish(maker, flat_cents=2)
    cast_id = (await (await harness.cast(caster)).json())["cast_id"]
    assert (await harness.wait_cast(caster, cast_id))["status"] == "succeeded"
    msg = DeadMessage({"cast_id": cast_id})
    await _consumer(harness).handle(msg)  # type: ignore[arg-type]
    row = await harness.platform.ledger.get_cast(cast_id)
    assert row is not None and row.status == "succeeded"
    assert msg.acks == ["ack"]
    lines = await harness.platform.ledger.ledger_lines("c")
    assert [ln.amount_cents for ln in lines] == [2]


class _Later:
    def __init__(self, clock: Any, *, seconds: float) -> None:
        self.clock = clock
        self.delta = timedelta(seconds=seconds)

    def now(self) -> datetime:
        return self.clock.now() + self.delta  # type: ignore[no-any-return]


async def test_drain_lets_the_running_cast_finish_and_stops_fetching(harness: Harness) -> None:
    maker, caster = await harness.token("m", "maker"), await harness.token("c", "caster")
    await harness.publish(maker, flat_cents=1)
    harness.sandbox.gate.clear()
    first = (await (await harness.cast(caster)).json())["cast_id"]
    while not harness.sandbox.runs:
        await asyncio.sleep(0.01)
    consumer = _consumer(harness)
    task = next(t for t in asyncio.all_tasks() if t.get_name() == "run-consumer")
    draining = asyncio.create_task(consumer.drain(task, timeout=30))
    while not consumer.stopping.is_set():
        await asyncio.sleep(0.01)
    second = (await (await harness.cast(caster)).json())["cast_id"]  # accepted, not run here
    await asyncio.sleep(0.05)
    assert not draining.done()
    harness.sandbox.gate.set()
    assert await draining is True
    ledger = harness.platform.ledger
    done = await ledger.get_cast(first)
    assert done is not None and done.status == "succeeded"
    waiting = await ledger.get_cast(second)
    assert waiting is not None and waiting.status == "queued"
    assert len(harness.sandbox.runs) == 1
    assert task.done()
