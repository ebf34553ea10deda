"""The OpenAPI document describes the API the server really has (SPEC §5, §22, §24)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from pydantic import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from app.domain.spells import SpellDocument
from app.errors import STATUS_BY_CODE
from app.web.openapi import openapi_document

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "templates" / "spells" / "hello" / "spell.json"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
RATE_LIMIT_HEADERS = {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"}
COMPONENTS_URI = "urn:spell-platform:openapi"
ERROR_REF = {"$ref": "#/components/schemas/Error"}
BUNDLE = "sha256:" + "ab" * 32

Operation = tuple[str, str]  # (METHOD, path template)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return openapi_document("http://127.0.0.1:8080")


def resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow local ``$ref``s (``#/components/...``) until a concrete object."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def operations(doc: dict[str, Any]) -> dict[Operation, dict[str, Any]]:
    return {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    }


def responses_of(doc: dict[str, Any], op: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {status: resolve(doc, r) for status, r in op["responses"].items()}


def is_secured(doc: dict[str, Any], op: dict[str, Any]) -> bool:
    return bool(op.get("security", doc["security"]))


def header_names(doc: dict[str, Any], op: dict[str, Any]) -> dict[str, dict[str, Any]]:
    params = [resolve(doc, p) for p in op.get("parameters", [])]
    return {p["name"]: p for p in params if p["in"] == "header"}


# ------------------------------------------------------------------------------ validity


def test_the_document_is_a_valid_openapi_3_1_description(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_the_server_url_is_the_one_given() -> None:
    assert openapi_document("https://spells.example/")["servers"] == [
        {"url": "https://spells.example"}
    ]


def test_each_call_returns_an_independent_copy() -> None:
    first = openapi_document("http://a")
    first["paths"].clear()
    assert openapi_document("http://a")["paths"]


def test_the_document_is_json(doc: dict[str, Any]) -> None:
    assert json.loads(json.dumps(doc)) == doc


# ------------------------------------------------------------------------ route coverage


@pytest.fixture
def app_routes(tmp_path: Path) -> set[Operation]:
    from app.config import Settings
    from app.web.app import create_app

    app = create_app(Settings(SPELL_DATA_DIR=str(tmp_path)))
    found: set[Operation] = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # aiohttp adds HEAD for every GET
            continue
        assert route.resource is not None
        found.add((route.method, route.resource.canonical))
    assert found, "the app has no routes"
    return found


def test_every_route_is_documented(doc: dict[str, Any], app_routes: set[Operation]) -> None:
    assert app_routes - set(operations(doc)) == set()


def test_every_documented_operation_exists(doc: dict[str, Any], app_routes: set[Operation]) -> None:
    assert set(operations(doc)) - app_routes == set()


def test_the_cast_path_keeps_its_colon(doc: dict[str, Any]) -> None:
    assert "post" in doc["paths"]["/v1/spells/{spell_id}:cast"]


# ------------------------------------------------------------------------- responses


def test_operation_ids_are_unique(doc: dict[str, Any]) -> None:
    ids = [op["operationId"] for op in operations(doc).values()]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "operation",
    [
        ("GET", "/v1/openapi.json"),
        ("GET", "/v1/catalog/spells"),
        ("GET", "/v1/catalog/spells/{spell_id}"),
        ("GET", "/v1/artifacts/{artifact_id}"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
    ],
    ids=lambda o: f"{o[0]} {o[1]}",
)
def test_public_operations_need_no_token(doc: dict[str, Any], operation: Operation) -> None:
    assert operations(doc)[operation]["security"] == []


def test_everything_else_needs_a_bearer_jwt(doc: dict[str, Any]) -> None:
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert scheme == scheme | {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert doc["security"] == [{"bearerAuth": []}]
    secured = {k for k, op in operations(doc).items() if is_secured(doc, op)}
    assert ("POST", "/v1/spells/{spell_id}:cast") in secured
    assert ("GET", "/v1/casts/{cast_id}/events") in secured


def test_secured_operations_document_401(doc: dict[str, Any]) -> None:
    missing = [k for k, op in operations(doc).items() if is_secured(doc, op)]
    missing = [k for k in missing if "401" not in operations(doc)[k]["responses"]]
    assert missing == []


def test_v1_operations_document_429_with_retry_after(doc: dict[str, Any]) -> None:
    for (method, path), op in operations(doc).items():
        if not path.startswith("/v1/"):
            continue
        limited = responses_of(doc, op).get("429")
        assert limited is not None, f"{method} {path} has no 429"
        assert {"Retry-After", *RATE_LIMIT_HEADERS} <= set(limited["headers"])


def test_every_v1_response_carries_the_rate_limit_headers(doc: dict[str, Any]) -> None:
    for (method, path), op in operations(doc).items():
        if not path.startswith("/v1/"):
            continue
        for status, response in responses_of(doc, op).items():
            assert set(response.get("headers", {})) >= RATE_LIMIT_HEADERS, (method, path, status)


def test_every_error_response_uses_the_error_schema(doc: dict[str, Any]) -> None:
    for (method, path), op in operations(doc).items():
        for status, response in responses_of(doc, op).items():
            if int(status) < 400 or (path, status) == ("/readyz", "503"):
                continue  # /readyz answers 503 with its readiness report, by design
            assert response["content"]["application/json"]["schema"] == ERROR_REF, (
                method,
                path,
                status,
            )


def test_error_examples_are_errors_of_their_status(doc: dict[str, Any]) -> None:
    validator = component_validator(doc, "Error")
    seen = 0
    for name, response in doc["components"]["responses"].items():
        example = response["content"]["application/json"].get("example")
        if example is None:
            continue
        validator.validate(example)
        code = example["error"]["code"]
        status = STATUS_BY_CODE[code]
        users = [
            s
            for op in operations(doc).values()
            for s, r in op["responses"].items()
            if r == {"$ref": f"#/components/responses/{name}"}
        ]
        assert set(users) <= {str(status)}, (name, code, users)
        seen += 1
    assert seen >= 10


def test_the_error_codes_are_the_platforms(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert schemas["ErrorCode"]["enum"] == list(STATUS_BY_CODE)
    assert schemas["Error"]["properties"]["error"]["properties"]["code"] == {
        "$ref": "#/components/schemas/ErrorCode"
    }


@pytest.mark.parametrize(
    ("operation", "statuses"),
    [
        pytest.param(
            ("POST", "/v1/spells/{spell_id}:cast"),
            {"202", "401", "402", "403", "404", "409", "413", "415", "422", "429", "503"},
            id="cast",
        ),
        pytest.param(
            ("POST", "/v1/spells"),
            {"200", "201", "401", "403", "409", "413", "415", "422", "429"},
            id="publish",
        ),
        pytest.param(
            ("POST", "/v1/billing/caps"),
            {"200", "401", "403", "404", "409", "413", "415", "422", "429"},
            id="set-caps",
        ),
        pytest.param(
            ("GET", "/v1/casts/{cast_id}/events"), {"200", "401", "404", "422", "429"}, id="sse"
        ),
        pytest.param(
            ("GET", "/v1/artifacts/{artifact_id}"), {"200", "401", "410", "429"}, id="artifact"
        ),
        pytest.param(("POST", "/v1/bundles"), {"201", "401", "403", "413", "422", "429"}, id="b"),
    ],
)
def test_operations_document_the_answers_their_handlers_give(
    doc: dict[str, Any], operation: Operation, statuses: set[str]
) -> None:
    assert statuses <= set(operations(doc)[operation]["responses"])


def test_a_cast_refused_by_the_cap_is_402_with_retry_after(doc: dict[str, Any]) -> None:
    op = operations(doc)[("POST", "/v1/spells/{spell_id}:cast")]
    refused = responses_of(doc, op)["402"]["content"]["application/json"]
    assert refused["schema"] == ERROR_REF
    assert refused["example"]["error"]["code"] == "BUDGET_CAP_EXCEEDED"
    assert refused["example"]["error"]["retry_after"] > 0
    error = doc["components"]["schemas"]["Error"]["properties"]["error"]
    assert error["properties"]["retry_after"]["type"] == "integer"


@pytest.mark.parametrize(
    ("operation", "ok"),
    [
        (("POST", "/v1/spells/{spell_id}:cast"), "202"),
        (("POST", "/v1/billing/caps"), "200"),
        (("POST", "/v1/billing/usage"), "201"),
    ],
    ids=["cast", "caps", "usage"],
)
def test_idempotent_operations_require_the_key_and_say_when_they_replay(
    doc: dict[str, Any], operation: Operation, ok: str
) -> None:
    op = operations(doc)[operation]
    key = header_names(doc, op)["Idempotency-Key"]
    assert key["required"] is True
    assert key["schema"]["maxLength"] == 255
    assert "Idempotent-Replayed" in responses_of(doc, op)[ok]["headers"]


def test_only_the_idempotent_operations_take_the_key(doc: dict[str, Any]) -> None:
    takers = {k for k, op in operations(doc).items() if "Idempotency-Key" in header_names(doc, op)}
    assert takers == {
        ("POST", "/v1/spells/{spell_id}:cast"),
        ("POST", "/v1/billing/caps"),
        ("POST", "/v1/billing/usage"),
    }


def test_cast_events_are_a_resumable_event_stream(doc: dict[str, Any]) -> None:
    op = operations(doc)[("GET", "/v1/casts/{cast_id}/events")]
    assert "Last-Event-ID" in header_names(doc, op)
    assert set(op["responses"]["200"]["content"]) == {"text/event-stream"}


def test_artifacts_are_zips_behind_signed_expiring_links(doc: dict[str, Any]) -> None:
    op = operations(doc)[("GET", "/v1/artifacts/{artifact_id}")]
    query = {p["name"]: p for p in map(lambda p: resolve(doc, p), op["parameters"])}
    assert query["exp"]["in"] == query["sig"]["in"] == "query"
    assert query["exp"]["required"] and query["sig"]["required"]
    assert set(op["responses"]["200"]["content"]) == {"application/zip"}
    expired = responses_of(doc, op)["410"]["content"]["application/json"]
    assert expired["example"]["error"]["code"] == "ARTIFACT_EXPIRED"


def test_every_request_body_is_a_component_or_binary(doc: dict[str, Any]) -> None:
    bodies = {k: op["requestBody"] for k, op in operations(doc).items() if "requestBody" in op}
    assert set(bodies) == {
        ("POST", "/v1/bundles"),
        ("POST", "/v1/spells"),
        ("POST", "/v1/spells/{spell_id}:cast"),
        ("POST", "/v1/billing/caps"),
        ("POST", "/v1/billing/subscribe"),
        ("POST", "/v1/billing/usage"),
        ("POST", "/v1/oidc/token"),
        ("POST", "/webhooks/github"),
        ("POST", "/webhooks/stripe"),
    }
    assert bodies[("POST", "/v1/billing/usage")]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/UsageRequest"
    }
    assert bodies[("POST", "/v1/spells")]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SpellDocument"
    }


# --------------------------------------------------------------------- the spell schema


def component_validator(doc: dict[str, Any], name: str) -> Draft202012Validator:
    """A validator for one component schema, its ``#/components/...`` refs resolved."""
    resource = Resource.from_contents(
        {"components": {"schemas": doc["components"]["schemas"]}},
        default_specification=DRAFT202012,
    )
    registry: Registry[Any] = Registry().with_resource(COMPONENTS_URI, resource)
    schema = {"$ref": f"{COMPONENTS_URI}#/components/schemas/{name}"}
    return Draft202012Validator(schema, registry=registry)


