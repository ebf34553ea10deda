"""The ledger's hot paths on the bare database drivers: one definition, two backends.

Accepting a cast or a webhook delivery is a handful of small statements in one transaction.
Through SQLAlchemy's async ORM on aiosqlite each of them costs a thread hand-off plus ORM
bookkeeping (~4 ms of CPU per cast, measured in bench/README.md); the database itself needs
~0.1 ms. So the few hot use cases are written as *programs*: generators that yield
:class:`Stmt` and receive :class:`Res`, with no I/O of their own. A runner executes a program
in one transaction:

* :class:`SqliteRunner` — one writer thread owning a stdlib ``sqlite3`` connection. It takes
  every program queued while it was busy and runs them in ONE ``BEGIN IMMEDIATE`` transaction,
  each inside its own ``SAVEPOINT`` (a failing program is rolled back alone), then commits once
  and wakes all callers with a single loop callback: group commit. SQLAlchemy writers of the
  same process take the thread's :meth:`SqliteRunner.exclusive` turn, so the two never meet in
  SQLite's busy handler.
* :class:`PgRunner` — an asyncpg pool; each program runs in its own transaction with the
  server's prepared-statement cache. PostgreSQL does its own group commit.

SQL is written once with ``?`` placeholders in the dialect both accept (``ON CONFLICT``,
``RETURNING``); :class:`Json` marks JSON parameters and datetimes are converted per backend
exactly as SQLAlchemy's column types store them, so ORM reads see the same values.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

#: How long closing the PostgreSQL pool waits for checked-out connections before terminating.
CLOSE_TIMEOUT_SEC = 10.0


@dataclass(frozen=True, slots=True)
class Json:
    """A parameter stored in a JSON column (text on SQLite, ``json`` on PostgreSQL)."""

    value: Any


@dataclass(frozen=True, slots=True)
class Stmt:
    sql: str
    args: Sequence[Any] = ()
    #: ``rows``: collect the result rows (``SELECT`` / ``RETURNING``)
    rows: bool = False


@dataclass(frozen=True, slots=True)
class Many:
    """Independent writes whose results are not needed: run one after the other on SQLite,
    sent as ONE statement (data-modifying CTEs) to PostgreSQL — one round trip, not n."""

    stmts: tuple[Stmt, ...]


@dataclass(slots=True)
class Res:
    rowcount: int
    rows: list[tuple[Any, ...]] = field(default_factory=list)

    def first(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None


Program = Generator[Stmt | Many, Res, T]


# ---------------------------------------------------------------------------- value adaptation


def sqlite_time(value: datetime) -> str:
    """The text SQLAlchemy's SQLite ``DateTime`` stores (naive UTC, microseconds)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the ledger; use timezone-aware UTC")
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _sqlite_arg(value: Any) -> Any:
    if isinstance(value, Json):
        return json.dumps(value.value)
    if isinstance(value, datetime):
        return sqlite_time(value)
    return value


def _pg_arg(value: Any) -> Any:
    if isinstance(value, Json):
        return json.dumps(value.value)
    if isinstance(value, datetime) and value.tzinfo is None:
        raise ValueError("naive datetime given to the ledger; use timezone-aware UTC")
    return value


_PLACEHOLDER = re.compile(r"\?")


def pg_sql(sql: str, _cache: dict[str, str] = {}) -> str:  # noqa: B006 - a deliberate memo
    """``?`` placeholders → ``$1, $2, …`` (our SQL never has ``?`` inside a literal)."""
    out = _cache.get(sql)
    if out is None:
        counter = iter(range(1, 10_000))
        out = _PLACEHOLDER.sub(lambda _m: f"${next(counter)}", sql)
        _cache[sql] = out
    return out


# ---------------------------------------------------------------------------- SQLite


class _Job(Generic[T]):
    __slots__ = ("error", "factory", "future", "outcome")

    def __init__(self, factory: Callable[[], Program[T]], future: asyncio.Future[T] | None) -> None:
        self.factory = factory
        self.future = future
        self.outcome: Any = None
        self.error: BaseException | None = None


