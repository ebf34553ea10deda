"""``spell worker`` refuses to start when it must not run: no NATS, or no sandbox (fail closed).

No service is needed: both refusals happen before anything is connected.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _spell_argv() -> list[str]:
    script = Path(sys.executable).with_name("spell")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli.main"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPELL_", "NATS_")) and k != "DATABASE_URL"
    }
    env["SPELL_DATA_DIR"] = str(tmp_path / "data")
    env.update(extra)
    return env


def _worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_spell_argv(), "worker", "--health-port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_worker_refuses_to_start_without_nats(tmp_path: Path) -> None:
    proc = _worker(_env(tmp_path))
    assert proc.returncode == 1
    assert "error: VALIDATION_ERROR: spell worker needs NATS_URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_refuses_to_start_when_the_sandbox_cannot_run(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    # No bwrap on PATH (and no SPELL_UNSAFE_NO_SANDBOX): never fall back to running unsandboxed.
    env = _env(tmp_path, NATS_URL="nats://127.0.0.1:1", PATH=str(empty))
    proc = _worker(env)
    assert proc.returncode == 1, proc.stderr
    assert "error: SANDBOX_UNAVAILABLE: refusing to run spells unsandboxed" in proc.stderr
    assert "bwrap" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_needs_a_positive_concurrency(tmp_path: Path) -> None:
    proc = _worker(_env(tmp_path, NATS_URL="nats://127.0.0.1:1", SPELL_WORKERS="0"))
    assert proc.returncode == 1
    assert "--concurrency" in proc.stderr
