"""``spell oidc allow|list|revoke``: which repositories may sign in with a GitHub Actions OIDC
token (``POST /v1/oidc/token``), and as which account and role.

Operator commands on the local ledger (``SPELL_DATA_DIR`` / ``DATABASE_URL``), like
``spell token issue``: no server and no bearer token needed. Registered by ``main.py``; this
module imports nothing from it at import time.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

import click

from app.config import Settings
from app.domain.oidc import LINK_ROLES, check_role, normalize_pattern
from app.errors import AppError


def _pattern(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return normalize_pattern(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.group("oidc")
def oidc_group() -> None:
    """Let workflows sign in with GitHub Actions OIDC (operator, on the local ledger).

    A link OWNER/REPO (or OWNER/* for every repository of an owner) lets a workflow of that
    repository trade its OIDC token for a short-lived platform token of ACCOUNT and ROLE; the
    companion Action does that when its `token` input is empty.
    """


@oidc_group.command("allow")
@click.argument("repository", metavar="OWNER/REPO", callback=_pattern)
@click.option("--account", required=True, help="The account the workflow acts as (created if new).")
@click.option(
    "--role",
    type=click.Choice(LINK_ROLES),
    default="caster",
    show_default=True,
    help="caster: cast spells; maker: publish spells; auditor: read-only.",
)
def oidc_allow(repository: str, account: str, role: str) -> None:
    """Allow a repository (OWNER/REPO, or OWNER/* for all of an owner's) to sign in.

    Replaces an earlier link of the same repository. A repository's own link wins over its
    owner's OWNER/* link.

    \b
    Examples:
      spell oidc allow octo-org/deploy --account ACME --role caster
      spell oidc allow octo-org/* --account ACME
    """
    check_role(role)
    if not account or len(account) > 64 or any(c.isspace() or ord(c) < 0x20 for c in account):
        raise click.BadParameter(
            "the account must be 1-64 characters without spaces", param_hint="'--account'"
        )
    settings = Settings()

    async def go() -> None:
        from app.cli.local import local_platform
        from app.store.oidc_store import OidcStore

        async with local_platform(settings) as platform:
            await platform.ledger.ensure_principal(
                account,
                role,
                monthly_cap=settings.default_monthly_cap_cents,
                total_cap=settings.default_total_cap_cents,
            )
            await OidcStore(platform.ledger, platform.clock).allow(repository, account, role)
            await platform.audit.append(
                "oidc.allowed",
                actor="operator:cli",
                data={"link": repository, "account": account, "role": role},
            )

    asyncio.run(go())
    which = (
        f"workflows of {repository.split('/')[0]}'s repositories"
        if repository.endswith("/*")
        else f"workflows of {repository}"
    )
    click.echo(
        f"allowed {repository}: {which} sign in as account {account} (role {role}) "
        f"with audience {settings.oidc_audience}"
    )


@oidc_group.command("revoke")
@click.argument("repository", metavar="OWNER/REPO", callback=_pattern)
def oidc_revoke(repository: str) -> None:
    """Remove a link; its workflows can no longer sign in (tokens already issued run out)."""
    settings = Settings()

    async def go() -> bool:
        from app.cli.local import local_platform
        from app.store.oidc_store import OidcStore

        async with local_platform(settings) as platform:
            removed = await OidcStore(platform.ledger, platform.clock).revoke(repository)
            if removed:
                await platform.audit.append(
                    "oidc.revoked", actor="operator:cli", data={"link": repository}
                )
            return removed

    if not asyncio.run(go()):
        raise AppError("NOT_FOUND", f"{repository} is not allowed (see `spell oidc list`)")
    click.echo(f"revoked {repository}")


@oidc_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def oidc_list(as_json: bool) -> None:
    """List the links: OWNER/REPO or OWNER/* → account and role."""
    settings = Settings()

    async def go() -> list[dict[str, Any]]:
        from app.cli.local import local_engine, sqlite_file
        from app.services.ports import SystemClock
        from app.store.ledger import SqlLedger
        from app.store.oidc_store import OidcStore

        db_file = sqlite_file(settings)
        if db_file is not None and not db_file.exists():
            return []
        async with local_engine(settings) as engine:
            ledger = SqlLedger(engine, SystemClock())
            try:
                links = await OidcStore(ledger, SystemClock()).links()
            finally:
                await ledger.aclose()
        return [
            {
                "repository": x.pattern,
                "account": x.account_id,
                "role": x.role,
                "created_at": x.created_at.isoformat(),
            }
            for x in links
        ]

    links = asyncio.run(go())
    if as_json:
        click.echo(json.dumps(links, indent=2, sort_keys=True))
        return
    if not links:
        click.echo(
            "no links (add one with `spell oidc allow OWNER/REPO --account ACCOUNT`)", err=True
        )
        return
    from app.cli.main import table

    click.echo(
        table(
            ("REPOSITORY", "ACCOUNT", "ROLE", "ALLOWED"),
            ((x["repository"], x["account"], x["role"], x["created_at"][:19]) for x in links),
        )
    )


COMMANDS: Final = (oidc_group,)
