"""The audit hash chain and secret redaction (pure domain)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import SecretStr

from app.domain.audit import (
    GENESIS,
    REDACTED,
    build_record,
    format_ts,
    parse_record,
    record_hash,
    redact,
    serialize_record,
    verify_lines,
)

JWT = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiIxMjM0NSIsImlhdCI6MTcwMDAwMDAwMH0"
    ".c2lnbmF0dXJlLWJ5dGVzLWhlcmUtZm9yLXRlc3Q"
)
GHS = "ghs_" + "A1b2C3d4E5" * 52  # installation tokens can be 520+ characters


def make_chain(n: int, **overrides: Any) -> list[str]:
    lines: list[str] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        fields: dict[str, Any] = {
            "seq": seq,
            "prev": prev,
            "ts": f"2024-05-01T12:00:{seq:02d}.000000Z",
            "event": "cast.accepted",
            "actor": "github:octocat",
            "cast_id": f"cst_{seq}",
            "input_hash": "sha256:" + "a" * 64,
            "amount_cents": 250,
            "currency": "USD",
            "traceparent": None,
            "data": {"spell": "lint", "n": seq},
        }
        fields.update(overrides)
        record = build_record(**fields)
        prev = record["hash"]
        lines.append(serialize_record(record) + "\n")
    return lines


# -- records ------------------------------------------------------------------------------------


def test_the_hash_is_sha256_of_canonical_json_without_the_hash_key() -> None:
    record = {"b": 1, "a": "é", "hash": "ignored"}
    expected = hashlib.sha256('{"a":"é","b":1}'.encode()).hexdigest()
    assert record_hash(record) == expected


def test_a_built_record_carries_every_field_and_chains_to_prev() -> None:
    first, second = (json.loads(line) for line in make_chain(2))
    assert list(first) == [
        "seq",
        "ts",
        "event",
        "actor",
        "cast_id",
        "input_hash",
        "amount_cents",
        "currency",
        "traceparent",
        "data",
        "prev",
        "hash",
    ]
    assert first["prev"] == GENESIS
    assert second["prev"] == first["hash"]
    assert first["hash"] == record_hash(first)


def test_building_a_record_redacts_secrets_in_data() -> None:
    record = build_record(
        seq=1,
        prev=GENESIS,
        ts="2024-05-01T12:00:00.000000Z",
        event="purchase.completed",
        actor=None,
        cast_id=None,
        input_hash=None,
        amount_cents=None,
        currency=None,
        traceparent=None,
        data={"stripe_signature": "t=1,v1=abc", "note": f"used {GHS}", "headers": {"X": JWT}},
    )
    line = serialize_record(record)
    assert GHS not in line and JWT not in line and "v1=abc" not in line
    assert record["data"]["stripe_signature"] == REDACTED


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        pytest.param({"amount_cents": 2.5}, TypeError, id="float-money"),
        pytest.param({"amount_cents": True}, TypeError, id="bool-money"),
        pytest.param({"currency": None}, ValueError, id="amount-without-currency"),
        pytest.param({"currency": "usd"}, ValueError, id="lower-case-currency"),
        pytest.param({"seq": 0}, ValueError, id="seq-zero"),
        pytest.param({"prev": "abc"}, ValueError, id="short-prev"),
        pytest.param({"data": {"x": float("nan")}}, ValueError, id="nan-in-data"),
    ],
)
def test_build_record_rejects_bad_input(overrides: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        make_chain(1, **overrides)


def test_timestamps_are_utc_with_microseconds() -> None:
    moment = datetime(2024, 5, 1, 14, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    assert format_ts(moment) == "2024-05-01T12:00:00.000005Z"
    assert datetime.fromisoformat(format_ts(datetime.now(UTC))).tzinfo is not None
    with pytest.raises(ValueError, match="timezone-aware"):
        format_ts(datetime(2024, 5, 1))


def test_parse_record_rejects_a_reformatted_line_even_if_its_meaning_is_unchanged() -> None:
    line = make_chain(1)[0].rstrip("\n")
    assert parse_record(line)["seq"] == 1
    pretty = json.dumps(json.loads(line), indent=1)
    with pytest.raises(ValueError, match="written form"):
        parse_record(pretty)


# -- verification -----------------------------------------------------------------------------


def test_an_untouched_chain_verifies() -> None:
    lines = make_chain(10)
    result = verify_lines(lines)
    last = json.loads(lines[-1])
    assert result.ok and result.lines == 10 and result.first_bad_line is None
    assert (result.head_seq, result.head_hash) == (10, last["hash"])
    assert verify_lines(lines, expected_head=(10, last["hash"])).ok
    assert verify_lines([line.rstrip("\n") for line in lines]).ok


def test_an_empty_log_verifies() -> None:
    result = verify_lines([])
    assert result.ok and result.lines == 0 and result.head_seq is None


@pytest.mark.parametrize("index", range(0, 200, 7))
def test_altering_one_character_anywhere_reports_that_line(index: int) -> None:
    lines = make_chain(6)
    original = lines[3]
    position = index % (len(original) - 1)  # never the newline
    replacement = "x" if original[position] != "x" else "y"
    lines[3] = original[:position] + replacement + original[position + 1 :]
    result = verify_lines(lines)
    assert not result.ok
    assert result.first_bad_line == 4
    assert result.reason is not None and result.reason.startswith("line 4: ")
    assert result.head_seq == 3


def test_altering_an_amount_is_a_hash_mismatch() -> None:
    lines = make_chain(5)
    lines[2] = lines[2].replace('"amount_cents":250', '"amount_cents":1')
    result = verify_lines(lines)
    assert result.reason == "line 3: hash mismatch (record altered)"


def test_removing_a_middle_line_is_reported() -> None:
    lines = make_chain(8)
    del lines[4]
    result = verify_lines(lines)
    assert (result.ok, result.first_bad_line) == (False, 5)
    assert result.reason == "line 5: seq 6 follows 4 (a record was removed)"


def test_removing_several_lines_is_reported() -> None:
    lines = make_chain(8)
    del lines[2:5]
    assert verify_lines(lines).reason == "line 3: seq 6 follows 2 (3 records were removed)"


def test_removing_the_first_line_is_reported() -> None:
    result = verify_lines(make_chain(3)[1:])
    assert result.first_bad_line == 1
    assert result.reason == "line 1: log starts at seq 2, not 1 (records were removed)"


def test_swapping_two_lines_is_reported() -> None:
    lines = make_chain(6)
    lines[2], lines[3] = lines[3], lines[2]
    result = verify_lines(lines)
    assert result.first_bad_line == 3
    assert result.reason == "line 3: seq 4 follows 2 (records were reordered)"


def test_a_repeated_line_is_reported() -> None:
    lines = make_chain(4)
    lines.insert(2, lines[1])
    assert verify_lines(lines).reason == (
        "line 3: seq 2 follows 2 (records were reordered or repeated)"
    )


def test_a_rewritten_chain_with_renumbered_records_breaks_at_prev() -> None:
    # Drop record 3 and renumber 4 → 3 with a fresh hash: the seq fits but prev does not.
    lines = make_chain(4)
    forged = json.loads(lines[3])
    forged["seq"] = 3
    forged["hash"] = record_hash(forged)
    lines = [*lines[:2], serialize_record(forged)]
    assert verify_lines(lines).reason == "line 3: prev is not the hash of line 2 (chain broken)"


def test_truncating_the_tail_is_caught_with_the_recorded_head() -> None:
    lines = make_chain(10)
    head = (10, json.loads(lines[-1])["hash"])
    assert verify_lines(lines[:7]).ok  # without a head, a shorter chain looks fine
    result = verify_lines(lines[:7], expected_head=head)
    assert not result.ok
    assert result.first_bad_line == 8
    assert result.reason == (
        "line 8: missing; the log ends at seq 7 but the recorded head is seq 10 "
        "(records were removed from the end)"
    )
    assert not verify_lines([], expected_head=head).ok


def test_a_log_whose_head_record_was_rewritten_is_caught() -> None:
    lines = make_chain(3)
    result = verify_lines(lines, expected_head=(2, "f" * 64))
    assert result.first_bad_line == 2
    assert result.reason == "line 2: hash differs from the recorded head for seq 2 (log rewritten)"


def test_a_head_behind_the_file_is_fine() -> None:
    lines = make_chain(5)
    assert verify_lines(lines, expected_head=(3, json.loads(lines[2])["hash"])).ok


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        pytest.param('{"seq":3,', "line 3: not valid JSON", id="truncated-json"),
        pytest.param("[1,2]", "line 3: not a JSON object", id="array"),
        pytest.param('{"seq":3,"prev":"x"}', "line 3: missing field 'hash'", id="missing-hash"),
        pytest.param("", "line 3: empty line", id="empty"),
    ],
)
def test_a_line_that_is_not_a_record_is_reported(bad_line: str, reason: str) -> None:
    lines = make_chain(4)
    lines[2] = bad_line + "\n"
    result = verify_lines(lines)
    assert result.first_bad_line == 3
    assert result.reason is not None and result.reason.startswith(reason)


# -- redaction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        pytest.param(f"Authorization: Bearer {JWT}", JWT, id="bearer-jwt"),
        pytest.param(f"jwt {JWT} seen", JWT, id="bare-jwt"),
        pytest.param(f"Authorization: token {GHS}", GHS, id="github-installation-token"),
        pytest.param("ghp_0123456789abcdefghijABCDEFGHIJ0123", "ghp_0123456789", id="ghp"),
        pytest.param("gho_0123456789abcdefghij", "gho_0123456789", id="gho"),
        pytest.param("ghu_0123456789abcdefghij", "ghu_0123456789", id="ghu"),
        pytest.param("github_pat_11ABCDEFG0123456789_abcdef", "11ABCDEFG", id="fine-grained-pat"),
        pytest.param("key sk_live_51HabcDEF0123", "51HabcDEF", id="stripe-live"),
        pytest.param("key sk_test_51HabcDEF0123", "51HabcDEF", id="stripe-test"),
        pytest.param("key rk_live_51HabcDEF0123", "51HabcDEF", id="stripe-restricted"),
        pytest.param("whsec_abcdef0123456789", "abcdef0123456789", id="stripe-webhook-secret"),
        pytest.param("Basic dXNlcjpodW50ZXIy", "dXNlcjpodW50ZXIy", id="basic-auth"),
        pytest.param("postgresql://spell:hunter2@db/spell", "hunter2", id="url-password"),
        pytest.param("GET /x?access_token=abc123&page=2", "abc123", id="query-token"),
        pytest.param("{'Authorization': 'token 0123456789'}", "0123456789", id="header-repr"),
        pytest.param('{"password": "correct horse"}', "correct horse", id="json-password"),
        pytest.param(
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEabc\n-----END RSA PRIVATE KEY-----",
            "MIIEabc",
            id="pem-key",
        ),
    ],
)
def test_secrets_inside_strings_are_redacted(text: str, secret: str) -> None:
    cleaned = redact(text)
    assert secret not in cleaned
    assert REDACTED in cleaned


@pytest.mark.parametrize(
    "text",
    [
        "token expired, refreshing",
        "basic functionality",
        "https://api.github.com/repos/octo/hello/issues/1",
        "sha256:" + "ab" * 32,
        "cast cst_01HX accepted for spell lint@1.2.0",
        "laughs_out_loud",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_values_under_secret_keys_are_redacted_at_any_depth() -> None:
    value = {
        "Authorization": "anything",
        "installation_token": {"token": "x", "expires_at": "soon"},
        "X-Hub-Signature-256": "sha256=00",
        "API_KEY": 123,
        "client_secret": "s",
        "private_key": "k",
        "password": "p",
        "refresh_token": None,
        "items": [{"access_token": "t"}, ("ok", GHS)],
        "amount_cents": 100,
        "secret_value": SecretStr("hidden"),
        "plain": SecretStr("hidden"),
    }
    assert redact(value) == {
        "Authorization": REDACTED,
        "installation_token": REDACTED,
        "X-Hub-Signature-256": REDACTED,
        "API_KEY": REDACTED,
        "client_secret": REDACTED,
        "private_key": REDACTED,
        "password": REDACTED,
        "refresh_token": None,
        "items": [{"access_token": REDACTED}, ["ok", REDACTED]],
        "amount_cents": 100,
        "secret_value": REDACTED,
        "plain": REDACTED,
    }


def test_redaction_is_idempotent() -> None:
    once = redact(f"Authorization: Bearer {JWT} and {GHS}")
    assert redact(once) == once


def test_redacting_a_huge_string_is_fast() -> None:
    import time

    blob = ("a" * 5000 + ".") * 40 + "x-" * 20000
    started = time.perf_counter()
    redact(blob)
    assert time.perf_counter() - started < 1.0
