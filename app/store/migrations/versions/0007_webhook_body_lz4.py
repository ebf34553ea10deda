"""webhook bodies: TOAST-compress the raw delivery body with lz4 on PostgreSQL

Most of PostgreSQL's CPU per stored 14 KiB webhook delivery is TOAST compressing ``body``
(pglz, the default: ~123 µs per row here; lz4: ~47 µs; see bench/README.md §5). Stripe events
are stored in the same table (``source = 'stripe'``); ``stripe_events`` keeps no raw body.

PostgreSQL only, and only when the server was built with lz4 (PostgreSQL ≥ 14: ``lz4`` is one
of ``default_toast_compression``'s allowed values); otherwise nothing changes and the server's
default compression stays. ``SET COMPRESSION`` is a catalog change: no table rewrite, rows
already stored keep their pglz compression, new rows use lz4. SQLite: nothing to do.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (table, column) holding raw webhook bodies
COLUMNS: tuple[tuple[str, str], ...] = (("webhook_deliveries", "body"),)


def _toast_compression(bind: sa.Connection) -> list[str]:
    """The compression methods this PostgreSQL server offers ([] before PostgreSQL 14)."""
    row = bind.execute(
        sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
    ).first()
    return list(row[0] or []) if row is not None else []


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or "lz4" not in _toast_compression(bind):
        return  # SQLite, PostgreSQL < 14 or built without lz4: the default compression stays
    for table, column in COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION lz4")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or not _toast_compression(bind):
        return
    for table, column in COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION DEFAULT")
