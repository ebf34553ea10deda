"""The webhook ingest front (app/web/ingest.py) over real sockets, on SQLite and PostgreSQL.

``create_app`` with ``SPELL_WEBHOOK_PORT=0``: the front listens on a free port of 127.0.0.1 in
the same process and event loop as the API. Deliveries are signed the way GitHub signs them
(the contract fake's ``sign_webhook``) and checked in the ledger: stored once, with the same
rows the API's ``/webhooks/github`` route writes, then processed by the unchanged job handlers
(an ``issue_comment`` ``/cast`` → a workflow dispatch on the contract-enforcing fake GitHub).

PostgreSQL: the suite's throw-away database (``SPELL_TEST_DATABASE_URL``), else one created on
``PG_TEST_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``); skipped when neither
answers, except in CI (``SPELL_REQUIRE_SERVICES=1``) where that fails.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from app.config import Settings
from app.store.fastsql import PgRunner
from app.store.github_store import GitHubStore
from app.web.app import Overrides, create_app
from app.web.ingest import FRONT
from app.web.keys import INBOX, LEDGER
from tests.conftest import (
    TABLES,
    FakeSandbox,
    Harness,
    backend_params,
    in_pass,
    module_pg_database,
)
from tests.contract.fake_github import FakeGitHub
from tests.contract.test_github_flow import (
    INSTALLATION,
    REPO,
    WF_SPELL,
    _comment_payload,
    _installation_payload,
)

pytestmark = pytest.mark.e2e

SECRET = "front-webhook-secret"


# ---------------------------------------------------------------------------- services


@pytest.fixture(scope="module")
def pg_base(pg_base_url: str | None) -> Iterator[str]:
    yield from module_pg_database(pg_base_url, "spell_front")


@pytest.fixture(params=backend_params())
def db_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    import asyncpg

    base: str = request.getfixturevalue("pg_base")  # only the PostgreSQL runs need it

    async def truncate() -> None:
        conn = await asyncpg.connect(base)
        try:
            if await conn.fetchval("SELECT to_regclass('public.casts') IS NOT NULL"):
                await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()

    asyncio.run(truncate())
    return base


@pytest.fixture
async def fake() -> AsyncIterator[FakeGitHub]:
    gh = FakeGitHub()
    gh.add_installation(
        INSTALLATION,
        "octo-org",
        ["app-repo"],
        {
            "contents": "read",
            "actions": "write",
            "issues": "write",
            "pull_requests": "write",
            "checks": "write",
        },
    )
    gh.set_permission(REPO, "octocat", "write")
    gh.add_workflow(REPO, "spell-run.yml")
    await gh.start()
    yield gh
    await gh.close()
    assert gh.violations == []


def front_settings(tmp_path: Any, db_url: str | None, fake: FakeGitHub, **extra: Any) -> Settings:
    return Settings(
        SPELL_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=db_url,
        SPELL_SECRET_KEY="s" * 40,
        SPELL_PUBLIC_URL="http://spell.test",
        NATS_URL=None,
        GITHUB_APP_ID=fake.app_id,
        GITHUB_APP_PRIVATE_KEY=fake.private_key_pem,
        GITHUB_WEBHOOK_SECRET=SECRET,
        GITHUB_API_URL=fake.url,
        SPELL_WEBHOOK_PORT=0,
        SPELL_WEBHOOK_HOST="127.0.0.1",
        **extra,
    )


@pytest.fixture
async def quiet(
    aiohttp_client: Any, tmp_path: Any, db_url: str | None, fake: FakeGitHub
) -> Harness:
    """The app with the front and NO job worker: deliveries stay as the front stored them."""
    settings = front_settings(tmp_path, db_url, fake, SPELL_MAX_WEBHOOK_BYTES=64 * 1024)
    app = create_app(settings, overrides=Overrides(sandbox=FakeSandbox(), run_worker=False))
    client = await aiohttp_client(app)
    return Harness(client=client, settings=settings, sandbox=FakeSandbox())


def port_of(h: Harness) -> int:
    return h.client.app[FRONT].port  # type: ignore[index]


def signed(fake: FakeGitHub, event: str, payload: Any, **over: str) -> tuple[dict[str, str], bytes]:
    headers, body = fake.sign_webhook(event, payload, SECRET)
    headers.update(over)
    return headers, body


def raw_request(headers: dict[str, str], body: bytes, *, path: str = "/webhooks/github") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return int(status_line.split()[1]), headers, body


async def count(h: Harness, table: str, where: str = "") -> int:
    ledger = h.client.app[LEDGER]  # type: ignore[index]
    from sqlalchemy import text

    async with ledger.reader() as s:
        return int(await s.scalar(text(f"SELECT count(*) FROM {table} {where}")))  # noqa: S608


# ---------------------------------------------------------------------------- the contract


async def test_a_signed_delivery_is_202_and_stored_as_the_route_stores_it(
    quiet: Harness, fake: FakeGitHub
) -> None:
    h = quiet
    headers, body = signed(fake, "issue_comment", _comment_payload(fake, "/cast x"))
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            f"http://127.0.0.1:{port_of(h)}/webhooks/github", data=body, headers=headers
        )
        assert r.status == 202, await r.text()
        assert await r.json() == {"delivery_id": headers["X-GitHub-Delivery"], "duplicate": False}
    # the same delivery kind through the API's aiohttp route, for comparison
    headers2, body2 = signed(fake, "issue_comment", _comment_payload(fake, "/cast y"))
    r2 = await h.client.post("/webhooks/github", data=body2, headers=headers2)
    assert r2.status == 202

    inbox = h.client.app[INBOX]  # type: ignore[index]
    mine = await inbox.get(headers["X-GitHub-Delivery"])
    theirs = await inbox.get(headers2["X-GitHub-Delivery"])
    assert mine is not None and theirs is not None
    assert mine.payload == body  # the raw bytes, unparsed
    # by the front and the route alike: lz4-compressed on SQLite (app/store/bodies.py), raw on
    # PostgreSQL (which compresses it in TOAST)
    if isinstance(inbox.ledger.fast, PgRunner):
        assert mine.body_encoding is None and bytes(mine.body) == body
    else:
        assert mine.body_encoding == "lz4" and len(mine.body) < len(body) // 2
    cols = ("source", "event", "body_encoding", "status", "attempts", "last_error", "processed_at")
    for col in cols:
        assert getattr(mine, col) == getattr(theirs, col), col
    assert mine.received_at.tzinfo is not None or theirs.received_at.tzinfo is None
    ledger = h.client.app[LEDGER]  # type: ignore[index]
    from sqlalchemy import select

    from app.store.models import Outbox

    async with ledger.reader() as s:
        rows = {o.msg_id: o for o in (await s.scalars(select(Outbox))).all()}
    a, b = rows[f"wh:{mine.delivery_id}"], rows[f"wh:{theirs.delivery_id}"]
    assert (a.subject, a.sent_at) == (b.subject, b.sent_at) == ("webhook.github", None)
    assert a.payload == {"delivery_id": mine.delivery_id}
    assert b.payload == {"delivery_id": theirs.delivery_id}
    # one delivery at a trickle: stored on the loop's thread on SQLite (no hand-off to the
    # writer thread); PostgreSQL's driver is asynchronous, so never there
    front = h.client.app[FRONT]  # type: ignore[index]
    sqlite = h.settings.database_url is None
    assert front.stats["in_place"] == (1 if sqlite else 0)


async def test_a_duplicate_delivery_is_stored_once(quiet: Harness, fake: FakeGitHub) -> None:
    h = quiet
    headers, body = signed(fake, "issue_comment", {"action": "created", "n": 1})
    url = f"http://127.0.0.1:{port_of(h)}/webhooks/github"
    async with aiohttp.ClientSession() as s:
        r1 = await s.post(url, data=body, headers=headers)
        r2 = await s.post(url, data=body, headers=headers)
        assert (r1.status, r2.status) == (202, 200)
        assert (await r2.json())["duplicate"] is True
        # a delivery id the API route stored first is a duplicate for the front too
        h3, b3 = signed(fake, "issue_comment", {"action": "created", "n": 3})
        assert (await h.client.post("/webhooks/github", data=b3, headers=h3)).status == 202
        r3 = await s.post(url, data=b3, headers=h3)
        assert r3.status == 200 and (await r3.json())["duplicate"] is True
    did = headers["X-GitHub-Delivery"]
    assert await count(h, "webhook_deliveries", f"WHERE delivery_id = '{did}'") == 1
    assert await count(h, "outbox", f"WHERE msg_id = 'wh:{did}'") == 1
    assert await count(h, "webhook_deliveries") == 2


async def test_bad_or_missing_signatures_are_401_and_nothing_is_stored(
    quiet: Harness, fake: FakeGitHub
) -> None:
    h = quiet
    url = f"http://127.0.0.1:{port_of(h)}/webhooks/github"
    headers, body = fake.sign_webhook("issue_comment", {"x": 1}, "not-the-secret")
    async with aiohttp.ClientSession() as s:
        r = await s.post(url, data=body, headers=headers)
        assert r.status == 401
        err = (await r.json())["error"]
        assert err["code"] == "UNAUTHORIZED" and SECRET not in json.dumps(err)
        del headers["X-Hub-Signature-256"]
        r = await s.post(url, data=body, headers=headers)
        assert r.status == 401 and (await r.json())["error"]["code"] == "UNAUTHORIZED"
        # a right signature over another body
        good, _body = signed(fake, "issue_comment", {"x": 1})
        r = await s.post(url, data=body + b" ", headers=good)
        assert r.status == 401
    assert await count(h, "webhook_deliveries") == 0
    assert await count(h, "outbox") == 0


async def test_oversize_is_413_without_reading_the_body(quiet: Harness, fake: FakeGitHub) -> None:
    h = quiet
    headers, _ = signed(fake, "issue_comment", {"x": 1})
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(h))
    try:
        big = 64 * 1024 + 1
        head = raw_request(headers, b"")
        head = head.replace(b"Content-Length: 0", b"Content-Length: %d" % big)
        writer.write(head)  # the head only: the answer comes before any body byte
        await writer.drain()
        status, hdrs, body = await read_response(reader)
        assert status == 413 and hdrs["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
    finally:
        writer.close()
    assert await count(h, "webhook_deliveries") == 0


async def test_other_methods_and_paths(quiet: Harness) -> None:
    url = f"http://127.0.0.1:{port_of(quiet)}"
    async with aiohttp.ClientSession() as s:
        r = await s.get(url + "/webhooks/github")
        assert r.status == 405 and r.headers["Allow"] == "POST"
        assert (await r.json())["error"]["code"] == "METHOD_NOT_ALLOWED"
        r = await s.put(url + "/webhooks/github", data=b"{}")
        assert r.status == 405
        r = await s.get(url + "/v1/spells")
        assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"


async def test_ping_is_answered(quiet: Harness, fake: FakeGitHub) -> None:
    headers, body = signed(fake, "ping", {"zen": "Keep it logically awesome.", "hook_id": 1})
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            f"http://127.0.0.1:{port_of(quiet)}/webhooks/github", data=body, headers=headers
        )
        assert r.status == 200
        assert await r.json() == {"ok": True, "pong": headers["X-GitHub-Delivery"]}
    assert await count(quiet, "webhook_deliveries") == 0


async def test_keep_alive_serves_several_requests_on_one_connection(
    quiet: Harness, fake: FakeGitHub
) -> None:
    h = quiet
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(h))
    try:
        ids = []
        for i in range(5):
            headers, body = signed(fake, "issue_comment", {"action": "created", "i": i})
            ids.append(headers["X-GitHub-Delivery"])
            writer.write(raw_request(headers, body))
            await writer.drain()
            status, hdrs, resp = await read_response(reader)
            assert status == 202 and "connection" not in hdrs
            assert json.loads(resp)["delivery_id"] == ids[-1]
    finally:
        writer.close()
    assert await count(h, "webhook_deliveries") == 5


async def test_pipelined_requests_are_answered_in_order(quiet: Harness, fake: FakeGitHub) -> None:
    h = quiet
    reqs: list[bytes] = []
    expect: list[tuple[int, str | None]] = []
    repeat: tuple[dict[str, str], bytes] | None = None
    for i in range(12):
        headers, body = signed(fake, "issue_comment", {"action": "created", "i": i})
        if i == 4:
            headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64
            expect.append((401, None))
        elif i == 7:  # a repeat of request 2 inside the same pipeline
            assert repeat is not None
            headers, body = repeat
            expect.append((200, headers["X-GitHub-Delivery"]))
        else:
            expect.append((202, headers["X-GitHub-Delivery"]))
        if i == 2:
            repeat = (headers, body)
        reqs.append(raw_request(headers, body))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(h))
    try:
        writer.write(b"".join(reqs))  # all at once, before reading any answer
        await writer.drain()
        got = []
        for _ in reqs:
            status, _hdrs, resp = await read_response(reader)
            got.append((status, json.loads(resp).get("delivery_id")))
    finally:
        writer.close()
    assert got == expect
    assert await count(h, "webhook_deliveries") == 10
    assert await count(h, "outbox", "WHERE subject = 'webhook.github'") == 10


async def test_many_concurrent_connections_all_stored(quiet: Harness, fake: FakeGitHub) -> None:
    h = quiet
    url = f"http://127.0.0.1:{port_of(h)}/webhooks/github"
    deliveries = [signed(fake, "issue_comment", {"action": "created", "i": i}) for i in range(60)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=20)) as s:

        async def post(hb: tuple[dict[str, str], bytes]) -> int:
            r = await s.post(url, data=hb[1], headers=hb[0])
            return r.status

        statuses = await asyncio.gather(*(post(d) for d in deliveries))
    assert statuses == [202] * 60
    assert await count(h, "webhook_deliveries") == 60
    assert await count(h, "outbox", "WHERE subject = 'webhook.github'") == 60


async def test_the_front_counters_are_on_the_api_metrics(quiet: Harness, fake: FakeGitHub) -> None:
    """``GET /metrics`` on the API port exports the front's counters (Prometheus text format)."""
    from prometheus_client.parser import text_string_to_metric_families

    h = quiet

    async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        r = await h.client.get("/metrics")
        assert r.status == 200
        out = {}
        for family in text_string_to_metric_families(await r.text()):
            for smp in family.samples:
                out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
        return out

    def result(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
        return got[("webhook_front_deliveries_total", (("result", name),))]

    before = await scrape()
    assert [result(before, n) for n in ("accepted", "duplicate", "rejected", "error")] == [0] * 4
    assert before[("webhook_front_batches_total", ())] == 0
    url = f"http://127.0.0.1:{port_of(h)}/webhooks/github"
    deliveries = [signed(fake, "issue_comment", {"action": "created", "i": i}) for i in range(5)]
    async with aiohttp.ClientSession() as s:
        for hdrs, body in deliveries:
            assert (await s.post(url, data=body, headers=hdrs)).status == 202
        hdrs, body = deliveries[0]
        assert (await s.post(url, data=body, headers=hdrs)).status == 200  # a repeat
        bad, _ = fake.sign_webhook("issue_comment", {"x": 1}, "not-the-secret")
        assert (await s.post(url, data=body, headers=bad)).status == 401
    got = await scrape()
    assert result(got, "accepted") == 5
    assert result(got, "duplicate") == 1
    assert result(got, "rejected") == 1
    assert result(got, "error") == 0
    batches = got[("webhook_front_batches_total", ())]
    assert 1 <= batches <= 6
    assert got[("webhook_front_batch_size_count", ())] == batches
    assert got[("webhook_front_batch_size_sum", ())] == 6  # every stored or deduped request


# ---------------------------------------------------------------------------- end to end


@pytest.fixture
async def full(aiohttp_client: Any, tmp_path: Any, db_url: str | None, fake: FakeGitHub) -> Harness:
    """The app with the front AND the job worker (the real handlers against the fake GitHub)."""
    settings = front_settings(tmp_path, db_url, fake)
    sandbox = FakeSandbox()
    app = create_app(settings, overrides=Overrides(sandbox=sandbox, job_backoff=0.05))
    client = await aiohttp_client(app)
    return Harness(client=client, settings=settings, sandbox=sandbox)


async def until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


async def test_a_cast_comment_through_the_front_dispatches_the_workflow(
    full: Harness, fake: FakeGitHub
) -> None:
    h = full
    url = f"http://127.0.0.1:{port_of(h)}/webhooks/github"
    inbox = h.client.app[INBOX]  # type: ignore[index]

    async def deliver(s: aiohttp.ClientSession, event: str, payload: Any) -> str:
        headers, body = signed(fake, event, payload)
        r = await s.post(url, data=body, headers=headers)
        assert r.status == 202, await r.text()
        return headers["X-GitHub-Delivery"]

    async def processed(delivery_id: str) -> str:
        async def final() -> bool:
            d = await inbox.get(delivery_id)
            return d is not None and d.status in ("done", "ignored", "dead")

        await until(final)
        d = await inbox.get(delivery_id)
        return str(d.status)

    async with aiohttp.ClientSession() as s:
        assert await processed(await deliver(s, "installation", _installation_payload())) == "done"
        store = GitHubStore(h.platform.ledger, h.platform.clock)
        await h.token("ACME", "caster")
        await store.link("user", "octocat", "ACME")
        maker = await h.token("makers", "maker")
        doc = {
            "id": WF_SPELL,
            "name": "Workflow spell",
            "execution": {
                "mode": "workflow",
                "timeout_sec": 600,
                "workflow": {"repo": REPO, "workflow_id": "spell-run.yml"},
            },
            "pricing": {"model": "flat", "currency": "USD", "flat_cents": 5},
            "inputs": {"type": "object", "properties": {"name": {"type": "string"}}},
        }
        r = await h.client.post(
            "/v1/spells", json=doc, headers={"Authorization": f"Bearer {maker}"}
        )
        assert r.status == 201, await r.text()

        payload = _comment_payload(fake, f"/cast {WF_SPELL} name=world")
        delivery = await deliver(s, "issue_comment", payload)
        assert await processed(delivery) == "done"

    async def dispatched() -> bool:
        return bool(fake.requests_for("actions/create-workflow-dispatch"))

    await until(dispatched)
    [dispatch] = fake.requests_for("actions/create-workflow-dispatch")
    assert json.loads(dispatch.body["inputs"]["payload"]) == {"name": "world"}
    cast = await h.platform.ledger.get_cast(dispatch.body["inputs"]["cast_id"])
    assert cast is not None and cast.mode == "workflow"
    reactions = [r.body["content"] for r in fake.requests_for("reactions/create-for-issue-comment")]
    assert reactions and reactions[0] == "eyes"


@in_pass("sqlite")
async def test_without_the_port_setting_there_is_no_front(
    aiohttp_client: Any, tmp_path: Any, fake: FakeGitHub
) -> None:
    settings = front_settings(tmp_path, None, fake).model_copy(update={"webhook_port": None})
    client = await aiohttp_client(create_app(settings, overrides=Overrides(run_worker=False)))
    assert FRONT not in client.app
    headers, body = signed(fake, "issue_comment", {"x": 1})
    r = await client.post("/webhooks/github", data=body, headers=headers)
    assert r.status == 202  # the API's route keeps working as before


@in_pass("sqlite")
def test_spell_serve_webhook_port_starts_the_front(tmp_path: Any) -> None:
    """The real ``spell serve --webhook-port`` process: the front answers on its port, the
    delivery lands in the server's ledger, SIGTERM stops both cleanly."""
    import signal
    import socket
    import sqlite3
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from app.github.webhooks import sign

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    api_port, front_port = free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPELL_", "GITHUB_")) and k not in ("DATABASE_URL", "NATS_URL")
    }
    env.update(
        SPELL_DATA_DIR=str(tmp_path / "data"),
        SPELL_SECRET_KEY="k" * 40,
        SPELL_WORKERS="0",
        GITHUB_APP_ID="4242",
        GITHUB_APP_PRIVATE_KEY=pem,
        GITHUB_WEBHOOK_SECRET=SECRET,
        GITHUB_API_URL="http://127.0.0.1:9",  # never reached in this test
    )
    script = Path(sys.executable).with_name("spell")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "app.cli.main"]
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [
                *argv,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(api_port),
                "--webhook-port",
                str(front_port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{front_port}/webhooks/github"
        body = b'{"action":"created","installation":{"id":1}}'
        headers = {
            "X-GitHub-Event": "installation",
            "X-GitHub-Delivery": "cli-front-1",
            "X-Hub-Signature-256": sign(body, SECRET),
            "Content-Type": "application/json",
        }
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log_path.read_text()
            try:
                r = httpx.post(url, content=body, headers=headers, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        assert r.status_code == 202, r.text
        assert r.json() == {"delivery_id": "cli-front-1", "duplicate": False}
        assert httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=5).status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise
    out = log_path.read_text()
    assert code == 0, out
    assert f"webhook ingest front on 127.0.0.1:{front_port}/webhooks/github" in out
    assert SECRET not in out and "Traceback" not in out
    db = sqlite3.connect(tmp_path / "data" / "spell.db")
    try:
        rows = db.execute("SELECT delivery_id, event, body FROM webhook_deliveries").fetchall()
    finally:
        db.close()
    assert rows == [("cli-front-1", "installation", body)]
