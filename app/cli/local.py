"""The platform wired for local operator commands (``spell token issue``): no server, no worker.

These commands act on the data directory (or ``DATABASE_URL``) directly, the way ``spell serve``
does, so they work before any server runs and need no bearer token: whoever can read the data
directory is the operator.
"""

from __future__ import annotations

import contextlib
import fcntl
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
from app.store.auditlog import AuditLog, verify_file
from app.store.db import make_engine, upgrade
from app.store.ledger import SqlLedger

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


def verify_snapshot(path: Path, *, expected_head: tuple[int, str] | None) -> VerifyResult:
    """:func:`~app.store.auditlog.verify_file` on the log as it was at one instant.

    A server may be appending while we read: its writes happen under an exclusive ``flock``, so
    the size read under a shared lock ends on a whole record. Only those bytes are checked, and
    writers are held up for no longer than one ``fstat``.
    """
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
