"""Pure helpers for the GitHub App manifest flow (``spell app create``), as Probot's setup does it.

The flow (https://docs.github.com/apps/sharing-github-apps/registering-a-github-app-from-a-manifest):

1. A local page holds a form that POSTs ``manifest=<json>`` to
   ``{github}/settings/apps/new?state=STATE`` (or ``/organizations/{org}/settings/apps/new``).
   The manifest is ``app-manifest.json`` with its placeholder host replaced by the server's
   public URL and ``redirect_url`` pointing at the local callback.
2. The owner confirms on GitHub; GitHub redirects to ``redirect_url?code=…&state=…``.
3. The callback checks ``state`` (CSRF) and exchanges the code
   (``POST /app-manifests/{code}/conversions``) for the App's id, client id/secret, webhook secret
   and private key, which are written to the data directory with 0600 permissions.

Everything here is pure (values in, values out) except :func:`write_secret_file`, the one place
that writes a credential to disk.
"""

from __future__ import annotations

import copy
import hmac
import html
import ipaddress
import json
import os
import re
import secrets
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

#: The host ``app-manifest.json`` uses for the platform's own URLs.
PLACEHOLDER_URL: Final = "https://spell.example.com"
DEFAULT_GITHUB_URL: Final = "https://github.com"
DEFAULT_API_URL: Final = "https://api.github.com"
DEFAULT_PUBLIC_URL: Final = "http://127.0.0.1:8080"
PEM_FILE: Final = "github-app.pem"
ENV_FILE: Final = "github-app.env"
CALLBACK_PATH: Final = "/callback"
#: GitHub logins (users and organizations): alphanumerics and single hyphens, ≤ 39 characters.
LOGIN_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}")
_CLIENT_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,100}")
_SLUG_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,100}")


class ManifestError(ValueError):
    """A manifest, URL or conversion result the flow cannot use (the message says why)."""


# ------------------------------------------------------------------------------------ URLs


def normalize_base_url(url: str, *, what: str = "URL") -> str:
    """``url`` checked as an http(s) base URL (no query, fragment or credentials), without its
    trailing slash. Raises :class:`ManifestError`."""
    text = (url or "").strip()
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as e:
        raise ManifestError(f"{what} {url!r} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ManifestError(f"{what} must be an http:// or https:// URL with a host, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ManifestError(f"{what} must not contain credentials")
    if parts.query or parts.fragment:
        raise ManifestError(f"{what} must not have a query or fragment, got {url!r}")
    if any(c.isspace() or ord(c) < 0x20 for c in text):
        raise ManifestError(f"{what} must not contain spaces or control characters")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def is_local_url(url: str) -> bool:
    """True when GitHub could never reach ``url`` (loopback, private or link-local address,
    ``localhost``, ``*.local``/``*.internal``): its webhooks would fail."""
    host = (urlsplit(url).hostname or "").lower()
    if host in ("localhost", "") or host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified


def api_url_for(github_url: str, configured: str | None) -> str:
    """The REST API base for the code exchange: ``GITHUB_API_URL`` when it is set, else
    ``https://api.github.com`` for github.com and ``{github_url}/api/v3`` for GitHub Enterprise
    Server."""
    if configured:
        return configured.rstrip("/")
    base = normalize_base_url(github_url, what="--github-url")
    if urlsplit(base).hostname in ("github.com", "www.github.com"):
        return DEFAULT_API_URL
    return f"{base}/api/v3"


def callback_url(port: int) -> str:
    """The local callback GitHub redirects the browser to."""
    return f"http://127.0.0.1:{int(port)}{CALLBACK_PATH}"


def registration_url(github_url: str, state: str, org: str | None = None) -> str:
    """Where the form posts the manifest: the user's or the organization's "new App" page."""
    base = normalize_base_url(github_url, what="--github-url")
    if org is not None:
        if not LOGIN_RE.fullmatch(org):
            raise ManifestError(f"--org {org!r} is not a GitHub organization name")
        path = f"/organizations/{quote(org, safe='')}/settings/apps/new"
    else:
        path = "/settings/apps/new"
    return f"{base}{path}?state={quote(state, safe='')}"


def install_url(html_url: str) -> str:
    """The page where the owner installs the App on accounts and repositories."""
    return f"{html_url.rstrip('/')}/installations/new"


# -------------------------------------------------------------------------------- manifest


def _rewrite(value: Any, public_url: str) -> Any:
    if isinstance(value, dict):
        return {k: _rewrite(v, public_url) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, public_url) for v in value]
    if isinstance(value, str) and (
        value == PLACEHOLDER_URL or value.startswith(tuple(PLACEHOLDER_URL + c for c in "/?#"))
    ):
        return public_url + value[len(PLACEHOLDER_URL) :]
    return value


