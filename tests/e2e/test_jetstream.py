"""Run requests through real NATS JetStream into workers, on real PostgreSQL.

The API runs in this process (``spell serve``'s app with ``NATS_URL`` set: no embedded run
worker); workers are either ``spell worker``'s app in this process with the FakeSandbox, or real
``spell worker`` subprocesses with the real bubblewrap sandbox where killing or stopping the
process is the point. Every test uses its own NATS namespace (streams ``SPELL_T…_RUNS`` …,
subjects ``t….run.>``) and deletes it afterwards, and its own fresh database.

NATS: ``NATS_TEST_URL``, else 127.0.0.1:4222 if it answers, else a ``nats-server`` the tests
start on a free port. PostgreSQL: the suite's throw-away database (``SPELL_TEST_DATABASE_URL``),
else one created on ``PG_TEST_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``).
Without either they skip, except in CI (``SPELL_REQUIRE_SERVICES=1``) where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from aiohttp.test_utils import TestClient

from app.bus.jetstream import JetStreamBus, JetStreamConfig
from app.config import Settings
from app.store.auditlog import verify_file
from app.web.app import Overrides, create_app
from app.web.keys import BUS, CONSUMER, SANDBOX_STATE
from app.worker.main import build_worker_app
from tests.conftest import (
    TABLES,
    FakeSandbox,
    Harness,
    in_pass,
    module_pg_database,
    skip_or_fail,
)

pytestmark = [pytest.mark.e2e, in_pass("postgresql")]  # its own database: once per CI

REPO = Path(__file__).resolve().parents[2]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- services


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("NATS_TEST_URL"):
        yield os.environ["NATS_TEST_URL"]
        return
    if _answers("127.0.0.1", 4222):
        yield "nats://127.0.0.1:4222"
        return
    path = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", ""), "/usr/sbin"]
    )
    binary = shutil.which("nats-server", path=path)
    if binary is None:
        skip_or_fail("no NATS on 127.0.0.1:4222 and no nats-server binary to start one")
    port = _free_port()
    store = tmp_path_factory.mktemp("nats")
    proc = subprocess.Popen(
        [str(binary), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if _answers("127.0.0.1", port):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the nats-server the tests started does not answer")
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def pg_base(pg_base_url: str | None) -> Iterator[str]:
    """A throw-away PostgreSQL database for this module's tests."""
    yield from module_pg_database(pg_base_url, "spell_js")


