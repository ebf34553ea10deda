"""The text the GitHub App posts: cast comments, check-run output and command replies.

Pure functions over plain data. The wording lives in ``templates/comments/*.md`` (``$name``
placeholders, :class:`string.Template`), found by :func:`templates_dir`; this module only decides
*what* goes into each placeholder and makes it safe:

* every user-controlled value is escaped for Markdown: HTML is entity-escaped, Markdown
  punctuation is backslash-escaped, and ``@`` / ``#`` get a zero-width joiner after them so echoed
  input can neither @-mention (ping) anyone nor cross-reference an issue;
* bidirectional-override characters are dropped and long values are shortened;
* secrets are never rendered: values pass through :func:`app.domain.audit.redact_text`, links lose
  their user-info and any credential-like query parameter (``token``, ``sig``, ``X-Amz-*``…);
* only ``http``/``https`` links are rendered.

The cast comment carries a hidden marker ``<!-- spell-cast:<cast-id> -->`` on its first line, so
a redelivered webhook finds the comment it already posted (:func:`find_cast_marker`) and edits it
instead of posting a second one. Only look for the marker in the App's own comments: anyone can
type it.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from string import Template
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from app.domain.audit import SECRET_KEY, redact_text
from app.domain.commands import CAST_ID_RE, CommandError

TEMPLATES_ENV: Final = "SPELL_TEMPLATES_DIR"
MARKER_PREFIX: Final = "<!-- spell-cast:"
_MARKER_RE: Final = re.compile(r"<!-- spell-cast:(c_[0-9a-f]{24}) -->")
_LOGIN_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})(?:\[bot\])?")
_CURRENCY_RE: Final = re.compile(r"[A-Z]{3}")
#: GitHub's limit for a comment body and for check-run ``summary`` / ``text``.
MAX_BODY: Final = 65_535
MAX_TITLE: Final = 255
MAX_SPELLS_LISTED: Final = 20

ZWJ: Final = "\u200d"
_SPACE_RUN: Final = re.compile(r"\s+")
_BIDI: Final = dict.fromkeys(map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))
_MD_PUNCT: Final = frozenset("\\`*_[]()!|~{}")
_SECRET_PARAMS: Final = frozenset(
    {"sig", "key", "jwt", "auth", "code", "credential", "x-amz-credential", "x-goog-credential"}
)

#: status → (emoji, label). Unknown statuses render with ❔ and the escaped status.
STATUSES: Final[Mapping[str, tuple[str, str]]] = {
    "queued": ("⏳", "queued"),
    "dispatched": ("🚀", "dispatched"),
    "running": ("⚙️", "running"),
    "succeeded": ("✅", "succeeded"),
    "failed": ("❌", "failed"),
    "timed_out": ("⌛", "timed out"),
    "cancelled": ("🚫", "cancelled"),
}
#: status → (check run ``status``, ``conclusion``) for the checks API.
_CHECK_STATES: Final[Mapping[str, tuple[str, str | None]]] = {
    "queued": ("queued", None),
    "dispatched": ("in_progress", None),
    "running": ("in_progress", None),
    "succeeded": ("completed", "success"),
    "failed": ("completed", "failure"),
    "timed_out": ("completed", "timed_out"),
    "cancelled": ("completed", "cancelled"),
}
_ZERO_DECIMAL: Final = frozenset(
    [
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "ISK",
        "JPY",
        "KMF",
        "KRW",
        "MGA",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    ]
)
_THREE_DECIMAL: Final = frozenset(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"])


# ---------------------------------------------------------------------------------- templates


def templates_dir() -> Path:
    """The ``templates/`` folder: ``$SPELL_TEMPLATES_DIR`` if set, else ``<repo>/templates``.

    Found relative to the ``app`` package (``app/github/render.py`` → ``<repo>/templates``), which
    holds in a checkout and after ``pip install -e .``.
    """
    override = os.environ.get(TEMPLATES_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "templates"


@functools.lru_cache(maxsize=64)
def _load(path: str) -> Template:
    try:
        return Template(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"comment template {path} not found; point {TEMPLATES_ENV} at a folder holding "
            "comments/*.md"
        ) from None


def _render(name: str, **values: str) -> str:
    text = _load(str(templates_dir() / "comments" / f"{name}.md")).substitute(values)
    text = re.sub(r"\n{3,}", "\n\n", text.strip("\n"))  # sections left empty
    return text[:MAX_BODY]


# ---------------------------------------------------------------------------------- escaping


def _clean(text: str, limit: int) -> str:
    text = redact_text(str(text)).translate(_BIDI)
    text = _SPACE_RUN.sub(" ", text)  # one line: echoed text cannot start a Markdown block
    return text if len(text) <= limit else text[: limit - 1] + "…"


def escape_markdown(text: str, *, limit: int = 500) -> str:
    """``text`` as inert inline Markdown: no HTML, no formatting, no mentions, no references."""
    out: list[str] = []
    for ch in _clean(text, limit):
        if ch == "&":
            out.append("&amp;")
        elif ch == "<":
            out.append("&lt;")
        elif ch == ">":
            out.append("&gt;")
        elif ch in "@#":
            out.append(ch + ZWJ)
        elif ch in _MD_PUNCT:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def code(text: str, *, limit: int = 200, in_table: bool = True) -> str:
    """``text`` as an inline code span (nothing inside renders: no mentions, no HTML)."""
    text = _clean(text, limit)
    if not text:
        return "—"
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    body = f" {text} " if longest else text  # CommonMark strips one space on each side
    if in_table:
        body = body.replace("|", "\\|")
    return f"{fence}{body}{fence}"


def safe_url(url: str | None) -> str | None:
    """``url`` fit to link from a public comment, or ``None``.

    Only absolute http(s) URLs; user-info and credential-like query parameters are removed, the
    fragment is dropped, and characters that could end a Markdown link are percent-encoded.
    """
    if not url or len(url) > 2000 or any(c.isspace() or ord(c) < 32 for c in url):
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    netloc = host if ":" not in host else f"[{host}]"
    if port is not None:
        netloc += f":{port}"
    query = urlencode(
        [
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if k.lower() not in _SECRET_PARAMS and not SECRET_KEY.search(k)
        ]
    )
    clean = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    if redact_text(clean) != clean:
        return None  # a token in the path: do not link at all
    return quote(clean, safe=":/?&=%+,;@!$*'-._~")


def _link(label: str, url: str | None) -> str:
    safe = safe_url(url)
    return f"[{label}]({safe})" if safe else "—"


def format_money(cents: int, currency: str) -> str:
    """Integer minor units as text: ``format_money(1234, "USD") == "12.34 USD"``."""
    cur = currency.upper()
    exponent = 0 if cur in _ZERO_DECIMAL else 3 if cur in _THREE_DECIMAL else 2
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(int(cents)), 10**exponent)
    amount = f"{whole:,}" + (f".{frac:0{exponent}d}" if exponent else "")
    return f"{sign}{amount} {cur if _CURRENCY_RE.fullmatch(cur) else escape_markdown(cur)}"


def _status(status: str) -> tuple[str, str]:
    return STATUSES.get(status, ("❔", escape_markdown(status, limit=40)))


def _login(login: str) -> str:
    return code(login, limit=60) if login else "you"


# ---------------------------------------------------------------------------------- casts


def cast_marker(cast_id: str) -> str:
    if not CAST_ID_RE.fullmatch(cast_id):
        raise ValueError("not a cast id")
    return f"{MARKER_PREFIX}{cast_id} -->"


def find_cast_marker(body: str | None) -> str | None:
    """The cast id of the marker in one of the App's comments, if it has one."""
    if not body:
        return None
    m = _MARKER_RE.search(body)
    return m.group(1) if m else None


