"""Token bucket arithmetic (pure: the caller passes the time)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Bucket:
    capacity: int
    rate: float  # tokens per second
    tokens: float
    updated: float

    def take(self, now: float, cost: float = 1.0) -> tuple[bool, int, float, float]:
        """Try to take ``cost`` tokens.

        Returns ``(allowed, remaining, retry_after_s, full_in_s)``: whole tokens left, seconds
        until the request could pass, and seconds until the bucket is full again.
        """
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(float(self.capacity), self.tokens + elapsed * self.rate)
        self.updated = now
        allowed = self.tokens >= cost
        if allowed:
            self.tokens -= cost
        retry_after = 0.0 if allowed else (cost - self.tokens) / self.rate
        full_in = (self.capacity - self.tokens) / self.rate
        return allowed, math.floor(self.tokens), retry_after, full_in


class RateLimiter:
    """One bucket per key (principal id, or client address when anonymous)."""

    def __init__(self, capacity: int, rate: float, *, max_keys: int = 100_000) -> None:
        self.capacity = capacity
        self.rate = rate
        self.max_keys = max_keys
        self._buckets: dict[str, Bucket] = {}

    def take(self, key: str, now: float) -> tuple[bool, int, float, float]:
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_keys:
                self._evict(now)
            b = Bucket(self.capacity, self.rate, float(self.capacity), now)
            self._buckets[key] = b
        return b.take(now)

    def _evict(self, now: float) -> None:
        # Buckets that have refilled completely carry no information: drop them.
        full = [
            k
            for k, b in self._buckets.items()
            if b.tokens + (now - b.updated) * b.rate >= b.capacity
        ]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()
