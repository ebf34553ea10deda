"""Object-store adapters for the ``ArtifactStore`` port, and the factory entry points use.

- :class:`~app.artifacts.local.LocalArtifactStore` — the data dir's folder (embedded default);
- :class:`~app.artifacts.s3.S3ArtifactStore` — an S3-compatible bucket (``SPELL_ARTIFACTS_URL``);
- :class:`~app.artifacts.github.GitHubArtifactStore` — artifacts GitHub Actions keeps.

:func:`route_artifacts` puts them behind one store: new artifacts go to the bucket when there is
one (else the folder), and every location is read by the store that wrote it (``s3://``,
``local:``, ``github:``), so artifacts stored before a switch stay readable until they expire.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from app.artifacts.routing import RoutingArtifactStore
from app.services.ports import ArtifactStore, Clock

if TYPE_CHECKING:
    from pydantic import SecretStr

    from app.artifacts.s3 import S3ArtifactStore, S3Config
    from app.config import Settings


def s3_config(settings: Settings, *, cache_dir: Path | None = None) -> S3Config:
    """The object store's settings (``SPELL_ARTIFACTS_URL``, ``AWS_*``, ``SPELL_ARTIFACTS_*``)."""
    from app.artifacts.s3 import S3Config, parse_bucket_url

    assert settings.artifacts_url is not None
    bucket, prefix = parse_bucket_url(settings.artifacts_url)

    def secret(value: SecretStr | None) -> str | None:
        return value.get_secret_value() or None if value is not None else None

    return S3Config(
        bucket=bucket,
        prefix=prefix,
        region=settings.aws_region or settings.aws_default_region or "us-east-1",
        endpoint_url=settings.aws_endpoint_url,
        access_key_id=secret(settings.aws_access_key_id),
        secret_access_key=secret(settings.aws_secret_access_key),
        session_token=secret(settings.aws_session_token),
        sse=settings.artifacts_sse,
        kms_key_id=settings.artifacts_kms_key_id,
        checksum=settings.artifacts_checksum,
        path_style=settings.artifacts_path_style,
        part_size=settings.artifacts_part_size,
        ttl=settings.artifact_ttl,
        cache_dir=cache_dir or settings.data_dir / "artifacts-cache",
    )


async def open_object_store(settings: Settings, clock: Clock) -> S3ArtifactStore | None:
    """The S3-compatible store when ``SPELL_ARTIFACTS_URL`` is set, opened and checked (the
    bucket answers, and accepts an encrypted, checksummed write); None without it.

    Raises ``AppError("UNAVAILABLE")`` with the reason (unreachable endpoint, missing bucket,
    rejected credentials, refused encryption): ``spell serve`` / ``spell worker`` exit with it."""
    if not settings.artifacts_url:
        return None
    from app.artifacts.s3 import S3ArtifactStore

    return await S3ArtifactStore(s3_config(settings), clock).open()


def route_artifacts(
    default: ArtifactStore,
    *,
    local: ArtifactStore | None = None,
    s3: ArtifactStore | None = None,
    github: ArtifactStore | None = None,
) -> ArtifactStore:
    """One store over the configured ones: writes go to ``default``; reads by location prefix."""
    routes: dict[str, ArtifactStore] = {}
    if s3 is not None:
        routes["s3://"] = s3
    if local is not None:
        routes["local:"] = local
    if github is not None:
        routes["github:"] = github
    if not routes or all(store is default for store in routes.values()):
        return default
    return RoutingArtifactStore(default, routes)
