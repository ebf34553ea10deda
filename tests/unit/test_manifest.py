"""The pure parts of ``spell app create`` (app/github/manifest.py) and the redelivery plan of
``spell webhooks redeliver`` (app/cli/github.py)."""

from __future__ import annotations

import functools
import json
import os
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from app.cli.github import parse_since, plan_redeliveries
from app.github.manifest import (
    PLACEHOLDER_URL,
    AppCredentials,
    ManifestError,
    api_url_for,
    callback_url,
    check_private_key,
    env_file_content,
    install_url,
    is_local_url,
    missing_events,
    new_state,
    normalize_base_url,
    parse_conversion,
    parse_manifest,
    permission_differences,
    registration_url,
    render_message,
    render_page,
    rewrite_manifest,
    shell_path,
    state_matches,
    write_secret_file,
)

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = json.loads((ROOT / "app-manifest.json").read_text())


@functools.cache
def rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # GitHub's "BEGIN RSA PRIVATE KEY"
        serialization.NoEncryption(),
    ).decode()


def conversion(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": 424242,
        "slug": "spell-platform",
        "name": "Spell Platform",
        "html_url": "https://github.com/apps/spell-platform",
        "client_id": "Iv23liABC.def",
        "client_secret": "c" * 40,
        "webhook_secret": "w" * 40,
        "pem": rsa_pem(),
    }
    data.update(over)
    return data


# ------------------------------------------------------------------------------ URLs


def test_every_placeholder_url_is_rewritten_and_the_redirect_is_the_local_callback() -> None:
    out = rewrite_manifest(
        MANIFEST, public_url="https://spell.acme.test/base/", redirect_url=callback_url(3000)
    )
    assert out["url"] == "https://spell.acme.test/base"
    assert out["hook_attributes"]["url"] == "https://spell.acme.test/base/webhooks/github"
    assert out["setup_url"] == "https://spell.acme.test/base/github/setup"
    assert out["redirect_url"] == "http://127.0.0.1:3000/callback"
    assert PLACEHOLDER_URL not in json.dumps(out)
    # Everything else is untouched, and the input is not modified.
    assert out["default_permissions"] == MANIFEST["default_permissions"]
    assert out["default_events"] == MANIFEST["default_events"]
    assert MANIFEST["hook_attributes"]["url"] == f"{PLACEHOLDER_URL}/webhooks/github"


def test_only_the_placeholder_host_is_rewritten() -> None:
    manifest = {
        "name": "x",
        "url": "https://spell.example.com.evil.test/x",  # another host with the same prefix
        "description": "see https://spell.example.com for details",  # not a URL value
        "setup_url": "https://spell.example.com?x=1",
    }
    out = rewrite_manifest(manifest, public_url="http://h.test", redirect_url="http://cb")
    assert out["url"] == manifest["url"]
    assert out["description"] == manifest["description"]
    assert out["setup_url"] == "http://h.test?x=1"


@pytest.mark.parametrize(
    "bad",
    [
        "ftp://h.test",
        "h.test",
        "https://",
        "https://user:pw@h.test",
        "https://h.test/?q=1",
        "https://h.test/#f",
        "https://h.test:99999",
        "https://h.test/a b",
    ],
)
def test_bad_public_urls_are_refused(bad: str) -> None:
    with pytest.raises(ManifestError):
        rewrite_manifest(MANIFEST, public_url=bad, redirect_url="http://cb")


def test_base_url_normalisation_and_local_urls() -> None:
    assert normalize_base_url(" https://h.test/x/ ") == "https://h.test/x"
    assert is_local_url("http://127.0.0.1:8080")
    assert is_local_url("http://localhost:8080")
    assert is_local_url("http://10.1.2.3")
    assert is_local_url("http://[::1]:8080")
    assert not is_local_url("https://spell.acme.test")
    assert not is_local_url("https://8.8.8.8")


def test_registration_url_for_a_user_and_an_organization() -> None:
    assert registration_url("https://github.com/", "s-1") == (
        "https://github.com/settings/apps/new?state=s-1"
    )
    assert registration_url("https://ghe.acme.test", "s", "octo-org") == (
        "https://ghe.acme.test/organizations/octo-org/settings/apps/new?state=s"
    )
    for org in ("a/b", "-x", "x--y", "a" * 40, "x?y", ""):
        with pytest.raises(ManifestError):
            registration_url("https://github.com", "s", org)
    assert (
        install_url("https://github.com/apps/x/") == "https://github.com/apps/x/installations/new"
    )


def test_the_api_url_for_the_code_exchange() -> None:
    assert api_url_for("https://github.com", None) == "https://api.github.com"
    assert api_url_for("https://ghe.acme.test/", None) == "https://ghe.acme.test/api/v3"
    assert api_url_for("https://ghe.acme.test", "http://fake.test/") == "http://fake.test"


