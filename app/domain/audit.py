"""Tamper-evident audit records: a SHA-256 hash chain over JSON lines, and secret redaction.

Every state change and money movement appends one record (one JSON object per line)::

    {"seq":1,"ts":"2024-05-01T12:00:00.000000Z","event":"cast.accepted","actor":"github:octocat",
     "cast_id":"cst_…","input_hash":"sha256:…","amount_cents":250,"currency":"USD",
     "traceparent":"00-…-01","data":{…},"prev":"000…000","hash":"9f2c…"}

* ``hash`` is the SHA-256 (hex) of the canonical JSON of the record without ``hash`` (sorted keys,
  separators ``(",", ":")``, ``ensure_ascii=False``, UTF-8): see :func:`record_hash`.
* ``prev`` is the previous record's ``hash`` (:data:`GENESIS` for the first) and ``seq`` counts
  1, 2, 3 … so altering, removing or reordering a line breaks the chain at that line.
* Cutting records off the *end* of a file leaves a shorter but valid chain; it is caught by checking
  against a head ``(seq, hash)`` recorded elsewhere (``expected_head`` of :func:`verify_lines`).
* Lines are written in one exact form (:func:`serialize_record`), so even a change that keeps the
  JSON meaning (whitespace, key order) is reported.

Secrets never enter a record: :func:`redact` runs over ``data`` before hashing. The same function
redacts log lines (``app.observability.logging``).

Pure: stdlib + pydantic only, no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretBytes, SecretStr

GENESIS = "0" * 64
REDACTED = "[REDACTED]"

#: Order of the fields in a written line (``hash`` last, so a reader sees the chain at a glance).
FIELDS: tuple[str, ...] = (
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
)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CURRENCY = re.compile(r"[A-Z]{3}")

# ---------------------------------------------------------------------------------------------
# Redaction
# ---------------------------------------------------------------------------------------------

_SENSITIVE_WORDS = (
    r"token|secret|passw(?:or)?d|authorization|api[_-]?key|apikey|private[_-]?key|signature"
)
#: A mapping key whose value is a secret (searched anywhere in the key, case-insensitive).
SECRET_KEY = re.compile(_SENSITIVE_WORDS, re.IGNORECASE)

_CRED_CHARS = r"[A-Za-z0-9_\-.~+/=]"
# Patterns for secrets embedded anywhere in a string. Each match is replaced by REDACTED, except
# that a named group "keep" is kept in front of it (e.g. "Bearer [REDACTED]").
_STRING_PATTERNS: tuple[re.Pattern[str], ...] = (
    # PEM private keys (a GitHub App key pasted into a message), also when cut off.
    re.compile(
        r"-----BEGIN[A-Z ]*PRIVATE KEY-----(?:.*?-----END[A-Z ]*PRIVATE KEY-----|.*)", re.DOTALL
    ),
    # HTTP auth schemes: "Bearer <token>", "Basic <b64>" (header spelling), and GitHub's
    # "token <token>" when the credential is long and has a digit (not prose like "token expired").
    re.compile(rf"(?P<keep>\b(?i:bearer)\s+)(?!\[REDACTED\]){_CRED_CHARS}{{8,}}"),
    re.compile(r"(?P<keep>\bBasic\s+)(?!\[REDACTED\])[A-Za-z0-9+/]{8,}={0,2}"),
    re.compile(rf"(?P<keep>\b(?i:token)\s+)(?=[^\s]*[0-9]){_CRED_CHARS}{{20,}}"),
    # JWTs: base64url("{...") header, payload and (possibly empty) signature.
    re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"),
    # Any other three long base64url segments (opaque signed tokens).
    re.compile(
        r"(?<![A-Za-z0-9_\-.])[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}"
    ),
    # GitHub tokens: installation (ghs_), personal (ghp_, github_pat_), OAuth (gho_), user-to-server
    # (ghu_), refresh (ghr_). Installation tokens can be 520+ characters; no upper bound here.
    re.compile(rf"(?<![A-Za-z0-9])(?:gh[pousr]_|github_pat_){_CRED_CHARS}{{6,}}"),
    # Stripe secret and restricted keys, webhook signing secrets.
    re.compile(r"(?<![A-Za-z0-9])(?:sk_live_|sk_test_|rk_live_|rk_test_|whsec_)[A-Za-z0-9_+/=]+"),
    # Credentials in URLs: scheme://user:password@host
    re.compile(r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.\-]{0,30}://[^:/\s@]{0,200}:)[^@\s/]+(?=@)"),
    # key=value / "key": "value" pairs whose key names a secret (headers, query strings, reprs).
    re.compile(
        rf"(?P<keep>(?:{_SENSITIVE_WORDS})[\w\-]{{0,40}}[\"']?\s*[:=]\s*)"
        r"(?!(?:(?:bearer|basic|token)\s+)?\[REDACTED\])"
        r"(?:(?P<q>[\"'])[^\"']*(?P=q)|(?:(?:bearer|basic|token)\s+)?[^\s\"',;&})\]]+)",
        re.IGNORECASE,
    ),
)


def _replace(match: re.Match[str]) -> str:
    groups = match.groupdict()
    keep = groups.get("keep") or ""
    quote = groups.get("q") or ""
    return f"{keep}{quote}{REDACTED}{quote}"


def redact_text(text: str) -> str:
    """Replace every secret-looking substring of ``text`` with ``[REDACTED]``."""
    for pattern in _STRING_PATTERNS:
        text = pattern.sub(_replace, text)
    return text


def redact(value: Any) -> Any:
    """Return ``value`` with secrets replaced by ``[REDACTED]``, recursively.

    * In mappings, the value of any key matching ``token|secret|password|authorization|api_key|
      private_key|signature`` (case-insensitive, anywhere in the key) is replaced whole, unless it
      is ``None``.
    * Strings have bearer tokens, JWTs, GitHub tokens (``ghs_`` …), Stripe keys (``sk_live_`` …),
      PEM private keys, URL passwords and ``key=value`` secrets replaced (see :func:`redact_text`).
    * pydantic ``SecretStr``/``SecretBytes`` become ``[REDACTED]``.

    Tuples, lists and sets come back as lists; other values are returned unchanged.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, SecretStr | SecretBytes):
        return REDACTED
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if isinstance(key, str) and item is not None and SECRET_KEY.search(key):
                out[key] = REDACTED
            else:
                out[key] = redact(item)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_KEY_PREFIX = {key: _ENCODER.encode(key) + ":" for key in FIELDS}


