"""Spell documents (SPEC §15): the validated shape makers publish, and semver ordering."""

from __future__ import annotations

import ipaddress
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


#: Most ``host:port`` entries one spell may declare in ``execution.network.allow``.
MAX_NETWORK_ALLOW = 32
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
#: Addresses that are never a spell's business, whatever ``ipaddress`` says about them: cloud
#: metadata and control endpoints (several are public or in ranges Python calls global).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean instance metadata
        "169.254.169.123",  # AWS time sync
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.253",  # AWS VPC DNS
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS IPv6 DNS
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure WireServer (a public address)
        "192.0.0.192",  # Oracle Cloud metadata
    )
)
#: Ranges refused besides what ``ipaddress``'s properties catch (CGNAT is neither private nor
#: global; 192.0.0.0/24 is IETF protocol space; NAT64 and 6to4 are decoded as well).
BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",
        "192.0.0.0/24",
        "198.18.0.0/15",
        "240.0.0.0/4",
        "64:ff9b:1::/48",
        "fec0::/10",
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_refusal(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, *, allow_loopback: bool = False
) -> str | None:
    """Why a spell may not reach ``ip`` (a short phrase), or None for a public address.

    Refused: private, loopback, link-local, multicast, reserved, unspecified, site-local,
    CGNAT (100.64/10), anything ``ipaddress`` does not call global, the ranges in
    :data:`BLOCKED_NETWORKS` and the cloud metadata addresses in :data:`METADATA_ADDRESSES`.
    An IPv6 address embedding an IPv4 one (IPv4-mapped, NAT64, 6to4, Teredo) is refused if the
    embedded address is. ``allow_loopback`` lets loopback through (tests only: never set from
    configuration).
    """
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_loopback:
        return None if allow_loopback else "a loopback address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address] = []
        if ip.ipv4_mapped is not None:
            embedded.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        if ip.teredo is not None:
            embedded.extend(ip.teredo)
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        for inner in embedded:
            why = address_refusal(inner, allow_loopback=allow_loopback)
            if why is not None:
                return f"{why} (embedded in {ip.compressed})"
        if ip.ipv4_mapped is not None:
            return None  # the IPv4 address decides (it passed)
        if ip.is_site_local:
            return "a site-local address"
    for flag, what in (
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
    ):
        if flag:
            return what
    if any(ip in net for net in BLOCKED_NETWORKS):
        return "a non-public address"
    if not ip.is_global:
        return "a non-public address"
    return None


def parse_network_target(entry: str) -> tuple[str, int]:
    """``host:port`` → (host in lower case without a trailing dot, port); ValueError if bad.

    ``host`` is a DNS name of at least two labels (letters, digits, hyphens; IDNs in their
    ``xn--`` form) or an IP literal (IPv6 in brackets: ``[2001:db8::1]:443``). No wildcards, no
    user info, no path; ``localhost`` names are refused (they always mean this machine).
    """
    if not isinstance(entry, str) or not entry or len(entry) > 262:
        raise ValueError("expected host:port")
    if entry.startswith("["):
        host, sep, port = entry[1:].partition("]:")
        if not sep:
            raise ValueError("an IPv6 address needs brackets and a port: [2001:db8::1]:443")
    else:
        host, sep, port = entry.rpartition(":")
        if not sep or not host:
            raise ValueError("expected host:port")
    if not _PORT_RE.match(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not 1-65535")
    host = host.lower()
    if "*" in host:
        raise ValueError("wildcards are not allowed; list each host")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and not entry.startswith("["):
            raise ValueError("an IPv6 address needs brackets: [2001:db8::1]:443")
        return ip.compressed, int(port)
    if entry.startswith("["):
        raise ValueError(f"{host!r} is not an IPv6 address")
    host = host.removesuffix(".")
    labels = host.split(".")
    if len(host) > 253 or len(labels) < 2 or not all(_LABEL_RE.match(lb) for lb in labels):
        raise ValueError(
            f"{host!r} is not a fully qualified host name (letters, digits, hyphens, dots)"
        )
    if labels[-1].isdigit():
        raise ValueError(f"{host!r} is neither a host name nor an IP address")
    if labels[-1] == "localhost":
        raise ValueError("localhost is this machine, never reachable from a spell")
    return host, int(port)


def format_network_target(host: str, port: int) -> str:
    """The canonical ``host:port`` of a parsed target (IPv6 in brackets): how allow-list
    entries are stored and compared, and how a refused target is shown."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def canonical_network_target(entry: str) -> str:
    """``entry`` in its canonical form: ``API.Example.COM.:443`` → ``api.example.com:443``,
    ``[2606:4700:0::1]:443`` → ``[2606:4700::1]:443``; ValueError if bad (see
    :func:`parse_network_target`)."""
    return format_network_target(*parse_network_target(entry))


def network_target_problem(entry: str) -> str | None:
    """Why ``entry`` may not be in ``network.allow``, or None (see :func:`parse_network_target`;
    IP literals must also be public addresses)."""
    try:
        host, _ = parse_network_target(entry)
    except ValueError as e:
        return str(e)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    why = address_refusal(ip)
    return None if why is None else f"{host} is {why}"


class NetworkPolicy(_Strict):
    """``execution.network``: the hosts a service run may reach through the platform's proxy.

    Without it (or with an empty ``allow``) the run has no network at all.
    """

    allow: list[str] = Field(
        default_factory=list,
        max_length=MAX_NETWORK_ALLOW,
        description='Exact "host:port" entries (HTTPS via CONNECT), e.g. "api.example.com:443".',
    )

    @field_validator("allow")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for i, entry in enumerate(v):
            problem = network_target_problem(entry)
            if problem is not None:
                raise ValueError(f"network.allow[{i}] {entry!r}: {problem}")
            canonical = canonical_network_target(entry)
            if canonical not in out:
                out.append(canonical)
        return out


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
