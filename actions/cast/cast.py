#!/usr/bin/env python3
"""Cast a Spell Platform spell from a GitHub Actions step (the companion Action, ``action.yml``).

Standard library only, Python 3.8+: it starts in well under a second with the runner's own
``python3``/``python`` on ubuntu, windows and macos runners, with no install step.

Every value reaches this script through environment variables set by ``action.yml`` (never by
``${{ }}`` interpolation into a script):

    SPELL_ACTION_SPELL            spell id, optionally ``id@version`` (required)
    SPELL_ACTION_INPUT            the cast input, one JSON object (default ``{}``)
    SPELL_ACTION_MODE             ``service`` | ``workflow`` (default: the spell's own)
    SPELL_ACTION_API_URL          the platform's base URL (default: ``SPELL_API_URL``, then
                                  ``SPELL_ACTION_DEFAULT_API_URL``)
    SPELL_ACTION_DEFAULT_API_URL  the platform's public URL stamped into released tags of
                                  ``action.yml`` by ``stamp.py`` (empty in the source tree)
    SPELL_ACTION_TOKEN            a platform bearer token; empty: sign in with GitHub OIDC
    SPELL_ACTION_AUDIENCE         the OIDC audience the platform expects (``spell-platform``)
    SPELL_ACTION_IDEMPOTENCY_KEY  default: derived from the run, attempt, job, step and request
    SPELL_ACTION_WAIT             ``true``: follow the cast to its end (default)
    SPELL_ACTION_TIMEOUT          seconds to wait for the end (default 600)
    SPELL_ACTION_BUDGET_CAP       cents: refuse, before casting, a spell whose estimate is higher

Sign-in: with ``token`` empty, the script asks the runner for an OIDC token
(``ACTIONS_ID_TOKEN_REQUEST_URL`` + ``&audience=…``, authorized by
``ACTIONS_ID_TOKEN_REQUEST_TOKEN``; the job needs ``permissions: id-token: write``) and trades
it at ``POST /v1/oidc/token`` for a short-lived platform token, again whenever that runs out.
Every token is masked (``::add-mask::``) before anything else is printed.

Results: the outputs ``cast-id``, ``status``, ``artifact-url``, ``cost-cents`` and
``error-code`` (``$GITHUB_OUTPUT``, multi-line-safe), a table in ``$GITHUB_STEP_SUMMARY``, the
cast's progress lines in the log (spell output can never issue workflow commands: they are
stopped while it streams), and an ``::error::`` annotation with the error code when the cast is
refused, fails or does not end within ``timeout``.

Exit status: 0 when the cast succeeded (or was accepted, with ``wait: false``); 1 when it was
refused, failed or timed out; 2 for unusable inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.client import HTTPException
from typing import Any

VERSION = "1"
USER_AGENT = (
    f"spell-platform-action/{VERSION} (+python {sys.version_info[0]}.{sys.version_info[1]})"
)
SPELL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.)){0,127}$")
IDEMPOTENCY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
MODES = ("service", "workflow")
TERMINAL = ("succeeded", "failed")
MAX_INPUT_BYTES = 1024 * 1024
DEFAULT_TIMEOUT = 600
DEFAULT_AUDIENCE = "spell-platform"
RETRY_STATUSES = (429, 502, 503, 504)
LOOPBACK = ("localhost", "127.0.0.1", "::1", "[::1]")


class ActionError(Exception):
    """Stop the step: ``code`` goes into the annotation and the ``error-code`` output."""

    def __init__(
        self, code: str, message: str, *, status: str | None = None, exit_code: int = 1
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.exit_code = exit_code


def usage_error(message: str) -> ActionError:
    return ActionError("VALIDATION_ERROR", message, status="refused", exit_code=2)


# ------------------------------------------------------------------------ workflow commands


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(name: str, message: str, **props: str) -> None:
    """A workflow command (``::error title=…::message``), escaped the way the runner expects."""
    args = ",".join(f"{k}={escape_property(v)}" for k, v in props.items() if v)
    print(f"::{name}{' ' + args if args else ''}::{escape_data(message)}", flush=True)


def mask(secret: str) -> None:
    if secret:
        print(f"::add-mask::{escape_data(secret)}", flush=True)


def say(text: str) -> None:
    print(text, flush=True)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def log_safe(text: str, limit: int = 4000) -> str:
    """One log line: control characters and line breaks removed, length bounded."""
    text = _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\n", " ⏎ "))
    return text if len(text) <= limit else text[:limit] + " …"


# ----------------------------------------------------------------------------- inputs


class Inputs:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        spell = env.get("SPELL_ACTION_SPELL", "").strip()
        if not spell:
            raise usage_error("the `spell` input is required, e.g. spell: com.example.hello")
        spell_id, _, version = spell.partition("@")
        if not SPELL_RE.match(spell_id):
            raise usage_error(f"`spell` is not a spell id: {log_safe(spell_id, 140)!r}")
        self.spell = spell_id
        self.version = version.strip() or None
        self.input = parse_input(env.get("SPELL_ACTION_INPUT", ""))
        mode = env.get("SPELL_ACTION_MODE", "").strip().lower()
        if mode and mode not in MODES:
            raise usage_error(f"`mode` must be one of {', '.join(MODES)} (or empty), not {mode!r}")
        self.mode = mode or None
        # The caller's `api-url`, then the caller's SPELL_API_URL, then the URL stamped into a
        # released action.yml: an explicit choice of the workflow's author beats the default.
        api_url = (
            env.get("SPELL_ACTION_API_URL", "").strip()
            or env.get("SPELL_API_URL", "").strip()
            or env.get("SPELL_ACTION_DEFAULT_API_URL", "").strip()
        )
        self.api_url = check_api_url(api_url)
        self.token = env.get("SPELL_ACTION_TOKEN", "").strip()
        self.audience = env.get("SPELL_ACTION_AUDIENCE", "").strip() or DEFAULT_AUDIENCE
        self.wait = parse_bool(env.get("SPELL_ACTION_WAIT", ""), "wait", default=True)
        self.timeout = parse_int(
            env.get("SPELL_ACTION_TIMEOUT", ""), "timeout", default=DEFAULT_TIMEOUT, minimum=1
        )
        cap = env.get("SPELL_ACTION_BUDGET_CAP", "").strip()
        self.budget_cap = parse_int(cap, "budget-cap", default=0, minimum=0) if cap else None
        key = env.get("SPELL_ACTION_IDEMPOTENCY_KEY", "").strip()
        if key and not IDEMPOTENCY_RE.match(key):
            raise usage_error("`idempotency-key` must be 1-255 visible ASCII characters")
        self.idempotency_key = key or derive_key(env, self.spell, self.version, self.input, mode)
        self.key_derived = not key


def parse_input(raw: str) -> dict[str, Any]:
    if not raw.strip():
        return {}
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_INPUT_BYTES:
        raise usage_error(f"`input` is larger than {MAX_INPUT_BYTES} bytes")

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise usage_error("`input` nests too deeply") from None
    except ValueError as e:
        where = (
            f" (line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        )
        raise usage_error(f"`input` is not valid JSON{where}") from None
    if not isinstance(value, dict):
        raise usage_error('`input` must be a JSON object, e.g. input: \'{"name": "world"}\'')
    return value


def parse_bool(raw: str, name: str, *, default: bool) -> bool:
    value = raw.strip().lower()
    if not value:
        return default
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise usage_error(f"`{name}` must be true or false, not {log_safe(raw, 40)!r}")


def parse_int(raw: str, name: str, *, default: int, minimum: int) -> int:
    value = raw.strip()
    if not value:
        return default
    if not re.fullmatch(r"[0-9]{1,12}", value) or int(value) < minimum:
        raise usage_error(f"`{name}` must be a whole number ≥ {minimum}, not {log_safe(raw, 40)!r}")
    return int(value)


def check_api_url(url: str) -> str:
    if not url:
        raise usage_error(
            "no platform URL: set the `api-url` input (or SPELL_API_URL in the job's env), "
            "e.g. api-url: https://spells.example.com; only released tags of the action "
            "(e.g. @v1) carry the platform's public URL as their default"
        )
    parsed = urllib.parse.urlsplit(url)
    host = (parsed.hostname or "").lower()
    if parsed.scheme not in ("https", "http") or not host:
        raise usage_error(f"`api-url` must be an https:// URL, not {log_safe(url, 200)!r}")
    if parsed.scheme == "http" and host not in LOOPBACK:
        raise usage_error(
            "`api-url` must use https:// (tokens are sent to it); plain http is only for localhost"
        )
    if parsed.query or parsed.fragment or parsed.username or parsed.password:
        raise usage_error("`api-url` must be a plain base URL (no query, fragment or user)")
    return url.rstrip("/")


def derive_key(
    env: dict[str, str],
    spell: str,
    version: str | None,
    payload: dict[str, Any],
    mode: str,
) -> str:
    """``gha:<run>:<attempt>:<digest>``: the same step of the same run attempt with the same
    request always maps to the same key (a retried step never casts twice); a re-run (a new
    attempt) casts again. The digest covers repository, job, step and the request."""
    run_id = env.get("GITHUB_RUN_ID", "")
    if not run_id:
        # Not in GitHub Actions: nothing identifies a retry, so every invocation is new.
        return "local:" + secrets.token_hex(16)
    attempt = env.get("GITHUB_RUN_ATTEMPT", "1") or "1"
    parts = [
        env.get("GITHUB_REPOSITORY", ""),
        run_id,
        attempt,
        env.get("GITHUB_JOB", ""),
        env.get("GITHUB_ACTION", ""),
        spell,
        version or "",
        mode,
        json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True),
    ]
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    clean = re.sub(r"[^0-9A-Za-z]", "", run_id)[:40] or "run"
    return f"gha:{clean}:{re.sub(r'[^0-9]', '', attempt)[:6] or '1'}:{digest}"


# -------------------------------------------------------------------------------- HTTP


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # never replay a token to wherever a redirect points


OPENER = urllib.request.build_opener(_NoRedirect)


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None

    def error(self) -> tuple[str, str, int | None]:
        """(code, message, retry_after) from the SPEC error shape, or a generic one."""
        doc = self.json()
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            retry = err.get("retry_after")
            return (
                str(err["code"]),
                str(err.get("message") or err["code"]),
                retry if isinstance(retry, int) else None,
            )
        code = {401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 429: "RATE_LIMITED"}
        return code.get(self.status, "UNAVAILABLE"), f"HTTP {self.status} from the server", None


def http(
    method: str,
    url: str,
    *,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Response:
    """One request; an HTTP error status is a :class:`Response` too. Network failures raise
    :class:`OSError` (or :class:`HTTPException`)."""
    data = None
    all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        all_headers["Content-Type"] = "application/json"
    all_headers.update(headers or {})
    req = urllib.request.Request(url, data=data, headers=all_headers, method=method)  # noqa: S310
    try:
        with OPENER.open(req, timeout=timeout) as resp:
            return Response(resp.status, dict(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as e:
        try:
            payload = e.read()
        except (OSError, HTTPException):
            payload = b""
        return Response(e.code, dict(e.headers.items()) if e.headers else {}, payload)


def _final(resp: Response) -> bool:
    """A refusal that no retry changes (no sandbox, a mode this server cannot run)."""
    return resp.status == 503 and resp.error()[0] == "SANDBOX_UNAVAILABLE"


def _retry_after(resp: Response, fallback: float) -> float:
    raw = resp.headers.get("Retry-After") or resp.headers.get("retry-after")
    if raw and raw.strip().isdigit():
        return min(30.0, float(raw.strip()))
    return fallback


# ------------------------------------------------------------------------------- sign-in


class Auth:
    """The bearer token: the `token` input as given, or one obtained (and renewed) through
    GitHub Actions OIDC."""

    def __init__(self, inputs: Inputs, env: dict[str, str]) -> None:
        self.inputs = inputs
        self.env = env
        self.token = inputs.token
        self.expires_at: float | None = None
        self.via_oidc = not inputs.token
        self.account: str | None = None
        if self.token:
            mask(self.token)

    def header(self) -> dict[str, str]:
        if self.via_oidc and (
            not self.token
            or (self.expires_at is not None and time.monotonic() > self.expires_at - 30)
        ):
            self.sign_in()
        return {"Authorization": f"Bearer {self.token}"}

    def can_renew(self) -> bool:
        return self.via_oidc

    def sign_in(self) -> None:
        oidc = self._github_oidc_token()
        url = f"{self.inputs.api_url}/v1/oidc/token"
        for attempt in range(4):
            try:
                resp = http("POST", url, body={"token": oidc}, timeout=30)
            except (OSError, HTTPException) as e:
                if attempt == 3:
                    raise ActionError(
                        "UNAVAILABLE",
                        f"cannot reach the platform at {self.inputs.api_url} ({type(e).__name__})",
                    ) from None
                time.sleep(min(10.0, 2.0 ** (attempt + 1)))
                continue
            if resp.status in RETRY_STATUSES and attempt < 3:
                time.sleep(_retry_after(resp, min(10.0, 2.0 ** (attempt + 1))))
                continue
            break
        if resp.status != 200:
            code, message, _ = resp.error()
            raise ActionError(code, f"the platform refused this workflow's OIDC sign-in: {message}")
        doc = resp.json()
        token = doc.get("token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise ActionError("UNAVAILABLE", "the platform's OIDC sign-in answered no token")
        mask(token)
        self.token = token
        lifetime = doc.get("expires_in")
        self.expires_at = time.monotonic() + (lifetime if isinstance(lifetime, int) else 300)
        first = self.account is None
        self.account = str(doc.get("account") or "")
        if first:
            say(
                f"signed in with GitHub OIDC as account {self.account} "
                f"(role {doc.get('role')}, repository {doc.get('repository')})"
            )

    def _github_oidc_token(self) -> str:
        url = self.env.get("ACTIONS_ID_TOKEN_REQUEST_URL", "")
        request_token = self.env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "")
        if not url or not request_token:
            raise ActionError(
                "UNAUTHORIZED",
                "no `token` input and no GitHub OIDC token available: add "
                "`permissions: { id-token: write }` to the job (or the workflow) so the action "
                "can sign in with OIDC, or pass a platform token in `token`",
            )
        mask(request_token)
        sep = "&" if "?" in url else "?"
        full = f"{url}{sep}audience={urllib.parse.quote(self.inputs.audience, safe='')}"
        last = ""
        for attempt in range(3):
            try:
                resp = http(
                    "GET", full, headers={"Authorization": f"Bearer {request_token}"}, timeout=30
                )
            except (OSError, HTTPException) as e:
                last = type(e).__name__
                time.sleep(1 + attempt)
                continue
            if resp.status == 200:
                doc = resp.json()
                value = doc.get("value") if isinstance(doc, dict) else None
                if isinstance(value, str) and value:
                    mask(value)
                    return value
                last = "an answer without a token"
            else:
                last = f"HTTP {resp.status}"
            if resp.status < 500 and resp.status != 429:
                break
            time.sleep(1 + attempt)
        raise ActionError(
            "UNAUTHORIZED", f"GitHub did not issue an OIDC token for this job ({last})"
        )


class Platform:
    """The few /v1 calls the action makes, with retries where they are safe."""

    def __init__(self, inputs: Inputs, auth: Auth) -> None:
        self.base = inputs.api_url
        self.auth = auth

    def call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        retries: int = 3,
    ) -> Response:
        """Retries network failures, 429 and 502-504 (every call here is safe to repeat: the
        cast carries its Idempotency-Key); a 401 renews an OIDC sign-in once."""
        renewed = False
        attempt = 0
        while True:
            try:
                resp = http(
                    method,
                    self.base + path,
                    body=body,
                    headers={**self.auth.header(), **(headers or {})},
                )
            except (OSError, HTTPException) as e:
                if attempt >= retries:
                    raise ActionError(
                        "UNAVAILABLE",
                        f"cannot reach the platform at {self.base} ({type(e).__name__})",
                    ) from None
                attempt += 1
                time.sleep(min(10.0, 2.0**attempt))
                continue
            if resp.status == 401 and self.auth.can_renew() and not renewed:
                renewed = True
                self.auth.sign_in()
                continue
            if resp.status in RETRY_STATUSES and attempt < retries and not _final(resp):
                attempt += 1
                time.sleep(_retry_after(resp, min(10.0, 2.0**attempt)))
                continue
            return resp

    def ok(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        resp = self.call(method, path, **kwargs)
        if resp.status >= 400:
            code, message, _ = resp.error()
            raise ActionError(code, message)
        doc = resp.json()
        return doc if isinstance(doc, dict) else {}


# ------------------------------------------------------------------------ server-sent events


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str | None, str, str]]:
    """(id, event, data) of each event in a stream of decoded lines."""
    event = ""
    data: list[str] = []
    has_data = False
    last_id: str | None = None
    for line in lines:
        if line == "":
            if has_data:
                yield last_id, event or "message", "\n".join(data)
            event, data, has_data = "", [], False
            continue
        if line.startswith(":"):
            continue
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
            has_data = True
        elif name == "event":
            event = value
        elif name == "id" and "\x00" not in value:
            last_id = value


def event_text(ev: dict[str, Any]) -> str:
    stage = str(ev.get("stage", "event"))
    if stage == "progress":
        pct = ev.get("pct")
        msg = str(ev.get("message") or "")
        text = f"{pct}% {msg}".strip() if pct is not None else msg
    elif stage == "log":
        line = str(ev.get("line", ""))
        text = f"[stderr] {line}" if ev.get("stream") == "stderr" else line
    elif stage == "succeeded":
        cost = ev.get("cost_cents")
        text = f"cost {cost} cents" if cost is not None else ""
    elif stage == "failed":
        err = ev.get("error") if isinstance(ev.get("error"), dict) else {}
        text = f"{err.get('code')}: {err.get('message')}" if err else ""
    else:
        text = str(ev.get("message") or "")
    ts = str(ev.get("ts") or "")
    clock = ts[11:19] if len(ts) >= 19 else "--:--:--"
    return log_safe(f"{clock} {stage}{': ' + text if text else ''}")


class Follower:
    """Streams a cast's events to the log until it ends (resuming with Last-Event-ID), falling
    back to polling its status when the stream keeps failing."""

    def __init__(self, platform: Platform, cast_id: str, deadline: float) -> None:
        self.platform = platform
        self.cast_id = cast_id
        self.deadline = deadline
        self.last = 0
        self.ended = False

    def run(self, printer: Callable[[str], None]) -> None:
        failures = 0
        while not self.ended and time.monotonic() < self.deadline:
            progressed = self._stream_once(printer)
            if self.ended:
                return
            failures = 0 if progressed else failures + 1
            if failures >= 5:
                printer("(the event stream keeps failing; polling the cast's status instead)")
                self._poll()
                return
            time.sleep(min(1.0 * failures + 0.5, max(0.0, self.deadline - time.monotonic())))

    def _stream_once(self, printer: Callable[[str], None]) -> bool:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return False
        url = f"{self.platform.base}/v1/casts/{urllib.parse.quote(self.cast_id, safe='')}/events"
        progressed = False
        for renew in (False, True):
            headers = {
                "User-Agent": USER_AGENT,
                "Accept": "text/event-stream",
                "Last-Event-ID": str(self.last),
                **self.platform.auth.header(),
            }
            req = urllib.request.Request(url, headers=headers, method="GET")  # noqa: S310
            try:
                with OPENER.open(req, timeout=max(1.0, min(30.0, remaining))) as resp:
                    for _id, _event, data in sse_events(_lines(resp, self.deadline)):
                        ev = _event_dict(data, _event, _id)
                        seq = ev.get("seq")
                        if isinstance(seq, int):
                            if seq <= self.last:
                                continue
                            self.last = seq
                        progressed = True
                        printer(event_text(ev))
                        if ev.get("stage") in TERMINAL:
                            self.ended = True
                            return True
                        if time.monotonic() >= self.deadline:
                            return progressed
                return progressed
            except urllib.error.HTTPError as e:
                if e.code == 401 and not renew and self.platform.auth.can_renew():
                    self.platform.auth.sign_in()
                    continue
                if e.code in (401, 403, 404):
                    body = Response(e.code, {}, _read(e))
                    code, message, _ = body.error()
                    raise ActionError(code, message) from None
                return progressed
            except (OSError, HTTPException, ValueError):
                return progressed
        return progressed

    def _poll(self) -> None:
        while time.monotonic() < self.deadline:
            resp = self.platform.call("GET", f"/v1/casts/{self.cast_id}")
            doc = resp.json() if resp.status == 200 else None
            if isinstance(doc, dict) and doc.get("status") in TERMINAL:
                self.ended = True
                return
            time.sleep(min(2.0, max(0.0, self.deadline - time.monotonic())))


def _read(e: urllib.error.HTTPError) -> bytes:
    try:
        return e.read()
    except (OSError, HTTPException):
        return b""


def _lines(resp: Any, deadline: float) -> Iterator[str]:
    """Decoded lines until the stream ends or the deadline passes (keep-alives included)."""
    while time.monotonic() < deadline:
        raw = resp.readline(1 << 20)  # a longer line is cut, never held whole
        if not raw:
            return
        yield raw.decode("utf-8", "replace").rstrip("\r\n")


def _event_dict(data: str, event: str, ident: str | None) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        doc = {"message": data}
    if not isinstance(doc, dict):
        doc = {"message": str(doc)}
    doc.setdefault("stage", event)
    if "seq" not in doc and ident is not None and ident.isdigit():
        doc["seq"] = int(ident)
    return doc


# -------------------------------------------------------------------- outputs and summary


def write_outputs(path: str, values: dict[str, str]) -> None:
    """``name<<DELIM`` … ``DELIM`` per output, with a random delimiter the value cannot hold."""
    with open(path, "a", encoding="utf-8", newline="\n") as fh:
        for name, value in values.items():
            delim = "ghadelimiter_" + secrets.token_hex(16)
            while delim in value:
                delim = "ghadelimiter_" + secrets.token_hex(16)
            fh.write(f"{name}<<{delim}\n{value}\n{delim}\n")


def _cell(text: str) -> str:
    text = log_safe(text, 500).replace("|", "\\|").replace("`", "'")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def money(cents: Any, currency: Any) -> str:
    if not isinstance(cents, int) or isinstance(cents, bool):
        return "-"
    sign = "-" if cents < 0 else ""
    whole = abs(cents)
    return f"{sign}{whole // 100}.{whole % 100:02d} {currency or ''}".strip() + f" ({cents} ¢)"


ICONS = {"succeeded": "✅", "failed": "❌", "refused": "⛔", "queued": "⏳", "running": "⏳"}


def summary_markdown(result: dict[str, Any]) -> str:
    status = str(result.get("status") or "unknown")
    rows = [
        ("Spell", f"`{_cell(str(result.get('spell')))}`"),
        ("Cast", f"`{_cell(str(result['cast_id']))}`" if result.get("cast_id") else "-"),
        ("Status", f"{ICONS.get(status, '❔')} {_cell(status)}"),
    ]
    if result.get("replayed"):
        rows.append(("Replayed", "yes: this step's idempotency key already cast it"))
    if result.get("estimate_cents") is not None:
        rows.append(
            ("Estimate", _cell(money(result.get("estimate_cents"), result.get("currency"))))
        )
    if result.get("cost_cents") is not None:
        rows.append(("Cost", _cell(money(result.get("cost_cents"), result.get("currency")))))
    if result.get("artifact_url"):
        rows.append(
            (
                "Artifact",
                "ready: step output `artifact-url` (a signed, expiring link; not shown here "
                "because anyone who can read this run could use it)",
            )
        )
    if result.get("run_url"):
        rows.append(("Run", _cell(str(result["run_url"]))))
    if result.get("error_code"):
        rows.append(
            (
                "Error",
                f"`{_cell(str(result['error_code']))}`: {_cell(str(result.get('error_message')))}",
            )
        )
    lines = [f"### Spell cast: {_cell(str(result.get('spell')))}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n\n"


def finish(env: dict[str, str], result: dict[str, Any]) -> None:
    outputs = {
        "cast-id": str(result.get("cast_id") or ""),
        "status": str(result.get("status") or ""),
        "artifact-url": str(result.get("artifact_url") or ""),
        "cost-cents": "" if result.get("cost_cents") is None else str(result["cost_cents"]),
        "error-code": str(result.get("error_code") or ""),
    }
    out_path = env.get("GITHUB_OUTPUT")
    if out_path:
        write_outputs(out_path, outputs)
    summary_path = env.get("GITHUB_STEP_SUMMARY")
    if summary_path:
        with open(summary_path, "a", encoding="utf-8", newline="\n") as fh:
            fh.write(summary_markdown(result))


# ---------------------------------------------------------------------------------- main


def cast(env: dict[str, str], result: dict[str, Any]) -> int:
    inputs = Inputs(env)
    result["spell"] = inputs.spell + (f"@{inputs.version}" if inputs.version else "")
    auth = Auth(inputs, env)
    platform = Platform(inputs, auth)
    spell_path = "/v1/spells/" + urllib.parse.quote(inputs.spell, safe="")
    if inputs.budget_cap is not None:
        query = f"?version={urllib.parse.quote(inputs.version)}" if inputs.version else ""
        detail = platform.ok("GET", spell_path + query)
        estimate = detail.get("estimate_cents")
        currency = (detail.get("price") or {}).get("currency")
        result.update(estimate_cents=estimate, currency=currency)
        if isinstance(estimate, int) and estimate > inputs.budget_cap:
            raise ActionError(
                "BUDGET_CAP_EXCEEDED",
                f"{inputs.spell} may cost up to {estimate} cents, above this step's "
                f"budget-cap of {inputs.budget_cap} cents; nothing was cast",
            )
    body: dict[str, Any] = {"input": inputs.input}
    if inputs.mode:
        body["mode"] = inputs.mode
    if inputs.version:
        body["version"] = inputs.version
    say(f"casting {result['spell']} at {inputs.api_url} (idempotency key {inputs.idempotency_key})")
    resp = platform.call(
        "POST", spell_path + ":cast", body=body, headers={"Idempotency-Key": inputs.idempotency_key}
    )
    if resp.status >= 400:
        code, message, retry_after = resp.error()
        if retry_after is not None:
            message += f" (retry after {retry_after} s)"
        raise ActionError(code, message)
    doc = resp.json()
    accepted: dict[str, Any] = doc if isinstance(doc, dict) else {}
    cast_id = str(accepted.get("cast_id") or "")
    if not cast_id:
        raise ActionError("INTERNAL", "the platform accepted the cast without a cast id")
    replayed = resp.headers.get("Idempotent-Replayed", "").lower() == "true"
    result.update(
        cast_id=cast_id,
        status=accepted.get("status") or "queued",
        replayed=replayed,
        estimate_cents=accepted.get("estimate_cents", result.get("estimate_cents")),
        currency=accepted.get("currency") or result.get("currency"),
    )
    say(
        f"cast {cast_id} accepted"
        + (" (replayed: this step already cast it; following that cast)" if replayed else "")
        + f"; estimate {money(accepted.get('estimate_cents'), accepted.get('currency'))}"
    )
    deadline = time.monotonic() + inputs.timeout
    if inputs.wait:
        stop = "spell-action-" + secrets.token_hex(16)
        say(f"::stop-commands::{stop}")  # spell output below cannot issue workflow commands
        try:
            Follower(platform, cast_id, deadline).run(lambda line: say("  " + line))
        finally:
            say(f"::{stop}::")
    final = platform.ok("GET", f"/v1/casts/{urllib.parse.quote(cast_id, safe='')}")
    raw_error = final.get("error")
    err: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    result.update(
        status=final.get("status") or result["status"],
        artifact_url=final.get("artifact_url"),
        cost_cents=final.get("cost_cents"),
        run_url=final.get("run_url"),
        currency=final.get("currency") or result.get("currency"),
    )
    status = result["status"]
    if not inputs.wait:
        say(f"cast {cast_id} is {status} (wait: false)")
        return 0
    if status == "succeeded":
        say(f"cast {cast_id} succeeded; cost {money(final.get('cost_cents'), result['currency'])}")
        return 0
    if status == "failed":
        raise ActionError(
            str(err.get("code") or "INTERNAL"),
            str(err.get("message") or "the cast failed"),
            status="failed",
        )
    raise ActionError(
        "TIMEOUT",
        f"cast {cast_id} is still {status} after {inputs.timeout} s (the `timeout` input); "
        "it goes on on the platform",
        status=str(status),
    )


def main(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:  # Windows consoles default to a legacy code page
            reconfigure(encoding="utf-8", errors="replace")
    socket.setdefaulttimeout(60)
    result: dict[str, Any] = {"spell": env.get("SPELL_ACTION_SPELL", "").strip() or "?"}
    code = 0
    try:
        code = cast(env, result)
    except ActionError as e:
        result["error_code"] = e.code
        result["error_message"] = e.message
        if e.status is not None:
            result["status"] = e.status
        elif not result.get("cast_id"):
            result["status"] = "refused"  # nothing was cast
        command("error", f"{e.code}: {e.message}", title="Spell cast")
        code = e.exit_code
    except KeyboardInterrupt:
        result.update(error_code="CANCELLED", error_message="the step was cancelled")
        code = 130
    except Exception as e:  # a bug here must still leave outputs, a summary and no traceback
        message = log_safe(f"the action failed unexpectedly: {type(e).__name__}: {e}", 500)
        result.update(error_code="INTERNAL", error_message=message)
        result.setdefault("status", "refused" if not result.get("cast_id") else "unknown")
        command("error", f"INTERNAL: {message}", title="Spell cast")
        code = 1
    finish(env, result)
    return code


if __name__ == "__main__":
    sys.exit(main())
