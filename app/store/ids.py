"""Random ids of ledger rows: ``<prefix>_<24 hex>``."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"
