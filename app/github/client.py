"""An async client for the GitHub REST API, as a GitHub App.

Layered like githubkit/gidgethub: one I/O seam (:meth:`GitHubClient._request`), pure helpers
that build requests and turn responses into values or typed errors, and auth handled here — a
caller names an installation and a repository, never a token.

* App-level calls (``/app/*``) authenticate with the App's JWT (``appauth.app_jwt``).
* Installation-level calls ask for an installation token scoped to the ONE repository they touch
  and only the permissions listed for them in :data:`CALL_PERMISSIONS`; tokens are cached per
  (installation, repositories, permissions) until 5 minutes before they expire.
* Tokens never appear in logs, exceptions or reprs (they travel as ``SecretStr`` and only the
  ``Authorization`` header sees their value).

Every request sends ``Accept: application/vnd.github+json`` and pins
``X-GitHub-Api-Version: 2022-11-28`` (https://docs.github.com/rest/about-the-rest-api/api-versions).
The base URL is ``https://api.github.com`` or, for GitHub Enterprise Server,
``https://HOST/api/v3``.
"""

from __future__ import annotations

import json as jsonlib
import logging
import weakref
from asyncio import Lock
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Final, cast
from urllib.parse import parse_qs, quote, urlsplit

import httpx
from pydantic import SecretStr

from app.github.appauth import (
    TokenCache,
    TokenKey,
    app_jwt,
    load_private_key,
    now_utc,
    token_key,
)

log = logging.getLogger(__name__)

DEFAULT_API_URL: Final = "https://api.github.com"
API_VERSION: Final = "2022-11-28"
USER_AGENT: Final = "spell-platform"
#: an App JWT lives 9 minutes; reuse it for 8
JWT_REUSE: Final = timedelta(minutes=8)
BASE_HEADERS: Final[Mapping[str, str]] = {
    "Accept": "application/vnd.github+json",
    "X-GitHub-Api-Version": API_VERSION,
    "User-Agent": USER_AGENT,
}

#: The permissions each installation-level call asks for: the least GitHub documents for its
#: endpoint ("Permissions required for GitHub Apps",
#: https://docs.github.com/rest/authentication/permissions-required-for-github-apps).
#: Every call mints (or reuses) a token for the one repository it touches with exactly these.
CALL_PERMISSIONS: Final[Mapping[str, Mapping[str, str]]] = {
    # GET /repos/{o}/{r}/pulls/{number}
    "pull_request_head_sha": {"pull_requests": "read"},
    # GET /repos/{o}/{r}/collaborators/{username}/permission
    "collaborator_permission": {"metadata": "read"},
    # POST /repos/{o}/{r}/issues/comments/{id}/reactions
    "add_reaction": {"issues": "write"},
    # POST /repos/{o}/{r}/issues/{number}/comments
    "create_comment": {"issues": "write"},
    # PATCH /repos/{o}/{r}/issues/comments/{id}
    "update_comment": {"issues": "write"},
    # POST /repos/{o}/{r}/check-runs
    "create_check_run": {"checks": "write"},
    # PATCH /repos/{o}/{r}/check-runs/{id}
    "update_check_run": {"checks": "write"},
    # POST /repos/{o}/{r}/actions/workflows/{id}/dispatches
    "dispatch_workflow": {"actions": "write"},
    # POST /repos/{o}/{r}/dispatches (a per-spell escalation: the App asks for it only there)
    "repository_dispatch": {"contents": "write"},
    # GET /repos/{o}/{r}/actions/workflows/{id}/runs
    "find_run_by_name": {"actions": "read"},
    # GET /repos/{o}/{r}/actions/runs/{id}
    "get_workflow_run": {"actions": "read"},
    # GET /repos/{o}/{r}/actions/runs/{id}/artifacts
    "list_run_artifacts": {"actions": "read"},
    # GET /repos/{o}/{r}/actions/artifacts/{id}/zip
    "artifact_download_url": {"actions": "read"},
    # POST /repos/{o}/{r}/actions/runs/{id}/cancel
    "cancel_run": {"actions": "write"},
    # GET /repos/{o}/{r}
    "default_branch": {"metadata": "read"},
}
#: Comments and reactions on a pull request's conversation use the issue endpoints, but GitHub
#: checks the ``pull_requests`` permission there: calls made with ``pull_request=True`` ask for
#: this instead of ``issues: write``.
PULL_REQUEST_PERMISSIONS: Final[Mapping[str, str]] = {"pull_requests": "write"}

