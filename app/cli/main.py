"""The ``spell`` command: the platform's CLI (SPEC §10).

Client commands (``publish``, ``spells``, ``cast``, ``logs``, ``cap``) talk to a server through
:class:`app.sdk.SpellClient`; the server URL and token come from ``SPELL_API_URL`` /
``SPELL_TOKEN`` or the config file written by ``spell config set``. Operator commands (``serve``,
``db upgrade``, ``token issue``, ``audit verify``) act on the local data directory
(``SPELL_DATA_DIR`` / ``DATABASE_URL``) and need no token.

Errors are printed once, as ``error: CODE: message`` on stderr, and exit with status 1 (2 for
usage errors); a Python traceback is never shown.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import click
from pydantic import ValidationError

from app.cli.billing import COMMANDS as BILLING_COMMANDS
from app.cli.github import COMMANDS as GITHUB_COMMANDS
from app.cli.oidc import COMMANDS as OIDC_COMMANDS
from app.config import ClientSettings, Settings
from app.errors import AppError
from app.sdk.client import (
    UNSET,
    ApiError,
    SpellClient,
    load_client_settings,
    read_config_file,
    write_config_file,
)

ROLES = ("maker", "caster", "operator", "auditor")
SORTS = ("popular", "recent", "price")
F = TypeVar("F", bound=Callable[..., Any])

HINTS = {
    "UNAUTHORIZED": "get a token (`spell token issue --account ACCOUNT --role caster` where the "
    "server runs) and save it with `spell config set token -`",
    "BUDGET_CAP_EXCEEDED": "raise the cap with `spell cap set --monthly CENTS` "
    "(or `--total CENTS`; `none` removes a cap)",
    "SANDBOX_UNAVAILABLE": "the server cannot isolate spell runs; see its log and /readyz",
}


# ---------------------------------------------------------------------- errors


def error_line(code: str, message: str, retry_after: int | None = None) -> str:
    line = f"error: {code}: {message}"
    if retry_after is not None:
        line += f" (retry after {retry_after} s)"
    return line


def report_error(
    code: str, message: str, retry_after: int | None = None, *, status: int = 0
) -> None:
    click.echo(error_line(code, message, retry_after), err=True)
    hint = HINTS.get(code)
    if code == "UNAVAILABLE" and status == 0 and message.startswith("cannot reach"):
        hint = (
            "is the server running (`spell serve`)? Set its URL with "
            "`spell config set api_url URL` or SPELL_API_URL"
        )
    if hint:
        click.echo(f"hint: {hint}", err=True)


def _settings_error(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "settings"
    return f"invalid setting {where}: {first['msg']}"


class SpellGroup(click.Group):
    """The root group: maps every failure to ``error: CODE: message`` and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except ApiError as e:
            report_error(e.code, e.message, e.retry_after, status=e.status)
        except AppError as e:
            report_error(e.code, e.message, e.retry_after, status=e.status)
        except ValidationError as e:
            report_error("VALIDATION_ERROR", _settings_error(e))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            # `spell … | head`: the reader left. Exit quietly, like other Unix tools.
            _silence_stdout()
            ctx.exit(141)
        except Exception as e:
            report_error("INTERNAL", f"{type(e).__name__}: {e}".rstrip(": "))
        ctx.exit(1)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def fail(message: str, code: str = "VALIDATION_ERROR") -> NoReturn:
    raise AppError(code, message)


# ---------------------------------------------------------------------- helpers


def make_client(ctx: click.Context) -> SpellClient:
    settings = load_client_settings()
    token = settings.token.get_secret_value() if settings.token is not None else None
    api_url = ctx.find_root().obj.get("api_url") or settings.api_url
    return SpellClient(api_url, token or None)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))


def money(cents: int | None, currency: str | None = None) -> str:
    """Integer minor units shown as ``1.25 USD`` (never through a float)."""
    if cents is None:
        return "-"
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    text = f"{sign}{cents // 100}.{cents % 100:02d}"
    return f"{text} {currency}" if currency else text


