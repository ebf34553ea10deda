"""The GitHub client against a fake GitHub that enforces GitHub's official OpenAPI contract."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
import zipfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from app.github.appauth import TokenCache, app_jwt, token_key
from app.github.client import (
    CALL_PERMISSIONS,
    PULL_REQUEST_PERMISSIONS,
    DispatchLimitError,
    GitHubClient,
    GitHubError,
    GitHubForbidden,
    GitHubGone,
    GitHubNotFound,
    GitHubValidationFailed,
    error_from_response,
)
from tests.contract.contracts import (
    OpenAPIContract,
    github_contract,
    openapi_to_jsonschema,
    webhook_examples,
)
from tests.contract.fake_github import FakeGitHub, new_token

OWNER, REPO, OTHER = "octo-org", "app-repo", "other-repo"
SHA = "a" * 40
ALL_PERMISSIONS = {
    "metadata": "read",
    "contents": "write",
    "actions": "write",
    "issues": "write",
    "pull_requests": "write",
    "checks": "write",
}


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def fake(clock: Clock) -> AsyncIterator[FakeGitHub]:
    contract = github_contract()  # installs the contracts on first use
    f = FakeGitHub(clock=clock, contract=contract)
    f.add_installation(1, OWNER, [REPO, OTHER], ALL_PERMISSIONS)
    f.add_workflow(f"{OWNER}/{REPO}", "spell-run.yml", name="spell")
    async with f.serve():
        yield f
    # Whatever a test did, every response the fake gave must satisfy the response schemas.
    assert f.response_violations == []


@pytest.fixture
async def gh(fake: FakeGitHub, clock: Clock) -> AsyncIterator[GitHubClient]:
    client = GitHubClient(fake.url, fake.app_id, fake.private_key_pem, clock=clock)
    yield client
    await client.aclose()


def scopes(fake: FakeGitHub, operation_id: str) -> list[tuple[tuple[str, ...], dict[str, str]]]:
    out = []
    for r in fake.requests_for(operation_id):
        assert r.token is not None, f"{operation_id} was not called with an installation token"
        out.append((r.token.repositories, r.token.permissions))
    return out


# ----------------------------------------------------------------------------- App JWT


def test_app_jwt_is_rs256_backdated_60s_and_lives_under_10_minutes(fake: FakeGitHub) -> None:
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    token = app_jwt("424242", fake.private_key_pem, now=now)

    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    claims = jwt.decode(
        token,
        fake.public_key_pem,
        algorithms=["RS256"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["iss"] == "424242"
    assert claims["iat"] == int(now.timestamp()) - 60
    assert claims["exp"] == int(now.timestamp()) + 9 * 60
    assert claims["exp"] - claims["iat"] <= 600


def test_app_jwt_refuses_a_naive_time(fake: FakeGitHub) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        app_jwt("1", fake.private_key_pem, now=datetime(2026, 1, 1))


def _jwt(fake: FakeGitHub, clock: Clock, *, iat: int, exp: int, key: str | None = None) -> str:
    now = int(clock().timestamp())
    claims = {"iat": now + iat, "exp": now + exp, "iss": fake.app_id}
    return jwt.encode(claims, key or fake.private_key_pem, algorithm="RS256")


@pytest.mark.parametrize(
    ("iat", "exp", "message"),
    [
        pytest.param(-60, 660, "too far in the future", id="exp-more-than-10-minutes-ahead"),
        pytest.param(-700, 0, "future time", id="expired"),
        pytest.param(30, 300, "'iat'", id="issued-in-the-future"),
    ],
)
async def test_the_fake_enforces_githubs_jwt_rules(
    fake: FakeGitHub, clock: Clock, iat: int, exp: int, message: str
) -> None:
    token = _jwt(fake, clock, iat=iat, exp=exp)
    async with httpx.AsyncClient() as http:
        r = await http.get(
            f"{fake.url}/app",
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
                "User-Agent": "test",
            },
        )
    assert r.status_code == 401
    assert message in r.json()["message"]
    assert len(fake.auth_failures) == 1


async def test_a_jwt_signed_with_another_key_is_rejected(fake: FakeGitHub, clock: Clock) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    client = GitHubClient(fake.url, fake.app_id, other_pem, clock=clock)
    with pytest.raises(GitHubError) as err:
        await client.get_app()
    assert err.value.status == 401
    assert "could not be decoded" in err.value.message
    await client.aclose()


# ------------------------------------------------------------------------- App level


async def test_get_app_and_list_installations_over_pages(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    for i in range(2, 152):
        fake.add_installation(i, f"acct-{i}", [f"repo-{i}"], {"actions": "read"})

    app = await gh.get_app()
    installations = await gh.list_installations()

    assert app["id"] == int(fake.app_id)
    assert app["slug"] == fake.app_slug
    assert sorted(i["id"] for i in installations) == list(range(1, 152))
    assert len(fake.requests_for("apps/list-installations")) == 2  # per_page=100 + Link next
    assert all(r.auth == "jwt" for r in fake.requests_for("apps/list-installations"))
    assert fake.violations == []


async def test_every_request_carries_the_pinned_headers(fake: FakeGitHub, gh: GitHubClient) -> None:
    await gh.get_app()
    await gh.default_branch(1, OWNER, REPO)

    for r in fake.requests:
        assert r.headers["Accept"] == "application/vnd.github+json"
        assert r.headers["X-GitHub-Api-Version"] == "2022-11-28"
        assert r.headers["User-Agent"] == "spell-platform"
    assert fake.violations == []


async def test_hook_deliveries_page_with_cursor_and_stop_at_since(
    fake: FakeGitHub, gh: GitHubClient, clock: Clock
) -> None:
    start = clock() - timedelta(hours=10)
    for i in range(250):  # one every 2 minutes: ~8.3 hours
        fake.add_delivery(
            "issue_comment",
            action="created",
            status_code=500 if i % 3 == 0 else 202,
            delivered_at=start + timedelta(minutes=2 * i),
        )
    since = clock() - timedelta(hours=5)

    deliveries = await gh.list_hook_deliveries(since=since)

    expected = [d for d in fake.deliveries.values() if d.delivered_at >= since]
    assert {d["id"] for d in deliveries} == {d.id for d in expected}
    times = [d["delivered_at"] for d in deliveries]
    assert times == sorted(times, reverse=True)
    calls = fake.requests_for("apps/list-webhook-deliveries")
    assert len(calls) == 2  # 150 recent ones need 2 pages; older pages are never fetched
    assert "cursor" in calls[1].query
    assert fake.violations == []


async def test_redeliver_asks_github_for_a_new_attempt(fake: FakeGitHub, gh: GitHubClient) -> None:
    failed = fake.add_delivery("issue_comment", action="created", status_code=500)

    await gh.redeliver(failed.id)

    assert fake.redeliveries == [failed.id]
    assert [d.redelivery for d in fake.deliveries.values()] == [False, True]
    assert fake.violations == []


async def test_convert_manifest_is_unauthenticated_and_single_use(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    fake.add_manifest_code("a1b2c3")

    app = await gh.convert_manifest("a1b2c3")

    assert app["id"] == int(fake.app_id)
    assert {"slug", "client_id", "client_secret", "webhook_secret", "pem"} <= app.keys()
    assert app["pem"] == fake.private_key_pem
    (call,) = fake.requests_for("apps/create-from-manifest")
    assert "Authorization" not in call.headers
    with pytest.raises(GitHubNotFound):
        await gh.convert_manifest("a1b2c3")
    assert fake.violations == []


# ----------------------------------------------------------------- installation tokens


async def test_a_token_is_reused_until_5_minutes_before_expiry(
    fake: FakeGitHub, gh: GitHubClient, clock: Clock
) -> None:
    perms = {"actions": "read"}
    first = await gh.installation_token(1, repositories=[REPO], permissions=perms)
    again = await gh.installation_token(1, repositories=[REPO], permissions=perms)
    assert again.get_secret_value() == first.get_secret_value()
    assert len(fake.issued_tokens) == 1

    clock.advance(minutes=54, seconds=59)  # expires at +60 min: still 5 min and 1 s left
    assert (await gh.installation_token(1, repositories=[REPO], permissions=perms)) is first
    clock.advance(seconds=1)  # now exactly 5 minutes before expiry
    renewed = await gh.installation_token(1, repositories=[REPO], permissions=perms)

    assert renewed.get_secret_value() != first.get_secret_value()
    assert len(fake.issued_tokens) == 2
    assert fake.violations == []


async def test_other_repositories_or_permissions_get_other_tokens(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    a = await gh.installation_token(1, repositories=[REPO], permissions={"actions": "read"})
    b = await gh.installation_token(1, repositories=[OTHER], permissions={"actions": "read"})
    c = await gh.installation_token(1, repositories=[REPO], permissions={"actions": "write"})
    d = await gh.installation_token(
        1, repositories=[OTHER, REPO], permissions={"checks": "write", "actions": "read"}
    )
    d_again = await gh.installation_token(
        1, repositories=[REPO, OTHER], permissions={"actions": "read", "checks": "write"}
    )

    values = {t.get_secret_value() for t in (a, b, c, d)}
    assert len(values) == 4
    assert d_again.get_secret_value() == d.get_secret_value()  # key ignores order
    assert [t.repositories for t in fake.issued_tokens] == [
        (REPO,),
        (OTHER,),
        (REPO,),
        (REPO, OTHER),  # sorted
    ]
    assert fake.violations == []


async def test_concurrent_callers_share_one_minted_token(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    tokens = await asyncio.gather(
        *(
            gh.installation_token(1, repositories=[REPO], permissions={"actions": "read"})
            for _ in range(10)
        )
    )
    assert len({t.get_secret_value() for t in tokens}) == 1
    assert len(fake.issued_tokens) == 1


@pytest.mark.parametrize("length", [520, 1024])
async def test_long_dotted_tokens_work(fake: FakeGitHub, gh: GitHubClient, length: int) -> None:
    fake.token_factory = lambda: new_token(length=length)

    token = await gh.installation_token(1, repositories=[REPO], permissions={"metadata": "read"})
    branch = await gh.default_branch(1, OWNER, REPO)

    assert len(token.get_secret_value()) == length
    assert token.get_secret_value().startswith("ghs_")
    assert "." in token.get_secret_value()
    assert branch == "main"
    assert fake.violations == []


async def test_a_revoked_token_is_replaced_once(fake: FakeGitHub, gh: GitHubClient) -> None:
    await gh.default_branch(1, OWNER, REPO)
    fake.revoke_tokens()

    assert await gh.default_branch(1, OWNER, REPO) == "main"
    assert len(fake.issued_tokens) == 2
    assert fake.violations == []


async def test_a_repository_the_installation_does_not_grant_is_refused(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    fake.add_repo(f"{OWNER}/not-granted")

    with pytest.raises(GitHubValidationFailed, match="not accessible to the parent installation"):
        await gh.default_branch(1, OWNER, "not-granted")
    assert fake.violations == []


async def test_a_permission_the_installation_lacks_is_refused(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    fake.add_installation(2, "small-org", ["repo"], {"metadata": "read"})

    with pytest.raises(GitHubValidationFailed, match="not granted to this installation"):
        await gh.create_comment(2, "small-org", "repo", 1, "hi")
    assert fake.violations == []


async def test_the_fake_refuses_a_token_outside_its_repository_or_permissions(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    token = await gh.installation_token(1, repositories=[REPO], permissions={"actions": "read"})
    headers = {
        "Authorization": f"Bearer {token.get_secret_value()}",
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": "2022-11-28",
        "User-Agent": "test",
    }
    async with httpx.AsyncClient(base_url=fake.url, headers=headers) as http:
        other_repo = await http.get(f"/repos/{OWNER}/{OTHER}/actions/runs/1")
        write_call = await http.post(
            f"/repos/{OWNER}/{REPO}/actions/workflows/spell-run.yml/dispatches",
            json={"ref": "main"},
        )
    assert other_repo.status_code == 403
    assert write_call.status_code == 403
    assert write_call.json()["message"] == "Resource not accessible by integration"
    assert fake.dispatches == []
    assert fake.violations == []


# ------------------------------------------------------- installation-level calls


async def test_each_call_uses_a_token_for_its_one_repo_and_least_permissions(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    fake.set_permission(f"{OWNER}/{REPO}", "alice", "write")
    comment = fake.add_comment(f"{OWNER}/{REPO}", 7, "/cast hello", user="alice")
    await gh.collaborator_permission(1, OWNER, REPO, "alice")
    await gh.add_reaction(1, OWNER, REPO, comment.id, "eyes")
    cid = await gh.create_comment(1, OWNER, REPO, 7, "casting…")
    await gh.update_comment(1, OWNER, REPO, cid, "done")
    check = await gh.create_check_run(
        1, OWNER, REPO, name="spell", head_sha=SHA, external_id="c1", status="queued"
    )
    await gh.update_check_run(1, OWNER, REPO, check, status="in_progress")
    details = await gh.dispatch_workflow(
        1, OWNER, REPO, "spell-run.yml", ref="main", inputs={"cast_id": "cast_1"}
    )
    assert details is not None
    run_id = details["workflow_run_id"]
    await gh.find_run_by_name(
        1, OWNER, REPO, "spell-run.yml", contains="cast_1", created_after=fake.clock()
    )
    await gh.get_workflow_run(1, OWNER, REPO, run_id)
    (art,) = fake.complete_run(run_id, "success", artifacts=[{"name": "out"}])
    await gh.list_run_artifacts(1, OWNER, REPO, run_id)
    await gh.artifact_download_url(1, OWNER, REPO, art.id)
    await gh.repository_dispatch(1, OWNER, REPO, event_type="spell.cast", client_payload={})
    await gh.default_branch(1, OWNER, REPO)
    run2 = await gh.dispatch_workflow(
        1, OWNER, REPO, "spell-run.yml", ref="main", inputs={"cast_id": "cast_2"}
    )
    assert run2 is not None
    await gh.cancel_run(1, OWNER, REPO, run2["workflow_run_id"])

    expected = {
        "repos/get-collaborator-permission-level": "collaborator_permission",
        "reactions/create-for-issue-comment": "add_reaction",
        "issues/create-comment": "create_comment",
        "issues/update-comment": "update_comment",
        "checks/create": "create_check_run",
        "checks/update": "update_check_run",
        "actions/create-workflow-dispatch": "dispatch_workflow",
        "actions/list-workflow-runs": "find_run_by_name",
        "actions/get-workflow-run": "get_workflow_run",
        "actions/list-workflow-run-artifacts": "list_run_artifacts",
        "actions/download-artifact": "artifact_download_url",
        "repos/create-dispatch-event": "repository_dispatch",
        "repos/get": "default_branch",
        "actions/cancel-workflow-run": "cancel_run",
    }
    for operation_id, call in expected.items():
        granted = scopes(fake, operation_id)
        assert granted, operation_id
        for repos, permissions in granted:
            assert repos == (REPO,), operation_id
            assert permissions == dict(CALL_PERMISSIONS[call]), operation_id
    assert fake.violations == []


@pytest.mark.parametrize(
    ("role", "permission"),
    [
        pytest.param("admin", "admin", id="admin"),
        pytest.param("maintain", "write", id="maintain-is-write"),
        pytest.param("write", "write", id="write"),
        pytest.param("triage", "read", id="triage-is-read"),
        pytest.param("read", "read", id="read"),
    ],
)
async def test_collaborator_permission(
    fake: FakeGitHub, gh: GitHubClient, role: str, permission: str
) -> None:
    fake.set_permission(f"{OWNER}/{REPO}", "bob", role)
    assert await gh.collaborator_permission(1, OWNER, REPO, "bob") == permission
    assert await gh.collaborator_permission(1, OWNER, REPO, "stranger") == "none"
    assert fake.violations == []


async def test_comments_are_created_and_edited_in_place(fake: FakeGitHub, gh: GitHubClient) -> None:
    cid = await gh.create_comment(1, OWNER, REPO, 3, "⏳ queued")
    await gh.update_comment(1, OWNER, REPO, cid, "✅ done")

    assert fake.comments[cid].body == "✅ done"
    assert fake.comments[cid].issue_number == 3
    assert fake.violations == []


async def test_pull_request_comments_use_the_pull_requests_permission(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    fake.add_pull_request(f"{OWNER}/{REPO}", 9)
    comment = fake.add_comment(f"{OWNER}/{REPO}", 9, "/cast x", user="alice")

    with pytest.raises(GitHubForbidden, match="not accessible by integration"):
        await gh.add_reaction(1, OWNER, REPO, comment.id, "eyes")  # issues: write is not enough
    await gh.add_reaction(1, OWNER, REPO, comment.id, "eyes", pull_request=True)
    cid = await gh.create_comment(1, OWNER, REPO, 9, "on it", pull_request=True)
    await gh.update_comment(1, OWNER, REPO, cid, "done", pull_request=True)

    assert [r["content"] for r in fake.reactions] == ["eyes"]
    assert scopes(fake, "issues/create-comment") == [((REPO,), dict(PULL_REQUEST_PERMISSIONS))]
    assert fake.violations == []


async def test_reacting_twice_is_harmless_and_unknown_reactions_are_refused(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    comment = fake.add_comment(f"{OWNER}/{REPO}", 1, "/cast x")
    await gh.add_reaction(1, OWNER, REPO, comment.id, "rocket")
    await gh.add_reaction(1, OWNER, REPO, comment.id, "rocket")
    with pytest.raises(ValueError, match="unknown reaction"):
        await gh.add_reaction(1, OWNER, REPO, comment.id, "party")
    with pytest.raises(GitHubNotFound):
        await gh.add_reaction(1, OWNER, REPO, 123, "eyes")

    assert len(fake.reactions) == 1
    assert fake.violations == []


async def test_check_runs_are_created_and_completed(fake: FakeGitHub, gh: GitHubClient) -> None:
    check_id = await gh.create_check_run(
        1,
        OWNER,
        REPO,
        name="spell: hello",
        head_sha=SHA,
        external_id="cast_9",
        status="in_progress",
        details_url="https://spell.example/casts/cast_9",
        output={"title": "Running", "summary": "casting"},
    )
    await gh.update_check_run(
        1,
        OWNER,
        REPO,
        check_id,
        status="completed",
        conclusion="success",
        output={"title": "Done", "summary": "cost 12 cents"},
    )

    run = fake.check_runs[check_id]
    assert (run["status"], run["conclusion"], run["external_id"]) == (
        "completed",
        "success",
        "cast_9",
    )
    with pytest.raises(ValueError, match="conclusion"):
        await gh.update_check_run(1, OWNER, REPO, check_id, status="completed")
    assert fake.violations == []


# ------------------------------------------------------------------------ dispatch


async def test_dispatch_returns_the_run_details(fake: FakeGitHub, gh: GitHubClient) -> None:
    details = await gh.dispatch_workflow(
        1,
        OWNER,
        REPO,
        "spell-run.yml",
        ref="main",
        inputs={"payload": json.dumps({"a": 1}), "cast_id": "cast_42", "traceparent": "00-x"},
    )

    assert details is not None
    assert set(details) == {"workflow_run_id", "run_url", "html_url"}
    run = fake.runs[details["workflow_run_id"]]
    assert "cast_42" in run.name
    assert run.inputs["cast_id"] == "cast_42"
    assert fake.dispatches[0]["return_run_details"] is True
    assert fake.violations == []


async def test_old_ghes_rejecting_return_run_details_gets_one_retry_without_it(
    fake: FakeGitHub, gh: GitHubClient, clock: Clock
) -> None:
    fake.reject_return_run_details = True

    details = await gh.dispatch_workflow(
        1, OWNER, REPO, "spell-run.yml", ref="main", inputs={"cast_id": "cast_7"}
    )
    assert details is None
    calls = fake.requests_for("actions/create-workflow-dispatch")
    assert [c.status for c in calls] == [422, 204]
    assert "return_run_details" in calls[0].body
    assert "return_run_details" not in calls[1].body

    # The 204 form is correlated through the run name carrying the cast id.
    fake.reject_return_run_details = False
    await gh.dispatch_workflow(
        1, OWNER, REPO, "spell-run.yml", ref="main", inputs={"cast_id": "cast_8"}
    )
    run = await gh.find_run_by_name(
        1, OWNER, REPO, "spell-run.yml", contains="cast_7", created_after=clock()
    )
    assert run is not None
    assert run["id"] == fake.dispatches[0]["run_id"]
    assert fake.violations == []


async def test_find_run_by_name_ignores_runs_created_before_the_window(
    fake: FakeGitHub, gh: GitHubClient, clock: Clock
) -> None:
    await gh.dispatch_workflow(
        1, OWNER, REPO, "spell-run.yml", ref="main", inputs={"cast_id": "c_1"}
    )
    clock.advance(minutes=30)

    assert (
        await gh.find_run_by_name(
            1, OWNER, REPO, "spell-run.yml", contains="c_1", created_after=clock()
        )
        is None
    )
    assert (
        await gh.find_run_by_name(
            1,
            OWNER,
            REPO,
            "spell-run.yml",
            contains="c_2",
            created_after=clock() - timedelta(hours=1),
        )
        is None
    )
    assert fake.violations == []


async def test_a_missing_workflow_is_not_found(fake: FakeGitHub, gh: GitHubClient) -> None:
    with pytest.raises(GitHubNotFound) as err:
        await gh.dispatch_workflow(1, OWNER, REPO, "missing.yml", ref="main", inputs={})
    assert err.value.status == 404
    assert len(fake.requests_for("actions/create-workflow-dispatch")) == 1
    assert fake.violations == []


async def test_other_422s_are_not_retried(fake: FakeGitHub, gh: GitHubClient) -> None:
    with pytest.raises(GitHubValidationFailed, match="No ref found"):
        await gh.dispatch_workflow(1, OWNER, REPO, "spell-run.yml", ref="nope", inputs={})
    assert len(fake.requests_for("actions/create-workflow-dispatch")) == 1
    assert fake.violations == []


@pytest.mark.parametrize(
    "inputs",
    [
        pytest.param({f"k{i}": "v" for i in range(26)}, id="26-inputs"),
        pytest.param({"n": 1}, id="not-a-string"),
        pytest.param({"flag": True}, id="boolean"),
    ],
)
async def test_workflow_inputs_are_checked_before_sending(
    fake: FakeGitHub, gh: GitHubClient, inputs: dict[str, Any]
) -> None:
    with pytest.raises(DispatchLimitError):
        await gh.dispatch_workflow(1, OWNER, REPO, "spell-run.yml", ref="main", inputs=inputs)
    assert fake.requests_for("actions/create-workflow-dispatch") == []


async def test_25_inputs_are_fine(fake: FakeGitHub, gh: GitHubClient) -> None:
    inputs = {f"k{i}": "v" for i in range(24)} | {"cast_id": "c"}
    assert await gh.dispatch_workflow(1, OWNER, REPO, "spell-run.yml", ref="main", inputs=inputs)
    assert fake.violations == []


async def test_repository_dispatch_at_the_limits(fake: FakeGitHub, gh: GitHubClient) -> None:
    payload = {f"k{i}": "x" for i in range(9)}
    payload["big"] = "y" * (64 * 1024 - len(json.dumps(payload, separators=(",", ":"))) - 10)

    await gh.repository_dispatch(1, OWNER, REPO, event_type="e" * 100, client_payload=payload)

    (sent,) = fake.repository_dispatches
    assert sent["event_type"] == "e" * 100
    assert sent["client_payload"] == payload
    assert scopes(fake, "repos/create-dispatch-event") == [((REPO,), {"contents": "write"})]
    assert fake.violations == []


@pytest.mark.parametrize(
    ("event_type", "payload", "message"),
    [
        pytest.param("e" * 101, {}, "event_type", id="event-type-101-chars"),
        pytest.param("", {}, "event_type", id="empty-event-type"),
        pytest.param("spell.cast", {f"k{i}": 1 for i in range(11)}, "10 top-level", id="11-keys"),
        pytest.param("spell.cast", {"big": "y" * 65536}, "smaller than", id="64KB"),
    ],
)
async def test_repository_dispatch_limits_are_checked_before_sending(
    fake: FakeGitHub, gh: GitHubClient, event_type: str, payload: dict[str, Any], message: str
) -> None:
    with pytest.raises(DispatchLimitError, match=message):
        await gh.repository_dispatch(1, OWNER, REPO, event_type=event_type, client_payload=payload)
    assert fake.requests_for("repos/create-dispatch-event") == []


# -------------------------------------------------------------------- runs & artifacts


async def test_run_artifacts_and_their_one_minute_download_url(
    fake: FakeGitHub, gh: GitHubClient, clock: Clock
) -> None:
    details = await gh.dispatch_workflow(
        1, OWNER, REPO, "spell-run.yml", ref="main", inputs={"cast_id": "cast_5"}
    )
    assert details is not None
    run_id = details["workflow_run_id"]
    assert (await gh.get_workflow_run(1, OWNER, REPO, run_id))["status"] == "queued"
    fake.complete_run(
        run_id,
        "success",
        artifacts=[{"name": "spell-output", "files": {"out/result.json": '{"ok": true}'}}],
    )

    run = await gh.get_workflow_run(1, OWNER, REPO, run_id)
    (artifact,) = await gh.list_run_artifacts(1, OWNER, REPO, run_id)
    url = await gh.artifact_download_url(1, OWNER, REPO, artifact["id"])
    url2 = await gh.artifact_download_url(1, OWNER, REPO, artifact["id"])

    assert (run["status"], run["conclusion"]) == ("completed", "success")
    assert artifact["name"] == "spell-output"
    assert artifact["expired"] is False
    assert artifact["digest"].startswith("sha256:") and len(artifact["digest"]) == 71
    assert url != url2  # minted per request, never cached
    (call, _) = fake.requests_for("actions/download-artifact")
    assert call.status == 302
    async with httpx.AsyncClient() as http:
        zipped = (await http.get(url)).content
        assert artifact["size_in_bytes"] == len(zipped)
        assert artifact["digest"] == "sha256:" + hashlib.sha256(zipped).hexdigest()
        with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
            assert json.loads(zf.read("out/result.json")) == {"ok": True}
        clock.advance(seconds=61)
        assert (await http.get(url)).status_code == 403  # the link is dead after a minute
    assert fake.violations == []


async def test_an_expired_artifact_is_gone(
    fake: FakeGitHub, gh: GitHubClient, clock: Clock
) -> None:
    details = await gh.dispatch_workflow(
        1, OWNER, REPO, "spell-run.yml", ref="main", inputs={"cast_id": "c"}
    )
    assert details is not None
    (art,) = fake.complete_run(
        details["workflow_run_id"],
        "success",
        artifacts=[{"name": "out", "expires_at": clock() + timedelta(days=1)}],
    )
    clock.advance(days=2)

    (listed,) = await gh.list_run_artifacts(1, OWNER, REPO, details["workflow_run_id"])
    with pytest.raises(GitHubGone) as err:
        await gh.artifact_download_url(1, OWNER, REPO, art.id)

    assert listed["expired"] is True
    assert err.value.status == 410
    assert fake.violations == []


async def test_cancel_a_run_and_cancelling_a_finished_one_conflicts(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    details = await gh.dispatch_workflow(
        1, OWNER, REPO, "spell-run.yml", ref="main", inputs={"cast_id": "c"}
    )
    assert details is not None

    await gh.cancel_run(1, OWNER, REPO, details["workflow_run_id"])
    with pytest.raises(GitHubError) as err:
        await gh.cancel_run(1, OWNER, REPO, details["workflow_run_id"])

    assert fake.runs[details["workflow_run_id"]].conclusion == "cancelled"
    assert err.value.status == 409
    assert fake.violations == []


async def test_default_branch(fake: FakeGitHub, gh: GitHubClient) -> None:
    fake.add_installation(3, "trunk-org", ["svc"], {"metadata": "read"})
    fake.repos["trunk-org/svc"].default_branch = "trunk"
    assert await gh.default_branch(3, "trunk-org", "svc") == "trunk"
    assert fake.violations == []


async def test_generate_from_template_with_a_user_token(fake: FakeGitHub, gh: GitHubClient) -> None:
    fake.add_repo("spell-org/spell-template", template=True)
    fake.add_user_token("ghu_usertoken", "carol")

    repo = await gh.generate_from_template(
        "spell-org",
        "spell-template",
        owner="carol",
        name="my-spells",
        private=True,
        token=SecretStr("ghu_usertoken"),
    )

    assert repo["full_name"] == "carol/my-spells"
    assert repo["private"] is True
    (call,) = fake.requests_for("repos/create-using-template")
    assert call.auth == "user"
    assert call.body == {"owner": "carol", "name": "my-spells", "private": True}
    assert fake.violations == []


async def test_a_ghes_base_url_works(fake: FakeGitHub, clock: Clock) -> None:
    client = GitHubClient(f"{fake.url}/api/v3/", fake.app_id, fake.private_key_pem, clock=clock)
    assert (await client.get_app())["id"] == int(fake.app_id)
    assert await client.default_branch(1, OWNER, REPO) == "main"
    await client.aclose()
    assert fake.violations == []


# --------------------------------------------------------------------------- errors


async def test_errors_carry_status_and_request_id_and_never_the_token(
    fake: FakeGitHub, gh: GitHubClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = await gh.installation_token(1, repositories=[REPO], permissions={"actions": "read"})

    with pytest.raises(GitHubNotFound) as err:
        await gh.get_workflow_run(1, OWNER, REPO, 999)

    e = err.value
    assert e.status == 404
    assert e.request_id and e.request_id.count(":") == 4
    assert e.documentation_url == "https://docs.github.com/rest"
    secret = token.get_secret_value()
    for text in (str(e), repr(e), repr(gh), repr(gh.tokens), repr(token), caplog.text):
        assert secret not in text
    assert e.request_id in str(e)
    assert fake.violations == []


async def test_rate_limits_say_when_to_retry(
    fake: FakeGitHub, gh: GitHubClient, clock: Clock
) -> None:
    reset = int(clock().timestamp()) + 120
    fake.fail_next(
        "repos/get",
        403,
        "API rate limit exceeded for installation ID 1.",
        headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)},
    )
    fake.fail_next(
        "repos/get-collaborator-permission-level",
        403,
        "You have exceeded a secondary rate limit.",
        headers={"Retry-After": "30"},
    )

    with pytest.raises(GitHubForbidden) as primary:
        await gh.default_branch(1, OWNER, REPO)
    with pytest.raises(GitHubForbidden) as secondary:
        await gh.collaborator_permission(1, OWNER, REPO, "alice")

    assert primary.value.retry_after == 120
    assert secondary.value.retry_after == 30
    assert fake.violations == []


@pytest.mark.parametrize(
    ("status", "headers", "body", "kind", "retry_after"),
    [
        pytest.param(404, {}, {"message": "Not Found"}, GitHubNotFound, None, id="404"),
        pytest.param(410, {}, {"message": "Gone"}, GitHubGone, None, id="410"),
        pytest.param(
            422,
            {},
            {"message": "Validation Failed", "errors": [{"code": "x"}]},
            GitHubValidationFailed,
            None,
            id="422",
        ),
        pytest.param(
            403,
            {},
            {"message": "Resource not accessible by integration"},
            GitHubForbidden,
            None,
            id="403-not-limited",
        ),
        pytest.param(429, {}, {"message": "slow down"}, GitHubForbidden, 60, id="429-default-60s"),
        pytest.param(502, {}, b"<html>bad gateway</html>", GitHubError, None, id="502-html"),
    ],
)
def test_error_mapping_is_a_pure_function(
    status: int,
    headers: dict[str, str],
    body: Any,
    kind: type[GitHubError],
    retry_after: int | None,
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"x-github-request-id": "AB:CD", **headers}
    err = error_from_response(status, httpx.Headers(headers), raw, now=datetime.now(UTC))
    assert type(err) is kind
    assert err.status == status
    assert err.request_id == "AB:CD"
    if isinstance(err, GitHubForbidden):
        assert err.retry_after == retry_after
    assert error_from_response(200, httpx.Headers({}), b"{}", now=datetime.now(UTC)) is None


async def test_an_unreachable_github_is_a_github_error(clock: Clock) -> None:
    client = GitHubClient("http://127.0.0.1:9", "1", "unused", clock=clock)
    with pytest.raises(GitHubError) as err:
        await client.convert_manifest("x")
    assert err.value.status == 0
    await client.aclose()


# ----------------------------------------------------- the fake enforces the contract


async def test_the_fake_rejects_a_body_that_breaks_the_schema(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    token = await gh.installation_token(1, repositories=[REPO], permissions={"checks": "write"})
    headers = {
        "Authorization": f"Bearer {token.get_secret_value()}",
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": "2022-11-28",
        "User-Agent": "test",
    }
    async with httpx.AsyncClient(base_url=fake.url, headers=headers) as http:
        bad_status = await http.post(
            f"/repos/{OWNER}/{REPO}/check-runs",
            json={"name": "x", "head_sha": SHA, "status": "sleeping"},
        )
        missing = await http.post(f"/repos/{OWNER}/{REPO}/check-runs", json={"name": "x"})
    assert bad_status.status_code == 422
    assert missing.status_code == 422
    assert fake.check_runs == {}
    assert len(fake.violations) == 2
    assert "'sleeping' is not one of" in fake.violations[0]
    assert "'head_sha' is a required property" in fake.violations[1]


@pytest.mark.parametrize(
    ("method", "path", "headers", "expected", "violation"),
    [
        pytest.param("GET", "/repos/o/r/nonsense", {}, 404, "no operation", id="unknown-path"),
        pytest.param("DELETE", "/app", {}, 404, "no operation", id="unknown-method"),
        pytest.param("GET", "/app/installations?per_page=x", {}, 400, "per_page", id="bad-query"),
        pytest.param("GET", "/app/installations?bogus=1", {}, 400, "bogus", id="unknown-query"),
        pytest.param(
            "GET",
            "/app",
            {"X-GitHub-Api-Version": None},
            400,
            "X-GitHub-Api-Version",
            id="no-version",
        ),
        pytest.param(
            "GET",
            "/app",
            {"X-GitHub-Api-Version": "2020-01-01"},
            400,
            "not supported",
            id="bad-version",
        ),
        pytest.param("GET", "/repos/o/r/actions/runs/abc", {}, 400, "run_id", id="path-param-type"),
    ],
)
async def test_the_fake_records_contract_violations(
    fake: FakeGitHub,
    clock: Clock,
    method: str,
    path: str,
    headers: dict[str, str | None],
    expected: int,
    violation: str,
) -> None:
    base = {
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": "2022-11-28",
        "User-Agent": "test",
        "Authorization": "Bearer " + app_jwt(fake.app_id, fake.private_key_pem, now=clock()),
    }
    sent = {k: v for k, v in {**base, **headers}.items() if v is not None}
    async with httpx.AsyncClient() as http:
        r = await http.request(method, fake.url + path, headers=sent)
    assert r.status_code == expected
    assert len(fake.violations) == 1
    assert violation in fake.violations[0]


async def test_responses_match_the_spec_response_schemas(
    fake: FakeGitHub, gh: GitHubClient
) -> None:
    """Each handler's answer is validated by the fake; this proves that check bites."""
    details = await gh.dispatch_workflow(
        1, OWNER, REPO, "spell-run.yml", ref="main", inputs={"cast_id": "c"}
    )
    assert details is not None
    contract = fake.contract
    found = contract.match("get", "/repos/o/r/actions/runs/1")
    assert found is not None
    pointer = contract.response_pointer(found[0], 200)
    assert pointer is not None
    run = fake._run_json(fake.runs[details["workflow_run_id"]])

    assert contract.errors(pointer, run) == []
    del run["display_title"]
    run["status"] = 7
    errors = contract.errors(pointer, run)
    assert any("'display_title' is a required property" in e for e in errors)
    assert any("7 is not of type" in e for e in errors)


