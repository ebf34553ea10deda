"""Supply-chain rules for every workflow and action file in this repository.

``tests/contract/test_workflow_files.py`` checks the files we hand to other repositories
(``templates/workflows``, ``actions/*``) in depth; this module holds the rules that apply to all
of them *and* to this repository's own CI (``.github/workflows``, SPEC §11):

- every non-local ``uses:`` is pinned by a full 40-hex commit SHA (docker images by digest), with
  a ``# vX.Y.Z`` comment, and one action is pinned to one commit everywhere (FACTS.md);
- no ``runs-on`` resolves to a ``*-latest`` label; this repository's CI covers exactly the
  pinned ``ubuntu-24.04``, ``windows-2025`` and ``macos-15`` images;
- every workflow has a top-level ``permissions:`` that grants nothing but reads; writes
  (``id-token``, ``attestations``) appear only in jobs that sign or attest, ``contents: write``
  only in the release job that moves the companion Action's major tag (``action-tag``);
- the release workflow makes SPDX and CycloneDX SBOMs, uploads them, attests the wheel with
  cosign keyless and verifies that attestation; CI runs the suite with real services on Linux,
  the unit and contract tiers with ``tests/conftest.py`` on Windows and macOS (never leaving out
  ``test_portable_imports.py``), and casts the example spell with the companion Action
  (``uses: ./``) against a local ``spell serve``, checking its ``status`` output;
- ``actionlint`` and the SchemaStore schema accept ``.github/workflows`` and ``make lint`` runs
  both over it.

Each rule is a function returning the problems it finds, run on the real files (no problem
allowed) and on broken copies (the problem must be found), so a rule cannot pass vacuously.
Only the standard library and PyYAML: this module also runs on the Windows CI runner.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPO_WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
TEMPLATE_WORKFLOWS = sorted((ROOT / "templates" / "workflows").glob("*.y*ml"))
ACTION_FILES = sorted(
    [*(ROOT / "actions").glob("**/action.y*ml"), *ROOT.glob("action.y*ml")],
)
WORKFLOWS = [*REPO_WORKFLOWS, *TEMPLATE_WORKFLOWS]
ALL_FILES = [*WORKFLOWS, *ACTION_FILES]
CI = ROOT / ".github" / "workflows" / "ci.yml"
RELEASE = ROOT / ".github" / "workflows" / "release.yml"
REQUIRE = os.environ.get("SPELL_REQUIRE_SERVICES") == "1"

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
DIGEST_RE = re.compile(r"@sha256:[0-9a-f]{64}$")
# SPEC §11: the runner images this repository's CI is pinned to.
CI_RUNNERS = {"ubuntu-24.04", "windows-2025", "macos-15"}
# FACTS.md, "GitHub Actions to pin" (read from each repository's tags on 2026-11-26).
PINNED = {
    "actions/checkout": ("3d3c42e5aac5ba805825da76410c181273ba90b1", "v7.0.1"),
    "actions/setup-python": ("5fda3b95a4ea91299a34e894583c3862153e4b97", "v7.0.0"),
    "actions/setup-node": ("820762786026740c76f36085b0efc47a31fe5020", "v7.0.0"),
    "actions/cache": ("27d5ce7f107fe9357f9df03efb73ab90386fccae", "v5.0.5"),
    "actions/upload-artifact": ("bbbca2ddaa5d8feaa63e36b76fdaad77386f024f", "v7.0.0"),
    "actions/download-artifact": ("3e5f45b2cfb9172054b4087a40e8e0b5a5461e7c", "v8.0.1"),
    "anchore/sbom-action": ("e22c389904149dbc22b58101806040fa8d37a610", "v0.24.0"),
    "sigstore/cosign-installer": ("6f9f17788090df1f26f669e9d70d6ae9567deba6", "v4.1.2"),
    "actions/attest-build-provenance": ("a2bbfa25375fe432b6a289bc6b6cd05ecd0c4c32", "v4.1.0"),
}
# The platform's own actions as other repositories reference them from the templates: OWNER
# and a zero SHA are placeholders the installer replaces (see templates/workflows/spell-run.yml).
PLATFORM_PREFIX = "OWNER/spell-platform"
# Permissions a job may be granted for signing: the OIDC token and GitHub's attestation store.
SIGNING_WRITES = {"id-token", "attestations"}
# The release workflow runs on full version tags only: moving the major tag (`v1`) to the
# stamped Action must never start another release.
VERSION_TAGS = "v[0-9]+.[0-9]+.[0-9]+"
PUBLIC_URL_VAR = "${{ vars.SPELL_PUBLIC_API_URL }}"
GITHUB_OIDC_ISSUER = "https://token.actions.githubusercontent.com"


def skip_or_fail(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason} (SPELL_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with the dev extras
        skip_or_fail("PyYAML is not installed")
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict), f"{path} is not a YAML mapping"
    return doc


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 (PyYAML) reads the bare key `on` as the boolean True.
    on = workflow.get("on", workflow.get(True))
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    assert isinstance(on, dict), "`on:` must be a string, list or mapping"
    return on


def steps_of(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(job id or "action", step) for every step of a workflow or a composite action."""
    if "jobs" in doc:
        for job_id, job in doc["jobs"].items():
            for step in job.get("steps", []):
                yield job_id, step
    else:
        for step in doc.get("runs", {}).get("steps", []):
            yield "action", step


