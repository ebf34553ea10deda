"""JSON logging with redaction, Prometheus metrics, W3C traceparent helpers."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from app.observability.logging import JsonFormatter, configure_logging
from app.observability.metrics import LATENCY_BUCKETS_MS, Metrics
from app.observability.tracing import (
    child_traceparent,
    extract_context,
    inject_headers,
    new_traceparent,
    parse_traceparent,
    trace_id_of,
)

JWT = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiIxMjM0NSIsImlhdCI6MTcwMDAwMDAwMH0"
    ".c2lnbmF0dXJlLWJ5dGVzLWhlcmUtZm9yLXRlc3Q"
)
GHS = "ghs_" + "Q7w" * 30

# -- logging ------------------------------------------------------------------------------------


@pytest.fixture
def json_log(capsys: pytest.CaptureFixture[str]) -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    configure_logging("DEBUG")
    yield logging.getLogger("app.test")
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def emitted(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    err = capsys.readouterr().err
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_a_log_line_is_json_with_ts_level_logger_msg_and_extras(
    json_log: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    json_log.info("cast %s accepted", "cst_1", extra={"cast_id": "cst_1", "amount_cents": 250})
    (line,) = emitted(capsys)
    assert line["level"] == "INFO"
    assert line["logger"] == "app.test"
    assert line["msg"] == "cast cst_1 accepted"
    assert line["cast_id"] == "cst_1" and line["amount_cents"] == 250
    assert line["ts"].endswith("Z")


def test_a_bearer_token_in_the_arguments_does_not_leak(
    json_log: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    json_log.info("got %s", f"Bearer {JWT}")
    json_log.warning("calling GitHub with Authorization: token %s", GHS)
    json_log.info("headers %s", {"Authorization": "token abc", "Accept": "application/json"})
    out = capsys.readouterr().err
    assert JWT not in out and GHS not in out and "abc" not in out
    assert "application/json" in out
    assert out.count("[REDACTED]") == 3


def test_extra_fields_are_redacted_by_key_and_by_value(
    json_log: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    json_log.info(
        "webhook",
        extra={
            "headers": {"Authorization": f"Bearer {JWT}", "X-GitHub-Delivery": "d-1"},
            "installation_token": GHS,
            "note": f"retrying with {GHS}",
            "obj": object(),
        },
    )
    (line,) = emitted(capsys)
    assert line["headers"] == {"Authorization": "[REDACTED]", "X-GitHub-Delivery": "d-1"}
    assert line["installation_token"] == "[REDACTED]"
    assert line["note"] == "retrying with [REDACTED]"
    assert line["obj"].startswith("<object")


def test_exceptions_are_logged_with_a_redacted_traceback(
    json_log: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        raise RuntimeError(f"GitHub refused token {GHS}")
    except RuntimeError:
        json_log.exception("dispatch failed")
    (line,) = emitted(capsys)
    assert line["level"] == "ERROR"
    assert "Traceback" in line["exc"] and "RuntimeError" in line["exc"]
    assert GHS not in line["exc"]


def test_configuring_twice_does_not_duplicate_lines(
    json_log: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO")
    configure_logging("INFO")
    json_log.info("once")
    json_log.debug("filtered out at INFO")
    assert [line["msg"] for line in emitted(capsys)] == ["once"]


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("CHATTY")


def test_extras_cannot_overwrite_the_core_fields() -> None:
    record = logging.LogRecord("app.x", logging.INFO, __file__, 1, "real", None, None)
    record.__dict__["level"] = "FAKE"
    assert json.loads(JsonFormatter().format(record))["level"] == "INFO"


# -- metrics ------------------------------------------------------------------------------------


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_are_exposed_under_their_documented_names() -> None:
    metrics = Metrics()
    metrics.cast_count.labels(status="succeeded").inc()
    metrics.cast_latency_ms.observe(42)
    metrics.errors_by_code.labels(code="CAP_EXCEEDED").inc(2)
    metrics.http_requests.labels(method="POST", route="/v1/casts", status="202").inc()
    metrics.refunds_count.inc()
    metrics.revenue_cents.inc(250)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    got = samples(metrics)
    assert got[("cast_count_total", (("status", "succeeded"),))] == 1
    assert got[("errors_by_code_total", (("code", "CAP_EXCEEDED"),))] == 2
    assert (
        got[
            ("http_requests_total", (("method", "POST"), ("route", "/v1/casts"), ("status", "202")))
        ]
        == 1
    )
    assert got[("refunds_count_total", ())] == 1
    assert got[("revenue_cents_total", ())] == 250
    assert got[("cast_latency_ms_bucket", (("le", "20.0"),))] == 0
    assert got[("cast_latency_ms_bucket", (("le", "50.0"),))] == 1
    assert got[("cast_latency_ms_count", ())] == 1
    assert b"# TYPE cast_latency_ms histogram" in body


def test_latency_buckets_are_the_documented_ones() -> None:
    got = samples(Metrics())
    les = sorted(
        float(dict(labels)["le"])
        for name, labels in got
        if name == "cast_latency_ms_bucket" and dict(labels)["le"] != "+Inf"
    )
    assert les == [float(b) for b in LATENCY_BUCKETS_MS]


def test_each_metrics_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared one
    first.refunds_count.inc()
    assert samples(second)[("refunds_count_total", ())] == 0
    assert REGISTRY.get_sample_value("refunds_count_total") is None


# -- tracing ------------------------------------------------------------------------------------

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(VALID, VALID, id="valid"),
        pytest.param(f"  {VALID}\t", VALID, id="surrounding-whitespace"),
        pytest.param(VALID[:-2] + "00", VALID[:-2] + "00", id="not-sampled"),
        pytest.param(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
            VALID,
            id="future-version-with-extra-field",
        ),
        pytest.param(None, None, id="none"),
        pytest.param("", None, id="empty"),
        pytest.param(VALID[:-1], None, id="too-short"),
        pytest.param(VALID + "0", None, id="too-long"),
        pytest.param(VALID + "-extra", None, id="version-00-with-extra-field"),
        pytest.param("00-" + "0" * 32 + "-00f067aa0ba902b7-01", None, id="zero-trace-id"),
        pytest.param(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", None, id="zero-span"
        ),
        pytest.param(VALID.upper(), None, id="upper-case-hex"),
        pytest.param("ff" + VALID[2:], None, id="version-ff"),
        pytest.param(VALID.replace("-", "_"), None, id="wrong-separator"),
        pytest.param("00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", None, id="not-hex"),
    ],
)
def test_parse_traceparent(value: str | None, expected: str | None) -> None:
    assert parse_traceparent(value) == expected


def test_a_new_traceparent_is_valid_sampled_and_random() -> None:
    first, second = new_traceparent(), new_traceparent()
    assert parse_traceparent(first) == first
    assert first.endswith("-01")
    assert trace_id_of(first) != trace_id_of(second)


def test_a_child_keeps_the_trace_id_and_flags_with_a_new_span_id() -> None:
    child = child_traceparent(VALID)
    assert parse_traceparent(child) == child
    assert trace_id_of(child) == trace_id_of(VALID) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert child.split("-")[2] != VALID.split("-")[2]
    assert child.endswith("-01")


@pytest.mark.parametrize("function", [child_traceparent, trace_id_of, inject_headers])
def test_helpers_refuse_an_invalid_traceparent(function: Any) -> None:
    with pytest.raises(ValueError, match="not a valid W3C traceparent"):
        function("00-nope")


def test_extract_context_reads_the_remote_span_case_insensitively() -> None:
    context = extract_context({"Traceparent": VALID, "TraceState": "vendor=abc"})
    span_context = trace.get_current_span(context).get_span_context()
    assert span_context.is_valid and span_context.is_remote
    assert f"{span_context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert f"{span_context.span_id:016x}" == "00f067aa0ba902b7"
    assert span_context.trace_state.get("vendor") == "abc"


def test_extract_context_ignores_an_invalid_header() -> None:
    context = extract_context({"traceparent": VALID.upper()})
    assert not trace.get_current_span(context).get_span_context().is_valid


def test_inject_headers_round_trips_through_extract() -> None:
    headers = inject_headers(VALID, "vendor=abc,other=1")
    assert headers == {"traceparent": VALID, "tracestate": "vendor=abc,other=1"}
    assert inject_headers(VALID) == {"traceparent": VALID}
    span_context = trace.get_current_span(extract_context(headers)).get_span_context()
    assert f"{span_context.trace_id:032x}" == trace_id_of(VALID)
