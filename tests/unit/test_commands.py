"""The slash-command grammar: examples, then properties (round trip, never raises, bounded)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.domain.commands import (
    KEY_RE,
    MAX_BODY_CHARS,
    CapCommand,
    CastCommand,
    CastStatusCommand,
    Command,
    CommandError,
    SpellsCommand,
    format_cast_command,
    format_command,
    parse_comment,
)

CAST_ID = "c_0123456789abcdef01234567"


def cast(
    spell_id: str = "acme.hello",
    *,
    version: str | None = None,
    mode: str | None = None,
    line: int = 1,
    **inp: Any,
) -> CastCommand:
    return CastCommand(spell_id, version, inp, mode, line)


def error_on(line: int, *fragments: str) -> tuple[int, tuple[str, ...]]:
    return line, fragments


# ---------------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param("/cast acme.hello", [cast()], id="cast-bare"),
        pytest.param("  \t/cast acme.hello", [cast()], id="leading-whitespace"),
        pytest.param("/cast acme.hello@1.2.0", [cast(version="1.2.0")], id="version"),
        pytest.param(
            "/cast acme.hello@1.0.0-rc.1+b5", [cast(version="1.0.0-rc.1+b5")], id="semver-pre"
        ),
        pytest.param("/cast acme.hello name=world", [cast(name="world")], id="bare-word"),
        pytest.param(
            '/cast acme.hello name="hello world"', [cast(name="hello world")], id="double-quoted"
        ),
        pytest.param("/cast acme.hello msg='it\\'s'", [cast(msg="it's")], id="escaped-quote"),
        pytest.param(
            '/cast acme.hello s="a\\"b\\\\c\\nd"', [cast(s='a"b\\c\nd')], id="escapes-in-quotes"
        ),
        pytest.param('/cast acme.hello p="C:\\dir"', [cast(p="C:\\dir")], id="unknown-escape-kept"),
        pytest.param(
            "/cast acme.hello n=3 ok=true off=false x=null f=1.5 neg=-2",
            [cast(n=3, ok=True, off=False, x=None, f=1.5, neg=-2)],
            id="json-scalars",
        ),
        pytest.param(
            '/cast acme.hello n="3" ok="true"', [cast(n="3", ok="true")], id="quoted-is-string"
        ),
        pytest.param(
            '/cast acme.hello tags=["a","b"] cfg={"k":{"n":1}}',
            [cast(tags=["a", "b"], cfg={"k": {"n": 1}})],
            id="json-array-object",
        ),
        pytest.param(
            '/cast acme.hello tags=["a b", "c"] z=1',
            [cast(tags=["a b", "c"], z=1)],
            id="json-with-spaces",
        ),
        pytest.param(
            "/cast acme.hello ref=main url=https://x.test/?a=b v=007 w=NaN",
            [cast(ref="main", url="https://x.test/?a=b", v="007", w="NaN")],
            id="non-json-bare-is-string",
        ),
        pytest.param("/cast acme.hello empty=", [cast(empty="")], id="empty-value"),
        pytest.param('/cast acme.hello e=""', [cast(e="")], id="empty-quoted"),
        pytest.param(
            "/cast acme.hello a.b-c_d=1 _x=2", [cast(**{"a.b-c_d": 1, "_x": 2})], id="key-chars"
        ),
        pytest.param("/cast acme.hello name=Zoë 🎉=no", None, id="unicode-key-rejected"),
        pytest.param("/cast acme.hello name=Zoë", [cast(name="Zoë")], id="unicode-value"),
        pytest.param(
            "/cast acme.hello --mode=service a=1",
            [cast(mode="service", a=1)],
            id="mode-flag",
        ),
        pytest.param(
            "/cast --mode=workflow acme.hello",
            [cast(mode="workflow")],
            id="mode-before-spell",
        ),
        pytest.param(
            "/cast acme.hello mode=fast",
            [CastCommand("acme.hello", None, {"mode": "fast"}, None, 1)],
            id="mode-key-is-input",
        ),
        pytest.param("/cast acme.hello\r\n/cap\r\n", [cast(), CapCommand()], id="crlf"),
        pytest.param("/spells", [SpellsCommand("")], id="spells-all"),
        pytest.param("/spells  pdf   report ", [SpellsCommand("pdf report")], id="spells-query"),
        pytest.param(f"/cast-status {CAST_ID}", [CastStatusCommand(CAST_ID)], id="cast-status"),
        pytest.param("/cap", [CapCommand()], id="cap"),
        pytest.param(
            "Thanks!\n/cast acme.hello\nand then\n/cap",
            [cast(line=2), CapCommand()],
            id="among-prose",
        ),
        pytest.param("/lgtm\n/Cast acme.hello\n/casting x\n/cast-foo", [], id="not-ours"),
        pytest.param("please /cast acme.hello", [], id="not-at-line-start"),
        pytest.param("`/cast acme.hello`", [], id="inline-code"),
        pytest.param("> /cast acme.hello", [], id="quoted"),
        pytest.param(">/cast acme.hello\n>> /cast acme.hello", [], id="quoted-no-space"),
        pytest.param("```\n/cast acme.hello\n```", [], id="fenced"),
        pytest.param("~~~ sh\n/cast acme.hello\n~~~", [], id="tilde-fenced"),
        pytest.param(
            "````\n```\n/cast acme.hello\n````\n/cap", [CapCommand()], id="longer-fence-closes"
        ),
        pytest.param("```\n/cast acme.hello", [], id="unclosed-fence-runs-to-end"),
        pytest.param("```not a fence```\n/cap", [CapCommand()], id="inline-triple-backticks"),
        pytest.param("<!--\n/cast acme.hello\n-->\n/cap", [CapCommand()], id="html-comment"),
        pytest.param("Hi <!-- note\n/cast acme.hello\n-->", [], id="html-comment-mid-line"),
    ],
)
def test_examples(body: str, expected: list[Command] | None) -> None:
    result = parse_comment(body)
    if expected is None:
        assert len(result) == 1 and isinstance(result[0], CommandError)
    else:
        assert result == expected


JSON_BLOCK_BODY = """/cast acme.report year=2026 --mode=workflow

