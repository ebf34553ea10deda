"""Artifacts in a local folder (the embedded default). Locations look like ``local:<name>``."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

PREFIX = "local:"


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, location: str) -> Path:
        if not location.startswith(PREFIX):
            raise ValueError(f"not a local artifact location: {location!r}")
        name = location[len(PREFIX) :]
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad artifact location: {location!r}")
        return self.root / name

    async def put(self, artifact_id: str, src: Path, *, digest: str) -> str:
        location = f"{PREFIX}{artifact_id}.zip"
        dest = self._path(location)

        def _copy() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)

        await asyncio.to_thread(_copy)
        return location

    async def open_path(self, location: str) -> Path:
        path = self._path(location)
        if not path.exists():
            raise FileNotFoundError(location)
        return path

    async def redirect_url(self, location: str) -> str | None:
        return None  # served by the platform itself

    async def delete(self, location: str) -> None:
        self._path(location).unlink(missing_ok=True)
