"""Artifacts in a local folder (the embedded default). Locations look like ``local:<name>``.

Artifacts are ``<root>/<artifact id>.zip``; objects stored with :meth:`put_object` (audit
segments exported by the retention sweeper) are ``<root>/<key>`` with a relative ``key`` such as
``audit/2026-11-26.jsonl`` (location ``local:audit/2026-11-26.jsonl``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "local:"


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, location: str) -> Path:
        if not location.startswith(PREFIX):
            raise ValueError(f"not a local artifact location: {location!r}")
        name = location[len(PREFIX) :]
        parts = name.split("/")
        if not name or "\\" in name or any(not p or p.startswith(".") for p in parts):
            raise ValueError(f"bad artifact location: {location!r}")
        return self.root.joinpath(*parts)

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

    async def put_object(self, key: str, src: Path, *, content_type: str) -> str:
        """Copy ``src`` to ``<root>/<key>`` (replacing it atomically); returns ``local:<key>``.

        ``key`` is relative (``audit/2026-11-26.jsonl``): no ``..``, no leading ``/`` or ``.``.
        ``content_type`` is not kept by a folder; it is part of the port for object stores."""
        location = f"{PREFIX}{key}"
        dest = self._path(location)

        def _copy() -> None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.close(fd)
            try:
                shutil.copyfile(src, tmp_name)
                os.replace(tmp_name, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)

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
