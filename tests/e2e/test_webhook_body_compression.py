"""Migration 0007: raw webhook bodies are TOAST-compressed with lz4 on PostgreSQL.

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
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.db import _alembic_config, current_revision, make_engine, upgrade
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.e2e

REVISION = "0007"
#: a delivery-like body: 14 KiB of compressible JSON (TOAST compresses values over ~2 KiB)
BODY = json.dumps(
    {"action": "created", "comment": {"body": "/cast com.example.hello name=world " * 400}}
).encode()[: 14 * 1024]


async def previous_revision(engine: AsyncEngine) -> str:
    def _down(conn: Connection) -> None:
        cfg = _alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "-1")

    async with engine.begin() as conn:
        await conn.run_sync(_down)
    rev = await current_revision(engine)
    assert rev is not None and rev != REVISION
    return rev


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


async def test_postgresql_stores_webhook_bodies_with_lz4(pg_engine: AsyncEngine) -> None:
    await upgrade(pg_engine)
    assert await current_revision(pg_engine) == REVISION
    if not await server_has_lz4(pg_engine):
        # a server built without lz4: the migration falls back silently to the default
        assert await column_compression(pg_engine) == ""
        assert await store_and_read_method(pg_engine, "d-default") == "pglz"
        return
    assert await column_compression(pg_engine) == "l"
    assert await store_and_read_method(pg_engine, "d-lz4") == "lz4"

    # downgrade: back to the server's default for new rows; stored rows stay readable
    await previous_revision(pg_engine)
    assert await column_compression(pg_engine) == ""
    async with pg_engine.connect() as conn:
        default = await conn.scalar(text("SHOW default_toast_compression"))
    assert await store_and_read_method(pg_engine, "d-default") == default
    # and up again
    await upgrade(pg_engine)
    assert await column_compression(pg_engine) == "l"
    assert await store_and_read_method(pg_engine, "d-lz4-again") == "lz4"


async def test_sqlite_schema_is_unchanged_by_the_migration(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'spell.db'}")
    try:
        await upgrade(engine)
        assert await current_revision(engine) == REVISION
        prev = await previous_revision(engine)

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
        await upgrade(engine)
        assert await current_revision(engine) == REVISION
        assert await schema() == before
        await previous_revision(engine)
        assert await current_revision(engine) == prev
        assert await schema() == before
    finally:
        await engine.dispose()
