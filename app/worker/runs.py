"""Execute one queued service-mode cast in the sandbox and record the outcome.

claim (queued → running, attempt + 1) → extract bundle → run sandboxed → zip ``SPELL_OUT`` →
store artifact → settle (success) or release (failure) → audit → metrics. Every exit path ends the
cast and frees its reservation; a stale attempt changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from app.domain.billing import meter_quantities
from app.domain.pricing import Usage, actual_cents
from app.domain.spells import SpellDocument
from app.runner.bundle import extract_bundle, zip_output
from app.runner.fstree import remove_tree
from app.runner.netproxy import DEFAULT_MAX_BYTES, NetworkAccess
from app.runner.sandbox import SANDBOX_PYTHON, Sandbox, SandboxResult, SandboxSpec
from app.services.platform import Platform
from app.store import hot
from app.store.ids import new_id
from app.store.models import Artifact, Cast

log = logging.getLogger("spell.worker")

MAX_LOG_EVENTS = 1000
PY = SANDBOX_PYTHON  # warm sandboxes run these spells in their already started interpreter


@dataclass(frozen=True)
class RunnerConfig:
    data_dir: Path
    max_output_bytes: int
    artifact_ttl: int
    sandbox_uid: int
    lease_sec: float = 30.0
    #: byte budget of a run's network allow-list proxy (SPELL_PROXY_MAX_BYTES)
    proxy_max_bytes: int = DEFAULT_MAX_BYTES


def _traversable(path: Path, uid: int) -> bool:
    for p in [path, *path.parents]:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if st.st_uid != uid and not st.st_mode & 0o001:
            return False
    return True


def sandbox_work_dir(data_dir: Path, uid: int) -> Path:
    """Where run folders and extracted bundles go: the data dir when the sandbox uid can reach
    it, else a private folder under the system temp dir (e.g. a data dir under ``/root``)."""
    data_dir = data_dir.resolve()
    if os.geteuid() != 0 or _traversable(data_dir, uid):
        return data_dir
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    work = Path(tempfile.gettempdir()) / f"spell-work-{digest}-{os.getpid()}"
    work.mkdir(mode=0o711, exist_ok=True)
    st = work.stat()
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise RuntimeError(f"{work} exists but is not a root-owned, non-writable folder")
    return work


def build_argv(entrypoint: str) -> list[str]:
    """The command for an ``entrypoint`` (run with cwd = the bundle folder).

    ``main.py`` and ``python3 main.py`` run with the system interpreter in isolated mode
    (``-I -S``: no site-packages, no user paths); other relative programs run as ``./prog``.
    """
    parts = shlex.split(entrypoint)
    if not parts:
        raise ValueError("empty entrypoint")
    head, rest = parts[0], parts[1:]
    if head in ("python", "python3"):
        return [PY, "-I", "-S", *rest]
    if head.endswith(".py"):
        return [PY, "-I", "-S", head, *rest]
    if "/" not in head:
        return ["./" + head, *rest]
    return parts


def failure_of(result: SandboxResult, doc: SpellDocument) -> tuple[str, str]:
    """Map a sandbox outcome to the cast's error code and a message for the caster."""
    ex = doc.execution
    if result.outcome in ("timeout", "cpu"):
        return "TIMEOUT", f"the run exceeded its time limit (timeout_sec={ex.timeout_sec})"
    if result.outcome == "memory":
        return "MEMORY_LIMIT", f"the run exceeded its memory limit (memory_mb={ex.memory_mb})"
    if result.outcome == "output_too_large":
        return "OUTPUT_TOO_LARGE", "the run wrote more output than the platform allows"
    if result.outcome == "killed":
        return "INTERNAL", "the run was killed by the platform"
    tail = [ln for ln in result.stderr_tail.strip().splitlines() if ln.strip()]
    last = tail[-1][:300] if tail else "no error output"
    return "SPELL_FAILED", f"the spell exited with status {result.exit_code}: {last}"


