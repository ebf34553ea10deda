"""A fake GitHub that enforces GitHub's official contract (npm ``@octokit/openapi``).

For every request it finds the OpenAPI operation (method + path template), validates headers,
path and query parameters and the JSON body against the operation's schemas, authenticates the
caller the way GitHub does (App JWT for ``/app/*``, installation tokens it issued — scoped to
repositories and permissions — for ``/repos/*``, user tokens for template generation) and records
the request. A request that breaks the contract is answered 400/404/422 *and* recorded in
``fake.violations``; tests assert that list is empty. Responses are built from the spec's own
examples with the fake's state laid over them and are validated against the response schemas
(``fake.response_violations``).

Usage::

    fake = FakeGitHub()
    fake.add_installation(1, "octo-org", ["app-repo"], {"actions": "write", "metadata": "read"})
    async with fake.serve() as url:
        client = GitHubClient(url, fake.app_id, fake.private_key_pem)
        ...
    assert fake.violations == []

Deliberately simple where GitHub's behaviour does not matter to the platform: one App, issues
exist for every number (pull requests are the numbers marked with ``add_pull_request``), one
branch per repository unless more are added.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import io
import itertools
import json
import re
import secrets
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.contract.contracts import OpenAPIContract, Operation, github_contract

SUPPORTED_API_VERSIONS = ("2022-11-28", "2026-03-10")
DOCS = "https://docs.github.com/rest"
LEVELS = {"none": 0, "read": 1, "write": 2, "admin": 3}
ISSUE_OR_PR = "issue-or-pull-request"  # marker: needs issues:write, or pull_requests:write on PRs

#: What each operation needs from an installation token (alternatives: any one suffices), from
#: https://docs.github.com/rest/authentication/permissions-required-for-github-apps.
#: Issue-comment endpoints need ``issues: write`` on issues and ``pull_requests: write`` on PRs.
REQUIRED_PERMISSIONS: dict[str, list[dict[str, str]] | str] = {
    "repos/get": [{"metadata": "read"}],
    "pulls/get": [{"pull_requests": "read"}, {"pull_requests": "write"}],
    "repos/get-collaborator-permission-level": [{"metadata": "read"}],
    "reactions/create-for-issue-comment": ISSUE_OR_PR,
    "issues/create-comment": ISSUE_OR_PR,
    "issues/update-comment": ISSUE_OR_PR,
    "checks/create": [{"checks": "write"}],
    "checks/update": [{"checks": "write"}],
    "actions/create-workflow-dispatch": [{"actions": "write"}],
    "repos/create-dispatch-event": [{"contents": "write"}],
    "actions/list-workflow-runs": [{"actions": "read"}],
    "actions/get-workflow-run": [{"actions": "read"}],
    "actions/list-workflow-run-artifacts": [{"actions": "read"}],
    "actions/download-artifact": [{"actions": "read"}],
    "actions/cancel-workflow-run": [{"actions": "write"}],
}


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def new_token(prefix: str = "ghs_", length: int = 520) -> str:
    """A token in GitHub's 2026 format: a prefix and dot-separated base64url segments."""
    parts: list[str] = []
    size = len(prefix)
    while size < length:
        seg = base64.urlsafe_b64encode(secrets.token_bytes(96)).decode().rstrip("=")
        seg = seg[: min(len(seg), length - size - (1 if parts else 0))]
        parts.append(seg)
        size += len(seg) + (1 if len(parts) > 1 else 0)
    return prefix + ".".join(parts)


