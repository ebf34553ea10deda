"""Webhook ingest: our `/webhooks/github` side by side with a minimal Probot app (issue #3).

One real GitHub `issue_comment` delivery (npm @octokit/webhooks-examples, via
tests/contract/contracts.py; the `created` example that has an `installation`), its comment body
replaced by `/cast com.example.hello name=world` + prose, padded to exactly 14 KiB of compact
JSON, signed the way GitHub signs (`X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw
body>`). Every request carries a unique `X-GitHub-Delivery` (the real case); our dedupe path
(one delivery id repeated) is measured separately.

Servers, one at a time (order rotated each repetition), all on 127.0.0.1:

  ours-ingest   create_app(Settings(), Overrides(run_worker=False)) under aiohttp's run_app
                (`--serve-ingest` below): the request path exactly as `spell serve` has it
                (verify HMAC, store the raw delivery + its outbox row in one transaction, 202),
                with the in-process worker off, so the handlers that would call GitHub stay out
                of the numbers. SQLite and PostgreSQL (a throw-away database, dropped after).
  ours-front    the same app with the dedicated webhook ingest front (app/web/ingest.py,
                SPELL_WEBHOOK_PORT): llhttp (httptools) on asyncio.Protocol, the same HMAC
                check, deliveries stored in batches (one transaction of two multi-row INSERTs
                per batch, each answered 202 only after its batch committed). The load goes to
                the front's port; the API's /healthz on its own port is only the start probe.
                At the end its counters are read from the API's /metrics (webhook_front_*).
  ours-front-threaded  ours-front with every batch stored through the SQLite writer thread
                (FrontLimits.in_place_gap=None): the front before session 4, for comparison
  ours-front-pglz  (PostgreSQL only) ours-front with the delivery body's TOAST compression set
                back to pglz (`ALTER TABLE webhook_deliveries ALTER COLUMN body SET COMPRESSION
                pglz` in the throw-away database after start-up): the cost before migration
                0007 (lz4), measured in the same run. Every PostgreSQL run records the column's
                setting and how the stored bodies were really compressed.
  probot        `probot run ./index.js` (bench/probot_app, probot pinned in package.json):
                @octokit/webhooks signature verification + parsing `/cast` lines, no GitHub
                call; NODE_ENV=production, LOG_LEVEL=warn (no log line per request; ours writes
                none either). This is the baseline of the target.
  probot-info   the same with Probot's default LOG_LEVEL=info (pino-http logs every request).
  ref-aiohttp   reference floor, not a product: bare aiohttp + the same HMAC check, 202, no
                storage (`--serve-ref aiohttp`): what Python + aiohttp costs per delivery here.
  ref-sqlite3   the same + the delivery and outbox rows in one BEGIN IMMEDIATE transaction through
                the stdlib sqlite3 driver (WAL, synchronous=NORMAL, like ours) on the loop thread.

Per server: a bad-signature check (a wrong signature and a changed body must be refused), 300
warm-up deliveries, 3 s idle CPU, then
  1. max deliveries/s: wrk (2 threads, 32 connections, keep-alive; the Lua script gives every
     request a unique delivery id) for --duration seconds;
  2. (ours) the dedupe path: the same with one delivery id repeated (200 {"duplicate": true});
  3. open loop at each of --rates (default 200/s, then 100/s) for --duration seconds from a
     separate Python process (aiohttp); latency from each request's *scheduled* send time, so a
     stall is not hidden (no coordinated omission).
For every phase: accepted deliveries counted by the server (rows in webhook_deliveries / the
Probot handler's counter at GET /bench/stats), server CPU = utime+stime of its process tree from
/proc (+ the PostgreSQL backends of its database: `*_incl_pg`) per accepted delivery, max RSS
(VmRSS of the tree, every 50 ms), the load generator's CPU and everything else the machine ran
meanwhile (`cpu_ms_other_processes`: other benchmarks or test suites sharing the CPUs).
Afterwards: every accepted delivery is a row with its outbox message (ours), the repeated id is
stored once, every 202 of the open loop is stored; every accepted delivery reached Probot's
handler and parsed one command.

Then, once per run:
  * cost breakdown, in-process (no HTTP): HMAC check of 14 KiB; Inbox.accept as the server runs
    it (SQLAlchemy asyncio ORM session on aiosqlite), the same two INSERTs with SQLAlchemy async
    Core, sync Core, and stdlib sqlite3; the App JWT from the PEM vs a pre-loaded key;
  * worker on: the real `spell serve` (relay + jobs consumer) at --worker-rate for
    --worker-seconds, GitHub unreachable (GITHUB_API_URL=http://127.0.0.1:9), CPU until every
    delivery is final (dead after 6 attempts with backoff): the cost of a GitHub outage.

The load generator and the servers share the machine's CPUs: max deliveries/s and latencies are
what is left after wrk and other load; CPU per delivery is the server's own.

Usage:
  python bench/webhook_ingest.py                  # 3 repetitions, SQLite and PostgreSQL
  python bench/webhook_ingest.py --quick          # 1 repetition, 5 s phases, SQLite only
  python bench/webhook_ingest.py --quick --backends postgresql --servers ours-front,ours-front-pglz
                                                  # lz4 vs pglz bodies on PostgreSQL, same run
  options: --reps N --duration S --rates 200,100 --backends sqlite,postgresql
           --servers ours-ingest,ours-front,ours-front-pglz,probot,probot-info,ref-aiohttp,
                     ref-sqlite3
           --worker-rate 0 (skip) --no-breakdown
Results: bench/results/webhook_ingest.json (every run, medians, ratios ours/Probot, targets).
Needs: wrk (apt-get install wrk); node/npm (bench/probot_app is installed with `npm ci` when
node_modules is missing); the contracts (bash tests/fixtures/install_contracts.sh);
PostgreSQL at SPELL_BENCH_PG_ADMIN (default postgresql://postgres@127.0.0.1:5432/postgres),
else the PostgreSQL part is skipped and noted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from _common import percentile  # noqa: E402 - after the path set-up above

HOST = "127.0.0.1"  # every byte of load goes to loopback
PROBOT_DIR = ROOT / "bench" / "probot_app"
RESULTS = ROOT / "bench" / "results"
SPELL_BIN = Path(sys.executable).parent / "spell"
PG_ADMIN = os.environ.get("SPELL_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PAYLOAD_BYTES = 14 * 1024
COMMAND = "/cast com.example.hello name=world"
OUR_PATH = "/webhooks/github"
PROBOT_PATH = "/api/github/webhooks"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------------- the payload

_PROSE = (
    "Thanks for the quick turnaround on this one. I re-ran the failing job against the latest "
    "main and the flaky step is gone; the artifact sizes look right and the timings are back to "
    "what we had before the runner image changed. Casting the hello spell below to double-check "
    "the end-to-end path before we cut the release candidate. "
)


def build_payload(size: int = PAYLOAD_BYTES) -> tuple[bytes, dict[str, Any]]:
    """A real issue_comment.created example, body = the command + prose, exactly ``size`` bytes."""
    from tests.contract.contracts import webhook_examples

    examples = [e for e in webhook_examples()["issue_comment"] if e.get("action") == "created"]
    with_inst = [e for e in examples if "installation" in e]
    p = (with_inst or examples)[0]
    p.setdefault("installation", {"id": 2, "node_id": "MDIzOkludGVncmF0aW9uMg=="})
    head = COMMAND + "\n\n"

    def encode(body: str) -> bytes:
        p["comment"]["body"] = body
        return json.dumps(p, separators=(",", ":"), ensure_ascii=False).encode()

    base = len(encode(head))
    if base > size:
        raise RuntimeError(f"the example alone is {base} bytes > {size}")
    pad = (_PROSE * (1 + (size - base) // len(_PROSE)))[: size - base]
    body = encode(head + pad)
    # JSON escaping is 1:1 for this ASCII prose, but be exact anyway.
    while len(body) > size:
        pad = pad[:-1]
        body = encode(head + pad)
    while len(body) < size:
        pad += "."
        body = encode(head + pad)
    return body, {
        "bytes": len(body),
        "source": "@octokit/webhooks-examples issue_comment.created "
        f"(comment id {p['comment']['id']}, installation {p['installation']['id']})",
        "comment_body_chars": len(p["comment"]["body"]),
        "comment_body_starts": p["comment"]["body"][:60],
    }


def github_signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def rsa_key_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


# ---------------------------------------------------------------------------- wrk

WRK_LUA = r"""
-- bench/webhook_ingest.py: POST the signed payload; a unique X-GitHub-Delivery per request
-- (the signature covers the body only). args: body_file path signature mode(unique|dup) nonce
local body, path, sig, mode, nonce
local counter = 0
statuses = {}
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  body = f:read("*a")
  f:close()
  path, sig, mode, nonce = args[2], args[3], args[4], args[5]
