"""The OpenAPI 3.1 description of the HTTP API (SPEC §5, §22, §24), served at GET /v1/openapi.json.

Written from the handlers in :mod:`app.web.routes` and :mod:`app.web.middlewares`, not from the
spec: where the two differ, this document describes what the server does. The spell document
schema, the request bodies and the error-code list are generated from the code that enforces
them (:class:`~app.domain.spells.SpellDocument`, :mod:`app.services.platform`,
:data:`app.errors.STATUS_BY_CODE`), so they cannot drift apart.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from app.domain.spells import SEMVER_RE, SpellDocument
from app.errors import STATUS_BY_CODE
from app.services.platform import CapsRequest, CastRequest

JSON = "application/json"
REF = "#/components/schemas/{model}"
MODES = ["workflow", "service", "clone"]
CAST_STATUSES = ["queued", "running", "succeeded", "failed"]
EVENT_STAGES = ["queued", "running", "progress", "log", "requeued", "succeeded", "failed"]
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"

Schema = dict[str, Any]


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> dict[str, str]:
    return _ref("schemas", name)


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Schema], *, optional: tuple[str, ...] = ()) -> Schema:
    """A closed object whose properties are all required except ``optional``."""
    return {
        "type": "object",
        "properties": properties,
        "required": [k for k in properties if k not in optional],
        "additionalProperties": False,
    }


# ---------------------------------------------------------------------------------- schemas


def _pydantic_schemas() -> dict[str, Schema]:
    """SpellDocument and the request bodies, with pydantic's ``$defs`` hoisted to components."""
    out: dict[str, Schema] = {}
    for model in (SpellDocument, CastRequest, CapsRequest):
        schema = model.model_json_schema(ref_template=REF)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema

    doc = out["SpellDocument"]
    doc["description"] = (
        "The document a maker publishes (SPEC §15). Unknown fields are rejected everywhere. "
        "Checked by the server beyond this schema: `inputs` must itself be a valid JSON Schema "
        "(2020-12) describing an object; service mode (as `mode` or in `allowed_modes`) needs "
        "`execution.entrypoint` and `execution.bundle` (an uploaded bundle, see POST "
        "/v1/bundles); workflow mode needs `execution.workflow`; clone mode needs "
        "`execution.clone`; `pricing` needs the field its model names (`flat_cents`, `meters` "
        "or `one_time_cents`). When `pricing` is omitted the spell is free (flat, 0 cents); "
        'when `inputs` is omitted it is `{"type": "object"}`.'
    )
    doc["properties"]["version"]["pattern"] = SEMVER_RE.pattern
    doc["properties"]["version"]["description"] = "A semantic version (SemVer 2.0.0)."
    doc["properties"]["inputs"]["description"] = (
        "JSON Schema (2020-12) of the cast input; must describe an object."
    )

    cast = out["CastRequest"]
    cast["description"] = "The body of a cast: `{input, mode?, version?}`."
    cast["properties"]["input"]["description"] = "Checked against the spell's `inputs` schema."
    cast["properties"]["mode"] = {
        "anyOf": [{"type": "string", "enum": MODES}, {"type": "null"}],
        "default": None,
        "description": (
            "Run in this mode instead of the spell's default; the spell must allow it. "
            "Only `service` runs today: `workflow` and `clone` answer 503 UNAVAILABLE."
        ),
    }
    cast["properties"]["version"]["description"] = "Cast this version (default: the latest)."

    caps = out["CapsRequest"]
    caps["description"] = (
        "Give `monthly_cents` and/or `total_cents`; `null` removes that cap, an absent field "
        "leaves it unchanged."
    )
    caps["anyOf"] = [{"required": ["monthly_cents"]}, {"required": ["total_cents"]}]
    return out


def _github_delivery() -> Schema:
    return {
        "type": "object",
        "description": "A GitHub webhook payload (https://docs.github.com/webhooks).",
    }


