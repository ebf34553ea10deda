"""The in-process queue keeps JetStream's semantics: dedupe, explicit ack, redelivery, DLQ."""

from __future__ import annotations

import asyncio

from app.bus.memory import MemoryQueue
from app.services.ports import Message
from app.worker.consumer import JobConsumer, is_dead_letter


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


async def test_after_max_deliver_the_owner_gets_it_once_more_as_a_dead_letter() -> None:
    """As the JetStream adapter hands out a MAX_DELIVERIES advisory: same subject, id, payload
    and headers, ``dead`` set, ``num_delivered`` the count that ran out; acked, it is gone."""
    q = MemoryQueue(ack_wait=0.02, max_deliver=2)
    await q.publish("run.x", {"k": 1}, msg_id="a", headers={"traceparent": "t"})
    for n in (1, 2):
        m = (await q.fetch(1, timeout=1.0))[0]  # never acked: the worker died or hung
        assert (m.num_delivered, m.dead, is_dead_letter(m)) == (n, False, False)
    dead = (await q.fetch(1, timeout=1.0))[0]
    assert (dead.subject, dead.msg_id, dead.payload, dict(dead.headers)) == (
        "run.x",
        "a",
        {"k": 1},
        {"traceparent": "t"},
    )
    assert dead.dead and is_dead_letter(dead) and dead.num_delivered == 2
    assert q.dead_letters == [{"subject": "run.x", "msg_id": "a", "payload": {"k": 1}}]
    await dead.ack()
    assert await q.fetch(1, timeout=0.1) == []
    await q.close()


async def test_a_nak_of_the_last_delivery_makes_it_a_dead_letter() -> None:
    q = MemoryQueue(max_deliver=2)
    await q.publish("run.x", {}, msg_id="a")
    for _ in range(2):
        await (await q.fetch(1, timeout=0.1))[0].nak()
    dead = (await q.fetch(1, timeout=0.5))[0]
    assert dead.dead and dead.num_delivered == 2
    assert len(q.dead_letters) == 1
    await dead.ack()
    assert await q.fetch(1, timeout=0.05) == []
    await q.close()


async def test_a_dead_letter_not_acked_comes_back_still_dead() -> None:
    q = MemoryQueue(ack_wait=0.02, max_deliver=1)
    await q.publish("run.x", {}, msg_id="a")
    (await q.fetch(1, timeout=0.1))[0]  # never acked
    first = (await q.fetch(1, timeout=1.0))[0]
    assert first.dead
    await first.nak()  # recording it failed: it comes back
    second = (await q.fetch(1, timeout=1.0))[0]
    third = (await q.fetch(1, timeout=1.0))[0]  # not acked within ack_wait: back again
    for m in (second, third):
        assert m.dead and m.num_delivered == 1
    assert len(q.dead_letters) == 1  # recorded once
    await second.ack()  # a stale delivery's ack does not count
    await third.ack()
    assert await q.fetch(1, timeout=0.1) == []
    await q.close()


async def test_the_job_consumer_records_a_memory_dead_letter_and_acks_it() -> None:
    q = MemoryQueue(ack_wait=0.02, max_deliver=2)
    await q.publish("github.dispatch", {"n": 1}, msg_id="a")
    for _ in range(2):
        (await q.fetch(1, timeout=1.0))[0]  # two workers died holding it
    handled: list[str] = []
    recorded: list[tuple[str, bool, str]] = []

    async def handler(msg: Message) -> None:
        handled.append(msg.msg_id)

    async def on_dead(msg: Message, error: str) -> None:
        recorded.append((msg.msg_id, msg.dead, error))

    jobs = JobConsumer(q, {"github.": handler}, concurrency=1, max_deliver=2, on_dead=on_dead)
    dead = (await q.fetch(1, timeout=1.0))[0]
    await jobs.handle(dead)
    assert handled == []  # a dead letter is not run again
    assert recorded == [("a", True, "delivered 2 times without completing")]
    assert await q.fetch(1, timeout=0.1) == []  # acked
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
