"""Migration 0007: raw webhook bodies are TOAST-compressed with lz4 on PostgreSQL.

The tests move between 0007 and the revision before it (0006) by name, never ``head`` or ``-1``:
later migrations do not change what they check.

PostgreSQL: a throw-away database on the suite's server (``SPELL_TEST_DATABASE_URL``), else on
``PG_TEST_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``); skipped when neither
answers, except in CI (``SPELL_REQUIRE_SERVICES=1``) where that fails. SQLite: the migration
changes nothing there.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.db import _alembic_config, current_revision, make_engine, upgrade
from tests.conftest import in_pass, skip_or_fail

pytestmark = pytest.mark.e2e

REVISION = "0007"
PREVIOUS = "0006"  # its down_revision
SCRIPTS = ScriptDirectory.from_config(_alembic_config())
#: a delivery-like body: 14 KiB of compressible JSON (TOAST compresses values over ~2 KiB)
BODY = json.dumps(
    {"action": "created", "comment": {"body": "/cast com.example.hello name=world " * 400}}
).encode()[: 14 * 1024]


async def to_revision(engine: AsyncEngine, revision: str) -> None:
    """Upgrade or downgrade the schema to exactly ``revision``."""
    current = await current_revision(engine)
    below = {s.revision for s in SCRIPTS.iterate_revisions(current, "base")} if current else set()
    if current == revision:
        pass
    elif revision in below:  # an ancestor of the current revision

        def _down(conn: Connection) -> None:
            cfg = _alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)

        async with engine.begin() as conn:
            await conn.run_sync(_down)
    else:
        await upgrade(engine, revision)
    assert await current_revision(engine) == revision


@in_pass("sqlite")
def test_the_revisions_named_here_are_the_lz4_migration_and_its_parent() -> None:
    script = SCRIPTS.get_revision(REVISION)
    assert script is not None and script.down_revision == PREVIOUS
    assert "lz4" in (script.doc or "")


@pytest.fixture
async def pg_engine(pg_base_url: str | None) -> AsyncIterator[AsyncEngine]:
    import asyncpg

    url = pg_base_url or os.environ.get("PG_TEST_URL", "postgresql://postgres@127.0.0.1:5432/test")
    base = url.replace("postgresql+asyncpg://", "postgresql://").rpartition("/")[0]
    name = f"spell_lz4_{secrets.token_hex(4)}"
    try:
        admin = await asyncpg.connect(base + "/postgres", timeout=5)
    except (OSError, asyncpg.PostgresError) as e:
        skip_or_fail(f"PostgreSQL at {base} is not reachable: {e}")
        raise  # not reached
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        engine = make_engine(f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{name}")
        try:
            yield engine
        finally:
            await engine.dispose()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def column_compression(engine: AsyncEngine) -> str:
    """``attcompression`` of webhook_deliveries.body: 'l' lz4, 'p' pglz, '' the default."""
    async with engine.connect() as conn:
        return str(
            await conn.scalar(
                text(
                    "SELECT attcompression::text FROM pg_attribute "
                    "WHERE attrelid = 'webhook_deliveries'::regclass AND attname = 'body'"
                )
            )
        )


async def server_has_lz4(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        return bool(
            await conn.scalar(
                text(
                    "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' "
                    "AND 'lz4' = ANY(enumvals)"
                )
            )
        )


async def store_and_read_method(engine: AsyncEngine, delivery_id: str) -> str | None:
    """Insert a 14 KiB delivery; how PostgreSQL compressed its stored body."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO webhook_deliveries (delivery_id, source, event, body, status, "
                "attempts, received_at) VALUES (:d, 'github', 'issue_comment', :b, 'pending', "
                "0, now())"
            ),
            {"d": delivery_id, "b": BODY},
        )
    async with engine.connect() as conn:
        got = await conn.execute(
            text(
                "SELECT pg_column_compression(body), body FROM webhook_deliveries "
                "WHERE delivery_id = :d"
            ),
            {"d": delivery_id},
        )
        method, body = got.one()
    assert bytes(body) == BODY  # round-trips unchanged whatever the compression
    return None if method is None else str(method)


@in_pass("postgresql")  # its own database: once per CI
async def test_postgresql_stores_webhook_bodies_with_lz4(pg_engine: AsyncEngine) -> None:
    await to_revision(pg_engine, REVISION)
    if not await server_has_lz4(pg_engine):
        # a server built without lz4: the migration falls back silently to the default
        assert await column_compression(pg_engine) == ""
        assert await store_and_read_method(pg_engine, "d-default") == "pglz"
        return
    assert await column_compression(pg_engine) == "l"
    assert await store_and_read_method(pg_engine, "d-lz4") == "lz4"

    # downgrade: back to the server's default for new rows; stored rows stay readable
    await to_revision(pg_engine, PREVIOUS)
    assert await column_compression(pg_engine) == ""
    async with pg_engine.connect() as conn:
        default = await conn.scalar(text("SHOW default_toast_compression"))
    assert await store_and_read_method(pg_engine, "d-default") == default
    # and up again
    await to_revision(pg_engine, REVISION)
    assert await column_compression(pg_engine) == "l"
    assert await store_and_read_method(pg_engine, "d-lz4-again") == "lz4"


@in_pass("sqlite")
async def test_sqlite_schema_is_unchanged_by_the_migration(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'spell.db'}")
    try:
        await to_revision(engine, REVISION)
        await to_revision(engine, PREVIOUS)

        async def schema() -> list[tuple[str, str, str]]:
            async with engine.connect() as conn:
                rows = await conn.execute(
                    text(
                        "SELECT type, name, coalesce(sql, '') FROM sqlite_master "
                        "WHERE name != 'alembic_version' ORDER BY type, name"
                    )
                )
                return [(str(a), str(b), str(c)) for a, b, c in rows]

        before = await schema()
        assert ("table", "webhook_deliveries") in {(t, n) for t, n, _ in before}
        await to_revision(engine, REVISION)
        assert await schema() == before
        await to_revision(engine, PREVIOUS)
        assert await schema() == before
    finally:
        await engine.dispose()
