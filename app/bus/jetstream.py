"""NATS JetStream behind the ``Queue`` port (selected by ``NATS_URL``).

Topology, created (or brought up to date) by every process at connect, so the order in which
``spell serve`` and ``spell worker`` processes start does not matter:

* ``SPELL_RUNS`` — subjects ``run.>`` (``run.<bundle sha256>``): run requests. Work-queue
  retention (a message is deleted once acked) and a duplicate window: the outbox relay publishes
  with ``Nats-Msg-Id`` = cast id, so a row published twice (a crash between publish and
  mark-sent, or two relays racing) is stored once.
* ``SPELL_JOBS`` — subjects ``webhook.>``, ``github.>``, ``billing.>``: background jobs, the same
  way.
* ``SPELL_DEAD`` — the server's ``MAX_DELIVERIES`` advisories of both consumers, kept (limits
  retention, ``max_age``): the stored dead-letter record. The original message stays in its
  work-queue stream until a consumer has handled the dead letter; it is deleted then.

One durable pull consumer per work stream (``runs`` / ``jobs``) with explicit acks,
``ack_wait`` and ``max_deliver``, shared by every process: on a work-queue stream more clients on
one durable split the messages between them. A dead letter is handed out by ``fetch`` like any
message, with ``dead = True`` and the original subject, payload and headers, so the consumer that
owns the subject can end what the message was for (a cast fails, a job is recorded dead); its
``ack`` deletes the original message and acks the advisory.

Cast event notifications: a process that writes a cast's events (a worker claiming, streaming
progress, finishing) publishes ``events.<cast id>`` on core NATS (not stored, no ack: a hint,
the database stays the truth), and every process subscribed wakes the SSE streams it serves for
that cast (:class:`SharedEventHub`). Without it a ``spell serve`` learns of a worker's progress
only from its once-a-second poll of the ledger.

With a namespace ``ns`` (``SPELL_NATS_NAMESPACE``) names become ``SPELL_NS_RUNS`` … and subjects
``ns.run.>`` …, so several platforms — or tests — can share one server without colliding.

Every ack, nak and in-progress is best effort: a failure (a reconnect in progress) is logged
and only means the message comes back once more, which the database's attempt guard makes
harmless. ``ack`` is ``ack_sync``: it returns once the server has the ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from app.services.events import EventHub
from app.services.ports import Message

log = logging.getLogger("spell.bus")

ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
RUN_SUBJECTS = ("run.>",)
JOB_SUBJECTS = ("webhook.>", "github.>", "billing.>")


class BusUnavailable(RuntimeError):
    """NATS could not be reached (or JetStream is not enabled there)."""


@dataclass(frozen=True)
class JetStreamConfig:
    url: str
    creds: Path | None = None
    namespace: str = ""
    #: covers relays racing on one outbox row and quick relay restarts; well inside a run
    #: lease, so a run requeued after its worker died (same msg id) is never dropped
    duplicate_window: float = 15.0
    runs_ack_wait: float = 30.0
    runs_max_deliver: int = 5
    jobs_ack_wait: float = 60.0
    jobs_max_deliver: int = 6
    dead_max_age: float = 30 * 24 * 3600.0
    connect_timeout: float = 5.0
    client_name: str = "spell"

    def stream(self, kind: str) -> str:
        ns = f"_{self.namespace.upper()}" if self.namespace else ""
        return f"SPELL{ns}_{kind.upper()}"

    @property
    def subject_prefix(self) -> str:
        return f"{self.namespace}." if self.namespace else ""


class ConnectionWatch:
    """Logs what happens to the NATS connection, once per outage rather than once per attempt.

    nats-py reports every failed reconnect attempt (two a second while the server is down)
    through ``error_cb``, by default as an ERROR with a traceback. An outage is not an error of
    this process: nothing is lost (casts wait in the outbox, unacked messages come back), so it
    is one WARNING when the connection drops, one when reconnecting keeps failing, and one INFO
    when it is back, with the time it was away.
    """

    #: after this many seconds of failed reconnects, say so again (at most this often)
    remind_every = 30.0

    def __init__(self, servers: str) -> None:
        self.servers = servers
        self.down_since: float | None = None
        self.last_report = 0.0
        self.outages = 0
        self.closing = False

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def on_disconnected(self) -> None:
        if self.closing:
            return
        if self.down_since is None:
            self.down_since = self.last_report = self._now()
            self.outages += 1
            log.warning(
                "lost the connection to NATS at %s; reconnecting (messages to publish wait in "
                "the outbox, unacknowledged ones are delivered again)",
                self.servers,
            )

    async def on_reconnected(self) -> None:
        away = self._now() - self.down_since if self.down_since is not None else 0.0
        self.down_since = None
        log.info("reconnected to NATS at %s after %.1f s", self.servers, away)

    async def on_error(self, e: Exception) -> None:
        if self.closing:
            return
        reason = f"{type(e).__name__}: {e}".strip()
        if self.down_since is None and isinstance(
            e, nats.errors.UnexpectedEOF | nats.errors.StaleConnectionError | OSError
        ):
            # the connection dropping: on_disconnected follows and says so
            log.info("NATS connection at %s dropped: %s", self.servers, reason)
            return
        if self.down_since is None:
            # not during an outage: a protocol error, a permission violation, a slow consumer
            log.warning("NATS connection error at %s: %s", self.servers, reason)
            return
        now = self._now()
        if now - self.last_report >= self.remind_every:
            self.last_report = now
            log.warning(
                "NATS at %s still unreachable after %.0f s: %s",
                self.servers,
                now - self.down_since,
                reason,
            )


class JetStreamBus:
    """One NATS connection and the streams; hands out the two queues (runs, jobs)."""

    def __init__(self, nc: NatsClient, js: JetStreamContext, config: JetStreamConfig) -> None:
        self.nc = nc
        self.js = js
        self.config = config
        p = config.subject_prefix
        self.runs = JetStreamQueue(
            self,
            stream=config.stream("runs"),
            durable="runs",
            subjects=[p + s for s in RUN_SUBJECTS],
            ack_wait=config.runs_ack_wait,
            max_deliver=config.runs_max_deliver,
            duplicate_window=config.duplicate_window,
        )
        self.jobs = JetStreamQueue(
            self,
            stream=config.stream("jobs"),
            durable="jobs",
            subjects=[p + s for s in JOB_SUBJECTS],
            ack_wait=config.jobs_ack_wait,
            max_deliver=config.jobs_max_deliver,
            duplicate_window=max(config.duplicate_window, 120.0),
        )
        self.dead_stream = config.stream("dead")
        self._events_sub: Any = None
        self._announcing: set[asyncio.Task[None]] = set()
        self.watch: ConnectionWatch | None = None

    @classmethod
    async def connect(cls, config: JetStreamConfig) -> JetStreamBus:
        servers = [s.strip() for s in config.url.split(",") if s.strip()]
        options: dict[str, Any] = {
            "servers": servers,
            "name": config.client_name,
            "connect_timeout": config.connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,  # a NATS restart must not end the process's work
            "reconnect_time_wait": 0.5,
            # No client-side buffering while reconnecting: a publish (or ack, or pull request)
            # either reaches the server or raises at once. The outbox is the buffer: a row stays
            # unsent until the server confirmed it, rather than sitting in this process's memory
            # (lost if the process dies) and going out behind the relay's back on reconnect.
            "pending_size": 0,
        }
        if config.creds is not None:
            options["user_credentials"] = str(config.creds)
        shown = ", ".join(servers)
        watch = ConnectionWatch(shown)
        options.update(
            error_cb=watch.on_error,
            disconnected_cb=watch.on_disconnected,
            reconnected_cb=watch.on_reconnected,
        )
        try:
            nc = await asyncio.wait_for(
                nats.connect(**options), timeout=config.connect_timeout * 2 + 1
            )
        except (TimeoutError, OSError, nats.errors.Error) as e:
            raise BusUnavailable(f"cannot reach NATS at {shown}: {type(e).__name__}: {e}") from e
        bus = cls(nc, nc.jetstream(), config)
        bus.watch = watch
        try:
            await bus.ensure_topology()
        except Exception as e:
            await nc.close()
            raise BusUnavailable(
                f"NATS at {shown} refused the JetStream set-up (is JetStream enabled, -js?): "
                f"{type(e).__name__}: {e}"
            ) from e
        log.info("connected to NATS JetStream at %s (streams %s)", shown, bus.stream_names)
        return bus

    @property
    def events_subject(self) -> str:
        return f"{self.config.subject_prefix}events"

    async def share_events(self, hub: SharedEventHub) -> None:
        """Wake ``hub``'s local listeners on every other process's ``events.<cast id>``."""

        async def on_event(msg: Msg) -> None:
            cast_id = msg.subject.rpartition(".")[2]
            if cast_id:
                hub.notify_local(cast_id)

        self._events_sub = await self.nc.subscribe(f"{self.events_subject}.*", cb=on_event)

    def announce(self, cast_id: str) -> None:
        """Tell the other processes that ``cast_id`` has new events (best effort, no wait)."""
        if not self.nc.is_connected or not cast_id or "." in cast_id:
            return  # while reconnecting the others fall back to polling the ledger
        task = asyncio.get_running_loop().create_task(
            self.nc.publish(f"{self.events_subject}.{cast_id}", b"")
        )
        self._announcing.add(task)
        task.add_done_callback(self._announced)

    def _announced(self, task: asyncio.Task[None]) -> None:
        self._announcing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("announcing cast events failed: %s", task.exception())

    @property
    def stream_names(self) -> list[str]:
        return [self.runs.stream, self.jobs.stream, self.dead_stream]

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def ensure_topology(self) -> None:
        for q in (self.runs, self.jobs):
            await self._ensure_stream(
                StreamConfig(
                    name=q.stream,
                    subjects=list(q.subjects),
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=StorageType.FILE,
                    duplicate_window=q.duplicate_window,
                )
            )
        await self._ensure_stream(
            StreamConfig(
                name=self.dead_stream,
                subjects=[q.advisory_subject for q in (self.runs, self.jobs)],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=self.config.dead_max_age,
            )
        )
        for q in (self.runs, self.jobs):
            await self._ensure_consumer(
                q.stream,
                ConsumerConfig(
                    durable_name=q.durable,
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=q.ack_wait,
                    max_deliver=q.max_deliver,
                ),
            )
            await self._ensure_consumer(
                self.dead_stream,
                ConsumerConfig(
                    durable_name=q.dead_durable,
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    filter_subject=q.advisory_subject,
                    ack_wait=60.0,
                ),
            )

    async def _ensure_stream(self, cfg: StreamConfig) -> None:
        try:
            await self.js.add_stream(cfg)
        except nats.js.errors.BadRequestError:
            # It exists with another configuration (e.g. a changed duplicate window).
            await self.js.update_stream(cfg)

    async def _ensure_consumer(self, stream: str, cfg: ConsumerConfig) -> None:
        try:
            await self.js.add_consumer(stream, cfg)
        except nats.js.errors.BadRequestError as e:
            # An existing durable with other settings (e.g. ack_wait changed): keep it working.
            log.warning("keeping the existing consumer %s on %s: %s", cfg.durable_name, stream, e)

    async def delete_topology(self) -> None:
        """Remove this namespace's streams (and with them their consumers). Tests and tools."""
        for name in self.stream_names:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_stream(name)

    async def close(self) -> None:
        for q in (self.runs, self.jobs):
            await q.close()
        if self._events_sub is not None:
            with contextlib.suppress(Exception):
                await self._events_sub.unsubscribe()
            self._events_sub = None
        if self.watch is not None:
            self.watch.closing = True  # nats-py reports its own close as a disconnection
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)  # acks and publishes still buffered go out
            await self.nc.close()


