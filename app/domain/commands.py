"""The slash-command grammar of issue and pull-request comments (issue 3, item 7). Pure code.

A comment is read line by line. A command is a line that starts (after optional spaces/tabs) with
one of our command words; everything else is conversation::

    /cast <spell-id>[@<version>] [--mode=workflow|service] [key=value ...]
    /spells [query words]
    /cast-status <cast-id>
    /cap

Lines that are *not* commands, even when they start with a command word:

* lines inside fenced code blocks (```` ``` ```` or ``~~~``, CommonMark rules: a fence is closed by
  the same character repeated at least as often; an unclosed fence runs to the end of the comment);
* quoted lines (starting with ``>``) — replying to someone who wrote ``/cast`` must not cast again;
* lines inside an HTML comment block (``<!--`` … ``-->`` starting at the line start): they are
  invisible in the rendered comment, so nobody reading it would know a spell was cast;
* unknown slash words (``/lgtm``, ``/Cast``, ``/casting``): not ours, ignored without an error.

``/cast`` arguments, separated by spaces or tabs:

* ``key=value`` — keys match ``[A-Za-z_][A-Za-z0-9_.-]*`` (a dot is part of the name, there is no
  nesting); a key given twice is an error.
* Quoted values (``"…"`` or ``'…'``) are always strings. Inside quotes a backslash escapes the
  quote characters and itself, and ``\\n``, ``\\t``, ``\\r`` mean newline, tab and carriage return;
  any other backslash is kept as written (``"C:\\dir"`` stays ``C:\\dir``).
* Bare values (no quotes) run to the next space. A bare value that is a JSON scalar is parsed as
  JSON (``n=3`` → ``3``, ``ok=true`` → ``True``, ``x=null`` → ``None``); anything else is a string
  (``ref=main``, ``url=https://x?a=b``). A bare value that starts with ``[`` or ``{`` must be valid
  JSON and is parsed as an array/object; it may contain spaces inside JSON strings
  (``tags=["a b","c"]``). Quote characters elsewhere in a bare value are an error (quote the whole
  value instead), so a mistyped quote never silently becomes part of the input.
* ``--mode=workflow`` / ``--mode=service`` choose the execution mode. It is passed separately
  (:attr:`CastCommand.mode`), never inside the input; ``mode=...`` without dashes is an ordinary
  input key. Any other ``--flag`` is an error.

**Structured input.** A fenced block whose info string is ``json`` (any case) directly after the
``/cast`` line — or after blank lines only — supplies the input as a JSON object.

**Merge rule.** The JSON block is the base and the ``key=value`` pairs on the command line are
applied on top of it, top-level keys only: a pair *replaces* the block's value for that key
wholesale (no deep merge — keys do not nest). So a block can hold the bulk of the input and the
line tweaks one field: ``/cast acme.report year=2026`` followed by a block
``{"year": 2025, "tz": "UTC"}`` casts with ``{"year": 2026, "tz": "UTC"}``. Duplicate keys
inside the block are an error, as on the line.

A line that starts with one of our command words but does not parse becomes a
:class:`CommandError` whose message can be posted back as a reply. Parsing is linear in the size
of the comment (a hand-written scanner, no backtracking regexes) and never raises.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

from app.domain.spells import SEMVER_RE, SPELL_ID_RE

#: GitHub's limit on a comment body; longer bodies are cut at the last full line before it.
MAX_BODY_CHARS: Final = 65_536
#: Commands read from one comment; the rest are ignored.
DEFAULT_MAX_COMMANDS: Final = 5
MAX_QUERY_CHARS: Final = 256
MAX_SPELL_ID_CHARS: Final = 128
MAX_VERSION_CHARS: Final = 64

MODES: Final = ("workflow", "service")
CAST_ID_RE: Final = re.compile(r"c_[0-9a-f]{24}")
KEY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_SPELL_ID = re.compile(SPELL_ID_RE)

_WS: Final = " \t"
_KEY_START: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_KEY_CHARS: Final = _KEY_START | frozenset("0123456789.-")
_ESCAPES: Final = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
_EXAMPLE: Final = "e.g. `/cast acme.hello name=world`"


@dataclass(frozen=True, slots=True)
class CastCommand:
    spell_id: str
    version: str | None
    input: dict[str, Any]
    mode: str | None
    line: int


@dataclass(frozen=True, slots=True)
class SpellsCommand:
    query: str


@dataclass(frozen=True, slots=True)
class CastStatusCommand:
    cast_id: str


@dataclass(frozen=True, slots=True)
class CapCommand:
    pass


@dataclass(frozen=True, slots=True)
class CommandError:
    """A line that looks like one of our commands but does not parse; ``message`` is for humans."""

    line: int
    message: str


Command = CastCommand | SpellsCommand | CastStatusCommand | CapCommand


class _Fail(Exception):
    """Internal: a parse error on the current command (turned into a CommandError)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ---------------------------------------------------------------------------------- lines


