"""Retention end to end (SPEC §8), on SQLite and on PostgreSQL: real casts through the API with the
fake sandbox, a frozen clock moved forward (never slept), then sweeps.

PostgreSQL: the suite's throw-away database (``SPELL_TEST_DATABASE_URL``), else one created on
``PG_TEST_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``); without either the
PostgreSQL cases skip, except in CI (``SPELL_REQUIRE_SERVICES=1``) where they fail.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import event, func, select

from app.artifacts.local import LocalArtifactStore
from app.config import Settings
from app.domain.audit import verify_lines
from app.services.ports import ArtifactStore
from app.store.auditlog import list_segments, read_anchor, remove_segment, segment_bounds
from app.store.db import make_engine
from app.store.fastsql import SqliteRunner
from app.store.ledger import SqlLedger
from app.store.models import Cast, IdempotencyKey, WebhookDelivery
from app.store.retention_store import RetentionStore
from app.web.app import Overrides, create_app
from app.web.keys import INBOX
from app.worker.retention import RETENTION, RetentionSweeper, SweeperConfig, build_sweeper
from tests.conftest import (
    TABLES,
    FakeSandbox,
    FrozenClock,
    Harness,
    backend_params,
    module_pg_database,
)

pytestmark = pytest.mark.e2e

DAY = 24 * 3600


# ---------------------------------------------------------------------------- databases


@pytest.fixture(scope="module")
def pg_database(pg_base_url: str | None) -> Iterator[str]:
    """A throw-away PostgreSQL database for this module."""
    yield from module_pg_database(pg_base_url, "spell_ret")


@pytest.fixture(params=backend_params())
def db_kind(request: pytest.FixtureRequest) -> str | None:
    """None for SQLite, else the PostgreSQL database (created outside any event loop)."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("pg_database"))


@pytest.fixture
async def db_url(db_kind: str | None) -> str | None:
    if db_kind is None:
        return None
    url = db_kind
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        if await conn.fetchval("SELECT to_regclass('public.casts') IS NOT NULL"):
            await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    return url


@pytest.fixture
def settings(tmp_path: Path, db_url: str | None) -> Settings:
    return Settings(
        SPELL_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=db_url,
        SPELL_SECRET_KEY="test-secret-key-" + "x" * 32,
        SPELL_RATE_LIMIT_BURST=10_000,
        SPELL_RATE_LIMIT_PER_SEC=10_000,
        NATS_URL=None,
        SPELL_ARTIFACT_TTL=30 * DAY,  # the link outlives the 7-day retention: the sweep must act
    )


@dataclass
class World:
    h: Harness
    clock: FrozenClock
    sweeper: RetentionSweeper
    maker: str
    caster: str

    @property
    def ledger(self) -> SqlLedger:
        return self.h.platform.ledger  # type: ignore[no-any-return]

    @property
    def audit_path(self) -> Path:
        return self.h.settings.data_dir / "audit" / "audit.jsonl"

    async def cast(self, name: str = "x") -> dict[str, Any]:
        self.caster = await self.h.token("c", "caster")  # tokens expire as the clock moves
        r = await self.h.cast(self.caster, body={"input": {"name": name}})
        assert r.status == 202, await r.text()
        done = await self.h.wait_cast(self.caster, (await r.json())["cast_id"])
        # the final audit record is appended just after the status changes: wait for it
        final = f'"event":"cast.{done["status"]}","actor":'
        for _ in range(500):
            if any(
                final in line and done["cast_id"] in line
                for line in self.audit_path.read_text().splitlines()
            ):
                return done
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {final} audit record for {done['cast_id']}")

    async def settled_head(self) -> tuple[int, str]:
        """The ledger's head pointer once it caught up with the log (it is written behind)."""
        audit = self.h.platform.audit
        for _ in range(500):
            head = await self.ledger.audit_head("main")
            if head == audit.head:
                return head
            await asyncio.sleep(0.01)
        raise AssertionError(f"the ledger head {head} never reached {audit.head}")


