"""The core loop through the HTTP API: cast → cap → run → artifact → ledger, with a fake sandbox.

Runs on SQLite by default and on PostgreSQL when SPELL_TEST_DATABASE_URL is set.
"""

from __future__ import annotations

import asyncio
import io
import zipfile
from typing import Any

import pytest

from app.store.auditlog import verify_file
from tests.conftest import FrozenClock, Harness


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_cast_runs_and_its_artifact_downloads(harness: Harness) -> None:
    maker = await harness.token("acme-maker", "maker")
    caster = await harness.token("ACME", "caster")
    await harness.publish(maker)

    r = await harness.cast(caster, body={"input": {"name": "world"}})
    assert r.status == 202, await r.text()
    accepted = await r.json()
    assert set(accepted) >= {"cast_id", "status", "progress_sse", "estimate_cents"}
    assert accepted["status"] == "queued"
    assert accepted["progress_sse"].endswith(f"/v1/casts/{accepted['cast_id']}/events")

    done = await harness.wait_cast(caster, accepted["cast_id"])
    assert done["status"] == "succeeded"
    assert done["spell_id"] == "com.example.test"
    assert done["mode"] == "service"
    assert done["cost_cents"] == 0
    assert "error" not in done

    url = done["artifact_url"]
    path = url[url.index("/v1/") :]
    r = await harness.client.get(path)
    assert r.status == 200
    zf = zipfile.ZipFile(io.BytesIO(await r.read()))
    assert zf.read("result.txt") == b'{"name": "world"}'


