"""``actions/cast/stamp.py``: the platform's public URL stamped into the companion Action.

The release workflow's ``action-tag`` job runs it on the tagged commit (README, "Companion
Action"); the stamped ``action.yml`` is what ``uses: OWNER/spell-platform@v1`` gets. Only the
``SPELL_ACTION_DEFAULT_API_URL`` line of the composite step may change, the URL must pass
``cast.py``'s own check, and ``cast.py`` must prefer the caller's ``api-url`` and
``SPELL_API_URL`` to that stamped default.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ACTION = ROOT / "action.yml"
CAST_DIR = ROOT / "actions" / "cast"
STAMP = CAST_DIR / "stamp.py"
URL = "https://spells.example.com"
LINE = "SPELL_ACTION_DEFAULT_API_URL"


def load(name: str) -> ModuleType:
    """``cast`` or ``stamp`` as the scripts see each other (their directory on sys.path)."""
    sys.path.insert(0, str(CAST_DIR))
    try:
        spec = importlib.util.spec_from_file_location(name, CAST_DIR / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(CAST_DIR))
    return module


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", str(STAMP), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    path = tmp_path / "action.yml"
    shutil.copyfile(ACTION, path)
    return path


def step_env(doc: dict[str, Any]) -> dict[str, Any]:
    steps = doc["runs"]["steps"]
    assert len(steps) == 1
    env: dict[str, Any] = steps[0]["env"]
    return env


# ---------------------------------------------------------------------------- the source tree


def test_the_source_tree_carries_no_url_and_passes_the_input_through() -> None:
    doc = yaml.safe_load(ACTION.read_text(encoding="utf-8"))
    assert doc["inputs"]["api-url"]["default"] == ""
    assert "released tags" in doc["inputs"]["api-url"]["description"]
    env = step_env(doc)
    assert env["SPELL_ACTION_API_URL"] == "${{ inputs.api-url }}"
    assert env[LINE] == ""  # a stamped action.yml must never be committed to the source tree
    assert "actions/cast/cast.py" in doc["runs"]["steps"][0]["run"]


def test_both_scripts_are_python_3_8_syntax() -> None:
    for path in (STAMP, CAST_DIR / "cast.py"):
        ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 8))


# ---------------------------------------------------------------------------- stamping


def test_stamp_round_trip_changes_only_the_one_line(copy: Path) -> None:
    before = copy.read_bytes()
    res = run("--api-url", URL + "/", "--file", str(copy))
    assert res.returncode == 0, res.stderr
    assert f"{LINE} set to {URL}" in res.stdout
    after = copy.read_bytes()
    old_lines, new_lines = before.splitlines(keepends=True), after.splitlines(keepends=True)
    assert len(old_lines) == len(new_lines)
    changed = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
    assert len(changed) == 1, changed
    old, new = changed[0]
    assert old.rstrip(b"\r\n") == f'        {LINE}: ""'.encode()
    assert new == old.replace(b'""', f'"{URL}"'.encode())  # the same line ending too
    old_doc = yaml.safe_load(before.decode())
    new_doc = yaml.safe_load(after.decode())
    assert step_env(new_doc)[LINE] == URL  # normalized as cast.py would (no trailing slash)
    assert new_doc["inputs"]["api-url"]["default"] == ""  # the caller's input stays empty
    step_env(new_doc)[LINE] = ""
    assert new_doc == old_doc


def test_stamping_is_idempotent(copy: Path) -> None:
    assert run("--api-url", URL, "--file", str(copy)).returncode == 0
    once = copy.read_bytes()
    again = run("--api-url", URL, "--file", str(copy))
    assert again.returncode == 0
    assert f"{LINE} already {URL}" in again.stdout
    assert copy.read_bytes() == once
    # Another URL replaces the stamp (it does not add a second one); back again, same bytes.
    assert run("--api-url", "https://other.example.org", "--file", str(copy)).returncode == 0
    assert step_env(yaml.safe_load(copy.read_text()))[LINE] == "https://other.example.org"
    assert run("--api-url", URL, "--file", str(copy)).returncode == 0
    assert copy.read_bytes() == once


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "--api-url is empty"),
        ("http://spells.example.com", "must use https://"),
        ("ftp://spells.example.com", "must be an https:// URL"),
        ("spells.example.com", "must be an https:// URL"),
        ("https://user:secret@spells.example.com", "plain base URL"),
        ("https://spells.example.com/?tenant=1", "plain base URL"),
        ("https://spells.example.com/#x", "plain base URL"),
        ("https://spells.example.com/${{ secrets.TOKEN }}", "only RFC 3986 characters"),
        ('https://spells.example.com/"x', "only RFC 3986 characters"),
        ("https://spells.example.com/a b", "only RFC 3986 characters"),
        ("https://spells.example.com/\\", "only RFC 3986 characters"),
    ],
)
def test_bad_urls_are_refused_and_the_file_is_left_alone(
    copy: Path, url: str, message: str
) -> None:
    before = copy.read_bytes()
    res = run("--api-url", url, "--file", str(copy))
    assert res.returncode == 2, res.stdout
    assert res.stderr.startswith("stamp.py: error: "), res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert copy.read_bytes() == before


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost:9000/", "http://[::1]"])
def test_plain_http_is_accepted_for_localhost_only(copy: Path, url: str) -> None:
    res = run("--api-url", url, "--file", str(copy))
    assert res.returncode == 0, res.stderr
    assert step_env(yaml.safe_load(copy.read_text()))[LINE] == url.rstrip("/")


def test_the_url_check_is_cast_pys_own() -> None:
    stamp = load("stamp")
    cast = load("cast")
    assert "def check_api_url" not in STAMP.read_text(encoding="utf-8")
    assert stamp.check_api_url.__module__ == "cast"
    assert stamp.check_api_url.__code__.co_code == cast.check_api_url.__code__.co_code
    for bad in ("http://example.com", "https://a@example.com", "https://example.com/?x"):
        with pytest.raises(cast.ActionError) as caught:
            cast.check_api_url(bad)
        with pytest.raises(stamp.StampError) as stamped:
            stamp.public_url(bad)
        assert str(stamped.value) == caught.value.message.replace("`api-url`", "--api-url")


def test_a_file_without_the_line_or_with_two_is_refused(tmp_path: Path) -> None:
    text = ACTION.read_text(encoding="utf-8")
    cases = {
        "missing.yml": text.replace(f'        {LINE}: ""\n', ""),
        "twice.yml": text.replace(f'        {LINE}: ""\n', f'        {LINE}: ""\n' * 2),
        "no-input.yml": text.replace("${{ inputs.api-url }}", '""'),
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        res = run("--api-url", URL, "--file", str(path))
        assert res.returncode == 2, (name, res.stdout)
        assert res.stderr.startswith("stamp.py: error: "), res.stderr
        assert path.read_text(encoding="utf-8") == content
    res = run("--api-url", URL, "--file", str(tmp_path / "nowhere.yml"))
    assert res.returncode == 2
    assert "cannot read" in res.stderr


def test_line_endings_quoting_and_comments_are_kept(tmp_path: Path) -> None:
    stamp = load("stamp")
    text = (
        "runs:\r\n  steps:\r\n    - env:\r\n"
        "        SPELL_ACTION_API_URL: ${{ inputs.api-url }}\r\n"
        f"        {LINE}: 'https://old.example.com'   # stamped\r\n"
        "      run: python3 cast.py\r\n"
    )
    new = stamp.stamp_text(text, URL)
    assert new == text.replace("'https://old.example.com'", f'"{URL}"')
    for bare in (
        text.replace("'https://old.example.com'   # stamped", ""),
        text.replace("'https://old.example.com'", ""),
        text.replace(" 'https://old.example.com'", ""),
    ):
        new = stamp.stamp_text(bare, URL)
        assert new.count("\r\n") == text.count("\r\n") and "\n" not in new.replace("\r\n", "")
        assert f'{LINE}: "{URL}"' in " ".join(new.split())
        assert (" # stamped" in new) == (" # stamped" in bare)
        assert yaml.safe_load(new)["runs"]["steps"][0]["env"][LINE] == URL


# ---------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (
            {
                "SPELL_ACTION_API_URL": "https://input.example",
                "SPELL_API_URL": "https://env.example",
                LINE: "https://stamped.example",
            },
            "https://input.example",
        ),
        (
            {"SPELL_API_URL": "https://env.example", LINE: "https://stamped.example"},
            "https://env.example",
        ),
        (
            {"SPELL_ACTION_API_URL": " ", "SPELL_API_URL": "", LINE: "https://stamped.example/"},
            "https://stamped.example",
        ),
    ],
    ids=["input-wins", "env-beats-stamped-default", "stamped-default-last"],
)
def test_cast_prefers_the_callers_url_to_the_stamped_default(
    given: dict[str, str], expected: str
) -> None:
    cast = load("cast")
    inputs = cast.Inputs({"SPELL_ACTION_SPELL": "com.example.hello", **given})
    assert inputs.api_url == expected


def test_without_any_url_cast_says_where_one_comes_from() -> None:
    cast = load("cast")
    with pytest.raises(cast.ActionError) as caught:
        cast.Inputs({"SPELL_ACTION_SPELL": "com.example.hello", LINE: ""})
    assert caught.value.code == "VALIDATION_ERROR" and caught.value.exit_code == 2
    assert "no platform URL" in caught.value.message
    assert "released tags" in caught.value.message
