"""Per-principal token buckets: headers on every /v1 response, 429 with Retry-After."""

from __future__ import annotations

from typing import Any

import pytest

from app.config import Settings
from tests.conftest import Harness


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def settings(tmp_path: Any, database_url: str | None) -> Settings:
    return Settings(
        SPELL_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=database_url,
        SPELL_SECRET_KEY="k" * 40,
        SPELL_RATE_LIMIT_BURST=5,
        SPELL_RATE_LIMIT_PER_SEC=0.5,
    )


async def test_every_v1_response_carries_rate_limit_headers_and_the_limit_is_429(
    harness: Harness,
) -> None:
    token = await harness.token("c", "caster")
    seen = []
    for path in ["/v1/billing/caps", "/v1/spells/nope", "/v1/casts/nope", "/v1/spells"]:
        r = await harness.client.get(path, headers=auth(token))
        assert "X-RateLimit-Limit" in r.headers, path
        seen.append(int(r.headers["X-RateLimit-Remaining"]))
        assert int(r.headers["X-RateLimit-Reset"]) > 0
    assert seen == [4, 3, 2, 1]
    assert (await harness.client.get("/v1/spells", headers=auth(token))).status == 200
    r = await harness.client.get("/v1/spells", headers=auth(token))
    assert r.status == 429
    assert (await r.json())["error"]["code"] == "RATE_LIMITED"
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["X-RateLimit-Remaining"] == "0"
    # Another principal has its own bucket.
    other = await harness.token("d", "caster")
    assert (await harness.client.get("/v1/spells", headers=auth(other))).status == 200
