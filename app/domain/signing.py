"""HMAC-signed, expiring URLs for artifacts served by the platform itself."""

from __future__ import annotations

import hashlib
import hmac


def _mac(key: bytes, artifact_id: str, exp: int) -> str:
    msg = f"artifact:{artifact_id}:{exp}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def sign_artifact(key: bytes, artifact_id: str, exp: int) -> str:
    return _mac(key, artifact_id, exp)


def verify_artifact(key: bytes, artifact_id: str, exp: int, sig: str) -> bool:
    expected = _mac(key, artifact_id, exp).encode()
    return hmac.compare_digest(expected, sig.encode("utf-8", "replace"))
