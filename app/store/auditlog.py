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

Segments and retention (SPEC §8; the sweeper in ``app/worker/retention.py`` drives them):

* ``rotate()`` closes the active file: under its exclusive ``flock`` it is renamed to
  ``<stem>.segments/audit-<first seq>-<last seq>.jsonl`` (12-digit, zero-padded). The next append
  (in any process: a writer whose file was renamed notices after taking the lock and re-opens the
  path) starts a new active file, chained to the segment's last record.
* ``remove_segment()`` drops the oldest closed segment once it has been exported: it first
  writes the *anchor* ``<stem>.anchor.json`` = ``{"seq", "hash"}`` of the segment's last record,
  then unlinks the file. The retained chain then starts at ``anchor.seq + 1`` with
  ``prev == anchor.hash``; the same anchor is recorded in the ledger (``audit_pointers``, log
  ``main:anchor``) so a forged anchor file is caught too.
* ``verify_log()`` checks anchor → segments → active file as one chain and names the first bad
  line (global number, then the file and its own line number).
* Lock order: the active file's ``flock``, then the ``<stem>.lock`` file's (segment metadata:
  rotation and removal hold it exclusively, readers of the segment list share it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
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
from app.domain.retention import parse_segment_name, parse_ts, segment_name
from app.store import filelock as fcntl  # fcntl.flock, or a fail-closed stand-in (Windows)

__all__ = [
    "AuditLog",
    "AuditLogCorrupt",
    "SegmentFile",
    "anchor_path",
    "list_segments",
    "read_anchor",
    "read_head",
    "remove_segment",
    "rotate",
    "segment_bounds",
    "segments_dir",
    "tail_records",
    "verify_file",
    "verify_log",
]

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


def _head_of(fd: int, path: Path, *, meta_held: bool = False) -> tuple[int, str, int]:
    """``(seq, hash, size)`` of the file's last record; repairs a torn tail (caller holds the lock).

    A last line without its newline was cut short by a crash before fsync returned, so no caller
    was told it was written: it is removed (or, if it is a complete valid record, finished with
    its newline). An empty active file continues the chain of the newest closed segment (or the
    retention anchor): its head is theirs.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return (*_tail_before(path, meta_held=meta_held), 0)
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
            return (*_tail_before(path, meta_held=meta_held), 0)
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

    def __init__(
        self,
        path: Path,
        *,
        on_head: OnHead | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.path = Path(path)
        self._on_head = on_head
        #: the records' ``ts`` (the platform's clock, so retention and tests agree on ages)
        self._now: Callable[[], datetime] = now or (lambda: datetime.now(UTC))
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
        self._check_open()
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
        (future,) = self._enqueue([prepared])
        return await future

    async def append_prepared(self, records: list[PreparedRecord]) -> list[dict[str, Any]]:
        """Append records prepared by the caller (:func:`app.domain.audit.prepare_record`, e.g.
        with their own event time), queued together: one batch, one fsync when the writer is
        idle. Returns them as written; raises like :meth:`append`."""
        self._check_open()
        return list(await asyncio.gather(*self._enqueue(records)))

    def _check_open(self) -> None:
        if self._writer is None or self._closing:
            raise RuntimeError("audit log is not open")
        if self._broken is not None:
            raise RuntimeError(
                f"audit log {self.path} stopped after fsync failed ({self._broken}); "
                "restart the process and run `spell audit verify`"
            )

    def _enqueue(self, records: list[PreparedRecord]) -> list[asyncio.Future[dict[str, Any]]]:
        """Queue records for the writer (one batch when it is idle): the one path of
        :meth:`append` and :meth:`append_prepared`. Each future is the record as written and
        fsynced (or the write's error); cancelling one does not withdraw its record."""
        loop = asyncio.get_running_loop()
        entries = [_Entry(p, loop.create_future()) for p in records]
        self._pending.extend(entries)
        self._wakeup.set()
        return [e.future for e in entries]

    # -- writer ------------------------------------------------------------------------------

    def _open(self) -> int:
        fd = _open_active(self.path)
        try:
            fd, _ = _lock_current(fd, self.path)
            try:
                self._seq, self._hash, self._size = _head_of(fd, self.path)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            with contextlib.suppress(OSError):
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
        fd, reopened = _lock_current(fd, self.path)
        if reopened:  # the file was rotated into a segment: append to the new active file
            self._fd = fd
            self._size = None
        with _held(fd):
            if self._size is None or os.fstat(fd).st_size != self._size:
                # Another process appended (or our last write failed): learn the real head.
                self._size = None
                self._seq, self._hash, self._size = _head_of(fd, self.path)
            seq, prev = self._seq, self._hash
            records: list[dict[str, Any]] = []
            lines: list[str] = []
            for entry in batch:
                seq += 1
                ts = entry.prepared.ts or format_ts(self._now())
                record = seal_record(entry.prepared, seq=seq, prev=prev, ts=ts)
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


@contextlib.contextmanager
def _held(fd: int) -> Iterator[None]:
    """Release a lock already taken (by :func:`_lock_current`) when the block ends."""
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _open_active(path: Path) -> int:
    """Open (creating, 0600) the active file for appending."""
    fcntl.require_flock()  # UNAVAILABLE, before anything is created, where there is no flock
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if created:
        try:
            os.fchmod(fd, 0o600)
            _fsync_dir(path.parent)
        except BaseException:
            os.close(fd)
            raise
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _lock_current(
    fd: int, path: Path, *, create: bool = True, shared: bool = False
) -> tuple[int, bool]:
    """Lock ``fd``; if ``path`` no longer names its file (rotated), re-open ``path`` and retry.

    Returns ``(descriptor, reopened)``: the locked descriptor is ``fd`` itself, or a new one
    (which may reuse the number) after closing ``fd``; ``-1`` when ``path`` is gone and
    ``create`` is false.
    """
    op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    reopened = False
    while True:
        fcntl.flock(fd, op)
        if _same_file(fd, path):
            return fd, reopened
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        reopened = True
        if create:
            fd = _open_active(path)
        else:
            try:
                fd = os.open(path, (os.O_RDONLY if shared else os.O_RDWR) | os.O_CLOEXEC)
            except FileNotFoundError:
                return -1, True


# ---------------------------------------------------------------------------------------------
# Segments, the retention anchor, verification of the whole retained chain
# ---------------------------------------------------------------------------------------------

ANCHOR_POINTER_SUFFIX = ":anchor"  # the ledger pointer of a log's anchor: "main:anchor"


def segments_dir(path: Path) -> Path:
    """Where closed segments of the log ``path`` go: ``audit/audit.segments/``."""
    return path.with_name(path.stem + ".segments")


def anchor_path(path: Path) -> Path:
    return path.with_name(path.stem + ".anchor.json")


def _meta_lock_path(path: Path) -> Path:
    return path.with_name(path.stem + ".lock")


@contextlib.contextmanager
def _meta_lock(path: Path, *, exclusive: bool) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(_meta_lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass(frozen=True, order=True)
class SegmentFile:
    """A closed segment: records ``first``..``last`` in ``path`` (immutable once written)."""

    first: int
    last: int
    path: Path = field(compare=False)


def list_segments(path: Path) -> list[SegmentFile]:
    """The closed segments of the log ``path``, oldest first (files named otherwise ignored)."""
    folder = segments_dir(path)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        bounds = parse_segment_name(name)
        if bounds is not None:
            found.append(SegmentFile(bounds[0], bounds[1], folder / name))
    return sorted(found)


def read_anchor(path: Path) -> tuple[int, str] | None:
    """The retention anchor ``(seq, hash)`` of the log ``path``; None while nothing was removed."""
    try:
        raw = anchor_path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        seq, digest = data["seq"], data["hash"]
    except (ValueError, TypeError, KeyError):
        raise AuditLogCorrupt(f"{anchor_path(path)} is not a valid anchor") from None
    if (
        isinstance(seq, bool)
        or not isinstance(seq, int)
        or seq < 1
        or not isinstance(digest, str)
        or len(digest) != 64
        or digest.strip("0123456789abcdef")
    ):
        raise AuditLogCorrupt(f"{anchor_path(path)} is not a valid anchor")
    return seq, digest


def _record_at(file: Path, *, last: bool) -> dict[str, Any]:
    """The first or last record of a (closed, complete) file."""
    with file.open("rb") as fh:
        if last:
            _, line = _last_line(fh.fileno(), os.fstat(fh.fileno()).st_size)
        else:
            line = fh.readline().rstrip(b"\n")
    return parse_record(line.decode("utf-8"))


def segment_bounds(seg: SegmentFile) -> tuple[datetime, str]:
    """``(ts of its newest record, hash of its last record)`` of a closed segment."""
    record = _record_at(seg.path, last=True)
    if record["seq"] != seg.last:
        raise AuditLogCorrupt(f"{seg.path} ends at seq {record['seq']}, not {seg.last}")
    return parse_ts(str(record["ts"])), str(record["hash"])


def _tail_before(path: Path, *, meta_held: bool) -> tuple[int, str]:
    """Head of the chain before an empty active file: the newest segment's last record, else
    the anchor, else the genesis."""

    def read() -> tuple[int, str]:
        best = read_anchor(path) or (0, GENESIS)
        segments = list_segments(path)
        if segments and segments[-1].last > best[0]:
            return segments[-1].last, segment_bounds(segments[-1])[1]
        return best

    if not segments_dir(path).exists() and not anchor_path(path).exists():
        return 0, GENESIS  # never rotated (rotation makes the folder before any rename)
    if meta_held:
        return read()
    with _meta_lock(path, exclusive=False):
        return read()


def rotate(path: Path, should_rotate: Callable[[datetime], bool]) -> SegmentFile | None:
    """Close the active file into a segment if ``should_rotate(ts of its first record)``.

    Blocking (run it in a thread). Safe with writers in any process: it holds the active file's
    exclusive lock, so it never cuts a batch in half, and writers re-open the path afterwards.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    fd, _ = _lock_current(fd, path, create=False)
    if fd < 0:
        return None
    try:
        with _meta_lock(path, exclusive=True):
            if os.fstat(fd).st_size == 0:
                return None
            seq, _, size = _head_of(fd, path, meta_held=True)  # also repairs a torn tail
            if size == 0:
                return None
            with os.fdopen(os.dup(fd), "rb") as fh:
                first = parse_record(fh.readline().rstrip(b"\n").decode("utf-8"))
            if not should_rotate(parse_ts(str(first["ts"]))):
                return None
            folder = segments_dir(path)
            folder.mkdir(exist_ok=True, mode=0o700)
            dest = folder / segment_name(int(first["seq"]), seq)
            if dest.exists():
                raise AuditLogCorrupt(f"{dest} exists already; refusing to overwrite a segment")
            os.rename(path, dest)
            _fsync_dir(folder)
            _fsync_dir(path.parent)
            return SegmentFile(int(first["seq"]), seq, dest)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def remove_segment(path: Path, seg: SegmentFile, last_hash: str) -> None:
    """Drop the oldest segment (already exported): anchor first, then the file.

    A crash in between leaves a segment at or below the anchor, which :func:`verify_log` skips
    and the next sweep removes.
    """
    with _meta_lock(path, exclusive=True):
        current = read_anchor(path)
        if current is not None and current[0] > seg.last:
            raise AuditLogCorrupt(f"anchor seq {current[0]} is past segment {seg.path.name}")
        target = anchor_path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        body = json.dumps(
            {
                "log": path.name,
                "seq": seg.last,
                "hash": last_hash,
                "removed": segment_name(seg.first, seg.last),
                "updated_at": format_ts(datetime.now(UTC)),
            },
            sort_keys=True,
        )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, body.encode("utf-8") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(path.parent)
        seg.path.unlink(missing_ok=True)
        _fsync_dir(seg.path.parent)


@dataclass
class _Source:
    name: str
    handle: BinaryIO
    size: int
    start_line: int = 0  # global line number of its first line, set while streaming


def verify_log(
    path: Path,
    *,
    expected_head: tuple[int, str] | None = None,
    ledger_anchor: tuple[int, str] | None = None,
    ledger_checked: bool = False,
) -> VerifyResult:
    """Check the retained chain of the log ``path``: anchor → closed segments → active file.

    ``expected_head`` is the ledger's head pointer; ``ledger_anchor`` the ledger's copy of the
    retention anchor (``ledger_checked``: the ledger was read, so "no anchor" is a fact). Line
    numbers count the retained lines from the oldest; for a log with segments the reason also
    names the file and its own line. A snapshot: concurrent appends, rotations and removals
    neither block for long nor confuse it.
    """
    if not path.parent.exists():
        return verify_lines([], expected_head=expected_head)
    sources: list[_Source] = []
    active_fd = -1
    try:
        try:
            active_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            active_fd = -1
        if active_fd >= 0:
            active_fd, _ = _lock_current(active_fd, path, create=False, shared=True)
        try:
            with _meta_lock(path, exclusive=False):
                anchor = read_anchor(path)
                for seg in list_segments(path):
                    if anchor is not None and seg.last <= anchor[0]:
                        continue  # removed but for the unlink (a crash mid-removal)
                    try:
                        fh = seg.path.open("rb")
                    except FileNotFoundError:
                        continue
                    sources.append(
                        _Source(f"{seg.path.parent.name}/{seg.path.name}", fh, _size(fh))
                    )
                if active_fd >= 0:
                    size = os.fstat(active_fd).st_size
                    fh = os.fdopen(os.dup(active_fd), "rb")
                    sources.append(_Source(path.name, fh, size))
        finally:
            if active_fd >= 0:
                fcntl.flock(active_fd, fcntl.LOCK_UN)
                os.close(active_fd)
        problem = _anchor_problem(anchor, ledger_anchor, ledger_checked)
        if problem is not None:
            return VerifyResult(False, 0, 1, f"line 1: {problem}", None, None)
        checkpoints: dict[int, str] = {}
        if ledger_anchor is not None and (anchor is None or ledger_anchor[0] > anchor[0]):
            checkpoints[ledger_anchor[0]] = ledger_anchor[1]  # a removal was cut short
        result = verify_lines(
            _stream(sources),
            expected_head=expected_head,
            start=anchor,
            checkpoints=checkpoints,
        )
        if result.ok or result.first_bad_line is None or (len(sources) <= 1 and anchor is None):
            return result
        return _locate(result, sources)
    finally:
        for src in sources:
            src.handle.close()


def _size(fh: BinaryIO) -> int:
    return os.fstat(fh.fileno()).st_size


def _stream(sources: Iterable[_Source]) -> Iterator[str]:
    line = 0
    for src in sources:
        src.start_line = line + 1
        for text in _decoded_lines(src.handle, src.size):
            line += 1
            yield text


def _locate(result: VerifyResult, sources: list[_Source]) -> VerifyResult:
    """Add the file and its own line number to a failed result's reason."""
    bad = result.first_bad_line
    assert bad is not None
    where = sources[-1] if sources else None
    for src in sources:
        if src.start_line and src.start_line <= bad:
            where = src
    reason = result.reason or "invalid"
    prefix = f"line {bad}: "
    detail = reason[len(prefix) :] if reason.startswith(prefix) else reason
    if where is None:
        text = f"line {bad} (after the retention anchor): {detail}"
    else:
        own = bad - where.start_line + 1 if where.start_line else 1
        text = f"line {bad} ({where.name} line {own}): {detail}"
    return VerifyResult(False, result.lines, bad, text, result.head_seq, result.head_hash)


def _anchor_problem(
    anchor: tuple[int, str] | None,
    ledger_anchor: tuple[int, str] | None,
    ledger_checked: bool,
) -> str | None:
    if not ledger_checked:
        return None
    if ledger_anchor is None:
        if anchor is not None:
            return (
                f"the log has a retention anchor (seq {anchor[0]}) but the ledger recorded no "
                "removal (records were removed outside a retention sweep)"
            )
        return None
    if anchor is None:
        return None  # checked through the checkpoint: the removal had not reached the file
    if anchor[0] > ledger_anchor[0]:
        return (
            f"the retention anchor (seq {anchor[0]}) is past the ledger's (seq "
            f"{ledger_anchor[0]}): records were removed outside a retention sweep"
        )
    if anchor[0] == ledger_anchor[0] and anchor[1] != ledger_anchor[1]:
        return f"the retention anchor's hash differs from the ledger's for seq {anchor[0]}"
    return None


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
            return _tail_before(path, meta_held=False)
        _, line = _last_line(fd, size)
        record = parse_record(line.decode("utf-8"))
        return int(record["seq"]), str(record["hash"])
    finally:
        os.close(fd)


def tail_records(path: Path, limit: int, *, verify: bool = True) -> Iterator[dict[str, Any]]:
    """The newest records of the log ``path``, newest first: the active file's, then the
    closed segments' (newest segment first), at most ``limit``. A read-only snapshot (the
    size is taken under a shared ``flock``, so only whole batches are read); an unreadable
    line ends the walk (``verify=False``: lines are only parsed as JSON, not checked against
    their hash). The audit outbox drainer reads its last records' event ids here."""
    files: list[Path] = [path]
    files += [seg.path for seg in reversed(list_segments(path))]
    left = limit
    for file in files:
        try:
            fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                end = os.fstat(fd).st_size
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            torn = end > 0 and os.pread(fd, 1, end - 1) != b"\n"
            while end > 0 and left > 0:
                start, line = _last_line(fd, end)
                end = start
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                    record = parse_record(text) if verify else json.loads(text)
                    if not isinstance(record, dict):
                        raise ValueError("not a record")
                except (ValueError, UnicodeDecodeError):
                    if torn:  # an interrupted write, never acknowledged: cut off on next open
                        torn = False
                        continue
                    return
                torn = False
                left -= 1
                yield record
        finally:
            os.close(fd)
        if left <= 0:
            return
