"""The outbox relay's passes (app/worker/consumer.py): a delayed kick gathers what is stored
meanwhile into one pass; a partial page is not read again at once (a kick or the poll does it);
a full page is."""

from __future__ import annotations

import asyncio
from typing import Any

from app.store.models import Outbox
from app.worker.consumer import OutboxRelay


class FakeLedger:
    def __init__(self) -> None:
        self.rows: list[Outbox] = []
        self.reads = 0
        self.marks: list[list[int]] = []
        self._next = 1

    def add(self, n: int) -> None:
        for _ in range(n):
            i = self._next
            self._next += 1
            self.rows.append(
                Outbox(id=i, subject="webhook.github", msg_id=f"wh:{i}", payload={"n": i})
            )

    async def unsent_outbox(self, limit: int = 100) -> list[Outbox]:
        self.reads += 1
        return self.rows[:limit]

    async def mark_sent(self, ids: list[int]) -> None:
        if not ids:  # as SqlLedger.mark_sent: nothing to write
            return
        self.marks.append(list(ids))
        self.rows = [r for r in self.rows if r.id not in set(ids)]


class FakeQueue:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def publish(self, subject: str, payload: Any, *, msg_id: str, headers: Any) -> None:
        self.sent.append(msg_id)


async def _settle(ledger: FakeLedger, reads: int) -> None:
    for _ in range(200):
        if ledger.reads >= reads and not ledger.rows:
            return
        await asyncio.sleep(0.01)


async def test_delayed_kicks_share_one_pass_and_a_partial_page_is_not_read_twice() -> None:
    ledger, queue = FakeLedger(), FakeQueue()
    relay = OutboxRelay(ledger, queue, poll_interval=60.0)  # type: ignore[arg-type]
    task = asyncio.create_task(relay.run())
    try:
        await _settle(ledger, 1)  # the first pass at start: nothing there
        assert ledger.reads == 1
        for _ in range(5):  # five deliveries stored within the delay
            ledger.add(1)
            relay.kick(0.05)
        await _settle(ledger, 2)
        await asyncio.sleep(0.1)
        assert queue.sent == [f"wh:{i}" for i in range(1, 6)]
        assert ledger.marks == [[1, 2, 3, 4, 5]]  # one pass, one write
        assert ledger.reads == 2  # and no second read of an empty outbox after it
        # an immediate kick is not held back by a pending delayed one
        ledger.add(1)
        relay.kick()
        await _settle(ledger, 3)
        assert queue.sent[-1] == "wh:6"
    finally:
        task.cancel()


async def test_a_full_page_is_followed_by_another_pass_at_once() -> None:
    ledger, queue = FakeLedger(), FakeQueue()
    relay = OutboxRelay(ledger, queue, poll_interval=60.0)  # type: ignore[arg-type]
    ledger.add(OutboxRelay.PAGE + 3)
    task = asyncio.create_task(relay.run())
    try:
        await _settle(ledger, 2)
        await asyncio.sleep(0.05)
        assert len(queue.sent) == OutboxRelay.PAGE + 3
        assert [len(m) for m in ledger.marks] == [OutboxRelay.PAGE, 3]
        assert ledger.reads == 2
    finally:
        task.cancel()
