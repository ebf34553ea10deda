"""The retention sweeper (SPEC §8): inputs after 24 h, artifacts after 7 days, audit after 30 days.

Runs every ``SPELL_RETENTION_INTERVAL`` seconds in ``spell worker`` and in ``spell serve`` (and
once from ``spell retention sweep``). One sweep at a time across every process: a PostgreSQL
advisory lock (``RetentionStore.exclusive``) plus a file lock in the data directory (the SQLite
case, and processes of one machine); a process that finds either taken skips its turn.

One sweep, in order (the policy lives in :mod:`app.domain.retention`):

1. **inputs** — finished casts' stored input (``input_hash`` stays), handled webhook deliveries'
   raw bodies, and input files a crashed run left in this process's run folders;
2. **artifacts** — the object is deleted from the artifact store, then the row is marked deleted
   with its URL expired, so the link answers 410 ``ARTIFACT_EXPIRED``;
3. **idempotency keys** past their expiry;
4. **audit** — the active audit file is closed into a segment once its first record is
   ``SPELL_RETENTION_AUDIT_SEGMENT`` old; a segment whose newest record is past
   ``SPELL_RETENTION_AUDIT`` is verified, **exported to the object store**
   (``audit/main/audit-<first>-<last>.jsonl``), anchored (ledger, then the anchor file) and only
   then deleted. Without an object store that can take exports nothing is deleted.

Each sweep that ran appends one ``retention.sweep`` audit record with its counts (no contents).
A dry run changes nothing (no audit record either) and reports what would go.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from aiohttp import web

from app.config import Settings
from app.domain.audit import parse_record, verify_lines
from app.domain.retention import (
    RetentionPolicy,
    Segment,
    SweepCounts,
    due_segments,
    export_key,
    parse_ts,
    rotation_due,
)
from app.services.ports import ArtifactStore, AuditSink, Clock
from app.store import filelock as fcntl  # fcntl.flock, or a fail-closed stand-in (Windows)
from app.store.auditlog import (
    ANCHOR_POINTER_SUFFIX,
    AuditLogCorrupt,
    SegmentFile,
    list_segments,
    read_anchor,
    remove_segment,
    rotate,
    segment_bounds,
)
from app.store.ledger import SqlLedger
from app.store.retention_store import RetentionStore

log = logging.getLogger("spell.retention")

EXPORT_CONTENT_TYPE = "application/x-ndjson"


@runtime_checkable
class ObjectExporter(Protocol):
    """The part of an artifact store that takes arbitrary files (audit segment exports)."""

    async def put_object(self, key: str, src: Path, *, content_type: str) -> str: ...


@dataclass(frozen=True)
class SweeperConfig:
    policy: RetentionPolicy
    #: the active audit log file (``SPELL_DATA_DIR/audit/audit.jsonl``)
    audit_path: Path
    #: the file lock that serialises sweeps of processes sharing this data directory
    lock_path: Path
    #: run folders (``<work>/runs``): staged ``input.json`` files live there
    staged_dirs: Sequence[Path] = ()
    #: more run folders, as glob patterns evaluated at each sweep (the private work folders of
    #: processes of this machine that were killed: ``/tmp/spell-work-<data dir>-<pid>/runs``)
    staged_globs: Sequence[str] = ()
    #: the ledger's name for the audit log (its head pointer; the anchor is ``<log>:anchor``)
    log_name: str = "main"


@dataclass
class SweepReport:
    """The outcome of :meth:`RetentionSweeper.sweep`."""

    ran: bool
    dry_run: bool
    counts: SweepCounts = field(default_factory=SweepCounts)
    #: why the sweep did not run (another sweeper held the lock)
    skipped: str | None = None


class RetentionSweeper:
    def __init__(
        self,
        *,
        store: RetentionStore,
        clock: Clock,
        artifacts: ArtifactStore,
        exporter: ObjectExporter | None,
        audit: AuditSink | None,
        config: SweeperConfig,
    ) -> None:
        self.store = store
        self.clock = clock
        self.artifacts = artifacts
        self.exporter = exporter
        self.audit = audit
        self.config = config
        self._warned_no_exporter = False

    # ------------------------------------------------------------------ scheduling

    async def run_forever(self, interval: float) -> None:
        """Sweep every ``interval`` seconds (the first after one interval), never raising."""
        while True:
            await asyncio.sleep(interval)
            try:
                report = await self.sweep()
                if report.ran and report.counts.removed:
                    log.info("retention sweep: %s", report.counts.as_dict())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention sweep failed")

    # ------------------------------------------------------------------ one sweep

    async def sweep(self, *, dry_run: bool = False) -> SweepReport:
        async with self._locks(dry_run) as skipped:
            if skipped is not None:
                # run folders are this process's own: they are cleaned even when another
                # process does the shared work
                counts = SweepCounts()
                counts.staged_inputs = await self._staged_inputs(self.clock.now(), dry_run)
                return SweepReport(False, dry_run, counts, skipped)
            counts = await self._sweep(dry_run)
        if not dry_run and self.audit is not None:
            await self.audit.append(
                "retention.sweep", actor="system:retention", data=counts.as_dict()
            )
        return SweepReport(True, dry_run, counts)

    @contextlib.asynccontextmanager
    async def _locks(self, dry_run: bool) -> AsyncIterator[str | None]:
        if dry_run:  # reads only
            yield None
            return
        fd = fcntl.try_lock(self.config.lock_path)  # never blocks: no thread to leave holding it
        if fd is None:
            yield "another process of this data directory is sweeping"
            return
        try:
            async with self.store.exclusive() as got:
                yield None if got else "another process is sweeping (database lock)"
        finally:
            fcntl.unlock(fd)

    async def _sweep(self, dry_run: bool) -> SweepCounts:
        policy = self.config.policy
        now = self.clock.now()
        counts = SweepCounts()
        inputs_cutoff = policy.inputs_cutoff(now)
        counts.inputs = await self.store.purge_inputs(inputs_cutoff, dry_run=dry_run)
        counts.inputs_held = await self.store.inputs_held(inputs_cutoff)
        if counts.inputs_held:
            log.warning(
                "%d unfinished casts are past the inputs retention period and keep their input "
                "until they finish",
                counts.inputs_held,
            )
        counts.delivery_bodies = await self.store.purge_delivery_bodies(
            inputs_cutoff, dry_run=dry_run
        )
        counts.staged_inputs = await self._staged_inputs(now, dry_run)
        await self._artifacts(now, counts, dry_run)
        counts.idempotency_keys = await self.store.purge_idempotency(now, dry_run=dry_run)
        await self._audit(now, counts, dry_run)
        return counts

    # ------------------------------------------------------------------ staged inputs

    async def _staged_inputs(self, now: datetime, dry_run: bool) -> int:
        """Input files left in run folders (``<runs>/<cast id>-<attempt>/input.json``) by a
        process that was killed: removed once ``inputs`` old and their cast has finished (a
        cast still running, here or in another process sharing the folder, keeps its file)."""
        cutoff = self.config.policy.inputs_cutoff(now).timestamp()
        found = await asyncio.to_thread(
            _staged_files, _run_dirs(self.config.staged_dirs, self.config.staged_globs), cutoff
        )
        if not found:
            return 0
        unfinished = await self.store.unfinished_casts({cast_id for cast_id, _ in found})
        doomed = [path for cast_id, path in found if cast_id not in unfinished]
        if not dry_run:
            await asyncio.to_thread(_unlink_all, doomed)
        return len(doomed)

    # ------------------------------------------------------------------ artifacts

    async def _artifacts(self, now: datetime, counts: SweepCounts, dry_run: bool) -> None:
        cutoff = self.config.policy.artifacts_cutoff(now)
        if dry_run:
            counts.artifacts = await self.store.count_due_artifacts(cutoff, now)
            return
        failed: set[str] = set()
        while True:
            batch = [
                (i, loc)
                for i, loc in await self.store.due_artifacts(
                    cutoff, now, limit=self.store.batch + len(failed)
                )
                if i not in failed
            ]
            if not batch:
                return
            for art_id, location in batch:
                try:
                    await self.artifacts.delete(location)
                except Exception as e:
                    failed.add(art_id)
                    counts.errors += 1
                    log.warning(
                        "retention: could not delete artifact %s (%s); retried next sweep",
                        art_id,
                        type(e).__name__,
                    )
                    continue
                if await self.store.mark_artifact_deleted(art_id, location, now):
                    counts.artifacts += 1

    # ------------------------------------------------------------------ audit

    async def _audit(self, now: datetime, counts: SweepCounts, dry_run: bool) -> None:
        policy = self.config.policy
        path = self.config.audit_path

        def should_rotate(first_ts: datetime) -> bool:
            return rotation_due(first_ts, now, policy)

        would_close: Segment | None = None  # a dry run: the active file it would close
        if dry_run:
            active = await asyncio.to_thread(_active_bounds, path)
            if active is not None and should_rotate(active[0]):
                counts.audit_segments_rotated = 1
                would_close = active[1]
        else:
            try:
                if await asyncio.to_thread(rotate, path, should_rotate) is not None:
                    counts.audit_segments_rotated = 1
            except (AuditLogCorrupt, ValueError, OSError) as e:
                counts.errors += 1
                log.error("retention: the active audit file was not closed: %s", e)
        anchor = await asyncio.to_thread(read_anchor, path)
        counts.audit_anchor_seq = anchor[0] if anchor else None
        segments: list[tuple[SegmentFile, Segment, str]] = []
        for seg in await asyncio.to_thread(list_segments, path):
            if anchor is not None and seg.last <= anchor[0]:
                if not dry_run:  # exported and anchored, but the unlink was cut short
                    await asyncio.to_thread(seg.path.unlink, missing_ok=True)
                continue
            try:
                newest, last_hash = await asyncio.to_thread(segment_bounds, seg)
            except (AuditLogCorrupt, ValueError, OSError) as e:
                counts.errors += 1  # it and everything after it wait (the chain stays whole)
                log.error("retention: audit segment %s is unreadable: %s", seg.path.name, e)
                break
            segments.append((seg, Segment(seg.first, seg.last, newest), last_hash))
        if dry_run:
            closed = [s for _, s, _ in segments] + ([would_close] if would_close else [])
            due = due_segments(closed, now, policy)
            counts.audit_segments = due
            counts.audit_records = sum(s.last - s.first + 1 for s in sorted(closed)[:due])
            return
        due = due_segments([s for _, s, _ in segments], now, policy)
        if due and self.exporter is None:
            if not self._warned_no_exporter:
                log.warning(
                    "retention: %d audit segments are past retention but the artifact store "
                    "cannot export them; they are kept",
                    due,
                )
                self._warned_no_exporter = True
            return
        for seg, _, last_hash in segments[:due]:
            assert self.exporter is not None
            ok, why = await asyncio.to_thread(_verify_segment, seg, anchor)
            if not ok:
                counts.errors += 1
                log.error(
                    "retention: audit segment %s failed verification (%s); it is kept",
                    seg.path.name,
                    why,
                )
                return
            key = export_key(self.config.log_name, seg.first, seg.last)
            try:
                await self.exporter.put_object(key, seg.path, content_type=EXPORT_CONTENT_TYPE)
            except Exception as e:  # kept until an export succeeds
                counts.errors += 1
                log.warning(
                    "retention: exporting audit segment %s failed (%s); it is kept",
                    seg.path.name,
                    type(e).__name__,
                )
                return
            # the ledger's anchor first: a forged anchor file can then never be ahead of it
            await self.store.set_audit_anchor(
                self.config.log_name + ANCHOR_POINTER_SUFFIX, seg.last, last_hash
            )
            await asyncio.to_thread(remove_segment, path, seg, last_hash)
            anchor = (seg.last, last_hash)
            counts.audit_segments += 1
            counts.audit_records += seg.last - seg.first + 1
            counts.audit_anchor_seq = seg.last


#: the process's sweeper, on the aiohttp app (tests and operators reach it there)
RETENTION = web.AppKey("retention", RetentionSweeper)


# ---------------------------------------------------------------------- blocking helpers


def _staged_files(dirs: Sequence[Path], cutoff: float) -> list[tuple[str, Path]]:
    """``(cast id, path)`` of ``<runs>/<cast>-<attempt>/input.json`` files last written at or
    before ``cutoff`` (a run removes its folder when it ends: these were left behind)."""
    found: list[tuple[str, Path]] = []
    for runs in dirs:
        try:
            entries = list(os.scandir(runs))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            cast_id, sep, attempt = entry.name.rpartition("-")
            if not sep or not attempt.isdigit() or not entry.is_dir(follow_symlinks=False):
                continue
            staged = Path(entry.path) / "input.json"
            try:
                st = staged.lstat()
            except FileNotFoundError:
                continue
            if st.st_mtime <= cutoff:
                found.append((cast_id, staged))
    return found


def _run_dirs(dirs: Sequence[Path], globs: Sequence[str]) -> list[Path]:
    """The run folders to look in, each once (a process's own may also match a glob)."""
    out: dict[Path, None] = {}
    for d in dirs:
        out.setdefault(d.resolve(), None)
    for pattern in globs:
        # the glob's last-but-one part varies (the pid): spell-work-<digest>-*/runs
        folder = Path(pattern)
        for work in folder.parent.parent.glob(folder.parent.name):
            out.setdefault((work / folder.name).resolve(), None)
    return list(out)


def _unlink_all(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _active_bounds(path: Path) -> tuple[datetime, Segment] | None:
    """The active file's first record's ts, and the segment it would become (a dry run)."""
    try:
        with path.open("rb") as fh:
            lines = [raw for raw in fh if raw.endswith(b"\n")]
    except FileNotFoundError:
        return None
    if not lines:
        return None
    first = parse_record(lines[0][:-1].decode("utf-8"))
    last = parse_record(lines[-1][:-1].decode("utf-8"))
    return parse_ts(str(first["ts"])), Segment(
        int(first["seq"]), int(last["seq"]), parse_ts(str(last["ts"]))
    )


def _verify_segment(seg: SegmentFile, anchor: tuple[int, str] | None) -> tuple[bool, str | None]:
    """A segment about to leave must chain onto the anchor and be intact end to end."""
    with seg.path.open("rb") as fh:
        lines = (raw.decode("utf-8", errors="replace") for raw in fh)
        result = verify_lines(lines, start=anchor)
    if result.ok and result.head_seq != seg.last:
        return False, f"ends at seq {result.head_seq}, not {seg.last}"
    return result.ok, result.reason


# ---------------------------------------------------------------------- wiring


def build_sweeper(
    settings: Settings,
    *,
    ledger: SqlLedger,
    clock: Clock,
    artifacts: ArtifactStore,
    export_to: object | None,
    audit: AuditSink | None,
    staged_dirs: Sequence[Path] = (),
) -> RetentionSweeper:
    """The sweeper of a process, from its settings: exports go to ``export_to`` (the object
    store when one is configured, else the local artifact folder) when it can take them."""
    policy = RetentionPolicy(
        inputs=settings.retention_inputs,
        artifacts=settings.retention_artifacts,
        audit=settings.retention_audit,
        audit_segment=settings.retention_audit_segment,
    )
    return RetentionSweeper(
        store=RetentionStore(ledger),
        clock=clock,
        artifacts=artifacts,
        exporter=export_to if isinstance(export_to, ObjectExporter) else None,
        audit=audit,
        config=SweeperConfig(
            policy=policy,
            audit_path=settings.data_dir / "audit" / "audit.jsonl",
            lock_path=settings.data_dir / "retention.lock",
            staged_dirs=(*staged_dirs, settings.data_dir.resolve() / "runs"),
            staged_globs=(str(_private_work_dirs(settings.data_dir) / "runs"),),
        ),
    )


def _private_work_dirs(data_dir: Path) -> Path:
    """The glob of the private work folders ``app.worker.runs.sandbox_work_dir`` makes for this
    data directory (root-started processes whose sandbox uid cannot reach the data dir)."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"spell-work-{digest}-*"
