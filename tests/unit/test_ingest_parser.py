"""The webhook ingest front's HTTP handling, fed bytes directly (no sockets, no database).

A fake transport records what the front writes; a fake inbox records what it would store. The
end-to-end behaviour over real sockets and databases is in tests/e2e/test_webhook_ingest_front.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
import pytest

from app.github.webhooks import sign
from app.observability.metrics import Metrics
from app.store.bodies import LZ4, pack, unpack
from app.store.inbox import Packed
from app.web.ingest import FrontLimits, IngestFront, _Conn

SECRET = "unit-secret"
BODY = b'{"action":"created","comment":{"body":"/cast x"}}'


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.paused = False
        self.pauses = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


class FakeInbox:
    """Inbox.store_many / try_store_many_now; keeps each body unpacked (app/store/bodies.py),
    so a test sees the bytes the front received."""

    def __init__(self) -> None:
        self.stored: dict[str, tuple[str, bytes]] = {}
        self.encodings: dict[str, str | None] = {}
        self.batches: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.fail = False
        #: answer try_store_many_now (SQLite's idle writer) instead of deferring to store_many
        self.in_place = False
        self.in_place_batches: list[list[str]] = []

    def pack(self, body: bytes) -> tuple[bytes, str | None]:
        return pack(body)  # as the SQLite ledger's Inbox does

    def try_store_many_now(self, source: str, deliveries: list[Packed]) -> set[str] | None:
        if not self.in_place:
            return None
        self.in_place_batches.append([d for d, _e, _b, _c in deliveries])
        return self._store(deliveries)

    async def store_many(self, source: str, deliveries: list[Packed]) -> set[str]:
        assert source == "github"
        ids = [d for d, _e, _b, _c in deliveries]
        assert len(ids) == len(set(ids)), "a batch must hold distinct ids"
        self.batches.append(ids)
        if self.gate is not None:
            await self.gate.wait()
        return self._store(deliveries)

    def _store(self, deliveries: list[Packed]) -> set[str]:
        if self.fail:
            raise RuntimeError("disk full")
        fresh = set()
        for d, e, b, c in deliveries:
            if d not in self.stored:
                self.stored[d] = (e, unpack(b, c))
                self.encodings[d] = c
                fresh.add(d)
        return fresh


def request(
    delivery: str = "d-1",
    *,
    body: bytes = BODY,
    event: str = "issue_comment",
    secret: str = SECRET,
    method: str = "POST",
    path: str = "/webhooks/github",
    version: str = "1.1",
    extra: str = "",
    signature: str | None = None,
    length: bool = True,
) -> bytes:
    sig = signature if signature is not None else sign(body, secret)
    head = (
        f"{method} {path} HTTP/{version}\r\nHost: x\r\nX-GitHub-Event: {event}\r\n"
        f"X-GitHub-Delivery: {delivery}\r\nContent-Type: application/json\r\n"
        + (f"X-Hub-Signature-256: {sig}\r\n" if sig else "")
        + (f"Content-Length: {len(body)}\r\n" if length else "")
        + extra
        + "\r\n"
    )
    return head.encode() + body


def make(
    inbox: FakeInbox | None = None, *, metrics: Metrics | None = None, **limits: Any
) -> tuple[IngestFront, _Conn, FakeTransport, FakeInbox]:
    inbox = inbox or FakeInbox()
    front = IngestFront(
        inbox=inbox,  # type: ignore[arg-type]
        secrets=[SECRET],
        limits=FrontLimits(**limits),
        metrics=metrics,
    )
    conn = _Conn(front)
    transport = FakeTransport()
    conn.connection_made(transport)
    return front, conn, transport, inbox


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split what the front wrote into (status, headers, body) with a real HTTP parser."""
    out: list[tuple[int, dict[str, str], bytes]] = []

    class P:
        def __init__(self) -> None:
            self.headers: dict[str, str] = {}
            self.body = b""

        def on_message_begin(self) -> None:
            self.headers, self.body = {}, b""

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.decode().lower()] = value.decode()

        def on_body(self, chunk: bytes) -> None:
            self.body += chunk

        def on_message_complete(self) -> None:
            out.append((parser.get_status_code(), self.headers, self.body))

    p = P()
    parser = httptools.HttpResponseParser(p)
    parser.feed_data(bytes(raw))
    return out


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_signed_delivery_is_stored_then_answered_202() -> None:
    _front, conn, t, inbox = make()
    conn.data_received(request("abc-1"))
    assert t.written == b""  # nothing before the batch is stored
    await settle()
    [(status, headers, body)] = responses(t.written)
    assert status == 202
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(body) == {"delivery_id": "abc-1", "duplicate": False}
    assert inbox.stored == {"abc-1": ("issue_comment", BODY)}
    assert not t.closed  # keep-alive


