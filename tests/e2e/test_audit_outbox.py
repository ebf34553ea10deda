"""The audit outbox (issue #2) and the past-due race of the cast path (issue #4).

Audit records of the hot paths commit with their state change (``audit_outbox`` rows); a
drainer appends them to the hash-chained file exactly once, whatever process dies where. On
SQLite (default) and PostgreSQL (``SPELL_TEST_DATABASE_URL``), like the rest of the suite.

A "process" here is an :class:`AuditLog` + :class:`AuditDrainer` + hot-path runner of its own
over the same database and audit file, as ``spell serve`` and ``spell worker`` have; a crash
is a drainer that never runs, or one whose step fails after the file append.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.domain.audit import format_ts
from app.store import audit_outbox, hot
from app.store.audit_outbox import AuditDrainer
from app.store.auditlog import AuditLog, rotate, verify_file, verify_log
from app.store.fastsql import Runner, Stmt, runner_for_url
from app.web.app import Overrides, create_app
from tests.conftest import FakeSandbox, Harness

pytestmark = pytest.mark.e2e

CAST_EVENTS = ["cast.accepted", "cast.running", "cast.succeeded", "ledger.charge"]


def audit_path(settings: Settings) -> Path:
    return settings.data_dir / "audit" / "audit.jsonl"


def records(settings: Settings) -> list[dict[str, Any]]:
    path = audit_path(settings)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def event_ids(settings: Settings) -> Counter[str]:
    """The event ids of the casts' outbox records in the file (not the publish's)."""
    return Counter(
        str(r["data"]["event_id"])
        for r in records(settings)
        if "event_id" in r.get("data", {}) and r.get("cast_id")
    )


@asynccontextmanager
async def process(settings: Settings) -> AsyncIterator[tuple[AuditDrainer, Runner]]:
    """Another process's audit log, drainer and hot-path runner on the same data."""
    runner = runner_for_url(settings.sqlalchemy_url)
    log = AuditLog(audit_path(settings))
    await log.start()
    try:
        yield AuditDrainer(runner, log), runner
    finally:
        await log.close()
        await runner.aclose()


async def pending(runner: Runner) -> list[dict[str, Any]]:
    return await runner.run(lambda: hot.pending_audit(100_000), atomic=False)


@pytest.fixture
async def crashed(
    aiohttp_client: Any,
    settings: Settings,
    fake_sandbox: FakeSandbox,
    monkeypatch: pytest.MonkeyPatch,
) -> Harness:
    """The app with its audit drainer dead from the start: every audit record of a cast
    commits with the cast, and none reaches the file (a crash right after each commit)."""

    async def dead_close(self: AuditDrainer, *, timeout: float = 10.0) -> None:
        return None

    monkeypatch.setattr(AuditDrainer, "start", lambda self: None)
    monkeypatch.setattr(AuditDrainer, "close", dead_close)
    client = await aiohttp_client(create_app(settings, overrides=Overrides(sandbox=fake_sandbox)))
    return Harness(client=client, settings=settings, sandbox=fake_sandbox)


async def publish_drained(h: Harness, maker: str, *, cents: int) -> None:
    """Publish the test spell, and drain its own records (``bundle.uploaded``,
    ``spell.published``, outbox rows too) now: the outbox then holds only the casts' records."""
    await h.publish(maker, flat_cents=cents)
    async with process(h.settings) as (drainer, runner):
        await drainer.drain(wait=True)
        assert await pending(runner) == []


async def run_casts(h: Harness, n: int, *, cents: int = 2) -> list[str]:
    maker = await h.token("m", "maker")
    caster = await h.token("c", "caster")
    await publish_drained(h, maker, cents=cents)
    ids = []
    for _ in range(n):
        r = await h.cast(caster)
        assert r.status == 202, await r.text()
        ids.append(str((await r.json())["cast_id"]))
    for cast_id in ids:
        assert (await h.wait_cast(caster, cast_id))["status"] == "succeeded"
    return ids


def cast_events(settings: Settings, cast_id: str) -> list[str]:
    return [r["event"] for r in records(settings) if r.get("cast_id") == cast_id]


# ---------------------------------------------------------------------------- issue #2