def _schemas() -> dict[str, Schema]:
    price = _object(
        {
            "model": {"type": "string", "enum": ["flat", "metered", "one_time"]},
            "cents": {
                "type": "integer",
                "minimum": 0,
                "description": "The price estimate of one cast (the most it can cost).",
            },
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
        }
    )
    summary_props: dict[str, Schema] = {
        "id": {"type": "string", "examples": ["com.example.hello"]},
        "name": {"type": "string"},
        "description": {"type": "string"},
        "author": {"type": "string", "description": "The author's account id."},
        "version": {"type": "string", "description": "The latest version."},
        "price": _schema("Price"),
        "mode": {"type": "string", "enum": MODES, "description": "The default mode."},
        "rating": {"type": ["number", "null"], "description": "Not rated yet: always null."},
        "runs": {"type": "integer", "minimum": 0, "description": "Casts accepted so far."},
        "tags": {"type": "array", "items": {"type": "string"}},
        "visibility": {"type": "string", "enum": ["public", "unlisted", "private"]},
        "published_at": {"type": "string", "format": "date-time"},
    }
    detail_props: dict[str, Schema] = {
        **summary_props,
        "version": {"type": "string", "description": "The version shown (`?version=` or latest)."},
        "latest_version": {"type": "string"},
        "versions": {
            "type": "array",
            "items": {"type": "string"},
            "description": "All published versions, newest first.",
        },
        "modes": {
            "type": "array",
            "items": {"type": "string", "enum": MODES},
            "description": "The default mode first, then the other allowed modes.",
        },
        "pricing": _schema("Pricing"),
        "estimate_cents": {"type": "integer", "minimum": 0},
        "inputs": {"type": "object", "description": "The JSON Schema of the cast input."},
        "document": _schema("SpellDocument"),
    }
    cap_view = _object(
        {
            "cap_cents": {"type": ["integer", "null"], "description": "null: no cap."},
            "used_cents": {"type": "integer"},
            "reserved_cents": {
                "type": "integer",
                "description": "Held for casts accepted but not settled yet.",
            },
            "remaining_cents": {"type": ["integer", "null"], "description": "null: no cap."},
        }
    )
    schemas: dict[str, Schema] = {
        "ErrorCode": {
            "type": "string",
            "enum": list(STATUS_BY_CODE),
            "description": "SPEC §24 error codes plus the platform's own.",
        },
        "Error": {
            "type": "object",
            "description": "The one error shape of every endpoint (SPEC §5).",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "code": _schema("ErrorCode"),
                        "message": {"type": "string"},
                        "retry_after": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "Seconds to wait before retrying (429, and 402 when "
                            "the monthly cap resets).",
                        },
                        "detail": {
                            "type": "object",
                            "additionalProperties": True,
                            "description": "Machine-readable hints, e.g. `path` (a JSON pointer "
                            "into the request), `header`, `required_scope`, or the caps on 402.",
                        },
                    },
                    "required": ["code", "message"],
                    "additionalProperties": False,
                }
            },
            "required": ["error"],
            "additionalProperties": False,
            "examples": [
                {
                    "error": {
                        "code": "BUDGET_CAP_EXCEEDED",
                        "message": "cap exceeded",
                        "retry_after": 86400,
                    }
                }
            ],
        },
        "Health": _object({"status": {"const": "ok"}}),
        "Readiness": _object(
            {
                "status": {"type": "string", "enum": ["ok", "unavailable"]},
                "checks": _object(
                    {
                        "database": {
                            "type": "string",
                            "description": "`ok` or `unavailable: <reason>`.",
                        },
                        "sandbox": {
                            "type": "string",
                            "description": "`ok` or `unavailable: <reason>`; when unavailable "
                            "the server still answers but refuses service casts (503).",
                        },
                        "sandbox_kind": {"type": ["string", "null"]},
                    }
                ),
            }
        ),
        "BundleUploaded": _object(
            {
                "digest": {"type": "string", "pattern": DIGEST_PATTERN},
                "size_bytes": {"type": "integer", "minimum": 0},
            }
        ),
        "Price": price,
        "SpellSummary": _object(summary_props),
        "SpellDetail": _object(detail_props),
        "SpellList": _object(
            {
                "spells": {"type": "array", "items": _schema("SpellSummary")},
                "next_offset": {
                    "type": ["integer", "null"],
                    "description": "The `offset` of the next page; null on the last page.",
                },
            }
        ),
        "CastAccepted": _object(
            {
                "cast_id": {"type": "string"},
                "status": {
                    "const": "queued",
                    "description": "Always `queued`, also when the answer is replayed.",
                },
                "progress_sse": {
                    "type": "string",
                    "format": "uri",
                    "description": "Absolute URL of GET /v1/casts/{cast_id}/events.",
                },
                "estimate_cents": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Reserved against the caps until the run settles.",
                },
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            }
        ),
        "ArtifactInfo": _object(
            {
                "digest": {"type": "string", "pattern": DIGEST_PATTERN},
                "size_bytes": {"type": "integer", "minimum": 0},
                "expires_at": {"type": "string", "format": "date-time"},
            }
        ),
        "CastStatus": _object(
            {
                "cast_id": {"type": "string"},
                "spell_id": {"type": "string"},
                "spell_version": {"type": "string"},
                "status": {"type": "string", "enum": CAST_STATUSES},
                "mode": {"type": "string", "enum": MODES},
                "run_url": {"type": ["string", "null"]},
                "artifact_url": {
                    "type": ["string", "null"],
                    "format": "uri",
                    "description": "Signed, expiring link to GET /v1/artifacts/{artifact_id}.",
                },
                "artifact": _nullable(_schema("ArtifactInfo")),
                "cost_cents": {
                    "type": ["integer", "null"],
                    "description": "null until the cast is finished; 0 when it failed.",
                },
                "estimate_cents": {"type": "integer", "minimum": 0},
                "currency": {"type": "string"},
                "input_hash": {"type": "string"},
                "created_at": {"type": "string", "format": "date-time"},
                "started_at": {"type": ["string", "null"], "format": "date-time"},
                "finished_at": {"type": ["string", "null"], "format": "date-time"},
                "error": {
                    "description": "Only when `status` is `failed`.",
                    **_object(
                        {
                            "code": {
                                "type": ["string", "null"],
                                "description": "e.g. SPELL_FAILED, TIMEOUT, MEMORY_LIMIT, "
                                "OUTPUT_TOO_LARGE, SANDBOX_UNAVAILABLE, INTERNAL.",
                            },
                            "message": {"type": ["string", "null"]},
                        }
                    ),
                },
            },
            optional=("error",),
        ),
        "CastEvent": {
            "type": "object",
            "description": "The JSON `data` of one Server-Sent Event. Besides the fields listed, "
            "an event carries its stage's data: `status` (queued, running, requeued, "
            "succeeded, failed), `pct` and `message` (progress), `stream` and `line` (log), "
            "`cost_cents`, `duration_ms`, `artifact_digest` (succeeded), `error` {code, "
            "message}, `duration_ms`, `exit_code` (failed), `reason` (requeued).",
            "properties": {
                "cast_id": {"type": "string"},
                "seq": {"type": "integer", "minimum": 1},
                "stage": {"type": "string", "enum": EVENT_STAGES},
                "ts": {"type": "string", "format": "date-time"},
                "status": {"type": "string", "enum": CAST_STATUSES},
                "pct": {"type": "integer", "minimum": 0, "maximum": 100},
                "message": {"type": "string"},
                "stream": {"type": "string", "enum": ["stdout", "stderr"]},
                "line": {"type": "string"},
                "cost_cents": {"type": "integer"},
                "error": {
                    "type": "object",
                    "properties": {
                        "code": {"type": ["string", "null"]},
                        "message": {"type": ["string", "null"]},
                    },
                },
            },
            "required": ["cast_id", "seq", "stage", "ts"],
            "additionalProperties": True,
        },
        "CapView": cap_view,
        "Caps": _object(
            {
                "account": {"type": "string"},
                "period": {
                    "type": "string",
                    "pattern": r"^\d{4}-\d{2}$",
                    "description": "The current UTC calendar month.",
                },
                "monthly": _schema("CapView"),
                "total": _schema("CapView"),
                "monthly_resets_in": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "Seconds until the monthly cap resets.",
                },
            }
        ),
    }
    generated = _pydantic_schemas()
    clash = set(schemas) & set(generated)
    assert not clash, f"component names defined twice: {sorted(clash)}"
    schemas.update(generated)
    schemas["GitHubDelivery"] = _github_delivery()
    return dict(sorted(schemas.items()))


# ---------------------------------------------------------------------- headers & parameters


