"""JSON-lines logging to stderr with secrets redacted.

One line per record::

    {"ts":"2024-05-01T12:00:00.123456Z","level":"INFO","logger":"app.web","msg":"cast accepted",
     "cast_id":"cst_…","trace_id":"4bf9…"}

Fields passed with ``extra={...}`` are added to the line. The message (after ``%`` formatting),
every extra field and exception tracebacks (``exc``) go through :func:`app.domain.audit.redact`,
so bearer tokens, JWTs, ``ghs_…`` tokens, Stripe keys and ``Authorization`` values never reach
the output.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from app.domain.audit import redact

__all__ = ["JsonFormatter", "configure_logging"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_CORE_FIELDS = ("ts", "level", "logger", "msg", "exc", "stack")


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Plain JSON types; anything else becomes its ``str()`` (``SecretStr`` prints as ``***``)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if depth > 20:
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


class JsonFormatter(logging.Formatter):
    """Formats a record as one redacted JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_") or key in _CORE_FIELDS:
                continue
            out[key] = redact({key: _jsonable(value)})[key]
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = redact(record.exc_text)
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of the call (test capture friendly)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def configure_logging(level: str = "INFO") -> None:
    """Send all logging to stderr as redacted JSON lines. Calling it again only sets the level."""
    root = logging.getLogger()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root.setLevel(numeric)
    if any(isinstance(handler, _StderrHandler) for handler in root.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
