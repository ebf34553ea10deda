"""Short-lived signed bearer tokens (HS256 JWTs) and the principal they stand for."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import jwt

from app.domain.auth import scopes_for
from app.errors import AppError

ISSUER = "spell-platform"
AUDIENCE = "spell-api"
LEEWAY_S = 5


@dataclass(frozen=True)
class Caller:
    principal_id: str
    account_id: str
    role: str
    scopes: frozenset[str]
    token_id: str

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise AppError(
                "FORBIDDEN",
                f"this token (role {self.role}) lacks the scope {scope!r}",
                detail={"required_scope": scope},
            )

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


def issue(
    key: bytes,
    *,
    principal_id: str,
    account_id: str,
    role: str,
    now: datetime,
    ttl: int,
) -> tuple[str, str, datetime]:
    """Return ``(token, jti, expires_at)``."""
    scopes_for(role)  # validates the role
    jti = secrets.token_hex(12)
    exp = now + timedelta(seconds=ttl)
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": principal_id,
        "acct": account_id,
        "role": role,
        "jti": jti,
        "iat": int(now.timestamp()),
        "exp": int(exp.timestamp()),
    }
    return jwt.encode(claims, key, algorithm="HS256"), jti, exp


def verify(key: bytes, token: str, *, now: datetime) -> Caller:
    return verify_with_expiry(key, token, now=now)[0]


def verify_with_expiry(key: bytes, token: str, *, now: datetime) -> tuple[Caller, int]:
    """:func:`verify`, also returning the token's ``exp`` (for callers that cache it)."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=["HS256"],
            audience=AUDIENCE,
            issuer=ISSUER,
            # Expiry is checked below against the platform clock, not the library's.
            options={
                "require": ["exp", "iat", "sub", "jti"],
                "verify_iat": False,
                "verify_exp": False,
            },
        )
    except jwt.PyJWTError:
        raise AppError("UNAUTHORIZED", "the bearer token is not valid") from None
    try:
        expired = int(claims["exp"]) + LEEWAY_S < now.timestamp()
    except (TypeError, ValueError):
        raise AppError("UNAUTHORIZED", "the bearer token is not valid") from None
    if expired:
        raise AppError("UNAUTHORIZED", "the token has expired; issue a new one")
    try:
        role = str(claims["role"])
        caller = Caller(
            principal_id=str(claims["sub"]),
            account_id=str(claims["acct"]),
            role=role,
            scopes=scopes_for(role),
            token_id=str(claims["jti"]),
        )
        return caller, int(claims["exp"])
    except (KeyError, ValueError):
        raise AppError("UNAUTHORIZED", "the bearer token is not valid") from None
