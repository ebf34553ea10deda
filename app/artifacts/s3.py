"""Artifacts in an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO), selected by
``SPELL_ARTIFACTS_URL=s3://BUCKET/PREFIX``.

Locations look like ``s3://BUCKET/KEY#sha256=<hex>&exp=<unix seconds>``: the bucket and key of
the object, the digest the platform computed before uploading it and, for artifacts, the moment
the artifact's TTL ends. The location is stored in the ledger, so the digest checked on read is
the platform's own record, not something the bucket could rewrite.

- ``put``: key ``PREFIX/artifacts/<artifact id>.zip`` (so a retry of the same artifact is the
  same object: when it already holds the same digest nothing is uploaded again); server-side
  encryption requested (``AES256`` or ``aws:kms`` + key id); the sha256 both as user metadata
  (``x-amz-meta-sha256``) and as ``ChecksumSHA256``, which the server verifies on arrival;
  multipart with a SHA-256 checksum per part above the part size; the local bytes are hashed
  while they are read and nothing is committed when they do not match the digest.
- ``redirect_url``: a presigned GET (SigV4) valid for what is left of the artifact's TTL (at
  most 7 days, SigV4's limit); the platform's own signed link redirects there.
- ``open_path``: downloads into a private cache folder, hashing as it writes; a mismatch (or an
  object whose metadata disagrees with the ledger's digest) raises :class:`ArtifactCorrupt` and
  nothing is returned.
- ``put_object``: any file under ``PREFIX/<key>`` (audit segments exported by the retention
  sweeper), same encryption and checksums.

Every S3 failure becomes an :class:`~app.errors.AppError` (``UNAVAILABLE`` for credentials,
buckets, endpoints and outages; ``CONFLICT`` for a different artifact under the same id), and a
missing object :class:`FileNotFoundError` (the platform answers 410 ``ARTIFACT_EXPIRED``).
Credentials never appear in messages or logs: error texts are built from the S3 error code and a
scrubbed message. aiobotocore is imported when the store opens, not when this module is.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from app.errors import AppError
from app.services.ports import Clock

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger("spell.artifacts.s3")

PREFIX = "s3://"
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest part (all but the last)
MAX_PARTS = 10_000
MAX_PRESIGN_SEC = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days
SSE_MODES = ("AES256", "aws:kms", "off")
_UPLOAD_CONCURRENCY = 4
#: bodies larger than this are hashed in a thread, not on the event loop (hashlib lets go of the
#: GIL while it hashes, so the loop keeps serving; smaller ones are not worth the hand-off)
INLINE_HASH_MAX = 256 * 1024
_CACHE_MAX_AGE = 3600.0  # downloaded copies older than this are removed
_READY_CACHE_SEC = 10.0
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")

_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidSecurity",
        "AuthorizationHeaderMalformed",
        "403",
        "401",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion"})


class ArtifactCorrupt(AppError):
    """The stored bytes do not match the digest the platform recorded: nothing is served.

    SPEC §24 has no dedicated code; this is its closest, ``INTERNAL`` (500), with
    ``detail.reason = "ARTIFACT_CORRUPT"`` so clients and operators can tell it apart.
    """

    def __init__(self, message: str) -> None:
        super().__init__("INTERNAL", message, detail={"reason": "ARTIFACT_CORRUPT"})


def parse_bucket_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix/")`` (prefix "" or ending in /)."""
    if not url.startswith(PREFIX):
        raise ValueError(f"SPELL_ARTIFACTS_URL must look like s3://BUCKET/PREFIX, not {url!r}")
    bucket, _, prefix = url[len(PREFIX) :].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ValueError(f"not a valid S3 bucket name: {bucket!r}")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(f"not a valid key prefix: {prefix!r}")
    return bucket, (prefix + "/" if prefix else "")


