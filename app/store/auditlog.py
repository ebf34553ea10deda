"""The audit log file: append-only JSON lines, hash-chained, fsynced, with group commit.

Records are built by :mod:`app.domain.audit`; this module owns the file.

* ``append()`` queues a record and waits; one writer task takes *all* queued records, writes them
  and calls ``fsync`` once, then wakes every waiter. Under load, N concurrent appends cost far
  fewer than N fsyncs (see ``bench/audit_append.py``).
* The file is written under an exclusive ``flock``, so several processes sharing a data directory
  (``spell serve`` + ``spell worker``) extend one chain: after taking the lock, a writer whose view
  of the file size is stale re-reads the last line to learn the current ``seq``/``hash``.
* Disk I/O runs in a worker thread (``asyncio.to_thread``); the event loop never waits on fsync.
* Recovery: a torn last line (a crash or a failed ``write``, never acknowledged to a caller) is
  cut off when the log is next opened or written. Any other damage to the last line stops the
  writer (fail closed): run ``spell audit verify`` to find it. A failed ``fsync`` stops all
  further appends in this process (the kernel may have dropped the unsynced pages).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

from app.domain.audit import (
    GENESIS,
    PreparedRecord,
    VerifyResult,
    format_ts,
    parse_record,
    prepare_record,
    seal_record,
    serialize_record,
    verify_lines,
)

__all__ = ["AuditLog", "AuditLogCorrupt", "read_head", "verify_file"]

log = logging.getLogger(__name__)

_FIRST_CHUNK = 4096  # a record is a few hundred bytes; longer lines double the chunk
_MAX_CHUNK = 1 << 20

OnHead = Callable[[int, str], Awaitable[None]]


class AuditLogCorrupt(RuntimeError):
    """The last record of the file is not a valid record; nothing more is appended to it."""


@dataclass
class _Entry:
    prepared: PreparedRecord
    future: asyncio.Future[dict[str, Any]] = field(repr=False)


def _last_line(fd: int, size: int) -> tuple[int, bytes]:
    """``(offset, bytes)`` of the last line of the first ``size`` bytes (newline excluded).

    Reads backwards in chunks from the end, so the cost is the length of the last line.
    """
    end = size
    if end and os.pread(fd, 1, end - 1) == b"\n":
        end -= 1
    parts: list[bytes] = []
    pos = end
    chunk_size = _FIRST_CHUNK
    while pos > 0:
        start = max(0, pos - chunk_size)
        chunk_size = min(chunk_size * 2, _MAX_CHUNK)
        chunk = os.pread(fd, pos - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            parts.append(chunk[cut + 1 :])
            pos = start + cut + 1
            break
        parts.append(chunk)
        pos = start
    return pos, b"".join(reversed(parts))


def _head_of(fd: int, path: Path) -> tuple[int, str, int]:
    """``(seq, hash, size)`` of the file's last record; repairs a torn tail (caller holds the lock).

    A last line without its newline was cut short by a crash before fsync returned, so no caller
    was told it was written: it is removed (or, if it is a complete valid record, finished with
    its newline).
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, GENESIS, 0
    if os.pread(fd, 1, size - 1) != b"\n":
        offset, fragment = _last_line(fd, size)
        try:
            parse_record(fragment.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            log.warning(
                "audit log %s: removing a torn last line (%d bytes) left by an interrupted write",
                path,
                size - offset,
            )
            os.ftruncate(fd, offset)
            size = offset
        else:
            os.write(fd, b"\n")
            size += 1
        os.fsync(fd)
        if size == 0:
            return 0, GENESIS, 0
    _, line = _last_line(fd, size)
    try:
        record = parse_record(line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuditLogCorrupt(
            f"audit log {path}: the last line is not a valid record ({exc}); "
            "run `spell audit verify` before appending"
        ) from None
    return int(record["seq"]), str(record["hash"]), size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class AuditLog:
    """Append-only, hash-chained audit log in one JSONL file. Use from a single event loop."""

    def __init__(self, path: Path, *, on_head: OnHead | None = None) -> None:
        self.path = Path(path)
        self._on_head = on_head
        self._fd: int | None = None
        self._seq = 0
        self._hash = GENESIS
        self._size: int | None = None  # file size after our last write; None: re-read the tail
        self._pending: list[_Entry] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._broken: OSError | None = None  # set when fsync fails: no more appends
        self.fsync_count = 0  # fsyncs of appended records (for benchmarks and tests)
        self.batch_count = 0

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last record this process knows of."""
        return self._seq, self._hash

    async def start(self) -> None:
        if self._writer is not None or self._closing:
            raise RuntimeError("audit log already started")
        self._fd = await asyncio.to_thread(self._open)
        self._writer = asyncio.create_task(self._run(), name=f"audit-writer:{self.path.name}")

    async def close(self) -> None:
        """Write what is queued, then stop the writer and close the file."""
        if self._closing:
            return
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def append(
        self,
        event: str,
        *,
        actor: str | None = None,
        cast_id: str | None = None,
        input_hash: str | None = None,
        amount_cents: int | None = None,
        currency: str | None = None,
        traceparent: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one record; returns it once it is written and fsynced.

        Raises ``TypeError``/``ValueError`` for an invalid record (nothing is written), the
        ``OSError`` of a failed write (the record may or may not have reached the file), or
        ``RuntimeError`` if the log is not open. Cancelling the caller does not withdraw a record
        that is already queued.
        """
        if self._writer is None or self._closing:
            raise RuntimeError("audit log is not open")
        if self._broken is not None:
            raise RuntimeError(
                f"audit log {self.path} stopped after fsync failed ({self._broken}); "
                "restart the process and run `spell audit verify`"
            )
        # Validation and redaction happen here, so a bad record fails only its own caller.
        prepared = prepare_record(
            event=event,
            actor=actor,
            cast_id=cast_id,
            input_hash=input_hash,
            amount_cents=amount_cents,
            currency=currency,
            traceparent=traceparent,
            data=data or {},
        )
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        entry = _Entry(prepared, future)
        self._pending.append(entry)
        self._wakeup.set()
        return await future

    # -- writer ------------------------------------------------------------------------------

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if created:
                os.fchmod(fd, 0o600)
                dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            with _locked(fd):
                self._seq, self._hash, self._size = _head_of(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def _run(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                batch, self._pending = self._pending, []
                await self._commit(batch)
        finally:
            # Only reached with work left if the writer itself was cancelled: fail, never hang.
            self._closing = True
            _fail(self._pending, RuntimeError("audit log writer stopped"))
            self._pending = []

    async def _commit(self, batch: list[_Entry]) -> None:
        try:
            records = await asyncio.to_thread(self._write_batch, batch)
        except Exception as exc:
            # The records may or may not be in the file; the next batch re-reads the tail.
            log.exception("audit log %s: write failed for %d records", self.path, len(batch))
            _fail(batch, exc)
            return
        except BaseException:
            _fail(batch, RuntimeError("audit log writer stopped during a write"))
            raise
        for entry, record in zip(batch, records, strict=True):
            if not entry.future.done():
                entry.future.set_result(record)
        if self._on_head is not None:
            try:
                await self._on_head(self._seq, self._hash)
            except Exception:
                log.exception("audit log %s: on_head(%d) failed", self.path, self._seq)

    def _write_batch(self, batch: list[_Entry]) -> list[dict[str, Any]]:
        fd = self._fd
        if fd is None:
            raise RuntimeError("audit log is closed")
        if self._broken is not None:
            raise RuntimeError(f"audit log stopped after fsync failed ({self._broken})")
        with _locked(fd):
            if self._size is None or os.fstat(fd).st_size != self._size:
                # Another process appended (or our last write failed): learn the real head.
                self._size = None
                self._seq, self._hash, self._size = _head_of(fd, self.path)
            seq, prev = self._seq, self._hash
            records: list[dict[str, Any]] = []
            lines: list[str] = []
            for entry in batch:
                seq += 1
                record = seal_record(
                    entry.prepared, seq=seq, prev=prev, ts=format_ts(datetime.now(UTC))
                )
                prev = record["hash"]
                records.append(record)
                lines.append(serialize_record(record) + "\n")
            payload = "".join(lines).encode("utf-8")
            size = self._size
            self._size = None  # unknown until the write and fsync succeed
            _write_all(fd, payload)
            try:
                os.fsync(fd)
            except OSError as exc:
                # After a failed fsync the kernel may drop the dirty pages and report success
                # next time, so later records could chain onto lost ones. Stop, like PostgreSQL.
                self._broken = exc
                raise
            self.fsync_count += 1
            self.batch_count += 1
            self._seq, self._hash, self._size = seq, prev, size + len(payload)
        return records


def _fail(entries: list[_Entry], exc: BaseException) -> None:
    for entry in entries:
        if not entry.future.done():
            entry.future.set_exception(exc)


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _decoded_lines(handle: BinaryIO, size: int) -> Iterator[str]:
    left = size
    for raw in handle:
        if left <= 0:
            return
        chunk = raw[:left]
        left -= len(chunk)
        # Undecodable bytes become U+FFFD, which then fails the hash check for that line.
        yield chunk.decode("utf-8", errors="replace")


def verify_file(path: Path, *, expected_head: tuple[int, str] | None = None) -> VerifyResult:
    """Check a whole audit log file, streamed. A missing file is an empty log.

    Safe while writers are appending: the size is read under a shared ``flock`` (writers hold an
    exclusive one while writing), so only whole batches are checked.
    """
    try:
        handle = Path(path).open("rb")  # noqa: SIM115 - closed by the `with` below
    except FileNotFoundError:
        return verify_lines([], expected_head=expected_head)
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        try:
            size = os.fstat(handle.fileno()).st_size
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return verify_lines(_decoded_lines(handle, size), expected_head=expected_head)


def read_head(path: Path) -> tuple[int, str]:
    """``(seq, hash)`` of the last record in ``path`` (``(0, GENESIS)`` if empty)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, GENESIS
        _, line = _last_line(fd, size)
        record = parse_record(line.decode("utf-8"))
        return int(record["seq"]), str(record["hash"])
    finally:
        os.close(fd)
