"""Edge cases that once broke money safety, replays or input handling (found in review)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.store.models import Budget
from tests.conftest import FrozenClock, Harness


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime(2026, 2, 1, 0, 0, 5, tzinfo=UTC))


@pytest.fixture
def overrides(fake_sandbox: Any, clock: FrozenClock) -> Any:
    from app.web.app import Overrides

    return Overrides(sandbox=fake_sandbox, clock=clock, run_worker=False)


async def test_a_late_request_for_last_month_never_rolls_the_period_back(harness: Harness) -> None:
    ledger = harness.platform.ledger
    await harness.token("acct", "caster")
    async with ledger.write() as s:
        await ledger.set_caps(s, "acct", monthly=100, total=None, set_monthly=True, set_total=False)
    async with ledger.write() as s:
        assert await ledger.reserve(s, "acct", 80, "2026-02") == "2026-02"
    async with ledger.write() as s:
        # computed before midnight, executed after: counts in February, and is refused there
        assert await ledger.reserve(s, "acct", 60, "2026-01") is None
    async with ledger.write() as s:
        assert await ledger.reserve(s, "acct", 20, "2026-01") == "2026-02"
    async with ledger.sessions() as s:
        b = await s.scalar(select(Budget).where(Budget.account_id == "acct"))
        assert b is not None
        assert (b.period, b.monthly_reserved_cents, b.total_reserved_cents) == ("2026-02", 100, 100)


async def test_an_expired_key_is_taken_over_by_exactly_one_of_many_requests(
    harness: Harness, clock: FrozenClock
) -> None:
    ledger = harness.platform.ledger
    runs = 0

    async def work(s: Any) -> tuple[int, dict[str, Any]]:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.01)
        return 202, {"n": runs}

    principal = "p_test"
    assert (await ledger.run_idempotent(principal, "k", "h", work))[2] is False
    clock.advance(25 * 3600)
    results = await asyncio.gather(
        *(ledger.run_idempotent(principal, "k", "h", work) for _ in range(10))
    )
    assert runs == 2
    assert sum(1 for r in results if r[2] is False) == 1
    assert all(r[1] == {"n": 2} for r in results)


async def test_a_replay_answers_what_was_answered_even_after_a_new_version(
    harness: Harness,
) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    first = await harness.publish(maker)
    r1 = await harness.cast(caster, key="K1")
    assert r1.status == 202
    doc = {
        **first["document"],
        "version": "2.0.0",
        "inputs": {"type": "object", "required": ["name", "other"]},
    }
    r = await harness.client.post("/v1/spells", json=doc, headers=auth(maker))
    assert r.status == 201
    r2 = await harness.cast(caster, key="K1")
    assert r2.status == 202
    assert r2.headers["Idempotent-Replayed"] == "true"
    assert await r2.json() == await r1.json()


async def test_a_maker_cannot_publish_someone_elses_bundle(harness: Harness) -> None:
    acme = await harness.token("acme", "maker")
    evil = await harness.token("evil", "maker")
    pro = await harness.publish(acme, spell_id="com.acme.pro", flat_cents=500)
    digest = pro["document"]["execution"]["bundle"]
    doc = {**pro["document"], "id": "com.evil.free", "pricing": {"model": "flat", "flat_cents": 0}}
    r = await harness.client.post("/v1/spells", json=doc, headers=auth(evil))
    assert r.status == 422
    assert (await r.json())["error"]["detail"]["path"] == "/execution/bundle"
    assert digest in (await r.json())["error"]["message"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b"[" * 100_000, "nested too deeply", id="deep-nesting"),
        pytest.param(b'{"input": {"name": "\\ud800"}}', "invalid Unicode", id="lone-surrogate"),
        pytest.param(b'{"input": {"name": NaN}}', "NaN", id="nan"),
    ],
)
async def test_hostile_json_is_422(harness: Harness, body: bytes, expected: str) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker)
    r = await harness.client.post(
        "/v1/spells/com.example.test:cast",
        data=body,
        headers={**auth(caster), "Idempotency-Key": "x", "Content-Type": "application/json"},
    )
    assert r.status == 422, await r.text()
    assert expected in (await r.json())["error"]["message"]


async def test_a_remote_ref_in_an_input_schema_is_refused_at_publish(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    digest = await harness.upload_bundle(maker, {"spell.json": "{}", "main.py": ""})
    doc = {
        "id": "com.example.ref",
        "name": "Ref",
        "execution": {"mode": "service", "entrypoint": "main.py", "bundle": digest},
        "inputs": {"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}},
    }
    r = await harness.client.post("/v1/spells", json=doc, headers=auth(maker))
    assert r.status == 422
    assert "$ref" in (await r.json())["error"]["message"]


async def test_a_non_ascii_artifact_signature_is_401_not_500(harness: Harness) -> None:
    r = await harness.client.get("/v1/artifacts/a_x?exp=9999999999&sig=%C3%A9")
    assert r.status == 401


async def test_large_bodies_are_read_whole(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    digest = await harness.upload_bundle(maker, {"spell.json": "{}", "main.py": ""})
    doc = {
        "id": "com.example.big",
        "name": "Big",
        "description": "d" * 3000,
        "execution": {"mode": "service", "entrypoint": "main.py", "bundle": digest},
        "inputs": {
            "type": "object",
            "properties": {
                f"p{i}": {"type": "string", "description": "x" * 500} for i in range(1500)
            },
        },
    }
    raw = json.dumps(doc).encode()
    assert len(raw) > 700_000

    async def chunks() -> Any:
        for i in range(0, len(raw), 10_000):
            yield raw[i : i + 10_000]

    r = await harness.client.post(
        "/v1/spells", data=chunks(), headers={**auth(maker), "Content-Type": "application/json"}
    )
    assert r.status == 201, (await r.text())[:300]


async def test_sse_resumed_after_the_terminal_event_closes(
    harness: Harness, clock: FrozenClock
) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker)
    cast_id = (await (await harness.cast(caster)).json())["cast_id"]
    ledger = harness.platform.ledger
    claim = await ledger.claim(cast_id)
    assert claim is not None
    await ledger.finish(cast_id, claim.attempt, succeeded=True)
    events = await ledger.events_after(cast_id, 0)
    last = events[-1].seq
    r = await asyncio.wait_for(
        harness.client.get(
            f"/v1/casts/{cast_id}/events", headers={**auth(caster), "Last-Event-ID": str(last)}
        ),
        5,
    )
    assert "event:" not in await asyncio.wait_for(r.text(), 5)


async def test_idempotency_keys_expire_after_their_ttl(
    harness: Harness, clock: FrozenClock
) -> None:
    caster = await harness.token("c", "caster")
    body = {"monthly_cents": 5}
    headers = {**auth(caster), "Idempotency-Key": "caps"}
    assert (await harness.client.post("/v1/billing/caps", json=body, headers=headers)).headers[
        "Idempotent-Replayed"
    ] == "false"
    clock.advance(3600)
    r = await harness.client.post("/v1/billing/caps", json={"monthly_cents": 6}, headers=headers)
    assert r.status == 409
    clock.current += timedelta(hours=24)
    caster = await harness.token("c", "caster")  # the old token expired meanwhile
    headers = {**auth(caster), "Idempotency-Key": "caps"}
    r = await harness.client.post("/v1/billing/caps", json={"monthly_cents": 6}, headers=headers)
    assert r.status == 200
    assert r.headers["Idempotent-Replayed"] == "false"
    assert await harness.platform.ledger.sweep_idempotency() == 0
