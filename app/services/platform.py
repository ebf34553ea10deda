"""Use cases of the core loop: publish → cast → cap check → run → artifact → ledger + audit.

:class:`Platform` is wired once per process by an entry point (``web``, ``worker``, ``cli``) with
the adapters it needs; every surface calls these methods and maps :class:`AppError` itself.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.domain.caps import month_period, seconds_to_monthly_reset, which_cap_refused
from app.domain.casts import canonical_json, input_hash, request_hash
from app.domain.pricing import estimate_cents
from app.domain.signing import sign_artifact, verify_artifact
from app.domain.spells import ParsedSpell, SpellDocument
from app.errors import AppError
from app.services import tokens
from app.services.events import EventHub
from app.services.ports import ArtifactStore, AuditSink, Clock
from app.services.tokens import Caller

if TYPE_CHECKING:
    from app.observability.metrics import Metrics
    from app.store.ledger import BudgetView, SqlLedger
    from app.store.models import Artifact, AuditOutbox, Cast, Spell, SpellVersion

log = logging.getLogger("spell.platform")

#: seconds a spell lookup is reused by casts (a publish in this process clears it at once)
SPELL_CACHE_TTL = 1.0


class CastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: dict[str, Any] = Field(default_factory=dict)
    mode: str | None = None
    version: str | None = None
    repo: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,39}/[A-Za-z0-9_.-]{1,100}$",
        description="Workflow mode: the repository to run in (default: the spell's).",
    )


@dataclass(frozen=True)
class CastOrigin:
    """Where a cast came from when it was not the REST API (a comment, a repository_dispatch)."""

    source: str  # comment | repository_dispatch
    installation_id: int
    repo: str
    issue_number: int | None = None
    comment_id: int | None = None
    head_sha: str | None = None


class CapsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    account: str | None = Field(default=None, description="Operators only: whose caps to set.")
    monthly_cents: int | None = Field(default=None, ge=0, le=10**12)
    total_cents: int | None = Field(default=None, ge=0, le=10**12)


@dataclass(frozen=True)
class PlatformConfig:
    signing_key: bytes
    artifact_ttl: int
    token_ttl: int
    default_monthly_cap_cents: int | None
    default_total_cap_cents: int | None


def pydantic_error(exc: ValidationError, *, prefix: str = "") -> AppError:
    """The first pydantic error as a 422 naming the field path (JSON-pointer style)."""
    err = exc.errors()[0]
    path = prefix + "/" + "/".join(str(p) for p in err["loc"]) if err["loc"] else prefix or "/"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return AppError(
        "VALIDATION_ERROR",
        f"{path}: {msg}",
        detail={"path": path, "errors": len(exc.errors())},
    )


def _nothing() -> None:
    return None


class Platform:
    def __init__(
        self,
        *,
        config: PlatformConfig,
        ledger: SqlLedger,
        audit: AuditSink,
        artifacts: ArtifactStore,
        clock: Clock,
        hub: EventHub,
        metrics: Metrics,
        sandbox_ready: Callable[[], str | None],
        kick_outbox: Callable[[], None],
        repo_access: Callable[[str], Awaitable[int | None]] | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.audit = audit
        self.artifacts = artifacts
        self.clock = clock
        self.hub = hub
        self.metrics = metrics
        #: returns None when service runs can be accepted, else the reason they cannot
        self.sandbox_ready = sandbox_ready
        self.kick_outbox = kick_outbox
        #: workflow mode: the App installation that granted a repository (None: not reachable);
        #: unset when the GitHub App is not configured
        self.repo_access = repo_access
        #: Stripe billing: raises 402 when the account cannot pay for a paid cast (past due,
        #: no payment method); unset in ledger-only mode
        self.payment_gate: Callable[[str], Awaitable[None]] | None = None
        #: wakes this process's audit outbox drainer (app/store/audit_outbox.py) after a
        #: commit that wrote audit records; set at wiring time
        self.kick_audit: Callable[[], None] = _nothing
        self._parsed: dict[tuple[str, str, str], ParsedSpell] = {}
        self._spells: dict[tuple[str, str | None], tuple[float, tuple[Spell, SpellVersion]]] = {}
        self._versions: dict[tuple[str, str], SpellVersion] = {}
        #: verified bearer tokens → (caller, exp): see :meth:`authenticate`
        self._tokens: dict[str, tuple[Caller, int]] = {}

    def parsed(self, version: SpellVersion) -> ParsedSpell:
        """The validated document of a stored version (immutable once published: cached)."""
        key = (version.spell_id, version.version, version.document_hash)
        hit = self._parsed.get(key)
        if hit is None:
            hit = ParsedSpell(version.document)
            if len(self._parsed) >= 512:
                self._parsed.pop(next(iter(self._parsed)))
            self._parsed[key] = hit
        return hit

    # ------------------------------------------------------------------ tokens & accounts

    async def issue_token(
        self,
        account_id: str,
        role: str,
        *,
        ttl: int | None = None,
        now: datetime | None = None,
        audit: Callable[[str, datetime], AuditOutbox] | None = None,
    ) -> tuple[str, datetime]:
        """A bearer token for the account's principal of ``role`` (created if new), recorded in
        the ledger. Its audit record: ``audit(jti, expires_at)``, an audit outbox row committed
        with the token's row (sign-ins on the server), else ``token.issued`` by the operator's
        CLI, appended after."""
        tokens_ttl = ttl if ttl is not None else self.config.token_ttl
        if tokens_ttl <= 0:
            raise AppError("VALIDATION_ERROR", "--ttl must be a positive number of seconds")
        if not account_id or len(account_id) > 64:
            raise AppError("VALIDATION_ERROR", "account must be 1-64 characters")
        principal = await self.ledger.ensure_principal(
            account_id,
            role,
            monthly_cap=self.config.default_monthly_cap_cents,
            total_cap=self.config.default_total_cap_cents,
        )
        now = now or self.clock.now()
        token, jti, exp = tokens.issue(
            self.config.signing_key,
            principal_id=principal,
            account_id=account_id,
            role=role,
            now=now,
            ttl=tokens_ttl,
        )
        if audit is not None:
            await self.ledger.record_token(jti, principal, now, exp, audit=[audit(jti, exp)])
            self.kick_audit()
            return token, exp
        await self.ledger.record_token(jti, principal, now, exp)
        await self.audit.append(
            "token.issued",
            actor="operator:cli",
            data={"account": account_id, "role": role, "jti": jti, "expires_at": exp.isoformat()},
        )
        return token, exp

    def authenticate(self, token: str) -> Caller:
        """Verify a bearer token. Its signature is checked once per process (the exact token
        string is cached with its claims); expiry is checked on every use."""
        now = self.clock.now()
        hit = self._tokens.get(token)
        if hit is not None:
            caller, exp = hit
            if exp + tokens.LEEWAY_S < now.timestamp():
                raise AppError("UNAUTHORIZED", "the token has expired; issue a new one")
            return caller
        caller, exp = tokens.verify_with_expiry(self.config.signing_key, token, now=now)
        if len(self._tokens) >= 4096:
            self._tokens.clear()
        self._tokens[token] = (caller, exp)
        return caller

    # ------------------------------------------------------------------ publishing

    async def publish_spell(self, caller: Caller, body: Any) -> tuple[dict[str, Any], bool]:
        caller.require("spell:publish")
        if not isinstance(body, dict):
            raise AppError("VALIDATION_ERROR", "the spell document must be a JSON object")
        try:
            doc = SpellDocument.model_validate(body)
        except ValidationError as e:
            raise pydantic_error(e) from None
        if doc.execution.bundle is not None and not await self.ledger.bundle_owned(
            doc.execution.bundle, caller.account_id
        ):
            raise AppError(
                "VALIDATION_ERROR",
                f"/execution/bundle: bundle {doc.execution.bundle} was not uploaded by this "
                "account (POST /v1/bundles first, or use `spell publish PATH`)",
                detail={"path": "/execution/bundle"},
            )
        doc_hash = (
            "sha256:"
            + hashlib.sha256(
                canonical_json(doc.model_dump(mode="json", exclude_none=True))
            ).hexdigest()
        )
        self._spells.clear()
        from app.store.hot import AuditRow
        from app.store.models import AuditOutbox

        # committed with the new version only (the audit outbox)
        published = AuditOutbox.of(
            AuditRow(
                event="spell.published",
                actor=caller.principal_id,
                data={"spell_id": doc.id, "version": doc.version, "document_hash": doc_hash},
                at=self.clock.now(),
            )
        )
        spell, version, created = await self.ledger.publish_spell(
            doc,
            author_id=caller.account_id,
            doc_hash=doc_hash,
            price_cents=estimate_cents(doc.pricing),
            audit=[published],
        )
        if created:
            self.kick_audit()
        return self.spell_detail(spell, version, await self.ledger.list_versions(spell.id)), created

    async def register_bundle(self, caller: Caller, digest: str, size: int) -> None:
        caller.require("spell:publish")
        from app.store.hot import AuditRow
        from app.store.models import AuditOutbox

        uploaded = AuditOutbox.of(
            AuditRow(  # committed with the bundle's row (the audit outbox)
                event="bundle.uploaded",
                actor=caller.principal_id,
                data={"digest": digest, "size": size},
                at=self.clock.now(),
            )
        )
        await self.ledger.add_bundle(digest, size, caller.account_id, audit=[uploaded])
        self.kick_audit()

    # ------------------------------------------------------------------ reading spells

    def _visible(self, spell: Spell, caller: Caller | None) -> bool:
        if spell.visibility != "private":
            return True
        return caller is not None and (
            caller.account_id == spell.author_id or caller.role in ("operator", "auditor")
        )

    async def _lookup(
        self, spell_id: str, version: str | None
    ) -> tuple[Spell, SpellVersion] | None:
        """``ledger.get_spell`` behind a short cache: casts of a hot spell skip two queries.
        Entries live ``SPELL_CACHE_TTL`` seconds and are dropped when this process publishes."""
        key = (spell_id, version)
        now = time.monotonic()
        hit = self._spells.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = await self.ledger.get_spell(spell_id, version)
        if found is not None:
            if len(self._spells) >= 1024:
                self._spells.clear()
            self._spells[key] = (now + SPELL_CACHE_TTL, found)
        return found

    async def spell_version(self, spell_id: str, version: str) -> SpellVersion | None:
        """An exact published version (immutable, so cached for the process's life): the
        worker reads the document of every run it executes."""
        key = (spell_id, version)
        hit = self._versions.get(key)
        if hit is not None:
            return hit
        found = await self.ledger.get_spell(spell_id, version)
        if found is None:
            return None
        if len(self._versions) >= 4096:
            self._versions.clear()
        self._versions[key] = found[1]
        return found[1]

    async def find_spell(
        self, spell_id: str, caller: Caller | None, version: str | None = None
    ) -> tuple[Spell, SpellVersion]:
        found = await self._lookup(spell_id, version)
        if found is None or not self._visible(found[0], caller):
            what = f"{spell_id}@{version}" if version else spell_id
            raise AppError("NOT_FOUND", f"spell {what!r} not found")
        return found

    def spell_summary(self, spell: Spell) -> dict[str, Any]:
        return {
            "id": spell.id,
            "name": spell.name,
            "description": spell.description,
            "author": spell.author_id,
            "version": spell.latest_version,
            "price": {
                "model": spell.price_model,
                "cents": spell.price_cents,
                "currency": spell.currency,
            },
            "mode": spell.mode,
            "rating": None,
            "runs": spell.cast_count,
            "tags": list(spell.tags),
            "visibility": spell.visibility,
            "published_at": spell.published_at.isoformat(),
        }

    def spell_detail(
        self, spell: Spell, version: SpellVersion, versions: list[str]
    ) -> dict[str, Any]:
        doc = version.document
        execution = doc.get("execution", {})
        modes = [execution.get("mode")] + [
            m for m in execution.get("allowed_modes", []) if m != execution.get("mode")
        ]
        return {
            **self.spell_summary(spell),
            "version": version.version,
            "latest_version": spell.latest_version,
            "versions": versions,
            "modes": modes,
            "pricing": doc.get("pricing"),
            "estimate_cents": spell.price_cents,
            "inputs": doc.get("inputs"),
            "document": doc,
        }

    async def search(
        self,
        caller: Caller | None,
        *,
        q: str | None,
        tag: str | None,
        sort: str,
        limit: int,
        offset: int,
        include_own: bool,
    ) -> list[dict[str, Any]]:
        rows = await self.ledger.search_spells(
            q=q,
            tag=tag,
            sort=sort,
            limit=limit,
            offset=offset,
            viewer_account=caller.account_id if caller else None,
            include_own=include_own,
        )
        return [self.spell_summary(r) for r in rows]

    # ------------------------------------------------------------------ casting

    async def cast(
        self,
        caller: Caller,
        spell_id: str,
        body: Any,
        *,
        idempotency_key: str,
        traceparent: str,
        base_url: str,
        origin: CastOrigin | None = None,
    ) -> tuple[int, dict[str, Any], bool]:
        """Accept a cast: validate, reserve the estimate, queue the run. Idempotent per key."""
        caller.require("cast:invoke")
        if not isinstance(body, dict):
            raise AppError("VALIDATION_ERROR", "the request body must be a JSON object")
        rhash = request_hash("POST", f"/v1/spells/{spell_id}:cast", body)
        try:
            try:
                req = CastRequest.model_validate(body)
            except ValidationError as e:
                raise pydantic_error(e) from None
            spell, version = await self.find_spell(spell_id, caller, req.version)
            parsed = self.parsed(version)
            doc = parsed.doc
            mode = req.mode or doc.execution.mode
            if not doc.allows_mode(mode):
                raise AppError(
                    "VALIDATION_ERROR",
                    f"/mode: {spell_id} cannot run in mode {mode!r}",
                    detail={"path": "/mode"},
                )
            problems = parsed.validate_input(req.input)
            if problems:
                path, message = problems[0]
                where = "/input" + path.rstrip("/")
                raise AppError(
                    "VALIDATION_ERROR",
                    f"{where}: {message}",
                    detail={"path": where, "errors": len(problems)},
                )
            if mode == "clone":
                raise AppError(
                    "UNAVAILABLE",
                    "clone spells are bought, not cast: POST /v1/catalog/spells/{id}/purchase",
                )
            target_repo: str | None = None
            installation_id: int | None = None
            if mode == "workflow":
                assert doc.execution.workflow is not None
                target_repo = (
                    req.repo or (origin.repo if origin else None) or doc.execution.workflow.repo
                )
                installation_id = await self._installation(target_repo)
            else:
                reason = self.sandbox_ready()
                if reason is not None:
                    raise AppError("SANDBOX_UNAVAILABLE", f"service runs are disabled: {reason}")
            estimate = estimate_cents(doc.pricing)
            if estimate > 0 and self.payment_gate is not None:
                await self.payment_gate(caller.account_id)
        except AppError:
            # A retry of an accepted cast is answered as it was then, even if the spell, the
            # sandbox or the caps have changed since (checked only here, off the happy path:
            # on success the key's own insert detects a replay).
            stored = await self.ledger.stored_response(caller.principal_id, idempotency_key, rhash)
            if stored is not None:
                return stored[0], self._absolute(stored[1], base_url), True
            raise

        ihash = input_hash(req.input)
        now = self.clock.now()
        period = month_period(now)
        from app.store.hot import AuditRow, CapRefused, NewCast, PastDue
        from app.store.ids import new_id

        cast_id = new_id("c")
        if mode == "workflow":
            subject = "github.dispatch"
        else:
            assert doc.execution.bundle is not None
            subject = "run." + doc.execution.bundle.removeprefix("sha256:")

        accepted = {
            "cast_id": cast_id,
            "status": "queued",
            "progress_sse": f"/v1/casts/{cast_id}/events",
            "estimate_cents": estimate,
            "currency": doc.pricing.currency,
        }
        target: dict[str, Any] | None = None
        if origin is not None or target_repo is not None:
            target = {
                "source": origin.source if origin else "api",
                "installation_id": installation_id
                if installation_id is not None
                else (origin.installation_id if origin else None),
                "repo": (target_repo or (origin.repo if origin else "")).lower() or None,
                "issue_number": origin.issue_number if origin else None,
                "comment_id": origin.comment_id if origin else None,
                "head_sha": origin.head_sha if origin else None,
                "workflow_id": doc.execution.workflow.workflow_id
                if mode == "workflow" and doc.execution.workflow
                else None,
            }
        new = NewCast(
            id=cast_id,
            spell_id=spell.id,
            spell_version=version.version,
            caster_id=caller.account_id,
            principal_id=caller.principal_id,
            input_hash=ihash,
            input=req.input,
            mode=mode,
            currency=doc.pricing.currency,
            estimate_cents=estimate,
            period=period,
            traceparent=traceparent,
            created_at=now,
            subject=subject,
            target=target,
            # the audit record commits with the cast (the audit outbox): a crash after the
            # commit cannot lose it, and the answer does not wait for the audit file's fsync
            audit=AuditRow(
                event="cast.accepted",
                at=now,
                actor=caller.principal_id,
                cast_id=cast_id,
                input_hash=ihash,
                amount_cents=estimate,
                currency=doc.pricing.currency,
                traceparent=traceparent,
                data={
                    "spell_id": spell.id,
                    "version": version.version,
                    "mode": mode,
                    "reserved_cents": estimate,
                    "account": caller.account_id,
                },
            ),
            for_share=self.ledger.dialect == "postgresql",
        )
        try:
            status, resp, replayed = await self.ledger.accept_cast(
                new, key=idempotency_key, req_hash=rhash, response=(202, accepted)
            )
        except CapRefused:
            raise await self._cap_error(caller.account_id, estimate) from None
        except PastDue:
            # the account was marked past due after the gate read it (#4): same answer
            raise AppError(
                "PAYMENT_REQUIRED",
                "the account is past due: a payment was refused; save a payment method with "
                "`spell billing setup` (or POST /v1/billing/setup), then cast again",
                detail={"account": caller.account_id, "reason": "past_due"},
            ) from None
        if not replayed:
            self.kick_audit()
            self.metrics.cast_count.labels(status="accepted").inc()
            self.kick_outbox()
        return status, self._absolute(resp, base_url), replayed

    @staticmethod
    def _absolute(resp: dict[str, Any], base_url: str) -> dict[str, Any]:
        out = dict(resp)
        out["progress_sse"] = base_url + str(resp["progress_sse"])
        return out

    async def _installation(self, repo: str) -> int:
        if self.repo_access is None:
            raise AppError(
                "UNAVAILABLE",
                "workflow mode needs the GitHub App; configure it with `spell app create`",
            )
        installation = await self.repo_access(repo)
        if installation is None:
            raise AppError(
                "FORBIDDEN_REPO",
                f"the Spell Platform GitHub App cannot reach {repo}: its owner must install the "
                "App and grant it this repository (Settings → Integrations → GitHub Apps)",
                detail={"repo": repo},
            )
        return installation

    async def _cap_error(self, account_id: str, estimate: int) -> AppError:
        view = await self.ledger.budget(account_id)
        if view is None:
            return AppError("BUDGET_CAP_EXCEEDED", "the account has no budget; ask an operator")
        which = which_cap_refused(estimate=estimate, monthly=view.monthly, total=view.total)
        detail = {
            "estimate_cents": estimate,
            "cap": which or "monthly",
            "monthly": view.monthly.to_json(),
            "total": view.total.to_json(),
        }
        if which == "total":
            return AppError(
                "BUDGET_CAP_EXCEEDED",
                f"this cast (estimate {estimate} cents) would pass the account's total cap",
                detail=detail,
            )
        return AppError(
            "BUDGET_CAP_EXCEEDED",
            f"this cast (estimate {estimate} cents) would pass the account's monthly cap",
            retry_after=seconds_to_monthly_reset(self.clock.now()),
            detail=detail,
        )

    def _may_view_cast(self, caller: Caller, cast: Cast) -> bool:
        return caller.account_id == cast.caster_id or caller.role in ("operator", "auditor")

    async def get_cast(self, caller: Caller, cast_id: str) -> Cast:
        cast = await self.ledger.get_cast(cast_id)
        if cast is None or not self._may_view_cast(caller, cast):
            raise AppError("NOT_FOUND", f"cast {cast_id!r} not found")
        return cast

    async def cast_status(self, caller: Caller, cast_id: str, *, base_url: str) -> dict[str, Any]:
        cast = await self.get_cast(caller, cast_id)
        artifact_url = None
        artifact_info = None
        if cast.artifact_id is not None:
            art = await self.ledger.get_artifact(cast.artifact_id)
            if art is not None:
                artifact_url = base_url + self.artifact_path(art)
                artifact_info = {
                    "digest": art.digest,
                    "size_bytes": art.size_bytes,
                    "expires_at": art.expires_at.isoformat(),
                }
        body: dict[str, Any] = {
            "cast_id": cast.id,
            "spell_id": cast.spell_id,
            "spell_version": cast.spell_version,
            "status": cast.status,
            "mode": cast.mode,
            "run_url": cast.run_url,
            "artifact_url": artifact_url,
            "artifact": artifact_info,
            "cost_cents": cast.cost_cents,
            "estimate_cents": cast.estimate_cents,
            "currency": cast.currency,
            "input_hash": cast.input_hash,
            "created_at": cast.created_at.isoformat(),
            "started_at": cast.started_at.isoformat() if cast.started_at else None,
            "finished_at": cast.finished_at.isoformat() if cast.finished_at else None,
        }
        if cast.status == "failed":
            body["error"] = {"code": cast.error_code, "message": cast.error_message}
        return body

    # ------------------------------------------------------------------ artifacts

    def artifact_path(self, art: Artifact) -> str:
        exp = int(art.expires_at.timestamp())
        sig = sign_artifact(self.config.signing_key, art.id, exp)
        return f"/v1/artifacts/{art.id}?exp={exp}&sig={sig}"

    async def open_artifact(
        self, artifact_id: str, exp: str, sig: str
    ) -> tuple[Artifact, Path | str]:
        """The artifact and where to get it: a local file, or a fresh short-lived URL."""
        try:
            exp_i = int(exp)
        except ValueError:
            raise AppError("UNAUTHORIZED", "artifact link is not valid") from None
        if not verify_artifact(self.config.signing_key, artifact_id, exp_i, sig):
            raise AppError("UNAUTHORIZED", "artifact link is not valid (bad signature)")
        now = self.clock.now()
        art = await self.ledger.get_artifact(artifact_id)
        if exp_i <= int(now.timestamp()) or art is None or art.expires_at <= now:
            raise AppError(
                "ARTIFACT_EXPIRED", "this artifact link has expired; cast the spell again"
            )
        try:
            url = await self.artifacts.redirect_url(art.location)
            if url is not None:
                return art, url
            path = await self.artifacts.open_path(art.location)
        except FileNotFoundError:
            raise AppError(
                "ARTIFACT_EXPIRED", "this artifact is no longer stored; cast the spell again"
            ) from None
        return art, path

    # ------------------------------------------------------------------ caps

    def caps_json(self, view: BudgetView) -> dict[str, Any]:
        return {
            "account": view.account_id,
            "period": view.period,
            "monthly": view.monthly.to_json(),
            "total": view.total.to_json(),
            "monthly_resets_in": seconds_to_monthly_reset(self.clock.now()),
        }

    def _caps_account(self, caller: Caller, account: str | None) -> str:
        if account is None or account == caller.account_id:
            return caller.account_id
        if not caller.is_operator:
            raise AppError("FORBIDDEN", "only an operator may read or set another account's caps")
        return account

    async def get_caps(self, caller: Caller, account: str | None) -> dict[str, Any]:
        acct = self._caps_account(caller, account)
        view = await self.ledger.budget(acct)
        if view is None:
            raise AppError("NOT_FOUND", f"account {acct!r} not found")
        return self.caps_json(view)

    async def set_caps(
        self, caller: Caller, body: Any, *, idempotency_key: str
    ) -> tuple[int, dict[str, Any], bool]:
        if not (caller.is_operator or "cast:invoke" in caller.scopes):
            raise AppError("FORBIDDEN", "setting caps needs a caster or operator token")
        if not isinstance(body, dict):
            raise AppError("VALIDATION_ERROR", "the request body must be a JSON object")
        rhash = request_hash("POST", "/v1/billing/caps", body)
        stored = await self.ledger.stored_response(caller.principal_id, idempotency_key, rhash)
        if stored is not None:
            return stored[0], stored[1], True
        try:
            req = CapsRequest.model_validate(body)
        except ValidationError as e:
            raise pydantic_error(e) from None
        if "monthly_cents" not in body and "total_cents" not in body:
            raise AppError(
                "VALIDATION_ERROR",
                "give monthly_cents and/or total_cents (null removes a cap)",
                detail={"path": "/monthly_cents"},
            )
        acct = self._caps_account(caller, req.account)
        from app.store.hot import AuditRow
        from app.store.models import AuditOutbox

        async def work(s: Any) -> tuple[int, dict[str, Any]]:
            view = await self.ledger.set_caps(
                s,
                acct,
                monthly=req.monthly_cents,
                total=req.total_cents,
                set_monthly="monthly_cents" in body,
                set_total="total_cents" in body,
            )
            # committed with the caps and the Idempotency-Key (the audit outbox)
            s.add(
                AuditOutbox.of(
                    AuditRow(
                        event="caps.set",
                        actor=caller.principal_id,
                        data={
                            "account": acct,
                            **{k: body[k] for k in ("monthly_cents", "total_cents") if k in body},
                        },
                        at=self.clock.now(),
                    )
                )
            )
            return 200, self.caps_json(view)

        status, resp, replayed = await self.ledger.run_idempotent(
            caller.principal_id, idempotency_key, rhash, work
        )
        if not replayed:
            self.kick_audit()
        return status, resp, replayed