class SharedEventHub(EventHub):
    """The process's EventHub whose notifications also reach the other processes on the bus
    (``spell worker`` → the ``spell serve`` holding the caller's SSE stream)."""

    def __init__(self, bus: JetStreamBus) -> None:
        super().__init__()
        self.bus = bus

    def notify(self, cast_id: str) -> None:
        super().notify(cast_id)
        self.bus.announce(cast_id)

    def notify_local(self, cast_id: str) -> None:
        super().notify(cast_id)


class JetStreamMessage:
    """One delivery of a message from a durable pull consumer."""

    dead = False

    def __init__(self, queue: JetStreamQueue, msg: Msg) -> None:
        self._msg = msg
        self.subject = msg.subject.removeprefix(queue.bus.config.subject_prefix)
        raw = msg.headers or {}
        self.msg_id = raw.get("Nats-Msg-Id", "")
        self.headers: Mapping[str, str] = {
            k: v for k, v in raw.items() if not k.startswith("Nats-")
        }
        self.payload: dict[str, Any] = _decode(msg.data)
        self.num_delivered = int(msg.metadata.num_delivered)
        self.stream_seq = int(msg.metadata.sequence.stream)

    async def ack(self) -> None:
        """``ack_sync``: returns once the server has recorded the ack."""
        await _best_effort("ack", self.msg_id, self._msg.ack_sync())

    async def nak(self, delay: float | None = None) -> None:
        await _best_effort("nak", self.msg_id, self._msg.nak(delay=delay))

    async def in_progress(self) -> None:
        await _best_effort("in_progress", self.msg_id, self._msg.in_progress())