def _canonical(value: Any) -> str:
    return _ENCODER.encode(value)


def record_hash(record_without_hash: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of the record, ignoring any ``hash`` key."""
    body = {k: v for k, v in record_without_hash.items() if k != "hash"}
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


def serialize_record(record: Mapping[str, Any]) -> str:
    """The one exact line form of a record (no trailing newline): :data:`FIELDS` order, compact."""
    parts = [_KEY_PREFIX[k] + _canonical(record[k]) for k in FIELDS if k in record]
    parts.extend(
        _canonical(k) + ":" + _canonical(record[k]) for k in sorted(record) if k not in _KEY_PREFIX
    )
    return "{" + ",".join(parts) + "}"


def format_ts(moment: datetime) -> str:
    """ISO-8601 UTC with microseconds and a ``Z`` suffix: ``2024-05-01T12:00:00.000000Z``."""
    if moment.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class PreparedRecord:
    """The content of a record before it takes its place in the chain: checked and redacted.

    Made only by :func:`prepare_record`; :func:`seal_record` adds ``seq``, ``ts``, ``prev`` and
    ``hash``. Splitting the two lets a writer do the expensive part before it holds the file lock.
    """

    event: str
    actor: str | None
    cast_id: str | None
    input_hash: str | None
    amount_cents: int | None
    currency: str | None
    traceparent: str | None
    data: Mapping[str, Any]
    #: the event time (``format_ts``) when it is known in advance — a record from the audit
    #: outbox carries its transaction's time; None: the time it is appended
    ts: str | None = None


def prepare_record(
    *,
    event: str,
    actor: str | None,
    cast_id: str | None,
    input_hash: str | None,
    amount_cents: int | None,
    currency: str | None,
    traceparent: str | None,
    data: Mapping[str, Any],
    at: datetime | None = None,
) -> PreparedRecord:
    """Check the fields and redact ``data``; see :func:`build_record` for the rules."""
    if not event:
        raise ValueError("event must not be empty")
    if amount_cents is not None and (
        isinstance(amount_cents, bool) or not isinstance(amount_cents, int)
    ):
        raise TypeError(f"amount_cents must be an int (minor units), got {amount_cents!r}")
    if (amount_cents is None) != (currency is None):
        raise ValueError("amount_cents and currency go together")
    if currency is not None and not _CURRENCY.fullmatch(currency):
        raise ValueError(f"currency must be an ISO-4217 code like 'USD', got {currency!r}")
    clean_data = json.loads(_canonical(redact(dict(data))))
    return PreparedRecord(
        event=event,
        actor=actor,
        cast_id=cast_id,
        input_hash=input_hash,
        amount_cents=amount_cents,
        currency=currency,
        traceparent=traceparent,
        data=clean_data,
        ts=format_ts(at) if at is not None else None,
    )


def seal_record(prepared: PreparedRecord, *, seq: int, prev: str, ts: str) -> dict[str, Any]:
    """Place a prepared record in the chain: the complete record, ``hash`` included."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(f"seq must be a positive integer, got {seq!r}")
    if not _HEX64.fullmatch(prev):
        raise ValueError("prev must be 64 lower-case hex characters")
    record: dict[str, Any] = {
        "seq": seq,
        "ts": ts,
        "event": prepared.event,
        "actor": prepared.actor,
        "cast_id": prepared.cast_id,
        "input_hash": prepared.input_hash,
        "amount_cents": prepared.amount_cents,
        "currency": prepared.currency,
        "traceparent": prepared.traceparent,
        "data": dict(prepared.data),
        "prev": prev,
    }
    record["hash"] = record_hash(record)
    return record


def build_record(
    *,
    seq: int,
    prev: str,
    ts: str,
    event: str,
    actor: str | None,
    cast_id: str | None,
    input_hash: str | None,
    amount_cents: int | None,
    currency: str | None,
    traceparent: str | None,
    data: Mapping[str, Any],
) -> dict[str, Any]:
    """A complete record, ``hash`` included, with secrets in ``data`` redacted.

    Money is integer minor units plus an ISO-4217 code: ``amount_cents`` must be an ``int`` and
    comes with ``currency`` (three upper-case letters), or both are ``None``.
    ``data`` must be JSON-serialisable; it is normalised through JSON so that the stored line
    hashes the same when read back.
    """
    prepared = prepare_record(
        event=event,
        actor=actor,
        cast_id=cast_id,
        input_hash=input_hash,
        amount_cents=amount_cents,
        currency=currency,
        traceparent=traceparent,
        data=data,
    )
    return seal_record(prepared, seq=seq, prev=prev, ts=ts)


def parse_record(line: str) -> dict[str, Any]:
    """Parse one line and check it against its own hash. Raises ``ValueError`` saying why not."""
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    for key, kind in (("seq", int), ("prev", str), ("hash", str)):
        if key not in record:
            raise ValueError(f"missing field {key!r}")
        value = record[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"field {key!r} has the wrong type")
    try:
        expected = record_hash(record)
    except (TypeError, ValueError, UnicodeError):
        raise ValueError("record cannot be hashed (record altered)") from None
    if record["hash"] != expected:
        raise ValueError("hash mismatch (record altered)")
    if line != serialize_record(record):
        raise ValueError("line is not in its written form (record altered)")
    return record


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of checking a log.

    ``first_bad_line`` is 1-based; for records cut off the end it is the first missing line
    (one past the last line). ``head_seq``/``head_hash`` are those of the last good record.
    """

    ok: bool
    lines: int
    first_bad_line: int | None
    reason: str | None
    head_seq: int | None
    head_hash: str | None


def _strip_newline(line: str) -> str:
    return line[:-1] if line.endswith("\n") else line


def _peek_seq(line: str | None) -> int | None:
    if line is None:
        return None
    try:
        record = json.loads(_strip_newline(line))
    except ValueError:
        return None
    seq = record.get("seq") if isinstance(record, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def verify_lines(
    lines: Iterable[str],
    *,
    expected_head: tuple[int, str] | None = None,
    start: tuple[int, str] | None = None,
    checkpoints: Mapping[int, str] | None = None,
) -> VerifyResult:
    """Walk the chain; stop at the first bad line and say what is wrong with it.

    ``lines`` may keep or omit their trailing ``\\n``. ``expected_head`` is a ``(seq, hash)``
    recorded outside the file (e.g. in the database): the log must reach that seq, with that hash.
    ``start`` is the anchor ``(seq, hash)`` of a log whose oldest records were removed by
    retention (:mod:`app.store.auditlog` keeps it): the first line must then be record
    ``seq + 1`` chained to ``hash``, instead of record 1 chained to :data:`GENESIS`.
    ``checkpoints`` maps more seqs to the hashes recorded for them elsewhere; a record there
    with another hash is bad.
    """
    count = 0
    last_seq: int | None = None
    last_hash: str | None = None
    if start is not None:
        if isinstance(start[0], bool) or not isinstance(start[0], int) or start[0] < 0:
            raise ValueError(f"anchor seq must be a non-negative integer, got {start[0]!r}")
        if not _HEX64.fullmatch(start[1]):
            raise ValueError("anchor hash must be 64 lower-case hex characters")
        if start[0] > 0:
            last_seq, last_hash = start

    def bad(line_no: int, reason: str) -> VerifyResult:
        return VerifyResult(False, count, line_no, f"line {line_no}: {reason}", last_seq, last_hash)

    iterator: Iterator[str] = iter(lines)
    for raw in iterator:
        count += 1
        line = _strip_newline(raw)
        if not line.strip():
            return bad(count, "empty line")
        try:
            record = parse_record(line)
        except ValueError as exc:
            return bad(count, str(exc))
        seq: int = record["seq"]
        expected_seq = 1 if last_seq is None else last_seq + 1
        if seq != expected_seq:
            if last_seq is None or (start is not None and count == 1 and start[0] > 0):
                if start is not None and start[0] > 0:
                    if seq > expected_seq:
                        return bad(
                            count,
                            f"log starts at seq {seq}, not {expected_seq} after the retention "
                            f"anchor (records were removed)",
                        )
                    return bad(
                        count,
                        f"seq {seq} is not the first seq after the retention anchor "
                        f"({expected_seq})",
                    )
                if seq > 1:
                    return bad(count, f"log starts at seq {seq}, not 1 (records were removed)")
                return bad(count, f"seq {seq} is not a valid first seq (must be 1)")
            if seq > expected_seq:
                following = _peek_seq(next(iterator, None))
                if following == expected_seq:
                    how = "records were reordered"
                elif seq - expected_seq == 1:
                    how = "a record was removed"
                else:
                    how = f"{seq - expected_seq} records were removed"
                return bad(count, f"seq {seq} follows {last_seq} ({how})")
            return bad(count, f"seq {seq} follows {last_seq} (records were reordered or repeated)")
        wanted_prev = GENESIS if last_hash is None else last_hash
        if record["prev"] != wanted_prev:
            if last_hash is None:
                where = "the genesis value"
            elif count == 1:
                where = "the retention anchor's hash"
            else:
                where = f"the hash of line {count - 1}"
            return bad(count, f"prev is not {where} (chain broken)")
        if (
            expected_head is not None
            and seq == expected_head[0]
            and record["hash"] != (expected_head[1])
        ):
            return bad(count, f"hash differs from the recorded head for seq {seq} (log rewritten)")
        if checkpoints and seq in checkpoints and record["hash"] != checkpoints[seq]:
            return bad(count, f"hash differs from the hash recorded for seq {seq} (log rewritten)")
        last_seq, last_hash = seq, record["hash"]

    if expected_head is not None:
        head_seq = expected_head[0]
        have = last_seq or 0
        if have < head_seq:
            return VerifyResult(
                False,
                count,
                count + 1,
                f"line {count + 1}: missing; the log ends at seq {have} but the recorded head is "
                f"seq {head_seq} (records were removed from the end)",
                last_seq,
                last_hash,
            )
    return VerifyResult(True, count, None, None, last_seq, last_hash)
