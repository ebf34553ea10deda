"""Several processes migrating one fresh PostgreSQL database at once (`spell serve` and
`spell worker` started together) take turns on an advisory lock instead of colliding."""

from __future__ import annotations

import asyncio
import os
import secrets

import pytest

from app.store.db import current_revision, make_engine, upgrade
from tests.conftest import in_pass, skip_or_fail

pytestmark = [pytest.mark.e2e, in_pass("postgresql")]  # its own database: once per CI

ADMIN = os.environ.get("SPELL_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


async def test_concurrent_upgrades_of_a_fresh_database_all_succeed() -> None:
    import asyncpg

    try:
        admin = await asyncpg.connect(ADMIN, timeout=3)
    except (OSError, asyncpg.PostgresError) as e:
        skip_or_fail(f"PostgreSQL not reachable at {ADMIN}: {e}")
        return
    name = f"spell_migrate_{secrets.token_hex(4)}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN.rpartition("/")[0].replace("postgresql://", "postgresql+asyncpg://")
    engines = [make_engine(f"{base}/{name}") for _ in range(4)]
    try:
        # Without the lock they collide on CREATE TABLE or wait on each other for ever.
        results = await asyncio.wait_for(
            asyncio.gather(*(upgrade(e) for e in engines), return_exceptions=True), 60
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
        revs = {await current_revision(e) for e in engines}
        assert len(revs) == 1 and None not in revs
    finally:
        for e in engines:
            await e.dispose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
