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
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.errors import AppError
from app.store.fastsql import Json, Program, Stmt


class CapRefused(Exception):
    """The reservation did not fit under a cap; the transaction is rolled back."""


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


def claim_key(k: IdemKey) -> Program[tuple[int, dict[str, Any]] | None]:
    """Take the key for this request. ``None``: taken, do the work; else the stored answer."""
    for _ in range(3):
        res = yield Stmt(
            "INSERT INTO idempotency_keys (principal_id, key, request_hash, response_status,"
            " response_body, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (principal_id, key) DO NOTHING",
            (k.principal_id, k.key, k.request_hash, k.status, Json(k.body), k.now, k.expires_at),
        )
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
    res = yield Stmt(
        _RESERVE,
        (
            period,
            period,
            period,
            period,
            estimate,
            estimate,
            now,
            account_id,
            period,
            estimate,
            estimate,
        ),
        rows=True,
    )
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


def accept_cast(c: NewCast, k: IdemKey) -> Program[tuple[int, dict[str, Any], bool]]:
    """Idempotency key, cast row, first event, outbox message, target and reservation — one
    transaction. Returns ``(status, body, replayed)``; raises :class:`CapRefused`."""
    stored = yield from claim_key(k)
    if stored is not None:
        return stored[0], stored[1], True
    held = c.estimate_cents > 0
    yield Stmt(
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
            "held" if held else "none",
            c.period,
            c.traceparent,
            c.created_at,
        ),
    )
    yield Stmt(
        "INSERT INTO cast_events (cast_id, seq, stage, data, created_at)"
        " VALUES (?, 1, 'queued', ?, ?)",
        (c.id, Json({"status": "queued"}), c.created_at),
    )
    if c.subject is not None:
        yield Stmt(
            "INSERT INTO outbox (subject, msg_id, payload, created_at, sent_at)"
            " VALUES (?, ?, ?, ?, NULL)",
            (c.subject, c.id, Json({"cast_id": c.id, "traceparent": c.traceparent}), c.created_at),
        )
    if c.target is not None:
        cols = ["cast_id", *c.target]
        yield Stmt(
            f"INSERT INTO cast_targets ({', '.join(cols)})"  # noqa: S608 - column names are ours
            f" VALUES ({', '.join('?' for _ in cols)})",
            (c.id, *c.target.values()),
        )
    # The two rows every cast of a hot account / popular spell touches come last, so their
    # locks (PostgreSQL) are held for as short a time as possible before COMMIT.
    yield Stmt(
        "UPDATE spells SET cast_count = cast_count + 1 WHERE id = ?",
        (c.spell_id,),
    )
    if held:
        period = yield from reserve(c.caster_id, c.estimate_cents, c.period, c.created_at)
        if period is None:
            raise CapRefused()
        if period != c.period:  # the stored month is newer than ours: count it there
            yield Stmt("UPDATE casts SET reserved_period = ? WHERE id = ?", (period, c.id))
    return k.status, k.body, False


def accept_delivery(
    source: str, delivery_id: str, event: str, body: bytes, now: datetime
) -> Program[bool]:
    """Store a raw webhook delivery and its outbox message; False if seen before."""
    res = yield Stmt(
        "INSERT INTO webhook_deliveries (delivery_id, source, event, body, status, attempts,"
        " last_error, received_at, processed_at) VALUES (?, ?, ?, ?, 'pending', 0, NULL, ?, NULL)"
        " ON CONFLICT (delivery_id) DO NOTHING",
        (delivery_id, source, event, body, now),
    )
    if res.rowcount != 1:
        return False
    yield Stmt(
        "INSERT INTO outbox (subject, msg_id, payload, created_at, sent_at)"
        " VALUES (?, ?, ?, ?, NULL)",
        (f"webhook.{source}", f"wh:{delivery_id}", Json({"delivery_id": delivery_id}), now),
    )
    return True


def set_audit_head(log: str, seq: int, digest: str, now: datetime) -> Program[None]:
    """The audit log's head pointer moves forward only."""
    yield Stmt(
        "INSERT INTO audit_pointers (log, seq, hash, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (log) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,"
        " updated_at = excluded.updated_at WHERE audit_pointers.seq < excluded.seq",
        (log, seq, digest, now),
    )
