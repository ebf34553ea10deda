"""webhook bodies: ``body_encoding`` says how the platform stored ``body``

On SQLite the platform compresses raw webhook bodies itself (app/store/bodies.py) and says so in
the new column ``webhook_deliveries.body_encoding`` (``NULL``: raw, as every row stored before).
PostgreSQL keeps storing them raw and compressing them in TOAST (lz4 since 0007): compressing
them in the platform first measured no cheaper there (bench/README.md, session 5). Both
backends get the column, so every reader handles both kinds of row the same way.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 16:00:00.000000
"""

from collections.abc import Sequence

import lz4.frame
import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "webhook_deliveries", sa.Column("body_encoding", sa.String(length=16), nullable=True)
    )


#: compressed bodies written back raw per statement batch in a downgrade (bounded memory)
DOWNGRADE_BATCH = 200


def downgrade() -> None:
    bind = op.get_bind()
    # bodies the platform compressed are written back raw, so the older schema reads them
    # (decoded here, not with app code that may change after this revision)
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
                {"b": _raw(bytes(body), encoding), "d": delivery_id},
            )
        if len(rows) < DOWNGRADE_BATCH:
            break
        after = rows[-1][0]
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("body_encoding")


def _raw(body: bytes, encoding: str) -> bytes:
    if encoding != "lz4":
        raise RuntimeError(f"cannot downgrade a webhook body stored as {encoding!r}")
    raw: bytes = lz4.frame.decompress(body)
    return raw