def _headers() -> dict[str, Schema]:
    def header(description: str, schema: Schema) -> Schema:
        return {"description": description, "schema": schema}

    return {
        "X-RateLimit-Limit": header(
            "Size of the caller's token bucket (requests).", {"type": "integer"}
        ),
        "X-RateLimit-Remaining": header(
            "Requests left in the bucket after this one.", {"type": "integer", "minimum": 0}
        ),
        "X-RateLimit-Reset": header(
            "Unix time (seconds) at which the bucket is full again.", {"type": "integer"}
        ),
        "Retry-After": header(
            "Seconds to wait before retrying.", {"type": "integer", "minimum": 1}
        ),
        "Idempotent-Replayed": header(
            "`true` when this is the stored answer of an earlier request with the same "
            "Idempotency-Key, `false` when the request was carried out now.",
            {"type": "string", "enum": ["true", "false"]},
        ),
        "traceparent": header(
            "W3C trace context of this request (the caller's, or a new one).",
            {"type": "string"},
        ),
    }


def _parameters() -> dict[str, Schema]:
    def query(name: str, description: str, schema: Schema) -> Schema:
        return {"name": name, "in": "query", "description": description, "schema": schema}

    def path(name: str, description: str) -> Schema:
        return {
            "name": name,
            "in": "path",
            "required": True,
            "description": description,
            "schema": {"type": "string"},
        }

    return {
        "traceparent": {
            "name": "traceparent",
            "in": "header",
            "description": "W3C trace context to continue; a new trace is started without it "
            "(or when it is malformed).",
            "schema": {"type": "string"},
        },
        "IdempotencyKey": {
            "name": "Idempotency-Key",
            "in": "header",
            "required": True,
            "description": "Any unique string (e.g. a UUID). The same key with the same request "
            "replays the stored answer (Idempotent-Replayed: true) for 24 h by default; with a "
            "different request it is a 409 IDEMPOTENCY_CONFLICT. Only successful answers are "
            "stored, so a key whose request failed may be retried. Missing or malformed: 422.",
            "schema": {"type": "string", "pattern": "^[!-~]{1,255}$", "maxLength": 255},
        },
        "spell_id": path("spell_id", "The spell id, e.g. `com.example.hello`."),
        "cast_id": path("cast_id", "The cast id returned by the cast request."),
        "artifact_id": path("artifact_id", "The artifact id, as in `artifact_url`."),
        "q": query(
            "q",
            "Case-insensitive substring of the id, name, description or tags.",
            {"type": "string", "maxLength": 200},
        ),
        "tag": query("tag", "Only spells with this exact tag.", {"type": "string"}),
        "limit": query(
            "limit", "Page size.", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}
        ),
        "offset": query(
            "offset",
            "Items to skip (see `next_offset`).",
            {"type": "integer", "minimum": 0, "maximum": 100000, "default": 0},
        ),
        "version": query("version", "Show this version instead of the latest.", {"type": "string"}),
    }


# ------------------------------------------------------------------------------- responses

V1_HEADERS = {
    "X-RateLimit-Limit": _ref("headers", "X-RateLimit-Limit"),
    "X-RateLimit-Remaining": _ref("headers", "X-RateLimit-Remaining"),
    "X-RateLimit-Reset": _ref("headers", "X-RateLimit-Reset"),
    "traceparent": _ref("headers", "traceparent"),
}
OPS_HEADERS = {"traceparent": _ref("headers", "traceparent")}

#: component name -> (status, description, example code, example message)
ERRORS: dict[str, tuple[int, str, str, str]] = {
    "Unauthorized": (
        401,
        "UNAUTHORIZED: the bearer token is missing, malformed or expired.",
        "UNAUTHORIZED",
        "the token has expired; issue a new one",
    ),
    "Forbidden": (
        403,
        "FORBIDDEN: the token's role lacks the scope (`detail.required_scope`) or the "
        "resource belongs to another account.",
        "FORBIDDEN",
        "this token (role caster) lacks the scope 'spell:publish'",
    ),
    "NotFound": (404, "NOT_FOUND.", "NOT_FOUND", "spell 'com.example.nope' not found"),
    "VersionConflict": (
        409,
        "CONFLICT: this id@version is already published with other content.",
        "CONFLICT",
        "com.example.hello@1.0.0 is already published with other content; bump `version`",
    ),
    "IdempotencyConflict": (
        409,
        "IDEMPOTENCY_CONFLICT: the Idempotency-Key was used with a different request.",
        "IDEMPOTENCY_CONFLICT",
        "this Idempotency-Key was used with a different request; send the same request to "
        "get the same answer, or use a new key",
    ),
    "ArtifactExpired": (
        410,
        "ARTIFACT_EXPIRED: the link or the artifact is past its TTL; cast again.",
        "ARTIFACT_EXPIRED",
        "this artifact link has expired; cast the spell again",
    ),
    "PayloadTooLarge": (
        413,
        "PAYLOAD_TOO_LARGE: the body is over the server's limit.",
        "PAYLOAD_TOO_LARGE",
        "the JSON body is larger than 1048576 bytes",
    ),
    "UnsupportedMediaType": (
        415,
        "UNSUPPORTED_MEDIA_TYPE: send `Content-Type: application/json`.",
        "UNSUPPORTED_MEDIA_TYPE",
        "send JSON (Content-Type: application/json), not text/plain",
    ),
    "ValidationError": (
        422,
        "VALIDATION_ERROR: a bad parameter, header or body; `detail.path` points into the body "
        "when the body is at fault.",
        "VALIDATION_ERROR",
        "/input/name: 'name' is a required property",
    ),
    "RateLimited": (
        429,
        "RATE_LIMITED: the caller's token bucket is empty; wait Retry-After seconds.",
        "RATE_LIMITED",
        "too many requests; retry in 2 s",
    ),
    "Internal": (
        500,
        "INTERNAL: an unexpected fault (never a stack trace); retry later.",
        "INTERNAL",
        "internal error; retry, and contact support if it persists",
    ),
}


def _error_response(status: int, description: str, code: str, message: str, **extra: Any) -> Schema:
    err: dict[str, Any] = {"code": code, "message": message, **extra}
    assert STATUS_BY_CODE[code] == status, (code, status)
    headers = dict(V1_HEADERS)
    if status == 429:
        headers["Retry-After"] = _ref("headers", "Retry-After")
    return {
        "description": description,
        "headers": headers,
        "content": {JSON: {"schema": _schema("Error"), "example": {"error": err}}},
    }