class _Barrier:
    """An exclusive turn for another writer: the thread commits its batch, then waits."""

    __slots__ = ("done", "go")

    def __init__(self, go: asyncio.Future[None]) -> None:
        self.go = go
        self.done = threading.Event()


_STOP = object()

#: what the writer's connection writes to the WAL before a checkpoint copies it back.
#: SQLite's own ``wal_autocheckpoint`` (default 1,000 pages, 4 MiB) checkpoints inside whichever
#: COMMIT crosses the mark — possibly one on the event loop's thread (see
#: :meth:`SqliteRunner.try_now`), which must not stall on a checkpoint's fsyncs. 16 MiB: pages
#: written again and again (index leaves, counters) are copied back once per checkpoint, and
#: the two fsyncs are paid less often — storing 14 KiB webhook deliveries in batches of 24
#: cost 0.041 ms of system time each at 4 MiB, 0.036 at 16 MiB (bench/webhook_store_floor.py).
CHECKPOINT_BYTES = 16 * 1024 * 1024
CHECKPOINT_COMMITS = 1024
#: how long the writer thread waits for another connection's write lock (SQLite busy handler)
BUSY_TIMEOUT_MS = 30_000


class _Written:
    """An estimate of what has gone to the WAL since the last checkpoint: the bound parameters
    plus a page per writing statement (an over-estimate checkpoints a little early)."""

    __slots__ = ("bytes", "commits")

    def __init__(self) -> None:
        self.bytes = 0
        self.commits = 0

    def due(self) -> bool:
        return self.bytes >= CHECKPOINT_BYTES or self.commits >= CHECKPOINT_COMMITS


def _args_size(args: Sequence[Any]) -> int:
    n = 4096
    for a in args:
        if isinstance(a, bytes | str):
            n += len(a)
    return n


def _drive_sqlite(
    conn: sqlite3.Connection, program: Program[T], written: _Written | None = None
) -> T:
    try:
        stmt = next(program)
        while True:
            if isinstance(stmt, Many):
                for one in stmt.stmts:
                    args = [_sqlite_arg(a) for a in one.args]
                    if written is not None:
                        written.bytes += _args_size(args)
                    conn.execute(one.sql, args).close()
                stmt = program.send(Res(rowcount=0))
                continue
            args = [_sqlite_arg(a) for a in stmt.args]
            if written is not None and not stmt.sql.startswith("SELECT"):
                written.bytes += _args_size(args)
            cur = conn.execute(stmt.sql, args)
            rows = cur.fetchall() if stmt.rows else []
            # sqlite3 reports rowcount for DML; with RETURNING it is only final after fetchall
            res = Res(rowcount=cur.rowcount if cur.rowcount >= 0 else len(rows), rows=rows)
            cur.close()
            stmt = program.send(res)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


