"""Retention: the pure policy (boundaries of every period), duration parsing, and the audit log's
segments — rotation, removal behind an anchor, and verification of what is retained."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.config import Settings
from app.domain.audit import GENESIS, build_record, serialize_record, verify_lines
from app.domain.retention import (
    RetentionPolicy,
    Segment,
    SweepCounts,
    due_segments,
    export_key,
    parse_duration,
    parse_segment_name,
    rotation_due,
    segment_name,
)
from app.store.auditlog import (
    AuditLog,
    anchor_path,
    list_segments,
    read_anchor,
    read_head,
    remove_segment,
    rotate,
    segment_bounds,
    segments_dir,
    verify_log,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
H = 3600
D = 24 * H
POLICY = RetentionPolicy()


# ---------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (300, 300),
        ("300", 300),
        ("300s", 300),
        ("5m", 300),
        ("24h", 86400),
        ("7d", 604800),
        ("30D", 2592000),
        ("2w", 1209600),
        (" 1h ", 3600),
        (0, 0),
    ],
)
def test_parse_duration(value: object, seconds: int) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "1.5h", "-3", "h", "3 days", "1h30m", -1, True, None, 2.5])
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_settings_take_durations_and_defaults(tmp_path: Path) -> None:
    s = Settings(SPELL_DATA_DIR=str(tmp_path))
    assert (s.retention_inputs, s.retention_artifacts, s.retention_audit) == (D, 7 * D, 30 * D)
    assert s.retention_interval == 300
    s = Settings(
        SPELL_DATA_DIR=str(tmp_path),
        SPELL_RETENTION_INPUTS="12h",
        SPELL_RETENTION_ARTIFACTS="3d",
        SPELL_RETENTION_AUDIT="90d",
        SPELL_RETENTION_INTERVAL="1m",
        SPELL_RETENTION_AUDIT_SEGMENT="15m",
    )
    assert (s.retention_inputs, s.retention_artifacts, s.retention_audit) == (
        12 * H,
        3 * D,
        90 * D,
    )
    assert (s.retention_interval, s.retention_audit_segment) == (60, 900)
    with pytest.raises(ValueError):
        Settings(SPELL_DATA_DIR=str(tmp_path), SPELL_RETENTION_INPUTS="soon")
    with pytest.raises(ValueError):
        Settings(SPELL_DATA_DIR=str(tmp_path), SPELL_RETENTION_AUDIT="0")


# ---------------------------------------------------------------------------- policy boundaries


def test_inputs_due_exactly_at_24h_and_not_a_second_before() -> None:
    created = NOW - timedelta(hours=24)
    assert POLICY.input_due(created, NOW, finished=True)
    assert not POLICY.input_due(created + timedelta(seconds=1), NOW, finished=True)
    assert not POLICY.input_due(NOW - timedelta(hours=23, minutes=59), NOW, finished=True)
    assert POLICY.input_due(NOW - timedelta(days=3), NOW, finished=True)
    # an unfinished cast keeps its input (its run still needs it)
    assert not POLICY.input_due(NOW - timedelta(days=3), NOW, finished=False)
    assert POLICY.inputs_cutoff(NOW) == created


def test_delivery_bodies_follow_the_inputs_period() -> None:
    at = NOW - timedelta(hours=24)
    assert POLICY.delivery_body_due(at, NOW, handled=True)
    assert not POLICY.delivery_body_due(at + timedelta(seconds=1), NOW, handled=True)
    assert not POLICY.delivery_body_due(at - timedelta(days=1), NOW, handled=False)


def test_artifacts_due_at_7_days_or_when_the_link_expired() -> None:
    far = NOW + timedelta(days=30)
    created = NOW - timedelta(days=7)
    assert POLICY.artifact_due(created, far, NOW)
    assert not POLICY.artifact_due(created + timedelta(seconds=1), far, NOW)
    assert not POLICY.artifact_due(NOW - timedelta(days=6, hours=23, minutes=59), far, NOW)
    # the link expired earlier (a shorter SPELL_ARTIFACT_TTL): nobody can fetch it any more
    assert POLICY.artifact_due(NOW - timedelta(hours=1), NOW, NOW)
    assert not POLICY.artifact_due(NOW - timedelta(hours=1), NOW + timedelta(seconds=1), NOW)


def test_audit_records_due_at_30_days() -> None:
    assert POLICY.audit_record_due(NOW - timedelta(days=30), NOW)
    assert not POLICY.audit_record_due(NOW - timedelta(days=30) + timedelta(seconds=1), NOW)
    assert not POLICY.audit_record_due(NOW - timedelta(days=29, hours=23, minutes=59), NOW)


def test_custom_periods_move_every_boundary() -> None:
    p = RetentionPolicy(inputs=60, artifacts=120, audit=180, audit_segment=30)
    assert p.input_due(NOW - timedelta(seconds=60), NOW, finished=True)
    assert not p.input_due(NOW - timedelta(seconds=59), NOW, finished=True)
    assert p.artifact_due(NOW - timedelta(seconds=120), NOW + timedelta(days=1), NOW)
    assert not p.artifact_due(NOW - timedelta(seconds=119), NOW + timedelta(days=1), NOW)
    assert p.audit_record_due(NOW - timedelta(seconds=180), NOW)
    assert not p.audit_record_due(NOW - timedelta(seconds=179), NOW)
    with pytest.raises(ValueError):
        RetentionPolicy(inputs=0)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError):
        POLICY.input_due(datetime(2026, 1, 1), NOW, finished=True)


def test_rotation_after_the_segment_span_or_when_something_is_due() -> None:
    assert not rotation_due(None, NOW, POLICY)
    assert rotation_due(NOW - timedelta(hours=1), NOW, POLICY)
    assert not rotation_due(NOW - timedelta(minutes=59), NOW, POLICY)
    long_span = RetentionPolicy(audit=60, audit_segment=10 * D)
    assert rotation_due(NOW - timedelta(seconds=60), NOW, long_span)  # a record is due
    assert not rotation_due(NOW - timedelta(seconds=59), NOW, long_span)


def test_segments_leave_by_their_newest_record_oldest_first() -> None:
    old = NOW - timedelta(days=31)
    segs = [
        Segment(1, 10, old),
        Segment(11, 20, NOW - timedelta(days=30)),  # exactly 30 days: due
        Segment(21, 30, NOW - timedelta(days=30) + timedelta(seconds=1)),  # one second short
        Segment(31, 40, old),  # older ts after a newer segment (clock skew): waits its turn
    ]
    assert due_segments(segs, NOW, POLICY) == 2
    assert due_segments(list(reversed(segs)), NOW, POLICY) == 2  # ordered by seq
    assert due_segments([], NOW, POLICY) == 0
    assert due_segments([Segment(1, 5, NOW - timedelta(days=29))], NOW, POLICY) == 0


def test_segment_names_round_trip() -> None:
    name = segment_name(1, 500)
    assert name == "audit-000000000001-000000000500.jsonl"
    assert parse_segment_name(name) == (1, 500)
    assert parse_segment_name("audit-000000000005-000000000004.jsonl") is None
    assert parse_segment_name("audit.jsonl") is None
    assert export_key("main", 1, 500) == "audit/main/" + name
    with pytest.raises(ValueError):
        segment_name(5, 4)


def test_counts_hold_numbers_only() -> None:
    counts = SweepCounts(inputs=2, artifacts=1, audit_records=7)
    assert counts.removed == 10
    assert all(v is None or isinstance(v, int) for v in counts.as_dict().values())


# ---------------------------------------------------------------------------- anchored chains


def _records(n: int, *, first: int = 1, prev: str = GENESIS) -> list[dict[str, object]]:
    out = []
    for seq in range(first, first + n):
        rec = build_record(
            seq=seq,
            prev=prev,
            ts=f"2026-11-01T00:00:{seq % 60:02d}.000000Z",
            event="test",
            actor=None,
            cast_id=None,
            input_hash=None,
            amount_cents=None,
            currency=None,
            traceparent=None,
            data={"n": seq},
        )
        prev = str(rec["hash"])
        out.append(rec)
    return out


def test_verify_lines_from_an_anchor() -> None:
    recs = _records(6)
    lines = [serialize_record(r) for r in recs]
    anchor = (3, str(recs[2]["hash"]))
    assert verify_lines(lines[3:], start=anchor).ok
    assert verify_lines(lines[3:], start=anchor).head_seq == 6
    assert verify_lines([], start=anchor).head_seq == 3
    # a record after the anchor is missing
    bad = verify_lines(lines[4:], start=anchor)
    assert not bad.ok and bad.first_bad_line == 1 and "records were removed" in str(bad.reason)
    # the anchor's hash does not match the first retained record's prev
    bad = verify_lines(lines[3:], start=(3, "f" * 64))
    assert not bad.ok and bad.first_bad_line == 1 and "anchor" in str(bad.reason)
    # without the anchor, a log that starts at seq 4 is a log whose head was cut off
    assert not verify_lines(lines[3:]).ok
    # a checkpoint recorded elsewhere must match
    assert not verify_lines(lines, checkpoints={2: "0" * 64}).ok
    assert verify_lines(lines, checkpoints={2: str(recs[1]["hash"])}).ok


# ---------------------------------------------------------------------------- segments on disk


class Clock:
    def __init__(self, now: datetime) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current


async def _append(log: AuditLog, n: int, tag: str) -> None:
    for i in range(n):
        await log.append("test.event", data={"tag": tag, "i": i})


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


async def test_rotation_keeps_one_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    clock = Clock(NOW)
    async with AuditLog(path, now=clock.now) as log:
        await _append(log, 3, "a")
        assert rotate(path, lambda first: True) is not None
        assert not path.exists()
        await _append(log, 2, "b")  # the writer follows the rename
        assert log.head[0] == 5
    segs = list_segments(path)
    assert [(s.first, s.last) for s in segs] == [(1, 3)]
    assert segs[0].path.parent == segments_dir(path)
    new = [json.loads(line) for line in _lines(path)]
    assert [r["seq"] for r in new] == [4, 5]
    assert new[0]["prev"] == segment_bounds(segs[0])[1]
    result = verify_log(path)
    assert result.ok and result.lines == 5 and result.head_seq == 5
    assert read_head(path)[0] == 5


async def test_rotation_is_noticed_by_a_writer_of_another_process(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    async with AuditLog(path) as one, AuditLog(path) as two:
        await _append(one, 2, "one")
        await _append(two, 2, "two")
        assert rotate(path, lambda first: True) is not None
        await _append(two, 1, "two")  # its descriptor names the segment now: it re-opens
        await _append(one, 1, "one")
        assert rotate(path, lambda first: True) is not None
        await _append(one, 1, "one")
    assert [(s.first, s.last) for s in list_segments(path)] == [(1, 4), (5, 6)]
    assert verify_log(path).ok
    assert verify_log(path).head_seq == 7


async def test_rotation_waits_for_its_time_and_skips_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    assert rotate(path, lambda first: True) is None  # no file yet
    clock = Clock(NOW)
    async with AuditLog(path, now=clock.now) as log:
        await _append(log, 1, "a")
    seen: list[datetime] = []

    def decide(first: datetime) -> bool:
        seen.append(first)
        return rotation_due(first, NOW + timedelta(minutes=59), POLICY)

    assert rotate(path, decide) is None
    assert seen == [NOW]
    assert rotate(path, lambda first: rotation_due(first, NOW + timedelta(hours=1), POLICY))
    path.touch()
    assert rotate(path, lambda first: True) is None  # an empty active file stays


async def test_removed_segment_leaves_a_verifiable_rest(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    async with AuditLog(path) as log:
        await _append(log, 3, "old")
        rotate(path, lambda first: True)
        await _append(log, 3, "mid")
        rotate(path, lambda first: True)
        await _append(log, 2, "new")
    first, second = list_segments(path)
    exported = first.path.read_text()
    _, last_hash = segment_bounds(first)
    remove_segment(path, first, last_hash)
    assert not first.path.exists()
    assert read_anchor(path) == (3, last_hash)
    ok = verify_log(path, ledger_anchor=(3, last_hash), ledger_checked=True)
    assert ok.ok and ok.lines == 5 and ok.head_seq == 8
    # the export plus what is retained is the whole chain from the genesis (offline check)
    whole = exported.splitlines() + second.path.read_text().splitlines() + _lines(path)
    assert verify_lines(whole).ok

    # a retained line altered: named by its global line and its own file and line
    lines = second.path.read_text().splitlines()
    lines[1] = lines[1].replace('"mid"', '"MID"')
    second.path.write_text("\n".join(lines) + "\n")
    bad = verify_log(path)
    assert not bad.ok and bad.first_bad_line == 2
    assert "audit.segments/audit-000000000004-000000000006.jsonl line 2" in str(bad.reason)


async def test_tampering_in_the_active_file_after_removal(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    async with AuditLog(path) as log:
        await _append(log, 2, "old")
        rotate(path, lambda first: True)
        await _append(log, 3, "new")
    (seg,) = list_segments(path)
    remove_segment(path, seg, segment_bounds(seg)[1])
    lines = _lines(path)
    lines[2] = lines[2].replace('"i":2', '"i":9')
    path.write_text("\n".join(lines) + "\n")
    bad = verify_log(path)
    assert not bad.ok and bad.first_bad_line == 3
    assert "(audit.jsonl line 3)" in str(bad.reason)


async def test_anchor_checks_against_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    async with AuditLog(path) as log:
        await _append(log, 2, "old")
        rotate(path, lambda first: True)
        await _append(log, 2, "mid")
        rotate(path, lambda first: True)
        await _append(log, 1, "new")
    first, second = list_segments(path)
    h1 = segment_bounds(first)[1]
    h2 = segment_bounds(second)[1]
    # the ledger recorded no removal, yet there is an anchor: removed outside a sweep
    remove_segment(path, first, h1)
    bad = verify_log(path, ledger_anchor=None, ledger_checked=True)
    assert not bad.ok and "outside a retention sweep" in str(bad.reason)
    # the anchor file is past the ledger's copy
    remove_segment(path, second, h2)
    bad = verify_log(path, ledger_anchor=(2, h1), ledger_checked=True)
    assert not bad.ok and "past the ledger's" in str(bad.reason)
    # same seq, another hash
    bad = verify_log(path, ledger_anchor=(4, "a" * 64), ledger_checked=True)
    assert not bad.ok and "differs from the ledger's" in str(bad.reason)
    assert verify_log(path, ledger_anchor=(4, h2), ledger_checked=True).ok


async def test_a_removal_cut_short_is_still_consistent(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    async with AuditLog(path) as log:
        await _append(log, 2, "old")
        rotate(path, lambda first: True)
        await _append(log, 2, "new")
    (seg,) = list_segments(path)
    h = segment_bounds(seg)[1]
    # 1. the ledger's anchor moved, the file's not yet: the record at its seq is checked
    assert verify_log(path, ledger_anchor=(2, h), ledger_checked=True).ok
    assert not verify_log(path, ledger_anchor=(2, "b" * 64), ledger_checked=True).ok
    # 2. the anchor file written, the segment not yet unlinked: it is skipped
    saved = seg.path.read_bytes()
    remove_segment(path, seg, h)
    seg.path.write_bytes(saved)
    result = verify_log(path, ledger_anchor=(2, h), ledger_checked=True)
    assert result.ok and result.lines == 2


async def test_writer_continues_from_the_anchor_when_everything_was_removed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    async with AuditLog(path) as log:
        await _append(log, 3, "old")
        rotate(path, lambda first: True)
    (seg,) = list_segments(path)
    h = segment_bounds(seg)[1]
    remove_segment(path, seg, h)
    assert not path.exists() and read_anchor(path) == (3, h)
    async with AuditLog(path) as log:  # a new process: no segments left, only the anchor
        assert log.head == (3, h)
        record = await log.append("after")
    assert record["seq"] == 4 and record["prev"] == h
    assert verify_log(path, ledger_anchor=(3, h), ledger_checked=True).ok


async def test_a_forged_anchor_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    async with AuditLog(path) as log:
        await _append(log, 2, "x")
    anchor_path(path).write_text('{"seq": "two", "hash": "x"}')
    with pytest.raises(RuntimeError):
        read_anchor(path)


async def test_concurrent_appends_during_rotations_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    async with AuditLog(path) as one, AuditLog(path) as two:

        async def writer(log: AuditLog, tag: str) -> None:
            for i in range(40):
                await log.append("w", data={"tag": tag, "i": i})

        async def rotator() -> None:
            for _ in range(8):
                await asyncio.to_thread(rotate, path, lambda first: True)
                await asyncio.sleep(0)

        await asyncio.gather(writer(one, "one"), writer(two, "two"), rotator())
    result = verify_log(path)
    assert result.ok and result.lines == 80 and result.head_seq == 80


# ---------------------------------------------------------------------------- staged input files


def test_staged_input_files_of_every_run_folder_once(tmp_path: Path) -> None:
    import os

    from app.worker.retention import _run_dirs, _staged_files

    own = tmp_path / "spell-work-abc-1" / "runs"
    dead = tmp_path / "spell-work-abc-2" / "runs"
    other = tmp_path / "spell-work-xyz-3" / "runs"  # another data directory's: not ours
    for runs, name, age in (
        (own, "c_old-1", 100),
        (own, "c_new-1", 0),
        (dead, "c_dead-2", 100),
        (other, "c_other-1", 100),
    ):
        (runs / name).mkdir(parents=True)
        f = runs / name / "input.json"
        f.write_text("{}")
        os.utime(f, (1000 - age, 1000 - age))
    (own / "not-a-run").mkdir()
    dirs = _run_dirs([own], [str(tmp_path / "spell-work-abc-*" / "runs")])
    assert sorted(dirs) == sorted([own.resolve(), dead.resolve()])  # own folder listed once
    found = _staged_files(dirs, cutoff=950)
    assert sorted(c for c, _ in found) == ["c_dead", "c_old"]
    assert _staged_files(dirs, cutoff=899) == []


async def test_verify_during_appends_rotations_and_removals_sees_one_whole_chain(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    results = []
    async with AuditLog(path) as log:
        await _append(log, 3, "start")

        async def writer() -> None:
            for i in range(60):
                await log.append("w", data={"i": i})

        async def janitor() -> None:
            for _ in range(6):
                await asyncio.to_thread(rotate, path, lambda first: True)
                segs = list_segments(path)
                if len(segs) > 1:  # drop the oldest, as a sweep would after exporting it
                    await asyncio.to_thread(
                        remove_segment, path, segs[0], segment_bounds(segs[0])[1]
                    )
                await asyncio.sleep(0)

        async def checker() -> None:
            for _ in range(15):
                results.append(await asyncio.to_thread(verify_log, path))
                await asyncio.sleep(0)

        await asyncio.gather(writer(), janitor(), checker())
    assert results and all(r.ok for r in results), [r.reason for r in results if not r.ok]
    final = verify_log(path)
    assert final.ok and final.head_seq == 63
