"""The bot's comments and check-run text: templates from templates/comments, safe Markdown."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.domain.commands import CommandError, parse_comment
from app.github.render import (
    STATUSES,
    TEMPLATES_ENV,
    check_run_state,
    code,
    escape_markdown,
    find_cast_marker,
    format_money,
    message_markdown,
    render_cap,
    render_cast_comment,
    render_check_run,
    render_command_error,
    render_link_help,
    render_permission_denied,
    render_spells_list,
    safe_url,
    templates_dir,
)

ROOT = Path(__file__).resolve().parents[2]
CAST_ID = "c_0123456789abcdef01234567"
TOKEN = "ghs_" + "A1b2.C3d4_" * 52  # the 2026 installation token shape: ~520 chars, with dots
HOSTILE = f"@everyone <img src=x onerror=alert(1)> #1 [x](javascript:alert(1)) {TOKEN}\n# Title"
CODE_SPAN = re.compile(r"(`+).*?\1")


def live_mentions(markdown: str) -> list[str]:
    """@-mentions and #-references GitHub would link, outside code spans."""
    prose = CODE_SPAN.sub("", markdown)
    return re.findall(r"[@#][A-Za-z0-9]", prose)


def comment(**kw: Any) -> str:
    args: dict[str, Any] = {"cast_id": CAST_ID, "spell_id": "acme.hello", "status": "succeeded"}
    args.update(kw)
    return render_cast_comment(**args)


# ---------------------------------------------------------------------------------- templates


def test_templates_are_the_repos_files() -> None:
    assert templates_dir() == ROOT / "templates"
    assert (templates_dir() / "comments" / "cast.md").is_file()


def test_the_templates_folder_can_be_overridden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(ROOT / "templates" / "comments", tmp_path / "comments")
    (tmp_path / "comments" / "permission_denied.md").write_text("No: $login lacks $needed.\n")
    monkeypatch.setenv(TEMPLATES_ENV, str(tmp_path))
    assert templates_dir() == tmp_path
    assert render_permission_denied("octocat", "admin") == "No: `octocat` lacks admin."


def test_a_missing_template_names_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEMPLATES_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=TEMPLATES_ENV):
        render_permission_denied("octocat", "write")


# ---------------------------------------------------------------------------------- cast comment


def test_the_cast_comment_starts_with_its_marker() -> None:
    body = comment(run_url="https://github.com/o/r/actions/runs/9", cost_cents=125)
    assert body.startswith(f"<!-- spell-cast:{CAST_ID} -->\n")
    assert find_cast_marker(body) == CAST_ID
    assert "[workflow run](https://github.com/o/r/actions/runs/9)" in body
    assert "1.25 USD" in body and "✅" in body and "`acme.hello`" in body


def test_without_the_marker_there_is_nothing_to_find() -> None:
    body = comment(marker=False)
    assert find_cast_marker(body) is None
    assert not body.startswith("\n")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(None, id="none"),
        pytest.param("", id="empty"),
        pytest.param("<!-- spell-cast:c_123 -->", id="short-id"),
        pytest.param("<!-- spell-cast:C_0123456789ABCDEF01234567 -->", id="uppercase"),
    ],
)
def test_find_cast_marker_needs_a_real_cast_id(body: str | None) -> None:
    assert find_cast_marker(body) is None


def test_a_marker_needs_a_real_cast_id() -> None:
    with pytest.raises(ValueError, match="cast id"):
        comment(cast_id="c_1 --> <b>x</b>")


@pytest.mark.parametrize(("status", "emoji_label"), list(STATUSES.items()))
def test_each_status_has_its_emoji(status: str, emoji_label: tuple[str, str]) -> None:
    emoji, label = emoji_label
    body = comment(status=status)
    assert f"{emoji} **Cast {label}**" in body


def test_an_unknown_status_is_shown_escaped() -> None:
    body = comment(status="<weird>")
    assert "❔" in body and "&lt;weird&gt;" in body and "<weird>" not in body


