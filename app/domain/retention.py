"""Retention policy (SPEC §8): what is due for deletion, given the time and the settings.

Pure: no I/O. The sweeper (``app/worker/retention.py``) asks these functions what to remove and
the store (``app/store/retention_store.py``) turns the cut-off times into queries.

Periods are counted from when the thing came into being (a cast's ``created_at``, an artifact's
``created_at``, an audit record's ``ts``). Something is *due* once its age has reached the
period: with a 24 h period, a cast accepted at 10:00 keeps its input until 10:00 the next day
(age 23 h 59 m: kept) and loses it at the first sweep from then on. Nothing is due before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = [
    "RetentionPolicy",
    "Segment",
    "SweepCounts",
    "due_segments",
    "export_key",
    "parse_duration",
    "parse_segment_name",
    "parse_ts",
    "rotation_due",
    "segment_name",
]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+)\s*([smhdw]?)\s*", re.IGNORECASE)


def parse_duration(value: object) -> int:
    """Seconds from ``300``, ``"300"``, ``"300s"``, ``"5m"``, ``"24h"``, ``"7d"`` or ``"2w"``.

    Raises ``ValueError`` for anything else (negative numbers, fractions, unknown units).
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value!r}")
        return value
    if isinstance(value, timedelta):
        return parse_duration(int(value.total_seconds()))
    if not isinstance(value, str):
        raise ValueError(f"not a duration: {value!r}")
    match = _DURATION.fullmatch(value)
    if match is None:
        raise ValueError(
            f"not a duration: {value!r} (use seconds, or a number with s, m, h, d or w: 24h, 7d)"
        )
    return int(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]


def parse_ts(ts: str) -> datetime:
    """An audit record's ``ts`` (``2024-05-01T12:00:00.000000Z``) as an aware UTC datetime."""
    moment = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"audit timestamp without a time zone: {ts!r}")
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each kind of data is kept (seconds)."""

    inputs: int = 24 * 3600
    artifacts: int = 7 * 24 * 3600
    audit: int = 30 * 24 * 3600
    #: an audit segment is closed (rotated) once its first record is this old
    audit_segment: int = 3600

    def __post_init__(self) -> None:
        for name in ("inputs", "artifacts", "audit", "audit_segment"):
            if getattr(self, name) < 1:
                raise ValueError(f"retention period {name} must be at least one second")

    # -- cut-offs: anything created at or before the cut-off is due ---------------------------

    def inputs_cutoff(self, now: datetime) -> datetime:
        return _aware(now) - timedelta(seconds=self.inputs)

    def artifacts_cutoff(self, now: datetime) -> datetime:
        return _aware(now) - timedelta(seconds=self.artifacts)

    def audit_cutoff(self, now: datetime) -> datetime:
        return _aware(now) - timedelta(seconds=self.audit)

    # -- single decisions (the store's queries encode the same rules) -------------------------

    def input_due(self, created_at: datetime, now: datetime, *, finished: bool) -> bool:
        """A cast's stored input (and staged copies) go once the cast is ``inputs`` old.

        An unfinished cast keeps its input (the run still needs it); the sweep reports those.
        """
        return finished and _aware(created_at) <= self.inputs_cutoff(now)

    def delivery_body_due(self, received_at: datetime, now: datetime, *, handled: bool) -> bool:
        """A webhook delivery's raw body (a comment carries the cast's input) goes with inputs;
        one still waiting to be handled keeps it."""
        return handled and _aware(received_at) <= self.inputs_cutoff(now)

    def artifact_due(self, created_at: datetime, expires_at: datetime, now: datetime) -> bool:
        """An artifact goes once it is ``artifacts`` old, or when its URL has expired (nobody
        can fetch it any more), whichever comes first."""
        now = _aware(now)
        return _aware(created_at) <= self.artifacts_cutoff(now) or _aware(expires_at) <= now

    def audit_record_due(self, ts: datetime, now: datetime) -> bool:
        return _aware(ts) <= self.audit_cutoff(now)


def rotation_due(first_ts: datetime | None, now: datetime, policy: RetentionPolicy) -> bool:
    """Whether the active audit file, whose first record is ``first_ts``, is closed into a
    segment now: once it spans ``audit_segment`` (or holds a record already due)."""
    if first_ts is None:
        return False
    first = _aware(first_ts)
    return first <= _aware(now) - timedelta(seconds=policy.audit_segment) or (
        policy.audit_record_due(first, now)
    )


@dataclass(frozen=True, order=True)
class Segment:
    """A closed audit segment: records ``first``..``last`` (seq); ``newest``: its newest ts."""

    first: int
    last: int
    newest: datetime


def due_segments(segments: Sequence[Segment], now: datetime, policy: RetentionPolicy) -> int:
    """How many of the oldest segments (in seq order) leave now: a segment goes when its
    *newest* record is past the audit period, and only after every older segment has gone
    (the retained chain must stay one unbroken run from the anchor)."""
    count = 0
    for seg in sorted(segments):
        if not policy.audit_record_due(seg.newest, now):
            break
        count += 1
    return count


_SEGMENT = re.compile(r"audit-(\d{12})-(\d{12})\.jsonl")


def segment_name(first: int, last: int) -> str:
    """The file name of a closed segment: ``audit-000000000001-000000000500.jsonl``."""
    if first < 1 or last < first:
        raise ValueError(f"bad segment range {first}..{last}")
    return f"audit-{first:012d}-{last:012d}.jsonl"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    match = _SEGMENT.fullmatch(name)
    if match is None:
        return None
    first, last = int(match.group(1)), int(match.group(2))
    return (first, last) if 1 <= first <= last else None


def export_key(log: str, first: int, last: int) -> str:
    """Object-store key of an exported segment (content-addressed by its seq range)."""
    return f"audit/{log}/{segment_name(first, last)}"


@dataclass
class SweepCounts:
    """What one sweep removed (or, in a dry run, would remove). Counts only, never contents."""

    inputs: int = 0
    inputs_held: int = 0
    delivery_bodies: int = 0
    staged_inputs: int = 0
    artifacts: int = 0
    idempotency_keys: int = 0
    audit_segments_rotated: int = 0
    audit_segments: int = 0
    audit_records: int = 0
    audit_anchor_seq: int | None = None
    errors: int = 0

    def as_dict(self) -> dict[str, int | None]:
        return dict(self.__dict__)

    @property
    def removed(self) -> int:
        return (
            self.inputs
            + self.delivery_bodies
            + self.staged_inputs
            + self.artifacts
            + self.idempotency_keys
            + self.audit_records
        )


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("retention needs timezone-aware datetimes")
    return moment