def _responses() -> dict[str, Schema]:
    out = {
        name: _error_response(status, description, code, message)
        for name, (status, description, code, message) in ERRORS.items()
    }
    out["RateLimited"]["content"][JSON]["example"]["error"]["retry_after"] = 2
    out["BudgetCapExceeded"] = _error_response(
        402,
        "BUDGET_CAP_EXCEEDED: the estimate would pass the account's monthly or total cap; "
        "nothing was reserved or queued. `retry_after` (body only, no Retry-After header) is "
        "the seconds until the monthly cap resets and is absent when the total cap refused. "
        "`detail` has `estimate_cents`, `cap` (monthly|total) and both caps.",
        "BUDGET_CAP_EXCEEDED",
        "this cast (estimate 500 cents) would pass the account's monthly cap",
        retry_after=86400,
        detail={
            "estimate_cents": 500,
            "cap": "monthly",
            "monthly": {
                "cap_cents": 1000,
                "used_cents": 800,
                "reserved_cents": 0,
                "remaining_cents": 200,
            },
            "total": {
                "cap_cents": None,
                "used_cents": 800,
                "reserved_cents": 0,
                "remaining_cents": None,
            },
        },
    )
    out["CastUnavailable"] = _error_response(
        503,
        "SANDBOX_UNAVAILABLE: the server has no working sandbox, so service runs are refused; "
        "or UNAVAILABLE: the chosen mode is not supported by this server (workflow needs the "
        "GitHub App; clone spells are bought, not cast).",
        "SANDBOX_UNAVAILABLE",
        "service runs are disabled: bubblewrap is not installed",
    )
    out["OpsInternal"] = {
        "description": "INTERNAL: an unexpected fault.",
        "headers": OPS_HEADERS,
        "content": {JSON: {"schema": _schema("Error")}},
    }
    return dict(sorted(out.items()))


def _ok(
    description: str,
    schema: Schema,
    *,
    media: str = JSON,
    trace: bool = True,
    headers: dict[str, Schema] | None = None,
) -> Schema:
    base = V1_HEADERS if trace else {k: v for k, v in V1_HEADERS.items() if k != "traceparent"}
    return {
        "description": description,
        "headers": {**base, **(headers or {})},
        "content": {media: {"schema": schema}},
    }


def _errors(*names: str) -> dict[str, Schema]:
    """The listed error responses plus 429 and 500, which every /v1 operation can answer."""
    status = {name: ERRORS[name][0] for name in ERRORS}
    status.update(BudgetCapExceeded=402, CastUnavailable=503)
    out = {str(status[n]): _ref("responses", n) for n in (*names, "RateLimited", "Internal")}
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------- paths

TRACE = _ref("parameters", "traceparent")
REPLAYED = _ref("headers", "Idempotent-Replayed")
JSON_BODY_ERRORS = ("PayloadTooLarge", "UnsupportedMediaType", "ValidationError")


def _op(
    op_id: str,
    tag: str,
    summary: str,
    description: str,
    responses: dict[str, Any],
    *,
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    public: bool = False,
) -> Schema:
    op: Schema = {
        "operationId": op_id,
        "tags": [tag],
        "summary": summary,
        "description": description,
        "parameters": [*(parameters or []), TRACE],
    }
    if body is not None:
        op["requestBody"] = body
    op["responses"] = responses
    if public:
        op["security"] = []
    return op


def _json_body(schema: str, description: str) -> Schema:
    return {
        "required": True,
        "description": description,
        "content": {JSON: {"schema": _schema(schema)}},
    }


def _param(name: str) -> dict[str, str]:
    return _ref("parameters", name)


def _sort(default: str) -> Schema:
    return {
        "name": "sort",
        "in": "query",
        "description": "popular: most cast first; recent: newest first; price: cheapest first.",
        "schema": {"type": "string", "enum": ["popular", "recent", "price"], "default": default},
    }