@pytest.fixture
async def pg_url(pg_base: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(pg_base)
    try:
        if await conn.fetchval("SELECT to_regclass('public.casts') IS NOT NULL"):
            await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    return pg_base


@pytest.fixture
async def namespace(nats_url: str) -> AsyncIterator[str]:
    ns = f"t{secrets.token_hex(5)}"
    yield ns
    bus = await JetStreamBus.connect(JetStreamConfig(url=nats_url, namespace=ns))
    try:
        await bus.delete_topology()
    finally:
        await bus.close()


@pytest.fixture
def root() -> Iterator[Path]:
    # Not under pytest's private tmp dir: a root-started worker runs spells as uid 65534.
    path = Path(tempfile.mkdtemp(prefix="spell-js-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def settings(root: Path, pg_url: str, nats_url: str, namespace: str) -> Settings:
    return Settings(
        SPELL_DATA_DIR=str(root / "data"),
        DATABASE_URL=pg_url,
        SPELL_SECRET_KEY="test-secret-key-" + "x" * 32,
        SPELL_RATE_LIMIT_BURST=10_000,
        SPELL_RATE_LIMIT_PER_SEC=10_000,
        NATS_URL=nats_url,
        SPELL_NATS_NAMESPACE=namespace,
        SPELL_RUN_LEASE_SEC=2.0,
        SPELL_SANDBOX_WARM=0,
    )


# ---------------------------------------------------------------------------- processes


@pytest.fixture
async def api(aiohttp_client: Any, settings: Settings) -> Harness:
    """``spell serve``'s app with NATS: the API, the outbox relay and the lease reaper."""
    client = await aiohttp_client(create_app(settings, overrides=Overrides()))
    return Harness(client=client, settings=settings, sandbox=FakeSandbox())


async def start_worker(
    aiohttp_client: Any, settings: Settings, sandbox: FakeSandbox, *, concurrency: int = 2
) -> TestClient[Any, Any]:
    app = build_worker_app(
        settings,
        concurrency=concurrency,
        drain_timeout=10.0,
        overrides=Overrides(sandbox=sandbox),
    )
    client: TestClient[Any, Any] = await aiohttp_client(app)
    return client


def _spell_argv() -> list[str]:
    script = Path(sys.executable).with_name("spell")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli.main"]


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    health: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPELL_", "NATS_")) and k != "DATABASE_URL"
    }
    env.update(
        SPELL_DATA_DIR=str(settings.data_dir),
        DATABASE_URL=str(settings.database_url),
        SPELL_SECRET_KEY="test-secret-key-" + "x" * 32,
        NATS_URL=str(settings.nats_url),
        SPELL_NATS_NAMESPACE=settings.nats_namespace,
        SPELL_RUN_LEASE_SEC=str(settings.run_lease_sec),
        SPELL_SANDBOX_WARM="0",
        SPELL_LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


def spawn_worker(settings: Settings, root: Path, name: str) -> WorkerProcess:
    port = _free_port()
    log_path = root / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*_spell_argv(), "worker", "--concurrency", "2", "--health-port", str(port)],
            env=worker_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    w = WorkerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"spell worker exited with {proc.returncode}:\n{w.output()}")
        try:
            r = httpx.get(f"{w.health}/readyz", timeout=1.0)
            if r.status_code == 200:
                body = r.json()
                assert body["checks"]["sandbox"] == "ok" and body["checks"]["nats"] == "ok"
                return w
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"spell worker did not become ready:\n{w.output()}")


def stop(w: WorkerProcess) -> None:
    if w.proc.poll() is None:
        w.proc.kill()
        w.proc.wait(10)


# ---------------------------------------------------------------------------- helpers


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def publish_spell(h: Harness, maker: str, *, main_py: str, flat_cents: int) -> None:
    digest = await h.upload_bundle(maker, {"spell.json": "{}", "main.py": main_py})
    doc = {
        "id": "com.example.js",
        "name": "JetStream test spell",
        "execution": {"mode": "service", "entrypoint": "main.py", "bundle": digest},
        "pricing": {"model": "flat", "currency": "USD", "flat_cents": flat_cents},
        "inputs": {"type": "object", "properties": {"name": {"type": "string"}}},
    }
    r = await h.client.post("/v1/spells", json=doc, headers=auth(maker))
    assert r.status in (200, 201), await r.text()


async def cast(h: Harness, caster: str, spell_id: str = "com.example.js") -> str:
    r = await h.client.post(
        f"/v1/spells/{spell_id}:cast",
        json={"input": {"name": "x"}},
        headers={
            **auth(caster),
            "Idempotency-Key": secrets.token_hex(8),
            "traceparent": TRACEPARENT,
        },
    )
    assert r.status == 202, await r.text()
    return str((await r.json())["cast_id"])


async def wait_status(h: Harness, caster: str, cast_id: str, *statuses: str) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        r = await h.client.get(f"/v1/casts/{cast_id}", headers=auth(caster))
        body = dict(await r.json())
        if body.get("status") in statuses:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"cast {cast_id} never reached {statuses}: {body}")
        await asyncio.sleep(0.05)


async def stream_messages(bus: JetStreamBus, stream: str) -> int:
    return int((await bus.js.stream_info(stream)).state.messages)


async def consumer_state(bus: JetStreamBus) -> tuple[int, int]:
    """(messages waiting, messages delivered and not acked) of the runs consumer."""
    info = await bus.js.consumer_info(bus.runs.stream, bus.runs.durable)
    return int(info.num_pending or 0), int(info.num_ack_pending or 0)


