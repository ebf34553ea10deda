"""The rarer audit records go through the audit outbox too: each is an ``audit_outbox`` row
committed in the transaction of the state change it records (a crash right after the commit
cannot lose it), and reaches the audit file exactly once after a drain.

``spell.published``, ``bundle.uploaded``, ``caps.set`` (app/services/platform.py) and the
``cast.failed`` of a dead-lettered run request (app/worker/consumer.py); the GitHub workflow
records are in tests/contract/test_github_flow.py (with these helpers).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.bus.memory import MemoryQueue
from app.config import Settings
from app.store.audit_outbox import AuditDrainer
from app.web.app import Overrides, create_app
from app.worker.consumer import RunConsumer
from app.worker.runs import RunExecutor, RunnerConfig
from tests.conftest import DeadMessage, Harness

# ---------------------------------------------------------------------------- helpers


def in_file(h: Harness, event: str) -> list[dict[str, Any]]:
    path = h.settings.data_dir / "audit" / "audit.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == event]


async def drained(h: Harness, event: str) -> list[dict[str, Any]]:
    """The file's ``event`` records once everything committed so far is in it."""
    await AuditDrainer(h.platform.ledger.fast, h.platform.audit).drain(wait=True)
    assert await h.pending_audit(event) == []
    return in_file(h, event)


def as_committed(record: dict[str, Any], row: dict[str, Any]) -> None:
    """The file's record is the row's content (its event id in ``data``)."""
    assert record["data"] == {**row["data"], "event_id": row["event_id"]}
    for key in ("actor", "cast_id", "input_hash", "amount_cents", "currency", "traceparent"):
        assert record.get(key) == row[key], key


# ---------------------------------------------------------------------------- platform


async def test_a_publish_commits_its_records_with_the_bundle_and_the_version(
    harness: Harness,
) -> None:
    h = harness
    maker = await h.token("m", "maker")
    async with h.drains_held():
        detail = await h.publish(maker)
        [bundle] = await h.pending_audit("bundle.uploaded")
        [published] = await h.pending_audit("spell.published")
        assert published["data"] == {
            "spell_id": "com.example.test",
            "version": detail["latest_version"],
            "document_hash": published["data"]["document_hash"],
        }
        assert published["data"]["document_hash"].startswith("sha256:")
        assert published["actor"] == bundle["actor"] and published["actor"].startswith("p_")
        assert set(bundle["data"]) == {"digest", "size"}
        assert (bundle["cast_id"], bundle["amount_cents"]) == (None, None)
        # ... and nothing was appended behind the drainer's back
        assert in_file(h, "spell.published") == in_file(h, "bundle.uploaded") == []
        # the identical document again is no new version: no second record
        doc = {
            "id": "com.example.test",
            "name": "Test spell",
            "execution": {
                "mode": "service",
                "entrypoint": "main.py",
                "bundle": bundle["data"]["digest"],
            },
            "pricing": {"model": "flat", "currency": "USD", "flat_cents": 0},
            "inputs": {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
            },
        }
        r = await h.client.post(
            "/v1/spells", json=doc, headers={"Authorization": f"Bearer {maker}"}
        )
        assert r.status == 200, await r.text()
        assert len(await h.pending_audit("spell.published")) == 1
    [record] = await drained(h, "spell.published")
    as_committed(record, published)
    [record] = await drained(h, "bundle.uploaded")
    as_committed(record, bundle)


async def test_caps_set_commits_its_record_with_the_caps(harness: Harness) -> None:
    h = harness
    caster = await h.token("c", "caster")
    headers = {"Authorization": f"Bearer {caster}", "Idempotency-Key": "caps-1"}
    async with h.drains_held():
        r = await h.client.post("/v1/billing/caps", json={"monthly_cents": 300}, headers=headers)
        assert r.status == 200, await r.text()
        [row] = await h.pending_audit("caps.set")
        assert row["data"] == {"account": "c", "monthly_cents": 300}
        assert row["actor"].startswith("p_")
        assert in_file(h, "caps.set") == []
        # a replay (same key) changes nothing and records nothing
        again = await h.client.post(
            "/v1/billing/caps", json={"monthly_cents": 300}, headers=headers
        )
        assert again.status == 200 and again.headers.get("Idempotent-Replayed") == "true"
        # a refused request (unknown account) commits no record either
        op = await h.token("ops", "operator")
        bad = await h.client.post(
            "/v1/billing/caps",
            json={"account": "nobody", "total_cents": 1},
            headers={"Authorization": f"Bearer {op}", "Idempotency-Key": "caps-2"},
        )
        assert bad.status == 404, await bad.text()
        assert len(await h.pending_audit("caps.set")) == 1
    [record] = await drained(h, "caps.set")
    as_committed(record, row)
    view = await h.platform.ledger.budget("c")
    assert view is not None and view.monthly.cap_cents == 300


# ---------------------------------------------------------------------------- dead letters


@pytest.fixture
async def idle(aiohttp_client: Any, settings: Settings, fake_sandbox: Any) -> Harness:
    """A server that runs no casts itself (they stay queued)."""
    app = create_app(settings, overrides=Overrides(sandbox=fake_sandbox, run_worker=False))
    return Harness(await aiohttp_client(app), settings, fake_sandbox)


async def test_a_dead_lettered_cast_commits_its_failure_record_with_it(idle: Harness) -> None:
    h = idle
    maker, caster = await h.token("m", "maker"), await h.token("c", "caster")
    await h.publish(maker, flat_cents=8)
    cast_id = (await (await h.cast(caster)).json())["cast_id"]
    consumer = RunConsumer(
        MemoryQueue(),
        RunExecutor(
            platform=h.platform,
            sandbox=h.sandbox,
            config=RunnerConfig(
                data_dir=h.settings.data_dir,
                max_output_bytes=h.settings.max_output_bytes,
                artifact_ttl=h.settings.artifact_ttl,
                sandbox_uid=h.settings.sandbox_uid,
            ),
        ),
        concurrency=1,
    )
    async with h.drains_held():
        msg = DeadMessage({"cast_id": cast_id}, num_delivered=3)
        await consumer.handle(msg)  # type: ignore[arg-type]
        assert msg.acks == ["ack"]
        cast = await h.platform.ledger.get_cast(cast_id)
        assert cast is not None and cast.status == "failed"
        [row] = [r for r in await h.pending_audit("cast.failed") if r["cast_id"] == cast_id]
        assert (row["actor"], row["amount_cents"], row["currency"]) == ("worker", 0, "USD")
        assert (row["input_hash"], row["traceparent"]) == (cast.input_hash, cast.traceparent)
        assert row["data"] == {
            "error": {"code": "INTERNAL", "message": cast.error_message},
            "released_cents": 8,
        }
        assert in_file(h, "cast.failed") == []
        # the advisory again: the cast ended already, nothing more is recorded
        await consumer.handle(DeadMessage({"cast_id": cast_id}))  # type: ignore[arg-type]
        assert len(await h.pending_audit("cast.failed")) == 1
    [record] = [r for r in await drained(h, "cast.failed") if r["cast_id"] == cast_id]
    as_committed(record, row)
