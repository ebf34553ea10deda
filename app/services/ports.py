"""Protocols the use cases need. Adapters implement them; entry points wire them together."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class Message(Protocol):
    """One delivery of a queued message (at-least-once: ack when done, or it comes back)."""

    @property
    def subject(self) -> str: ...
    @property
    def msg_id(self) -> str: ...
    @property
    def payload(self) -> dict[str, Any]: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def num_delivered(self) -> int: ...
    @property
    def dead(self) -> bool:
        """A dead letter: handed out once more after ``max_deliver`` deliveries ran out without
        an ack (``num_delivered`` is that count). The owner of the subject ends what the message
        was for, then acks it; a dead letter that is nak'ed or not acked in time comes back."""
        ...

    async def ack(self) -> None: ...
    async def nak(self, delay: float | None = None) -> None: ...
    async def in_progress(self) -> None: ...


class Queue(Protocol):
    """Run requests (``run.<sha256>``): at-least-once delivery, duplicates dropped by ``msg_id``."""

    async def publish(
        self,
        subject: str,
        payload: dict[str, Any],
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> None: ...

    async def fetch(self, batch: int, timeout: float) -> list[Message]: ...

    async def close(self) -> None: ...


class ArtifactStore(Protocol):
    """Where run outputs live. ``location`` strings are opaque to everything but the store."""

    async def put(self, artifact_id: str, src: Path, *, digest: str) -> str: ...

    async def open_path(self, location: str) -> Path: ...

    async def redirect_url(self, location: str) -> str | None:
        """A short-lived URL to send the client to instead of streaming (None: stream it)."""
        ...

    async def delete(self, location: str) -> None: ...

    async def put_object(self, key: str, src: Path, *, content_type: str) -> str:
        """Store any file (e.g. an exported audit segment) under ``key``, a relative path such
        as ``audit/2026-11-26.jsonl`` (no ``..``, no leading ``/``), replacing what is there.
        Returns its location, which ``open_path`` and ``delete`` accept. Local folder: under
        the artifacts folder; S3: ``PREFIX/<key>``, encrypted, with its sha256 checked."""
        ...


class AuditSink(Protocol):
    async def append(
        self,
        event: str,
        *,
        actor: str | None = None,
        cast_id: str | None = None,
        input_hash: str | None = None,
        amount_cents: int | None = None,
        currency: str | None = None,
        traceparent: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]: ...
