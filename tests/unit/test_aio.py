"""app/aio.py: an event wait that never loses a cancellation (Python 3.11's wait_for does when
the event is set in the same loop iteration), and the loops built on it stop when cancelled."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from app.aio import wait_event
from app.worker.consumer import OutboxRelay
from tests.unit.test_outbox_relay import FakeLedger, FakeQueue


async def test_set_timeout_and_already_set() -> None:
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, ev.set)
    assert await wait_event(ev, 5) is True
    assert await wait_event(ev, 0) is True  # already set: no wait at all


@pytest.mark.parametrize("yield_first", [False, True])
async def test_a_cancel_in_the_same_step_as_the_event_is_never_lost(yield_first: bool) -> None:
    ev = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            await wait_event(ev, 10)
            ev.clear()
            rounds += 1

    for _ in range(20):
        task = asyncio.create_task(loop())
        await asyncio.sleep(0)
        ev.set()
        if yield_first:
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        assert done == {task} and task.cancelled()


async def test_the_relay_stops_when_cancelled_right_after_a_kick() -> None:
    """What hung a test's teardown: the relay kicked in the iteration it was cancelled in."""
    for delay in (0.0, 0.001):
        ledger, queue = FakeLedger(), FakeQueue()
        relay = OutboxRelay(ledger, queue, poll_interval=60.0)  # type: ignore[arg-type]
        task = asyncio.create_task(relay.run())
        for _ in range(50):
            await asyncio.sleep(0)
        relay.kick()
        if delay:
            await asyncio.sleep(delay)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        assert done == {task}
        with contextlib.suppress(asyncio.CancelledError):
            await task
