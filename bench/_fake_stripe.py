"""The contract-enforcing fake Stripe (tests/contract/fake_stripe.py) as a process of its own,
for bench/billing_settle.py: every request is still validated against Stripe's OpenAPI
description, and its CPU is not the platform's.

Usage: python bench/_fake_stripe.py --port P   (prints one JSON line when it listens)

Besides Stripe's API it answers two bench-only routes (not Stripe's):

* ``POST /_bench/customer`` → a new customer with ``pm_card_visa`` attached as its default
  payment method: ``{"customer": "cus_…", "payment_method": "pm_…"}``;
* ``GET /_bench/stats`` → how many PaymentIntents, refunds and meter events it holds, the
  duplicate meter events it dropped, and any contract violations.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web

from tests.contract.fake_stripe import FakeStripe, stripe_contract


def build(fake: FakeStripe) -> web.Application:
    async def customer(request: web.Request) -> web.Response:
        cus = fake._create_customer({})
        pm = fake.attach_payment_method(cus["id"], "pm_card_visa")
        return web.json_response({"customer": cus["id"], "payment_method": pm})

    async def stats(request: web.Request) -> web.Response:
        succeeded = [p for p in fake.payment_intents.values() if p["status"] == "succeeded"]
        return web.json_response(
            {
                "payment_intents": len(fake.payment_intents),
                "succeeded_cents": sum(int(p["amount"]) for p in succeeded),
                "refunds": len(fake.refunds),
                "meter_events": len(fake.meter_events),
                "duplicate_meter_events": fake.duplicate_meter_events,
                "requests": len(fake.requests),
                "violations": fake.violations[:10],
                "idempotency_errors": fake.idempotency_errors[:10],
            }
        )

    app = web.Application()
    app.router.add_post("/_bench/customer", customer)
    app.router.add_get("/_bench/stats", stats)
    app.router.add_route("*", "/{tail:.*}", fake._handle)
    return app


async def main(port: int) -> None:
    fake = FakeStripe(contract=stripe_contract())
    fake.requests = _Bounded()  # type: ignore[assignment]
    fake.versions = _Bounded()  # type: ignore[assignment]
    runner = web.AppRunner(build(fake), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    fake.url = f"http://127.0.0.1:{port}"
    print(json.dumps({"url": fake.url, "api_version": fake.api_version}), flush=True)
    await asyncio.Event().wait()


class _Bounded(list):  # type: ignore[type-arg]
    """The request log, bounded: a long benchmark must not grow the fake without limit."""

    def append(self, item: object) -> None:
        if len(self) >= 2000:
            del self[:1000]
        super().append(item)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    asyncio.run(main(p.parse_args().port))
