"""``spell app create|doctor``, ``spell webhooks redeliver`` and ``spell github link|links|unlink``
as a user runs them, against the contract-enforcing fake GitHub (tests/contract/fake_github.py).

The fake serves from a background thread; the CLI runs as a subprocess with ``GITHUB_API_URL``
pointing at it. For ``app create`` the test plays the browser: it opens the local page, checks the
form, and follows GitHub's redirect to ``/callback?code=…&state=…``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app.cli.main import cli
from app.config import Settings
from tests.contract.fake_github import FakeGitHub

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "whsec-for-tests"


def _spell_argv() -> list[str]:
    script = Path(sys.executable).with_name("spell")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli.main"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def fake() -> Iterator[FakeGitHub]:
    """A FakeGitHub served from its own event loop in a thread (the CLI is a subprocess)."""
    gh = FakeGitHub()
    gh.add_installation(4242, "octo-org", ["app-repo"], {"actions": "write", "issues": "write"})
    gh.add_installation(77, "mona", ["dotfiles"], {"issues": "write"}, account_type="User")
    gh.installations[77].suspended = True
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(gh.start(), loop).result(30)
    try:
        yield gh
    finally:
        asyncio.run_coroutine_threadsafe(gh.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert gh.violations == []
    assert gh.response_violations == []


@dataclass
class Spell:
    """Runs ``spell …`` with the test's environment (no GITHUB_*/SPELL_* from outside)."""

    env: dict[str, str]
    data_dir: Path
    cwd: Path

    def with_env(self, **extra: str | None) -> Spell:
        env = dict(self.env)
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return Spell(env, self.data_dir, self.cwd)

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*_spell_argv(), *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = self(*args)
        assert proc.returncode == 0, f"spell {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return proc

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*_spell_argv(), *args],
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture
def spell(tmp_path: Path, fake: FakeGitHub) -> Spell:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPELL_", "GITHUB_")) and k != "DATABASE_URL"
    }
    env.update(
        SPELL_DATA_DIR=str(tmp_path / "data"),
        SPELL_CONFIG=str(tmp_path / "client.json"),
        SPELL_SECRET_KEY="k" * 40,
        SPELL_PUBLIC_URL="https://spell.acme.test",
        GITHUB_API_URL=fake.url,
    )
    return Spell(env, tmp_path / "data", tmp_path)


@pytest.fixture
def configured(spell: Spell, fake: FakeGitHub) -> Spell:
    """The App's credentials in the environment, the way `app create` + `set -a` leave them."""
    return spell.with_env(
        GITHUB_APP_ID=fake.app_id,
        GITHUB_APP_PRIVATE_KEY=fake.private_key_pem,
        GITHUB_WEBHOOK_SECRET=WEBHOOK_SECRET,
    )


# ----------------------------------------------------------------------------- help


def test_help_lists_the_new_groups(spell: Spell) -> None:
    out = spell.ok("--help").stdout
    for group in ("app", "webhooks", "github"):
        assert re.search(rf"^\s+{group}\s", out, re.M), out
    runner = CliRunner()
    for args in (
        ("app", "create"),
        ("app", "doctor"),
        ("webhooks", "redeliver"),
        ("github", "link"),
        ("github", "unlink"),
        ("github", "links"),
    ):
        result = runner.invoke(cli, [*args, "--help"], prog_name="spell")
        assert result.exit_code == 0
        assert result.output.startswith(f"Usage: spell {' '.join(args)}")


# ----------------------------------------------------------------------- app create


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.form: dict[str, str | None] = {}
        self.inputs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "form":
            self.form = dict(attrs)
        elif tag == "input":
            self.inputs.append(dict(attrs))


#: ``sh -c 'set -a; . FILE; set +a; exec CMD…'``: the README's recipe, then a command.
_LOAD_ENV = ("sh", "-c", 'set -a; . "$0"; set +a; exec "$@"')


def _start_create(spell: Spell, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = spell.popen("app", "create", "--no-browser", "--port", "0", *args)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if m is None:
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"no local URL printed: {line}{out}\n{err}")
    return proc, m.group(0)


def _form(local: str) -> tuple[dict[str, str | None], dict[str, Any]]:
    r = httpx.get(local)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"
    page = _Page()
    page.feed(r.text)
    assert page.form.get("method") == "post"
    (hidden,) = page.inputs
    assert hidden["type"] == "hidden" and hidden["name"] == "manifest"
    return page.form, json.loads(hidden["value"] or "")


