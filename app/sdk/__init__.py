"""Python client for the Spell Platform ``/v1`` API."""

from app.sdk.client import UNSET, ApiError, SpellClient

__all__ = ["UNSET", "ApiError", "SpellClient"]