def service_spell(**changes: Any) -> dict[str, Any]:
    spell: dict[str, Any] = {
        "id": "com.example.echo",
        "name": "Echo",
        "version": "1.2.3-rc.1",
        "tags": ["example"],
        "execution": {"mode": "service", "entrypoint": "main.py", "bundle": BUNDLE},
        "pricing": {
            "model": "metered",
            "currency": "EUR",
            "meters": {"compute_ms": {"unit_cents": 1, "per": 1000, "max": 60000}},
        },
        "inputs": {"type": "object", "properties": {"text": {"type": "string"}}},
    }
    spell.update(changes)
    return spell


@pytest.mark.skipif(not HELLO.is_file(), reason="no hello template")
def test_the_spell_schema_accepts_the_hello_template(doc: dict[str, Any]) -> None:
    hello = json.loads(HELLO.read_text())
    errors = [e.message for e in component_validator(doc, "SpellDocument").iter_errors(hello)]
    assert errors == []


def test_the_spell_schema_rejects_unknown_top_level_fields(doc: dict[str, Any]) -> None:
    spell = service_spell(colour="red")
    errors = list(component_validator(doc, "SpellDocument").iter_errors(spell))
    assert [e.validator for e in errors] == ["additionalProperties"]
    assert "colour" in errors[0].message