class SqliteRunner:
    """Group-committing writer thread for SQLite (see the module docstring).

    WAL checkpoints run on a second thread with its own connection (``ledger-checkpoint``),
    woken when the writer has written ``CHECKPOINT_BYTES`` or ``CHECKPOINT_COMMITS`` since the
    last one. The bulk of the copy runs while the writer goes on committing (SQLite lets a
    PASSIVE checkpoint and a writer work at once): a 16 MiB checkpoint with its two fsyncs took
    55-100 ms on this project's VMs, and doing it on the writer held every commit — a webhook
    delivery's 202, a cast's answer — that long. Then, with the writer held for a moment, a
    second PASSIVE checkpoint copies the few frames committed meanwhile: a WAL backfilled to its
    end is started again from its beginning by the next commit, where one that is never quite
    caught up (commits landing during every checkpoint) would grow without bound."""

    #: programs per transaction at most (keeps one commit's latency bounded)
    MAX_BATCH = 256

    def __init__(self, path: str) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: held by whoever uses the connection: the writer thread for a batch, a checkpoint or
        #: another connection's exclusive turn; the event loop's thread for :meth:`try_now`
        self._busy = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._written = _Written()
        #: a checkpoint was asked for and has not finished (read and set holding ``_busy``)
        self._checkpoint_queued = False
        self._checkpoint_wake = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._closed = False
        #: checkpoints completed by the checkpoint thread (for tests and curiosity)
        self.checkpoints = 0

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        # this connection's commits never checkpoint: the writer thread does (CHECKPOINT_BYTES)
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._closed:
                raise RuntimeError("the ledger is closed")
            if self._thread is None:
                conn = self._connect()
                self._conn = conn
                t = threading.Thread(
                    target=self._serve, args=(conn,), name="ledger-writer", daemon=True
                )
                t.start()
                self._thread = t
                c = threading.Thread(
                    target=self._checkpoint_loop, name="ledger-checkpoint", daemon=True
                )
                c.start()
                self._checkpointer = c

    async def warm(self) -> None:
        """Start the writer thread now (at start-up) rather than on the first request."""
        self._ensure_thread()

    async def run(self, factory: Callable[[], Program[T]], *, atomic: bool = True) -> T:
        """Run one program in a (shared) write transaction; its result or its exception.
        (``atomic`` matters only on PostgreSQL: here every program runs in a savepoint.)"""
        self._ensure_thread()
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Job(factory, fut))
        return await fut

    def try_now(self, factory: Callable[[], Program[T]]) -> tuple[bool, T | None]:
        """Run one program in its own transaction right here, on the caller's thread, if the
        writer is idle: ``(True, result)`` (or its exception); ``(False, None)`` when the
        writer is busy or has work queued — then :meth:`run` it.

        For callers that batch for themselves (the webhook front, the outbox relay) at low
        rates: a round trip to the writer thread costs ~0.07 ms of CPU here (two thread
        wake-ups), more than a small transaction itself. Never blocks: COMMIT writes the WAL
        without fsync (``synchronous=NORMAL``) and never checkpoints (the checkpoint thread
        does)."""
        self._ensure_thread()
        conn = self._conn
        if conn is None or not self._queue.empty() or not self._busy.acquire(blocking=False):
            return False, None
        try:
            # Never wait on this thread for another connection's write lock (a writer of this
            # process may need this very event loop to finish): try to take it, else queue.
            conn.execute("PRAGMA busy_timeout=0")
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                return False, None
            finally:
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            job: _Job[T] = _Job(factory, None)
            self._execute(conn, [job], begun=True)
            self._maybe_checkpoint()
        finally:
            self._busy.release()
        if job.error is not None:
            raise job.error
        return True, job.outcome

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the writer thread still (no open transaction) while another connection writes."""
        if self._thread is None:  # nothing to keep out yet
            yield
            return
        barrier = _Barrier(asyncio.get_running_loop().create_future())
        self._queue.put(barrier)
        try:
            await asyncio.shield(barrier.go)
            yield
        finally:
            if barrier.go.done():
                barrier.done.set()
            else:  # cancelled while waiting: release the turn as soon as it is granted
                barrier.go.add_done_callback(lambda _f: barrier.done.set())

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, thread.join)
            self._checkpoint_wake.set()
            if self._checkpointer is not None:
                await loop.run_in_executor(None, self._checkpointer.join)
            self._thread = None
            self._checkpointer = None
            self._conn = None

    # -- the thread

    def _serve(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                if isinstance(item, _Barrier):
                    with self._busy:
                        self._grant(item)
                    continue
                batch: list[_Job[Any]] = [item]
                follow: Any = None
                while len(batch) < self.MAX_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(nxt, _Job):
                        batch.append(nxt)
                    else:
                        follow = nxt
                        break
                with self._busy:
                    self._execute(conn, batch)
                    self._maybe_checkpoint()
                self._wake(batch)
                if follow is _STOP:
                    return
                if isinstance(follow, _Barrier):
                    with self._busy:
                        self._grant(follow)
        finally:
            with self._busy:
                conn.close()

    def _maybe_checkpoint(self) -> None:
        """After a commit (``_busy`` held): wake the checkpoint thread when one is due."""
        if self._written.due() and not self._checkpoint_queued:
            self._checkpoint_queued = True
            self._written = _Written()
            self._checkpoint_wake.set()

    def _checkpoint_loop(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                self._checkpoint_wake.wait()
                self._checkpoint_wake.clear()
                if self._closed and (self._thread is None or not self._thread.is_alive()):
                    return
                if not self._checkpoint_queued:
                    continue
                try:
                    if conn is None:
                        conn = sqlite3.connect(
                            self.path, isolation_level=None, check_same_thread=False
                        )
                        conn.execute("PRAGMA synchronous=NORMAL")
                    self._checkpoint_bulk(conn)
                    with self._busy:  # the tail, with nobody committing
                        busy, log_frames, copied = self._checkpoint_once(conn)
                        self.checkpoints += 1
                    if busy or log_frames != copied:
                        # a reader's snapshot (or another process) kept frames back: the WAL
                        # goes on from where it is, and the next checkpoint tries again
                        log.info(
                            "ledger WAL checkpoint incomplete: %d of %d frames copied",
                            copied,
                            log_frames,
                        )
                except sqlite3.Error as e:  # busy or I/O: the next one catches up
                    log.warning("ledger WAL checkpoint failed: %s", e)
                except Exception:  # never let the thread die: checkpoints would stop
                    log.exception("ledger WAL checkpoint failed")
                finally:
                    with self._busy:
                        self._checkpoint_queued = False
        finally:
            if conn is not None:
                conn.close()

    def _checkpoint_bulk(self, conn: sqlite3.Connection) -> None:
        """The copy of everything committed so far, while the writer goes on (a seam for
        tests: they hold it to show that commits are not held up)."""
        self._checkpoint_once(conn)

    @staticmethod
    def _checkpoint_once(conn: sqlite3.Connection) -> tuple[int, int, int]:
        """Copy the WAL back into the database (PASSIVE: never waits for readers or writers):
        SQLite's ``(busy, frames in the WAL, frames copied)``."""
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    @staticmethod
    def _grant(barrier: _Barrier) -> None:
        loop = barrier.go.get_loop()
        try:
            loop.call_soon_threadsafe(_set_result, barrier.go)
        except RuntimeError:  # its loop is closed: nobody holds the turn
            return
        # Wait until the holder is done; a holder whose loop died never releases, so look up.
        while not barrier.done.wait(1.0):
            if loop.is_closed():
                return

    def _execute(
        self, conn: sqlite3.Connection, batch: list[_Job[Any]], *, begun: bool = False
    ) -> None:
        """One transaction for the batch, each program in its own savepoint; outcomes and
        errors are left on the jobs (the caller holds ``_busy``; ``begun``: it also opened
        the transaction)."""
        if not begun:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                for job in batch:
                    job.error = e
                return
        written = self._written
        broken: BaseException | None = None
        for job in batch:
            if broken is not None:
                job.error = broken
                continue
            if job.future is not None and job.future.cancelled():
                continue
            try:
                conn.execute("SAVEPOINT job")
                try:
                    job.outcome = _drive_sqlite(conn, job.factory(), written)
                except Exception as e:
                    job.error = e
                    conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            except sqlite3.Error as e:  # the transaction itself failed (I/O, lock, corruption)
                broken = e
                job.error = job.error or e
        try:
            if broken is not None:
                raise broken
            conn.execute("COMMIT")
            written.commits += 1
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for job in batch:
                job.error = job.error or e
                job.outcome = None

    @staticmethod
    def _wake(batch: list[_Job[Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job[Any]]] = {}
        for job in batch:
            assert job.future is not None
            by_loop.setdefault(job.future.get_loop(), []).append(job)
        for loop, jobs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_resolve, jobs)


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _resolve(jobs: list[_Job[Any]]) -> None:
    for job in jobs:
        assert job.future is not None
        if job.future.done():
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.outcome)


