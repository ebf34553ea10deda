"""W3C ``traceparent`` end to end (issue 5, item 6): the caller's trace goes from the API request
into the run request's NATS message headers, is read there by a real ``spell worker`` process,
reaches the spell (``TRACEPARENT``) and is written with the worker's ledger and audit records.

Real NATS JetStream, PostgreSQL and bubblewrap, as in test_jetstream.py (whose fixtures it uses).
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import shutil
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.bus.jetstream import SharedEventHub
from app.config import Settings
from app.web.keys import BUS, PLATFORM
from tests.conftest import FakeSandbox, Harness, skip_or_fail
from tests.e2e.test_jetstream import (
    WorkerProcess,
    _free_port,
    _spell_argv,
    api,  # noqa: F401 - fixture
    auth,
    money,
    namespace,  # noqa: F401 - fixture
    nats_url,  # noqa: F401 - fixture
    pg_base,  # noqa: F401 - fixture
    pg_url,  # noqa: F401 - fixture
    publish_spell,
    root,  # noqa: F401 - fixture
    settings,  # noqa: F401 - fixture
    start_worker,
    stop,
    stream_messages,
    wait_status,
    worker_env,
)

pytestmark = pytest.mark.e2e

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"

TRACE_SPELL = """\
import os
with open(os.path.join(os.environ["SPELL_OUT"], "trace.txt"), "w") as f:
    f.write(os.environ.get("TRACEPARENT", ""))
"""


def spawn_debug_worker(cfg: Settings, folder: Path) -> WorkerProcess:
    """``spell worker`` logging at DEBUG (its per-message line shows the header it received)."""
    port = _free_port()
    log_path = folder / "worker-trace.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*_spell_argv(), "worker", "--concurrency", "1", "--health-port", str(port)],
            env=worker_env(cfg, SPELL_LOG_LEVEL="DEBUG"),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )
    w = WorkerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"spell worker exited with {proc.returncode}:\n{w.output()}")
        try:
            if httpx.get(f"{w.health}/readyz", timeout=1.0).status_code == 200:
                return w
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"spell worker did not become ready:\n{w.output()}")


def trace_of(traceparent: str | None) -> str:
    assert traceparent, "no traceparent"
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, len(span_id), flags) == ("00", 16, "01"), traceparent
    return trace_id


async def test_traceparent_goes_from_the_request_through_nats_to_the_worker_and_ledger(
    api: Harness,  # noqa: F811 - fixture
    settings: Settings,  # noqa: F811 - fixture
    root: Path,  # noqa: F811 - fixture
) -> None:
    if shutil.which("bwrap") is None:
        skip_or_fail("bubblewrap (bwrap) is not installed")
    bus = api.client.app[BUS]
    maker, caster = await api.token("m", "maker"), await api.token("c", "caster")
    await publish_spell(api, maker, main_py=TRACE_SPELL, flat_cents=3)

    # 1. the API request carries the caller's trace; the answer continues it
    r = await api.client.post(
        "/v1/spells/com.example.js:cast",
        json={"input": {"name": "x"}},
        headers={
            **auth(caster),
            "Idempotency-Key": secrets.token_hex(8),
            "traceparent": TRACEPARENT,
        },
    )
    assert r.status == 202, await r.text()
    assert trace_of(r.headers.get("traceparent")) == TRACE_ID
    cast_id = str((await r.json())["cast_id"])

    # 2. the run request in JetStream (no worker yet: it waits there) has it in its headers
    deadline = asyncio.get_running_loop().time() + 10
    while await stream_messages(bus, bus.runs.stream) == 0:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    raw = await bus.js.get_msg(bus.runs.stream, 1)
    assert raw.headers is not None and raw.headers["Nats-Msg-Id"] == cast_id
    assert trace_of(raw.headers["traceparent"]) == TRACE_ID
    assert json.loads(raw.data or b"{}")["cast_id"] == cast_id

    # 3. a separate `spell worker` process takes it: its log shows the header it read
    worker = await asyncio.to_thread(spawn_debug_worker, settings, root)
    try:
        done = await wait_status(api, caster, cast_id, "succeeded", "failed")
        assert done["status"] == "succeeded", (done, worker.output()[-3000:])
    finally:
        log_text = worker.output()
        stop(worker)
    seen = [
        rec
        for rec in (json.loads(ln) for ln in log_text.splitlines() if ln.startswith("{"))
        if rec.get("cast_id") == cast_id and "run request" in rec.get("msg", "")
    ]
    assert len(seen) == 1, log_text[-3000:]
    assert trace_of(seen[0]["traceparent"]) == TRACE_ID

    # 4. the spell ran with it (the sandbox's TRACEPARENT, written into its output)
    async with api.client.session.get(done["artifact_url"]) as resp:
        assert resp.status == 200
        blob = await resp.read()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        assert trace_of(z.read("trace.txt").decode()) == TRACE_ID

    # 5. the ledger's cast row and every audit record of the cast, the worker's included
    row = await api.platform.ledger.get_cast(cast_id)
    assert trace_of(row.traceparent) == TRACE_ID
    assert await money(api, "c") == ([3], 3, 0)
    records: list[dict[str, Any]] = [
        json.loads(ln)
        for ln in (settings.data_dir / "audit" / "audit.jsonl").read_text().splitlines()
        if ln.strip()
    ]
    mine = [rec for rec in records if rec.get("cast_id") == cast_id]
    events = [rec["event"] for rec in mine]
    assert events == ["cast.accepted", "cast.running", "cast.succeeded", "ledger.charge"]
    assert {rec["actor"] for rec in mine[1:]} == {"worker"}
    assert {trace_of(rec["traceparent"]) for rec in mine} == {TRACE_ID}


async def test_a_workers_cast_events_wake_the_api_process_sse_stream_through_nats(
    aiohttp_client: Any,
    api: Harness,  # noqa: F811 - fixture
    settings: Settings,  # noqa: F811 - fixture
) -> None:
    """The worker's claim, progress and finish reach the API process as ``events.<cast id>``:
    its SSE stream is woken at once instead of at its next once-a-second poll."""
    hub = api.platform.hub
    assert isinstance(hub, SharedEventHub)
    woken: list[str] = []
    local = hub.notify_local

    def spy(cast_id: str) -> None:
        woken.append(cast_id)
        local(cast_id)

    hub.notify_local = spy  # type: ignore[method-assign]
    maker, caster = await api.token("m", "maker"), await api.token("c", "caster")
    await publish_spell(api, maker, main_py="print('hi')\n", flat_cents=1)
    r = await api.client.post(
        "/v1/spells/com.example.js:cast",
        json={"input": {"name": "x"}},
        headers={**auth(caster), "Idempotency-Key": secrets.token_hex(8)},
    )
    assert r.status == 202, await r.text()
    cast_id = str((await r.json())["cast_id"])
    assert woken == []  # the API itself wrote nothing but the queued event

    sse = await api.client.get(f"/v1/casts/{cast_id}/events", headers=auth(caster))
    worker = await start_worker(aiohttp_client, settings, FakeSandbox())
    worker_hub = worker.app[PLATFORM].hub
    assert isinstance(worker_hub, SharedEventHub) and worker_hub is not hub  # two processes
    body = (await sse.read()).decode()  # the stream ends after the terminal event
    stages = [ln.split(":", 1)[1].strip() for ln in body.splitlines() if ln.startswith("event:")]
    assert stages[0] == "queued" and stages[-1] == "succeeded", body
    # woken by the worker's notifications: claim (running), progress lines, finish
    assert set(woken) == {cast_id}
    assert len(woken) >= 2