async def test_a_request_fed_one_byte_at_a_time() -> None:
    _front, conn, t, inbox = make()
    for i, byte in enumerate(request("slow-1")):
        conn.data_received(bytes([byte]))
        assert i < 10 or not t.closed
    await settle()
    assert [r[0] for r in responses(t.written)] == [202]
    assert inbox.stored["slow-1"][1] == BODY


async def test_a_large_body_is_stored_lz4_compressed_and_reads_back_exact() -> None:
    """Compressed once on the loop, after the signature was checked over the raw bytes."""
    big = json.dumps(
        {"action": "created", "comment": {"body": "/cast x", "url": "https://api.github.com/x"}}
        | {f"field_{i}": f"https://api.github.com/repos/o/r/issues/{i}" for i in range(300)}
    ).encode()
    _front, conn, t, inbox = make()
    conn.data_received(request("big-1", body=big) + request("small-1"))
    await settle()
    assert [r[0] for r in responses(t.written)] == [202, 202]
    assert inbox.stored["big-1"] == ("issue_comment", big)
    assert inbox.encodings == {"big-1": LZ4, "small-1": None}  # small bodies stay raw


async def test_duplicates_in_one_batch_are_stored_once() -> None:
    _front, conn, t, inbox = make()
    conn.data_received(request("same") + request("same") + request("other"))
    await settle()
    got = [(s, json.loads(b)) for s, _h, b in responses(t.written)]
    assert got == [
        (202, {"delivery_id": "same", "duplicate": False}),
        (200, {"delivery_id": "same", "duplicate": True}),
        (202, {"delivery_id": "other", "duplicate": False}),
    ]
    assert inbox.batches == [["same", "other"]]


async def test_answers_keep_request_order_across_batches() -> None:
    inbox = FakeInbox()
    inbox.gate = asyncio.Event()
    _front, conn, t, _ = make(inbox)
    conn.data_received(request("first"))
    await settle()  # "first" is in a batch that waits for the gate
    conn.data_received(request("bad", signature="sha256=" + "0" * 64) + request("third"))
    await settle()
    assert t.written == b""  # the 401 is known but must wait for "first"
    inbox.gate.set()
    await settle()
    got = [
        (s, json.loads(b).get("delivery_id") or json.loads(b)["error"]["code"])
        for s, _h, b in responses(t.written)
    ]
    assert got == [(202, "first"), (401, "UNAUTHORIZED"), (202, "third")]
    assert inbox.batches == [["first"], ["third"]]


async def test_bad_and_missing_signatures_are_401_and_not_stored() -> None:
    _front, conn, t, inbox = make()
    conn.data_received(request("x1", secret="wrong") + request("x2", signature=""))
    conn.data_received(request("x3", signature="sha256=zz"))
    await settle()
    got = responses(t.written)
    assert [s for s, _h, _b in got] == [401, 401, 401]
    for _s, _h, b in got:
        err = json.loads(b)["error"]
        assert err["code"] == "UNAUTHORIZED" and SECRET not in err["message"]
    assert inbox.stored == {} and inbox.batches == []


async def test_over_the_limit_is_413_before_the_body_and_closes() -> None:
    _front, conn, t, inbox = make(max_body=100)
    big = b"x" * 101
    head = request("big", body=big)[: -len(big)]
    conn.data_received(head)  # only the head: the answer must not wait for the body
    [(status, headers, body)] = responses(t.written)
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert t.closed and t.paused
    conn.data_received(big + request("after"))  # ignored: nothing more is read
    await settle()
    assert inbox.batches == []


