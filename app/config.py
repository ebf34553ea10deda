"""Settings: the only module that reads environment variables.

Every knob of the platform is here, with its environment variable and its default. The README's
configuration reference is generated from the same names, so keep the descriptions accurate.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server-side settings (``spell serve``, ``spell worker`` and local operator commands)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    data_dir: Path = Field(
        default=Path(".spell"),
        validation_alias="SPELL_DATA_DIR",
        description="Folder for the SQLite ledger, spell bundles, artifacts and the audit log.",
    )
    database_url: str | None = Field(
        default=None,
        validation_alias="DATABASE_URL",
        description="PostgreSQL URL (postgresql://user@host/db). Unset: SQLite in the data dir.",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        validation_alias="SPELL_SECRET_KEY",
        description="Key signing tokens and artifact URLs; generated into the data dir if unset.",
    )
    artifact_ttl: int = Field(
        default=7 * 24 * 3600,
        ge=1,
        validation_alias="SPELL_ARTIFACT_TTL",
        description="Seconds an artifact URL stays valid (and the artifact is kept).",
    )
    token_ttl: int = Field(
        default=3600,
        ge=1,
        validation_alias="SPELL_TOKEN_TTL",
        description="Default lifetime of issued bearer tokens, in seconds.",
    )
    public_url: str | None = Field(
        default=None,
        validation_alias="SPELL_PUBLIC_URL",
        description="Base URL clients use to reach this server (for progress and artifact URLs).",
    )
    rate_limit_burst: int = Field(
        default=120,
        ge=1,
        validation_alias="SPELL_RATE_LIMIT_BURST",
        description="Token-bucket capacity per principal (requests).",
    )
    rate_limit_per_sec: float = Field(
        default=20.0,
        gt=0,
        validation_alias="SPELL_RATE_LIMIT_PER_SEC",
        description="Token-bucket refill rate per principal (requests per second).",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        validation_alias="SPELL_MAX_BODY_BYTES",
        description="Largest JSON request body accepted.",
    )
    max_bundle_bytes: int = Field(
        default=50 * 1024 * 1024,
        ge=1024,
        validation_alias="SPELL_MAX_BUNDLE_BYTES",
        description="Largest spell bundle (tar.gz) accepted by POST /v1/bundles.",
    )
    max_output_bytes: int = Field(
        default=100 * 1024 * 1024,
        ge=1024,
        validation_alias="SPELL_MAX_OUTPUT_BYTES",
        description="Largest total output a service run may write to SPELL_OUT.",
    )
    default_monthly_cap_cents: int | None = Field(
        default=10_000,
        ge=0,
        validation_alias="SPELL_DEFAULT_MONTHLY_CAP_CENTS",
        description="Monthly budget cap given to new accounts (cents); empty for none.",
    )
    default_total_cap_cents: int | None = Field(
        default=None,
        ge=0,
        validation_alias="SPELL_DEFAULT_TOTAL_CAP_CENTS",
        description="Total budget cap given to new accounts (cents); empty for none.",
    )
    workers: int = Field(
        default=2,
        ge=0,
        le=64,
        validation_alias="SPELL_WORKERS",
        description="Concurrent sandboxed runs in one process (`spell serve`'s embedded worker, "
        "and the default of `spell worker --concurrency`); 0: `spell serve` runs no casts.",
    )
    serve_runs: bool | None = Field(
        default=None,
        validation_alias="SPELL_SERVE_RUNS",
        description="Whether `spell serve` runs casts itself. Unset: yes without NATS_URL, no with "
        "it (casts are run by `spell worker` processes).",
    )
    unsafe_no_sandbox: bool = Field(
        default=False,
        validation_alias="SPELL_UNSAFE_NO_SANDBOX",
        description="Run service spells WITHOUT bubblewrap. Local development only; logged loudly.",
    )
    sandbox_uid: int = Field(
        default=65534,
        validation_alias="SPELL_SANDBOX_UID",
        description="Unprivileged host uid/gid the sandbox drops to when started as root.",
    )
    sandbox_uid_pool: str = Field(
        default="",
        validation_alias="SPELL_SANDBOX_UID_POOL",
        description="Host uids for concurrent sandboxes, e.g. 200000-200063 (one per run).",
        pattern=r"^(\d+-\d+)?$",
    )
    db_hot_pool: int = Field(
        default=4,
        ge=1,
        le=256,
        validation_alias="SPELL_DB_HOT_POOL",
        description="PostgreSQL connections per process for the ledger's hot paths (casts, "
        "runs, webhook inbox), all opened at start-up; about 2 per database CPU core.",
    )
    sandbox_warm: int = Field(
        default=2,
        ge=0,
        le=64,
        validation_alias="SPELL_SANDBOX_WARM",
        description="Single-use sandboxes kept pre-spawned, so runs skip the bubblewrap start-up "
        "(0: every run starts cold).",
    )
    proxy_max_bytes: int = Field(
        default=100 * 1024 * 1024,
        ge=1,
        le=1 << 40,
        validation_alias="SPELL_PROXY_MAX_BYTES",
        description="Bytes (both directions, all tunnels) one run may move through the network "
        "allow-list proxy before its tunnels are closed.",
    )
    run_lease_sec: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        validation_alias="SPELL_RUN_LEASE_SEC",
        description="A running cast's lease; a worker renews it every third of it, else the run "
        "is queued again.",
    )
    log_level: str = Field(default="INFO", validation_alias="SPELL_LOG_LEVEL")

    # --- NATS JetStream (off until NATS_URL is set: the in-process queue) ---------------------
    nats_url: str | None = Field(
        default=None,
        validation_alias="NATS_URL",
        description="NATS server(s) with JetStream, e.g. nats://127.0.0.1:4222 (comma-separated "
        "for a cluster). Unset: the in-process queue (one process).",
    )
    nats_creds: Path | None = Field(
        default=None,
        validation_alias="NATS_CREDS",
        description="NATS credentials file (.creds: user JWT + NKey seed).",
    )
    nats_namespace: str = Field(
        default="",
        pattern=r"^[a-z0-9_]{0,32}$",
        validation_alias="SPELL_NATS_NAMESPACE",
        description="Prefix of stream names and subjects, so several platforms share one NATS.",
    )
    max_deliver: int = Field(
        default=5,
        ge=1,
        le=100,
        validation_alias="SPELL_MAX_DELIVER",
        description="Deliveries of a run request before it is dead-lettered and its cast fails.",
    )

    # --- S3-compatible artifact store (off until SPELL_ARTIFACTS_URL is set: local folder) ---
    artifacts_url: str | None = Field(
        default=None,
        validation_alias="SPELL_ARTIFACTS_URL",
        pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$",
        description="Object store for artifacts: s3://BUCKET/PREFIX (AWS S3, Cloudflare R2, "
        "MinIO; see AWS_ENDPOINT_URL). Unset: the data dir's artifacts folder.",
    )
    aws_access_key_id: SecretStr | None = Field(
        default=None,
        validation_alias="AWS_ACCESS_KEY_ID",
        description="Object store access key id. Unset: the AWS default chain (role, ~/.aws).",
    )
    aws_secret_access_key: SecretStr | None = Field(
        default=None,
        validation_alias="AWS_SECRET_ACCESS_KEY",
        description="Object store secret access key.",
    )
    aws_session_token: SecretStr | None = Field(
        default=None,
        validation_alias="AWS_SESSION_TOKEN",
        description="Session token of temporary (STS) credentials.",
    )
    aws_region: str | None = Field(
        default=None,
        validation_alias="AWS_REGION",
        description="Bucket region (R2: auto). Unset: AWS_DEFAULT_REGION, else us-east-1.",
    )
    aws_default_region: str | None = Field(
        default=None,
        validation_alias="AWS_DEFAULT_REGION",
        description="Bucket region when AWS_REGION is unset.",
    )
    aws_endpoint_url: str | None = Field(
        default=None,
        validation_alias="AWS_ENDPOINT_URL",
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="S3-compatible endpoint, e.g. https://ACCOUNT.r2.cloudflarestorage.com or "
        "http://minio:9000. Unset: AWS S3. Clients download from it (presigned URLs).",
    )
    artifacts_sse: str = Field(
        default="AES256",
        pattern=r"^(AES256|aws:kms|off)$",
        validation_alias="SPELL_ARTIFACTS_SSE",
        description="Server-side encryption requested on upload: AES256, aws:kms (with "
        "SPELL_ARTIFACTS_KMS_KEY_ID) or off (servers that encrypt anyway or cannot).",
    )
    artifacts_kms_key_id: str | None = Field(
        default=None,
        validation_alias="SPELL_ARTIFACTS_KMS_KEY_ID",
        description="KMS key id/ARN for SPELL_ARTIFACTS_SSE=aws:kms (unset: the bucket's key).",
    )
    artifacts_checksum: bool = Field(
        default=True,
        validation_alias="SPELL_ARTIFACTS_CHECKSUM",
        description="Send ChecksumSHA256 with uploads so the server verifies them (0 for a "
        "server that refuses checksum headers; the digest is still verified on read).",
    )
    artifacts_path_style: bool = Field(
        default=False,
        validation_alias="SPELL_ARTIFACTS_PATH_STYLE",
        description="Path-style bucket URLs (ENDPOINT/BUCKET/KEY), e.g. for MinIO.",
    )
    artifacts_part_size: int = Field(
        default=16 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        le=5 * 1024 * 1024 * 1024,
        validation_alias="SPELL_ARTIFACTS_PART_SIZE",
        description="Uploads larger than this go multipart in parts of this many bytes.",
    )

    # --- GitHub App (off until configured; `spell app create` writes these) -----------------
    github_app_id: str | None = Field(
        default=None, validation_alias="GITHUB_APP_ID", description="The GitHub App's id."
    )
    github_private_key: SecretStr | None = Field(
        default=None,
        validation_alias="GITHUB_APP_PRIVATE_KEY",
        description="The App's private key (PEM text).",
    )
    github_private_key_path: Path | None = Field(
        default=None,
        validation_alias="GITHUB_APP_PRIVATE_KEY_PATH",
        description="File holding the App's private key (PEM), instead of the text.",
    )
    github_webhook_secret: SecretStr | None = Field(
        default=None,
        validation_alias="GITHUB_WEBHOOK_SECRET",
        description="Webhook secret; several, comma-separated, during a rotation.",
    )
    github_api_url: str = Field(
        default="https://api.github.com",
        validation_alias="GITHUB_API_URL",
        description="GitHub REST API base (GitHub Enterprise: https://HOST/api/v3).",
    )
    github_command_permission: str = Field(
        default="write",
        pattern=r"^(read|triage|write|maintain|admin)$",
        validation_alias="SPELL_GITHUB_COMMAND_PERMISSION",
        description="Least repository permission a commenter needs for slash commands.",
    )
    github_allow_edited_comments: bool = Field(
        default=False,
        validation_alias="SPELL_GITHUB_ALLOW_EDITED_COMMENTS",
        description="Also act on edited comments (off: only new comments cast).",
    )
    max_webhook_bytes: int = Field(
        default=25 * 1024 * 1024,
        ge=1024,
        validation_alias="SPELL_MAX_WEBHOOK_BYTES",
        description="Largest webhook delivery accepted (GitHub sends at most 25 MB).",
    )
    # --- OIDC sign-in for workflows (POST /v1/oidc/token; links: `spell oidc allow`) ---------
    oidc_issuer: str = Field(
        default="https://token.actions.githubusercontent.com",
        min_length=1,
        validation_alias="SPELL_OIDC_ISSUER",
        description="Issuer (`iss`) whose OIDC tokens may be exchanged for platform tokens "
        "(GitHub Actions; GitHub Enterprise Server: https://HOST/_services/token).",
    )
    oidc_audience: str = Field(
        default="spell-platform",
        min_length=1,
        validation_alias="SPELL_OIDC_AUDIENCE",
        description="Audience (`aud`) the OIDC tokens must be issued for.",
    )
    oidc_jwks_url: str | None = Field(
        default=None,
        validation_alias="SPELL_OIDC_JWKS_URL",
        description="Where the issuer's signing keys are fetched (default: "
        "<issuer>/.well-known/jwks).",
    )

    @property
    def oidc_jwks(self) -> str:
        """The JWKS URL of the OIDC issuer (``SPELL_OIDC_JWKS_URL`` or the issuer's default)."""
        return self.oidc_jwks_url or self.oidc_issuer.rstrip("/") + "/.well-known/jwks"

    webhook_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        validation_alias="SPELL_WEBHOOK_PORT",
        description="Port of the dedicated GitHub webhook ingest front (POST /webhooks/github "
        "only, batched durable inbox); unset: off (the API's /webhooks/github still works).",
    )
    webhook_host: str | None = Field(
        default=None,
        validation_alias="SPELL_WEBHOOK_HOST",
        description="Address the webhook ingest front listens on (default: the API's --host).",
    )
    # --- Stripe billing (off until STRIPE_API_KEY is set: ledger-only mode) -------------------
    stripe_api_key: SecretStr | None = Field(
        default=None,
        validation_alias="STRIPE_API_KEY",
        description="Stripe secret key (sk_test_… / sk_live_… or a restricted rk_…); unset: "
        "ledger-only billing (amounts recorded, nothing charged).",
    )
    stripe_webhook_secret: SecretStr | None = Field(
        default=None,
        validation_alias="STRIPE_WEBHOOK_SECRET",
        description="Signing secret(s) of the /webhooks/stripe endpoint (whsec_…); several, "
        "comma-separated, during a rotation.",
    )
    stripe_api_base: str = Field(
        default="https://api.stripe.com",
        validation_alias="STRIPE_API_BASE",
        description="Stripe API base URL (tests and local mocks override it).",
    )
    stripe_plans: str | None = Field(
        default=None,
        validation_alias="SPELL_STRIPE_PLANS",
        description='Subscription plans for `spell plan subscribe`: JSON {"PLAN": {"base": '
        '"price_…", "metered": ["price_…", …]}} (Stripe price ids).',
    )
    billing_reconcile_interval: int = Field(
        default=3600,
        ge=0,
        validation_alias="SPELL_BILLING_RECONCILE_INTERVAL",
        description="Seconds between the worker's scheduled reconciliations with Stripe (0: off).",
    )
    billing_in_serve: bool | None = Field(
        default=None,
        validation_alias="SPELL_BILLING_IN_SERVE",
        description="With NATS_URL and Stripe configured: whether `spell serve` also runs the "
        "background jobs (Stripe settlement, Stripe/GitHub webhook handling, the billing "
        "schedules). Unset: no, `spell worker` processes run them (the jobs share one JetStream "
        "consumer, so they move together). Without NATS_URL `spell serve` always runs them.",
    )
    idempotency_ttl: int = Field(
        default=24 * 3600,
        ge=60,
        validation_alias="SPELL_IDEMPOTENCY_TTL",
        description="Seconds an Idempotency-Key and its stored response are kept.",
    )
    # --- retention (SPEC §8; durations: seconds, or a number with s/m/h/d/w: 24h, 7d) --------
    retention_interval: int = Field(
        default=300,
        ge=0,
        validation_alias="SPELL_RETENTION_INTERVAL",
        description="Time between retention sweeps in `spell serve` and `spell worker` (seconds "
        "or 5m-style; 0: no scheduled sweeps).",
    )
    retention_inputs: int = Field(
        default=24 * 3600,
        ge=1,
        validation_alias="SPELL_RETENTION_INPUTS",
        description="How long a finished cast's input (and webhook bodies, staged input files) "
        "are kept, e.g. 24h; the input hash stays.",
    )
    retention_artifacts: int = Field(
        default=7 * 24 * 3600,
        ge=1,
        validation_alias="SPELL_RETENTION_ARTIFACTS",
        description="How long artifacts are kept, e.g. 7d (also deleted once their URL expired).",
    )
    retention_audit: int = Field(
        default=30 * 24 * 3600,
        ge=1,
        validation_alias="SPELL_RETENTION_AUDIT",
        description="How long audit records are kept locally, e.g. 30d; older segments are "
        "exported to the object store, then deleted.",
    )
    retention_audit_segment: int = Field(
        default=3600,
        ge=1,
        validation_alias="SPELL_RETENTION_AUDIT_SEGMENT",
        description="Age of the active audit file's first record at which it is closed into a "
        "segment, e.g. 1h (records leave at most this much after their period).",
    )

    @field_validator(
        "retention_interval",
        "retention_inputs",
        "retention_artifacts",
        "retention_audit",
        "retention_audit_segment",
        mode="before",
    )
    @classmethod
    def _duration(cls, v: Any) -> Any:
        from app.domain.retention import parse_duration

        return parse_duration(v)

    @field_validator(
        "default_monthly_cap_cents",
        "default_total_cap_cents",
        "serve_runs",
        "billing_in_serve",
        "nats_url",
        "nats_creds",
        "artifacts_url",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_region",
        "aws_default_region",
        "aws_endpoint_url",
        "artifacts_kms_key_id",
        "webhook_port",
        "webhook_host",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v

    def webhook_secrets(self) -> list[str]:
        if self.github_webhook_secret is None:
            return []
        raw = self.github_webhook_secret.get_secret_value()
        return [part.strip() for part in raw.split(",") if part.strip()]

    def stripe_webhook_secrets(self) -> list[str]:
        if self.stripe_webhook_secret is None:
            return []
        raw = self.stripe_webhook_secret.get_secret_value()
        return [part.strip() for part in raw.split(",") if part.strip()]

    @field_validator("stripe_plans")
    @classmethod
    def _valid_plans(cls, v: str | None) -> str | None:
        from app.domain.billing import parse_plans

        parse_plans(v)  # raises ValueError: the settings do not load
        return v

    def plans(self) -> dict[str, Any]:
        """The configured subscription plans (name → :class:`app.domain.billing.Plan`)."""
        from app.domain.billing import parse_plans

        return dict(parse_plans(self.stripe_plans))

    @property
    def stripe_enabled(self) -> bool:
        return self.stripe_api_key is not None and bool(self.stripe_api_key.get_secret_value())

    def github_key_pem(self) -> str | None:
        if self.github_private_key is not None and self.github_private_key.get_secret_value():
            return self.github_private_key.get_secret_value()
        if self.github_private_key_path is not None:
            return self.github_private_key_path.read_text()
        return None

    @property
    def github_enabled(self) -> bool:
        return bool(self.github_app_id) and (
            self.github_private_key is not None or self.github_private_key_path is not None
        )

    @property
    def embedded_runs(self) -> bool:
        """Whether ``spell serve`` runs casts in its own process (see ``SPELL_SERVE_RUNS``)."""
        wanted = self.serve_runs if self.serve_runs is not None else not self.nats_url
        return wanted and self.workers > 0

    @property
    def serve_jobs(self) -> bool:
        """Whether ``spell serve`` consumes the jobs queue (see ``SPELL_BILLING_IN_SERVE``).
        Without NATS nobody else can; with NATS and Stripe configured, only if asked: the jobs
        share one JetStream consumer, so billing cannot be left to the workers alone."""
        if not self.nats_url or not self.stripe_enabled:
            return True
        return bool(self.billing_in_serve)

    def uid_pool(self) -> range:
        if not self.sandbox_uid_pool:
            return range(0)
        lo, hi = (int(x) for x in self.sandbox_uid_pool.split("-"))
        return range(lo, hi + 1)

    @property
    def sqlalchemy_url(self) -> str:
        """The async SQLAlchemy URL: asyncpg for PostgreSQL, aiosqlite for the embedded default."""
        url = self.database_url
        if not url:
            return f"sqlite+aiosqlite:///{(self.data_dir / 'spell.db').resolve()}"
        for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
            if url.startswith(prefix):
                return "postgresql+asyncpg://" + url[len(prefix) :]
        if url.startswith("sqlite:///"):
            return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
        return url

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    def ensure_data_dir(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir

    def signing_key(self) -> bytes:
        """The signing key; created (0600) in the data dir on first use when not configured."""
        if self.secret_key is not None and self.secret_key.get_secret_value():
            configured = self.secret_key.get_secret_value().encode()
            if len(configured) < 32:
                raise ValueError("SPELL_SECRET_KEY must be at least 32 characters")
            return configured
        path = self.ensure_data_dir() / "secret.key"
        if not path.exists():
            # Write a complete key to a private temp file, then link it into place: a second
            # process starting at the same moment either wins or reads the complete winner.
            tmp = path.with_name(f".secret.key.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_urlsafe(48).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        key = path.read_bytes().strip()
        if len(key) < 32:
            raise ValueError(f"{path} holds a key shorter than 32 bytes; delete it or fix it")
        return key


class ClientSettings(BaseSettings):
    """Client-side settings for the CLI and SDK: environment first, then the config file."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    api_url: str = Field(default="http://127.0.0.1:8080", validation_alias="SPELL_API_URL")
    token: SecretStr | None = Field(default=None, validation_alias="SPELL_TOKEN")
    config_file: Path = Field(
        default_factory=lambda: (
            Path(os.environ.get("XDG_CONFIG_HOME", str(Path.home() / ".config")))
            / "spell"
            / "config.json"
        ),
        validation_alias="SPELL_CONFIG",
    )