end

function request()
  counter = counter + 1
  local id
  if mode == "dup" then
    id = nonce .. "-dup"
  else
    id = nonce .. "-" .. tid .. "-" .. counter
  end
  return wrk.format("POST", path, {
    ["Content-Type"] = "application/json",
    ["User-Agent"] = "GitHub-Hookshot/bench",
    ["X-GitHub-Event"] = "issue_comment",
    ["X-GitHub-Delivery"] = id,
    ["X-GitHub-Hook-ID"] = "1",
    ["X-Hub-Signature-256"] = sig,
  }, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do
      total[k] = (total[k] or 0) + v
    end
  end
  for k, v in pairs(total) do
    io.write(string.format("STATUS %s %d\n", tostring(k), v))
  end
  io.write(string.format("SUMMARY requests=%d duration_us=%d errors_connect=%d errors_read=%d "
    .. "errors_write=%d errors_status=%d errors_timeout=%d\n",
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout))
  for _, p in ipairs({50, 90, 99, 99.9}) do
    io.write(string.format("PCT %g %d\n", p, latency:percentile(p)))
  end
  io.write(string.format("LATMAX %d\n", latency.max))
end
"""


def parse_wrk(out: str) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    res: dict[str, Any] = {"statuses": statuses, "latency_ms": {}}
    for line in out.splitlines():
        if line.startswith("STATUS "):
            _, code, n = line.split()
            statuses[code] = statuses.get(code, 0) + int(n)
        elif line.startswith("SUMMARY "):
            for kv in line.split()[1:]:
                k, v = kv.split("=")
                res[k] = int(v)
        elif line.startswith("PCT "):
            _, p, us = line.split()
            res["latency_ms"][f"p{p}"] = round(int(us) / 1000, 3)
        elif line.startswith("LATMAX "):
            res["latency_ms"]["max"] = round(int(line.split()[1]) / 1000, 3)
    dur = res.get("duration_us", 0) / 1e6
    res["duration_s"] = round(dur, 3)
    res["requests_per_s"] = round(res.get("requests", 0) / dur, 1) if dur else float("nan")
    return res


# ---------------------------------------------------------------------------- /proc


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, utime+stime in ms, stime in ms) of one process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    stime = int(fields[12]) * 1000 / CLK_TCK
    return int(fields[1]), int(fields[11]) * 1000 / CLK_TCK + stime, stime


def tree(root: int) -> list[int]:
    """``root`` and every descendant."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                children.setdefault(st[0], []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_ms(pids: list[int], *, kernel: bool = False) -> dict[int, float]:
    """CPU ms of each process (``kernel``: its system time only)."""
    out = {}
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            out[pid] = st[2] if kernel else st[1]
    return out


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def system_busy_ms() -> float:
    """All CPUs' non-idle time since boot (from /proc/stat), in ms."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) * 1000 / CLK_TCK


def children_cpu_ms() -> float:
    """CPU of our reaped children (wrk, the open-loop client) so far, in ms."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (ru.ru_utime + ru.ru_stime) * 1000


def self_cpu_ms() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return (ru.ru_utime + ru.ru_stime) * 1000


class RssSampler:
    """Max VmRSS of the server's process tree, sampled every ``every`` seconds in a thread."""

    def __init__(self, root: int, every: float = 0.05) -> None:
        self.root, self.every = root, every
        self.max_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids = tree(self.root)
        n = 0
        while not self._stop.is_set():
            n += 1
            if n % 20 == 0:
                pids = tree(self.root)
            self.max_kb = max(self.max_kb, rss_kb(pids))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------- PostgreSQL


async def pg_backends(dbname: str) -> list[int]:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", dbname)
    finally:
        await conn.close()
    return [int(r["pid"]) for r in rows]


@contextlib.asynccontextmanager
async def pg_database() -> Any:
    import asyncpg

    name = f"spell_bench_wh_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield name, f"{PG_ADMIN.rpartition('/')[0]}/{name}"
    finally:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def pg_available() -> str | None:
    import asyncpg

    try:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    await conn.close()
    return None


# ---------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerSpec:
    name: str  # ours-ingest | ours-front[-pglz] | ours-serve | probot | probot-info | ref-… |
    backend: str  # sqlite | postgresql | node | none
    kind: str  # ours | probot | ref (a reference floor, not the product)

    @property
    def label(self) -> str:
        return self.name if self.kind != "ours" else f"{self.name}/{self.backend}"


@dataclass
class Server:
    spec: ServerSpec
    workdir: Path
    secret: str
    key_pem: str
    database_url: str | None = None
    pg_dbname: str | None = None
    port: int = field(default_factory=free_port)
    #: ours-front: the API's own port (health probe); the load goes to ``port`` (the front)
    api_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def path(self) -> str:
        return PROBOT_PATH if self.spec.kind == "probot" else OUR_PATH

    @property
    def is_front(self) -> bool:
        return self.spec.name.startswith("ours-front")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def probe_url(self) -> str:
        if self.is_front:
            return f"http://{HOST}:{self.api_port}"
        return self.url

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.spec.name}-{self.port}.log"

    def argv_env_cwd(self) -> tuple[list[str], dict[str, str], Path]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SPELL_", "DATABASE_URL", "GITHUB_", "APP_ID", "PRIVATE_KEY"))
            and k not in ("WEBHOOK_SECRET", "LOG_LEVEL", "NODE_ENV", "PORT", "HOST")
        }
        if self.spec.kind == "probot":
            env = {
                **base,
                "APP_ID": "424242",
                "PRIVATE_KEY": self.key_pem,
                "WEBHOOK_SECRET": self.secret,
                "HOST": HOST,
                "PORT": str(self.port),
                "NODE_ENV": "production",
                "LOG_LEVEL": "info" if self.spec.name == "probot-info" else "warn",
                # an unreachable GitHub, should anything try to call it (nothing does)
                "GHE_HOST": "127.0.0.1:9",
                "GHE_PROTOCOL": "http",
            }
            node = shutil.which("node") or "node"
            argv = [
                node,
                str(PROBOT_DIR / "node_modules/probot/bin/probot.js"),
                "run",
                "./index.js",
            ]
            return argv, env, PROBOT_DIR
        env = {
            **base,
            "SPELL_DATA_DIR": str(self.data_dir),
            "SPELL_SECRET_KEY": "bench-secret-key-" + "y" * 40,
            "SPELL_LOG_LEVEL": "INFO",
            "SPELL_WORKERS": "1",
            "GITHUB_APP_ID": "424242",
            "GITHUB_APP_PRIVATE_KEY": self.key_pem,
            "GITHUB_WEBHOOK_SECRET": self.secret,
            "GITHUB_API_URL": "http://127.0.0.1:9",  # unreachable: handlers fail and retry
        }
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        hp = ["--host", HOST, "--port", str(self.port)]
        if self.spec.kind == "ref":
            mode = self.spec.name.removeprefix("ref-")
            argv = [sys.executable, str(Path(__file__).resolve()), "--serve-ref", mode, *hp]
        elif self.spec.name == "ours-serve":
            argv = [str(SPELL_BIN), "serve", *hp]
        elif self.is_front:
            # `spell serve`'s app with the webhook ingest front on `port`, the API on api_port
            argv = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--serve-ingest",
                "--host",
                HOST,
                "--port",
                str(self.api_port),
                "--front-port",
                str(self.port),
            ]
            if self.spec.name.endswith("-threaded"):
                argv.append("--front-threaded")
        else:
            argv = [sys.executable, str(Path(__file__).resolve()), "--serve-ingest", *hp]
        return argv, env, ROOT

    async def start(self, timeout: float = 60.0) -> None:
        import aiohttp

        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv, env, cwd = self.argv_env_cwd()
        with self.log_path.open("wb") as logf:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        probe = {"ours": "/healthz", "probot": "/ping", "ref": "/bench/stats"}[self.spec.kind]
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.spec.label} exited: {self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with s.get(self.probe_url + probe) as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.spec.label} not up in {timeout}s: {self.log_tail()}")
                await asyncio.sleep(0.05)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def log_problems(self) -> list[str]:
        out = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                low = line.lower()
                if self.spec.kind == "probot":
                    # the two bad-signature probes are logged as errors by design: skip them
                    if (
                        line.startswith(("ERROR", "FATAL"))
                        and "signature does not match" not in line
                    ):
                        out.append(line[:400])
                elif any(
                    w in low for w in ('"level": "error"', '"level": "critical"', "traceback")
                ):
                    out.append(line[:400])
        return out

    async def stop(self) -> int | None:
        """SIGTERM by pid; SIGKILL the process group we created if it lingers."""
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
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        return self.proc.returncode

    # -- CPU accounting: the server's process tree + (PostgreSQL) the backends of its database

    async def cpu_snapshot(self) -> dict[str, dict[int, float]]:
        assert self.proc is not None
        pids = tree(self.proc.pid)
        snap = {"server": cpu_ms(pids), "server_kernel": cpu_ms(pids, kernel=True)}
        if self.pg_dbname:
            snap["pg"] = cpu_ms(await pg_backends(self.pg_dbname))
        return snap

    @staticmethod
    def cpu_delta(
        a: dict[str, dict[int, float]], b: dict[str, dict[int, float]]
    ) -> dict[str, float]:
        out = {}
        for part, after in b.items():
            before = a.get(part, {})
            # processes gone before the second snapshot are lost (none expected: pooled
            # connections and the server live through the phase)
            out[part] = sum(v - before.get(pid, 0.0) for pid, v in after.items())
        return out