def test_a_full_service_spell_is_valid_for_the_schema_and_the_model(doc: dict[str, Any]) -> None:
    spell = service_spell()
    component_validator(doc, "SpellDocument").validate(spell)
    SpellDocument.model_validate(spell)


@pytest.mark.parametrize(
    "spell",
    [
        pytest.param(service_spell(id="NoDots"), id="id-without-dots"),
        pytest.param(service_spell(version="1.0"), id="not-semver"),
        pytest.param(service_spell(visibility="secret"), id="unknown-visibility"),
        pytest.param(service_spell(tags=["Bad Tag"]), id="bad-tag"),
        pytest.param(service_spell(execution={"mode": "teleport"}), id="unknown-mode"),
        pytest.param(
            service_spell(execution={"mode": "service", "bundle": "md5:abc", "entrypoint": "x"}),
            id="bad-bundle-digest",
        ),
        pytest.param(
            service_spell(pricing={"model": "flat", "flat_cents": -1}), id="negative-price"
        ),
        pytest.param(
            service_spell(
                execution={"mode": "service", "entrypoint": "x", "bundle": BUNDLE, "timeout_sec": 0}
            ),
            id="zero-timeout",
        ),
    ],
)
def test_the_schema_and_the_model_reject_the_same_documents(
    doc: dict[str, Any], spell: dict[str, Any]
) -> None:
    assert list(component_validator(doc, "SpellDocument").iter_errors(spell)) != []
    with pytest.raises(ValidationError):
        SpellDocument.model_validate(spell)


