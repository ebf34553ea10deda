"""GitHub App commands of the ``spell`` CLI (registered into the root group by ``main.py``).

* ``spell app create`` — register the App from ``app-manifest.json`` (the manifest flow, as
  Probot's setup does it) and save its credentials with 0600 permissions.
* ``spell app doctor`` — check the configured App credentials against GitHub.
* ``spell webhooks redeliver`` — ask GitHub to send failed deliveries again (it never retries).
* ``spell github link|unlink|links`` — which platform account a GitHub user or owner casts as.

Settings stay environment-only: ``app create`` writes ``github-app.env`` for the operator to load
(``set -a; . .spell/github-app.env; set +a``) before ``spell serve``; nothing reads it implicitly.
This module imports nothing from ``main.py`` at import time (``main.py`` imports it).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import webbrowser
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import click

from app.config import Settings
from app.errors import AppError
from app.github.manifest import (
    DEFAULT_GITHUB_URL,
    DEFAULT_PUBLIC_URL,
    ENV_FILE,
    LOGIN_RE,
    PAGE_HEADERS,
    PEM_FILE,
    AppCredentials,
    ManifestError,
    api_url_for,
    callback_url,
    check_private_key,
    env_file_content,
    install_url,
    is_local_url,
    missing_events,
    new_state,
    normalize_base_url,
    parse_conversion,
    parse_manifest,
    permission_differences,
    registration_url,
    render_message,
    render_page,
    rewrite_manifest,
    shell_path,
    state_matches,
    write_secret_file,
)

T = TypeVar("T")
LINK_ROLES: Final = ("caster", "operator")
#: GitHub keeps webhook deliveries for 3 days; older ones cannot be listed or redelivered.
MAX_SINCE: Final = timedelta(days=3)
_DURATION_RE: Final = re.compile(r"\s*(\d{1,7})\s*([smhd])\s*", re.IGNORECASE)
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def fail(message: str, code: str = "VALIDATION_ERROR") -> NoReturn:
    """``error: CODE: message`` and exit 1 (through the root group, like ``main.fail``)."""
    raise AppError(code, message)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    from app.cli.main import table as main_table

    return main_table(headers, rows)


def _out(text: str = "", *, err: bool = False) -> None:
    click.echo(text, err=err)
    (sys.stderr if err else sys.stdout).flush()


def default_manifest_path() -> Path:
    """``app-manifest.json`` of the source tree, else of the current directory."""
    beside = Path(__file__).resolve().parents[2] / "app-manifest.json"
    return beside if beside.is_file() else Path("app-manifest.json")


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        fail(f"no manifest at {path}: give its path with --manifest FILE")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the manifest {path}: {e}")
    try:
        return parse_manifest(text)
    except ManifestError as e:
        fail(f"{path}: {e}")


def _github_error(exc: Exception, *, doing: str, app_id: str | None = None) -> AppError:
    """An AppError (with a code the CLI knows) for a GitHubError raised while ``doing``."""
    from app.github.client import GitHubError

    if not isinstance(exc, GitHubError):
        return AppError("INTERNAL", f"{doing}: {type(exc).__name__}: {exc}")
    if exc.status == 0:
        return AppError("UNAVAILABLE", f"{doing}: cannot reach GitHub ({exc.message})")
    if exc.status == 401 and app_id is not None:
        return AppError(
            "UNAUTHORIZED",
            f"GitHub refused the App's JWT ({exc.message}): the private key does not belong to "
            f"app {app_id} (check GITHUB_APP_ID and the key; or this machine's clock is off)",
        )
    code = {
        401: "UNAUTHORIZED",
        403: "FORBIDDEN",
        404: "NOT_FOUND",
        422: "VALIDATION_ERROR",
        429: "RATE_LIMITED",
    }.get(exc.status, "UNAVAILABLE")
    return AppError(code, f"{doing}: {exc}", retry_after=getattr(exc, "retry_after", None))


# ======================================================================== spell app …


@click.group("app")
def app_group() -> None:
    """The GitHub App: register it from app-manifest.json and check its credentials."""


@app_group.command("create")
@click.option(
    "--org",
    metavar="ORG",
    help="Register the App under this organization (default: your personal account).",
)
@click.option(
    "--public-url",
    metavar="URL",
    help="Where GitHub reaches this server (webhooks, setup); replaces the manifest's "
    f"placeholder host. Default: SPELL_PUBLIC_URL, else {DEFAULT_PUBLIC_URL}.",
)
@click.option(
    "--github-url",
    default=DEFAULT_GITHUB_URL,
    show_default=True,
    metavar="URL",
    help="GitHub's web address (GitHub Enterprise Server: https://HOST). The code is "
    "exchanged at GITHUB_API_URL (default: api.github.com, or https://HOST/api/v3).",
)
@click.option(
    "--port",
    default=3000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Local port of the registration page and callback (0: any free port).",
)
@click.option("--no-browser", is_flag=True, help="Only print the local URL; do not open it.")
@click.option(
    "--timeout",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Give up when GitHub has not redirected back within this long.",
)
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The App manifest (default: app-manifest.json of the platform).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace github-app.pem/.env already in the data directory (an earlier App's).",
)
def app_create(
    org: str | None,
    public_url: str | None,
    github_url: str,
    port: int,
    no_browser: bool,
    timeout: float,
    manifest_path: Path | None,
    force: bool,
) -> None:
    """Register the GitHub App from its manifest and save its credentials (0600).

    \b
    Serves a page on http://127.0.0.1:PORT/ whose button posts app-manifest.json to GitHub;
    after you confirm there, GitHub redirects back to http://127.0.0.1:PORT/callback, the code
    is exchanged for the App's credentials, and these are written to the data directory:
      $SPELL_DATA_DIR/github-app.pem   the private key
      $SPELL_DATA_DIR/github-app.env   GITHUB_APP_ID, GITHUB_APP_PRIVATE_KEY_PATH,
                                       GITHUB_WEBHOOK_SECRET, GITHUB_CLIENT_ID/SECRET
    Load them before starting the server:
      set -a; . .spell/github-app.env; set +a
      spell serve
    """
    settings = Settings()
    try:
        base = normalize_base_url(
            public_url or settings.public_url or DEFAULT_PUBLIC_URL, what="--public-url"
        )
        github = normalize_base_url(github_url, what="--github-url")
        if org is not None and not LOGIN_RE.fullmatch(org):
            raise ManifestError(f"--org {org!r} is not a GitHub organization name")
    except ManifestError as e:
        raise click.BadParameter(str(e)) from None
    api_url = api_url_for(
        github, settings.github_api_url if "github_api_url" in settings.model_fields_set else None
    )
    manifest = _load_manifest(manifest_path or default_manifest_path())
    try:
        rewrite_manifest(manifest, public_url=base, redirect_url=callback_url(port or 1))
    except ManifestError as e:
        fail(str(e))

    data_dir = settings.ensure_data_dir()
    pem_path, env_path = data_dir / PEM_FILE, data_dir / ENV_FILE
    existing = [p for p in (pem_path, env_path) if p.exists()]
    if existing and not force:
        fail(
            f"{existing[0]} already holds GitHub App credentials; move it away or pass --force "
            "to replace it",
            "CONFLICT",
        )
    if is_local_url(base):
        _out(
            f"warning: the public URL {base} is not reachable from GitHub: webhooks will fail "
            "until the App's webhook URL points at a public address (--public-url, or a "
            "tunnel such as smee.io)",
            err=True,
        )

    def save(creds: AppCredentials) -> None:
        write_secret_file(pem_path, creds.pem.encode(), overwrite=force)
        content = env_file_content(
            creds,
            pem_path=pem_path.resolve(),
            api_url=api_url,
            env_path=env_path,
            created_at=datetime.now(UTC),
        )
        write_secret_file(env_path, content.encode(), overwrite=force)

    flow = ManifestFlow(
        manifest=manifest,
        public_url=base,
        github_url=github,
        api_url=api_url,
        org=org,
        save=save,
    )
    creds = run_async(flow.run(port=port, timeout=timeout, open_browser=not no_browser))
    _out(f"created GitHub App {creds.name!r} ({creds.slug}, id {creds.app_id})")
    _out(f"saved the private key to {pem_path} (0600)")
    _out(f"saved the settings to {env_path} (0600)")
    if creds.webhook_secret is None:
        _out("warning: GitHub returned no webhook secret; set GITHUB_WEBHOOK_SECRET", err=True)
    _out("")
    _out("next steps:")
    _out(f"  1. install the App on your repositories: {creds.install_url}")
    _out("  2. load the settings and start the server:")
    _out(f"       set -a; . {shell_path(env_path)}; set +a")
    _out("       spell serve")
    _out("  3. check the credentials: spell app doctor")
    _out("  4. let GitHub users cast: spell github link --account ACCOUNT --user LOGIN")


class ManifestFlow:
    """The local half of the manifest flow: the page, the callback, the code exchange."""

    def __init__(
        self,
        *,
        manifest: Mapping[str, Any],
        public_url: str,
        github_url: str,
        api_url: str,
        org: str | None,
        save: Callable[[AppCredentials], None],
    ) -> None:
        self.manifest = manifest
        self.public_url = public_url
        self.github_url = github_url
        self.api_url = api_url
        self.org = org
        self.save = save
        self.state = new_state()
        self.port = 0
        self.page = ""
        self._lock = asyncio.Lock()
        self._done: asyncio.Future[AppCredentials] | None = None

    def _host_ok(self, host: str | None) -> bool:
        # DNS rebinding: a page on another origin resolving to 127.0.0.1 must not read the
        # state out of our page, so only our own host names are served.
        return host in (f"127.0.0.1:{self.port}", f"localhost:{self.port}")

    def _html(self, status: int, text: str) -> Any:
        from aiohttp import web

        return web.Response(
            status=status, text=text, content_type="text/html", headers=dict(PAGE_HEADERS)
        )

    async def index(self, request: Any) -> Any:
        if not self._host_ok(request.host):
            return self._html(421, render_message("Wrong host", "Open the URL the CLI printed."))
        return self._html(200, self.page)

    async def callback(self, request: Any) -> Any:
        from aiohttp import web

        if not self._host_ok(request.host):
            return self._html(421, render_message("Wrong host", "Open the URL the CLI printed."))
        assert self._done is not None
        if not state_matches(self.state, request.query.get("state")):
            _out("refused a callback with a wrong or missing state (not from this run)", err=True)
            return self._html(
                403,
                render_message(
                    "Refused",
                    "This callback does not carry the state of the page `spell app create` "
                    "served; it was ignored. Start again from the page the CLI printed.",
                ),
            )
        code = request.query.get("code", "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,200}", code):
            return self._html(400, render_message("Bad request", "The callback has no code."))
        if self._lock.locked() or self._done.done():
            return self._html(
                409, render_message("Already done", "This run has already handled a callback.")
            )
        async with self._lock:
            try:
                creds = await self._exchange(code)
                self.save(creds)
            except AppError as e:
                self._done.set_exception(e)
                return self._html(502, render_message("GitHub App not saved", e.message))
            except OSError as e:
                err = AppError("INTERNAL", f"cannot write the credentials: {e}")
                self._done.set_exception(err)
                return self._html(500, render_message("GitHub App not saved", err.message))
        response = web.HTTPFound(creds.install_url, headers=dict(PAGE_HEADERS))
        await response.prepare(request)
        await response.write_eof()
        self._done.set_result(creds)
        return response

    async def _exchange(self, code: str) -> AppCredentials:
        from app.github.client import GitHubClient, GitHubError

        async with GitHubClient(self.api_url, app_id="", private_key_pem="") as client:
            try:
                data = await client.convert_manifest(code)
            except GitHubError as e:
                err = _github_error(e, doing="exchanging the code")
                if e.status == 404:
                    err = AppError(
                        "NOT_FOUND",
                        "GitHub does not know this code (codes are valid once, for one hour): "
                        "run `spell app create` again",
                    )
                raise err from None
        try:
            return parse_conversion(data, github_url=self.github_url)
        except ManifestError as e:
            raise AppError("INTERNAL", f"unexpected answer from GitHub: {e}") from None

    async def run(self, *, port: int, timeout: float, open_browser: bool) -> AppCredentials:
        from aiohttp import web

        self._done = asyncio.get_running_loop().create_future()
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/callback", self.callback)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", port, shutdown_timeout=5)
            try:
                await site.start()
            except OSError as e:
                fail(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}", "UNAVAILABLE")
            self.port = int(runner.addresses[0][1])
            manifest = rewrite_manifest(
                self.manifest, public_url=self.public_url, redirect_url=callback_url(self.port)
            )
            action = registration_url(self.github_url, self.state, self.org)
            self.page = render_page(manifest, action, org=self.org)
            local = f"http://127.0.0.1:{self.port}/"
            owner = f"organization {self.org}" if self.org else "your account"
            _out(f"Open {local} in your browser to register the GitHub App ({owner}).")
            _out(
                f"waiting up to {timeout:g} s for GitHub to redirect back to "
                f"{callback_url(self.port)} (Ctrl-C to stop)",
                err=True,
            )
            if open_browser:
                try:
                    webbrowser.open(local)
                except Exception as e:  # a missing browser is not an error: the URL is printed
                    _out(f"note: cannot open a browser ({type(e).__name__})", err=True)
            try:
                return await asyncio.wait_for(asyncio.shield(self._done), timeout)
            except TimeoutError:
                fail(
                    f"GitHub did not redirect back within {timeout:g} s; run `spell app create` "
                    "again (and delete any half-created App in GitHub's settings)",
                    "TIMEOUT",
                )
        finally:
            await runner.cleanup()


# ------------------------------------------------------------------------- app doctor


@dataclass
class Doctor:
    """Collects the results of ``spell app doctor``."""

    failures: list[AppError]

    def ok(self, text: str) -> None:
        _out(f"ok: {text}")

    def info(self, text: str) -> None:
        _out(f"    {text}")

    def warn(self, text: str) -> None:
        _out(f"warning: {text}")

    def fail(self, err: AppError) -> None:
        _out(f"FAILED: {err.message}")
        self.failures.append(err)


def _key_source(settings: Settings) -> str:
    if settings.github_private_key is not None and settings.github_private_key.get_secret_value():
        return "GITHUB_APP_PRIVATE_KEY"
    return f"GITHUB_APP_PRIVATE_KEY_PATH ({settings.github_private_key_path})"


def _read_key(settings: Settings) -> str | None:
    """The configured PEM; raises AppError when the key file cannot be read."""
    try:
        return settings.github_key_pem()
    except OSError as e:
        raise AppError(
            "VALIDATION_ERROR",
            f"cannot read GITHUB_APP_PRIVATE_KEY_PATH {settings.github_private_key_path}: "
            f"{e.strerror or e}",
        ) from None


def _configured_client_args(settings: Settings) -> tuple[str, str]:
    """(app id, PEM) of the configured App, or exit with what is missing."""
    if not settings.github_app_id:
        fail(
            "GITHUB_APP_ID is not set (`spell app create` writes it to github-app.env; load it "
            "with `set -a; . .spell/github-app.env; set +a`)"
        )
    pem = _read_key(settings)
    if not pem:
        fail("set GITHUB_APP_PRIVATE_KEY or GITHUB_APP_PRIVATE_KEY_PATH (the App's private key)")
    return str(settings.github_app_id), pem


def _listing(values: Mapping[str, Any] | Sequence[Any] | None) -> str:
    if isinstance(values, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in sorted(values.items())) or "none"
    return ", ".join(sorted(str(v) for v in values or [])) or "none"


@app_group.command("doctor")
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Compare the App's permissions with this manifest (default: app-manifest.json).",
)
@click.pass_context
def app_doctor(ctx: click.Context, manifest_path: Path | None) -> None:
    """Check the GitHub App credentials of this environment against GitHub.

    \b
    Checks: GITHUB_APP_ID and the private key are set and the PEM parses; GitHub accepts the
    App's JWT (GET /app: slug, name, permissions, events — warns when the permissions differ
    from app-manifest.json); the installations (account, repository selection, suspended);
    GITHUB_WEBHOOK_SECRET is set. Exit status 1 when a check fails.
    """
    settings = Settings()
    doc = Doctor(failures=[])
    app_id = settings.github_app_id
    pem: str | None = None
    if not app_id:
        doc.fail(AppError("VALIDATION_ERROR", "GITHUB_APP_ID is not set"))
    elif not re.fullmatch(r"\d{1,20}|Iv[0-9A-Za-z.]{1,40}", app_id):
        doc.fail(AppError("VALIDATION_ERROR", f"GITHUB_APP_ID {app_id!r} is not an App id"))
        app_id = None
    else:
        doc.ok(f"GITHUB_APP_ID is {app_id}")
    try:
        pem = _read_key(settings)
    except AppError as e:
        doc.fail(e)
    else:
        if not pem:
            doc.fail(
                AppError(
                    "VALIDATION_ERROR",
                    "no private key: set GITHUB_APP_PRIVATE_KEY or GITHUB_APP_PRIVATE_KEY_PATH",
                )
            )
        else:
            try:
                bits = check_private_key(pem)
            except ManifestError as e:
                doc.fail(AppError("VALIDATION_ERROR", f"{_key_source(settings)}: {e}"))
                pem = None
            else:
                doc.ok(f"private key from {_key_source(settings)}: RSA, {bits} bits")
                path = settings.github_private_key_path
                if _key_source(settings) != "GITHUB_APP_PRIVATE_KEY" and path is not None:
                    mode = path.stat().st_mode & 0o777
                    if mode & 0o077:
                        doc.warn(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    secrets_ = settings.webhook_secrets()
    if secrets_:
        doc.ok(f"GITHUB_WEBHOOK_SECRET is set ({len(secrets_)} secret(s))")
    else:
        doc.fail(
            AppError(
                "VALIDATION_ERROR",
                "GITHUB_WEBHOOK_SECRET is not set: the server would refuse every delivery",
            )
        )

    if app_id and pem:
        path = manifest_path or default_manifest_path()
        manifest: dict[str, Any] | None = None
        if path.is_file() or manifest_path is not None:
            manifest = _load_manifest(path)
        run_async(_doctor_github(doc, settings, str(app_id), pem, manifest))
    else:
        _out("skipped: the checks against GitHub (they need the App id and a valid key)")

    if doc.failures:
        from app.cli.main import report_error

        first = doc.failures[0]
        more = len(doc.failures) - 1
        report_error(
            first.code,
            first.message + (f" (and {more} more problem(s) above)" if more else ""),
            first.retry_after,
        )
        ctx.exit(1)
    _out("all checks passed")


async def _doctor_github(
    doc: Doctor, settings: Settings, app_id: str, pem: str, manifest: Mapping[str, Any] | None
) -> None:
    from app.github.client import GitHubClient, GitHubError

    async with GitHubClient(settings.github_api_url, app_id, pem) as client:
        try:
            app = await client.get_app()
        except GitHubError as e:
            doc.fail(_github_error(e, doing=f"GET {settings.github_api_url}/app", app_id=app_id))
            return
        slug, name = app.get("slug"), app.get("name")
        doc.ok(f"GitHub accepts the App's JWT: {slug} ({name!r}) at {settings.github_api_url}")
        if str(app.get("id")) != app_id and str(app.get("client_id")) != app_id:
            doc.warn(f"GitHub says this is app {app.get('id')}, GITHUB_APP_ID says {app_id}")
        doc.info(f"permissions: {_listing(app.get('permissions'))}")
        doc.info(f"events: {_listing(app.get('events'))}")
        if manifest is not None:
            diffs = permission_differences(
                manifest.get("default_permissions"), app.get("permissions")
            )
            for line in diffs:
                doc.warn(f"permission differs from app-manifest.json: {line}")
            for event in missing_events(manifest.get("default_events"), app.get("events")):
                doc.warn(f"the App is not subscribed to {event} (app-manifest.json asks for it)")
            if diffs:
                doc.info("change them in the App's settings; installations must accept them")
        try:
            installations = await client.list_installations()
        except GitHubError as e:
            doc.fail(_github_error(e, doing="listing the installations", app_id=app_id))
            return
        html_url = app.get("html_url")
        if not installations:
            where = f": {install_url(str(html_url))}" if html_url else ""
            doc.warn(f"the App is not installed anywhere yet; install it{where}")
            return
        doc.ok(f"{len(installations)} installation(s)")
        rows = []
        for inst in installations:
            account = inst.get("account") or {}
            rows.append(
                (
                    inst.get("id"),
                    account.get("login") if isinstance(account, Mapping) else "?",
                    account.get("type") if isinstance(account, Mapping) else "?",
                    inst.get("repository_selection"),
                    "yes" if inst.get("suspended_at") else "no",
                )
            )
        for line in table(("ID", "ACCOUNT", "TYPE", "REPOSITORIES", "SUSPENDED"), rows).split("\n"):
            doc.info(line)
        suspended = [r[1] for r in rows if r[4] == "yes"]
        if suspended:
            doc.warn(f"suspended installations (no casts there): {', '.join(map(str, suspended))}")


# ======================================================================= spell webhooks …


def parse_since(text: str) -> timedelta:
    """``30m``, ``1h``, ``2d``, ``90s`` → a duration in (0, 3 days]; raises ValueError."""
    m = _DURATION_RE.fullmatch(text or "")
    if m is None:
        raise ValueError(f"{text!r} is not a duration like 30m, 1h or 2d")
    span = timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2).lower()])
    if span <= timedelta(0):
        raise ValueError("the duration must be positive")
    if span > MAX_SINCE:
        raise ValueError("GitHub keeps deliveries for 3 days: use at most 3d")
    return span


def _since_option(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
    try:
        return parse_since(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@dataclass(frozen=True)
class Decision:
    """What ``redeliver`` does with one failed delivery (the newest attempt of its guid)."""

    delivery: Mapping[str, Any]
    redeliver: bool
    reason: str


def delivered_ok(delivery: Mapping[str, Any]) -> bool:
    code = delivery.get("status_code")
    return isinstance(code, int) and 200 <= code < 300


def plan_redeliveries(
    deliveries: Sequence[Mapping[str, Any]], inbox: Mapping[str, str]
) -> list[Decision]:
    """The failed deliveries, newest first, one per guid, each marked redeliver or skip.

    ``deliveries`` is GitHub's list (newest first; a redelivery is another entry with the same
    guid); ``inbox`` maps the guids stored in our inbox to their status. A guid is left alone
    when any attempt got a 2xx answer (delivered after all); it is skipped when the inbox holds
    it (processed, or queued there: a redelivery would only be dropped as a duplicate).
    """
    by_guid: dict[str, list[Mapping[str, Any]]] = {}
    for d in deliveries:
        by_guid.setdefault(str(d.get("guid") or f"id:{d.get('id')}"), []).append(d)
    out = []
    for guid, attempts in by_guid.items():
        if any(delivered_ok(a) for a in attempts):
            continue
        status = inbox.get(guid)
        if status in ("done", "ignored"):
            out.append(Decision(attempts[0], False, f"already processed ({status})"))
        elif status is not None:
            out.append(Decision(attempts[0], False, f"already in the inbox ({status})"))
        else:
            out.append(Decision(attempts[0], True, "failed"))
    return out


def _delivery_text(d: Mapping[str, Any]) -> str:
    event = str(d.get("event") or "?")
    if d.get("action"):
        event += f".{d['action']}"
    code = d.get("status_code")
    return f"{d.get('id')}  {event}  status {code}  {d.get('delivered_at')}  guid {d.get('guid')}"


async def _inbox_statuses(settings: Settings, guids: Sequence[str]) -> dict[str, str] | None:
    """The inbox status of each guid stored locally; None when there is no local ledger."""
    from app.cli.local import local_engine, sqlite_file
    from app.services.ports import SystemClock
    from app.store.inbox import Inbox
    from app.store.ledger import SqlLedger

    db_file = sqlite_file(settings)
    if db_file is not None and not db_file.exists():
        return None
    out: dict[str, str] = {}
    async with local_engine(settings, migrate=False) as engine:
        clock = SystemClock()
        inbox = Inbox(SqlLedger(engine, clock), clock)
        for guid in guids:
            row = await inbox.status(guid)
            if row is not None and row[0] == "github":
                out[guid] = row[1]
    return out


@click.group("webhooks")
def webhooks_group() -> None:
    """GitHub webhook deliveries."""


@webhooks_group.command("redeliver")
@click.option(
    "--since",
    default="1h",
    show_default=True,
    callback=_since_option,
    metavar="DURATION",
    help="How far back to look: 30m, 1h, 2d … (GitHub keeps deliveries 3 days).",
)
@click.option("--dry-run", is_flag=True, help="Only show what would be redelivered.")
@click.pass_context
def webhooks_redeliver(ctx: click.Context, since: timedelta, dry_run: bool) -> None:
    """Ask GitHub to redeliver the webhook deliveries that failed (GitHub never retries).

    \b
    Lists the App's deliveries since --since (GET /app/hook/deliveries) and redelivers each one
    whose answer was not 2xx, unless another attempt of it succeeded or this server's inbox
    already holds it (same X-GitHub-Delivery guid: processed or queued). Uses GITHUB_APP_ID /
    GITHUB_APP_PRIVATE_KEY[_PATH] and the local ledger (SPELL_DATA_DIR / DATABASE_URL).
    Exit status 1 when GitHub refused a redelivery.
    """
    settings = Settings()
    app_id, pem = _configured_client_args(settings)
    start = datetime.now(UTC) - since
    failed_posts = run_async(_redeliver(settings, app_id, pem, start, dry_run))
    if failed_posts:
        ctx.exit(1)


async def _redeliver(
    settings: Settings, app_id: str, pem: str, start: datetime, dry_run: bool
) -> int:
    from app.github.client import GitHubClient, GitHubError

    async with GitHubClient(settings.github_api_url, app_id, pem) as client:
        try:
            deliveries = await client.list_hook_deliveries(since=start)
        except GitHubError as e:
            raise _github_error(e, doing="listing the deliveries", app_id=app_id) from None
        failed_guids = sorted(
            {str(d.get("guid")) for d in deliveries if not delivered_ok(d) and d.get("guid")}
        )
        inbox = await _inbox_statuses(settings, failed_guids) if failed_guids else {}
        if inbox is None:
            _out(
                "note: no local ledger here: cannot tell which deliveries the server already "
                "stored (it drops duplicates anyway)",
                err=True,
            )
            inbox = {}
        plan = plan_redeliveries(deliveries, inbox)
        done = errors = 0
        for decision in plan:
            text = _delivery_text(decision.delivery)
            if not decision.redeliver:
                _out(f"skipped      {text}  ({decision.reason})")
                continue
            if dry_run:
                _out(f"would redeliver  {text}")
                done += 1
                continue
            try:
                await client.redeliver(int(decision.delivery["id"]))
            except GitHubError as e:
                _out(f"FAILED       {text}  ({e})")
                errors += 1
            else:
                _out(f"redelivered  {text}")
                done += 1
    when = start.strftime("%Y-%m-%dT%H:%M:%SZ")
    verb = "would redeliver" if dry_run else "redelivered"
    summary = (
        f"{len(deliveries)} deliveries since {when}: {len(plan)} failed; {verb} {done}, "
        f"skipped {len(plan) - done - errors}"
    )
    if errors:
        summary += f", {errors} refused by GitHub"
    _out(summary)
    return errors


# ========================================================================= spell github …


@click.group("github")
def github_group() -> None:
    """Link GitHub users and owners to platform accounts (operator, on the local ledger).

    A user link lets that GitHub user's /cast comments cast as the account; an owner link lets
    repository_dispatch events from that owner's repositories cast as the account.
    """


def _kind_login(user: str | None, owner: str | None) -> tuple[str, str]:
    if (user is None) == (owner is None):
        raise click.UsageError("give exactly one of --user LOGIN or --owner OWNER")
    kind, login = ("user", user) if user is not None else ("owner", owner)
    assert login is not None
    if not LOGIN_RE.fullmatch(login):
        raise click.BadParameter(
            f"{login!r} is not a GitHub login (letters, digits and single hyphens, ≤ 39)",
            param_hint=f"'--{kind}'",
        )
    return kind, login


def _what(kind: str, login: str) -> str:
    return f"GitHub {'user' if kind == 'user' else 'owner'} {login}"


@github_group.command("link")
@click.option("--account", required=True, help="The platform account to cast as (created if new).")
@click.option("--user", metavar="LOGIN", help="A GitHub user: their /cast comments cast as it.")
@click.option(
    "--owner",
    metavar="OWNER",
    help="A GitHub user or organization: repository_dispatch from its repositories casts as it.",
)
@click.option(
    "--role",
    type=click.Choice(LINK_ROLES),
    default="caster",
    show_default=True,
    help="The role the casts act with (operator: every scope; rarely what you want).",
)
def github_link(account: str, user: str | None, owner: str | None, role: str) -> None:
    """Link a GitHub user (or owner) to a platform account; replaces an earlier link.

    \b
    Examples:
      spell github link --account ACME --user octocat
      spell github link --account ACME --owner octo-org
    """
    kind, login = _kind_login(user, owner)
    if not account or len(account) > 64 or any(c.isspace() or ord(c) < 0x20 for c in account):
        raise click.BadParameter(
            "the account must be 1-64 characters without spaces", param_hint="'--account'"
        )
    settings = Settings()

    async def go() -> None:
        from app.cli.local import local_platform
        from app.store.github_store import GitHubStore

        async with local_platform(settings) as platform:
            await platform.ledger.ensure_principal(
                account,
                role,
                monthly_cap=settings.default_monthly_cap_cents,
                total_cap=settings.default_total_cap_cents,
            )
            await GitHubStore(platform.ledger, platform.clock).link(kind, login, account, role)
            await platform.audit.append(
                "github.linked",
                actor="operator:cli",
                data={"kind": kind, "login": login.lower(), "account": account, "role": role},
            )

    run_async(go())
    does = (
        "their /cast comments cast"
        if kind == "user"
        else "repository_dispatch events from its repositories cast"
    )
    _out(f"linked {_what(kind, login)} to account {account} (role {role}): {does} as {account}")


@github_group.command("unlink")
@click.option("--user", metavar="LOGIN", help="The GitHub user to unlink.")
@click.option("--owner", metavar="OWNER", help="The GitHub owner to unlink.")
def github_unlink(user: str | None, owner: str | None) -> None:
    """Remove a user (or owner) link; their commands no longer cast."""
    kind, login = _kind_login(user, owner)
    settings = Settings()

    async def go() -> bool:
        from app.cli.local import local_platform
        from app.store.github_store import GitHubStore

        async with local_platform(settings) as platform:
            removed = await GitHubStore(platform.ledger, platform.clock).unlink(kind, login)
            if removed:
                await platform.audit.append(
                    "github.unlinked",
                    actor="operator:cli",
                    data={"kind": kind, "login": login.lower()},
                )
            return removed

    if not run_async(go()):
        fail(f"{_what(kind, login)} is not linked", "NOT_FOUND")
    _out(f"unlinked {_what(kind, login)}")


@github_group.command("links")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def github_links(as_json: bool) -> None:
    """List the links: GitHub user/owner → account and role."""
    settings = Settings()

    async def go() -> list[dict[str, Any]]:
        from sqlalchemy import select

        from app.cli.local import local_engine, sqlite_file
        from app.services.ports import SystemClock
        from app.store.ledger import SqlLedger
        from app.store.models import GitHubLink

        db_file = sqlite_file(settings)
        if db_file is not None and not db_file.exists():
            return []
        async with local_engine(settings) as engine:
            ledger = SqlLedger(engine, SystemClock())
            async with ledger.reader() as s:
                rows = (
                    await s.scalars(select(GitHubLink).order_by(GitHubLink.kind, GitHubLink.login))
                ).all()
        return [
            {
                "kind": r.kind,
                "login": r.login,
                "account": r.account_id,
                "role": r.role,
                "created_at": r.created_at.isoformat(),
            }
            for r in rows
        ]

    links = run_async(go())
    if as_json:
        _out(json.dumps(links, indent=2, sort_keys=True))
        return
    if not links:
        _out("no links (add one with `spell github link --account ACCOUNT --user LOGIN`)", err=True)
        return
    _out(
        table(
            ("KIND", "LOGIN", "ACCOUNT", "ROLE", "LINKED"),
            ((x["kind"], x["login"], x["account"], x["role"], x["created_at"][:19]) for x in links),
        )
    )


COMMANDS: Final = (app_group, webhooks_group, github_group)
