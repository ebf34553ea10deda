"""A warm pool of single-use sandboxes: the bubblewrap spawn happens before a run is assigned.

A cold run pays setpriv → bwrap (namespaces, mounts, seccomp) → ``python3 -I -S`` start-up on
the critical path. The pool keeps ``size`` sandboxes spawned ahead of time, each with exactly the
isolation of a cold one (:class:`app.runner.sandbox.BwrapSandbox` builds both from the same
options), running :mod:`app.runner.launcher`, which waits on stdin for ONE job.

What a cold run fixes at spawn but a warm sandbox cannot know yet:

* **Its folders.** Each warm sandbox binds a fresh per-sandbox *slot* folder made at spawn:
  ``bundle/`` (read-only at ``/spell``), ``input.json`` (read-only at ``/tmp/input.json``),
  ``out/`` (read-write at ``/tmp/out``, owned by the sandbox uid) and ``net/`` (read-only at
  ``/run/spell``: empty, or the run's proxy socket, :mod:`app.runner.netproxy`). When a run
  is assigned, the host fills the slot (:func:`fill_slot`: the bundle hard-linked, or copied,
  with the same owners and modes; the input copied) and, after the run, renames ``out/`` onto
  the run's output folder (:func:`move_output`).
* **Its limits.** A warm sandbox is spawned for a :class:`WarmProfile` (memory, output cap,
  processes: the tmpfs sizes and the rlimits that cannot change later) with the CPU limit at its
  maximum; the launcher lowers every rlimit to the run's values (soft and hard) before the spell
  starts. A run whose profile no warm sandbox has starts cold, and the pool shifts towards the
  profiles of the latest runs.
* **Its seccomp filter.** It is installed by bwrap at spawn and cannot change, so it is part of
  the profile: the default (no-network) flavour refuses ``AF_INET``/``AF_INET6`` sockets and
  serves only runs without a network allow-list; the proxy flavour (``network=True``) allows
  them and serves only runs with one (:func:`app.runner.sandbox.seccomp_program`).

Rules: a sandbox runs one job and is then discarded (its processes gone, its slot removed);
the replacement is spawned in the background as soon as that run is over (not while it runs, so
the spawn does not compete with the run for the CPU); a job counts as handed over only once the
launcher confirmed it, so a sandbox that died before is skipped and nothing of the job ran; a
sandbox that died while idle is noticed (its exit is awaited all along) and replaced; when no
sandbox is ready the run starts cold; :meth:`WarmPool.aclose` stops every sandbox it spawned
(an idle launcher exits on end of input; a busy one is killed).

Repeated spawn failures back off exponentially (up to :data:`MAX_BACKOFF_SEC`); meanwhile runs
start cold, and a cold start that fails raises :class:`~app.runner.sandbox.SandboxUnavailable`
as it always did.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import functools
import importlib.resources
import json
import logging
import os
import secrets
import shutil
import signal
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.aio import wait_event
from app.runner.fstree import DIR_FLAGS, MAX_OUTPUT_DEPTH, remove_tree, walk_folder
from app.runner.launcher import JOB_TAKEN, READY

__all__ = [
    "AdoptedInit",
    "Spawner",
    "UidBroker",
    "WarmPool",
    "WarmProfile",
    "WarmSandbox",
    "become_reaper",
    "copy_output",
    "fill_slot",
    "kill_sandbox",
    "launcher_source",
    "make_slot",
    "move_output",
    "namespace_inits",
    "open_inits",
    "pending_inits",
    "reap_adopted",
    "remove_stale_slots",
    "renice_tree",
    "when_done",
]

log = logging.getLogger("spell.sandbox.pool")

#: The spawn-time hard RLIMIT_CPU of a warm sandbox (soft: one second less); the launcher
#: lowers both per run. Covers the largest spell ``timeout_sec`` (3600) + 1 s of CPU + the hard
#: limit's extra second; a run needing more starts cold.
WARM_MAX_CPU_SEC = 3602
#: Niceness a warm sandbox is spawned with: its start-up (setpriv, bwrap, the interpreter,
#: ~20-25 ms of CPU) is background work that must not take CPU from the run it replaces. It is
#: put back to 0 (:func:`renice_tree`) before it gets its job, so the spell itself runs exactly
#: as in a cold sandbox. Only when the platform may raise a priority again (root).
WARM_SPAWN_NICE = 10
#: How long a spawned sandbox may take to report ready before it is killed.
READY_TIMEOUT_SEC = 30.0
#: Longest pause between spawn attempts after repeated failures.
MAX_BACKOFF_SEC = 30.0
SLOT_PREFIX = "w-"
#: How long a sandbox may take to exit after its namespace's init was killed, or an idle one
#: after its launcher was told to stop, before bwrap's process group is killed.
KILL_GRACE_SEC = 1.0
#: How long :meth:`WarmPool.aclose` waits for the runs of the sandboxes it killed to finish.
CLOSE_WAIT_SEC = 15.0

_MIB = 1024 * 1024

State = Literal["idle", "taken", "retired", "dead"]


@dataclass(frozen=True)
class WarmProfile:
    """What a sandbox fixes when it is spawned (tmpfs sizes, AS/FSIZE/NPROC, seccomp filter);
    the default is what a run of a spell with default limits and no network gets
    (``memory_mb`` 256, 100 MiB output, the no-network filter).

    ``network``: the proxy flavour, whose seccomp filter allows ``AF_INET``/``AF_INET6``
    sockets (the bridge to the run's proxy needs them); it serves only runs with a network
    allow-list, and the default no-network flavour only runs without one.
    """

    memory_mb: int = 256
    max_output_bytes: int = 100 * _MIB
    max_procs: int = 64
    network: bool = False


@functools.cache
def launcher_source() -> str:
    """The launcher's source, written to the sandboxed interpreter's stdin at spawn."""
    return importlib.resources.files("app.runner").joinpath("launcher.py").read_text("utf-8")


# --------------------------------------------------------------------------------------------
# uids


class UidBroker:
    """Hands out the host uid each sandbox runs as.

    Without a pool every sandbox uses the one ``uid`` (never runs out). With a pool each
    sandbox, warm or cold, holds its own uid from spawn until every one of its processes is gone;
    warm spawns never take the last uids from runs that are waiting for one.
    """

    def __init__(self, uid: int, pool: Sequence[int] = ()) -> None:
        self._uid = uid
        self._free = collections.deque(dict.fromkeys(pool))
        self.pooled = bool(pool)
        self._waiting = 0
        self._event: asyncio.Event | None = None
        #: called after a uid came back (the warm pool may spawn again)
        self.on_release: Callable[[], None] | None = None

    def try_take(self, *, for_warm: bool = False) -> int | None:
        if not self.pooled:
            return self._uid
        if for_warm and self._waiting:
            return None
        return self._free.popleft() if self._free else None

    def release(self, uid: int) -> None:
        if self.pooled:
            self._free.append(uid)
        self.notify()
        if self.on_release is not None:
            self.on_release()

    def notify(self) -> None:
        """Wake every :meth:`changed` waiter (a uid came back, or a warm sandbox got ready)."""
        if self._event is not None:
            self._event.set()
            self._event = None

    async def changed(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        self._waiting += 1
        try:
            await event.wait()
        finally:
            self._waiting -= 1


# --------------------------------------------------------------------------------------------
# slots


def make_slot(warm_dir: Path, owner: int | None) -> Path:
    """A fresh slot folder: ``bundle/``, an empty ``input.json``, ``out/`` for ``owner`` and
    ``net/`` (bound at ``/run/spell``; the run's proxy socket goes there if it has network).

    ``owner`` is the sandbox uid when the runner is root (``out/`` is chowned to it), else None.
    """
    slot = warm_dir / f"{SLOT_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
    slot.mkdir(mode=0o700)
    (slot / "bundle").mkdir(mode=0o755)
    fd = os.open(slot / "input.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    os.close(fd)
    out = slot / "out"
    out.mkdir(mode=0o700)
    if owner is not None:
        os.chown(out, owner, owner)
    (slot / "net").mkdir(mode=0o711)
    os.chmod(slot / "net", 0o711)  # noqa: S103 - traversable (not listable) by the sandbox uid
    os.chmod(slot, 0o711)  # noqa: S103 - the sandbox uid must traverse it, not list it
    return slot


def remove_stale_slots(warm_dir: Path, prefix: str = SLOT_PREFIX) -> int:
    """Remove ``<prefix><pid>[-…]`` folders (ours) left by processes that are gone: a crash
    skips :meth:`WarmPool.aclose`."""
    removed = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(warm_dir) as it:
        for entry in it:
            if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
                continue
            pid_s = entry.name[len(prefix) :].partition("-")[0]
            if not pid_s.isdigit() or int(pid_s) == os.getpid() or _pid_alive(int(pid_s)):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                    continue
            except OSError:
                continue
            if remove_tree(entry.path):  # iterative, never raises: any depth, any path length
                removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fill_slot(slot: Path, bundle_dir: Path, input_path: Path, *, root: bool) -> None:
    """Make the slot show what a cold run would bind: the bundle and the input, same owners and
    modes (so the sandbox uid can read exactly what it could read in a cold run)."""
    _mirror_tree(bundle_dir, slot / "bundle", root=root)
    st = os.stat(input_path)
    fd = os.open(slot / "input.json", os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "wb") as dst, open(input_path, "rb") as src:
        shutil.copyfileobj(src, dst, _MIB)
        if root:
            os.fchown(dst.fileno(), st.st_uid, st.st_gid)
        os.fchmod(dst.fileno(), stat.S_IMODE(st.st_mode))


def _mirror_tree(src_top: Path, dst_top: Path, *, root: bool) -> None:
    """Hard-link (else copy) every entry of ``src_top`` into the empty ``dst_top``.

    A hard link is the same inode: owner, mode and content are the bundle's own, and it is
    read-only inside the sandbox like the cold bind mount. Folders are recreated with the
    source's owner and mode (set after their content, children first).
    """
    folders: list[tuple[str, str]] = [(str(src_top), str(dst_top))]
    pending = [(str(src_top), str(dst_top))]
    while pending:
        src, dst = pending.pop()
        with os.scandir(src) as it:
            entries = list(it)
        for entry in entries:
            target = os.path.join(dst, entry.name)
            if entry.is_dir(follow_symlinks=False):
                os.mkdir(target, 0o700)
                folders.append((entry.path, target))
                pending.append((entry.path, target))
                continue
            try:
                os.link(entry.path, target, follow_symlinks=False)
            except OSError:  # another file system, or not ours to link (not root)
                _copy_entry(entry.path, target, root=root)
    for src, dst in reversed(folders):
        st = os.stat(src, follow_symlinks=False)
        if root:
            os.chown(dst, st.st_uid, st.st_gid)
        os.chmod(dst, stat.S_IMODE(st.st_mode))


def _copy_entry(src: str, dst: str, *, root: bool) -> None:
    st = os.stat(src, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dst, follow_symlinks=False)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    else:
        log.warning("warm sandbox: %s is not a regular file, folder or symlink; left out", src)
        return
    if root:
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)


def move_output(slot_out: Path, out_dir: Path) -> None:
    """Rename the slot's output folder onto the run's empty ``out_dir`` (OSError EXDEV when
    they are on different mounts: then :func:`copy_output`).

    Nothing inside is read or followed: the folder was writable by the spell.
    """
    os.rename(slot_out, out_dir)


def copy_output(slot_out: Path, out_dir: Path) -> None:
    """Copy the spell's output into ``out_dir`` without ever following a link it planted.

    Both trees are walked by file descriptor and without recursion (any path length; deeper
    than :data:`~app.runner.fstree.MAX_OUTPUT_DEPTH` raises ``TreeTooDeep``), files opened
    ``O_NOFOLLOW | O_NONBLOCK`` and checked to be regular; symlinks are recreated as symlinks;
    FIFOs, sockets and devices are left out.
    """
    top = os.open(slot_out, DIR_FLAGS)
    dests: list[int] = []
    try:
        dests.append(os.open(out_dir, DIR_FLAGS))
        _copy_folder(top, dests)
    finally:
        for fd in dests:
            os.close(fd)
        os.close(top)


def _copy_folder(top: int, dests: list[int]) -> None:
    """``dests[i]`` is the destination folder at level i of the walk (``dests[0]``: the top)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    for dir_fd, name, st, parents in walk_folder(top, max_depth=MAX_OUTPUT_DEPTH):
        while len(dests) > len(parents) + 1:
            os.close(dests.pop())
        dest = dests[-1]
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dest)
            dests.append(os.open(name, DIR_FLAGS, dir_fd=dest))  # the walk enters it next
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=dir_fd), name, dir_fd=dest)
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as src:
                if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                    continue
                out = os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flags, 0o600, dir_fd=dest
                )
                with os.fdopen(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, _MIB)
                    os.fchmod(dst.fileno(), stat.S_IMODE(st.st_mode) & 0o755)


