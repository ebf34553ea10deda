"""Settlement's database work as bare-driver programs (app/store/fastsql.py), like the cast
hot path in app/store/hot.py.

Settling one cast used to be two ORM write transactions, two ORM reads and the lock dance of
``SELECT … FOR UPDATE`` — ~7-10 ms of the settling process's CPU (bench/README.md §6). Here it
is one program before the Stripe call (the account's row locked and read, the pending line,
the minimum-charge batch) and one conditional ``UPDATE`` after it; on SQLite both go through
the group-committing writer thread, on PostgreSQL through the asyncpg pool.

The money rules are the ones :class:`app.store.billing_store.BillingStore` documents, in SQL
both backends accept:

* the account's ``billing_customers`` row is the per-account lock. It is taken with an upsert
  that rewrites ``updated_at`` with its own value (``INSERT … ON CONFLICT DO UPDATE …
  RETURNING``): on PostgreSQL that row lock conflicts with the ORM's ``SELECT … FOR UPDATE``
  exactly as a ``FOR UPDATE`` would, and returns the row as committed by whoever held it; on
  SQLite every writer is serialized anyway (``BEGIN IMMEDIATE``, the writer thread);
* a line joins a charge with ``UPDATE … WHERE charge_id IS NULL`` under that lock, so no line
  is ever in two charges;
* a charge changes state with one conditional ``UPDATE``.

Values are stored exactly as the ORM columns store them (times through fastsql's adaptation,
booleans as the driver binds them), so ORM reads of these rows agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.domain.billing import plan_collection
from app.store import hot
from app.store.fastsql import Program, Stmt
from app.store.hot import _PAST_DUE, AuditRow, _time

#: the columns of ``billing_charges``, in the order the programs below return them
CHARGE_COLUMNS = (
    "id",
    "account_id",
    "kind",
    "currency",
    "amount_cents",
    "status",
    "attempt",
    "stripe_id",
    "failure_code",
    "refunded_cents",
    "last_event_created",
    "created_at",
    "updated_at",
)
_SELECT_CHARGE = f"SELECT {', '.join(CHARGE_COLUMNS)} FROM billing_charges WHERE id = ?"  # noqa: S608

#: what settlement needs of the account's ``billing_customers`` row (in this order in the SQL)
CUSTOMER_COLUMNS = (
    "account_id",
    "stripe_customer_id",
    "payment_method_id",
    "past_due",
    "past_due_reason",
    "subscription_status",
)


_LOCK_CUSTOMER = (
    "INSERT INTO billing_customers (account_id, payment_method_status, past_due,"
    " created_at, updated_at) VALUES (?, 'none', ?, ?, ?)"
    " ON CONFLICT (account_id) DO UPDATE SET updated_at = billing_customers.updated_at"
    " RETURNING account_id, stripe_customer_id, payment_method_id, past_due, past_due_reason,"
    " subscription_status"
)


def charge_row(row: tuple[Any, ...]) -> dict[str, Any]:
    """A ``billing_charges`` row (in :data:`CHARGE_COLUMNS` order) as model attributes."""
    out = dict(zip(CHARGE_COLUMNS, row, strict=True))
    out["created_at"] = _time(out["created_at"])
    out["updated_at"] = _time(out["updated_at"])
    return out


def _customer(row: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(CUSTOMER_COLUMNS, row, strict=True))
    out["past_due"] = bool(out["past_due"])  # SQLite gives 0/1
    return out


def lock_customer(account_id: str, now: datetime) -> Program[dict[str, Any]]:
    """The account's billing row, created if new, locked until the transaction ends."""
    res = yield Stmt(
        _LOCK_CUSTOMER,
        (account_id, False, now, now),
        rows=True,
    )
    row = res.first()
    assert row is not None
    return _customer(row)


def customer(account_id: str) -> Program[dict[str, Any] | None]:
    """The account's billing row (read only; one statement)."""
    res = yield Stmt(
        f"SELECT {', '.join(CUSTOMER_COLUMNS)} FROM billing_customers"  # noqa: S608
        " WHERE account_id = ?",
        (account_id,),
        rows=True,
    )
    row = res.first()
    return None if row is None else _customer(row)


@dataclass(frozen=True, slots=True)
class Pending:
    """What :func:`add_pending` found or did."""

    #: the charge the cast's line is in (new or earlier), None while below the minimum
    charge: dict[str, Any] | None
    #: the account's billing row as read under the lock
    customer: dict[str, Any]
    #: the casts whose lines the charge covers (only when this call created the charge)
    casts: tuple[str, ...] = ()
    #: True if this call created the charge (False: a redelivered job found it)
    created: bool = False


