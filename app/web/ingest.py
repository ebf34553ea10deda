"""The GitHub webhook ingest front: a dedicated, minimal HTTP/1.1 server for one endpoint.

``POST /webhooks/github`` with the same contract as the API's aiohttp route
(``app/web/routes.py``): HMAC-SHA256 over the raw body, constant time, *before* anything is
parsed (401 on a bad or missing signature); 413 over ``SPELL_MAX_WEBHOOK_BYTES``; ``ping``
answered; the raw delivery stored durably, deduped by ``X-GitHub-Delivery``, then 202
``{"delivery_id", "duplicate": false}`` (a repeat: 200 ``{"duplicate": true}``); no JSON parsing
and no GitHub call on the request path. Errors use the SPEC error shape.

Why a second server: per delivery, aiohttp's request machinery and the API's middlewares cost
several times the HMAC itself (bench/README.md §5). Here the request is parsed by llhttp (PyPI
``httptools``, what uvicorn uses) straight from ``asyncio.Protocol`` callbacks — no task, no
stream reader, no request object — and storage is batched: the deliveries verified while a
batch is being committed wait for the next one, and each batch is ONE transaction of two
multi-row statements (``hot.accept_deliveries``: ``INSERT … ON CONFLICT (delivery_id) DO NOTHING
RETURNING`` + the outbox rows), each body packed on the loop right after its signature checked
(``Inbox.pack``: lz4 on SQLite, app/store/bodies.py). Every delivery is answered only after its
batch committed (durable before 202). The rows are exactly those ``Inbox.accept`` writes, so
the job handlers process them unchanged. On SQLite the batch is one program on the ledger's
group-committing writer thread; on PostgreSQL one transaction from the hot pool.

HTTP/1.1 behaviour: keep-alive and pipelining (answers in request order per connection, reading
paused while too many are outstanding); ``Content-Length`` required (411 otherwise, e.g.
chunked); limits on the request line, the headers' count and size (431) and the body (413,
checked on ``Content-Length`` before any byte of the body is read, then the connection is
closed); other paths 404, other methods 405; idle keep-alive connections and requests that
take too long to arrive are closed by a sweeper. It is served on its own port
(``SPELL_WEBHOOK_PORT`` / ``spell serve --webhook-port``) in the same process and event loop
as the API, sharing its ledger, outbox relay and worker. Its counters are exported on the API's
``/metrics`` (``webhook_front_deliveries_total{result}``, ``webhook_front_batches_total``,
``webhook_front_batch_size``; app/observability/metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Final

import httptools
from aiohttp import web

from app.aio import wait_event
from app.config import Settings
from app.errors import AppError
from app.github.webhooks import SIGNATURE_HEADER, check_delivery
from app.observability.metrics import Metrics
from app.store.inbox import Inbox, Packed

log = logging.getLogger("spell.webhook_front")

PATH: Final = b"/webhooks/github"
SOURCE: Final = "github"

#: the headers the front keeps (lower-case bytes → the name DeliveryHeaders reads)
_WANTED: Final = {
    n.encode(): n
    for n in (
        "x-github-event",
        "x-github-delivery",
        SIGNATURE_HEADER.lower(),
        "x-github-hook-id",
        "x-github-hook-installation-target-id",
        "x-github-hook-installation-target-type",
        "content-length",
        "transfer-encoding",
        "expect",
    )
}

_REASONS: Final = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class FrontLimits:
    max_body: int = 25 * 1024 * 1024
    #: request line target (path + query), bytes
    max_url: int = 8190
    #: headers: count, and bytes of all names and values together
    max_headers: int = 100
    max_header_bytes: int = 64 * 1024
    #: requests read on one connection but not answered yet (pipelining) before reading pauses
    max_pending: int = 32
    #: deliveries (and body bytes) per storage batch; a batch in flight at a time per backend
    max_batch: int = 256
    max_batch_bytes: int = 16 * 1024 * 1024
    max_inflight: int = 1
    #: under load (the last batch held at least ``linger_min_batch``), wait this many seconds
    #: before committing the next batch, so that more deliveries share its transaction (a
    #: 14 KiB delivery costs ~0.17 ms of CPU to store alone, ~0.06 ms in a batch of 32)
    linger: float = 0.0005
    linger_min_batch: int = 4
    #: at a trickle (no batch stored for this many seconds, and this one smaller than
    #: ``linger_min_batch``), store on the event loop's thread
    #: when SQLite's writer is idle: no thread hand-off (~0.07 ms of CPU each way here). Under
    #: load batches go to the writer thread, which commits while the loop reads the next ones.
    #: ``None``: always through the writer thread.
    in_place_gap: float | None = 0.002
    #: an idle keep-alive connection is closed after this many seconds
    keepalive_timeout: float = 75.0
    #: a request whose head and body have not arrived within this many seconds: 408, closed
    request_timeout: float = 60.0


class _Abort(Exception):
    """Raised inside a parser callback: answer ``response`` and close the connection."""

    def __init__(self, response: bytes) -> None:
        super().__init__("abort")
        self.response = response


# ---------------------------------------------------------------------------- responses

_date_cache: list[Any] = [0, b""]


def _http_date() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode()
    return _date_cache[1]  # type: ignore[no-any-return]


def render(
    status: int,
    body: bytes,
    *,
    close: bool = False,
    keep_alive_header: bool = False,
    head: bool = False,
    extra: bytes = b"",
) -> bytes:
    """A complete HTTP/1.1 response with a JSON body (``head``: the headers only)."""
    conn = b"Connection: close\r\n" if close else b""
    if keep_alive_header and not close:
        conn = b"Connection: keep-alive\r\n"
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "Error").encode()),
            b"Content-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
            b"Date: ",
            _http_date(),
            b"\r\n",
            conn,
            extra,
            b"\r\n",
            b"" if head else body,
        )
    )


def error_body(code: str, message: str, *, status: int | None = None) -> tuple[int, bytes]:
    err = AppError(code, message, status=status)
    return err.status, json.dumps(err.to_body()).encode()


def _error(code: str, message: str, *, status: int | None = None, close: bool = True) -> bytes:
    st, body = error_body(code, message, status=status)
    return render(st, body, close=close)


# ---------------------------------------------------------------------------- one request


class _Req:
    """One request of a connection, in order; ``data`` is its answer once known."""

    __slots__ = ("close", "conn", "data", "head", "ka_header")

    def __init__(self, conn: _Conn, close: bool, ka_header: bool, head: bool) -> None:
        self.conn = conn
        self.close = close
        self.ka_header = ka_header
        self.head = head
        self.data: bytes | None = None


# ---------------------------------------------------------------------------- connection


class _Conn(asyncio.Protocol):
    """One client connection: llhttp callbacks → a request → the front."""

    def __init__(self, front: IngestFront) -> None:
        self.front = front
        self.limits = front.limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.out: deque[_Req] = deque()
        self.dead = False  # no more requests are read (an abort, or the peer is gone)
        self.paused = False
        self.last_active = 0.0
        # the request being read
        self.in_request = False
        self.msg_no = 0
        self.started = 0.0
        self.head_seen = 0
        self.in_body = False
        self.url = b""
        self.headers: dict[str, str] = {}
        self.headers_left = 0
        self.header_bytes_left = 0
        self.body: list[bytes] = []
        self.reject: tuple[int, bytes, bytes] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.last_active = time.monotonic()
        self.front.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        self.transport = None
        self.front.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return
        self.last_active = time.monotonic()
        msg = self.msg_no
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            ctx = e.__context__
            if isinstance(ctx, _Abort):
                self._abort(ctx.response)
            else:  # a bug of ours: never a stack trace to the client
                log.error("webhook front: request handling failed", exc_info=ctx or e)
                self._abort(_error("INTERNAL", "internal error"))
            return
        except httptools.HttpParserUpgrade:
            self._abort(
                _error("VALIDATION_ERROR", "protocol upgrades are not supported", status=400)
            )
            return
        except httptools.HttpParserError:
            self._abort(_error("VALIDATION_ERROR", "malformed HTTP request", status=400))
            return
        if self.in_request and not self.in_body and msg == self.msg_no:
            # all of ``data`` belonged to the head of a request begun in an earlier call (llhttp
            # buffers a header line until it ends: bound it here, not only in on_header)
            self.head_seen += len(data)
            if self.head_seen > self.limits.max_url + self.limits.max_header_bytes + 4096:
                self._abort(_error("VALIDATION_ERROR", "request headers too large", status=431))

    def eof_received(self) -> bool | None:
        # the client is done sending: answer what was read, then close
        self.dead = True
        if not self.out and self.transport is not None:
            self.transport.close()
        return True

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        self.in_request = True
        self.msg_no += 1
        self.started = time.monotonic()
        self.head_seen = 0
        self.in_body = False
        self.url = b""
        self.headers = {}
        self.headers_left = self.limits.max_headers
        self.header_bytes_left = self.limits.max_header_bytes
        self.body = []
        self.reject = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_url:
            raise _Abort(_error("VALIDATION_ERROR", "request target too long", status=431))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers_left -= 1
        self.header_bytes_left -= len(name) + len(value)
        if self.headers_left < 0 or self.header_bytes_left < 0:
            raise _Abort(_error("VALIDATION_ERROR", "request headers too large", status=431))
        key = _WANTED.get(name.lower())
        if key is not None and key not in self.headers:  # the first one counts, as in aiohttp
            self.headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.in_body = True
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if path != PATH:
            st, body = error_body("NOT_FOUND", "not found; this port serves POST /webhooks/github")
            self.reject = (st, body, b"")
        elif method != b"POST":
            st, body = error_body(
                "METHOD_NOT_ALLOWED", "only POST is allowed on /webhooks/github", status=405
            )
            self.reject = (st, body, b"Allow: POST\r\n")
        if "transfer-encoding" not in self.headers and "content-length" in self.headers:
            length = self.headers["content-length"]
            # llhttp refuses these already; belt and braces
            if not (length.isascii() and length.isdigit()):
                raise _Abort(_error("VALIDATION_ERROR", "malformed Content-Length", status=400))
            if self.reject is None and int(length) > self.limits.max_body:
                self.front.count_rejected()
                raise _Abort(
                    _error(
                        "PAYLOAD_TOO_LARGE",
                        f"the delivery is larger than {self.limits.max_body} bytes",
                    )
                )
        elif method == b"POST" and self.reject is None:
            # chunked or no length: GitHub always sends Content-Length
            self.front.count_rejected()
            raise _Abort(
                _error("VALIDATION_ERROR", "a Content-Length header is required", status=411)
            )
        if (
            self.reject is None
            and self.headers.get("expect", "").lower() == "100-continue"
            and not self.out
            and self.transport is not None
        ):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk: bytes) -> None:
        if self.reject is None:
            self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.in_request = False
        parser = self.parser
        keep = parser.should_keep_alive()
        method = parser.get_method()
        req = _Req(
            self,
            close=not keep,
            ka_header=keep and parser.get_http_version() == "1.0",
            head=method == b"HEAD",
        )
        self.out.append(req)
        if self.reject is not None:
            st, body, extra = self.reject
            self.answer(req, st, body, extra)
        else:
            body_parts = self.body
            raw = body_parts[0] if len(body_parts) == 1 else b"".join(body_parts)
            self.body = []
            self.front.handle(req, self.headers, raw)
        if not keep:
            self.dead = True  # nothing after this request is read
        if len(self.out) >= self.limits.max_pending and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    # -- answers, in request order

    def answer(self, req: _Req, status: int, body: bytes, extra: bytes = b"") -> None:
        req.data = render(
            status,
            body,
            close=req.close,
            keep_alive_header=req.ka_header,
            head=req.head,
            extra=extra,
        )
        self.flush()

    def flush(self) -> None:
        out = self.out
        if not out or out[0].data is None:
            return
        chunks: list[bytes] = []
        close = False
        while out and out[0].data is not None:
            req = out.popleft()
            chunks.append(req.data)  # type: ignore[arg-type]
            if req.close:
                close = True
                out.clear()
                break
        transport = self.transport
        if transport is None:
            return
        transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        self.last_active = time.monotonic()
        if close or (self.dead and not out):
            transport.close()
        elif self.paused and len(out) < self.limits.max_pending // 2:
            self.paused = False
            transport.resume_reading()

    def _abort(self, response: bytes) -> None:
        """Answer ``response`` after the requests before it, read nothing more, close."""
        self.dead = True
        self.in_request = False
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.pause_reading()
        req = _Req(self, close=True, ka_header=False, head=False)
        req.data = response
        self.out.append(req)
        self.flush()

    def expire(self, now: float) -> None:
        """Called by the sweeper: close what has been idle or slow for too long."""
        if self.transport is None:
            return
        if self.in_request and now - self.started > self.limits.request_timeout:
            self._abort(_error("VALIDATION_ERROR", "the request took too long", status=408))
        elif (
            not self.in_request
            and not self.out
            and now - self.last_active > (self.limits.keepalive_timeout)
        ):
            self.transport.close()

    def shut(self) -> None:
        """Server shutdown: close now if nothing is owed, else after the last answer."""
        self.dead = True
        if self.transport is not None and not self.out:
            self.transport.close()


# ---------------------------------------------------------------------------- the front


class _Item:
    __slots__ = ("body", "delivery_id", "encoding", "event", "req")

    def __init__(
        self, req: _Req, delivery_id: str, event: str, body: bytes, encoding: str | None
    ) -> None:
        self.req = req
        self.delivery_id = delivery_id
        self.event = event
        #: as stored (app/store/bodies.py): packed once, here, whichever path stores it
        self.body = body
        self.encoding = encoding


class IngestFront:
    """The server: verification on the loop, storage in batches, answers after commit."""

    def __init__(
        self,
        *,
        inbox: Inbox | None,
        secrets: list[str],
        limits: FrontLimits,
        on_fresh: Callable[[], None] = lambda: None,
        unavailable: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.inbox = inbox
        self.secrets = [s.encode() for s in secrets]
        self.limits = limits
        self.on_fresh = on_fresh
        #: why deliveries cannot be taken (GitHub App not configured), answered 503
        if unavailable is None and (inbox is None or not secrets):
            unavailable = "the GitHub App is not configured"
        self.unavailable = unavailable
        self.conns: set[_Conn] = set()
        self.stats = {
            "accepted": 0,
            "duplicates": 0,
            "rejected": 0,
            "batches": 0,
            #: batches stored on the loop's thread (``in_place_gap``)
            "in_place": 0,
            "store_errors": 0,
        }
        #: the Prometheus series (``/metrics`` on the API port); a private set when none is given
        m = metrics if metrics is not None else Metrics()
        results = m.webhook_front_deliveries
        self._m_accepted = results.labels(result="accepted")
        self._m_duplicate = results.labels(result="duplicate")
        self._m_rejected = results.labels(result="rejected")
        self._m_error = results.labels(result="error")
        self._m_batches = m.webhook_front_batches
        self._m_batch_size = m.webhook_front_batch_size
        self._queue: list[_Item] = []
        self._inflight = 0
        self._scheduled = False
        self._last_batch = 0
        self._last_flush = 0.0
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), host, port, reuse_address=True, backlog=1024
        )
        self._sweeper = asyncio.create_task(self._sweep(), name="webhook-front-sweeper")

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop accepting; let the batches in flight commit and be answered; close."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for conn in list(self.conns):
            conn.shut()
        await wait_event(self._idle, timeout)
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        st = self.stats
        log.info(
            "webhook front stopped: accepted=%d duplicates=%d rejected=%d batches=%d "
            "store_errors=%d",
            st["accepted"],
            st["duplicates"],
            st["rejected"],
            st["batches"],
            st["store_errors"],
        )

    async def _sweep(self) -> None:
        every = max(0.05, min(self.limits.keepalive_timeout, self.limits.request_timeout) / 4)
        every = min(every, 5.0)
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for conn in list(self.conns):
                conn.expire(now)

    # -- one verified request

    def count_rejected(self) -> None:
        """A delivery refused before storage (401, 411, 413, 422, 503 unconfigured)."""
        self.stats["rejected"] += 1
        self._m_rejected.inc()

    def handle(self, req: _Req, headers: dict[str, str], body: bytes) -> None:
        conn = req.conn
        if self.unavailable is not None:
            self.count_rejected()
            st, b = error_body(
                "UNAVAILABLE",
                f"{self.unavailable} (GITHUB_APP_ID, GITHUB_APP_PRIVATE_KEY[_PATH], "
                "GITHUB_WEBHOOK_SECRET); run `spell app create`",
            )
            conn.answer(req, st, b)
            return
        try:
            hdr = check_delivery(
                body,
                signature=headers.get("x-hub-signature-256"),
                headers=headers,
                secret=self.secrets,
            )
        except AppError as e:
            self.count_rejected()
            conn.answer(req, e.status, json.dumps(e.to_body()).encode())
            return
        if hdr.event == "ping":
            conn.answer(req, 200, b'{"ok": true, "pong": "%s"}' % hdr.delivery_id.encode())
            return
        assert self.inbox is not None  # else ``unavailable`` answered above
        stored, encoding = self.inbox.pack(body)
        self._queue.append(_Item(req, hdr.delivery_id, hdr.event, stored, encoding))
        self._idle.clear()
        if not self._scheduled and self._inflight < self.limits.max_inflight:
            self._schedule()

    def _schedule(self) -> None:
        """Commit soon: everything read in this loop iteration joins the batch; under load,
        also what arrives within ``linger``."""
        self._scheduled = True
        loop = asyncio.get_running_loop()
        limits = self.limits
        if limits.linger > 0 and self._last_batch >= limits.linger_min_batch:
            loop.call_later(limits.linger, self._flush)
        else:
            loop.call_soon(self._flush)

    # -- batches

    def _flush(self) -> None:
        self._scheduled = False
        limits = self.limits
        while self._queue and self._inflight < limits.max_inflight:
            queue = self._queue
            n, size = 0, 0
            while n < len(queue) and n < limits.max_batch:
                size += len(queue[n].body)
                n += 1
                if size >= limits.max_batch_bytes:
                    break
            batch, self._queue = queue[:n], queue[n:]
            self._last_batch = n
            now = time.monotonic()
            quiet = (
                limits.in_place_gap is not None
                and n < limits.linger_min_batch
                and now - self._last_flush >= limits.in_place_gap
            )
            self._last_flush = now
            if quiet and self._store_now(batch):
                continue
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._commit(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not self._queue and self._inflight == 0:
            self._idle.set()

    @staticmethod
    def _unique(batch: list[_Item]) -> dict[str, _Item]:
        unique: dict[str, _Item] = {}
        for item in batch:
            unique.setdefault(item.delivery_id, item)
        return unique

    @staticmethod
    def _rows(unique: dict[str, _Item]) -> list[Packed]:
        return [(i.delivery_id, i.event, i.body, i.encoding) for i in unique.values()]

    def _store_now(self, batch: list[_Item]) -> bool:
        """Store the batch on this thread if the SQLite writer is idle (a few tens of
        microseconds; no thread hand-off, no task): True when it was stored (or failed) and
        answered; False to commit it through the runner instead."""
        assert self.inbox is not None
        unique = self._unique(batch)
        try:
            fresh = self.inbox.try_store_many_now(SOURCE, self._rows(unique))
        except Exception:
            self._store_failed(batch)
            return True
        if fresh is None:
            return False
        self.stats["in_place"] += 1
        self._stored(batch, unique, fresh)
        return True

    async def _commit(self, batch: list[_Item]) -> None:
        assert self.inbox is not None
        unique = self._unique(batch)
        try:
            fresh = await self.inbox.store_many(SOURCE, self._rows(unique))
        except Exception:
            self._store_failed(batch)
        else:
            self._stored(batch, unique, fresh)
        finally:
            self._inflight -= 1
            if self._queue:
                if not self._scheduled:
                    self._schedule()
            elif self._inflight == 0:
                self._idle.set()

    def _store_failed(self, batch: list[_Item]) -> None:
        self.stats["store_errors"] += 1
        self._m_error.inc(len(batch))
        log.exception("webhook front: a batch of %d deliveries was not stored", len(batch))
        st, b = error_body(
            "UNAVAILABLE",
            "the delivery could not be stored; it was not accepted (redeliver it)",
        )
        for item in batch:
            item.req.conn.answer(item.req, st, b)

    def _stored(self, batch: list[_Item], unique: dict[str, _Item], fresh: set[str]) -> None:
        self.stats["batches"] += 1
        n_fresh = 0
        for item in batch:
            did = item.delivery_id.encode()
            if unique.get(item.delivery_id) is item and item.delivery_id in fresh:
                n_fresh += 1
                item.req.conn.answer(
                    item.req, 202, b'{"delivery_id": "%s", "duplicate": false}' % did
                )
            else:
                item.req.conn.answer(
                    item.req, 200, b'{"delivery_id": "%s", "duplicate": true}' % did
                )
        self.stats["accepted"] += n_fresh
        self.stats["duplicates"] += len(batch) - n_fresh
        self._m_batches.inc()
        self._m_batch_size.observe(len(batch))
        if n_fresh:
            self._m_accepted.inc(n_fresh)
            self.on_fresh()
        if n_fresh < len(batch):
            self._m_duplicate.inc(len(batch) - n_fresh)


#: the running front of an app, when ``SPELL_WEBHOOK_PORT`` is set
FRONT = web.AppKey("webhook_front", IngestFront)


async def start_front(
    settings: Settings,
    inbox: Inbox,
    *,
    on_fresh: Callable[[], None],
    github_ready: bool,
    metrics: Metrics | None = None,
) -> IngestFront:
    """Start the front on ``SPELL_WEBHOOK_HOST``:``SPELL_WEBHOOK_PORT`` (``spell serve`` does it
    when the port is set). Without the GitHub App configured it answers 503, like the route.
    ``metrics``: the app's (its ``/metrics`` exports the front's ``webhook_front_*`` series)."""
    from app.store.fastsql import PgRunner

    pg = isinstance(inbox.ledger.fast, PgRunner)
    limits = FrontLimits(
        max_body=settings.max_webhook_bytes,
        # PostgreSQL commits batches on several pooled connections; SQLite has one writer
        max_inflight=max(1, min(2, settings.db_hot_pool)) if pg else 1,
    )
    front = IngestFront(
        inbox=inbox,
        secrets=settings.webhook_secrets() if github_ready else [],
        limits=limits,
        on_fresh=on_fresh,
        metrics=metrics,
    )
    host = settings.webhook_host or "127.0.0.1"
    assert settings.webhook_port is not None
    try:
        await front.start(host, settings.webhook_port)
    except OSError as e:
        raise AppError(
            "UNAVAILABLE",
            f"the webhook front cannot listen on {host}:{settings.webhook_port}: {e.strerror or e}",
        ) from None
    log.info("webhook ingest front listening on %s:%d%s", host, front.port, PATH.decode())
    return front


__all__ = ["FRONT", "PATH", "FrontLimits", "IngestFront", "error_body", "render", "start_front"]
