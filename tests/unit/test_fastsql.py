"""The bare-driver runners of the ledger's hot paths (app/store/fastsql.py).

SQLite: programs queued together share one group-committed transaction, each in its own
savepoint — a failing program is rolled back alone, the others commit; an exclusive turn keeps
the writer thread out of another connection's transaction. Values are stored exactly as
SQLAlchemy's column types store them, so ORM reads see the same thing.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.store.fastsql import (
    Json,
    Many,
    Program,
    SqliteRunner,
    Stmt,
    _pg_many,
    _pg_rowcount,
    pg_sql,
    runner_for_url,
    sqlite_time,
)


def _db(tmp_path: Path) -> str:
    path = str(tmp_path / "t.db")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER NOT NULL, j TEXT, at TEXT)")
    conn.commit()
    conn.close()
    return path


def _rows(path: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT k, n, j, at FROM t ORDER BY k").fetchall()
    finally:
        conn.close()


def insert(k: str, n: int) -> Program[int]:
    res = yield Stmt("INSERT INTO t (k, n) VALUES (?, ?) ON CONFLICT (k) DO NOTHING", (k, n))
    return res.rowcount


def insert_then_fail(k: str) -> Program[None]:
    yield Stmt("INSERT INTO t (k, n) VALUES (?, 1)", (k,))
    raise ValueError("refused after writing")


async def test_a_failing_program_is_rolled_back_alone_in_a_shared_transaction(
    tmp_path: Path,
) -> None:
    path = _db(tmp_path)
    runner = SqliteRunner(path)
    try:
        jobs = [runner.run(lambda i=i: insert(f"ok{i}", i)) for i in range(20)]
        jobs.insert(7, runner.run(lambda: insert_then_fail("bad")))
        results = await asyncio.gather(*jobs, return_exceptions=True)
    finally:
        await runner.aclose()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    assert [r for r in results if not isinstance(r, BaseException)] == [1] * 20
    keys = [row[0] for row in _rows(path)]
    assert "bad" not in keys
    assert sorted(keys) == sorted(f"ok{i}" for i in range(20))


async def test_conflicts_and_returning_rows_are_reported(tmp_path: Path) -> None:
    path = _db(tmp_path)
    runner = SqliteRunner(path)

    def bump(k: str) -> Program[int | None]:
        res = yield Stmt("UPDATE t SET n = n + 1 WHERE k = ? RETURNING n", (k,), rows=True)
        row = res.first()
        return None if row is None else int(row[0])

    try:
        assert await runner.run(lambda: insert("a", 1)) == 1
        assert await runner.run(lambda: insert("a", 5)) == 0  # ON CONFLICT DO NOTHING
        assert await runner.run(lambda: bump("a")) == 2
        assert await runner.run(lambda: bump("missing")) is None
    finally:
        await runner.aclose()


async def test_json_and_times_are_stored_as_sqlalchemy_stores_them(tmp_path: Path) -> None:
    path = _db(tmp_path)
    runner = SqliteRunner(path)
    at = datetime(2026, 11, 26, 6, 30, 1, 123456, tzinfo=UTC)

    def put() -> Program[None]:
        yield Stmt(
            "INSERT INTO t (k, n, j, at) VALUES (?, ?, ?, ?)", ("x", 1, Json({"a": [1, 2]}), at)
        )

    try:
        await runner.run(put)
    finally:
        await runner.aclose()
    assert _rows(path) == [("x", 1, '{"a": [1, 2]}', "2026-11-26 06:30:01.123456")]
    with pytest.raises(ValueError):
        sqlite_time(datetime(2026, 1, 1))  # naive times are refused, as by the ORM type


async def test_an_exclusive_turn_waits_for_the_open_batch_and_keeps_the_thread_out(
    tmp_path: Path,
) -> None:
    path = _db(tmp_path)
    runner = SqliteRunner(path)
    release = threading.Event()

    def slow() -> Program[None]:
        yield Stmt("INSERT INTO t (k, n) VALUES ('slow', 1)")
        release.wait(5)  # the writer thread holds its transaction open meanwhile

    try:
        busy = asyncio.ensure_future(runner.run(slow))
        await asyncio.sleep(0.05)
        entered = asyncio.Event()

        async def other_writer() -> None:
            async with runner.exclusive():
                entered.set()
                # The thread has committed and waits: this connection gets the lock at once.
                other = sqlite3.connect(path, isolation_level=None, timeout=0)
                other.execute("BEGIN IMMEDIATE")
                queued = asyncio.ensure_future(runner.run(lambda: insert("queued", 2)))
                await asyncio.sleep(0.05)
                assert not queued.done()  # held back until the turn ends
                other.execute("INSERT INTO t (k, n) VALUES ('other', 3)")
                other.execute("COMMIT")
                other.close()
            assert await queued == 1

        turn = asyncio.ensure_future(other_writer())
        await asyncio.sleep(0.05)
        assert not entered.is_set()  # not while the batch's transaction is open
        release.set()
        await busy
        await turn
    finally:
        release.set()
        await runner.aclose()
    assert [r[0] for r in _rows(path)] == ["other", "queued", "slow"]


async def test_a_closed_runner_refuses_work(tmp_path: Path) -> None:
    runner = SqliteRunner(_db(tmp_path))
    await runner.run(lambda: insert("a", 1))
    await runner.aclose()
    with pytest.raises(RuntimeError):
        await runner.run(lambda: insert("b", 1))


def test_placeholders_and_command_tags_for_postgresql() -> None:
    assert pg_sql("UPDATE t SET a = ? WHERE b = ? AND c <= ?") == (
        "UPDATE t SET a = $1 WHERE b = $2 AND c <= $3"
    )
    assert _pg_rowcount("INSERT 0 1") == 1
    assert _pg_rowcount("UPDATE 0") == 0
    assert _pg_rowcount("DELETE 12") == 12


def test_runner_for_url_picks_the_backend(tmp_path: Path) -> None:
    r = runner_for_url(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    assert isinstance(r, SqliteRunner) and r.path == f"{tmp_path}/x.db"
    pg = runner_for_url("postgresql+asyncpg://u:secret@127.0.0.1:5432/db")
    assert getattr(pg, "dsn", "") == "postgresql://u:secret@127.0.0.1:5432/db"
    with pytest.raises(ValueError):
        runner_for_url("sqlite+aiosqlite:///:memory:")


async def test_many_runs_every_write_and_rolls_back_with_its_program(tmp_path: Path) -> None:
    path = _db(tmp_path)
    runner = SqliteRunner(path)

    def writes(fail: bool) -> Program[None]:
        yield Many(
            (
                Stmt("INSERT INTO t (k, n) VALUES (?, 1)", ("m1" if not fail else "f1",)),
                Stmt("INSERT INTO t (k, n) VALUES (?, 2)", ("m2" if not fail else "f2",)),
            )
        )
        if fail:
            raise ValueError("refused")

    try:
        await runner.run(lambda: writes(False))
        with pytest.raises(ValueError):
            await runner.run(lambda: writes(True))
    finally:
        await runner.aclose()
    assert [r[0] for r in _rows(path)] == ["m1", "m2"]


def test_pg_many_is_one_statement_of_data_modifying_ctes() -> None:
    class Conn:
        def __init__(self) -> None:
            self.calls: list[tuple[str, tuple[Any, ...]]] = []

        async def execute(self, sql: str, *args: Any) -> str:
            self.calls.append((sql, args))
            return "SELECT 1"

    conn = Conn()
    many = Many((Stmt("INSERT INTO a VALUES (?)", (1,)), Stmt("UPDATE b SET x = ?", (2,))))
    asyncio.run(_pg_many(conn, many))
    assert conn.calls == [
        ("WITH q0 AS (INSERT INTO a VALUES ($1)), q1 AS (UPDATE b SET x = $2) SELECT 1", (1, 2))
    ]


async def test_try_now_runs_in_place_when_the_writer_is_idle_and_never_past_it(
    tmp_path: Path,
) -> None:
    path = _db(tmp_path)
    runner = SqliteRunner(path)
    release = threading.Event()
    here = threading.get_ident()
    seen: list[int] = []

    def where(k: str) -> Program[int]:
        seen.append(threading.get_ident())
        res = yield Stmt("INSERT INTO t (k, n) VALUES (?, 1)", (k,))
        return res.rowcount

    def slow() -> Program[None]:
        yield Stmt("INSERT INTO t (k, n) VALUES ('slow', 1)")
        release.wait(5)

    try:
        assert runner.try_now(lambda: where("a")) == (True, 1)
        assert seen == [here]  # on the caller's thread, committed at once
        assert [r[0] for r in _rows(path)] == ["a"]
        with pytest.raises(sqlite3.IntegrityError):  # the program's error, rolled back
            runner.try_now(lambda: where("a"))
        with pytest.raises(ValueError):
            runner.try_now(lambda: insert_then_fail("b"))
        busy = asyncio.ensure_future(runner.run(slow))
        await asyncio.sleep(0.05)
        # the writer holds its transaction: nothing runs in place, nothing overtakes it
        assert runner.try_now(lambda: where("c")) == (False, None)
        release.set()
        await busy
        assert await runner.run(lambda: where("c")) == 1
        assert seen[-1] != here  # through the writer thread
        # another connection's exclusive turn also keeps try_now out
        async with runner.exclusive():
            assert runner.try_now(lambda: where("d")) == (False, None)
        assert await runner.run(lambda: where("d")) == 1  # the thread lets go of its turn
        assert runner.try_now(lambda: where("e")) == (True, 1)
    finally:
        release.set()
        await runner.aclose()
    assert [r[0] for r in _rows(path)] == ["a", "c", "d", "e", "slow"]


async def _checkpoints(runner: SqliteRunner, n: int) -> None:
    """Wait (bounded) until the checkpoint thread has finished ``n`` checkpoints."""
    for _ in range(500):
        if runner.checkpoints >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{runner.checkpoints} checkpoints, expected {n}")


def _big(k: str, n: int) -> Program[None]:
    yield Stmt("INSERT INTO t (k, n, j) VALUES (?, ?, ?)", (k, n, "x" * 20_000))


async def test_checkpoints_run_on_their_own_thread_never_in_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.store.fastsql as fastsql

    monkeypatch.setattr(fastsql, "CHECKPOINT_BYTES", 64 * 1024)
    threads: list[str] = []
    once = SqliteRunner._checkpoint_once

    def recording(conn: sqlite3.Connection) -> tuple[int, int, int]:
        threads.append(threading.current_thread().name)
        return once(conn)

    monkeypatch.setattr(SqliteRunner, "_checkpoint_once", staticmethod(recording))
    path = _db(tmp_path)
    runner = SqliteRunner(path)
    try:
        for i in range(2):  # ~48 KB estimated: not due yet
            assert runner.try_now(lambda i=i: _big(f"k{i}", i))[0]
        await asyncio.sleep(0.05)
        assert runner.checkpoints == 0
        assert runner.try_now(lambda: _big("k2", 2))[0]  # due now
        await _checkpoints(runner, 1)
        # the writer's own batches make one due the same way
        for i in range(3):
            await runner.run(lambda i=i: _big(f"w{i}", i))
        await _checkpoints(runner, 2)
    finally:
        await runner.aclose()
    # the bulk and the tail of each, both on the checkpoint thread
    assert threads == ["ledger-checkpoint"] * 4
    assert len(_rows(path)) == 6


def _wal_restarts(path: str) -> int:
    """The WAL header's checkpoint sequence number: it goes up each time a commit starts the
    WAL again from its beginning (possible only once every frame is in the database file)."""
    with open(path + "-wal", "rb") as f:
        return int.from_bytes(f.read(32)[12:16], "big")


async def test_commits_go_on_during_a_checkpoint_and_the_wal_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint (55-100 ms with its fsyncs on a slow disk) holds up no commit: the bulk
    copy runs beside the writer. The frames committed meanwhile are copied by the short tail,
    with the writer held; without it the WAL would never be backfilled to its end while
    commits keep coming, never start again from its beginning, and grow without bound."""
    import app.store.fastsql as fastsql

    monkeypatch.setattr(fastsql, "CHECKPOINT_BYTES", 64 * 1024)
    copied = threading.Event()
    release = threading.Event()
    bulk = SqliteRunner._checkpoint_bulk

    def held(self: SqliteRunner, conn: sqlite3.Connection) -> None:
        bulk(self, conn)  # the copy, then linger as if it were still copying
        copied.set()
        assert release.wait(10)

    monkeypatch.setattr(SqliteRunner, "_checkpoint_bulk", held)
    path = _db(tmp_path)
    runner = SqliteRunner(path)
    try:
        for i in range(3):
            await runner.run(lambda i=i: _big(f"k{i}", i))
        assert await asyncio.to_thread(copied.wait, 5)
        # the checkpoint is under way: commits go through the writer and in place alike (the
        # first starts the WAL again — everything before it was copied — the second follows)
        assert await asyncio.wait_for(runner.run(lambda: _big("during", 1)), 5) is None
        assert runner.try_now(lambda: insert("in-place", 1)) == (True, 1)
        assert runner.checkpoints == 0
        restarts = _wal_restarts(path)
        release.set()
        await _checkpoints(runner, 1)
        assert _wal_restarts(path) == restarts  # nothing has written since
        await runner.run(lambda: insert("after", 1))
        # the tail copied the two commits made during the checkpoint: this one starts again
        assert _wal_restarts(path) == restarts + 1
    finally:
        release.set()
        await runner.aclose()
    assert len(_rows(path)) == 6