@dataclass(slots=True)
class _Fence:
    char: str
    length: int


def _fence_open(line: str) -> tuple[_Fence, str] | None:
    """``(fence, info string)`` if ``line`` opens a fenced code block."""
    s = line.lstrip(_WS)
    if not s or s[0] not in "`~":
        return None
    ch = s[0]
    n = len(s) - len(s.lstrip(ch))
    if n < 3:
        return None
    info = s[n:].strip()
    if ch == "`" and "`" in info:  # ```foo``` on one line is inline code, not a fence
        return None
    return _Fence(ch, n), info


def _fence_closes(line: str, fence: _Fence) -> bool:
    s = line.lstrip(_WS)
    n = len(s) - len(s.lstrip(fence.char))
    return n >= fence.length and not s[n:].strip()


def _lines(body: str) -> list[str]:
    if len(body) > MAX_BODY_CHARS:
        cut = body.rfind("\n", 0, MAX_BODY_CHARS + 1)
        body = body[:cut] if cut >= 0 else ""
    # Split on "\n" only (str.splitlines would also split on \v, \x1c, \u2028… inside values).
    return [ln[:-1] if ln.endswith("\r") else ln for ln in body.split("\n")]


# ---------------------------------------------------------------------------------- parsing


def parse_comment(
    body: str, *, max_commands: int = DEFAULT_MAX_COMMANDS
) -> list[Command | CommandError]:
    """The commands (and malformed command lines) of a comment, in order, at most ``max_commands``.

    Never raises; runs in time linear in ``len(body)`` (bodies over 65,536 characters are cut at
    the last full line before that limit).
    """
    out: list[Command | CommandError] = []
    if max_commands <= 0:
        return out
    lines = _lines(body)
    fence: _Fence | None = None
    in_html_comment = False
    i = 0
    while i < len(lines) and len(out) < max_commands:
        line = lines[i]
        i += 1
        if fence is not None:
            if _fence_closes(line, fence):
                fence = None
            continue
        stripped = line.lstrip(_WS)
        if in_html_comment:
            in_html_comment = "-->" not in line
            continue
        if stripped.startswith(">"):
            continue
        if stripped.startswith("<!--"):
            in_html_comment = "-->" not in stripped[4:]
            continue
        opened = _fence_open(line)
        if opened is not None:
            fence = opened[0]
            continue
        if not stripped.startswith("/"):
            # An HTML comment opened mid-line hides the lines after it, too.
            opens = line.rfind("<!--")
            in_html_comment = opens >= 0 and "-->" not in line[opens + 4 :]
            continue
        word_end = _scan_to_ws(stripped, 0)
        word, rest = stripped[:word_end], stripped[word_end:]
        lineno = i  # 1-based number of the line just read
        try:
            if word == "/cast":
                cmd, i = _parse_cast(rest, lineno, lines, i)
                out.append(cmd)
            elif word == "/spells":
                out.append(_parse_spells(rest))
            elif word == "/cast-status":
                out.append(_parse_cast_status(rest))
            elif word == "/cap":
                if rest.strip(_WS):
                    raise _Fail("`/cap` takes no arguments: it shows your spending caps")
                out.append(CapCommand())
            # any other /word is someone else's command
        except _Fail as e:
            out.append(CommandError(lineno, e.message))
    return out