async def settle_queue(bus: JetStreamBus) -> None:
    """Wait until the runs stream is empty (every message acked; work-queue retention)."""
    deadline = asyncio.get_running_loop().time() + 30
    while await stream_messages(bus, bus.runs.stream):
        assert asyncio.get_running_loop().time() < deadline, await consumer_state(bus)
        await asyncio.sleep(0.05)


async def money(h: Harness, account: str) -> tuple[list[int], int, int]:
    ledger = h.platform.ledger
    lines = [ln.amount_cents for ln in await ledger.ledger_lines(account)]
    view = await ledger.budget(account)
    assert view is not None
    return lines, view.monthly.used_cents, view.monthly.reserved_cents


def audit_events(settings: Settings, cast_id: str) -> list[str]:
    path = settings.data_dir / "audit" / "audit.jsonl"
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("cast_id") == cast_id:
            out.append(str(rec["event"]))
    return out


# ---------------------------------------------------------------------------- tests


async def test_a_published_cast_runs_once_on_a_worker(
    aiohttp_client: Any, api: Harness, settings: Settings
) -> None:
    assert CONSUMER not in api.client.app  # with NATS_URL, `spell serve` runs no casts itself
    ready = await (await api.client.get("/readyz")).json()
    assert ready["checks"]["sandbox"] == "ok"
    assert ready["checks"]["nats"] == "ok"  # the API reports its NATS connection too
    bus = api.client.app[BUS]
    maker, caster = await api.token("m", "maker"), await api.token("c", "caster")
    await publish_spell(api, maker, main_py="print('hi')\n", flat_cents=4)
    cast_id = await cast(api, caster)

    # The run request is in the stream, deduplicated by the cast id, traceparent in its headers.
    deadline = asyncio.get_running_loop().time() + 10
    while await stream_messages(bus, bus.runs.stream) == 0:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    raw = await bus.js.get_msg(bus.runs.stream, 1)
    assert raw.subject is not None and raw.subject.startswith(f"{settings.nats_namespace}.run.")
    assert raw.headers is not None
    assert raw.headers["Nats-Msg-Id"] == cast_id
    assert raw.headers["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]

    sandbox = FakeSandbox()
    worker = await start_worker(aiohttp_client, settings, sandbox)
    done = await wait_status(api, caster, cast_id, "succeeded", "failed")
    assert done["status"] == "succeeded", done
    assert len(sandbox.runs) == 1
    assert sandbox.runs[0].env["TRACEPARENT"].split("-")[1] == TRACEPARENT.split("-")[1]
    await settle_queue(bus)
    assert await consumer_state(bus) == (0, 0)
    assert await money(api, "c") == ([4], 4, 0)
    ready = await (await worker.get("/readyz")).json()
    assert ready["status"] == "ok" and ready["checks"]["nats"] == "ok"
    cast_row = await api.platform.ledger.get_cast(cast_id)
    assert cast_row.attempt == 1
    assert cast_row.traceparent.split("-")[1] == TRACEPARENT.split("-")[1]


async def test_duplicate_publishes_run_the_cast_once(
    aiohttp_client: Any, settings: Settings
) -> None:
    # a long lease: the duplicate window (half of it) comfortably covers this test's publishes
    settings = settings.model_copy(update={"run_lease_sec": 20.0})
    client = await aiohttp_client(create_app(settings, overrides=Overrides()))
    api = Harness(client=client, settings=settings, sandbox=FakeSandbox())
    bus = client.app[BUS]
    maker, caster = await api.token("m", "maker"), await api.token("c", "caster")
    await publish_spell(api, maker, main_py="print('hi')\n", flat_cents=3)
    cast_id = await cast(api, caster)
    while await api.platform.ledger.unsent_outbox():
        await asyncio.sleep(0.02)
    subject = (await bus.js.get_msg(bus.runs.stream, 1)).subject
    assert subject is not None
    plain = subject.removeprefix(f"{settings.nats_namespace}.")
    payload = {"cast_id": cast_id, "traceparent": TRACEPARENT}
    before = bus.runs.duplicates
    # the relay again (a crash between publish and mark-sent): dropped inside the window
    await bus.runs.publish(plain, payload, msg_id=cast_id)
    await bus.runs.publish(plain, payload, msg_id=cast_id)
    assert bus.runs.duplicates == before + 2
    assert await stream_messages(bus, bus.runs.stream) == 1
    # ...and a copy that escaped the window: a second message, still one run
    await bus.runs.publish(plain, payload, msg_id=f"{cast_id}-late")
    assert await stream_messages(bus, bus.runs.stream) == 2

    sandbox = FakeSandbox()
    await start_worker(aiohttp_client, settings, sandbox)
    done = await wait_status(api, caster, cast_id, "succeeded", "failed")
    assert done["status"] == "succeeded"
    await settle_queue(bus)  # both messages acked
    assert len(sandbox.runs) == 1
    assert await money(api, "c") == ([3], 3, 0)
    assert audit_events(settings, cast_id).count("cast.succeeded") == 1


async def test_a_stale_worker_completing_late_is_ignored(
    aiohttp_client: Any, api: Harness, settings: Settings, nats_url: str
) -> None:
    bus = api.client.app[BUS]
    maker, caster = await api.token("m", "maker"), await api.token("c", "caster")
    await publish_spell(api, maker, main_py="print('hi')\n", flat_cents=7)

    # Worker A takes the run request and claims the cast, then stalls: no heartbeat, no ack.
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().pull_subscribe_bind(
            durable=bus.runs.durable, stream=bus.runs.stream
        )
        cast_id = await cast(api, caster)
        (stale_msg,) = await sub.fetch(1, timeout=10)
        assert json.loads(stale_msg.data)["cast_id"] == cast_id
        stale = await api.platform.ledger.claim(cast_id, lease_sec=settings.run_lease_sec)
        assert stale is not None and stale.attempt == 1

        # Worker B: the message comes back after ack_wait, the reaper requeues the cast once
        # A's lease lapsed, B runs attempt 2.
        sandbox = FakeSandbox()
        await start_worker(aiohttp_client, settings, sandbox)
        done = await wait_status(api, caster, cast_id, "succeeded", "failed")
        assert done["status"] == "succeeded"
        assert (await api.platform.ledger.get_cast(cast_id)).attempt == 2

        # A wakes up: its completion and its ack change nothing.
        ledger = api.platform.ledger
        assert await ledger.finish(cast_id, 1, succeeded=True, cost_cents=7) is None
        assert await ledger.finish(cast_id, 1, succeeded=False, error_code="INTERNAL") is None
        await stale_msg.ack()
    finally:
        await nc.close()
    await settle_queue(bus)
    assert len(sandbox.runs) == 1
    assert await money(api, "c") == ([7], 7, 0)
    assert (await api.platform.ledger.get_cast(cast_id)).status == "succeeded"
    assert audit_events(settings, cast_id).count("cast.succeeded") == 1


async def test_exhausted_deliveries_dead_letter_and_fail_the_cast(
    aiohttp_client: Any, root: Path, settings: Settings, nats_url: str
) -> None:
    settings = settings.model_copy(update={"max_deliver": 2, "run_lease_sec": 1.0})
    client = await aiohttp_client(create_app(settings, overrides=Overrides()))
    api = Harness(client=client, settings=settings, sandbox=FakeSandbox())
    bus = client.app[BUS]
    maker, caster = await api.token("m", "maker"), await api.token("c", "caster")
    await publish_spell(api, maker, main_py="print('hi')\n", flat_cents=9)

    # Two deliveries that never complete (workers that die on it before claiming anything).
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().pull_subscribe_bind(
            durable=bus.runs.durable, stream=bus.runs.stream
        )
        cast_id = await cast(api, caster)
        assert (await money(api, "c"))[1:] == (0, 9)  # reserved
        (first,) = await sub.fetch(1, timeout=10)
        (second,) = await sub.fetch(1, timeout=10)
        assert first.metadata.num_delivered == 1 and second.metadata.num_delivered == 2
    finally:
        await nc.close()

    # A worker starts: its pull makes the server give up on the message (MAX_DELIVERIES
    # advisory, stored in the dead-letter stream); the worker reads it and fails the cast.
    sandbox = FakeSandbox()
    await start_worker(aiohttp_client, settings, sandbox)
    done = await wait_status(api, caster, cast_id, "succeeded", "failed")
    assert done["status"] == "failed"
    assert done["error"]["code"] == "INTERNAL"
    assert "delivered 2 times" in done["error"]["message"]
    assert "dead-lettered" in done["error"]["message"]
    assert sandbox.runs == []
    assert await money(api, "c") == ([], 0, 0)  # the reservation was released, nothing billed
    await settle_queue(bus)  # the original message was deleted from the work queue
    assert await stream_messages(bus, bus.dead_stream) == 1  # the dead letter is kept
    assert audit_events(settings, cast_id).count("cast.failed") == 1


def _need_bwrap() -> None:
    if shutil.which("bwrap") is None:
        skip_or_fail("bubblewrap (bwrap) is not installed")


SLOW_SPELL = """\
import json, os, time
print("::progress 10 started", flush=True)
time.sleep(2.5)
with open(os.path.join(os.environ["SPELL_OUT"], "done.txt"), "w") as f:
    f.write("done")
"""


async def test_a_worker_killed_mid_run_is_redelivered_and_billed_once(
    api: Harness, settings: Settings, root: Path
) -> None:
    _need_bwrap()
    bus = api.client.app[BUS]
    maker, caster = await api.token("m", "maker"), await api.token("c", "caster")
    await publish_spell(api, maker, main_py=SLOW_SPELL, flat_cents=5)
    first = await asyncio.to_thread(spawn_worker, settings, root, "worker-1")
    second: WorkerProcess | None = None
    try:
        cast_id = await cast(api, caster)
        await wait_status(api, caster, cast_id, "running")
        first.proc.send_signal(signal.SIGKILL)  # mid-run: no drain, no ack, no finish
        first.proc.wait(10)
        second = await asyncio.to_thread(spawn_worker, settings, root, "worker-2")
        done = await wait_status(api, caster, cast_id, "succeeded", "failed")
        assert done["status"] == "succeeded", (done, second.output())
        row = await api.platform.ledger.get_cast(cast_id)
        assert row.attempt == 2  # the killed attempt, then the one that finished
        await settle_queue(bus)
        assert await money(api, "c") == ([5], 5, 0)
        events = audit_events(settings, cast_id)
        assert events.count("cast.running") == 2
        assert events.count("cast.succeeded") == 1
        assert events.count("ledger.charge") == 1
        stages = [e.stage for e in await api.platform.ledger.events_after(cast_id, 0, limit=1000)]
        assert stages.count("requeued") == 1
        assert verify_file(settings.data_dir / "audit" / "audit.jsonl").ok
        second.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.proc.wait, 30) == 0, second.output()
    finally:
        stop(first)
        if second is not None:
            stop(second)