async def test_try_now_never_waits_for_another_connections_write_lock(tmp_path: Path) -> None:
    """Another writer (in this process it may need this very event loop to finish) holds the
    lock: try_now declines at once instead of sleeping in SQLite's busy handler."""
    path = _db(tmp_path)
    runner = SqliteRunner(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await runner.warm()
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO t (k, n) VALUES ('other', 1)")
        assert runner.try_now(lambda: insert("mine", 2)) == (False, None)
        queued = asyncio.ensure_future(runner.run(lambda: insert("mine", 2)))
        await asyncio.sleep(0.05)
        assert not queued.done()  # the writer thread waits for the lock instead
        other.execute("COMMIT")
        assert await queued == 1
        # and the connection still waits patiently through the writer thread afterwards
        assert runner.try_now(lambda: insert("again", 3)) == (True, 1)
    finally:
        other.close()
        await runner.aclose()
    assert [r[0] for r in _rows(path)] == ["again", "mine", "other"]


async def test_orm_connections_leave_checkpoints_to_the_checkpoint_thread(tmp_path: Path) -> None:
    """SQLite's default would make every SQLAlchemy commit past 4 MiB of WAL checkpoint inline
    (fsyncs and all, with the writer thread held for its exclusive turn)."""
    from sqlalchemy import text

    from app.store.db import ORM_AUTOCHECKPOINT_PAGES, make_engine
    from app.store.fastsql import CHECKPOINT_BYTES

    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'orm.db'}")
    try:
        async with engine.connect() as conn:
            pages = (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar_one()
    finally:
        await engine.dispose()
    assert pages == ORM_AUTOCHECKPOINT_PAGES
    assert pages * 4096 == 2 * CHECKPOINT_BYTES
