"""Shared plumbing for the benchmarks in bench/: a real `spell serve` subprocess on 127.0.0.1,
throw-away PostgreSQL databases, tokens, publishing the hello bundle, stats and JSON output.

Every server is started by us (its pid is kept) and stopped by that pid; every PostgreSQL
database is created with a random name and dropped WITH (FORCE) afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from app.config import Settings  # noqa: E402

RESULTS = ROOT / "bench" / "results"
HELLO_DIR = ROOT / "templates" / "spells" / "hello"
SPELL_BIN = Path(sys.executable).parent / "spell"
PG_ADMIN = os.environ.get("SPELL_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
SECRET = "bench-secret-key-" + "x" * 40
HOST = "127.0.0.1"  # all load goes to loopback only


# ---------------------------------------------------------------------------- statistics


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation), as in bench/sandbox_overhead.py."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3),
        "mean": round(statistics.fmean(values), 3),
    }


def median(values: list[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return round(statistics.median(vals), 3) if vals else float("nan")


def machine_info() -> dict[str, Any]:
    bw = subprocess.run(["bwrap", "--version"], capture_output=True, text=True, check=False)
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "app"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    return {
        "git_head": git,
        "app_files_modified_in_worktree": [ln[3:] for ln in dirty if ln.strip()],
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "bwrap": bw.stdout.strip(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {**data, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for i, r in enumerate(cells):
        out.append(
            "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.2f}"
    return str(c)


# ---------------------------------------------------------------------------- PostgreSQL


async def pg_available() -> str | None:
    """None when the admin DSN answers, else the reason."""
    import asyncpg

    try:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    await conn.close()
    return None


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A throw-away database; yields its postgresql:// URL; dropped (FORCE) afterwards."""
    import asyncpg

    name = f"spell_bench_{secrets.token_hex(4)}"
    base = PG_ADMIN.rpartition("/")[0]
    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield f"{base}/{name}"
    finally:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


# ---------------------------------------------------------------------------- environment


@dataclass
class Env:
    """One isolated platform instance's configuration: data dir + database."""

    backend: str  # sqlite | postgresql
    data_dir: Path
    database_url: str | None
    workers: int = 1
    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPELL_", "DATABASE_URL"))}
        env.update(
            {
                "SPELL_DATA_DIR": str(self.data_dir),
                "SPELL_SECRET_KEY": SECRET,
                "SPELL_RATE_LIMIT_BURST": "100000000",
                "SPELL_RATE_LIMIT_PER_SEC": "100000000",
                "SPELL_DEFAULT_MONTHLY_CAP_CENTS": "",
                "SPELL_WORKERS": str(self.workers),
                "SPELL_LOG_LEVEL": "INFO",
            }
        )
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        env.update(self.extra)
        return env

    def settings(self) -> Settings:
        return Settings(
            SPELL_DATA_DIR=str(self.data_dir),
            DATABASE_URL=self.database_url,
            SPELL_SECRET_KEY=SECRET,
            SPELL_DEFAULT_MONTHLY_CAP_CENTS=None,
        )


