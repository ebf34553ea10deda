"""Sign-in with a GitHub Actions OIDC token: verify it against the issuer's JWKS, map its
repository to an account through the operator's links, and issue a short-lived platform token.

``POST /v1/oidc/token`` ``{"token": "<jwt>"}`` → ``{"token", "token_type", "expires_in",
"expires_at", "account", "role", "repository"}``. The claim checks are pure
(:mod:`app.domain.oidc`); here are the I/O parts: the JWKS (fetched with aiohttp, cached for a
TTL, fetched again — at most once per :data:`MIN_REFETCH_S`, failed attempts included — when a
token names a key id the cache does not know, so a key rotation is picked up quickly), the
signature check (PyJWT, RS256 only), the link lookup, the token and the audit record (actor =
the repository; never the token).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import RSAAlgorithm

from app.domain.oidc import (
    ALGORITHM,
    MAX_TTL_S,
    OidcRejected,
    WorkflowIdentity,
    check_claims,
    check_header,
    check_token_shape,
    platform_ttl,
)
from app.errors import AppError
from app.services.platform import Platform
from app.store.hot import AuditRow
from app.store.models import AuditOutbox

log = logging.getLogger("spell.oidc")

#: Largest JWKS document read (GitHub's is ~2 KB).
MAX_JWKS_BYTES = 256 * 1024
#: The issuer's JWKS is requested at most once per this many seconds, whether the last attempt
#: succeeded (a token naming an unknown key id) or failed (the issuer is down).
MIN_REFETCH_S = 30.0


class JwksUnavailable(Exception):
    """The issuer's key set could not be fetched or parsed."""


class KeySource(Protocol):
    async def key(self, kid: str) -> RSAPublicKey | None: ...