def _paths() -> dict[str, Schema]:
    idem = _param("IdempotencyKey")

    def search(default_sort: str) -> list[Schema]:
        return [_param("q"), _param("tag"), _sort(default_sort), _param("limit"), _param("offset")]

    ops_tag = "operations"

    def _plain_error(description: str, code: str, message: str) -> Schema:
        return {
            "description": description,
            "content": {
                JSON: {
                    "schema": _schema("Error"),
                    "example": {"error": {"code": code, "message": message}},
                }
            },
        }

    return {
        "/github/setup": {
            "get": _op(
                "githubSetup",
                "webhooks",
                "After installing the GitHub App",
                "The page GitHub shows the installer after installation (the manifest's "
                "setup_url): what happens next and how accounts are linked.",
                {"200": {"description": "An HTML page.", "content": {"text/html": {}}}},
                parameters=[
                    {
                        "name": "installation_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "setup_action",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ],
                public=True,
            )
        },
        "/webhooks/github": {
            "post": _op(
                "githubWebhook",
                "webhooks",
                "GitHub App webhook",
                "Verifies `X-Hub-Signature-256` (HMAC-SHA256 of the raw body with the webhook "
                "secret) before anything is parsed, stores the raw delivery (deduplicated by "
                "`X-GitHub-Delivery`) and acknowledges; handlers run later from the jobs queue. "
                "`ping` is answered at once. Authenticated by the signature, not a bearer token.",
                {
                    "200": {
                        "description": "A `ping`, or a delivery already received (duplicate).",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    },
                    "202": {
                        "description": "Stored; it will be handled from the queue.",
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["delivery_id", "duplicate"],
                                    "properties": {
                                        "delivery_id": {"type": "string"},
                                        "duplicate": {"type": "boolean"},
                                    },
                                }
                            }
                        },
                    },
                    "401": _plain_error(
                        "Missing or wrong signature.", "UNAUTHORIZED", "webhook signature rejected"
                    ),
                    "413": _plain_error(
                        "Over the delivery size limit.", "PAYLOAD_TOO_LARGE", "too large"
                    ),
                    "422": _plain_error(
                        "Not a GitHub delivery (headers missing).",
                        "VALIDATION_ERROR",
                        "missing X-GitHub-Event header",
                    ),
                    "503": _plain_error(
                        "The GitHub App is not configured.", "UNAVAILABLE", "not configured"
                    ),
                },
                parameters=[
                    {
                        "name": "X-Hub-Signature-256",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^sha256=[0-9a-f]{64}$"},
                    },
                    {
                        "name": "X-GitHub-Event",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "X-GitHub-Delivery",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string", "maxLength": 64},
                    },
                ],
                body=_json_body("GitHubDelivery", "The delivery exactly as GitHub sent it."),
                public=True,
            )
        },
        "/healthz": {
            "get": _op(
                "healthz",
                ops_tag,
                "Liveness",
                "Answers while the process runs; checks nothing else. Not rate limited.",
                {
                    "200": {
                        "description": "Alive.",
                        "headers": OPS_HEADERS,
                        "content": {JSON: {"schema": _schema("Health")}},
                    },
                    "500": _ref("responses", "OpsInternal"),
                },
                public=True,
            )
        },
        "/readyz": {
            "get": _op(
                "readyz",
                ops_tag,
                "Readiness",
                "Checks the database (503 when it does not answer within 2 s) and reports the "
                "sandbox. A missing sandbox does not make the server unready: it keeps serving "
                "and refuses service casts. Not rate limited.",
                {
                    "200": {
                        "description": "Ready.",
                        "headers": OPS_HEADERS,
                        "content": {JSON: {"schema": _schema("Readiness")}},
                    },
                    "503": {
                        "description": "Not ready: the database is unavailable. The body is the "
                        "readiness report, not the Error shape.",
                        "headers": OPS_HEADERS,
                        "content": {JSON: {"schema": _schema("Readiness")}},
                    },
                    "500": _ref("responses", "OpsInternal"),
                },
                public=True,
            )
        },
        "/metrics": {
            "get": _op(
                "metrics",
                ops_tag,
                "Prometheus metrics",
                "Metrics in the Prometheus text exposition format. Not rate limited and not "
                "authenticated: expose it only to the scraper.",
                {
                    "200": {
                        "description": "The metrics.",
                        "headers": OPS_HEADERS,
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "500": _ref("responses", "OpsInternal"),
                },
                public=True,
            )
        },
        "/v1/openapi.json": {
            "get": _op(
                "getOpenApi",
                ops_tag,
                "This document",
                "The OpenAPI 3.1 description of this API.",
                {
                    "200": _ok("The OpenAPI document.", {"type": "object"}),
                    **_errors(),
                },
                public=True,
            )
        },
        "/v1/bundles": {
            "post": _op(
                "uploadBundle",
                "spells",
                "Upload a service bundle",
                "Upload the code of a service spell as a gzip-compressed tar archive of regular "
                "files and folders (no links, no absolute or `..` paths). Reference the "
                "returned digest as `execution.bundle` when publishing. Uploading the same "
                "bytes again is harmless. Needs the `spell:publish` scope.",
                {
                    "201": _ok("Stored.", _schema("BundleUploaded")),
                    **_errors("Unauthorized", "Forbidden", "PayloadTooLarge", "ValidationError"),
                },
                body={
                    "required": True,
                    "description": "The tar.gz bytes (the Content-Type is not checked).",
                    "content": {
                        "application/gzip": {"schema": {"contentMediaType": "application/gzip"}},
                        "application/octet-stream": {
                            "schema": {"contentMediaType": "application/octet-stream"}
                        },
                    },
                },
            )
        },
        "/v1/spells": {
            "post": _op(
                "publishSpell",
                "spells",
                "Publish a spell version",
                "Register a spell or a new version of it (SPEC §5, §15). Publishing the same "
                "document again is a no-op (200); other content under an existing version is "
                "409 CONFLICT; only the author may publish versions of a spell (403). Needs "
                "the `spell:publish` scope.",
                {
                    "200": _ok("This exact version was already published.", _schema("SpellDetail")),
                    "201": _ok("Published.", _schema("SpellDetail")),
                    **_errors("Unauthorized", "Forbidden", "VersionConflict", *JSON_BODY_ERRORS),
                },
                body=_json_body("SpellDocument", "The spell document."),
            ),
            "get": _op(
                "listSpells",
                "spells",
                "Search spells",
                "Search the published spells the caller may see: public ones plus the caller's "
                "own (any visibility).",
                {
                    "200": _ok("A page of spell summaries.", _schema("SpellList")),
                    **_errors("Unauthorized", "ValidationError"),
                },
                parameters=search("recent"),
            ),
        },
        "/v1/spells/{spell_id}": {
            "get": _op(
                "getSpell",
                "spells",
                "Spell detail",
                "A spell version with its pricing, input schema, modes and document. Private "
                "spells are visible to their author, operators and auditors only (others get "
                "404).",
                {
                    "200": _ok("The spell.", _schema("SpellDetail")),
                    **_errors("Unauthorized", "NotFound"),
                },
                parameters=[_param("spell_id"), _param("version")],
            )
        },
        "/v1/spells/{spell_id}:cast": {
            "post": _op(
                "castSpell",
                "casts",
                "Cast a spell",
                "Validate the input, check the budget caps, reserve the estimate and queue the "
                "run; answers at once with the cast id and the progress stream (SPEC §4, §5). "
                "Refused with 402 before anything runs when the estimate would pass a cap. "
                "Needs the `cast:invoke` scope and an Idempotency-Key: the same key and request "
                "never start two runs.",
                {
                    "202": _ok(
                        "Accepted and queued (or the replayed answer of an earlier request).",
                        _schema("CastAccepted"),
                        headers={"Idempotent-Replayed": REPLAYED},
                    ),
                    **_errors(
                        "BudgetCapExceeded",
                        "Unauthorized",
                        "Forbidden",
                        "NotFound",
                        "IdempotencyConflict",
                        "CastUnavailable",
                        *JSON_BODY_ERRORS,
                    ),
                },
                parameters=[_param("spell_id"), idem],
                body=_json_body("CastRequest", "The input and options of the cast."),
            )
        },
        "/v1/casts/{cast_id}": {
            "get": _op(
                "getCast",
                "casts",
                "Cast status",
                "Status, cost and, once succeeded, the signed artifact link. Visible to the "
                "caster, operators and auditors (others get 404).",
                {
                    "200": _ok("The cast.", _schema("CastStatus")),
                    **_errors("Unauthorized", "NotFound"),
                },
                parameters=[_param("cast_id")],
            )
        },
        "/v1/casts/{cast_id}/events": {
            "get": _op(
                "streamCastEvents",
                "casts",
                "Cast progress (Server-Sent Events)",
                "Every progress event of the cast in order, as Server-Sent Events: first "
                "`retry: 1000`, then for each event `id: <seq>`, `event: <stage>` and `data: "
                "<CastEvent JSON>` (see the CastEvent schema). The stream ends after the "
                "`succeeded` or `failed` event; a `: keep-alive` comment is sent every 15 s "
                "while idle. Reconnect with Last-Event-ID to resume after that event.",
                {
                    "200": _ok(
                        "The event stream.",
                        {"type": "string", "description": "text/event-stream frames."},
                        media="text/event-stream",
                        trace=False,
                        headers={
                            "Cache-Control": {
                                "description": "Always `no-cache`.",
                                "schema": {"type": "string"},
                            },
                        },
                    ),
                    **_errors("Unauthorized", "NotFound", "ValidationError"),
                },
                parameters=[
                    _param("cast_id"),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": "Resume after this event `seq` (the last `id:` seen). "
                        "Not an integer: 422.",
                        "schema": {"type": "string", "pattern": r"^-?\d+$"},
                    },
                    {
                        "name": "last_event_id",
                        "in": "query",
                        "description": "The same as Last-Event-ID, for clients that cannot "
                        "set headers; the header wins when both are sent.",
                        "schema": {"type": "string", "pattern": r"^-?\d+$"},
                    },
                ],
            )
        },
        "/v1/billing/caps": {
            "get": _op(
                "getCaps",
                "billing",
                "Budget caps",
                "The account's monthly and total caps with what is used and reserved.",
                {
                    "200": _ok("The caps.", _schema("Caps")),
                    **_errors("Unauthorized", "Forbidden", "NotFound"),
                },
                parameters=[
                    {
                        "name": "account",
                        "in": "query",
                        "description": "Operators only: another account (others get 403).",
                        "schema": {"type": "string"},
                    }
                ],
            ),
            "post": _op(
                "setCaps",
                "billing",
                "Set budget caps",
                "Set or remove the account's monthly and/or total cap. Needs a caster or "
                "operator token; only operators may set another account's caps (`account`).",
                {
                    "200": _ok(
                        "The caps now (or the replayed answer of an earlier request).",
                        _schema("Caps"),
                        headers={"Idempotent-Replayed": REPLAYED},
                    ),
                    **_errors(
                        "Unauthorized",
                        "Forbidden",
                        "NotFound",
                        "IdempotencyConflict",
                        *JSON_BODY_ERRORS,
                    ),
                },
                parameters=[idem],
                body=_json_body("CapsRequest", "The caps to change."),
            ),
        },
        "/v1/catalog/spells": {
            "get": _op(
                "searchCatalog",
                "catalog",
                "Browse the catalog",
                "Search the public spells (SPEC §22). No token needed; a token that is sent "
                "must be valid (else 401).",
                {
                    "200": _ok("A page of spell summaries.", _schema("SpellList")),
                    **_errors("Unauthorized", "ValidationError"),
                },
                parameters=search("popular"),
                public=True,
            )
        },
        "/v1/catalog/spells/{spell_id}": {
            "get": _op(
                "getCatalogSpell",
                "catalog",
                "Catalog spell detail",
                "Price plans, input schema and modes of a public or unlisted spell (SPEC §22). "
                "No token needed; with a valid token the caller's own private spells are shown "
                "too; an invalid token is a 401.",
                {
                    "200": _ok("The spell.", _schema("SpellDetail")),
                    **_errors("Unauthorized", "NotFound"),
                },
                parameters=[_param("spell_id"), _param("version")],
                public=True,
            )
        },
        "/v1/artifacts/{artifact_id}": {
            "get": _op(
                "downloadArtifact",
                "artifacts",
                "Download an artifact",
                "The zip of a cast's output behind a signed, expiring link (`artifact_url` of "
                "the cast). No bearer token: the signature is the credential. Byte ranges and "
                "conditional requests are honoured.",
                {
                    "200": _ok(
                        "The zip archive.",
                        {"type": "string", "contentMediaType": "application/zip"},
                        media="application/zip",
                        headers={
                            "Content-Disposition": {
                                "description": 'attachment; filename="<cast_id>.zip"',
                                "schema": {"type": "string"},
                            },
                            "Digest": {
                                "description": "RFC 3230 `sha-256=<base64>` digest of the zip.",
                                "schema": {
                                    "type": "string",
                                    "pattern": "^sha-256=[A-Za-z0-9+/]{43}=$",
                                },
                            },
                            "Cache-Control": {
                                "description": "Always `private, no-store`.",
                                "schema": {"type": "string"},
                            },
                        },
                    ),
                    "206": _ok(
                        "The requested byte range (a `Range` request).",
                        {"type": "string", "contentMediaType": "application/zip"},
                        media="application/zip",
                    ),
                    "304": {
                        "description": "Not modified (conditional request).",
                        "headers": V1_HEADERS,
                    },
                    **_errors("Unauthorized", "ArtifactExpired"),
                },
                parameters=[
                    _param("artifact_id"),
                    {
                        "name": "exp",
                        "in": "query",
                        "required": True,
                        "description": "Expiry of the link (Unix seconds). Missing or bad: 401; "
                        "past: 410.",
                        "schema": {"type": "string", "pattern": r"^-?\d+$"},
                    },
                    {
                        "name": "sig",
                        "in": "query",
                        "required": True,
                        "description": "Signature of (artifact_id, exp). Missing or bad: 401.",
                        "schema": {"type": "string"},
                    },
                ],
                public=True,
            )
        },
    }


