"""GitHub flows: webhook deliveries → handlers, workflow dispatch, run completion, feedback.

Everything here runs from the jobs queue, never on the webhook request path. Each handler is
idempotent (deliveries are at-least-once): casts use an Idempotency-Key derived from the comment
or dispatch, the bot's comment is found again by its hidden marker, state changes are guarded by
the cast's status.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from app.domain.commands import (
    CapCommand,
    CastCommand,
    CastStatusCommand,
    CommandError,
    SpellsCommand,
    parse_comment,
)
from app.errors import AppError
from app.github import render
from app.github.client import GitHubClient, GitHubError, GitHubGone, GitHubNotFound
from app.github.webhooks import Event, Router, parse_event
from app.observability.tracing import new_traceparent
from app.services.platform import CastOrigin, Platform
from app.services.ports import Message
from app.services.tokens import Caller
from app.store import hot
from app.store.github_store import GitHubStore
from app.store.ids import new_id
from app.store.inbox import Inbox
from app.store.models import Artifact, AuditOutbox, Cast, CastTarget

log = logging.getLogger("spell.github")


class RetryLater(Exception):
    """Transient: another job is mid-way through the same GitHub object; retry with backoff."""


PERMISSION_ORDER = ("none", "read", "triage", "write", "maintain", "admin")
router = Router()


@dataclass
class GitHubConfig:
    app_id: str
    command_permission: str = "write"
    allow_edited_comments: bool = False
    public_url: str = "http://127.0.0.1:8080"


def permission_at_least(have: str, need: str) -> bool:
    # The collaborator API answers admin/write/read/none (maintain→write, triage→read).
    order = {p: i for i, p in enumerate(PERMISSION_ORDER)}
    return order.get(have, 0) >= order.get(need, len(order))


def _split(repo: str) -> tuple[str, str]:
    owner, _, name = repo.partition("/")
    return owner, name


class GitHubService:
    def __init__(
        self,
        *,
        config: GitHubConfig,
        platform: Platform,
        store: GitHubStore,
        inbox: Inbox,
        client: GitHubClient,
    ) -> None:
        self.config = config
        self.platform = platform
        self.store = store
        self.inbox = inbox
        self.client = client

    # ------------------------------------------------------------------ jobs

    async def on_webhook_job(self, msg: Message) -> None:
        delivery_id = str(msg.payload["delivery_id"])
        delivery = await self.inbox.get(delivery_id)
        if delivery is None or delivery.status in ("done", "ignored"):
            return
        await self.inbox.start_attempt(delivery_id)
        event = parse_event(delivery.event, delivery_id, delivery.payload)
        handled = await router.dispatch(event, self)
        await self.inbox.finish(delivery_id, "done" if handled else "ignored")

    async def on_dead_job(self, msg: Message, error: str) -> None:
        """A job failed for good: record the dead letter; a dispatch failure fails its cast."""
        if msg.subject.startswith("webhook."):
            await self.inbox.finish(str(msg.payload["delivery_id"]), "dead", error)
        elif msg.subject == "github.dispatch":
            cast_id = str(msg.payload["cast_id"])
            done = await self.platform.ledger.fail_unfinished(
                cast_id,
                error_code="INTERNAL",
                error_message="the workflow could not be dispatched; nothing was charged",
                audit=self._ended_audit(),
            )
            if done is not None:
                await self._ended(done)

    async def on_dispatch_job(self, msg: Message) -> None:
        """Fire the spell's workflow in the target repository (workflow mode)."""
        cast_id = str(msg.payload["cast_id"])
        ledger = self.platform.ledger
        target = await self.store.target(cast_id)
        cast = await ledger.get_cast(cast_id)
        if target is None or cast is None or target.repo is None:
            return
        if cast.status != "queued" or target.dispatched_at is not None:
            return  # already dispatched (a redelivered job)
        found = await ledger.get_spell(cast.spell_id, cast.spell_version)
        assert found is not None
        doc = found[1].document
        wf = doc["execution"]["workflow"]
        timeout = int(doc["execution"].get("timeout_sec", 60))
        claim = await ledger.claim(cast_id, lease_sec=timeout)  # the lease is the deadline
        if claim is None:
            return
        owner, repo = _split(target.repo)
        installation = target.installation_id
        assert installation is not None
        payload = cast.input or {}
        try:
            if wf.get("dispatch", "workflow_dispatch") == "repository_dispatch":
                await self.client.repository_dispatch(
                    installation,
                    owner,
                    repo,
                    event_type="spell.cast",
                    client_payload={
                        "spell": cast.spell_id,
                        "input": payload,
                        "cast_id": cast_id,
                        "traceparent": cast.traceparent or "",
                    },
                )
                details = None
            else:
                ref = wf.get("ref") or await self.client.default_branch(installation, owner, repo)
                details = await self.client.dispatch_workflow(
                    installation,
                    owner,
                    repo,
                    wf["workflow_id"],
                    ref=ref,
                    inputs={
                        "payload": json.dumps(payload, separators=(",", ":")),
                        "cast_id": cast_id,
                        "traceparent": cast.traceparent or "",
                        "spell": cast.spell_id,
                    },
                )
        except GitHubNotFound:
            done = await ledger.finish(
                cast_id,
                claim.attempt,
                succeeded=False,
                error_code="WORKFLOW_NOT_FOUND",
                error_message=f"workflow {wf['workflow_id']!r} was not found in {target.repo}",
                audit=self._ended_audit(),
            )
            if done is not None:
                await self._ended(done)
            return
        now = self.platform.clock.now()
        run_id = int(details["workflow_run_id"]) if details else None
        run_url = str(details.get("html_url") or "") if details else None
        # the record commits with dispatched_at (what makes a redelivered job stop above)
        dispatched = AuditOutbox.of(
            hot.AuditRow(
                event="cast.dispatched",
                actor="github",
                cast_id=cast_id,
                traceparent=cast.traceparent,
                data={"repo": target.repo, "run_id": run_id},
                at=now,
            )
        )
        await self.store.update_target(
            cast_id, audit=[dispatched], dispatched_at=now, run_id=run_id
        )
        self.platform.kick_audit()
        if run_url:
            await ledger.set_run_url(cast_id, run_url)
        await ledger.append_events(
            cast_id,
            [("dispatched", {"repo": target.repo, "run_id": run_id, "run_url": run_url})],
            attempt=claim.attempt,
        )
        self.platform.hub.notify(cast_id)
        await self._feedback(cast_id, reaction="rocket")

    async def on_notify_job(self, msg: Message) -> None:
        await self._feedback(str(msg.payload["cast_id"]))

    # ------------------------------------------------------------------ workflow runs

    async def complete_run(self, repo: str, run: dict[str, Any]) -> None:
        """A workflow run completed: record its artifacts and end the cast."""
        run_id = int(run["id"])
        cast_id = await self.store.cast_for_run(repo, run_id)
        if cast_id is None:
            title = str(run.get("display_title") or run.get("name") or "")
            cast_id = next((w for w in title.split() if w.startswith("c_")), None)
            if cast_id is None:
                return
            target = await self.store.target(cast_id)
            if target is None or (target.repo or "") != repo.lower():
                return
            await self.store.update_target(cast_id, run_id=run_id)
        cast = await self.platform.ledger.get_cast(cast_id)
        target = await self.store.target(cast_id)
        if cast is None or target is None or cast.status != "running":
            return
        if run.get("html_url"):
            await self.platform.ledger.set_run_url(cast_id, str(run["html_url"]))
        owner, name = _split(repo)
        assert target.installation_id is not None
        conclusion = run.get("conclusion")
        if conclusion != "success":
            done = await self.platform.ledger.finish(
                cast_id,
                cast.attempt,
                succeeded=False,
                error_code="TIMEOUT" if conclusion == "timed_out" else "SPELL_FAILED",
                error_message=f"the workflow run ended {conclusion}",
                audit=self._ended_audit(),
            )
        else:
            arts = await self.client.list_run_artifacts(target.installation_id, owner, name, run_id)
            artifact = self._artifact(cast, target, owner, name, arts)
            found = await self.platform.ledger.get_spell(cast.spell_id, cast.spell_version)
            from app.domain.pricing import Usage, actual_cents
            from app.domain.spells import SpellDocument

            assert found is not None
            doc = SpellDocument.model_validate(found[1].document)
            duration_ms = 0
            if run.get("run_started_at") and run.get("updated_at"):
                from datetime import datetime

                started = datetime.fromisoformat(str(run["run_started_at"]).replace("Z", "+00:00"))
                ended = datetime.fromisoformat(str(run["updated_at"]).replace("Z", "+00:00"))
                duration_ms = max(0, int((ended - started).total_seconds() * 1000))
            egress = artifact.size_bytes if artifact else 0
            used = Usage(compute_ms=duration_ms, egress_bytes=egress)
            cost = actual_cents(doc.pricing, used)
            from app.domain.billing import meter_quantities

            done = await self.platform.ledger.finish(
                cast_id,
                cast.attempt,
                succeeded=True,
                cost_cents=cost,
                artifact=artifact,
                usage=meter_quantities(doc.pricing, used),
                audit=self._ended_audit(),
            )
        if done is not None:
            await self._ended(done)

    def _artifact(
        self, cast: Cast, target: CastTarget, owner: str, repo: str, arts: list[dict[str, Any]]
    ) -> Artifact | None:
        live = [a for a in arts if not a.get("expired")]
        preferred = [a for a in live if a.get("name") == f"spell-{cast.id}"] or live
        if not preferred:
            return None
        a = preferred[0]
        now = self.platform.clock.now()
        ttl_end = now + timedelta(seconds=self.platform.config.artifact_ttl)
        expires = ttl_end
        if a.get("expires_at"):
            from datetime import datetime

            gh_end = datetime.fromisoformat(str(a["expires_at"]).replace("Z", "+00:00"))
            expires = min(ttl_end, gh_end)
        return Artifact(
            id=new_id("a"),
            cast_id=cast.id,
            location=f"github:{target.installation_id}:{owner}/{repo}:{int(a['id'])}",
            digest=str(a.get("digest") or "unknown"),
            size_bytes=int(a.get("size_in_bytes") or 0),
            created_at=now,
            expires_at=expires,
        )

    async def expire_overdue(self) -> int:
        """Workflow casts past their spell's timeout: cancel the run, fail the cast TIMEOUT."""
        n = 0
        for cast in await self.platform.ledger.overdue_workflow_casts():
            target = await self.store.target(cast.id)
            if target is not None and target.repo and target.installation_id:
                owner, name = _split(target.repo)
                try:
                    run_id = target.run_id or await self._find_run(target, cast.id)
                    if run_id:
                        await self.client.cancel_run(target.installation_id, owner, name, run_id)
                except GitHubError as e:
                    log.warning("cancelling the run of cast %s failed: %s", cast.id, e)
            done = await self.platform.ledger.finish(
                cast.id,
                cast.attempt,
                succeeded=False,
                error_code="TIMEOUT",
                error_message="the workflow run did not complete within the spell's timeout_sec",
                audit=self._ended_audit(),
            )
            if done is not None:
                n += 1
                await self._ended(done)
        return n

    async def _find_run(self, target: CastTarget, cast_id: str) -> int | None:
        """The run of a dispatch GitHub answered with 204 (no run id): by its run-name."""
        if not (target.repo and target.installation_id and target.workflow_id):
            return None
        owner, name = _split(target.repo)
        since = target.dispatched_at or self.platform.clock.now() - timedelta(days=1)
        run = await self.client.find_run_by_name(
            target.installation_id,
            owner,
            name,
            target.workflow_id,
            contains=cast_id,
            created_after=since,
        )
        if run is None:
            return None
        run_id = int(run["id"])
        await self.store.update_target(cast_id, run_id=run_id)
        return run_id

    def _ended_audit(self) -> hot.AuditOf:
        """``cast.succeeded``/``cast.failed`` (+ ``ledger.charge``) of a cast this service
        ends, committed with the end (the audit outbox); see :meth:`_ended`."""
        now = self.platform.clock.now()

        def audit(c: dict[str, Any]) -> list[hot.AuditRow]:
            charged = int(c["cost_cents"] or 0)
            rows = [
                hot.AuditRow(
                    event=f"cast.{c['status']}",
                    at=now,
                    actor="github",
                    cast_id=c["id"],
                    input_hash=c["input_hash"],
                    amount_cents=charged,
                    currency=c["currency"],
                    traceparent=c["traceparent"],
                    data={"error": {"code": c["error_code"]}} if c["error_code"] else {},
                )
            ]
            if charged > 0:
                rows.append(
                    hot.AuditRow(
                        event="ledger.charge",
                        at=now,
                        actor="github",
                        cast_id=c["id"],
                        amount_cents=charged,
                        currency=c["currency"],
                        data={"account": c["caster_id"], "method": "ledger"},
                    )
                )
            return rows

        return audit

    async def _ended(self, cast: Cast) -> None:
        """After a cast ended (its audit records committed with it: :meth:`_ended_audit`)."""
        self.platform.kick_audit()
        self.platform.hub.notify(cast.id)
        self.platform.metrics.cast_count.labels(status=cast.status).inc()
        if cast.error_code:
            self.platform.metrics.errors_by_code.labels(code=cast.error_code).inc()
        # The feedback (comment, check run) follows from the github.notify job the ledger
        # queued with the state change.

    # ------------------------------------------------------------------ feedback

    async def _feedback(self, cast_id: str, *, reaction: str | None = None) -> None:
        """Create or edit the one bot comment (and check run) of a comment-driven cast."""
        target = await self.store.target(cast_id)
        if target is None or target.source != "comment" or target.repo is None:
            return
        cast = await self.platform.ledger.get_cast(cast_id)
        if cast is None or target.installation_id is None or target.issue_number is None:
            return
        owner, name = _split(target.repo)
        inst = target.installation_id
        status = await self.platform.cast_status(
            _system_caller(cast.caster_id), cast_id, base_url=self.config.public_url
        )
        fields: dict[str, Any] = {
            "cast_id": cast_id,
            "spell_id": cast.spell_id,
            "status": cast.status,
            "run_url": cast.run_url,
            "artifact_url": status.get("artifact_url"),
            "cost_cents": cast.cost_cents,
            "currency": cast.currency,
            "error_code": cast.error_code,
            "error_message": cast.error_message,
        }
        body = render.render_cast_comment(**fields)
        pr = target.head_sha is not None
        if target.bot_comment_id is None and await self.store.claim_field(
            cast_id, "bot_comment_id"
        ):
            try:
                comment_id = await self.client.create_comment(
                    inst, owner, name, target.issue_number, body, pull_request=pr
                )
            except Exception:
                await self.store.update_target(cast_id, bot_comment_id=None)
                raise
            await self.store.update_target(cast_id, bot_comment_id=comment_id)
        elif not target.bot_comment_id:
            raise RetryLater(f"the comment of cast {cast_id} is being created")
        else:
            await self.client.update_comment(
                inst, owner, name, target.bot_comment_id, body, pull_request=pr
            )
        if target.head_sha:
            state, conclusion = render.check_run_state(cast.status)
            output = render.render_check_run(**fields)
            if target.check_run_id is None and await self.store.claim_field(
                cast_id, "check_run_id"
            ):
                try:
                    check_id = await self.client.create_check_run(
                        inst,
                        owner,
                        name,
                        name=f"spell: {cast.spell_id}",
                        head_sha=target.head_sha,
                        external_id=cast_id,
                        status=state,
                        output=output,
                    )
                except Exception:
                    await self.store.update_target(cast_id, check_run_id=None)
                    raise
                await self.store.update_target(cast_id, check_run_id=check_id)
            elif not target.check_run_id:
                raise RetryLater(f"the check run of cast {cast_id} is being created")
            else:
                await self.client.update_check_run(
                    inst,
                    owner,
                    name,
                    target.check_run_id,
                    status=state,
                    conclusion=conclusion,
                    output=output,
                )
        if target.comment_id is not None:
            final = {"succeeded": "hooray", "failed": "confused"}.get(cast.status)
            for r in [reaction, final]:
                if r:
                    await self.client.add_reaction(
                        inst, owner, name, target.comment_id, r, pull_request=pr
                    )

    # ------------------------------------------------------------------ commands

    async def caller_for(self, kind: str, login: str) -> Caller | None:
        link = await self.store.linked_account(kind, login)
        if link is None:
            return None
        principal = await self.platform.ledger.ensure_principal(
            link.account_id,
            link.role,
            monthly_cap=self.platform.config.default_monthly_cap_cents,
            total_cap=self.platform.config.default_total_cap_cents,
        )
        from app.domain.auth import scopes_for

        return Caller(
            principal_id=principal,
            account_id=link.account_id,
            role=link.role,
            scopes=scopes_for(link.role),
            token_id=f"github:{kind}:{login}",
        )

    async def handle_comment(self, event: Event) -> None:
        p = event.payload
        comment = p["comment"]
        issue = p["issue"]
        repo = str(p["repository"]["full_name"])
        owner, name = _split(repo)
        inst = event.installation_id
        if inst is None:
            return
        login = str(comment["user"]["login"])
        if comment["user"].get("type") == "Bot" or login.endswith("[bot]"):
            return  # bots (and this App) never cast
        via = comment.get("performed_via_github_app") or {}
        if str(via.get("id", "")) == str(self.config.app_id):
            return
        commands = parse_comment(str(comment.get("body") or ""))
        if not commands:
            return
        comment_id = int(comment["id"])
        is_pr = bool(issue.get("pull_request"))
        await self.client.add_reaction(inst, owner, name, comment_id, "eyes", pull_request=is_pr)
        number = int(issue["number"])

        async def reply(text: str) -> None:
            await self.client.create_comment(inst, owner, name, number, text, pull_request=is_pr)

        level = await self.client.collaborator_permission(inst, owner, name, login)
        if not permission_at_least(level, self.config.command_permission):
            await reply(render.render_permission_denied(login, self.config.command_permission))
            return
        caller = await self.caller_for("user", login)
        if caller is None:
            await reply(render.render_link_help(login))
            return
        head_sha = None
        if is_pr:
            head_sha = await self.client.pull_request_head_sha(inst, owner, name, number)
        for cmd in commands:
            if isinstance(cmd, CommandError):
                await reply(render.render_command_error(cmd))
            elif isinstance(cmd, CastCommand):
                await self._cast_from_comment(
                    caller, cmd, repo, inst, number, comment_id, head_sha, reply
                )
            elif isinstance(cmd, SpellsCommand):
                items = await self.platform.search(
                    caller,
                    q=cmd.query or None,
                    tag=None,
                    sort="popular",
                    limit=10,
                    offset=0,
                    include_own=True,
                )
                await reply(render.render_spells_list(items, query=cmd.query))
            elif isinstance(cmd, CastStatusCommand):
                try:
                    st = await self.platform.cast_status(
                        caller, cmd.cast_id, base_url=self.config.public_url
                    )
                    await reply(
                        render.render_cast_comment(
                            cast_id=st["cast_id"],
                            spell_id=st["spell_id"],
                            status=st["status"],
                            run_url=st["run_url"],
                            artifact_url=st["artifact_url"],
                            cost_cents=st["cost_cents"],
                            currency=st["currency"],
                            error_code=(st.get("error") or {}).get("code"),
                            error_message=(st.get("error") or {}).get("message"),
                            marker=False,
                        )
                    )
                except AppError as e:
                    await reply(render.message_markdown(f"{e.code}: {e.message}"))
            elif isinstance(cmd, CapCommand):
                await reply(render.render_cap(await self.platform.get_caps(caller, None)))

    async def _cast_from_comment(
        self,
        caller: Caller,
        cmd: CastCommand,
        repo: str,
        inst: int,
        number: int,
        comment_id: int,
        head_sha: str | None,
        reply: Any,
    ) -> None:
        body: dict[str, Any] = {"input": cmd.input}
        if cmd.mode:
            body["mode"] = cmd.mode
        if cmd.version:
            body["version"] = cmd.version
        try:
            _, resp, _replayed = await self.platform.cast(
                caller,
                cmd.spell_id,
                body,
                idempotency_key=f"gh-comment:{comment_id}:{cmd.line}",
                traceparent=new_traceparent(),
                base_url=self.config.public_url,
                origin=CastOrigin(
                    source="comment",
                    installation_id=inst,
                    repo=repo,
                    issue_number=number,
                    comment_id=comment_id,
                    head_sha=head_sha,
                ),
            )
        except AppError as e:
            owner, name = _split(repo)
            await self.client.add_reaction(
                inst, owner, name, comment_id, "confused", pull_request=head_sha is not None
            )
            await reply(
                render.message_markdown(f"`/cast {cmd.spell_id}` refused — {e.code}: {e.message}")
            )
            return
        # Also on a replay: a retried job must still create the bot comment.
        await self._feedback(str(resp["cast_id"]), reaction="rocket")

    async def handle_repository_dispatch(self, event: Event) -> None:
        p = event.payload
        if p.get("action") != "spell.cast" or event.installation_id is None:
            return
        repo = str(p["repository"]["full_name"])
        owner = repo.split("/")[0]
        payload = p.get("client_payload") or {}
        caller = await self.caller_for("owner", owner)
        if caller is None:
            log.warning("repository_dispatch from %s: owner %s is not linked", repo, owner)
            return
        key = str(payload.get("idempotency_key") or f"gh-dispatch:{event.delivery_id}")
        try:
            await self.platform.cast(
                caller,
                str(payload.get("spell", "")),
                {"input": payload.get("input") or {}},
                idempotency_key=key[:255],
                traceparent=new_traceparent(),
                base_url=self.config.public_url,
                origin=CastOrigin(
                    source="repository_dispatch", installation_id=event.installation_id, repo=repo
                ),
            )
        except AppError as e:
            log.warning("repository_dispatch cast from %s refused: %s %s", repo, e.code, e.message)