async def test_a_crashing_spell_fails_with_a_clear_code_and_releases_its_reservation(
    harness: Harness,
) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker, flat_cents=7)
    harness.sandbox.behaviour = "crash"

    r = await harness.cast(caster)
    assert r.status == 202
    done = await harness.wait_cast(caster, (await r.json())["cast_id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "SPELL_FAILED"
    assert "ValueError: boom" in done["error"]["message"]
    assert done["cost_cents"] == 0

    caps = await (await harness.client.get("/v1/billing/caps", headers=auth(caster))).json()
    assert caps["monthly"]["reserved_cents"] == 0
    assert caps["monthly"]["used_cents"] == 0
    assert caps["total"]["reserved_cents"] == 0


async def test_a_timeout_is_reported_as_TIMEOUT(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker, flat_cents=3)
    harness.sandbox.behaviour = "timeout"
    r = await harness.cast(caster)
    done = await harness.wait_cast(caster, (await r.json())["cast_id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "TIMEOUT"


async def test_success_settles_the_actual_cost_into_used_and_the_ledger(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("payer", "caster")
    await harness.publish(maker, flat_cents=25)
    r = await harness.cast(caster)
    assert r.status == 202
    assert (await r.json())["estimate_cents"] == 25
    done = await harness.wait_cast(caster, (await r.json())["cast_id"])
    assert done["cost_cents"] == 25

    caps = await (await harness.client.get("/v1/billing/caps", headers=auth(caster))).json()
    assert caps["monthly"]["used_cents"] == 25
    assert caps["monthly"]["reserved_cents"] == 0
    assert caps["total"]["used_cents"] == 25
    lines = await harness.platform.ledger.ledger_lines("payer")
    assert [(ln.kind, ln.amount_cents, ln.idempotency_ref) for ln in lines] == [
        ("charge", 25, f"cast:{done['cast_id']}:charge")
    ]


# ------------------------------------------------------------------------------- idempotency


async def test_same_key_same_request_replays_the_stored_response(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker)
    first = await harness.cast(caster, key="k-1")
    second = await harness.cast(caster, key="k-1")
    assert first.status == second.status == 202
    assert first.headers["Idempotent-Replayed"] == "false"
    assert second.headers["Idempotent-Replayed"] == "true"
    assert await first.json() == await second.json()
    assert await harness.platform.ledger.count_casts() == 1


async def test_same_key_different_request_is_a_conflict(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker)
    assert (await harness.cast(caster, key="k", body={"input": {"name": "a"}})).status == 202
    r = await harness.cast(caster, key="k", body={"input": {"name": "b"}})
    assert r.status == 409
    assert (await r.json())["error"]["code"] == "IDEMPOTENCY_CONFLICT"


async def test_keys_are_per_principal(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    a = await harness.token("a", "caster")
    b = await harness.token("b", "caster")
    await harness.publish(maker)
    ra = await harness.cast(a, key="shared")
    rb = await harness.cast(b, key="shared")
    assert ra.status == rb.status == 202
    assert (await ra.json())["cast_id"] != (await rb.json())["cast_id"]


async def test_a_missing_idempotency_key_is_a_422_naming_the_header(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker)
    r = await harness.client.post(
        "/v1/spells/com.example.test:cast", json={"input": {"name": "x"}}, headers=auth(caster)
    )
    assert r.status == 422
    err = (await r.json())["error"]
    assert err["code"] == "VALIDATION_ERROR"
    assert "Idempotency-Key" in err["message"]


async def test_fifty_concurrent_casts_with_one_key_start_exactly_one_run(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker, flat_cents=1)
    harness.sandbox.gate.clear()  # hold the run so every request sees it in flight
    responses = await asyncio.gather(*(harness.cast(caster, key="same") for _ in range(50)))
    statuses = [r.status for r in responses]
    bodies = [await r.json() for r in responses]
    assert statuses == [202] * 50
    assert len({b["cast_id"] for b in bodies}) == 1
    replayed = [r.headers["Idempotent-Replayed"] for r in responses]
    assert replayed.count("false") == 1
    assert await harness.platform.ledger.count_casts() == 1
    harness.sandbox.gate.set()
    await harness.wait_cast(caster, bodies[0]["cast_id"])
    assert len(harness.sandbox.runs) == 1
    caps = await (await harness.client.get("/v1/billing/caps", headers=auth(caster))).json()
    assert caps["monthly"]["used_cents"] == 1


# ------------------------------------------------------------------------------- caps


async def _set_caps(harness: Harness, token: str, body: dict[str, Any], key: str = "") -> Any:
    return await harness.client.post(
        "/v1/billing/caps",
        json=body,
        headers={**auth(token), "Idempotency-Key": key or f"caps-{id(body)}"},
    )


async def test_concurrent_casts_against_a_small_cap_never_overspend(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("hot", "caster")
    await harness.publish(maker, flat_cents=3)
    r = await _set_caps(harness, caster, {"monthly_cents": 31, "total_cents": None})
    assert r.status == 200, await r.text()
    harness.sandbox.gate.clear()

    responses = await asyncio.gather(*(harness.cast(caster) for _ in range(40)))
    statuses = sorted(r.status for r in responses)
    assert statuses.count(202) == 10  # 10 x 3 = 30 <= 31; an 11th would be 33
    assert statuses.count(402) == 30
    refusal = await next(r for r in responses if r.status == 402).json()
    assert refusal["error"]["code"] == "BUDGET_CAP_EXCEEDED"
    assert refusal["error"]["retry_after"] > 0

    caps = await (await harness.client.get("/v1/billing/caps", headers=auth(caster))).json()
    assert caps["monthly"]["reserved_cents"] == 30
    assert caps["monthly"]["remaining_cents"] == 1
    harness.sandbox.gate.set()
    for r in responses:
        if r.status == 202:
            await harness.wait_cast(caster, (await r.json())["cast_id"])
    caps = await (await harness.client.get("/v1/billing/caps", headers=auth(caster))).json()
    assert caps["monthly"]["used_cents"] == 30
    assert caps["monthly"]["reserved_cents"] == 0
    assert await harness.platform.ledger.count_casts() == 10


async def test_the_total_cap_refuses_without_retry_after(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker, flat_cents=5)
    await _set_caps(harness, caster, {"monthly_cents": None, "total_cents": 4})
    r = await harness.cast(caster)
    assert r.status == 402
    err = (await r.json())["error"]
    assert err["code"] == "BUDGET_CAP_EXCEEDED"
    assert "retry_after" not in err
    assert err["detail"]["cap"] == "total"


async def test_a_refused_cast_leaves_the_key_free_to_retry_after_raising_the_cap(
    harness: Harness,
) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker, flat_cents=5)
    await _set_caps(harness, caster, {"monthly_cents": 0}, key="a")
    assert (await harness.cast(caster, key="retry-me")).status == 402
    await _set_caps(harness, caster, {"monthly_cents": 100}, key="b")
    assert (await harness.cast(caster, key="retry-me")).status == 202


async def test_caps_show_cap_used_reserved_remaining(harness: Harness) -> None:
    caster = await harness.token("c", "caster")
    r = await _set_caps(harness, caster, {"monthly_cents": 500, "total_cents": 9000})
    body = await r.json()
    assert body["monthly"] == {
        "cap_cents": 500,
        "used_cents": 0,
        "reserved_cents": 0,
        "remaining_cents": 500,
    }
    assert body["total"]["cap_cents"] == 9000
    got = await (await harness.client.get("/v1/billing/caps", headers=auth(caster))).json()
    assert got["monthly"] == body["monthly"]


async def test_only_an_operator_sets_another_accounts_caps(harness: Harness) -> None:
    caster = await harness.token("c", "caster")
    await harness.token("other", "caster")
    op = await harness.token("ops", "operator")
    r = await _set_caps(harness, caster, {"account": "other", "monthly_cents": 1})
    assert r.status == 403
    assert (await r.json())["error"]["code"] == "FORBIDDEN"
    r = await _set_caps(harness, op, {"account": "other", "monthly_cents": 1})
    assert r.status == 200
    assert (await r.json())["account"] == "other"


async def test_caps_post_needs_an_idempotency_key(harness: Harness) -> None:
    caster = await harness.token("c", "caster")
    r = await harness.client.post(
        "/v1/billing/caps", json={"monthly_cents": 1}, headers=auth(caster)
    )
    assert r.status == 422
    assert "Idempotency-Key" in (await r.json())["error"]["message"]


@pytest.fixture
def clock() -> FrozenClock:
    from datetime import UTC, datetime

    return FrozenClock(datetime(2026, 11, 30, 23, 59, 0, tzinfo=UTC))


@pytest.fixture
def overrides(fake_sandbox: Any, clock: FrozenClock) -> Any:
    from app.web.app import Overrides

    return Overrides(sandbox=fake_sandbox, clock=clock)


async def test_the_monthly_cap_resets_at_the_utc_month_boundary(
    harness: Harness, clock: FrozenClock
) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker, flat_cents=10)
    await _set_caps(harness, caster, {"monthly_cents": 10})
    r = await harness.cast(caster)
    await harness.wait_cast(caster, (await r.json())["cast_id"])
    refused = await harness.cast(caster)
    assert refused.status == 402
    assert (await refused.json())["error"]["retry_after"] == 60  # 23:59 → 00:00
    clock.advance(61)
    assert (await harness.cast(caster)).status == 202
    caps = await (await harness.client.get("/v1/billing/caps", headers=auth(caster))).json()
    assert caps["period"] == "2026-12"
    assert caps["total"]["used_cents"] + caps["total"]["reserved_cents"] == 20


async def test_an_artifact_link_expires_with_410(harness: Harness, clock: FrozenClock) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker)
    r = await harness.cast(caster)
    done = await harness.wait_cast(caster, (await r.json())["cast_id"])
    path = done["artifact_url"][done["artifact_url"].index("/v1/") :]
    assert (await harness.client.get(path)).status == 200
    clock.advance(harness.settings.artifact_ttl + 1)
    r = await harness.client.get(path)
    assert r.status == 410
    assert (await r.json())["error"]["code"] == "ARTIFACT_EXPIRED"
    # A forged signature is refused outright.
    forged = path[: path.index("sig=") + 4] + "0" * 64
    assert (await harness.client.get(forged)).status == 401


async def test_every_state_change_is_in_a_verifiable_audit_log(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker, flat_cents=2)
    r = await harness.cast(caster)
    cast_id = (await r.json())["cast_id"]
    await harness.wait_cast(caster, cast_id)
    await asyncio.sleep(0.05)
    path = harness.settings.data_dir / "audit" / "audit.jsonl"
    text = path.read_text()
    events = [line for line in text.splitlines() if cast_id in line]
    kinds = [e.split('"event":"')[1].split('"')[0] for e in events]
    assert kinds == ["cast.accepted", "cast.running", "cast.succeeded", "ledger.charge"]
    head = await harness.platform.ledger.audit_head("main")
    assert verify_file(path, expected_head=head).ok
    assert "Bearer" not in text and "eyJ" not in text
