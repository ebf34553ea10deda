"""The cast state machine and the hashes that identify a cast's input and request."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

CastStatus = Literal["queued", "running", "succeeded", "failed"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed"})

_ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "failed"}),
    "running": frozenset({"succeeded", "failed", "queued"}),  # queued again: worker lost, retried
    "succeeded": frozenset(),
    "failed": frozenset(),
}


class IllegalTransition(ValueError):
    pass


def check_transition(current: str, new: str) -> None:
    if new not in _ALLOWED.get(current, frozenset()):
        raise IllegalTransition(f"cast cannot go from {current} to {new}")


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def input_hash(value: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(value)).hexdigest()


def request_hash(method: str, path: str, body: Any) -> str:
    """What an Idempotency-Key is bound to: the method, the path and the canonical body."""
    h = hashlib.sha256()
    h.update(method.upper().encode() + b" " + path.encode() + b"\n")
    h.update(canonical_json(body))
    return h.hexdigest()
