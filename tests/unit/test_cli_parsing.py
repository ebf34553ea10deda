"""The ``spell`` CLI and the SDK without a server: parsing, config file, error output, SSE.

The HTTP seam is ``httpx.MockTransport`` (the CLI's ``make_client`` is pointed at a client built
on it); nothing here opens a socket.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from click.testing import CliRunner, Result

from app.cli import main as cli_main
from app.cli.main import cli, parse_inputs, parse_value
from app.sdk.client import (
    UNSET,
    ApiError,
    SpellClient,
    SseParser,
    error_from_response,
    load_client_settings,
)

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No real config file, no token or URL from the developer's shell."""
    for name in ("SPELL_API_URL", "SPELL_TOKEN", "API_URL", "TOKEN"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "config" / "spell.json"
    monkeypatch.setenv("SPELL_CONFIG", str(config))
    return config


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


class FakePlatform:
    """Answers by (method, path); records every request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], Handler] = {}

    def route(self, method: str, path: str, fn: Handler) -> None:
        self.routes[(method, path)] = fn

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        fn = self.routes.get((request.method, request.url.path))
        if fn is None:
            return httpx.Response(
                404, json={"error": {"code": "NOT_FOUND", "message": "no such endpoint"}}
            )
        return fn(request)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakePlatform:
    """Route the CLI's client to a fake platform."""
    fake = FakePlatform()

    def make_client(ctx: click.Context) -> SpellClient:
        client = SpellClient("http://platform.test", "tok", transport=httpx.MockTransport(fake))
        client.reconnect_delay = 0
        return client

    monkeypatch.setattr(cli_main, "make_client", make_client)
    return fake


# ---------------------------------------------------------------------- -i KEY=VALUE


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("world", "world", id="plain text"),
        pytest.param("3", 3, id="integer"),
        pytest.param("1.5", 1.5, id="float"),
        pytest.param("true", True, id="boolean"),
        pytest.param("null", None, id="null"),
        pytest.param('{"a": [1, 2]}', {"a": [1, 2]}, id="object"),
        pytest.param('"quoted"', "quoted", id="JSON string"),
        pytest.param("007", "007", id="leading zeros stay text"),
        pytest.param("NaN", "NaN", id="NaN is not JSON"),
        pytest.param("Infinity", "Infinity", id="Infinity is not JSON"),
        pytest.param("", "", id="empty"),
        pytest.param("hello world", "hello world", id="spaces"),
    ],
)
def test_an_input_value_is_json_when_it_parses_else_text(raw: str, expected: Any) -> None:
    assert parse_value(raw) == expected


def test_input_pairs_split_at_the_first_equals_and_a_later_key_wins() -> None:
    assert parse_inputs(["name=world", "expr=a=b", "n=1", "n=2"]) == {
        "name": "world",
        "expr": "a=b",
        "n": 2,
    }


@pytest.mark.parametrize("bad", ["novalue", "=x"])
def test_an_input_without_key_equals_value_is_a_usage_error(bad: str) -> None:
    result = run("cast", "com.example.hello", "-i", bad)
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.stderr
    assert "Traceback" not in result.output


