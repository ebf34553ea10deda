"""The S3-compatible artifact store against a real S3 server started by the tests (moto).

Two ``moto_server`` processes on free ports on 127.0.0.1: an open one (any credentials), and
one with IAM authentication on (``INITIAL_NO_AUTH_ACTION_COUNT``), where the fixture makes a user,
its policy and an access key, so wrong keys and wrong secrets are refused the way S3 refuses
them. Every test gets its own bucket. No skip: moto is part of the test extra, so a server that
cannot start is a failure.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiobotocore.session import get_session

from app.artifacts import open_object_store, route_artifacts
from app.artifacts import s3 as s3_module
from app.artifacts.local import LocalArtifactStore
from app.artifacts.s3 import MIN_PART_SIZE, ArtifactCorrupt, S3ArtifactStore, S3Config
from app.config import Settings
from app.errors import AppError
from app.web.app import OBJECT_STORE, Overrides, create_app
from app.worker.main import build_worker_app
from tests.conftest import FakeSandbox, FrozenClock, Harness
from tests.e2e.test_jetstream import namespace, nats_url, pg_base, pg_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.e2e

KEY_ID = "AKIATESTTESTTEST0001"
SECRET = "test-secret-" + "s" * 28


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_moto(tmp: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = Path(sys.executable).with_name("moto_server")
    assert binary.exists(), "moto_server is missing: install the test extra (moto[server])"
    port = _free_port()
    log = (tmp / f"moto-{port}.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )
    for _ in range(300):
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited with {proc.returncode}; see {log.name}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("moto_server did not answer")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = _start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A moto server that checks credentials; returns its url, a valid key pair and a bucket."""
    # the first 4 requests (user, policy, key, bucket) go unchecked; every later one is checked
    proc, url = _start_moto(tmp_path_factory.mktemp("moto-iam"), INITIAL_NO_AUTH_ACTION_COUNT="4")
    bucket = "spell-iam-bucket"

    async def setup() -> dict[str, str]:
        session = get_session()
        async with session.create_client(
            "iam",
            region_name="us-east-1",
            endpoint_url=url,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        ) as iam:
            await iam.create_user(UserName="spell")
            await iam.put_user_policy(
                UserName="spell",
                PolicyName="artifacts",
                PolicyDocument=json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                    }
                ),
            )
            key = (await iam.create_access_key(UserName="spell"))["AccessKey"]
        async with session.create_client(
            "s3",
            region_name="us-east-1",
            endpoint_url=url,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        ) as s3:
            await s3.create_bucket(Bucket=bucket)
        return {
            "url": url,
            "bucket": bucket,
            "key_id": key["AccessKeyId"],
            "secret": key["SecretAccessKey"],
        }

    try:
        yield asyncio.run(setup())
    finally:
        _stop(proc)


@pytest.fixture
async def s3(s3_endpoint: str) -> AsyncIterator[Any]:
    """A raw client on the open server (to create buckets and to tamper with objects)."""
    async with get_session().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=s3_endpoint,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    ) as client:
        yield client


@pytest.fixture
async def bucket(s3: Any) -> str:
    name = f"spell-t-{secrets.token_hex(6)}"
    await s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


def _config(endpoint: str, bucket: str, tmp_path: Path, **extra: Any) -> S3Config:
    fields: dict[str, Any] = {
        "bucket": bucket,
        "prefix": "spell/",
        "endpoint_url": endpoint,
        "access_key_id": KEY_ID,
        "secret_access_key": SECRET,
        "ttl": 3600,
        "cache_dir": tmp_path / "cache",
    }
    return S3Config(**{**fields, **extra})


@pytest.fixture
async def store(
    s3_endpoint: str, bucket: str, tmp_path: Path, clock: FrozenClock
) -> AsyncIterator[S3ArtifactStore]:
    st = await S3ArtifactStore(_config(s3_endpoint, bucket, tmp_path), clock).open()
    try:
        yield st
    finally:
        await st.aclose()