def test_hostile_error_text_cannot_ping_inject_html_or_leak_tokens() -> None:
    body = comment(status="failed", error_code="TIMEOUT", error_message=HOSTILE)
    assert "`TIMEOUT`" in body
    assert live_mentions(body) == []
    assert "<img" not in body and "](javascript:" not in body
    assert TOKEN not in body and "ghs_" not in body
    assert not any(line.startswith("# ") or line.startswith("#\u200d") for line in body.split("\n"))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "https://github.com/o/r/actions/runs/1", "https://github.com/o/r/actions/runs/1"
        ),
        pytest.param("http://localhost:8080/a?b=1", "http://localhost:8080/a?b=1", id="port-query"),
        pytest.param("https://x.test/a?token=s3cr3t&page=2", "https://x.test/a?page=2", id="token"),
        pytest.param("https://x.test/a?sig=abc&X-Amz-Signature=d", "https://x.test/a", id="signed"),
        pytest.param("https://user:pw@x.test/a", "https://x.test/a", id="userinfo"),
        pytest.param("https://x.test/a#frag", "https://x.test/a", id="fragment"),
        pytest.param("https://x.test/a(b)", "https://x.test/a%28b%29", id="parens"),
        pytest.param("https://x.test/é", "https://x.test/%C3%A9", id="unicode"),
        pytest.param(f"https://x.test/{TOKEN}/zip", None, id="token-in-path"),
        pytest.param("javascript:alert(1)", None, id="javascript"),
        pytest.param("data:text/html,<b>", None, id="data"),
        pytest.param("//x.test/a", None, id="relative"),
        pytest.param("https://x.test/a b", None, id="space"),
        pytest.param("https://x.test:99999/", None, id="bad-port"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="none"),
    ],
)
def test_links_are_safe(url: str | None, expected: str | None) -> None:
    assert safe_url(url) == expected


def test_an_unsafe_link_is_not_rendered() -> None:
    body = comment(
        run_url="javascript:alert(1)", artifact_url=f"https://x.test/dl?access_token={TOKEN}"
    )
    assert "javascript" not in body and TOKEN not in body
    assert "[download](https://x.test/dl)" in body


@pytest.mark.parametrize(
    ("cents", "currency", "text"),
    [
        pytest.param(5, "USD", "0.05 USD", id="cents"),
        pytest.param(123456, "EUR", "1,234.56 EUR", id="thousands"),
        pytest.param(-250, "USD", "-2.50 USD", id="refund"),
        pytest.param(500, "JPY", "500 JPY", id="zero-decimal"),
        pytest.param(1500, "KWD", "1.500 KWD", id="three-decimal"),
        pytest.param(0, "usd", "0.00 USD", id="lowercase-code"),
    ],
)
def test_money_is_formatted_from_integer_minor_units(cents: int, currency: str, text: str) -> None:
    assert format_money(cents, currency) == text


# ---------------------------------------------------------------------------------- check runs


def test_check_run_output_has_title_summary_and_text() -> None:
    out = render_check_run(
        cast_id=CAST_ID,
        spell_id="acme.hello",
        status="failed",
        error_code="SPELL_FAILED",
        error_message=HOSTILE,
        cost_cents=0,
    )
    assert set(out) == {"title", "summary", "text"}
    assert out["title"] == "acme.hello: failed"
    assert "❌" in out["summary"] and "0.00 USD" in out["summary"]
    assert "`SPELL_FAILED`" in out["text"] and TOKEN not in out["text"]
    assert live_mentions(out["text"]) == []
    assert find_cast_marker(out["text"]) is None


@pytest.mark.parametrize(
    ("status", "state"),
    [
        pytest.param("queued", ("queued", None)),
        pytest.param("running", ("in_progress", None)),
        pytest.param("succeeded", ("completed", "success")),
        pytest.param("failed", ("completed", "failure")),
        pytest.param("timed_out", ("completed", "timed_out")),
        pytest.param("mystery", ("completed", "neutral")),
    ],
)
def test_check_run_state(status: str, state: tuple[str, str | None]) -> None:
    assert check_run_state(status) == state


# ---------------------------------------------------------------------------------- replies


def test_link_help_shows_the_operator_command() -> None:
    text = render_link_help("octo-cat")
    assert "spell github link --account ACME --user octo-cat" in text
    assert "Replace `ACME`" in text
    named = render_link_help("octo-cat", account="acct_7")
    assert "--account acct_7 --user octo-cat" in named and "Replace" not in named


