"""Roles and scopes (SPEC §17)."""

from __future__ import annotations

from typing import Literal

Role = Literal["maker", "caster", "operator", "auditor"]
ROLES: tuple[str, ...] = ("maker", "caster", "operator", "auditor")

SCOPES_BY_ROLE: dict[str, frozenset[str]] = {
    "maker": frozenset({"spell:publish"}),
    "caster": frozenset({"cast:invoke"}),
    "operator": frozenset({"ops:deploy", "spell:publish", "cast:invoke", "audit:read"}),
    "auditor": frozenset({"audit:read"}),
}


def scopes_for(role: str) -> frozenset[str]:
    try:
        return SCOPES_BY_ROLE[role]
    except KeyError:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}") from None
