"""The /v1 surface: auth and scopes, rate limits, bad input, SSE progress, the catalog."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.conftest import FrozenClock, Harness


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def error_of(r: Any) -> dict[str, Any]:
    body = await r.json()
    assert set(body) == {"error"}, body
    assert {"code", "message"} <= set(body["error"])
    return dict(body["error"])


# ------------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Bearer not.a.jwt"}, id="garbage"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, id="wrong-scheme"),
    ],
)
async def test_requests_without_a_valid_token_are_401(harness: Harness, headers: Any) -> None:
    r = await harness.client.get("/v1/spells", headers=headers)
    assert r.status == 401
    assert (await error_of(r))["code"] == "UNAUTHORIZED"


async def test_a_token_signed_with_another_key_is_401(harness: Harness) -> None:
    from datetime import UTC, datetime

    from app.services import tokens

    forged, _, _ = tokens.issue(
        b"another-key",
        principal_id="p_x",
        account_id="ACME",
        role="operator",
        now=datetime.now(UTC),
        ttl=60,
    )
    r = await harness.client.get("/v1/spells", headers=auth(forged))
    assert r.status == 401


async def test_an_expired_token_is_401_saying_so(harness: Harness) -> None:
    token = await harness.token("ACME", "caster", ttl=1)
    await asyncio.sleep(0)
    clock = FrozenClock()
    clock.advance(3600)
    harness.platform.clock = clock
    r = await harness.client.get("/v1/billing/caps", headers=auth(token))
    assert r.status == 401
    assert "expired" in (await error_of(r))["message"]


async def test_a_token_already_verified_still_expires(harness: Harness) -> None:
    token = await harness.token("ACME", "caster", ttl=60)
    r = await harness.client.get("/v1/billing/caps", headers=auth(token))
    assert r.status == 200  # verified once and remembered by the process
    clock = FrozenClock()
    clock.advance(3600)
    harness.platform.clock = clock
    r = await harness.client.get("/v1/billing/caps", headers=auth(token))
    assert r.status == 401
    assert "expired" in (await error_of(r))["message"]


async def test_a_missing_scope_is_403_naming_it(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    auditor = await harness.token("a", "auditor")
    await harness.publish(maker)
    r = await harness.cast(maker)
    assert r.status == 403
    err = await error_of(r)
    assert err["code"] == "FORBIDDEN"
    assert err["detail"]["required_scope"] == "cast:invoke"
    r = await harness.client.post("/v1/spells", json={}, headers=auth(auditor))
    assert r.status == 403
    assert (await error_of(r))["detail"]["required_scope"] == "spell:publish"


async def test_only_the_author_publishes_new_versions(harness: Harness) -> None:
    a = await harness.token("author", "maker")
    b = await harness.token("intruder", "maker")
    await harness.publish(a)
    digest = await harness.upload_bundle(b, {"spell.json": "{}", "main.py": ""})
    r = await harness.client.post(
        "/v1/spells",
        json={
            "id": "com.example.test",
            "name": "Hijack",
            "version": "9.0.0",
            "execution": {"mode": "service", "entrypoint": "main.py", "bundle": digest},
        },
        headers=auth(b),
    )
    assert r.status == 403


# ------------------------------------------------------------------------------- bad input


async def test_malformed_json_is_a_422_not_a_stack_trace(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    r = await harness.client.post(
        "/v1/spells",
        data=b'{"id": "x",',
        headers={**auth(maker), "Content-Type": "application/json"},
    )
    assert r.status == 422
    err = await error_of(r)
    assert err["code"] == "VALIDATION_ERROR"
    assert "malformed JSON" in err["message"]


async def test_an_oversize_body_is_413(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    r = await harness.client.post(
        "/v1/spells",
        data=json.dumps({"x": "y" * (1024 * 1024 + 10)}),
        headers={**auth(maker), "Content-Type": "application/json"},
    )
    assert r.status == 413
    assert (await error_of(r))["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        pytest.param({"surprise": 1}, "/surprise", id="unknown-field"),
        pytest.param({"id": "Not An Id"}, "/id", id="bad-id"),
        pytest.param({"version": "1.0"}, "/version", id="not-semver"),
        pytest.param({"inputs": {"type": "object", "properties": 5}}, "/inputs", id="bad-schema"),
        pytest.param({"pricing": {"model": "flat"}}, "/pricing", id="flat-without-price"),
        pytest.param({"visibility": "secret"}, "/visibility", id="bad-visibility"),
    ],
)
async def test_invalid_spell_documents_are_422_naming_the_field(
    harness: Harness, patch: dict[str, Any], path: str
) -> None:
    maker = await harness.token("m", "maker")
    digest = await harness.upload_bundle(maker, {"spell.json": "{}", "main.py": ""})
    doc = {
        "id": "com.example.bad",
        "name": "Bad",
        "execution": {"mode": "service", "entrypoint": "main.py", "bundle": digest},
        **patch,
    }
    r = await harness.client.post("/v1/spells", json=doc, headers=auth(maker))
    assert r.status == 422, await r.text()
    err = await error_of(r)
    assert err["detail"]["path"].startswith(path), err


async def test_a_spell_whose_bundle_was_never_uploaded_is_refused(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    doc = {
        "id": "com.example.ghost",
        "name": "Ghost",
        "execution": {"mode": "service", "entrypoint": "main.py", "bundle": "sha256:" + "0" * 64},
    }
    r = await harness.client.post("/v1/spells", json=doc, headers=auth(maker))
    assert r.status == 422
    assert (await error_of(r))["detail"]["path"] == "/execution/bundle"


async def test_a_hostile_bundle_is_refused(harness: Harness) -> None:
    from tests.conftest import make_tar

    maker = await harness.token("m", "maker")
    for members in (
        {"spell.json": b"{}", "../escape": b"x"},
        {"spell.json": b"{}", "link": None},
    ):
        r = await harness.client.post("/v1/bundles", data=make_tar(members), headers=auth(maker))
        assert r.status == 422, members
    r = await harness.client.post("/v1/bundles", data=b"not a tarball", headers=auth(maker))
    assert r.status == 422


async def test_input_that_breaks_the_spell_schema_is_422_naming_the_path(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker)
    r = await harness.cast(caster, body={"input": {}})
    err = await error_of(r)
    assert r.status == 422
    assert err["detail"]["path"] == "/input/name"
    r = await harness.cast(caster, body={"input": {"name": 5}})
    assert (await error_of(r))["detail"]["path"] == "/input/name"
    r = await harness.cast(caster, body={"input": {"name": "x"}, "extra": True})
    assert (await error_of(r))["detail"]["path"] == "/extra"
    r = await harness.cast(caster, body={"input": {"name": "x"}, "mode": "workflow"})
    assert (await error_of(r))["detail"]["path"] == "/mode"
    assert await harness.platform.ledger.count_casts() == 0


async def test_unknown_spells_casts_and_routes_are_404(harness: Harness) -> None:
    caster = await harness.token("c", "caster")
    for path in ("/v1/spells/com.example.nope", "/v1/casts/c_nope", "/v1/nothing-here"):
        r = await harness.client.get(path, headers=auth(caster))
        assert r.status == 404, path
        assert (await error_of(r))["code"] == "NOT_FOUND"
    r = await harness.cast(caster, spell_id="com.example.nope")
    assert r.status == 404


async def test_someone_elses_cast_is_404(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    a = await harness.token("a", "caster")
    b = await harness.token("b", "caster")
    await harness.publish(maker)
    cast_id = (await (await harness.cast(a)).json())["cast_id"]
    r = await harness.client.get(f"/v1/casts/{cast_id}", headers=auth(b))
    assert r.status == 404


# ------------------------------------------------------------------------------- SSE


def parse_sse(text: str) -> list[dict[str, Any]]:
    out = []
    for block in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != ":"
        )
        if "data" in fields:
            out.append(
                {"id": int(fields["id"]), "event": fields["event"], **json.loads(fields["data"])}
            )
    return out


async def test_progress_streams_as_sse_and_resumes_with_last_event_id(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker)
    cast_id = (await (await harness.cast(caster)).json())["cast_id"]
    r = await harness.client.get(f"/v1/casts/{cast_id}/events", headers=auth(caster))
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(await r.text())
    stages = [e["event"] for e in events]
    assert stages[0] == "queued"
    assert stages[-1] == "succeeded"
    assert "running" in stages and "progress" in stages and "log" in stages
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    progress = next(e for e in events if e["event"] == "progress")
    assert progress["pct"] == 50

    resume_from = events[1]["id"]
    r = await harness.client.get(
        f"/v1/casts/{cast_id}/events",
        headers={**auth(caster), "Last-Event-ID": str(resume_from)},
    )
    again = parse_sse(await r.text())
    assert [e["id"] for e in again] == [e["id"] for e in events[resume_from:]]


async def test_sse_follows_a_live_cast(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker)
    harness.sandbox.gate.clear()
    cast_id = (await (await harness.cast(caster)).json())["cast_id"]

    async def release() -> None:
        await asyncio.sleep(0.3)
        harness.sandbox.gate.set()

    task = asyncio.create_task(release())
    r = await harness.client.get(f"/v1/casts/{cast_id}/events", headers=auth(caster))
    events = parse_sse(await r.text())
    await task
    assert events[-1]["event"] == "succeeded"


# ------------------------------------------------------------------------------- catalog


async def test_catalog_search_tags_sorting_and_visibility(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(
        maker,
        spell_id="com.example.cheap",
        flat_cents=1,
        tags=["text"],
        name="Cheap words",
        description="writes words",
    )
    await harness.publish(
        maker, spell_id="com.example.dear", flat_cents=90, tags=["image"], name="Dear pictures"
    )
    await harness.publish(maker, spell_id="com.example.hidden", visibility="unlisted")
    await harness.publish(maker, spell_id="com.example.secret", visibility="private")
    for _ in range(2):
        await harness.cast(caster, spell_id="com.example.dear")

    async def ids(query: str, token: str | None = None) -> list[str]:
        r = await harness.client.get(
            "/v1/catalog/spells" + query, headers=auth(token) if token else {}
        )
        assert r.status == 200, await r.text()
        return [s["id"] for s in (await r.json())["spells"]]

    assert await ids("?sort=price") == ["com.example.cheap", "com.example.dear"]
    assert (await ids("?sort=popular"))[0] == "com.example.dear"
    assert await ids("?q=words") == ["com.example.cheap"]
    assert await ids("?tag=image") == ["com.example.dear"]
    assert await ids("?q=100%25") == []
    r = await harness.client.get("/v1/catalog/spells?sort=weird")
    assert r.status == 422

    # Unlisted: reachable by id, not listed; private: only its author sees it.
    assert (await harness.client.get("/v1/catalog/spells/com.example.hidden")).status == 200
    assert (await harness.client.get("/v1/catalog/spells/com.example.secret")).status == 404
    r = await harness.client.get("/v1/spells/com.example.secret", headers=auth(maker))
    assert r.status == 200
    mine = [
        s["id"]
        for s in (await (await harness.client.get("/v1/spells", headers=auth(maker))).json())[
            "spells"
        ]
    ]
    assert "com.example.secret" in mine

    detail = await (await harness.client.get("/v1/catalog/spells/com.example.dear")).json()
    assert detail["modes"] == ["service"]
    assert detail["pricing"]["flat_cents"] == 90
    assert detail["inputs"]["required"] == ["name"]


async def test_republishing_the_same_version_is_harmless_but_changing_it_is_409(
    harness: Harness,
) -> None:
    maker = await harness.token("m", "maker")
    first = await harness.publish(maker)
    r = await harness.client.post("/v1/spells", json=first["document"], headers=auth(maker))
    assert r.status == 200
    changed = {**first["document"], "name": "Renamed"}
    r = await harness.client.post("/v1/spells", json=changed, headers=auth(maker))
    assert r.status == 409
    bumped = {**changed, "version": "1.1.0"}
    r = await harness.client.post("/v1/spells", json=bumped, headers=auth(maker))
    assert r.status == 201
    body = await r.json()
    assert body["latest_version"] == "1.1.0"
    assert body["versions"] == ["1.1.0", "1.0.0"]


async def test_openapi_and_operational_endpoints(harness: Harness) -> None:
    doc = await (await harness.client.get("/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert (await harness.client.get("/healthz")).status == 200
    ready = await harness.client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"]["database"] == "ok"
    metrics = await (await harness.client.get("/metrics")).text()
    for name in ("cast_count", "cast_latency_ms", "errors_by_code"):
        assert name in metrics


async def test_traceparent_is_accepted_and_carried_to_the_audit_record(harness: Harness) -> None:
    maker = await harness.token("m", "maker")
    caster = await harness.token("c", "caster")
    await harness.publish(maker)
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = await harness.client.post(
        "/v1/spells/com.example.test:cast",
        json={"input": {"name": "x"}},
        headers={**auth(caster), "Idempotency-Key": "t", "traceparent": tp},
    )
    cast_id = (await r.json())["cast_id"]
    await harness.wait_cast(caster, cast_id)
    await asyncio.sleep(0.05)
    lines = (harness.settings.data_dir / "audit" / "audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if cast_id in line]
    assert records and all(rec["traceparent"] == tp for rec in records)
    assert harness.sandbox.runs[0].env["TRACEPARENT"] == tp


class BrokenSandbox:
    name = "bwrap"

    async def probe(self) -> None:
        from app.runner.sandbox import SandboxUnavailable

        raise SandboxUnavailable("No permissions to create new namespace")

    async def run(self, spec: Any, on_line: Any = None) -> Any:  # pragma: no cover
        raise AssertionError("a failed probe must keep every run away from the sandbox")


async def test_when_the_sandbox_probe_fails_service_casts_are_refused(
    aiohttp_client: Any, settings: Any
) -> None:
    from app.web.app import Overrides, create_app

    client = await aiohttp_client(
        create_app(settings, overrides=Overrides(sandbox=BrokenSandbox()))
    )
    h = Harness(client=client, settings=settings, sandbox=None)  # type: ignore[arg-type]
    maker = await h.token("m", "maker")
    caster = await h.token("c", "caster")
    await h.publish(maker, flat_cents=5)
    r = await h.cast(caster)
    assert r.status == 503
    err = await error_of(r)
    assert err["code"] == "SANDBOX_UNAVAILABLE"
    assert "namespace" in err["message"]
    assert await h.platform.ledger.count_casts() == 0
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "namespace" in (await ready.json())["checks"]["sandbox"]


async def test_sandbox_settings_that_would_starve_spells_of_processes_fail_closed(
    aiohttp_client: Any, settings: Any
) -> None:
    from app.web.app import Overrides, create_app

    # 3 processes per idle sandbox on ONE shared uid (no uid pool): 20 warm + 1 worker is far
    # over half of its process limit, so spells would fail to fork — refuse service runs.
    crowded = settings.model_copy(update={"sandbox_warm": 20, "workers": 1})
    client = await aiohttp_client(create_app(crowded, overrides=Overrides(run_worker=True)))
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "SPELL_SANDBOX_UID_POOL" in (await ready.json())["checks"]["sandbox"]


async def test_the_process_budget_counts_the_concurrency_the_process_runs_with(
    aiohttp_client: Any, settings: Any
) -> None:
    from app.web.app import Overrides, create_app

    # `spell worker --concurrency 20` with SPELL_WORKERS=1: 20 running sandboxes on one uid
    few = settings.model_copy(update={"sandbox_warm": 0, "workers": 1})
    app = create_app(few, overrides=Overrides(run_worker=True), concurrency=20)
    client = await aiohttp_client(app)
    ready = await client.get("/readyz")
    assert ready.status == 503
    reason = (await ready.json())["checks"]["sandbox"]
    assert "SPELL_SANDBOX_UID_POOL" in reason
    assert "+ 20 concurrent runs (SPELL_WORKERS or `spell worker --concurrency`)" in reason
