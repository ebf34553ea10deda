"""Webhook verification, delivery headers, event parsing and the router (sans-I/O)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.github.webhooks import (
    BadDelivery,
    DeliveryHeaders,
    Event,
    InvalidSignature,
    Router,
    event_from_http,
    parse_event,
    sign,
    verify_signature,
)

SECRET = "It's a Secret to Everybody"
DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
# GitHub's documented test vector (docs.github.com, "Validating webhook deliveries").
DOC_BODY = b"Hello, World!"
DOC_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def payload(**extra: Any) -> dict[str, Any]:
    return {
        "action": "created",
        "comment": {"id": 1, "body": "/cast acme.hello"},
        "installation": {"id": 42, "node_id": "x"},
        "repository": {"id": 7, "full_name": "octo-org/hello-world"},
        "sender": {"login": "octocat", "type": "User"},
        **extra,
    }


def body_of(data: Any) -> bytes:
    return json.dumps(data).encode()


def headers(**overrides: str) -> dict[str, str]:
    base = {
        "X-GitHub-Event": "issue_comment",
        "X-GitHub-Delivery": DELIVERY,
        "X-GitHub-Hook-ID": "292430182",
        "X-GitHub-Hook-Installation-Target-ID": "79929171",
        "X-GitHub-Hook-Installation-Target-Type": "integration",
        "User-Agent": "GitHub-Hookshot/044aadd",
    }
    base.update(overrides)
    return base


# ---------------------------------------------------------------------------------- signatures


def test_githubs_documented_test_vector_verifies() -> None:
    assert sign(DOC_BODY, SECRET) == DOC_SIGNATURE
    verify_signature(DOC_BODY, signature=DOC_SIGNATURE, secret=SECRET)


def test_a_signature_is_checked_over_the_raw_bytes() -> None:
    raw = b'{"a": 1,  "b": 2}'
    verify_signature(raw, signature=sign(raw, SECRET), secret=SECRET)
    reserialized = json.dumps(json.loads(raw)).encode()  # same JSON, other bytes
    with pytest.raises(InvalidSignature, match="does not match"):
        verify_signature(reserialized, signature=sign(raw, SECRET), secret=SECRET)


def test_bytes_secrets_and_uppercase_hex_are_accepted() -> None:
    sig = sign(DOC_BODY, SECRET.encode())
    verify_signature(DOC_BODY, signature=sig.upper().replace("SHA256=", "sha256="), secret=SECRET)
    verify_signature(DOC_BODY, signature=sig, secret=SECRET.encode())


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        pytest.param(None, "missing", id="missing"),
        pytest.param("", "missing", id="empty"),
        pytest.param("   ", "missing", id="blank"),
        pytest.param("sha1=" + "0" * 40, "malformed", id="sha1"),
        pytest.param(DOC_SIGNATURE[7:], "malformed", id="no-prefix"),
        pytest.param("sha256=" + "0" * 63, "malformed", id="short"),
        pytest.param("sha256=" + "0" * 65, "malformed", id="long"),
        pytest.param("sha256=" + "g" * 64, "malformed", id="not-hex"),
        pytest.param("sha256=" + "é" * 64, "malformed", id="non-ascii"),
        pytest.param("sha256=" + "0" * 64, "does not match", id="wrong-digest"),
        pytest.param(sign(DOC_BODY, "other secret"), "does not match", id="other-secret"),
        pytest.param(sign(DOC_BODY + b"\n", SECRET), "does not match", id="other-body"),
    ],
)
def test_bad_signatures_are_refused(signature: str | None, reason: str) -> None:
    with pytest.raises(InvalidSignature) as info:
        verify_signature(DOC_BODY, signature=signature, secret=SECRET)
    assert reason in info.value.reason
    assert info.value.status == 401
    expected_hex = DOC_SIGNATURE[7:]
    assert SECRET not in str(info.value) and expected_hex not in str(info.value)


def test_any_of_several_secrets_verifies_during_rotation() -> None:
    old, new = "old secret", "new secret"
    verify_signature(DOC_BODY, signature=sign(DOC_BODY, old), secret=[new, old])
    verify_signature(DOC_BODY, signature=sign(DOC_BODY, new), secret=(new, old.encode()))
    with pytest.raises(InvalidSignature):
        verify_signature(DOC_BODY, signature=sign(DOC_BODY, "retired"), secret=[new, old])


@pytest.mark.parametrize(
    "secret",
    [pytest.param("", id="empty"), pytest.param([], id="none"), pytest.param(["x", b""], id="one")],
)
def test_an_empty_secret_is_a_configuration_error(secret: Any) -> None:
    with pytest.raises(ValueError, match="secret is required"):
        verify_signature(DOC_BODY, signature=DOC_SIGNATURE, secret=secret)


@given(st.binary(max_size=2048), st.text(min_size=1, max_size=40))
def test_sign_then_verify_always_passes(body: bytes, secret: str) -> None:
    verify_signature(body, signature=sign(body, secret), secret=secret)


@given(st.binary(max_size=256), st.binary(min_size=1, max_size=256))
def test_a_changed_body_never_verifies(body: bytes, suffix: bytes) -> None:
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    with pytest.raises(InvalidSignature):
        verify_signature(body + suffix, signature=sig, secret=SECRET)


# ---------------------------------------------------------------------------------- headers


def test_delivery_headers_are_read() -> None:
    h = DeliveryHeaders.from_headers(headers(**{"X-Hub-Signature-256": DOC_SIGNATURE}))
    assert h == DeliveryHeaders(
        event="issue_comment",
        delivery_id=DELIVERY,
        signature_256=DOC_SIGNATURE,
        hook_id=292430182,
        installation_target_id=79929171,
        installation_target_type="integration",
    )


def test_header_names_are_case_insensitive_and_optional_ones_may_be_missing() -> None:
    h = DeliveryHeaders.from_headers({"x-github-event": "ping", "X-GITHUB-DELIVERY": DELIVERY})
    assert (h.event, h.delivery_id, h.hook_id, h.signature_256) == ("ping", DELIVERY, None, None)


@pytest.mark.parametrize(
    ("hdrs", "reason"),
    [
        pytest.param({"X-GitHub-Delivery": DELIVERY}, "missing X-GitHub-Event", id="no-event"),
        pytest.param({"X-GitHub-Event": "push"}, "missing X-GitHub-Delivery", id="no-delivery"),
        pytest.param(headers(**{"X-GitHub-Event": ""}), "missing X-GitHub-Event", id="empty"),
        pytest.param(headers(**{"X-GitHub-Event": "Push!"}), "X-GitHub-Event", id="bad-event"),
        pytest.param(headers(**{"X-GitHub-Delivery": "a" * 65}), "at most 64", id="long-id"),
        pytest.param(headers(**{"X-GitHub-Delivery": "a b"}), "X-GitHub-Delivery", id="space"),
        pytest.param(headers(**{"X-GitHub-Delivery": "../x"}), "X-GitHub-Delivery", id="path"),
        pytest.param(headers(**{"X-GitHub-Hook-ID": "12a"}), "integer", id="bad-hook-id"),
        pytest.param(
            headers(**{"X-GitHub-Hook-Installation-Target-ID": "-1"}), "integer", id="neg-target"
        ),
    ],
)
def test_bad_delivery_headers_are_refused(hdrs: dict[str, str], reason: str) -> None:
    with pytest.raises(BadDelivery, match=reason) as info:
        DeliveryHeaders.from_headers(hdrs)
    assert info.value.status == 400


# ---------------------------------------------------------------------------------- events


def test_an_event_is_parsed_with_its_routing_fields() -> None:
    event = parse_event("issue_comment", DELIVERY, body_of(payload()))
    assert event == Event(
        name="issue_comment",
        action="created",
        delivery_id=DELIVERY,
        payload=payload(),
        installation_id=42,
        repository="octo-org/hello-world",
        sender_login="octocat",
        sender_type="User",
    )


def test_missing_or_odd_fields_become_none() -> None:
    data = {
        "zen": "Keep it logically awesome.",
        "installation": {"id": True},
        "repository": {"full_name": 5},
        "sender": "octocat",
    }
    event = parse_event("ping", DELIVERY, body_of(data))
    assert (event.action, event.installation_id, event.repository, event.sender_login) == (
        None,
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"payload=%7B%7D", id="form-encoded"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
        pytest.param(b"[1, 2]", id="array"),
        pytest.param(b'"text"', id="string"),
        pytest.param(b"[" * 100_000, id="deeply-nested"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_bad_delivery(body: bytes) -> None:
    with pytest.raises(BadDelivery):
        parse_event("issue_comment", DELIVERY, body)


def test_event_from_http_verifies_before_it_parses() -> None:
    raw = body_of(payload())
    signed = headers(**{"X-Hub-Signature-256": sign(raw, SECRET)})
    ev = event_from_http(signed, raw, secret=SECRET)
    assert ev.installation_id == 42
    # A body that would not even parse is refused for its signature first.
    forged = headers(**{"X-Hub-Signature-256": "sha256=" + "0" * 64})
    with pytest.raises(InvalidSignature):
        event_from_http(forged, b"{", secret=SECRET)
    with pytest.raises(InvalidSignature, match="missing"):
        event_from_http(headers(), raw, secret=SECRET)


# ---------------------------------------------------------------------------------- router


def event(name: str = "issue_comment", action: str | None = "created") -> Event:
    return Event(name, action, DELIVERY, {}, None, None, None, None)


async def test_handlers_run_for_their_event_and_action() -> None:
    router = Router()
    calls: list[str] = []

    @router.register("issue_comment", action="created")
    async def on_issue_comment_created(ev: Event, tag: str) -> None:
        calls.append(f"created:{tag}")

    @router.register("issue_comment")
    async def on_issue_comment(ev: Event, tag: str) -> None:
        calls.append(f"any:{tag}")

    @router.register("issue_comment", action="edited")
    async def on_issue_comment_edited(ev: Event, tag: str) -> None:
        calls.append("edited")

    assert await router.dispatch(event(), "t") == 2
    assert calls == ["any:t", "created:t"]
    assert await router.dispatch(event("push", None), "t") == 0
    assert await router.dispatch(event(action=None), "t") == 1


async def test_routers_compose() -> None:
    comments, installs = Router(), Router()
    seen: list[str] = []

    @comments.register("issue_comment", action="created")
    async def on_issue_comment_created(ev: Event) -> None:
        seen.append("comment")

    @installs.register("installation", action="created")
    async def on_installation_created(ev: Event) -> None:
        seen.append("install")

    app = Router(comments, installs)
    await app.dispatch(event())
    await app.dispatch(event("installation"))
    assert seen == ["comment", "install"]
    assert app.fetch(event()) == [on_issue_comment_created]


async def test_a_handler_error_propagates() -> None:
    router = Router()

    @router.register("issue_comment")
    async def boom(ev: Event) -> None:
        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        await router.dispatch(event())


def test_only_async_handlers_can_be_registered() -> None:
    def sync_handler(ev: Event) -> None:  # pragma: no cover - never called
        pass

    with pytest.raises(TypeError, match="async"):
        Router().add(sync_handler, "issue_comment")  # type: ignore[arg-type]