def _system_caller(account_id: str) -> Caller:
    return Caller(
        principal_id="system",
        account_id=account_id,
        role="caster",
        scopes=frozenset({"cast:invoke"}),
        token_id="system",  # noqa: S106 - an id, not a secret
    )


# ---------------------------------------------------------------------- event handlers


def _repos(items: Any) -> list[tuple[str, int, bool]]:
    return [(str(r["full_name"]), int(r["id"]), bool(r.get("private"))) for r in items or []]


@router.register("installation", action="created")
@router.register("installation", action="new_permissions_accepted")
async def on_installation_created(event: Event, gh: GitHubService) -> None:
    inst = event.payload["installation"]
    await gh.store.upsert_installation(
        int(inst["id"]),
        account_login=str(inst["account"]["login"]),
        account_type=str(inst["account"].get("type", "User")),
        repository_selection=str(inst.get("repository_selection", "selected")),
        repos=_repos(event.payload.get("repositories")),
        replace_repos=event.action == "created",
    )


@router.register("installation", action="deleted")
async def on_installation_deleted(event: Event, gh: GitHubService) -> None:
    await gh.store.set_installation_state(int(event.payload["installation"]["id"]), deleted=True)


@router.register("installation", action="suspend")
async def on_installation_suspend(event: Event, gh: GitHubService) -> None:
    await gh.store.set_installation_state(int(event.payload["installation"]["id"]), suspended=True)