def _cast_values(
    *,
    cast_id: str,
    spell_id: str,
    status: str,
    run_url: str | None,
    artifact_url: str | None,
    cost_cents: int | None,
    currency: str | None,
    error_code: str | None,
    error_message: str | None,
) -> dict[str, str]:
    emoji, label = _status(status)
    error = ""
    if error_code or error_message:
        error = _render(
            "cast_error",
            code=code(error_code or "ERROR", limit=64, in_table=False),
            message=escape_markdown(error_message or "", limit=1000),
        )
    return {
        "emoji": emoji,
        "label": label,
        "spell": code(spell_id, limit=128),
        "status": f"{emoji} {label}",
        "run": _link("workflow run", run_url),
        "artifacts": _link("download", artifact_url),
        "cost": format_money(cost_cents, currency or "USD") if cost_cents is not None else "—",
        "cast": code(cast_id, limit=64),
        "cast_id": cast_id if CAST_ID_RE.fullmatch(cast_id) else "<cast-id>",
        "error": error,
    }


def render_cast_comment(
    *,
    cast_id: str,
    spell_id: str,
    status: str,
    run_url: str | None = None,
    artifact_url: str | None = None,
    cost_cents: int | None = None,
    currency: str | None = "USD",
    error_code: str | None = None,
    error_message: str | None = None,
    marker: bool = True,
) -> str:
    """The one comment per cast, edited in place as the cast progresses.

    Starts with the hidden marker when ``marker`` (then ``cast_id`` must be a real cast id).
    """
    values = _cast_values(
        cast_id=cast_id,
        spell_id=spell_id,
        status=status,
        run_url=run_url,
        artifact_url=artifact_url,
        cost_cents=cost_cents,
        currency=currency,
        error_code=error_code,
        error_message=error_message,
    )
    return _render("cast", marker=cast_marker(cast_id) if marker else "", **values)