def test_published_spells_embed_the_spell_document(doc: dict[str, Any]) -> None:
    detail = doc["components"]["schemas"]["SpellDetail"]
    assert detail["properties"]["document"] == {"$ref": "#/components/schemas/SpellDocument"}
    assert detail["properties"]["pricing"] == {"$ref": "#/components/schemas/Pricing"}


def test_the_pydantic_definitions_are_hoisted_into_components(doc: dict[str, Any]) -> None:
    text = json.dumps(doc)
    assert "$defs" not in text
    schemas = doc["components"]["schemas"]
    for name in ("Execution", "Pricing", "Meters", "WorkflowTarget", "CloneTarget"):
        assert name in schemas


def test_every_local_ref_resolves(doc: dict[str, Any]) -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                assert ref.startswith("#/components/"), ref
                resolve(doc, {"$ref": ref})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(copy.deepcopy(doc))


# ------------------------------------------- the served answers match the document (live)


def schema_validator(doc: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return component_validator(doc, ref.removeprefix("#/components/schemas/"))
    assert "$ref" not in json.dumps(schema), schema
    return Draft202012Validator(schema)


async def check(doc: dict[str, Any], r: Any, method: str, path: str) -> Any:
    """Assert that ``r`` is a documented answer of ``method path``; return its parsed body."""
    op = operations(doc)[(method, path)]
    status = str(r.status)
    assert status in op["responses"], f"{method} {path} answered undocumented {status}"
    documented = resolve(doc, op["responses"][status])
    for name in documented.get("headers", {}):
        assert name in r.headers, f"{method} {path} {status}: no {name} header"
    media = r.headers.get("Content-Type", "").split(";")[0].strip()
    content = documented.get("content", {})
    assert media in content, f"{method} {path} {status}: {media} is not documented"
    if media != "application/json":
        return await r.read()
    body = await r.json()
    errors = [e.message for e in schema_validator(doc, content[media]["schema"]).iter_errors(body)]
    assert errors == [], f"{method} {path} {status}: {errors} in {body}"
    return body


async def test_real_answers_match_the_document(doc: dict[str, Any], harness: Any) -> None:
    client = harness.client
    maker = {"Authorization": f"Bearer {await harness.token('acme', 'maker')}"}
    caster = {"Authorization": f"Bearer {await harness.token('bob', 'caster')}"}
    bad = {"Authorization": "Bearer not-a-token"}

    for ops_path in ("/healthz", "/readyz", "/metrics"):
        await check(doc, await client.get(ops_path), "GET", ops_path)
    served = await check(doc, await client.get("/v1/openapi.json"), "GET", "/v1/openapi.json")
    assert served["paths"].keys() == doc["paths"].keys()

    digest = await harness.upload_bundle(
        maker["Authorization"][7:], {"spell.json": "{}", "main.py": "print(1)\n"}
    )
    spell = {
        "id": "com.example.live",
        "name": "Live",
        "execution": {"mode": "service", "entrypoint": "main.py", "bundle": digest},
        "pricing": {"model": "flat", "currency": "USD", "flat_cents": 7},
        "inputs": {"type": "object", "properties": {"name": {"type": "string"}}},
    }
    r = await client.post("/v1/spells", json=spell, headers=maker)
    assert r.status == 201
    await check(doc, r, "POST", "/v1/spells")
    r = await client.post("/v1/spells", json=spell, headers=maker)
    assert r.status == 200
    await check(doc, r, "POST", "/v1/spells")
    r = await client.post("/v1/spells", json={**spell, "name": "Other"}, headers=maker)
    assert r.status == 409
    await check(doc, r, "POST", "/v1/spells")
    r = await client.post("/v1/spells", json={**spell, "colour": "red"}, headers=maker)
    assert r.status == 422
    await check(doc, r, "POST", "/v1/spells")
    r = await client.post("/v1/spells", data="x", headers={**maker, "Content-Type": "text/plain"})
    assert r.status == 415
    await check(doc, r, "POST", "/v1/spells")
    r = await client.post("/v1/spells", json=spell, headers=caster)
    assert r.status == 403
    await check(doc, r, "POST", "/v1/spells")

    for path, headers in (("/v1/spells", caster), ("/v1/catalog/spells", {})):
        r = await client.get(path, params={"q": "live", "limit": "1"}, headers=headers)
        assert r.status == 200
        listed = await check(doc, r, "GET", path)
        assert [s["id"] for s in listed["spells"]] == ["com.example.live"]
        r = await client.get(path, params={"sort": "worst"}, headers=headers)
        assert r.status == 422
        await check(doc, r, "GET", path)
    r = await client.get("/v1/spells")
    assert r.status == 401
    await check(doc, r, "GET", "/v1/spells")
    r = await client.get("/v1/catalog/spells", headers=bad)
    assert r.status == 401
    await check(doc, r, "GET", "/v1/catalog/spells")
    for tmpl, prefix, headers in (
        ("/v1/spells/{spell_id}", "/v1/spells/", caster),
        ("/v1/catalog/spells/{spell_id}", "/v1/catalog/spells/", {}),
    ):
        r = await client.get(prefix + "com.example.live", headers=headers)
        assert r.status == 200
        await check(doc, r, "GET", tmpl)
        r = await client.get(prefix + "com.example.nope", headers=headers)
        assert r.status == 404
        await check(doc, r, "GET", tmpl)

    cast_path = "/v1/spells/{spell_id}:cast"
    r = await harness.cast(caster["Authorization"][7:], "com.example.live", key="k-1")
    assert r.status == 202
    accepted = await check(doc, r, "POST", cast_path)
    assert r.headers["Idempotent-Replayed"] == "false"
    r = await harness.cast(caster["Authorization"][7:], "com.example.live", key="k-1")
    assert r.status == 202
    assert (await check(doc, r, "POST", cast_path))["cast_id"] == accepted["cast_id"]
    assert r.headers["Idempotent-Replayed"] == "true"
    r = await harness.cast(
        caster["Authorization"][7:], "com.example.live", body={"input": {"name": "z"}}, key="k-1"
    )
    assert r.status == 409
    await check(doc, r, "POST", cast_path)
    r = await client.post("/v1/spells/com.example.live:cast", json={}, headers=caster)
    assert r.status == 422
    await check(doc, r, "POST", cast_path)

    cast_id = accepted["cast_id"]
    await harness.wait_cast(caster["Authorization"][7:], cast_id)
    r = await client.get(f"/v1/casts/{cast_id}", headers=caster)
    assert r.status == 200
    status = await check(doc, r, "GET", "/v1/casts/{cast_id}")
    assert status["status"] == "succeeded", status
    r = await client.get("/v1/casts/c-nope", headers=caster)
    assert r.status == 404
    await check(doc, r, "GET", "/v1/casts/{cast_id}")

    events_path = "/v1/casts/{cast_id}/events"
    r = await client.get(f"/v1/casts/{cast_id}/events", headers=caster)
    assert r.status == 200
    stream = (await check(doc, r, "GET", events_path)).decode()
    event_validator = component_validator(doc, "CastEvent")
    stages = []
    for line in stream.splitlines():
        if line.startswith("data: "):
            event = json.loads(line[6:])
            event_validator.validate(event)
            stages.append(event["stage"])
    assert stages[0] == "queued" and stages[-1] == "succeeded", stages
    r = await client.get(f"/v1/casts/{cast_id}/events", headers={**caster, "Last-Event-ID": "x"})
    assert r.status == 422
    await check(doc, r, "GET", events_path)

    artifact = "/v1/artifacts/{artifact_id}"
    link = status["artifact_url"].removeprefix(str(client.make_url("")).rstrip("/"))
    r = await client.get(link)
    assert r.status == 200
    await check(doc, r, "GET", artifact)
    r = await client.get(link.replace("sig=", "sig=0"))
    assert r.status == 401
    await check(doc, r, "GET", artifact)
    r = await client.get(link.split("?")[0])
    assert r.status == 401
    await check(doc, r, "GET", artifact)

    r = await client.get("/v1/billing/caps", headers=caster)
    assert r.status == 200
    await check(doc, r, "GET", "/v1/billing/caps")
    r = await client.get("/v1/billing/caps", params={"account": "acme"}, headers=caster)
    assert r.status == 403
    await check(doc, r, "GET", "/v1/billing/caps")
    r = await client.post(
        "/v1/billing/caps", json={"monthly_cents": 10}, headers={**caster, "Idempotency-Key": "c1"}
    )
    assert r.status == 200
    await check(doc, r, "POST", "/v1/billing/caps")
    r = await client.post("/v1/billing/caps", json={"monthly_cents": 10}, headers=caster)
    assert r.status == 422
    await check(doc, r, "POST", "/v1/billing/caps")

    r = await harness.cast(caster["Authorization"][7:], "com.example.live", key="k-2")
    assert r.status == 402
    refused = await check(doc, r, "POST", cast_path)
    assert refused["error"]["retry_after"] > 0


async def test_the_rate_limited_answer_matches_the_document(
    doc: dict[str, Any], aiohttp_client: Any, settings: Any, overrides: Any
) -> None:
    from app.web.app import create_app

    tight = settings.model_copy(update={"rate_limit_burst": 1, "rate_limit_per_sec": 0.001})
    client = await aiohttp_client(create_app(tight, overrides=overrides))
    first = await client.get("/v1/catalog/spells")
    assert first.status == 200
    r = await client.get("/v1/catalog/spells")
    assert r.status == 429
    body = await check(doc, r, "GET", "/v1/catalog/spells")
    assert body["error"]["retry_after"] == int(r.headers["Retry-After"])
