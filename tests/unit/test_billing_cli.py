"""The billing commands' parsing and refusals (no server, no Stripe)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from app.cli.billing import parse_since
from app.cli.main import cli


def test_since_takes_durations_and_dates() -> None:
    got = parse_since("7d")
    assert got is not None
    assert abs((datetime.now(UTC) - got) - timedelta(days=7)) < timedelta(seconds=5)
    assert parse_since("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_since(None) is None
    with pytest.raises(click.BadParameter):
        parse_since("last week")


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["refund", "c_1"], id="refund"),
        pytest.param(["billing", "reconcile"], id="rec"),
        pytest.param(["billing", "meters", "ensure"], id="meters"),
    ],
)
def test_operator_billing_commands_need_stripe_configured(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STRIPE_API_KEY", raising=False)
    monkeypatch.setenv("SPELL_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "error: UNAVAILABLE: Stripe billing is not configured here" in result.output


def test_refund_amounts_are_positive_cents() -> None:
    result = CliRunner().invoke(cli, ["refund", "c_1", "--amount", "0"])
    assert result.exit_code == 2


def test_usage_needs_a_quantity() -> None:
    result = CliRunner().invoke(cli, ["billing", "usage"])
    assert result.exit_code == 2
    assert "give --casts, --compute-ms and/or --egress-mb" in result.output


def test_plan_subscribe_needs_a_plan() -> None:
    result = CliRunner().invoke(cli, ["plan", "subscribe"])
    assert result.exit_code == 2
    assert "Missing argument 'PLAN'" in result.output