# -------------------------------------------------------------- contracts & webhooks


def test_nullable_becomes_a_json_schema_union() -> None:
    converted = openapi_to_jsonschema(
        {
            "a": {"type": "string", "nullable": True},
            "b": {"type": "string", "enum": ["x"], "nullable": True},
            "c": {"$ref": "#/components/schemas/x", "nullable": True},
        }
    )
    assert converted["a"] == {"type": ["string", "null"]}
    assert converted["b"] == {"type": ["string", "null"], "enum": ["x", None]}
    assert converted["c"] == {"anyOf": [{"$ref": "#/components/schemas/x"}, {"type": "null"}]}


def test_operations_prefer_literal_segments() -> None:
    contract: OpenAPIContract = github_contract()
    found = contract.match("PATCH", "/repos/o/r/issues/comments/5")
    assert found is not None
    assert found[0].operation_id == "issues/update-comment"
    assert found[1] == {"owner": "o", "repo": "r", "comment_id": "5"}


def test_webhook_examples_are_keyed_by_event() -> None:
    examples = webhook_examples()
    assert {"issue_comment", "workflow_run", "repository_dispatch", "installation"} <= set(examples)
    assert any(e["action"] == "created" for e in examples["issue_comment"])
    assert all("workflow_run" in e for e in examples["workflow_run"])


