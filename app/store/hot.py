"""SQL programs for the ledger's hot paths (run by app/store/fastsql.py runners).

Each function is a generator: it yields statements, receives their results, and returns the
outcome; it performs no I/O itself, so one definition serves SQLite and PostgreSQL, and the
runner decides the transaction. The money rules are the same as in app/store/ledger.py: the
Idempotency-Key row is written in the same transaction as the work, and the budget reservation
is ONE conditional ``UPDATE … RETURNING`` (the old row's values on the right-hand side, in both
dialects), never read-then-write.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.errors import AppError
from app.store.fastsql import Json, Many, Program, Stmt
from app.store.ids import new_id


class CapRefused(Exception):
    """The reservation did not fit under a cap; the transaction is rolled back."""


class PastDue(Exception):
    """A paid cast for an account marked ``past_due`` (a payment failed): refused inside the
    accepting transaction, which is rolled back — the gate before it may have read the
    account before it was marked (#4)."""


@dataclass(frozen=True, slots=True)
class AuditRow:
    """An audit record's content, written to ``audit_outbox`` in the transaction of the
    state change it records; the drainer (app/store/audit_outbox.py) appends it to the file
    with ``ts`` = ``at`` and ``data.event_id`` = ``event_id`` (a fresh one unless given).
    In an SQLAlchemy session: ``AuditOutbox.of(row)`` (app/store/models.py)."""

    event: str
    at: datetime
    actor: str | None = None
    cast_id: str | None = None
    input_hash: str | None = None
    amount_cents: int | None = None
    currency: str | None = None
    traceparent: str | None = None
    data: Mapping[str, Any] | None = None
    event_id: str = field(default_factory=lambda: new_id("ev"))


_INSERT_AUDIT = (
    "INSERT INTO audit_outbox (event_id, event, actor, cast_id, input_hash, amount_cents,"
    " currency, traceparent, data, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def audit_stmt(row: AuditRow) -> Stmt:
    return Stmt(
        _INSERT_AUDIT,
        (
            row.event_id,
            row.event,
            row.actor,
            row.cast_id,
            row.input_hash,
            row.amount_cents,
            row.currency,
            row.traceparent,
            Json(dict(row.data or {})),
            row.at,
        ),
    )


#: builds a program's audit records from the cast row it changed (None: no records)
AuditOf = Callable[[dict[str, Any]], Sequence[AuditRow]]


@dataclass(frozen=True, slots=True)
class NewCast:
    id: str
    spell_id: str
    spell_version: str
    caster_id: str
    principal_id: str
    input_hash: str
    input: dict[str, Any]
    mode: str
    currency: str
    estimate_cents: int
    period: str
    traceparent: str | None
    created_at: datetime
    #: outbox subject of its run request (``run.<digest>`` / ``github.dispatch``), if queued
    subject: str | None
    #: a ``cast_targets`` row (GitHub origin / workflow target), column → value
    target: Mapping[str, Any] | None = None
    #: its ``cast.accepted`` audit record, written in the accepting transaction
    audit: AuditRow | None = None
    #: PostgreSQL: read the account's ``past_due`` under a share lock (SQLite has no
    #: ``FOR SHARE`` and needs none: its writer is alone)
    for_share: bool = False


@dataclass(frozen=True, slots=True)
class IdemKey:
    principal_id: str
    key: str
    request_hash: str
    status: int
    body: dict[str, Any]
    now: datetime
    expires_at: datetime


def idempotency_conflict() -> AppError:
    return AppError(
        "IDEMPOTENCY_CONFLICT",
        "this Idempotency-Key was used with a different request; "
        "send the same request to get the same answer, or use a new key",
    )


_INSERT_KEY = (
    "INSERT INTO idempotency_keys (principal_id, key, request_hash, response_status,"
    " response_body, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (principal_id, key) DO NOTHING"
)


def _key_args(k: IdemKey) -> tuple[Any, ...]:
    return (k.principal_id, k.key, k.request_hash, k.status, Json(k.body), k.now, k.expires_at)


def claim_key(k: IdemKey) -> Program[tuple[int, dict[str, Any]] | None]:
    """Take the key for this request. ``None``: taken, do the work; else the stored answer."""
    for _ in range(3):
        res = yield Stmt(_INSERT_KEY, _key_args(k))
        if res.rowcount == 1:
            return None
        # An expired key is free again: taken over by ONE conditional statement.
        res = yield Stmt(
            "UPDATE idempotency_keys SET request_hash = ?, response_status = ?,"
            " response_body = ?, created_at = ?, expires_at = ?"
            " WHERE principal_id = ? AND key = ? AND expires_at <= ?",
            (
                k.request_hash,
                k.status,
                Json(k.body),
                k.now,
                k.expires_at,
                k.principal_id,
                k.key,
                k.now,
            ),
        )
        if res.rowcount == 1:
            return None
        res = yield Stmt(
            "SELECT request_hash, response_status, response_body FROM idempotency_keys"
            " WHERE principal_id = ? AND key = ?",
            (k.principal_id, k.key),
            rows=True,
        )
        row = res.first()
        if row is None:
            continue  # swept between our statements: try again
        if row[0] != k.request_hash:
            raise idempotency_conflict()
        body = row[2]
        return int(row[1]), dict(json.loads(body) if isinstance(body, str) else body)
    raise AppError("CONFLICT", "this Idempotency-Key is busy; retry the request")


_RESERVE = (
    "UPDATE budgets SET"
    " period = CASE WHEN period < ? THEN ? ELSE period END,"
    " monthly_used_cents = CASE WHEN period < ? THEN 0 ELSE monthly_used_cents END,"
    " monthly_reserved_cents = CASE WHEN period < ? THEN 0 ELSE monthly_reserved_cents END + ?,"
    " total_reserved_cents = total_reserved_cents + ?,"
    " updated_at = ?"
    " WHERE account_id = ?"
    " AND (monthly_cap_cents IS NULL OR"
    " (CASE WHEN period < ? THEN 0 ELSE monthly_used_cents + monthly_reserved_cents END) + ?"
    " <= monthly_cap_cents)"
    " AND (total_cap_cents IS NULL OR total_used_cents + total_reserved_cents + ?"
    " <= total_cap_cents)"
    " RETURNING period"
)


def reserve(account_id: str, estimate: int, period: str, now: datetime) -> Program[str | None]:
    """Reserve ``estimate`` against both caps in one statement; the period it counts in."""
    res = yield Stmt(_RESERVE, _reserve_args(account_id, estimate, period, now), rows=True)
    row = res.first()
    return None if row is None else str(row[0])


_INSERT_CAST = (
    "INSERT INTO casts (id, spell_id, spell_version, caster_id, principal_id, input_hash, input,"
    " mode, status, currency, estimate_cents, cost_cents, reservation, reserved_period, attempt,"
    " event_seq, error_code, error_message, run_url, artifact_id, traceparent, region,"
    " created_at, started_at, lease_until, finished_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, NULL, ?, ?, 0, 1, NULL, NULL, NULL, NULL,"
    " ?, NULL, ?, NULL, NULL, NULL)"
)


def _reserve_args(account_id: str, estimate: int, period: str, now: datetime) -> tuple[Any, ...]:
    p = period
    return (p, p, p, p, estimate, estimate, now, account_id, p, estimate, estimate)


def _cast_writes(c: NewCast) -> list[Stmt]:
    """The unconditional rows of a new cast: cast, first event, outbox message, target, and
    the spell's counter (last: a popular spell's row lock is then held the shortest time)."""
    writes = [
        Stmt(
            _INSERT_CAST,
            (
                c.id,
                c.spell_id,
                c.spell_version,
                c.caster_id,
                c.principal_id,
                c.input_hash,
                Json(c.input),
                c.mode,
                c.currency,
                c.estimate_cents,
                "held" if c.estimate_cents > 0 else "none",
                c.period,
                c.traceparent,
                c.created_at,
            ),
        ),
        Stmt(
            "INSERT INTO cast_events (cast_id, seq, stage, data, created_at)"
            " VALUES (?, 1, 'queued', ?, ?)",
            (c.id, Json({"status": "queued"}), c.created_at),
        ),
    ]
    if c.subject is not None:
        writes.append(
            Stmt(
                "INSERT INTO outbox (subject, msg_id, payload, created_at, sent_at)"
                " VALUES (?, ?, ?, ?, NULL)",
                (
                    c.subject,
                    c.id,
                    Json({"cast_id": c.id, "traceparent": c.traceparent}),
                    c.created_at,
                ),
            )
        )
    if c.target is not None:
        cols = ["cast_id", *c.target]
        writes.append(
            Stmt(
                f"INSERT INTO cast_targets ({', '.join(cols)})"  # noqa: S608 - our column names
                f" VALUES ({', '.join('?' for _ in cols)})",
                (c.id, *c.target.values()),
            )
        )
    if c.audit is not None:
        writes.append(audit_stmt(c.audit))
    writes.append(Stmt("UPDATE spells SET cast_count = cast_count + 1 WHERE id = ?", (c.spell_id,)))
    return writes


_PAST_DUE = "SELECT past_due FROM billing_customers WHERE account_id = ?"


def accept_cast(c: NewCast, k: IdemKey) -> Program[tuple[int, dict[str, Any], bool]]:
    """Idempotency key, cast row, first event, outbox message, target and reservation — one
    transaction. Returns ``(status, body, replayed)``; raises :class:`CapRefused`."""
    stored = yield from claim_key(k)
    if stored is not None:
        return stored[0], stored[1], True
    if c.estimate_cents > 0:
        # SQLite: the writer is alone in its transaction. PostgreSQL (this path after a key
        # takeover): the row lock waits for a concurrent marking and reads its outcome.
        res = yield Stmt(
            _PAST_DUE + (" FOR SHARE" if c.for_share else ""), (c.caster_id,), rows=True
        )
        row = res.first()
        if row is not None and bool(row[0]):
            raise PastDue()
    yield Many(tuple(_cast_writes(c)))
    if c.estimate_cents > 0:
        period = yield from reserve(c.caster_id, c.estimate_cents, c.period, c.created_at)
        if period is None:
            raise CapRefused()
        if period != c.period:  # the stored month is newer than ours: count it there
            yield Stmt("UPDATE casts SET reserved_period = ? WHERE id = ?", (period, c.id))
    return k.status, k.body, False


class KeyTaken(Exception):
    """The Idempotency-Key already exists: roll back, then answer through :func:`accept_cast`."""


def accept_cast_one_statement(c: NewCast, k: IdemKey) -> Program[tuple[int, dict[str, Any], bool]]:
    """PostgreSQL's fast path of :func:`accept_cast`: the key, every row and the reservation in
    ONE statement of data-modifying CTEs (one round trip inside the transaction, not three).

    When the key turns out to exist (a replay, a conflict, an expired key) or the caps refuse,
    it raises and the runner rolls everything back; the caller then answers through the
    general :func:`accept_cast` (replay/409/takeover) or with 402.
    """
    held = c.estimate_cents > 0
    writes = _cast_writes(c)
    parts = [f"k AS ({_INSERT_KEY} RETURNING 1)"]
    parts += [f"w{i} AS ({w.sql})" for i, w in enumerate(writes)]
    args: list[Any] = [*_key_args(k)]
    for w in writes:
        args += w.args
    if held:
        parts.append(f"r AS ({_RESERVE})")
        args += _reserve_args(c.caster_id, c.estimate_cents, c.period, c.created_at)
        # #4: the account's past_due under a share lock — a marking in progress is waited
        # for and its outcome read; one that comes after waits for this commit, so the
        # cancellation sweep that follows it sees this cast
        parts.append(f"pd AS ({_PAST_DUE} FOR SHARE)")
        args.append(c.caster_id)
    tail = "(SELECT period FROM r), (SELECT bool_or(past_due) FROM pd)" if held else "NULL, NULL"
    res = yield Stmt(
        f"WITH {', '.join(parts)} SELECT (SELECT count(*) FROM k), {tail}",  # noqa: S608
        tuple(args),
        rows=True,
    )
    row = res.first()
    assert row is not None
    if int(row[0]) != 1:
        raise KeyTaken()
    if held:
        if row[2]:
            raise PastDue()
        if row[1] is None:
            raise CapRefused()
        if str(row[1]) != c.period:
            yield Stmt("UPDATE casts SET reserved_period = ? WHERE id = ?", (str(row[1]), c.id))
    return k.status, k.body, False


def accept_delivery(
    source: str,
    delivery_id: str,
    event: str,
    body: bytes,
    encoding: str | None,
    now: datetime,
) -> Program[bool]:
    """Store a webhook delivery (``body`` as app/store/bodies.py packed it, in ``encoding``)
    and its outbox message; False if seen before."""
    res = yield Stmt(
        "INSERT INTO webhook_deliveries (delivery_id, source, event, body, body_encoding,"
        " status, attempts, last_error, received_at, processed_at)"
        " VALUES (?, ?, ?, ?, ?, 'pending', 0, NULL, ?, NULL)"
        " ON CONFLICT (delivery_id) DO NOTHING",
        (delivery_id, source, event, body, encoding, now),
    )
    if res.rowcount != 1:
        return False
    yield Stmt(
        "INSERT INTO outbox (subject, msg_id, payload, created_at, sent_at)"
        " VALUES (?, ?, ?, ?, NULL)",
        (f"webhook.{source}", f"wh:{delivery_id}", Json({"delivery_id": delivery_id}), now),
    )
    return True


def accept_deliveries(
    source: str, deliveries: Sequence[tuple[str, str, bytes, str | None]], now: datetime
) -> Program[set[str]]:
    """:func:`accept_delivery` for a batch of ``(delivery_id, event, body, encoding)`` with
    distinct ids, in two multi-row statements: the same rows, deduped by the primary key in the
    INSERT itself. Returns the ids stored now (the others were seen before)."""
    if not deliveries:
        return set()
    # only placeholders are joined into the SQL; every value is a bound parameter
    rows_sql = ", ".join(["(?, ?, ?, ?, ?, 'pending', 0, NULL, ?, NULL)"] * len(deliveries))
    res = yield Stmt(
        "INSERT INTO webhook_deliveries (delivery_id, source, event, body, body_encoding,"  # noqa: S608
        f" status, attempts, last_error, received_at, processed_at) VALUES {rows_sql}"
        " ON CONFLICT (delivery_id) DO NOTHING RETURNING delivery_id",
        [v for d, e, b, c in deliveries for v in (d, source, e, b, c, now)],
        rows=True,
    )
    fresh = {str(r[0]) for r in res.rows}
    if fresh:
        subject = f"webhook.{source}"
        outbox_sql = ", ".join(["(?, ?, ?, ?, NULL)"] * len(fresh))
        yield Stmt(
            "INSERT INTO outbox (subject, msg_id, payload, created_at, sent_at)"  # noqa: S608
            f" VALUES {outbox_sql}",
            [
                v
                for d, _e, _b, _c in deliveries
                if d in fresh
                for v in (subject, f"wh:{d}", Json({"delivery_id": d}), now)
            ],
        )
    return fresh


def set_audit_head(log: str, seq: int, digest: str, now: datetime) -> Program[None]:
    """The audit log's head pointer moves forward only."""
    yield Stmt(
        "INSERT INTO audit_pointers (log, seq, hash, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (log) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,"
        " updated_at = excluded.updated_at WHERE audit_pointers.seq < excluded.seq",
        (log, seq, digest, now),
    )


# ---------------------------------------------------------------------------- runs

#: the columns of ``casts``, in the order the programs below return them
CAST_COLUMNS = (
    "id",
    "spell_id",
    "spell_version",
    "caster_id",
    "principal_id",
    "input_hash",
    "input",
    "mode",
    "status",
    "currency",
    "estimate_cents",
    "cost_cents",
    "reservation",
    "reserved_period",
    "attempt",
    "event_seq",
    "error_code",
    "error_message",
    "run_url",
    "artifact_id",
    "traceparent",
    "region",
    "created_at",
    "started_at",
    "lease_until",
    "finished_at",
)
_SELECT_CAST = f"SELECT {', '.join(CAST_COLUMNS)} FROM casts WHERE id = ?"  # noqa: S608
_TIMES = {"created_at", "started_at", "lease_until", "finished_at"}


def _time(value: Any) -> datetime | None:
    """A stored time as an aware UTC datetime (SQLite gives text, asyncpg a datetime)."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def cast_row(row: tuple[Any, ...]) -> dict[str, Any]:
    """A ``casts`` row (in :data:`CAST_COLUMNS` order) as model attributes."""
    out = dict(zip(CAST_COLUMNS, row, strict=True))
    for k in _TIMES:
        out[k] = _time(out[k])
    out["input"] = _json(out["input"])
    return out


def get_cast(cast_id: str) -> Program[dict[str, Any] | None]:
    res = yield Stmt(_SELECT_CAST, (cast_id,), rows=True)
    row = res.first()
    return None if row is None else cast_row(row)


def _event(cast_id: str, seq: int, stage: str, data: dict[str, Any], now: datetime) -> Stmt:
    return Stmt(
        "INSERT INTO cast_events (cast_id, seq, stage, data, created_at) VALUES (?, ?, ?, ?, ?)",
        (cast_id, seq, stage, Json(data), now),
    )


def claim(
    cast_id: str, now: datetime, lease_until: datetime, audit: AuditOf | None = None
) -> Program[dict[str, Any] | None]:
    """queued → running with the next attempt number, a lease and the ``running`` event
    (and the audit records ``audit`` makes of the claimed cast)."""
    res = yield Stmt(
        "UPDATE casts SET status = 'running', attempt = attempt + 1, started_at = ?,"
        " lease_until = ?, event_seq = event_seq + 1 WHERE id = ? AND status = 'queued'"
        " RETURNING event_seq",
        (now, lease_until, cast_id),
        rows=True,
    )
    row = res.first()
    if row is None:
        return None
    yield _event(cast_id, int(row[0]), "running", {"status": "running"}, now)
    cast = yield from get_cast(cast_id)
    if audit is not None and cast is not None:
        for rec in audit(cast):
            yield audit_stmt(rec)
    return cast


def append_events(
    cast_id: str, attempt: int, events: list[tuple[str, dict[str, Any]]], now: datetime
) -> Program[bool]:
    """Progress/log events of a live attempt; nothing (False) if it was superseded."""
    if not events:
        return True
    res = yield Stmt(
        "UPDATE casts SET event_seq = event_seq + ? WHERE id = ? AND attempt = ?"
        " AND status = 'running' RETURNING event_seq",
        (len(events), cast_id, attempt),
        rows=True,
    )
    row = res.first()
    if row is None:
        return False
    first = int(row[0]) - len(events) + 1
    for i, (stage, data) in enumerate(events):
        yield _event(cast_id, first + i, stage, data, now)
    return True


@dataclass(frozen=True, slots=True)
class NewArtifact:
    id: str
    location: str
    digest: str
    size_bytes: int
    created_at: datetime
    expires_at: datetime


def _close_reservation(
    cast: dict[str, Any],
    *,
    succeeded: bool,
    cost: int,
    billing: bool,
    now: datetime,
    usage: Mapping[str, int] | None = None,
) -> Program[None]:
    """Settle (success: the actual cost, capped at the estimate, moves into used) or release
    the cast's reservation — exactly once, guarded by ``reservation`` flipping from ``held``;
    queue GitHub feedback for casts that came from GitHub, and the Stripe charge job."""
    res = yield Stmt("SELECT source FROM cast_targets WHERE cast_id = ?", (cast["id"],), rows=True)
    src = res.first()
    if src is not None and src[0] in ("comment", "repository_dispatch"):
        yield Stmt(
            "INSERT INTO outbox (subject, msg_id, payload, created_at, sent_at)"
            " VALUES ('github.notify', ?, ?, ?, NULL) ON CONFLICT (msg_id) DO NOTHING",
            (f"notify:{cast['id']}:{cast['status']}", Json({"cast_id": cast["id"]}), now),
        )
    cost = min(cost, int(cast["estimate_cents"])) if succeeded else 0
    flipped = yield Stmt(
        "UPDATE casts SET reservation = ? WHERE id = ? AND reservation = 'held'",
        ("settled" if succeeded else "released", cast["id"]),
    )
    if flipped.rowcount == 1:
        est = int(cast["estimate_cents"])
        period = cast["reserved_period"]
        yield Stmt(
            "UPDATE budgets SET"
            " monthly_reserved_cents = monthly_reserved_cents"
            " - CASE WHEN period = ? THEN CAST(? AS BIGINT) ELSE 0 END,"
            " monthly_used_cents = monthly_used_cents"
            " + CASE WHEN period = ? THEN CAST(? AS BIGINT) ELSE 0 END,"
            " total_reserved_cents = total_reserved_cents - ?,"
            " total_used_cents = total_used_cents + ?, updated_at = ?"
            " WHERE account_id = ?",
            (period, est, period, cost, est, cost, now, cast["caster_id"]),
        )
    if succeeded and cost > 0:
        yield Stmt(
            "INSERT INTO billing_ledger (cast_id, account_id, kind, amount_cents, currency,"
            " method, refund_ref, idempotency_ref, created_at)"
            " VALUES (?, ?, 'charge', ?, ?, 'ledger', NULL, ?, ?)",
            (
                cast["id"],
                cast["caster_id"],
                cost,
                cast["currency"],
                f"cast:{cast['id']}:charge",
                now,
            ),
        )
        if billing:
            yield Stmt(
                "INSERT INTO outbox (subject, msg_id, payload, created_at, sent_at)"
                " VALUES ('billing.charge', ?, ?, ?, NULL) ON CONFLICT (msg_id) DO NOTHING",
                (
                    f"cast:{cast['id']}:charge",
                    Json({"cast_id": cast["id"], "traceparent": cast["traceparent"]}),
                    now,
                ),
            )
    if succeeded and billing and usage is not None:
        # a metered cast: its usage (meter quantities) for the metered-subscription job
        yield Stmt(
            "INSERT INTO outbox (subject, msg_id, payload, created_at, sent_at)"
            " VALUES ('billing.usage', ?, ?, ?, NULL) ON CONFLICT (msg_id) DO NOTHING",
            (
                f"cast:{cast['id']}:usage",
                Json({"cast_id": cast["id"], "usage": dict(usage)}),
                now,
            ),
        )


def finish(
    cast_id: str,
    attempt: int,
    *,
    succeeded: bool,
    cost_cents: int,
    error_code: str | None,
    error_message: str | None,
    artifact: NewArtifact | None,
    extra_event: dict[str, Any] | None,
    billing: bool,
    now: datetime,
    usage: Mapping[str, int] | None = None,
    audit: AuditOf | None = None,
) -> Program[dict[str, Any] | None]:
    """End a live attempt: status, artifact, settle/release, ledger line, final event (and
    the audit records ``audit`` makes of the ended cast)."""
    status = "succeeded" if succeeded else "failed"
    res = yield Stmt(
        "UPDATE casts SET status = ?, finished_at = ?, cost_cents = ?, error_code = ?,"
        " error_message = ?, artifact_id = ?, event_seq = event_seq + 1"
        " WHERE id = ? AND attempt = ? AND status = 'running' RETURNING event_seq",
        (
            status,
            now,
            cost_cents if succeeded else 0,
            error_code,
            error_message,
            artifact.id if artifact is not None else None,
            cast_id,
            attempt,
        ),
        rows=True,
    )
    row = res.first()
    if row is None:
        return None
    seq = int(row[0])
    cast = yield from get_cast(cast_id)
    assert cast is not None
    if artifact is not None:
        yield Stmt(
            "INSERT INTO artifacts (id, cast_id, location, digest, size_bytes, created_at,"
            " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                artifact.id,
                cast_id,
                artifact.location,
                artifact.digest,
                artifact.size_bytes,
                artifact.created_at,
                artifact.expires_at,
            ),
        )
    yield from _close_reservation(
        cast, succeeded=succeeded, cost=cost_cents, billing=billing, now=now, usage=usage
    )
    event: dict[str, Any] = {"status": status, **(extra_event or {})}
    if succeeded:
        event["cost_cents"] = cost_cents
    else:
        event["error"] = {"code": error_code, "message": error_message}
    yield _event(cast_id, seq, status, event, now)
    if audit is not None:
        for rec in audit(cast):
            yield audit_stmt(rec)
    return cast


def fail_unfinished(
    cast_id: str,
    *,
    error_code: str,
    error_message: str,
    billing: bool,
    now: datetime,
    audit: AuditOf | None = None,
) -> Program[dict[str, Any] | None]:
    """Fail a queued or stranded cast that cannot run; releases its reservation (and writes
    the audit records ``audit`` makes of the failed cast)."""
    res = yield Stmt(
        "UPDATE casts SET status = 'failed', finished_at = ?, cost_cents = 0, error_code = ?,"
        " error_message = ?, event_seq = event_seq + 1"
        " WHERE id = ? AND status IN ('queued', 'running') RETURNING event_seq",
        (now, error_code, error_message, cast_id),
        rows=True,
    )
    row = res.first()
    if row is None:
        return None
    cast = yield from get_cast(cast_id)
    assert cast is not None
    yield from _close_reservation(cast, succeeded=False, cost=0, billing=billing, now=now)
    yield _event(
        cast_id,
        int(row[0]),
        "failed",
        {"status": "failed", "error": {"code": error_code, "message": error_message}},
        now,
    )
    if audit is not None:
        for rec in audit(cast):
            yield audit_stmt(rec)
    return cast


def cancel_queued(
    cast_ids: Sequence[str], *, error_code: str, error_message: str, billing: bool, now: datetime
) -> Program[list[dict[str, Any]]]:
    """Fail the casts of ``cast_ids`` that are still queued (never started) — e.g. an account
    whose payment failed — in one transaction, releasing each reservation exactly once.
    A cast that started meanwhile is left to finish. Returns the casts cancelled."""
    done: list[dict[str, Any]] = []
    for cast_id in cast_ids:
        res = yield Stmt(
            "UPDATE casts SET status = 'failed', finished_at = ?, cost_cents = 0, error_code = ?,"
            " error_message = ?, event_seq = event_seq + 1"
            " WHERE id = ? AND status = 'queued' RETURNING event_seq",
            (now, error_code, error_message, cast_id),
            rows=True,
        )
        row = res.first()
        if row is None:
            continue
        cast = yield from get_cast(cast_id)
        assert cast is not None
        yield from _close_reservation(cast, succeeded=False, cost=0, billing=billing, now=now)
        yield _event(
            cast_id,
            int(row[0]),
            "failed",
            {"status": "failed", "error": {"code": error_code, "message": error_message}},
            now,
        )
        done.append(cast)
    return done


# ---------------------------------------------------------------------------- outbox


def unsent_outbox(limit: int) -> Program[list[tuple[int, str, str, dict[str, Any]]]]:
    res = yield Stmt(
        "SELECT id, subject, msg_id, payload FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT ?",
        (limit,),
        rows=True,
    )
    return [(int(r[0]), str(r[1]), str(r[2]), dict(_json(r[3]))) for r in res.rows]


def mark_sent(ids: list[int], now: datetime) -> Program[None]:
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        yield Stmt(
            f"UPDATE outbox SET sent_at = ? WHERE id IN ({', '.join('?' for _ in chunk)})",  # noqa: S608
            (now, *chunk),
        )


def events_after(
    cast_id: str, after: int, limit: int
) -> Program[list[tuple[int, int, str, dict[str, Any], datetime | None]]]:
    """A cast's events after ``after`` in order: (id, seq, stage, data, created_at)."""
    res = yield Stmt(
        "SELECT id, seq, stage, data, created_at FROM cast_events"
        " WHERE cast_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        (cast_id, after, limit),
        rows=True,
    )
    return [(int(r[0]), int(r[1]), str(r[2]), dict(_json(r[3])), _time(r[4])) for r in res.rows]


# ---------------------------------------------------------------------------- audit outbox

AUDIT_COLUMNS = (
    "id",
    "event_id",
    "event",
    "actor",
    "cast_id",
    "input_hash",
    "amount_cents",
    "currency",
    "traceparent",
    "data",
    "created_at",
)


def pending_audit(limit: int) -> Program[list[dict[str, Any]]]:
    """The oldest audit outbox rows (by id: the order their transactions took them)."""
    res = yield Stmt(
        f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_outbox ORDER BY id LIMIT ?",  # noqa: S608
        (limit,),
        rows=True,
    )
    out = []
    for r in res.rows:
        row = dict(zip(AUDIT_COLUMNS, r, strict=True))
        row["data"] = dict(_json(row["data"]) or {})
        row["created_at"] = _time(row["created_at"])
        out.append(row)
    return out


def audit_pending_of(event_ids: Sequence[str]) -> Program[set[str]]:
    """Which of ``event_ids`` are still in the audit outbox."""
    if not event_ids:
        return set()
    res = yield Stmt(
        "SELECT event_id FROM audit_outbox"  # noqa: S608 - placeholders only
        f" WHERE event_id IN ({', '.join('?' for _ in event_ids)})",
        tuple(event_ids),
        rows=True,
    )
    return {str(r[0]) for r in res.rows}


def delete_audit(ids: Sequence[int], event_ids: Sequence[str] = ()) -> Program[None]:
    """Drop drained rows: by id, and by event id (rows found in the file already)."""
    for col, values in (("id", list(ids)), ("event_id", list(event_ids))):
        for i in range(0, len(values), 500):
            chunk = values[i : i + 500]
            yield Stmt(
                f"DELETE FROM audit_outbox WHERE {col} IN ({', '.join('?' for _ in chunk)})",  # noqa: S608
                tuple(chunk),
            )
