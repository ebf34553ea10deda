"""Small asyncio helpers the standard library gets subtly wrong on Python 3.11."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set (True) or ``timeout`` seconds pass (False).

    Not ``asyncio.wait_for(event.wait(), timeout)``: on Python 3.11 that *swallows* a
    cancellation that arrives in the same loop iteration as the event (it returns the inner
    result instead of raising; CPython bpo-42130, gone in 3.12), so a ``while True`` loop
    around it — a relay or drainer waiting for its next kick — can outlive ``task.cancel()``
    for ever, and whoever awaits the task at shutdown hangs. ``asyncio.timeout`` awaits in the
    same task and cannot lose the cancellation."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
