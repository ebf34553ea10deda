"""The ledger schema (SPEC §14 plus what the platform needs). SQLAlchemy 2 typed models.

Money is integer cents + ISO currency; times are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from app.store.bodies import unpack

if TYPE_CHECKING:
    from app.store.hot import AuditRow

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on SQLite (which stores naive text) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger; use timezone-aware UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


TZ = UTCDateTime()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(TZ)


class Principal(Base):
    """Who acts: one per (account, role). Idempotency keys and rate limits are per principal."""

    __tablename__ = "principals"
    __table_args__ = (UniqueConstraint("account_id", "role"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(TZ)


class IssuedToken(Base):
    """Every bearer token issued (by id, never the token itself), so it can be revoked."""

    __tablename__ = "tokens"
    jti: Mapped[str] = mapped_column(String(40), primary_key=True)
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id", ondelete="CASCADE"))
    issued_at: Mapped[datetime] = mapped_column(TZ)
    expires_at: Mapped[datetime] = mapped_column(TZ)
    revoked_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)


class Spell(Base):
    __tablename__ = "spells"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    author_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    latest_version: Mapped[str] = mapped_column(String(64))
    visibility: Mapped[str] = mapped_column(String(16))
    tags: Mapped[list[Any]] = mapped_column(JSON)
    tags_text: Mapped[str] = mapped_column(String(600), default=",")
    mode: Mapped[str] = mapped_column(String(16))
    price_model: Mapped[str] = mapped_column(String(16))
    price_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), default="published")
    cast_count: Mapped[int] = mapped_column(BigInteger, default=0)
    published_at: Mapped[datetime] = mapped_column(TZ)
    updated_at: Mapped[datetime] = mapped_column(TZ)


class SpellVersion(Base):
    __tablename__ = "spell_versions"
    __table_args__ = (UniqueConstraint("spell_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    spell_id: Mapped[str] = mapped_column(ForeignKey("spells.id", ondelete="CASCADE"))
    version: Mapped[str] = mapped_column(String(64))
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    document_hash: Mapped[str] = mapped_column(String(80))
    bundle_digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    published_at: Mapped[datetime] = mapped_column(TZ)


class Bundle(Base):
    """Who uploaded which bundle: a spell may only reference bundles of its own account."""

    __tablename__ = "bundles"
    digest: Mapped[str] = mapped_column(String(80), primary_key=True)
    uploaded_by: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="RESTRICT"), primary_key=True
    )
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(TZ)


class Cast(Base):
    __tablename__ = "casts"
    __table_args__ = (
        Index("ix_casts_account_created", "caster_id", "created_at"),
        Index("ix_casts_status", "status"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    spell_id: Mapped[str] = mapped_column(ForeignKey("spells.id", ondelete="RESTRICT"))
    spell_version: Mapped[str] = mapped_column(String(64))
    caster_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="RESTRICT"))
    principal_id: Mapped[str] = mapped_column(String(40))
    input_hash: Mapped[str] = mapped_column(String(80))
    input: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    mode: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    currency: Mapped[str] = mapped_column(String(3))
    estimate_cents: Mapped[int] = mapped_column(BigInteger)
    cost_cents: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reservation: Mapped[str] = mapped_column(String(16))  # held | settled | released | none
    reserved_period: Mapped[str] = mapped_column(String(7))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    run_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    artifact_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    traceparent: Mapped[str | None] = mapped_column(String(55), nullable=True)
    region: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZ)
    started_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(TZ, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)


class CastEvent(Base):
    """Progress of a cast, in order; the SSE stream replays these (``id`` = ``seq``)."""

    __tablename__ = "cast_events"
    __table_args__ = (UniqueConstraint("cast_id", "seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cast_id: Mapped[str] = mapped_column(ForeignKey("casts.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(TZ)


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    cast_id: Mapped[str] = mapped_column(ForeignKey("casts.id", ondelete="CASCADE"))
    location: Mapped[str] = mapped_column(String(2000))
    digest: Mapped[str] = mapped_column(String(80))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(TZ)
    expires_at: Mapped[datetime] = mapped_column(TZ)


class LedgerLine(Base):
    """billing_ledger: one line per money movement (charge, refund, credit)."""

    __tablename__ = "billing_ledger"
    __table_args__ = (UniqueConstraint("idempotency_ref"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cast_id: Mapped[str | None] = mapped_column(
        ForeignKey("casts.id", ondelete="RESTRICT"), nullable=True
    )
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="RESTRICT"))
    kind: Mapped[str] = mapped_column(String(16))  # charge | refund | credit
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    method: Mapped[str] = mapped_column(String(32))  # ledger | stripe_pi | stripe_invoice | ...
    refund_ref: Mapped[str | None] = mapped_column(String(255), nullable=True)
    idempotency_ref: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(TZ)


class Budget(Base):
    """Budget caps and usage of one account. Reservations are single conditional UPDATEs."""

    __tablename__ = "budgets"
    __table_args__ = (
        CheckConstraint("monthly_used_cents >= 0", name="monthly_used_nonneg"),
        CheckConstraint("monthly_reserved_cents >= 0", name="monthly_reserved_nonneg"),
        CheckConstraint("total_used_cents >= 0", name="total_used_nonneg"),
        CheckConstraint("total_reserved_cents >= 0", name="total_reserved_nonneg"),
    )
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    monthly_cap_cents: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    total_cap_cents: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    period: Mapped[str] = mapped_column(String(7))
    monthly_used_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    monthly_reserved_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    total_used_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    total_reserved_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(TZ)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"
    principal_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(TZ)
    expires_at: Mapped[datetime] = mapped_column(TZ, index=True)


class Outbox(Base):
    """Messages to publish, written in the same transaction as the state they announce."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(255))
    msg_id: Mapped[str] = mapped_column(String(80), unique=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(TZ)
    sent_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True, index=True)


