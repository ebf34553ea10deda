"""The one error type of the platform and the code -> HTTP status table (SPEC §24).

Every surface (HTTP, CLI, worker, MCP) maps :class:`AppError` to its own form exactly once.
"""

from __future__ import annotations

from typing import Any

#: SPEC §24 codes plus the few the platform needs beyond them.
STATUS_BY_CODE: dict[str, int] = {
    "BUDGET_CAP_EXCEEDED": 402,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "FORBIDDEN_REPO": 403,
    "WORKFLOW_NOT_FOUND": 404,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "CONFLICT": 409,
    "VALIDATION_ERROR": 422,
    "IDEMPOTENCY_CONFLICT": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "RATE_LIMITED": 429,
    "ARTIFACT_EXPIRED": 410,
    "TIMEOUT": 504,
    "INTERNAL": 500,
    "SANDBOX_UNAVAILABLE": 503,
    "UNAVAILABLE": 503,
    # Billing (Stripe): the account must fix its payment method / a payment was refused.
    "PAYMENT_REQUIRED": 402,
    "PAYMENT_FAILED": 402,
    # Terminal codes of a failed run (reported on the cast, not as an HTTP answer):
    "SPELL_FAILED": 422,
    "MEMORY_LIMIT": 422,
    "OUTPUT_TOO_LARGE": 422,
}


class AppError(Exception):
    """A failure the caller can act on: a SPEC error code, a message and optional hints."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retry_after: int | None = None,
        detail: dict[str, Any] | None = None,
        status: int | None = None,
    ) -> None:
        if code not in STATUS_BY_CODE:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.detail = detail
        self.status = status if status is not None else STATUS_BY_CODE[code]

    def to_body(self) -> dict[str, Any]:
        """The SPEC error shape: ``{"error": {"code", "message", "retry_after"?, ...}}``."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after is not None:
            err["retry_after"] = self.retry_after
        if self.detail:
            err["detail"] = self.detail
        return {"error": err}

    def __repr__(self) -> str:
        return f"AppError({self.code!r}, {self.message!r})"


def validation_error(message: str, *, path: str | None = None) -> AppError:
    return AppError(
        "VALIDATION_ERROR", message, detail={"path": path} if path is not None else None
    )


def not_found(what: str, ident: str) -> AppError:
    return AppError("NOT_FOUND", f"{what} {ident!r} not found")