def test_cast_sends_the_file_input_overridden_by_i_and_an_idempotency_key(
    server: FakePlatform,
) -> None:
    server.route(
        "POST",
        "/v1/spells/com.example.hello:cast",
        lambda r: httpx.Response(
            202,
            json={"cast_id": "c_1", "status": "queued", "estimate_cents": 0, "currency": "USD"},
            headers={"Idempotent-Replayed": "false"},
        ),
    )
    result = run(
        "cast",
        "com.example.hello",
        "--input-file",
        "-",
        "-i",
        "name=world",
        "-i",
        "count=3",
        "--no-wait",
        input='{"name": "ignored", "loud": true}',
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "c_1"
    (req,) = server.requests
    assert json.loads(req.content) == {"input": {"name": "world", "loud": True, "count": 3}}
    assert req.headers["Idempotency-Key"]
    assert req.headers["Authorization"] == "Bearer tok"


def test_the_input_file_must_hold_a_json_object() -> None:
    result = run("cast", "x.y", "--input-file", "-", input="[1, 2]")
    assert result.exit_code == 2
    assert "JSON object" in result.stderr


# ---------------------------------------------------------------------- config file


def test_config_set_writes_a_private_file_and_show_masks_the_token(isolated_env: Path) -> None:
    assert run("config", "set", "api_url", "http://example.test:8080/").exit_code == 0
    result = run("config", "set", "token", "-", input="secret-token-value\n")
    assert result.exit_code == 0, result.output
    assert "secret-token-value" not in result.output

    assert json.loads(isolated_env.read_text()) == {
        "api_url": "http://example.test:8080",
        "token": "secret-token-value",
    }
    assert stat.S_IMODE(isolated_env.stat().st_mode) == 0o600

    shown = run("config", "show")
    assert shown.exit_code == 0
    assert "http://example.test:8080  [config file]" in shown.stdout
    assert "secret-token-value" not in shown.stdout
    assert "secret… (18 chars)" in shown.stdout


def test_the_environment_wins_over_the_config_file(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("config", "set", "api_url", "http://from-file.test")
    run("config", "set", "token", "file-token")
    monkeypatch.setenv("SPELL_API_URL", "http://from-env.test")

    settings = load_client_settings()
    assert settings.api_url == "http://from-env.test"
    assert settings.token is not None and settings.token.get_secret_value() == "file-token"
    assert "[env SPELL_API_URL]" in run("config", "show").stdout


def test_config_unset_removes_a_key(isolated_env: Path) -> None:
    run("config", "set", "token", "t")
    assert run("config", "unset", "token").exit_code == 0
    assert "token" not in json.loads(isolated_env.read_text())


def test_a_config_api_url_must_be_http() -> None:
    result = run("config", "set", "api_url", "ftp://nope")
    assert result.exit_code == 2
    assert "http://" in result.stderr


def test_a_broken_config_file_is_a_clear_error(isolated_env: Path) -> None:
    isolated_env.parent.mkdir(parents=True)
    isolated_env.write_text("{not json")
    result = run("spells", "list")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: VALIDATION_ERROR: the config file")
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------- error output


def test_a_refused_cast_prints_code_message_retry_after_and_a_hint(
    server: FakePlatform,
) -> None:
    server.route(
        "POST",
        "/v1/spells/com.example.paid:cast",
        lambda r: httpx.Response(
            402,
            json={
                "error": {
                    "code": "BUDGET_CAP_EXCEEDED",
                    "message": "this cast would pass the account's monthly cap",
                    "retry_after": 86400,
                }
            },
        ),
    )
    result = run("cast", "com.example.paid", "-i", "name=x")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (
        "error: BUDGET_CAP_EXCEEDED: this cast would pass the account's monthly cap "
        "(retry after 86400 s)"
    )
    assert "spell cap set" in result.stderr
    assert result.stdout == ""


def test_an_unexpected_failure_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(ctx: click.Context) -> SpellClient:
        raise RuntimeError("something broke")

    monkeypatch.setattr(cli_main, "make_client", boom)
    result = run("spells", "list")
    assert result.exit_code == 1
    assert result.stderr == "error: INTERNAL: RuntimeError: something broke\n"


def test_an_unreachable_platform_says_where_it_looked() -> None:
    result = run("--api-url", "http://127.0.0.1:9", "spells", "list")
    assert result.exit_code == 1
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: UNAVAILABLE: cannot reach the platform at http://127.0.0.1:9")
    assert "spell serve" in result.stderr


def test_a_failed_cast_exits_1_with_its_error(server: FakePlatform) -> None:
    server.route(
        "POST",
        "/v1/spells/a.b:cast",
        lambda r: httpx.Response(202, json={"cast_id": "c_9", "status": "queued"}),
    )
    sse = (
        'id: 1\nevent: queued\ndata: {"seq":1,"stage":"queued","cast_id":"c_9"}\n\n'
        'id: 2\nevent: failed\ndata: {"seq":2,"stage":"failed","cast_id":"c_9",'
        '"error":{"code":"TIMEOUT","message":"too slow"}}\n\n'
    )
    server.route(
        "GET",
        "/v1/casts/c_9/events",
        lambda r: httpx.Response(200, text=sse, headers={"Content-Type": "text/event-stream"}),
    )
    server.route(
        "GET",
        "/v1/casts/c_9",
        lambda r: httpx.Response(
            200,
            json={
                "cast_id": "c_9",
                "status": "failed",
                "cost_cents": 0,
                "currency": "USD",
                "error": {"code": "TIMEOUT", "message": "too slow"},
            },
        ),
    )
    result = run("cast", "a.b")
    assert result.exit_code == 1
    assert "status:    failed" in result.stdout
    assert "failed: TIMEOUT: too slow" in result.stderr  # the plain progress line
    assert "error: TIMEOUT: too slow" in result.stderr


def test_cap_set_needs_a_value_and_none_removes_a_cap(server: FakePlatform) -> None:
    assert run("cap", "set").exit_code == 2
    assert run("cap", "set", "--monthly", "-5").exit_code == 2
    assert run("cap", "set", "--monthly", "lots").exit_code == 2

    def caps(r: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "account": "acme",
                "period": "2026-11",
                "monthly": {"cap_cents": 0, "used_cents": 0, "reserved_cents": 0},
                "total": {"cap_cents": None, "used_cents": 0, "reserved_cents": 0},
                "monthly_resets_in": 3600,
            },
        )

    server.route("POST", "/v1/billing/caps", caps)
    result = run("cap", "set", "--monthly", "0", "--total", "none")
    assert result.exit_code == 0, result.output
    (req,) = server.requests
    assert json.loads(req.content) == {"monthly_cents": 0, "total_cents": None}
    assert req.headers["Idempotency-Key"]
    assert "monthly  0" in result.stdout


# ---------------------------------------------------------------------- --help everywhere


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _all_commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("path", list(_all_commands(cli)), ids=lambda p: " ".join(p) or "spell")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = run(*path, "--help")
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: ")
    assert len(result.stdout.splitlines()) > 3


def test_the_documented_commands_exist() -> None:
    commands = {" ".join(p) for p in _all_commands(cli)}
    assert {
        "serve",
        "db upgrade",
        "token issue",
        "publish",
        "spells list",
        "spells show",
        "cast",
        "logs",
        "cap set",
        "cap show",
        "audit verify",
        "config set",
        "config show",
    } <= commands


# ---------------------------------------------------------------------- SDK protocol pieces


@pytest.mark.parametrize(
    ("status", "headers", "body", "code", "retry"),
    [
        pytest.param(
            429,
            {"Retry-After": "7"},
            b'{"error":{"code":"RATE_LIMITED","message":"slow down"}}',
            "RATE_LIMITED",
            7,
            id="retry-after header",
        ),
        pytest.param(
            402,
            {},
            b'{"error":{"code":"BUDGET_CAP_EXCEEDED","message":"m","retry_after":60}}',
            "BUDGET_CAP_EXCEEDED",
            60,
            id="retry_after in the body",
        ),
        pytest.param(502, {}, b"<html>bad gateway</html>", "UNAVAILABLE", None, id="proxy 502"),
        pytest.param(500, {}, b"", "INTERNAL", None, id="empty 500"),
        pytest.param(404, {}, b'{"detail": "x"}', "INTERNAL", None, id="foreign JSON"),
    ],
)
def test_errors_are_read_from_the_spec_shape_or_fall_back(
    status: int, headers: dict[str, str], body: bytes, code: str, retry: int | None
) -> None:
    err = error_from_response(status, headers, body)
    assert (err.status, err.code, err.retry_after) == (status, code, retry)
    assert err.message


def test_the_sse_parser_follows_the_html_standard() -> None:
    parser = SseParser()
    lines = [
        "retry: 1000",
        "",
        ": keep-alive",
        "id: 1",
        "event: log",
        "data: first",
        "data:second",
        "",
        "id: 2",
        "data: {}",
        "",
    ]
    events = list(parser.parse(lines))
    assert [(e.id, e.event, e.data) for e in events] == [
        ("1", "log", "first\nsecond"),
        ("2", "message", "{}"),
    ]
    assert parser.retry_ms == 1000


def _sse(*events: tuple[int, str]) -> str:
    return "".join(
        f'id: {seq}\nevent: {stage}\ndata: {{"seq":{seq},"stage":"{stage}"}}\n\n'
        for seq, stage in events
    )


def test_events_reconnect_with_last_event_id_and_skip_duplicates() -> None:
    asked: list[str | None] = []
    answers = iter(
        [
            _sse((1, "queued"), (2, "running")),  # the stream drops here
            _sse((2, "running"), (3, "progress"), (4, "succeeded")),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("Last-Event-ID"))
        return httpx.Response(200, text=next(answers))

    client = SpellClient("http://p.test", "t", transport=httpx.MockTransport(handler))
    client.reconnect_delay = 0
    stages = [e["stage"] for e in client.events("c_1")]
    assert stages == ["queued", "running", "progress", "succeeded"]
    assert asked == ["0", "2"]


def test_events_give_up_after_max_reconnects_without_progress() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    client = SpellClient("http://p.test", "t", transport=httpx.MockTransport(handler))
    client.reconnect_delay = 0
    with pytest.raises(ApiError) as info:
        list(client.events("c_1", max_reconnects=2))
    assert info.value.code == "UNAVAILABLE"


def test_set_caps_sends_only_the_given_fields() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={})

    client = SpellClient("http://p.test", "t", transport=httpx.MockTransport(handler))
    client.set_caps(total_cents=None)
    client.set_caps(monthly_cents=5, total_cents=UNSET, account="acme")
    assert bodies == [{"total_cents": None}, {"monthly_cents": 5, "account": "acme"}]


def test_cast_reports_a_replay_and_retries_a_dropped_connection_with_the_same_key() -> None:
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        if len(keys) == 1:
            raise httpx.ReadError("connection reset")
        return httpx.Response(202, json={"cast_id": "c_1"}, headers={"Idempotent-Replayed": "true"})

    client = SpellClient("http://p.test", "t", transport=httpx.MockTransport(handler))
    out = client.cast("a.b", {"x": 1}, idempotency_key="k-1")
    assert out["replayed"] is True
    assert keys == ["k-1", "k-1"]


def test_download_checks_the_digest_and_keeps_the_token_at_home(tmp_path: Path) -> None:
    payload = b"PK-not-really-a-zip"
    good = hashlib.sha256(payload).hexdigest()
    auth: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        auth.append(request.headers.get("Authorization"))
        digest = good if request.url.path.endswith("/good") else "0" * 64
        return httpx.Response(
            200,
            content=payload,
            headers={
                "Digest": f"sha-256={digest}",
                "Content-Disposition": 'attachment; filename="c_1.zip"',
            },
        )

    client = SpellClient("http://p.test", "t", transport=httpx.MockTransport(handler))
    saved = client.download("http://p.test/v1/artifacts/good?sig=x", tmp_path)
    assert saved == tmp_path / "c_1.zip" and saved.read_bytes() == payload
    client.download("http://elsewhere.test/good", tmp_path / "other.zip")
    assert auth == ["Bearer t", None]
    with pytest.raises(ApiError, match="digest"):
        client.download("http://p.test/bad", tmp_path / "bad.zip")
    assert not (tmp_path / "bad.zip").exists()


def test_on_a_tty_progress_is_one_redrawn_line(capsys: pytest.CaptureFixture[str]) -> None:
    view = cli_main.ProgressView(tty=True, width=10)
    view({"stage": "running"})
    view({"stage": "progress", "pct": 40, "message": "halfway"})
    view({"stage": "log", "stream": "stdout", "line": "a line"})
    view({"stage": "succeeded"})
    view.close()
    err = capsys.readouterr().err  # click drops the ANSI "erase line" when not on a real TTY
    assert "\r[####------]  40% halfway" in err
    assert "\ra line\n" in err
    assert err.endswith("\r")