# ---------------------------------------------------------------------------- load


async def post_one(s: Any, url: str, body: bytes, sig: str, delivery: str) -> tuple[int, bytes]:
    async with s.post(
        url,
        data=body,
        headers={
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/bench",
            "X-GitHub-Event": "issue_comment",
            "X-GitHub-Delivery": delivery,
            "X-GitHub-Hook-ID": "1",
            "X-Hub-Signature-256": sig,
        },
    ) as r:
        return r.status, await r.read()


async def open_loop(
    url: str, body: bytes, sig: str, rate: float, duration: float, nonce: str, conns: int
) -> dict[str, Any]:
    """``rate`` deliveries/s for ``duration`` s; latency from each request's scheduled time."""
    import aiohttp

    n = int(rate * duration)
    lat: list[float] = []
    lag: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as s:
        # open the connections first (GitHub's deliveries each open one; we reuse: see notes)
        await asyncio.gather(
            *(post_one(s, url, body, sig, f"{nonce}-warm-{i}") for i in range(min(conns, 8)))
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.1

        async def one(i: int, at: float) -> None:
            lag.append((loop.time() - at) * 1000)
            try:
                st, _ = await post_one(s, url, body, sig, f"{nonce}-{i}")
                statuses[str(st)] = statuses.get(str(st), 0) + 1
            except Exception as e:  # counted and reported
                errors.append(f"{type(e).__name__}: {e}"[:200])
                return
            lat.append((loop.time() - at) * 1000)

        tasks = []
        for i in range(n):
            at = t0 + i / rate
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, at)))
        await asyncio.gather(*tasks)
        elapsed = loop.time() - t0
    return {
        "scheduled": n,
        "rate": rate,
        "elapsed_s": round(elapsed, 3),
        "statuses": statuses,
        "errors": errors[:5],
        "n_errors": len(errors),
        "latency_ms": summarize(lat),
        "send_lag_ms": summarize(lag),
        "warmup_deliveries": min(conns, 8),
    }


