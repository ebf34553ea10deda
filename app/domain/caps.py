"""Budget-cap arithmetic: UTC calendar-month periods and the seconds until the monthly reset."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


def month_period(now: datetime) -> str:
    """The cap period a moment belongs to, e.g. ``2026-11`` (UTC calendar month)."""
    return now.astimezone(UTC).strftime("%Y-%m")


def next_month_start(now: datetime) -> datetime:
    now = now.astimezone(UTC)
    if now.month == 12:
        return datetime(now.year + 1, 1, 1, tzinfo=UTC)
    return datetime(now.year, now.month + 1, 1, tzinfo=UTC)


def seconds_to_monthly_reset(now: datetime) -> int:
    return max(1, int((next_month_start(now) - now.astimezone(UTC)).total_seconds() + 0.999))


@dataclass(frozen=True)
class CapView:
    """What ``GET /v1/billing/caps`` shows for one cap."""

    cap_cents: int | None
    used_cents: int
    reserved_cents: int

    @property
    def remaining_cents(self) -> int | None:
        if self.cap_cents is None:
            return None
        return max(0, self.cap_cents - self.used_cents - self.reserved_cents)

    def to_json(self) -> dict[str, int | None]:
        return {
            "cap_cents": self.cap_cents,
            "used_cents": self.used_cents,
            "reserved_cents": self.reserved_cents,
            "remaining_cents": self.remaining_cents,
        }


def which_cap_refused(
    *,
    estimate: int,
    monthly: CapView,
    total: CapView,
) -> str | None:
    """Which cap an estimate would pass (``monthly``/``total``), for the refusal message."""
    if total.cap_cents is not None and total.used_cents + total.reserved_cents + estimate > (
        total.cap_cents
    ):
        return "total"
    if monthly.cap_cents is not None and (
        monthly.used_cents + monthly.reserved_cents + estimate > monthly.cap_cents
    ):
        return "monthly"
    return None