def test_app_create_registers_the_app_and_saves_its_credentials_0600(
    spell: Spell, fake: FakeGitHub
) -> None:
    proc, local = _start_create(spell, "--timeout", "60")
    port = int(urlsplit(local).port or 0)
    try:
        form, manifest = _form(local)
        action = urlsplit(str(form["action"]))
        assert f"{action.scheme}://{action.netloc}{action.path}" == (
            "https://github.com/settings/apps/new"
        )
        state = parse_qs(action.query)["state"][0]
        assert len(state) >= 40
        # The manifest: app-manifest.json with its URLs on the public URL, redirect to us.
        original = json.loads((REPO / "app-manifest.json").read_text())
        assert manifest["redirect_url"] == f"http://127.0.0.1:{port}/callback"
        assert manifest["hook_attributes"]["url"] == "https://spell.acme.test/webhooks/github"
        assert manifest["url"] == "https://spell.acme.test"
        assert manifest["setup_url"] == "https://spell.acme.test/github/setup"
        assert manifest["default_permissions"] == original["default_permissions"]
        assert manifest["default_events"] == original["default_events"]

        # Another origin rebinding its name to 127.0.0.1 gets nothing.
        r = httpx.get(local, headers={"Host": f"evil.test:{port}"})
        assert r.status_code == 421 and state not in r.text

        fake.add_manifest_code("code-from-github")
        # A callback without this run's state (CSRF) is refused and changes nothing.
        for query in (
            {"code": "code-from-github", "state": "forged"},
            {"code": "code-from-github"},
        ):
            r = httpx.get(f"{local}callback", params=query)
            assert r.status_code == 403
        assert fake.conversions == []
        assert not (spell.data_dir / "github-app.pem").exists()

        # GitHub redirects the browser back with the code and our state.
        r = httpx.get(f"{local}callback", params={"code": "code-from-github", "state": state})
        assert r.status_code == 302
        assert r.headers["location"] == (
            f"https://github.com/apps/{fake.app_slug}/installations/new"
        )
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"{out}\n{err}"
    assert "Traceback" not in err
    assert "refused a callback with a wrong or missing state" in err
    assert fake.conversions == ["code-from-github"]
    conversion = fake.requests_for("apps/create-from-manifest")[0]
    assert "Authorization" not in conversion.headers

    pem_path = spell.data_dir / "github-app.pem"
    env_path = spell.data_dir / "github-app.env"
    for path in (pem_path, env_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert pem_path.read_text() == fake.private_key_pem
    env = dict(
        line.split("=", 1)
        for line in env_path.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env["GITHUB_APP_ID"] == fake.app_id
    assert env["GITHUB_APP_PRIVATE_KEY_PATH"] == str(pem_path.resolve())
    assert re.fullmatch(r"[0-9a-f]{40}", env["GITHUB_WEBHOOK_SECRET"])
    assert env["GITHUB_CLIENT_ID"] == f"Iv23li{fake.app_id}"
    assert re.fullmatch(r"[0-9a-f]{40}", env["GITHUB_CLIENT_SECRET"])
    assert env["GITHUB_API_URL"] == fake.url
    assert "PRIVATE KEY" not in out and env["GITHUB_CLIENT_SECRET"] not in out + err
    # The next steps: install URL and the `set -a` recipe.
    assert f"https://github.com/apps/{fake.app_slug}/installations/new" in out
    assert "set -a; . " in out and "github-app.env; set +a" in out and "spell serve" in out

    # The recipe works: load the file, and the doctor is happy with what was saved.
    doctor = subprocess.run(
        [*_LOAD_ENV, str(env_path), *_spell_argv(), "app", "doctor"],
        env={k: v for k, v in spell.env.items() if k != "GITHUB_API_URL"},
        cwd=spell.cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "all checks passed" in doctor.stdout


def test_app_create_for_an_organization_and_the_timeout(spell: Spell, fake: FakeGitHub) -> None:
    proc, local = _start_create(
        spell, "--org", "octo-org", "--github-url", "https://ghe.acme.test/", "--timeout", "3"
    )
    try:
        form, _ = _form(local)
        action = urlsplit(str(form["action"]))
        assert (action.netloc, action.path) == (
            "ghe.acme.test",
            "/organizations/octo-org/settings/apps/new",
        )
        assert parse_qs(action.query)["state"]
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "error: TIMEOUT: GitHub did not redirect back within 3 s" in err
    assert not (spell.data_dir / "github-app.env").exists()


def test_app_create_with_an_unknown_code_fails_cleanly(spell: Spell, fake: FakeGitHub) -> None:
    proc, local = _start_create(spell, "--public-url", "https://x.acme.test/spell")
    try:
        _, manifest = _form(local)
        assert manifest["hook_attributes"]["url"] == "https://x.acme.test/spell/webhooks/github"
        state = parse_qs(urlsplit(str(_form(local)[0]["action"])).query)["state"][0]
        r = httpx.get(f"{local}callback", params={"code": "expired", "state": state})
        assert r.status_code == 502
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "error: NOT_FOUND: GitHub does not know this code" in err
    assert not (spell.data_dir / "github-app.pem").exists()


def test_app_create_keeps_existing_credentials_without_force(spell: Spell) -> None:
    spell.data_dir.mkdir(parents=True)
    (spell.data_dir / "github-app.env").write_text("GITHUB_APP_ID=1\n")
    proc = spell("app", "create", "--no-browser", "--port", "0", "--timeout", "1")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: CONFLICT: ")
    assert "--force" in proc.stderr
    assert (spell.data_dir / "github-app.env").read_text() == "GITHUB_APP_ID=1\n"
    bad = spell("app", "create", "--no-browser", "--public-url", "ftp://x")
    assert bad.returncode == 2 and "--public-url" in bad.stderr


# ------------------------------------------------------------------------- app doctor


def test_app_doctor_checks_the_credentials_and_lists_installations(
    configured: Spell, fake: FakeGitHub
) -> None:
    proc = configured.ok("app", "doctor")
    out = proc.stdout
    assert f"ok: GITHUB_APP_ID is {fake.app_id}" in out
    assert "RSA, 2048 bits" in out
    assert f"GitHub accepts the App's JWT: {fake.app_slug}" in out
    assert "issues: write" in out and "issue_comment" in out
    assert "permission differs" not in out
    assert re.search(r"4242\s+octo-org\s+Organization\s+selected\s+no", out), out
    assert re.search(r"77\s+mona\s+User\s+selected\s+yes", out), out
    assert "warning: suspended installations (no casts there): mona" in out
    assert "ok: GITHUB_WEBHOOK_SECRET is set" in out
    assert "all checks passed" in out
    assert {r.auth for r in fake.requests} == {"jwt"}


def test_app_doctor_warns_when_permissions_differ_from_the_manifest(
    configured: Spell, tmp_path: Path
) -> None:
    manifest = json.loads((REPO / "app-manifest.json").read_text())
    manifest["default_permissions"]["pages"] = "write"
    manifest["default_permissions"]["issues"] = "read"
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    out = configured.ok("app", "doctor", "--manifest", str(path)).stdout
    assert "permission differs from app-manifest.json: issues: the manifest asks for read" in out
    assert "pages: the manifest asks for write, the App does not have it" in out


def test_app_doctor_with_a_key_of_another_app_exits_1(configured: Spell, fake: FakeGitHub) -> None:
    other = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        .decode()
    )
    key_file = configured.cwd / "other.pem"
    key_file.write_text(other)
    key_file.chmod(0o600)
    proc = configured.with_env(
        GITHUB_APP_PRIVATE_KEY=None, GITHUB_APP_PRIVATE_KEY_PATH=str(key_file)
    )("app", "doctor")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: UNAUTHORIZED: GitHub refused the App's JWT")
    assert f"the private key does not belong to app {fake.app_id}" in proc.stderr
    assert fake.auth_failures  # GitHub (the fake) really refused it


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"GITHUB_APP_ID": None}, "GITHUB_APP_ID is not set"),
        ({"GITHUB_APP_PRIVATE_KEY": "not a pem"}, "is not a PEM private key"),
        (
            {"GITHUB_APP_PRIVATE_KEY": None, "GITHUB_APP_PRIVATE_KEY_PATH": "/nonexistent.pem"},
            "cannot read GITHUB_APP_PRIVATE_KEY_PATH",
        ),
        ({"GITHUB_WEBHOOK_SECRET": None}, "GITHUB_WEBHOOK_SECRET is not set"),
        ({"GITHUB_API_URL": "http://127.0.0.1:9"}, "cannot reach GitHub"),
    ],
)
def test_app_doctor_failures(
    configured: Spell, change: dict[str, str | None], message: str
) -> None:
    proc = configured.with_env(**change)("app", "doctor")
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.startswith("error: ")
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one error line