@pytest.fixture
async def world(aiohttp_client: Any, settings: Settings) -> World:
    clock = FrozenClock()
    sandbox = FakeSandbox()
    app = create_app(settings, overrides=Overrides(sandbox=sandbox, clock=clock))
    client = await aiohttp_client(app)
    h = Harness(client=client, settings=settings, sandbox=sandbox)
    maker = await h.token("m", "maker")
    caster = await h.token("c", "caster")
    await h.publish(maker)
    return World(h, clock, app[RETENTION], maker, caster)


def _path(url: str) -> str:
    return url[url.index("/v1/") :]


# ---------------------------------------------------------------------------- inputs


async def test_inputs_go_at_24h_and_not_at_23h59(world: World) -> None:
    done = await world.cast("secret-input")
    cast_id = done["cast_id"]
    inbox = world.h.client.app[INBOX]  # type: ignore[index]
    # a real-sized body: stored lz4-compressed, so the purge must clear its encoding too
    handled_body = b'{"body":"/cast x n=1","pad":"' + b"https://api.github.com/x " * 200 + b'"}'
    assert await inbox.accept("github", "d-handled", "issue_comment", handled_body)
    stored = await inbox.get("d-handled")
    assert stored is not None
    assert stored.body_encoding == ("lz4" if isinstance(inbox.ledger.fast, SqliteRunner) else None)
    await inbox.finish("d-handled", "done")
    assert await inbox.accept("github", "d-pending", "issue_comment", b'{"body":"/cast y"}')
    # an input file a killed worker left in its run folder, written when the cast was accepted
    assert world.sweeper.config.staged_dirs, "the embedded worker's run folder is swept"
    leftover = world.sweeper.config.staged_dirs[0] / "c_killed-1" / "input.json"
    leftover.parent.mkdir(parents=True)
    leftover.write_text('{"name": "left behind"}')
    t0 = world.clock.now().timestamp()
    os.utime(leftover, (t0, t0))

    world.clock.advance(DAY - 60)  # 23 h 59 m
    report = await world.sweeper.sweep()
    assert report.ran
    assert (report.counts.inputs, report.counts.delivery_bodies) == (0, 0)
    assert report.counts.staged_inputs == 0
    cast = await world.ledger.get_cast(cast_id)
    assert cast is not None and cast.input == {"name": "secret-input"}
    assert leftover.exists()

    world.clock.advance(60)  # 24 h
    report = await world.sweeper.sweep()
    assert report.counts.inputs == 1
    assert report.counts.delivery_bodies == 1
    assert report.counts.staged_inputs == 1
    cast = await world.ledger.get_cast(cast_id)
    assert cast is not None and cast.input is None
    assert cast.input_hash == done["input_hash"]
    assert not leftover.exists()
    async with world.ledger.reader() as s:
        handled = await s.get(WebhookDelivery, "d-handled")
        pending = await s.get(WebhookDelivery, "d-pending")
    assert handled is not None and handled.body == b"" and handled.status == "done"
    assert handled.body_encoding is None and handled.payload == b""
    assert pending is not None and pending.body == b'{"body":"/cast y"}'  # not handled yet
    # the cast still answers, with its input hash
    fresh = await world.h.token("c", "caster")  # the first token expired a day ago
    r = await world.h.client.get(
        f"/v1/casts/{cast_id}", headers={"Authorization": f"Bearer {fresh}"}
    )
    assert r.status == 200 and (await r.json())["input_hash"] == done["input_hash"]
    # nothing twice
    again = await world.sweeper.sweep()
    assert (again.counts.inputs, again.counts.delivery_bodies) == (0, 0)
    # the sweep left counts, never contents, in the audit log
    text = world.audit_path.read_text()
    assert '"event":"retention.sweep"' in text
    assert "secret-input" not in text