async def test_sigterm_drains_the_running_cast_then_exits_0(
    api: Harness, settings: Settings, root: Path
) -> None:
    _need_bwrap()
    bus = api.client.app[BUS]
    maker, caster = await api.token("m", "maker"), await api.token("c", "caster")
    await publish_spell(api, maker, main_py=SLOW_SPELL, flat_cents=6)
    w = await asyncio.to_thread(spawn_worker, settings, root, "worker")
    try:
        cast_id = await cast(api, caster)
        await wait_status(api, caster, cast_id, "running")
        w.proc.send_signal(signal.SIGTERM)  # mid-run: fetch no more, finish, ack, exit
        code = await asyncio.to_thread(w.proc.wait, 60)
        assert code == 0, w.output()
        assert "drained" in w.output()
        row = await api.platform.ledger.get_cast(cast_id)
        assert row.status == "succeeded" and row.attempt == 1  # finished by the same worker
        assert await stream_messages(bus, bus.runs.stream) == 0  # and acked before it exited
        assert await consumer_state(bus) == (0, 0)
        assert await money(api, "c") == ([6], 6, 0)
        done = await wait_status(api, caster, cast_id, "succeeded")
        assert done["artifact_url"]
    finally:
        stop(w)


async def test_draining_in_process_worker_finishes_the_run_and_reports_not_ready(
    aiohttp_client: Any, api: Harness, settings: Settings
) -> None:
    bus = api.client.app[BUS]
    maker, caster = await api.token("m", "maker"), await api.token("c", "caster")
    await publish_spell(api, maker, main_py="print('hi')\n", flat_cents=2)
    sandbox = FakeSandbox()
    sandbox.gate.clear()  # runs start and wait
    worker = await start_worker(aiohttp_client, settings, sandbox)
    cast_id = await cast(api, caster)
    while not sandbox.runs:
        await asyncio.sleep(0.02)
    consumer = worker.app[CONSUMER]
    closing = asyncio.create_task(worker.close())  # what SIGTERM does
    while not consumer.stopping.is_set():
        await asyncio.sleep(0.01)
    assert not closing.done()  # waits for the run
    sandbox.gate.set()
    await closing
    row = await api.platform.ledger.get_cast(cast_id)
    assert row.status == "succeeded" and row.attempt == 1
    await settle_queue(bus)
    assert await money(api, "c") == ([2], 2, 0)
    assert worker.app[SANDBOX_STATE]["ready"]