def test_manifest_must_be_a_named_json_object() -> None:
    assert parse_manifest('{"name": "x"}') == {"name": "x"}
    for text in ("[1]", "{", ""):
        with pytest.raises(ManifestError):
            parse_manifest(text)
    with pytest.raises(ManifestError):
        rewrite_manifest({"url": "x"}, public_url="https://h.test", redirect_url="http://cb")


# ----------------------------------------------------------------------------- state


def test_state_is_unguessable_and_checked_exactly() -> None:
    a, b = new_state(), new_state()
    assert a != b and len(a) >= 40
    assert state_matches(a, a)
    assert not state_matches(a, b)
    assert not state_matches(a, None)
    assert not state_matches(a, "")
    assert not state_matches("", "")
    assert not state_matches(a, a[:-1])
    assert not state_matches(a, "é" + a)


# ------------------------------------------------------------------------------ page


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, str | None]] = []
        self.inputs: list[dict[str, str | None]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "form":
            self.forms.append(dict(attrs))
        if tag == "input":
            self.inputs.append(dict(attrs))


def parse_page(page: str) -> _Forms:
    p = _Forms()
    p.feed(page)
    p.close()
    return p


def test_page_posts_the_manifest_to_github() -> None:
    manifest = rewrite_manifest(
        MANIFEST, public_url="https://spell.acme.test", redirect_url=callback_url(3000)
    )
    action = registration_url("https://github.com", "st4te")
    page = render_page(manifest, action)
    p = parse_page(page)
    assert p.forms == [{"method": "post", "action": action}]
    assert len(p.inputs) == 1
    assert p.inputs[0]["type"] == "hidden" and p.inputs[0]["name"] == "manifest"
    assert json.loads(p.inputs[0]["value"] or "") == manifest
    assert "script" not in p.tags


HOSTILE = [
    '"><script>alert(1)</script>',
    "' onmouseover='alert(1)",
    "</textarea></form><form action=https://evil.test>",
    "&quot; & &amp; < > \u2028 \u0000 \\",
    "<!-- -->",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_manifest_values_stay_inside_the_attribute(value: str) -> None:
    manifest = {
        "name": value,
        "description": value,
        "url": "https://h.test/" + value,
        "hook_attributes": {"url": value},
        "default_permissions": {value: value},
        "default_events": [value],
        value: value,
    }
    page = render_page(manifest, "https://github.com/settings/apps/new?state=a&b=<c>", org=None)
    p = parse_page(page)
    assert "script" not in p.tags
    assert len(p.forms) == 1 and p.forms[0]["action"] == (
        "https://github.com/settings/apps/new?state=a&b=<c>"
    )
    assert len(p.inputs) == 1
    assert json.loads(p.inputs[0]["value"] or "") == manifest  # the exact manifest, round trip
    assert "<script" not in page and "<form action=https://evil" not in page


def test_messages_are_escaped() -> None:
    page = render_message("<b>", "<script>", link='https://x.test/?a=1&b="2"')
    assert "<script>" not in page and "<b>" not in page.split("<body>")[1]
    assert 'href="https://x.test/?a=1&amp;b=&quot;2&quot;"' in page


# ------------------------------------------------------------------------ conversion


def test_conversion_result_is_checked_and_secrets_stay_out_of_reprs() -> None:
    creds = parse_conversion(conversion())
    assert creds.app_id == 424242 and creds.slug == "spell-platform"
    assert creds.install_url == "https://github.com/apps/spell-platform/installations/new"
    assert creds.pem.endswith("\n")
    text = repr(creds)
    assert "c" * 40 not in text and "w" * 40 not in text and "PRIVATE" not in text


def test_conversion_falls_back_to_the_slug_for_the_app_page() -> None:
    creds = parse_conversion(
        conversion(html_url=None, name=None), github_url="https://ghe.acme.test"
    )
    assert creds.html_url == "https://ghe.acme.test/apps/spell-platform"
    assert creds.name == "spell-platform"
    assert parse_conversion(conversion(webhook_secret=None)).webhook_secret is None


@pytest.mark.parametrize(
    "over",
    [
        {"id": None},
        {"id": "424242"},
        {"id": True},
        {"slug": "a b"},
        {"client_id": "x;rm -rf /"},
        {"client_secret": ""},
        {"client_secret": "a\nb"},
        {"webhook_secret": "a\nGITHUB_APP_ID=1"},
        {"pem": "not a key"},
        {"pem": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"},
    ],
)
def test_bad_conversion_results_are_refused(over: dict[str, Any]) -> None:
    with pytest.raises(ManifestError):
        parse_conversion(conversion(**over))
    with pytest.raises(ManifestError):
        parse_conversion(["not", "an", "object"])


def test_private_key_check() -> None:
    assert check_private_key(rsa_pem()) == 2048
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    with pytest.raises(ManifestError, match="not RSA"):
        check_private_key(ec_pem)
    encrypted = (
        serialization.load_pem_private_key(rsa_pem().encode(), password=None)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
        .decode()
    )
    with pytest.raises(ManifestError, match="encrypted"):
        check_private_key(encrypted)
    with pytest.raises(ManifestError):
        check_private_key("garbage")


# ----------------------------------------------------------------------------- files


def test_env_file_sources_back_to_the_exact_values(tmp_path: Path) -> None:
    nasty = "$(touch pwned)`touch pwned2`'\"; echo x"
    creds = AppCredentials(
        app_id=7,
        slug="s",
        name="n",
        html_url="https://github.com/apps/s",
        client_id="Iv1.abc",
        client_secret=nasty,
        webhook_secret="w $HOME",
        pem=rsa_pem(),
    )
    pem_path = tmp_path / "dir with space" / "github-app.pem"
    content = env_file_content(
        creds,
        pem_path=pem_path,
        api_url="https://api.github.com",
        created_at=datetime(2026, 1, 2, tzinfo=UTC),
    )
    env_file = tmp_path / "github-app.env"
    env_file.write_text(content)
    out = subprocess.run(
        ["sh", "-c", f"set -a; . {shell_path(env_file)}; set +a; env -0"],
        cwd=tmp_path,
        capture_output=True,
        check=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"},
    )
    env = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)
    assert env["GITHUB_APP_ID"] == "7"
    assert env["GITHUB_APP_PRIVATE_KEY_PATH"] == str(pem_path)
    assert env["GITHUB_WEBHOOK_SECRET"] == "w $HOME"
    assert env["GITHUB_CLIENT_ID"] == "Iv1.abc"
    assert env["GITHUB_CLIENT_SECRET"] == nasty
    assert env["GITHUB_API_URL"] == "https://api.github.com"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    assert "PRIVATE KEY" not in content  # the key lives in its own file


def test_shell_path_always_has_a_slash() -> None:
    assert shell_path(Path("github-app.env")) == "./github-app.env"
    assert shell_path(Path(".spell/github-app.env")) == ".spell/github-app.env"
    assert shell_path(Path("/a b/x.env")) == "'/a b/x.env'"


def test_secret_files_are_0600_and_never_replaced_by_accident(tmp_path: Path) -> None:
    old = os.umask(0o000)  # even with a permissive umask
    try:
        path = tmp_path / "github-app.pem"
        write_secret_file(path, b"one")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes() == b"one"
        with pytest.raises(FileExistsError):
            write_secret_file(path, b"two")
        assert path.read_bytes() == b"one"
        path.chmod(0o644)  # an older, looser file is replaced by a 0600 one
        write_secret_file(path, b"three", overwrite=True)
        assert path.read_bytes() == b"three"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["github-app.pem"]  # no temp left
    finally:
        os.umask(old)


def test_secret_files_do_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    link = tmp_path / "github-app.env"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        write_secret_file(link, b"secret")
    assert target.read_bytes() == b"keep"


# ----------------------------------------------------------------------- doctor helpers


def test_permission_and_event_differences() -> None:
    want = {"issues": "write", "metadata": "read", "checks": "write"}
    have = {"issues": "read", "metadata": "read", "pages": "write"}
    assert permission_differences(want, have) == [
        "checks: the manifest asks for write, the App does not have it",
        "issues: the manifest asks for write, the App has read",
        "pages: the App has write, the manifest does not ask for it",
    ]
    assert permission_differences(want, dict(want)) == []
    assert missing_events(["a", "b"], ["b", "c"]) == ["a"]


# ------------------------------------------------------------------- redelivery (CLI)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30m", 1800), ("1h", 3600), ("2d", 172800), ("90s", 90), (" 3D ", 259200)],
)
def test_since_durations(text: str, seconds: int) -> None:
    assert parse_since(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "1", "h", "1w", "-1h", "0m", "4d", "73h", "1h30m"])
def test_bad_since_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_since(text)


def _d(id: int, guid: str, code: int) -> dict[str, Any]:
    return {"id": id, "guid": guid, "status_code": code, "event": "issue_comment"}


def test_redelivery_plan() -> None:
    deliveries = [  # newest first, as GitHub lists them
        _d(9, "g-later-ok", 202),  # a redelivery that worked
        _d(8, "g-new", 502),
        _d(7, "g-done", 500),
        _d(6, "g-pending", 0),  # timed out, but the server stored it
        _d(5, "g-later-ok", 502),
        _d(4, "g-ok", 200),
        _d(3, "g-new", 503),  # an older failed attempt of g-new
        _d(2, "g-redirect", 301),
    ]
    inbox = {"g-done": "done", "g-pending": "pending"}
    plan = plan_redeliveries(deliveries, inbox)
    assert [(d.delivery["id"], d.redeliver) for d in plan] == [
        (8, True),
        (7, False),
        (6, False),
        (2, True),
    ]
    assert "processed" in plan[1].reason and "inbox" in plan[2].reason
