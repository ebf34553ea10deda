"""webhook bodies: stored lz4-compressed by the platform (``body_encoding``)

The platform compresses raw webhook bodies itself (app/store/bodies.py) and says so in the new
column ``webhook_deliveries.body_encoding`` (``NULL``: raw, as every row stored before).

PostgreSQL: a body compressed by the platform is not compressible again, so the column's
storage becomes EXTERNAL (never compressed by TOAST; moved out of line only when a row is too
big), and the table's ``toast_tuple_target`` becomes 8160 bytes, so a typical delivery (14 KiB
raw, ~3.3 KiB compressed) stays in the table's own page instead of being cut into TOAST
chunks. Both are catalog changes: no rewrite; rows stored before keep what they have. SQLite:
only the column.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: PostgreSQL's largest ``toast_tuple_target`` for 8 KiB pages
TOAST_TUPLE_TARGET = 8160


def upgrade() -> None:
    op.add_column(
        "webhook_deliveries", sa.Column("body_encoding", sa.String(length=16), nullable=True)
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE webhook_deliveries ALTER COLUMN body SET STORAGE EXTERNAL")
        op.execute(
            f"ALTER TABLE webhook_deliveries SET (toast_tuple_target = {TOAST_TUPLE_TARGET})"
        )


#: compressed bodies written back raw per statement batch in a downgrade (bounded memory)
DOWNGRADE_BATCH = 200


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # first, so the raw bodies written back below are TOAST-compressed again as before
        op.execute("ALTER TABLE webhook_deliveries RESET (toast_tuple_target)")
        op.execute("ALTER TABLE webhook_deliveries ALTER COLUMN body SET STORAGE EXTENDED")
    # bodies the platform compressed are written back raw, so the older schema reads them
    from app.store.bodies import unpack

    after = ""
    while True:
        rows = bind.execute(
            sa.text(
                "SELECT delivery_id, body, body_encoding FROM webhook_deliveries"
                " WHERE body_encoding IS NOT NULL AND delivery_id > :after"
                " ORDER BY delivery_id LIMIT :n"
            ),
            {"after": after, "n": DOWNGRADE_BATCH},
        ).fetchall()
        for delivery_id, body, encoding in rows:
            bind.execute(
                sa.text(
                    "UPDATE webhook_deliveries SET body = :b, body_encoding = NULL"
                    " WHERE delivery_id = :d"
                ),
                {"b": unpack(body, encoding), "d": delivery_id},
            )
        if len(rows) < DOWNGRADE_BATCH:
            break
        after = rows[-1][0]
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("body_encoding")