def test_sign_webhook_signs_the_raw_body_like_github(fake: FakeGitHub) -> None:
    payload = webhook_examples()["issue_comment"][0]
    headers, body = fake.sign_webhook("issue_comment", payload, "s3cret")

    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["X-Hub-Signature-256"] == f"sha256={expected}"
    assert headers["X-GitHub-Event"] == "issue_comment"
    assert headers["User-Agent"].startswith("GitHub-Hookshot/")
    assert headers["Content-Type"] == "application/json"
    assert headers["X-GitHub-Hook-ID"] == str(fake.hook_id)
    assert len(headers["X-GitHub-Delivery"]) == 36
    assert json.loads(body) == payload


# ------------------------------------------------------------------------ token cache


def test_token_cache_is_a_bounded_lru() -> None:
    cache = TokenCache(max_size=2)
    now = datetime.now(UTC)
    later = now + timedelta(hours=1)
    k1, k2, k3 = (token_key(i, ["r"], {"actions": "read"}) for i in (1, 2, 3))
    cache.put(k1, SecretStr("t1"), later)
    cache.put(k2, SecretStr("t2"), later)
    assert cache.get(k1, now) is not None  # k1 is now the most recently used
    cache.put(k3, SecretStr("t3"), later)

    assert cache.get(k2, now) is None
    assert cache.get(k1, now) is not None
    assert len(cache) == 2
    assert "t1" not in repr(cache)
