"""Shared fixtures: a platform app on SQLite (default) or PostgreSQL (SPELL_TEST_DATABASE_URL).

CI runs the whole suite twice: once on SQLite, once with SPELL_TEST_DATABASE_URL pointing at the
real PostgreSQL server. Each PostgreSQL run uses a throw-away database created here. Tests that
choose their database themselves (``backend_params``, ``in_pass``) run only in that backend's
pass; the SQLite pass says so with ``SPELL_TEST_PASS=sqlite``. The PostgreSQL pass skips the
tests that never reach the suite's database (no ``database_url`` among their fixtures): they
ran, identically, in the SQLite pass. A plain ``pytest`` runs them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from app.config import Settings
from app.runner.sandbox import SandboxResult, SandboxSpec
from app.web.app import Overrides, create_app
from app.web.keys import PLATFORM

REQUIRE = os.environ.get("SPELL_REQUIRE_SERVICES") == "1"
ROOT = Path(__file__).resolve().parent.parent


def skip_or_fail(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason} (SPELL_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


# ---------------------------------------------------------------------------- database


def _pg_admin_dsn(url: str) -> tuple[str, str]:
    """(dsn of the server's `postgres` database, base url without the database name)."""
    u = url.replace("postgresql+asyncpg://", "postgresql://")
    base, _, _db = u.rpartition("/")
    return base + "/postgres", base


def throwaway_pg_database(url: str, prefix: str) -> Iterator[str]:
    """Create a fresh database named ``<prefix>_<hex>`` on the server of ``url``, yield its
    url, drop it afterwards (``WITH (FORCE)``). Unreachable server: skip, or fail in CI."""
    import asyncpg

    admin, base = _pg_admin_dsn(url)
    name = f"{prefix}_{secrets.token_hex(4)}"

    async def _create() -> None:
        conn = await asyncpg.connect(admin, timeout=5)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    async def _drop() -> None:
        conn = await asyncpg.connect(admin, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    try:
        asyncio.run(_create())
    except Exception as e:  # pragma: no cover - depends on the machine
        skip_or_fail(f"PostgreSQL at {admin} is not reachable: {e}")
    yield f"{base}/{name}"
    asyncio.run(_drop())


def module_pg_database(pg_base_url: str | None, prefix: str) -> Iterator[str]:
    """The session's test database when the suite runs on PostgreSQL, else a throw-away one
    (for e2e modules that need PostgreSQL on the SQLite run too)."""
    if pg_base_url is not None:
        yield pg_base_url
        return
    url = os.environ.get("PG_TEST_URL", "postgresql://postgres@127.0.0.1:5432/test")
    yield from throwaway_pg_database(url, prefix)


#: the database backends a test can choose for itself, each owned by one of CI's two passes
BACKENDS = ("sqlite", "postgresql")


def ci_pass() -> str | None:
    """Which of CI's two runs of the suite this is: ``"postgresql"`` with
    ``SPELL_TEST_DATABASE_URL``, ``"sqlite"`` with ``SPELL_TEST_PASS=sqlite`` (the first pass of
    ``make test`` and CI), ``None`` for a plain ``pytest`` (no pass selected)."""
    chosen = os.environ.get("SPELL_TEST_PASS", "")
    if chosen not in ("", "sqlite"):
        raise pytest.UsageError(f"SPELL_TEST_PASS={chosen!r}: only 'sqlite' (or unset)")
    if os.environ.get("SPELL_TEST_DATABASE_URL"):
        if chosen:
            raise pytest.UsageError("SPELL_TEST_PASS=sqlite with SPELL_TEST_DATABASE_URL set")
        return "postgresql"
    return chosen or None


def in_pass(backend: str) -> pytest.MarkDecorator:
    """Run only in ``backend``'s pass (both when no pass is selected), for tests that choose
    their database themselves: otherwise CI would run them twice, once in each pass."""
    assert backend in BACKENDS, backend
    return pytest.mark.spell_pass(backend)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test runs in one of CI's passes unless the ledger's backend can change its outcome:

    * a test marked :func:`in_pass` runs in that backend's pass only;
    * in the PostgreSQL pass, a test that never reaches the suite's database (no
      ``database_url`` among its fixtures: pure logic, parsers, workflows, the sandbox, its own
      SQLite file) is skipped — it ran, identically, in the SQLite pass;
    * everything else runs in both.
    A plain ``pytest`` (no pass selected) runs everything."""
    this = ci_pass()
    if this is None:
        return
    for item in items:
        mark = item.get_closest_marker("spell_pass")
        if mark is not None:
            if mark.args[0] != this:
                item.add_marker(pytest.mark.skip(reason=f"runs in CI's {mark.args[0]} pass"))
        elif this == "postgresql" and "database_url" not in getattr(item, "fixturenames", ()):
            item.add_marker(
                pytest.mark.skip(reason="does not use the database: runs in CI's sqlite pass")
            )


def backend_params(*backends: str) -> list[Any]:
    """Fixture/parametrize values for tests that run on several backends: each backend only in
    its own pass (all of them when no pass is selected)."""
    return [pytest.param(b, marks=in_pass(b)) for b in backends or BACKENDS]


@pytest.fixture(scope="session")
def pg_base_url() -> Iterator[str | None]:
    url = os.environ.get("SPELL_TEST_DATABASE_URL")
    if not url:
        yield None
        return
    yield from throwaway_pg_database(url, "spell_test")


TABLES = (
    "billing_usage, billing_meters, "
    "billing_refunds, billing_pending, billing_charges, billing_customers, entitlements, "
    "stripe_events, "
    "cast_targets, github_repos, github_installations, github_links, webhook_deliveries, "
    "audit_outbox, audit_pointers, outbox, idempotency_keys, billing_ledger, artifacts, "
    "cast_events, casts, "
    "spell_versions, spells, bundles, tokens, principals, budgets, accounts"
)


@pytest.fixture
async def database_url(pg_base_url: str | None) -> AsyncIterator[str | None]:
    if pg_base_url is None:
        yield None
        return
    import asyncpg

    dsn = pg_base_url
    conn = await asyncpg.connect(dsn)
    try:
        exists = await conn.fetchval("SELECT to_regclass('public.casts') IS NOT NULL")
        if exists:
            await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    yield dsn


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    return Settings(
        SPELL_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=database_url,
        SPELL_SECRET_KEY="test-secret-key-" + "x" * 32,
        SPELL_RATE_LIMIT_BURST=10_000,
        SPELL_RATE_LIMIT_PER_SEC=10_000,
        NATS_URL=None,  # the in-process queue, even if the shell exports NATS_URL
    )


@dataclass
class DeadMessage:
    """What a queue hands out for a MAX_DELIVERIES advisory (a run request by default): a
    ``Message`` double that records its acks."""

    payload: dict[str, Any]
    num_delivered: int = 5
    subject: str = "run.x"
    msg_id: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    dead: bool = True
    acks: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.acks.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.acks.append("nak")

    async def in_progress(self) -> None:
        self.acks.append("wpi")


# ---------------------------------------------------------------------------- sandbox double


class FakeSandbox:
    """A Sandbox-port double for API tests: writes ``result.txt`` from the input, instantly.

    The real bubblewrap sandbox is exercised by tests/e2e; API tests only need the port's shape.
    ``behaviour`` picks the outcome: ok | crash | timeout | slow (waits on ``gate``).
    """

    name = "fake"

    def __init__(self) -> None:
        self.behaviour = "ok"
        self.runs: list[SandboxSpec] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def probe(self) -> None:
        return None

    async def run(
        self,
        spec: SandboxSpec,
        on_line: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> SandboxResult:
        self.runs.append(spec)
        await self.gate.wait()
        data = json.loads(spec.input_path.read_text())
        if on_line is not None:
            await on_line("stdout", "::progress 50 half way")
            await on_line("stderr", "a log line")
        if self.behaviour == "crash":
            return SandboxResult("exit_error", 1, 3, 0, "", "Traceback...\nValueError: boom")
        if self.behaviour == "timeout":
            return SandboxResult("timeout", None, 1000, 0, "", "")
        (spec.out_dir / "result.txt").write_text(json.dumps(data))
        return SandboxResult("ok", 0, 5, (spec.out_dir / "result.txt").stat().st_size, "", "")


# ---------------------------------------------------------------------------- the app


@dataclass
class Harness:
    client: TestClient[Any, Any]
    settings: Settings
    sandbox: FakeSandbox

    @property
    def platform(self) -> Any:
        return self.client.app[PLATFORM]  # type: ignore[index]

    @contextlib.asynccontextmanager
    async def drains_held(self) -> AsyncIterator[None]:
        """No audit drainer appends anything meanwhile (what a crash right after a commit
        leaves): the outbox drain lock is ours."""
        from app.store.audit_outbox import lock_path
        from app.store.filelock import try_lock, unlock

        lock = lock_path(self.platform.audit.path)
        deadline = asyncio.get_running_loop().time() + 10
        while (fd := try_lock(lock)) is None:  # the app's drainer may be in a drain right now
            assert asyncio.get_running_loop().time() < deadline, "the drain lock was never free"
            await asyncio.sleep(0.01)
        try:
            yield
        finally:
            unlock(fd)

    async def pending_audit(self, event: str) -> list[dict[str, Any]]:
        """The ``event`` audit records committed and not yet in the file (the audit outbox)."""
        from app.store import hot

        rows = await self.platform.ledger.fast.run(lambda: hot.pending_audit(100_000), atomic=False)
        return [r for r in rows if r["event"] == event]

    async def token(self, account: str, role: str, ttl: int | None = None) -> str:
        tok, _ = await self.platform.issue_token(account, role, ttl=ttl)
        return str(tok)

    async def upload_bundle(self, token: str, files: dict[str, str]) -> str:
        from app.runner.bundle import pack_dir

        folder = self.settings.data_dir.parent / f"bundle-{secrets.token_hex(4)}"
        folder.mkdir(parents=True)
        for name, content in files.items():
            (folder / name).write_text(content)
        data = pack_dir(folder)
        shutil.rmtree(folder)
        r = await self.client.post(
            "/v1/bundles",
            data=data,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/gzip"},
        )
        assert r.status == 201, await r.text()
        return str((await r.json())["digest"])

    async def publish(
        self,
        token: str,
        *,
        spell_id: str = "com.example.test",
        flat_cents: int = 0,
        inputs: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        digest = await self.upload_bundle(token, {"spell.json": "{}", "main.py": "print('hi')\n"})
        doc: dict[str, Any] = {
            "id": spell_id,
            "name": "Test spell",
            "execution": {"mode": "service", "entrypoint": "main.py", "bundle": digest},
            "pricing": {"model": "flat", "currency": "USD", "flat_cents": flat_cents},
            "inputs": inputs
            or {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
            },
        }
        doc.update(extra)
        r = await self.client.post(
            "/v1/spells", json=doc, headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status in (200, 201), await r.text()
        return dict(await r.json())

    async def cast(
        self,
        token: str,
        spell_id: str = "com.example.test",
        body: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> Any:
        return await self.client.post(
            f"/v1/spells/{spell_id}:cast",
            json=body if body is not None else {"input": {"name": "x"}},
            headers={
                "Authorization": f"Bearer {token}",
                "Idempotency-Key": key or secrets.token_hex(8),
            },
        )

    async def wait_cast(self, token: str, cast_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            r = await self.client.get(
                f"/v1/casts/{cast_id}", headers={"Authorization": f"Bearer {token}"}
            )
            body = dict(await r.json())
            if body.get("status") in ("succeeded", "failed"):
                return body
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"cast {cast_id} did not finish: {body}")
            await asyncio.sleep(0.02)


@pytest.fixture
def fake_sandbox() -> FakeSandbox:
    return FakeSandbox()


@pytest.fixture
def overrides(fake_sandbox: FakeSandbox) -> Overrides:
    return Overrides(sandbox=fake_sandbox)


@pytest.fixture
async def harness(
    aiohttp_client: Any, settings: Settings, overrides: Overrides, fake_sandbox: FakeSandbox
) -> Harness:
    client = await aiohttp_client(create_app(settings, overrides=overrides))
    return Harness(client=client, settings=settings, sandbox=fake_sandbox)


class FrozenClock:
    def __init__(self, now: datetime | None = None) -> None:
        self.current = now or datetime.now(UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


def make_tar(members: dict[str, bytes | None]) -> bytes:
    """Build a tar.gz by hand (for hostile-bundle tests); None makes a symlink to /etc/passwd."""
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/passwd"
                tf.addfile(info)
            else:
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()