async def test_an_unfinished_cast_keeps_its_input(world: World) -> None:
    world.h.sandbox.gate.clear()  # the run hangs
    r = await world.h.cast(world.caster, body={"input": {"name": "slow"}})
    cast_id = (await r.json())["cast_id"]
    for _ in range(500):
        cast = await world.ledger.get_cast(cast_id)
        if cast is not None and cast.status == "running":
            break
        await asyncio.sleep(0.01)
    assert cast is not None
    staged = world.sweeper.config.staged_dirs[0] / f"{cast_id}-{cast.attempt}" / "input.json"
    assert staged.exists()  # the run's input file, written (in real time) when it started
    world.clock.advance(2 * DAY)
    report = await world.sweeper.sweep()
    assert report.counts.inputs == 0 and report.counts.inputs_held == 1
    assert report.counts.staged_inputs == 0 and staged.exists()  # the run may still read it
    cast = await world.ledger.get_cast(cast_id)
    assert cast is not None and cast.input == {"name": "slow"}
    world.h.sandbox.gate.set()


# ---------------------------------------------------------------------------- artifacts


async def test_artifact_deleted_after_7_days_and_its_url_answers_410(world: World) -> None:
    done = await world.cast()
    url = _path(done["artifact_url"])
    art = await world.ledger.get_artifact(
        (await world.ledger.get_cast(done["cast_id"])).artifact_id
    )  # type: ignore[union-attr]
    assert art is not None
    stored = world.h.settings.data_dir / "artifacts" / art.location.removeprefix("local:")
    assert stored.exists()

    world.clock.advance(7 * DAY - 1)
    report = await world.sweeper.sweep()
    assert report.counts.artifacts == 0
    assert stored.exists()
    assert (await world.h.client.get(url)).status == 200

    world.clock.advance(1)
    report = await world.sweeper.sweep()
    assert report.counts.artifacts == 1
    assert not stored.exists()
    r = await world.h.client.get(url)
    assert r.status == 410
    body = await r.json()
    assert body["error"]["code"] == "ARTIFACT_EXPIRED" and "message" in body["error"]
    art = await world.ledger.get_artifact(art.id)
    assert art is not None and art.location.startswith("deleted:")
    assert art.expires_at <= world.clock.now()
    assert (await world.sweeper.sweep()).counts.artifacts == 0


# ---------------------------------------------------------------------------- audit


def _cli(settings: Settings, *args: str) -> Any:
    from app.cli.main import cli

    env = {
        "SPELL_DATA_DIR": str(settings.data_dir),
        "SPELL_SECRET_KEY": "test-secret-key-" + "x" * 32,
        "DATABASE_URL": settings.database_url or "",
    }
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


async def test_audit_segments_are_exported_removed_and_the_rest_verifies(world: World) -> None:
    await world.cast("first")  # records at T
    world.clock.advance(2 * 3600)
    report = await world.sweeper.sweep()  # T+2h: the active file is closed
    assert report.counts.audit_segments_rotated == 1 and report.counts.audit_segments == 0
    (old,) = list_segments(world.audit_path)
    old_bytes = old.path.read_bytes()
    await world.cast("second")  # records at T+2h

    world.clock.advance(30 * DAY - 2 * 3600 - 1)  # the first segment is 30 d - 1 s old
    report = await world.sweeper.sweep()
    assert report.counts.audit_segments == 0 and old.path.exists()
    assert report.counts.audit_segments_rotated == 1  # T+2h's file is closed too

    world.clock.advance(1)  # 30 days
    report = await world.sweeper.sweep()
    assert report.counts.audit_segments == 1
    assert report.counts.audit_records == old.last - old.first + 1
    assert not old.path.exists()
    exported = (
        world.h.settings.data_dir
        / "artifacts"
        / "audit"
        / "main"
        / f"audit-{old.first:012d}-{old.last:012d}.jsonl"
    )
    assert exported.read_bytes() == old_bytes  # exported first, byte for byte
    anchor = read_anchor(world.audit_path)
    assert anchor is not None and anchor[0] == old.last
    assert await world.ledger.audit_head("main:anchor") == anchor
    remaining = list_segments(world.audit_path)
    assert remaining and remaining[0].first == old.last + 1

    # offline: the export + the retained files are one chain from the genesis
    lines = exported.read_text().splitlines()
    for seg in remaining:
        lines += seg.path.read_text().splitlines()
    lines += world.audit_path.read_text().splitlines()
    assert verify_lines(lines).ok

    # `spell audit verify` checks the retained chain against the ledger (head and anchor)
    await world.settled_head()
    result = await asyncio.to_thread(_cli, world.h.settings, "audit", "verify")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok:") and f"retained from seq {old.last + 1}" in result.output

    # a retained line altered: found and named
    target = remaining[0].path
    text = target.read_text().splitlines()
    text[2] = text[2].replace('"event":"', '"event":"X', 1)
    target.write_text("\n".join(text) + "\n")
    result = await asyncio.to_thread(_cli, world.h.settings, "audit", "verify")
    assert result.exit_code == 1
    assert f"TAMPERED: line 3 (audit.segments/{target.name} line 3)" in result.output
    # and a tampered segment is never exported and removed as if it were sound
    world.clock.advance(60 * DAY)
    report = await world.sweeper.sweep()
    assert report.counts.errors == 1 and target.exists()


