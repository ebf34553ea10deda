"""The audit outbox drainer: audit records committed with their state change reach the file.

The hot paths (accept a cast, claim a run, finish it) write each audit record's *content* as an
``audit_outbox`` row in the transaction of the state change it records (app/store/hot.py
``AuditRow``). A crash after that commit cannot lose the record, and the request waits for the
database commit only, not for the audit file's fsync. This drainer — one per process that
writes (``spell serve``, ``spell worker``) — appends pending rows to the hash-chained file
(app/store/auditlog.py) in id order, then deletes them.

Exactly once into the file, across crashes and processes:

* every record carries its row's ``event_id`` (``data.event_id``, random, unique);
* drains are serialized by an exclusive ``flock`` on ``<stem>.drain.lock`` next to the log
  (the processes that share a log share its folder). Each drain, under that lock: read the
  oldest pending rows; find which of them are already in the file; append the others (one
  batch, one fsync); delete all of them in one transaction;
* so a crash between the append and the delete leaves rows whose records are at the very end
  of the file's outbox records — after every record of a completed drain (whose rows are
  deleted). The next drain walks the file back from its end, asking the database which event
  ids are still pending, until it meets one that is not: exactly the records a dead drainer
  wrote. Those rows are deleted without appending them again.

The record's ``ts`` is the row's time (the transaction's), not the time of the append.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from app.aio import wait_event
from app.domain.audit import PreparedRecord, prepare_record
from app.store import filelock as fcntl  # fcntl.flock, or a fail-closed stand-in (Windows)
from app.store import hot
from app.store.auditlog import AuditLog, tail_records
from app.store.fastsql import Runner

log = logging.getLogger("spell.audit")

#: rows per drain step (one file batch, one delete transaction)
BATCH = 500
#: at most this many records are read back from the end of the file per check
MAX_WALK = 200_000


def lock_path(audit_path: Path) -> Path:
    return audit_path.with_name(audit_path.stem + ".drain.lock")


def _newest_event_ids(audit_path: Path, want: int) -> list[str]:
    """The ``data.event_id`` of the newest ``want`` outbox records of the log, newest first."""
    out: list[str] = []
    for record in tail_records(audit_path, MAX_WALK, verify=False):
        data = record.get("data")
        event_id = data.get("event_id") if isinstance(data, dict) else None
        if isinstance(event_id, str):
            out.append(event_id)
            if len(out) >= want:
                break
    return out


def prepared(row: dict[str, Any]) -> PreparedRecord:
    """The record of an outbox row (its ``event_id`` in ``data``, its time as ``ts``)."""
    data = {**row["data"], "event_id": row["event_id"]}
    try:
        return prepare_record(
            event=row["event"],
            actor=row["actor"],
            cast_id=row["cast_id"],
            input_hash=row["input_hash"],
            amount_cents=None if row["amount_cents"] is None else int(row["amount_cents"]),
            currency=row["currency"],
            traceparent=row["traceparent"],
            data=data,
            at=row["created_at"],
        )
    except (TypeError, ValueError) as e:  # never let one bad row stop the outbox
        log.error("audit outbox row %s is not a valid record (%s)", row["event_id"], e)
        return prepare_record(
            event="audit.invalid_record",
            actor=row["actor"],
            cast_id=row["cast_id"],
            input_hash=None,
            amount_cents=None,
            currency=None,
            traceparent=row["traceparent"],
            data={"event_id": row["event_id"], "event": row["event"], "error": str(e)[:300]},
            at=row["created_at"],
        )


class AuditDrainer:
    """Appends the audit outbox to the audit log (see the module docstring)."""

    def __init__(self, runner: Runner, audit: AuditLog, *, every: float = 0.5) -> None:
        self.runner = runner
        self.audit = audit
        self.every = every
        self.lock_file = lock_path(audit.path)
        self._kick = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        #: records appended / rows found already in the file (a dead drainer's), this process
        self.appended = 0
        self.recovered = 0

    def kick(self) -> None:
        """New rows were committed: drain now rather than at the next poll."""
        self._kick.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-drainer")

    async def close(self, *, timeout: float = 10.0) -> None:
        """Stop the loop, then drain what is pending (waiting for another drainer's turn)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self.drain(wait=True), timeout)
        except Exception as e:  # the next drainer anywhere appends them
            log.warning("final audit drain failed: %s: %s", type(e).__name__, e)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                await self.drain()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("audit drain failed (retrying): %s: %s", type(e).__name__, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            await wait_event(self._kick, self.every)
            self._kick.clear()

    async def drain(self, *, wait: bool = False) -> int:
        """Drain until the outbox is empty; the number of rows done. When another drainer
        holds the turn, 0 at once (``wait=False``: it drains the rows too) or wait for it."""
        async with self._lock:
            fd = fcntl.try_lock(self.lock_file)
            while fd is None and wait:
                await asyncio.sleep(0.01)
                fd = fcntl.try_lock(self.lock_file)
            if fd is None:
                # another process is draining; look again soon (our rows may be newer than
                # the batch it read)
                asyncio.get_running_loop().call_later(0.05, self._kick.set)
                return 0
            try:
                total = 0
                while True:
                    done = await self._step()
                    total += done
                    if done < BATCH:
                        return total
            finally:
                fcntl.unlock(fd)

    async def _step(self) -> int:
        rows = await self.runner.run(lambda: hot.pending_audit(BATCH), atomic=False)
        if not rows:
            return 0
        written = await self._in_file()
        fresh = [r for r in rows if r["event_id"] not in written]
        if len(fresh) != len(rows):
            self.recovered += len(rows) - len(fresh)
            log.warning(
                "audit outbox: %d records were in the file already (a drainer stopped between "
                "its append and its delete); not appended again",
                len(rows) - len(fresh),
            )
        if fresh:
            await self.audit.append_prepared([prepared(r) for r in fresh])
            self.appended += len(fresh)
        ids = [int(r["id"]) for r in rows]
        # also rows a dead drainer wrote that this batch did not read (a lower id committed
        # since): they would sit behind this batch's records in the file, out of the walk
        found = sorted(written)
        await self.runner.run(lambda: hot.delete_audit(ids, found))
        return len(rows)

    async def _in_file(self) -> set[str]:
        """Event ids still pending whose records are in the file already (see the module
        docstring): the newest outbox records of the file while they are pending."""
        want = 16
        while True:
            newest = await asyncio.to_thread(_newest_event_ids, self.audit.path, want)
            if not newest:
                return set()
            pending = await self.runner.run(
                lambda ids=newest: hot.audit_pending_of(ids),  # type: ignore[misc]
                atomic=False,
            )
            if len(pending) < len(newest) or len(newest) < want:
                return pending
            want *= 4  # all pending: a dead drainer wrote more; look further back