def _scan_to_ws(s: str, pos: int) -> int:
    n = len(s)
    while pos < n and s[pos] not in _WS:
        pos += 1
    return pos


def _skip_ws(s: str, pos: int) -> int:
    n = len(s)
    while pos < n and s[pos] in _WS:
        pos += 1
    return pos


def _show(text: str, limit: int = 40) -> str:
    """A fragment of user text for an error message: one line, shortened, and without backticks,
    so that the message's own `code` spans stay balanced (renderers rely on it)."""
    text = text.replace("\n", " ").replace("\r", " ").replace("`", "'")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _parse_spells(rest: str) -> SpellsCommand:
    query = " ".join(rest.split())
    if len(query) > MAX_QUERY_CHARS:
        raise _Fail(f"the `/spells` query is too long (at most {MAX_QUERY_CHARS} characters)")
    return SpellsCommand(query)


def _parse_cast_status(rest: str) -> CastStatusCommand:
    args = rest.split()
    if not args:
        raise _Fail(
            "`/cast-status` needs a cast id, e.g. `/cast-status c_0123456789abcdef01234567`"
        )
    if len(args) > 1:
        raise _Fail("`/cast-status` takes exactly one cast id")
    if not CAST_ID_RE.fullmatch(args[0]):
        raise _Fail(
            f"`{_show(args[0])}` is not a cast id: cast ids are `c_` followed by 24 hex digits"
        )
    return CastStatusCommand(args[0])


def _parse_cast(
    rest: str, lineno: int, lines: list[str], next_index: int
) -> tuple[CastCommand | CommandError, int]:
    """Parse ``/cast`` arguments and its optional JSON block; returns the index of the next line."""
    block, after_block = _json_block(lines, next_index)
    try:
        spell_id, version, pairs, mode = _cast_args(rest)
        base: dict[str, Any] = {}
        if block is not None:
            base = _parse_json_block(block, lines)
    except _Fail as e:
        return CommandError(lineno, e.message), after_block
    return CastCommand(spell_id, version, {**base, **pairs}, mode, lineno), after_block


def _json_block(lines: list[str], start: int) -> tuple[tuple[int, int, _Fence] | None, int]:
    """Find a ```json block at ``lines[start:]`` after blank lines only.

    Returns ``((open index, close index or len(lines) when unclosed, fence), index after it)``, or
    ``(None, start)`` when there is no such block.
    """
    j = start
    while j < len(lines) and not lines[j].strip():
        j += 1
    if j >= len(lines):
        return None, start
    opened = _fence_open(lines[j])
    if opened is None or opened[1].lower() != "json":
        return None, start
    fence = opened[0]
    k = j + 1
    while k < len(lines) and not _fence_closes(lines[k], fence):
        k += 1
    return (j, k, fence), min(k + 1, len(lines))