# ------------------------------------------------------------------- billing (issue #4)


def _billing_schemas() -> dict[str, Schema]:
    return {
        "StripeEvent": {
            "type": "object",
            "description": "A Stripe event, exactly as Stripe sent it "
            "(https://docs.stripe.com/api/events/object).",
            "required": ["id", "object", "type", "created", "data"],
            "properties": {
                "id": {"type": "string", "pattern": "^evt_"},
                "object": {"const": "event"},
                "type": {"type": "string"},
                "created": {"type": "integer"},
                "data": {"type": "object"},
            },
        },
        "BillingOverview": {
            "type": "object",
            "description": "The account's billing. In ledger-only mode (no Stripe configured) "
            "only `account`, `mode` and `caps` are present.",
            "required": ["account", "mode", "caps"],
            "properties": {
                "account": {"type": "string"},
                "mode": {"type": "string", "enum": ["stripe", "ledger"]},
                "customer": {"type": ["string", "null"]},
                "payment_method": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "string", "enum": ["none", "active", "failed"]},
                        "id": {"type": ["string", "null"]},
                    },
                },
                "past_due": {"type": "boolean"},
                "past_due_reason": {"type": ["string", "null"]},
                "plan": {"type": ["string", "null"]},
                "subscription_status": {"type": ["string", "null"]},
                "pending": {
                    "type": "array",
                    "description": "Settled amounts below Stripe's minimum charge, waiting to "
                    "be collected together.",
                    "items": {"type": "object"},
                },
                "charges": {"type": "array", "items": {"type": "object"}},
                "entitlements": {"type": "array", "items": {"type": "object"}},
                "caps": _schema("Caps"),
            },
        },
        "BillingSetup": _object(
            {
                "url": {"type": "string", "format": "uri"},
                "session_id": {"type": "string"},
                "customer": {"type": "string"},
            }
        ),
        "BillingSubscribe": _object(
            {
                "url": {"type": "string", "format": "uri"},
                "session_id": {"type": "string"},
                "customer": {"type": "string"},
                "plan": {"type": "string"},
            }
        ),
        "SubscribeRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["plan"],
            "properties": {"plan": {"type": "string", "minLength": 1}},
        },
        "Plans": _object(
            {
                "plans": {
                    "type": "array",
                    "items": _object(
                        {
                            "name": {"type": "string"},
                            "base_price": {"type": ["string", "null"]},
                            "metered_prices": {"type": "array", "items": {"type": "string"}},
                        }
                    ),
                }
            }
        ),
        "UsageRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["usage"],
            "properties": {
                "usage": {
                    "type": "object",
                    "additionalProperties": False,
                    "description": "Quantities in the meters' units; at least one positive.",
                    "properties": {
                        m: {"type": ["integer", "null"], "minimum": 0}
                        for m in ("casts", "compute_ms", "egress_mb")
                    },
                },
                "account": {
                    "type": ["string", "null"],
                    "description": "Operators only: another account.",
                },
                "timestamp": {
                    "type": ["integer", "null"],
                    "description": "Unix seconds, within the past 35 days (default: now).",
                },
            },
        },
        "UsageRecorded": _object(
            {
                "usage_id": {"type": "string"},
                "account": {"type": "string"},
                "usage": {"type": "object", "additionalProperties": {"type": "integer"}},
                "timestamp": {"type": "integer"},
                "identifiers": {
                    "type": "array",
                    "description": "The meter events' identifiers (`{usage_id}:{meter}`).",
                    "items": {"type": "string"},
                },
                "status": {
                    "type": "string",
                    "enum": ["queued", "recorded"],
                    "description": "`queued`: to be sent to Stripe as meter events; "
                    "`recorded`: ledger-only mode.",
                },
            }
        ),
    }


