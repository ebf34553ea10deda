"""``spell billing …``, ``spell plan …`` and ``spell refund``: Stripe billing from the command
line (issue #4).

``billing setup``, ``billing show``, ``billing usage``, ``plan list`` and ``plan subscribe`` are
client commands (they talk to the server with your token). ``refund``, ``billing reconcile`` and
``billing meters ensure`` are operator commands on the local ledger (the same
``SPELL_DATA_DIR`` / ``DATABASE_URL`` and ``STRIPE_API_KEY`` as the server), like
``spell token issue``.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
import webbrowser
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from app.billing.service import BillingConfig, BillingService, RevenueCounter
from app.billing.stripe_client import StripeClient
from app.config import Settings
from app.errors import AppError
from app.services.ports import SystemClock
from app.store.audit_outbox import AuditDrainer
from app.store.auditlog import AuditLog
from app.store.billing_store import BillingStore
from app.store.inbox import Inbox
from app.store.ledger import SqlLedger

AUDIT_LOG = "main"


def _client(ctx: click.Context) -> Any:
    from app.cli.main import make_client

    return make_client(ctx)


@contextlib.asynccontextmanager
async def local_billing(settings: Settings) -> AsyncIterator[BillingService]:
    """The billing service on the local ledger, for operator commands."""
    from app.cli.local import audit_path, local_engine

    if not settings.stripe_enabled or settings.stripe_api_key is None:
        raise AppError("UNAVAILABLE", "Stripe billing is not configured here: set STRIPE_API_KEY")
    clock = SystemClock()
    stripe = StripeClient(
        settings.stripe_api_key.get_secret_value(), base_url=settings.stripe_api_base
    )
    async with local_engine(settings) as engine:
        ledger = SqlLedger(engine, clock, idempotency_ttl=settings.idempotency_ttl)
        audit = AuditLog(
            audit_path(settings),
            on_head=lambda seq, h: ledger.set_audit_head(AUDIT_LOG, seq, h),
        )
        await audit.start()
        try:
            yield BillingService(
                config=BillingConfig(
                    public_url=settings.public_url or "http://127.0.0.1:8080",
                    plans=settings.plans(),
                ),
                stripe=stripe,
                store=BillingStore(ledger, clock),
                ledger=ledger,
                inbox=Inbox(ledger, clock),
                audit=audit,
                counters=RevenueCounter(revenue=lambda _n: None, refund=lambda: None),
                kick_outbox=lambda: None,
            )
        finally:
            # billing's audit records commit with their state change (the audit outbox):
            # append what this command committed before the log closes
            await AuditDrainer(ledger.fast, audit).close()
            await audit.close()
            await ledger.aclose()
            await stripe.aclose()


def _run(coro: Any) -> Any:
    from app.cli.main import run_async

    return run_async(coro)


def parse_since(value: str | None) -> datetime | None:
    """``7d``, ``12h``, ``30m`` or an ISO date/time (UTC when no offset is given)."""
    if value is None:
        return None
    m = re.fullmatch(r"(\d+)([dhm])", value.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        delta = {"d": timedelta(days=n), "h": timedelta(hours=n), "m": timedelta(minutes=n)}
        return datetime.now(UTC) - delta[unit]
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use 7d, 12h, 30m or an ISO date") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@click.group()
def billing() -> None:
    """Stripe billing: payment method, what is owed, reconciliation."""


@billing.command("setup")
@click.option("--open", "open_browser", is_flag=True, help="Open the URL in a browser.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def billing_setup(ctx: click.Context, open_browser: bool, as_json: bool) -> None:
    """Print the Stripe Checkout URL where you save a payment method for paid casts."""
    with _client(ctx) as client:
        got = client._call("POST", "/v1/billing/setup")
    if as_json:
        click.echo(json.dumps(got, indent=2, sort_keys=True))
        return
    click.echo(got["url"])
    click.echo("open it to save a card; paid casts work once Stripe confirms it", err=True)
    if open_browser:
        webbrowser.open(got["url"])


@billing.command("show")
@click.option("--account", help="Operators only: another account.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def billing_show(ctx: click.Context, account: str | None, as_json: bool) -> None:
    """Payment method status, past-due state, pending amounts and recent charges."""
    with _client(ctx) as client:
        got = client._call("GET", "/v1/billing", params={"account": account})
    if as_json:
        click.echo(json.dumps(got, indent=2, sort_keys=True))
        return
    click.echo(f"account: {got['account']} (billing: {got['mode']})")
    if got["mode"] == "stripe":
        pm = got.get("payment_method") or {}
        click.echo(f"payment method: {pm.get('status', 'none')}")
        if got.get("plan") or got.get("subscription_status"):
            click.echo(f"plan: {got.get('plan')} ({got.get('subscription_status')})")
        if got.get("past_due"):
            click.echo(f"PAST DUE: {got.get('past_due_reason')} — run `spell billing setup`")
        for p in got.get("pending", []):
            click.echo(
                f"pending: {p['amount_cents']} {p['currency']} cents in {p['lines']} casts "
                f"(collected at {p['minimum_charge_cents']} or at month end)"
            )
        for c in got.get("charges", []):
            click.echo(
                f"charge {c['id']}: {c['amount_cents']} {c['currency']} {c['status']}"
                + (f" ({c['failure_code']})" if c.get("failure_code") else "")
            )


@billing.command("reconcile")
@click.option("--since", help="Only charges since: 7d, 12h, 30m or an ISO date.")
def billing_reconcile(since: str | None) -> None:
    """Compare the ledger with Stripe (operator, local ledger); exit 1 on any difference."""
    start = parse_since(since)

    async def go() -> list[str]:
        async with local_billing(Settings()) as svc:
            return await svc.reconcile(start)

    problems: list[str] = _run(go())
    for line in problems:
        click.echo(line)
    if problems:
        click.echo(f"{len(problems)} discrepancies", err=True)
        raise SystemExit(1)
    click.echo("ok: the ledger matches Stripe", err=True)


@click.command("refund")
@click.argument("cast_id", metavar="CAST")
@click.option("--amount", type=click.IntRange(min=1), help="Cents (default: all that is left).")
@click.option("--reason", default="operator", show_default=True, help="Recorded with the refund.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def refund(cast_id: str, amount: int | None, reason: str, as_json: bool) -> None:
    """Refund (part of) a cast (operator, local ledger): a Stripe refund of the payment that
    collected it, or a lower pending amount if it was not collected yet."""

    async def go() -> dict[str, Any]:
        async with local_billing(Settings()) as svc:
            return await svc.refund_cast(
                cast_id, amount=amount, reason=reason, actor="operator:cli"
            )

    got: dict[str, Any] = _run(go())
    if as_json:
        click.echo(json.dumps(got, indent=2, sort_keys=True))
    else:
        click.echo(
            f"refunded {got['amount_cents']} {got['currency']} cents of {cast_id} "
            f"({got['method']}, {got['refund_id']})"
        )


@billing.group("meters")
def meters() -> None:
    """The Stripe Billing Meters usage is reported to (casts, compute_ms, egress_mb)."""


@meters.command("ensure")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def meters_ensure(as_json: bool) -> None:
    """Create the platform's Billing Meters at Stripe if missing (operator, local ledger);
    prints their ids, to attach metered prices to them for the plans (SPELL_STRIPE_PLANS)."""

    async def go() -> dict[str, tuple[str, str]]:
        async with local_billing(Settings()) as svc:
            return await svc.ensure_meters()

    got: dict[str, tuple[str, str]] = _run(go())
    if as_json:
        click.echo(
            json.dumps(
                {k: {"event_name": v[0], "meter_id": v[1]} for k, v in got.items()},
                indent=2,
                sort_keys=True,
            )
        )
        return
    for name, (event_name, meter_id) in got.items():
        click.echo(f"{name}\t{event_name}\t{meter_id}")


@billing.command("usage")
@click.option("--casts", type=click.IntRange(min=0), help="Casts to report.")
@click.option("--compute-ms", type=click.IntRange(min=0), help="Compute milliseconds to report.")
@click.option("--egress-mb", type=click.IntRange(min=0), help="Egress megabytes to report.")
@click.option("--account", help="Operators only: another account.")
@click.option("--timestamp", type=int, help="Unix seconds (default: now; up to 35 days back).")
@click.option("--idempotency-key", metavar="KEY", help="Default: a new UUID.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def billing_usage(
    ctx: click.Context,
    casts: int | None,
    compute_ms: int | None,
    egress_mb: int | None,
    account: str | None,
    timestamp: int | None,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Report usage to your metered subscription (POST /v1/billing/usage)."""
    usage = {
        k: v
        for k, v in (("casts", casts), ("compute_ms", compute_ms), ("egress_mb", egress_mb))
        if v is not None
    }
    if not usage:
        raise click.UsageError("give --casts, --compute-ms and/or --egress-mb")
    body: dict[str, Any] = {"usage": usage}
    if account is not None:
        body["account"] = account
    if timestamp is not None:
        body["timestamp"] = timestamp
    with _client(ctx) as client:
        got = client._call(
            "POST",
            "/v1/billing/usage",
            json_body=body,
            headers={"Idempotency-Key": idempotency_key or str(uuid.uuid4())},
            retries=2,
        )
    if as_json:
        click.echo(json.dumps(got, indent=2, sort_keys=True))
        return
    click.echo(f"usage {got['usage_id']} for {got['account']}: {got['status']}")


@click.group()
def plan() -> None:
    """Metered subscription plans."""


@plan.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def plan_list(ctx: click.Context, as_json: bool) -> None:
    """The plans you can subscribe to."""
    with _client(ctx) as client:
        got = client._call("GET", "/v1/billing/plans")
    if as_json:
        click.echo(json.dumps(got, indent=2, sort_keys=True))
        return
    for p in got["plans"]:
        click.echo(p["name"])


@plan.command("subscribe")
@click.argument("plan_name", metavar="PLAN")
@click.option("--open", "open_browser", is_flag=True, help="Open the URL in a browser.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def plan_subscribe(ctx: click.Context, plan_name: str, open_browser: bool, as_json: bool) -> None:
    """Print the Stripe Checkout URL where you subscribe to a metered plan."""
    with _client(ctx) as client:
        got = client._call("POST", "/v1/billing/subscribe", json_body={"plan": plan_name})
    if as_json:
        click.echo(json.dumps(got, indent=2, sort_keys=True))
        return
    click.echo(got["url"])
    click.echo(
        "open it to subscribe; metered casts bill to the plan once Stripe confirms it", err=True
    )
    if open_browser:
        webbrowser.open(got["url"])


COMMANDS: list[click.Command] = [billing, refund, plan]
