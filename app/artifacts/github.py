"""Artifacts kept by GitHub Actions (workflow mode): ``github:<inst>:<owner>/<repo>:<id>``.

GitHub's download URL expires after one minute, so it is minted on every request and never
stored or handed out ahead of time (FACTS.md).
"""

from __future__ import annotations

from pathlib import Path

from app.github.client import GitHubClient, GitHubGone, GitHubNotFound

PREFIX = "github:"


def parse_location(location: str) -> tuple[int, str, str, int]:
    try:
        _, inst, repo, art = location.split(":", 3)
        owner, name = repo.split("/", 1)
        return int(inst), owner, name, int(art)
    except ValueError:
        raise ValueError(f"not a GitHub artifact location: {location!r}") from None


class ArtifactGone(Exception):
    pass


class GitHubArtifactStore:
    def __init__(self, client: GitHubClient) -> None:
        self.client = client

    async def put(self, artifact_id: str, src: Path, *, digest: str) -> str:
        raise NotImplementedError("GitHub artifacts are uploaded by the workflow run itself")

    async def put_object(self, key: str, src: Path, *, content_type: str) -> str:
        raise NotImplementedError("GitHub keeps only the artifacts its workflow runs upload")

    async def open_path(self, location: str) -> Path:
        raise FileNotFoundError(location)

    async def redirect_url(self, location: str) -> str | None:
        inst, owner, name, art = parse_location(location)
        try:
            return await self.client.artifact_download_url(inst, owner, name, art)
        except (GitHubGone, GitHubNotFound):
            raise FileNotFoundError(location) from None

    async def delete(self, location: str) -> None:
        return None  # GitHub's retention deletes it
