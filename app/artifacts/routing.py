"""Routes artifact locations to their store by prefix (``local:``, ``github:``, ``s3:`` …)."""

from __future__ import annotations

from pathlib import Path

from app.services.ports import ArtifactStore


class RoutingArtifactStore:
    def __init__(self, default: ArtifactStore, routes: dict[str, ArtifactStore]) -> None:
        self.default = default
        self.routes = routes

    def _store(self, location: str) -> ArtifactStore:
        for prefix, store in self.routes.items():
            if location.startswith(prefix):
                return store
        return self.default

    async def put(self, artifact_id: str, src: Path, *, digest: str) -> str:
        return await self.default.put(artifact_id, src, digest=digest)

    async def put_object(self, key: str, src: Path, *, content_type: str) -> str:
        return await self.default.put_object(key, src, content_type=content_type)

    async def open_path(self, location: str) -> Path:
        return await self._store(location).open_path(location)

    async def redirect_url(self, location: str) -> str | None:
        return await self._store(location).redirect_url(location)

    async def delete(self, location: str) -> None:
        await self._store(location).delete(location)