async def test_a_forged_anchor_fails_verification(world: World) -> None:
    await world.cast()
    world.clock.advance(2 * 3600)
    await world.sweeper.sweep()  # rotated
    await world.cast()
    (seg,) = list_segments(world.audit_path)
    # someone deletes the segment and writes an anchor, bypassing the sweep (and the ledger)
    remove_segment(world.audit_path, seg, segment_bounds(seg)[1])
    await world.settled_head()
    result = await asyncio.to_thread(_cli, world.h.settings, "audit", "verify")
    assert result.exit_code == 1
    assert "records were removed outside a retention sweep" in result.output


# ---------------------------------------------------------------------------- idempotency keys


async def test_expired_idempotency_keys_go_in_bounded_chunks(world: World) -> None:
    now = world.clock.now()
    async with world.ledger.write() as s:
        for i in range(10):  # 7 expired, 3 still answering retries
            s.add(
                IdempotencyKey(
                    principal_id=f"p{i % 2}",
                    key=f"k{i}",
                    request_hash="0" * 64,
                    response_status=202,
                    response_body={"cast_id": f"c{i}"},
                    created_at=now - timedelta(days=2),
                    expires_at=now - timedelta(seconds=1) if i < 7 else now + timedelta(hours=1),
                )
            )
    deletes: list[int] = []

    def count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM IDEMPOTENCY_KEYS"):
            deletes.append(cursor.rowcount)

    engine = world.ledger.engine.sync_engine
    event.listen(engine, "after_cursor_execute", count)
    try:
        store = RetentionStore(world.ledger, batch=3)
        assert await store.purge_idempotency(now, dry_run=True) == 7
        assert deletes == []
        assert await store.purge_idempotency(now) == 7
    finally:
        event.remove(engine, "after_cursor_execute", count)
    assert deletes == [3, 3, 1]  # one statement (and transaction) per chunk, until fewer
    async with world.ledger.reader() as s:
        left = (await s.scalars(select(IdempotencyKey.key).order_by(IdempotencyKey.key))).all()
    assert left == ["k7", "k8", "k9"]


# ---------------------------------------------------------------------------- dry run, CLI


async def test_a_dry_run_deletes_nothing(world: World) -> None:
    done = await world.cast("keep-me")
    url = _path(done["artifact_url"])
    world.clock.advance(31 * DAY)
    audit_before = world.audit_path.read_bytes()
    report = await world.sweeper.sweep(dry_run=True)
    assert report.ran and report.dry_run
    c = report.counts
    assert (c.inputs, c.artifacts, c.audit_segments_rotated, c.audit_segments) == (1, 1, 1, 1)
    # nothing changed: the input, the artifact, the audit log (not even a record of the dry run)
    cast = await world.ledger.get_cast(done["cast_id"])
    assert cast is not None and cast.input == {"name": "keep-me"}
    assert world.audit_path.read_bytes() == audit_before
    assert list_segments(world.audit_path) == []
    world.clock.advance(-31 * DAY)
    assert (await world.h.client.get(url)).status == 200
    world.clock.advance(31 * DAY)
    # the real sweep removes what the dry run counted
    real = await world.sweeper.sweep()
    assert (real.counts.inputs, real.counts.artifacts) == (1, 1)
    assert (real.counts.audit_segments, real.counts.audit_records) == (1, c.audit_records)