REACTIONS: Final = frozenset({"+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"})
MAX_WORKFLOW_INPUTS: Final = 25
MAX_EVENT_TYPE_CHARS: Final = 100
MAX_CLIENT_PAYLOAD_KEYS: Final = 10
MAX_CLIENT_PAYLOAD_BYTES: Final = 64 * 1024  # the JSON must be strictly smaller
#: Runs are looked up from a little before ``created_after``: our clock and GitHub's differ.
RUN_LOOKUP_SKEW: Final = timedelta(minutes=5)
MAX_PAGES: Final = 50
PER_PAGE: Final = 100


# ------------------------------------------------------------------------------------ errors


class GitHubError(Exception):
    """GitHub answered an error (or could not be reached: ``status`` 0)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        request_id: str | None = None,
        documentation_url: str | None = None,
        errors: list[Any] | None = None,
    ) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.request_id = request_id
        self.documentation_url = documentation_url
        self.errors = errors or []

    def __str__(self) -> str:
        rid = f" (request id {self.request_id})" if self.request_id else ""
        return f"GitHub answered {self.status}: {self.message}{rid}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status}, message={self.message!r}, "
            f"request_id={self.request_id!r})"
        )


class GitHubNotFound(GitHubError):
    """404: the resource does not exist or the token may not see it."""


class GitHubForbidden(GitHubError):
    """403 (or 429): not allowed, or rate limited — then ``retry_after`` says how long to wait."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        request_id: str | None = None,
        documentation_url: str | None = None,
        errors: list[Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(
            status,
            message,
            request_id=request_id,
            documentation_url=documentation_url,
            errors=errors,
        )
        self.retry_after = retry_after


class GitHubGone(GitHubError):
    """410: the resource existed but is gone (e.g. an expired artifact)."""


class GitHubValidationFailed(GitHubError):
    """422: GitHub rejected the request's content."""


class DispatchLimitError(ValueError):
    """A dispatch that GitHub would reject for its documented limits, refused before sending."""


def _retry_after(status: int, headers: httpx.Headers, message: str, now: datetime) -> int | None:
    """Seconds to wait before retrying, from GitHub's rate-limit headers (None: not limited).

    https://docs.github.com/rest/using-the-rest-api/best-practices-for-using-the-rest-api
    """
    retry_after = headers.get("retry-after")
    if retry_after is not None and retry_after.strip().isdigit():
        return int(retry_after)
    reset = headers.get("x-ratelimit-reset")
    if headers.get("x-ratelimit-remaining") == "0" and reset is not None and reset.isdigit():
        return max(0, int(reset) - int(now.timestamp()))
    if status == 429 or "rate limit" in message.lower():
        return 60  # GitHub: "wait for at least one minute before retrying"
    return None


def error_from_response(
    status: int, headers: httpx.Headers, body: bytes, *, now: datetime
) -> GitHubError | None:
    """The typed error for a GitHub response, or None for a success (pure)."""
    if status < 400:
        return None
    message, documentation_url, errors = f"HTTP {status}", None, None
    try:
        data = jsonlib.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        message = str(data.get("message") or message)
        documentation_url = data.get("documentation_url")
        if isinstance(data.get("errors"), list):
            errors = data["errors"]
    request_id = headers.get("x-github-request-id")
    kwargs: dict[str, Any] = {
        "request_id": request_id,
        "documentation_url": documentation_url,
        "errors": errors,
    }
    if status in (403, 429):
        retry = _retry_after(status, headers, message, now)
        return GitHubForbidden(status, message, retry_after=retry, **kwargs)
    cls = {404: GitHubNotFound, 410: GitHubGone, 422: GitHubValidationFailed}.get(
        status, GitHubError
    )
    return cls(status, message, **kwargs)


# ----------------------------------------------------------------------------- pure helpers


def _seg(value: str | int) -> str:
    """One path segment, percent-encoded (``/`` included)."""
    return quote(str(value), safe="")


def _repo_path(owner: str, repo: str, *rest: str | int) -> str:
    return "/".join(["/repos", _seg(owner), _seg(repo), *(_seg(r) for r in rest)])


def _next_params(response: httpx.Response) -> dict[str, str] | None:
    """The query of the ``Link: <…>; rel="next"`` page, or None on the last page."""
    url = response.links.get("next", {}).get("url")
    if not url:
        return None
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _json(response: httpx.Response) -> Any:
    return response.json()


def validate_workflow_inputs(inputs: Mapping[str, str]) -> dict[str, str]:
    """``inputs`` of a workflow_dispatch: at most 25, keys and values all strings."""
    if len(inputs) > MAX_WORKFLOW_INPUTS:
        raise DispatchLimitError(
            f"a workflow_dispatch takes at most {MAX_WORKFLOW_INPUTS} inputs, got {len(inputs)}"
        )
    for key, value in inputs.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise DispatchLimitError(f"workflow input {key!r} must be a string")
    return dict(inputs)


def validate_repository_dispatch(event_type: str, client_payload: Mapping[str, Any]) -> None:
    """GitHub's limits: event_type 1-100 chars; payload ≤ 10 top-level keys and < 64 KB."""
    if not event_type or len(event_type) > MAX_EVENT_TYPE_CHARS:
        raise DispatchLimitError(
            f"event_type must be 1 to {MAX_EVENT_TYPE_CHARS} characters, got {len(event_type)}"
        )
    if len(client_payload) > MAX_CLIENT_PAYLOAD_KEYS:
        raise DispatchLimitError(
            f"client_payload may have at most {MAX_CLIENT_PAYLOAD_KEYS} top-level keys, "
            f"got {len(client_payload)}"
        )
    size = len(jsonlib.dumps(client_payload, separators=(",", ":")).encode())
    if size >= MAX_CLIENT_PAYLOAD_BYTES:
        raise DispatchLimitError(
            f"client_payload must be smaller than {MAX_CLIENT_PAYLOAD_BYTES} bytes, got {size}"
        )


def _issue_permissions(call: str, pull_request: bool) -> Mapping[str, str]:
    return PULL_REQUEST_PERMISSIONS if pull_request else CALL_PERMISSIONS[call]


# -------------------------------------------------------------------------------- the client


class GitHubClient:
    """GitHub REST calls as a GitHub App; build one per process and share it."""

    def __init__(
        self,
        api_url: str,
        app_id: str,
        private_key_pem: str,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], datetime] = now_utc,
        token_cache: TokenCache | None = None,
    ) -> None:
        self.api_url = (api_url or DEFAULT_API_URL).rstrip("/")
        self.app_id = str(app_id)
        self._private_key = SecretStr(private_key_pem)
        self._own_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=30.0)
        self._clock = clock
        self.tokens = token_cache if token_cache is not None else TokenCache()
        self._key: Any = None
        self._jwt_cache: tuple[SecretStr, datetime] | None = None
        self._mint_locks: weakref.WeakValueDictionary[TokenKey, Lock] = (
            weakref.WeakValueDictionary()
        )

    def __repr__(self) -> str:
        return f"GitHubClient(api_url={self.api_url!r}, app_id={self.app_id!r})"

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> GitHubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the one I/O seam

    async def _request(
        self,
        method: str,
        path: str,
        *,
        token: SecretStr | None,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """Send one request; an error answer raises the matching :class:`GitHubError`."""
        headers = dict(BASE_HEADERS)
        if token is not None:
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        try:
            response = await self._http.request(
                method,
                self.api_url + path,
                headers=headers,
                json=json,
                params=params,
                follow_redirects=follow_redirects,
            )
        except httpx.HTTPError as exc:
            # ``from None``: the httpx exception holds the request (and its Authorization).
            raise GitHubError(0, f"{method} {path} failed: {type(exc).__name__}: {exc}") from None
        request_id = response.headers.get("x-github-request-id")
        log.debug("github %s %s -> %s (request %s)", method, path, response.status_code, request_id)
        error = error_from_response(
            response.status_code, response.headers, response.content, now=self._clock()
        )
        if error is not None:
            raise error
        return response

    # -- auth

    def _jwt(self) -> SecretStr:
        """The App JWT, reused until a minute before it expires (signing is cheap once the key
        is parsed; parsing it costs tens of ms, so it happens once per client)."""
        now = self._clock()
        if self._jwt_cache is not None and now < self._jwt_cache[1]:
            return self._jwt_cache[0]
        if self._key is None:
            self._key = load_private_key(self._private_key.get_secret_value())
        token = SecretStr(app_jwt(self.app_id, self._key, now=now))
        self._jwt_cache = (token, now + JWT_REUSE)
        return token

    async def installation_token(
        self,
        installation_id: int,
        *,
        repositories: list[str],
        permissions: Mapping[str, str],
    ) -> SecretStr:
        """An installation token for ``repositories`` (names, not ``owner/name``) and
        ``permissions``; reused from the cache until 5 minutes before it expires.
        """
        for name in repositories:
            if not name or "/" in name:
                raise ValueError(f"repositories are names without the owner, got {name!r}")
        key = token_key(installation_id, repositories, permissions)
        cached = self.tokens.get(key, self._clock())
        if cached is not None:
            return cached
        lock = self._mint_locks.get(key)
        if lock is None:
            lock = Lock()
            self._mint_locks[key] = lock
        async with lock:
            cached = self.tokens.get(key, self._clock())
            if cached is not None:
                return cached
            body: dict[str, Any] = {"permissions": dict(permissions)}
            if repositories:
                body["repositories"] = sorted(set(repositories))
            response = await self._request(
                "POST",
                f"/app/installations/{_seg(installation_id)}/access_tokens",
                token=self._jwt(),
                json=body,
            )
            data = _json(response)
            token = SecretStr(str(data["token"]))
            self.tokens.put(key, token, _parse_time(str(data["expires_at"])))
            return token

    async def _repo_request(
        self,
        installation_id: int,
        repo: str,
        permissions: Mapping[str, str],
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """A request with a token scoped to ``repo`` and ``permissions``.

        A 401 means the cached token was revoked: it is dropped and the call retried once.
        """
        for attempt in (1, 2):
            token = await self.installation_token(
                installation_id, repositories=[repo], permissions=permissions
            )
            try:
                return await self._request(
                    method,
                    path,
                    token=token,
                    json=json,
                    params=params,
                    follow_redirects=follow_redirects,
                )
            except GitHubError as exc:
                if exc.status != 401 or attempt == 2:
                    raise
                self.tokens.discard(token_key(installation_id, [repo], permissions))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- App level (JWT)

    async def get_app(self) -> dict[str, Any]:
        """The App itself (``GET /app``): id, slug, name, owner, permissions, events."""
        response = await self._request("GET", "/app", token=self._jwt())
        return cast(dict[str, Any], _json(response))

    async def list_installations(self) -> list[dict[str, Any]]:
        """Every installation of the App (``GET /app/installations``, all pages)."""
        out: list[dict[str, Any]] = []
        params: dict[str, str] | None = {"per_page": str(PER_PAGE)}
        for _ in range(MAX_PAGES):
            if params is None:
                break
            response = await self._request(
                "GET", "/app/installations", token=self._jwt(), params=params
            )
            out.extend(_json(response))
            params = _next_params(response)
        return out

    async def list_hook_deliveries(self, *, since: datetime) -> list[dict[str, Any]]:
        """The App's webhook deliveries made at or after ``since``, newest first.

        Pages with ``cursor`` (from the ``Link`` header) and stops at the first older delivery:
        GitHub lists deliveries newest first and keeps them for 3 days.
        """
        if since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        out: list[dict[str, Any]] = []
        params: dict[str, str] | None = {"per_page": str(PER_PAGE)}
        for _ in range(MAX_PAGES):
            if params is None:
                break
            response = await self._request(
                "GET", "/app/hook/deliveries", token=self._jwt(), params=params
            )
            for delivery in _json(response):
                if _parse_time(str(delivery["delivered_at"])) < since:
                    return out
                out.append(delivery)
            params = _next_params(response)
        return out

    async def redeliver(self, delivery_id: int) -> None:
        """Ask GitHub to send a delivery again (``POST /app/hook/deliveries/{id}/attempts``)."""
        await self._request(
            "POST", f"/app/hook/deliveries/{_seg(int(delivery_id))}/attempts", token=self._jwt()
        )

    async def convert_manifest(self, code: str) -> dict[str, Any]:
        """Finish the manifest flow: the new App's id, slug, client id/secret, webhook secret
        and private key (``pem``). Unauthenticated by design; the code is valid for one hour.
        """
        response = await self._request(
            "POST", f"/app-manifests/{_seg(code)}/conversions", token=None
        )
        return cast(dict[str, Any], _json(response))

    # -- installation level (a token for one repository and the call's permissions)

    async def collaborator_permission(
        self, installation_id: int, owner: str, repo: str, username: str
    ) -> str:
        """``admin``, ``write``, ``read`` or ``none``: ``username``'s permission on the repo."""
        response = await self._repo_request(
            installation_id,
            repo,
            CALL_PERMISSIONS["collaborator_permission"],
            "GET",
            _repo_path(owner, repo, "collaborators", username, "permission"),
        )
        return str(_json(response)["permission"])

    async def add_reaction(
        self,
        installation_id: int,
        owner: str,
        repo: str,
        comment_id: int,
        content: str,
        *,
        pull_request: bool = False,
    ) -> None:
        """React to an issue (or, with ``pull_request=True``, a PR conversation) comment."""
        if content not in REACTIONS:
            raise ValueError(f"unknown reaction {content!r}; one of {sorted(REACTIONS)}")
        await self._repo_request(
            installation_id,
            repo,
            _issue_permissions("add_reaction", pull_request),
            "POST",
            _repo_path(owner, repo, "issues", "comments", comment_id, "reactions"),
            json={"content": content},
        )

    async def create_comment(
        self,
        installation_id: int,
        owner: str,
        repo: str,
        issue_number: int,
        body: str,
        *,
        pull_request: bool = False,
    ) -> int:
        """Comment on an issue or pull request; returns the comment id."""
        response = await self._repo_request(
            installation_id,
            repo,
            _issue_permissions("create_comment", pull_request),
            "POST",
            _repo_path(owner, repo, "issues", issue_number, "comments"),
            json={"body": body},
        )
        return int(_json(response)["id"])

    async def update_comment(
        self,
        installation_id: int,
        owner: str,
        repo: str,
        comment_id: int,
        body: str,
        *,
        pull_request: bool = False,
    ) -> None:
        """Replace the body of a comment (the one bot comment per cast, edited in place)."""
        await self._repo_request(
            installation_id,
            repo,
            _issue_permissions("update_comment", pull_request),
            "PATCH",
            _repo_path(owner, repo, "issues", "comments", comment_id),
            json={"body": body},
        )

    async def create_check_run(
        self,
        installation_id: int,
        owner: str,
        repo: str,
        *,
        name: str,
        head_sha: str,
        external_id: str,
        status: str,
        details_url: str | None = None,
        output: Mapping[str, Any] | None = None,
    ) -> int:
        """Create a check run on ``head_sha``; returns its id."""
        body: dict[str, Any] = {
            "name": name,
            "head_sha": head_sha,
            "external_id": external_id,
            "status": status,
        }
        if details_url is not None:
            body["details_url"] = details_url
        if output is not None:
            body["output"] = dict(output)
        response = await self._repo_request(
            installation_id,
            repo,
            CALL_PERMISSIONS["create_check_run"],
            "POST",
            _repo_path(owner, repo, "check-runs"),
            json=body,
        )
        return int(_json(response)["id"])

    async def update_check_run(
        self,
        installation_id: int,
        owner: str,
        repo: str,
        check_run_id: int,
        *,
        status: str,
        conclusion: str | None = None,
        output: Mapping[str, Any] | None = None,
        details_url: str | None = None,
    ) -> None:
        """Move a check run along (``completed`` needs a ``conclusion``)."""
        if status == "completed" and conclusion is None:
            raise ValueError("a completed check run needs a conclusion")
        body: dict[str, Any] = {"status": status}
        if conclusion is not None:
            body["conclusion"] = conclusion
        if output is not None:
            body["output"] = dict(output)
        if details_url is not None:
            body["details_url"] = details_url
        await self._repo_request(
            installation_id,
            repo,
            CALL_PERMISSIONS["update_check_run"],
            "PATCH",
            _repo_path(owner, repo, "check-runs", check_run_id),
            json=body,
        )

    async def dispatch_workflow(
        self,
        installation_id: int,
        owner: str,
        repo: str,
        workflow_id: str | int,
        *,
        ref: str,
        inputs: Mapping[str, str],
    ) -> dict[str, Any] | None:
        """Fire ``workflow_dispatch``; returns ``{workflow_run_id, run_url, html_url}``.

        Asks for ``return_run_details`` (GitHub.com since 2026-02-19). A server that rejects the
        field (422 naming it: older GHES) is asked once more without it and answers 204: then
        this returns None and the caller correlates with :meth:`find_run_by_name`.
        An unknown workflow raises :class:`GitHubNotFound`.
        """
        body: dict[str, Any] = {
            "ref": ref,
            "inputs": validate_workflow_inputs(inputs),
            "return_run_details": True,
        }
        path = _repo_path(owner, repo, "actions", "workflows", workflow_id, "dispatches")
        permissions = CALL_PERMISSIONS["dispatch_workflow"]
        try:
            response = await self._repo_request(
                installation_id, repo, permissions, "POST", path, json=body
            )
        except GitHubValidationFailed as exc:
            if "return_run_details" not in f"{exc.message} {exc.errors}":
                raise
            log.info("github rejected return_run_details (older GHES?): dispatching without it")
            del body["return_run_details"]
            response = await self._repo_request(
                installation_id, repo, permissions, "POST", path, json=body
            )
        if response.status_code == 200 and response.content:
            return cast(dict[str, Any], _json(response))
        return None

    async def repository_dispatch(
        self,
        installation_id: int,
        owner: str,
        repo: str,
        *,
        event_type: str,
        client_payload: Mapping[str, Any],
    ) -> None:
        """Fire ``repository_dispatch`` (default branch only; GitHub returns no run id)."""
        validate_repository_dispatch(event_type, client_payload)
        await self._repo_request(
            installation_id,
            repo,
            CALL_PERMISSIONS["repository_dispatch"],
            "POST",
            _repo_path(owner, repo, "dispatches"),
            json={"event_type": event_type, "client_payload": dict(client_payload)},
        )

    async def find_run_by_name(
        self,
        installation_id: int,
        owner: str,
        repo: str,
        workflow_id: str | int,
        *,
        contains: str,
        created_after: datetime,
    ) -> dict[str, Any] | None:
        """The newest ``workflow_dispatch`` run of the workflow whose ``name`` or
        ``display_title`` contains ``contains`` (the cast id, put into the workflow's
        ``run-name``) — how a 204 dispatch is correlated with its run. None if not there yet.

        Runs are listed newest first; the search stops at runs created before
        ``created_after`` (less :data:`RUN_LOOKUP_SKEW`). The ``created`` query filter is not
        used: the OpenAPI description types it as a plain date-time, not a range.
        """
        if not contains:
            raise ValueError("contains must not be empty")
        oldest = created_after - RUN_LOOKUP_SKEW
        path = _repo_path(owner, repo, "actions", "workflows", workflow_id, "runs")
        params: dict[str, str] | None = {"event": "workflow_dispatch", "per_page": str(PER_PAGE)}
        for _ in range(MAX_PAGES):
            if params is None:
                break
            response = await self._repo_request(
                installation_id,
                repo,
                CALL_PERMISSIONS["find_run_by_name"],
                "GET",
                path,
                params=params,
            )
            for run in _json(response).get("workflow_runs", []):
                if _parse_time(str(run["created_at"])) < oldest:
                    return None
                titles = (run.get("name") or "", run.get("display_title") or "")
                if any(contains in t for t in titles):
                    return cast(dict[str, Any], run)
            params = _next_params(response)
        return None

    async def get_workflow_run(
        self, installation_id: int, owner: str, repo: str, run_id: int
    ) -> dict[str, Any]:
        response = await self._repo_request(
            installation_id,
            repo,
            CALL_PERMISSIONS["get_workflow_run"],
            "GET",
            _repo_path(owner, repo, "actions", "runs", run_id),
        )
        return cast(dict[str, Any], _json(response))

    async def list_run_artifacts(
        self, installation_id: int, owner: str, repo: str, run_id: int
    ) -> list[dict[str, Any]]:
        """A run's artifacts (all pages): id, name, size_in_bytes, digest, expired, expires_at."""
        out: list[dict[str, Any]] = []
        params: dict[str, str] | None = {"per_page": str(PER_PAGE)}
        for _ in range(MAX_PAGES):
            if params is None:
                break
            response = await self._repo_request(
                installation_id,
                repo,
                CALL_PERMISSIONS["list_run_artifacts"],
                "GET",
                _repo_path(owner, repo, "actions", "runs", run_id, "artifacts"),
                params=params,
            )
            out.extend(_json(response).get("artifacts", []))
            params = _next_params(response)
        return out

    async def artifact_download_url(
        self, installation_id: int, owner: str, repo: str, artifact_id: int
    ) -> str:
        """GitHub's download URL for an artifact zip (the 302 ``Location``).

        The URL expires after one minute: mint one per download and never cache or store it.
        An expired artifact raises :class:`GitHubGone`.
        """
        response = await self._repo_request(
            installation_id,
            repo,
            CALL_PERMISSIONS["artifact_download_url"],
            "GET",
            _repo_path(owner, repo, "actions", "artifacts", artifact_id, "zip"),
            follow_redirects=False,
        )
        location = response.headers.get("location")
        if response.status_code not in (301, 302, 303, 307, 308) or not location:
            raise GitHubError(
                response.status_code,
                "expected a redirect to the artifact download",
                request_id=response.headers.get("x-github-request-id"),
            )
        return str(location)

    async def cancel_run(self, installation_id: int, owner: str, repo: str, run_id: int) -> None:
        """Cancel a workflow run (409 if it already finished)."""
        await self._repo_request(
            installation_id,
            repo,
            CALL_PERMISSIONS["cancel_run"],
            "POST",
            _repo_path(owner, repo, "actions", "runs", run_id, "cancel"),
        )

    async def pull_request_head_sha(
        self, installation_id: int, owner: str, repo: str, number: int
    ) -> str:
        """The head commit of a pull request (where its check runs go)."""
        response = await self._repo_request(
            installation_id,
            repo,
            CALL_PERMISSIONS["pull_request_head_sha"],
            "GET",
            _repo_path(owner, repo, "pulls", number),
        )
        return str(_json(response)["head"]["sha"])

    async def default_branch(self, installation_id: int, owner: str, repo: str) -> str:
        response = await self._repo_request(
            installation_id,
            repo,
            CALL_PERMISSIONS["default_branch"],
            "GET",
            _repo_path(owner, repo),
        )
        return str(_json(response)["default_branch"])

    # -- user level

    async def generate_from_template(
        self,
        template_owner: str,
        template_repo: str,
        *,
        owner: str,
        name: str,
        private: bool,
        token: SecretStr,
    ) -> dict[str, Any]:
        """Create ``owner/name`` from a template repository with a *user* token (clone mode)."""
        response = await self._request(
            "POST",
            f"/repos/{_seg(template_owner)}/{_seg(template_repo)}/generate",
            token=token,
            json={"owner": owner, "name": name, "private": private},
        )
        return cast(dict[str, Any], _json(response))