# --------------------------------------------------------------------------------------------
# sandboxes and the pool

Spawner = Callable[[WarmProfile, Path, int], Awaitable[asyncio.subprocess.Process]]
"""``(profile, slot, uid)`` → the spawned sandbox running the launcher."""


class WarmSandbox:
    """One pre-spawned sandbox, idle until :meth:`send_job`; used once."""

    def __init__(
        self,
        pool: WarmPool,
        profile: WarmProfile,
        uid: int,
        slot: Path,
        proc: asyncio.subprocess.Process,
    ) -> None:
        self._pool = pool
        self.profile = profile
        self.uid = uid
        self.slot = slot
        self.proc = proc
        self.state: State = "idle"
        self.job_sent = False
        #: its PID namespace's init, reaped here once the sandbox is gone (see become_reaper)
        self.inits = open_inits(proc)
        self._disposed = False

    @property
    def out_dir(self) -> Path:
        return self.slot / "out"

    async def send_job(self, job: Mapping[str, Any]) -> bool:
        """Hand the job to the launcher and wait until it says it has it.

        False when the sandbox turned out to be dead (or not itself): then nothing of the job
        ran and it may go to another sandbox. From True on, whatever happens is the run's.
        """
        stdin, stdout = self.proc.stdin, self.proc.stdout
        if self.proc.returncode is not None or stdin is None or stdout is None:
            return False
        self.job_sent = True
        try:
            stdin.write(json.dumps(job, separators=(",", ":")).encode() + b"\n")
            if stdin.transport.is_closing():  # EPIPE: nothing reads it any more
                return False
            await stdin.drain()
            stdin.close()
            taken = await asyncio.wait_for(stdout.readexactly(len(JOB_TAKEN)), READY_TIMEOUT_SEC)
        except (BrokenPipeError, ConnectionResetError, asyncio.IncompleteReadError, TimeoutError):
            return False
        return taken == JOB_TAKEN

    def discard(self) -> None:
        """Kill what is left of it and remove its slot, in the background (never reused)."""
        if self._disposed:
            return
        self._disposed = True
        if self.state in ("idle", "taken"):
            self.state = "retired"
        self._pool.dispose(self)