@contextlib.asynccontextmanager
async def platform_env(backend: str, *, workers: int = 1) -> AsyncIterator[Env]:
    """A fresh data dir (and, for PostgreSQL, a fresh database), removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix=f"spell-bench-{backend}-"))
    try:
        if backend == "postgresql":
            async with pg_database() as url:
                yield Env(backend, tmp / "data", url, workers)
        else:
            yield Env(backend, tmp / "data", None, workers)
    finally:
        # the run folders a root server puts under the system temp dir for this data dir
        # (app.worker.runs.sandbox_work_dir), then our own temp dir
        digest = hashlib.sha256(str((tmp / "data").resolve()).encode()).hexdigest()[:12]
        shutil.rmtree(Path(tempfile.gettempdir()) / f"spell-work-{digest}", ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


async def issue_tokens(env: Env, wanted: list[tuple[str, str]]) -> list[str]:
    """Issue tokens on the local ledger (the way `spell token issue` does), before the server."""
    from app.cli.local import local_platform

    out = []
    async with local_platform(env.settings()) as platform_:
        for account, role in wanted:
            tok, _ = await platform_.issue_token(account, role, ttl=6 * 3600)
            out.append(str(tok))
    return out


# ---------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """`spell serve` (or another launcher argv) as a child process, in its own process group."""

    def __init__(self, env: Env, argv: list[str] | None = None) -> None:
        self.env = env
        self.port = free_port()
        self.argv = argv or [str(SPELL_BIN), "serve", "--host", HOST, "--port", str(self.port)]
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = env.data_dir.parent / f"server-{self.port}.log"

    async def start(self, timeout: float = 30.0) -> None:
        self.env.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        with self.log_path.open("wb") as logf:
            self.proc = subprocess.Popen(
                argv,
                env=self.env.env(),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=ROOT,
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.proc.returncode}: {self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with s.get(self.url + "/readyz") as r:
                        body = await r.json()
                        if r.status == 200 and body["checks"]["sandbox"] == "ok":
                            return
                        if r.status == 200:
                            raise RuntimeError(f"server ready but sandbox unavailable: {body}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready in {timeout}s: {self.log_tail()}")
                await asyncio.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def errors_in_log(self) -> list[str]:
        """ERROR/CRITICAL lines the server logged (JSON log lines)."""
        out = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if (
                    '"level": "ERROR"' in line
                    or '"level": "CRITICAL"' in line
                    or "Traceback" in line
                ):
                    out.append(line[:500])
        return out

    async def stop(self) -> int | None:
        """SIGTERM the server (by its pid), then SIGKILL its own process group if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            for _ in range(150):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group we created for it
            self.proc.wait(5)
        return self.proc.returncode


@contextlib.asynccontextmanager
async def running_server(env: Env, argv: list[str] | None = None) -> AsyncIterator[Server]:
    server = Server(env, argv)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# ---------------------------------------------------------------------------- API helpers


def proc_cpu_ms(pid: int) -> float:
    """User + system CPU time of one process (all its threads), in milliseconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def session(limit: int = 256, timeout: float = 30.0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


async def upload_hello(s: aiohttp.ClientSession, url: str, maker: str) -> str:
    from app.runner.bundle import pack_dir

    data = pack_dir(HELLO_DIR)
    async with s.post(
        url + "/v1/bundles",
        data=data,
        headers={**auth(maker), "Content-Type": "application/gzip"},
    ) as r:
        body = await r.json()
        if r.status != 201:
            raise RuntimeError(f"bundle upload failed: {r.status} {body}")
        return str(body["digest"])


async def publish_hello(
    s: aiohttp.ClientSession, url: str, maker: str, digest: str, *, spell_id: str, flat_cents: int
) -> dict[str, Any]:
    doc = json.loads((HELLO_DIR / "spell.json").read_text())
    doc["id"] = spell_id
    doc["name"] = f"Hello ({flat_cents} cents)"
    doc["execution"]["bundle"] = digest
    doc["pricing"] = {"model": "flat", "currency": "USD", "flat_cents": flat_cents}
    async with s.post(url + "/v1/spells", json=doc, headers=auth(maker)) as r:
        body = await r.json()
        if r.status not in (200, 201):
            raise RuntimeError(f"publish failed: {r.status} {body}")
        return dict(body)


def idem() -> str:
    return secrets.token_hex(16)


async def scrape_cast_counts(s: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """spell cast counters from /metrics (accepted / succeeded / failed), best effort."""
    out: dict[str, float] = {}
    with contextlib.suppress(Exception):
        async with s.get(url + "/metrics") as r:
            text = await r.text()
        for line in text.splitlines():
            if not line.startswith("cast_count_total{"):
                continue
            name, _, value = line.rpartition(" ")
            status = name.split('status="', 1)[1].split('"', 1)[0]
            out[status] = out.get(status, 0.0) + float(value)
    return out
