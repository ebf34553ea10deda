"""W3C Trace Context (``traceparent``/``tracestate``) on top of the OpenTelemetry API.

A traceparent is ``{version}-{trace-id}-{parent-id}-{trace-flags}``, e.g.
``00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01``; see
https://www.w3.org/TR/trace-context/#traceparent-header. Only the API package is used (no SDK):
we carry and propagate ids — the cast id, logs, audit records and outbound calls share one trace id.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "child_traceparent",
    "extract_context",
    "inject_headers",
    "new_traceparent",
    "parse_traceparent",
    "trace_id_of",
]

# Lower-case hex only: the spec forbids upper case. A future version may append "-…" fields,
# version 00 may not (https://www.w3.org/TR/trace-context/#versioning-of-traceparent).
_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<span_id>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-.*)?"
)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

_PROPAGATOR = TraceContextTextMapPropagator()


def parse_traceparent(value: str | None) -> str | None:
    """The traceparent in version-00 form if ``value`` is valid per W3C, else ``None``.

    Rejects version ``ff``, upper-case hex, all-zero trace or span ids, wrong lengths and extra
    fields on version 00. A higher version is accepted by reading its first four fields.
    """
    if value is None:
        return None
    match = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.group(
        "version", "trace_id", "span_id", "flags", "rest"
    )
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return f"00-{trace_id}-{span_id}-{flags}"


def _require(traceparent: str) -> str:
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        raise ValueError(f"not a valid W3C traceparent: {traceparent!r}")
    return parsed


def _new_span_id() -> str:
    while True:
        span_id = secrets.token_hex(8)
        if span_id != _ZERO_SPAN:
            return span_id


def new_traceparent() -> str:
    """A fresh random trace, sampled (flags ``01``)."""
    trace_id = _ZERO_TRACE
    while trace_id == _ZERO_TRACE:
        trace_id = secrets.token_hex(16)
    return f"00-{trace_id}-{_new_span_id()}-01"


def child_traceparent(parent: str) -> str:
    """Same trace id and flags, a new span id. Raises ``ValueError`` for an invalid parent."""
    _, trace_id, span_id, flags = _require(parent).split("-")
    child = _new_span_id()
    while child == span_id:
        child = _new_span_id()
    return f"00-{trace_id}-{child}-{flags}"


def trace_id_of(traceparent: str) -> str:
    """The 32-hex trace id. Raises ``ValueError`` for an invalid traceparent."""
    return _require(traceparent).split("-")[1]


def extract_context(headers: Mapping[str, str]) -> Context:
    """An OpenTelemetry context carrying the remote span from ``traceparent``/``tracestate``.

    Header names are matched case-insensitively; invalid headers give an empty context.
    """
    carrier = {name.lower(): value for name, value in headers.items()}
    return _PROPAGATOR.extract(carrier=carrier)


def inject_headers(traceparent: str, tracestate: str | None = None) -> dict[str, str]:
    """Outbound ``traceparent`` (and ``tracestate`` if given and valid) headers.

    Raises ``ValueError`` for an invalid traceparent. Built through the OpenTelemetry propagator,
    so ``tracestate`` is validated and normalised the way every other OTel service does it.
    """
    _, trace_id, span_id, flags = _require(traceparent).split("-")
    span_context = trace.SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=False,
        trace_flags=trace.TraceFlags(int(flags, 16)),
        trace_state=trace.TraceState.from_header([tracestate]) if tracestate else None,
    )
    context = trace.set_span_in_context(trace.NonRecordingSpan(span_context))
    headers: dict[str, str] = {}
    _PROPAGATOR.inject(headers, context=context)
    return headers