def _parse_json_block(block: tuple[int, int, _Fence], lines: list[str]) -> dict[str, Any]:
    open_i, close_i, fence = block
    if close_i >= len(lines):
        raise _Fail(
            f"the json block after `/cast` (line {open_i + 1}) is not closed: end it with a line "
            f"of {fence.length} {'backticks' if fence.char == '`' else 'tildes'}"
        )
    text = "\n".join(lines[open_i + 1 : close_i])
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise _Fail(
            f"the json block is not valid JSON: {e.msg} at line {open_i + 1 + e.lineno} "
            f"column {e.colno} of the comment"
        ) from None
    except RecursionError:
        raise _Fail("the json block is nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise _Fail(f"the json block is not valid JSON: {_show(str(e), 80)}") from None
    if not isinstance(value, dict):
        raise _Fail(
            f"the json block must be a JSON object ({{...}}), not {_json_kind(value)}: "
            "its keys are the spell's input fields"
        )
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Fail(f"the json block has the key `{_show(k)}` twice")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise _Fail(f"`{name}` is not allowed in JSON input")


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _cast_args(rest: str) -> tuple[str, str | None, dict[str, Any], str | None]:
    s = rest
    n = len(s)
    pos = _skip_ws(s, 0)
    spell_ref: str | None = None
    mode: str | None = None
    pairs: dict[str, Any] = {}
    while pos < n:
        ch = s[pos]
        if s.startswith("--", pos):
            end = _scan_to_ws(s, pos)
            flag = s[pos:end]
            name, eq, value = flag.partition("=")
            if name != "--mode":
                raise _Fail(
                    f"unknown flag `{_show(name)}`: the only flag is `--mode=workflow` or "
                    "`--mode=service`"
                )
            if mode is not None:
                raise _Fail("`--mode` is given twice")
            if not eq or value not in MODES:
                raise _Fail("`--mode` must be `--mode=workflow` or `--mode=service`")
            mode = value
            pos = end
        elif spell_ref is None and ch not in "\"'" and "=" not in s[pos : _scan_to_ws(s, pos)]:
            end = _scan_to_ws(s, pos)
            spell_ref = s[pos:end]
            pos = end
        else:
            if spell_ref is None:
                raise _Fail(f"`/cast` needs a spell id before the inputs, {_EXAMPLE}")
            key, value, pos = _key_value(s, pos)
            if key in pairs:
                raise _Fail(f"the key `{key}` is given twice")
            pairs[key] = value
        pos = _skip_ws(s, pos)
    if spell_ref is None:
        raise _Fail(f"`/cast` needs a spell id, {_EXAMPLE}")
    spell_id, at, version = spell_ref.partition("@")
    if len(spell_id) > MAX_SPELL_ID_CHARS or not _SPELL_ID.match(spell_id):
        raise _Fail(
            f"`{_show(spell_id)}` is not a spell id: spell ids are lowercase words joined by dots, "
            "like `acme.hello` (use `/spells` to find one)"
        )
    if at and not version:
        raise _Fail(f"a version must follow `@`: write `{spell_id}@1.2.0` or leave `@` out")
    if at and (len(version) > MAX_VERSION_CHARS or not SEMVER_RE.match(version)):
        raise _Fail(
            f"`{_show(version)}` is not a version: write `{spell_id}@1.2.0` "
            "or leave the version out for the latest"
        )
    return spell_id, version if at else None, pairs, mode


def _key_value(s: str, pos: int) -> tuple[str, Any, int]:
    n = len(s)
    start = pos
    while pos < n and s[pos] in _KEY_CHARS:
        pos += 1
    key = s[start:pos]
    if not key or key[0] not in _KEY_START or pos >= n or s[pos] != "=":
        token = s[start : _scan_to_ws(s, start)]
        if "=" in token:
            raise _Fail(_bad_key(token.partition("=")[0]))
        raise _Fail(
            f"expected `key=value` after the spell id, got `{_show(token)}` "
            '(quote values with spaces: `name="hello world"`)'
        )
    pos += 1
    if pos >= n or s[pos] in _WS:
        return key, "", pos
    ch = s[pos]
    if ch in "\"'":
        value, pos = _quoted(s, pos, key)
        if pos < n and s[pos] not in _WS:
            raise _Fail(
                f"unexpected text after the closing quote of `{key}`: put a space between "
                "`key=value` pairs"
            )
        return key, value, pos
    if ch in "[{":
        end = _scan_json(s, pos)
        raw = s[pos:end]
        try:
            return key, _loads(raw), end
        except (ValueError, RecursionError, _Fail):
            raise _Fail(
                f"the value of `{key}` starts like JSON but is not valid JSON: "
                f'`{_show(raw)}` (quote it to pass text: `{key}="..."`)'
            ) from None
    end = _scan_to_ws(s, pos)
    raw = s[pos:end]
    if '"' in raw or "'" in raw:
        raise _Fail(
            f"stray quote in the value of `{key}`: quote the whole value, "
            f'e.g. `{key}="{_show(raw.replace(chr(34), ""), 20)}"`'
        )
    return key, _bare_scalar(raw), end


def _bad_key(key: str) -> str:
    return (
        f"`{_show(key)}` is not a valid key: keys start with a letter or `_` and contain "
        "letters, digits, `_`, `.` and `-`"
    )


def _quoted(s: str, pos: int, key: str) -> tuple[str, int]:
    quote = s[pos]
    pos += 1
    n = len(s)
    buf: list[str] = []
    while pos < n:
        ch = s[pos]
        if ch == "\\" and pos + 1 < n:
            nxt = s[pos + 1]
            if nxt in _ESCAPES:
                buf.append(_ESCAPES[nxt])
            else:
                buf.append(ch)
                buf.append(nxt)
            pos += 2
            continue
        if ch == quote:
            return "".join(buf), pos + 1
        buf.append(ch)
        pos += 1
    raise _Fail(f"the value of `{key}` has no closing `{quote}`: end it with a matching quote")


def _scan_json(s: str, pos: int) -> int:
    """End of a bracketed JSON value starting at ``pos``: the first space outside strings once
    every bracket is closed (or the end of the line). One pass, no backtracking."""
    n = len(s)
    depth = 0
    in_str = False
    while pos < n:
        ch = s[pos]
        if in_str:
            if ch == "\\":
                pos += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch in _WS and depth <= 0:
            return pos
        pos += 1
    return min(pos, n)


def _loads(raw: str) -> Any:
    value = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _bare_scalar(raw: str) -> Any:
    """A bare word: the JSON scalar it spells (number, true, false, null), else the word itself."""
    if not raw or raw[0] not in "-0123456789tfn":
        return raw
    try:
        return _loads(raw)
    except (ValueError, RecursionError, _Fail):
        return raw


# ---------------------------------------------------------------------------------- formatting


def _quote(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def format_cast_command(cmd: CastCommand) -> str:
    """``cmd`` as comment text, such that ``parse_comment(format_cast_command(cmd))`` gives it back.

    Inputs whose keys all fit the ``key=value`` grammar are written on the line (strings always
    quoted, other values as compact JSON); otherwise the whole input goes into a ```json block.
    """
    head = f"/cast {cmd.spell_id}" + (f"@{cmd.version}" if cmd.version else "")
    if cmd.mode is not None:
        head += f" --mode={cmd.mode}"
    if not cmd.input:
        return head
    if all(KEY_RE.fullmatch(k) for k in cmd.input):
        parts = [
            f"{k}={_quote(v) if isinstance(v, str) else _compact(v)}" for k, v in cmd.input.items()
        ]
        return head + " " + " ".join(parts)
    block = json.dumps(cmd.input, ensure_ascii=False, indent=2, allow_nan=False)
    return f"{head}\n```json\n{block}\n```"


def format_command(cmd: Command) -> str:
    """Any command as comment text (the inverse of :func:`parse_comment` for one command)."""
    if isinstance(cmd, CastCommand):
        return format_cast_command(cmd)
    if isinstance(cmd, SpellsCommand):
        return f"/spells {cmd.query}".rstrip()
    if isinstance(cmd, CastStatusCommand):
        return f"/cast-status {cmd.cast_id}"
    return "/cap"


__all__ = [
    "CAST_ID_RE",
    "DEFAULT_MAX_COMMANDS",
    "KEY_RE",
    "MAX_BODY_CHARS",
    "MODES",
    "CapCommand",
    "CastCommand",
    "CastStatusCommand",
    "Command",
    "CommandError",
    "SpellsCommand",
    "format_cast_command",
    "format_command",
    "parse_comment",
]