async def test_content_length_is_required() -> None:
    _front, conn, t, _inbox = make()
    chunked = (
        b"POST /webhooks/github HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    )
    conn.data_received(chunked)
    [(status, _h, body)] = responses(t.written)
    assert status == 411 and json.loads(body)["error"]["code"] == "VALIDATION_ERROR"
    assert t.closed


async def test_other_paths_and_methods() -> None:
    _front, conn, t, _inbox = make()
    conn.data_received(request("g", method="GET", body=b"", signature="", length=False))
    conn.data_received(request("p", path="/v1/spells"))
    conn.data_received(request("d", method="DELETE"))
    conn.data_received(request("q", path="/webhooks/github?x=1"))
    await settle()
    got = responses(t.written[: t.written.index(b"HTTP/1.1 202")])
    assert [s for s, _h, _b in got] == [405, 404, 405]
    assert got[0][1]["allow"] == "POST"
    assert json.loads(got[0][2])["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert json.loads(got[1][2])["error"]["code"] == "NOT_FOUND"
    assert b"HTTP/1.1 202" in t.written  # a query string is allowed on the path
    assert not t.closed


async def test_head_answers_have_no_body() -> None:
    _front, conn, t, _inbox = make()
    conn.data_received(request("h", method="HEAD", body=b"", signature="", length=False))
    raw = bytes(t.written)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405") and b"Content-Length: " in head
    assert rest == b""


async def test_header_limits() -> None:
    _front, conn, t, _inbox = make(max_headers=10)
    many = "".join(f"X-Pad-{i}: v\r\n" for i in range(12))
    conn.data_received(request("m", extra=many))
    [(status, _h, body)] = responses(t.written)
    assert status == 431 and json.loads(body)["error"]["code"] == "VALIDATION_ERROR"
    assert t.closed

    _front, conn, t, _inbox = make(max_header_bytes=1000)
    conn.data_received(request("m", extra=f"X-Pad: {'v' * 2000}\r\n"))
    assert responses(t.written)[0][0] == 431

    _front, conn, t, _inbox = make(max_url=50)
    conn.data_received(request("m", path="/webhooks/github?" + "a" * 100))
    assert responses(t.written)[0][0] == 431

    # a head that never ends is cut off too (not buffered without bound)
    _front, conn, t, _inbox = make(max_url=100, max_header_bytes=1000)
    conn.data_received(b"POST /webhooks/github HTTP/1.1\r\nX-Long: ")
    for _ in range(10):
        conn.data_received(b"v" * 1000)
    assert responses(t.written)[0][0] == 431 and t.closed


async def test_malformed_requests_are_400() -> None:
    _front, conn, t, _inbox = make()
    conn.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    [(status, _h, body)] = responses(t.written)
    assert status == 400 and json.loads(body)["error"]["code"] == "VALIDATION_ERROR"
    assert b"Traceback" not in t.written and t.closed


async def test_http_1_0_and_connection_close() -> None:
    _front, conn, t, _inbox = make()
    conn.data_received(request("v10", version="1.0"))
    await settle()
    [(status, headers, _b)] = responses(t.written)
    assert status == 202 and headers["connection"] == "close" and t.closed

    _front, conn, t, _inbox = make()
    conn.data_received(request("v10ka", version="1.0", extra="Connection: keep-alive\r\n"))
    await settle()
    [(status, headers, _b)] = responses(t.written)
    assert status == 202 and headers["connection"] == "keep-alive" and not t.closed

    _front, conn, t, inbox = make()
    conn.data_received(request("c1", extra="Connection: close\r\n") + request("c2"))
    await settle()
    assert [s for s, _h, _b in responses(t.written)] == [202]
    assert t.closed and list(inbox.stored) == ["c1"]  # nothing after "close" is read


async def test_ping_and_bad_headers() -> None:
    _front, conn, t, inbox = make()
    conn.data_received(request("p-1", event="ping"))
    conn.data_received(request("bad id!", event="issue_comment"))
    await settle()
    got = responses(t.written)
    assert got[0][0] == 200 and json.loads(got[0][2]) == {"ok": True, "pong": "p-1"}
    assert got[1][0] == 422 and json.loads(got[1][2])["error"]["code"] == "VALIDATION_ERROR"
    assert inbox.stored == {}


async def test_storage_failure_is_503_in_the_error_shape() -> None:
    inbox = FakeInbox()
    inbox.fail = True
    front, conn, t, _ = make(inbox)
    conn.data_received(request("f-1"))
    await settle()
    [(status, _h, body)] = responses(t.written)
    assert status == 503 and json.loads(body)["error"]["code"] == "UNAVAILABLE"
    assert b"disk full" not in body and front.stats["store_errors"] == 1


async def test_at_a_trickle_deliveries_are_stored_in_place_and_answered_at_once() -> None:
    inbox = FakeInbox()
    inbox.in_place = True
    front, conn, t, _ = make(inbox, in_place_gap=0.0)  # every small batch counts as quiet
    conn.data_received(request("i-1"))
    await settle()
    conn.data_received(request("i-1"))  # the same delivery again: a duplicate, in place too
    await settle()
    got = responses(t.written)
    assert [g[0] for g in got] == [202, 200]
    assert inbox.in_place_batches == [["i-1"], ["i-1"]] and inbox.batches == []
    assert front.stats["in_place"] == 2 and front.stats["accepted"] == 1
    # a failure in place is the same 503 as through the writer
    inbox.fail = True
    conn.data_received(request("i-2"))
    await settle()
    status, _h, body = responses(t.written)[-1]
    assert status == 503 and json.loads(body)["error"]["code"] == "UNAVAILABLE"
    assert front.stats["store_errors"] == 1


async def test_a_burst_goes_through_the_writer_in_one_batch() -> None:
    inbox = FakeInbox()
    inbox.in_place = True
    front, conn, t, _ = make(inbox, in_place_gap=0.0)
    # read in one loop iteration: a batch of 6 >= linger_min_batch, so not stored in place
    conn.data_received(b"".join(request(f"b-{i}") for i in range(6)))
    await settle()
    assert [g[0] for g in responses(t.written)] == [202] * 6
    assert inbox.batches == [[f"b-{i}" for i in range(6)]] and inbox.in_place_batches == []
    assert front.stats["in_place"] == 0


async def test_not_configured_is_503() -> None:
    front = IngestFront(inbox=None, secrets=[], limits=FrontLimits())
    conn = _Conn(front)
    t = FakeTransport()
    conn.connection_made(t)
    conn.data_received(request("n-1"))
    [(status, _h, body)] = responses(t.written)
    assert status == 503 and json.loads(body)["error"]["code"] == "UNAVAILABLE"


async def test_pipelining_is_bounded() -> None:
    inbox = FakeInbox()
    inbox.gate = asyncio.Event()
    _front, conn, t, _ = make(inbox, max_pending=4)
    conn.data_received(b"".join(request(f"p-{i}") for i in range(4)))
    assert t.paused  # 4 outstanding answers: stop reading
    inbox.gate.set()
    await settle()
    assert [s for s, _h, _b in responses(t.written)] == [202] * 4
    assert not t.paused


async def test_expect_100_continue() -> None:
    _front, conn, t, _inbox = make()
    raw = request("e-1", extra="Expect: 100-continue\r\n")
    head, body = raw[: -len(BODY)], BODY
    conn.data_received(head)
    assert bytes(t.written) == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.data_received(body)
    await settle()
    assert b"HTTP/1.1 202 Accepted" in t.written


@pytest.mark.parametrize("timeout", ["request", "keepalive"])
async def test_slow_and_idle_connections_are_closed(timeout: str) -> None:
    _front, conn, t, _inbox = make(request_timeout=5.0, keepalive_timeout=5.0)
    if timeout == "request":
        conn.data_received(request("s-1")[:40])
        conn.expire(conn.started + 1.0)
        assert not t.closed
        conn.expire(conn.started + 6.0)
        [(status, _h, _b)] = responses(t.written)
        assert status == 408 and t.closed
    else:
        conn.expire(conn.last_active + 1.0)
        assert not t.closed
        conn.expire(conn.last_active + 6.0)
        assert t.closed and t.written == b""


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",  # both: a smuggling attempt
        "Content-Length: 5\r\nContent-Length: 6\r\n",  # two lengths
        "Content-Length: 5x\r\n",
    ],
)
async def test_ambiguous_framing_is_refused(framing: str) -> None:
    _front, conn, t, inbox = make()
    raw = (
        "POST /webhooks/github HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: issue_comment\r\n"
        f"X-GitHub-Delivery: sm-1\r\nX-Hub-Signature-256: {sign(b'hello', SECRET)}\r\n"
        f"{framing}\r\nhello"
    ).encode()
    conn.data_received(raw)
    await settle()
    [(status, _h, body)] = responses(t.written)
    assert status in (400, 411) and json.loads(body)["error"]["code"] == "VALIDATION_ERROR"
    assert t.closed and inbox.batches == []