# ---------------------------------------------------------------------------- PostgreSQL


class PgRunner:
    """asyncpg pool; each program is one transaction."""

    def __init__(self, dsn: str, *, max_size: int = 4) -> None:
        self.dsn = dsn
        self.max_size = max_size
        self._pool: Any = None
        self._init = asyncio.Lock()

    async def _get_pool(self) -> Any:
        if self._pool is None:
            async with self._init:
                if self._pool is None:
                    import asyncpg

                    # Every connection opened up front: opening one (a PostgreSQL backend
                    # fork) in the middle of a burst costs that burst several milliseconds.
                    self._pool = await asyncpg.create_pool(
                        self.dsn, min_size=self.max_size, max_size=self.max_size
                    )
        return self._pool

    async def warm(self) -> None:
        """Open the pool now (at start-up) rather than on the first request."""
        await self._get_pool()

    async def run(self, factory: Callable[[], Program[T]], *, atomic: bool = True) -> T:
        """Run one program in its own transaction. ``atomic=False`` (one-statement programs
        only, e.g. a read) skips BEGIN/COMMIT: each statement is atomic by itself."""
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            if not atomic:
                return await self._drive(conn, factory())
            async with conn.transaction():
                return await self._drive(conn, factory())

    @staticmethod
    async def _drive(conn: Any, program: Program[T]) -> T:
        try:
            stmt = next(program)
            while True:
                if isinstance(stmt, Many):
                    stmt = program.send(await _pg_many(conn, stmt))
                    continue
                sql = pg_sql(stmt.sql)
                args = [_pg_arg(a) for a in stmt.args]
                if stmt.rows:
                    recs = await conn.fetch(sql, *args)
                    res = Res(rowcount=len(recs), rows=[tuple(r) for r in recs])
                else:
                    status = await conn.execute(sql, *args)
                    res = Res(rowcount=_pg_rowcount(status))
                stmt = program.send(res)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def try_now(self, factory: Callable[[], Program[T]]) -> tuple[bool, T | None]:
        """Never: asyncpg is asynchronous only (see :meth:`SqliteRunner.try_now`)."""
        return False, None

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        yield  # PostgreSQL arbitrates writers itself

    async def aclose(self, *, timeout: float = CLOSE_TIMEOUT_SEC) -> None:
        """Close the pool; connections still checked out after ``timeout`` seconds (a task
        cancelled mid-query, a peer that never released) are terminated instead of waited for:
        asyncpg's graceful ``close()`` alone waits for every release, so a shutdown could
        hang forever."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout)
            except TimeoutError:
                log.warning("PostgreSQL pool did not close in %.0f s; terminating it", timeout)
                pool.terminate()


async def _pg_many(conn: Any, many: Many) -> Res:
    if len(many.stmts) == 1:
        one = many.stmts[0]
        await conn.execute(pg_sql(one.sql), *[_pg_arg(a) for a in one.args])
        return Res(rowcount=0)
    parts = ", ".join(f"q{i} AS ({one.sql})" for i, one in enumerate(many.stmts))
    args = [_pg_arg(a) for one in many.stmts for a in one.args]
    await conn.execute(pg_sql(f"WITH {parts} SELECT 1"), *args)
    return Res(rowcount=0)


def _pg_rowcount(status: str) -> int:
    """asyncpg's command tag (``INSERT 0 1``, ``UPDATE 3``) → the row count."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


Runner = SqliteRunner | PgRunner


def runner_for_url(url: str, *, pool_size: int = 4) -> Runner:
    """The runner for a SQLAlchemy URL (``sqlite+aiosqlite:///…`` or ``postgresql+asyncpg://…``)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        db = u.database or ""
        if db in ("", ":memory:"):
            raise ValueError("the fast ledger path needs a SQLite file, not an in-memory database")
        return SqliteRunner(db)
    dsn = u.set(drivername="postgresql").render_as_string(hide_password=False)
    return PgRunner(dsn, max_size=pool_size)