class WarmPool:
    """Keeps up to ``size`` idle warm sandboxes; see the module docstring."""

    def __init__(
        self,
        *,
        size: int,
        warm_dir: Path,
        spawner: Spawner,
        uids: UidBroker,
        initial: WarmProfile,
    ) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self.warm_dir = warm_dir
        self._spawner = spawner
        self._uids = uids
        self._recent: collections.deque[WarmProfile] = collections.deque(
            [initial] * size, maxlen=size
        )
        self._idle: list[WarmSandbox] = []
        self._spawning: collections.Counter[WarmProfile] = collections.Counter()
        self._all: set[WarmSandbox] = set()
        #: taken and not yet discarded: their replacements spawn once their run is over, so a
        #: spawn does not compete with the run for the CPU
        self._in_use: set[WarmSandbox] = set()
        #: set by :meth:`aclose` once the last run of a killed sandbox is over
        self._drained: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._failures = 0
        self._not_before = 0.0
        self._retry: asyncio.TimerHandle | None = None
        self._root = os.geteuid() == 0
        self.stats: collections.Counter[str] = collections.Counter()

    # -- public -------------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    @property
    def idle(self) -> list[WarmSandbox]:
        """The idle sandboxes, oldest first (a copy)."""
        return list(self._idle)

    def start(self) -> None:
        """Bind to the running loop and start spawning."""
        self._loop = asyncio.get_running_loop()
        try:
            removed = remove_stale_slots(self.warm_dir)
        except Exception:  # a bad leftover must never stop the server
            log.exception("could not remove stale warm sandbox folders from %s", self.warm_dir)
            removed = 0
        if removed:
            log.info("removed %d stale warm sandbox folders from %s", removed, self.warm_dir)
        self._uids.on_release = self._kick
        self._reconcile()

    def take(self, profile: WarmProfile, *, record: bool = True) -> WarmSandbox | None:
        """An idle, live sandbox for ``profile`` (now the caller's), or None: start cold."""
        if self._closed:
            return None
        if record:
            self._recent.append(profile)
        found = None
        for warm in list(self._idle):
            if warm.profile != profile:
                continue
            self._idle.remove(warm)
            if warm.proc.returncode is not None:  # died; its watcher has not run yet
                self._lost(warm)
                continue
            warm.state = "taken"
            self._in_use.add(warm)
            found = warm
            break
        self.stats["hits" if found else "misses"] += 1
        self._reconcile()
        return found

    async def prewarm(self, profile: WarmProfile, timeout: float = 30.0) -> bool:
        """Shift one sandbox of the pool to ``profile`` and wait until one is idle (for a
        known upcoming run, benchmarks and tests); False on timeout or when closed."""
        self._recent.append(profile)
        self._reconcile()
        deadline = asyncio.get_running_loop().time() + timeout
        while not any(w.profile == profile for w in self._idle):
            if self._closed or asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def wait_idle(self, count: int | None = None, timeout: float = 30.0) -> bool:
        """Until ``count`` (default: ``size``) sandboxes are idle; for benchmarks and tests."""
        want = self.size if count is None else count
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self._idle) < want:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def aclose(self) -> None:
        """Kill every sandbox of the pool (idle, spawning, or still running a job)."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._uids.on_release = None
        for warm in list(self._all):
            if warm in self._in_use:  # its run sees the kill and discards it (slot and uid)
                kill_sandbox(warm.proc)
            else:
                warm.discard()
        for task in list(self._tasks):
            if not task.done() and task.get_name().startswith("warm-spawn"):
                task.cancel()
        # runs of killed sandboxes still move their output out of the slot before discarding
        if self._in_use:
            self._drained = asyncio.Event()
            await wait_event(self._drained, CLOSE_WAIT_SEC)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------

    def _task(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _kick(self) -> None:
        if self._loop is not None and not self._closed and not self._loop.is_closed():
            self._loop.call_soon(self._reconcile)

    def _reconcile(self) -> None:
        """Retire idle sandboxes of profiles no longer wanted; spawn up to ``size``."""
        if self._closed or self._loop is None:
            return
        wanted = collections.Counter(self._recent)
        have = collections.Counter(w.profile for w in self._idle) + self._spawning
        for profile, count in list(have.items()):
            excess = count - wanted[profile]
            for warm in [w for w in self._idle if w.profile == profile][: max(0, excess)]:
                self._idle.remove(warm)
                have[profile] -= 1
                warm.discard()
        now = self._loop.time()
        if now < self._not_before:
            if self._retry is None:
                self._retry = self._loop.call_at(self._not_before, self._retry_now)
            return
        total = len(self._idle) + sum(self._spawning.values()) + len(self._in_use)
        while total < self.size:
            deficits = [(wanted[p] - have[p], p) for p in wanted if wanted[p] > have[p]]
            if not deficits:
                break
            profile = max(deficits, key=lambda d: d[0])[1]
            uid = self._uids.try_take(for_warm=True)
            if uid is None:
                break  # every pool uid is busy: spawn when one comes back
            self._spawning[profile] += 1
            have[profile] += 1
            total += 1
            self._task(self._spawn(profile, uid), f"warm-spawn-{profile.memory_mb}")

    def _retry_now(self) -> None:
        self._retry = None
        self._reconcile()

    async def _spawn(self, profile: WarmProfile, uid: int) -> None:
        slot: Path | None = None
        proc: asyncio.subprocess.Process | None = None
        try:
            slot = await asyncio.to_thread(make_slot, self.warm_dir, uid if self._root else None)
            proc = await self._spawner(profile, slot, uid)
            await asyncio.wait_for(_await_ready(proc), READY_TIMEOUT_SEC)
        except BaseException as exc:
            self._spawning[profile] -= 1
            inits: list[AdoptedInit] = []
            if proc is not None:
                inits = open_inits(proc)
                kill_sandbox(proc)
            self._task(self._cleanup(proc, slot, uid, inits=inits), "warm-cleanup")
            if isinstance(exc, Exception):
                self._failed(f"spawn failed: {exc}")
            else:
                raise
            return
        self._spawning[profile] -= 1
        warm = WarmSandbox(self, profile, uid, slot, proc)
        self._all.add(warm)
        if self._closed:
            warm.discard()
            return
        self._idle.append(warm)
        self._failures = 0
        self.stats["spawned"] += 1
        self._task(self._watch_idle(warm), "warm-watch")
        self._uids.notify()  # a run waiting for a uid may take this sandbox instead
        self._reconcile()

    async def _watch_idle(self, warm: WarmSandbox) -> None:
        await warm.proc.wait()
        if warm.state != "idle":
            return  # taken (its run sees the exit) or already retired
        if warm in self._idle:
            self._idle.remove(warm)
        warm.state = "dead"
        stderr = b""
        if warm.proc.stderr is not None:
            with contextlib.suppress(asyncio.TimeoutError, OSError):
                stderr = await asyncio.wait_for(warm.proc.stderr.read(4096), 1.0)
        self._lost(warm, stderr.decode(errors="replace").strip()[-500:])

    def _lost(self, warm: WarmSandbox, detail: str = "") -> None:
        """An idle sandbox exited on its own: never hand it out; count it as a failure."""
        warm.state = "dead"
        warm.discard()
        self.stats["died_idle"] += 1
        self._failed(f"an idle warm sandbox exited ({warm.proc.returncode}) {detail}".rstrip())

    def _failed(self, why: str) -> None:
        self._failures += 1
        self.stats["failures"] += 1
        delay = min(MAX_BACKOFF_SEC, 0.1 * 2 ** (self._failures - 1))
        if self._loop is not None:
            self._not_before = self._loop.time() + delay
        log.warning("warm sandbox pool: %s (next spawn in %.1f s)", why, delay)
        self._kick()

    def dispose(self, warm: WarmSandbox) -> None:
        """Kill ``warm`` (if alive) now; wait for it, remove its slot and free its uid later."""
        if warm in self._idle:
            self._idle.remove(warm)
        if warm.proc.returncode is None:
            if warm.job_sent or warm.proc.stdin is None:
                kill_sandbox(warm.proc)
            else:  # never got a job: end of input makes it exit cleanly (see _cleanup)
                warm.proc.stdin.close()
        self._task(
            self._cleanup(warm.proc, warm.slot, warm.uid, warm=warm, inits=warm.inits),
            "warm-cleanup",
        )
        if warm in self._in_use:
            self._in_use.discard(warm)
            if not self._in_use and self._drained is not None:
                self._drained.set()
            self._kick()  # its replacement

    async def _cleanup(
        self,
        proc: asyncio.subprocess.Process | None,
        slot: Path | None,
        uid: int,
        *,
        warm: WarmSandbox | None = None,
        inits: Sequence[AdoptedInit] = (),
    ) -> None:
        reaped: list[asyncio.Future[None] | None] = []
        try:
            if proc is not None:
                try:  # an idle launcher exits on end of input; a killed sandbox goes anyway
                    await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_GRACE_SEC)
                except TimeoutError:
                    kill_sandbox(proc)
                await proc.wait()
                # bwrap's monitor is gone, its namespace's init may not be: kill it (and with it
                # anything the run left behind), reap it however long that takes
                for init in inits:
                    init.kill()
                reaped = [init.reaped() for init in inits]
                await asyncio.gather(*[f for f in reaped if f is not None])
            if slot is not None:
                await asyncio.to_thread(remove_tree, slot)
        finally:
            if warm is not None:
                self._all.discard(warm)
            # the uid is free only once none of its processes (zombies included) is left
            when_done(reaped, functools.partial(self._uids.release, uid))


async def _await_ready(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None and proc.stderr is not None
    try:
        got = await proc.stdout.readexactly(len(READY))
    except asyncio.IncompleteReadError as exc:
        err = b""
        with contextlib.suppress(asyncio.TimeoutError):
            err = await asyncio.wait_for(proc.stderr.read(4096), 2.0)
        code = await proc.wait()
        raise RuntimeError(
            f"sandbox exited ({code}) before it was ready: "
            f"{(exc.partial + err).decode(errors='replace').strip()}"
        ) from None
    if got != READY:
        raise RuntimeError(f"unexpected first output from the launcher: {got!r}")


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


PR_SET_CHILD_SUBREAPER = 36


@functools.cache
def become_reaper() -> bool:
    """Adopt this process's orphaned descendants (``PR_SET_CHILD_SUBREAPER``), so the exited
    PID-namespace init bwrap leaves behind is reaped here (:func:`reap_adopted`).

    bwrap's monitor exits as soon as it learns the spell's exit status, without reaping the
    namespace's init, which then waits as a zombie for whoever adopts it. A host init that
    reaps late (this VM's does so every few seconds), or none at all (a container whose PID 1
    is the server), lets them pile up, and zombies count against the sandbox uid's
    ``RLIMIT_NPROC`` until reaped. The server spawns nothing but sandboxes. True when this
    process adopts orphans (or is PID 1 anyway).
    """
    if os.getpid() == 1:
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class AdoptedInit:
    """A sandbox's PID-namespace init, held by pidfd: killed and reaped without ever acting on
    a recycled pid, and reaped however long it takes to die (no retry limit).

    Open it (:meth:`open`) while it is known to be the right process: a child of bwrap's live
    monitor, or already adopted by this process. Until reaped it stays in :data:`_PENDING`
    with its pidfd registered with the event loop (a pidfd turns readable when the process
    exits), so a slow death still ends in a ``waitid`` here rather than a zombie that counts
    against the sandbox uid's ``RLIMIT_NPROC``.
    """

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._fd = pidfd
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def open(cls, pid: int, parent: int) -> AdoptedInit | None:
        """``pid`` by pidfd if its parent is ``parent`` once the pidfd is open (so the pidfd is
        that process, not a later one with a recycled pid); None otherwise or without pidfds."""
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            return None
        try:
            _, ppid = _state_and_parent(pid)
        except (OSError, ValueError, IndexError):
            ppid = -1
        if ppid != parent:
            os.close(fd)
            return None
        return cls(pid, fd)

    def kill(self) -> None:
        """SIGKILL it (the kernel then kills everything in its namespace); never another."""
        if self._fd >= 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(self._fd, signal.SIGKILL)

    def reaped(self) -> asyncio.Future[None]:
        """Done once it was reaped here, or turned out not to be this process's child (then
        whoever adopted it reaps it)."""
        if self._done is None:
            self._loop = asyncio.get_running_loop()
            self._done = self._loop.create_future()
            if not self._try_reap():
                _PENDING.add(self)
                self._loop.add_reader(self._fd, self._on_readable)
        return self._done

    def _on_readable(self) -> None:
        if self._try_reap():
            _PENDING.discard(self)

    def _try_reap(self) -> bool:
        if self._fd < 0:
            return True
        try:
            if os.waitid(os.P_PIDFD, self._fd, os.WEXITED | os.WNOHANG) is None:
                return False  # still alive (or not yet a zombie)
        except ChildProcessError:
            pass  # not our child: its own parent (or the host's init) reaps it
        except OSError as exc:
            log.warning("cannot wait for sandbox init %d: %s", self.pid, exc)
        if self._loop is not None and self in _PENDING:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        return True


#: Adopted inits not reaped yet (see :class:`AdoptedInit`).
_PENDING: set[AdoptedInit] = set()


def pending_inits() -> int:
    """How many adopted sandbox inits are still waiting to be reaped (for tests, metrics)."""
    return len(_PENDING)


def reap_adopted(pid: int) -> asyncio.Future[None] | None:
    """Reap ``pid`` (a sandbox's namespace init, after bwrap's monitor exited) once it is gone,
    if this process adopted it; no time limit. Any other process is left alone: one that is
    not our child, or already reaped by its own parent. None when there is nothing to wait for.
    """
    init = AdoptedInit.open(pid, os.getpid())
    return None if init is None else init.reaped()


def open_inits(proc: asyncio.subprocess.Process) -> list[AdoptedInit]:
    """The namespace init(s) of bwrap's live monitor ``proc``, by pidfd."""
    found = []
    for pid in namespace_inits(proc):
        init = AdoptedInit.open(pid, proc.pid)
        if init is not None:
            found.append(init)
    return found


