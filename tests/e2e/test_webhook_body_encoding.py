"""Migration 0008: ``webhook_deliveries.body_encoding`` (bodies lz4-compressed by the platform).

The tests move between 0008 and its parent (0007) by name, never ``head``: later migrations do
not change what they check. PostgreSQL: a throw-away database (the fixture of
test_webhook_body_compression.py); SQLite: a file of its own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.bodies import LZ4, pack
from app.store.db import make_engine
from app.store.models import WebhookDelivery
from tests.conftest import in_pass
from tests.e2e.test_webhook_body_compression import SCRIPTS, pg_engine, to_revision

pytestmark = pytest.mark.e2e
__all__ = ["pg_engine"]  # the fixture, imported for this module's tests

REVISION = "0008"
PREVIOUS = "0007"
_rnd = random.Random(7)
#: a delivery-sized body (21 KiB): repetitive URLs, with a commit SHA (random) now and then
BODY = json.dumps(
    {
        f"url_{i}": f"https://api.github.com/repos/octo/hello/commits/{_rnd.getrandbits(160):040x}"
        if i % 5 == 0
        else f"https://api.github.com/repos/octo/hello/issues/{i}"
        for i in range(300)
    }
).encode()


async def insert(engine: AsyncEngine, delivery_id: str, body: bytes, encoding: str | None) -> None:
    cols = "delivery_id, source, event, body, status, attempts, received_at"
    vals = ":d, 'github', 'issue_comment', :b, 'pending', 0, CURRENT_TIMESTAMP"
    if encoding is not None:
        cols, vals = cols + ", body_encoding", vals + ", :e"
    async with engine.begin() as conn:
        await conn.execute(
            text(f"INSERT INTO webhook_deliveries ({cols}) VALUES ({vals})"),  # noqa: S608
            {"d": delivery_id, "b": body, "e": encoding},
        )


async def payload(engine: AsyncEngine, delivery_id: str) -> bytes:
    """The raw body as the platform reads it (``WebhookDelivery.payload``)."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT body, body_encoding FROM webhook_deliveries WHERE delivery_id = :d"),
                {"d": delivery_id},
            )
        ).one()
    return WebhookDelivery(body=bytes(row[0]), body_encoding=row[1]).payload


async def raw_column(engine: AsyncEngine, delivery_id: str) -> bytes:
    async with engine.connect() as conn:
        got = await conn.scalar(
            text("SELECT body FROM webhook_deliveries WHERE delivery_id = :d"), {"d": delivery_id}
        )
    return bytes(got)


@in_pass("sqlite")
def test_the_revisions_named_here_are_the_encoding_migration_and_its_parent() -> None:
    script = SCRIPTS.get_revision(REVISION)
    assert script is not None and script.down_revision == PREVIOUS
    assert "body_encoding" in (script.doc or "")


async def up_and_down(engine: AsyncEngine) -> None:
    """Rows stored before read back raw; compressed rows read back; a downgrade writes the
    compressed ones back raw, so the older schema reads every row."""
    await to_revision(engine, PREVIOUS)
    await insert(engine, "d-old", BODY, None)
    await to_revision(engine, REVISION)
    assert await payload(engine, "d-old") == BODY  # NULL encoding: raw, as stored before
    stored, encoding = pack(BODY)
    assert encoding == LZ4 and len(stored) < len(BODY) // 3
    await insert(engine, "d-new", stored, encoding)
    assert await payload(engine, "d-new") == BODY
    assert await raw_column(engine, "d-new") == stored

    await to_revision(engine, PREVIOUS)
    assert await raw_column(engine, "d-new") == BODY
    assert await raw_column(engine, "d-old") == BODY
    await to_revision(engine, REVISION)
    assert await payload(engine, "d-new") == BODY


@in_pass("sqlite")
async def test_sqlite_adds_the_column_and_a_downgrade_restores_raw_bodies(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'spell.db'}")
    try:
        await up_and_down(engine)
    finally:
        await engine.dispose()


async def storage(engine: AsyncEngine) -> tuple[str, list[str]]:
    """(``attstorage`` of webhook_deliveries.body, the table's reloptions)."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT a.attstorage::text, coalesce(c.reloptions, '{}') FROM pg_attribute a"
                    " JOIN pg_class c ON c.oid = a.attrelid"
                    " WHERE c.relname = 'webhook_deliveries' AND a.attname = 'body'"
                )
            )
        ).one()
    return str(row[0]), list(row[1])


@in_pass("postgresql")  # its own database: once per CI
async def test_postgresql_up_and_down(pg_engine: AsyncEngine) -> None:
    await up_and_down(pg_engine)
    # PostgreSQL goes on compressing raw bodies in TOAST: the column's storage is untouched
    assert await storage(pg_engine) == ("x", [])
    await to_revision(pg_engine, PREVIOUS)
    assert await storage(pg_engine) == ("x", [])
