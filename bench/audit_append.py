"""Audit log append throughput: group commit vs one fsync per record.

    .venv/bin/python bench/audit_append.py [--records 2000] [--tasks 50] [--dir PATH]

Three runs in one process, each on a fresh file in ``--dir`` (default: a temporary directory;
point it at the real data disk, since tmpfs makes fsync free):

1. ``group commit``: ``--tasks`` asyncio tasks share ``--records`` appends on one ``AuditLog``.
2. ``sequential``: one task awaits each ``AuditLog.append`` in turn (one fsync per record, with
   the same thread hop as production).
3. ``naive loop``: build each record and ``write`` + ``fsync`` it directly, no asyncio.

Every file is verified afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from app.domain.audit import GENESIS, build_record, format_ts, serialize_record
from app.store.auditlog import AuditLog, verify_file


def _data(i: int) -> dict[str, object]:
    return {"spell": "lint", "i": i, "repo": "octo/hello"}


async def group_commit(path: Path, records: int, tasks: int) -> tuple[float, int]:
    async with AuditLog(path) as audit:
        per_task, extra = divmod(records, tasks)

        async def worker(t: int) -> None:
            for i in range(per_task + (1 if t < extra else 0)):
                await audit.append(
                    "cast.settled",
                    actor="github:octocat",
                    cast_id=f"cst_{t}_{i}",
                    amount_cents=250,
                    currency="USD",
                    data=_data(i),
                )

        started = time.perf_counter()
        await asyncio.gather(*(worker(t) for t in range(tasks)))
        elapsed = time.perf_counter() - started
        return elapsed, audit.fsync_count


async def sequential(path: Path, records: int) -> tuple[float, int]:
    async with AuditLog(path) as audit:
        started = time.perf_counter()
        for i in range(records):
            await audit.append(
                "cast.settled",
                actor="github:octocat",
                cast_id=f"cst_{i}",
                amount_cents=250,
                currency="USD",
                data=_data(i),
            )
        return time.perf_counter() - started, audit.fsync_count


def naive_loop(path: Path, records: int) -> tuple[float, int]:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    prev, fsyncs = GENESIS, 0
    started = time.perf_counter()
    try:
        for i in range(records):
            record = build_record(
                seq=i + 1,
                prev=prev,
                ts=format_ts(datetime.now(UTC)),
                event="cast.settled",
                actor="github:octocat",
                cast_id=f"cst_{i}",
                input_hash=None,
                amount_cents=250,
                currency="USD",
                traceparent=None,
                data=_data(i),
            )
            prev = record["hash"]
            os.write(fd, (serialize_record(record) + "\n").encode())
            os.fsync(fd)
            fsyncs += 1
    finally:
        os.close(fd)
    return time.perf_counter() - started, fsyncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="audit-bench-") as tmp:
        root = Path(tmp)

        def run_group(path: Path) -> tuple[float, int]:
            return asyncio.run(group_commit(path, args.records, args.tasks))

        def run_sequential(path: Path) -> tuple[float, int]:
            return asyncio.run(sequential(path, args.records))

        def run_naive(path: Path) -> tuple[float, int]:
            return naive_loop(path, args.records)

        runs: list[tuple[str, Path, Callable[[Path], tuple[float, int]]]] = [
            (f"group commit ({args.tasks} tasks)", root / "group.jsonl", run_group),
            ("sequential AuditLog.append", root / "sequential.jsonl", run_sequential),
            ("naive write+fsync loop", root / "naive.jsonl", run_naive),
        ]
        print(f"{args.records} records, files in {root}")
        print(f"{'run':34} {'records/s':>10} {'fsyncs':>7} {'rec/fsync':>9} {'seconds':>8}")
        for name, path, run in runs:
            elapsed, fsyncs = run(path)
            result = verify_file(path)
            assert result.ok and result.head_seq == args.records, result
            print(
                f"{name:34} {args.records / elapsed:10.0f} {fsyncs:7d} "
                f"{args.records / fsyncs:9.1f} {elapsed:8.3f}"
            )


if __name__ == "__main__":
    main()