async def test_many_pipelined_requests_in_one_read_are_not_mistaken_for_a_long_head() -> None:
    big = b'{"pad":"' + b"x" * 14000 + b'"}'
    _front, conn, t, inbox = make(max_pending=64)
    reqs = b"".join(request(f"pp-{i}", body=big) for i in range(20))
    cut = reqs.index(b"X-GitHub-Delivery: pp-14")  # 14 requests + part of the 15th head
    assert cut > 150_000
    conn.data_received(reqs[:cut])
    conn.data_received(reqs[cut:])
    await settle()
    assert [s for s, _h, _b in responses(t.written)] == [202] * 20
    assert len(inbox.stored) == 20 and not t.closed


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_the_counters_are_exported_as_prometheus_metrics() -> None:
    metrics = Metrics()
    front, conn, t, inbox = make(metrics=metrics, max_body=1000)
    for result in ("accepted", "duplicate", "rejected", "error"):  # exported before any traffic
        assert sample(metrics, "webhook_front_deliveries_total", result=result) == 0
    # batch 1: a, b and a again (in-batch repeat); meanwhile a bad signature and a bad id
    conn.data_received(
        request("a")
        + request("b")
        + request("a")
        + request("x", secret="wrong")
        + request("bad id!")
        + request("p", path="/v1/spells")  # not a delivery: not counted
    )
    await settle()
    # batch 2: b (stored by batch 1) and c
    conn.data_received(request("b") + request("c"))
    await settle()
    assert [s for s, _h, _b in responses(t.written)] == [202, 202, 200, 401, 422, 404, 200, 202]
    assert inbox.batches == [["a", "b"], ["b", "c"]]
    # oversize (413) and no Content-Length (411), each closing its own connection
    for raw in (
        request("big", body=b"x" * 1001)[:-1001],
        b"POST /webhooks/github HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    ):
        c2, t2 = _Conn(front), FakeTransport()
        c2.connection_made(t2)
        c2.data_received(raw)
        assert responses(t2.written)[0][0] in (411, 413) and t2.closed
    # a batch that cannot be stored
    inbox.fail = True
    conn.data_received(request("d") + request("e"))
    await settle()
    assert [s for s, _h, _b in responses(t.written)][-2:] == [503, 503]

    def deliveries(result: str) -> float | None:
        return sample(metrics, "webhook_front_deliveries_total", result=result)

    assert deliveries("accepted") == 3 == front.stats["accepted"]
    assert deliveries("duplicate") == 2 == front.stats["duplicates"]
    assert deliveries("rejected") == 4 == front.stats["rejected"]
    assert deliveries("error") == 2
    assert sample(metrics, "webhook_front_batches_total") == 2 == front.stats["batches"]
    assert sample(metrics, "webhook_front_batch_size_count") == 2
    assert sample(metrics, "webhook_front_batch_size_sum") == 5  # 3 + 2 requests
    assert sample(metrics, "webhook_front_batch_size_bucket", le="1.0") == 0
    assert sample(metrics, "webhook_front_batch_size_bucket", le="2.0") == 1
    assert sample(metrics, "webhook_front_batch_size_bucket", le="4.0") == 2
    body, _ctype = metrics.render()
    assert b'webhook_front_deliveries_total{result="accepted"} 3.0' in body
    assert b"# TYPE webhook_front_batch_size histogram" in body