async def test_jobs_go_through_their_own_stream_with_retries_and_a_dead_record(
    nats_url: str, namespace: str
) -> None:
    from app.worker.consumer import JobConsumer

    bus = await JetStreamBus.connect(
        JetStreamConfig(url=nats_url, namespace=namespace, jobs_max_deliver=3)
    )
    seen: list[tuple[str, int, str | None]] = []
    dead: list[tuple[str, str]] = []

    async def flaky(msg: Any) -> None:
        seen.append((msg.subject, msg.num_delivered, msg.headers.get("traceparent")))
        if msg.payload.get("fail") == "always" or msg.num_delivered == 1:
            raise RuntimeError("upstream said 502")

    async def on_dead(msg: Any, error: str) -> None:
        dead.append((msg.msg_id, error))

    consumer = JobConsumer(
        bus.jobs,
        {"webhook.github": flaky},
        concurrency=2,
        max_deliver=bus.jobs.max_deliver,
        backoff=0.05,
        on_dead=on_dead,
    )
    task = asyncio.create_task(consumer.run())
    try:
        await bus.jobs.publish(
            "webhook.github", {"n": 1}, msg_id="d-1", headers={"traceparent": TRACEPARENT}
        )
        await bus.jobs.publish("webhook.github", {"fail": "always"}, msg_id="d-2")
        await bus.jobs.publish("webhook.github", {"n": 1}, msg_id="d-1")  # duplicate: dropped
        deadline = asyncio.get_running_loop().time() + 30
        while len(dead) < 1 or await stream_messages(bus, bus.jobs.stream):
            assert asyncio.get_running_loop().time() < deadline, (seen, dead)
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await bus.close()
    first = [s for s in seen if s[2] == TRACEPARENT]
    assert first == [("webhook.github", 1, TRACEPARENT), ("webhook.github", 2, TRACEPARENT)]
    assert sorted(n for subject, n, tp in seen if tp is None) == [1, 2, 3]
    assert dead == [("d-2", "RuntimeError: upstream said 502")]
    assert bus.jobs.duplicates == 1
