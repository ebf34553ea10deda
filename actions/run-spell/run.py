#!/usr/bin/env python3
"""Run one spell inside a GitHub Actions job (the `run-spell` composite action).

Standard library only: this runs on a stock `ubuntu-24.04` runner with its system `python3`.

Every value reaches this script through environment variables set by the action's `env:` block,
never through `${{ }}` interpolation into the script:

    SPELL_ID           spell id, e.g. ``com.example.hello``
    SPELL_PAYLOAD      the cast input, ONE JSON string that must decode to an object
    SPELL_CAST_ID      the platform's cast id (correlates this run with the cast)
    SPELL_TRACEPARENT  W3C trace context; dropped with a warning when malformed
    SPELL_OUT_DIR      output directory, relative to the workspace (default ``out``)
    SPELL_SPELLS_DIR   where spells live in the repository (default ``spells``)

Entrypoint convention (in the repository that owns the workflow):

    spells/<spell-id>/spell.json   {"execution": {"entrypoint": "main.py"}}  (or a top-level
                                   "entrypoint"); the path is relative to the spell's directory
    spells/<spell-id>/run          used when spell.json names no entrypoint: an executable

``*.py`` entrypoints run with this interpreter (the runner's ``python3``, or the one an earlier
``actions/setup-python`` step put on PATH), ``*.sh`` with ``bash``,
anything else must be executable. The spell runs with the spell directory as working directory,
stdin closed, and these variables set: SPELL_INPUT (path of a file holding the input JSON),
SPELL_OUT (absolute output directory), SPELL_CAST_ID, SPELL_ID and TRACEPARENT. It writes its
results into SPELL_OUT; this script adds ``spell-run.json`` there (cast id, spell, exit code,
duration, SHA-256 of the payload string as received), so the artifact is never empty and the
platform can check that the run saw the input it sent.

Exit status: the spell's own exit status; 2 for a bad request (bad id, payload, missing spell).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

SPELL_ID_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.)){0,127}$")
CAST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
TRACEPARENT_RE = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")
OUT_DIR_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,255}$")
MAX_PAYLOAD_BYTES = 1024 * 1024
RUN_RECORD = "spell-run.json"


class BadRequest(Exception):
    """The dispatch itself is unusable; nothing of the spell ran."""


def _command(kind: str, message: str) -> None:
    """A workflow command (annotation), its data escaped the way the runner expects."""
    data = message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    print(f"::{kind} title=run-spell::{data}", flush=True)


def _fail(message: str) -> NoReturn:
    # The message names what is wrong; it never echoes the payload's values.
    _command("error", message)
    raise SystemExit(2)


JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return JSON_TYPES.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"payload contains {name}, which is not JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise BadRequest(f"payload repeats the key {key!r}")
        obj[key] = value
    return obj


def parse_payload(raw: str) -> dict[str, Any]:
    """Decode the cast input: exactly one JSON object, no duplicate keys, no NaN/Infinity."""
    if len(raw.encode("utf-8")) > MAX_PAYLOAD_BYTES:
        raise BadRequest(f"payload is larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        value = json.loads(
            raw, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise BadRequest(f"payload is not valid JSON ({exc.msg} at char {exc.pos})") from None
    except RecursionError:
        raise BadRequest("payload nests too deeply") from None
    if not isinstance(value, dict):
        raise BadRequest(f"payload must be a JSON object, got {_json_type(value)}")
    return value


def resolve_entrypoint(spells_dir: Path, spell_id: str) -> tuple[list[str], Path]:
    """(argv, working directory) that run the spell, per the convention in the module docstring."""
    spell_dir = (spells_dir / spell_id).resolve()
    root = spells_dir.resolve()
    if not spell_dir.is_relative_to(root) or not spell_dir.is_dir():
        raise BadRequest(f"no spell directory {spells_dir.name}/{spell_id} in this repository")
    entry: Path | None = None
    doc_path = spell_dir / "spell.json"
    if doc_path.is_file():
        try:
            doc = json.loads(doc_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"{spell_id}/spell.json is unreadable: {exc}") from None
        name = None
        if isinstance(doc, dict):
            execution = doc.get("execution")
            if isinstance(execution, dict):
                name = execution.get("entrypoint")
            name = name or doc.get("entrypoint")
        if name is not None:
            if not isinstance(name, str) or not name or Path(name).is_absolute():
                raise BadRequest(f"{spell_id}/spell.json has an invalid entrypoint")
            entry = spell_dir / name
    if entry is None:
        entry = spell_dir / "run"
    entry = entry.resolve()
    if not entry.is_relative_to(spell_dir):
        raise BadRequest(f"the entrypoint of {spell_id} points outside its directory")
    if not entry.is_file():
        raise BadRequest(f"entrypoint {entry.relative_to(spell_dir)} of {spell_id} is missing")
    if entry.suffix == ".py":
        return [sys.executable, str(entry)], spell_dir
    if entry.suffix == ".sh":
        return ["bash", str(entry)], spell_dir
    if not os.access(entry, os.X_OK):
        raise BadRequest(f"entrypoint {entry.name} of {spell_id} is not executable")
    return [str(entry)], spell_dir


def _append_kv(file_var: str, values: dict[str, str]) -> None:
    """Append to $GITHUB_OUTPUT / $GITHUB_ENV with a random heredoc delimiter (no injection)."""
    target = os.environ.get(file_var)
    if not target:
        return
    with open(target, "a", encoding="utf-8") as fh:
        for key, value in values.items():
            delimiter = f"EOF_{secrets.token_hex(16)}"
            fh.write(f"{key}<<{delimiter}\n{value}\n{delimiter}\n")


def main() -> int:
    env = os.environ
    workspace = Path(env.get("GITHUB_WORKSPACE") or Path.cwd())
    try:
        spell_id = env.get("SPELL_ID", "")
        if not SPELL_ID_RE.match(spell_id):
            raise BadRequest(
                "spell must be an id like com.example.hello ([A-Za-z0-9._-], at most 128)"
            )
        cast_id = env.get("SPELL_CAST_ID", "")
        if not CAST_ID_RE.match(cast_id):
            raise BadRequest("cast-id is missing or malformed")
        out_rel = env.get("SPELL_OUT_DIR") or "out"
        if not OUT_DIR_RE.match(out_rel) or ".." in Path(out_rel).parts:
            raise BadRequest("out-dir must be a relative path inside the workspace")
        spells_rel = env.get("SPELL_SPELLS_DIR") or "spells"
        if not OUT_DIR_RE.match(spells_rel) or ".." in Path(spells_rel).parts:
            raise BadRequest("spells-dir must be a relative path inside the workspace")
        raw = env.get("SPELL_PAYLOAD", "")
        parse_payload(raw)
        argv, spell_dir = resolve_entrypoint(workspace / spells_rel, spell_id)
    except BadRequest as exc:
        _fail(str(exc))

    traceparent = env.get("SPELL_TRACEPARENT", "").strip()
    if traceparent and not TRACEPARENT_RE.match(traceparent):
        _command("warning", "traceparent is malformed; dropped")
        traceparent = ""

    out_dir = (workspace / out_rel).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # The input lives outside the workspace, so it is neither uploaded nor committed.
    scratch = Path(env.get("RUNNER_TEMP") or tempfile.gettempdir()) / f"spell-{cast_id}"
    scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
    input_path = scratch / "input.json"
    # Written as received, so the platform can compare input_sha256 with the payload it sent.
    input_bytes = raw.encode("utf-8")
    fd = os.open(input_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(input_bytes)

    exported = {
        "SPELL_INPUT": str(input_path),
        "SPELL_OUT": str(out_dir),
        "SPELL_CAST_ID": cast_id,
        "SPELL_ID": spell_id,
        "TRACEPARENT": traceparent,
    }
    child_env = {k: v for k, v in env.items() if k != "SPELL_PAYLOAD"}
    child_env.update(exported)
    if not traceparent:
        child_env.pop("TRACEPARENT", None)
    # Later steps of the job see the same variables (not the payload itself).
    _append_kv("GITHUB_ENV", exported)

    print(f"::group::spell {spell_id} (cast {cast_id})", flush=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(  # argv: the repository's own spell
            argv, cwd=spell_dir, env=child_env, stdin=subprocess.DEVNULL, check=False
        )
        code = proc.returncode
    except OSError as exc:
        _command("error", f"could not start the spell: {exc}")
        code = 127
    duration_ms = int((time.monotonic() - started) * 1000)
    print("::endgroup::", flush=True)

    record = {
        "cast_id": cast_id,
        "spell": spell_id,
        "exit_code": code,
        "duration_ms": duration_ms,
        "input_sha256": hashlib.sha256(input_bytes).hexdigest(),
        "traceparent": traceparent or None,
        "run_id": env.get("GITHUB_RUN_ID"),
        "run_attempt": env.get("GITHUB_RUN_ATTEMPT"),
        "repository": env.get("GITHUB_REPOSITORY"),
        "sha": env.get("GITHUB_SHA"),
    }
    (out_dir / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _append_kv(
        "GITHUB_OUTPUT",
        {"out-dir": str(out_dir), "input-path": str(input_path), "exit-code": str(code)},
    )
    if code != 0:
        _command("error", f"spell {spell_id} exited with status {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