```json
{"year": 2025, "tz": "UTC", "opts": {"pdf": true}}
```
/cap"""


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            JSON_BLOCK_BODY,
            [
                cast("acme.report", mode="workflow", year=2026, tz="UTC", opts={"pdf": True}),
                CapCommand(),
            ],
            id="line-overrides-block",
        ),
        pytest.param(
            '/cast acme.hello\n```JSON\n{"a": [1, 2]}\n```',
            [cast(a=[1, 2])],
            id="uppercase-info",
        ),
        pytest.param(
            '/cast acme.hello opts=1\n```json\n{"opts": {"x": 1, "y": 2}}\n```',
            [cast(opts=1)],
            id="replaces-not-deep-merges",
        ),
        pytest.param(
            '/cast acme.hello\n```json\n{"odd key": 1, "/cast evil.spell": 2}\n```',
            [cast(**{"odd key": 1, "/cast evil.spell": 2})],
            id="any-json-keys",
        ),
        pytest.param(
            '/cast acme.hello\n```json\n{"a": 1}\n```\n```json\n{"b": 2}\n```',
            [cast(a=1)],
            id="only-the-first-block",
        ),
        pytest.param(
            '/cast acme.hello\nsome words\n```json\n{"a": 1}\n```',
            [cast()],
            id="block-after-prose-is-not-input",
        ),
        pytest.param(
            "/cast acme.hello\n```yaml\na: 1\n```",
            [cast()],
            id="other-language-block-ignored",
        ),
        pytest.param(
            "/cast acme.hello\n```json\n/cast other.spell\n```",
            [CommandError(1, "")],
            id="block-content-is-not-a-command",
        ),
    ],
)
def test_json_block(body: str, expected: list[Command | CommandError]) -> None:
    result = parse_comment(body)
    assert len(result) == len(expected)
    for got, want in zip(result, expected, strict=True):
        if isinstance(want, CommandError):
            assert isinstance(got, CommandError) and got.line == want.line
        else:
            assert got == want


@pytest.mark.parametrize(
    ("body", "line", "fragments"),
    [
        pytest.param("/cast", 1, ("needs a spell id", "/cast acme.hello"), id="no-spell"),
        pytest.param("/cast   \t", 1, ("needs a spell id",), id="only-spaces"),
        pytest.param("/cast a=1", 1, ("needs a spell id",), id="pairs-without-spell"),
        pytest.param("/cast Hello", 1, ("`Hello` is not a spell id",), id="bad-spell-id"),
        pytest.param("/cast hello", 1, ("is not a spell id",), id="spell-id-without-dot"),
        pytest.param("/cast acme.hello@", 1, ("a version must follow",), id="empty-version"),
        pytest.param("/cast acme.hello@1.2", 1, ("`1.2` is not a version",), id="bad-version"),
        pytest.param("/cast acme.hello a=1 a=2", 1, ("`a` is given twice",), id="duplicate-key"),
        pytest.param("/cast acme.hello world", 1, ("expected `key=value`",), id="bare-positional"),
        pytest.param("/cast acme.hello 9a=1", 1, ("`9a` is not a valid key",), id="bad-key"),
        pytest.param("/cast acme.hello a-=1 b+c=2", 1, ("`b+c` is not a valid key",), id="plus"),
        pytest.param('/cast acme.hello a="x', 1, ('no closing `"`',), id="unterminated-double"),
        pytest.param("/cast acme.hello a='x", 1, ("no closing `'`",), id="unterminated-single"),
        pytest.param('/cast acme.hello a="x"y', 1, ("after the closing quote",), id="text-after"),
        pytest.param("/cast acme.hello a=it's", 1, ("stray quote",), id="stray-quote"),
        pytest.param("/cast acme.hello a=[1,", 1, ("not valid JSON",), id="broken-json-value"),
        pytest.param("/cast acme.hello a={'k':1}", 1, ("not valid JSON",), id="python-dict"),
        pytest.param("/cast acme.hello a=[1] a=2", 1, ("given twice",), id="dup-after-json"),
        pytest.param("/cast acme.hello --force", 1, ("unknown flag `--force`",), id="bad-flag"),
        pytest.param("/cast acme.hello --mode=clone", 1, ("--mode=service",), id="bad-mode"),
        pytest.param("/cast acme.hello --mode", 1, ("--mode=workflow",), id="mode-no-value"),
        pytest.param(
            "/cast acme.hello --mode=service --mode=service", 1, ("twice",), id="mode-twice"
        ),
        pytest.param(
            '/cast acme.hello\n```json\n{"a": }\n```', 1, ("not valid JSON", "line 3"), id="bj"
        ),
        pytest.param(
            "/cast acme.hello\n```json\n[1, 2]\n```", 1, ("must be a JSON object",), id="array"
        ),
        pytest.param(
            '/cast acme.hello\n```json\n{"a": 1, "a": 2}\n```', 1, ("`a` twice",), id="dup-json"
        ),
        pytest.param(
            '/cast acme.hello\n```json\n{"a": NaN}\n```', 1, ("`NaN` is not allowed",), id="nan"
        ),
        pytest.param(
            '/cast acme.hello\n```json\n{"a": 1}', 1, ("is not closed",), id="unclosed-block"
        ),
        pytest.param("x\n/cast-status", 2, ("needs a cast id",), id="status-no-id"),
        pytest.param("/cast-status c_123", 1, ("not a cast id",), id="status-bad-id"),
        pytest.param(f"/cast-status {CAST_ID} x", 1, ("exactly one",), id="status-two-ids"),
        pytest.param("/cap now", 1, ("takes no arguments",), id="cap-args"),
        pytest.param("/spells " + "x" * 300, 1, ("too long",), id="query-too-long"),
    ],
)
def test_errors_explain_themselves(body: str, line: int, fragments: tuple[str, ...]) -> None:
    [err] = parse_comment(body)
    assert isinstance(err, CommandError)
    assert err.line == line
    for fragment in fragments:
        assert fragment in err.message


def test_an_error_does_not_stop_the_other_commands() -> None:
    result = parse_comment("/cast\n/cap")
    assert isinstance(result[0], CommandError) and result[1] == CapCommand()


def test_commands_beyond_the_limit_are_ignored() -> None:
    body = "\n".join(f"/cast acme.hello n={i}" for i in range(10))
    result = parse_comment(body, max_commands=3)
    assert result == [cast(n=0, line=1), cast(n=1, line=2), cast(n=2, line=3)]
    assert parse_comment(body, max_commands=0) == []
    assert len(parse_comment(body)) == 5


def test_errors_count_towards_the_limit() -> None:
    assert len(parse_comment("/cast\n" * 10, max_commands=2)) == 2


def test_an_oversized_body_is_cut_at_a_full_line() -> None:
    head = "x" * (MAX_BODY_CHARS - 30) + "\n"
    body = head + "/cast acme.hello n=1234567890123456789012345678901234567890"
    assert parse_comment(body) == []  # the cut line is dropped, never cast with a partial value
    assert parse_comment(head + "/cap") == [CapCommand()]


def test_format_writes_odd_keys_as_a_json_block() -> None:
    cmd = cast(**{"odd key": "v"})
    text = format_cast_command(cmd)
    assert "```json" in text
    assert parse_comment(text) == [cmd]


@pytest.mark.parametrize(
    "cmd",
    [
        pytest.param(SpellsCommand(""), id="spells"),
        pytest.param(SpellsCommand("pdf report"), id="spells-query"),
        pytest.param(CastStatusCommand(CAST_ID), id="status"),
        pytest.param(CapCommand(), id="cap"),
        pytest.param(cast(version="2.0.0", mode="service", a="x y"), id="cast"),
    ],
)
def test_format_command_round_trips(cmd: Command) -> None:
    assert parse_comment(format_command(cmd)) == [cmd]


# ---------------------------------------------------------------------------------- properties

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
line_keys = st.from_regex(KEY_RE.pattern, fullmatch=True).filter(lambda k: len(k) <= 24)
spell_ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,8}(\.[a-z0-9][a-z0-9-]{0,8}){1,3}", fullmatch=True)
versions = st.none() | st.builds(
    lambda a, b, c, pre: f"{a}.{b}.{c}{pre}",
    st.integers(0, 99),
    st.integers(0, 99),
    st.integers(0, 99),
    st.sampled_from(["", "-rc.1", "-alpha", "+build.5"]),
)
tricky_text = st.text(
    alphabet=st.sampled_from([*" \t\"'\\=[]{}`~>#@\n\r-é🎉/,:", "\u2028", "\x00", "\x85"]),
    max_size=12,
)
cast_commands = st.builds(
    CastCommand,
    spell_id=spell_ids,
    version=versions,
    input=st.dictionaries(line_keys, json_values | tricky_text, max_size=6)
    | st.dictionaries(st.text(max_size=10), json_values, max_size=4),
    mode=st.sampled_from([None, "workflow", "service"]),
    line=st.just(1),
)


@given(cast_commands)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_format_then_parse_is_the_identity(cmd: CastCommand) -> None:
    assert parse_comment(format_cast_command(cmd)) == [cmd]


@given(cast_commands)
def test_parse_keeps_json_types(cmd: CastCommand) -> None:
    [parsed] = parse_comment(format_cast_command(cmd))
    assert isinstance(parsed, CastCommand)
    # Equal *and* the same JSON (so True did not become 1, nor "3" become 3).
    assert json.dumps(parsed.input, sort_keys=True) == json.dumps(cmd.input, sort_keys=True)


@given(
    cast_commands,
    st.sampled_from(
        [("```", "```"), ("`````", "`````"), ("````sh", "````"), ("~~~", "~~~"), ("~~~~ x", "~~~~")]
    ),
)
def test_fenced_commands_are_ignored(cmd: CastCommand, fence: tuple[str, str]) -> None:
    opening, closing = fence
    body = f"Here is how:\n{opening}\n{format_cast_command(cmd)}\n{closing}\n"
    assert parse_comment(body) == []


@given(cast_commands, st.sampled_from(["> ", ">", "  > ", "> > "]))
def test_quoted_commands_are_ignored(cmd: CastCommand, prefix: str) -> None:
    quoted = "\n".join(prefix + ln for ln in format_cast_command(cmd).split("\n"))
    assert parse_comment(f"Someone wrote:\n{quoted}\n\nNo thanks.") == []


@given(st.text())
def test_parse_never_raises(body: str) -> None:
    result = parse_comment(body)
    assert len(result) <= 5


command_words = st.sampled_from(
    ["/cast ", "/cast acme.hello ", "/spells ", "/cast-status ", "/cap"]
)


@given(st.lists(st.tuples(command_words, tricky_text), max_size=8))
def test_parse_never_raises_on_command_like_lines(lines: list[tuple[str, str]]) -> None:
    body = "\n".join(word + rest for word, rest in lines)
    for item in parse_comment(body, max_commands=10):
        if isinstance(item, CommandError):
            assert item.message
            # Messages keep their `code` spans balanced, so renderers can rely on them.
            assert item.message.count("`") % 2 == 0


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('/cast acme.hello x="' + '\\"' * 30_000, id="escaped-quotes"),
        pytest.param("/cast acme.hello x=" + '"' * 60_000, id="quotes"),
        pytest.param("/cast acme.hello x=" + "\\" * 60_000, id="backslashes"),
        pytest.param("/cast acme.hello x=" + "[" * 60_000, id="open-brackets"),
        pytest.param("/cast acme.hello x=" + '["' * 30_000, id="brackets-and-quotes"),
        pytest.param("/cast acme.hello " + 'a="x" ' * 10_000, id="many-pairs-duplicate"),
        pytest.param(
            "/cast acme.hello " + " ".join(f"k{i}=1" for i in range(8_000)), id="many-pairs"
        ),
        pytest.param("/cast acme.hello\n```json\n" + "[" * 60_000 + "\n```", id="deep-json"),
        pytest.param("/cast acme.hello\n```json\n" + "{" * 60_000, id="unclosed-deep-json"),
        pytest.param("```\n" * 30_000, id="many-fences"),
        pytest.param("/lgtm x\n" * 8_000, id="many-foreign-commands"),
        pytest.param("/cast acme.hello\n\n" * 20_000, id="many-casts-and-blank-lines"),
        pytest.param("\n" * 60_000 + "/cast acme.hello", id="blank-lines"),
        pytest.param("/cast acme.hello x=" + "1" * 60_000, id="huge-integer"),
        pytest.param("<!--" * 16_000, id="html-comment-openers"),
    ],
)
def test_adversarial_input_completes(body: str) -> None:
    result = parse_comment(body)  # completes (linear scan), and without raising
    assert len(result) <= 5
