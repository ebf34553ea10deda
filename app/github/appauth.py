"""GitHub App authentication: the App's JWT and a cache of installation tokens.

Pure logic plus an injected clock; no HTTP here (the client in ``client.py`` does the I/O).

* The App JWT is RS256-signed with the App's private key, ``iat`` 60 s in the past (GitHub's advice
  against clock drift) and ``exp`` 9 minutes ahead (GitHub rejects more than 10):
  https://docs.github.com/apps/creating-github-apps/authenticating-with-a-github-app/generating-a-json-web-token-jwt-for-a-github-app
* Installation tokens live one hour. They are cached per (installation, repositories, permissions)
  and handed out until 5 minutes before they expire, so a caller never starts work with a token
  about to die. Tokens are opaque: GitHub's are up to 1,024 characters (``ghs_…`` with dots since
  2026, ~520 characters), so nothing here assumes a length or an alphabet.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from pydantic import SecretStr

JWT_BACKDATE = timedelta(seconds=60)
JWT_LIFETIME = timedelta(minutes=9)
#: A cached installation token is not handed out within this margin of its expiry.
TOKEN_REFRESH_MARGIN = timedelta(minutes=5)
#: Longest installation token accepted (GitHub documents up to 1,024 characters).
MAX_TOKEN_LENGTH = 1024

#: (installation id, sorted repository names, sorted (permission, level) pairs)
TokenKey = tuple[int, tuple[str, ...], tuple[tuple[str, str], ...]]


def now_utc() -> datetime:
    """The current time, timezone-aware UTC (the default clock)."""
    return datetime.now(UTC)


def load_private_key(private_key_pem: str) -> Any:
    """Parse the App's PEM once (parsing costs tens of ms of CPU: never do it per request)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(private_key_pem.encode(), password=None)


def app_jwt(app_id: str, private_key_pem: str | Any, *, now: datetime) -> str:
    """The App's JSON Web Token for ``/app/*`` endpoints, valid from ``now - 60 s`` for 10 min.

    ``private_key_pem`` is the PEM text or, better, a key from :func:`load_private_key`.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    claims = {
        "iat": int((now - JWT_BACKDATE).timestamp()),
        "exp": int((now + JWT_LIFETIME).timestamp()),
        "iss": str(app_id),
    }
    return jwt.encode(claims, private_key_pem, algorithm="RS256")


def token_key(
    installation_id: int, repositories: Sequence[str], permissions: Mapping[str, str]
) -> TokenKey:
    """The cache key of an installation token: order-insensitive in repos and permissions."""
    return (
        int(installation_id),
        tuple(sorted(set(repositories))),
        tuple(sorted(permissions.items())),
    )


@dataclass(frozen=True, slots=True)
class CachedToken:
    token: SecretStr
    expires_at: datetime

    def fresh(self, now: datetime) -> bool:
        return now < self.expires_at - TOKEN_REFRESH_MARGIN


class TokenCache:
    """An LRU cache of installation tokens (bounded: at most ``max_size`` entries).

    The cache lives in process memory only; tokens are held as ``SecretStr`` so they never show
    up in a repr or a log line.
    """

    def __init__(self, max_size: int = 1024) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self._entries: OrderedDict[TokenKey, CachedToken] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TokenCache(entries={len(self._entries)}, max_size={self.max_size})"

    def get(self, key: TokenKey, now: datetime) -> SecretStr | None:
        """The cached token for ``key`` unless it expires within 5 minutes of ``now``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not entry.fresh(now):
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.token

    def put(self, key: TokenKey, token: SecretStr, expires_at: datetime) -> None:
        if expires_at.tzinfo is None:
            raise ValueError("expires_at must be timezone-aware")
        self._entries[key] = CachedToken(token, expires_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def discard(self, key: TokenKey) -> None:
        """Forget a token (e.g. after GitHub answered 401 with it)."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
