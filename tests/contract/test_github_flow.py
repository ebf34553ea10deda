"""The GitHub App end to end against the contract-enforcing fake GitHub and real webhook payloads.

signed issue_comment → inbox → jobs queue → permission check → dispatch → signed workflow_run →
artifacts → bot comment edited → cast settled; and the refusals around it.
"""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.config import Settings
from app.store.auditlog import verify_file
from app.store.github_store import GitHubStore
from app.web.app import Overrides, create_app
from tests.conftest import FakeSandbox, Harness
from tests.contract.contracts import webhook_examples
from tests.contract.fake_github import FakeGitHub
from tests.contract.test_audit_outbox_records import (
    as_committed,
    drained,
    in_file,
)

SECRET = "webhook-secret-for-tests"
REPO = "octo-org/app-repo"
INSTALLATION = 4242
WF_SPELL = "com.example.wf"


@pytest.fixture
async def fake() -> AsyncIterator[FakeGitHub]:
    gh = FakeGitHub()
    gh.add_installation(
        INSTALLATION,
        "octo-org",
        ["app-repo"],
        {
            "contents": "read",
            "actions": "write",
            "issues": "write",
            "pull_requests": "write",
            "checks": "write",
        },
    )
    gh.set_permission(REPO, "octocat", "write")
    gh.set_permission(REPO, "reader", "read")
    gh.add_workflow(REPO, "spell-run.yml")
    await gh.start()
    yield gh
    await gh.close()
    assert gh.violations == []
    assert gh.response_violations == []


@pytest.fixture
def settings(tmp_path: Any, database_url: str | None, fake: FakeGitHub) -> Settings:
    return Settings(
        SPELL_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=database_url,
        SPELL_SECRET_KEY="s" * 40,
        SPELL_PUBLIC_URL="http://spell.test",
        GITHUB_APP_ID=fake.app_id,
        GITHUB_APP_PRIVATE_KEY=fake.private_key_pem,
        GITHUB_WEBHOOK_SECRET=SECRET,
        GITHUB_API_URL=fake.url,
    )


@pytest.fixture
async def gh_harness(aiohttp_client: Any, settings: Settings) -> Harness:
    sandbox = FakeSandbox()
    app = create_app(settings, overrides=Overrides(sandbox=sandbox, job_backoff=0.05))
    client = await aiohttp_client(app)
    return Harness(client=client, settings=settings, sandbox=sandbox)


def example(event: str, **match: Any) -> dict[str, Any]:
    for ex in webhook_examples()[event]:
        if all(ex.get(k) == v for k, v in match.items()):
            return ex
    raise LookupError(f"no {event} example with {match}")


async def deliver(h: Harness, fake: FakeGitHub, event: str, payload: dict[str, Any]) -> Any:
    headers, body = fake.sign_webhook(event, payload, SECRET)
    r = await h.client.post("/webhooks/github", data=body, headers=headers)
    return r, headers["X-GitHub-Delivery"]


async def processed(h: Harness, delivery_id: str, timeout: float = 10.0) -> str:
    inbox = h.client.app[__import__("app.web.keys", fromlist=["INBOX"]).INBOX]  # type: ignore[index]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        d = await inbox.get(delivery_id)
        if d is not None and d.status in ("done", "ignored", "dead"):
            return str(d.status)
        assert asyncio.get_running_loop().time() < deadline, f"delivery not processed: {d}"
        await asyncio.sleep(0.02)


async def run_completed(h: Harness, fake: FakeGitHub, run: Any) -> dict[str, Any]:
    """Deliver GitHub's ``workflow_run`` completed (success) for ``run``, wait until the
    platform has processed it; the payload (to deliver again)."""
    wr = example("workflow_run", action="completed")
    wr["installation"] = {"id": INSTALLATION, "node_id": "MDIz"}
    wr["repository"]["full_name"] = REPO
    wr["workflow_run"]["id"] = run.id
    wr["workflow_run"]["conclusion"] = "success"
    wr["workflow_run"]["display_title"] = run.display_title
    _r, delivery = await deliver(h, fake, "workflow_run", wr)
    await processed(h, delivery)
    return wr


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