async def test_cli_retention_sweep(world: World) -> None:
    await world.cast()
    dry = await asyncio.to_thread(_cli, world.h.settings, "retention", "sweep", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "inputs: 0" in dry.output and "(dry run)" in dry.output
    before = world.audit_path.read_text().count("retention.sweep")
    real = await asyncio.to_thread(_cli, world.h.settings, "retention", "sweep")
    assert real.exit_code == 0, real.output
    assert "removed 0 items" in real.output
    assert world.audit_path.read_text().count("retention.sweep") == before + 1


# ---------------------------------------------------------------------------- many sweepers


class CountingStore:
    """The local store, counting deletes (two sweepers must delete each artifact once)."""

    def __init__(self, inner: LocalArtifactStore) -> None:
        self.inner = inner
        self.deleted: list[str] = []

    async def put(self, artifact_id: str, src: Path, *, digest: str) -> str:
        return await self.inner.put(artifact_id, src, digest=digest)

    async def open_path(self, location: str) -> Path:
        return await self.inner.open_path(location)

    async def redirect_url(self, location: str) -> str | None:
        return None

    async def delete(self, location: str) -> None:
        self.deleted.append(location)
        await asyncio.sleep(0.01)  # a slow object store: the sweeps overlap
        await self.inner.delete(location)

    async def put_object(self, key: str, src: Path, *, content_type: str) -> str:
        return await self.inner.put_object(key, src, content_type=content_type)


@pytest.fixture
async def other_ledger(settings: Settings, world: World) -> AsyncIterator[SqlLedger]:
    """A second process's ledger: its own engine and connections."""
    engine = make_engine(settings.sqlalchemy_url)
    ledger = SqlLedger(engine, world.clock)
    yield ledger
    await ledger.aclose()
    await engine.dispose()


def _sweeper(world: World, ledger: SqlLedger, store: ArtifactStore, lock: Path) -> RetentionSweeper:
    s = build_sweeper(
        world.h.settings,
        ledger=ledger,
        clock=world.clock,
        artifacts=store,
        export_to=store,
        audit=world.h.platform.audit,
    )
    # as if on another machine: its own file lock, so only the database lock can keep it out
    s.config = SweeperConfig(
        policy=s.config.policy,
        audit_path=s.config.audit_path,
        lock_path=lock,
    )
    return s


# SQLite has one writer process: two sweepers on one database are a PostgreSQL case
@pytest.mark.parametrize("db_kind", backend_params("postgresql"), indirect=True)
async def test_two_sweepers_on_postgresql_do_the_work_once(
    world: World, other_ledger: SqlLedger, tmp_path: Path
) -> None:
    assert world.ledger.dialect == "postgresql"
    n = 6
    for i in range(n):
        await world.cast(f"n{i}")
    world.clock.advance(31 * DAY)
    store = CountingStore(LocalArtifactStore(world.h.settings.data_dir / "artifacts"))
    one = _sweeper(world, world.ledger, store, tmp_path / "one.lock")
    two = _sweeper(world, other_ledger, store, tmp_path / "two.lock")

    # while one holds the database lock, the other skips its turn
    async with one.store.exclusive() as got:
        assert got
        skipped = await two.sweep()
        assert not skipped.ran and "database lock" in str(skipped.skipped)

    a, b = await asyncio.gather(one.sweep(), two.sweep())
    assert a.ran or b.ran
    total_inputs = a.counts.inputs + b.counts.inputs
    total_artifacts = a.counts.artifacts + b.counts.artifacts
    assert (total_inputs, total_artifacts) == (n, n)
    assert len(store.deleted) == n and len(set(store.deleted)) == n
    assert a.counts.audit_segments + b.counts.audit_segments == 1
    async with world.ledger.reader() as s:
        left = await s.scalar(select(func.count()).select_from(Cast).where(Cast.input.is_not(None)))
    assert left == 0