class RunExecutor:
    def __init__(self, *, platform: Platform, sandbox: Sandbox, config: RunnerConfig) -> None:
        self.platform = platform
        self.ledger = platform.ledger
        self.sandbox = sandbox
        self.config = config
        self.archive_dir = config.data_dir / "bundles"
        work = sandbox_work_dir(config.data_dir, config.sandbox_uid)
        self.private_work_dir = work if work != config.data_dir.resolve() else None
        self.bundles_dir = work / "bundles"
        self.runs_dir = work / "runs"
        #: bundle digest → its extracted (read-only, content-addressed) folder
        self._extracted: dict[str, Path] = {}
        #: cast id → attempt this process is running (for lease renewal)
        self.active: dict[str, int] = {}

    def close(self) -> None:
        """Remove this process's private work folder (extracted bundles, run folders)."""
        if self.private_work_dir is not None:
            remove_tree(self.private_work_dir)  # iterative: any depth a spell made

    async def heartbeat(self, cast_id: str) -> None:
        attempt = self.active.get(cast_id)
        if attempt is not None:
            await self.ledger.extend_lease(cast_id, attempt, lease_sec=self.config.lease_sec)

    async def _claim(self, cast_id: str) -> Cast | None:
        """queued → running (app/store/hot.py ``claim``) with its ``cast.running`` audit
        record in the same transaction (the audit outbox)."""
        now = self.platform.clock.now()

        def audit(c: dict[str, Any]) -> list[hot.AuditRow]:
            return [
                hot.AuditRow(
                    event="cast.running",
                    at=now,
                    actor="worker",
                    cast_id=cast_id,
                    input_hash=c["input_hash"],
                    traceparent=c["traceparent"],
                    data={"attempt": int(c["attempt"])},
                )
            ]

        claim = await self.ledger.claim(
            cast_id, lease_sec=self.config.lease_sec, now=now, audit=audit
        )
        if claim is None:
            return None
        self.platform.kick_audit()
        return claim.cast

    async def execute(self, cast_id: str) -> None:
        cast = await self._claim(cast_id)
        if cast is None:
            log.info("cast %s is not queued any more; nothing to do", cast_id)
            return
        attempt = cast.attempt
        self.active[cast_id] = attempt
        self.platform.hub.notify(cast_id)
        run_dir = self.runs_dir / f"{cast_id}-{attempt}"
        try:
            await self._run(cast, attempt, run_dir)
        except Exception:
            log.exception("cast %s attempt %d failed inside the platform", cast_id, attempt)
            await self._finish(
                cast,
                attempt,
                succeeded=False,
                code="INTERNAL",
                message="the platform failed while running this cast; nothing was charged",
            )
        finally:
            self.active.pop(cast_id, None)
            await asyncio.to_thread(remove_tree, run_dir)  # iterative: any depth the spell made

    async def _run(self, cast: Cast, attempt: int, run_dir: Path) -> None:
        # The spell and the run folder are independent: look up one while preparing the other.
        prepared = asyncio.ensure_future(
            asyncio.to_thread(self._prepare, run_dir, cast.input or {})
        )
        try:
            found = await self.platform.spell_version(cast.spell_id, cast.spell_version)
        finally:
            input_path, out_dir = await prepared
        if found is None:
            raise RuntimeError(f"spell {cast.spell_id}@{cast.spell_version} vanished")
        doc = self.platform.parsed(found).doc
        ex = doc.execution
        assert ex.bundle is not None and ex.entrypoint is not None
        bundle_dir = self._extracted.get(ex.bundle)
        if bundle_dir is None or not bundle_dir.is_dir():
            bundle_dir = await asyncio.to_thread(self._bundle, ex.bundle)
            self._extracted[ex.bundle] = bundle_dir
        lines = _LineSink(self, cast.id, attempt)
        spec = SandboxSpec(
            bundle_dir=bundle_dir,
            argv=build_argv(ex.entrypoint),
            input_path=input_path,
            out_dir=out_dir,
            timeout_sec=float(ex.timeout_sec),
            memory_mb=ex.memory_mb,
            max_output_bytes=self.config.max_output_bytes,
            network=NetworkAccess(
                allow=tuple(ex.network.allow), max_bytes=self.config.proxy_max_bytes
            )
            if ex.network is not None and ex.network.allow
            else None,
            env={
                "SPELL_CAST_ID": cast.id,
                "SPELL_ID": cast.spell_id,
                "SPELL_VERSION": cast.spell_version,
                "TRACEPARENT": cast.traceparent or "",
            },
        )
        result = await self.sandbox.run(spec, lines.on_line)
        if result.outcome != "ok":
            await lines.flush()
            code, message = failure_of(result, doc)
            await self._finish(
                cast,
                attempt,
                succeeded=False,
                code=code,
                message=message,
                extra={"duration_ms": result.duration_ms, "exit_code": result.exit_code},
            )
            return
        # The last output lines go to the ledger while the output is packed and stored.
        flushed = asyncio.ensure_future(lines.flush())
        try:
            digest, size, zip_path = await asyncio.to_thread(zip_output, out_dir, run_dir)
            art_id = new_id("a")
            location = await self.platform.artifacts.put(art_id, zip_path, digest=digest)
        finally:
            await flushed
        now = self.platform.clock.now()
        artifact = Artifact(
            id=art_id,
            cast_id=cast.id,
            location=location,
            digest=digest,
            size_bytes=size,
            created_at=now,
            expires_at=now + timedelta(seconds=self.config.artifact_ttl),
        )
        used = Usage(compute_ms=result.duration_ms, egress_bytes=result.output_bytes)
        cost = actual_cents(doc.pricing, used)
        await self._finish(
            cast,
            attempt,
            succeeded=True,
            cost=cost,
            artifact=artifact,
            extra={"duration_ms": result.duration_ms, "artifact_digest": digest},
            usage=meter_quantities(doc.pricing, used),
        )

    def _bundle(self, digest: str) -> Path:
        """The extracted bundle, in the work dir (stored archives stay in the data dir)."""
        name = digest.removeprefix("sha256:") + ".tar.gz"
        staged = self.bundles_dir / name
        if not staged.exists() and self.bundles_dir != self.archive_dir:
            self.bundles_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.bundles_dir, 0o711)  # noqa: S103 - the sandbox uid must traverse it
            # a unique temporary name: two runs of one spell may stage it at the same time
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.bundles_dir)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                shutil.copyfile(self.archive_dir / name, tmp)
                os.replace(tmp, staged)
            finally:
                tmp.unlink(missing_ok=True)
        return extract_bundle(digest, self.bundles_dir)

    def _prepare(self, run_dir: Path, payload: dict[str, Any]) -> tuple[Path, Path]:
        if run_dir.exists() and not remove_tree(run_dir):
            raise RuntimeError(f"could not remove the leftover run folder {run_dir}")
        run_dir.mkdir(parents=True)
        out_dir = run_dir / "out"
        out_dir.mkdir()
        input_path = run_dir / "input.json"
        input_path.write_text(json.dumps(payload))
        os.chmod(run_dir, 0o711)  # noqa: S103 - the sandbox uid must traverse it
        os.chmod(input_path, 0o644)
        return input_path, out_dir

    async def _finish(
        self,
        cast: Cast,
        attempt: int,
        *,
        succeeded: bool,
        cost: int = 0,
        code: str | None = None,
        message: str | None = None,
        artifact: Artifact | None = None,
        extra: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
    ) -> None:
        now = self.platform.clock.now()
        status = "succeeded" if succeeded else "failed"

        def audit(c: dict[str, Any]) -> list[hot.AuditRow]:
            """``cast.succeeded``/``cast.failed`` (+ ``ledger.charge``), committed with the
            end of the run (the audit outbox)."""
            estimate = int(c["estimate_cents"])
            charged = min(cost, estimate) if succeeded else 0
            rows = [
                hot.AuditRow(
                    event=f"cast.{status}",
                    at=now,
                    actor="worker",
                    cast_id=cast.id,
                    input_hash=c["input_hash"],
                    amount_cents=charged,
                    currency=c["currency"],
                    traceparent=c["traceparent"],
                    data={
                        "attempt": attempt,
                        "released_cents": estimate - charged,
                        **({"error": {"code": code, "message": message}} if code else {}),
                        **({"artifact_digest": artifact.digest} if artifact else {}),
                    },
                )
            ]
            if charged > 0:
                rows.append(
                    hot.AuditRow(
                        event="ledger.charge",
                        at=now,
                        actor="worker",
                        cast_id=cast.id,
                        amount_cents=charged,
                        currency=c["currency"],
                        traceparent=c["traceparent"],
                        data={"account": c["caster_id"], "method": "ledger"},
                    )
                )
            return rows

        done = await self.ledger.finish(
            cast.id,
            attempt,
            succeeded=succeeded,
            cost_cents=cost,
            error_code=code,
            error_message=message,
            artifact=artifact,
            extra_event=extra,
            usage=usage,
            now=now,
            audit=audit,
        )
        if done is None:
            log.warning("cast %s attempt %d was superseded; result dropped", cast.id, attempt)
            if artifact is not None:
                await self.platform.artifacts.delete(artifact.location)
            return
        self.platform.kick_audit()
        self.platform.hub.notify(cast.id)
        self.platform.kick_outbox()  # GitHub feedback / billing.charge rows from the finish
        m = self.platform.metrics
        m.cast_count.labels(status=status).inc()
        if done.finished_at is not None:
            ms = (done.finished_at - done.created_at).total_seconds() * 1000
            m.cast_latency_ms.observe(ms)
        if code:
            m.errors_by_code.labels(code=code).inc()