@router.register("installation", action="unsuspend")
async def on_installation_unsuspend(event: Event, gh: GitHubService) -> None:
    await gh.store.set_installation_state(int(event.payload["installation"]["id"]), suspended=False)


@router.register("installation_repositories", action="added")
async def on_repos_added(event: Event, gh: GitHubService) -> None:
    inst = event.payload["installation"]
    await gh.store.upsert_installation(
        int(inst["id"]),
        account_login=str(inst["account"]["login"]),
        account_type=str(inst["account"].get("type", "User")),
        repository_selection=str(event.payload.get("repository_selection", "selected")),
        repos=_repos(event.payload.get("repositories_added")),
    )


@router.register("installation_repositories", action="removed")
async def on_repos_removed(event: Event, gh: GitHubService) -> None:
    await gh.store.remove_repos(
        int(event.payload["installation"]["id"]),
        [str(r["full_name"]) for r in event.payload.get("repositories_removed") or []],
    )


@router.register("issue_comment", action="created")
async def on_comment_created(event: Event, gh: GitHubService) -> None:
    await gh.handle_comment(event)


@router.register("issue_comment", action="edited")
async def on_comment_edited(event: Event, gh: GitHubService) -> None:
    if gh.config.allow_edited_comments:
        await gh.handle_comment(event)


@router.register("repository_dispatch")
async def on_repository_dispatch(event: Event, gh: GitHubService) -> None:
    await gh.handle_repository_dispatch(event)


@router.register("workflow_run", action="completed")
async def on_workflow_run_completed(event: Event, gh: GitHubService) -> None:
    await gh.complete_run(
        str(event.payload["repository"]["full_name"]), event.payload["workflow_run"]
    )


__all__ = ["GitHubConfig", "GitHubGone", "GitHubService", "permission_at_least", "router"]
