"""The companion Action's script (``actions/cast/cast.py``) against a live local platform.

The platform is the real app (``create_app``, the one ``spell serve`` runs) listening on a free
port, on the suite's ledger (SQLite, or PostgreSQL with ``SPELL_TEST_DATABASE_URL``), with the
FakeSandbox running the casts. A fake GitHub OIDC issuer, with its own RSA key, serves the
runner's ID-token endpoint (``ACTIONS_ID_TOKEN_REQUEST_URL``) and the JWKS the platform verifies
against (``SPELL_OIDC_JWKS_URL``). The script runs as a subprocess with the ``GITHUB_*``
environment of a step: its outputs file, its step summary, run id/attempt/job/step.
Repository links are made with the real ``spell oidc allow`` command on the same ledger.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from app.config import Settings
from app.domain.oidc import GITHUB_ISSUER
from app.web.app import Overrides, create_app
from app.web.keys import PLATFORM
from app.web.oidc_routes import JWKS
from tests.conftest import FakeSandbox

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CAST = REPO / "actions" / "cast" / "cast.py"
STAMP = REPO / "actions" / "cast" / "stamp.py"
AUDIENCE = "spell-platform"
REQUEST_TOKEN = "runner-request-" + secrets.token_hex(8)
REPOSITORY = "Octo-Org/Deploy"


# ---------------------------------------------------------------------------- fake issuer


@pytest.fixture(scope="module")
def keys() -> dict[str, rsa.RSAPrivateKey]:
    return {
        name: rsa.generate_private_key(public_exponent=65537, key_size=2048)
        for name in ("issuer", "rotated", "forger")
    }


@dataclass
class FakeIssuer:
    """GitHub's OIDC side of a job: the runner's ID-token endpoint and the issuer's JWKS."""

    keys: dict[str, rsa.RSAPrivateKey]
    url: str = ""
    published: list[tuple[str, str]] = field(default_factory=lambda: [("k1", "issuer")])
    sign_with: tuple[str, str] = ("k1", "issuer")  # (kid in the header, key that signs)
    repository: str = REPOSITORY
    exp_offset: int = 300
    audience_override: str | None = None
    jwks_fetches: int = 0
    token_requests: list[dict[str, str]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/jwks", self.jwks)
        app.router.add_get("/idtoken", self.idtoken)
        return app

    async def jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        out = []
        for kid, name in self.published:
            jwk = RSAAlgorithm.to_jwk(self.keys[name].public_key(), as_dict=True)
            out.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return web.json_response({"keys": out})

    def mint(self, **changes: Any) -> str:
        now = int(time.time())
        owner = self.repository.split("/")[0]
        claims: dict[str, Any] = {
            "iss": GITHUB_ISSUER,
            "aud": self.audience_override or AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + self.exp_offset,
            "sub": f"repo:{self.repository}:ref:refs/heads/main",
            "repository": self.repository,
            "repository_owner": owner,
            "repository_id": "4242",
            "ref": "refs/heads/main",
            "sha": "f" * 40,
            "workflow_ref": f"{self.repository}/.github/workflows/ci.yml@refs/heads/main",
            "event_name": "push",
            "run_id": "9001",
            "run_attempt": "1",
            "actor": "octocat",
            "jti": secrets.token_hex(8),
        }
        claims.update(changes)
        kid, name = self.sign_with
        token = jwt.encode(claims, self.keys[name], algorithm="RS256", headers={"kid": kid})
        self.issued.append(token)
        return token

    async def idtoken(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {REQUEST_TOKEN}":
            return web.json_response({"message": "bad request token"}, status=401)
        self.token_requests.append(dict(request.query))
        aud = request.query.get("audience", "")
        return web.json_response({"count": 1, "value": self.mint(aud=aud)})


# ------------------------------------------------------------------------------- platform


@dataclass
class ActionRun:
    returncode: int
    stdout: str
    stderr: str
    outputs: dict[str, str]
    summary: str


def parse_outputs(text: str) -> dict[str, str]:
    """``$GITHUB_OUTPUT`` as the runner reads it (``name<<DELIM`` … ``DELIM``, or name=value)."""
    out: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line:
            continue
        if "<<" in line:
            name, delim = line.split("<<", 1)
            value: list[str] = []
            while lines[i] != delim:
                value.append(lines[i])
                i += 1
            i += 1
            out[name] = "\n".join(value)
        else:
            name, _, val = line.partition("=")
            out[name] = val
    return out


@dataclass
class Live:
    url: str
    app: web.Application
    issuer: FakeIssuer
    sandbox: FakeSandbox
    settings: Settings
    tmp: Path
    runs: int = 0

    @property
    def platform(self) -> Any:
        return self.app[PLATFORM]

    def cli_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPELL_", "DATABASE_"))}
        env["SPELL_DATA_DIR"] = str(self.settings.data_dir)
        assert self.settings.secret_key is not None
        env["SPELL_SECRET_KEY"] = self.settings.secret_key.get_secret_value()
        if self.settings.database_url:
            env["DATABASE_URL"] = self.settings.database_url
        return env

    async def spell(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app.cli.main",
            *args,
            cwd=REPO,
            env=self.cli_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return subprocess.CompletedProcess(list(args), proc.returncode, out.decode(), err.decode())

    async def allow(self, pattern: str = REPOSITORY, account: str = "ACME") -> None:
        """What `spell oidc allow` does (tested as a command in test_oidc_links_from_the_cli),
        in process: a CLI start-up per test would cost seconds."""
        from app.store.oidc_store import OidcStore

        platform = self.platform
        await platform.ledger.ensure_principal(
            account, "caster", monthly_cap=10_000, total_cap=None
        )
        await OidcStore(platform.ledger, platform.clock).allow(pattern, account, "caster")

    async def publish(self, spell_id: str, cents: int) -> None:
        from app.runner.bundle import pack_dir

        maker, _ = await self.platform.issue_token("acme-labs", "maker")
        folder = self.tmp / f"bundle-{secrets.token_hex(4)}"
        folder.mkdir()
        (folder / "spell.json").write_text("{}")
        (folder / "main.py").write_text("print('hi')\n")
        headers = {"Authorization": f"Bearer {maker}"}
        async with aiohttp.ClientSession(self.url) as http:
            r = await http.post(
                "/v1/bundles",
                data=pack_dir(folder),
                headers={**headers, "Content-Type": "application/gzip"},
            )
            assert r.status == 201, await r.text()
            digest = (await r.json())["digest"]
            doc = {
                "id": spell_id,
                "name": spell_id,
                "execution": {"mode": "service", "entrypoint": "main.py", "bundle": digest},
                "pricing": {"model": "flat", "currency": "USD", "flat_cents": cents},
                "inputs": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}},
                    "required": ["name"],
                },
            }
            r = await http.post("/v1/spells", json=doc, headers=headers)
            assert r.status in (200, 201), await r.text()

    def step_env(self, **inputs: str) -> dict[str, str]:
        """A step's environment: GITHUB_* of run 9001 attempt 1, the runner's OIDC variables."""
        self.runs += 1
        out_file = self.tmp / f"output-{self.runs}"
        summary_file = self.tmp / f"summary-{self.runs}"
        out_file.write_text("")
        summary_file.write_text("")
        env = {
            "PATH": os.environ.get("PATH", ""),
            "GITHUB_ACTIONS": "true",
            "GITHUB_OUTPUT": str(out_file),
            "GITHUB_STEP_SUMMARY": str(summary_file),
            "GITHUB_REPOSITORY": REPOSITORY,
            "GITHUB_RUN_ID": "9001",
            "GITHUB_RUN_ATTEMPT": "1",
            "GITHUB_JOB": "deploy",
            "GITHUB_ACTION": "cast",
            "RUNNER_OS": "Linux",
            "ACTIONS_ID_TOKEN_REQUEST_URL": f"{self.issuer.url}/idtoken?api-version=2.0",
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN,
            "SPELL_ACTION_SPELL": "com.example.hello",
            "SPELL_ACTION_INPUT": '{"name":"world"}',
            "SPELL_ACTION_API_URL": self.url,
            "SPELL_ACTION_AUDIENCE": AUDIENCE,
            "SPELL_ACTION_WAIT": "true",
            "SPELL_ACTION_TIMEOUT": "60",
        }
        if "SYSTEMROOT" in os.environ:  # pragma: no cover - Windows
            env["SYSTEMROOT"] = os.environ["SYSTEMROOT"]
        env.update(inputs)
        return {k: v for k, v in env.items() if v is not None}

    async def action(self, python: str | None = None, **inputs: str) -> ActionRun:
        env = self.step_env(**inputs)
        proc = await asyncio.create_subprocess_exec(
            python or sys.executable,
            "-I",
            str(CAST),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return ActionRun(
            proc.returncode,
            out.decode(),
            err.decode(),
            parse_outputs(Path(env["GITHUB_OUTPUT"]).read_text()),
            Path(env["GITHUB_STEP_SUMMARY"]).read_text(),
        )

    def audit(self) -> list[dict[str, Any]]:
        path = self.settings.data_dir / "audit" / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
async def live(
    aiohttp_server: Any,
    settings: Settings,
    keys: dict[str, rsa.RSAPrivateKey],
    tmp_path: Path,
) -> AsyncIterator[Live]:
    issuer = FakeIssuer(keys)
    issuer_server = await aiohttp_server(issuer.app())
    issuer.url = str(issuer_server.make_url("")).rstrip("/")
    oidc_settings = settings.model_copy(
        update={
            "oidc_issuer": GITHUB_ISSUER,
            "oidc_audience": AUDIENCE,
            "oidc_jwks_url": f"{issuer.url}/.well-known/jwks",
        }
    )
    sandbox = FakeSandbox()
    server = await aiohttp_server(create_app(oidc_settings, overrides=Overrides(sandbox=sandbox)))
    live = Live(
        url=str(server.make_url("")).rstrip("/"),
        app=server.app,
        issuer=issuer,
        sandbox=sandbox,
        settings=oidc_settings,
        tmp=tmp_path,
    )
    await live.publish("com.example.hello", 25)
    yield live


async def monthly_usage(live: Live) -> tuple[int, int]:
    token, _ = await live.platform.issue_token("ACME", "caster")
    async with aiohttp.ClientSession(live.url) as http:
        r = await http.get("/v1/billing/caps", headers={"Authorization": f"Bearer {token}"})
        monthly = (await r.json())["monthly"]
    return monthly["used_cents"], monthly["reserved_cents"]


def errors(run: ActionRun) -> list[str]:
    return [line for line in run.stdout.splitlines() if line.startswith("::error")]


def assert_no_secret_leaks(
    live: Live, run: ActionRun, *, platform_tokens: int = 1, server_log: str = ""
) -> None:
    """Every token (the runner's request token, GitHub's OIDC tokens, the platform token) is
    masked before anything else shows it, and none reaches stderr or the audit log."""
    lines = run.stdout.splitlines()
    masked = [
        line.removeprefix("::add-mask::") for line in lines if line.startswith("::add-mask::")
    ]
    assert REQUEST_TOKEN in masked
    assert set(live.issuer.issued) <= set(masked)
    platform = set(masked) - {REQUEST_TOKEN, *live.issuer.issued}
    assert len(platform) == platform_tokens
    audit = json.dumps(live.audit())
    for secret in masked:
        assert secret not in run.stderr
        assert secret not in audit
        assert secret not in run.summary
        assert secret not in server_log
        assert [line for line in lines if secret in line] == [f"::add-mask::{secret}"]


# ---------------------------------------------------------------------------------- tests


async def test_a_cast_from_a_step_signs_in_with_oidc_and_reports_its_result(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await live.allow()
    run = await live.action()
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.outputs
    assert out["status"] == "succeeded"
    assert out["cast-id"].startswith("c_")
    assert out["cost-cents"] == "25"
    assert out["error-code"] == ""
    assert out["artifact-url"].startswith(live.url + "/v1/artifacts/")
    async with aiohttp.ClientSession() as http:  # the output is a working download link
        r = await http.get(out["artifact-url"])
        assert r.status == 200
        assert (await r.read())[:2] == b"PK"
    # progress streamed to the log, with workflow commands stopped meanwhile
    assert "signed in with GitHub OIDC as account ACME" in run.stdout
    assert "progress: 50% half way" in run.stdout
    assert "log: [stderr] a log line" in run.stdout
    assert "succeeded: cost 25 cents" in run.stdout
    stop = [line for line in run.stdout.splitlines() if line.startswith("::stop-commands::")]
    assert len(stop) == 1 and f"::{stop[0].split('::')[2]}::" in run.stdout
    # the summary table
    assert "### Spell cast: com.example.hello" in run.summary
    assert f"| Cast | `{out['cast-id']}` |" in run.summary
    assert "| Status | ✅ succeeded |" in run.summary
    assert "0.25 USD (25 ¢)" in run.summary
    assert out["artifact-url"] not in run.summary  # a bearer link stays out of the summary
    # the cast was made as the linked account, with the OIDC token asked for our audience
    cast = await live.platform.ledger.get_cast(out["cast-id"])
    assert cast.caster_id == "ACME"
    assert live.issuer.token_requests == [{"api-version": "2.0", "audience": AUDIENCE}]
    # audit: one exchange record, actor = the repository, no token
    exchanges = [r for r in live.audit() if r["event"] == "oidc.token_issued"]
    assert len(exchanges) == 1
    rec = exchanges[0]
    assert rec["actor"] == "octo-org/deploy"
    assert rec["data"]["account"] == "ACME" and rec["data"]["role"] == "caster"
    assert rec["data"]["run_id"] == "9001" and rec["data"]["link"] == "octo-org/deploy"
    assert "OIDC sign-in: octo-org/deploy as ACME" in caplog.text
    assert_no_secret_leaks(live, run, server_log=caplog.text)


async def test_a_failed_cast_fails_the_step_with_its_error_code(live: Live) -> None:
    await live.allow()
    live.sandbox.behaviour = "crash"
    run = await live.action()
    assert run.returncode == 1
    assert run.outputs["status"] == "failed"
    assert run.outputs["error-code"] == "SPELL_FAILED"
    assert run.outputs["cast-id"].startswith("c_")
    assert run.outputs["artifact-url"] == ""
    [error] = errors(run)
    assert error.startswith("::error title=Spell cast::SPELL_FAILED: ")
    assert "ValueError: boom" in error
    assert "| Status | ❌ failed |" in run.summary
    assert "`SPELL_FAILED`" in run.summary


async def test_a_cast_over_the_accounts_cap_is_refused_with_402(live: Live) -> None:
    await live.allow()
    await live.publish("com.example.pricey", 20_000)  # above the default monthly cap of 10 000
    run = await live.action(SPELL_ACTION_SPELL="com.example.pricey")
    assert run.returncode == 1
    assert run.outputs["status"] == "refused"
    assert run.outputs["error-code"] == "BUDGET_CAP_EXCEEDED"
    assert run.outputs["cast-id"] == ""
    [error] = errors(run)
    assert error.startswith("::error title=Spell cast::BUDGET_CAP_EXCEEDED: ")
    assert "retry after" in error
    assert "| Status | ⛔ refused |" in run.summary
    assert live.sandbox.runs == []


async def test_the_budget_cap_input_refuses_before_casting(live: Live) -> None:
    await live.allow()
    run = await live.action(SPELL_ACTION_BUDGET_CAP="10")
    assert run.returncode == 1
    assert run.outputs["error-code"] == "BUDGET_CAP_EXCEEDED"
    assert run.outputs["cast-id"] == ""
    assert "above this step's budget-cap of 10 cents; nothing was cast" in errors(run)[0]
    assert live.sandbox.runs == []
    assert await monthly_usage(live) == (0, 0)  # nothing reserved, nothing spent
    ok = await live.action(SPELL_ACTION_BUDGET_CAP="25")  # the estimate is 25: allowed
    assert ok.returncode == 0, ok.stdout
    assert ok.outputs["status"] == "succeeded"


async def test_a_retried_step_of_the_same_attempt_never_casts_twice(live: Live) -> None:
    await live.allow()
    first = await live.action()
    second = await live.action()
    assert first.returncode == second.returncode == 0, second.stdout
    assert second.outputs["cast-id"] == first.outputs["cast-id"]
    assert len(live.sandbox.runs) == 1
    assert "replayed" in second.stdout
    assert "| Replayed | yes" in second.summary
    assert second.outputs["status"] == "succeeded"
    assert second.outputs["cost-cents"] == "25"
    # A re-run is a new attempt: it casts again.
    rerun = await live.action(GITHUB_RUN_ATTEMPT="2")
    assert rerun.returncode == 0
    assert rerun.outputs["cast-id"] != first.outputs["cast-id"]
    assert len(live.sandbox.runs) == 2
    # Another input in the same step (a matrix leg) is another cast, not a conflict.
    other = await live.action(SPELL_ACTION_INPUT='{"name":"mars"}')
    assert other.returncode == 0, other.stdout
    assert other.outputs["cast-id"] not in (first.outputs["cast-id"], rerun.outputs["cast-id"])


async def test_an_explicit_idempotency_key_wins(live: Live) -> None:
    await live.allow()
    a = await live.action(SPELL_ACTION_IDEMPOTENCY_KEY="release-1.2.3")
    b = await live.action(SPELL_ACTION_IDEMPOTENCY_KEY="release-1.2.3", GITHUB_RUN_ID="9999")
    assert a.outputs["cast-id"] == b.outputs["cast-id"]
    c = await live.action(
        SPELL_ACTION_IDEMPOTENCY_KEY="release-1.2.3", SPELL_ACTION_INPUT='{"name":"x"}'
    )
    assert c.returncode == 1
    assert c.outputs["error-code"] == "IDEMPOTENCY_CONFLICT"


async def test_a_forged_oidc_token_is_refused(live: Live) -> None:
    await live.allow()
    live.issuer.sign_with = ("k1", "forger")  # the issuer's key id, someone else's key
    run = await live.action()
    assert run.returncode == 1
    assert run.outputs["error-code"] == "UNAUTHORIZED"
    assert run.outputs["status"] == "refused"
    assert "signature does not verify" in errors(run)[0]
    assert live.sandbox.runs == []
    assert not [r for r in live.audit() if r["event"] == "oidc.token_issued"]
    assert_no_secret_leaks(live, run, platform_tokens=0)


async def test_a_token_signed_by_an_unpublished_key_is_refused(live: Live) -> None:
    await live.allow()
    live.issuer.sign_with = ("k-unknown", "forger")
    run = await live.action()
    assert run.returncode == 1
    assert run.outputs["error-code"] == "UNAUTHORIZED"
    assert "does not publish" in errors(run)[0]


async def test_a_token_for_another_audience_is_refused(live: Live) -> None:
    await live.allow()
    run = await live.action(SPELL_ACTION_AUDIENCE="sts.amazonaws.com")
    assert run.returncode == 1
    assert run.outputs["error-code"] == "UNAUTHORIZED"
    assert "audience is sts.amazonaws.com, not 'spell-platform'" in errors(run)[0]
    assert live.issuer.token_requests[-1]["audience"] == "sts.amazonaws.com"


async def test_an_expired_token_is_refused(live: Live) -> None:
    await live.allow()
    live.issuer.exp_offset = -3600
    run = await live.action()
    assert run.returncode == 1
    assert run.outputs["error-code"] == "UNAUTHORIZED"
    assert "expired" in errors(run)[0]


async def test_an_unlinked_repository_is_refused(live: Live) -> None:
    await live.allow("octo-org/other")
    run = await live.action()
    assert run.returncode == 1
    assert run.outputs["error-code"] == "UNAUTHORIZED"
    assert "repository octo-org/deploy may not sign in" in errors(run)[0]
    assert "spell oidc allow octo-org/deploy" in errors(run)[0]


async def test_without_id_token_permission_the_step_says_what_to_add(live: Live) -> None:
    run = await live.action(ACTIONS_ID_TOKEN_REQUEST_URL="", ACTIONS_ID_TOKEN_REQUEST_TOKEN="")
    assert run.returncode == 1
    assert run.outputs["error-code"] == "UNAUTHORIZED"
    assert "permissions: { id-token: write }" in errors(run)[0]
    assert live.issuer.token_requests == []


async def test_a_token_input_skips_oidc(live: Live) -> None:
    token, _ = await live.platform.issue_token("ACME", "caster")
    run = await live.action(
        SPELL_ACTION_TOKEN=token, ACTIONS_ID_TOKEN_REQUEST_URL="", ACTIONS_ID_TOKEN_REQUEST_TOKEN=""
    )
    assert run.returncode == 0, run.stdout
    assert run.outputs["status"] == "succeeded"
    assert run.stdout.splitlines()[0] == f"::add-mask::{token}"
    assert live.issuer.token_requests == []


async def test_wait_false_returns_once_the_cast_is_accepted(live: Live) -> None:
    await live.allow()
    live.sandbox.gate.clear()  # the run cannot finish while the step runs
    try:
        run = await live.action(SPELL_ACTION_WAIT="false")
    finally:
        live.sandbox.gate.set()
    assert run.returncode == 0, run.stdout
    assert run.outputs["status"] in ("queued", "running")
    assert run.outputs["cast-id"].startswith("c_")
    assert run.outputs["cost-cents"] == ""


async def test_a_cast_outliving_the_timeout_fails_the_step_and_goes_on(live: Live) -> None:
    await live.allow()
    live.sandbox.gate.clear()  # the run hangs until the step has given up
    try:
        run = await live.action(SPELL_ACTION_TIMEOUT="1")
    finally:
        live.sandbox.gate.set()
    assert run.returncode == 1
    assert run.outputs["error-code"] == "TIMEOUT"
    assert run.outputs["status"] in ("queued", "running")
    cast_id = run.outputs["cast-id"]
    assert "it goes on on the platform" in errors(run)[0]
    for _ in range(500):  # released: the cast finishes on the platform all the same
        cast = await live.platform.ledger.get_cast(cast_id)
        if cast.status in ("succeeded", "failed"):
            break
        await asyncio.sleep(0.02)
    assert cast.status == "succeeded"


async def test_bad_inputs_exit_2_without_calling_the_platform(live: Live) -> None:
    for inputs, message in [
        ({"SPELL_ACTION_INPUT": "[1, 2]"}, "`input` must be a JSON object"),
        ({"SPELL_ACTION_INPUT": "{nope"}, "`input` is not valid JSON"),
        ({"SPELL_ACTION_SPELL": "../etc"}, "`spell` is not a spell id"),
        ({"SPELL_ACTION_MODE": "clone"}, "`mode` must be one of"),
        ({"SPELL_ACTION_TIMEOUT": "-3"}, "`timeout` must be a whole number"),
        ({"SPELL_ACTION_API_URL": "http://spells.example.com"}, "must use https://"),
        ({"SPELL_ACTION_API_URL": ""}, "no platform URL"),
    ]:
        run = await live.action(**inputs)
        assert run.returncode == 2, (inputs, run.stdout)
        assert run.outputs["error-code"] == "VALIDATION_ERROR"
        assert message in errors(run)[0], (message, run.stdout)
    assert live.issuer.token_requests == []


# ------------------------------------------------------- issue #6: the snippet as written

#: The acceptance snippet of issue #6, as the README shows it: no `api-url`, no SPELL_API_URL.
SNIPPET = """\
permissions: { id-token: write }
steps:
  - uses: OWNER/spell-platform@v1
    with: { spell: com.example.hello, input: '{"name":"world"}' }
"""
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def released_action(tmp: Path, api_url: str | None) -> Path:
    """The tree a tag of the Action holds: action.yml and actions/cast, stamped with ``api_url``
    by the release's own command (``None``: the source tree, unstamped)."""
    root = tmp / f"action-{secrets.token_hex(4)}"
    (root / "actions" / "cast").mkdir(parents=True)
    shutil.copyfile(REPO / "action.yml", root / "action.yml")
    for script in (CAST, STAMP):
        shutil.copyfile(script, root / "actions" / "cast" / script.name)
    if api_url is not None:
        stamp = root / "actions" / "cast" / "stamp.py"
        res = subprocess.run(
            [
                sys.executable,
                "-I",
                str(stamp),
                "--api-url",
                api_url,
                "--file",
                str(root / "action.yml"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
    return root


def expand(value: Any, inputs: dict[str, str], env: dict[str, str]) -> str:
    """``${{ inputs.X }}`` and ``${{ github.x }}`` as the runner evaluates them in a composite
    step's ``env:``; any other expression fails the test (the runner here cannot fake it)."""

    def one(m: re.Match[str]) -> str:
        expr = m.group(1)
        if found := re.fullmatch(r"inputs\.([A-Za-z0-9_-]+)", expr):
            return inputs[found.group(1)]
        if found := re.fullmatch(r"github\.([a-z_]+)", expr):
            return env["GITHUB_" + found.group(1).upper()]
        raise AssertionError(f"cannot evaluate ${{{{ {expr} }}}} in action.yml")

    return EXPR.sub(one, "" if value is None else str(value))


async def run_released_step(
    live: Live, action_dir: Path, with_: dict[str, str], **job_env: str
) -> tuple[ActionRun, dict[str, str]]:
    """The Action's one composite step as the runner runs it: the inputs are the step's
    ``with:`` values, else the defaults of action.yml; its ``env:`` is evaluated over them and
    added to the job's environment (the simulated GITHUB_* of :meth:`Live.step_env`, none of
    the ``SPELL_ACTION_*`` shortcuts the other tests use); its ``run:`` goes to ``bash
    --noprofile --norc -eo pipefail`` with GITHUB_ACTION_PATH at the action's tree and this
    interpreter first on PATH as ``python3``."""
    action = yaml.safe_load((action_dir / "action.yml").read_text(encoding="utf-8"))
    declared: dict[str, Any] = action["inputs"]
    assert set(with_) <= set(declared), set(with_) - set(declared)
    inputs = {}
    for name, spec in declared.items():
        if name in with_:
            inputs[name] = with_[name]
        else:
            assert not spec.get("required"), f"the required input {name} is missing"
            inputs[name] = str(spec.get("default", ""))
    env = {k: v for k, v in live.step_env().items() if not k.startswith("SPELL_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env["GITHUB_ACTION_PATH"] = str(action_dir)
    env.update(job_env)
    (step,) = action["runs"]["steps"]
    assert step["shell"] == "bash"
    env.update({k: expand(v, inputs, env) for k, v in (step.get("env") or {}).items()})
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "--noprofile",
        "--norc",
        "-eo",
        "pipefail",
        "-c",
        step["run"],
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    run = ActionRun(
        proc.returncode,
        out.decode(),
        err.decode(),
        parse_outputs(Path(env["GITHUB_OUTPUT"]).read_text()),
        Path(env["GITHUB_STEP_SUMMARY"]).read_text(),
    )
    return run, env


async def test_the_issue_6_snippet_casts_with_the_released_actions_default_url(
    live: Live,
) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"```yaml\n{SNIPPET}```" in readme  # the snippet tested is the one documented
    (step,) = yaml.safe_load(SNIPPET)["steps"]
    with_ = {k: str(v) for k, v in step["with"].items()}
    assert "api-url" not in with_
    await live.allow()

    # The source tree carries no URL: the snippet cannot work from it, and says why.
    source = released_action(live.tmp, None)
    run, env = await run_released_step(live, source, with_)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no platform URL" in errors(run)[0]
    assert live.sandbox.runs == []

    # The released tag: stamped with the platform's URL (plain http: it is localhost).
    released = released_action(live.tmp, live.url)
    run, env = await run_released_step(live, released, with_)
    assert "SPELL_API_URL" not in env
    assert env["SPELL_ACTION_API_URL"] == ""
    assert env["SPELL_ACTION_DEFAULT_API_URL"] == live.url
    assert env["SPELL_ACTION_SPELL"] == "com.example.hello"
    assert env["SPELL_ACTION_INPUT"] == '{"name":"world"}'
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"casting com.example.hello at {live.url}" in run.stdout
    assert "signed in with GitHub OIDC as account ACME" in run.stdout
    assert run.outputs["status"] == "succeeded"
    assert run.outputs["cost-cents"] == "25"
    assert live.issuer.token_requests[-1]["audience"] == AUDIENCE  # the input's default
    assert len(live.sandbox.runs) == 1
    assert_no_secret_leaks(live, run)

    # The workflow author's SPELL_API_URL beats the stamped default (here, a dead port).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    elsewhere = released_action(live.tmp, dead)
    run, env = await run_released_step(
        live, elsewhere, with_, SPELL_API_URL=live.url, GITHUB_RUN_ATTEMPT="2"
    )
    assert env["SPELL_ACTION_DEFAULT_API_URL"] == dead
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"casting com.example.hello at {live.url}" in run.stdout
    assert len(live.sandbox.runs) == 2


def load_action() -> Any:
    sys.path.insert(0, str(CAST.parent))
    try:
        import cast as action  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    return action


def test_an_unreachable_platform_fails_the_step_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    action = load_action()
    monkeypatch.setattr(action.time, "sleep", lambda _s: None)  # the retries' back-off
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out, summary = tmp_path / "out", tmp_path / "summary"
    code = action.main(
        {
            "SPELL_ACTION_SPELL": "com.example.hello",
            "SPELL_ACTION_API_URL": f"http://127.0.0.1:{port}",
            "SPELL_ACTION_TOKEN": "a-platform-token-0123456789",
            "GITHUB_OUTPUT": str(out),
            "GITHUB_STEP_SUMMARY": str(summary),
            "GITHUB_RUN_ID": "1",
        }
    )
    printed = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in printed.out + printed.err
    outputs = parse_outputs(out.read_text())
    assert outputs["error-code"] == "UNAVAILABLE"
    assert outputs["status"] == "refused"
    assert f"cannot reach the platform at http://127.0.0.1:{port}" in printed.out
    assert "| Status | ⛔ refused |" in summary.read_text()


async def test_outputs_survive_values_that_look_like_delimiters(tmp_path: Path) -> None:
    action = load_action()
    path = tmp_path / "out"
    tricky = "line1\nghadelimiter_x\nname<<EOF\n"
    action.write_outputs(str(path), {"a": tricky, "b": ""})
    assert parse_outputs(path.read_text()) == {"a": tricky, "b": ""}


# -------------------------------------------------------------------- the OIDC endpoint


async def test_the_jwks_is_cached_and_refetched_for_a_new_key(live: Live) -> None:
    await live.allow()
    async with aiohttp.ClientSession(live.url) as http:
        for _ in range(3):
            r = await http.post("/v1/oidc/token", json={"token": live.issuer.mint()})
            assert r.status == 200, await r.text()
        assert live.issuer.jwks_fetches == 1
        body = await r.json()
        assert body["account"] == "ACME" and body["role"] == "caster"
        assert body["token_type"] == "Bearer" and 1 <= body["expires_in"] <= 300
        assert r.headers["Cache-Control"] == "no-store"
        # The issuer rotates to a new key: the unknown kid makes the platform fetch again.
        live.app[JWKS].min_refetch = 0.0
        live.issuer.published = [("k1", "issuer"), ("k2", "rotated")]
        live.issuer.sign_with = ("k2", "rotated")
        r = await http.post("/v1/oidc/token", json={"token": live.issuer.mint()})
        assert r.status == 200, await r.text()
        assert live.issuer.jwks_fetches == 2
        # The platform token works on the API (and is an ordinary caster token).
        r2 = await http.get(
            "/v1/billing/caps", headers={"Authorization": f"Bearer {body['token']}"}
        )
        assert r2.status == 200
        assert (await r2.json())["account"] == "ACME"


async def test_the_endpoint_answers_in_the_error_shape_and_never_echoes_the_token(
    live: Live,
) -> None:
    await live.allow()
    forged = jwt.encode(
        {"iss": GITHUB_ISSUER, "aud": AUDIENCE, "repository": REPOSITORY, "exp": 2_000_000_000},
        "a-shared-secret-of-sufficient-length-123",
        algorithm="HS256",
        headers={"kid": "k1"},
    )
    async with aiohttp.ClientSession(live.url) as http:
        cases = [
            ({"token": forged}, 401, "RS256"),
            ({"token": "not-a-jwt"}, 401, "not a JWT"),
            ({}, 422, "/token"),
            ({"token": live.issuer.mint(), "scope": "x"}, 422, "/scope"),
            ({"token": live.issuer.mint(), "ttl": 0}, 422, "/ttl"),
            ({"token": live.issuer.mint(iss="https://evil.example")}, 401, "not issued by"),
        ]
        for body, status, fragment in cases:
            r = await http.post("/v1/oidc/token", json=body)
            text = await r.text()
            assert r.status == status, (body, text)
            err = json.loads(text)["error"]
            assert fragment in err["message"]
            assert err["code"] == ("UNAUTHORIZED" if status == 401 else "VALIDATION_ERROR")
            if isinstance(body.get("token"), str):
                assert body["token"] not in text
        r = await http.post("/v1/oidc/token", json={"token": live.issuer.mint(), "ttl": 60})
        assert (await r.json())["expires_in"] == 60


async def test_an_unreachable_jwks_is_503_not_401(live: Live) -> None:
    await live.allow()
    live.app[JWKS].url = live.issuer.url + "/nowhere"
    async with aiohttp.ClientSession(live.url) as http:
        r = await http.post("/v1/oidc/token", json={"token": live.issuer.mint()})
        assert r.status == 503
        assert (await r.json())["error"]["code"] == "UNAVAILABLE"


async def test_while_the_issuer_is_down_its_last_keys_still_verify(live: Live) -> None:
    await live.allow()
    jwks = live.app[JWKS]
    async with aiohttp.ClientSession(live.url) as http:
        r = await http.post("/v1/oidc/token", json={"token": live.issuer.mint()})
        assert r.status == 200
        jwks.url = live.issuer.url + "/nowhere"
        jwks.ttl = jwks.min_refetch = 0.0  # the cache is stale: every token fetches again
        r = await http.post("/v1/oidc/token", json={"token": live.issuer.mint()})
        assert r.status == 200, await r.text()  # the known key, kept while the issuer is down
        live.issuer.sign_with = ("k9", "rotated")
        r = await http.post("/v1/oidc/token", json={"token": live.issuer.mint()})
        assert r.status == 503  # a key it never saw cannot be checked
        jwks.max_stale = 0.0
        live.issuer.sign_with = ("k1", "issuer")
        r = await http.post("/v1/oidc/token", json={"token": live.issuer.mint()})
        assert r.status == 503  # too old to trust


async def test_oidc_links_from_the_cli(live: Live) -> None:
    res = await live.spell("oidc", "allow", "octo-org/*", "--account", "ACME")
    assert res.returncode == 0, res.stderr
    assert "allowed octo-org/*" in res.stdout
    run = await live.action()  # octo-org/deploy through the owner's link
    assert run.returncode == 0, run.stdout
    res = await live.spell("oidc", "allow", REPOSITORY, "--account", "OTHER", "--role", "auditor")
    assert res.returncode == 0, res.stderr
    listed = await live.spell("oidc", "list", "--json")
    assert [(x["repository"], x["account"], x["role"]) for x in json.loads(listed.stdout)] == [
        ("octo-org/*", "ACME", "caster"),
        ("octo-org/deploy", "OTHER", "auditor"),
    ]
    table = await live.spell("oidc", "list")
    assert "octo-org/deploy  OTHER" in table.stdout
    async with aiohttp.ClientSession(live.url) as http:  # the repository's own link wins
        r = await http.post("/v1/oidc/token", json={"token": live.issuer.mint()})
        assert (await r.json())["account"] == "OTHER"
    for pattern in ("octo-org/deploy", "octo-org/*"):
        res = await live.spell("oidc", "revoke", pattern)
        assert res.returncode == 0 and f"revoked {pattern}" in res.stdout
    res = await live.spell("oidc", "revoke", "octo-org/*")
    assert res.returncode == 1
    assert res.stderr.startswith("error: NOT_FOUND: octo-org/* is not allowed")
    run = await live.action(GITHUB_RUN_ATTEMPT="3")
    assert run.returncode == 1
    assert "may not sign in" in errors(run)[0]
    bad = await live.spell("oidc", "allow", "octo-org", "--account", "ACME")
    assert bad.returncode == 2 and "OWNER/REPO" in bad.stderr
    bad = await live.spell("oidc", "allow", "octo-org/x", "--account", "ACME", "--role", "operator")
    assert bad.returncode == 2
    events = [r["event"] for r in live.audit()]
    assert events.count("oidc.allowed") == 2 and events.count("oidc.revoked") == 2


def _old_python() -> str | None:
    for name in ("python3.8", "python3.9"):
        candidates = [shutil.which(name)]
        candidates += sorted(
            str(p) for p in Path.home().glob(f".pyenv/versions/{name[6:]}*/bin/{name}")
        )
        for path in candidates:
            if path and subprocess.run([path, "-c", "pass"], capture_output=True).returncode == 0:
                return path
    return None


def test_the_script_is_python_3_8_syntax() -> None:
    """Always checked, whatever interpreters this machine has (the run below needs one)."""
    ast.parse(CAST.read_text(), feature_version=(3, 8))


async def test_the_script_runs_on_the_oldest_python_a_runner_may_have(live: Live) -> None:
    python = _old_python()
    if python is None:
        pytest.skip("no Python 3.8/3.9 interpreter on this machine")
    await live.allow()
    run = await live.action(python=python)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.outputs["status"] == "succeeded"
