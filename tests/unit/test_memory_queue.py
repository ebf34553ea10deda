"""The in-process queue keeps JetStream's semantics: dedupe, explicit ack, redelivery, DLQ."""

from __future__ import annotations

import asyncio

from app.bus.memory import MemoryQueue


async def test_duplicates_inside_the_window_are_dropped() -> None:
    q = MemoryQueue()
    await q.publish("run.x", {"n": 1}, msg_id="a")
    await q.publish("run.x", {"n": 2}, msg_id="a")
    msgs = await q.fetch(10, timeout=0.1)
    assert [m.payload for m in msgs] == [{"n": 1}]
    assert q.duplicates == 1


async def test_an_unacked_message_comes_back_after_ack_wait() -> None:
    q = MemoryQueue(ack_wait=0.05)
    await q.publish("run.x", {}, msg_id="a")
    first = (await q.fetch(1, timeout=0.1))[0]
    again = (await q.fetch(1, timeout=1.0))[0]
    assert again.msg_id == "a" and again.num_delivered == 2
    await first.ack()  # a stale delivery's ack does not count
    await again.ack()
    assert await q.fetch(1, timeout=0.1) == []
    await q.close()


async def test_in_progress_extends_the_deadline() -> None:
    q = MemoryQueue(ack_wait=0.1)
    await q.publish("run.x", {}, msg_id="a")
    m = (await q.fetch(1, timeout=0.1))[0]
    for _ in range(3):
        await asyncio.sleep(0.06)
        await m.in_progress()
    assert await q.fetch(1, timeout=0.01) == []
    await m.ack()
    await q.close()


async def test_after_max_deliver_the_message_is_dead_lettered() -> None:
    q = MemoryQueue(ack_wait=0.02, max_deliver=2)
    await q.publish("run.x", {"k": 1}, msg_id="a")
    for _ in range(2):
        (await q.fetch(1, timeout=1.0))[0]
    await asyncio.sleep(0.1)
    assert await q.fetch(1, timeout=0.05) == []
    assert q.dead_letters == [{"subject": "run.x", "msg_id": "a", "payload": {"k": 1}}]
    await q.close()


async def test_nak_redelivers_at_once() -> None:
    q = MemoryQueue()
    await q.publish("run.x", {}, msg_id="a")
    m = (await q.fetch(1, timeout=0.1))[0]
    await m.nak()
    m2 = (await q.fetch(1, timeout=0.5))[0]
    assert m2.num_delivered == 2
    await m2.ack()
    await q.close()