def rewrite_manifest(
    manifest: Mapping[str, Any], *, public_url: str, redirect_url: str
) -> dict[str, Any]:
    """A copy of ``manifest`` whose URLs on the placeholder host point at ``public_url`` and
    whose ``redirect_url`` (where GitHub sends the browser with the code) is ``redirect_url``."""
    if not isinstance(manifest, Mapping):
        raise ManifestError("the manifest must be a JSON object")
    if not isinstance(manifest.get("name"), str) or not manifest["name"].strip():
        raise ManifestError("the manifest needs a name")
    base = normalize_base_url(public_url, what="--public-url")
    out = _rewrite(copy.deepcopy(dict(manifest)), base)
    assert isinstance(out, dict)
    out["redirect_url"] = redirect_url
    return out


def parse_manifest(text: str) -> dict[str, Any]:
    """``app-manifest.json``'s text as a JSON object (raises :class:`ManifestError`)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"the manifest is not valid JSON (line {e.lineno} column {e.colno})"
        ) from None
    if not isinstance(data, dict):
        raise ManifestError("the manifest must be a JSON object")
    return data


def permission_differences(
    expected: Mapping[str, Any] | None, actual: Mapping[str, Any] | None
) -> list[str]:
    """Human lines for every permission of the manifest the App lacks, has at another level, or
    has beyond the manifest (empty: they match)."""
    want = {str(k): str(v) for k, v in (expected or {}).items()}
    have = {str(k): str(v) for k, v in (actual or {}).items()}
    out = []
    for name in sorted(set(want) | set(have)):
        w, h = want.get(name), have.get(name)
        if w == h:
            continue
        if h is None:
            out.append(f"{name}: the manifest asks for {w}, the App does not have it")
        elif w is None:
            out.append(f"{name}: the App has {h}, the manifest does not ask for it")
        else:
            out.append(f"{name}: the manifest asks for {w}, the App has {h}")
    return out


def missing_events(expected: Sequence[Any] | None, actual: Sequence[Any] | None) -> list[str]:
    """Events of the manifest the App is not subscribed to."""
    have = {str(e) for e in actual or ()}
    return sorted({str(e) for e in expected or ()} - have)


# ----------------------------------------------------------------------------------- state


def new_state() -> str:
    """An unguessable ``state`` for one run of the flow (256 bits)."""
    return secrets.token_urlsafe(32)


def state_matches(expected: str, received: str | None) -> bool:
    """Constant-time check that the callback carries the state this run handed out."""
    if not expected or not received:
        return False
    return hmac.compare_digest(expected.encode(), received.encode())


# ------------------------------------------------------------------------------------ page

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:42rem;margin:3rem auto;padding:0 1rem;"
    "line-height:1.5}button{font-size:1.1rem;padding:.6rem 1.2rem;cursor:pointer}"
    "code{background:#f3f3f3;padding:0 .2rem}"
)

#: Headers for every local page: nothing loads, nothing frames it, nothing is cached or leaked.
PAGE_HEADERS: Final[Mapping[str, str]] = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


def _document(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


def render_page(manifest: Mapping[str, Any], action_url: str, *, org: str | None = None) -> str:
    """The local page: a form that POSTs ``manifest`` (JSON, escaped for the attribute) to
    ``action_url``. No script: the owner presses the button."""
    name = str(manifest.get("name", "GitHub App"))
    payload = json.dumps(manifest, ensure_ascii=False, separators=(",", ":"))
    where = f"the organization <b>{html.escape(org)}</b>" if org else "your GitHub account"
    perms = manifest.get("default_permissions") or {}
    perm_text = (
        ", ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in perms.items())
        if isinstance(perms, Mapping)
        else ""
    )
    events = manifest.get("default_events") or []
    event_text = ", ".join(html.escape(str(e)) for e in events) if isinstance(events, list) else ""
    hook = manifest.get("hook_attributes") or {}
    hook_url = str(hook.get("url", "")) if isinstance(hook, Mapping) else ""
    body = (
        f"<h1>Register {html.escape(name)}</h1>\n"
        f"<p>This creates a GitHub App owned by {where}. GitHub shows the settings for you to "
        "confirm; then it sends you back here and <code>spell app create</code> saves the App's "
        "credentials (0600) in the data directory.</p>\n"
        f"<p>Webhook URL: <code>{html.escape(hook_url)}</code><br>"
        f"Permissions: {perm_text or 'none'}<br>Events: {event_text or 'none'}</p>\n"
        f'<form method="post" action="{html.escape(action_url, quote=True)}">\n'
        f'<input type="hidden" name="manifest" value="{html.escape(payload, quote=True)}">\n'
        '<button type="submit">Create the GitHub App on GitHub</button>\n</form>\n'
    )
    return _document(f"Register {name}", body)


def render_message(title: str, text: str, *, link: str | None = None) -> str:
    """A small page for the browser (refusals, errors, the result)."""
    body = f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(text)}</p>"
    if link:
        href = html.escape(link, quote=True)
        body += f'\n<p><a href="{href}">{html.escape(link)}</a></p>'
    return _document(title, body)


# ------------------------------------------------------------------------------ conversion


@dataclass(frozen=True)
class AppCredentials:
    """What ``POST /app-manifests/{code}/conversions`` returns, checked."""

    app_id: int
    slug: str
    name: str
    html_url: str
    client_id: str
    client_secret: str = field(repr=False)
    webhook_secret: str | None = field(repr=False)
    pem: str = field(repr=False)

    @property
    def install_url(self) -> str:
        return install_url(self.html_url)


def _secret_text(data: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ManifestError(f"GitHub's answer has no {key}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ManifestError(f"GitHub's {key} contains control characters")
    return value


def check_private_key(pem: str) -> int:
    """The key size in bits of an unencrypted RSA private key in PEM (GitHub Apps sign JWTs
    with RS256); raises :class:`ManifestError` when it is not one."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except TypeError:
        raise ManifestError("the private key is encrypted (GitHub's keys are not)") from None
    except (ValueError, UnicodeError) as e:
        reason = str(e).split("\n", 1)[0] or type(e).__name__
        raise ManifestError(f"the private key is not a PEM private key ({reason})") from None
    except Exception as e:  # cryptography raises its own types for some malformed input
        raise ManifestError(
            f"the private key is not a PEM private key ({type(e).__name__})"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ManifestError(f"the private key is {type(key).__name__}, not RSA")
    return int(key.key_size)


def parse_conversion(data: Any, *, github_url: str = DEFAULT_GITHUB_URL) -> AppCredentials:
    """Check the conversion answer and keep what the platform needs."""
    if not isinstance(data, Mapping):
        raise ManifestError("GitHub's answer is not a JSON object")
    app_id = data.get("id")
    if isinstance(app_id, bool) or not isinstance(app_id, int) or app_id <= 0:
        raise ManifestError("GitHub's answer has no App id")
    slug = data.get("slug")
    if not isinstance(slug, str) or not _SLUG_RE.fullmatch(slug):
        raise ManifestError("GitHub's answer has no valid App slug")
    client_id = _secret_text(data, "client_id")
    assert client_id is not None
    if not _CLIENT_ID_RE.fullmatch(client_id):
        raise ManifestError("GitHub's client_id has unexpected characters")
    client_secret = _secret_text(data, "client_secret")
    webhook_secret = _secret_text(data, "webhook_secret", required=False)
    pem = data.get("pem")
    if not isinstance(pem, str) or "PRIVATE KEY" not in pem:
        raise ManifestError("GitHub's answer has no private key (pem)")
    check_private_key(pem)
    raw_html = data.get("html_url")
    try:
        html_url = normalize_base_url(str(raw_html), what="html_url") if raw_html else ""
    except ManifestError:
        html_url = ""
    if not html_url:
        html_url = f"{normalize_base_url(github_url)}/apps/{slug}"
    name = data.get("name")
    return AppCredentials(
        app_id=app_id,
        slug=slug,
        name=name if isinstance(name, str) and name else slug,
        html_url=html_url,
        client_id=client_id,
        client_secret=client_secret or "",
        webhook_secret=webhook_secret,
        pem=pem if pem.endswith("\n") else pem + "\n",
    )


# ------------------------------------------------------------------------------------ files


def shell_path(path: Path) -> str:
    """``path`` quoted for ``sh``'s ``.`` builtin (which searches PATH for names without ``/``)."""
    text = str(path)
    if "/" not in text:
        text = "./" + text
    return shlex.quote(text)


def env_file_content(
    creds: AppCredentials,
    *,
    pem_path: Path,
    api_url: str | None = None,
    env_path: Path | None = None,
    created_at: datetime | None = None,
) -> str:
    """``github-app.env``: the settings ``spell serve`` reads, as ``sh`` assignments (every value
    quoted, so ``set -a; . github-app.env; set +a`` never runs anything)."""
    lines = [
        f"# GitHub App {creds.name!r} ({creds.slug}), written by `spell app create`"
        + (f" at {created_at.isoformat(timespec='seconds')}" if created_at else ""),
        "# Secrets: keep this file 0600. Load it into the environment of `spell serve`:",
        f"#   set -a; . {shell_path(env_path or Path(ENV_FILE))}; set +a",
        f"GITHUB_APP_ID={creds.app_id}",
        f"GITHUB_APP_PRIVATE_KEY_PATH={shlex.quote(str(pem_path))}",
    ]
    if creds.webhook_secret is not None:
        lines.append(f"GITHUB_WEBHOOK_SECRET={shlex.quote(creds.webhook_secret)}")
    else:
        lines.append("# GitHub returned no webhook secret: set GITHUB_WEBHOOK_SECRET yourself")
    lines += [
        f"GITHUB_CLIENT_ID={shlex.quote(creds.client_id)}",
        f"GITHUB_CLIENT_SECRET={shlex.quote(creds.client_secret)}",
    ]
    if api_url:
        lines.append(f"GITHUB_API_URL={shlex.quote(api_url)}")
    return "\n".join(lines) + "\n"


def write_secret_file(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte.

    The bytes go to a new private temporary file (``os.open`` with ``O_EXCL`` and mode 0600 —
    never a chmod afterwards) and are fsynced; the file is then linked into place (refusing an
    existing ``path`` with :class:`FileExistsError`) or, with ``overwrite``, renamed over it. A
    reader never sees a partial file and an older, looser file mode never survives.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