def _billing_paths() -> dict[str, Schema]:
    plain_headers = {"traceparent": _ref("headers", "traceparent")}

    def plain_error(status: int, description: str, code: str, message: str) -> Schema:
        assert STATUS_BY_CODE[code] == status, (code, status)
        return {
            "description": description,
            "headers": plain_headers,
            "content": {
                JSON: {
                    "schema": _schema("Error"),
                    "example": {"error": {"code": code, "message": message}},
                }
            },
        }

    unavailable = _error_response(
        503,
        "UNAVAILABLE: Stripe billing is not configured, or Stripe cannot be reached.",
        "UNAVAILABLE",
        "Stripe billing is not configured (STRIPE_API_KEY)",
    )
    return {
        "/v1/billing": {
            "get": _op(
                "getBilling",
                "billing",
                "Billing overview",
                "Payment method status, past-due state, amounts pending below the minimum "
                "charge, recent charges, entitlements and the caps.",
                {
                    "200": _ok("The account's billing.", _schema("BillingOverview")),
                    **_errors("Unauthorized", "Forbidden", "NotFound"),
                },
                parameters=[
                    {
                        "name": "account",
                        "in": "query",
                        "description": "Operators only: another account (others get 403).",
                        "schema": {"type": "string"},
                    }
                ],
            )
        },
        "/v1/billing/setup": {
            "post": _op(
                "setupBilling",
                "billing",
                "Save a payment method",
                "Creates a Stripe Checkout Session in `setup` mode for the caller's account and "
                "returns its URL; once the caster finishes it, paid casts are accepted (and an "
                "account that was past due is in good standing again).",
                {
                    "201": _ok("The Checkout URL.", _schema("BillingSetup")),
                    **_errors("Unauthorized", "Forbidden"),
                    "503": unavailable,
                },
            )
        },
        "/v1/billing/plans": {
            "get": _op(
                "listPlans",
                "billing",
                "Subscription plans",
                "The metered subscription plans configured on this server (`SPELL_STRIPE_PLANS`).",
                {
                    "200": _ok("The plans.", _schema("Plans")),
                    **_errors("Unauthorized"),
                    "503": unavailable,
                },
            )
        },
        "/v1/billing/subscribe": {
            "post": _op(
                "subscribePlan",
                "billing",
                "Subscribe to a metered plan",
                "Creates a Stripe Checkout Session in `subscription` mode for the plan and "
                "returns its URL; once the caster finishes it, the account's metered casts are "
                "reported to the subscription's Billing Meters instead of being charged per "
                "cast. 409 CONFLICT when the account already has a subscription.",
                {
                    "201": _ok("The Checkout URL.", _schema("BillingSubscribe")),
                    **_errors("Unauthorized", "Forbidden", *JSON_BODY_ERRORS),
                    "409": _error_response(
                        409,
                        "CONFLICT: the account already has a live subscription.",
                        "CONFLICT",
                        "the account already has a active subscription (pro)",
                    ),
                    "503": unavailable,
                },
                body=_json_body("SubscribeRequest", "The plan."),
            )
        },
        "/v1/billing/usage": {
            "post": _op(
                "reportUsage",
                "billing",
                "Report metered usage",
                "Records usage (in the meters' units) for the caller's account, or any account "
                "for operators, in the ledger and — with Stripe billing — sends it to the "
                "account's metered subscription as Billing Meter events, off the request path, "
                "with identifiers Stripe deduplicates. Needs an Idempotency-Key. 409 CONFLICT "
                "when the account has no metered subscription (with Stripe billing), 409 "
                "IDEMPOTENCY_CONFLICT when the key was used for another request.",
                {
                    "201": _ok(
                        "Recorded (or the replayed answer of an earlier request).",
                        _schema("UsageRecorded"),
                        headers={"Idempotent-Replayed": REPLAYED},
                    ),
                    **_errors("Unauthorized", "Forbidden", "NotFound", *JSON_BODY_ERRORS),
                    "409": _error_response(
                        409,
                        "IDEMPOTENCY_CONFLICT: the Idempotency-Key was used with a different "
                        "request; or CONFLICT: the account has no metered subscription (Stripe "
                        "billing on).",
                        "IDEMPOTENCY_CONFLICT",
                        "this Idempotency-Key was used with a different request; send the same "
                        "request to get the same answer, or use a new key",
                    ),
                },
                parameters=[_param("IdempotencyKey")],
                body=_json_body("UsageRequest", "The usage to report."),
            )
        },
        "/webhooks/stripe": {
            "post": _op(
                "stripeWebhook",
                "webhooks",
                "Stripe webhook",
                "Verifies `Stripe-Signature` (HMAC-SHA256 of `{t}.{raw body}` with the endpoint "
                "secret, timestamp within 300 s) before anything is parsed, stores the raw event "
                "(deduplicated by event id) and acknowledges; handlers run later from the jobs "
                "queue, safe against redelivery and out-of-order events. Unknown event types "
                "are acknowledged and ignored. Authenticated by the signature.",
                {
                    "200": {
                        "description": "Received (or a duplicate of an event already received).",
                        "headers": plain_headers,
                        "content": {
                            JSON: {
                                "schema": _object(
                                    {
                                        "received": {"type": "boolean"},
                                        "event_id": {"type": "string"},
                                        "duplicate": {"type": "boolean"},
                                    }
                                )
                            }
                        },
                    },
                    "401": plain_error(
                        401,
                        "Missing, wrong or stale signature.",
                        "UNAUTHORIZED",
                        "Stripe signature rejected: signature does not match the payload",
                    ),
                    "413": plain_error(
                        413, "Over the size limit.", "PAYLOAD_TOO_LARGE", "too large"
                    ),
                    "422": plain_error(
                        422, "Not a Stripe event.", "VALIDATION_ERROR", "not a Stripe event"
                    ),
                    "503": plain_error(
                        503, "Stripe billing is not configured.", "UNAVAILABLE", "not configured"
                    ),
                },
                parameters=[
                    {
                        "name": "Stripe-Signature",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^t=\\d+,"},
                    }
                ],
                body=_json_body("StripeEvent", "The event exactly as Stripe sent it."),
                public=True,
            )
        },
    }


