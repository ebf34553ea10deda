"""Engine, sessions and migrations for both backends (SQLite embedded, PostgreSQL production).

SQLite runs in WAL mode with a busy timeout, and every transaction starts with ``BEGIN IMMEDIATE``
so that writers queue on the database lock instead of failing half-way with ``database is locked``.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

from app.store.fastsql import CHECKPOINT_BYTES

MIGRATIONS = Path(__file__).parent / "migrations"
#: PostgreSQL advisory lock key held while migrating (an arbitrary constant of ours)
MIGRATION_LOCK = 0x5E11_0001


_NET_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}
)


def database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` (or an error it was raised from) says the database cannot be reached
    right now: a refused or reset connection, a server shutting down, starting up or out of
    connection slots, a connection that died mid-query. False for everything else (a bad
    statement, a constraint, a bug): those are not outages and must not be retried as one."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if _connection_error(e):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return False


def _connection_error(e: BaseException) -> bool:
    if isinstance(e, ConnectionError):  # refused, reset, aborted, broken pipe
        return True
    if isinstance(e, OSError) and (
        e.errno in _NET_ERRNOS or "Connect call failed" in str(e)  # asyncio, several addresses
    ):
        return True
    from sqlalchemy.exc import DBAPIError

    if isinstance(e, DBAPIError) and e.connection_invalidated:
        return True
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - asyncpg is a dependency
        return False
    if isinstance(
        e,
        asyncpg.PostgresConnectionError  # class 08, and a connection lost mid-query
        | asyncpg.CannotConnectNowError  # 57P03: starting up / shutting down
        | asyncpg.AdminShutdownError  # 57P01: terminated by a (fast) shutdown
        | asyncpg.CrashShutdownError  # 57P02
        | asyncpg.TooManyConnectionsError,  # 53300
    ):
        return True
    # asyncpg's own: "connection is closed", "connection was closed in the middle of operation"
    if isinstance(e, asyncpg.InterfaceError) and "closed" in str(e):
        return True
    # a connection still consuming the error (protocol state 2) the server sent as it went down
    return isinstance(e, asyncpg.InternalClientError) and "another operation (2)" in str(e)


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _sqlite_pragmas(engine)
        return engine
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size * 2, pool_pre_ping=True
    )


#: SQLite ``wal_autocheckpoint`` of the SQLAlchemy connections, in 4 KiB pages
ORM_AUTOCHECKPOINT_PAGES = 2 * CHECKPOINT_BYTES // 4096


def _sqlite_pragmas(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide where transactions begin (see _on_begin).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        # In a server the ledger's checkpoint thread keeps the WAL near CHECKPOINT_BYTES
        # (app/store/fastsql.py), beside the writers. SQLite's default (4 MiB) would make this
        # connection's commits checkpoint inline, fsyncs included, most of the time; at twice
        # the mark they do so only when nothing else does (a CLI process, ORM-only writes).
        cur.execute(f"PRAGMA wal_autocheckpoint={ORM_AUTOCHECKPOINT_PAGES}")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front (no lock upgrade deadlocks, no SQLITE_BUSY half
        # way through); readers marked ``spell_readonly`` use a deferred BEGIN on the WAL snapshot.
        if conn.get_execution_options().get("spell_readonly"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply the Alembic migrations on this engine (``spell db upgrade``)."""

    def _run(conn: Connection) -> None:
        cfg = _alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)

    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Several processes starting at once (`spell serve` + `spell worker`) migrate one
            # at a time: the others wait here, then find the schema current.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        await conn.run_sync(_run)


async def current_revision(engine: AsyncEngine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    def _rev(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_rev)