def price_text(price: Any) -> str:
    if not isinstance(price, dict):
        return "-"
    cents = price.get("cents")
    if not cents:
        return "free"
    prefix = "~" if price.get("model") == "metered" else ""
    return prefix + money(int(cents), price.get("currency"))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def parse_value(raw: str) -> Any:
    """An ``-i`` value: JSON when it is valid JSON (``3``, ``true``, ``{"a": 1}``), else text."""

    def no_constants(name: str) -> NoReturn:
        raise ValueError(name)

    try:
        return json.loads(raw, parse_constant=no_constants)
    except ValueError:
        return raw


def parse_inputs(pairs: Iterable[str]) -> dict[str, Any]:
    """``["name=world", "n=3"]`` → ``{"name": "world", "n": 3}`` (a later key wins)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(
                f"{pair!r} is not KEY=VALUE (e.g. -i name=world, -i count=3)",
                param_hint="'-i' / '--input'",
            )
        out[key] = parse_value(value)
    return out


def read_input_file(handle: IO[str]) -> dict[str, Any]:
    text = handle.read()
    name = getattr(handle, "name", "input")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(
            f"{name} is not valid JSON (line {e.lineno} column {e.colno})",
            param_hint="'--input-file'",
        ) from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{name} must hold a JSON object", param_hint="'--input-file'")
    return data


def event_text(ev: dict[str, Any]) -> str:
    """The human text of one progress event (without its stage)."""
    stage = ev.get("stage")
    if stage == "progress":
        pct = ev.get("pct")
        msg = str(ev.get("message") or "")
        return f"{pct}% {msg}".strip() if pct is not None else msg
    if stage == "log":
        line = str(ev.get("line", ""))
        return f"[stderr] {line}" if ev.get("stream") == "stderr" else line
    if stage == "succeeded":
        cost = ev.get("cost_cents")
        return f"cost {cost} cents" if cost is not None else ""
    if stage == "failed":
        err = ev.get("error") or {}
        if isinstance(err, dict):
            return f"{err.get('code')}: {err.get('message')}"
    return str(ev.get("message") or "")


def event_line(ev: dict[str, Any]) -> str:
    text = event_text(ev)
    stage = str(ev.get("stage", "event"))
    return f"{stage}: {text}" if text else stage


class ProgressView:
    """Live progress of a cast on stderr: a redrawn line on a TTY, plain lines otherwise."""

    def __init__(self, *, tty: bool, width: int = 24) -> None:
        self.tty = tty
        self.width = width
        self.pct: int | None = None
        self.status = "queued"
        self.message = ""
        self.drawn = False

    def __call__(self, ev: dict[str, Any]) -> None:
        if not self.tty:
            click.echo(event_line(ev), err=True)
            return
        stage = ev.get("stage")
        if stage == "progress":
            pct = ev.get("pct")
            if isinstance(pct, int):
                self.pct = pct
            self.message = str(ev.get("message") or "")
        elif stage == "log":
            self._clear()
            click.echo(event_text(ev), err=True)
        elif stage in ("succeeded", "failed"):
            self._clear()
            return
        elif isinstance(stage, str):
            self.status = stage
        self._draw()

    def _clear(self) -> None:
        if self.drawn:
            click.echo("\r\x1b[K", nl=False, err=True)
            self.drawn = False

    def _draw(self) -> None:
        if self.pct is not None:
            filled = self.width * self.pct // 100
            bar = "#" * filled + "-" * (self.width - filled)
            line = f"[{bar}] {self.pct:3d}% {self.message}"
        else:
            line = f"{self.status}… {self.message}".rstrip()
        click.echo("\r\x1b[K" + line[:200], nl=False, err=True)
        self.drawn = True

    def close(self) -> None:
        self._clear()


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------- root


@click.group(
    cls=SpellGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--api-url",
    metavar="URL",
    help="Platform URL for this command (default: SPELL_API_URL, then `spell config`).",
)
@click.version_option(package_name="spell-platform", prog_name="spell")
@click.pass_context
def cli(ctx: click.Context, api_url: str | None) -> None:
    """Spell Platform: publish spells, cast them, follow their progress, manage budget caps.

    \b
    Client commands talk to a server: set it up once with
      spell config set api_url http://127.0.0.1:8080
      spell config set token -        (reads the token from stdin)
    or use SPELL_API_URL / SPELL_TOKEN.

    Operator commands (serve, db, token, audit) work on the local data
    directory (SPELL_DATA_DIR, default ./.spell) or DATABASE_URL.
    """
    ctx.ensure_object(dict)
    ctx.obj["api_url"] = api_url


# ---------------------------------------------------------------------- operator commands


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port to listen on.",
)
@click.option(
    "--webhook-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also serve POST /webhooks/github on this port through the dedicated ingest front "
    "(default: SPELL_WEBHOOK_PORT; unset: off).",
)
@click.option(
    "--webhook-host",
    default=None,
    help="Address of the webhook ingest front (default: SPELL_WEBHOOK_HOST, else --host).",
)
def serve(host: str, port: int, webhook_port: int | None, webhook_host: str | None) -> None:
    """Run the platform server (the /v1 API, SSE progress and the worker).

    With NATS_URL set the server runs no casts itself (`spell worker` processes do; see
    SPELL_SERVE_RUNS). Configured by environment variables (SPELL_DATA_DIR, DATABASE_URL,
    SPELL_SECRET_KEY, NATS_URL, …).
    Stop it with Ctrl-C or SIGTERM.
    """
    from aiohttp import web

    from app.observability.logging import configure_logging
    from app.web.app import create_app
    from app.web.ingest import FRONT

    settings = Settings()
    if webhook_port is not None:
        settings = settings.model_copy(update={"webhook_port": webhook_port})
    if webhook_host is not None or settings.webhook_host is None:
        settings = settings.model_copy(update={"webhook_host": webhook_host or host})
    configure_logging(settings.log_level)
    app = create_app(settings)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"

    def announce(_: str) -> None:
        click.echo(f"spell serve: listening on {url} (data dir {settings.data_dir.resolve()})")
        front = app.get(FRONT)
        if front is not None:
            click.echo(
                f"spell serve: webhook ingest front on {settings.webhook_host}:{front.port}"
                "/webhooks/github"
            )
        sys.stdout.flush()

    try:
        web.run_app(app, host=host, port=port, print=announce, access_log=None, shutdown_timeout=10)
    except OSError as e:
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}", "UNAVAILABLE")


@cli.command()
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    help="Casts run at once (concurrent sandboxes). Default: SPELL_WORKERS.",
)
@click.option(
    "--health-host", default="127.0.0.1", show_default=True, help="Address of /healthz, /readyz."
)
@click.option(
    "--health-port",
    default=8081,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port of /healthz (alive) and /readyz (database, sandbox, NATS, not draining).",
)
@click.option(
    "--drain-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0, 86400),
    help="On SIGTERM, seconds to let running casts finish before they are cancelled.",
)
def worker(
    concurrency: int | None, health_host: str, health_port: int, drain_timeout: float
) -> None:
    """Run casts from NATS JetStream (needs NATS_URL and the servers' DATABASE_URL).

    Probes the sandbox first and refuses to start if spells cannot be isolated here.
    SIGTERM drains: no new casts, running ones finish and are acked, then exit 0.
    """
    from app.observability.logging import configure_logging
    from app.worker.main import run_worker

    settings = Settings()
    configure_logging(settings.log_level)
    n = concurrency or settings.workers
    if n < 1:
        fail("SPELL_WORKERS=0: give --concurrency N (at least 1)")
    shown = f"[{health_host}]" if ":" in health_host else health_host

    def announce(_: str) -> None:
        click.echo(
            f"spell worker: {n} concurrent runs from {settings.nats_url}; "
            f"health on http://{shown}:{health_port}/readyz"
        )
        sys.stdout.flush()

    try:
        run_worker(
            settings,
            concurrency=n,
            host=health_host,
            port=health_port,
            drain_timeout=drain_timeout,
            announce=announce,
        )
    except OSError as e:
        fail(f"cannot listen on {health_host}:{health_port}: {e.strerror or e}", "UNAVAILABLE")
    click.echo("spell worker: drained, stopped")


@cli.group()
def db() -> None:
    """Database maintenance (the ledger)."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations (SQLite in SPELL_DATA_DIR, or DATABASE_URL)."""
    from app.cli.local import local_engine
    from app.store.db import current_revision

    settings = Settings()

    async def go() -> str | None:
        async with local_engine(settings) as engine:
            return await current_revision(engine)

    revision = run_async(go())
    click.echo(f"database is at revision {revision}")


@cli.group()
def token() -> None:
    """Bearer tokens (operator, on the server's machine)."""


@token.command("issue")
@click.option("--account", required=True, help="Account the token acts for (created if new).")
@click.option(
    "--role",
    required=True,
    type=click.Choice(ROLES),
    help="maker: publish spells; caster: cast and set caps; operator: everything; "
    "auditor: read-only.",
)
@click.option(
    "--ttl",
    type=click.IntRange(min=1),
    default=None,
    metavar="SECONDS",
    help="Lifetime in seconds (default: SPELL_TOKEN_TTL, 3600).",
)
def token_issue(account: str, role: str, ttl: int | None) -> None:
    """Issue a short-lived bearer token on the local ledger (no server needed).

    Prints only the token on stdout, e.g. `export SPELL_TOKEN=$(spell token issue ...)`;
    the expiry goes to stderr.
    """
    from app.cli.local import local_platform

    settings = Settings()

    async def go() -> tuple[str, datetime]:
        async with local_platform(settings) as platform:
            return await platform.issue_token(account, role, ttl=ttl)

    tok, expires = run_async(go())
    click.echo(tok)
    click.echo(f"expires at {expires.isoformat()}", err=True)


@cli.group()
def audit() -> None:
    """The append-only audit log."""


@audit.command("verify")
@click.option(
    "--file",
    "file_",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Audit log to check (default: SPELL_DATA_DIR/audit/audit.jsonl).",
)
@click.option(
    "--ledger/--no-ledger",
    "use_ledger",
    default=True,
    show_default=True,
    help="Also check the log reaches the head recorded in the ledger (catches cut-off records).",
)
@click.pass_context
def audit_verify(ctx: click.Context, file_: Path | None, use_ledger: bool) -> None:
    """Check the audit log's hash chain; exit 1 and name the first bad line if it was altered."""
    from app.cli.local import audit_path, read_audit_anchor, read_audit_head, verify_snapshot
    from app.domain.audit import VerifyResult

    settings = Settings()
    default = audit_path(settings)
    path = file_ or default
    head: tuple[int, str] | None = None
    anchor: tuple[int, str] | None = None  # the ledger's copy of the retention anchor

    def check() -> VerifyResult:
        nonlocal head, anchor
        if use_ledger and path.resolve() == default.resolve():
            try:
                head = run_async(asyncio.wait_for(read_audit_head(settings), 15))
                anchor = run_async(asyncio.wait_for(read_audit_anchor(settings), 15))
            except Exception as e:
                click.echo(
                    f"note: cannot read the ledger's audit head ({type(e).__name__}); "
                    "checking the chain only",
                    err=True,
                )
        return verify_snapshot(
            path, expected_head=head, ledger_anchor=anchor, ledger_checked=head is not None
        )

    result = check()
    if not result.ok and head is not None:
        result = check()  # a retention sweep may have moved the anchor meanwhile: look again
    if result.ok:
        against = f", matches the ledger head (seq {head[0]})" if head else ""
        kept = f", retained from seq {anchor[0] + 1}" if anchor else ""
        click.echo(f"ok: {result.lines} records, head seq {result.head_seq or 0}{against}{kept}")
        return
    reason = result.reason or "invalid"
    if not reason.startswith("line "):
        reason = f"line {result.first_bad_line}: {reason}"
    click.echo(f"TAMPERED: {reason}")
    click.echo(f"error: the audit log {path} failed verification", err=True)
    ctx.exit(1)


@cli.group()
def retention() -> None:
    """Retention of inputs, artifacts and audit records (SPEC §8)."""


@retention.command("sweep")
@click.option("--dry-run", is_flag=True, help="Only count what would be removed; change nothing.")
@click.pass_context
def retention_sweep(ctx: click.Context, dry_run: bool) -> None:
    """Run one retention sweep now (as `spell serve` / `spell worker` do on a schedule).

    Prints what was removed (or, with --dry-run, what would be): finished casts' inputs,
    webhook bodies, staged input files, artifacts, expired idempotency keys, and audit segments
    past SPELL_RETENTION_AUDIT (exported to the object store first). Exits 1 if any item failed.
    """
    from app.cli.local import retention_sweep as sweep

    settings = Settings()
    report = run_async(sweep(settings, dry_run=dry_run))
    if not report.ran:
        click.echo(f"skipped: {report.skipped}")
        return
    label = "would remove" if dry_run else "removed"
    for name, value in report.counts.as_dict().items():
        if value is not None:
            click.echo(f"{name}: {value}")
    click.echo(f"{label} {report.counts.removed} items" + (" (dry run)" if dry_run else ""))
    if report.counts.errors:
        click.echo(f"error: {report.counts.errors} items could not be removed", err=True)
        ctx.exit(1)


# ---------------------------------------------------------------------- client config


@cli.group()
def config() -> None:
    """The client configuration file (API URL and token)."""


@config.command("set")
@click.argument("key", type=click.Choice(["api_url", "token"]))
@click.argument("value")
def config_set(key: str, value: str) -> None:
    """Save api_url or token to the config file (mode 0600).

    \b
    Examples:
      spell config set api_url http://127.0.0.1:8080
      spell token issue --account me --role caster | spell config set token -
    VALUE "-" reads it from stdin (keeps the token out of shell history).
    """
    if value == "-":
        value = sys.stdin.read().strip()
    if not value:
        raise click.BadParameter("the value is empty", param_hint="VALUE")
    if key == "api_url" and not value.startswith(("http://", "https://")):
        raise click.BadParameter("the API URL must start with http:// or https://")
    path = ClientSettings().config_file
    write_config_file(path, {key: value.rstrip("/") if key == "api_url" else value})
    click.echo(f"saved {key} to {path}")


@config.command("unset")
@click.argument("key", type=click.Choice(["api_url", "token"]))
def config_unset(key: str) -> None:
    """Remove api_url or token from the config file."""
    path = ClientSettings().config_file
    write_config_file(path, {key: None})
    click.echo(f"removed {key} from {path}")


@config.command("show")
def config_show() -> None:
    """Show the effective client settings and where each comes from (the token is masked)."""
    env = ClientSettings()
    in_file = read_config_file(env.config_file)
    effective = load_client_settings()

    def source(key: str, env_var: str) -> str:
        if key in env.model_fields_set:
            return f"env {env_var}"
        if key in in_file:
            return "config file"
        return "default"

    tok = effective.token.get_secret_value() if effective.token is not None else ""
    masked = f"{tok[:6]}… ({len(tok)} chars)" if tok else "(not set)"
    click.echo(f"config file: {env.config_file}")
    click.echo(f"api_url:     {effective.api_url}  [{source('api_url', 'SPELL_API_URL')}]")
    click.echo(f"token:       {masked}  [{source('token', 'SPELL_TOKEN')}]")


# ---------------------------------------------------------------------- spells


def _needs_bundle(doc: dict[str, Any]) -> bool:
    ex = doc.get("execution")
    if not isinstance(ex, dict):
        return False
    modes = [ex.get("mode"), *(ex.get("allowed_modes") or [])]
    return "service" in modes or "entrypoint" in ex


@cli.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the server's response as JSON.")
@click.pass_context
def publish(ctx: click.Context, path: Path, as_json: bool) -> None:
    """Publish a spell from a folder with spell.json (or a single spell.json file).

    Service-mode spells need their folder: its files are packed into a bundle, uploaded, and the
    bundle digest is written into execution.bundle before the document is published.
    """
    digest: str | None = None
    data: bytes | None = None
    if path.is_dir():
        from app.runner.bundle import BundleError, pack_dir, read_spell_json

        try:
            data = pack_dir(path)
            doc = read_spell_json(data)
        except (BundleError, OSError) as e:
            fail(f"cannot bundle {path}: {e}")
    else:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            fail(f"{path} is not valid JSON: {e}")
        if not isinstance(doc, dict):
            fail(f"{path} must hold a JSON object (the spell document)")
        ex = doc.get("execution")
        if _needs_bundle(doc) and not (isinstance(ex, dict) and ex.get("bundle")):
            fail(
                f"{path.name} is a service-mode spell: publish its folder so its files are "
                f"bundled and uploaded (spell publish {path.parent or '.'})"
            )
    with make_client(ctx) as client:
        if data is not None and _needs_bundle(doc):
            uploaded = client.upload_bundle(data)
            digest = str(uploaded["digest"])
            ex = doc.setdefault("execution", {})
            if not isinstance(ex, dict):
                fail("execution must be an object")
            ex["bundle"] = digest
        resp = client.publish(doc)
    if as_json:
        print_json(resp)
        return
    bundle = (resp.get("document") or {}).get("execution", {}).get("bundle") or digest
    suffix = f" (digest {bundle})" if bundle else ""
    click.echo(f"published {resp.get('id')}@{resp.get('version')}{suffix}")


@cli.group()
def spells() -> None:
    """Find and inspect spells."""


@spells.command("list")
@click.option("-q", "--query", "q", help="Search text (name, id, description).")
@click.option("--tag", help="Only spells with this tag.")
@click.option("--sort", type=click.Choice(SORTS), help="Order (default: recent; catalog: popular).")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--catalog", is_flag=True, help="Search the public catalog (no token needed).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def spells_list(
    ctx: click.Context,
    q: str | None,
    tag: str | None,
    sort: str | None,
    limit: int,
    offset: int,
    catalog: bool,
    as_json: bool,
) -> None:
    """List spells: yours and public ones (or only the public catalog with --catalog)."""
    with make_client(ctx) as client:
        search = client.catalog if catalog else client.list_spells
        resp = search(q=q, tag=tag, sort=sort, limit=limit, offset=offset)
    if as_json:
        print_json(resp)
        return
    items = resp.get("spells") or []
    if not items:
        click.echo("no spells found", err=True)
        return
    click.echo(
        table(
            ("ID", "VERSION", "MODE", "PRICE", "RUNS", "TAGS"),
            (
                (
                    s.get("id"),
                    s.get("version"),
                    s.get("mode"),
                    price_text(s.get("price")),
                    s.get("runs"),
                    ",".join(s.get("tags") or []),
                )
                for s in items
            ),
        )
    )
    if resp.get("next_offset") is not None:
        click.echo(f"(more: --offset {resp['next_offset']})", err=True)


@spells.command("show")
@click.argument("spell_id", metavar="ID")
@click.option("--version", "version", help="A specific version (default: the latest).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def spells_show(ctx: click.Context, spell_id: str, version: str | None, as_json: bool) -> None:
    """Show one spell: price, modes, input schema, versions."""
    with make_client(ctx) as client:
        spell = client.get_spell(spell_id, version)
    if as_json:
        print_json(spell)
        return
    rows = [
        ("id", spell.get("id")),
        ("name", spell.get("name")),
        ("version", f"{spell.get('version')} (latest {spell.get('latest_version')})"),
        ("author", spell.get("author")),
        ("modes", ", ".join(m for m in spell.get("modes") or [] if m)),
        ("price", price_text(spell.get("price"))),
        ("runs", spell.get("runs")),
        ("tags", ", ".join(spell.get("tags") or []) or "-"),
        ("visibility", spell.get("visibility")),
        ("versions", ", ".join(spell.get("versions") or [])),
    ]
    for key, value in rows:
        click.echo(f"{key + ':':12} {value}")
    if spell.get("description"):
        click.echo(f"\n{spell['description']}")
    schema = spell.get("inputs") or {}
    props = schema.get("properties") or {}
    if props:
        required = set(schema.get("required") or [])
        click.echo("\ninputs:")
        for name, prop in props.items():
            kind = prop.get("type", "any") if isinstance(prop, dict) else "any"
            flag = " (required)" if name in required else ""
            desc = (
                f"  {prop.get('description')}"
                if isinstance(prop, dict) and prop.get("description")
                else ""
            )
            click.echo(f"  {name}: {kind}{flag}{desc}")


# ---------------------------------------------------------------------- casting


@cli.command()
@click.argument("spell_id", metavar="SPELL")
@click.option(
    "-i",
    "--input",
    "pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="An input field; VALUE is JSON when valid JSON (3, true, {...}), else text. Repeatable.",
)
@click.option(
    "--input-file",
    type=click.File("r"),
    help="JSON object with the input ('-' reads stdin); -i fields override it.",
)
@click.option("--mode", type=click.Choice(["service", "workflow", "clone"]), help="Override mode.")
@click.option(
    "--idempotency-key",
    metavar="KEY",
    help="Reuse to make a retried cast return the same run (default: a new UUID).",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Follow the progress until the cast ends (--no-wait prints only the cast id).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="With --wait: stop waiting after this long (the cast keeps running).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final cast (or acceptance) JSON.")
@click.pass_context
def cast(
    ctx: click.Context,
    spell_id: str,
    pairs: tuple[str, ...],
    input_file: IO[str] | None,
    mode: str | None,
    idempotency_key: str | None,
    wait: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Cast a spell and (by default) follow it to the end.

    \b
    Examples:
      spell cast com.example.hello -i name=world
      spell cast com.example.resize --input-file params.json --no-wait
    Exit status: 0 when the cast succeeded, 1 when it failed or was refused.
    """
    payload = read_input_file(input_file) if input_file is not None else {}
    payload.update(parse_inputs(pairs))
    with make_client(ctx) as client:
        accepted = client.cast(spell_id, payload, mode=mode, idempotency_key=idempotency_key)
        cast_id = str(accepted["cast_id"])
        if not wait:
            if as_json:
                print_json(accepted)
            else:
                click.echo(cast_id)
            return
        replay = " (replayed: same idempotency key)" if accepted.get("replayed") else ""
        estimate = money(accepted.get("estimate_cents"), accepted.get("currency"))
        click.echo(
            f"cast {cast_id} {accepted.get('status')}{replay}; estimate {estimate}", err=True
        )
        view = ProgressView(tty=_isatty(sys.stderr))
        try:
            final = client.wait(cast_id, on_event=view, timeout=timeout)
        except KeyboardInterrupt:
            view.close()
            click.echo(
                f"stopped following; cast {cast_id} continues (spell logs {cast_id} --follow)",
                err=True,
            )
            ctx.exit(130)
        finally:
            view.close()
    if as_json:
        print_json(final)
    else:
        click.echo(f"cast:      {final.get('cast_id')}")
        click.echo(f"status:    {final.get('status')}")
        click.echo(f"cost:      {money(final.get('cost_cents'), final.get('currency'))}")
        if final.get("artifact_url"):
            click.echo(f"artifact:  {final['artifact_url']}")
    if final.get("status") != "succeeded":
        err = final.get("error") or {}
        report_error(
            str(err.get("code") or "INTERNAL"),
            str(err.get("message") or f"the cast ended with status {final.get('status')}"),
        )
        ctx.exit(1)


def _ts(ev: dict[str, Any]) -> str:
    raw = ev.get("ts")
    if isinstance(raw, str):
        try:
            return datetime.fromisoformat(raw).strftime("%H:%M:%S")
        except ValueError:
            pass
    return "--:--:--"


@cli.command()
@click.argument("cast_id", metavar="CAST")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the cast ends.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@click.pass_context
def logs(ctx: click.Context, cast_id: str, follow: bool, as_json: bool) -> None:
    """Print a cast's progress events and output lines.

    Without --follow, prints what exists so far; with --follow, streams until the cast ends.
    """
    with make_client(ctx) as client:
        status = client.get_cast(cast_id).get("status")
        ended = status in ("succeeded", "failed")
        events: Iterator[dict[str, Any]]
        if follow or ended:
            events = client.events(cast_id, reconnect=follow)
        else:
            events = client.events(cast_id, reconnect=False, idle_timeout=0.5)
        last_stage = None
        for ev in events:
            last_stage = ev.get("stage")
            if as_json:
                click.echo(json.dumps(ev, separators=(",", ":"), ensure_ascii=False))
            else:
                click.echo(f"{_ts(ev)} {event_line(ev)}")
    if not follow and last_stage not in ("succeeded", "failed"):
        click.echo(f"(cast is {status}; use --follow to keep watching)", err=True)


# ---------------------------------------------------------------------- caps


def cap_amount(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``--monthly``/``--total``: cents (an integer ≥ 0) or ``none`` (remove the cap)."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in ("none", "null"):
        return None
    try:
        cents = int(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a whole number of cents or 'none'") from None
    if cents < 0:
        raise click.BadParameter("a cap cannot be negative")
    return cents


def _cap_rows(caps: dict[str, Any]) -> str:
    def row(name: str) -> tuple[str, str, str, str, str]:
        c = caps.get(name) or {}
        limit = c.get("cap_cents")
        remaining = c.get("remaining_cents")
        return (
            name,
            "none" if limit is None else str(limit),
            str(c.get("used_cents", 0)),
            str(c.get("reserved_cents", 0)),
            "-" if remaining is None else str(remaining),
        )

    head = f"account {caps.get('account')}, period {caps.get('period')} (amounts in cents)"
    resets = caps.get("monthly_resets_in")
    if isinstance(resets, int):
        days, rest = divmod(resets, 86400)
        head += f"; monthly usage resets in {days}d {math.ceil(rest / 3600)}h"
    body = table(("CAP", "LIMIT", "USED", "RESERVED", "REMAINING"), [row("monthly"), row("total")])
    return head + "\n" + body


@cli.group()
def cap() -> None:
    """Budget caps of your account.

    A cast whose estimate would pass a cap is refused before it runs (402 BUDGET_CAP_EXCEEDED).
    """


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


@cap.command("set")
@click.option(
    "--monthly", metavar="CENTS|none", callback=cap_amount, help="Monthly cap in cents, or none."
)
@click.option(
    "--total", metavar="CENTS|none", callback=cap_amount, help="Total cap in cents, or none."
)
@click.option("--account", help="Operators only: another account's caps.")
@click.option("--idempotency-key", metavar="KEY", help="Default: a new UUID.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def cap_set(
    ctx: click.Context,
    monthly: Any,
    total: Any,
    account: str | None,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Set the monthly and/or total budget cap (cents; `none` removes a cap).

    \b
    Examples:
      spell cap set --monthly 500
      spell cap set --total none
    """
    if not _given(ctx, "monthly") and not _given(ctx, "total"):
        raise click.UsageError("give --monthly and/or --total (CENTS, or none to remove a cap)")
    with make_client(ctx) as client:
        caps = client.set_caps(
            monthly_cents=monthly if _given(ctx, "monthly") else UNSET,
            total_cents=total if _given(ctx, "total") else UNSET,
            account=account,
            idempotency_key=idempotency_key,
        )
    if as_json:
        print_json(caps)
    else:
        click.echo(_cap_rows(caps))


@cap.command("show")
@click.option("--account", help="Operators and auditors: another account.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def cap_show(ctx: click.Context, account: str | None, as_json: bool) -> None:
    """Show the caps, usage and reservations of your account."""
    with make_client(ctx) as client:
        caps = client.get_caps(account)
    if as_json:
        print_json(caps)
    else:
        click.echo(_cap_rows(caps))


for _command in GITHUB_COMMANDS:  # spell app / webhooks / github (app/cli/github.py)
    cli.add_command(_command)
for _billing_command in BILLING_COMMANDS:  # spell billing / refund (app/cli/billing.py)
    cli.add_command(_billing_command)
for _oidc_command in OIDC_COMMANDS:  # spell oidc allow / revoke / list (app/cli/oidc.py)
    cli.add_command(_oidc_command)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``spell``)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="spell")


if __name__ == "__main__":  # pragma: no cover
    main()