class JwksClient:
    """The issuer's signing keys by ``kid``, cached ``ttl`` seconds.

    The issuer is asked at most once per ``min_refetch`` seconds, whatever happens: an unknown
    ``kid`` fetches the set again only if the last attempt is older than that (a flood of tokens
    with made-up key ids must not become a flood of requests to the issuer), and a failed
    attempt counts as an attempt (while the issuer cannot be reached, every sign-in must not
    become one more request to it). In between, keys fetched less than ``max_stale`` seconds ago
    still verify; without them the answer is :class:`JwksUnavailable` (503 ``UNAVAILABLE``)."""

    def __init__(
        self,
        url: str,
        *,
        ttl: float = 600.0,
        min_refetch: float = MIN_REFETCH_S,
        max_stale: float = 86400.0,
        timeout: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.ttl = ttl
        self.min_refetch = min_refetch
        self.max_stale = max_stale
        self.timeout = timeout
        self._now = monotonic
        self._keys: dict[str, RSAPublicKey] = {}
        self._fetched_at: float | None = None  # the last successful fetch
        self._attempted_at: float | None = None  # the last fetch, successful or not
        self._failure: str | None = None  # why the last attempt failed (None: it did not)
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0  # how many times the set was fetched (metrics, tests)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _fresh(self) -> bool:
        return self._fetched_at is not None and self._now() - self._fetched_at < self.ttl

    def _may_fetch(self) -> bool:
        return self._attempted_at is None or self._now() - self._attempted_at >= self.min_refetch

    async def key(self, kid: str) -> RSAPublicKey | None:
        if self._fresh() and kid in self._keys:
            return self._keys[kid]
        async with self._lock:
            if self._fresh() and kid in self._keys:
                return self._keys[kid]  # another request fetched it meanwhile
            if self._may_fetch():
                self._attempted_at = self._now()
                try:
                    keys = await self._fetch()
                except JwksUnavailable as e:
                    self._failure = str(e)
                    log.warning(  # once per attempt, not once per sign-in
                        "JWKS fetch failed (%s); the keys fetched before still verify for up "
                        "to %.0f s; next attempt in %.0f s",
                        e,
                        self.max_stale,
                        self.min_refetch,
                    )
                else:
                    self._keys, self._failure = keys, None
                    self._fetched_at = self._now()
                    return self._keys.get(kid)
            stale_ok = (
                self._fetched_at is not None and self._now() - self._fetched_at < self.max_stale
            )
            if kid in self._keys and stale_ok:  # the issuer is down: keep its last keys
                return self._keys[kid]
            if self._failure is not None:
                raise JwksUnavailable(self._failure)
            # fetched less than min_refetch ago, and the issuer does not publish this kid
            return None

    async def _fetch(self) -> dict[str, RSAPublicKey]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self.fetches += 1
        try:
            async with self._session.get(
                self.url, headers={"Accept": "application/json"}, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    raise JwksUnavailable(f"{self.url} answered HTTP {resp.status}")
                raw = await resp.content.read(MAX_JWKS_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise JwksUnavailable(f"{self.url} cannot be reached: {type(e).__name__}") from None
        if len(raw) > MAX_JWKS_BYTES:
            raise JwksUnavailable(f"{self.url} sent more than {MAX_JWKS_BYTES} bytes")
        return parse_jwks(raw)


def parse_jwks(raw: bytes) -> dict[str, RSAPublicKey]:
    """The RS256 signing keys of a JWKS document, by ``kid`` (other keys are skipped)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        raise JwksUnavailable("the JWKS is not JSON") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise JwksUnavailable("the JWKS has no 'keys' list")
    out: dict[str, RSAPublicKey] = {}
    for jwk in keys:
        if not isinstance(jwk, dict) or jwk.get("kty") != "RSA":
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", ALGORITHM) != ALGORITHM:
            continue
        try:
            key = RSAAlgorithm.from_jwk(json.dumps(jwk))
        except (jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            log.warning("skipping an unusable key %s in the JWKS", kid[:64])
            continue
        if isinstance(key, RSAPublicKey):
            out[kid] = key
    return out


class LinkView(Protocol):
    @property
    def pattern(self) -> str: ...
    @property
    def account_id(self) -> str: ...
    @property
    def role(self) -> str: ...


class LinkLookup(Protocol):
    async def link_for(self, repository: str) -> LinkView | None: ...


def _unauthorized(message: str) -> AppError:
    return AppError("UNAUTHORIZED", message)


def parse_request(body: Any) -> tuple[str, int | None]:
    """``{"token": "<jwt>", "ttl"?: seconds}`` → (token, ttl)."""
    if not isinstance(body, dict):
        raise AppError("VALIDATION_ERROR", 'send a JSON object: {"token": "<OIDC token>"}')
    unknown = sorted(set(body) - {"token", "ttl"})
    if unknown:
        raise AppError(
            "VALIDATION_ERROR",
            f"/{unknown[0]}: unknown field (send token and, optionally, ttl)",
            detail={"path": f"/{unknown[0]}"},
        )
    raw = body.get("token")
    if not isinstance(raw, str) or not raw.strip():
        raise AppError(
            "VALIDATION_ERROR",
            "/token: the GitHub Actions OIDC token is required (a string)",
            detail={"path": "/token"},
        )
    ttl = body.get("ttl")
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TTL_S
    ):
        raise AppError(
            "VALIDATION_ERROR",
            f"/ttl: must be an integer from 1 to {MAX_TTL_S} seconds",
            detail={"path": "/ttl"},
        )
    return raw, ttl


class OidcSignIn:
    """The use case behind ``POST /v1/oidc/token``."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        keys: KeySource,
        links: LinkLookup,
        platform: Platform,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.keys = keys
        self.links = links
        self.platform = platform

    async def verify(self, raw: str) -> WorkflowIdentity:
        """The workflow identity of a valid OIDC token; 401 ``UNAUTHORIZED`` otherwise."""
        try:
            raw = check_token_shape(raw)
            try:
                header = jwt.get_unverified_header(raw)
            except jwt.PyJWTError:
                raise OidcRejected("the OIDC token's header is not valid JSON") from None
            kid = check_header(header)
            try:
                key = await self.keys.key(kid)
            except JwksUnavailable as e:
                log.warning("OIDC sign-in refused: the issuer's keys are unavailable: %s", e)
                raise AppError(
                    "UNAVAILABLE", f"cannot fetch the OIDC issuer's signing keys: {e}"
                ) from None
            if key is None:
                raise OidcRejected(
                    f"the OIDC token is signed with a key ({kid[:64]}) that the issuer "
                    f"{self.issuer} does not publish"
                )
            try:
                claims = jwt.decode(
                    raw,
                    key=key,
                    algorithms=[ALGORITHM],
                    options={
                        "verify_signature": True,
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": False,
                        "verify_iss": False,
                    },
                )
            except jwt.InvalidSignatureError:
                raise OidcRejected(
                    "the OIDC token's signature does not verify against the issuer's keys"
                ) from None
            except jwt.PyJWTError:
                raise OidcRejected("the OIDC token cannot be decoded") from None
            return check_claims(
                claims,
                issuer=self.issuer,
                audience=self.audience,
                now=self.platform.clock.now().timestamp(),
            )
        except OidcRejected as e:
            raise _unauthorized(e.message) from None

    async def exchange(self, body: Any, *, traceparent: str | None = None) -> dict[str, Any]:
        raw, requested_ttl = parse_request(body)
        who = await self.verify(raw)
        link = await self.links.link_for(who.repository)
        if link is None:
            log.info("OIDC sign-in refused: %s is not linked", who.repository)
            raise _unauthorized(
                f"repository {who.repository} may not sign in: an operator allows it with "
                f"`spell oidc allow {who.repository} --account ACCOUNT --role caster`"
            )
        platform = self.platform
        now = platform.clock.now()
        ttl = platform_ttl(who.exp, now.timestamp(), requested=requested_ttl)

        def audit(jti: str, expires: datetime) -> AuditOutbox:
            """Its audit record, committed with the token's row (the audit outbox)."""
            return AuditOutbox.of(
                AuditRow(
                    event="oidc.token_issued",
                    actor=who.repository,
                    traceparent=traceparent,
                    data={
                        "account": link.account_id,
                        "role": link.role,
                        "link": link.pattern,
                        "jti": jti,
                        "expires_at": expires.isoformat(),
                        **who.audit_data(),
                    },
                    at=now,
                )
            )

        token, expires = await platform.issue_token(
            link.account_id, link.role, ttl=ttl, now=now, audit=audit
        )
        log.info(
            "OIDC sign-in: %s as %s (%s), %d s", who.repository, link.account_id, link.role, ttl
        )
        return {
            "token": token,
            "token_type": "Bearer",
            "expires_in": ttl,
            "expires_at": expires.isoformat(),
            "account": link.account_id,
            "role": link.role,
            "repository": who.repository,
        }
