"""The audit log file: group commit, fsync, flock across writers, restart, verification."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from app.domain.audit import GENESIS, PreparedRecord, prepare_record
from app.store.auditlog import AuditLog, AuditLogCorrupt, read_head, verify_file

GHS = "ghs_" + "Zx9" * 40


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "audit" / "audit.jsonl"


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


async def write_records(path: Path, n: int) -> list[dict[str, Any]]:
    async with AuditLog(path) as audit:
        return [
            await audit.append(
                "cast.settled",
                actor="github:octocat",
                cast_id=f"cst_{i}",
                amount_cents=100 + i,
                currency="USD",
                data={"i": i},
            )
            for i in range(1, n + 1)
        ]


async def test_appended_records_form_a_verifiable_chain(log_path: Path) -> None:
    records = await write_records(log_path, 5)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(records))
    result = verify_file(log_path, expected_head=(5, records[-1]["hash"]))
    assert result.ok and result.lines == 5
    assert [json.loads(line) for line in lines_of(log_path)] == records
    assert read_head(log_path) == (5, records[-1]["hash"])


async def test_the_file_is_private_and_its_directories_are_created(log_path: Path) -> None:
    await write_records(log_path, 1)
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600


async def test_a_record_carries_ts_in_utc_with_microseconds(log_path: Path) -> None:
    (record,) = await write_records(log_path, 1)
    assert record["ts"].endswith("Z") and len(record["ts"]) == len("2024-05-01T12:00:00.000000Z")


async def test_altering_a_character_names_the_line(log_path: Path) -> None:
    await write_records(log_path, 10)
    lines = lines_of(log_path)
    lines[6] = lines[6].replace('"amount_cents":107', '"amount_cents":907')
    log_path.write_text("".join(lines), encoding="utf-8")
    result = verify_file(log_path)
    assert (result.ok, result.first_bad_line) == (False, 7)
    assert result.reason == "line 7: hash mismatch (record altered)"


async def test_removing_a_middle_line_names_the_line(log_path: Path) -> None:
    await write_records(log_path, 10)
    lines = lines_of(log_path)
    del lines[4]
    log_path.write_text("".join(lines), encoding="utf-8")
    assert verify_file(log_path).reason == "line 5: seq 6 follows 4 (a record was removed)"


async def test_swapping_two_lines_names_the_first(log_path: Path) -> None:
    await write_records(log_path, 10)
    lines = lines_of(log_path)
    lines[2], lines[3] = lines[3], lines[2]
    log_path.write_text("".join(lines), encoding="utf-8")
    assert verify_file(log_path).reason == "line 3: seq 4 follows 2 (records were reordered)"


async def test_truncating_the_tail_is_caught_with_the_recorded_head(log_path: Path) -> None:
    heads: list[tuple[int, str]] = []

    async def on_head(seq: int, digest: str) -> None:
        heads.append((seq, digest))

    async with AuditLog(log_path, on_head=on_head) as audit:
        for i in range(6):
            await audit.append("cast.accepted", data={"i": i})
    lines = lines_of(log_path)
    log_path.write_text("".join(lines[:4]), encoding="utf-8")
    assert verify_file(log_path).ok
    result = verify_file(log_path, expected_head=heads[-1])
    assert (result.ok, result.first_bad_line) == (False, 5)
    assert "recorded head is seq 6" in (result.reason or "")


async def test_a_line_that_is_not_json_is_reported(log_path: Path) -> None:
    await write_records(log_path, 3)
    lines = lines_of(log_path)
    lines[1] = lines[1][:40] + "\n"
    log_path.write_text("".join(lines), encoding="utf-8")
    result = verify_file(log_path)
    assert result.first_bad_line == 2
    assert (result.reason or "").startswith("line 2: not valid JSON")


async def test_invalid_utf8_is_reported_as_an_altered_line(log_path: Path) -> None:
    await write_records(log_path, 3)
    raw = log_path.read_bytes().splitlines(keepends=True)
    raw[2] = raw[2].replace(b"github", b"git\xffub")
    log_path.write_bytes(b"".join(raw))
    assert verify_file(log_path).first_bad_line == 3


def test_a_missing_file_is_an_empty_log(tmp_path: Path) -> None:
    assert verify_file(tmp_path / "nope.jsonl").ok
    assert not verify_file(tmp_path / "nope.jsonl", expected_head=(1, "a" * 64)).ok


async def test_secrets_never_reach_the_file(log_path: Path) -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiIxMjM0NSJ9.c2lnbmF0dXJlLWJ5dGVz"
    async with AuditLog(log_path) as audit:
        record = await audit.append(
            "installation.token_issued",
            data={
                "token": GHS,
                "note": f"called with Authorization: token {GHS}",
                "headers": {"authorization": f"Bearer {jwt}"},
                "stripe": {"key": "sk_live_51Habcdef0123456789"},
            },
        )
    content = log_path.read_text(encoding="utf-8")
    for secret in (GHS, "Zx9Zx9Zx9", jwt, "sk_live_51Habcdef"):
        assert secret not in content
    assert record["data"]["token"] == "[REDACTED]"
    assert verify_file(log_path).ok


async def test_two_hundred_concurrent_appends_get_seq_1_to_200_in_few_fsyncs(
    log_path: Path,
) -> None:
    async with AuditLog(log_path) as audit:
        records = await asyncio.gather(
            *(audit.append("cast.accepted", cast_id=f"cst_{i}") for i in range(200))
        )
        fsyncs = audit.fsync_count
    assert sorted(r["seq"] for r in records) == list(range(1, 201))
    assert verify_file(log_path).ok
    assert fsyncs < 200 // 4  # group commit: the first batch writes one, the rest share few


async def test_the_writer_never_blocks_the_event_loop(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No clock involved: while fsync is in progress, the fsync waits until the event loop has
    # shown it is still running (a task on the loop answers). Were fsync called on the loop's
    # own thread, the answer could never come and the wait would report it.
    real_fsync = os.fsync
    loop_thread = threading.get_ident()
    in_fsync = threading.Event()
    loop_answered = threading.Event()
    seen: list[tuple[bool, bool]] = []  # (off the loop's thread, loop answered meanwhile)

    watching = threading.Event()  # the appends below (not opening or closing the log)

    def watched_fsync(fd: int) -> None:
        if not watching.is_set():
            real_fsync(fd)
            return
        loop_answered.clear()
        in_fsync.set()
        answered = loop_answered.wait(timeout=10)
        in_fsync.clear()
        seen.append((threading.get_ident() != loop_thread, answered))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watched_fsync)
    stop = asyncio.Event()

    async def responder() -> None:
        watching.set()
        while not stop.is_set():
            if in_fsync.is_set():
                loop_answered.set()
            await asyncio.sleep(0.001)

    async with AuditLog(log_path) as audit:
        task = asyncio.create_task(responder())
        await asyncio.sleep(0)  # the responder is watching before the first append
        for i in range(4):
            await audit.append("cast.accepted", data={"i": i})
        watching.clear()
        stop.set()
        await task
    assert seen, "the log was never fsynced"
    assert all(off_loop for off_loop, _ in seen)
    assert all(answered for _, answered in seen)  # the loop ran during every fsync


async def test_two_writers_on_one_file_extend_one_chain(log_path: Path) -> None:
    # Two AuditLog instances open the file separately, like `spell serve` and `spell worker`.
    first, second = AuditLog(log_path), AuditLog(log_path)
    await first.start()
    await second.start()
    try:
        for i in range(10):
            writer = first if i % 2 == 0 else second
            await writer.append("cast.accepted", data={"i": i, "writer": writer is first})
        await asyncio.gather(
            *(first.append("a", data={"i": i}) for i in range(25)),
            *(second.append("b", data={"i": i}) for i in range(25)),
        )
    finally:
        await first.close()
        await second.close()
    result = verify_file(log_path)
    assert result.ok, result.reason
    assert result.head_seq == 60


async def test_a_restart_continues_the_chain(log_path: Path) -> None:
    before = await write_records(log_path, 3)
    async with AuditLog(log_path) as audit:
        assert audit.head == (3, before[-1]["hash"])
        record = await audit.append("cast.accepted")
    assert (record["seq"], record["prev"]) == (4, before[-1]["hash"])
    assert verify_file(log_path).ok


async def test_a_torn_last_line_from_a_crash_is_dropped_on_restart(log_path: Path) -> None:
    records = await write_records(log_path, 3)
    with log_path.open("ab") as handle:
        handle.write(b'{"seq":4,"ts":"2024-')  # a write interrupted before fsync returned
    assert not verify_file(log_path).ok
    async with AuditLog(log_path) as audit:
        record = await audit.append("cast.accepted")
    assert (record["seq"], record["prev"]) == (4, records[-1]["hash"])
    assert verify_file(log_path).ok


async def test_a_tampered_last_line_stops_appends(log_path: Path) -> None:
    await write_records(log_path, 2)
    content = log_path.read_text(encoding="utf-8").replace('"amount_cents":102', '"amount_cents":1')
    log_path.write_text(content, encoding="utf-8")
    audit = AuditLog(log_path)
    with pytest.raises(AuditLogCorrupt, match="spell audit verify"):
        await audit.start()


async def test_on_head_is_called_once_per_batch_and_its_errors_are_not_raised(
    log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    heads: list[tuple[int, str]] = []

    async def on_head(seq: int, digest: str) -> None:
        heads.append((seq, digest))
        raise RuntimeError("database is down")

    async with AuditLog(log_path, on_head=on_head) as audit:
        records = await asyncio.gather(*(audit.append("e", data={"i": i}) for i in range(30)))
        assert len(heads) == audit.batch_count
    assert heads[-1] == (30, max(records, key=lambda r: int(r["seq"]))["hash"])
    assert "on_head" in caplog.text


async def test_a_bad_append_fails_alone(log_path: Path) -> None:
    async with AuditLog(log_path) as audit:
        with pytest.raises(TypeError):
            await audit.append("cast.settled", amount_cents=1.5, currency="USD")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await audit.append("x", data={"bad": float("inf")})
        ok = await audit.append("cast.settled", amount_cents=150, currency="EUR")
    assert ok["seq"] == 1


async def test_append_and_append_prepared_share_one_queue(log_path: Path) -> None:
    """Queued together, ``append`` and ``append_prepared`` records are one batch of one chain,
    and a caller cancelled after queueing does not withdraw its record."""

    def prepared(event: str) -> PreparedRecord:
        return prepare_record(
            event=event,
            actor=None,
            cast_id=None,
            input_hash=None,
            amount_cents=None,
            currency=None,
            traceparent=None,
            data={},
        )

    async with AuditLog(log_path) as audit:
        first = await audit.append("first")
        batches = audit.batch_count
        single = asyncio.create_task(audit.append("single", cast_id="cst_1"))
        cancelled = asyncio.create_task(audit.append("cancelled"))
        many = asyncio.create_task(audit.append_prepared([prepared("a"), prepared("b")]))
        await asyncio.sleep(0)  # all three are queued; the writer has not taken them yet
        cancelled.cancel()
        written = [await single, *await many]
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert audit.batch_count == batches + 1
    assert [(r["seq"], r["event"]) for r in written] == [(2, "single"), (4, "a"), (5, "b")]
    assert written[0]["prev"] == first["hash"] and written[0]["cast_id"] == "cst_1"
    assert [json.loads(line)["event"] for line in lines_of(log_path)] == [
        "first",
        "single",
        "cancelled",
        "a",
        "b",
    ]
    assert verify_file(log_path).ok


async def test_close_flushes_pending_and_later_appends_fail(log_path: Path) -> None:
    audit = AuditLog(log_path)
    with pytest.raises(RuntimeError):
        await audit.append("too.early")
    await audit.start()
    pending = [asyncio.create_task(audit.append("e", data={"i": i})) for i in range(5)]
    await asyncio.sleep(0)
    await audit.close()
    assert [t.result()["seq"] for t in pending] == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError):
        await audit.append("too.late")
    await audit.close()  # idempotent


async def test_the_tail_is_read_from_the_end(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = await write_records(log_path, 300)
    size = log_path.stat().st_size
    read = 0
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        nonlocal read
        read += n
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    assert read_head(log_path) == (300, records[-1]["hash"])
    assert read < size / 2


async def test_a_long_last_record_is_found_when_restarting(log_path: Path) -> None:
    async with AuditLog(log_path) as audit:
        await audit.append("e")
        big = await audit.append("e", data={"blob": "x" * 50_000})
    assert read_head(log_path) == (2, big["hash"])
    async with AuditLog(log_path) as audit:
        assert (await audit.append("e"))["prev"] == big["hash"]
    assert verify_file(log_path).ok


_WRITER_SCRIPT = """
import asyncio, sys
from pathlib import Path
from app.store.auditlog import AuditLog

