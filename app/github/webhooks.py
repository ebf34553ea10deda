"""GitHub webhook deliveries, sans-I/O: verify the signature, read the headers, parse the event.

The order matters and is the caller's job (the request path and the worker do it like this)::

    headers = DeliveryHeaders.from_headers(request.headers)      # cheap, no body parsing
    verify_signature(raw_body, signature=headers.signature_256, secret=secrets)  # raw bytes
    ... store the raw delivery, answer 202 ...
    event = parse_event(headers.event, headers.delivery_id, raw_body)  # only after verification

Never parse a body whose signature has not been verified: the JSON parser is attack surface,
and an unverified payload must not influence anything. :func:`event_from_http` does all three
steps in that order for callers that want them in one call.

GitHub's docs: https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
and https://docs.github.com/en/webhooks/webhook-events-and-payloads#delivery-headers.

The router follows gidgethub's ``routing.Router``: one router per feature module, merged at the
entry point with ``Router(*routers)``; handlers are async and registered per event and action.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from app.errors import AppError

SIGNATURE_HEADER: Final = "X-Hub-Signature-256"
_SIGNATURE_RE: Final = re.compile(r"sha256=([0-9a-fA-F]{64})")
_DELIVERY_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
_EVENT_RE: Final = re.compile(r"[a-z][a-z_]{0,63}")
_INT_RE: Final = re.compile(r"[0-9]{1,20}")


class WebhookError(Exception):
    """Base of the errors of this module; ``status`` is the HTTP answer the endpoint should give."""

    status: int = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidSignature(WebhookError):
    """The ``X-Hub-Signature-256`` header is missing, malformed or does not match the body.

    The reason never contains a secret, the expected digest, or the header's value.
    """

    status = 401


class BadDelivery(WebhookError):
    """The delivery's headers or body are not a usable GitHub webhook."""

    status = 400


# ---------------------------------------------------------------------------------- signature


def _secrets(secret: str | bytes | Sequence[str | bytes]) -> list[bytes]:
    items: Sequence[str | bytes] = [secret] if isinstance(secret, str | bytes) else secret
    keys = [s.encode() if isinstance(s, str) else bytes(s) for s in items]
    if not keys or not all(keys):
        # A configuration error, not the sender's fault: never accept unsigned deliveries.
        raise ValueError("a non-empty webhook secret is required to verify deliveries")
    return keys