# ------------------------------------------------------------------- webhooks redeliver


def _store_in_inbox(spell: Spell, guid: str, status: str) -> None:
    from app.cli.local import local_engine
    from app.services.ports import SystemClock
    from app.store.inbox import Inbox
    from app.store.ledger import SqlLedger

    settings = Settings(SPELL_DATA_DIR=str(spell.data_dir), SPELL_SECRET_KEY="k" * 40)

    async def go() -> None:
        async with local_engine(settings) as engine:
            clock = SystemClock()
            inbox = Inbox(SqlLedger(engine, clock), clock)
            assert await inbox.accept("github", guid, "issue_comment", b"{}")
            if status != "pending":
                await inbox.finish(guid, status)

    asyncio.run(go())


def test_webhooks_redeliver_only_the_failed_ones_not_processed(
    configured: Spell, fake: FakeGitHub
) -> None:
    now = fake.clock()
    new_failure = fake.add_delivery("issue_comment", action="created", status_code=502)
    timed_out = fake.add_delivery("workflow_run", action="completed", status_code=0)
    processed = fake.add_delivery("issue_comment", action="created", status_code=504)
    queued = fake.add_delivery("installation", action="created", status_code=500)
    fake.add_delivery("issue_comment", action="created", status_code=202)
    healed = fake.add_delivery("check_run", status_code=503)
    fake.add_delivery("check_run", status_code=202, guid=healed.guid, redelivery=True)
    fake.add_delivery("ping", status_code=500, delivered_at=now - timedelta(hours=2))
    _store_in_inbox(configured, processed.guid, "done")
    _store_in_inbox(configured, queued.guid, "pending")
    _store_in_inbox(configured, "some-other-guid", "done")

    dry = configured.ok("webhooks", "redeliver", "--since", "1h", "--dry-run")
    assert fake.redeliveries == []
    assert fake.requests_for("apps/redeliver-webhook-delivery") == []
    assert f"would redeliver  {new_failure.id}  issue_comment.created  status 502" in dry.stdout
    assert "would redeliver 2, skipped 2" in dry.stdout

    proc = configured.ok("webhooks", "redeliver", "--since", "1h")
    assert sorted(fake.redeliveries) == sorted([new_failure.id, timed_out.id])
    posted = fake.requests_for("apps/redeliver-webhook-delivery")
    assert sorted(r.path for r in posted) == sorted(
        f"/app/hook/deliveries/{d.id}/attempts" for d in (new_failure, timed_out)
    )
    assert all(r.auth == "jwt" and r.status == 202 for r in posted)
    lines = proc.stdout.splitlines()
    assert any(
        line.startswith(f"redelivered  {new_failure.id}  issue_comment.created") for line in lines
    )
    assert any(
        line.startswith(f"redelivered  {timed_out.id}  workflow_run.completed") for line in lines
    )
    assert any(
        line.startswith(f"skipped      {processed.id}") and "already processed (done)" in line
        for line in lines
    )
    assert any(
        line.startswith(f"skipped      {queued.id}") and "in the inbox (pending)" in line
        for line in lines
    )
    assert not any(str(healed.id) in line for line in lines)
    assert lines[-1].startswith("7 deliveries since ")
    assert lines[-1].endswith("4 failed; redelivered 2, skipped 2")

    # --since 3h also sees the old ping; GitHub refuses nothing here.
    wider = configured.ok("webhooks", "redeliver", "--since", "3h", "--dry-run")
    assert "ping" in wider.stdout


