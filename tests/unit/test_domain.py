"""Pure domain logic: spell documents, semver, pricing, caps arithmetic, state machine, hashing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from app.domain.caps import CapView, month_period, seconds_to_monthly_reset, which_cap_refused
from app.domain.casts import IllegalTransition, check_transition, input_hash, request_hash
from app.domain.pricing import Usage, actual_cents, estimate_cents
from app.domain.ratelimit import Bucket, RateLimiter
from app.domain.spells import Pricing, SpellDocument, semver_key, validate_input

BUNDLE = "sha256:" + "a" * 64


def doc(**patch: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "com.example.hello",
        "name": "Hello",
        "execution": {"mode": "service", "entrypoint": "main.py", "bundle": BUNDLE},
        "pricing": {"model": "flat", "currency": "USD", "flat_cents": 5},
        "inputs": {
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
        },
    }
    base.update(patch)
    return base


def test_the_spec_example_document_is_valid_for_workflow_mode() -> None:
    d = SpellDocument.model_validate(
        doc(
            execution={
                "mode": "workflow",
                "workflow": {
                    "repo": "owner/name",
                    "workflow_id": "spell.yml",
                    "dispatch": "repository_dispatch",
                },
            }
        )
    )
    assert d.execution.workflow is not None
    assert d.version == "1.0.0"
    assert d.visibility == "public"


@pytest.mark.parametrize(
    "patch",
    [
        pytest.param({"execution": {"mode": "service"}}, id="service-without-entrypoint"),
        pytest.param({"execution": {"mode": "workflow"}}, id="workflow-without-target"),
        pytest.param({"execution": {"mode": "clone"}}, id="clone-without-template"),
        pytest.param({"pricing": {"model": "metered"}}, id="metered-without-meters"),
        pytest.param({"pricing": {"model": "one_time"}}, id="one-time-without-price"),
        pytest.param({"pricing": {"model": "flat", "flat_cents": -1}}, id="negative-price"),
        pytest.param(
            {"pricing": {"model": "flat", "flat_cents": 1, "currency": "usd"}},
            id="lowercase-currency",
        ),
        pytest.param({"inputs": {"type": "array"}}, id="inputs-not-an-object"),
        pytest.param({"inputs": {"type": "object", "required": "name"}}, id="inputs-invalid"),
        pytest.param({"tags": ["Has Space"]}, id="bad-tag"),
        pytest.param({"id": "hello"}, id="id-not-reverse-dns"),
        pytest.param({"version": "01.0.0"}, id="leading-zero-semver"),
        pytest.param({"unknown": True}, id="unknown-field"),
    ],
)
def test_invalid_documents_are_rejected(patch: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SpellDocument.model_validate(doc(**patch))


def test_semver_precedence_follows_the_spec() -> None:
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.10.0",
        "2.0.0",
    ]
    assert sorted(reversed(ordered), key=semver_key) == ordered


def test_input_errors_name_the_missing_or_wrong_field() -> None:
    schema = doc()["inputs"]
    assert validate_input(schema, {"name": "x"}) == []
    assert validate_input(schema, {})[0][0] == "/name"
    assert validate_input(schema, {"name": 3})[0][0] == "/name"


def test_pricing_estimates_are_the_most_a_cast_can_cost() -> None:
    flat = Pricing(model="flat", flat_cents=5)
    assert estimate_cents(flat) == 5 == actual_cents(flat, Usage(compute_ms=10**9))
    metered = Pricing.model_validate(
        {
            "model": "metered",
            "base_cents": 2,
            "meters": {
                "casts": {"unit_cents": 1, "max": 1},
                "compute_ms": {"unit_cents": 1, "per": 1000, "max": 60_000},
                "egress_mb": {"unit_cents": 3, "max": 10},
            },
        }
    )
    assert estimate_cents(metered) == 2 + 1 + 60 + 30
    assert actual_cents(metered, Usage(compute_ms=1500, egress_bytes=1)) == 2 + 1 + 2 + 3
    # Usage beyond the declared limits is clamped: never more than the estimate.
    assert actual_cents(metered, Usage(compute_ms=10**9, egress_bytes=10**12)) == 93


@given(st.integers(0, 10**7), st.integers(0, 10**12))
def test_metered_cost_never_exceeds_the_estimate(ms: int, egress: int) -> None:
    p = Pricing.model_validate(
        {
            "model": "metered",
            "meters": {
                "compute_ms": {"unit_cents": 7, "per": 100, "max": 5000},
                "egress_mb": {"unit_cents": 1, "max": 3},
            },
        }
    )
    assert 0 <= actual_cents(p, Usage(compute_ms=ms, egress_bytes=egress)) <= estimate_cents(p)


def test_monthly_periods_and_reset_are_utc_calendar_months() -> None:
    t = datetime(2026, 12, 31, 23, 0, tzinfo=UTC)
    assert month_period(t) == "2026-12"
    assert seconds_to_monthly_reset(t) == 3600
    assert seconds_to_monthly_reset(datetime(2026, 2, 1, tzinfo=UTC)) == 28 * 86400


def test_which_cap_refused() -> None:
    monthly = CapView(cap_cents=10, used_cents=6, reserved_cents=2)
    total = CapView(cap_cents=None, used_cents=6, reserved_cents=2)
    assert which_cap_refused(estimate=2, monthly=monthly, total=total) is None
    assert which_cap_refused(estimate=3, monthly=monthly, total=total) == "monthly"
    assert monthly.remaining_cents == 2
    assert (
        which_cap_refused(
            estimate=1, monthly=monthly, total=CapView(cap_cents=8, used_cents=8, reserved_cents=0)
        )
        == "total"
    )


def test_the_cast_state_machine() -> None:
    check_transition("queued", "running")
    check_transition("running", "succeeded")
    check_transition("running", "queued")
    for bad in [("succeeded", "failed"), ("failed", "running"), ("queued", "succeeded")]:
        with pytest.raises(IllegalTransition):
            check_transition(*bad)


@given(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=5))
def test_input_hash_ignores_key_order(d: dict[str, Any]) -> None:
    assert input_hash(d) == input_hash(dict(reversed(list(d.items()))))


def test_request_hash_binds_method_path_and_body() -> None:
    a = request_hash("POST", "/v1/spells/x:cast", {"input": {"a": 1}})
    assert a == request_hash("post", "/v1/spells/x:cast", {"input": {"a": 1}})
    assert a != request_hash("POST", "/v1/spells/y:cast", {"input": {"a": 1}})
    assert a != request_hash("POST", "/v1/spells/x:cast", {"input": {"a": 2}})


def test_token_bucket_refills_at_its_rate() -> None:
    b = Bucket(capacity=2, rate=1.0, tokens=2, updated=0.0)
    assert b.take(0.0)[:2] == (True, 1)
    assert b.take(0.0)[:2] == (True, 0)
    allowed, remaining, retry_after, _ = b.take(0.0)
    assert (allowed, remaining) == (False, 0) and retry_after == pytest.approx(1.0)
    assert b.take(1.0)[0] is True


def test_rate_limiter_keeps_one_bucket_per_key_and_evicts_full_ones() -> None:
    rl = RateLimiter(1, 1.0, max_keys=2)
    assert rl.take("a", 0.0)[0] and rl.take("b", 0.0)[0]
    assert not rl.take("a", 0.0)[0]
    assert rl.take("c", 10.0)[0]  # a and b refilled: evicted, c fits
