"""metered billing: Stripe meters and usage reported as meter events

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 07:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "billing_meters",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("event_name", sa.String(length=100), nullable=False),
        sa.Column("stripe_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_billing_meters")),
    )
    op.create_table(
        "billing_usage",
        sa.Column("identifier", sa.String(length=100), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("cast_id", sa.String(length=40), nullable=True),
        sa.Column("meter", sa.String(length=32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("timestamp", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("value >= 0", name=op.f("ck_billing_usage_value_nonneg")),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_billing_usage_account_id_accounts"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("identifier", name=op.f("pk_billing_usage")),
    )
    with op.batch_alter_table("billing_usage", schema=None) as batch_op:
        batch_op.create_index(
            "ix_billing_usage_account_status", ["account_id", "status"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_billing_usage_cast_id"), ["cast_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("billing_usage", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_billing_usage_cast_id"))
        batch_op.drop_index("ix_billing_usage_account_status")
    op.drop_table("billing_usage")
    op.drop_table("billing_meters")
