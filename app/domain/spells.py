"""Spell documents (SPEC §15): the validated shape makers publish, and semver ordering."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SPELL_ID_RE = r"^[a-z0-9][a-z0-9-]*(\.[a-z0-9][a-z0-9-]*)+$"
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
BUNDLE_RE = r"^sha256:[0-9a-f]{64}$"
REPO_RE = r"^[A-Za-z0-9_.-]{1,39}/[A-Za-z0-9_.-]{1,100}$"
Mode = Literal["workflow", "service", "clone"]
Visibility = Literal["public", "unlisted", "private"]
Tag = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkflowTarget(_Strict):
    repo: str = Field(pattern=REPO_RE)
    workflow_id: str = Field(min_length=1, max_length=255)
    dispatch: Literal["workflow_dispatch", "repository_dispatch"] = "workflow_dispatch"
    ref: str | None = Field(default=None, max_length=255)


class CloneTarget(_Strict):
    template: str = Field(pattern=REPO_RE)
    license_url: str | None = Field(default=None, max_length=2000)


class NetworkPolicy(_Strict):
    allow: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]+:\d{1,5}$")]] = Field(
        default_factory=list, max_length=32
    )


class Execution(_Strict):
    mode: Mode
    allowed_modes: list[Mode] | None = Field(
        default=None, description="Modes a cast may choose instead of `mode`."
    )
    workflow: WorkflowTarget | None = None
    clone: CloneTarget | None = None
    entrypoint: str | None = Field(default=None, min_length=1, max_length=1000)
    bundle: str | None = Field(default=None, pattern=BUNDLE_RE)
    timeout_sec: int = Field(default=60, ge=1, le=3600)
    memory_mb: int = Field(default=256, ge=16, le=8192)
    network: NetworkPolicy | None = None

    @model_validator(mode="after")
    def _mode_needs(self) -> Execution:
        modes = set(self.allowed_modes or []) | {self.mode}
        if "service" in modes and (self.entrypoint is None or self.bundle is None):
            raise ValueError("service mode needs `entrypoint` and `bundle` (sha256:…)")
        if "workflow" in modes and self.workflow is None:
            raise ValueError("workflow mode needs `workflow` {repo, workflow_id}")
        if "clone" in modes and self.clone is None:
            raise ValueError("clone mode needs `clone` {template}")
        return self


class Meter(_Strict):
    unit_cents: int = Field(ge=0, le=1_000_000, description="Price of `per` units, in cents.")
    per: int = Field(default=1, ge=1, description="Units the unit price covers.")
    max: int = Field(
        ge=0, le=1_000_000_000, description="Most units one cast may use (bounds the estimate)."
    )


class Meters(_Strict):
    casts: Meter | None = None
    compute_ms: Meter | None = None
    egress_mb: Meter | None = None


class Pricing(_Strict):
    model: Literal["flat", "metered", "one_time"]
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    flat_cents: int | None = Field(default=None, ge=0, le=100_000_000)
    base_cents: int | None = Field(default=None, ge=0, le=100_000_000)
    meters: Meters | None = None
    one_time_cents: int | None = Field(default=None, ge=0, le=100_000_000)

    @model_validator(mode="after")
    def _model_needs(self) -> Pricing:
        if self.model == "flat" and self.flat_cents is None:
            raise ValueError("flat pricing needs `flat_cents`")
        if self.model == "metered" and self.meters is None:
            raise ValueError("metered pricing needs `meters` with declared limits")
        if self.model == "one_time" and self.one_time_cents is None:
            raise ValueError("one_time pricing needs `one_time_cents`")
        return self


class Sla(_Strict):
    max_duration_sec: int | None = Field(default=None, ge=1, le=86_400)


class SpellDocument(_Strict):
    """The document a maker publishes. Unknown fields are rejected."""

    id: str = Field(pattern=SPELL_ID_RE, max_length=128)
    name: str = Field(min_length=1, max_length=100)
    version: str = Field(default="1.0.0", max_length=64)
    description: str = Field(default="", max_length=4000)
    visibility: Visibility = "public"
    tags: list[Tag] = Field(default_factory=list, max_length=16)
    execution: Execution
    pricing: Pricing = Field(default_factory=lambda: Pricing(model="flat", flat_cents=0))
    inputs: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    sla: Sla | None = None
    regions: list[Annotated[str, Field(pattern=r"^[a-z0-9-]{1,32}$")]] = Field(
        default_factory=list, max_length=16
    )

    @field_validator("version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not SEMVER_RE.match(v):
            raise ValueError(f"{v!r} is not a semantic version (MAJOR.MINOR.PATCH)")
        return v

    @field_validator("inputs")
    @classmethod
    def _json_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            Draft202012Validator.check_schema(v)
        except SchemaError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(root)"
            raise ValueError(f"not a valid JSON Schema at {where}: {e.message}") from None
        if v.get("type", "object") != "object":
            raise ValueError("the input schema must describe an object (type: object)")
        remote = _remote_ref(v)
        if remote is not None:
            raise ValueError(
                f"$ref {remote!r} points outside the schema; only local refs (#/...) are allowed"
            )
        return v

    def allows_mode(self, mode: str) -> bool:
        return mode == self.execution.mode or mode in (self.execution.allowed_modes or [])


def _remote_ref(node: Any) -> str | None:
    """The first ``$ref``/``$dynamicRef`` that is not a local pointer, if any."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("$ref", "$dynamicRef") and isinstance(v, str) and not v.startswith("#"):
                return v
            found = _remote_ref(v)
            if found is not None:
                return found
    elif isinstance(node, list):
        for item in node:
            found = _remote_ref(item)
            if found is not None:
                return found
    return None


class ParsedSpell:
    """A stored spell version, validated once and kept with its input validator."""

    __slots__ = ("doc", "validator")

    def __init__(self, document: dict[str, Any]) -> None:
        self.doc = SpellDocument.model_validate(document)
        self.validator = Draft202012Validator(self.doc.inputs)

    def validate_input(self, data: Any) -> list[tuple[str, str]]:
        return validate_input(self.doc.inputs, data, validator=self.validator)


def semver_key(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
    """Sort key for SemVer 2.0.0 precedence (pre-releases sort before the release)."""
    m = SEMVER_RE.match(version)
    if not m:
        raise ValueError(f"not a semantic version: {version!r}")
    major, minor, patch, pre = int(m[1]), int(m[2]), int(m[3]), m[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    parts: list[tuple[int, int | str]] = []
    for p in pre.split("."):
        parts.append((0, int(p)) if p.isdigit() else (1, p))
    return (major, minor, patch, 0, tuple(parts))


def validate_input(
    schema: dict[str, Any], data: Any, *, validator: Draft202012Validator | None = None
) -> list[tuple[str, str]]:
    """Check cast input against the spell's schema; return ``(path, message)`` for each error.

    Pass a prepared ``validator`` for ``schema`` to skip building one per call.
    """
    validator = validator or Draft202012Validator(schema)
    out: list[tuple[str, str]] = []
    try:
        errors = list(validator.iter_errors(data))
    except Exception as e:  # an unresolvable $ref and the like: the schema's fault, not a crash
        return [("/", f"the spell's input schema cannot be applied: {type(e).__name__}")]
    for err in sorted(errors, key=lambda e: list(map(str, e.absolute_path))):
        path = "/" + "/".join(str(p) for p in err.absolute_path)
        if err.validator == "required" and isinstance(err.validator_value, list):
            # Name the missing property itself, not its parent.
            missing = err.message.split("'")[1] if "'" in err.message else ""
            path = path.rstrip("/") + "/" + missing
        out.append((path, err.message))
    return out