async def dispatch_recorded(h: Harness, cast_id: str) -> None:
    """Wait until the dispatch job recorded the dispatch (not only sent it to GitHub)."""
    store = GitHubStore(h.platform.ledger, h.platform.clock)

    async def recorded() -> bool:
        target = await store.target(cast_id)
        return target is not None and target.dispatched_at is not None

    await until(recorded)


class JobMsg:
    """A job delivery, for calling a handler directly."""

    msg_id = "m"
    num_delivered = 1
    dead = False

    def __init__(self, payload: dict[str, Any], *, subject: str) -> None:
        self.payload = payload
        self.subject = subject
        self.headers: dict[str, str] = {}

    async def ack(self) -> None: ...
    async def nak(self, delay: float | None = None) -> None: ...
    async def in_progress(self) -> None: ...


class Later:
    """A clock some seconds ahead of another (to pass a deadline)."""

    def __init__(self, clock: Any, *, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds

    def now(self) -> Any:
        from datetime import timedelta

        return self.clock.now() + timedelta(seconds=self.seconds)


def _installation_payload() -> dict[str, Any]:
    p = example("installation", action="created")
    p["installation"]["id"] = INSTALLATION
    p["installation"]["account"]["login"] = "octo-org"
    p["repositories"] = [
        {"id": 99, "name": "app-repo", "full_name": REPO, "private": True, "node_id": "R_1"}
    ]
    return p


def _comment_payload(
    fake: FakeGitHub,
    body: str,
    *,
    user: str = "octocat",
    user_type: str = "User",
    pr: bool = False,
    number: int = 7,
) -> dict[str, Any]:
    p = example("issue_comment", action="created")
    comment = fake.add_comment(REPO, number, body, user=user)
    p["installation"] = {"id": INSTALLATION, "node_id": "MDIz"}
    p["repository"]["full_name"] = REPO
    p["repository"]["name"] = "app-repo"
    p["repository"]["owner"]["login"] = "octo-org"
    p["comment"]["id"] = comment.id
    p["comment"]["body"] = body
    p["comment"]["user"]["login"] = user
    p["comment"]["user"]["type"] = user_type
    p["comment"].pop("performed_via_github_app", None)
    p["issue"]["number"] = number
    if pr:
        fake.add_pull_request(REPO, number, head_sha="b" * 40)
        p["issue"]["pull_request"] = {"url": f"https://api.github.com/repos/{REPO}/pulls/{number}"}
    else:
        p["issue"].pop("pull_request", None)
    return p


async def _setup(h: Harness, fake: FakeGitHub, *, flat_cents: int = 5) -> None:
    r, delivery = await deliver(h, fake, "installation", _installation_payload())
    assert r.status == 202, await r.text()
    assert await processed(h, delivery) == "done"
    store = GitHubStore(h.platform.ledger, h.platform.clock)
    await h.token("ACME", "caster")
    await store.link("user", "octocat", "ACME")
    await store.link("user", "reader", "ACME")
    maker = await h.token("makers", "maker")
    doc = {
        "id": WF_SPELL,
        "name": "Workflow spell",
        "execution": {
            "mode": "workflow",
            "timeout_sec": 600,
            "workflow": {"repo": REPO, "workflow_id": "spell-run.yml"},
        },
        "pricing": {"model": "flat", "currency": "USD", "flat_cents": flat_cents},
        "inputs": {"type": "object", "properties": {"name": {"type": "string"}}},
    }
    r = await h.client.post("/v1/spells", json=doc, headers={"Authorization": f"Bearer {maker}"})
    assert r.status == 201, await r.text()


async def test_a_cast_comment_dispatches_the_workflow_and_settles_on_completion(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    h = gh_harness
    await _setup(h, fake)
    payload = _comment_payload(fake, f"/cast {WF_SPELL} name=world", pr=True)
    r, delivery = await deliver(h, fake, "issue_comment", payload)
    assert r.status == 202
    await processed(h, delivery)

    async def sent() -> bool:  # the dispatch runs as its own job after the comment's
        return bool(fake.requests_for("actions/create-workflow-dispatch"))

    await until(sent)
    dispatches = fake.requests_for("actions/create-workflow-dispatch")
    assert len(dispatches) == 1
    inputs = dispatches[0].body["inputs"]
    assert json.loads(inputs["payload"]) == {"name": "world"}
    cast_id = inputs["cast_id"]
    run = next(r for r in fake.runs.values() if cast_id in r.display_title or cast_id in r.name)

    ledger = h.platform.ledger
    store = GitHubStore(ledger, h.platform.clock)

    async def recorded() -> bool:
        target = await store.target(cast_id)
        return target is not None and target.dispatched_at is not None

    await until(recorded)
    cast = await ledger.get_cast(cast_id)
    assert cast is not None and cast.status == "running" and cast.mode == "workflow"
    assert cast.run_url

    fake.complete_run(
        run.id, "success", artifacts=[{"name": f"spell-{cast_id}", "files": {"hello.txt": b"hi"}}]
    )
    await run_completed(h, fake, run)

    async def settled() -> bool:
        c = await ledger.get_cast(cast_id)
        return c is not None and c.status == "succeeded"

    await until(settled)
    caps = await ledger.budget("ACME")
    assert caps is not None
    assert (caps.monthly.used_cents, caps.monthly.reserved_cents) == (5, 0)

    # One bot comment, edited in place to the final state; a check run on the PR head.
    async def comment_final() -> bool:
        mine = [c for c in fake.comments.values() if f"spell-cast:{cast_id}" in c.body]
        return len(mine) == 1 and "succeeded" in mine[0].body.lower()

    await until(comment_final)
    assert fake.requests_for("checks/create")[0].body["head_sha"] == "b" * 40

    def reactions() -> list[str]:
        return [r.body["content"] for r in fake.requests_for("reactions/create-for-issue-comment")]

    async def cheered() -> bool:
        return "hooray" in reactions()

    await until(cheered)
    assert reactions()[0] == "eyes" and "rocket" in reactions()
    checks = fake.requests_for("checks/update")
    assert checks and checks[-1].body["conclusion"] == "success"

    # The artifact link mints a fresh GitHub URL per request.
    token = await h.token("ACME", "caster")
    st = await (
        await h.client.get(f"/v1/casts/{cast_id}", headers={"Authorization": f"Bearer {token}"})
    ).json()
    path = st["artifact_url"][st["artifact_url"].index("/v1/") :]
    r = await h.client.get(path, allow_redirects=False)
    assert r.status == 302
    import httpx

    async with httpx.AsyncClient() as http:
        z = (await http.get(r.headers["Location"])).content
    assert zipfile.ZipFile(io.BytesIO(z)).read("hello.txt") == b"hi"


async def test_a_redelivered_comment_never_casts_twice(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    h = gh_harness
    await _setup(h, fake)
    payload = _comment_payload(fake, f"/cast {WF_SPELL} name=a")
    headers, body = fake.sign_webhook("issue_comment", payload, SECRET)
    r1 = await h.client.post("/webhooks/github", data=body, headers=headers)
    r2 = await h.client.post("/webhooks/github", data=body, headers=headers)
    assert (r1.status, r2.status) == (202, 200)
    assert (await r2.json())["duplicate"] is True
    await processed(h, headers["X-GitHub-Delivery"])
    # A second delivery id for the same comment (GitHub re-sent the event) is still one cast.
    _r, delivery = await deliver(h, fake, "issue_comment", payload)
    await processed(h, delivery)

    async def sent() -> bool:
        return bool(fake.requests_for("actions/create-workflow-dispatch"))

    await until(sent)
    await asyncio.sleep(0.3)  # room for a wrong second dispatch to show up
    assert len(fake.requests_for("actions/create-workflow-dispatch")) == 1
    assert await h.platform.ledger.count_casts() == 1


async def test_a_bad_signature_is_401_and_nothing_is_stored(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    headers, body = fake.sign_webhook("issue_comment", {"x": 1}, "not-the-secret")
    r = await gh_harness.client.post("/webhooks/github", data=body, headers=headers)
    assert r.status == 401
    assert (await r.json())["error"]["code"] == "UNAUTHORIZED"
    del headers["X-Hub-Signature-256"]
    r = await gh_harness.client.post("/webhooks/github", data=body, headers=headers)
    assert r.status == 401


async def test_bot_comments_are_ignored(gh_harness: Harness, fake: FakeGitHub) -> None:
    h = gh_harness
    await _setup(h, fake)
    payload = _comment_payload(fake, f"/cast {WF_SPELL}", user="dependabot[bot]", user_type="Bot")
    _r, delivery = await deliver(h, fake, "issue_comment", payload)
    await processed(h, delivery)
    assert fake.requests_for("reactions/create-for-issue-comment") == []
    assert await h.platform.ledger.count_casts() == 0


async def test_a_commenter_without_write_permission_gets_an_explanation(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    h = gh_harness
    await _setup(h, fake)
    payload = _comment_payload(fake, f"/cast {WF_SPELL}", user="reader")
    _r, delivery = await deliver(h, fake, "issue_comment", payload)
    await processed(h, delivery)
    assert await h.platform.ledger.count_casts() == 0
    replies = [r.body["body"] for r in fake.requests_for("issues/create-comment")]
    assert len(replies) == 1 and "write" in replies[0]


async def test_an_unlinked_commenter_is_told_how_to_link(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    h = gh_harness
    await _setup(h, fake)
    fake.set_permission(REPO, "stranger", "admin")
    payload = _comment_payload(fake, f"/cast {WF_SPELL}", user="stranger")
    _r, delivery = await deliver(h, fake, "issue_comment", payload)
    await processed(h, delivery)
    replies = [r.body["body"] for r in fake.requests_for("issues/create-comment")]
    assert len(replies) == 1 and "spell github link" in replies[0]


async def test_a_repo_the_app_cannot_reach_is_403_forbidden_repo(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    h = gh_harness
    await _setup(h, fake)
    token = await h.token("ACME", "caster")
    r = await h.client.post(
        f"/v1/spells/{WF_SPELL}:cast",
        json={"input": {}, "repo": "someone/private-repo"},
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k"},
    )
    assert r.status == 403
    err = (await r.json())["error"]
    assert err["code"] == "FORBIDDEN_REPO"
    assert "install" in err["message"]


async def test_a_missing_workflow_fails_the_cast_with_workflow_not_found(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    h = gh_harness
    await _setup(h, fake)
    fake.add_installation(77, "other-org", ["bare"], {"actions": "write", "issues": "write"})
    p = _installation_payload()
    p["installation"]["id"] = 77
    p["installation"]["account"]["login"] = "other-org"
    p["repositories"] = [
        {"id": 5, "name": "bare", "full_name": "other-org/bare", "private": False, "node_id": "R_2"}
    ]
    r, delivery = await deliver(h, fake, "installation", p)
    await processed(h, delivery)
    token = await h.token("ACME", "caster")
    r = await h.client.post(
        f"/v1/spells/{WF_SPELL}:cast",
        json={"input": {}, "repo": "other-org/bare"},
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k2"},
    )
    assert r.status == 202, await r.text()
    cast_id = (await r.json())["cast_id"]
    done = await h.wait_cast(token, cast_id)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "WORKFLOW_NOT_FOUND"
    caps = await h.platform.ledger.budget("ACME")
    assert caps is not None and caps.monthly.reserved_cents == 0


async def test_an_expired_github_artifact_is_410(gh_harness: Harness, fake: FakeGitHub) -> None:
    h = gh_harness
    await _setup(h, fake)
    token = await h.token("ACME", "caster")
    r = await h.client.post(
        f"/v1/spells/{WF_SPELL}:cast",
        json={"input": {}},
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k3"},
    )
    cast_id = (await r.json())["cast_id"]

    await dispatch_recorded(h, cast_id)
    run = next(r for r in fake.runs.values() if cast_id in r.display_title or cast_id in r.name)
    arts = fake.complete_run(
        run.id, "success", artifacts=[{"name": f"spell-{cast_id}", "files": {"a": b"1"}}]
    )
    gh = h.client.app[__import__("app.web.keys", fromlist=["GITHUB"]).GITHUB]  # type: ignore[index]
    await gh.complete_run(REPO, {"id": run.id, "conclusion": "success"})
    st = await h.wait_cast(token, cast_id)
    assert st["status"] == "succeeded"
    arts[0].expired = True  # GitHub's retention removed it
    path = st["artifact_url"][st["artifact_url"].index("/v1/") :]
    r = await h.client.get(path, allow_redirects=False)
    assert r.status == 410
    assert (await r.json())["error"]["code"] == "ARTIFACT_EXPIRED"


async def test_repository_dispatch_casts_for_the_linked_owner(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    h = gh_harness
    await _setup(h, fake)
    store = GitHubStore(h.platform.ledger, h.platform.clock)
    await store.link("owner", "octo-org", "ACME")
    p = example("repository_dispatch")
    p["action"] = "spell.cast"
    p["installation"] = {"id": INSTALLATION, "node_id": "MDIz"}
    p["repository"]["full_name"] = REPO
    p["client_payload"] = {"spell": WF_SPELL, "input": {"name": "rd"}, "idempotency_key": "rd-1"}
    r, delivery = await deliver(h, fake, "repository_dispatch", p)
    assert r.status == 202
    await processed(h, delivery)

    async def dispatched() -> bool:
        return bool(fake.requests_for("actions/create-workflow-dispatch"))

    await until(dispatched)
    body = fake.requests_for("actions/create-workflow-dispatch")[0].body
    assert json.loads(body["inputs"]["payload"]) == {"name": "rd"}
    # The same idempotency key from another delivery is the same cast.
    r, delivery = await deliver(h, fake, "repository_dispatch", p)
    await processed(h, delivery)
    assert await h.platform.ledger.count_casts() == 1


async def test_a_fork_authors_command_on_a_pr_is_refused(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    h = gh_harness
    await _setup(h, fake)
    store = GitHubStore(h.platform.ledger, h.platform.clock)
    await store.link("user", "forker", "ACME")  # linked, but only read access to the repo
    fake.set_permission(REPO, "forker", "read")
    payload = _comment_payload(fake, f"/cast {WF_SPELL}", user="forker", pr=True, number=9)
    _r, delivery = await deliver(h, fake, "issue_comment", payload)
    await processed(h, delivery)
    assert await h.platform.ledger.count_casts() == 0
    assert fake.requests_for("actions/create-workflow-dispatch") == []


async def test_spells_cap_and_status_commands_reply(gh_harness: Harness, fake: FakeGitHub) -> None:
    h = gh_harness
    await _setup(h, fake)
    payload = _comment_payload(
        fake, "/spells workflow\n/cap\n/cast-status c_000000000000000000000000"
    )
    _r, delivery = await deliver(h, fake, "issue_comment", payload)
    await processed(h, delivery)
    replies = [r.body["body"] for r in fake.requests_for("issues/create-comment")]
    assert len(replies) == 3
    assert WF_SPELL in replies[0]
    assert "monthly" in replies[1].lower()
    assert "not found" in replies[2]


async def test_removed_and_suspended_repos_are_forbidden(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    h = gh_harness
    await _setup(h, fake)
    token = await h.token("ACME", "caster")

    async def cast(key: str) -> Any:
        return await h.client.post(
            f"/v1/spells/{WF_SPELL}:cast",
            json={"input": {}},
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
        )

    p = example("installation", action="suspend")
    p["installation"]["id"] = INSTALLATION
    r, delivery = await deliver(h, fake, "installation", p)
    await processed(h, delivery)
    assert (await cast("a")).status == 403
    p = example("installation", action="unsuspend")
    p["installation"]["id"] = INSTALLATION
    r, delivery = await deliver(h, fake, "installation", p)
    await processed(h, delivery)
    assert (await cast("b")).status == 202
    p = example("installation_repositories", action="removed")
    p["installation"]["id"] = INSTALLATION
    p["repositories_removed"] = [
        {"id": 99, "name": "app-repo", "full_name": REPO, "private": True, "node_id": "R_1"}
    ]
    r, delivery = await deliver(h, fake, "installation_repositories", p)
    await processed(h, delivery)
    r = await cast("c")
    assert r.status == 403
    assert (await r.json())["error"]["code"] == "FORBIDDEN_REPO"


async def test_a_workflow_run_past_its_timeout_is_cancelled_and_fails_timeout(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    h = gh_harness
    await _setup(h, fake)
    token = await h.token("ACME", "caster")
    r = await h.client.post(
        f"/v1/spells/{WF_SPELL}:cast",
        json={"input": {}},
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "slow"},
    )
    cast_id = (await r.json())["cast_id"]

    await dispatch_recorded(h, cast_id)

    ledger = h.platform.ledger
    ledger.clock = Later(ledger.clock, seconds=601)
    gh = h.client.app[__import__("app.web.keys", fromlist=["GITHUB"]).GITHUB]  # type: ignore[index]
    assert await gh.expire_overdue() == 1
    done = await ledger.get_cast(cast_id)
    assert done is not None and done.status == "failed" and done.error_code == "TIMEOUT"
    assert len(fake.requests_for("actions/cancel-workflow-run")) == 1


async def test_without_run_details_the_run_is_found_by_its_name_to_cancel_it(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    h = gh_harness
    await _setup(h, fake)
    fake.reject_return_run_details = True  # an older GitHub Enterprise Server: 204, no run id
    token = await h.token("ACME", "caster")
    r = await h.client.post(
        f"/v1/spells/{WF_SPELL}:cast",
        json={"input": {}},
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "old-ghes"},
    )
    cast_id = (await r.json())["cast_id"]
    store = GitHubStore(h.platform.ledger, h.platform.clock)

    async def dispatched() -> bool:
        target = await store.target(cast_id)
        return target is not None and target.dispatched_at is not None

    await until(dispatched)
    target = await store.target(cast_id)
    assert target is not None and target.run_id is None

    h.platform.ledger.clock = Later(h.platform.ledger.clock, seconds=601)
    gh = h.client.app[__import__("app.web.keys", fromlist=["GITHUB"]).GITHUB]  # type: ignore[index]
    assert await gh.expire_overdue() == 1
    cancels = fake.requests_for("actions/cancel-workflow-run")
    assert len(cancels) == 1
    run = next(r for r in fake.runs.values() if cast_id in r.display_title or cast_id in r.name)
    assert str(run.id) in cancels[0].path


# ---------------------------------------------------------------------- the audit outbox


async def test_dispatch_and_completion_commit_their_audit_records_with_them(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    """``cast.dispatched`` commits with the target's dispatched_at, ``cast.succeeded`` and
    ``ledger.charge`` with the end of the cast: none is appended behind the drainer's back,
    a redelivered job records nothing more, each reaches the file once after a drain."""
    h = gh_harness
    await _setup(h, fake)
    token = await h.token("ACME", "caster")
    gh = h.client.app[__import__("app.web.keys", fromlist=["GITHUB"]).GITHUB]  # type: ignore[index]
    async with h.drains_held():
        r = await h.client.post(
            f"/v1/spells/{WF_SPELL}:cast",
            json={"input": {"name": "a"}},
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "outbox"},
        )
        assert r.status == 202, await r.text()
        cast_id = (await r.json())["cast_id"]
        await dispatch_recorded(h, cast_id)
        cast = await h.platform.ledger.get_cast(cast_id)
        assert cast is not None
        run = next(r for r in fake.runs.values() if cast_id in r.display_title or cast_id in r.name)
        [dispatched] = await h.pending_audit("cast.dispatched")
        assert (dispatched["actor"], dispatched["cast_id"]) == ("github", cast_id)
        assert dispatched["traceparent"] == cast.traceparent and cast.traceparent
        assert dispatched["data"] == {"repo": REPO, "run_id": run.id}
        assert (dispatched["amount_cents"], dispatched["input_hash"]) == (None, None)
        assert in_file(h, "cast.dispatched") == []
        # the dispatch job delivered again: nothing dispatched, nothing recorded
        await gh.on_dispatch_job(JobMsg({"cast_id": cast_id}, subject="github.dispatch"))
        assert len(fake.requests_for("actions/create-workflow-dispatch")) == 1
        assert len(await h.pending_audit("cast.dispatched")) == 1

        fake.complete_run(
            run.id, "success", artifacts=[{"name": f"spell-{cast_id}", "files": {"a": b"1"}}]
        )
        wr = await run_completed(h, fake, run)
        [ended] = [r for r in await h.pending_audit("cast.succeeded") if r["cast_id"] == cast_id]
        assert (ended["actor"], ended["amount_cents"], ended["currency"]) == ("github", 5, "USD")
        assert (ended["input_hash"], ended["traceparent"]) == (cast.input_hash, cast.traceparent)
        assert ended["data"] == {}
        [charge] = [r for r in await h.pending_audit("ledger.charge") if r["cast_id"] == cast_id]
        assert (charge["actor"], charge["amount_cents"], charge["currency"]) == ("github", 5, "USD")
        assert charge["data"] == {"account": "ACME", "method": "ledger"}
        assert in_file(h, "cast.succeeded") == in_file(h, "ledger.charge") == []
        # the completion delivered again (a new delivery id): the cast ended, nothing more
        _r, again = await deliver(h, fake, "workflow_run", wr)
        await processed(h, again)
        assert (
            len(await h.pending_audit("cast.succeeded"))
            == len(await h.pending_audit("ledger.charge"))
            == 1
        )
    [record] = await drained(h, "cast.dispatched")
    as_committed(record, dispatched)
    [record] = await drained(h, "cast.succeeded")
    as_committed(record, ended)
    [record] = await drained(h, "ledger.charge")
    as_committed(record, charge)
    head = await h.platform.ledger.audit_head("main")
    assert verify_file(h.settings.data_dir / "audit" / "audit.jsonl", expected_head=head).ok


async def test_a_timed_out_or_undispatchable_cast_commits_its_failure_record_with_it(
    gh_harness: Harness, fake: FakeGitHub
) -> None:
    h = gh_harness
    await _setup(h, fake)
    token = await h.token("ACME", "caster")
    gh = h.client.app[__import__("app.web.keys", fromlist=["GITHUB"]).GITHUB]  # type: ignore[index]
    ids = []
    for key in ("slow", "dead"):
        r = await h.client.post(
            f"/v1/spells/{WF_SPELL}:cast",
            json={"input": {}},
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
        )
        ids.append((await r.json())["cast_id"])
    slow, dead = ids
    await dispatch_recorded(h, slow)
    await dispatch_recorded(h, dead)
    async with h.drains_held():
        h.platform.ledger.clock = Later(h.platform.ledger.clock, seconds=601)
        # the dispatch job of one dead-lettered (as if): it fails; the other times out
        await gh.on_dead_job(JobMsg({"cast_id": dead}, subject="github.dispatch"), "boom")
        assert await gh.expire_overdue() == 1
        rows = {r["cast_id"]: r for r in await h.pending_audit("cast.failed")}
        assert rows[slow]["data"] == {"error": {"code": "TIMEOUT"}}
        assert rows[dead]["data"] == {"error": {"code": "INTERNAL"}}
        for row in rows.values():
            assert (row["actor"], row["amount_cents"], row["currency"]) == ("github", 0, "USD")
        assert await h.pending_audit("ledger.charge") == []
        assert in_file(h, "cast.failed") == []
        await gh.on_dead_job(JobMsg({"cast_id": dead}, subject="github.dispatch"), "boom")
        assert await gh.expire_overdue() == 0
        assert len(await h.pending_audit("cast.failed")) == 2
    records = {r["cast_id"]: r for r in await drained(h, "cast.failed")}
    assert set(records) == {slow, dead}
    for cast_id, row in rows.items():
        as_committed(records[cast_id], row)