def validate_key(key: str) -> str:
    """A relative object key of ``put_object``: ``audit/2026-11-26.jsonl``; no ``..``, no ``/x``."""
    parts = key.split("/")
    if (
        not key
        or len(key) > 900
        or any(p in ("", ".", "..") for p in parts)
        or any(ord(c) < 0x20 or c in "#?\\" for c in key)
    ):
        raise ValueError(f"not a valid object key: {key!r}")
    return key


@dataclass(frozen=True)
class S3Config:
    bucket: str
    prefix: str = ""
    region: str = "us-east-1"
    endpoint_url: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    sse: str = "AES256"
    kms_key_id: str | None = None
    checksum: bool = True
    path_style: bool = False
    part_size: int = 16 * 1024 * 1024
    #: the artifact TTL (``SPELL_ARTIFACT_TTL``): how long an artifact's URLs stay valid
    ttl: int = 7 * 24 * 3600
    #: where ``open_path`` puts verified copies (private to this process's user)
    cache_dir: Path = Path(".spell/artifacts-cache")
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.sse not in SSE_MODES:
            raise ValueError(f"server-side encryption must be one of {SSE_MODES}, not {self.sse!r}")
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(f"the multipart part size must be at least {MIN_PART_SIZE} bytes")
        if self.ttl < 1:
            raise ValueError("the artifact TTL must be at least 1 second")

    @property
    def url(self) -> str:
        return f"{PREFIX}{self.bucket}/{self.prefix}"

    @property
    def where(self) -> str:
        """The bucket and endpoint for messages (never any credential)."""
        endpoint = _public_endpoint(self.endpoint_url) if self.endpoint_url else "AWS S3"
        return f"{self.url} at {endpoint}"


@dataclass(frozen=True)
class Location:
    bucket: str
    key: str
    sha256: str | None = None
    exp: int | None = None

    def __str__(self) -> str:
        params: dict[str, str] = {}
        if self.sha256 is not None:
            params["sha256"] = self.sha256
        if self.exp is not None:
            params["exp"] = str(self.exp)
        frag = f"#{urlencode(params)}" if params else ""
        return f"{PREFIX}{self.bucket}/{self.key}{frag}"

    @classmethod
    def parse(cls, location: str) -> Location:
        if not location.startswith(PREFIX):
            raise ValueError(f"not an S3 artifact location: {location!r}")
        rest, _, frag = location[len(PREFIX) :].partition("#")
        bucket, _, key = rest.partition("/")
        if not bucket or not key:
            raise ValueError(f"bad S3 artifact location: {location!r}")
        params = dict(parse_qsl(frag))
        sha = params.get("sha256")
        if sha is not None and not _HEX_RE.match(sha):
            raise ValueError(f"bad digest in S3 artifact location: {location!r}")
        exp = params.get("exp")
        return cls(bucket, key, sha, int(exp) if exp is not None else None)