def sign(body: bytes, secret: str | bytes) -> str:
    """The ``X-Hub-Signature-256`` value GitHub sends for ``body`` (tests and fakes use it)."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(
    body: bytes, *, signature: str | None, secret: str | bytes | Sequence[str | bytes]
) -> None:
    """Check ``signature`` (the ``X-Hub-Signature-256`` header) against the raw ``body``.

    ``secret`` may be several secrets (during rotation: the new one and the old one); the
    delivery is accepted when any of them matches. HMAC-SHA256 over the exact bytes received,
    compared in constant time. Raises :class:`InvalidSignature`; ``ValueError`` when no secret is
    configured (an empty secret would accept anyone's signature).
    """
    keys = _secrets(secret)
    if signature is None or not signature.strip():
        raise InvalidSignature(f"missing {SIGNATURE_HEADER} header")
    m = _SIGNATURE_RE.fullmatch(signature.strip())
    if m is None:
        raise InvalidSignature(f"malformed {SIGNATURE_HEADER} header: expected sha256=<64 hex>")
    received = bytes.fromhex(m.group(1))
    matched = False
    for key in keys:  # check every secret, so timing does not tell which one matched
        expected = hmac.new(key, body, hashlib.sha256).digest()
        matched |= hmac.compare_digest(expected, received)
    if not matched:
        raise InvalidSignature("signature does not match the payload")


# ---------------------------------------------------------------------------------- headers


@dataclass(frozen=True, slots=True)
class DeliveryHeaders:
    """What the delivery's headers say, validated; the body is not looked at."""

    event: str
    delivery_id: str
    signature_256: str | None = None
    hook_id: int | None = None
    installation_target_id: int | None = None
    installation_target_type: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> DeliveryHeaders:
        """Read ``X-GitHub-*`` headers (case-insensitively). Raises :class:`BadDelivery`."""
        h = {k.lower(): v.strip() for k, v in headers.items()}
        event = h.get("x-github-event")
        if not event:
            raise BadDelivery("missing X-GitHub-Event header")
        if not _EVENT_RE.fullmatch(event):
            raise BadDelivery("malformed X-GitHub-Event header")
        delivery = h.get("x-github-delivery")
        if not delivery:
            raise BadDelivery("missing X-GitHub-Delivery header")
        if not _DELIVERY_ID_RE.fullmatch(delivery):
            raise BadDelivery(
                "malformed X-GitHub-Delivery header: expected a GUID of at most 64 characters"
            )
        target_type = h.get("x-github-hook-installation-target-type") or None
        if target_type is not None and not _EVENT_RE.fullmatch(target_type):
            raise BadDelivery("malformed X-GitHub-Hook-Installation-Target-Type header")
        return cls(
            event=event,
            delivery_id=delivery,
            signature_256=h.get(SIGNATURE_HEADER.lower()) or None,
            hook_id=_int_header(h, "x-github-hook-id"),
            installation_target_id=_int_header(h, "x-github-hook-installation-target-id"),
            installation_target_type=target_type,
        )


def check_delivery(
    body: bytes,
    *,
    signature: str | None,
    headers: Mapping[str, str],
    secret: str | bytes | Sequence[str | bytes],
) -> DeliveryHeaders:
    """What every webhook endpoint checks before it stores a delivery, in this order: the
    signature over the raw body (nothing is parsed before it), then GitHub's headers. Raises
    ``AppError`` ``UNAUTHORIZED`` / ``VALIDATION_ERROR`` with the messages both endpoints give."""
    try:
        verify_signature(body, signature=signature, secret=secret)
    except InvalidSignature as e:
        raise AppError("UNAUTHORIZED", f"webhook signature rejected: {e.reason}") from None
    try:
        return DeliveryHeaders.from_headers(headers)
    except BadDelivery as e:
        raise AppError("VALIDATION_ERROR", f"not a GitHub delivery: {e.reason}") from None


def _int_header(h: Mapping[str, str], name: str) -> int | None:
    value = h.get(name)
    if not value:
        return None
    if not _INT_RE.fullmatch(value):
        raise BadDelivery(f"malformed {name} header: expected an integer")
    return int(value)


# ---------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Event:
    """A parsed delivery. Build it with :func:`parse_event` only after the signature checked out."""

    name: str
    action: str | None
    delivery_id: str
    payload: dict[str, Any]
    installation_id: int | None
    repository: str | None
    sender_login: str | None
    sender_type: str | None


def _get(payload: Mapping[str, Any], obj: str, key: str) -> Any:
    inner = payload.get(obj)
    return inner.get(key) if isinstance(inner, dict) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parse_event(event: str, delivery_id: str, body: bytes) -> Event:
    """Parse a delivery's JSON body. Call it only after :func:`verify_signature` accepted ``body``.

    Raises :class:`BadDelivery` when the body is not a JSON object (GitHub Apps always send
    ``application/json``; the form-encoded variant of repository webhooks is not accepted).
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadDelivery("the delivery body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadDelivery("the delivery body is not a JSON object")
    installation_id = _get(payload, "installation", "id")
    if not isinstance(installation_id, int) or isinstance(installation_id, bool):
        installation_id = None
    return Event(
        name=event,
        action=_str_or_none(payload.get("action")),
        delivery_id=delivery_id,
        payload=payload,
        installation_id=installation_id,
        repository=_str_or_none(_get(payload, "repository", "full_name")),
        sender_login=_str_or_none(_get(payload, "sender", "login")),
        sender_type=_str_or_none(_get(payload, "sender", "type")),
    )


def event_from_http(
    headers: Mapping[str, str],
    body: bytes,
    *,
    secret: str | bytes | Sequence[str | bytes],
) -> Event:
    """Headers → signature check over the raw body → parse, in that order (gidgethub's
    ``Event.from_http``)."""
    delivery = DeliveryHeaders.from_headers(headers)
    verify_signature(body, signature=delivery.signature_256, secret=secret)
    return parse_event(delivery.event, delivery.delivery_id, body)


# ---------------------------------------------------------------------------------- router

Handler = Callable[..., Awaitable[Any]]
H = TypeVar("H", bound=Handler)


class Router:
    """Route events to async handlers by event name and, optionally, action.

    ``Router(*others)`` starts with the routes of ``others`` (one router per feature module,
    merged at the entry point). Handlers run one after another in registration order: first the
    ones registered for the event without an action, then the ones for its action.
    """

    def __init__(self, *other_routers: Router) -> None:
        self._any_action: dict[str, list[Handler]] = {}
        self._by_action: dict[tuple[str, str], list[Handler]] = {}
        for other in other_routers:
            for name, handlers in other._any_action.items():
                self._any_action.setdefault(name, []).extend(handlers)
            for route, handlers in other._by_action.items():
                self._by_action.setdefault(route, []).extend(handlers)

    def add(self, handler: Handler, event: str, *, action: str | None = None) -> None:
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"webhook handlers must be async functions, got {handler!r}")
        if action is None:
            self._any_action.setdefault(event, []).append(handler)
        else:
            self._by_action.setdefault((event, action), []).append(handler)

    def register(self, event: str, *, action: str | None = None) -> Callable[[H], H]:
        """Decorator: ``@router.register("issue_comment", action="created")``."""

        def decorator(handler: H) -> H:
            self.add(handler, event, action=action)
            return handler

        return decorator

    def fetch(self, event: Event) -> list[Handler]:
        """The handlers :meth:`dispatch` would call for ``event``."""
        found = list(self._any_action.get(event.name, ()))
        if event.action is not None:
            found.extend(self._by_action.get((event.name, event.action), ()))
        return found

    async def dispatch(self, event: Event, *args: Any, **kwargs: Any) -> int:
        """Await every matching handler with ``(event, *args, **kwargs)``; return how many ran.

        An exception from a handler propagates (the worker retries the delivery).
        """
        handlers = self.fetch(event)
        for handler in handlers:
            await handler(event, *args, **kwargs)
        return len(handlers)


__all__ = [
    "SIGNATURE_HEADER",
    "BadDelivery",
    "DeliveryHeaders",
    "Event",
    "InvalidSignature",
    "Router",
    "WebhookError",
    "event_from_http",
    "parse_event",
    "sign",
    "verify_signature",
]
