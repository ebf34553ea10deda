"""Sign-in with a GitHub Actions OIDC token: the pure part (claims, links, lifetimes).

A workflow step asks GitHub for an OIDC ID token (an RS256 JWT from
``https://token.actions.githubusercontent.com``) whose audience is this platform, and trades it
at ``POST /v1/oidc/token`` for a short-lived platform bearer token — the way PyPI's trusted
publishing works. An operator decides which repositories may do that and as which account and
role, with links ``OWNER/REPO`` (one repository) or ``OWNER/*`` (every repository of an owner):
``spell oidc allow OWNER/REPO --account ACME --role caster``.

This module checks everything about the token except its signature (done against the issuer's
JWKS in :mod:`app.services.oidc`): the header's algorithm, issuer, audience, expiry, not-before,
issued-at and the repository claims; it picks the link for a repository and the lifetime of the
platform token. No I/O; every rejection is an :class:`OidcRejected` whose message never contains
the token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

GITHUB_ISSUER: Final = "https://token.actions.githubusercontent.com"
DEFAULT_AUDIENCE: Final = "spell-platform"
#: The one signing algorithm accepted (GitHub signs with RS256); ``none``/HS256 confusion is out.
ALGORITHM: Final = "RS256"
#: Clock skew tolerated on ``exp``, ``nbf`` and ``iat``, seconds.
LEEWAY_S: Final = 30
#: A platform token issued for an OIDC token never lives longer than this, seconds.
MAX_TTL_S: Final = 3600
#: Roles a link may grant. ``operator`` is only ever issued on the server's machine.
LINK_ROLES: Final = ("caster", "maker", "auditor")
#: Largest OIDC token accepted (GitHub's are ~1.5 KB; a JWKS lookup is not worth more).
MAX_TOKEN_CHARS: Final = 16 * 1024

_OWNER = r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}"
_REPO = r"(?!\.\.?$)[A-Za-z0-9._-]{1,100}"
REPOSITORY_RE: Final = re.compile(rf"^({_OWNER})/({_REPO})$")
PATTERN_RE: Final = re.compile(rf"^({_OWNER})/({_REPO}|\*)$")
JWT_RE: Final = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


class OidcRejected(Exception):
    """The OIDC token cannot sign in (HTTP 401 ``UNAUTHORIZED``); ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class WorkflowIdentity:
    """Who presented the token: a workflow run of one repository (the verified claims)."""

    repository: str  # lower-case OWNER/REPO
    owner: str  # lower-case
    exp: int
    iat: int
    repository_id: str | None = None
    ref: str | None = None
    sha: str | None = None
    workflow_ref: str | None = None
    event_name: str | None = None
    run_id: str | None = None
    run_attempt: str | None = None
    actor: str | None = None
    subject: str | None = None
    jti: str | None = None

    def audit_data(self) -> dict[str, Any]:
        """The claims worth keeping in the audit log (never the token)."""
        fields = {
            "repository": self.repository,
            "repository_id": self.repository_id,
            "ref": self.ref,
            "sha": self.sha,
            "workflow_ref": self.workflow_ref,
            "event_name": self.event_name,
            "run_id": self.run_id,
            "run_attempt": self.run_attempt,
            "github_actor": self.actor,
            "oidc_jti": self.jti,
        }
        return {k: v for k, v in fields.items() if v is not None}


def check_token_shape(raw: Any) -> str:
    """The token as a compact JWS string, or :class:`OidcRejected`."""
    if not isinstance(raw, str) or not raw.strip():
        raise OidcRejected('send {"token": "<the GitHub Actions OIDC token>"}')
    text = str(raw).strip()
    if len(text) > MAX_TOKEN_CHARS or not JWT_RE.match(text):
        raise OidcRejected("the OIDC token is not a JWT (three base64url parts)")
    return text