def add_pending(
    *,
    cast_id: str,
    account_id: str,
    amount_cents: int,
    currency: str,
    period: str,
    charge_id: str,
    now: datetime,
) -> Program[Pending]:
    """A settled cast's pending line and, when the account's open lines in that currency
    reach Stripe's minimum, ONE new charge (``charge_id``) claiming them all. Idempotent: a
    redelivered job gets the charge its line is in."""
    cust = yield from lock_customer(account_id, now)
    res = yield Stmt(
        "INSERT INTO billing_pending (cast_id, account_id, amount_cents, currency, period,"
        " charge_id, created_at) VALUES (?, ?, ?, ?, ?, NULL, ?)"
        " ON CONFLICT (cast_id) DO NOTHING",
        (cast_id, account_id, amount_cents, currency, period, now),
    )
    if res.rowcount != 1:  # a redelivery: the line exists; is it in a charge already?
        res = yield Stmt(
            "SELECT charge_id FROM billing_pending WHERE cast_id = ?", (cast_id,), rows=True
        )
        line = res.first()
        if line is not None and line[0] is not None:
            res = yield Stmt(_SELECT_CHARGE, (str(line[0]),), rows=True)
            row = res.first()
            assert row is not None
            return Pending(charge_row(row), cust)
    res = yield Stmt(
        "SELECT COALESCE(SUM(amount_cents), 0) FROM billing_pending"
        " WHERE account_id = ? AND currency = ? AND charge_id IS NULL",
        (account_id, currency),
        rows=True,
    )
    total = int(res.rows[0][0]) if res.rows else 0
    if plan_collection(total, currency, period_ended=False).action != "charge":
        return Pending(None, cust)
    charge: dict[str, Any] = {
        "id": charge_id,
        "account_id": account_id,
        "kind": "payment_intent",
        "currency": currency,
        "amount_cents": total,
        "status": "pending",
        "attempt": 1,
        "stripe_id": None,
        "failure_code": None,
        "refunded_cents": 0,
        "last_event_created": None,
        "created_at": now,
        "updated_at": now,
    }
    yield Stmt(
        f"INSERT INTO billing_charges ({', '.join(CHARGE_COLUMNS)})"  # noqa: S608
        f" VALUES ({', '.join('?' for _ in CHARGE_COLUMNS)})",
        tuple(charge[k] for k in CHARGE_COLUMNS),
    )
    res = yield Stmt(
        "UPDATE billing_pending SET charge_id = ?"
        " WHERE account_id = ? AND currency = ? AND charge_id IS NULL"
        " RETURNING cast_id, amount_cents",
        (charge_id, account_id, currency),
        rows=True,
    )
    claimed = sum(int(r[1]) for r in res.rows)
    if claimed != total:  # cannot happen under the lock; never let the charge disagree
        yield Stmt("UPDATE billing_charges SET amount_cents = ? WHERE id = ?", (claimed, charge_id))
        charge["amount_cents"] = claimed
    casts = tuple(sorted(str(r[0]) for r in res.rows))
    return Pending(charge, cust, casts, True)


def set_charge_state(
    charge_id: str,
    status: str,
    *,
    from_states: tuple[str, ...],
    now: datetime,
    stripe_id: str | None = None,
    failure_code: str | None = None,
    set_failure_code: bool = False,
    event_created: int | None = None,
    audit: Sequence[AuditRow] = (),
) -> Program[bool]:
    """Move a charge to ``status`` if it is in one of ``from_states``: one conditional
    ``UPDATE``, so of concurrent workers exactly one gets True — and only that one writes
    ``audit`` (the audit outbox, in the same transaction)."""
    sets = ["status = ?", "updated_at = ?"]
    args: list[Any] = [status, now]
    if stripe_id is not None:
        sets.append("stripe_id = ?")
        args.append(stripe_id)
    if set_failure_code:
        sets.append("failure_code = ?")
        args.append(failure_code)
    if event_created is not None:
        sets.append("last_event_created = ?")
        args.append(event_created)
    marks = ", ".join("?" for _ in from_states)
    res = yield Stmt(
        f"UPDATE billing_charges SET {', '.join(sets)}"  # noqa: S608
        f" WHERE id = ? AND status IN ({marks})",
        (*args, charge_id, *from_states),
    )
    if res.rowcount != 1:
        return False
    for row in audit:
        yield hot.audit_stmt(row)
    return True


#: builds the audit records of a failed payment from (charge changed, the casts cancelled);
#: written in the transaction that made those changes
FailureAudit = Callable[[bool, list[dict[str, Any]]], Sequence[AuditRow]]


def fail_charge(
    *,
    charge_id: str,
    account_id: str,
    code: str,
    stripe_id: str | None,
    now: datetime,
    error_message: str,
    error_code: str,
    billing: bool,
    for_share: bool,
    audit: FailureAudit,
) -> Program[tuple[bool, bool, list[dict[str, Any]]]]:
    """A charge's payment failed, after its account was marked past due (its own transaction,
    committed first: a cast accepted meanwhile is refused or visible to the sweep below). In
    ONE transaction: the charge ``failed`` (conditional, from ``pending``), the account's paid
    casts that have not started cancelled, and the audit records of both — so a crash cannot
    leave the charge failed without them (the charge is still ``pending`` and the job repeats).

    The account's row is read under a SHARE lock on PostgreSQL (``for_share``): a payment method
    saved concurrently (which retries *failed* charges under an exclusive lock of that row)
    commits either before — then the account is no longer past due and nothing is changed
    here — or after, and retries this charge. Share locks do not conflict with the cast path's
    own share lock of the row, so this never waits on an accepting cast while holding anything
    it needs. Returns (still past due, charge changed, the casts cancelled)."""
    res = yield Stmt(_PAST_DUE + (" FOR SHARE" if for_share else ""), (account_id,), rows=True)
    row = res.first()
    if row is None or not row[0]:
        return False, False, []
    changed = yield from set_charge_state(
        charge_id,
        "failed",
        from_states=("pending",),
        now=now,
        stripe_id=stripe_id,
        failure_code=code,
        set_failure_code=True,
    )
    ids = yield from queued_paid_casts(account_id)
    cancelled = yield from hot.cancel_queued(
        ids, error_code=error_code, error_message=error_message, billing=billing, now=now
    )
    for r in audit(changed, cancelled):
        yield hot.audit_stmt(r)
    return True, changed, cancelled


def queued_paid_casts(account_id: str) -> Program[list[str]]:
    """The account's paid casts that have not started (what a failed payment cancels)."""
    res = yield Stmt(
        "SELECT id FROM casts WHERE caster_id = ? AND status = 'queued' AND estimate_cents > 0"
        " ORDER BY created_at, id",
        (account_id,),
        rows=True,
    )
    return [str(r[0]) for r in res.rows]
