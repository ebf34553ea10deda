"""Wakes SSE streams of this process when a cast gets a new event (they poll as a fallback)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class EventHub:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def notify(self, cast_id: str) -> None:
        for ev in self._waiters.get(cast_id, ()):
            ev.set()

    @contextlib.contextmanager
    def listen(self, cast_id: str) -> Iterator[asyncio.Event]:
        """An event set on every notify for ``cast_id``; register it BEFORE reading the ledger."""
        ev = asyncio.Event()
        self._waiters.setdefault(cast_id, set()).add(ev)
        try:
            yield ev
        finally:
            waiters = self._waiters.get(cast_id)
            if waiters is not None:
                waiters.discard(ev)
                if not waiters:
                    del self._waiters[cast_id]