def check_run_state(status: str) -> tuple[str, str | None]:
    """``(status, conclusion)`` of the check run for a cast status (checks API values)."""
    return _CHECK_STATES.get(status, ("completed", "neutral"))


def render_check_run(
    *,
    cast_id: str,
    spell_id: str,
    status: str,
    run_url: str | None = None,
    artifact_url: str | None = None,
    cost_cents: int | None = None,
    currency: str | None = "USD",
    error_code: str | None = None,
    error_message: str | None = None,
) -> dict[str, str]:
    """The check run's ``output`` (``title``, ``summary``, ``text``) for the PR's head SHA."""
    values = _cast_values(
        cast_id=cast_id,
        spell_id=spell_id,
        status=status,
        run_url=run_url,
        artifact_url=artifact_url,
        cost_cents=cost_cents,
        currency=currency,
        error_code=error_code,
        error_message=error_message,
    )
    title = f"{_clean(spell_id, 128)}: {values['label']}"  # titles are plain text
    return {
        "title": title[:MAX_TITLE],
        "summary": _render("check_run_summary", **values),
        "text": _render("check_run_text", **values),
    }


# ---------------------------------------------------------------------------------- replies


def render_link_help(login: str, *, account: str | None = None) -> str:
    """How to link a GitHub account to a caster account (``spell github link``, by an operator)."""
    plain = login if _LOGIN_RE.fullmatch(login or "") else "LOGIN"
    known = account is not None and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", account) is not None
    return _render(
        "link_help",
        login=_login(login),
        login_plain=plain,
        account=account if known and account else "ACME",
        account_hint="" if known else "Replace `ACME` with the caster account's id. ",
    )


def render_permission_denied(login: str, needed: str) -> str:
    return _render(
        "permission_denied", login=_login(login), needed=escape_markdown(needed, limit=20)
    )


