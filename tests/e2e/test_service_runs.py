"""Service-mode casts through the API into the REAL bubblewrap sandbox, ledger kept consistent."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.runner.pool import WarmProfile
from app.runner.sandbox import BwrapSandbox
from app.store.auditlog import verify_file
from app.web.app import Overrides
from app.web.keys import CONSUMER
from app.worker.runs import sandbox_work_dir
from tests.conftest import ROOT, Harness, skip_or_fail

pytestmark = pytest.mark.e2e


@pytest.fixture
def overrides() -> Overrides:
    if shutil.which("bwrap") is None:
        skip_or_fail("bubblewrap (bwrap) is not installed")
    return Overrides()  # the real sandbox, detected and probed like `spell serve` does


@pytest.fixture(params=[0, 2], ids=["cold", "warm"])
def settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """Every service run test runs with every sandbox started cold, and through the warm pool."""
    return settings.model_copy(update={"sandbox_warm": request.param})


async def warm_up(h: Harness, memory_mb: int) -> int | None:
    """With a warm pool: make sure a sandbox for the spell is ready; the pool's hits so far."""
    sandbox = h.client.app[CONSUMER].executor.sandbox
    assert isinstance(sandbox, BwrapSandbox)
    if h.settings.sandbox_warm == 0:
        assert sandbox.pool is None
        return None
    assert sandbox.pool is not None
    profile = WarmProfile(memory_mb=memory_mb, max_output_bytes=h.settings.max_output_bytes)
    assert await sandbox.pool.prewarm(profile)
    return sandbox.pool.stats["hits"]


def assert_warm_hit(h: Harness, hits_before: int | None) -> None:
    if hits_before is not None:
        sandbox = h.client.app[CONSUMER].executor.sandbox
        assert isinstance(sandbox, BwrapSandbox) and sandbox.pool is not None
        assert sandbox.pool.stats["hits"] == hits_before + 1, "the run did not go warm"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def publish_folder(h: Harness, token: str, folder: Path, **patch: Any) -> dict[str, Any]:
    from app.runner.bundle import pack_dir

    r = await h.client.post(
        "/v1/bundles",
        data=pack_dir(folder),
        headers={**auth(token), "Content-Type": "application/gzip"},
    )
    assert r.status == 201, await r.text()
    doc = json.loads((folder / "spell.json").read_text())
    doc["execution"]["bundle"] = (await r.json())["digest"]
    doc.update(patch)
    r = await h.client.post("/v1/spells", json=doc, headers=auth(token))
    assert r.status in (200, 201), await r.text()
    return dict(await r.json())


def spell_folder(tmp_path: Path, name: str, code: str, **execution: Any) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "main.py").write_text(code)
    doc = {
        "id": f"com.example.{name}",
        "name": name,
        "execution": {
            "mode": "service",
            "entrypoint": "main.py",
            "timeout_sec": 5,
            "memory_mb": 128,
            **execution,
        },
        "pricing": {"model": "flat", "currency": "USD", "flat_cents": 4},
        "inputs": {"type": "object"},
    }
    (folder / "spell.json").write_text(json.dumps(doc))
    return folder


async def test_hello_runs_in_the_sandbox_and_returns_its_greeting(harness: Harness) -> None:
    maker = await harness.token("makers", "maker")
    caster = await harness.token("ACME", "caster")
    await publish_folder(harness, maker, ROOT / "templates" / "spells" / "hello")
    hits = await warm_up(harness, memory_mb=128)
    r = await harness.cast(caster, "com.example.hello", {"input": {"name": "world"}})
    assert r.status == 202, await r.text()
    done = await harness.wait_cast(caster, (await r.json())["cast_id"], timeout=30)
    assert done["status"] == "succeeded", done
    assert_warm_hit(harness, hits)
    url = done["artifact_url"]
    body = await (await harness.client.get(url[url.index("/v1/") :])).read()
    assert zipfile.ZipFile(io.BytesIO(body)).read("hello.txt") == b"Hello, world!\n"


@pytest.mark.parametrize(
    ("code", "error_code"),
    [
        pytest.param(
            "import os\nwith open(os.environ['SPELL_OUT'] + '/big', 'wb') as f:\n"
            "    while True:\n        f.write(b'x' * (1 << 20))\n",
            "OUTPUT_TOO_LARGE",
            id="writes-1GB",
        ),
        pytest.param("x = bytearray(1 << 30)\n", "MEMORY_LIMIT", id="memory-hog"),
        pytest.param("import time\ntime.sleep(60)\n", "TIMEOUT", id="sleeps-forever"),
        pytest.param("raise SystemExit('no way')\n", "SPELL_FAILED", id="crashes"),
        pytest.param(
            "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n",
            "SPELL_FAILED",
            id="tries-the-network",
        ),
    ],
)
async def test_a_misbehaving_spell_fails_cleanly_and_leaks_no_reservation(
    harness: Harness, tmp_path: Path, code: str, error_code: str
) -> None:
    maker = await harness.token("makers", "maker")
    caster = await harness.token("ACME", "caster")
    folder = spell_folder(tmp_path, "bad", code, timeout_sec=2)
    await publish_folder(harness, maker, folder)
    hits = await warm_up(harness, memory_mb=128)
    r = await harness.cast(caster, "com.example.bad", {"input": {}})
    assert r.status == 202
    done = await harness.wait_cast(caster, (await r.json())["cast_id"], timeout=60)
    assert done["status"] == "failed"
    assert done["error"]["code"] == error_code, done["error"]
    assert_warm_hit(harness, hits)
    assert done["cost_cents"] == 0
    caps = await (await harness.client.get("/v1/billing/caps", headers=auth(caster))).json()
    assert caps["monthly"]["reserved_cents"] == 0
    assert caps["monthly"]["used_cents"] == 0
    assert await harness.platform.ledger.ledger_lines("ACME") == []
    head = await harness.platform.ledger.audit_head("main")
    assert verify_file(harness.settings.data_dir / "audit" / "audit.jsonl", expected_head=head).ok
    work = sandbox_work_dir(harness.settings.data_dir, harness.settings.sandbox_uid)
    # The worker removes the run folder right after it recorded the end of the cast.
    deadline = asyncio.get_running_loop().time() + 5
    while list((work / "runs").iterdir()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert list((work / "runs").iterdir()) == []