def _public_endpoint(url: str) -> str:
    """The endpoint without any user:password@ part."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _hex_of(digest: str) -> str:
    hexd = digest.removeprefix("sha256:")
    if not _HEX_RE.match(hexd):
        raise ValueError(f"artifact digests look like sha256:<64 hex>, not {digest!r}")
    return hexd


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class S3ArtifactStore:
    """The :class:`~app.services.ports.ArtifactStore` port on an S3-compatible bucket.

    ``await store.open()`` creates the client and checks the bucket (fails fast with
    ``AppError("UNAVAILABLE")``); ``await store.aclose()`` releases it.
    """

    def __init__(self, config: S3Config, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self._client: S3Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._ready: tuple[float, str | None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def open(self, *, check: bool = True) -> S3ArtifactStore:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        cfg = self.config
        s3_opts: dict[str, Any] = {"addressing_style": "path" if cfg.path_style else "auto"}
        config = AioConfig(
            signature_version="s3v4",
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
            # we send our own SHA-256 checksums; no SDK-added CRC trailers (some S3-compatible
            # servers refuse aws-chunked uploads), no SDK validation we do not ask for
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3=s3_opts,
        )
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                get_session().create_client(
                    "s3",
                    region_name=cfg.region,
                    endpoint_url=cfg.endpoint_url,
                    aws_access_key_id=cfg.access_key_id,
                    aws_secret_access_key=cfg.secret_access_key,
                    aws_session_token=cfg.session_token,
                    config=config,
                )
            )
            self._stack = stack
            if check:
                await self.check(write=True)
        except BaseException:
            self._client = None
            self._stack = None
            await stack.aclose()
            raise
        log.info("artifacts go to %s", cfg.where)
        return self

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> S3Client:
        if self._client is None:
            raise RuntimeError("the S3 artifact store is not open")
        return self._client

    async def check(self, *, write: bool = False) -> None:
        """Raise ``AppError("UNAVAILABLE")`` with the reason unless the bucket is usable.

        ``write``: also put (with the configured encryption and checksum) and delete a tiny
        probe object, so wrong permissions or an unsupported encryption mode show at start-up,
        not on the first cast."""
        cfg = self.config
        try:
            await self.client.head_bucket(Bucket=cfg.bucket)
        except Exception as e:
            raise await self._explain(e) from None
        if not write:
            return
        key = f"{cfg.prefix}.spell-probe/{secrets.token_hex(8)}"
        body = b"spell platform start-up probe\n"
        try:
            await self.client.put_object(
                Bucket=cfg.bucket,
                Key=key,
                Body=body,
                ContentType="text/plain",
                Metadata={"sha256": hashlib.sha256(body).hexdigest()},
                **self._sse_args(),
                **self._checksum_args(hashlib.sha256(body).digest()),
            )
            await self.client.delete_object(Bucket=cfg.bucket, Key=key)
        except Exception as e:
            raise self._error(e, "write a probe object into the bucket") from None

    async def _explain(self, e: Exception) -> Exception:
        """A HEAD answer has no body, so a 403 does not say why: ask again with a request whose
        error names the reason (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied …)."""
        from botocore.exceptions import ClientError

        if isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code")) in (
            "403",
            "400",
        ):
            try:
                await self.client.list_objects_v2(
                    Bucket=self.config.bucket, Prefix=self.config.prefix, MaxKeys=1
                )
            except ClientError as detailed:
                return self._error(detailed, "check the bucket")
            except Exception:  # noqa: S110 - the first answer is reported below
                pass
        return self._error(e, "check the bucket")

    async def ready(self) -> str | None:
        """For ``/readyz``: None when the bucket answers, else why not (cached a few seconds)."""
        now = time.monotonic()
        if self._ready is not None and now - self._ready[0] < _READY_CACHE_SEC:
            return self._ready[1]
        try:
            await asyncio.wait_for(self.check(), self.config.connect_timeout + 2)
            reason = None
        except AppError as e:
            reason = e.message
        except TimeoutError:
            reason = f"the object store {self.config.where} did not answer in time"
        except Exception as e:
            reason = f"the object store {self.config.where} failed: {type(e).__name__}"
        self._ready = (now, reason)
        return reason

    # ------------------------------------------------------------------ the port

    def artifact_key(self, artifact_id: str) -> str:
        if not _ID_RE.match(artifact_id):
            raise ValueError(f"not a valid artifact id: {artifact_id!r}")
        return f"{self.config.prefix}artifacts/{artifact_id}.zip"

    async def put(self, artifact_id: str, src: Path, *, digest: str) -> str:
        cfg = self.config
        hexd = _hex_of(digest)
        key = self.artifact_key(artifact_id)
        existing = await self._head(cfg.bucket, key)
        if existing is None:
            await self._upload(key, src, hexd, content_type="application/zip")
        elif existing.get("Metadata", {}).get("sha256") != hexd:
            raise AppError(
                "CONFLICT",
                f"artifact {artifact_id} is already stored with another digest; not replaced",
            )
        # else: a retry of the same artifact, already there. The TTL starts once it is stored,
        # as the platform's does (its artifact row is written right after this returns).
        exp = int(self.clock.now().timestamp()) + cfg.ttl
        return str(Location(cfg.bucket, key, hexd, exp))

    async def put_object(self, key: str, src: Path, *, content_type: str) -> str:
        """Store ``src`` under ``PREFIX/<key>`` (replacing what is there); returns its location
        (``s3://BUCKET/PREFIX/KEY#sha256=…``), which ``open_path`` and ``delete`` accept."""
        full = self.config.prefix + validate_key(key)
        hexd = await asyncio.to_thread(_sha256_file, src)
        await self._upload(full, src, hexd, content_type=content_type)
        return str(Location(self.config.bucket, full, hexd))

    async def redirect_url(self, location: str) -> str | None:
        loc = Location.parse(location)
        now = int(self.clock.now().timestamp())
        if loc.exp is not None:
            if loc.exp <= now:
                raise FileNotFoundError(location)
            expires_in = loc.exp - now
        else:
            expires_in = self.config.ttl
        head = await self._head(loc.bucket, loc.key)
        if head is None:
            raise FileNotFoundError(location)
        self._check_metadata(loc, head)
        name = loc.key.rsplit("/", 1)[-1]
        params: dict[str, Any] = {"Bucket": loc.bucket, "Key": loc.key}
        if name.endswith(".zip"):
            params["ResponseContentType"] = "application/zip"
            params["ResponseContentDisposition"] = f'attachment; filename="{name}"'
        try:
            return await self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=max(1, min(expires_in, MAX_PRESIGN_SEC))
            )
        except Exception as e:
            raise self._error(e, "presign a download") from None

    async def open_path(self, location: str) -> Path:
        loc = Location.parse(location)
        if loc.exp is not None and loc.exp <= int(self.clock.now().timestamp()):
            raise FileNotFoundError(location)
        cache = self.config.cache_dir
        await asyncio.to_thread(_prepare_cache, cache)
        try:
            resp = await self.client.get_object(Bucket=loc.bucket, Key=loc.key)
        except Exception as e:
            if _is_missing(e):
                raise FileNotFoundError(location) from None
            raise self._error(e, "download an artifact") from None
        expected = self._check_metadata(loc, resp)
        name = loc.key.rsplit("/", 1)[-1]
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache)
        tmp = Path(tmp_name)
        hasher = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as fh:
                async with resp["Body"] as stream:
                    while chunk := await stream.read(1024 * 1024):
                        await _update(hasher, chunk)
                        await asyncio.to_thread(fh.write, chunk)
            actual = hasher.hexdigest()
            if actual != expected:
                log.error(
                    "artifact %s failed its digest check (stored sha256 %s, expected %s); "
                    "not served",
                    loc.key,
                    actual,
                    expected,
                )
                raise ArtifactCorrupt(
                    f"the stored artifact {name} does not match its recorded sha256 digest; "
                    "it is not served (it was changed or damaged in the object store)"
                )
            dest = cache / f"{actual}-{secrets.token_hex(6)}-{name}"
            os.replace(tmp, dest)
        except AppError:
            raise
        except Exception as e:
            raise self._error(e, "download an artifact") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return dest

    async def delete(self, location: str) -> None:
        loc = Location.parse(location)
        try:
            await self.client.delete_object(Bucket=loc.bucket, Key=loc.key)
        except Exception as e:
            if _is_missing(e):
                return
            raise self._error(e, "delete an artifact") from None

    # ------------------------------------------------------------------ internals

    def _sse_args(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.sse == "off":
            return {}
        args: dict[str, Any] = {"ServerSideEncryption": cfg.sse}
        if cfg.sse == "aws:kms" and cfg.kms_key_id:
            args["SSEKMSKeyId"] = cfg.kms_key_id
        return args

    def _checksum_algorithm(self) -> dict[str, Any]:
        return {"ChecksumAlgorithm": "SHA256"} if self.config.checksum else {}

    def _checksum_args(self, raw: bytes) -> dict[str, Any]:
        if not self.config.checksum:
            return {}
        return {"ChecksumAlgorithm": "SHA256", "ChecksumSHA256": _b64(raw)}

    def _check_metadata(self, loc: Location, head: Any) -> str:
        """The digest to verify against: the ledger's (in the location), which the object's
        metadata must not contradict; the metadata's only when the location has none."""
        stored = (head.get("Metadata") or {}).get("sha256")
        expected = loc.sha256 or stored
        if expected is None:
            raise ArtifactCorrupt(
                f"the stored object {loc.key} has no recorded sha256 digest; it is not served"
            )
        if stored is not None and stored != expected:
            log.error("artifact %s carries sha256 %s, the ledger %s", loc.key, stored, expected)
            raise ArtifactCorrupt(
                f"the stored artifact {loc.key.rsplit('/', 1)[-1]} does not match its recorded "
                "sha256 digest; it is not served (it was changed in the object store)"
            )
        return str(expected)

    async def _head(self, bucket: str, key: str) -> Any:
        try:
            return await self.client.head_object(Bucket=bucket, Key=key)
        except Exception as e:
            if _is_missing(e):
                return None
            raise self._error(e, "look up an object") from None

    async def _upload(self, key: str, src: Path, hexd: str, *, content_type: str) -> None:
        size = (await asyncio.to_thread(src.stat)).st_size
        try:
            if size <= self.config.part_size:
                await self._put_single(key, src, hexd, content_type)
            else:
                await self._put_multipart(key, src, hexd, size, content_type)
        except AppError:
            raise
        except Exception as e:
            raise self._error(e, "upload an object") from None

    async def _put_single(self, key: str, src: Path, hexd: str, content_type: str) -> None:
        data = await asyncio.to_thread(src.read_bytes)
        raw = await _sha256(data)
        if raw.hex() != hexd:
            raise _local_mismatch(src)
        await self.client.put_object(
            Bucket=self.config.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
            Metadata={"sha256": hexd},
            **self._sse_args(),
            **self._checksum_args(raw),
        )

    async def _put_multipart(
        self, key: str, src: Path, hexd: str, size: int, content_type: str
    ) -> None:
        cfg = self.config
        part_size = max(cfg.part_size, -(-size // MAX_PARTS))
        created = await self.client.create_multipart_upload(
            Bucket=cfg.bucket,
            Key=key,
            ContentType=content_type,
            Metadata={"sha256": hexd},
            **self._sse_args(),
            **self._checksum_algorithm(),
        )
        upload_id = created["UploadId"]
        parts: dict[int, CompletedPartTypeDef] = {}
        slots = asyncio.Semaphore(_UPLOAD_CONCURRENCY)
        whole = hashlib.sha256()

        async def send(number: int, chunk: bytes) -> None:
            try:
                raw = await _sha256(chunk)
                resp = await self.client.upload_part(
                    Bucket=cfg.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                    **self._checksum_args(raw),
                )
                part: CompletedPartTypeDef = {"ETag": resp["ETag"], "PartNumber": number}
                if cfg.checksum:
                    part["ChecksumSHA256"] = _b64(raw)
                parts[number] = part
            finally:
                slots.release()

        tasks: list[asyncio.Task[None]] = []
        try:
            with src.open("rb") as fh:
                number = 0
                while True:
                    await slots.acquire()
                    chunk = await asyncio.to_thread(fh.read, part_size)
                    if not chunk:
                        slots.release()
                        break
                    number += 1
                    await _update(whole, chunk)
                    tasks.append(asyncio.create_task(send(number, chunk)))
                    if any(t.done() and t.exception() is not None for t in tasks):
                        break
            await asyncio.gather(*tasks)
            if whole.hexdigest() != hexd:
                raise _local_mismatch(src)
            await self.client.complete_multipart_upload(
                Bucket=cfg.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [parts[n] for n in sorted(parts)]},
            )
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.client.abort_multipart_upload(
                    Bucket=cfg.bucket, Key=key, UploadId=upload_id
                )
            raise

    def _error(self, e: Exception, action: str) -> Exception:
        """An S3 / connection failure as the SPEC error shape, with no credential in it (any
        other exception, e.g. a full disk while downloading, is returned as it is)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            CredentialRetrievalError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = self.config.where
        if isinstance(e, AppError) or not isinstance(e, BotoCoreError | ClientError):
            return e
        if isinstance(e, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return AppError(
                "UNAVAILABLE",
                f"no credentials for the object store {where}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or give the machine a role)",
            )
        if isinstance(e, ConnectionError | HTTPClientError):
            return AppError(
                "UNAVAILABLE",
                f"cannot reach the object store {where} to {action} ({type(e).__name__})",
                retry_after=5,
            )
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code") or "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            text = self._scrub(str(err.get("Message") or ""))[:200]
            said = f"{code}: {text}" if text and text != code else code or str(status)
            if code == "NoSuchBucket" or (code == "404" and action == "check the bucket"):
                return AppError(
                    "UNAVAILABLE", f"the bucket of {where} does not exist (could not {action})"
                )
            if code in _CREDENTIAL_CODES:
                return AppError(
                    "UNAVAILABLE",
                    f"the object store {where} refused the credentials or their permissions "
                    f"(could not {action}: {said}); check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY and the bucket policy",
                )
            if code in ("NotImplemented", "InvalidArgument", "InvalidEncryptionAlgorithmError"):
                return AppError(
                    "UNAVAILABLE",
                    f"the object store {where} refused a request (could not {action}: {said}); "
                    "if it cannot encrypt or checksum, see SPELL_ARTIFACTS_SSE and "
                    "SPELL_ARTIFACTS_CHECKSUM",
                )
            return AppError(
                "UNAVAILABLE",
                f"the object store {where} failed (could not {action}: {said})",
                retry_after=5 if status is None or status >= 500 else None,
            )
        log.warning("object store error: %s", type(e).__name__)
        return AppError(
            "UNAVAILABLE",
            f"the object store {where} failed (could not {action}: {type(e).__name__})",
        )

    def _scrub(self, text: str) -> str:
        for secret in (
            self.config.secret_access_key,
            self.config.session_token,
            self.config.access_key_id,
        ):
            if secret:
                text = text.replace(secret, "***")
        return text


def _is_missing(e: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(e, ClientError):
        return False
    return str(e.response.get("Error", {}).get("Code")) in _MISSING_CODES


def _local_mismatch(src: Path) -> AppError:
    return AppError(
        "INTERNAL",
        f"the file {src.name} changed before it was stored (its sha256 is not the one "
        "recorded); nothing was uploaded",
    )


def _sha256_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def _sha256(data: bytes) -> bytes:
    """The SHA-256 of ``data``: above :data:`INLINE_HASH_MAX` bytes in a thread."""
    if len(data) <= INLINE_HASH_MAX:
        return _sha256_digest(data)
    return await asyncio.to_thread(_sha256_digest, data)


async def _update(hasher: Any, data: bytes) -> None:
    """``hasher.update(data)``: above :data:`INLINE_HASH_MAX` bytes in a thread."""
    if len(data) <= INLINE_HASH_MAX:
        hasher.update(data)
    else:
        await asyncio.to_thread(hasher.update, data)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def _prepare_cache(cache: Path) -> None:
    """Create the private cache folder and drop copies old enough to have been served."""
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    cutoff = time.time() - _CACHE_MAX_AGE
    with os.scandir(cache) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
