"""The platform wired for local operator commands (``spell token issue``): no server, no worker.

These commands act on the data directory (or ``DATABASE_URL``) directly, the way ``spell serve``
does, so they work before any server runs and need no bearer token: whoever can read the data
directory is the operator.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.ext.asyncio import AsyncEngine

from app.artifacts.local import LocalArtifactStore
from app.config import Settings
from app.domain.audit import VerifyResult, verify_lines
from app.observability.metrics import Metrics
from app.services.events import EventHub
from app.services.platform import Platform, PlatformConfig
from app.services.ports import SystemClock
from app.store import filelock as fcntl  # fcntl.flock, or a fail-closed stand-in (Windows)
from app.store.auditlog import AuditLog, anchor_path, list_segments, verify_file, verify_log
from app.store.db import make_engine, upgrade
from app.store.ledger import SqlLedger
from app.worker.retention import SweepReport

AUDIT_LOG = "main"  # the ledger's pointer name for the audit log (as in app/web/app.py)


def audit_path(settings: Settings) -> Path:
    return settings.data_dir / "audit" / "audit.jsonl"


def sqlite_file(settings: Settings) -> Path | None:
    """The SQLite database file, or ``None`` for PostgreSQL / in-memory databases."""
    url = settings.sqlalchemy_url
    if not url.startswith("sqlite"):
        return None
    _, _, rest = url.partition(":///")
    path = rest.split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.asynccontextmanager
async def local_engine(settings: Settings, *, migrate: bool = True) -> AsyncIterator[AsyncEngine]:
    settings.ensure_data_dir()
    engine = make_engine(settings.sqlalchemy_url)
    try:
        if migrate:
            await upgrade(engine)
        yield engine
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def local_platform(settings: Settings) -> AsyncIterator[Platform]:
    """A :class:`~app.services.platform.Platform` on the local ledger and audit log.

    Service runs are never accepted through it (there is no worker); it is for operator use
    cases such as issuing tokens.
    """
    key = settings.signing_key()
    clock = SystemClock()
    async with local_engine(settings) as engine:
        ledger = SqlLedger(engine, clock, idempotency_ttl=settings.idempotency_ttl)
        audit = AuditLog(
            audit_path(settings),
            on_head=lambda seq, h: ledger.set_audit_head(AUDIT_LOG, seq, h),
        )
        await audit.start()
        try:
            yield Platform(
                config=PlatformConfig(
                    signing_key=key,
                    artifact_ttl=settings.artifact_ttl,
                    token_ttl=settings.token_ttl,
                    default_monthly_cap_cents=settings.default_monthly_cap_cents,
                    default_total_cap_cents=settings.default_total_cap_cents,
                ),
                ledger=ledger,
                audit=audit,
                artifacts=LocalArtifactStore(settings.data_dir / "artifacts"),
                clock=clock,
                hub=EventHub(),
                metrics=Metrics(),
                sandbox_ready=lambda: "local operator commands do not run spells",
                kick_outbox=lambda: None,
            )
        finally:
            await audit.close()
            await ledger.aclose()


async def read_audit_head(settings: Settings) -> tuple[int, str] | None:
    """The ledger's record of the audit log head, or ``None`` when there is no ledger yet.

    Never creates a database: a missing SQLite file means "no pointer".
    """
    db_file = sqlite_file(settings)
    if db_file is not None and not db_file.exists():
        return None
    async with local_engine(settings, migrate=False) as engine:
        return await SqlLedger(engine, SystemClock()).audit_head(AUDIT_LOG)


async def read_audit_anchor(settings: Settings) -> tuple[int, str] | None:
    """The ledger's copy of the audit retention anchor (``None``: nothing removed yet)."""
    db_file = sqlite_file(settings)
    if db_file is not None and not db_file.exists():
        return None
    async with local_engine(settings, migrate=False) as engine:
        return await SqlLedger(engine, SystemClock()).audit_head(AUDIT_LOG + ":anchor")


async def retention_sweep(settings: Settings, *, dry_run: bool) -> SweepReport:
    """One retention sweep on the local ledger, data dir and object store (``spell retention
    sweep``); a dry run changes nothing."""
    from app.artifacts import open_object_store, route_artifacts
    from app.worker.retention import build_sweeper

    clock = SystemClock()
    async with local_engine(settings) as engine:
        ledger = SqlLedger(engine, clock, idempotency_ttl=settings.idempotency_ttl)
        object_store = await open_object_store(settings, clock)
        local = LocalArtifactStore(settings.data_dir / "artifacts")
        audit = AuditLog(
            audit_path(settings),
            on_head=lambda seq, h: ledger.set_audit_head(AUDIT_LOG, seq, h),
        )
        await audit.start()
        try:
            sweeper = build_sweeper(
                settings,
                ledger=ledger,
                clock=clock,
                artifacts=route_artifacts(object_store or local, local=local, s3=object_store),
                export_to=object_store or local,
                audit=audit,
            )
            return await sweeper.sweep(dry_run=dry_run)
        finally:
            await audit.close()
            if object_store is not None:
                await object_store.aclose()
            await ledger.aclose()


def verify_snapshot(
    path: Path,
    *,
    expected_head: tuple[int, str] | None,
    ledger_anchor: tuple[int, str] | None = None,
    ledger_checked: bool = False,
) -> VerifyResult:
    """:func:`~app.store.auditlog.verify_file` on the log as it was at one instant.

    A server may be appending while we read: its writes happen under an exclusive ``flock``, so
    the size read under a shared lock ends on a whole record. Only those bytes are checked, and
    writers are held up for no longer than one ``fstat``. A log with closed segments or a
    retention anchor is checked as one chain from the anchor (:func:`verify_log`).
    """
    if ledger_anchor is not None or list_segments(path) or anchor_path(path).exists():
        return verify_log(
            path,
            expected_head=expected_head,
            ledger_anchor=ledger_anchor,
            ledger_checked=ledger_checked,
        )
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return verify_file(path, expected_head=expected_head)
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        try:
            size = os.fstat(fh.fileno()).st_size
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return verify_lines(_lines_upto(fh, size), expected_head=expected_head)


def _lines_upto(fh: BinaryIO, size: int) -> Iterator[str]:
    left = size
    for raw in fh:
        if left <= 0:
            return
        chunk = raw[:left]
        left -= len(chunk)
        # Undecodable bytes become U+FFFD and then fail that line's hash (as verify_file does).
        yield chunk.decode("utf-8", errors="replace")