class _Reply(Exception):
    """Raised inside handlers to answer with an error (GitHub's error shape)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


# --------------------------------------------------------------------------------- records


@dataclass
class IssuedToken:
    token: str
    installation_id: int
    repositories: tuple[str, ...]  # repository names (the installation's account owns them)
    permissions: dict[str, str]
    expires_at: datetime

    def __repr__(self) -> str:  # never print the token
        return (
            f"IssuedToken(installation_id={self.installation_id}, "
            f"repositories={self.repositories}, permissions={self.permissions})"
        )


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # Authorization redacted
    body: Any
    operation_id: str | None = None
    auth: str | None = None  # "jwt" | "installation" | "user" | None
    token: IssuedToken | None = None
    user: str | None = None  # login behind a user token
    status: int | None = None


@dataclass
class Installation:
    id: int
    account: str
    repositories: list[str]  # names
    permissions: dict[str, str]
    account_type: str = "Organization"
    suspended: bool = False


@dataclass
class Repo:
    id: int
    owner: str
    name: str
    default_branch: str = "main"
    branches: set[str] = field(default_factory=lambda: {"main"})
    private: bool = False
    is_template: bool = False

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@dataclass
class Workflow:
    id: int
    repo: str  # full name
    path: str  # .github/workflows/<file>
    name: str
    inputs: list[str] | None = None  # declared inputs (None: accept any)
    required_inputs: list[str] = field(default_factory=list)

    @property
    def file(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass
class Run:
    id: int
    repo: str
    workflow_id: int
    name: str
    display_title: str
    event: str
    head_branch: str
    head_sha: str
    inputs: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    run_number: int
    status: str = "queued"
    conclusion: str | None = None


@dataclass
class Artifact:
    id: int
    repo: str
    run_id: int
    name: str
    content: bytes
    created_at: datetime
    expires_at: datetime
    expired: bool = False

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.content).hexdigest()


@dataclass
class Comment:
    id: int
    repo: str
    issue_number: int
    body: str
    user: str
    created_at: datetime
    updated_at: datetime


@dataclass
class Delivery:
    id: int
    guid: str
    event: str
    action: str | None
    status_code: int
    delivered_at: datetime
    redelivery: bool = False
    installation_id: int | None = None
    repository_id: int | None = None


# ------------------------------------------------------------------------------------ fake


class FakeGitHub:
    """A contract-enforcing GitHub for tests. All state is public; helpers set it up."""

    def __init__(
        self,
        *,
        app_id: str = "424242",
        app_slug: str = "spell-platform",
        clock: Callable[[], datetime] | None = None,
        contract: OpenAPIContract | None = None,
        private_key: rsa.RSAPrivateKey | None = None,
    ) -> None:
        self.contract = contract or github_contract()
        self.app_id = app_id
        self.app_slug = app_slug
        key = private_key or _shared_key()
        self.private_key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        self.public_key_pem = (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.hook_id = 987654
        self.url = ""  # set by serve()/start()
        #: answer 422 to ``return_run_details`` like GitHub Enterprise Server before the field
        self.reject_return_run_details = False
        #: how new installation tokens look (GitHub's 2026 format by default)
        self.token_factory: Callable[[], str] = new_token

        self.violations: list[str] = []
        self.response_violations: list[str] = []
        self.auth_failures: list[str] = []
        self.requests: list[RecordedRequest] = []
        self.issued_tokens: list[IssuedToken] = []
        self._tokens: dict[str, IssuedToken] = {}
        self._user_tokens: dict[str, str] = {}

        self.installations: dict[int, Installation] = {}
        self.repos: dict[str, Repo] = {}  # lower-case full name -> repo
        self.permissions: dict[tuple[str, str], str] = {}  # (repo, user) -> role
        self.pull_requests: set[tuple[str, int]] = set()
        self.pr_head_shas: dict[tuple[str, int], str] = {}
        self.comments: dict[int, Comment] = {}
        self.reactions: list[dict[str, Any]] = []
        self.check_runs: dict[int, dict[str, Any]] = {}
        self.workflows: dict[int, Workflow] = {}
        self.runs: dict[int, Run] = {}
        self.artifacts: dict[int, Artifact] = {}
        self.dispatches: list[dict[str, Any]] = []
        self.repository_dispatches: list[dict[str, Any]] = []
        self.deliveries: dict[int, Delivery] = {}
        self.redeliveries: list[int] = []
        self.manifest_codes: dict[str, dict[str, Any]] = {}
        self.conversions: list[str] = []
        self._downloads: dict[str, tuple[int, datetime]] = {}
        self._faults: list[dict[str, Any]] = []
        self._ids = itertools.count(5_000_001)
        self._server: TestServer | None = None

    # ------------------------------------------------------------------------ test helpers

    def next_id(self) -> int:
        return next(self._ids)

    def add_repo(
        self,
        full_name: str,
        *,
        default_branch: str = "main",
        private: bool = False,
        template: bool = False,
    ) -> Repo:
        owner, name = full_name.split("/", 1)
        repo = self.repos.get(full_name.lower())
        if repo is None:
            repo = Repo(self.next_id(), owner, name, default_branch, {default_branch})
            self.repos[full_name.lower()] = repo
        repo.private, repo.is_template = private, template
        return repo

    def add_installation(
        self,
        id: int,
        account: str,
        repos: Iterable[str],
        permissions: Mapping[str, str],
        *,
        account_type: str = "Organization",
    ) -> Installation:
        """An installation of the App on ``account`` granting ``repos`` (names or full names)."""
        names = [r.split("/", 1)[1] if "/" in r else r for r in repos]
        perms = {"metadata": "read", **dict(permissions)}
        inst = Installation(id, account, names, perms, account_type)
        self.installations[id] = inst
        for name in names:
            self.add_repo(f"{account}/{name}")
        return inst

    def set_permission(self, repo: str, user: str, level: str) -> None:
        """``user``'s role on ``repo``: admin, maintain, write, triage, read or none."""
        assert level in {"admin", "maintain", "write", "triage", "read", "none"}, level
        self.permissions[(repo.lower(), user.lower())] = level

    def add_pull_request(self, repo: str, number: int, head_sha: str = "a" * 40) -> None:
        """Mark issue ``number`` of ``repo`` as a pull request (with its head commit)."""
        self.pull_requests.add((repo.lower(), number))
        self.pr_head_shas[(repo.lower(), number)] = head_sha

    def add_comment(
        self,
        repo: str,
        issue_number: int,
        body: str,
        *,
        user: str = "octocat",
        comment_id: int | None = None,
    ) -> Comment:
        """A comment that exists on GitHub (e.g. the one a webhook example points at)."""
        now = self.clock()
        cid = comment_id if comment_id is not None else self.next_id()
        comment = Comment(cid, repo.lower(), issue_number, body, user, now, now)
        self.comments[cid] = comment
        return comment

    def add_workflow(
        self,
        repo: str,
        workflow_id: str,
        *,
        name: str | None = None,
        inputs: list[str] | None = None,
        required_inputs: Iterable[str] = (),
    ) -> Workflow:
        """A workflow file (``spell-run.yml``) in ``repo``; its numeric id is generated."""
        if repo.lower() not in self.repos:
            self.add_repo(repo)
        wf = Workflow(
            self.next_id(),
            repo.lower(),
            f".github/workflows/{workflow_id}",
            name or workflow_id.rsplit(".", 1)[0],
            inputs,
            list(required_inputs),
        )
        self.workflows[wf.id] = wf
        return wf

    def add_user_token(self, token: str, login: str) -> None:
        """A user access token (``ghu_…``) for endpoints called on behalf of a user."""
        self._user_tokens[token] = login

    def add_manifest_code(self, code: str, manifest: Mapping[str, Any] | None = None) -> None:
        """A code GitHub would hand back after the manifest flow; good for one conversion."""
        self.manifest_codes[code] = dict(manifest or {})

    def add_delivery(
        self,
        event: str,
        *,
        action: str | None = None,
        status_code: int = 200,
        delivered_at: datetime | None = None,
        guid: str | None = None,
        redelivery: bool = False,
        installation_id: int | None = None,
    ) -> Delivery:
        d = Delivery(
            self.next_id(),
            guid or str(uuid.uuid4()),
            event,
            action,
            status_code,
            delivered_at or self.clock(),
            redelivery,
            installation_id,
        )
        self.deliveries[d.id] = d
        return d

    def set_run_status(self, run_id: int, status: str) -> None:
        run = self.runs[run_id]
        run.status, run.updated_at = status, self.clock()

    def complete_run(
        self,
        run_id: int,
        conclusion: str = "success",
        artifacts: Iterable[Mapping[str, Any]] = (),
    ) -> list[Artifact]:
        """Finish a run and attach artifacts: each ``{"name", "files": {path: bytes|str}}`` (or
        ``"content"``: zip bytes), optionally ``"expires_at"`` and ``"expired"``.
        """
        run = self.runs[run_id]
        now = self.clock()
        run.status, run.conclusion, run.updated_at = "completed", conclusion, now
        made = []
        for spec in artifacts:
            content = spec.get("content")
            if content is None:
                content = make_zip(spec.get("files", {"out.txt": b""}))
            art = Artifact(
                self.next_id(),
                run.repo,
                run_id,
                spec["name"],
                content,
                now,
                spec.get("expires_at") or now + timedelta(days=90),
                bool(spec.get("expired", False)),
            )
            self.artifacts[art.id] = art
            made.append(art)
        return made

    def fail_next(
        self,
        operation_id: str,
        status: int,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` valid, authenticated calls of an operation with an error."""
        self._faults.append(
            {
                "op": operation_id,
                "status": status,
                "message": message,
                "headers": dict(headers or {}),
                "times": times,
            }
        )

    def revoke_tokens(self) -> None:
        """Invalidate every installation token issued so far (GitHub then answers 401)."""
        self._tokens.clear()

    def requests_for(self, operation_id: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.operation_id == operation_id]

    def sign_webhook(
        self, event: str, payload: Mapping[str, Any] | bytes, secret: str | bytes
    ) -> tuple[dict[str, str], bytes]:
        """Headers and raw body of a delivery, signed exactly as GitHub signs them:
        ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, raw body)>``.
        """
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        key = secret.encode() if isinstance(secret, str) else secret
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/7f3c2a1",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-GitHub-Hook-ID": str(self.hook_id),
            "X-GitHub-Hook-Installation-Target-Type": "integration",
            "X-GitHub-Hook-Installation-Target-ID": str(self.app_id),
            "X-Hub-Signature": "sha1=" + hmac.new(key, body, hashlib.sha1).hexdigest(),
            "X-Hub-Signature-256": "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest(),
        }
        return headers, body

    # ------------------------------------------------------------------------- serving

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self) -> str:
        self._server = TestServer(self.app(), host="127.0.0.1", port=0)
        await self._server.start_server()
        self.url = str(self._server.make_url("")).rstrip("/")
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        url = await self.start()
        try:
            yield url
        finally:
            await self.close()

    # ------------------------------------------------------------------------ pipeline

    def _violation(self, rec: RecordedRequest, text: str) -> None:
        self.violations.append(f"{rec.method} {rec.path}: {text}")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        raw_path = request.rel_url.raw_path
        if raw_path.startswith("/api/v3/"):  # GitHub Enterprise Server's prefix
            raw_path = raw_path[len("/api/v3") :]
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        if "Authorization" in request.headers:
            headers["Authorization"] = "[redacted]"
        query = dict(parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True))
        rec = RecordedRequest(request.method, unquote(raw_path), query, headers, None)
        self.requests.append(rec)
        if raw_path.startswith("/_fake/"):
            response = self._fake_only(raw_path, rec)
            rec.status = response.status
            return response
        try:
            status, body, extra = await self._dispatch(request, raw_path, raw, rec)
        except _Reply as reply:
            status, body, extra = reply.status, self._error_body(reply), reply.headers
        rec.status = status
        return self._respond(status, body, extra)

    def _error_body(self, reply: _Reply) -> dict[str, Any]:
        return {"message": reply.message, "documentation_url": DOCS, "status": str(reply.status)}

    def _respond(self, status: int, body: Any, extra: Mapping[str, str]) -> web.Response:
        headers = {
            "X-GitHub-Request-Id": ":".join(secrets.token_hex(2).upper() for _ in range(4))
            + ":"
            + secrets.token_hex(4).upper(),
            "X-GitHub-Api-Version-Selected": SUPPORTED_API_VERSIONS[0],
            "X-RateLimit-Limit": "5000",
            "X-RateLimit-Remaining": "4999",
            "X-RateLimit-Reset": str(int(self.clock().timestamp()) + 3600),
            "X-RateLimit-Used": "1",
            "X-RateLimit-Resource": "core",
            **extra,
        }
        if body is None or status in (204, 302):
            return web.Response(status=status, headers=headers)
        return web.Response(
            status=status,
            headers=headers,
            body=json.dumps(body).encode(),
            content_type="application/json",
            charset="utf-8",
        )

    async def _dispatch(
        self, request: web.Request, raw_path: str, raw: bytes, rec: RecordedRequest
    ) -> tuple[int, Any, dict[str, str]]:
        found = self.contract.match(request.method, raw_path)
        if found is None:
            self._violation(rec, "no operation in GitHub's OpenAPI description matches")
            raise _Reply(404, "Not Found")
        op, raw_params = found
        rec.operation_id = op.operation_id
        params = {k: unquote(v) for k, v in raw_params.items()}

        problems = self._check_headers(request)
        bad_params = self._check_parameters(op, params, rec.query)
        body, bad_body = self._check_body(op, request, raw)
        rec.body = body
        for p in problems + bad_params + bad_body:
            self._violation(rec, p)
        if problems or bad_params:
            raise _Reply(400, "; ".join(problems + bad_params))
        if bad_body:
            raise _Reply(422, "Invalid request.\n\n" + "\n".join(bad_body))

        self._authenticate(request, op, params, rec)
        for fault in self._faults:
            if fault["op"] == op.operation_id and fault["times"] > 0:
                fault["times"] -= 1
                raise _Reply(fault["status"], fault["message"], fault["headers"])
        handler = getattr(self, "op_" + re.sub(r"\W", "_", op.operation_id), None)
        if handler is None:
            self._violation(rec, f"the fake does not implement {op.operation_id}")
            raise _Reply(501, f"not implemented by the fake: {op.operation_id}")
        status, out, extra = await handler(request, params, rec.query, body, rec)
        self._check_response(op, status, out, rec)
        return status, out, extra

    # -- contract checks

    def _check_headers(self, request: web.Request) -> list[str]:
        out = []
        accept = request.headers.get("Accept", "")
        if "application/vnd.github+json" not in accept:
            out.append(f"Accept must be application/vnd.github+json, got {accept!r}")
        version = request.headers.get("X-GitHub-Api-Version")
        if version is None:
            out.append("X-GitHub-Api-Version missing (the API version must be pinned)")
        elif version not in SUPPORTED_API_VERSIONS:
            out.append(f"API version {version} is not supported")
        if not request.headers.get("User-Agent"):
            out.append("User-Agent missing (GitHub rejects requests without one)")
        return out

    def _coerce(self, value: str, schema: Any) -> Any:
        schema = self.contract.resolve(schema)
        types: set[str] = set()
        for s in [schema, *schema.get("oneOf", []), *schema.get("anyOf", [])]:
            t = self.contract.resolve(s).get("type")
            types.update(t if isinstance(t, list) else [t] if t else [])
        if types & {"integer", "number"} and re.fullmatch(r"-?\d+", value):
            return int(value)
        if "number" in types:
            with contextlib.suppress(ValueError):
                return float(value)
        if "boolean" in types and value in ("true", "false"):
            return value == "true"
        if "array" in types:
            return value.split(",")
        return value

    def _parameter_pointers(self, op: Operation) -> list[tuple[dict[str, Any], str]]:
        out: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
        item_ptr = op.pointer.rsplit("/", 1)[0]
        item = self.contract.doc["paths"][op.template]
        for base, params in (
            (f"{item_ptr}/parameters", item.get("parameters", [])),
            (f"{op.pointer}/parameters", op.spec.get("parameters", [])),
        ):
            for i, p in enumerate(params):
                ptr = p["$ref"][1:] if "$ref" in p else f"{base}/{i}"
                resolved = self.contract.resolve(p)
                out[(resolved["in"], resolved["name"])] = (resolved, ptr)
        return list(out.values())

    def _check_parameters(
        self, op: Operation, path_params: dict[str, str], query: dict[str, str]
    ) -> list[str]:
        problems = []
        declared = self._parameter_pointers(op)
        query_names = {p["name"] for p, _ in declared if p["in"] == "query"}
        for name in query:
            if name not in query_names:
                problems.append(f"unknown query parameter {name!r}")
        for p, ptr in declared:
            where = p["in"]
            source = path_params if where == "path" else query if where == "query" else None
            if source is None:
                continue
            if p["name"] not in source:
                if p.get("required"):
                    problems.append(f"missing required {where} parameter {p['name']!r}")
                continue
            value = self._coerce(source[p["name"]], p.get("schema", {}))
            for e in self.contract.errors(f"{ptr}/schema", value):
                problems.append(f"{where} parameter {p['name']!r}{e.split(':', 1)[1]}")
        return problems

    def _check_body(self, op: Operation, request: web.Request, raw: bytes) -> tuple[Any, list[str]]:
        pointer = self.contract.request_body_pointer(op)
        spec_body = self.contract.resolve(op.spec.get("requestBody", {}))
        if not raw:
            if spec_body.get("required"):
                return None, ["the request body is required"]
            return None, []
        if pointer is None:
            return None, ["this operation takes no request body"]
        if request.content_type != "application/json":
            return None, [f"Content-Type must be application/json, got {request.content_type}"]
        try:
            body = json.loads(raw)
        except ValueError:
            return None, ["Problems parsing JSON"]
        return body, [f"body{e}" for e in self.contract.errors(pointer, body)]

    def _check_response(self, op: Operation, status: int, body: Any, rec: RecordedRequest) -> None:
        if str(status) not in op.spec.get("responses", {}):
            self.response_violations.append(
                f"{rec.method} {rec.path}: status {status} is not documented for {op.operation_id}"
            )
            return
        pointer = self.contract.response_pointer(op, status)
        if pointer is None or body is None:
            return
        for e in self.contract.errors(pointer, body):
            self.response_violations.append(f"{rec.method} {rec.path} -> {status}: {e}")

    # -- auth

    def _auth_fail(self, rec: RecordedRequest, status: int, message: str) -> _Reply:
        self.auth_failures.append(f"{rec.method} {rec.path}: {status} {message}")
        return _Reply(status, message)

    def _authenticate(
        self, request: web.Request, op: Operation, params: dict[str, str], rec: RecordedRequest
    ) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if op.template.startswith("/app-manifests/"):
            if header:
                self._violation(rec, "manifest conversion is called without authentication")
            return
        if op.template == "/app" or op.template.startswith("/app/"):
            rec.auth = "jwt"
            if scheme.lower() != "bearer" or not credential:
                raise self._auth_fail(
                    rec, 401, "A JSON web token could not be decoded (missing Bearer token)"
                )
            self._verify_jwt(credential, rec)
            return
        if not header:
            raise self._auth_fail(rec, 401, "Requires authentication")
        if scheme.lower() not in ("bearer", "token"):
            raise self._auth_fail(rec, 401, "Bad credentials")
        if credential in self._user_tokens:
            rec.auth, rec.user = "user", self._user_tokens[credential]
            return
        issued = self._tokens.get(credential)
        if issued is None or self.clock() >= issued.expires_at:
            raise self._auth_fail(rec, 401, "Bad credentials")
        rec.auth, rec.token = "installation", issued
        inst = self.installations.get(issued.installation_id)
        owner, repo = params.get("owner", ""), params.get("repo", "")
        denied = _Reply(403, "Resource not accessible by integration")
        if inst is None or inst.suspended:
            raise self._auth_fail(rec, 401, "Bad credentials")
        if owner.lower() != inst.account.lower() or repo.lower() not in {
            r.lower() for r in issued.repositories
        }:
            raise denied
        needed = REQUIRED_PERMISSIONS.get(op.operation_id)
        if needed is None:
            self._violation(rec, f"the fake has no permission rule for {op.operation_id}")
            raise denied
        if needed == ISSUE_OR_PR:
            needed = [self._issue_permission(op, params)]
        assert isinstance(needed, list)
        if not any(
            all(
                LEVELS.get(issued.permissions.get(k, "none"), 0) >= LEVELS[v]
                for k, v in alternative.items()
            )
            for alternative in needed
        ):
            raise denied

    def _issue_permission(self, op: Operation, params: dict[str, str]) -> dict[str, str]:
        full = f"{params['owner']}/{params['repo']}".lower()
        number: int | None = None
        if "issue_number" in params:
            number = int(params["issue_number"])
        elif "comment_id" in params:
            comment = self.comments.get(int(params["comment_id"]))
            number = comment.issue_number if comment else None
        if number is not None and (full, number) in self.pull_requests:
            return {"pull_requests": "write"}
        return {"issues": "write"}

    def _verify_jwt(self, token: str, rec: RecordedRequest) -> None:
        try:
            claims = jwt.decode(
                token,
                self.public_key_pem,
                algorithms=["RS256"],
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["iat", "exp", "iss"],
                },
            )
        except jwt.PyJWTError as exc:
            raise self._auth_fail(
                rec, 401, f"A JSON web token could not be decoded ({exc})"
            ) from None
        now = int(self.clock().timestamp())
        iat, exp = claims["iat"], claims["exp"]
        if not isinstance(iat, int) or iat > now:
            raise self._auth_fail(
                rec,
                401,
                "'Issued at' claim ('iat') must be an Integer representing a time in the past",
            )
        if not isinstance(exp, int) or exp <= now:
            raise self._auth_fail(
                rec,
                401,
                "'Expiration time' claim ('exp') must be a numeric value representing the "
                "future time at which the assertion expires",
            )
        if exp - iat > 600 or exp > now + 600:
            raise self._auth_fail(
                rec, 401, "'Expiration time' claim ('exp') is too far in the future"
            )
        if str(claims["iss"]) != str(self.app_id):
            raise self._auth_fail(
                rec, 401, "'Issuer' claim ('iss') must be an Integer or the app's client ID"
            )

    # -- response building

    def _example(self, method: str, template: str, status: int) -> Any:
        op = Operation(
            method,
            template,
            self.contract.doc["paths"][template][method],
            f"/paths/{template.replace('~', '~0').replace('/', '~1')}/{method}",
        )
        return self.contract.response_example(op, status)

    def _api(self, path: str) -> str:
        return f"{self.url or 'https://api.github.com'}{path}"

    def _html(self, path: str) -> str:
        return f"https://github.com{path}"

    def _repo_or_404(self, owner: str, repo: str) -> Repo:
        found = self.repos.get(f"{owner}/{repo}".lower())
        if found is None:
            raise _Reply(404, "Not Found")
        return found

    def _user(self, login: str, user_id: int = 1) -> dict[str, Any]:
        user = self._example(
            "get", "/repos/{owner}/{repo}/collaborators/{username}/permission", 200
        )["user"]
        user.update(
            {
                "login": login,
                "id": user_id,
                "type": "User",
                "html_url": self._html(f"/{login}"),
                "url": self._api(f"/users/{login}"),
            }
        )
        if "role_name" not in user:
            user["role_name"] = "read"
        return user

    def _repository(self, repo: Repo) -> dict[str, Any]:
        data = self._example("get", "/repos/{owner}/{repo}", 200)
        data.pop("source", None)
        data.pop("parent", None)
        data.pop("template_repository", None)
        data.setdefault("language", None)
        data.setdefault("has_discussions", False)
        data.update(
            {
                "id": repo.id,
                "name": repo.name,
                "full_name": repo.full_name,
                "default_branch": repo.default_branch,
                "private": repo.private,
                "visibility": "private" if repo.private else "public",
                "is_template": repo.is_template,
                "html_url": self._html(f"/{repo.full_name}"),
                "url": self._api(f"/repos/{repo.full_name}"),
            }
        )
        data["owner"]["login"] = repo.owner
        return data

    def _paginate(
        self, request: web.Request, items: list[Any], query: Mapping[str, str]
    ) -> tuple[list[Any], dict[str, str]]:
        per_page = min(int(query.get("per_page", 30)), 100)
        page = max(int(query.get("page", 1)), 1)
        chunk = items[(page - 1) * per_page : page * per_page]
        links = []
        base = f"{self.url}{request.rel_url.path}"
        if page * per_page < len(items):
            q = {**query, "page": str(page + 1), "per_page": str(per_page)}
            links.append(f'<{base}?{urlencode(q)}>; rel="next"')
            last = (len(items) + per_page - 1) // per_page
            links.append(f'<{base}?{urlencode({**q, "page": str(last)})}>; rel="last"')
        return chunk, ({"Link": ", ".join(links)} if links else {})

    # ------------------------------------------------------------------- app operations

    async def op_apps_get_authenticated(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        data = self._example("get", "/app", 200)
        data.update(
            {
                "id": int(self.app_id),
                "slug": self.app_slug,
                "name": "Spell Platform",
                "client_id": f"Iv23li{self.app_id}",
                "html_url": self._html(f"/apps/{self.app_slug}"),
                "permissions": {
                    "metadata": "read",
                    "contents": "read",
                    "actions": "write",
                    "issues": "write",
                    "pull_requests": "write",
                    "checks": "write",
                },
                "events": [
                    "issue_comment",
                    "workflow_run",
                    "repository_dispatch",
                    "installation",
                    "installation_repositories",
                    "check_run",
                ],
            }
        )
        return 200, data, {}

    def _installation_json(self, inst: Installation) -> dict[str, Any]:
        data = self._example("get", "/app/installations", 200)[0]
        account = data["account"]
        account.update({"login": inst.account, "id": 1000 + inst.id, "type": inst.account_type})
        # The description types account as allOf[Simple User, Enterprise] (both at once):
        # give it the Enterprise fields too so responses satisfy the schema.
        account.update(
            {
                "name": inst.account,
                "slug": inst.account.lower(),
                "created_at": "2020-01-01T00:00:00Z",
                "updated_at": "2020-01-01T00:00:00Z",
            }
        )
        data.update(
            {
                "id": inst.id,
                "app_id": int(self.app_id),
                "app_slug": self.app_slug,
                "target_id": 1000 + inst.id,
                "target_type": inst.account_type,
                "permissions": dict(inst.permissions),
                "repository_selection": "selected",
                "access_tokens_url": self._api(f"/app/installations/{inst.id}/access_tokens"),
                "events": ["issue_comment", "workflow_run"],
                "suspended_at": iso(self.clock()) if inst.suspended else None,
                "suspended_by": None,
            }
        )
        return data

    async def op_apps_list_installations(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        items = [self._installation_json(i) for i in self.installations.values()]
        chunk, headers = self._paginate(request, items, query)
        return 200, chunk, headers

    async def op_apps_create_installation_access_token(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        inst = self.installations.get(int(params["installation_id"]))
        if inst is None:
            raise _Reply(404, "Not Found")
        if inst.suspended:
            raise _Reply(403, "This installation has been suspended")
        body = body or {}
        if "repository_ids" in body:
            raise _Reply(422, "the fake expects repositories by name")
        names = body.get("repositories")
        granted = {r.lower(): r for r in inst.repositories}
        if names is None:
            repos = tuple(inst.repositories)
        else:
            if len(names) > 500:
                raise _Reply(422, "Too many repositories (at most 500)")
            if any(n.lower() not in granted for n in names):
                raise _Reply(
                    422,
                    "There is at least one repository that does not exist or is not "
                    "accessible to the parent installation.",
                )
            repos = tuple(granted[n.lower()] for n in names)
        perms = body.get("permissions")
        if perms is None:
            perms = dict(inst.permissions)
        for k, v in perms.items():
            if LEVELS.get(inst.permissions.get(k, "none"), 0) < LEVELS.get(v, 9):
                raise _Reply(422, "The permissions requested are not granted to this installation.")
        expires_at = (self.clock() + timedelta(hours=1)).replace(microsecond=0)
        issued = IssuedToken(self.token_factory(), inst.id, repos, dict(perms), expires_at)
        self._tokens[issued.token] = issued
        self.issued_tokens.append(issued)
        data = self._example("post", "/app/installations/{installation_id}/access_tokens", 201)
        for k in ("repositories", "single_file", "has_multiple_single_files", "single_file_paths"):
            data.pop(k, None)
        data.update(
            {
                "token": issued.token,
                "expires_at": iso(expires_at),
                "permissions": dict(perms),
                "repository_selection": "selected",
            }
        )
        return 201, data, {}

    def _delivery_json(self, d: Delivery) -> dict[str, Any]:
        return {
            "id": d.id,
            "guid": d.guid,
            "delivered_at": iso(d.delivered_at),
            "redelivery": d.redelivery,
            "duration": 0.12,
            "status": "OK" if d.status_code < 400 else f"Invalid HTTP Response: {d.status_code}",
            "status_code": d.status_code,
            "event": d.event,
            "action": d.action,
            "installation_id": d.installation_id,
            "repository_id": d.repository_id,
            "throttled_at": None,
        }

    async def op_apps_list_webhook_deliveries(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        items = sorted(self.deliveries.values(), key=lambda d: (d.delivered_at, d.id), reverse=True)
        if query.get("status") == "success":
            items = [d for d in items if d.status_code < 400]
        elif query.get("status") == "failure":
            items = [d for d in items if d.status_code >= 400]
        start = 0
        if "cursor" in query:
            cursor = query["cursor"]
            ids = [d.id for d in items]
            if not cursor.startswith("v1_") or int(cursor[3:]) not in ids:
                raise _Reply(400, "Bad request: invalid cursor")
            start = ids.index(int(cursor[3:])) + 1
        per_page = min(int(query.get("per_page", 30)), 100)
        chunk = items[start : start + per_page]
        headers = {}
        if start + per_page < len(items):
            q = {k: v for k, v in query.items() if k != "cursor"}
            q["cursor"] = f"v1_{chunk[-1].id}"
            headers["Link"] = f'<{self.url}/app/hook/deliveries?{urlencode(q)}>; rel="next"'
        return 200, [self._delivery_json(d) for d in chunk], headers

    async def op_apps_redeliver_webhook_delivery(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        original = self.deliveries.get(int(params["delivery_id"]))
        if original is None:
            raise _Reply(422, "Validation Failed: delivery not found")
        if self.clock() - original.delivered_at > timedelta(days=3):
            raise _Reply(
                422, "Validation Failed: deliveries older than 3 days cannot be redelivered"
            )
        self.redeliveries.append(original.id)
        self.add_delivery(
            original.event,
            action=original.action,
            guid=original.guid,
            redelivery=True,
            installation_id=original.installation_id,
        )
        return 202, {}, {}

    async def op_apps_create_from_manifest(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        code = params["code"]
        if code not in self.manifest_codes:
            raise _Reply(404, "Not Found")
        self.manifest_codes.pop(code)
        self.conversions.append(code)
        data = self._example("post", "/app-manifests/{code}/conversions", 201)
        data.update(
            {
                "id": int(self.app_id),
                "slug": self.app_slug,
                "name": "Spell Platform",
                "client_id": f"Iv23li{self.app_id}",
                "client_secret": secrets.token_hex(20),
                "webhook_secret": secrets.token_hex(20),
                "pem": self.private_key_pem,
                "html_url": self._html(f"/apps/{self.app_slug}"),
            }
        )
        return 201, data, {}

    # -------------------------------------------------------------- repository operations

    async def op_pulls_get(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        number = int(params["pull_number"])
        if (repo.full_name.lower(), number) not in self.pull_requests:
            raise _Reply(404, "Not Found")
        data = self._example("get", "/repos/{owner}/{repo}/pulls/{pull_number}", 200)
        sha = self.pr_head_shas.get((repo.full_name.lower(), number), "a" * 40)
        data["number"] = number
        data["head"]["sha"] = sha
        data["requested_teams"] = []  # the spec's example lacks required team fields
        return 200, data, {}

    async def op_repos_get(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        return 200, self._repository(repo), {}

    async def op_repos_get_collaborator_permission_level(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        user = params["username"]
        role = self.permissions.get((repo.full_name.lower(), user.lower()), "none")
        permission = {"maintain": "write", "triage": "read"}.get(role, role)
        data = self._example(
            "get", "/repos/{owner}/{repo}/collaborators/{username}/permission", 200
        )
        data.update({"permission": permission, "role_name": role, "user": self._user(user)})
        data["user"]["role_name"] = role
        return 200, data, {}

    def _comment_json(self, c: Comment) -> dict[str, Any]:
        data = self._example("post", "/repos/{owner}/{repo}/issues/{issue_number}/comments", 201)
        data.update(
            {
                "id": c.id,
                "body": c.body,
                "user": self._user(c.user),
                "created_at": iso(c.created_at),
                "updated_at": iso(c.updated_at),
                "url": self._api(f"/repos/{c.repo}/issues/comments/{c.id}"),
                "html_url": self._html(f"/{c.repo}/issues/{c.issue_number}#issuecomment-{c.id}"),
                "issue_url": self._api(f"/repos/{c.repo}/issues/{c.issue_number}"),
            }
        )
        data["user"].pop("role_name", None)
        return data

    async def op_issues_create_comment(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        if len(body["body"]) > 65536:
            raise _Reply(422, "Validation Failed: body is too long (maximum is 65536 characters)")
        comment = self.add_comment(
            repo.full_name, int(params["issue_number"]), body["body"], user=f"{self.app_slug}[bot]"
        )
        return 201, self._comment_json(comment), {}

    async def op_issues_update_comment(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        comment = self.comments.get(int(params["comment_id"]))
        if comment is None or comment.repo != repo.full_name.lower():
            raise _Reply(404, "Not Found")
        comment.body, comment.updated_at = body["body"], self.clock()
        return 200, self._comment_json(comment), {}

    async def op_reactions_create_for_issue_comment(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        comment = self.comments.get(int(params["comment_id"]))
        if comment is None or comment.repo != repo.full_name.lower():
            raise _Reply(404, "Not Found")
        for r in self.reactions:
            if r["comment_id"] == comment.id and r["content"] == body["content"]:
                return 200, r["json"], {}  # GitHub answers 200 for an existing reaction
        data = self._example(
            "post", "/repos/{owner}/{repo}/issues/comments/{comment_id}/reactions", 201
        )
        data.update(
            {
                "id": self.next_id(),
                "content": body["content"],
                "user": self._user(f"{self.app_slug}[bot]"),
                "created_at": iso(self.clock()),
            }
        )
        data["user"].pop("role_name", None)
        self.reactions.append(
            {
                "repo": repo.full_name.lower(),
                "comment_id": comment.id,
                "content": body["content"],
                "json": data,
            }
        )
        return 201, data, {}

    def _check_run_json(self, run: dict[str, Any]) -> dict[str, Any]:
        data = self._example("post", "/repos/{owner}/{repo}/check-runs", 201)
        data.update({k: v for k, v in run.items() if k not in ("repo", "output")})
        out = {
            "title": None,
            "summary": None,
            "text": None,
            "annotations_count": 0,
            "annotations_url": self._api(
                f"/repos/{run['repo']}/check-runs/{run['id']}/annotations"
            ),
        }
        out.update({k: v for k, v in (run.get("output") or {}).items() if k in out})
        data["output"] = out
        data["url"] = self._api(f"/repos/{run['repo']}/check-runs/{run['id']}")
        data["html_url"] = self._html(f"/{run['repo']}/runs/{run['id']}")
        data["pull_requests"] = []
        return data

    async def op_checks_create(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        if not re.fullmatch(r"[0-9a-f]{40}", body["head_sha"]):
            raise _Reply(422, "Validation Failed: No commit found for SHA: " + body["head_sha"])
        status = "completed" if body.get("conclusion") else body.get("status", "queued")
        if status == "completed" and not body.get("conclusion"):
            raise _Reply(422, "Validation Failed: conclusion is required for completed runs")
        now = iso(self.clock())
        run = {
            "id": self.next_id(),
            "repo": repo.full_name.lower(),
            "name": body["name"],
            "head_sha": body["head_sha"],
            "external_id": body.get("external_id"),
            "details_url": body.get("details_url"),
            "status": status,
            "conclusion": body.get("conclusion"),
            "started_at": now,
            "completed_at": now if status == "completed" else None,
            "output": body.get("output"),
        }
        self.check_runs[run["id"]] = run
        return 201, self._check_run_json(run), {}

    async def op_checks_update(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        run = self.check_runs.get(int(params["check_run_id"]))
        if run is None or run["repo"] != repo.full_name.lower():
            raise _Reply(404, "Not Found")
        if body.get("status") == "completed" and not body.get("conclusion"):
            raise _Reply(422, "Validation Failed: conclusion is required for completed runs")
        for k in ("name", "details_url", "external_id", "status", "conclusion", "output"):
            if k in body:
                run[k] = body[k]
        if body.get("conclusion"):
            run["status"], run["completed_at"] = "completed", iso(self.clock())
        return 200, self._check_run_json(run), {}

    # -------------------------------------------------------------------------- actions

    def _workflow_or_404(self, repo: Repo, workflow_id: str) -> Workflow:
        for wf in self.workflows.values():
            if wf.repo == repo.full_name.lower() and workflow_id in (str(wf.id), wf.file):
                return wf
        raise _Reply(404, "Not Found")

    def _run_json(self, run: Run) -> dict[str, Any]:
        data = self._example("get", "/repos/{owner}/{repo}/actions/runs/{run_id}", 200)
        wf = self.workflows[run.workflow_id]
        repo = self.repos[run.repo]
        base = f"/repos/{repo.full_name}/actions/runs/{run.id}"
        data.update(
            {
                "id": run.id,
                "name": run.name,
                "display_title": run.display_title,
                "status": run.status,
                "conclusion": run.conclusion,
                "event": run.event,
                "head_branch": run.head_branch,
                "head_sha": run.head_sha,
                "workflow_id": wf.id,
                "path": f"{wf.path}@{run.head_branch}",
                "run_number": run.run_number,
                "run_attempt": 1,
                "created_at": iso(run.created_at),
                "updated_at": iso(run.updated_at),
                "run_started_at": iso(run.created_at),
                "url": self._api(base),
                "html_url": self._html(base[len("/repos") :]),
                "artifacts_url": self._api(base + "/artifacts"),
                "cancel_url": self._api(base + "/cancel"),
                "workflow_url": self._api(f"/repos/{repo.full_name}/actions/workflows/{wf.id}"),
                "pull_requests": [],
            }
        )
        data["repository"]["id"] = repo.id
        data["repository"]["name"] = repo.name
        data["repository"]["full_name"] = repo.full_name
        return data

    async def op_actions_create_workflow_dispatch(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        wf = self._workflow_or_404(repo, params["workflow_id"])
        if self.reject_return_run_details and "return_run_details" in body:
            raise _Reply(422, 'Invalid request.\n\n"return_run_details" is not a permitted key.')
        ref = body["ref"].removeprefix("refs/heads/")
        if ref not in repo.branches:
            raise _Reply(422, f"No ref found for: {body['ref']}")
        inputs = body.get("inputs") or {}
        for k, v in inputs.items():
            if not isinstance(v, str):
                self._violation(rec, f"workflow input {k!r} is not a string")
                raise _Reply(422, f"Invalid value for input {k!r}: inputs must be strings")
        if wf.inputs is not None:
            unexpected = sorted(set(inputs) - set(wf.inputs))
            if unexpected:
                raise _Reply(422, f"Unexpected inputs provided: {json.dumps(unexpected)}")
        for k in wf.required_inputs:
            if k not in inputs:
                raise _Reply(422, f"Required input '{k}' not provided")
        now = self.clock()
        title = f"{wf.name} {inputs['cast_id']}" if "cast_id" in inputs else wf.name
        run = Run(
            self.next_id(),
            repo.full_name.lower(),
            wf.id,
            title,
            title,
            "workflow_dispatch",
            ref,
            secrets.token_hex(20),
            dict(inputs),
            now,
            now,
            1 + sum(1 for r in self.runs.values() if r.workflow_id == wf.id),
        )
        self.runs[run.id] = run
        self.dispatches.append(
            {
                "repo": repo.full_name.lower(),
                "workflow": wf.file,
                "ref": body["ref"],
                "inputs": dict(inputs),
                "run_id": run.id,
                "return_run_details": body.get("return_run_details"),
            }
        )
        if body.get("return_run_details"):
            path = f"/repos/{repo.full_name}/actions/runs/{run.id}"
            return (
                200,
                {
                    "workflow_run_id": run.id,
                    "run_url": self._api(path),
                    "html_url": self._html(path[len("/repos") :]),
                },
                {},
            )
        return 204, None, {}

    async def op_repos_create_dispatch_event(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        payload = body.get("client_payload", {})
        if len(json.dumps(payload, separators=(",", ":")).encode()) >= 64 * 1024:
            raise _Reply(422, "client_payload is too large (must be less than 64KB)")
        self.repository_dispatches.append(
            {
                "repo": repo.full_name.lower(),
                "event_type": body["event_type"],
                "client_payload": payload,
            }
        )
        return 204, None, {}

    async def op_actions_list_workflow_runs(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        wf = self._workflow_or_404(repo, params["workflow_id"])
        runs = [r for r in self.runs.values() if r.workflow_id == wf.id]
        if "event" in query:
            runs = [r for r in runs if r.event == query["event"]]
        if "status" in query:
            runs = [r for r in runs if query["status"] in (r.status, r.conclusion)]
        runs.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        chunk, headers = self._paginate(request, runs, query)
        return (
            200,
            {"total_count": len(runs), "workflow_runs": [self._run_json(r) for r in chunk]},
            headers,
        )

    def _run_or_404(self, repo: Repo, run_id: str) -> Run:
        run = self.runs.get(int(run_id))
        if run is None or run.repo != repo.full_name.lower():
            raise _Reply(404, "Not Found")
        return run

    async def op_actions_get_workflow_run(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        return 200, self._run_json(self._run_or_404(repo, params["run_id"])), {}

    def _artifact_expired(self, art: Artifact) -> bool:
        return art.expired or self.clock() >= art.expires_at

    async def op_actions_list_workflow_run_artifacts(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        run = self._run_or_404(repo, params["run_id"])
        arts = [a for a in self.artifacts.values() if a.run_id == run.id]
        if "name" in query:
            arts = [a for a in arts if a.name == query["name"]]
        chunk, headers = self._paginate(request, arts, query)
        template = self._example(
            "get", "/repos/{owner}/{repo}/actions/runs/{run_id}/artifacts", 200
        )["artifacts"][0]
        items = []
        for a in chunk:
            item = json.loads(json.dumps(template))
            base = f"/repos/{repo.full_name}/actions/artifacts/{a.id}"
            item.update(
                {
                    "id": a.id,
                    "name": a.name,
                    "size_in_bytes": len(a.content),
                    "digest": a.digest,
                    "expired": self._artifact_expired(a),
                    "created_at": iso(a.created_at),
                    "updated_at": iso(a.created_at),
                    "expires_at": iso(a.expires_at),
                    "url": self._api(base),
                    "archive_download_url": self._api(base + "/zip"),
                }
            )
            item["workflow_run"].update(
                {
                    "id": run.id,
                    "repository_id": repo.id,
                    "head_repository_id": repo.id,
                    "head_branch": run.head_branch,
                    "head_sha": run.head_sha,
                }
            )
            items.append(item)
        return 200, {"total_count": len(arts), "artifacts": items}, headers

    async def op_actions_download_artifact(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        if params["archive_format"] != "zip":
            self._violation(rec, "archive_format must be zip")
            raise _Reply(404, "Not Found")
        art = self.artifacts.get(int(params["artifact_id"]))
        if art is None or art.repo != repo.full_name.lower():
            raise _Reply(404, "Not Found")
        if self._artifact_expired(art):
            raise _Reply(410, "Artifact has expired")
        key = secrets.token_urlsafe(24)
        self._downloads[key] = (art.id, self.clock() + timedelta(minutes=1))
        return (
            302,
            None,
            {"Location": f"{self.url}/_fake/artifacts/{key}?sig={secrets.token_hex(8)}"},
        )

    async def op_actions_cancel_workflow_run(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        repo = self._repo_or_404(params["owner"], params["repo"])
        run = self._run_or_404(repo, params["run_id"])
        if run.status == "completed":
            raise _Reply(409, "Cannot cancel a workflow run that is completed.")
        run.status, run.conclusion, run.updated_at = "completed", "cancelled", self.clock()
        return 202, {}, {}

    async def op_repos_create_using_template(self, request, params, query, body, rec):  # type: ignore[no-untyped-def]
        if rec.auth != "user":
            raise _Reply(403, "Resource not accessible by integration")
        template = self._repo_or_404(params["template_owner"], params["template_repo"])
        if not template.is_template:
            raise _Reply(422, f"{template.full_name} is not a template repository")
        owner = body.get("owner") or rec.user
        full = f"{owner}/{body['name']}"
        if full.lower() in self.repos:
            raise _Reply(422, "Repository creation failed.: name already exists on this account")
        repo = self.add_repo(
            full, default_branch=template.default_branch, private=bool(body.get("private", False))
        )
        data = self._repository(repo)
        return 201, data, {}

    # ------------------------------------------------------------------- outside the API

    def _fake_only(self, raw_path: str, rec: RecordedRequest) -> web.Response:
        m = re.fullmatch(r"/_fake/artifacts/([\w-]+)", raw_path)
        if m:
            entry = self._downloads.get(m.group(1))
            if entry is None or self.clock() >= entry[1]:
                # Like the blob store behind GitHub's link once its minute is over.
                return web.Response(status=403, text="AuthenticationFailed: the URL expired")
            art = self.artifacts[entry[0]]
            return web.Response(body=art.content, content_type="application/zip")
        return web.Response(status=404, text="unknown fake path")


@functools.cache
def _shared_key() -> rsa.RSAPrivateKey:
    """The App key of every fake (RSA key generation is slow; each fake may get its own)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_zip(files: Mapping[str, bytes | str]) -> bytes:
    """A zip archive of ``files`` (what ``actions/upload-artifact`` produces for a folder)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data.encode() if isinstance(data, str) else data)
    return buf.getvalue()