class AuditPointer(Base):
    """The head of the audit log (seq, hash): verify detects a truncated tail against it."""

    __tablename__ = "audit_pointers"
    log: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(TZ)


class AuditOutbox(Base):
    """An audit record written in the transaction of the state change it records; the audit
    drainer (app/store/audit_outbox.py) appends it to the audit log file, then deletes it."""

    __tablename__ = "audit_outbox"
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    #: carried into the record (``data.event_id``): how a drainer knows it is in the file
    event_id: Mapped[str] = mapped_column(String(40), unique=True)
    event: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str | None] = mapped_column(String(200), nullable=True)
    cast_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    input_hash: Mapped[str | None] = mapped_column(String(80), nullable=True)
    amount_cents: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    currency: Mapped[str | None] = mapped_column(String(3), nullable=True)
    traceparent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: the event time: the record's ``ts``
    created_at: Mapped[datetime] = mapped_column(TZ)

    @classmethod
    def of(cls, row: AuditRow) -> AuditOutbox:
        """The row of a record, to add to the session of the state change it records (the ORM
        twin of ``hot.audit_stmt``)."""
        return cls(
            event_id=row.event_id,
            event=row.event,
            actor=row.actor,
            cast_id=row.cast_id,
            input_hash=row.input_hash,
            amount_cents=row.amount_cents,
            currency=row.currency,
            traceparent=row.traceparent,
            data=dict(row.data or {}),
            created_at=row.at,
        )


class GitHubInstallation(Base):
    """An installation of the GitHub App (from ``installation`` webhooks)."""

    __tablename__ = "github_installations"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_login: Mapped[str] = mapped_column(String(100))
    account_type: Mapped[str] = mapped_column(String(20))
    repository_selection: Mapped[str] = mapped_column(String(10), default="selected")
    suspended_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZ)
    updated_at: Mapped[datetime] = mapped_column(TZ)


