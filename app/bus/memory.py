"""An in-process queue with JetStream's semantics: at-least-once, explicit ack, dedupe by msg id.

* ``publish`` drops a message whose ``msg_id`` was seen inside the duplicate window;
* a fetched message must be acked; if it is not acked (or ``in_progress``-extended) within
  ``ack_wait`` it is delivered again, with ``num_delivered`` + 1;
* after ``max_deliver`` deliveries (when it would be delivered again: ``ack_wait`` ran out or it
  was nak'ed) it is recorded in ``dead_letters`` and handed out once more as a dead letter
  (``dead = True``, ``num_delivered`` = ``max_deliver``), as the JetStream adapter hands out a
  ``MAX_DELIVERIES`` advisory: whoever owns the subject ends what it was for, then acks it (a
  dead letter that is nak'ed or not acked in time comes back, still dead).

It only lives as long as the process: the ledger's outbox is what makes a restart lose nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.services.ports import Message


@dataclass
class _Entry:
    subject: str
    msg_id: str
    payload: dict[str, Any]
    headers: dict[str, str]
    num_delivered: int = 0
    acked: bool = False
    token: int = 0
    dead: bool = False


@dataclass
class MemoryMessage:
    _queue: MemoryQueue
    _entry: _Entry
    _token: int
    subject: str = field(init=False)
    msg_id: str = field(init=False)
    payload: dict[str, Any] = field(init=False)
    headers: Mapping[str, str] = field(init=False)
    num_delivered: int = field(init=False)
    dead: bool = field(init=False)

    def __post_init__(self) -> None:
        self.subject = self._entry.subject
        self.msg_id = self._entry.msg_id
        self.payload = self._entry.payload
        self.headers = self._entry.headers
        self.num_delivered = self._entry.num_delivered
        self.dead = self._entry.dead

    async def ack(self) -> None:
        self._queue._ack(self._entry, self._token)

    async def nak(self, delay: float | None = None) -> None:
        self._queue._redeliver_after(self._entry, self._token, delay or 0.0)

    async def in_progress(self) -> None:
        self._queue._redeliver_after(self._entry, self._token, self._queue.ack_wait)


class MemoryQueue:
    def __init__(
        self,
        *,
        ack_wait: float = 30.0,
        max_deliver: int = 5,
        duplicate_window: float = 120.0,
    ) -> None:
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.duplicate_window = duplicate_window
        self._ready: deque[_Entry] = deque()
        #: fetchers waiting for a message (plain futures: cancelling one is instant and can
        #: never wedge, unlike a Condition that must re-acquire its lock while cancelled)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.dead_letters: list[dict[str, Any]] = []
        self.published = 0
        self.duplicates = 0
        self._closed = False

    async def publish(
        self,
        subject: str,
        payload: dict[str, Any],
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        now = time.monotonic()
        while self._seen and next(iter(self._seen.values())) < now - self.duplicate_window:
            self._seen.popitem(last=False)
        if msg_id in self._seen:
            self.duplicates += 1
            return
        self._seen[msg_id] = now
        self.published += 1
        await self._push(_Entry(subject, msg_id, dict(payload), dict(headers or {})))

    async def _push(self, entry: _Entry) -> None:
        self._ready.append(entry)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def fetch(self, batch: int, timeout: float) -> list[Message]:
        out: list[Message] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._ready:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return out
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                return out
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: the wake-up goes to another
                raise
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        while self._ready and len(out) < batch:
            entry = self._ready.popleft()
            if entry.acked:
                continue
            if not entry.dead:  # a dead letter keeps the count that ran out
                entry.num_delivered += 1
            entry.token += 1
            out.append(MemoryMessage(self, entry, entry.token))
            self._arm(entry, self.ack_wait)
        if self._ready:  # more left: pass the baton to the next fetcher
            self._wake_one()
        return out

    def _arm(self, entry: _Entry, delay: float) -> None:
        old = self._timers.pop(id(entry), None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        token = entry.token
        self._timers[id(entry)] = loop.call_later(
            delay, lambda: self._spawn(self._expire(entry, token))
        )

    async def _expire(self, entry: _Entry, token: int) -> None:
        self._timers.pop(id(entry), None)
        if entry.acked or entry.token != token or self._closed:
            return
        await self._again(entry)

    async def _again(self, entry: _Entry) -> None:
        """Queue ``entry`` for another delivery: a dead letter once its deliveries ran out."""
        if not entry.dead and entry.num_delivered >= self.max_deliver:
            entry.dead = True
            self.dead_letters.append(
                {"subject": entry.subject, "msg_id": entry.msg_id, "payload": entry.payload}
            )
        await self._push(entry)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ack(self, entry: _Entry, token: int) -> None:
        if entry.token != token or entry.acked:
            return  # a stale delivery: the message went to somebody else
        entry.acked = True
        timer = self._timers.pop(id(entry), None)
        if timer is not None:
            timer.cancel()

    def _redeliver_after(self, entry: _Entry, token: int, delay: float) -> None:
        if entry.token != token or entry.acked:
            return
        if delay <= 0:
            entry.token += 1  # invalidate this delivery
            timer = self._timers.pop(id(entry), None)
            if timer is not None:
                timer.cancel()
            self._spawn(self._again(entry))
        else:
            self._arm(entry, delay)

    def pending(self) -> int:
        return len(self._ready)

    async def close(self) -> None:
        self._closed = True
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