def test_webhooks_redeliver_refuses_bad_durations_and_needs_credentials(
    configured: Spell, spell: Spell
) -> None:
    for since in ("4d", "1w", "soon"):
        proc = configured("webhooks", "redeliver", "--since", since)
        assert proc.returncode == 2 and "--since" in proc.stderr
    proc = spell("webhooks", "redeliver")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: VALIDATION_ERROR: GITHUB_APP_ID is not set")


def test_webhooks_redeliver_without_a_local_ledger(configured: Spell, fake: FakeGitHub) -> None:
    failed = fake.add_delivery("issue_comment", action="created", status_code=502)
    proc = configured.ok("webhooks", "redeliver")
    assert "no local ledger here" in proc.stderr
    assert fake.redeliveries == [failed.id]


def test_webhooks_redeliver_reports_a_refused_redelivery(
    configured: Spell, fake: FakeGitHub
) -> None:
    failed = fake.add_delivery("issue_comment", action="created", status_code=502)
    fake.fail_next("apps/redeliver-webhook-delivery", 422, "Validation Failed")
    proc = configured("webhooks", "redeliver")
    assert proc.returncode == 1
    assert f"FAILED       {failed.id}" in proc.stdout
    assert "1 refused by GitHub" in proc.stdout


# ----------------------------------------------------------------------- github links