def _file(tmp_path: Path, size: int, name: str = "out.zip") -> tuple[Path, bytes, str]:
    data = secrets.token_bytes(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data, "sha256:" + hashlib.sha256(data).hexdigest()


async def _http_get(url: str) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return r.status, await r.read(), dict(r.headers)


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


# ---------------------------------------------------------------------------- the store


async def test_put_then_presigned_download_gives_the_exact_bytes(
    store: S3ArtifactStore, s3: Any, bucket: str, tmp_path: Path
) -> None:
    src, data, digest = _file(tmp_path, 300_000)
    location = await store.put("a_first", src, digest=digest)
    assert location.startswith(f"s3://{bucket}/spell/artifacts/a_first.zip#")

    url = await store.redirect_url(location)
    assert url is not None and url.startswith(f"{store.config.endpoint_url}/{bucket}/")
    status, body, headers = await _http_get(url)
    assert status == 200
    assert body == data
    assert headers["Content-Type"] == "application/zip"
    assert headers["Content-Disposition"] == 'attachment; filename="a_first.zip"'

    head = await s3.head_object(
        Bucket=bucket, Key="spell/artifacts/a_first.zip", ChecksumMode="ENABLED"
    )
    assert head["ServerSideEncryption"] == "AES256"  # encryption at rest was requested
    assert head["Metadata"]["sha256"] == digest.removeprefix("sha256:")
    assert head["ChecksumSHA256"] == "".join(
        base64.b64encode(hashlib.sha256(data).digest()).decode()
    )
    assert head["ContentLength"] == len(data)

    # the verified read path gives the same bytes
    path = await store.open_path(location)
    assert path.read_bytes() == data


async def test_a_large_body_is_hashed_off_the_event_loop(
    store: S3ArtifactStore, s3: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[tuple[int, bool]] = []  # (size, on the event loop's thread)
    loop_thread = threading.get_ident()
    real = s3_module._sha256_digest

    def spy(data: bytes) -> bytes:
        hashed.append((len(data), threading.get_ident() == loop_thread))
        return real(data)

    monkeypatch.setattr(s3_module, "_sha256_digest", spy)
    big, big_data, big_digest = _file(tmp_path, s3_module.INLINE_HASH_MAX + 1, "big.zip")
    small, _, small_digest = _file(tmp_path, 1000, "small.zip")
    location = await store.put("a_large", big, digest=big_digest)
    await store.put("a_small", small, digest=small_digest)
    assert hashed == [(len(big_data), False), (1000, True)]  # the large one in a thread
    head = await s3.head_object(
        Bucket=bucket, Key="spell/artifacts/a_large.zip", ChecksumMode="ENABLED"
    )
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(big_data).digest()).decode()
    assert (await store.open_path(location)).read_bytes() == big_data


async def test_put_is_idempotent_per_artifact_id_and_never_replaces_another_digest(
    store: S3ArtifactStore, s3: Any, bucket: str, tmp_path: Path
) -> None:
    src, _, digest = _file(tmp_path, 1000)
    first = await store.put("a_same", src, digest=digest)
    before = await s3.head_object(Bucket=bucket, Key="spell/artifacts/a_same.zip")
    again = await store.put("a_same", src, digest=digest)
    after = await s3.head_object(Bucket=bucket, Key="spell/artifacts/a_same.zip")
    assert again.split("#")[0] == first.split("#")[0]
    assert after["ETag"] == before["ETag"]
    listed = await s3.list_objects_v2(Bucket=bucket, Prefix="spell/")
    assert [o["Key"] for o in listed["Contents"]] == ["spell/artifacts/a_same.zip"]

    other, _, other_digest = _file(tmp_path, 1000, "other.zip")
    with pytest.raises(AppError) as e:
        await store.put("a_same", other, digest=other_digest)
    assert e.value.code == "CONFLICT"


async def test_a_file_that_does_not_match_its_digest_is_not_uploaded(
    store: S3ArtifactStore, s3: Any, bucket: str, tmp_path: Path
) -> None:
    src, _, _ = _file(tmp_path, 1000)
    with pytest.raises(AppError) as e:
        await store.put("a_wrong", src, digest="sha256:" + "0" * 64)
    assert e.value.code == "INTERNAL"
    listed = await s3.list_objects_v2(Bucket=bucket, Prefix="spell/")
    assert listed.get("KeyCount") == 0


async def test_big_artifacts_go_multipart_with_a_checksum_per_part(
    s3_endpoint: str, s3: Any, bucket: str, tmp_path: Path, clock: FrozenClock
) -> None:
    cfg = _config(s3_endpoint, bucket, tmp_path, part_size=MIN_PART_SIZE)
    st = await S3ArtifactStore(cfg, clock).open()
    try:
        src, data, digest = _file(tmp_path, 2 * MIN_PART_SIZE + 12345)
        location = await st.put("a_big", src, digest=digest)
        head = await s3.head_object(
            Bucket=bucket, Key="spell/artifacts/a_big.zip", ChecksumMode="ENABLED"
        )
        assert head["ETag"].strip('"').endswith("-3")  # three parts
        assert head["ContentLength"] == len(data)
        assert head["ServerSideEncryption"] == "AES256"
        assert head["Metadata"]["sha256"] == digest.removeprefix("sha256:")
        # S3's composite checksum: the SHA-256 of the three parts' SHA-256 digests
        step = MIN_PART_SIZE
        parts = [data[i : i + step] for i in range(0, len(data), step)]
        composite = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts))
        assert len(parts) == 3
        assert head["ChecksumSHA256"].split("-")[0] == base64.b64encode(composite.digest()).decode()
        part = await s3.head_object(
            Bucket=bucket, Key="spell/artifacts/a_big.zip", PartNumber=3, ChecksumMode="ENABLED"
        )
        assert part["ContentLength"] == 12345
        path = await st.open_path(location)
        assert path.read_bytes() == data
        assert (await s3.list_multipart_uploads(Bucket=bucket)).get("Uploads", []) == []
    finally:
        await st.aclose()