class DeadLetter:
    """A message whose deliveries reached ``max_deliver`` without an ack (from the advisory)."""

    dead = True

    def __init__(
        self,
        queue: JetStreamQueue,
        advisory: Msg,
        *,
        stream_seq: int,
        deliveries: int,
        subject: str,
        data: bytes | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        self._queue = queue
        self._advisory = advisory
        self.stream_seq = stream_seq
        self.subject = subject.removeprefix(queue.bus.config.subject_prefix)
        raw = dict(headers or {})
        self.msg_id = raw.get("Nats-Msg-Id", "")
        self.headers: Mapping[str, str] = {
            k: v for k, v in raw.items() if not k.startswith("Nats-")
        }
        self.payload: dict[str, Any] = _decode(data or b"")
        self.num_delivered = deliveries

    async def ack(self) -> None:
        """Handled: delete the original message, then ack the advisory (kept in the stream)."""
        try:
            await self._queue.bus.js.delete_msg(self._queue.stream, self.stream_seq)
        except nats.js.errors.NotFoundError:
            pass
        except Exception as e:
            log.warning("deleting dead message %s failed: %s: %s", self.msg_id, type(e).__name__, e)
            return  # the advisory comes back and the deletion is tried again
        await _best_effort("ack", self.msg_id, self._advisory.ack_sync())

    async def nak(self, delay: float | None = None) -> None:
        await _best_effort("nak", self.msg_id, self._advisory.nak(delay=delay))

    async def in_progress(self) -> None:
        await _best_effort("in_progress", self.msg_id, self._advisory.in_progress())


class JetStreamQueue:
    """The Queue port over one work-queue stream and its durable pull consumer."""

    def __init__(
        self,
        bus: JetStreamBus,
        *,
        stream: str,
        durable: str,
        subjects: list[str],
        ack_wait: float,
        max_deliver: int,
        duplicate_window: float,
    ) -> None:
        self.bus = bus
        self.stream = stream
        self.durable = durable
        self.dead_durable = f"{durable}_dead"
        self.subjects = subjects
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.duplicate_window = duplicate_window
        self.advisory_subject = f"{ADVISORY}.{stream}.{durable}"
        self.published = 0
        self.duplicates = 0
        self._sub: JetStreamContext.PullSubscription | None = None
        self._sub_lock = asyncio.Lock()
        #: one pull request in flight per process and consumer: concurrent fetches on one
        #: subscription would take each other's messages and timeouts
        self._fetch_lock = asyncio.Lock()
        self._dead: asyncio.Queue[DeadLetter] = asyncio.Queue(maxsize=1)
        self._pump: asyncio.Task[None] | None = None

    async def publish(
        self,
        subject: str,
        payload: dict[str, Any],
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        hdrs = dict(headers or {})
        hdrs["Nats-Msg-Id"] = msg_id
        try:
            ack = await self.bus.js.publish(
                self.bus.config.subject_prefix + subject,
                json.dumps(payload, separators=(",", ":")).encode(),
                headers=hdrs,
                stream=self.stream,
            )
        except (nats.errors.Error, TimeoutError, OSError) as e:
            # Not stored, or stored and its ack lost (the server went away in between): the
            # caller keeps the message and publishes it again; the same msg id makes a copy
            # that did get stored a duplicate inside the window, and the database's claim
            # step makes a later one harmless.
            state = "connected" if self.bus.connected else "disconnected"
            raise BusUnavailable(
                f"publishing {msg_id} to NATS failed ({state}): {type(e).__name__}: {e}"
            ) from e
        if ack.duplicate:
            self.duplicates += 1
        else:
            self.published += 1

    async def _subscription(self) -> JetStreamContext.PullSubscription:
        async with self._sub_lock:
            if self._sub is None:
                self._sub = await self.bus.js.pull_subscribe_bind(
                    durable=self.durable, stream=self.stream
                )
            if self._pump is None:
                self._pump = asyncio.create_task(self._pump_dead(), name=f"dead-{self.durable}")
            return self._sub

    async def fetch(self, batch: int, timeout: float) -> list[Message]:
        out: list[Message] = []
        while len(out) < batch and not self._dead.empty():
            out.append(self._dead.get_nowait())
        if out:
            return out
        if not self.bus.connected:
            # reconnecting (ConnectionWatch logged the outage once): nothing can come now
            await asyncio.sleep(timeout)
            return []
        sub = await self._subscription()
        async with self._fetch_lock:
            try:
                msgs = await sub.fetch(batch, timeout=timeout)
            except nats.errors.TimeoutError:
                return []
            except (nats.errors.Error, OSError) as e:
                raise BusUnavailable(
                    f"fetching from {self.stream} failed: {type(e).__name__}: {e}"
                ) from e
        return [JetStreamMessage(self, m) for m in msgs]

    async def _pump_dead(self) -> None:
        """Pull this consumer's MAX_DELIVERIES advisories and queue them as dead letters."""
        sub: JetStreamContext.PullSubscription | None = None
        while True:
            try:
                if not self.bus.connected:  # reconnecting: the outage is logged once elsewhere
                    await asyncio.sleep(1.0)
                    continue
                if sub is None:
                    sub = await self.bus.js.pull_subscribe_bind(
                        durable=self.dead_durable, stream=self.bus.dead_stream
                    )
                try:
                    msgs = await sub.fetch(1, timeout=2.0)
                except nats.errors.TimeoutError:
                    continue
                for m in msgs:
                    dead = await self._dead_letter(m)
                    if dead is None:
                        await _best_effort("ack", "advisory", m.ack_sync())
                    else:
                        await self._dead.put(dead)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("reading dead letters of %s failed: %s: %s", self.stream, type(e), e)
                await asyncio.sleep(1.0)

    async def _dead_letter(self, advisory: Msg) -> DeadLetter | None:
        info = _decode(advisory.data)
        seq = int(info.get("stream_seq") or 0)
        if seq <= 0:
            log.error("malformed MAX_DELIVERIES advisory on %s: %r", self.stream, info)
            return None
        try:
            raw = await self.bus.js.get_msg(self.stream, seq)
        except nats.js.errors.NotFoundError:
            return None  # acked after all (a slow worker), or already handled
        log.error(
            "message %d of %s was delivered %s times without an ack: dead-lettered",
            seq,
            self.stream,
            info.get("deliveries"),
        )
        return DeadLetter(
            self,
            advisory,
            stream_seq=seq,
            deliveries=int(info.get("deliveries") or self.max_deliver),
            subject=str(raw.subject or ""),
            data=raw.data,
            headers=raw.headers,
        )

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
            self._pump = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


def _decode(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data) if data else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def _best_effort(what: str, msg_id: str, op: Any) -> None:
    try:
        await op
    except asyncio.CancelledError:
        raise
    except nats.errors.MsgAlreadyAckdError:
        pass
    except Exception as e:
        log.warning(
            "%s of message %s failed (it may be delivered again): %s: %s",
            what,
            msg_id,
            type(e).__name__,
            e,
        )
