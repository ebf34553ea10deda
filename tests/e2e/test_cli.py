"""The ``spell`` CLI end to end against a real ``spell serve`` (SQLite + bubblewrap sandbox).

Every step is the command a user types: issue tokens, publish the example spell, cast it and
follow its progress, download its artifact, hit a budget cap, verify (and tamper with) the
audit log. The server runs in its own process on a free port with its own data directory.

Skipped when bubblewrap is missing unless ``SPELL_REQUIRE_SERVICES=1`` (CI), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.sdk import SpellClient

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "templates" / "spells" / "hello"
REQUIRED = os.environ.get("SPELL_REQUIRE_SERVICES") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (SPELL_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def _spell_argv() -> list[str]:
    script = Path(sys.executable).with_name("spell")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli.main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Spell:
    """Runs ``spell …`` with the test's environment."""

    env: dict[str, str]
    api_url: str
    data_dir: Path

    def __call__(
        self, *args: str, token: str | None = None, input: str | None = None, timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if token is not None:
            env["SPELL_TOKEN"] = token
        return subprocess.run(
            [*_spell_argv(), *args],
            env=env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = self(*args, token=token)
        assert proc.returncode == 0, f"spell {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
        return proc


@pytest.fixture(scope="module")
def spell() -> Iterator[Spell]:
    if shutil.which("bwrap") is None:
        _unavailable("bubblewrap (bwrap) is not installed")
    # Not under pytest's tmp dir: that is private (0700) to us, and a server started as root
    # runs spells as an unprivileged uid that must be able to reach the data dir's bundles.
    root = Path(tempfile.mkdtemp(prefix="spell-e2e-"))
    root.chmod(0o755)
    data_dir = root / "data"
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SPELL_") and k not in ("DATABASE_URL", "TOKEN", "API_URL")
    }
    env.update(
        SPELL_DATA_DIR=str(data_dir),
        SPELL_CONFIG=str(root / "client.json"),
        SPELL_API_URL=api_url,
        SPELL_LOG_LEVEL="INFO",
    )
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [*_spell_argv(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    try:
        readiness = _wait_ready(api_url, server, log_path)
        if readiness.get("checks", {}).get("sandbox") != "ok":
            _unavailable(f"the sandbox is not usable here: {readiness}")
        yield Spell(env=env, api_url=api_url, data_dir=data_dir)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        sys.stderr.write(f"--- server log ({log_path}) tail ---\n")
        sys.stderr.write("\n".join(log_path.read_text(errors="replace").splitlines()[-30:]))
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(api_url: str, server: subprocess.Popen[bytes], log_path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"spell serve exited ({server.returncode}):\n{log_path.read_text()}")
        try:
            resp = httpx.get(f"{api_url}/readyz", timeout=2)
            body: dict[str, Any] = resp.json()
            return body
        except (httpx.TransportError, ValueError):
            time.sleep(0.2)
    pytest.fail(f"spell serve did not answer within 60 s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def maker(spell: Spell) -> str:
    return spell.ok("token", "issue", "--account", "acme", "--role", "maker").stdout.strip()


@pytest.fixture(scope="module")
def caster(spell: Spell) -> str:
    return spell.ok("token", "issue", "--account", "bob", "--role", "caster").stdout.strip()


@pytest.fixture(scope="module")
def hello(spell: Spell, maker: str) -> str:
    """The example spell, published (publishing is idempotent)."""
    assert (HELLO / "spell.json").is_file(), "templates/spells/hello is missing"
    proc = spell.ok("publish", str(HELLO), token=maker)
    assert proc.stdout.startswith("published com.example.hello@1.0.0 (digest sha256:")
    return "com.example.hello"


def test_token_issue_prints_only_the_token(spell: Spell) -> None:
    proc = spell.ok("token", "issue", "--account", "acme", "--role", "caster", "--ttl", "120")
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].count(".") == 2  # a JWT and nothing else
    assert proc.stderr.startswith("expires at ")


def test_publish_shows_up_in_the_listing(spell: Spell, hello: str, caster: str) -> None:
    listing = spell.ok("spells", "list", "--json", token=caster)
    ids = [s["id"] for s in json.loads(listing.stdout)["spells"]]
    assert hello in ids
    table = spell.ok("spells", "list", "--catalog", "-q", "hello").stdout
    assert "com.example.hello" in table and "free" in table
    detail = spell.ok("spells", "show", hello, token=caster).stdout
    assert "name: string (required)" in detail


def test_cast_waits_for_the_result_and_the_artifact_holds_hello_txt(
    spell: Spell, hello: str, caster: str, tmp_path: Path
) -> None:
    proc = spell.ok("cast", hello, "-i", "name=world", "--wait", "--timeout", "60", token=caster)
    assert "status:    succeeded" in proc.stdout
    assert "progress: 100% done" in proc.stderr  # plain progress lines when not on a TTY
    url = next(
        line.split(None, 1)[1] for line in proc.stdout.splitlines() if line.startswith("artifact:")
    )

    with SpellClient(spell.api_url, caster) as client:
        saved = client.download(url, tmp_path)
    with zipfile.ZipFile(saved) as zf:
        assert zf.read("hello.txt").decode() == "Hello, world!\n"


def test_a_cast_without_waiting_can_be_followed_with_logs(
    spell: Spell, hello: str, caster: str
) -> None:
    cast_id = spell.ok("cast", hello, "-i", "name=logs", "--no-wait", token=caster).stdout.strip()
    assert cast_id.startswith("c_")
    followed = spell.ok("logs", cast_id, "--follow", token=caster).stdout.splitlines()
    assert followed[-1].endswith("succeeded: cost 0 cents")
    again = spell.ok("logs", cast_id, "--json", token=caster).stdout.splitlines()
    assert [json.loads(line)["seq"] for line in again] == list(range(1, len(again) + 1))


def test_the_same_idempotency_key_gives_the_same_cast(
    spell: Spell, hello: str, caster: str
) -> None:
    args = ("cast", hello, "-i", "name=once", "--idempotency-key", "e2e-key-1", "--no-wait")
    first = spell.ok(*args, token=caster).stdout.strip()
    second = spell.ok(*args, "--json", token=caster)
    body = json.loads(second.stdout)
    assert body["cast_id"] == first and body["replayed"] is True


def test_bad_input_is_refused_with_the_field_named(spell: Spell, hello: str, caster: str) -> None:
    proc = spell("cast", hello, "-i", "name=", token=caster)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: VALIDATION_ERROR: /input/name")
    assert "Traceback" not in proc.stderr


def test_a_zero_cap_refuses_a_paid_spell(spell: Spell, maker: str, tmp_path: Path) -> None:
    paid_dir = tmp_path / "paid"
    shutil.copytree(HELLO, paid_dir)
    doc = json.loads((paid_dir / "spell.json").read_text())
    doc.update(id="com.example.paid-hello", name="Paid hello")
    doc["pricing"] = {"model": "flat", "currency": "USD", "flat_cents": 5}
    (paid_dir / "spell.json").write_text(json.dumps(doc))
    spell.ok("publish", str(paid_dir), token=maker)

    thrifty = spell.ok("token", "issue", "--account", "thrifty", "--role", "caster").stdout.strip()
    caps = spell.ok("cap", "set", "--monthly", "0", token=thrifty).stdout
    assert "monthly  0" in caps

    proc = spell("cast", "com.example.paid-hello", "-i", "name=x", token=thrifty)
    assert proc.returncode == 1
    assert proc.stdout == ""
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: BUDGET_CAP_EXCEEDED: ")
    assert "monthly cap" in first and "retry after" in first
    assert "Traceback" not in proc.stderr

    shown = json.loads(spell.ok("cap", "show", "--json", token=thrifty).stdout)
    assert shown["monthly"]["cap_cents"] == 0 and shown["monthly"]["reserved_cents"] == 0


def _settled_verify(spell: Spell) -> subprocess.CompletedProcess[str]:
    """``spell audit verify`` once the log stops growing (workers append after a cast ends)."""
    previous = None
    for _ in range(50):
        proc = spell("audit", "verify")
        if proc.returncode == 0 and proc.stdout == previous:
            return proc
        previous = proc.stdout if proc.returncode == 0 else None
        time.sleep(0.3)
    pytest.fail(f"the audit log did not settle: {proc.stdout}\n{proc.stderr}")


def test_audit_verify_passes_then_names_a_tampered_line(spell: Spell, hello: str) -> None:
    ok = _settled_verify(spell)
    assert ok.stdout.startswith("ok: ")
    assert "matches the ledger head" in ok.stdout

    log = spell.data_dir / "audit" / "audit.jsonl"
    original = log.read_bytes()
    lines = original.decode().splitlines(keepends=True)
    assert len(lines) >= 3
    try:
        record = json.loads(lines[1])
        record["actor"] = "mallory"
        lines[1] = json.dumps(record, separators=(",", ":")) + "\n"
        log.write_text("".join(lines))
        proc = spell("audit", "verify")
        assert proc.returncode == 1
        assert proc.stdout.startswith("TAMPERED: line 2: ")
        assert "Traceback" not in proc.stderr

        # Cutting the last record keeps a valid chain; the ledger's head pointer catches it.
        log.write_bytes(b"".join(ln.encode() for ln in original.decode().splitlines(True)[:-1]))
        cut = spell("audit", "verify")
        assert cut.returncode == 1
        assert cut.stdout.startswith(f"TAMPERED: line {len(lines)}")
    finally:
        log.write_bytes(original)
    assert spell("audit", "verify").returncode == 0
