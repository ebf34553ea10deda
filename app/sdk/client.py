"""Python client for the ``/v1`` API (SPEC §5, §10): publish, search, cast, follow progress.

One :class:`SpellClient` per process; the HTTP transport is the test seam
(``SpellClient(url, token, transport=httpx.MockTransport(handler))``).

* Every non-2xx answer raises :class:`ApiError` carrying the SPEC error code, message, HTTP status
  and ``retry_after``; a platform that cannot be reached is ``ApiError("UNAVAILABLE")``.
* :meth:`SpellClient.cast` always sends an ``Idempotency-Key`` (a UUID when none is given) and
  retries transport failures with the same key, so a retried cast never starts two runs.
* :meth:`SpellClient.events` follows the Server-Sent Events stream of a cast and reconnects on its
  own with ``Last-Event-ID`` (the SSE reconnect of SPEC §10) until the terminal event.

Protocol pieces (:func:`error_from_response`, :class:`SseParser`) are pure functions of bytes and
headers, tested without a network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote, urlsplit

import httpx

from app.config import ClientSettings

__all__ = [
    "UNSET",
    "ApiError",
    "SpellClient",
    "SseEvent",
    "SseParser",
    "error_from_response",
    "load_client_settings",
    "read_config_file",
    "write_config_file",
]

TERMINAL_STAGES: Final = frozenset({"succeeded", "failed"})
CONFIG_KEYS: Final = ("api_url", "token")
USER_AGENT: Final = "spell-sdk-python/0.1"


class _Unset:
    """Marks an argument that was not given (``None`` is a meaningful value: "remove the cap")."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Final = _Unset()