async def run_open_loop(
    ctx: Any, url: str, rate: float, seconds: float, nonce: str, conns: int
) -> subprocess.CompletedProcess[str]:
    """This script's ``--open-loop`` mode in a separate process (the load generator)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--open-loop",
        url,
        "--body-file",
        str(ctx.body_file),
        "--sig",
        ctx.sig,
        "--rate",
        str(rate),
        "--duration",
        str(seconds),
        "--nonce",
        nonce,
        "--conns",
        str(conns),
    ]
    return await asyncio.to_thread(
        subprocess.run, cmd, capture_output=True, text=True, timeout=seconds * 6 + 120, check=False
    )


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p90": round(percentile(values, 90), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3),
        "mean": round(statistics.fmean(values), 3),
    }


# ---------------------------------------------------------------------------- one server


@dataclass
class Ctx:
    body_file: Path
    lua_file: Path
    body: bytes
    sig: str
    secret: str
    key_pem: str
    duration: float
    rates: list[float]
    threads: int
    conns: int
    ol_conns: int


async def server_accepted(srv: Server) -> int:
    """Deliveries the server itself has accepted so far: rows in webhook_deliveries (ours) or
    deliveries that reached the handler (Probot's GET /bench/stats)."""
    import aiohttp

    if srv.spec.kind != "ours":
        async with aiohttp.ClientSession() as s, s.get(srv.url + "/bench/stats") as r:
            return int((await r.json())["deliveries"])
    return (await db_query(srv, "SELECT count(*) FROM webhook_deliveries"))[0][0]


async def db_query(srv: Server, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """A read on our server's database (SQLite WAL readers never block its writer)."""
    if srv.database_url:
        import asyncpg

        conn = await asyncpg.connect(srv.database_url, timeout=5)
        try:
            q = sql
            for i in range(len(params)):
                q = q.replace("?", f"${i + 1}", 1)
            return [tuple(r) for r in await conn.fetch(q, *params)]
        finally:
            await conn.close()
    import sqlite3

    db = sqlite3.connect(f"file:{srv.data_dir / 'spell.db'}?mode=ro", uri=True, timeout=30)
    try:
        return [tuple(r) for r in db.execute(sql, params).fetchall()]
    finally:
        db.close()


@contextlib.asynccontextmanager
async def phase_window(srv: Server) -> Any:
    """Server CPU (+PG backends), load-generator CPU, whole-machine CPU and max RSS over a
    phase, and the server-side count of accepted deliveries before/after."""
    assert srv.proc is not None
    box: dict[str, Any] = {}
    acc0 = await server_accepted(srv)
    sys0, kids0, me0 = system_busy_ms(), children_cpu_ms(), self_cpu_ms()
    before = await srv.cpu_snapshot()
    t0 = time.monotonic()
    with RssSampler(srv.proc.pid) as rss:
        yield box
    secs = time.monotonic() - t0
    after = await srv.cpu_snapshot()
    sys1, kids1, me1 = system_busy_ms(), children_cpu_ms(), self_cpu_ms()
    acc1 = await server_accepted(srv)
    cpu = Server.cpu_delta(before, after)
    server_ms = cpu.get("server", 0.0) + cpu.get("pg", 0.0)
    loadgen = kids1 - kids0
    box.update(
        {
            "window_s": round(secs, 3),
            "server_accepted": acc1 - acc0,
            "rss_max_kb": rss.max_kb,
            "cpu_ms_load_generator": round(loadgen, 1),
            "cpu_ms_whole_machine": round(sys1 - sys0, 1),
            # everything else that ran on the machine meanwhile (other benchmarks, tests...)
            "cpu_ms_other_processes": round(
                max(0.0, (sys1 - sys0) - server_ms - loadgen - (me1 - me0)), 1
            ),
        }
    )
    box.update(_cpu_fields(cpu, acc1 - acc0, secs))


async def measure_server(srv: Server, ctx: Ctx) -> dict[str, Any]:
    import aiohttp

    res: dict[str, Any] = {"server": srv.spec.label, "port": srv.port}
    t_start = time.monotonic()
    await srv.start()
    assert srv.proc is not None
    res["startup_s"] = round(time.monotonic() - t_start, 2)
    if srv.database_url:
        if srv.spec.name.endswith("-pglz"):  # before migration 0007, for comparison
            await db_query(
                srv, "ALTER TABLE webhook_deliveries ALTER COLUMN body SET COMPRESSION pglz"
            )
        res["pg_body_column_compression"] = await pg_body_compression(srv)
    res["rss_idle_kb"] = rss_kb(tree(srv.proc.pid))
    url = srv.url + srv.path
    nonce = f"b{secrets.token_hex(5)}"
    ok = "200" if srv.spec.kind == "probot" else "202"

    async with aiohttp.ClientSession() as s:
        # signature check: a wrong signature, and a right one over a changed body, are refused
        bad = [
            (await post_one(s, url, ctx.body, "sha256=" + "0" * 64, f"{nonce}-bad1"))[0],
            (await post_one(s, url, ctx.body + b" ", ctx.sig, f"{nonce}-bad2"))[0],
        ]
        res["bad_signature_statuses"] = bad
        if any(200 <= b < 300 for b in bad):
            raise RuntimeError(f"{srv.spec.label} ACCEPTED a bad signature: {bad}")
        # warm-up (JIT, caches, pool): 300 unique deliveries, 8 at a time
        sem = asyncio.Semaphore(8)
        warm: dict[str, int] = {}

        async def w(i: int) -> None:
            async with sem:
                st, _ = await post_one(s, url, ctx.body, ctx.sig, f"{nonce}-w-{i}")
                warm[str(st)] = warm.get(str(st), 0) + 1

        await asyncio.gather(*(w(i) for i in range(300)))
        res["warmup_statuses"] = warm
    client_accepted = warm.get(ok, 0)
    # what the server burns doing nothing (timers, pollers), so per-delivery numbers at low
    # rates can be read against it
    await asyncio.sleep(1.0)
    idle0 = await srv.cpu_snapshot()
    await asyncio.sleep(3.0)
    idle = Server.cpu_delta(idle0, await srv.cpu_snapshot())
    idle.pop("server_kernel", None)  # a part of "server"
    res["idle_cpu_ms_per_s"] = round(sum(idle.values()) / 3.0, 2)

    phases: dict[str, Any] = {}
    # 1. max throughput (unique ids); 2. (ours) the dedupe path: one delivery id, repeated
    for mode in ["unique"] + (["dup"] if srv.spec.kind == "ours" else []):
        async with phase_window(srv) as box:
            out = await asyncio.to_thread(
                subprocess.run,
                [
                    "wrk",
                    f"-t{ctx.threads}",
                    f"-c{ctx.conns}",
                    f"-d{ctx.duration:g}s",
                    "--timeout",
                    "10s",
                    "-s",
                    str(ctx.lua_file),
                    url,
                    "--",
                    str(ctx.body_file),
                    srv.path,
                    ctx.sig,
                    mode,
                    f"{nonce}-{mode}",
                ],
                capture_output=True,
                text=True,
                timeout=ctx.duration + 60,
                check=False,
            )
            await asyncio.sleep(0.3)  # let requests in flight when wrk stopped finish
        ph = parse_wrk(out.stdout)
        if out.returncode != 0 or "requests" not in ph:
            raise RuntimeError(f"wrk failed: {out.returncode} {out.stdout[-800:]} {out.stderr}")
        ph.update(box)
        if mode == "dup":
            # every answered request is the dedupe path: a 200 {"duplicate": true} (+ one 202)
            answered = sum(v for k, v in ph["statuses"].items() if k in ("200", "202"))
            ph.update(_cpu_fields(box["_cpu"], answered, box["window_s"]))
            ph["dup_rows_for_the_id"] = (
                await db_query(
                    srv,
                    "SELECT count(*) FROM webhook_deliveries WHERE delivery_id = ?",
                    f"{nonce}-dup-dup",
                )
            )[0][0]
        client_accepted += int(ph["statuses"].get(ok, 0))
        ph.pop("_cpu", None)
        phases[f"wrk_{mode}"] = ph
        await asyncio.sleep(1.0)

    # 3. open loop at fixed rates, from a separate process
    for rate in ctx.rates:
        tag = f"{nonce}-ol{int(rate)}"
        async with phase_window(srv) as box:
            out = await run_open_loop(ctx, url, rate, ctx.duration, tag, ctx.ol_conns)
        if out.returncode != 0:
            raise RuntimeError(f"open loop failed: {out.stderr[-2000:]}")
        ol = json.loads(out.stdout)
        ol.update(box)
        ol.pop("_cpu", None)
        client_accepted += int(ol["statuses"].get(ok, 0))
        if srv.spec.kind == "ours":
            # exact: every 202 of the open loop (all requests completed) is a stored row
            ol["stored_rows_for_phase"] = (
                await db_query(
                    srv,
                    "SELECT count(*) FROM webhook_deliveries WHERE delivery_id LIKE ?",
                    f"{tag}-%",
                )
            )[0][0]
            ol["all_202_stored"] = ol["stored_rows_for_phase"] == int(
                ol["statuses"].get("202", 0)
            ) + int(ol.get("warmup_deliveries", 0))
        phases[f"open_loop_{int(rate)}"] = ol
        await asyncio.sleep(1.0)
    res["phases"] = phases
    res["client_seen_accepted_total"] = client_accepted

    if srv.spec.kind != "ours":
        async with aiohttp.ClientSession() as s, s.get(srv.url + "/bench/stats") as r:
            stats = await r.json()
        res["handler_stats"] = stats
        # wrk does not count requests still in flight when it stops: the server may have
        # handled up to --conns more than the clients saw answered
        res["all_accepted_reached_handler"] = (
            client_accepted <= stats["deliveries"] <= client_accepted + 2 * ctx.conns
            and stats["commands"] == stats["deliveries"]
        )
    await asyncio.sleep(0.5)
    if srv.is_front:
        res["front_metrics"] = await front_metrics(srv)
    problems = srv.log_problems()
    res["log_problems"] = problems[:10]
    res["n_log_problems"] = len(problems)
    res["exit_code"] = await srv.stop()
    m = re.search(
        r"webhook front stopped: accepted=(\d+) duplicates=(\d+) rejected=(\d+) batches=(\d+)",
        srv.log_tail(20000),
    )
    if m:  # ours-front: how many deliveries shared a storage transaction, on average
        acc, dup, rej, batches = (int(x) for x in m.groups())
        res["front_stats"] = {
            "accepted": acc,
            "duplicates": dup,
            "rejected": rej,
            "batches": batches,
            "mean_batch_size": round((acc + dup) / batches, 2) if batches else None,
        }
    if srv.spec.kind == "ours":
        st = await count_stored(srv)
        res["stored"] = st
        res["all_accepted_stored"] = (
            client_accepted <= st["webhook_deliveries"] <= client_accepted + 2 * ctx.conns
            and st["outbox_webhook_rows"] == st["webhook_deliveries"]
            and all(p.get("all_202_stored", True) for p in phases.values())
            and phases["wrk_dup"]["dup_rows_for_the_id"] == 1
        )
    return res


async def pg_body_compression(srv: Server) -> str:
    """``webhook_deliveries.body``'s TOAST compression setting: lz4, pglz or default."""
    [(att,)] = await db_query(
        srv,
        "SELECT attcompression::text FROM pg_attribute "
        "WHERE attrelid = 'webhook_deliveries'::regclass AND attname = 'body'",
    )
    return {"l": "lz4", "p": "pglz"}.get(att, "default")


async def front_metrics(srv: Server) -> dict[str, float]:
    """The front's webhook_front_* series from the API's GET /metrics (Prometheus text)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as s, s.get(srv.probe_url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for smp in family.samples:
            if smp.name.startswith("webhook_front_") and not smp.name.endswith("_created"):
                if "le" in smp.labels:
                    continue
                key = smp.name + "".join(f"[{v}]" for v in smp.labels.values())
                out[key] = smp.value
    return out


def _cpu_fields(cpu: dict[str, float], accepted: int, seconds: float) -> dict[str, Any]:
    server = cpu.get("server", 0.0)
    pg = cpu.get("pg")
    out: dict[str, Any] = {
        "_cpu": cpu,
        "cpu_ms_server": round(server, 1),
        "cpu_util_server": round(server / 1000 / seconds, 3) if seconds else None,
        "cpu_ms_per_delivery": round(server / accepted, 4) if accepted else None,
    }
    kernel = cpu.get("server_kernel")
    if kernel is not None and accepted:  # of which in the kernel (system time)
        out["cpu_ms_per_delivery_kernel"] = round(kernel / accepted, 4)
    if pg is not None:
        out["cpu_ms_pg_backends"] = round(pg, 1)
        out["cpu_ms_per_delivery_incl_pg"] = (
            round((server + pg) / accepted, 4) if accepted else None
        )
    return out


async def count_stored(srv: Server) -> dict[str, Any]:
    """What our server committed (read after it stopped): deliveries and their outbox rows."""
    d = (await db_query(srv, "SELECT count(*) FROM webhook_deliveries"))[0][0]
    o = (await db_query(srv, "SELECT count(*) FROM outbox WHERE subject = 'webhook.github'"))[0][0]
    st = await db_query(srv, "SELECT status, count(*) FROM webhook_deliveries GROUP BY status")
    out: dict[str, Any] = {
        "webhook_deliveries": int(d),
        "outbox_webhook_rows": int(o),
        "delivery_status": {str(k): int(v) for k, v in st},
    }
    if srv.database_url:  # how PostgreSQL really stored the bodies (NULL: not compressed)
        comp = await db_query(
            srv,
            "SELECT coalesce(pg_column_compression(body), 'none'), count(*) "
            "FROM webhook_deliveries GROUP BY 1",
        )
        out["body_compression_of_rows"] = {str(k): int(v) for k, v in comp}
    return out


# ---------------------------------------------------------------------------- orchestration


def machine_info() -> dict[str, Any]:
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
    node_v = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    wrk_v = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    probot_v = "?"
    with contextlib.suppress(OSError, ValueError):
        probot_v = json.loads((PROBOT_DIR / "node_modules/probot/package.json").read_text())[
            "version"
        ]
    import aiohttp

    return {
        "git_head": git,
        "app_files_modified_in_worktree": [ln[3:] for ln in dirty if ln.strip()],
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "node": node_v.stdout.strip(),
        "probot": probot_v,
        "wrk": (wrk_v.stdout + wrk_v.stderr).splitlines()[0]
        if (wrk_v.stdout + wrk_v.stderr)
        else "?",
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def ensure_probot() -> None:
    if (PROBOT_DIR / "node_modules/probot/package.json").exists():
        return
    lock = (PROBOT_DIR / "package-lock.json").exists()
    subprocess.run(
        ["npm", "ci" if lock else "install", "--no-audit", "--no-fund"],
        cwd=PROBOT_DIR,
        check=True,
    )


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v == v]
    return round(statistics.median(vals), 4) if vals else None


def aggregate(runs: list[dict[str, Any]], rates: list[float]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if "error" not in r:
            by.setdefault(r["server"], []).append(r)
    out: dict[str, Any] = {}
    for label, rs in by.items():
        wu = [r["phases"]["wrk_unique"] for r in rs]
        row: dict[str, Any] = {
            "reps": len(rs),
            "max_deliveries_per_s": median([p["requests_per_s"] for p in wu]),
            "max_deliveries_per_s_server_side": median(
                [p["server_accepted"] / p["window_s"] for p in wu]
            ),
            "wrk_p50_ms": median([p["latency_ms"].get("p50") for p in wu]),
            "wrk_p99_ms": median([p["latency_ms"].get("p99") for p in wu]),
            "cpu_ms_per_delivery_wrk": median([p["cpu_ms_per_delivery"] for p in wu]),
            "cpu_ms_per_delivery_wrk_kernel": median(
                [p.get("cpu_ms_per_delivery_kernel") for p in wu]
            ),
            "server_cpu_util_wrk": median([p["cpu_util_server"] for p in wu]),
            "other_processes_cpu_s_during_wrk": median(
                [p["cpu_ms_other_processes"] / 1000 for p in wu]
            ),
        }
        if any("cpu_ms_per_delivery_incl_pg" in p for p in wu):
            row["cpu_ms_per_delivery_wrk_incl_pg"] = median(
                [p.get("cpu_ms_per_delivery_incl_pg") for p in wu]
            )
        for rate in rates:
            key = f"open_loop_{int(rate)}"
            ol = [r["phases"][key] for r in rs if key in r["phases"]]
            if not ol:
                continue
            k = int(rate)
            row[f"at_{k}_per_s_p50_ms"] = median([p["latency_ms"].get("p50") for p in ol])
            row[f"at_{k}_per_s_p99_ms"] = median([p["latency_ms"].get("p99") for p in ol])
            row[f"at_{k}_per_s_max_ms"] = median([p["latency_ms"].get("max") for p in ol])
            row[f"at_{k}_per_s_achieved_per_s"] = median(
                [p["scheduled"] / p["elapsed_s"] for p in ol]
            )
            row[f"at_{k}_per_s_cpu_ms_per_delivery"] = median(
                [p["cpu_ms_per_delivery"] for p in ol]
            )
            row[f"at_{k}_per_s_cpu_ms_per_delivery_kernel"] = median(
                [p.get("cpu_ms_per_delivery_kernel") for p in ol]
            )
            if any("cpu_ms_per_delivery_incl_pg" in p for p in ol):
                row[f"at_{k}_per_s_cpu_ms_per_delivery_incl_pg"] = median(
                    [p.get("cpu_ms_per_delivery_incl_pg") for p in ol]
                )
            row[f"at_{k}_per_s_other_processes_cpu_s"] = median(
                [p["cpu_ms_other_processes"] / 1000 for p in ol]
            )
        row["rss_max_mb"] = median(
            [max(p["rss_max_kb"] for p in r["phases"].values()) / 1024 for r in rs]
        )
        row["rss_idle_mb"] = median([r["rss_idle_kb"] / 1024 for r in rs])
        row["idle_cpu_ms_per_s"] = median([r.get("idle_cpu_ms_per_s") for r in rs])
        row["non_accepted_responses"] = sum(
            sum(v for k, v in p["statuses"].items() if k not in ("200", "202"))
            for r in rs
            for p in r["phases"].values()
        )
        row["client_errors"] = sum(
            p.get("n_errors", 0)
            + p.get("errors_connect", 0)
            + p.get("errors_read", 0)
            + p.get("errors_timeout", 0)
            for r in rs
            for p in r["phases"].values()
        )
        dup = [r["phases"]["wrk_dup"] for r in rs if "wrk_dup" in r["phases"]]
        if dup:
            row["dedupe_path_requests_per_s"] = median([p["requests_per_s"] for p in dup])
            row["dedupe_path_cpu_ms_per_request"] = median([p["cpu_ms_per_delivery"] for p in dup])
            if any("cpu_ms_per_delivery_incl_pg" in p for p in dup):
                row["dedupe_path_cpu_ms_per_request_incl_pg"] = median(
                    [p.get("cpu_ms_per_delivery_incl_pg") for p in dup]
                )
        if rs[0].get("stored") is not None:
            row["all_accepted_stored_with_outbox_row"] = all(
                r.get("all_accepted_stored") for r in rs
            )
        if rs[0].get("handler_stats") is not None:
            row["all_accepted_reached_handler"] = all(
                r.get("all_accepted_reached_handler") for r in rs
            )
        row["bad_signature_statuses"] = rs[0]["bad_signature_statuses"]
        out[label] = row
    return out


def ratios(summary: dict[str, Any], rate: float) -> dict[str, Any]:
    probot = summary.get("probot")
    if not probot:
        return {}
    k = f"at_{int(rate)}_per_s_cpu_ms_per_delivery"
    pairs = {
        "cpu_per_delivery_wrk": ("cpu_ms_per_delivery_wrk", "cpu_ms_per_delivery_wrk"),
        "cpu_per_delivery_wrk_incl_pg": (
            "cpu_ms_per_delivery_wrk_incl_pg",
            "cpu_ms_per_delivery_wrk",
        ),
        f"cpu_per_delivery_at_{int(rate)}_per_s": (k, k),
        f"cpu_per_delivery_at_{int(rate)}_per_s_incl_pg": (k + "_incl_pg", k),
        "max_deliveries_per_s": ("max_deliveries_per_s", "max_deliveries_per_s"),
    }
    out: dict[str, Any] = {}
    for label, row in summary.items():
        if label.startswith("probot"):
            continue
        r: dict[str, Any] = {}
        for name, (ours_key, their_key) in pairs.items():
            if row.get(ours_key) and probot.get(their_key):
                r[name] = round(row[ours_key] / probot[their_key], 3)
        out[f"{label} / probot"] = r
    return out


def targets(summary: dict[str, Any], ratio: dict[str, Any], label: str, rate: float) -> Any:
    row = summary.get(label)
    r = ratio.get(f"{label} / probot", {})
    if not row or not r:
        return {"note": f"{label} or probot missing"}
    k = int(rate)
    cpu_keys = ["cpu_per_delivery_wrk", f"cpu_per_delivery_at_{k}_per_s"]
    if "cpu_per_delivery_wrk_incl_pg" in r:
        cpu_keys = [c + "_incl_pg" for c in cpu_keys]
    worst = max((r[c] for c in cpu_keys if c in r), default=None)
    return {
        "cpu_ratio_vs_probot": {c: r.get(c) for c in cpu_keys},
        "cpu_target_le_0_5x_met": worst is not None and worst <= 0.5,
        f"p99_at_{k}_per_s_ms": row.get(f"at_{k}_per_s_p99_ms"),
        f"p99_target_le_10ms_at_{k}_per_s_met": (row.get(f"at_{k}_per_s_p99_ms") or 1e9) <= 10.0,
        "durable_dedupe_and_enqueue_checked": row.get("all_accepted_stored_with_outbox_row"),
    }


# ---------------------------------------------------------------------------- breakdown


async def front_breakdown(body: bytes, secret: str, n: int = 2000) -> dict[str, Any]:
    """Where the ingest front's CPU goes, per delivery, in-process (process CPU time, all
    threads; no sockets, so the kernel's TCP work is not in these numbers):

    * http: llhttp parsing + the front's callbacks + HMAC + headers + the answer, for the same
      signed 14 KiB request as wrk sends, with storage replaced by a no-op;
    * verify_signature alone (the HMAC over 14 KiB and the header check);
    * storage: ``Inbox.accept_many`` (the front's batch program on the ledger's SQLite writer
      thread) at batch sizes 1, 8 and 32 — the rows and outbox rows the front writes."""
    import secrets as _secrets

    from app.github.webhooks import verify_signature
    from app.services.ports import SystemClock
    from app.store.db import make_engine, upgrade
    from app.store.inbox import Inbox
    from app.store.ledger import SqlLedger
    from app.web.ingest import FrontLimits, IngestFront, _Conn

    cpu = time.process_time
    out: dict[str, Any] = {"n": n}
    sig = github_signature(body, secret)

    class NoStore:
        """The Inbox calls of the front (app/store/inbox.py), storing nothing."""

        def try_store_many_now(self, _source: str, items: list[Any]) -> set[str]:
            return {item[0] for item in items}

        async def store_many(self, _source: str, items: list[Any]) -> set[str]:
            return {item[0] for item in items}

    answered: list[int] = [0]

    class Sink(asyncio.Transport):
        def write(self, data: Any) -> None:
            answered[0] += bytes(data).count(b"HTTP/1.1 202 Accepted")

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    front = IngestFront(inbox=NoStore(), secrets=[secret], limits=FrontLimits())  # type: ignore[arg-type]
    conn = _Conn(front)
    conn.connection_made(Sink())

    def req(did: str) -> bytes:
        return (
            f"POST {OUR_PATH} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"X-GitHub-Event: issue_comment\r\nX-GitHub-Delivery: {did}\r\n"
            f"X-Hub-Signature-256: {sig}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    reqs = [req(f"fb-{i}-{_secrets.token_hex(4)}") for i in range(n)]
    c0 = cpu()
    for i in range(0, n, 32):
        for r in reqs[i : i + 32]:
            conn.data_received(r)
        await asyncio.sleep(0)  # the batch
        await asyncio.sleep(0)
    for _ in range(10):  # the last batches' answers
        await asyncio.sleep(0)
    out["front_http_hmac_answer_no_storage_ms"] = round((cpu() - c0) / n * 1000, 4)
    # every request was verified and answered 202 (not refused, not a storage error)
    assert answered[0] == n, f"{answered[0]} of {n} answered 202"
    c0 = cpu()
    for _ in range(n):
        verify_signature(body, signature=sig, secret=[secret])
    out["verify_signature_14kb_ms"] = round((cpu() - c0) / n * 1000, 4)

    tmp = Path(tempfile.mkdtemp(prefix="spell-bench-front-"))
    engine = make_engine(f"sqlite+aiosqlite:///{tmp / 'f.db'}")
    try:
        await upgrade(engine)
        clock = SystemClock()
        ledger = SqlLedger(engine, clock, idempotency_ttl=86400)
        inbox = Inbox(ledger, clock)
        await ledger.fast.warm()
        for batch in (1, 8, 32):
            items = [
                (f"st-{batch}-{i}-{_secrets.token_hex(4)}", "issue_comment", body)
                for i in range(n + 64)
            ]
            await inbox.accept_many("github", items[:64])  # warm-up
            c0 = cpu()
            for i in range(64, n + 64, batch):
                await inbox.accept_many("github", items[i : i + batch])
            out[f"store_sqlite_batch_{batch}_ms"] = round((cpu() - c0) / n * 1000, 4)
        await ledger.aclose()
    finally:
        await engine.dispose()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


async def cost_breakdown(body: bytes, secret: str, key_pem: str, n: int = 600) -> dict[str, Any]:
    """Where our CPU per delivery goes, in-process, no HTTP: the same inbox transaction through
    the layers the server uses, and through less of them; HMAC; the App JWT."""
    import sqlite3
    import uuid

    from sqlalchemy import create_engine, event, insert
    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from app.github.appauth import app_jwt
    from app.github.webhooks import verify_signature
    from app.services.ports import SystemClock
    from app.store.db import make_engine, upgrade
    from app.store.inbox import Inbox
    from app.store.ledger import SqlLedger
    from app.store.models import Outbox, WebhookDelivery

    out: dict[str, Any] = {"n": n}
    tmp = Path(tempfile.mkdtemp(prefix="spell-bench-breakdown-"))
    cpu = time.process_time
    try:
        sig = github_signature(body, secret)
        c0 = cpu()
        for _ in range(n * 10):
            verify_signature(body, signature=sig, secret=[secret])
        out["verify_signature_14kb_ms"] = round((cpu() - c0) / (n * 10) * 1000, 4)

        engine = make_engine(f"sqlite+aiosqlite:///{tmp / 'a.db'}")
        await upgrade(engine)
        clock = SystemClock()
        inbox = Inbox(SqlLedger(engine, clock, idempotency_ttl=86400), clock)
        for i in range(100):
            await inbox.accept("github", f"warm-{i}", "issue_comment", body)
        c0 = cpu()
        for i in range(n):
            await inbox.accept("github", f"u-{i}-{uuid.uuid4().hex[:8]}", "issue_comment", body)
        out["inbox_accept_unique_sqlalchemy_async_orm_ms"] = round((cpu() - c0) / n * 1000, 4)
        c0 = cpu()
        for _ in range(n):
            await inbox.accept("github", "warm-1", "issue_comment", body)
        out["inbox_accept_duplicate_ms"] = round((cpu() - c0) / n * 1000, 4)

        def core_stmts(did: str, now: datetime) -> tuple[Any, Any]:
            return (
                sqlite_dialect.insert(WebhookDelivery)
                .values(
                    delivery_id=did,
                    source="github",
                    event="issue_comment",
                    body=body,
                    status="pending",
                    attempts=0,
                    received_at=now,
                )
                .on_conflict_do_nothing(index_elements=["delivery_id"]),
                insert(Outbox).values(
                    subject="webhook.github",
                    msg_id=f"wh:{did}",
                    payload={"delivery_id": did},
                    created_at=now,
                ),
            )

        c0 = cpu()
        for i in range(n):
            a, b = core_stmts(f"c-{i}", datetime.now(UTC))
            async with engine.begin() as conn:
                await conn.execute(a)
                await conn.execute(b)
        out["same_transaction_sqlalchemy_async_core_ms"] = round((cpu() - c0) / n * 1000, 4)
        await engine.dispose()

        sync_engine = create_engine(f"sqlite:///{tmp / 'a.db'}")

        @event.listens_for(sync_engine, "connect")
        def _connect(dbapi: Any, _rec: Any) -> None:
            dbapi.isolation_level = None
            for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL"):
                dbapi.execute("PRAGMA " + pragma)

        @event.listens_for(sync_engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        c0 = cpu()
        for i in range(n):
            a, b = core_stmts(f"s-{i}", datetime.now(UTC))
            with sync_engine.begin() as conn:
                conn.execute(a)
                conn.execute(b)
        out["same_transaction_sqlalchemy_sync_core_ms"] = round((cpu() - c0) / n * 1000, 4)
        sync_engine.dispose()

        db = sqlite3.connect(tmp / "a.db", isolation_level=None)
        for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL"):
            db.execute("PRAGMA " + pragma)
        c0 = cpu()
        for i in range(n):
            did, now = f"r-{i}", datetime.now(UTC).isoformat()
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                "INSERT INTO webhook_deliveries(delivery_id,source,event,body,status,attempts,"
                "received_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT(delivery_id) DO NOTHING",
                (did, "github", "issue_comment", body, "pending", 0, now),
            )
            if cur.rowcount == 1:
                db.execute(
                    "INSERT INTO outbox(subject,msg_id,payload,created_at) VALUES (?,?,?,?)",
                    ("webhook.github", "wh:" + did, json.dumps({"delivery_id": did}), now),
                )
            db.execute("COMMIT")
        out["same_transaction_stdlib_sqlite3_ms"] = round((cpu() - c0) / n * 1000, 4)
        db.close()

        from cryptography.hazmat.primitives import serialization

        c0 = cpu()
        for _ in range(10):
            app_jwt("424242", key_pem, now=datetime.now(UTC))
        out["app_jwt_from_pem_ms"] = round((cpu() - c0) / 10 * 1000, 3)
        import jwt

        loaded = serialization.load_pem_private_key(key_pem.encode(), None)
        c0 = cpu()
        for _ in range(10):
            jwt.encode({"iat": 1, "exp": 2, "iss": "424242"}, loaded, algorithm="RS256")
        out["jwt_rs256_with_preloaded_key_ms"] = round((cpu() - c0) / 10 * 1000, 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- worker on


async def worker_experiment(
    ctx: Ctx, secret: str, key_pem: str, rate: float, seconds: float, drain: float
) -> dict[str, Any]:
    """`spell serve` with its worker: a small open loop, then wait (bounded) until every
    delivery reached a final status; CPU over the whole time per delivery. GitHub is
    unreachable (127.0.0.1:9), so every handler attempt fails and is retried with backoff until
    the delivery is `dead` — the cost of an outage, not of a normal delivery."""
    wd = Path(tempfile.mkdtemp(prefix="spell-bench-webhook-worker-"))
    srv = Server(ServerSpec("ours-serve", "sqlite", "ours"), wd, secret, key_pem)
    res: dict[str, Any] = {"server": "ours-serve/sqlite", "rate": rate, "seconds": seconds}
    try:
        await srv.start()
        assert srv.proc is not None
        url = srv.url + srv.path
        cpu0 = sum(cpu_ms(tree(srv.proc.pid)).values())
        t0 = time.monotonic()
        with RssSampler(srv.proc.pid) as rss:
            out = await run_open_loop(ctx, url, rate, seconds, f"wk{secrets.token_hex(4)}", 16)
            ol = json.loads(out.stdout)
            cpu_load = sum(cpu_ms(tree(srv.proc.pid)).values()) - cpu0
            final: dict[str, int] = {}
            while time.monotonic() - t0 < seconds + drain:
                rows = await db_query(
                    srv, "SELECT status, count(*) FROM webhook_deliveries GROUP BY status"
                )
                final = {str(k): int(v) for k, v in rows}
                if sum(final.values()) and not set(final) & {"pending"}:
                    break
                await asyncio.sleep(1.0)
            cpu_total = sum(cpu_ms(tree(srv.proc.pid)).values()) - cpu0
        n = sum(final.values())
        attempts = await db_query(
            srv, "SELECT attempts, count(*) FROM webhook_deliveries GROUP BY attempts"
        )
        res.update(
            {
                "open_loop": {"statuses": ol["statuses"], "latency_ms": ol["latency_ms"]},
                "deliveries": n,
                "final_status": final,
                "attempts_histogram": {str(a): int(c) for a, c in attempts},
                "drained_in_s": round(time.monotonic() - t0, 1),
                "cpu_ms_during_load": round(cpu_load, 1),
                "cpu_ms_total_until_drained": round(cpu_total, 1),
                "cpu_ms_per_delivery_incl_handler_attempts": round(cpu_total / n, 2) if n else None,
                "rss_max_mb": round(rss.max_kb / 1024, 1),
            }
        )
        msgs: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in srv.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    m = json.loads(line).get("msg", "")
                    m = re.sub(r"wh:[A-Za-z0-9-]+", "wh:ID", m)
                    m = re.sub(r"attempt \d+\), retrying in [\d.]+ s", "attempt N), retrying", m)
                    msgs[m[:200]] = msgs.get(m[:200], 0) + 1
        res["top_log_messages"] = dict(sorted(msgs.items(), key=lambda kv: -kv[1])[:5])
    finally:
        await srv.stop()
        shutil.rmtree(wd, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------- the run


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is required: apt-get install -y wrk")
    ensure_probot()
    body, payload_info = build_payload()
    secret = secrets.token_hex(20)
    sig = github_signature(body, secret)
    from app.github.webhooks import verify_signature

    verify_signature(body, signature=sig, secret=secret)  # what our endpoint checks
    key_pem = rsa_key_pem()
    rates = [float(r) for r in args.rates.split(",") if r]
    machine = machine_info()

    backends = [b for b in args.backends.split(",") if b]
    notes: list[str] = []
    if "postgresql" in backends:
        why = await pg_available()
        if why:
            notes.append(f"PostgreSQL skipped: {why}")
            backends.remove("postgresql")
    specs: list[ServerSpec] = []
    for name in [s for s in args.servers.split(",") if s]:
        if name.startswith("probot"):
            specs.append(ServerSpec(name, "node", "probot"))
        elif name.startswith("ref-"):
            specs.append(ServerSpec(name, "none", "ref"))
        elif name.endswith("-threaded"):  # an SQLite variant
            specs.extend(ServerSpec(name, b, "ours") for b in backends if b == "sqlite")
        elif name.endswith("-pglz"):  # a PostgreSQL storage variant
            specs.extend(ServerSpec(name, b, "ours") for b in backends if b == "postgresql")
        else:
            specs.extend(ServerSpec(name, b, "ours") for b in backends)

    tmp = Path(tempfile.mkdtemp(prefix="spell-bench-webhook-"))
    runs: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    try:
        body_file = tmp / "payload.json"
        body_file.write_bytes(body)
        lua_file = tmp / "webhook.lua"
        lua_file.write_text(WRK_LUA)
        ctx = Ctx(
            body_file=body_file,
            lua_file=lua_file,
            body=body,
            sig=sig,
            secret=secret,
            key_pem=key_pem,
            duration=args.duration,
            rates=rates,
            threads=args.threads,
            conns=args.conns,
            ol_conns=args.ol_conns,
        )
        for rep in range(args.reps):
            order = specs[rep % len(specs) :] + specs[: rep % len(specs)]  # rotate
            for spec in order:
                wd = tmp / f"rep{rep}-{spec.name}-{spec.backend}"
                wd.mkdir()
                print(f"[rep {rep + 1}/{args.reps}] {spec.label} ...", file=sys.stderr, flush=True)
                try:
                    if spec.backend == "postgresql":
                        async with pg_database() as (dbname, url):
                            srv = Server(spec, wd, secret, key_pem, url, dbname)
                            try:
                                r = await measure_server(srv, ctx)
                            finally:
                                await srv.stop()
                    else:
                        srv = Server(spec, wd, secret, key_pem)
                        try:
                            r = await measure_server(srv, ctx)
                        finally:
                            await srv.stop()
                except Exception as e:  # recorded, the run goes on
                    r = {"server": spec.label, "error": f"{type(e).__name__}: {e}"[:3000]}
                r["rep"] = rep
                runs.append(r)
                print("   ", _one_line(r), file=sys.stderr, flush=True)
                shutil.rmtree(wd, ignore_errors=True)
        if args.breakdown:
            print("cost breakdown (in-process) ...", file=sys.stderr, flush=True)
            extra["cost_breakdown"] = await cost_breakdown(body, secret, key_pem)
            print("   ", extra["cost_breakdown"], file=sys.stderr, flush=True)
        if args.front_breakdown:
            print("ingest front breakdown (in-process) ...", file=sys.stderr, flush=True)
            extra["front_breakdown"] = await front_breakdown(body, secret)
            print("   ", extra["front_breakdown"], file=sys.stderr, flush=True)
        if args.worker_rate > 0:
            print("worker-on experiment (spell serve) ...", file=sys.stderr, flush=True)
            try:
                extra["worker_on"] = await worker_experiment(
                    ctx, secret, key_pem, args.worker_rate, args.worker_seconds, args.worker_drain
                )
            except Exception as e:
                extra["worker_on"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(
                "   ",
                {k: v for k, v in extra["worker_on"].items() if k != "top_log_messages"},
                file=sys.stderr,
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    target_rate = 200.0 if 200.0 in rates else rates[0]
    summary = aggregate(runs, rates)
    ratio = ratios(summary, target_rate)
    return {
        "benchmark": "webhook_ingest",
        "issue": 3,
        "mode": "quick" if args.quick else "full",
        "method": {
            "payload": payload_info,
            "signature": "X-Hub-Signature-256: sha256=hex(HMAC-SHA256(secret, raw body))",
            "unique_delivery_ids": "every request (wrk Lua: nonce-thread-counter); the dedupe "
            "path (one id repeated) is measured separately for ours",
            "wrk": {
                "threads": args.threads,
                "connections": args.conns,
                "duration_s": args.duration,
                "keepalive": True,
            },
            "open_loop": {
                "rates_per_s": rates,
                "duration_s": args.duration,
                "client": "separate Python process (aiohttp, keep-alive pool of "
                f"{args.ol_conns}); latency measured from each request's scheduled send time",
            },
            "accepted": "counted by the server: rows in webhook_deliveries (ours, 202) / "
            "deliveries that reached the app's handler (Probot, 200) over the phase",
            "cpu": "utime+stime of the server's process tree (/proc/<pid>/stat) over the phase "
            "/ accepted deliveries; *_incl_pg adds the PostgreSQL backends of its database",
            "rss": "max VmRSS of the server's process tree, sampled every 50 ms",
            "reps": args.reps,
            "servers": "one at a time, order rotated each repetition",
            "shared_cpus": f"{os.cpu_count()} CPUs shared by the load generator, the server and "
            "whatever else runs on the machine (cpu_ms_other_processes per phase)",
        },
        "machine": machine,
        "summary": summary,
        "ratios": ratio,
        "targets": {
            label: targets(summary, ratio, label, target_rate)
            for label in summary
            if label.startswith("ours")
        },
        **extra,
        "notes": notes,
        "runs": runs,
    }


def _one_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + r["error"][:300]
    ph = r["phases"]
    wu = ph["wrk_unique"]
    parts = [
        f"wrk {wu['requests_per_s']}/s cpu {wu['cpu_ms_per_delivery']} ms/dlv"
        + (
            f" (+pg {wu['cpu_ms_per_delivery_incl_pg']})"
            if "cpu_ms_per_delivery_incl_pg" in wu
            else ""
        )
        + f" other {wu['cpu_ms_other_processes'] / 1000:.1f}s"
    ]
    for k, p in ph.items():
        if k.startswith("open_loop"):
            parts.append(
                f"{k[10:]}/s p50 {p['latency_ms'].get('p50')} p99 {p['latency_ms'].get('p99')} ms"
                f" cpu {p['cpu_ms_per_delivery']} ms/dlv"
            )
    if "wrk_dup" in ph:
        parts.append(
            f"dup {ph['wrk_dup']['requests_per_s']}/s {ph['wrk_dup']['cpu_ms_per_delivery']} ms"
        )
    parts.append(f"rss {max(p['rss_max_kb'] for p in ph.values()) // 1024} MB")
    if "pg_body_column_compression" in r:
        parts.append(f"body {r['pg_body_column_compression']}")
    parts.append(f"ok {r.get('all_accepted_stored', r.get('all_accepted_reached_handler'))}")
    return " | ".join(parts)


def print_table(result: dict[str, Any]) -> None:
    rates = result["method"]["open_loop"]["rates_per_s"]
    headers = ["server", "max dlv/s", "cpu ms/dlv wrk"]
    for r in rates:
        headers += [f"p50@{int(r)}", f"p99@{int(r)}", f"cpu ms/dlv @{int(r)}"]
    headers += ["dedupe cpu ms", "RSS MB"]
    rows = []
    for label, s in result["summary"].items():
        pg = "cpu_ms_per_delivery_wrk_incl_pg" in s
        row = [
            label + (" (+pg)" if pg else ""),
            s["max_deliveries_per_s"],
            s.get("cpu_ms_per_delivery_wrk_incl_pg" if pg else "cpu_ms_per_delivery_wrk"),
        ]
        for r in rates:
            k = f"at_{int(r)}_per_s"
            row += [
                s.get(f"{k}_p50_ms"),
                s.get(f"{k}_p99_ms"),
                s.get(f"{k}_cpu_ms_per_delivery_incl_pg" if pg else f"{k}_cpu_ms_per_delivery"),
            ]
        row += [
            s.get(
                "dedupe_path_cpu_ms_per_request_incl_pg"
                if pg
                else "dedupe_path_cpu_ms_per_request",
                "",
            ),
            s["rss_max_mb"],
        ]
        rows.append(row)
    cells = [headers] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(json.dumps({"ratios": result["ratios"], "targets": result["targets"]}, indent=2))


def _fmt(c: Any) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        return f"{c:.3f}" if c < 10 else f"{c:.1f}"
    return str(c)


# ---------------------------------------------------------------------------- entry points


def serve_ingest(
    host: str, port: int, front_port: int | None = None, *, threaded: bool = False
) -> None:
    """`spell serve`'s app with the in-process worker off (pure ingest: verify+store+outbox);
    with ``front_port``, also the webhook ingest front (app/web/ingest.py) on that port."""
    from aiohttp import web

    from app.config import Settings
    from app.observability.logging import configure_logging
    from app.web.app import Overrides, create_app

    settings = Settings()
    if front_port is not None:
        settings = settings.model_copy(update={"webhook_port": front_port, "webhook_host": host})
    if threaded:  # every batch through the writer thread, as before session 4
        import functools

        from app.web import ingest

        ingest.FrontLimits = functools.partial(  # type: ignore[misc]
            ingest.FrontLimits, in_place_gap=None
        )
    configure_logging(settings.log_level)
    app = create_app(settings, overrides=Overrides(run_worker=False))
    web.run_app(app, host=host, port=port, print=None, access_log=None, shutdown_timeout=10)


def serve_ref(mode: str, host: str, port: int) -> None:
    """A reference floor, not the product: bare aiohttp + the HMAC check, then 202 — and for
    ``sqlite3`` also the delivery + outbox rows in one BEGIN IMMEDIATE transaction through the
    stdlib driver (WAL, synchronous=NORMAL, as ours), on the event-loop thread. It shows what
    Python + aiohttp itself costs per delivery on this machine. GET /bench/stats counts."""
    from aiohttp import web

    secret = os.environ["GITHUB_WEBHOOK_SECRET"].encode()
    stats = {"deliveries": 0, "commands": 0}
    db: Any = None
    if mode == "sqlite3":
        import sqlite3

        data = Path(os.environ["SPELL_DATA_DIR"])
        data.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(data / "ref.db", isolation_level=None)
        for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL"):
            db.execute("PRAGMA " + pragma)
        db.execute(
            "CREATE TABLE IF NOT EXISTS webhook_deliveries (delivery_id TEXT PRIMARY KEY, "
            "source TEXT, event TEXT, body BLOB, status TEXT, attempts INT, received_at TEXT)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY, subject TEXT, "
            "msg_id TEXT UNIQUE, payload TEXT, created_at TEXT)"
        )

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        sig = request.headers.get("X-Hub-Signature-256", "")
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            return web.json_response({"error": "bad signature"}, status=401)
        did = request.headers.get("X-GitHub-Delivery", "")
        fresh = True
        if db is not None:
            now = datetime.now(UTC).isoformat()
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute(
                    "INSERT INTO webhook_deliveries VALUES (?,?,?,?,?,?,?) "
                    "ON CONFLICT(delivery_id) DO NOTHING",
                    (did, "github", request.headers.get("X-GitHub-Event"), body, "pending", 0, now),
                )
                fresh = cur.rowcount == 1
                if fresh:
                    db.execute(
                        "INSERT INTO outbox(subject,msg_id,payload,created_at) VALUES (?,?,?,?)",
                        ("webhook.github", "wh:" + did, json.dumps({"delivery_id": did}), now),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if fresh:
            stats["deliveries"] += 1
            stats["commands"] += 1  # no parsing here: counted so the run's checks line up
        return web.json_response(
            {"delivery_id": did, "duplicate": not fresh}, status=202 if fresh else 200
        )

    async def get_stats(_request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application(client_max_size=26 * 1024 * 1024)
    app.router.add_post(OUR_PATH, hook)
    app.router.add_get("/bench/stats", get_stats)
    web.run_app(app, host=host, port=port, print=None, access_log=None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repetition, 5 s phases, SQLite only")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--rates", default="200,100", help="open-loop rates (deliveries/s)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--conns", type=int, default=32, help="wrk connections")
    p.add_argument("--ol-conns", type=int, default=64, help="open-loop connection pool")
    p.add_argument("--backends", default=None, help="default sqlite,postgresql (--quick: sqlite)")
    p.add_argument(
        "--servers", default="ours-ingest,ours-front,probot,probot-info,ref-aiohttp,ref-sqlite3"
    )
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    p.add_argument(
        "--no-front-breakdown",
        dest="front_breakdown",
        action="store_false",
        help="skip the in-process cost breakdown of the webhook ingest front",
    )
    p.add_argument("--worker-rate", type=float, default=10.0, help="0: skip the worker-on run")
    p.add_argument("--worker-seconds", type=float, default=10.0)
    p.add_argument("--worker-drain", type=float, default=150.0)
    p.add_argument("--out", default=str(RESULTS / "webhook_ingest.json"))
    # internal modes
    p.add_argument("--serve-ingest", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-ref", choices=["aiohttp", "sqlite3"], help=argparse.SUPPRESS)
    p.add_argument("--host", default=HOST, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--front-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--front-threaded", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--open-loop", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--body-file", help=argparse.SUPPRESS)
    p.add_argument("--sig", help=argparse.SUPPRESS)
    p.add_argument("--nonce", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.serve_ingest:
        serve_ingest(args.host, args.port, args.front_port, threaded=args.front_threaded)
        return
    if args.serve_ref:
        serve_ref(args.serve_ref, args.host, args.port)
        return
    if args.open_loop:
        if not re.match(r"^http://127\.0\.0\.1:\d+/", args.open_loop):
            raise SystemExit("open loop only against 127.0.0.1")
        body = Path(args.body_file).read_bytes()
        res = asyncio.run(
            open_loop(
                args.open_loop, body, args.sig, args.rate, args.duration, args.nonce, args.conns
            )
        )
        print(json.dumps(res))
        return
    if args.quick:
        args.reps = 1
        args.duration = 5.0
        args.backends = args.backends or "sqlite"
        args.worker_seconds = 5.0
    args.backends = args.backends or "sqlite,postgresql"
    result = asyncio.run(run(args))
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print_table(result)
    print(f"\nwritten: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