def uses_refs(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, uses) for every step-level and job-level (reusable workflow) `uses:`."""
    for job_id, step in steps_of(doc):
        if "uses" in step:
            yield job_id, str(step["uses"])
    for job_id, job in doc.get("jobs", {}).items():
        if "uses" in job:
            yield job_id, str(job["uses"])


# ============================================================================ the rules


def pinning_problems(text: str, doc: dict[str, Any]) -> list[str]:
    problems = []
    lines = text.splitlines()
    for where, uses in uses_refs(doc):
        if uses.startswith("./"):
            continue  # an action of the same repository, at the same commit
        if uses.startswith("docker://"):
            if not DIGEST_RE.search(uses):
                problems.append(f"{where}: {uses} is not pinned by a sha256 digest")
            continue
        name, _, ref = uses.partition("@")
        if not SHA_RE.match(ref):
            problems.append(f"{where}: {uses} is not pinned to a full commit SHA")
            continue
        line = next((x for x in lines if re.search(rf"uses:\s+{re.escape(uses)}(\s|$)", x)), "")
        tag = re.search(r"#\s*(v\S+)\s*$", line)
        if not tag:
            problems.append(f"{where}: {uses} needs its release as a `# vX.Y.Z` comment")
            continue
        owner_repo = "/".join(name.split("/")[:2])
        if owner_repo in PINNED:
            if (ref, tag.group(1)) != PINNED[owner_repo]:
                problems.append(f"{where}: {uses} # {tag.group(1)} differs from FACTS.md")
        elif owner_repo == PLATFORM_PREFIX:
            if ref != "0" * 40:
                problems.append(f"{where}: {uses}: the platform's own action is a placeholder")
        else:
            problems.append(f"{where}: {uses} is not in the pinned table (FACTS.md)")
    return problems


def runner_labels(job: dict[str, Any]) -> list[str]:
    """The labels a job can run on, with `${{ matrix.X }}` expanded from its strategy."""
    runs_on = job.get("runs-on")
    if runs_on is None:
        return []  # a job that calls a reusable workflow
    if isinstance(runs_on, dict):
        runs_on = runs_on.get("labels", [])
    raw = runs_on if isinstance(runs_on, list) else [runs_on]
    matrix = job.get("strategy", {}).get("matrix", {})
    labels: list[str] = []
    for label in map(str, raw):
        m = re.fullmatch(r"\$\{\{\s*matrix\.([A-Za-z0-9_-]+)\s*\}\}", label)
        if m is None:
            labels.append(label)
            continue
        key = m.group(1)
        values = list(matrix.get(key, [])) + [
            inc[key] for inc in matrix.get("include", []) if key in inc
        ]
        labels += [str(v) for v in values] or [label]
    return labels


def runner_problems(doc: dict[str, Any], allowed: set[str] | None) -> list[str]:
    problems = []
    for job_id, job in doc.get("jobs", {}).items():
        for label in runner_labels(job):
            if label.endswith("-latest"):
                problems.append(f"{job_id}: runs-on {label} is not pinned")
            elif "${{" in label:
                problems.append(f"{job_id}: runs-on {label} cannot be resolved")
            elif allowed is not None and label not in allowed:
                problems.append(f"{job_id}: runs-on {label} is not one of {sorted(allowed)}")
    return problems


def signs(job: dict[str, Any]) -> bool:
    """Does the job sign or attest (cosign, or GitHub's attest actions)?"""
    for step in job.get("steps", []):
        uses = str(step.get("uses", ""))
        if uses.startswith(("actions/attest-build-provenance@", "actions/attest@")):
            return True
        if re.search(r"\bcosign\s+(sign|sign-blob|attest|attest-blob)\b", str(step.get("run"))):
            return True
    return False


def moves_tags(job: dict[str, Any]) -> bool:
    """Does the job push tags (the release's `action-tag` job moving `v1`)?"""
    return any(
        re.search(r"\bgit\s+push\b[^\n]*\brefs/tags/", str(step.get("run", "")))
        for step in job.get("steps", [])
    )


def permission_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    if "permissions" not in doc:
        problems.append("no top-level `permissions:` (the default token may be read-write)")
    top = doc.get("permissions")
    scopes: list[tuple[str, Any, dict[str, Any] | None]] = [("top level", top, None)]
    scopes += [(job_id, job.get("permissions"), job) for job_id, job in doc["jobs"].items()]
    for where, perms, job in scopes:
        if perms is None:
            continue
        if not isinstance(perms, dict):
            problems.append(f"{where}: permissions {perms!r} must list each scope")
            continue
        for scope, level in perms.items():
            if level in ("read", "none"):
                continue
            if job is None:
                problems.append(f"top level grants {scope}: {level}; grant writes per job")
            elif scope == "contents" and level == "write" and moves_tags(job) and not signs(job):
                continue  # checked in depth by action_tag_problems
            elif scope not in SIGNING_WRITES:
                problems.append(f"{where}: {scope}: {level} is not needed here")
            elif not signs(job):
                problems.append(
                    f"{where}: {scope}: {level} in a job that neither signs nor attests"
                )
    return problems


def run_scripts(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for where, step in steps_of(doc):
        if "run" in step:
            yield where, str(step["run"])


def injection_problems(doc: dict[str, Any]) -> list[str]:
    return [
        f"{where}: `${{{{` inside run: (pass values through env:)"
        for where, script in run_scripts(doc)
        if "${{" in script
    ]


def checkout_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    for where, step in steps_of(doc):
        persist = (step.get("with") or {}).get("persist-credentials")
        if str(step.get("uses", "")).startswith("actions/checkout@") and persist is not False:
            problems.append(f"{where}: checkout must set persist-credentials: false")
    if "jobs" in doc and "pull_request_target" in triggers(doc):
        problems.append("pull_request_target runs fork code with a privileged token")
    return problems


def release_problems(doc: dict[str, Any]) -> list[str]:
    """SBOMs in both formats uploaded, a keyless cosign attestation of the wheel, verified."""
    problems = []
    jobs: dict[str, Any] = doc["jobs"]
    on = triggers(doc)
    if "workflow_dispatch" not in on or VERSION_TAGS not in (on.get("push") or {}).get("tags", []):
        problems.append(f"release must run on `{VERSION_TAGS}` tags and workflow_dispatch")
    sboms: dict[str, str] = {}
    uploaded: list[str] = []
    for _, step in steps_of(doc):
        uses = str(step.get("uses", ""))
        with_ = step.get("with") or {}
        if uses.startswith("anchore/sbom-action@"):
            sboms[str(with_.get("format"))] = str(with_.get("output-file", ""))
        if uses.startswith("actions/upload-artifact@"):
            uploaded.append(str(with_.get("path", "")))
    for fmt in ("spdx-json", "cyclonedx-json"):
        out = sboms.get(fmt)
        if out is None:
            problems.append(f"no anchore/sbom-action step with format: {fmt}")
        elif not out or not any(out.startswith(p.rstrip("/") + "/") or out == p for p in uploaded):
            problems.append(f"the {fmt} SBOM ({out or 'no output-file'}) is not uploaded")

    attest = [(j, s) for j, s in steps_of(doc) if re.search(r"cosign\s+attest", str(s.get("run")))]
    verify = [
        (j, s)
        for j, s in steps_of(doc)
        if re.search(r"cosign\s+verify-(blob-)?attestation", str(s.get("run")))
    ]
    if not attest:
        problems.append("no `cosign attest`/`attest-blob` step")
        return problems
    if not verify:
        problems.append("no `cosign verify-blob-attestation` step")
        return problems
    (attest_job, attest_step), (verify_job, verify_step) = attest[0], verify[0]
    a, v = str(attest_step["run"]), str(verify_step["run"])
    if re.search(r"--key\b", a):
        problems.append("the attestation must be keyless (no --key)")
    if "--bundle" not in a or "--bundle" not in v:
        problems.append("attest and verify must write/read a Sigstore bundle (--bundle)")
    type_a = re.search(r"--type[ =](\S+)", a)
    type_v = re.search(r"--type[ =](\S+)", v)
    if type_a is None or type_v is None or type_a.group(1) != type_v.group(1):
        problems.append("verify must check the same predicate --type the attestation has")
    if ".whl" not in a:
        problems.append("the attested blob must be the wheel")
    if GITHUB_OIDC_ISSUER not in v or not re.search(r"--certificate-identity(-regexp)?\b", v):
        problems.append("verify must pin the certificate identity and GitHub's OIDC issuer")
    if "--insecure-ignore-tlog" in v or "--insecure-ignore-sct" in v:
        problems.append("verify must not skip the transparency log")
    perms = jobs[attest_job].get("permissions") or {}
    if perms.get("id-token") != "write":
        problems.append(f"{attest_job}: keyless signing needs `id-token: write` on its job")
    steps = jobs[attest_job]["steps"]
    if verify_job != attest_job or steps.index(verify_step) < steps.index(attest_step):
        problems.append("the verify step must follow the attest step in the same job")
    installer = [
        s for s in steps if str(s.get("uses", "")).startswith("sigstore/cosign-installer@")
    ]
    if not installer or steps.index(installer[0]) > steps.index(attest_step):
        problems.append("sigstore/cosign-installer must run before cosign")
    return problems


def action_tag_problems(doc: dict[str, Any]) -> list[str]:
    """The release's `action-tag` job: after the attestation, on pushed version tags only, the
    one job with `contents: write`; it refuses an empty SPELL_PUBLIC_API_URL, stamps it into
    action.yml with actions/cast/stamp.py, commits as github-actions[bot] and force-moves the
    major tag, with the job's token passed through `env:` (checkout persists none)."""
    problems = []
    jobs: dict[str, Any] = doc["jobs"]
    tags = (triggers(doc).get("push") or {}).get("tags", [])
    if tags != [VERSION_TAGS]:
        problems.append(
            f"push.tags must be exactly [{VERSION_TAGS!r}], not {tags}: moving the major tag "
            "must never start a release"
        )
    writers = sorted(
        job_id
        for job_id, job in jobs.items()
        if (job.get("permissions") or {}).get("contents") == "write"
    )
    if writers != ["action-tag"]:
        problems.append(f"contents: write in {writers}: only action-tag may have it")
    job = jobs.get("action-tag")
    if job is None:
        return [*problems, "no `action-tag` job (stamps action.yml, moves the major tag)"]
    needs = job.get("needs", [])
    if "attest" not in ([needs] if isinstance(needs, str) else needs):
        problems.append("action-tag: must need attest (release the Action after the wheel)")
    condition = re.sub(r"\s+", " ", str(job.get("if", "")))
    if (
        "github.event_name == 'push'" not in condition
        or "github.ref_type == 'tag'" not in condition
    ):
        problems.append("action-tag: only for pushed tags (if: event push and ref_type tag)")
    if (job.get("permissions") or {}) != {"contents": "write"}:
        problems.append("action-tag: permissions must be exactly contents: write")
    steps: list[dict[str, Any]] = job.get("steps", [])
    checkout = [s for s in steps if str(s.get("uses", "")).startswith("actions/checkout@")]
    if not checkout or not SHA_RE.match(str(checkout[0]["uses"]).partition("@")[2]):
        problems.append("action-tag: checkout pinned to a commit SHA")

    def env_of(step: dict[str, Any]) -> dict[str, str]:
        return {k: str(v) for k, v in (step.get("env") or {}).items()}

    def var_for(step: dict[str, Any], value: str) -> str | None:
        return next((k for k, v in env_of(step).items() if v.replace(" ", "") == value), None)

    url_var = PUBLIC_URL_VAR.replace(" ", "")
    guard = next(
        (
            i
            for i, s in enumerate(steps)
            if (name := var_for(s, url_var))
            and re.search(rf'\[ -z "\${name}" \]', str(s.get("run", "")))
            and "::error" in str(s.get("run", ""))
            and re.search(r"^\s*exit 1\s*$", str(s.get("run", "")), re.MULTILINE)
        ),
        None,
    )
    stamp = next(
        (
            i
            for i, s in enumerate(steps)
            if (name := var_for(s, url_var))
            and re.search(
                rf'actions/cast/stamp\.py --api-url "\${name}"(?: --file action\.yml)?\s*$',
                str(s.get("run", "")),
                re.MULTILINE,
            )
        ),
        None,
    )
    if guard is None:
        problems.append(
            "action-tag: no step fails with ::error:: when SPELL_PUBLIC_API_URL is empty"
        )
    if stamp is None:
        problems.append("action-tag: actions/cast/stamp.py must stamp SPELL_PUBLIC_API_URL")
        return problems
    if guard is not None and guard > stamp:
        problems.append("action-tag: check SPELL_PUBLIC_API_URL before stamping")
    if checkout and steps.index(checkout[0]) > stamp:
        problems.append("action-tag: checkout before stamping")
    run = str(steps[stamp]["run"])
    after = run[run.index("actions/cast/stamp.py") :]
    for pattern, what in [
        (r'git config user\.name "github-actions\[bot\]"', "commit as github-actions[bot]"),
        (r'git commit\b[^\n]*-m "action: \$TAG defaults to \$\w+"', "commit message"),
        (r'git tag --force "\$major"', "move the major tag"),
        (r'git push --force origin "refs/tags/\$major', "force-push the major tag"),
    ]:
        if not re.search(pattern, after):
            problems.append(f"action-tag: {what} after stamping")
    if not re.search(r"\^v\(\[0-9\]\+\)", run) or 'major="v${BASH_REMATCH[1]}"' not in run:
        problems.append("action-tag: the major tag comes from the vX.Y.Z tag (v1 for v1.4.2)")
    token = var_for(steps[stamp], "${{github.token}}") or var_for(
        steps[stamp], "${{secrets.GITHUB_TOKEN}}"
    )
    if token is None or f"${token}" not in run:
        problems.append("action-tag: push with the job's token passed through env:")
    return problems


#: Tests the Windows and macOS jobs must never leave out: they are what keeps the package
#: importable there and the workflow rules honest on every OS.
PORTABLE_MUST_RUN = ("tests/unit/test_portable_imports.py", "tests/unit/test_repo_workflows.py")


def portable_problems(doc: dict[str, Any]) -> list[str]:
    """Jobs on a non-Linux image run the unit and contract tiers with tests/conftest.py."""
    problems = []
    for job_id, job in doc["jobs"].items():
        if not any(not x.startswith("ubuntu") for x in runner_labels(job)):
            continue
        runs = [
            str(s.get("run", "")) for s in job.get("steps", []) if "pytest" in str(s.get("run"))
        ]
        if not runs:
            problems.append(f"{job_id}: runs no tests")
        for run in runs:
            if "--noconftest" in run:
                problems.append(f"{job_id}: pytest --noconftest (tests/conftest.py must load)")
            if not re.search(r"\btests/unit\b", run) or not re.search(r"\btests/contract\b", run):
                problems.append(f"{job_id}: every test step runs tests/unit and tests/contract")
            for name in PORTABLE_MUST_RUN:
                if re.search(rf"--(ignore|deselect)[= ]{re.escape(name)}", run):
                    problems.append(f"{job_id}: leaves out {name}")
    return problems


def smoke_problems(doc: dict[str, Any]) -> list[str]:
    """A Linux job casts a published spell on a local `spell serve` with the companion Action
    (``uses: ./``) and checks that its ``status`` output is ``succeeded``."""
    for job_id, job in doc["jobs"].items():
        steps = job.get("steps", [])
        action = [i for i, s in enumerate(steps) if s.get("uses") == "./"]
        if not action:
            continue
        problems = []
        i = action[0]
        step = steps[i]
        before = "\n".join(str(s.get("run", "")) for s in steps[:i])
        after = steps[i + 1 :]
        if "ubuntu-24.04" not in runner_labels(job):
            problems.append(f"{job_id}: the smoke job needs bubblewrap: run it on ubuntu-24.04")
        if not re.search(r"^\s*nohup spell serve\b", before, re.MULTILINE):
            problems.append(f"{job_id}: `spell serve` must be started before the Action")
        if "make sandbox" not in before and "bubblewrap" not in before:
            problems.append(f"{job_id}: bubblewrap must be installed")
        if not re.search(r"\bspell publish templates/spells/hello\b", before):
            problems.append(f"{job_id}: the example spell must be published before the Action")
        with_ = step.get("with") or {}
        if with_.get("spell") != "com.example.hello" or "127.0.0.1" not in str(
            with_.get("api-url")
        ):
            problems.append(f"{job_id}: the Action must cast com.example.hello on 127.0.0.1")
        if not re.fullmatch(r"\$\{\{ steps\.[\w-]+\.outputs\.[\w-]+ \}\}", str(with_.get("token"))):
            problems.append(f"{job_id}: the token must come from an earlier step's output")
        cast_id = step.get("id")
        checks = [
            s
            for s in after
            if cast_id
            and any(
                f"steps.{cast_id}.outputs.status" in str(v) for v in (s.get("env") or {}).values()
            )
            and re.search(r"\bsucceeded\b", str(s.get("run", "")))
        ]
        if not checks:
            problems.append(f"{job_id}: a later step must check the Action's status == succeeded")
        return problems
    return ["no job runs the companion Action (`uses: ./`) against a local platform"]


def ci_problems(doc: dict[str, Any]) -> list[str]:
    """All three runner images; the Linux job runs everything against real services."""
    problems = [*portable_problems(doc), *smoke_problems(doc)]
    on = triggers(doc)
    if "push" not in on or "pull_request" not in on:
        problems.append("CI must run on push and pull_request")
    jobs: dict[str, Any] = doc["jobs"]
    every_script = "\n".join(str(s.get("run", "")) for _, s in steps_of(doc))
    if not re.search(r"^\s*make lint\s*$", every_script, re.MULTILINE):
        problems.append("no job runs `make lint` (ruff, mypy, actionlint, check-jsonschema)")
    covered = {label for job in jobs.values() for label in runner_labels(job)}
    if CI_RUNNERS - covered:
        problems.append(f"CI misses {sorted(CI_RUNNERS - covered)}")
    linux = [
        (job_id, job)
        for job_id, job in jobs.items()
        if "ubuntu-24.04" in runner_labels(job) and "postgres" in (job.get("services") or {})
    ]
    if not linux:
        problems.append("no ubuntu-24.04 job with a PostgreSQL service container")
        return problems
    job_id, job = linux[0]
    env = {**(doc.get("env") or {}), **(job.get("env") or {})}
    if str(env.get("SPELL_REQUIRE_SERVICES")) != "1":
        problems.append(f"{job_id}: SPELL_REQUIRE_SERVICES=1 must make missing services fail")
    scripts = "\n".join(str(s.get("run", "")) for s in job.get("steps", []))
    if not re.search(r"nats-server\b.*\s-js\b", scripts):
        problems.append(f"{job_id}: NATS must be started with JetStream (-js)")
    if "make sandbox" not in scripts and "bubblewrap" not in scripts:
        problems.append(f"{job_id}: bubblewrap must be installed")
    db_passes = [
        s
        for s in job.get("steps", [])
        if "pytest" in str(s.get("run", ""))
        and "SPELL_TEST_DATABASE_URL" in {**env, **(s.get("env") or {})}
    ]
    sqlite_passes = [
        s
        for s in job.get("steps", [])
        if "pytest" in str(s.get("run", ""))
        and "SPELL_TEST_DATABASE_URL" not in {**env, **(s.get("env") or {})}
    ]
    if not db_passes or not sqlite_passes:
        problems.append(f"{job_id}: the suite must run on SQLite and on PostgreSQL")
    for other_id, other in jobs.items():
        if other_id == job_id:
            continue
        other_env = {**(doc.get("env") or {}), **(other.get("env") or {})}
        non_linux = [x for x in runner_labels(other) if not x.startswith("ubuntu")]
        if non_linux and "SPELL_REQUIRE_SERVICES" in other_env:
            problems.append(
                f"{other_id}: SPELL_REQUIRE_SERVICES on {non_linux} (no Linux services)"
            )
    return problems


# ============================================================================ on the real files


def test_the_files_exist() -> None:
    names = {p.name for p in REPO_WORKFLOWS}
    assert {"ci.yml", "release.yml"} <= names, names
    assert TEMPLATE_WORKFLOWS and ACTION_FILES


@pytest.mark.parametrize("path", ALL_FILES, ids=rel)
def test_every_action_is_pinned_to_a_commit(path: Path) -> None:
    doc = load_yaml(path)
    assert pinning_problems(path.read_text(encoding="utf-8"), doc) == []


def test_one_action_one_commit_across_the_repository() -> None:
    assert sum(len(list(uses_refs(load_yaml(p)))) for p in ALL_FILES) > 10
    seen: dict[str, set[str]] = {}
    for path in ALL_FILES:
        for _, uses in uses_refs(load_yaml(path)):
            name, _, ref = uses.partition("@")
            if not uses.startswith(("./", "docker://")):
                seen.setdefault(name, set()).add(ref)
    assert {name: refs for name, refs in seen.items() if len(refs) > 1} == {}


@pytest.mark.parametrize("path", WORKFLOWS, ids=rel)
def test_no_runner_is_latest(path: Path) -> None:
    allowed = CI_RUNNERS if path in REPO_WORKFLOWS else None
    assert runner_problems(load_yaml(path), allowed) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=rel)
def test_permissions_are_minimal(path: Path) -> None:
    assert permission_problems(load_yaml(path)) == []


@pytest.mark.parametrize("path", REPO_WORKFLOWS, ids=rel)
def test_no_expression_inside_run_and_no_persisted_token(path: Path) -> None:
    doc = load_yaml(path)
    assert list(run_scripts(doc))
    assert injection_problems(doc) == []
    assert checkout_problems(doc) == []


def test_release_makes_sboms_and_a_verified_keyless_attestation() -> None:
    assert release_problems(load_yaml(RELEASE)) == []


def test_release_moves_the_actions_major_tag_to_a_stamped_commit() -> None:
    assert action_tag_problems(load_yaml(RELEASE)) == []
    for path in REPO_WORKFLOWS:  # no other workflow may write to the repository
        if path != RELEASE:
            assert not [
                j
                for j, job in load_yaml(path)["jobs"].items()
                if (job.get("permissions") or {}).get("contents") == "write"
            ], rel(path)


def test_only_the_signing_job_can_mint_an_oidc_token() -> None:
    for path in REPO_WORKFLOWS:
        doc = load_yaml(path)
        for job_id, job in doc["jobs"].items():
            has = (job.get("permissions") or {}).get("id-token") == "write"
            assert has == signs(job), f"{rel(path)} {job_id}: id-token={has}, signs={signs(job)}"
    jobs = load_yaml(RELEASE)["jobs"]
    assert any(signs(job) for job in jobs.values())
    assert any(not signs(job) for job in jobs.values()), "build apart from signing"


def test_ci_runs_everything_on_three_pinned_images() -> None:
    assert ci_problems(load_yaml(CI)) == []


def test_make_lint_checks_this_repositorys_workflows() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    target = re.search(r"^lint:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert target, "no lint target"
    recipe = target.group(1)
    for tool, schema in (("actionlint", None), ("check-jsonschema", "vendor.github-workflows")):
        line = next((x for x in recipe.splitlines() if tool in x and (schema or "") in x), "")
        assert ".github/workflows/" in line and "templates/workflows/" in line, (tool, recipe)
    assert re.search(r"vendor\.github-actions .*actions/\*/action\.yml", recipe)


def tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        skip_or_fail(f"{name} is not installed (pip install -e '.[dev]')")
    assert found
    return found


def test_actionlint_accepts_this_repositorys_workflows() -> None:
    proc = subprocess.run(
        [tool("actionlint"), "-no-color", "-oneline", *map(str, REPO_WORKFLOWS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schemastore_accepts_this_repositorys_workflows() -> None:
    proc = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows"]
        + [str(p) for p in REPO_WORKFLOWS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ============================================================================ the rules have teeth


def _release() -> dict[str, Any]:
    return copy.deepcopy(load_yaml(RELEASE))


def _ci() -> dict[str, Any]:
    return copy.deepcopy(load_yaml(CI))


def _step(doc: dict[str, Any], pattern: str) -> dict[str, Any]:
    return next(s for _, s in steps_of(doc) if re.search(pattern, str(s.get("uses") or s["run"])))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("actions/checkout@v7 # v7.0.1", "not pinned to a full commit SHA"),
        ("actions/checkout@main", "not pinned to a full commit SHA"),
        ("actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1", "`# vX.Y.Z` comment"),
        ("actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1 # v6.0.0", "FACTS.md"),
        ("actions/checkout@" + "a" * 40 + " # v7.0.1", "differs from FACTS.md"),
        ("someone/thing@" + "b" * 40 + " # v1.0.0", "not in the pinned table"),
        ("docker://alpine:3.20", "sha256 digest"),
        ("OWNER/spell-platform/actions/run-spell@" + "c" * 40 + " # v1", "placeholder"),
    ],
)
def test_pinning_rule_catches(line: str, problem: str) -> None:
    text = f"jobs:\n  j:\n    steps:\n      - uses: {line}\n"
    doc = {"jobs": {"j": {"steps": [{"uses": line.split(" #")[0]}]}}}
    problems = pinning_problems(text, doc)
    assert len(problems) == 1 and problem in problems[0], problems


def test_pinning_rule_accepts_local_and_digest_refs() -> None:
    ok = ["./actions/run-spell", "docker://alpine@sha256:" + "d" * 64]
    doc = {"jobs": {"j": {"steps": [{"uses": u} for u in ok]}}}
    assert pinning_problems("", doc) == []


def test_runner_rule_catches_latest_also_inside_a_matrix() -> None:
    ci = _ci()
    ci["jobs"]["test-portable"]["strategy"]["matrix"]["os"].append("macos-latest")
    assert runner_problems(ci, CI_RUNNERS) == ["test-portable: runs-on macos-latest is not pinned"]
    ci = _ci()
    ci["jobs"]["lint"]["runs-on"] = "ubuntu-22.04"
    assert "not one of" in runner_problems(ci, CI_RUNNERS)[0]
    ci = _ci()
    ci["jobs"]["lint"]["runs-on"] = "${{ inputs.runner }}"
    assert "cannot be resolved" in runner_problems(ci, CI_RUNNERS)[0]
    ci = _ci()
    ci["jobs"]["test-portable"]["strategy"]["matrix"]["os"].remove("windows-2025")
    assert ci_problems(ci) == ["CI misses ['windows-2025']"]


def test_permission_rule_catches() -> None:
    rel_ = _release()
    del rel_["permissions"]
    assert "no top-level" in permission_problems(rel_)[0]
    rel_ = _release()
    rel_["permissions"] = {"contents": "read", "id-token": "write"}
    assert "grant writes per job" in permission_problems(rel_)[0]
    rel_ = _release()
    rel_["jobs"]["build"]["permissions"] = {"contents": "read", "id-token": "write"}
    assert "neither signs nor attests" in permission_problems(rel_)[0]
    rel_ = _release()
    rel_["jobs"]["attest"]["permissions"]["contents"] = "write"
    assert "contents: write is not needed" in permission_problems(rel_)[0]
    rel_ = _release()
    rel_["permissions"] = "write-all"
    assert "must list each scope" in permission_problems(rel_)[0]


def test_injection_and_checkout_rules_catch() -> None:
    ci = _ci()
    _step(ci, r"make lint")["run"] = "echo ${{ github.event.pull_request.title }}"
    assert len(injection_problems(ci)) == 1
    ci = _ci()
    del _step(ci, r"actions/checkout@")["with"]
    assert "persist-credentials" in checkout_problems(ci)[0]
    ci = _ci()
    triggers(ci)["pull_request_target"] = None
    assert "pull_request_target" in checkout_problems(ci)[-1]


@pytest.mark.parametrize(
    ("break_it", "problem"),
    [
        (
            lambda d: d["jobs"]["build"]["steps"].remove(_step(d, r"anchore/sbom-action@")),
            "format: spdx-json",
        ),
        (
            lambda d: [
                s["with"].update(format="table")
                for _, s in steps_of(d)
                if str(s.get("uses", "")).startswith("anchore/")
                and s["with"]["format"] == "cyclonedx-json"
            ],
            "format: cyclonedx-json",
        ),
        (
            lambda d: [
                s["with"].update(path="dist/")
                for _, s in steps_of(d)
                if str(s.get("uses", "")).startswith("actions/upload-artifact@")
                and s["with"]["name"] == "sbom"
            ],
            "is not uploaded",
        ),
        (
            lambda d: d["jobs"]["attest"]["steps"].remove(
                _step(d, r"cosign\s+verify-blob-attestation")
            ),
            "no `cosign verify-blob-attestation` step",
        ),
        (
            lambda d: _step(d, r"cosign\s+attest-blob").update(
                run=_step(d, r"cosign\s+attest-blob")["run"].replace("--yes", "--yes --key k")
            ),
            "keyless",
        ),
        (
            lambda d: _step(d, r"verify-blob-attestation").update(
                run=_step(d, r"verify-blob-attestation")["run"].replace(
                    GITHUB_OIDC_ISSUER, "https://example.com"
                )
            ),
            "OIDC issuer",
        ),
        (
            lambda d: _step(d, r"verify-blob-attestation").update(
                run=_step(d, r"verify-blob-attestation")["run"].replace(
                    "--type spdxjson", "--type cyclonedx"
                )
            ),
            "same predicate --type",
        ),
        (
            lambda d: _step(d, r"verify-blob-attestation").update(
                run=_step(d, r"verify-blob-attestation")["run"] + " --insecure-ignore-tlog"
            ),
            "transparency log",
        ),
        (lambda d: d["jobs"]["attest"].pop("permissions"), "id-token: write"),
        (
            lambda d: d["jobs"]["attest"]["steps"].reverse(),
            "must follow the attest step",
        ),
        (
            lambda d: (d.pop(True, None), d.update(on={"push": {"branches": ["main"]}})),
            f"`{VERSION_TAGS}` tags",
        ),
    ],
    ids=[
        "no-spdx",
        "no-cyclonedx",
        "sbom-not-uploaded",
        "no-verify",
        "keyed",
        "wrong-issuer",
        "type-mismatch",
        "skip-tlog",
        "no-id-token",
        "verify-before-attest",
        "no-tag-trigger",
    ],
)
def test_release_rule_catches(break_it: Any, problem: str) -> None:
    doc = _release()
    break_it(doc)
    problems = release_problems(doc)
    assert any(problem in p for p in problems), problems


def _action_tag_step(doc: dict[str, Any], pattern: str) -> dict[str, Any]:
    steps = doc["jobs"]["action-tag"]["steps"]
    return next(s for s in steps if re.search(pattern, str(s.get("run", ""))))


def _edit_run(doc: dict[str, Any], pattern: str, old: str, new: str) -> None:
    step = _action_tag_step(doc, pattern)
    assert old in step["run"], old
    step["run"] = step["run"].replace(old, new)


@pytest.mark.parametrize(
    ("break_it", "problem"),
    [
        (lambda d: d["on"]["push"].update(tags=["v*"]), "push.tags must be exactly"),
        (
            lambda d: d["on"]["push"]["tags"].append("v[0-9]+"),
            "push.tags must be exactly",
        ),
        (lambda d: d["jobs"].pop("action-tag"), "no `action-tag` job"),
        (
            lambda d: d["jobs"]["build"].update(permissions={"contents": "write"}),
            "only action-tag may have it",
        ),
        (lambda d: d["jobs"]["action-tag"].pop("needs"), "must need attest"),
        (lambda d: d["jobs"]["action-tag"].pop("if"), "only for pushed tags"),
        (
            lambda d: d["jobs"]["action-tag"]["permissions"].update({"actions": "write"}),
            "exactly contents: write",
        ),
        (
            lambda d: d["jobs"]["action-tag"]["steps"].remove(
                _action_tag_step(d, r"::error title=SPELL_PUBLIC_API_URL")
            ),
            "when SPELL_PUBLIC_API_URL is empty",
        ),
        (
            lambda d: _edit_run(d, r"::error title=SPELL_PUBLIC_API_URL", "exit 1", "exit 0"),
            "when SPELL_PUBLIC_API_URL is empty",
        ),
        (
            lambda d: d["jobs"]["action-tag"]["steps"].reverse(),
            "before stamping",
        ),
        (
            lambda d: _edit_run(d, r"stamp\.py", "python3 actions/cast/stamp.py", "true"),
            "must stamp SPELL_PUBLIC_API_URL",
        ),
        (
            lambda d: _action_tag_step(d, r"stamp\.py")["env"].update(
                PUBLIC_API_URL="https://hard.coded.example"
            ),
            "must stamp SPELL_PUBLIC_API_URL",
        ),
        (
            lambda d: _edit_run(d, r"stamp\.py", 'git tag --force "$major"', 'git tag "$major"'),
            "move the major tag",
        ),
        (
            lambda d: _edit_run(d, r"stamp\.py", "git push --force", "git push"),
            "force-push the major tag",
        ),
        (
            lambda d: _edit_run(d, r"stamp\.py", "github-actions[bot]", "release-bot"),
            "github-actions[bot]",
        ),
        (
            lambda d: _action_tag_step(d, r"stamp\.py")["env"].pop("PUSH_TOKEN"),
            "token passed through env",
        ),
        (
            lambda d: [
                s["with"].update({"persist-credentials": True})
                for s in d["jobs"]["action-tag"]["steps"]
                if str(s.get("uses", "")).startswith("actions/checkout@")
            ],
            "persist-credentials: false",
        ),
    ],
    ids=[
        "any-v-tag",
        "extra-tag-pattern",
        "no-job",
        "contents-write-elsewhere",
        "no-needs",
        "no-if",
        "extra-permission",
        "no-url-guard",
        "guard-does-not-fail",
        "guard-after-stamp",
        "no-stamp",
        "hard-coded-url",
        "tag-not-forced",
        "push-not-forced",
        "other-committer",
        "no-token-env",
        "persisted-token",
    ],
)
def test_action_tag_rule_catches(break_it: Any, problem: str) -> None:
    doc = _release()
    doc["on"] = doc.pop(True)  # PyYAML's `on`: an ordinary key for these edits
    break_it(doc)
    problems = [*action_tag_problems(doc), *permission_problems(doc), *checkout_problems(doc)]
    assert any(problem in p for p in problems), problems


def test_contents_write_is_only_for_a_job_that_moves_tags() -> None:
    doc = _release()
    assert permission_problems(doc) == []
    _edit_run(doc, r"stamp\.py", "git push --force origin", "echo")
    assert permission_problems(doc) == ["action-tag: contents: write is not needed here"]


@pytest.mark.parametrize(
    ("break_it", "problem"),
    [
        (lambda d: d["jobs"]["test-linux"]["env"].pop("SPELL_REQUIRE_SERVICES"), "REQUIRE"),
        (lambda d: d["jobs"]["test-linux"].pop("services"), "PostgreSQL service"),
        (
            lambda d: [
                s.update(run=s["run"].replace(" -js", ""))
                for s in d["jobs"]["test-linux"]["steps"]
                if "nats-server" in str(s.get("run", ""))
            ],
            "JetStream",
        ),
        (
            lambda d: [
                s.pop("env")
                for s in d["jobs"]["test-linux"]["steps"]
                if "SPELL_TEST_DATABASE_URL" in (s.get("env") or {})
            ],
            "SQLite and on PostgreSQL",
        ),
        (
            lambda d: d["jobs"]["test-portable"].update(env={"SPELL_REQUIRE_SERVICES": "1"}),
            "no Linux services",
        ),
        (lambda d: d["jobs"].pop("lint"), "make lint"),
        (
            lambda d: [
                s.update(run=s["run"] + " --noconftest")
                for s in d["jobs"]["test-portable"]["steps"]
                if "pytest" in str(s.get("run"))
            ],
            "--noconftest",
        ),
        (
            lambda d: [
                s.update(run=s["run"].replace(" tests/contract", ""))
                for s in d["jobs"]["test-portable"]["steps"]
                if "pytest" in str(s.get("run"))
            ],
            "tests/unit and tests/contract",
        ),
        (
            lambda d: [
                s.update(run=s["run"] + " --ignore=tests/unit/test_portable_imports.py")
                for s in d["jobs"]["test-portable"]["steps"]
                if "Windows" in str(s.get("if"))
            ],
            "leaves out tests/unit/test_portable_imports.py",
        ),
        (lambda d: d["jobs"].pop("action-smoke"), "companion Action"),
        (
            lambda d: d["jobs"]["action-smoke"]["steps"].remove(
                next(
                    s
                    for s in d["jobs"]["action-smoke"]["steps"]
                    if "spell serve" in str(s.get("run"))
                )
            ),
            "`spell serve` must be started",
        ),
        (
            lambda d: [
                s.update(run=s["run"].replace("spell publish templates/spells/hello", "true"))
                for s in d["jobs"]["action-smoke"]["steps"]
                if "spell publish" in str(s.get("run"))
            ],
            "published before",
        ),
        (
            lambda d: next(s for s in d["jobs"]["action-smoke"]["steps"] if s.get("uses") == "./")[
                "with"
            ].update(token="hard-coded"),
            "earlier step's output",
        ),
        (
            lambda d: d["jobs"]["action-smoke"]["steps"].pop(),  # the log step: still fine
            None,
        ),
        (
            lambda d: [
                s.update(run=s["run"].replace("succeeded", "failed"))
                for s in d["jobs"]["action-smoke"]["steps"]
                if "STATUS" in (s.get("env") or {})
            ],
            "status == succeeded",
        ),
        (lambda d: d["jobs"]["action-smoke"].update({"runs-on": "macos-15"}), "ubuntu-24.04"),
    ],
    ids=[
        "not-required",
        "no-postgres",
        "no-jetstream",
        "no-pg-pass",
        "required-on-windows",
        "no-lint",
        "noconftest",
        "no-contract-tier",
        "portable-imports-ignored",
        "no-smoke",
        "no-serve",
        "no-publish",
        "literal-token",
        "smoke-without-log-step",
        "status-unchecked",
        "smoke-not-on-linux",
    ],
)
def test_ci_rule_catches(break_it: Any, problem: str | None) -> None:
    doc = _ci()
    break_it(doc)
    problems = ci_problems(doc)
    if problem is None:  # a harmless change: the rules must not fire on it
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems
