"""Prometheus metrics on a dedicated registry (never the process-global default one).

Exposed names (``prometheus_client`` adds ``_total`` to counters and the histogram series):

=====================================  =========  ==================================================
name                                   type       labels / meaning
=====================================  =========  ==================================================
``cast_count_total``                   counter    ``status``: casts that reached a status
``cast_latency_ms_bucket/_sum/_count`` histogram  accepted → finished, in milliseconds
``errors_by_code_total``               counter    ``code``: error responses by spec error code
``http_requests_total``                counter    ``method``, ``route`` (the route template, never
                                                  the raw path), ``status``
``refunds_count_total``                counter    refunds issued
``revenue_cents_total``                counter    settled revenue in minor units (all currencies)
``webhook_front_deliveries_total``     counter    ``result``: POSTs to the webhook ingest front:
                                                  ``accepted`` (202, stored), ``duplicate`` (200),
                                                  ``rejected`` (401/411/413/422/503 before storage),
                                                  ``error`` (503, storing the batch failed)
``webhook_front_batches_total``        counter    storage transactions the front committed
``webhook_front_batch_size_*``         histogram  deliveries per committed storage transaction
=====================================  =========  ==================================================

Counters and the histogram also expose ``*_created`` timestamps (``prometheus_client`` default).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["BATCH_SIZE_BUCKETS", "CONTENT_TYPE", "LATENCY_BUCKETS_MS", "Metrics"]

#: The classic text format, understood by every Prometheus version (our names are all legacy-safe,
#: so the body is the same as the newer 1.0.0 text format).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS_MS: tuple[float, ...] = (
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
    10000,
    30000,
    60000,
)

#: deliveries per storage transaction of the webhook ingest front (its batches hold ≤ 256)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """All metrics of one process, on their own registry. Build one per app instance."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.cast_count = Counter(
            "cast_count", "Casts that reached a status", ["status"], registry=self.registry
        )
        self.cast_latency_ms = Histogram(
            "cast_latency_ms",
            "Cast latency from acceptance to a final status, in milliseconds",
            buckets=LATENCY_BUCKETS_MS,
            registry=self.registry,
        )
        self.errors_by_code = Counter(
            "errors_by_code", "Error responses by error code", ["code"], registry=self.registry
        )
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.refunds_count = Counter("refunds_count", "Refunds issued", registry=self.registry)
        self.revenue_cents = Counter(
            "revenue_cents", "Settled revenue in minor currency units", registry=self.registry
        )
        self.webhook_front_deliveries = Counter(
            "webhook_front_deliveries",
            "Deliveries POSTed to the webhook ingest front, by result",
            ["result"],
            registry=self.registry,
        )
        for result in ("accepted", "duplicate", "rejected", "error"):
            self.webhook_front_deliveries.labels(result=result)  # exported from 0
        self.webhook_front_batches = Counter(
            "webhook_front_batches",
            "Storage transactions committed by the webhook ingest front",
            registry=self.registry,
        )
        self.webhook_front_batch_size = Histogram(
            "webhook_front_batch_size",
            "Deliveries per storage transaction of the webhook ingest front",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        """``(body, content_type)`` for a ``GET /metrics`` response (Prometheus text format)."""
        return generate_latest(self.registry), CONTENT_TYPE
