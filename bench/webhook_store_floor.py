"""What storing one webhook delivery costs in SQLite, without any server around it (issue #3).

The ingest front's storage step is two INSERTs in one transaction: the raw delivery into
``webhook_deliveries`` and its row in ``outbox``. This measures CPU per delivery for that step
through the stdlib ``sqlite3`` driver (what ``SqliteRunner`` uses) on a database made by the
app's own migrations (WAL, ``synchronous=NORMAL``, default auto-checkpoint), with:

* ``body``     the real 14 KiB signed-comment payload of ``bench/webhook_ingest.py``;
* ``lz4``      the body as the platform stores it since session 5: an lz4 frame
               (app/store/bodies.py, ~3.3 KiB), compression included in the time;
* ``pointer``  the same rows with the body replaced by a 24-byte pointer, plus one ``writev``
               of the batch's bodies to an append-only file — the "spool" alternative;

each alone (batch of 1: a delivery at a trickle) and in batches of 24 (the front's mean batch
under wrk); and ``body`` in batches of 24 with the WAL checkpointed every 4,000 pages (16 MiB,
``ckpt16m``: what ``SqliteRunner`` does since session 4) instead of SQLite's default 1,000.
CPU is split into user and system time (``getrusage``): on this VM most of storing a delivery
is the kernel's (WAL writes, checkpoint copies and fsyncs). Baseline for the ratio: ``body`` at
the same batch size, same run.

    .venv/bin/python bench/webhook_store_floor.py [--runs 5] [-n 3000]

Prints a table and writes bench/results/webhook_store_floor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.store.bodies import pack  # noqa: E402
from bench.webhook_ingest import build_payload  # noqa: E402

NOW = "2026-11-26 12:00:00.000000"
#: (batch size, variants)
CASES = ((1, ("body", "lz4", "pointer")), (24, ("body", "ckpt16m", "lz4", "pointer")))


def migrated(tmp: Path) -> Path:
    env = {**os.environ, "SPELL_DATA_DIR": str(tmp / "seed")}
    env.pop("DATABASE_URL", None)
    spell = Path(sys.executable).parent / "spell"
    subprocess.run([str(spell), "db", "upgrade"], env=env, check=True, capture_output=True)
    return tmp / "seed" / "spell.db"


def fresh_copy(seed: Path, path: Path) -> sqlite3.Connection:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.write_bytes(seed.read_bytes())
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def store(conn: sqlite3.Connection, bodies: list[bytes], encoding: str | None = None) -> None:
    n = len(bodies)
    ids = [uuid.uuid4().hex for _ in range(n)]
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("SAVEPOINT job")
    rows = ", ".join(["(?, ?, ?, ?, ?, 'pending', 0, NULL, ?, NULL)"] * n)
    args = [
        v
        for d, b in zip(ids, bodies, strict=True)
        for v in (d, "github", "issue_comment", b, encoding, NOW)
    ]
    list(
        conn.execute(
            "INSERT INTO webhook_deliveries (delivery_id, source, event, body, body_encoding,"  # noqa: S608
            f" status, attempts, last_error, received_at, processed_at) VALUES {rows}"
            " ON CONFLICT (delivery_id) DO NOTHING RETURNING delivery_id",
            args,
        )
    )
    rows = ", ".join(["(?, ?, ?, ?, NULL)"] * n)
    args = [v for d in ids for v in ("webhook.github", f"wh:{d}", f'{{"delivery_id": "{d}"}}', NOW)]
    conn.execute(
        f"INSERT INTO outbox (subject, msg_id, payload, created_at, sent_at) VALUES {rows}",  # noqa: S608
        args,
    )
    conn.execute("RELEASE job")
    conn.execute("COMMIT")


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def one_run(
    seed: Path, tmp: Path, body: bytes, variant: str, batch: int, n: int
) -> tuple[float, float]:
    """(user, system) CPU ms per delivery."""
    conn = fresh_copy(seed, tmp / "db.sqlite")
    if variant == "ckpt16m":
        conn.execute("PRAGMA wal_autocheckpoint=4000")
    spool = open(tmp / "spool", "ab")  # noqa: SIM115
    try:
        u0, s0 = _cpu()
        for _ in range(n // batch):
            if variant == "pointer":
                os.writev(spool.fileno(), [body] * batch)
                store(conn, [b"seg:000001:0123456789:14336"] * batch)
            elif variant == "lz4":
                packed = [pack(body) for _ in range(batch)]
                store(conn, [b for b, _ in packed], packed[0][1])
            else:
                store(conn, [body] * batch)
        u1, s1 = _cpu()
        done = n // batch * batch
        return (u1 - u0) * 1000 / done, (s1 - s0) * 1000 / done
    finally:
        spool.close()
        conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("-n", type=int, default=3000, help="deliveries per run")
    p.add_argument("--out", default=str(ROOT / "bench/results/webhook_store_floor.json"))
    args = p.parse_args()
    body, _ = build_payload()
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="spell-store-floor-") as d:
        tmp = Path(d)
        seed = migrated(tmp)
        for batch, variants in CASES:
            for variant in variants:
                runs = [one_run(seed, tmp, body, variant, batch, args.n) for _ in range(args.runs)]
                total = [u + s for u, s in runs]
                results[f"{variant}/batch{batch}"] = {
                    "cpu_ms_per_delivery_runs": [round(t, 4) for t in total],
                    "cpu_ms_per_delivery": round(statistics.median(total), 4),
                    "user_ms_per_delivery": round(statistics.median(u for u, _ in runs), 4),
                    "system_ms_per_delivery": round(statistics.median(s for _, s in runs), 4),
                }
    for batch, variants in CASES:
        base = float(results[f"body/batch{batch}"]["cpu_ms_per_delivery"])  # type: ignore[arg-type]
        for variant in variants:
            r = results[f"{variant}/batch{batch}"]
            r["ratio_vs_body"] = round(float(r["cpu_ms_per_delivery"]) / base, 3)  # type: ignore[arg-type]
    print(f"{'case':18s} {'cpu ms/delivery':>16s} {'user':>7s} {'system':>7s} {'x body':>7s}")
    for k, r in results.items():
        print(
            f"{k:18s} {r['cpu_ms_per_delivery']:>16} {r['user_ms_per_delivery']:>7}"
            f" {r['system_ms_per_delivery']:>7} {r['ratio_vs_body']:>7}"
        )
    out = {
        "benchmark": "webhook_store_floor",
        "issue": 3,
        "payload_bytes": len(body),
        "runs": args.runs,
        "deliveries_per_run": args.n,
        "loadavg": os.getloadavg(),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