class _LineSink:
    """Turns a run's output lines into cast events, batched, bounded in number."""

    def __init__(self, executor: RunExecutor, cast_id: str, attempt: int) -> None:
        self.executor = executor
        self.cast_id = cast_id
        self.attempt = attempt
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self.count = 0
        self.last_flush = time.monotonic()

    async def on_line(self, stream: str, line: str) -> None:
        if self.count >= MAX_LOG_EVENTS:
            return
        self.count += 1
        event = parse_progress(line) if stream == "stdout" else None
        if event is not None:
            self.pending.append(("progress", event))
        else:
            self.pending.append(("log", {"stream": stream, "line": line[:2000]}))
        if len(self.pending) >= 50 or time.monotonic() - self.last_flush > 0.2:
            await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        self.last_flush = time.monotonic()
        await self.executor.ledger.append_events(self.cast_id, batch, attempt=self.attempt)
        self.executor.platform.hub.notify(self.cast_id)


def parse_progress(line: str) -> dict[str, Any] | None:
    """``::progress 40 halfway there`` → ``{"pct": 40, "message": "halfway there"}``."""
    if not line.startswith("::progress"):
        return None
    rest = line[len("::progress") :].strip()
    pct_s, _, message = rest.partition(" ")
    try:
        pct = max(0, min(100, int(float(pct_s))))
    except ValueError:
        return {"message": rest[:500]}
    return {"pct": pct, "message": message.strip()[:500]}