def _linked(spell: Spell, kind: str, login: str) -> tuple[str, str] | None:
    from app.cli.local import local_engine
    from app.services.ports import SystemClock
    from app.store.github_store import GitHubStore
    from app.store.ledger import SqlLedger

    settings = Settings(SPELL_DATA_DIR=str(spell.data_dir), SPELL_SECRET_KEY="k" * 40)

    async def go() -> tuple[str, str] | None:
        async with local_engine(settings) as engine:
            clock = SystemClock()
            link = await GitHubStore(SqlLedger(engine, clock), clock).linked_account(kind, login)
            return None if link is None else (link.account_id, link.role)

    return asyncio.run(go())


def test_github_link_links_and_unlink(spell: Spell) -> None:
    empty = spell.ok("github", "links")
    assert empty.stdout == "" and "no links" in empty.stderr

    out = spell.ok("github", "link", "--account", "ACME", "--user", "OctoCat").stdout
    assert "linked GitHub user OctoCat to account ACME (role caster)" in out
    spell.ok("github", "link", "--account", "acme-ops", "--owner", "octo-org", "--role", "operator")
    assert _linked(spell, "user", "octocat") == ("ACME", "caster")
    assert _linked(spell, "owner", "Octo-Org") == ("acme-ops", "operator")
    assert _linked(spell, "owner", "octocat") is None

    listing = spell.ok("github", "links").stdout.splitlines()
    assert listing[0].split() == ["KIND", "LOGIN", "ACCOUNT", "ROLE", "LINKED"]
    assert listing[1].split()[:4] == ["owner", "octo-org", "acme-ops", "operator"]
    assert listing[2].split()[:4] == ["user", "octocat", "ACME", "caster"]
    as_json = json.loads(spell.ok("github", "links", "--json").stdout)
    assert [(x["kind"], x["login"], x["account"]) for x in as_json] == [
        ("owner", "octo-org", "acme-ops"),
        ("user", "octocat", "ACME"),
    ]

    # Re-linking moves the user to another account.
    spell.ok("github", "link", "--account", "OTHER", "--user", "octocat")
    assert _linked(spell, "user", "octocat") == ("OTHER", "caster")

    assert (
        "unlinked GitHub user octocat" in spell.ok("github", "unlink", "--user", "octocat").stdout
    )
    assert _linked(spell, "user", "octocat") is None
    again = spell("github", "unlink", "--user", "octocat")
    assert again.returncode == 1
    assert again.stderr.startswith("error: NOT_FOUND: GitHub user octocat is not linked")

    # The accounts exist (with a caster principal) and every change is in the audit log.
    audit = (spell.data_dir / "audit" / "audit.jsonl").read_text().splitlines()
    events = [json.loads(line)["event"] for line in audit]
    assert events.count("github.linked") == 3 and events.count("github.unlinked") == 1
    spell.ok("audit", "verify")
    token = spell.ok("token", "issue", "--account", "ACME", "--role", "caster")
    assert token.stdout.strip()


@pytest.mark.parametrize(
    "args",
    [
        ("link", "--account", "ACME"),
        ("link", "--account", "ACME", "--user", "a", "--owner", "b"),
        ("link", "--account", "ACME", "--user", "bad/login"),
        ("link", "--account", "ACME", "--user", "x", "--role", "auditor"),
        ("link", "--account", "has space", "--user", "x"),
        ("link", "--user", "x"),
        ("unlink",),
    ],
)
def test_github_link_usage_errors(spell: Spell, args: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, ["github", *args], env=spell.env, prog_name="spell")
    assert result.exit_code == 2, result.output
    assert not (spell.data_dir / "spell.db").exists()  # refused before touching the ledger