class GitHubRepo(Base):
    """The allow-list: repositories an installation granted (``installation_repositories``)."""

    __tablename__ = "github_repos"
    full_name: Mapped[str] = mapped_column(String(200), primary_key=True)  # lower-case owner/name
    installation_id: Mapped[int] = mapped_column(
        ForeignKey("github_installations.id", ondelete="CASCADE"), index=True
    )
    repo_id: Mapped[int] = mapped_column(BigInteger)
    private: Mapped[bool] = mapped_column(default=False)
    added_at: Mapped[datetime] = mapped_column(TZ)


class GitHubLink(Base):
    """Which platform account a GitHub user (commenter) or owner (repository_dispatch) acts as."""

    __tablename__ = "github_links"
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # user | owner
    login: Mapped[str] = mapped_column(String(100), primary_key=True)  # lower-case
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16), default="caster")
    created_at: Mapped[datetime] = mapped_column(TZ)


class WebhookDelivery(Base):
    """Every accepted webhook delivery, stored raw before anything is parsed (the inbox)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_status", "status", "received_at"),)
    delivery_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    source: Mapped[str] = mapped_column(String(16))  # github | stripe
    event: Mapped[str] = mapped_column(String(64))
    #: as stored: see ``body_encoding`` (app/store/bodies.py); :attr:`payload` is the raw body
    body: Mapped[bytes] = mapped_column(LargeBinary)
    body_encoding: Mapped[str | None] = mapped_column(String(16), nullable=True)  # None | lz4
    status: Mapped[str] = mapped_column(String(16))  # pending | done | ignored | failed | dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    received_at: Mapped[datetime] = mapped_column(TZ)
    processed_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)

    @property
    def payload(self) -> bytes:
        """The raw body, exactly as it was received (and its signature checked)."""
        return unpack(self.body, self.body_encoding)


class CastTarget(Base):
    """Where a cast came from and where it runs on GitHub (comment, check run, workflow run)."""

    __tablename__ = "cast_targets"
    __table_args__ = (Index("ix_cast_targets_run", "repo", "run_id"),)
    cast_id: Mapped[str] = mapped_column(
        ForeignKey("casts.id", ondelete="CASCADE"), primary_key=True
    )
    source: Mapped[str] = mapped_column(String(24))  # api | comment | repository_dispatch
    installation_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    repo: Mapped[str | None] = mapped_column(String(200), nullable=True)
    issue_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    comment_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    bot_comment_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    check_run_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    head_sha: Mapped[str | None] = mapped_column(String(40), nullable=True)
    workflow_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    run_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)


# ------------------------------------------------------------------ billing (Stripe, issue #4)


class BillingCustomer(Base):
    """An account's Stripe customer, its saved payment method and whether it owes money."""

    __tablename__ = "billing_customers"
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    stripe_customer_id: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    payment_method_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    payment_method_status: Mapped[str] = mapped_column(String(16), default="none")  # none|active
    past_due: Mapped[bool] = mapped_column(default=False)
    past_due_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    past_due_since: Mapped[datetime | None] = mapped_column(TZ, nullable=True)
    subscription_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    subscription_status: Mapped[str | None] = mapped_column(String(32), nullable=True)
    plan: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZ)
    updated_at: Mapped[datetime] = mapped_column(TZ)


class BillingCharge(Base):
    """One collection from Stripe (a PaymentIntent, or an invoice item at period end) covering
    one or more pending lines. ``id`` is the idempotency key of its first attempt."""

    __tablename__ = "billing_charges"
    __table_args__ = (Index("ix_billing_charges_account_status", "account_id", "status"),)
    id: Mapped[str] = mapped_column(String(160), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="RESTRICT"))
    kind: Mapped[str] = mapped_column(String(16))  # payment_intent | invoice_item
    currency: Mapped[str] = mapped_column(String(3))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(24))  # pending|succeeded|failed|invoiced|error
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    stripe_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    failure_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    refunded_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    last_event_created: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZ)
    updated_at: Mapped[datetime] = mapped_column(TZ)