async def test_kms_encryption_can_be_requested(
    s3_endpoint: str, s3: Any, bucket: str, tmp_path: Path, clock: FrozenClock
) -> None:
    cfg = _config(s3_endpoint, bucket, tmp_path, sse="aws:kms", kms_key_id="alias/spell")
    st = await S3ArtifactStore(cfg, clock).open()
    try:
        src, _, digest = _file(tmp_path, 2000)
        await st.put("a_kms", src, digest=digest)
        head = await s3.head_object(Bucket=bucket, Key="spell/artifacts/a_kms.zip")
        assert head["ServerSideEncryption"] == "aws:kms"
        assert head["SSEKMSKeyId"].endswith("alias/spell")
    finally:
        await st.aclose()


async def test_a_tampered_object_is_refused_on_read_and_nothing_is_served(
    store: S3ArtifactStore, s3: Any, bucket: str, tmp_path: Path
) -> None:
    src, data, digest = _file(tmp_path, 50_000)
    location = await store.put("a_tamper", src, digest=digest)
    key = "spell/artifacts/a_tamper.zip"
    evil = bytearray(data)
    evil[100] ^= 0xFF

    # 1. the bytes change, the metadata is kept: only reading the bytes can tell
    await s3.put_object(Bucket=bucket, Key=key, Body=bytes(evil), Metadata={"sha256": digest[7:]})
    with pytest.raises(ArtifactCorrupt) as e:
        await store.open_path(location)
    assert e.value.code == "INTERNAL"
    assert e.value.detail == {"reason": "ARTIFACT_CORRUPT"}
    assert "does not match its recorded sha256" in e.value.message
    assert list((tmp_path / "cache").iterdir()) == []  # no copy left behind to be served

    # 2. bytes and metadata both rewritten: the ledger's digest (in the location) still wins
    await s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=bytes(evil),
        Metadata={"sha256": hashlib.sha256(evil).hexdigest()},
    )
    with pytest.raises(ArtifactCorrupt):
        await store.open_path(location)
    with pytest.raises(ArtifactCorrupt):  # and no presigned URL is handed out for it
        await store.redirect_url(location)
    assert list((tmp_path / "cache").iterdir()) == []

    # 3. the object is gone: FileNotFoundError, which the platform answers with 410
    await s3.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(FileNotFoundError):
        await store.open_path(location)
    with pytest.raises(FileNotFoundError):
        await store.redirect_url(location)