async def test_a_record_committed_with_its_cast_reaches_the_file_once_after_a_crash(
    crashed: Harness,
) -> None:
    h = crashed
    (cast_id,) = await run_casts(h, 1)
    # the cast and its run are committed; their audit records are rows, not lines yet
    assert cast_events(h.settings, cast_id) == []
    cast = await h.platform.ledger.get_cast(cast_id)
    async with process(h.settings) as (drainer, runner):
        rows = [r for r in await pending(runner) if r["cast_id"] == cast_id]
        assert [r["event"] for r in rows] == CAST_EVENTS
        # a new process starts: the drainer appends them, in commit order
        assert await drainer.drain() == len(rows) == 4
        assert cast_events(h.settings, cast_id) == CAST_EVENTS
        assert await pending(runner) == []
        assert await drainer.drain() == 0  # nothing twice
    # and once more with yet another process: still exactly once
    async with process(h.settings) as (drainer, _runner):
        assert await drainer.drain() == 0
    mine = [r for r in records(h.settings) if r.get("cast_id") == cast_id]
    assert [r["event"] for r in mine] == CAST_EVENTS
    assert all(n == 1 for n in event_ids(h.settings).values())
    accepted = mine[0]
    # SPEC fields are kept; ts is the transaction's time, not the time of the append
    assert accepted["ts"] == format_ts(cast.created_at)
    assert accepted["input_hash"] == cast.input_hash
    assert accepted["amount_cents"] == 2 and accepted["currency"] == "USD"
    assert accepted["actor"] == cast.principal_id
    assert mine[3]["amount_cents"] == 2 and mine[3]["data"]["account"] == "c"
    assert mine[1]["data"]["attempt"] == 1
    assert verify_file(audit_path(h.settings)).ok