def when_done(futures: Sequence[asyncio.Future[None] | None], then: Callable[[], None]) -> None:
    """Call ``then`` now if every future is done (or None), else once they all are."""
    waiting = [f for f in futures if f is not None and not f.done()]
    if not waiting:
        then()
        return
    asyncio.gather(*waiting, return_exceptions=True).add_done_callback(lambda _: then())


def _state_and_parent(pid: int) -> tuple[str, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def namespace_inits(proc: asyncio.subprocess.Process) -> list[int]:
    """The children of bwrap's monitor ``proc``: its PID namespace's init (once it exists)."""
    return _children(proc.pid) if proc.returncode is None else []


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def renice_tree(pid: int, nice: int) -> int:
    """Set the niceness of ``pid``, every thread of it and of its descendants; how many
    threads were set. Gone processes are skipped; anything else (no permission) raises."""
    done = 0
    todo = [pid]
    while todo:
        top = todo.pop()
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{top}/task")]
        except (OSError, ValueError):
            continue  # gone
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                done += 1
            except ProcessLookupError:
                continue
            try:
                todo += [
                    int(c) for c in Path(f"/proc/{top}/task/{tid}/children").read_text().split()
                ]
            except (OSError, ValueError):
                continue
    return done


def kill_sandbox(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL a bwrap sandbox from the inside out.

    ``proc`` is bwrap's monitor (setpriv and prlimit exec into it); its child is the init of
    the sandbox's PID namespace. Killing that init makes the kernel kill every process in the
    namespace, and the monitor reaps it and exits on its own. Killing the monitor first (its
    process group) would re-parent the init to the host's init, whose late reaping leaves
    zombies that still count against the sandbox uid's ``RLIMIT_NPROC``. The monitor's group is
    killed as well when it has no child yet, or if it is still there after
    :data:`KILL_GRACE_SEC`.
    """
    if proc.returncode is not None:
        return
    children = _children(proc.pid)
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    if not children:
        _killpg(proc.pid)
        return

    def fallback() -> None:
        if proc.returncode is None:  # not reaped yet, so the pid is still this process's
            _killpg(proc.pid)

    asyncio.get_running_loop().call_later(KILL_GRACE_SEC, fallback)