async def main() -> None:
    async with AuditLog(Path(sys.argv[1])) as audit:
        for i in range(int(sys.argv[3])):
            await asyncio.gather(*(audit.append("e", data={"w": sys.argv[2], "i": i, "j": j})
                                   for j in range(3)))

asyncio.run(main())
"""


async def test_separate_processes_extend_one_chain(log_path: Path) -> None:
    import sys

    root = Path(__file__).resolve().parents[2]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WRITER_SCRIPT, str(log_path), name, "20", cwd=root
        )
        for name in ("serve", "worker", "cli")
    ]
    assert [await p.wait() for p in procs] == [0, 0, 0]
    result = verify_file(log_path)
    assert result.ok, result.reason
    assert result.head_seq == 3 * 20 * 3


async def test_a_failed_fsync_fails_its_batch_and_stops_the_log(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    async with AuditLog(log_path) as audit:
        await audit.append("first")
        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="Input/output"):
            await audit.append("second")
        monkeypatch.undo()
        with pytest.raises(RuntimeError, match="fsync failed"):
            await audit.append("third")
    assert verify_file(log_path).ok


async def test_a_torn_write_is_cut_off_before_the_next_batch(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def torn_write(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[:25])
        raise OSError(28, "No space left on device")

    async with AuditLog(log_path) as audit:
        first = await audit.append("first")
        monkeypatch.setattr(os, "write", torn_write)
        with pytest.raises(OSError, match="No space"):
            await audit.append("second")
        monkeypatch.setattr(os, "write", real_write)
        second = await audit.append("second again")
    assert (second["seq"], second["prev"]) == (2, first["hash"])
    assert verify_file(log_path).ok


async def test_verify_while_appending_checks_whole_batches_only(log_path: Path) -> None:
    async with AuditLog(log_path) as audit:

        async def writer(w: int) -> None:
            for i in range(30):
                await audit.append("e", data={"w": w, "i": i})

        writers = [asyncio.create_task(writer(w)) for w in range(10)]
        results = []
        while not all(w.done() for w in writers):
            results.append(await asyncio.to_thread(verify_file, log_path))
        await asyncio.gather(*writers)
    assert len({r.head_seq for r in results}) > 1  # it really ran during the appends
    assert all(r.ok for r in results), [r.reason for r in results if not r.ok]
    assert verify_file(log_path).head_seq == 300