# ---------------------------------------------------------------------------------- document


def _oidc_schemas() -> dict[str, Schema]:
    return {
        "OidcTokenRequest": {
            **_object(
                {
                    "token": {
                        "type": "string",
                        "minLength": 1,
                        "description": "The GitHub Actions OIDC token (an RS256 JWT), requested "
                        "with the platform's audience (`SPELL_OIDC_AUDIENCE`).",
                    },
                    "ttl": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 3600,
                        "description": "Ask for a shorter-lived token (seconds).",
                    },
                },
                optional=("ttl",),
            ),
            "description": "A GitHub Actions OIDC token to trade for a platform token.",
        },
        "OidcToken": _object(
            {
                "token": {"type": "string", "description": "A platform bearer token (HS256 JWT)."},
                "token_type": {"const": "Bearer"},
                "expires_in": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 3600,
                    "description": "Seconds: the OIDC token's remaining life, at most 1 hour "
                    "(and at most `ttl`).",
                },
                "expires_at": {"type": "string", "format": "date-time"},
                "account": {"type": "string", "description": "The linked account."},
                "role": {"type": "string", "enum": ["caster", "maker", "auditor"]},
                "repository": {
                    "type": "string",
                    "description": "The token's `repository` claim (lower-case OWNER/REPO).",
                },
            }
        ),
    }


def _oidc_paths() -> dict[str, Schema]:
    unavailable = _error_response(
        503,
        "UNAVAILABLE: the OIDC issuer's signing keys (JWKS) cannot be fetched.",
        "UNAVAILABLE",
        "cannot fetch the OIDC issuer's signing keys: "
        "https://token.actions.githubusercontent.com/.well-known/jwks answered HTTP 502",
    )
    return {
        "/v1/oidc/token": {
            "post": _op(
                "exchangeOidcToken",
                "auth",
                "Sign in with a GitHub Actions OIDC token",
                "Trade a GitHub Actions OIDC token for a short-lived platform bearer token (as "
                "PyPI's trusted publishing does). The token's signature is checked against the "
                "issuer's JWKS (RS256 only), then `iss` (`SPELL_OIDC_ISSUER`), `aud` "
                "(`SPELL_OIDC_AUDIENCE`), `exp`/`nbf`/`iat` (30 s leeway); its `repository` "
                "must be linked by an operator (`spell oidc allow OWNER/REPO|OWNER/* --account "
                "A --role caster`), which names the account and role of the issued token. "
                "Forged, expired, wrongly addressed or unlinked tokens answer 401. No bearer "
                "token: the OIDC token is the credential.",
                {
                    "200": _ok("The platform token.", _schema("OidcToken")),
                    **_errors("Unauthorized", *JSON_BODY_ERRORS),
                    "503": unavailable,
                },
                body=_json_body("OidcTokenRequest", "The OIDC token."),
                public=True,
            )
        },
    }


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "Spell Platform",
            "version": "1",
            "summary": "Publish spells, cast them, follow their progress, fetch their artifacts.",
            "description": "Every /v1 response carries X-RateLimit-Limit, X-RateLimit-Remaining "
            "and X-RateLimit-Reset (a token bucket per principal, or per IP without a token); "
            "over the limit the answer is 429 RATE_LIMITED with Retry-After. Every error has "
            "one shape, the Error schema. Authenticate with `Authorization: Bearer <token>` "
            "(a short-lived HS256 JWT issued by an operator with `spell token issue`). "
            "Unknown paths answer 404 NOT_FOUND and unsupported methods 405 "
            "METHOD_NOT_ALLOWED, both in the Error shape.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [],
        "security": [{"bearerAuth": []}],
        "tags": [
            {"name": "spells", "description": "Publishing and finding spells (SPEC §5)."},
            {"name": "catalog", "description": "The public catalog (SPEC §22)."},
            {"name": "casts", "description": "Casting and following casts (SPEC §4, §5)."},
            {"name": "billing", "description": "Budget caps (SPEC §7)."},
            {"name": "artifacts", "description": "Signed, expiring artifact downloads."},
            {"name": "operations", "description": "Health, readiness, metrics, this document."},
            {"name": "auth", "description": "Sign-in with a GitHub Actions OIDC token."},
        ],
        "paths": {**_paths(), **_billing_paths(), **_oidc_paths()},
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A short-lived HS256 JWT; its role (maker, caster, operator, "
                    "auditor) decides its scopes.",
                }
            },
            "schemas": {**_schemas(), **_billing_schemas(), **_oidc_schemas()},
            "parameters": _parameters(),
            "headers": _headers(),
            "responses": _responses(),
        },
    }


def openapi_document(server_url: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document, with ``server_url`` (scheme://host[:port]) as its server."""
    doc = copy.deepcopy(_document())
    doc["servers"] = [{"url": server_url.rstrip("/") or "/"}]
    return doc
