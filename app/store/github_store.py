"""GitHub state in the ledger: installations, the repository allow-list, account links and
where each GitHub-driven cast lives (comment, check run, workflow run)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import delete, select, update

from app.services.ports import Clock
from app.store.ledger import SqlLedger
from app.store.models import AuditOutbox, CastTarget, GitHubInstallation, GitHubLink, GitHubRepo


def _norm(name: str) -> str:
    return name.strip().lower()


class GitHubStore:
    def __init__(self, ledger: SqlLedger, clock: Clock) -> None:
        self.ledger = ledger
        self.clock = clock

    # ------------------------------------------------------------------ installations

    async def upsert_installation(
        self,
        installation_id: int,
        *,
        account_login: str,
        account_type: str,
        repository_selection: str,
        repos: Iterable[tuple[str, int, bool]] = (),
        replace_repos: bool = False,
    ) -> None:
        now = self.clock.now()
        async with self.ledger.write() as s:
            await s.execute(
                self.ledger._insert(GitHubInstallation)
                .values(
                    id=installation_id,
                    account_login=account_login,
                    account_type=account_type,
                    repository_selection=repository_selection,
                    created_at=now,
                    updated_at=now,
                )
                .on_conflict_do_update(
                    index_elements=["id"],
                    set_={
                        "account_login": account_login,
                        "account_type": account_type,
                        "repository_selection": repository_selection,
                        "deleted_at": None,
                        "updated_at": now,
                    },
                )
            )
            if replace_repos:
                await s.execute(
                    delete(GitHubRepo).where(GitHubRepo.installation_id == installation_id)
                )
            await self._add_repos(s, installation_id, repos)

    async def _add_repos(
        self, s: Any, installation_id: int, repos: Iterable[tuple[str, int, bool]]
    ) -> None:
        now = self.clock.now()
        for full_name, repo_id, private in repos:
            await s.execute(
                self.ledger._insert(GitHubRepo)
                .values(
                    full_name=_norm(full_name),
                    installation_id=installation_id,
                    repo_id=repo_id,
                    private=private,
                    added_at=now,
                )
                .on_conflict_do_update(
                    index_elements=["full_name"],
                    set_={
                        "installation_id": installation_id,
                        "repo_id": repo_id,
                        "private": private,
                    },
                )
            )

    async def add_repos(self, installation_id: int, repos: Iterable[tuple[str, int, bool]]) -> None:
        async with self.ledger.write() as s:
            await self._add_repos(s, installation_id, repos)

    async def remove_repos(self, installation_id: int, full_names: Iterable[str]) -> None:
        names = [_norm(n) for n in full_names]
        async with self.ledger.write() as s:
            await s.execute(
                delete(GitHubRepo).where(
                    GitHubRepo.installation_id == installation_id, GitHubRepo.full_name.in_(names)
                )
            )

    async def set_installation_state(
        self, installation_id: int, *, suspended: bool | None = None, deleted: bool = False
    ) -> None:
        now = self.clock.now()
        values: dict[str, Any] = {"updated_at": now}
        if suspended is not None:
            values["suspended_at"] = now if suspended else None
        if deleted:
            values["deleted_at"] = now
        async with self.ledger.write() as s:
            await s.execute(
                update(GitHubInstallation)
                .where(GitHubInstallation.id == installation_id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if deleted:
                await s.execute(
                    delete(GitHubRepo).where(GitHubRepo.installation_id == installation_id)
                )

    async def installation_for(self, full_name: str) -> int | None:
        """The live installation that granted this repository, or None (not reachable)."""
        async with self.ledger.reader() as s:
            row = (
                await s.execute(
                    select(GitHubRepo.installation_id)
                    .join(GitHubInstallation, GitHubInstallation.id == GitHubRepo.installation_id)
                    .where(
                        GitHubRepo.full_name == _norm(full_name),
                        GitHubInstallation.suspended_at.is_(None),
                        GitHubInstallation.deleted_at.is_(None),
                    )
                )
            ).first()
            return None if row is None else int(row[0])

    async def installations(self) -> list[GitHubInstallation]:
        async with self.ledger.reader() as s:
            return list((await s.scalars(select(GitHubInstallation))).all())

    # ------------------------------------------------------------------ links

    async def link(self, kind: str, login: str, account_id: str, role: str = "caster") -> None:
        now = self.clock.now()
        async with self.ledger.write() as s:
            await s.execute(
                self.ledger._insert(GitHubLink)
                .values(
                    kind=kind, login=_norm(login), account_id=account_id, role=role, created_at=now
                )
                .on_conflict_do_update(
                    index_elements=["kind", "login"],
                    set_={"account_id": account_id, "role": role},
                )
            )

    async def unlink(self, kind: str, login: str) -> bool:
        async with self.ledger.write() as s:
            res = await s.execute(
                delete(GitHubLink).where(GitHubLink.kind == kind, GitHubLink.login == _norm(login))
            )
            return bool(res.rowcount)  # type: ignore[attr-defined]

    async def linked_account(self, kind: str, login: str) -> GitHubLink | None:
        async with self.ledger.reader() as s:
            return await s.get(GitHubLink, (kind, _norm(login)))

    # ------------------------------------------------------------------ cast targets

    async def target(self, cast_id: str) -> CastTarget | None:
        async with self.ledger.reader() as s:
            return await s.get(CastTarget, cast_id)

    async def update_target(
        self, cast_id: str, *, audit: Sequence[AuditOutbox] = (), **values: Any
    ) -> None:
        """Set columns of a cast's target, and ``audit`` (its audit outbox rows) in the same
        transaction."""
        async with self.ledger.write() as s:
            await s.execute(
                update(CastTarget)
                .where(CastTarget.cast_id == cast_id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            s.add_all(audit)

    async def claim_field(self, cast_id: str, field: str) -> bool:
        """Claim the right to create a GitHub object (``bot_comment_id``/``check_run_id``):
        NULL → 0 (being created). False if it exists or another job is creating it."""
        column = getattr(CastTarget, field)
        async with self.ledger.write() as s:
            res = await s.execute(
                update(CastTarget)
                .where(CastTarget.cast_id == cast_id, column.is_(None))
                .values({field: 0})
                .execution_options(synchronize_session=False)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def cast_for_run(self, repo: str, run_id: int) -> str | None:
        async with self.ledger.reader() as s:
            row = (
                await s.execute(
                    select(CastTarget.cast_id).where(
                        CastTarget.repo == _norm(repo), CastTarget.run_id == run_id
                    )
                )
            ).first()
            return None if row is None else str(row[0])