async def test_presigned_urls_live_exactly_as_long_as_the_artifact(
    store: S3ArtifactStore, tmp_path: Path, clock: FrozenClock
) -> None:
    src, _, digest = _file(tmp_path, 100)
    location = await store.put("a_ttl", src, digest=digest)  # TTL 3600 s from the fake clock

    q = _query(str(await store.redirect_url(location)))
    assert q["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert q["X-Amz-Expires"] == "3600"
    assert "X-Amz-Signature" in q and "X-Amz-Date" in q
    assert KEY_ID in q["X-Amz-Credential"] and SECRET not in json.dumps(q)

    clock.advance(3000)  # a URL minted later only lives for what is left of the TTL
    assert _query(str(await store.redirect_url(location)))["X-Amz-Expires"] == "600"
    clock.advance(599)
    assert _query(str(await store.redirect_url(location)))["X-Amz-Expires"] == "1"
    clock.advance(1)  # the TTL is over: nothing more is handed out or read
    with pytest.raises(FileNotFoundError):
        await store.redirect_url(location)
    with pytest.raises(FileNotFoundError):
        await store.open_path(location)


async def test_presigned_urls_are_capped_at_the_sigv4_limit_of_seven_days(
    s3_endpoint: str, bucket: str, tmp_path: Path, clock: FrozenClock
) -> None:
    cfg = _config(s3_endpoint, bucket, tmp_path, ttl=30 * 24 * 3600)
    st = await S3ArtifactStore(cfg, clock).open()
    try:
        src, _, digest = _file(tmp_path, 100)
        location = await st.put("a_long", src, digest=digest)
        q = _query(str(await st.redirect_url(location)))
        assert q["X-Amz-Expires"] == str(7 * 24 * 3600)
    finally:
        await st.aclose()


async def test_put_object_stores_any_file_under_a_key_in_both_stores(
    store: S3ArtifactStore, s3: Any, bucket: str, tmp_path: Path
) -> None:
    seg = tmp_path / "segment.jsonl"
    seg.write_text('{"seq": 1}\n{"seq": 2}\n')
    location = await store.put_object(
        "audit/2026-11-26.jsonl", seg, content_type="application/x-ndjson"
    )
    assert location.startswith(f"s3://{bucket}/spell/audit/2026-11-26.jsonl#sha256=")
    head = await s3.head_object(Bucket=bucket, Key="spell/audit/2026-11-26.jsonl")
    assert head["ContentType"] == "application/x-ndjson"
    assert head["ServerSideEncryption"] == "AES256"
    assert head["Metadata"]["sha256"] == hashlib.sha256(seg.read_bytes()).hexdigest()
    assert (await store.open_path(location)).read_bytes() == seg.read_bytes()
    await store.delete(location)
    assert (await s3.list_objects_v2(Bucket=bucket, Prefix="spell/audit/")).get("KeyCount") == 0
    await store.delete(location)  # deleting twice is fine
    for bad in ("../escape", "/abs", "a//b", "", "a/./b"):
        with pytest.raises(ValueError):
            await store.put_object(bad, seg, content_type="text/plain")

    local = LocalArtifactStore(tmp_path / "local")
    loc = await local.put_object("audit/2026-11-26.jsonl", seg, content_type="text/plain")
    assert loc == "local:audit/2026-11-26.jsonl"
    assert (await local.open_path(loc)).read_bytes() == seg.read_bytes()
    await local.delete(loc)
    with pytest.raises(FileNotFoundError):
        await local.open_path(loc)
    for bad in ("../escape", "/abs", "a//b", "", ".hidden"):
        with pytest.raises(ValueError):
            await local.put_object(bad, seg, content_type="text/plain")


async def test_locations_route_to_the_store_that_wrote_them(
    store: S3ArtifactStore, tmp_path: Path
) -> None:
    local = LocalArtifactStore(tmp_path / "local")
    src, data, digest = _file(tmp_path, 500)
    old = await local.put("a_old", src, digest=digest)  # written before the bucket existed
    routed = route_artifacts(store, local=local, s3=store)
    new = await routed.put("a_new", src, digest=digest)
    assert new.startswith("s3://") and old.startswith("local:")
    assert (await routed.open_path(old)).read_bytes() == data
    assert await routed.redirect_url(old) is None  # served by the platform itself
    assert str(await routed.redirect_url(new)).startswith("http://127.0.0.1:")
    assert (await routed.put_object("x/y.txt", src, content_type="text/plain")).startswith("s3://")


async def test_readiness_reports_a_bucket_that_went_away(
    store: S3ArtifactStore, s3: Any, bucket: str
) -> None:
    assert await store.ready() is None
    await s3.delete_bucket(Bucket=bucket)
    store._ready = None  # the answer is cached a few seconds; take a fresh look
    reason = await store.ready()
    assert reason is not None and "does not exist" in reason


# ---------------------------------------------------------------------------- start-up checks


async def test_wrong_credentials_and_missing_buckets_stop_start_up_with_a_clear_error(
    iam_s3: dict[str, str], tmp_path: Path
) -> None:
    base = {"endpoint_url": iam_s3["url"], "cache_dir": tmp_path / "c"}
    good = S3Config(
        bucket=iam_s3["bucket"],
        access_key_id=iam_s3["key_id"],
        secret_access_key=iam_s3["secret"],
        **base,
    )
    st = await S3ArtifactStore(good, FrozenClock()).open()  # the real key works
    await st.aclose()

    cases = [
        (
            S3Config(
                bucket=iam_s3["bucket"],
                access_key_id="AKIAUNKNOWNUNKNOWN01",
                secret_access_key="wrong-secret-marker-1",
                **base,
            ),
            "InvalidAccessKeyId",
        ),
        (
            S3Config(
                bucket=iam_s3["bucket"],
                access_key_id=iam_s3["key_id"],
                secret_access_key="wrong-secret-marker-2",
                **base,
            ),
            "SignatureDoesNotMatch",
        ),
    ]
    for cfg, code in cases:
        with pytest.raises(AppError) as e:
            await S3ArtifactStore(cfg, FrozenClock()).open()
        assert e.value.code == "UNAVAILABLE"
        assert "refused the credentials" in e.value.message and code in e.value.message
        assert str(cfg.secret_access_key) not in e.value.message
        assert str(cfg.secret_access_key) not in repr(cfg)
        assert e.value.to_body()["error"]["code"] == "UNAVAILABLE"

    missing = S3Config(
        bucket="no-such-bucket-here",
        access_key_id=iam_s3["key_id"],
        secret_access_key=iam_s3["secret"],
        **base,
    )
    with pytest.raises(AppError) as e:
        await S3ArtifactStore(missing, FrozenClock()).open()
    assert "does not exist" in e.value.message

    closed = S3Config(
        bucket="any-bucket",
        endpoint_url=f"http://127.0.0.1:{_free_port()}",
        access_key_id="a",
        secret_access_key="b",
        max_attempts=1,
        cache_dir=tmp_path / "c",
    )
    with pytest.raises(AppError) as e:
        await S3ArtifactStore(closed, FrozenClock()).open()
    assert e.value.code == "UNAVAILABLE" and "cannot reach the object store" in e.value.message


def _spell_argv() -> list[str]:
    script = Path(sys.executable).with_name("spell")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli.main"]


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_spell_serve_and_worker_refuse_to_start_with_wrong_credentials(
    command: str, iam_s3: dict[str, str], tmp_path: Path
) -> None:
    secret = "very-secret-marker-" + secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SPELL_", "NATS_"))}
    env.update(
        SPELL_DATA_DIR=str(tmp_path / "data"),
        SPELL_ARTIFACTS_URL=f"s3://{iam_s3['bucket']}/spell",
        AWS_ENDPOINT_URL=iam_s3["url"],
        AWS_ACCESS_KEY_ID=iam_s3["key_id"],
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_REGION="us-east-1",
        SPELL_LOG_LEVEL="DEBUG",
    )
    if command == "worker":  # gets past the sandbox probe and NATS check to the object store
        env.update(SPELL_UNSAFE_NO_SANDBOX="1", NATS_URL=f"nats://127.0.0.1:{_free_port()}")
        argv = [*_spell_argv(), "worker", "--health-port", str(_free_port())]
    else:
        argv = [*_spell_argv(), "serve", "--port", str(_free_port())]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "error: UNAVAILABLE: the object store" in proc.stderr
    assert "refused the credentials" in proc.stderr and "SignatureDoesNotMatch" in proc.stderr
    assert "listening" not in out  # it never started serving
    assert secret not in out  # not even with debug logs


# ---------------------------------------------------------------------------- the platform


@pytest.fixture
def s3_settings(settings: Settings, s3_endpoint: str, bucket: str) -> Settings:
    return Settings(
        SPELL_DATA_DIR=str(settings.data_dir),
        DATABASE_URL=settings.database_url,
        SPELL_SECRET_KEY="test-secret-key-" + "x" * 32,
        SPELL_RATE_LIMIT_BURST=10_000,
        SPELL_RATE_LIMIT_PER_SEC=10_000,
        NATS_URL=None,
        SPELL_ARTIFACTS_URL=f"s3://{bucket}/platform",
        AWS_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID=KEY_ID,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="eu-west-1",
        SPELL_ARTIFACT_TTL=600,
    )


async def test_a_cast_through_the_platform_redirects_its_artifact_to_the_bucket(
    aiohttp_client: Any, s3_settings: Settings, s3: Any, bucket: str, clock: FrozenClock
) -> None:
    sandbox = FakeSandbox()
    app = create_app(s3_settings, overrides=Overrides(sandbox=sandbox, clock=clock))
    client = await aiohttp_client(app)
    h = Harness(client=client, settings=s3_settings, sandbox=sandbox)
    assert client.app[OBJECT_STORE].config.region == "eu-west-1"  # AWS_DEFAULT_REGION
    maker = await h.token("s3-maker", "maker")
    caster = await h.token("S3C", "caster")
    await h.publish(maker)

    r = await h.cast(caster, body={"input": {"name": "bucket"}})
    assert r.status == 202, await r.text()
    done = await h.wait_cast(caster, (await r.json())["cast_id"])
    assert done["status"] == "succeeded", done

    # the artifact is in the bucket, encrypted, with its digest
    listed = await s3.list_objects_v2(Bucket=bucket, Prefix="platform/artifacts/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert len(keys) == 1
    head = await s3.head_object(Bucket=bucket, Key=keys[0])
    assert head["ServerSideEncryption"] == "AES256"
    assert "sha256:" + head["Metadata"]["sha256"] == done["artifact"]["digest"]

    # the platform's signed link answers 302 to a presigned URL in the bucket
    link = done["artifact_url"][done["artifact_url"].index("/v1/") :]
    r = await client.get(link, allow_redirects=False)
    assert r.status == 302
    assert r.headers["Cache-Control"] == "private, no-store"
    target = r.headers["Location"]
    assert target.startswith(f"{s3_settings.aws_endpoint_url}/{bucket}/{keys[0]}?")
    assert _query(target)["X-Amz-Expires"] == "600"  # SPELL_ARTIFACT_TTL
    status, body, _ = await _http_get(target)
    assert status == 200
    assert "sha256:" + hashlib.sha256(body).hexdigest() == done["artifact"]["digest"]
    assert zipfile.ZipFile(io.BytesIO(body)).read("result.txt") == b'{"name": "bucket"}'

    # TTL semantics are the platform's: past it the link is 410, nothing is presigned
    clock.advance(601)
    r = await client.get(link, allow_redirects=False)
    assert r.status == 410
    assert (await r.json())["error"]["code"] == "ARTIFACT_EXPIRED"


async def test_a_tampered_artifact_is_refused_through_the_platform_with_the_error_shape(
    aiohttp_client: Any, s3_settings: Settings, s3: Any, bucket: str
) -> None:
    sandbox = FakeSandbox()
    client = await aiohttp_client(create_app(s3_settings, overrides=Overrides(sandbox=sandbox)))
    h = Harness(client=client, settings=s3_settings, sandbox=sandbox)
    maker = await h.token("s3-maker", "maker")
    caster = await h.token("S3C", "caster")
    await h.publish(maker)
    done = await h.wait_cast(caster, (await (await h.cast(caster)).json())["cast_id"])
    key = (await s3.list_objects_v2(Bucket=bucket, Prefix="platform/artifacts/"))["Contents"][0][
        "Key"
    ]
    await s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=b"evil",
        Metadata={"sha256": hashlib.sha256(b"evil").hexdigest()},
    )
    r = await client.get(
        done["artifact_url"][done["artifact_url"].index("/v1/") :], allow_redirects=False
    )
    assert r.status == 500
    body = await r.json()
    assert body["error"]["code"] == "INTERNAL"
    assert body["error"]["detail"] == {"reason": "ARTIFACT_CORRUPT"}
    assert "Location" not in r.headers


async def test_open_object_store_is_off_without_SPELL_ARTIFACTS_URL(settings: Settings) -> None:
    assert await open_object_store(settings, FrozenClock()) is None


async def test_api_and_worker_processes_share_artifacts_through_the_bucket(
    aiohttp_client: Any,
    tmp_path: Path,
    pg_url: str,  # noqa: F811 - fixture
    nats_url: str,  # noqa: F811 - fixture
    namespace: str,  # noqa: F811 - fixture
    s3_endpoint: str,
    s3: Any,
    bucket: str,
) -> None:
    """Production shape: the API runs no casts (NATS); a worker runs the cast and uploads its
    artifact; the API redirects to the bucket. (Bundles still come from the shared data dir.)"""
    api_settings = Settings(
        SPELL_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=pg_url,
        SPELL_SECRET_KEY="test-secret-key-" + "x" * 32,
        SPELL_RATE_LIMIT_BURST=10_000,
        SPELL_RATE_LIMIT_PER_SEC=10_000,
        NATS_URL=nats_url,
        SPELL_NATS_NAMESPACE=namespace,
        SPELL_RUN_LEASE_SEC=5.0,
        SPELL_SANDBOX_WARM=0,
        SPELL_ARTIFACTS_URL=f"s3://{bucket}/shared",
        AWS_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID=KEY_ID,
        AWS_SECRET_ACCESS_KEY=SECRET,
    )
    client = await aiohttp_client(create_app(api_settings, overrides=Overrides()))
    api = Harness(client=client, settings=api_settings, sandbox=FakeSandbox())
    maker, caster = await api.token("m", "maker"), await api.token("c", "caster")
    await api.publish(maker)
    sandbox = FakeSandbox()
    worker = await aiohttp_client(
        build_worker_app(
            api_settings,
            concurrency=1,
            drain_timeout=5.0,
            overrides=Overrides(sandbox=sandbox),
        )
    )
    ready = await (await worker.get("/readyz")).json()
    assert ready["checks"]["artifacts"] == "ok", ready

    r = await api.cast(caster, body={"input": {"name": "shared"}})
    assert r.status == 202, await r.text()
    done = await api.wait_cast(caster, (await r.json())["cast_id"], timeout=30)
    assert done["status"] == "succeeded", done
    assert len(sandbox.runs) == 1
    assert not (api_settings.data_dir / "artifacts").exists()  # nothing in the local folder
    assert (
        len((await s3.list_objects_v2(Bucket=bucket, Prefix="shared/artifacts/"))["Contents"]) == 1
    )

    link = done["artifact_url"][done["artifact_url"].index("/v1/") :]
    r = await client.get(link, allow_redirects=False)
    assert r.status == 302
    status, body, _ = await _http_get(r.headers["Location"])
    assert status == 200
    assert zipfile.ZipFile(io.BytesIO(body)).read("result.txt") == b'{"name": "shared"}'

    # the worker's readiness reports a bucket that went away
    for obj in (await s3.list_objects_v2(Bucket=bucket)).get("Contents", []):
        await s3.delete_object(Bucket=bucket, Key=obj["Key"])
    await s3.delete_bucket(Bucket=bucket)
    worker.app[OBJECT_STORE]._ready = None  # skip the few seconds the last answer is cached
    r = await worker.get("/readyz")
    assert r.status == 503
    assert "does not exist" in (await r.json())["checks"]["artifacts"]