async def test_a_crash_after_the_append_before_the_delete_leaves_no_duplicate(
    crashed: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = crashed
    ids = await run_casts(h, 3)
    real_delete = hot.delete_audit

    def failing_delete(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("process killed after the file append")

    async with process(h.settings) as (first, runner):
        monkeypatch.setattr(audit_outbox.hot, "delete_audit", failing_delete)
        with pytest.raises(RuntimeError, match="killed"):
            await first.drain()
        monkeypatch.setattr(audit_outbox.hot, "delete_audit", real_delete)
        # its records are in the file, its rows still pending
        assert first.appended == 12
        assert len(await pending(runner)) == 12
        assert sum(event_ids(h.settings).values()) == 12
    # other processes write plain (non-outbox) records meanwhile
    async with AuditLog(audit_path(h.settings)) as other:
        await other.append("token.issued", actor="operator:cli", data={"account": "x"})
    async with process(h.settings) as (second, runner):
        assert await second.drain() == 12
        assert second.recovered == 12 and second.appended == 0
        assert await pending(runner) == []
    counts = event_ids(h.settings)
    assert len(counts) == 12 and set(counts.values()) == {1}
    for cast_id in ids:
        assert cast_events(h.settings, cast_id) == CAST_EVENTS
    assert verify_file(audit_path(h.settings)).ok


async def test_a_crash_before_a_rotation_is_recovered_from_the_closed_segment(
    crashed: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dead drainer's records went into a file that retention then closed into a segment:
    the next drain reads back into the segment."""
    h = crashed
    await run_casts(h, 2)

    def failing_delete(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("killed")

    real_delete = hot.delete_audit
    async with process(h.settings) as (first, _):
        monkeypatch.setattr(audit_outbox.hot, "delete_audit", failing_delete)
        with pytest.raises(RuntimeError):
            await first.drain()
    monkeypatch.setattr(audit_outbox.hot, "delete_audit", real_delete)
    seg = rotate(audit_path(h.settings), lambda _first: True)
    assert seg is not None and not audit_path(h.settings).exists()
    async with process(h.settings) as (second, runner):
        assert await second.drain() == 8
        assert second.recovered == 8 and second.appended == 0
        assert await pending(runner) == []
    lines = [json.loads(x) for x in seg.path.read_text().splitlines()]
    in_segment = Counter(
        r["data"]["event_id"] for r in lines if "event_id" in r["data"] and r.get("cast_id")
    )
    assert len(in_segment) == 8 and set(in_segment.values()) == {1}
    assert event_ids(h.settings) == Counter()  # nothing appended again to the new file
    assert verify_log(audit_path(h.settings)).ok


async def test_a_half_recovered_crash_then_new_rows_each_once(
    crashed: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two drainers die in a row after appending; new rows arrive in between."""
    h = crashed
    await run_casts(h, 2)

    def failing_delete(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("killed")

    real_delete = hot.delete_audit
    async with process(h.settings) as (first, _):
        monkeypatch.setattr(audit_outbox.hot, "delete_audit", failing_delete)
        with pytest.raises(RuntimeError):
            await first.drain()
    caster = await h.token("c", "caster")
    r = await h.cast(caster)
    late = str((await r.json())["cast_id"])
    await h.wait_cast(caster, late)
    async with process(h.settings) as (second, _):
        with pytest.raises(RuntimeError):
            await second.drain()  # skips the first one's 8, appends the new ones, dies again
        assert second.recovered == 8
    monkeypatch.setattr(audit_outbox.hot, "delete_audit", real_delete)
    async with process(h.settings) as (third, runner):
        await third.drain()
        assert third.appended == 0
        assert await pending(runner) == []
    counts = event_ids(h.settings)
    assert set(counts.values()) == {1}
    assert cast_events(h.settings, late) == CAST_EVENTS
    assert verify_file(audit_path(h.settings)).ok


async def test_concurrent_drainers_append_each_record_once_and_the_chain_verifies(
    crashed: Harness,
) -> None:
    h = crashed
    maker = await h.token("m", "maker")
    caster = await h.token("c", "caster")
    await publish_drained(h, maker, cents=1)

    async def cast_some(n: int) -> list[str]:
        out = []
        for _ in range(n):
            r = await h.cast(caster)
            assert r.status == 202
            out.append(str((await r.json())["cast_id"]))
        return out

    first = await cast_some(10)
    async with (
        process(h.settings) as (d1, runner),
        process(h.settings) as (d2, _),
        process(h.settings) as (d3, _),
    ):
        drainers = [d1, d2, d3]
        stop = asyncio.Event()

        async def loop(d: AuditDrainer) -> None:
            while not stop.is_set():
                await d.drain()
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(loop(d)) for d in drainers]
        more = await cast_some(20)  # while they drain
        for cast_id in first + more:
            await h.wait_cast(caster, cast_id)
        stop.set()
        await asyncio.gather(*tasks)
        for d in drainers:
            await d.drain(wait=True)
        assert await pending(runner) == []
        assert sum(d.appended for d in drainers) == 4 * 30
        assert sum(d.recovered for d in drainers) == 0
    counts = event_ids(h.settings)
    assert len(counts) == 4 * 30 and set(counts.values()) == {1}
    for cast_id in first + more:
        assert cast_events(h.settings, cast_id) == CAST_EVENTS
    assert verify_file(audit_path(h.settings)).ok


async def test_the_app_drains_its_own_records_and_the_head_matches(harness: Harness) -> None:
    """With the drainer alive (the normal case), the records arrive without being asked."""
    (cast_id,) = await run_casts(harness, 1)
    runner = harness.platform.ledger.fast
    deadline = asyncio.get_running_loop().time() + 10
    # appended, then deleted from the outbox
    while cast_events(harness.settings, cast_id) != CAST_EVENTS or await pending(runner):
        assert asyncio.get_running_loop().time() < deadline, cast_events(harness.settings, cast_id)
        await asyncio.sleep(0.01)
    # the head pointer is written shortly after the append
    while (head := await harness.platform.ledger.audit_head("main")) != harness.platform.audit.head:
        assert asyncio.get_running_loop().time() < deadline, (head, harness.platform.audit.head)
        await asyncio.sleep(0.01)
    assert verify_file(audit_path(harness.settings), expected_head=head).ok


async def test_the_cast_answer_does_not_wait_for_the_audit_file(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit file is stuck (a slow disk): casts are still answered, their records are
    durable rows, and they reach the file once the disk is back."""
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker)
    log = harness.platform.audit
    release = asyncio.Event()
    real = log.append_prepared

    async def stuck(prepared: Any) -> Any:
        await release.wait()
        return await real(prepared)

    monkeypatch.setattr(log, "append_prepared", stuck)
    r = await asyncio.wait_for(harness.cast(caster), 10)
    assert r.status == 202
    cast_id = str((await r.json())["cast_id"])
    rows = await pending(harness.platform.ledger.fast)
    assert any(x["cast_id"] == cast_id and x["event"] == "cast.accepted" for x in rows)
    assert "cast.accepted" not in cast_events(harness.settings, cast_id)
    release.set()
    await harness.wait_cast(caster, cast_id)
    deadline = asyncio.get_running_loop().time() + 10
    while cast_events(harness.settings, cast_id) != CAST_EVENTS[:3]:
        assert asyncio.get_running_loop().time() < deadline, cast_events(harness.settings, cast_id)
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------- issue #4


async def _billing_row(runner: Runner, account: str, *, past_due: bool) -> None:
    now = datetime.now(UTC)

    def program() -> Any:
        yield Stmt(
            "INSERT INTO billing_customers (account_id, payment_method_status, past_due,"
            " past_due_reason, created_at, updated_at) VALUES (?, 'active', ?, ?, ?, ?)"
            " ON CONFLICT (account_id) DO UPDATE SET past_due = excluded.past_due,"
            " past_due_reason = excluded.past_due_reason",
            (account, past_due, "card_declined" if past_due else None, now, now),
        )

    await runner.run(program)


async def _money(h: Harness, account: str) -> tuple[int, int]:
    view = await h.platform.ledger.budget(account)
    return view.monthly.reserved_cents, view.total.reserved_cents


async def test_an_account_marked_past_due_after_the_gate_gets_402_and_nothing_is_kept(
    harness: Harness,
) -> None:
    h = harness
    maker = await h.token("m", "maker")
    caster = await h.token("c", "caster")
    await h.publish(maker, flat_cents=7)
    runner = h.platform.ledger.fast
    await _billing_row(runner, "c", past_due=False)
    marked: list[str] = []

    async def gate(account: str) -> None:
        # the gate passes, then the failed-payment handling marks the account and runs its
        # cancellation sweep before this cast's transaction
        await _billing_row(runner, account, past_due=True)
        marked.append(account)

    h.platform.payment_gate = gate
    r = await h.cast(caster, key="k-1")
    assert r.status == 402, await r.text()
    assert (await r.json())["error"]["code"] == "PAYMENT_REQUIRED"
    assert marked == ["c"]
    assert await h.platform.ledger.count_casts(caster_id="c") == 0
    assert await _money(h, "c") == (0, 0)
    assert not [x for x in await pending(runner) if x["event"] == "cast.accepted"]
    # the key was not kept: once the account is fixed, the same request is a new cast
    await _billing_row(runner, "c", past_due=False)

    async def open_gate(account: str) -> None:
        return None

    h.platform.payment_gate = open_gate
    r = await h.cast(caster, key="k-1")
    assert r.status == 202 and r.headers.get("Idempotent-Replayed") != "true"
    assert await _money(h, "c") == (7, 7)


async def test_a_free_cast_is_not_refused_for_a_past_due_account(harness: Harness) -> None:
    h = harness
    maker = await h.token("m", "maker")
    caster = await h.token("c", "caster")
    await h.publish(maker, flat_cents=0)
    await _billing_row(h.platform.ledger.fast, "c", past_due=True)
    r = await h.cast(caster)
    assert r.status == 202


async def test_postgres_a_cast_waits_for_a_marking_in_progress_and_sees_it(
    harness: Harness, database_url: str | None
) -> None:
    """PostgreSQL: the accepting statement reads ``past_due`` under a share lock, so a
    marking that is committing meanwhile is waited for (a plain read would see the old row
    and the cancellation sweep that follows the marking would miss the new cast)."""
    if database_url is None:
        pytest.skip("PostgreSQL only: SQLite's single writer cannot interleave")
    import asyncpg

    h = harness
    maker = await h.token("m", "maker")
    caster = await h.token("c", "caster")
    await h.publish(maker, flat_cents=5)
    await _billing_row(h.platform.ledger.fast, "c", past_due=False)
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    watch = await asyncpg.connect(dsn)  # pg_stat_activity is a snapshot per transaction
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            "UPDATE billing_customers SET past_due = true, past_due_reason = 'card_declined'"
            " WHERE account_id = 'c'"
        )
        task = asyncio.create_task(h.cast(caster))
        # wait until the cast's statement is blocked on the row lock
        deadline = asyncio.get_running_loop().time() + 10
        while not await watch.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE 'WITH k AS (INSERT INTO idempotency%'"
        ):
            assert asyncio.get_running_loop().time() < deadline, "the cast never waited"
            assert not task.done(), await (await task).text()
            await asyncio.sleep(0.01)
        await tx.commit()
        r = await asyncio.wait_for(task, 10)
    finally:
        await conn.close()
        await watch.close()
    assert r.status == 402, await r.text()
    assert (await r.json())["error"]["code"] == "PAYMENT_REQUIRED"
    assert await h.platform.ledger.count_casts(caster_id="c") == 0
    assert await _money(h, "c") == (0, 0)