def check_header(header: Mapping[str, Any]) -> str:
    """The key id of an acceptable JWT header (alg pinned to RS256), or :class:`OidcRejected`."""
    alg = header.get("alg")
    if alg != ALGORITHM:
        raise OidcRejected(f"the OIDC token must be signed with {ALGORITHM}, not {alg!s:.20}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 200:
        raise OidcRejected("the OIDC token's header names no signing key (kid)")
    return kid


def _int_claim(claims: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise OidcRejected(f"the OIDC token has no {name!r} claim")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OidcRejected(f"the OIDC token's {name!r} claim is not a number")
    return int(value)


def _opt_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise OidcRejected(f"the OIDC token's {name!r} claim is not a string")
    return str(value)[:500]


def check_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    audience: str,
    now: float,
    leeway: int = LEEWAY_S,
) -> WorkflowIdentity:
    """Check issuer, audience, lifetime and repository claims of a signature-checked token.

    ``now`` is Unix seconds. Raises :class:`OidcRejected` with what is wrong.
    """
    iss = claims.get("iss")
    if iss != issuer:
        raise OidcRejected(f"the OIDC token was not issued by {issuer} (iss is {iss!s:.100})")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if audience not in audiences:
        shown = ", ".join(str(a)[:100] for a in audiences[:3]) or "missing"
        raise OidcRejected(
            f"the OIDC token's audience is {shown}, not {audience!r}: request the token with "
            f"audience={audience} (the action's `audience` input)"
        )
    exp = _int_claim(claims, "exp", required=True)
    iat = _int_claim(claims, "iat", required=True)
    nbf = _int_claim(claims, "nbf", required=False)
    assert exp is not None and iat is not None
    if now >= exp + leeway:
        raise OidcRejected("the OIDC token has expired; request a new one")
    if nbf is not None and now + leeway < nbf:
        raise OidcRejected("the OIDC token is not valid yet (nbf is in the future)")
    if now + leeway < iat:
        raise OidcRejected("the OIDC token was issued in the future (iat); check the clocks")
    repository = claims.get("repository")
    if not isinstance(repository, str) or not REPOSITORY_RE.match(repository):
        raise OidcRejected("the OIDC token has no valid 'repository' claim (OWNER/REPO)")
    owner = repository.split("/", 1)[0].lower()
    claimed_owner = claims.get("repository_owner")
    if claimed_owner is not None and str(claimed_owner).lower() != owner:
        raise OidcRejected("the OIDC token's 'repository_owner' does not match its 'repository'")
    return WorkflowIdentity(
        repository=repository.lower(),
        owner=owner,
        exp=exp,
        iat=iat,
        repository_id=_opt_str(claims, "repository_id"),
        ref=_opt_str(claims, "ref"),
        sha=_opt_str(claims, "sha"),
        workflow_ref=_opt_str(claims, "workflow_ref"),
        event_name=_opt_str(claims, "event_name"),
        run_id=_opt_str(claims, "run_id"),
        run_attempt=_opt_str(claims, "run_attempt"),
        actor=_opt_str(claims, "actor"),
        subject=_opt_str(claims, "sub"),
        jti=_opt_str(claims, "jti"),
    )


# ------------------------------------------------------------------------------------ links


def normalize_pattern(text: str) -> str:
    """``OWNER/REPO`` or ``OWNER/*``, lower-cased; ``ValueError`` with a hint otherwise."""
    value = text.strip()
    if not PATTERN_RE.match(value):
        raise ValueError(
            f"{text!r} is not OWNER/REPO or OWNER/* (a GitHub owner, a slash, a repository "
            "name or *)"
        )
    return value.lower()


def check_role(role: str) -> str:
    if role not in LINK_ROLES:
        raise ValueError(
            f"role {role!r} cannot be granted to a workflow; one of {', '.join(LINK_ROLES)}"
        )
    return role


def candidate_patterns(repository: str) -> tuple[str, str]:
    """The two links that can admit ``repository``, most specific first."""
    repo = repository.lower()
    return repo, repo.split("/", 1)[0] + "/*"


def pick_link(repository: str, patterns: Iterable[str]) -> str | None:
    """The link that admits ``repository``: its exact ``OWNER/REPO`` link wins over ``OWNER/*``."""
    have = {p.lower() for p in patterns}
    for candidate in candidate_patterns(repository):
        if candidate in have:
            return candidate
    return None


def platform_ttl(
    exp: int,
    now: float,
    *,
    requested: int | None = None,
    cap: int = MAX_TTL_S,
    leeway: int = LEEWAY_S,
) -> int:
    """Lifetime of the platform token: the OIDC token's remaining life, at most ``cap`` (and at
    most ``requested`` when given); at least one second for a token inside the leeway."""
    remaining = int(exp - now)
    if remaining <= 0:
        remaining = max(1, int(exp + leeway - now))
    ttl = min(remaining, cap)
    if requested is not None:
        ttl = min(ttl, requested)
    return max(1, ttl)
