"""Typed application state keys (aiohttp ``AppKey``), all in one place."""

from __future__ import annotations

import asyncio

from aiohttp import web

from app.artifacts.s3 import S3ArtifactStore
from app.bus.jetstream import JetStreamBus
from app.config import Settings
from app.domain.ratelimit import RateLimiter
from app.github.service import GitHubService
from app.observability.metrics import Metrics
from app.services.platform import Platform
from app.services.ports import Queue
from app.store.inbox import Inbox
from app.store.ledger import SqlLedger
from app.worker.consumer import OutboxRelay, RunConsumer

SETTINGS = web.AppKey("settings", Settings)
PLATFORM = web.AppKey("platform", Platform)
LEDGER = web.AppKey("ledger", SqlLedger)
METRICS = web.AppKey("metrics", Metrics)
LIMITER = web.AppKey("limiter", RateLimiter)
QUEUE = web.AppKey("queue", Queue)
RELAY = web.AppKey("relay", OutboxRelay)
INBOX = web.AppKey("inbox", Inbox)
JOBS = web.AppKey("jobs", Queue)
GITHUB = web.AppKey("github", GitHubService)
CONSUMER = web.AppKey("consumer", RunConsumer)
SANDBOX_STATE = web.AppKey("sandbox_state", dict)
BUS = web.AppKey("bus", JetStreamBus)  # set when NATS_URL is
OBJECT_STORE = web.AppKey("object_store", S3ArtifactStore)  # set when SPELL_ARTIFACTS_URL is
CLOSING = web.AppKey("closing", asyncio.Event)  # set on shutdown: long-lived streams end

# Per-request state
TRACEPARENT = web.RequestKey("traceparent", str)
CALLER = web.RequestKey("caller", object)  # Caller | None
AUTH_ERROR = web.RequestKey("auth_error", object)  # AppError | None
RATELIMIT_HEADERS = web.RequestKey("ratelimit_headers", dict)