def _price(item: Mapping[str, Any]) -> str:
    price = item.get("price")
    if not isinstance(price, Mapping):
        return "—"
    cents, currency, model = price.get("cents"), price.get("currency"), price.get("model")
    if not isinstance(cents, int) or isinstance(cents, bool):
        return "—"
    amount = format_money(cents, currency if isinstance(currency, str) else "USD")
    if model == "flat":
        return f"{amount} per cast"
    if model == "metered":
        return f"up to {amount} per cast"
    if model == "one_time":
        return f"{amount} once"
    return amount


def render_spells_list(items: Sequence[Mapping[str, Any]], *, query: str = "") -> str:
    """A table of spells (the ``/v1/spells`` summaries), at most 20 rows."""
    for_query = f" matching {code(query, limit=80, in_table=False)}" if query.strip() else ""
    if not items:
        return _render("spells_empty", for_query=for_query)
    rows = []
    for item in items[:MAX_SPELLS_LISTED]:
        rows.append(
            "| {} | {} | {} | {} |".format(
                code(str(item.get("id", "")), limit=128),
                escape_markdown(str(item.get("name") or ""), limit=100),
                _price(item),
                escape_markdown(str(item.get("description") or ""), limit=160),
            )
        )
    more = ""
    if len(items) > MAX_SPELLS_LISTED:
        more = f"Showing the first {MAX_SPELLS_LISTED}: add words to `/spells` to narrow it. "
    return _render("spells_list", for_query=for_query, rows="\n".join(rows), more=more)


def _cap_cells(view: Any, currency: str) -> tuple[str, str, str, str]:
    def money(value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            return format_money(value, currency)
        return "—"

    if not isinstance(view, Mapping):
        return ("—", "—", "—", "—")
    cap = view.get("cap_cents")
    limit = "no cap" if cap is None else money(cap)
    remaining = "unlimited" if cap is None else money(view.get("remaining_cents"))
    return (limit, money(view.get("used_cents")), money(view.get("reserved_cents")), remaining)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 0:
        return "—"
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes = max(1, rest // 60) if not (days or hours) else rest // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min"


def render_cap(view: Mapping[str, Any], *, currency: str = "USD") -> str:
    """The caster's caps, from the ``GET /v1/billing/caps`` shape
    (``account``, ``period``, ``monthly``/``total`` ``{cap_cents, used_cents, reserved_cents,
    remaining_cents}``, ``monthly_resets_in`` seconds)."""
    m = _cap_cells(view.get("monthly"), currency)
    t = _cap_cells(view.get("total"), currency)
    return _render(
        "cap",
        account=code(str(view.get("account") or "—"), limit=64, in_table=False),
        period=escape_markdown(str(view.get("period") or "—"), limit=20),
        monthly_cap=m[0],
        monthly_used=m[1],
        monthly_reserved=m[2],
        monthly_remaining=m[3],
        total_cap=t[0],
        total_used=t[1],
        total_reserved=t[2],
        total_remaining=t[3],
        resets_in=_duration(view.get("monthly_resets_in")),
    )


def message_markdown(message: str) -> str:
    """A parser message as Markdown: its `code` spans stay code, everything else is escaped."""
    pieces = message.split("`")
    if len(pieces) % 2 == 0:  # unbalanced: treat it all as text
        return escape_markdown(message, limit=1000)
    out = []
    for i, piece in enumerate(pieces):
        if i % 2:
            out.append(code(piece, limit=200, in_table=False))
        elif piece:
            out.append(escape_markdown(piece, limit=1000))
    return "".join(out)


def render_command_error(err: CommandError) -> str:
    return _render("command_error", line=str(int(err.line)), message=message_markdown(err.message))


__all__ = [
    "MARKER_PREFIX",
    "STATUSES",
    "TEMPLATES_ENV",
    "cast_marker",
    "check_run_state",
    "code",
    "escape_markdown",
    "find_cast_marker",
    "format_money",
    "message_markdown",
    "render_cap",
    "render_cast_comment",
    "render_check_run",
    "render_command_error",
    "render_link_help",
    "render_permission_denied",
    "render_spells_list",
    "safe_url",
    "templates_dir",
]