class BillingPending(Base):
    """A settled cast's amount waiting to be collected (the minimum-charge rule batches them)."""

    __tablename__ = "billing_pending"
    __table_args__ = (
        Index("ix_billing_pending_open", "account_id", "currency", "charge_id"),
        CheckConstraint("amount_cents >= 0", name="amount_nonneg"),
    )
    cast_id: Mapped[str] = mapped_column(
        ForeignKey("casts.id", ondelete="RESTRICT"), primary_key=True
    )
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="RESTRICT"))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    period: Mapped[str] = mapped_column(String(7))
    charge_id: Mapped[str | None] = mapped_column(
        ForeignKey("billing_charges.id", ondelete="RESTRICT"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(TZ)


class StripeEvent(Base):
    """Every Stripe event handled (deduplicated by its id), with the object it was about and
    its ``created`` time: the out-of-order guard compares against it."""

    __tablename__ = "stripe_events"
    __table_args__ = (Index("ix_stripe_events_object", "object_id", "created"),)
    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    type: Mapped[str] = mapped_column(String(80))
    object_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    created: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))  # applied | stale | ignored
    processed_at: Mapped[datetime] = mapped_column(TZ)


class Entitlement(Base):
    """A one-time purchase (clone spells): created on ``checkout.session.completed``."""

    __tablename__ = "entitlements"
    __table_args__ = (Index("ix_entitlements_account_spell", "account_id", "spell_id"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    spell_id: Mapped[str] = mapped_column(String(128))
    checkout_session_id: Mapped[str] = mapped_column(String(255), unique=True)
    payment_intent_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))  # active | revoked
    license_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZ)
    revoked_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)


class BillingRefund(Base):
    """A refund or credit of (part of) a cast's charge; ``id`` is its idempotency key."""

    __tablename__ = "billing_refunds"
    id: Mapped[str] = mapped_column(String(160), primary_key=True)
    cast_id: Mapped[str] = mapped_column(ForeignKey("casts.id", ondelete="RESTRICT"), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="RESTRICT"))
    charge_id: Mapped[str | None] = mapped_column(String(160), nullable=True)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    method: Mapped[str] = mapped_column(String(24))  # stripe_refund|pending_credit|balance_credit
    reason: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # pending | succeeded | failed
    stripe_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZ)
    updated_at: Mapped[datetime] = mapped_column(TZ)


class BillingMeter(Base):
    """A Stripe Billing Meter the platform reports usage to (``casts``, ``compute_ms``,
    ``egress_mb``), created once (``spell billing meters ensure`` or at first use)."""

    __tablename__ = "billing_meters"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    event_name: Mapped[str] = mapped_column(String(100))
    stripe_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(TZ)


class BillingUsage(Base):
    """One usage quantity for a metered subscription, reported to Stripe as a meter event whose
    ``identifier`` is this row's key (``{cast_id}:{meter}`` for casts, ``{usage_id}:{meter}``
    for ``POST /v1/billing/usage``): Stripe dedupes on it, so a resend never counts twice."""

    __tablename__ = "billing_usage"
    __table_args__ = (
        Index("ix_billing_usage_account_status", "account_id", "status"),
        CheckConstraint("value >= 0", name="value_nonneg"),
    )
    identifier: Mapped[str] = mapped_column(String(100), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="RESTRICT"))
    cast_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    meter: Mapped[str] = mapped_column(String(32))  # casts | compute_ms | egress_mb
    value: Mapped[int] = mapped_column(BigInteger)
    #: the meter event's time (Unix seconds)
    timestamp: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))  # cast | manual
    status: Mapped[str] = mapped_column(String(16))  # pending | sent | ledger
    created_at: Mapped[datetime] = mapped_column(TZ)
    sent_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)


class OidcLink(Base):
    """Which repositories may sign in with a GitHub Actions OIDC token, and as what
    (``spell oidc allow``): ``pattern`` is a lower-case ``owner/repo`` or ``owner/*``."""

    __tablename__ = "oidc_links"
    pattern: Mapped[str] = mapped_column(String(200), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16), default="caster")
    created_at: Mapped[datetime] = mapped_column(TZ)
