"""The pure part of OIDC sign-in (app/domain/oidc.py): header, claims, links, lifetimes; and the
issuer's key cache (app/services/oidc.py), with a fake clock and a fake issuer."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from app.domain.oidc import (
    GITHUB_ISSUER,
    LEEWAY_S,
    MAX_TTL_S,
    OidcRejected,
    candidate_patterns,
    check_claims,
    check_header,
    check_role,
    check_token_shape,
    normalize_pattern,
    pick_link,
    platform_ttl,
)
from app.services.oidc import MIN_REFETCH_S, JwksClient, JwksUnavailable

NOW = 1_800_000_000
AUD = "spell-platform"


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": GITHUB_ISSUER,
        "aud": AUD,
        "iat": NOW - 10,
        "nbf": NOW - 10,
        "exp": NOW + 290,
        "repository": "Octo-Org/Deploy",
        "repository_owner": "octo-org",
        "repository_id": "42",
        "ref": "refs/heads/main",
        "sha": "a" * 40,
        "workflow_ref": "octo-org/deploy/.github/workflows/ci.yml@refs/heads/main",
        "event_name": "push",
        "run_id": "123",
        "run_attempt": "1",
        "actor": "octocat",
        "sub": "repo:octo-org/deploy:ref:refs/heads/main",
        "jti": "abc",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def check(c: dict[str, Any], now: float = NOW) -> Any:
    return check_claims(c, issuer=GITHUB_ISSUER, audience=AUD, now=now)


# ------------------------------------------------------------------------------ header


def test_the_header_must_be_rs256_with_a_key_id() -> None:
    assert check_header({"alg": "RS256", "kid": "k1", "typ": "JWT"}) == "k1"


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "HS256", "kid": "k1"},  # algorithm confusion: the public key as an HMAC secret
        {"alg": "none", "kid": "k1"},
        {"alg": "RS512", "kid": "k1"},
        {"alg": "ES256", "kid": "k1"},
        {"kid": "k1"},
        {"alg": "RS256"},
        {"alg": "RS256", "kid": ""},
        {"alg": "RS256", "kid": 7},
    ],
)
def test_other_algorithms_and_missing_key_ids_are_rejected(header: dict[str, Any]) -> None:
    with pytest.raises(OidcRejected):
        check_header(header)


@pytest.mark.parametrize(
    "raw", [None, "", "   ", 3, "abc", "a.b", "a.b.c.d", "a.b.c d", "x" * 20000]
)
def test_only_compact_jws_strings_are_tokens(raw: Any) -> None:
    with pytest.raises(OidcRejected):
        check_token_shape(raw)


def test_a_token_is_trimmed() -> None:
    assert check_token_shape(" eyJa.eyJb.c_d-e \n") == "eyJa.eyJb.c_d-e"


# ------------------------------------------------------------------------------ claims


def test_good_claims_give_the_workflow_identity() -> None:
    who = check(claims())
    assert who.repository == "octo-org/deploy"
    assert who.owner == "octo-org"
    assert who.exp == NOW + 290
    assert who.run_id == "123"
    data = who.audit_data()
    assert data["repository"] == "octo-org/deploy"
    assert data["workflow_ref"].endswith("ci.yml@refs/heads/main")
    assert not any("token" in k for k in data)  # the audit log redacts such keys wholesale


def test_the_issuer_must_match_exactly() -> None:
    with pytest.raises(OidcRejected, match="not issued by"):
        check(claims(iss="https://token.actions.githubusercontent.com.evil.example"))
    with pytest.raises(OidcRejected, match="not issued by"):
        check(claims(iss=None))


@pytest.mark.parametrize("aud", ["other", ["other", "x"], None, 5, ""])
def test_the_audience_must_be_ours(aud: Any) -> None:
    with pytest.raises(OidcRejected, match="audience"):
        check(claims(aud=aud))


def test_an_audience_list_containing_ours_is_fine() -> None:
    assert check(claims(aud=["sts.amazonaws.com", AUD])).repository == "octo-org/deploy"


def test_expiry_with_a_small_leeway() -> None:
    exp = NOW + 290
    assert check(claims(), now=exp + LEEWAY_S - 1).repository
    with pytest.raises(OidcRejected, match="expired"):
        check(claims(), now=exp + LEEWAY_S)
    with pytest.raises(OidcRejected, match="expired"):
        check(claims(exp=NOW - 3600))


def test_not_before_and_issued_at_in_the_future_are_rejected() -> None:
    with pytest.raises(OidcRejected, match="not valid yet"):
        check(claims(nbf=NOW + LEEWAY_S + 5, iat=NOW))
    with pytest.raises(OidcRejected, match="future"):
        check(claims(iat=NOW + LEEWAY_S + 5, nbf=None))
    assert check(claims(nbf=NOW + LEEWAY_S - 1, iat=NOW)).repository  # clock skew


@pytest.mark.parametrize("name", ["exp", "iat"])
def test_lifetime_claims_are_required(name: str) -> None:
    with pytest.raises(OidcRejected, match=name):
        check(claims(**{name: None}))


@pytest.mark.parametrize("bad", ["soon", True, [1]])
def test_lifetime_claims_are_numbers(bad: Any) -> None:
    with pytest.raises(OidcRejected, match="exp"):
        check(claims(exp=bad))


@pytest.mark.parametrize(
    "repository", [None, "", "octo-org", "octo-org/", "/deploy", "a/b/c", "-x/y", "o/..", 5]
)
def test_the_repository_claim_must_be_owner_slash_repo(repository: Any) -> None:
    with pytest.raises(OidcRejected, match="repository"):
        check(claims(repository=repository))


def test_the_owner_claim_must_agree_with_the_repository() -> None:
    with pytest.raises(OidcRejected, match="repository_owner"):
        check(claims(repository_owner="someone-else"))
    assert check(claims(repository_owner=None)).owner == "octo-org"


def test_messages_never_contain_the_claims_of_a_rejected_token_beyond_names() -> None:
    with pytest.raises(OidcRejected) as info:
        check(claims(exp=NOW - 3600))
    assert "octo-org" not in info.value.message


# ------------------------------------------------------------------------------- links


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Octo-Org/Deploy", "octo-org/deploy"),
        (" octo-org/* ", "octo-org/*"),
        ("a/b.c_d-e", "a/b.c_d-e"),
        ("o/.github", "o/.github"),
    ],
)
def test_patterns_are_normalized(text: str, expected: str) -> None:
    assert normalize_pattern(text) == expected


@pytest.mark.parametrize(
    "text", ["", "octo-org", "*/*", "octo-org/de*", "octo--org/x", "o/x/y", "o/..", "o/ x", "*"]
)
def test_bad_patterns_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="OWNER/REPO"):
        normalize_pattern(text)


def test_roles_a_link_may_grant() -> None:
    assert check_role("caster") == "caster"
    assert check_role("maker") == "maker"
    with pytest.raises(ValueError, match="operator"):
        check_role("operator")


def test_matching_is_by_owner_and_name_case_insensitively() -> None:
    assert candidate_patterns("Octo-Org/Deploy") == ("octo-org/deploy", "octo-org/*")


def test_a_repositorys_own_link_wins_over_its_owners() -> None:
    links = ["octo-org/*", "octo-org/deploy", "other/deploy"]
    assert pick_link("octo-org/deploy", links) == "octo-org/deploy"
    assert pick_link("octo-org/web", links) == "octo-org/*"
    assert pick_link("other/web", links) is None
    assert pick_link("octo-org/deploy", []) is None


# ------------------------------------------------------------------------------ lifetime


def test_the_platform_token_lives_as_long_as_the_oidc_token_at_most_an_hour() -> None:
    assert platform_ttl(NOW + 300, NOW) == 300
    assert platform_ttl(NOW + 7200, NOW) == MAX_TTL_S
    assert platform_ttl(NOW + 300, NOW, requested=60) == 60
    assert platform_ttl(NOW + 300, NOW, requested=900) == 300


def test_a_token_inside_the_leeway_gets_at_most_the_leeway() -> None:
    ttl = platform_ttl(NOW - 10, NOW)
    assert 1 <= ttl <= LEEWAY_S


# ------------------------------------------------------------------------ the issuer's keys

TTL = 600.0


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeIssuer(JwksClient):
    """A :class:`JwksClient` whose issuer is in memory: ``published`` keys, or down."""

    def __init__(self, clock: FakeClock, **kwargs: Any) -> None:
        super().__init__("https://issuer.invalid/jwks", ttl=TTL, monotonic=clock, **kwargs)
        self.up = True
        self.published: dict[str, RSAPublicKey] = {}
        self.calls = 0

    async def _fetch(self) -> dict[str, RSAPublicKey]:
        self.calls += 1
        if not self.up:
            raise JwksUnavailable(f"{self.url} cannot be reached: ClientConnectorError")
        return dict(self.published)


@pytest.fixture(scope="module")
def public_key() -> RSAPublicKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()


async def test_a_down_issuer_is_asked_once_per_interval_and_its_last_keys_still_verify(
    public_key: RSAPublicKey,
) -> None:
    clock = FakeClock()
    jwks = FakeIssuer(clock)
    jwks.published = {"k1": public_key}
    assert await jwks.key("k1") is public_key
    assert jwks.calls == 1
    clock.advance(TTL + 1)  # the cache is stale
    jwks.up = False
    for _ in range(50):
        assert await jwks.key("k1") is public_key  # kept while the issuer is down
    assert jwks.calls == 2  # one attempt, not fifty
    clock.advance(MIN_REFETCH_S - 1)
    assert await jwks.key("k1") is public_key
    assert jwks.calls == 2
    clock.advance(1)
    assert await jwks.key("k1") is public_key
    assert jwks.calls == 3
    jwks.max_stale = clock.t - 1000.0  # the keys are now too old to trust
    with pytest.raises(JwksUnavailable, match="cannot be reached"):
        await jwks.key("k1")
    assert jwks.calls == 3


async def test_without_keys_a_down_issuer_is_unavailable_between_attempts(
    public_key: RSAPublicKey,
) -> None:
    clock = FakeClock()
    jwks = FakeIssuer(clock)
    jwks.up = False
    for _ in range(20):
        with pytest.raises(JwksUnavailable, match="cannot be reached"):
            await jwks.key("k1")
    assert jwks.calls == 1
    clock.advance(MIN_REFETCH_S)
    with pytest.raises(JwksUnavailable):
        await jwks.key("k1")
    assert jwks.calls == 2
    jwks.up = True
    jwks.published = {"k1": public_key}
    with pytest.raises(JwksUnavailable):  # back up, but within the interval: no new attempt
        await jwks.key("k1")
    assert jwks.calls == 2
    clock.advance(MIN_REFETCH_S)
    assert await jwks.key("k1") is public_key  # back up: fetched at the next attempt
    assert jwks.calls == 3


async def test_unknown_key_ids_refetch_at_most_once_per_interval(
    public_key: RSAPublicKey,
) -> None:
    clock = FakeClock()
    jwks = FakeIssuer(clock)
    jwks.published = {"k1": public_key}
    assert await jwks.key("k1") is public_key
    for _ in range(6):  # 6 times 15 s of tokens with made-up key ids: 3 fetches
        clock.advance(MIN_REFETCH_S / 2)
        for _ in range(20):
            assert await jwks.key(secrets.token_hex(8)) is None
    assert jwks.calls == 1 + 3
    # a rotation is picked up at the next allowed fetch
    clock.advance(MIN_REFETCH_S)
    jwks.published = {"k1": public_key, "k2": public_key}
    assert await jwks.key("k2") is public_key
    assert jwks.calls == 5
    # made-up key ids while the issuer is down: still one attempt per interval
    jwks.up = False
    clock.advance(MIN_REFETCH_S)
    for _ in range(20):
        with pytest.raises(JwksUnavailable):
            await jwks.key(secrets.token_hex(8))
        assert await jwks.key("k1") is public_key  # known keys still verify meanwhile
    assert jwks.calls == 6