def test_link_help_never_puts_an_odd_login_into_the_command() -> None:
    text = render_link_help("x\n```\n@everyone")
    assert "\n```\nspell github link --account ACME --user LOGIN\n```\n" in text
    assert live_mentions(text) == []


def test_permission_denied_names_the_permission() -> None:
    text = render_permission_denied("octocat", "write")
    assert "`octocat`" in text and "**write**" in text
    assert live_mentions(text) == []


SPELL = {
    "id": "acme.hello",
    "name": "Hello | @team",
    "description": "Says <b>hi</b>\n# loudly",
    "price": {"model": "flat", "cents": 5, "currency": "USD"},
}


def test_spells_are_listed_as_a_table() -> None:
    text = render_spells_list([SPELL], query="hi")
    assert "matching `hi`" in text
    row = next(line for line in text.split("\n") if "acme.hello" in line)
    assert row.startswith("| `acme.hello` | Hello \\| @\u200dteam | 0.05 USD per cast |")
    assert row.count(" | ") == 3  # the pipe in the name did not add a column
    assert "<b>" not in text and live_mentions(text) == []


def test_a_long_spell_list_is_cut() -> None:
    items = [{**SPELL, "id": f"acme.s{i}"} for i in range(25)]
    text = render_spells_list(items)
    assert text.count("| `acme.s") == 20 and "Showing the first 20" in text


def test_no_spells_found() -> None:
    text = render_spells_list([], query="zzz")
    assert "No spells found matching `zzz`" in text


def test_caps_are_shown() -> None:
    view = {
        "account": "acct_1",
        "period": "2026-11",
        "monthly": {
            "cap_cents": 1000,
            "used_cents": 250,
            "reserved_cents": 50,
            "remaining_cents": 700,
        },
        "total": {
            "cap_cents": None,
            "used_cents": 250,
            "reserved_cents": 50,
            "remaining_cents": None,
        },
        "monthly_resets_in": 3 * 86_400 + 7200,
    }
    text = render_cap(view)
    assert "| Monthly | 10.00 USD | 2.50 USD | 0.50 USD | 7.00 USD |" in text
    assert "| Total | no cap | 2.50 USD | 0.50 USD | unlimited |" in text
    assert "3 d 2 h" in text and "`acct_1`" in text


def test_a_command_error_keeps_code_and_escapes_the_rest() -> None:
    [err] = parse_comment("/cast acme.hello x`@org/team`<b>")
    assert isinstance(err, CommandError)
    text = render_command_error(err)
    assert text.startswith("⚠️ I could not read the command on line 1: expected `key=value`")
    assert "`x'@org/team'<b>`" in text  # inside a code span: shown, not rendered
    assert live_mentions(text) == [] and "<b>" not in CODE_SPAN.sub("", text)


@given(st.text(max_size=200))
def test_error_replies_for_any_input_are_inert(rest: str) -> None:
    for item in parse_comment("/cast acme.hello " + rest.replace("\n", " ")):
        if isinstance(item, CommandError):
            text = render_command_error(item)
            assert live_mentions(text) == []
            assert "<b" not in CODE_SPAN.sub("", text).replace("<details>", "").replace(
                "<summary>", ""
            ).replace("</summary>", "").replace("</details>", "")


@given(st.text(max_size=300))
def test_escaped_text_is_inert(text: str) -> None:
    out = escape_markdown(text)
    assert "<" not in out and ">" not in out and "\n" not in out
    assert live_mentions(out) == []


@given(st.text(max_size=100))
def test_code_spans_hold_any_text(text: str) -> None:
    out = code(text, in_table=False)
    assert "\n" not in out
    fence = re.match(r"`+", out)
    assert out == "—" or (fence and out.endswith(fence.group(0)))


def test_unbalanced_messages_are_escaped_whole() -> None:
    assert message_markdown("a `b") == "a \\`b"


def test_no_bot_text_reads_as_a_command() -> None:
    """The App ignores its own comments anyway; its text should not look like commands either."""
    texts = [
        comment(status="failed", error_message="/cast acme.evil"),
        render_link_help("octocat"),
        render_permission_denied("octocat", "write"),
        render_spells_list([SPELL]),
        render_spells_list([]),
        render_command_error(CommandError(1, "`/cast` needs a spell id")),
    ]
    for text in texts:
        assert parse_comment(text) == []
