"""OIDC links in the ledger: which repositories (``owner/repo`` or ``owner/*``) may sign in with
a GitHub Actions OIDC token, and as which account and role (``spell oidc allow|revoke|list``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select

from app.domain.oidc import candidate_patterns, normalize_pattern, pick_link
from app.services.ports import Clock
from app.store.ledger import SqlLedger
from app.store.models import OidcLink


@dataclass(frozen=True)
class Link:
    pattern: str
    account_id: str
    role: str
    created_at: datetime


def _link(row: OidcLink) -> Link:
    return Link(row.pattern, row.account_id, row.role, row.created_at)


class OidcStore:
    def __init__(self, ledger: SqlLedger, clock: Clock) -> None:
        self.ledger = ledger
        self.clock = clock

    async def allow(self, pattern: str, account_id: str, role: str) -> None:
        """Create or replace the link (the account must exist: ``ensure_principal`` first)."""
        key = normalize_pattern(pattern)
        now = self.clock.now()
        async with self.ledger.write() as s:
            await s.execute(
                self.ledger._insert(OidcLink)
                .values(pattern=key, account_id=account_id, role=role, created_at=now)
                .on_conflict_do_update(
                    index_elements=["pattern"],
                    set_={"account_id": account_id, "role": role, "created_at": now},
                )
            )

    async def revoke(self, pattern: str) -> bool:
        key = normalize_pattern(pattern)
        async with self.ledger.write() as s:
            res = await s.execute(delete(OidcLink).where(OidcLink.pattern == key))
            return bool(res.rowcount)  # type: ignore[attr-defined]

    async def links(self) -> list[Link]:
        async with self.ledger.reader() as s:
            rows = (await s.scalars(select(OidcLink).order_by(OidcLink.pattern))).all()
        return [_link(r) for r in rows]

    async def link_for(self, repository: str) -> Link | None:
        """The link admitting ``repository`` (its own link first, else its owner's ``*``)."""
        candidates = candidate_patterns(repository)
        async with self.ledger.reader() as s:
            rows = {
                r.pattern: r
                for r in (
                    await s.scalars(select(OidcLink).where(OidcLink.pattern.in_(candidates)))
                ).all()
            }
        chosen = pick_link(repository, rows)
        return _link(rows[chosen]) if chosen is not None else None