class ApiError(Exception):
    """A failed API call: the SPEC error shape ``{"error": {"code", "message", ...}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        retry_after: int | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.body: dict[str, Any] = body if body is not None else {}

    @property
    def detail(self) -> dict[str, Any] | None:
        err = self.body.get("error")
        if isinstance(err, dict) and isinstance(err.get("detail"), dict):
            return dict(err["detail"])
        return None

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r})"


def _retry_after(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def error_from_response(status: int, headers: Mapping[str, str], content: bytes) -> ApiError:
    """The :class:`ApiError` for a non-2xx answer (pure: status, headers and body in)."""
    header_retry = _retry_after(headers.get("Retry-After"))
    try:
        body = json.loads(content) if content else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("code"), str):
        retry = _retry_after(err.get("retry_after"))
        return ApiError(
            status,
            err["code"],
            str(err.get("message") or err["code"]),
            retry_after=retry if retry is not None else header_retry,
            body=body,
        )
    # Not the platform's error shape: a proxy, a load balancer or a crash in front of it.
    code = "UNAVAILABLE" if status in (502, 503, 504) else "INTERNAL"
    text = content[:200].decode("utf-8", errors="replace").strip()
    message = f"HTTP {status}" + (f": {text}" if text else " with no body")
    return ApiError(
        status,
        code,
        message,
        retry_after=header_retry,
        body=body if isinstance(body, dict) else {},
    )


# ---------------------------------------------------------------------- Server-Sent Events


@dataclass
class SseEvent:
    """One dispatched SSE event (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""

    id: str | None
    event: str
    data: str


@dataclass
class SseParser:
    """Incremental SSE line parser: feed decoded lines (no line terminator), get events."""

    last_id: str | None = None
    retry_ms: int | None = None
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _has_data: bool = False

    def feed(self, line: str) -> SseEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SseEvent | None:
        event, self._event = self._event or "message", ""
        data, self._data = "\n".join(self._data), []
        has_data, self._has_data = self._has_data, False
        if not has_data:
            return None
        return SseEvent(id=self.last_id, event=event, data=data)

    def parse(self, lines: Iterable[str]) -> Iterator[SseEvent]:
        for line in lines:
            ev = self.feed(line)
            if ev is not None:
                yield ev


def _event_dict(ev: SseEvent, cast_id: str) -> dict[str, Any]:
    try:
        data = json.loads(ev.data)
    except json.JSONDecodeError:
        data = {"message": ev.data}
    if not isinstance(data, dict):
        data = {"data": data}
    data.setdefault("stage", ev.event)
    data.setdefault("cast_id", cast_id)
    if "seq" not in data and ev.id is not None and ev.id.isdigit():
        data["seq"] = int(ev.id)
    return data


# ---------------------------------------------------------------------- client configuration


def read_config_file(path: Path) -> dict[str, str]:
    """The client config file (``{"api_url": …, "token": …}``); missing → ``{}``."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ApiError(0, "VALIDATION_ERROR", f"cannot read the config file {path}: {e}") from None
    try:
        data = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as e:
        raise ApiError(
            0,
            "VALIDATION_ERROR",
            f"the config file {path} is not valid JSON (line {e.lineno}); fix or delete it",
        ) from None
    if not isinstance(data, dict):
        raise ApiError(0, "VALIDATION_ERROR", f"the config file {path} must hold a JSON object")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def write_config_file(path: Path, updates: Mapping[str, str | None]) -> dict[str, str]:
    """Merge ``updates`` into the config file (a ``None`` value removes the key).

    Written atomically and readable by the owner only (0600): it holds a bearer token.
    """
    data = read_config_file(path)
    for key, value in updates.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return data


def load_client_settings() -> ClientSettings:
    """Client settings: ``SPELL_API_URL`` / ``SPELL_TOKEN`` first, then the config file."""
    settings = ClientSettings()
    from_file = read_config_file(settings.config_file)
    updates: dict[str, Any] = {
        k: from_file[k]
        for k in CONFIG_KEYS
        if k in from_file and k not in settings.model_fields_set
    }
    if not updates:
        return settings
    merged: dict[str, Any] = {
        "api_url": settings.api_url,
        "token": settings.token,
        "config_file": settings.config_file,
        **updates,
    }
    return ClientSettings.model_validate(merged)


# ---------------------------------------------------------------------- the client


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


_FILENAME_RE = re.compile(r'filename="?([^";]+)"?')


class SpellClient:
    """A synchronous client for one platform (``api_url``) and one bearer token."""

    def __init__(
        self,
        api_url: str,
        token: str | None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.api_url,
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        )
        #: pause between SSE reconnects (seconds); the server's ``retry:`` field overrides it
        self.reconnect_delay = 1.0

    @classmethod
    def from_env(cls, *, timeout: float = 30.0) -> SpellClient:
        """A client from ``SPELL_API_URL``/``SPELL_TOKEN``, else the config file."""
        settings = load_client_settings()
        token = settings.token.get_secret_value() if settings.token is not None else None
        return cls(settings.api_url, token or None, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _unreachable(self, e: httpx.TransportError) -> ApiError:
        return ApiError(
            0,
            "UNAVAILABLE",
            f"cannot reach the platform at {self.api_url}: {type(e).__name__}: {e}".rstrip(": "),
        )

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        retries: int = 0,
    ) -> httpx.Response:
        """One request; non-2xx → :class:`ApiError`. ``retries`` only for idempotent calls."""
        attempt = 0
        while True:
            try:
                resp = self._http.request(
                    method,
                    path,
                    params={k: v for k, v in (params or {}).items() if v is not None} or None,
                    json=json_body,
                    content=content,
                    headers=self._headers(headers),
                )
            except httpx.TransportError as e:
                if attempt < retries:
                    attempt += 1
                    time.sleep(min(4.0, 0.5 * 2**attempt))
                    continue
                raise self._unreachable(e) from None
            if resp.is_success:
                return resp
            raise error_from_response(resp.status_code, resp.headers, resp.content)

    def _json(self, resp: httpx.Response) -> dict[str, Any]:
        try:
            body = resp.json()
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ApiError(
                resp.status_code,
                "INTERNAL",
                f"the platform answered {resp.request.method} {resp.request.url.path} "
                "with a body that is not JSON",
            ) from None
        if not isinstance(body, dict):
            raise ApiError(
                resp.status_code, "INTERNAL", "the platform answered with non-object JSON"
            )
        return body

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._json(self._send(method, path, **kwargs))

    # ------------------------------------------------------------------ spells

    def upload_bundle(self, data: bytes) -> dict[str, Any]:
        """Upload a spell bundle (tar.gz); returns ``{"digest": "sha256:…", "size_bytes": n}``."""
        return self._call(
            "POST",
            "/v1/bundles",
            content=data,
            headers={"Content-Type": "application/gzip"},
            retries=2,  # content-addressed: uploading twice stores one bundle
        )

    def publish(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """Register a spell version (SPEC §15 document); returns the spell detail."""
        return self._call("POST", "/v1/spells", json_body=dict(document))

    @staticmethod
    def _search_params(
        q: str | None, tag: str | None, sort: str | None, limit: int, offset: int
    ) -> dict[str, Any]:
        return {"q": q, "tag": tag, "sort": sort, "limit": limit, "offset": offset}

    def list_spells(
        self,
        q: str | None = None,
        tag: str | None = None,
        sort: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> dict[str, Any]:
        """Spells visible to this token (own private ones included): ``{spells, next_offset}``."""
        params = self._search_params(q, tag, sort, limit, offset)
        return self._call("GET", "/v1/spells", params=params)

    def catalog(
        self,
        q: str | None = None,
        tag: str | None = None,
        sort: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> dict[str, Any]:
        """The public catalog (SPEC §22): ``{spells, next_offset}``."""
        params = self._search_params(q, tag, sort, limit, offset)
        return self._call("GET", "/v1/catalog/spells", params=params)

    def get_spell(self, spell_id: str, version: str | None = None) -> dict[str, Any]:
        return self._call("GET", f"/v1/spells/{_seg(spell_id)}", params={"version": version})

    # ------------------------------------------------------------------ casts

    def cast(
        self,
        spell_id: str,
        input: Mapping[str, Any],
        *,
        mode: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Start a cast; returns ``{cast_id, status, progress_sse, …, "replayed": bool}``.

        The same ``idempotency_key`` always yields the same cast (``replayed`` is then true).
        """
        body: dict[str, Any] = {"input": dict(input)}
        if mode is not None:
            body["mode"] = mode
        key = idempotency_key or str(uuid.uuid4())
        resp = self._send(
            "POST",
            f"/v1/spells/{_seg(spell_id)}:cast",
            json_body=body,
            headers={"Idempotency-Key": key},
            retries=2,
        )
        out = self._json(resp)
        out["replayed"] = resp.headers.get("Idempotent-Replayed", "").lower() == "true"
        out.setdefault("idempotency_key", key)
        return out

    def get_cast(self, cast_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/casts/{_seg(cast_id)}")

    def events(
        self,
        cast_id: str,
        *,
        last_event_id: int = 0,
        reconnect: bool = True,
        max_reconnects: int = 20,
        idle_timeout: float | None = None,
        deadline: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Progress events of a cast, in order, until its ``succeeded``/``failed`` event.

        Each event is the JSON ``data`` (``cast_id``, ``seq``, ``stage``, ``ts``, …). A dropped
        stream is resumed with ``Last-Event-ID`` (up to ``max_reconnects`` times in a row without
        progress). ``idle_timeout``: stop quietly when no event arrives for that many seconds
        (print-what-exists-so-far). ``deadline``: a ``time.monotonic()`` value after which
        :class:`ApiError` ``TIMEOUT`` is raised.
        """
        last = last_event_id
        failures = 0
        delay = self.reconnect_delay
        while True:
            read_timeout = idle_timeout if idle_timeout is not None else max(self.timeout, 20.0)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _gave_up(cast_id)
                read_timeout = min(read_timeout, remaining)
            parser = SseParser()
            got_event = False
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/casts/{_seg(cast_id)}/events",
                    headers=self._headers(
                        {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
                    ),
                    timeout=httpx.Timeout(self.timeout, read=read_timeout),
                ) as resp:
                    if not resp.is_success:
                        resp.read()
                        err = error_from_response(resp.status_code, resp.headers, resp.content)
                        if not (reconnect and resp.status_code in (429, 502, 503, 504)):
                            raise err
                        delay = max(delay, float(err.retry_after or 0))
                        raise _Retry()
                    for ev in parser.parse(resp.iter_lines()):
                        data = _event_dict(ev, cast_id)
                        seq = data.get("seq")
                        if isinstance(seq, int):
                            if seq <= last:
                                continue  # a duplicate after a reconnect
                            last = seq
                        got_event = True
                        failures = 0
                        yield data
                        if data.get("stage") in TERMINAL_STAGES:
                            return
                        if deadline is not None and time.monotonic() >= deadline:
                            raise _gave_up(cast_id)
            except httpx.ReadTimeout:
                if idle_timeout is not None:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise _gave_up(cast_id) from None
            except (httpx.TransportError, _Retry) as e:
                if not reconnect:
                    if isinstance(e, httpx.TransportError):
                        raise self._unreachable(e) from None
                    raise ApiError(503, "UNAVAILABLE", "the event stream is unavailable") from None
            # The stream ended without a terminal event (or dropped): resume after `last`.
            if not reconnect:
                return
            if not got_event:
                failures += 1
            if failures > max_reconnects:
                raise ApiError(
                    0,
                    "UNAVAILABLE",
                    f"lost the event stream of cast {cast_id} after {max_reconnects} "
                    f"reconnects (last event {last}); the cast continues on the platform",
                )
            if parser.retry_ms is not None:
                delay = parser.retry_ms / 1000
            pause = min(30.0, delay * (2 ** max(0, failures - 1)) if failures else delay)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)

    def on_progress(
        self, cast_id: str, callback: Callable[[dict[str, Any]], None], **kwargs: Any
    ) -> None:
        """Call ``callback`` for every progress event until the cast ends (SPEC §10)."""
        for event in self.events(cast_id, **kwargs):
            callback(event)

    def wait(
        self,
        cast_id: str,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Follow the cast's events until it ends, then return its status (``get_cast``)."""
        deadline = time.monotonic() + timeout if timeout is not None else None
        for event in self.events(cast_id, deadline=deadline):
            if on_event is not None:
                on_event(event)
        # The stream just worked: ride out a brief outage (a restart) for the final status.
        return self._call("GET", f"/v1/casts/{_seg(cast_id)}", retries=5)

    # ------------------------------------------------------------------ billing

    def get_caps(self, account: str | None = None) -> dict[str, Any]:
        return self._call("GET", "/v1/billing/caps", params={"account": account})

    def set_caps(
        self,
        *,
        monthly_cents: int | _Unset | None = UNSET,
        total_cents: int | _Unset | None = UNSET,
        account: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Set the monthly and/or total cap. Only given fields are sent; ``None`` removes a cap."""
        body: dict[str, Any] = {}
        if not isinstance(monthly_cents, _Unset):
            body["monthly_cents"] = monthly_cents
        if not isinstance(total_cents, _Unset):
            body["total_cents"] = total_cents
        if account is not None:
            body["account"] = account
        return self._call(
            "POST",
            "/v1/billing/caps",
            json_body=body,
            headers={"Idempotency-Key": idempotency_key or str(uuid.uuid4())},
            retries=2,
        )

    # ------------------------------------------------------------------ artifacts

    def download(self, url: str, dest: Path) -> Path:
        """Save the artifact behind ``url`` (an absolute, signed ``artifact_url``) to ``dest``.

        ``dest`` may be a folder (the server's file name is used). The bearer token is only sent
        to the platform's own origin, and the ``Digest`` header is checked when present.
        """
        headers = {"Accept": "*/*"}
        if self.token and _origin(url) == _origin(self.api_url):
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            with self._http.stream("GET", url, headers=headers) as resp:
                if not resp.is_success:
                    resp.read()
                    raise error_from_response(resp.status_code, resp.headers, resp.content)
                target = dest
                if dest.is_dir():
                    m = _FILENAME_RE.search(resp.headers.get("Content-Disposition", ""))
                    name = Path(m[1]).name if m else "artifact.zip"
                    target = dest / (name or "artifact.zip")
                target.parent.mkdir(parents=True, exist_ok=True)
                sha = hashlib.sha256()
                fd, tmp = tempfile.mkstemp(prefix=".download-", dir=target.parent)
                try:
                    with os.fdopen(fd, "wb") as out:
                        for chunk in resp.iter_bytes():
                            sha.update(chunk)
                            out.write(chunk)
                    _check_digest(resp.headers.get("Digest"), sha.hexdigest())
                    os.replace(tmp, target)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    raise
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        return target


class _Retry(Exception):
    """Internal: the event stream answered with a retryable status."""


def _gave_up(cast_id: str) -> ApiError:
    return ApiError(
        0,
        "TIMEOUT",
        f"stopped waiting for cast {cast_id}; it continues on the platform "
        f"(follow it with `spell logs {cast_id} --follow`)",
    )


def _check_digest(header: str | None, hexdigest: str) -> None:
    """Compare ``Digest: sha-256=<hex>`` (the platform's form) with what was received."""
    if not header:
        return
    for part in header.split(","):
        algo, _, value = part.strip().partition("=")
        if (
            algo.lower() == "sha-256"
            and re.fullmatch(r"[0-9a-fA-F]{64}", value)
            and value.lower() != hexdigest
        ):
            raise ApiError(
                0,
                "INTERNAL",
                f"the downloaded artifact does not match its digest (got sha256:{hexdigest})",
            )


def _seg(value: str) -> str:
    """One URL path segment (ids never contain '/', but a typo must not reach another route)."""
    return quote(value, safe="@.-_~")
