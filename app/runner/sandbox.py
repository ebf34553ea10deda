"""Run one spell process under bubblewrap with rlimits, a wall-clock timeout and an output cap.

The recipe (measured in ``FACTS.md`` § Sandbox):

* When the runner is root it drops to an unprivileged host uid with ``setpriv`` *before* exec'ing
  ``bwrap``: a root-launched sandbox otherwise maps to host root and can read ``/etc/shadow``.
* ``bwrap --unshare-all --disable-userns --cap-drop ALL --clearenv``: empty network namespace
  (only ``lo``), own PID namespace (every process dies with the sandbox), no nested user
  namespaces, no capabilities, no inherited environment; ``setpriv --no-new-privs``.
* A seccomp deny-list (:func:`seccomp_program`, x86_64 and aarch64) answers EPERM for ptrace,
  mount, unshare/setns, bpf, io_uring, perf, keyrings, modules, ... and ENOSYS for clone3.
  Sockets: two filters. The **no-network** filter (every run without a network allow-list)
  lets ``socket()`` create only ``AF_UNIX`` sockets: ``AF_INET``/``AF_INET6`` answer EPERM.
  The **proxy** filter (runs with an allow-list) also allows ``AF_INET``/``AF_INET6``, for the
  bridge below. In both, every other family answers EAFNOSUPPORT (netlink, packet, vsock, ...)
  and ``socketpair()`` is ``AF_UNIX`` only.
* Network: none, unless the spec carries a :class:`~app.runner.netproxy.NetworkAccess` (the
  spell's ``execution.network.allow``): then a per-run CONNECT proxy on the host serves a Unix
  socket in the folder every sandbox has bound read-only at ``/run/spell``, and the launcher
  bridges it to ``127.0.0.1:3128`` inside (``HTTPS_PROXY`` and friends point there). Why
  ``AF_INET`` is allowed for those runs and what is refused: :mod:`app.runner.netproxy`.
* A minimal root: ``/usr`` read-only plus the usrmerge symlinks, fresh ``/proc``, ``/dev``, size-
  limited tmpfs at ``/tmp`` and ``/dev/shm``; the bundle read-only at ``/spell`` (the cwd), the
  input read-only at ``/tmp/input.json`` and the output folder read-write at ``/tmp/out``. ``/``
  and ``/dev`` are remounted read-only at the end, so nothing else is writable.
* rlimits (``AS``, ``CPU``, ``FSIZE``, ``NPROC``, ``NOFILE`` = :data:`MAX_OPEN_FILES`,
  ``CORE=0``) are set by ``prlimit``, the first
  program of the command (it execs setpriv, which execs bwrap), and inherited by everything
  inside. No ``preexec_fn``: the spawn is a vfork + exec that does not hold up the event loop.
  Options (env values included) reach bwrap through ``--args FD``, so they never show up in the
  host's ``/proc/*/cmdline``.
* ``--json-status-fd`` tells a spell's own failure (bwrap reports ``exit-code``, or could not
  exec the spell's program) apart from a sandbox that never started: the latter raises
  :class:`SandboxUnavailable`.
* A sandbox is killed from the inside out (:func:`app.runner.pool.kill_sandbox`: its PID
  namespace's init, so the kernel kills everything in it). The namespace init that bwrap's
  monitor leaves unreaped when it exits is adopted and reaped by this process
  (:func:`app.runner.pool.become_reaper`), so no zombie of the sandbox uid piles up. Once the
  monitor has exited, that init is killed by pidfd (with whatever the run left running) and
  waited for before the output is measured and moved; it is reaped however long it takes to
  die (:class:`app.runner.pool.AdoptedInit`), and the run's uid is released only after that.
* The output folder is measured by directory fd without recursion
  (:mod:`app.runner.fstree`): nesting past ``PATH_MAX`` is still counted, and a tree deeper
  than :data:`MAX_OUTPUT_DEPTH` levels or one that cannot be read is over the cap (fail
  closed).
* Warm pool (``warm`` > 0, :mod:`app.runner.pool`): the same sandboxes, spawned before a run
  needs one, built from the same :meth:`BwrapSandbox._options`; see :class:`BwrapSandbox`.
  The seccomp filter is fixed at spawn, so it is part of a warm sandbox's
  :class:`~app.runner.pool.WarmProfile`: no-network sandboxes serve only runs without an
  allow-list, proxy-flavoured ones only runs with one (:func:`warm_profile_of`).

Outcome classification (first match wins):

``timeout``           the wall clock passed ``timeout_sec``; the sandbox was killed.
``output_too_large``  the watchdog saw ``out_dir`` grow past ``max_output_bytes`` (or past
                      :data:`MAX_OUTPUT_ENTRIES` entries, or deeper than
                      :data:`MAX_OUTPUT_DEPTH`, or unreadable) and killed it, or the total
                      after exit is over the cap (or cannot be measured); or a non-zero exit
                      after ``RLIMIT_FSIZE`` hit: ``SIGXFSZ`` (exit 153), ``File too large``
                      (EFBIG) in the stderr tail (Python ignores SIGXFSZ) or the output folder
                      exactly at the cap.
``ok``                exit status 0 (and output within the cap).
``cpu``               ``SIGXCPU`` (exit 152): ``RLIMIT_CPU`` reached.
``memory``            non-zero exit and the stderr tail shows an allocation failure
                      (``MemoryError``, ``Cannot allocate memory``, ``std::bad_alloc``,
                      ``out of memory``). ``RLIMIT_AS`` makes allocations fail rather than
                      summoning the OOM killer, so the process reports it itself. A spell can
                      fake this by printing the text; it is a failure either way.
``killed``            ``SIGKILL`` from outside the runner (exit 137 or the launcher itself killed).
``exit_error``        any other non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import stat
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from app.runner.fstree import MAX_OUTPUT_DEPTH, remove_tree, tree_usage
from app.runner.netproxy import (
    PROXY_ENV_NAMES,
    PROXY_PORT,
    SANDBOX_NET_DIR,
    SANDBOX_PROXY_SOCKET,
    NetProxy,
    NetworkAccess,
    ProxyFactory,
    proxy_env,
)
from app.runner.pool import (
    WARM_MAX_CPU_SEC,
    WARM_SPAWN_NICE,
    AdoptedInit,
    UidBroker,
    WarmPool,
    WarmProfile,
    WarmSandbox,
    become_reaper,
    copy_output,
    fill_slot,
    kill_sandbox,
    launcher_source,
    move_output,
    remove_stale_slots,
    renice_tree,
    when_done,
)

__all__ = [
    "SANDBOX_PYTHON",
    "BwrapSandbox",
    "LineCallback",
    "Outcome",
    "Sandbox",
    "SandboxResult",
    "SandboxSpec",
    "SandboxUnavailable",
    "UnsafeSubprocessSandbox",
    "detect_sandbox",
    "process_budget_error",
    "seccomp_program",
    "warm_profile_of",
]

log = logging.getLogger("spell.sandbox")

#: Paths inside the sandbox (its /tmp is a private tmpfs, not the host's).
SPELL_DIR = "/spell"
SANDBOX_TMP = "/tmp"  # noqa: S108
SANDBOX_SHM = "/dev/shm"  # noqa: S108
INPUT_PATH = f"{SANDBOX_TMP}/input.json"
OUT_DIR = f"{SANDBOX_TMP}/out"
#: The interpreter of Python spells (``build_argv``) and of the warm sandboxes' launcher.
SANDBOX_PYTHON = "/usr/bin/python3"

#: Bytes of stdout/stderr kept for the result, per stream.
TAIL_BYTES = 4096
#: Longest line handed to ``on_line``; the rest of the line is dropped.
MAX_LINE_BYTES = 8192
#: Lines handed to ``on_line`` per run (both streams together); the tails are kept regardless.
MAX_STREAMED_LINES = 10_000
#: How often the watchdog measures ``out_dir``.
WATCHDOG_INTERVAL_SEC = 0.15
#: Entries (files, folders, links) allowed in ``out_dir``; RLIMIT_FSIZE caps bytes per file,
#: this caps inode exhaustion with millions of empty files.
MAX_OUTPUT_ENTRIES = 10_000
#: ``RLIMIT_NOFILE`` of a spell (soft and hard), cold and warm: without it a spell inherits the
#: server's (tens of thousands) and could hold that many deleted-but-open files of
#: ``RLIMIT_FSIZE`` bytes each, which no output count sees.
MAX_OPEN_FILES = 256
#: How long a run waits for its killed namespace init to be reaped before it measures the
#: output anyway (the reaping itself goes on; the uid is released only after it).
INIT_EXIT_GRACE_SEC = 5.0
#: How long to wait for the output pipes to close once the process has gone.
PIPE_DRAIN_SEC = 5.0

_MIB = 1024 * 1024
_MEMORY_MARKERS = re.compile(
    r"MemoryError|Cannot allocate memory|std::bad_alloc|out of memory", re.IGNORECASE
)
# strerror(EFBIG): Python ignores SIGXFSZ, so RLIMIT_FSIZE surfaces as an OSError.
_FILE_TOO_LARGE_MARKER = "File too large"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESERVED_ENV = frozenset({"HOME", "PATH", "LANG", "SPELL_INPUT", "SPELL_OUT", *PROXY_ENV_NAMES})
# Exit statuses of a spell killed inside the (Linux-only) sandbox. The fallbacks are Linux's
# signal numbers, so this module still imports where ``signal`` lacks them (Windows).
_SIGXCPU_EXIT: int = 128 + getattr(signal, "SIGXCPU", 24)
_SIGXFSZ_EXIT: int = 128 + getattr(signal, "SIGXFSZ", 25)
_SIGKILL_EXIT: int = 128 + getattr(signal, "SIGKILL", 9)
#: The warm sandbox's command line stays short: it reads the launcher's source (12 digits of
#: length, then the source) from stdin, where the job comes later.
LAUNCHER_BOOTSTRAP = (
    "import os\n"
    "n = int(os.read(0, 12))\n"
    "b = b''\n"
    "while len(b) < n:\n"
    "    c = os.read(0, n - len(b))\n"
    "    if not c:\n"
    "        raise SystemExit(70)\n"
    "    b += c\n"
    "exec(compile(b, '<spell-launcher>', 'exec'))\n"
)
#: The same for a cold run with a network allow-list: source and job come on stdin at once,
#: and the launcher writes nothing of its own to stdout.
LAUNCHER_BOOTSTRAP_COLD = "SPELL_LAUNCHER_COLD = True\n" + LAUNCHER_BOOTSTRAP
#: Environment names a Python spell may be given and still run in a warm launcher's
#: interpreter: none of them is read by the interpreter or libc at start-up (``LC_*``, ``TZ``,
#: ``LD_*``, ``MALLOC_*``... are, so a spell given those is exec'ed afresh).
_IN_PROCESS_ENV = re.compile(r"SPELL_[A-Z0-9_]*|TRACEPARENT|TRACESTATE")

Outcome = Literal["ok", "exit_error", "timeout", "memory", "output_too_large", "cpu", "killed"]
LineCallback = Callable[[str, str], Awaitable[None]]
"""``(stream, line)``: stream is ``"stdout"`` or ``"stderr"``, line has no newline."""


class SandboxUnavailable(Exception):
    """The sandbox cannot run here (bwrap missing, namespaces forbidden, probe or setup failed)."""


@dataclass(frozen=True)
class SandboxSpec:
    """One sandboxed run. Host paths must be reachable by the sandbox uid (see ``run``)."""

    bundle_dir: Path
    argv: list[str]
    input_path: Path
    out_dir: Path
    timeout_sec: float
    memory_mb: int
    max_output_bytes: int
    env: Mapping[str, str] = field(default_factory=dict)
    cpu_sec: int | None = None
    max_procs: int = 64
    #: None: no network at all; else the hosts the run may reach through the proxy
    network: NetworkAccess | None = None

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("argv must not be empty")
        if not self.timeout_sec > 0:
            raise ValueError("timeout_sec must be > 0")
        if self.memory_mb <= 0 or self.max_output_bytes <= 0 or self.max_procs <= 0:
            raise ValueError("memory_mb, max_output_bytes and max_procs must be > 0")
        if self.cpu_sec is not None and self.cpu_sec <= 0:
            raise ValueError("cpu_sec must be > 0")
        for arg in self.argv:
            _check_arg(arg, "argv")
        for name, value in self.env.items():
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"invalid environment variable name {name!r}")
            if name in _RESERVED_ENV:
                raise ValueError(f"environment variable {name} is set by the sandbox")
            _check_arg(value, f"env[{name}]")

    @property
    def effective_cpu_sec(self) -> int:
        return self.cpu_sec if self.cpu_sec is not None else math.ceil(self.timeout_sec) + 1


@dataclass(frozen=True)
class SandboxResult:
    outcome: Outcome
    exit_code: int | None
    """Exit status (128+N when the process died of signal N); None when the runner killed it
    (timeout, output cap)."""
    duration_ms: int
    output_bytes: int
    stdout_tail: str
    stderr_tail: str


class Sandbox(Protocol):
    name: str

    async def probe(self) -> None:
        """Raise :class:`SandboxUnavailable` unless runs can work here."""

    async def run(self, spec: SandboxSpec, on_line: LineCallback | None = None) -> SandboxResult:
        """Run ``spec.argv`` to completion (or until a limit kills it)."""


def _check_arg(value: str, what: str) -> None:
    # bwrap reads its options NUL-separated from a memfd: a NUL would smuggle in options.
    if "\0" in value:
        raise ValueError(f"{what} must not contain NUL characters")


# --------------------------------------------------------------------------------------------
# Pieces shared by both sandboxes


@dataclass(frozen=True)
class _Limits:
    address_space: int
    cpu_sec: int
    file_size: int
    procs: int
    files: int = MAX_OPEN_FILES

    @classmethod
    def of(cls, spec: SandboxSpec) -> _Limits:
        return cls(
            address_space=spec.memory_mb * _MIB,
            cpu_sec=spec.effective_cpu_sec,
            file_size=spec.max_output_bytes,
            procs=spec.max_procs,
        )

    def prlimit_argv(self, prlimit: str) -> list[str]:
        """``prlimit`` as the first program of the command: it sets the limits and execs the
        rest. No ``preexec_fn``, so the spawn is a vfork + exec that does not hold up the event
        loop (a fork of the whole server process with ``preexec_fn`` took 10-15 ms).

        Soft < hard CPU: SIGXCPU at the soft limit (exit 152), SIGKILL a second later if
        ignored. ``RLIMIT_NPROC`` is counted per host uid (all concurrent sandboxes share it)
        and ignored for root.
        """
        return [
            prlimit,
            f"--as={self.address_space}",
            f"--cpu={self.cpu_sec}:{self.cpu_sec + 1}",
            f"--fsize={self.file_size}",
            f"--nproc={self.procs}",
            f"--nofile={self.files}",
            "--core=0",
            "--",
        ]

    def for_launcher(self) -> dict[str, list[int]]:
        """The same limits for the warm launcher's ``setrlimit`` calls (soft, hard)."""
        return {
            "as": [self.address_space, self.address_space],
            "cpu": [self.cpu_sec, self.cpu_sec + 1],
            "fsize": [self.file_size, self.file_size],
            "nproc": [self.procs, self.procs],
            "nofile": [self.files, self.files],
            "core": [0, 0],
        }


class _LineBudget:
    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


class _StreamCollector:
    """Reads one pipe in chunks: keeps a byte tail, hands capped lines to ``on_line``."""

    def __init__(self, stream: str, on_line: LineCallback | None, budget: _LineBudget) -> None:
        self.stream = stream
        self._on_line = on_line
        self._budget = budget
        self._tail = bytearray()
        self._line = bytearray()
        self._line_full = False

    @property
    def tail(self) -> str:
        return self._tail.decode("utf-8", errors="replace")

    async def consume(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(65536):
            self._tail += chunk
            if len(self._tail) > TAIL_BYTES:
                del self._tail[:-TAIL_BYTES]
            start = 0
            while (newline := chunk.find(b"\n", start)) != -1:
                self._append(chunk[start:newline])
                await self._emit()
                start = newline + 1
            self._append(chunk[start:])
        if self._line or self._line_full:
            await self._emit()

    def _append(self, piece: bytes) -> None:
        room = MAX_LINE_BYTES - len(self._line)
        if len(piece) > room:
            self._line_full = True
            piece = piece[:room]
        self._line += piece

    async def _emit(self) -> None:
        line = self._line.decode("utf-8", errors="replace").removesuffix("\r")
        self._line.clear()
        self._line_full = False
        if self._on_line is None or not self._budget.take():
            return
        try:
            await self._on_line(self.stream, line)
        except Exception:
            log.exception("on_line callback failed; no further lines are streamed for this run")
            self._on_line = None


def _output_usage(out_dir: Path, *, strict: bool = True) -> tuple[int, int] | None:
    """(bytes in regular files, entries) under ``out_dir``, or None when it cannot be measured.

    Walks by directory fd, iteratively (:func:`app.runner.fstree.tree_usage`): a tree nested
    past ``PATH_MAX`` is still counted. Fail closed: a tree deeper than
    :data:`MAX_OUTPUT_DEPTH`, or any part of it that cannot be read, gives None, which the
    caller treats as over the cap. Stops counting past :data:`MAX_OUTPUT_ENTRIES` entries.
    """
    try:
        return tree_usage(
            out_dir, max_entries=MAX_OUTPUT_ENTRIES, max_depth=MAX_OUTPUT_DEPTH, strict=strict
        )
    except OSError as exc:
        log.warning("output folder %s cannot be measured (%s): over the cap", out_dir, exc)
        return None


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _may(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    """Whether ``uid``/``gid`` (no supplementary groups) has ``bits`` (r=4, w=2, x=1)."""
    if st.st_uid == uid:
        shift = 6
    elif st.st_gid == gid:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & bits == bits


def _require_access(path: Path, uid: int, gid: int, bits: int, what: str) -> None:
    """Fail early, with a clear message, if the sandbox uid could not reach ``path``.

    bwrap resolves bind sources as the unprivileged user, so every ancestor needs search
    permission for it (pytest's ``/tmp/pytest-of-root`` is 0700, for instance).
    """
    for parent in reversed(path.parents):
        if not _may(parent.stat(), uid, gid, 1):
            raise ValueError(
                f"{what} {path} is not reachable by sandbox uid {uid}: "
                f"{parent} lacks search (x) permission for it"
            )
    if not _may(path.stat(), uid, gid, bits):
        raise ValueError(f"{what} {path} lacks permission {bits:o} for sandbox uid {uid}")


def _prepare_paths(spec: SandboxSpec, uid: int | None) -> tuple[Path, Path, Path]:
    """Resolve the host paths, create/chown ``out_dir``; ``uid`` None means no uid switch."""
    bundle_dir = spec.bundle_dir.resolve(strict=True)
    input_path = spec.input_path.resolve(strict=True)
    if not bundle_dir.is_dir():
        raise ValueError(f"bundle_dir {bundle_dir} is not a folder")
    if not stat.S_ISREG(input_path.stat().st_mode):
        raise ValueError(f"input_path {input_path} is not a regular file")
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = spec.out_dir.resolve(strict=True)
    if uid is not None:
        os.chown(out_dir, uid, uid)
        out_dir.chmod(0o700)
        _require_access(bundle_dir, uid, uid, 5, "bundle_dir")
        _require_access(input_path, uid, uid, 4, "input_path")
        _require_access(out_dir, uid, uid, 7, "out_dir")
    return bundle_dir, input_path, out_dir


@dataclass
class _RawRun:
    returncode: int
    killed_for: Outcome | None
    duration_ms: int
    output_bytes: int
    output_entries: int
    stdout_tail: str
    stderr_tail: str
    #: the output folder could not be walked (too deep, unreadable): over the cap, fail closed
    output_unmeasurable: bool = False


async def _spawn(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None,
    pass_fds: Sequence[int],
    stdin: int = asyncio.subprocess.DEVNULL,
) -> asyncio.subprocess.Process:
    """Start ``cmd`` in a new session (its pid is its process group), pipes for its output."""
    return await asyncio.create_subprocess_exec(
        *cmd,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
        close_fds=True,
    )


async def _supervise(
    cmd: Sequence[str],
    *,
    spec: SandboxSpec,
    out_dir: Path,
    env: Mapping[str, str],
    cwd: Path | None,
    pass_fds: Sequence[int],
    on_line: LineCallback | None,
    reap_group_after_exit: bool,
    after_exit: Callable[[], Awaitable[None]] | None = None,
    stdin_data: bytes | None = None,
) -> _RawRun:
    """Spawn ``cmd`` (already wrapped in ``prlimit``) and watch it until it is gone.

    ``stdin_data``: written to its stdin, which is then closed (else stdin is ``/dev/null``)."""
    started = time.monotonic()
    if stdin_data is None:
        proc = await _spawn(cmd, env=env, cwd=cwd, pass_fds=pass_fds)
    else:
        proc = await _spawn(cmd, env=env, cwd=cwd, pass_fds=pass_fds, stdin=asyncio.subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(stdin_data)  # buffered by the transport; a dead reader drops it
        proc.stdin.close()
    return await _watch(
        proc,
        spec=spec,
        out_dir=out_dir,
        started=started,
        on_line=on_line,
        reap_group_after_exit=reap_group_after_exit,
        after_exit=after_exit,
    )


async def _watch(
    proc: asyncio.subprocess.Process,
    *,
    spec: SandboxSpec,
    out_dir: Path,
    started: float,
    on_line: LineCallback | None,
    reap_group_after_exit: bool,
    after_exit: Callable[[], Awaitable[None]] | None = None,
) -> _RawRun:
    """Stream the output, enforce the wall clock and the output cap, reap; kill on cancel.

    ``after_exit`` runs once ``proc`` has exited, before the output is measured (the sandbox
    kills what its namespace's init left running there, so nothing writes any more)."""
    budget = _LineBudget(MAX_STREAMED_LINES)
    collectors = (
        _StreamCollector("stdout", on_line, budget),
        _StreamCollector("stderr", on_line, budget),
    )
    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        asyncio.ensure_future(collectors[0].consume(proc.stdout)),
        asyncio.ensure_future(collectors[1].consume(proc.stderr)),
    ]
    waiter = asyncio.ensure_future(proc.wait())
    watchdog = asyncio.ensure_future(_watch_output(out_dir, spec.max_output_bytes))
    killed_for: Outcome | None = None

    def kill() -> None:
        if reap_group_after_exit:  # no namespaces: the process group is the run
            _killpg(proc.pid)
        else:
            kill_sandbox(proc)

    try:
        remaining = spec.timeout_sec - (time.monotonic() - started)
        done, _ = await asyncio.wait(
            {waiter, watchdog}, timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            killed_for = "output_too_large" if watchdog in done else "timeout"
            kill()
        returncode = await waiter
        duration_ms = int((time.monotonic() - started) * 1000)
        if after_exit is not None:
            await after_exit()
        if reap_group_after_exit:
            # Without a PID namespace, children that outlive the leader keep the group (and the
            # pipes) alive. Safe: a group id cannot be reused while a member lives.
            _killpg(proc.pid)
        _, pending = await asyncio.wait(readers, timeout=PIPE_DRAIN_SEC)
        for reader in pending:
            reader.cancel()
    finally:
        watchdog.cancel()
        if proc.returncode is None:  # cancelled from outside: never leave a sandbox behind
            kill()
            if reap_group_after_exit:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.shield(waiter)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, watchdog, return_exceptions=True)
    usage = await asyncio.to_thread(_output_usage, out_dir)
    output_bytes, entries = usage if usage is not None else (0, 0)
    return _RawRun(
        returncode=returncode,
        killed_for=killed_for,
        duration_ms=duration_ms,
        output_bytes=output_bytes,
        output_entries=entries,
        output_unmeasurable=usage is None,
        stdout_tail=collectors[0].tail,
        stderr_tail=collectors[1].tail,
    )


async def _watch_output(out_dir: Path, max_bytes: int) -> None:
    """Return as soon as ``out_dir`` is over the byte or entry cap; poll otherwise."""
    while True:
        await asyncio.sleep(WATCHDOG_INTERVAL_SEC)
        usage = await asyncio.to_thread(_output_usage, out_dir, strict=False)
        if usage is None or usage[0] > max_bytes or usage[1] > MAX_OUTPUT_ENTRIES:
            return


def _classify(raw: _RawRun, spec: SandboxSpec) -> SandboxResult:
    # bwrap reports a signal death of the spell as 128+N; do the same when the launcher died.
    code: int | None = raw.returncode if raw.returncode >= 0 else 128 - raw.returncode
    outcome: Outcome
    if raw.killed_for is not None:
        outcome, code = raw.killed_for, None
    elif (
        raw.output_unmeasurable
        or raw.output_bytes > spec.max_output_bytes
        or raw.output_entries > MAX_OUTPUT_ENTRIES
    ):
        outcome = "output_too_large"
    elif raw.returncode == 0:
        outcome = "ok"
    elif (
        code == _SIGXFSZ_EXIT
        or _FILE_TOO_LARGE_MARKER in raw.stderr_tail
        or raw.output_bytes >= spec.max_output_bytes
    ):
        outcome = "output_too_large"
    elif code == _SIGXCPU_EXIT:
        outcome = "cpu"
    elif _MEMORY_MARKERS.search(raw.stderr_tail):
        outcome = "memory"
    elif code == _SIGKILL_EXIT or raw.returncode < 0:
        outcome = "killed"
    else:
        outcome = "exit_error"
    return SandboxResult(
        outcome=outcome,
        exit_code=code,
        duration_ms=raw.duration_ms,
        output_bytes=raw.output_bytes,
        stdout_tail=raw.stdout_tail,
        stderr_tail=raw.stderr_tail,
    )


# --------------------------------------------------------------------------------------------
# seccomp: a classic-BPF deny-list, built with the stdlib and handed to ``bwrap --seccomp FD``

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_RET_K = 0x06
_SECCOMP_RET_KILL_PROCESS = 0x80000000
_SECCOMP_RET_ERRNO = 0x00050000
_SECCOMP_RET_ALLOW = 0x7FFF0000
_X32_SYSCALL_BIT = 0x40000000
#: offsetof(struct seccomp_data, args): int nr, u32 arch, u64 instruction_pointer
_SECCOMP_ARGS_OFFSET = 16

#: Syscalls a spell never needs that widen the kernel attack surface or reach outside the
#: sandbox (tracing, mounts, namespaces, BPF, io_uring, keyrings, modules, clocks, ...).
#: Most fail anyway without capabilities; the filter makes that independent of kernel bugs.
_DENIED_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "mount": 165, "umount2": 166, "pivot_root": 155, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "unshare": 272, "setns": 308, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "keyctl": 250, "add_key": 248, "request_key": 249, "kexec_load": 246,
        "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "iopl": 172, "ioperm": 173, "swapon": 167, "swapoff": 168, "reboot": 169, "acct": 163,
        "syslog": 103, "quotactl": 179, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_by_handle_at": 304, "name_to_handle_at": 303,
        "fanotify_init": 300, "lookup_dcookie": 212, "uselib": 134, "vhangup": 153,
        "settimeofday": 164, "clock_settime": 227,
    },
    "aarch64": {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
        "mount": 40, "umount2": 39, "pivot_root": 41, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "unshare": 97, "setns": 268, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "keyctl": 219, "add_key": 217, "request_key": 218, "kexec_load": 104,
        "kexec_file_load": 294, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "swapon": 224, "swapoff": 225, "reboot": 142, "acct": 89, "syslog": 116,
        "quotactl": 60, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "open_by_handle_at": 265, "name_to_handle_at": 264, "fanotify_init": 262,
        "lookup_dcookie": 18, "vhangup": 58, "settimeofday": 170, "clock_settime": 112,
    },
}  # fmt: skip
#: clone3 answers ENOSYS (its flags live in memory, so they cannot be filtered): libc then
#: falls back to clone, whose namespace flags --disable-userns and the missing caps refuse.
_CLONE3 = 435
#: socket() and socketpair(): which address families (first argument) each filter allows.
#: Every sandbox: ``AF_UNIX`` (the proxy socket, pipes-like IPC, asyncio's self-pipe); the
#: rest (netlink, packet, vsock, bluetooth, alg, ...) answer EAFNOSUPPORT, as if the kernel had
#: none of them. ``AF_INET``/``AF_INET6`` are the one difference between the two filters: the
#: no-network filter (every run without an allow-list, the default) answers EPERM, a refusal
#: by policy; the proxy filter (runs with an allow-list) allows them, because the in-sandbox
#: bridge listens on ``127.0.0.1`` and HTTP clients open TCP sockets to it. Why that is no way
#: out: :mod:`app.runner.netproxy`. ``socketpair()`` is ``AF_UNIX`` only in both.
_SOCKET_CALLS = {"x86_64": (41, 53), "aarch64": (198, 199)}
_AF_UNIX, _AF_INET, _AF_INET6 = 1, 2, 10
_NETWORK_FAMILIES = (_AF_INET, _AF_INET6)
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


def seccomp_program(machine: str, *, network: bool = False) -> bytes | None:
    """The BPF program (array of ``struct sock_filter``) for ``machine``; None if unsupported.

    ``network`` False: the **no-network** filter, for every run without a network allow-list
    (and every warm sandbox of the default flavour); True: the **proxy** filter, for runs with
    one. They differ only in ``socket(AF_INET|AF_INET6, ...)``: EPERM vs allowed.

    Layout: kill the process on a foreign syscall ABI (i386 via ``int 0x80``, x32), answer
    EPERM for :data:`_DENIED_SYSCALLS`, ENOSYS for clone3; for ``socket()``: allow ``AF_UNIX``,
    ``AF_INET``/``AF_INET6`` allowed (proxy) or EPERM (no-network), EAFNOSUPPORT for every
    other family; for ``socketpair()``: ``AF_UNIX`` only, else EAFNOSUPPORT; allow the rest.
    """
    denied = _DENIED_SYSCALLS.get(machine)
    if denied is None:
        return None

    def insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    errno_ret = insn(_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.EPERM)
    prog = [
        insn(_BPF_LD_W_ABS, 4),  # seccomp_data.arch
        insn(_BPF_JEQ_K, _AUDIT_ARCH[machine], jt=1),
        insn(_BPF_RET_K, _SECCOMP_RET_KILL_PROCESS),
        insn(_BPF_LD_W_ABS, 0),  # seccomp_data.nr
    ]
    if machine == "x86_64":
        prog += [
            insn(_BPF_JGE_K, _X32_SYSCALL_BIT, jf=1),
            insn(_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.ENOSYS),
        ]
    prog += [
        insn(_BPF_JEQ_K, _CLONE3, jf=1),
        insn(_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.ENOSYS),
    ]
    for nr in sorted(set(denied.values())):
        prog += [insn(_BPF_JEQ_K, nr, jf=1), errno_ret]
    allow = _SECCOMP_RET_ALLOW
    inet = allow if network else _SECCOMP_RET_ERRNO | errno.EPERM
    socket_nr, socketpair_nr = _SOCKET_CALLS[machine]
    verdicts: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = (
        (socket_nr, ((_AF_UNIX, allow), *((f, inet) for f in _NETWORK_FAMILIES))),
        (socketpair_nr, ((_AF_UNIX, allow),)),
    )
    for nr, families in verdicts:
        # if nr matches: load the low 32 bits of args[0] (the int domain; both ABIs are
        # little-endian), return the listed family's verdict, else EAFNOSUPPORT; if nr does
        # not match, skip the block (the accumulator still holds nr)
        prog.append(insn(_BPF_JEQ_K, nr, jf=2 * len(families) + 2))
        prog.append(insn(_BPF_LD_W_ABS, _SECCOMP_ARGS_OFFSET))
        for family, verdict in families:
            prog += [insn(_BPF_JEQ_K, family, jf=1), insn(_BPF_RET_K, verdict)]
        prog.append(insn(_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT))
    prog.append(insn(_BPF_RET_K, _SECCOMP_RET_ALLOW))
    return b"".join(prog)


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _setpriv_prefix(setpriv: str, uid: int) -> list[str]:
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]


def _which_or_unavailable(name: str, hint: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SandboxUnavailable(f"{name} not found on PATH: {hint}")
    return found


# --------------------------------------------------------------------------------------------
# The real sandbox


class BwrapSandbox:
    """bubblewrap + rlimits, launched as an unprivileged uid (see the module docstring).

    ``RLIMIT_NPROC`` counts every process of the host uid, across all sandboxes running as it
    (about 3 per sandbox, idle warm ones included: bwrap, its init, the spell) and any other
    process of that uid: with one shared uid, ``max_procs`` caps the whole host, not one run.
    Pass ``uid_pool`` (uids used by nothing else, e.g. ``range(200000, 200064)``; they need no
    passwd entry) to give each concurrent sandbox its own uid; runs then wait for a free uid.
    Without a pool, every run uses ``uid``. When the runner is not root, the uid cannot change
    and both are ignored.

    ``warm`` > 0 keeps that many single-use sandboxes pre-spawned (:mod:`app.runner.pool`), so
    a run skips the bwrap and interpreter start-up: same options, same uid drop, same seccomp
    filter and rlimits as a cold run (see :meth:`_spawn_warm`). The filter is the profile's
    (no-network by default; the proxy one for runs with an allow-list, :func:`warm_profile_of`),
    so a run only ever gets a warm sandbox with the filter its cold run would have had. The
    pool starts filling once :meth:`probe` passes, in that event loop; :meth:`aclose` kills it.
    Slot folders go to ``warm_dir`` (default: a private folder under the system temp dir); a
    run uses a warm sandbox only when its ``out_dir`` can be renamed from there (same file
    system), else cold.

    A spec with ``network`` gets a :class:`~app.runner.netproxy.NetProxy` for the run, made by
    ``proxy_factory`` (tests pass one with a fake resolver and the loopback allowance; the
    production path never does).
    """

    name = "bwrap"

    def __init__(
        self,
        *,
        uid: int = 65534,
        bwrap: str | None = None,
        uid_pool: Sequence[int] = (),
        warm: int = 0,
        warm_dir: Path | None = None,
        warm_profile: WarmProfile | None = None,
        proxy_factory: ProxyFactory = NetProxy,
    ) -> None:
        if uid == 0 or 0 in uid_pool:
            raise ValueError("the sandbox uid must not be 0")
        if warm < 0:
            raise ValueError("warm must be >= 0")
        self._uid = uid
        self._uids = UidBroker(uid, uid_pool)
        self._bwrap = bwrap
        self._prlimit: str | None = None
        self._probed = False
        self._warned_seccomp = False
        self._probe_lock = asyncio.Lock()
        self._warm = warm
        self._warm_dir = warm_dir
        self._warm_dir_owned = False
        self._warm_dev: int | None = None
        self._warm_profile = warm_profile or WarmProfile()
        self._pool: WarmPool | None = None
        self._warned_loop = False
        self._proxy_factory = proxy_factory

    @property
    def pool(self) -> WarmPool | None:
        """The warm pool, once started (None when ``warm`` is 0 or it could not start)."""
        return self._pool

    async def probe(self) -> None:
        """Run ``/usr/bin/true`` through the full recipe once; cache success; start the pool."""
        if self._probed:
            return
        async with self._probe_lock:
            if self._probed:
                return
            self._launcher(self._uid)  # raises SandboxUnavailable if bwrap/setpriv are missing
            self._prlimit_path()
            if not become_reaper():
                log.info("cannot adopt orphans: bwrap's exited namespace inits go to init")
            try:  # cold runs' /run/spell folders left by crashed processes
                remove_stale_slots(Path(tempfile.gettempdir()), prefix=NET_DIR_PREFIX)
            except Exception:
                log.exception("could not remove stale sandbox network folders")
            work = _make_probe_workspace()
            try:
                spec = SandboxSpec(
                    bundle_dir=work / "bundle",
                    argv=["/usr/bin/true"],
                    input_path=work / "input.json",
                    out_dir=work / "out",
                    timeout_sec=30,
                    memory_mb=256,
                    max_output_bytes=_MIB,
                )
                try:
                    result = await self._run(spec, None, self._uid)
                except ValueError as exc:
                    raise SandboxUnavailable(f"sandbox probe could not be prepared: {exc}") from exc
                if result.outcome != "ok":
                    raise SandboxUnavailable(
                        f"sandbox probe failed ({result.outcome}, exit {result.exit_code}): "
                        f"{result.stderr_tail.strip()}"
                    )
            finally:
                await asyncio.to_thread(remove_tree, work)
            self._probed = True
            log.info("sandbox probe passed (bwrap, uid %s)", self._uid)
            self._start_pool()

    async def aclose(self) -> None:
        """Kill the warm pool's sandboxes and remove their folders (cold runs need nothing)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()
        if self._warm_dir_owned and self._warm_dir is not None:
            await asyncio.to_thread(remove_tree, self._warm_dir)

    async def run(self, spec: SandboxSpec, on_line: LineCallback | None = None) -> SandboxResult:
        """Run ``spec`` in the sandbox: a warm one when the pool has one for it, else cold.

        When the runner is root, ``spec.out_dir`` is created and chowned to the sandbox uid,
        and the sandbox uid must be able to reach ``bundle_dir`` (r-x), ``input_path`` (r--) and
        every folder above them (--x): otherwise ``ValueError`` is raised before anything runs.
        Raises :class:`SandboxUnavailable` when the probe fails or bwrap could not set up.
        """
        await self.probe()
        pool = self._pool_for(spec)
        profile = warm_profile_of(spec)
        first = True
        while True:
            if pool is not None:
                warm = pool.take(profile, record=first)
                first = False
                if warm is not None:
                    result = await self._run_warm(warm, spec, on_line)
                    if result is not None:
                        return result
                    continue  # it died before the job reached it: another one, or cold
            uid = self._uids.try_take()
            if uid is not None:
                break
            await self._uids.changed()  # a uid came back or a warm sandbox got ready
        reaped: list[asyncio.Future[None] | None] = []
        try:
            return await self._run(spec, on_line, uid, reaped)
        finally:
            # free once every process of the run is gone, its namespace init reaped included
            when_done(reaped, functools.partial(self._uids.release, uid))

    # -- the warm pool ------------------------------------------------------------------------

    def _start_pool(self) -> None:
        if self._warm <= 0 or self._pool is not None:
            return
        try:
            warm_dir = self._prepare_warm_dir()
            pool = WarmPool(
                size=self._warm,
                warm_dir=warm_dir,
                spawner=self._spawn_warm,
                uids=self._uids,
                initial=self._warm_profile,
            )
            pool.start()
        except Exception as exc:  # never stop the server: runs start cold
            log.exception("warm sandbox pool disabled, every run starts cold: %s", exc)
            return
        self._pool = pool
        log.info("warm sandbox pool started: %d sandboxes, folders in %s", self._warm, warm_dir)

    def _prepare_warm_dir(self) -> Path:
        if self._warm_dir is None:
            tmp = Path(tempfile.gettempdir())
            try:  # of crashed processes; a bad leftover must never stop the server
                remove_stale_slots(tmp, prefix="spell-warm-")
            except Exception:
                log.exception("could not remove stale warm sandbox folders from %s", tmp)
            self._warm_dir = tmp / f"spell-warm-{os.getpid()}"
            self._warm_dir_owned = True
        warm_dir = self._warm_dir
        warm_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        warm_dir = warm_dir.resolve(strict=True)
        st = warm_dir.stat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ValueError(f"{warm_dir} must be ours and not writable by group or others")
        if _running_as_root():
            warm_dir.chmod(0o711)
            _require_access(warm_dir, self._uid, self._uid, 1, "warm_dir")
        self._warm_dev = st.st_dev
        return warm_dir

    def _pool_for(self, spec: SandboxSpec) -> WarmPool | None:
        """The pool, if this run may use it (else the run starts cold)."""
        pool = self._pool
        if pool is None:
            return None
        if pool.loop is not asyncio.get_running_loop():
            if not self._warned_loop:
                log.warning("warm sandbox pool belongs to another event loop; runs start cold")
                self._warned_loop = True
            return None
        if spec.effective_cpu_sec + 1 > WARM_MAX_CPU_SEC:
            return None
        try:  # the output folder must be renamable from the slot: same file system, empty
            out = spec.out_dir
            if out.is_symlink() or out.parent.resolve(strict=True).stat().st_dev != self._warm_dev:
                return None
            if out.exists():
                with os.scandir(out) as it:
                    if next(it, None) is not None:
                        return None
        except OSError:
            return None
        return pool

    async def _spawn_warm(
        self, profile: WarmProfile, slot: Path, uid: int
    ) -> asyncio.subprocess.Process:
        """A sandbox built exactly like a cold one (same :meth:`_options`, setpriv, seccomp,
        prlimit), binding the slot's folders, running the launcher. The limits are the
        profile's, with the CPU limit at :data:`WARM_MAX_CPU_SEC` until the job lowers it; the
        seccomp filter is the profile's flavour (no-network, or proxy for ``network``)."""
        limits = _Limits(
            address_space=profile.memory_mb * _MIB,
            cpu_sec=WARM_MAX_CPU_SEC - 1,
            file_size=profile.max_output_bytes,
            procs=profile.max_procs,
        )
        cmd_prefix = [*limits.prlimit_argv(self._prlimit_path()), *self._launcher(uid)]
        nice = shutil.which("nice", path="/usr/bin:/bin")
        if nice is not None and _running_as_root():  # root can put it back to 0 (_run_warm)
            cmd_prefix = [nice, "-n", str(WARM_SPAWN_NICE), *cmd_prefix]
        fds: list[int] = []
        try:
            seccomp_fd = self._seccomp_fd(network=profile.network)
            if seccomp_fd is not None:
                fds.append(seccomp_fd)
            args_fd = _memfd("bwrap-args", b"")
            fds.append(args_fd)
            options = self._options(
                tmpfs_size=profile.memory_mb * _MIB,
                bundle_dir=slot / "bundle",
                input_path=slot / "input.json",
                out_dir=slot / "out",
                net_dir=slot / "net",
                env=_sandbox_env({}),
                status_fd=None,
                seccomp_fd=seccomp_fd,
            )
            _write_args(args_fd, options)
            cmd = [
                *cmd_prefix,
                "--args", str(args_fd),
                "--", SANDBOX_PYTHON, "-I", "-S", "-c", LAUNCHER_BOOTSTRAP,
            ]  # fmt: skip
            proc = await _spawn(
                cmd,
                env={"PATH": "/usr/bin:/bin"},
                cwd=None,
                pass_fds=fds,
                stdin=asyncio.subprocess.PIPE,
            )
        finally:
            for fd in fds:  # the child has its own copies
                os.close(fd)
        assert proc.stdin is not None
        source = launcher_source().encode()
        proc.stdin.write(b"%012d" % len(source) + source)  # a dead one fails to get ready
        return proc

    async def _run_warm(
        self, warm: WarmSandbox, spec: SandboxSpec, on_line: LineCallback | None
    ) -> SandboxResult | None:
        """Fill ``warm``'s slot, hand it the job, watch it like a cold run; None if it was
        already dead (the job never reached it)."""
        if warm.profile.network != (spec.network is not None):
            # never: the pool hands out sandboxes of the run's own profile (warm_profile_of)
            warm.discard()
            raise RuntimeError("a warm sandbox of the wrong network flavour was taken")
        root = _running_as_root()
        proxy: NetProxy | None = None
        try:
            bundle_dir, input_path, out_dir = _prepare_paths(spec, warm.uid if root else None)
            await asyncio.to_thread(fill_slot, warm.slot, bundle_dir, input_path, root=root)
            if spec.network is not None:  # the socket appears in the already bound folder
                proxy = await self._start_proxy(
                    spec, spec.network, warm.slot / "net", warm.uid if root else None
                )
            # Spawned niced (background work); the spell runs at the niceness of a cold run.
            if _running_as_root():
                renice_tree(warm.proc.pid, 0)
            started = time.monotonic()
            if not await warm.send_job(_warm_job(spec)):
                log.warning("a warm sandbox was dead before it took its job; trying again")
                if self._pool is not None:
                    self._pool.stats["dead_on_dispatch"] += 1
                return None

            async def finish_init() -> None:
                for init in warm.inits:
                    init.kill()
                await _settle_inits([init.reaped() for init in warm.inits])

            raw = await _watch(
                warm.proc,
                spec=spec,
                out_dir=warm.out_dir,
                started=started,
                on_line=on_line,
                reap_group_after_exit=False,
                after_exit=finish_init,
            )
            try:
                move_output(warm.out_dir, out_dir)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                await asyncio.to_thread(copy_output, warm.out_dir, out_dir)
        finally:
            if proxy is not None:
                await proxy.aclose()
            warm.discard()
        return _classify(raw, spec)

    # -- the cold path --------------------------------------------------------------------

    def _launcher(self, uid: int) -> list[str]:
        if self._bwrap is None:
            self._bwrap = _which_or_unavailable(
                "bwrap", "install bubblewrap (apt-get install bubblewrap)"
            )
        elif not os.access(self._bwrap, os.X_OK):
            raise SandboxUnavailable(f"bwrap at {self._bwrap} is not executable")
        if not _running_as_root():
            return [self._bwrap]
        setpriv = _which_or_unavailable(
            "setpriv", "needed to drop root before bwrap (apt-get install util-linux)"
        )
        return [*_setpriv_prefix(setpriv, uid), self._bwrap]

    def _prlimit_path(self) -> str:
        if self._prlimit is None:
            self._prlimit = _which_or_unavailable(
                "prlimit", "needed to set the sandbox rlimits (apt-get install util-linux)"
            )
        return self._prlimit

    def _options(
        self,
        *,
        tmpfs_size: int,
        bundle_dir: Path,
        input_path: Path,
        out_dir: Path,
        net_dir: Path,
        env: Mapping[str, str],
        status_fd: int | None,
        seccomp_fd: int | None,
    ) -> list[str]:
        """bwrap's options: the one definition of the isolation, for cold and warm sandboxes.

        ``tmpfs_size``: tmpfs is RAM, so it is bounded by the run's memory budget.
        ``net_dir``: bound read-only at ``/run/spell`` in every sandbox; empty unless the run
        has a network allow-list (then it holds the proxy's socket).
        """
        opts = [
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop", "ALL",
            "--hostname", "spell",
            "--clearenv",
            "--ro-bind", "/usr", "/usr",
        ]  # fmt: skip
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = Path("/") / name
            if host.is_symlink():
                opts += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():  # not usrmerged
                opts += ["--ro-bind", str(host), f"/{name}"]
        opts += [
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(tmpfs_size), "--tmpfs", SANDBOX_SHM,
            "--remount-ro", "/dev",
            "--size", str(tmpfs_size), "--tmpfs", SANDBOX_TMP,
            "--ro-bind", str(bundle_dir), SPELL_DIR,
            "--ro-bind", str(input_path), INPUT_PATH,
            "--bind", str(out_dir), OUT_DIR,
            "--ro-bind", str(net_dir), SANDBOX_NET_DIR,
            "--remount-ro", "/",
            "--chdir", SPELL_DIR,
        ]  # fmt: skip
        if status_fd is not None:
            opts += ["--json-status-fd", str(status_fd)]
        if seccomp_fd is not None:
            opts += ["--seccomp", str(seccomp_fd)]
        for name, value in env.items():
            opts += ["--setenv", name, value]
        return opts

    async def _run(
        self,
        spec: SandboxSpec,
        on_line: LineCallback | None,
        uid: int,
        reaped: list[asyncio.Future[None] | None] | None = None,
    ) -> SandboxResult:
        """A cold run. ``reaped`` receives the futures of the namespace init's reaping: the
        run's uid is free only once they are done."""
        if reaped is None:
            reaped = []
        statuses: dict[str, object] | None = None
        limits = _Limits.of(spec)
        prefix = [*limits.prlimit_argv(self._prlimit_path()), *self._launcher(uid)]
        owner = uid if _running_as_root() else None
        paths = _prepare_paths(spec, owner)
        net_dir = _make_net_dir()
        proxy: NetProxy | None = None
        try:
            status_read, status_write = os.pipe()
        except BaseException:
            remove_tree(net_dir)
            raise
        fds = [status_read, status_write]
        try:
            seccomp_fd = self._seccomp_fd(network=spec.network is not None)
            if seccomp_fd is not None:
                fds.append(seccomp_fd)
            args_fd = _memfd("bwrap-args", b"")
            fds.append(args_fd)
            options = self._options(
                tmpfs_size=spec.memory_mb * _MIB,
                bundle_dir=paths[0],
                input_path=paths[1],
                out_dir=paths[2],
                net_dir=net_dir,
                env=_sandbox_env(spec.env, network=spec.network is not None),
                status_fd=status_write,
                seccomp_fd=seccomp_fd,
            )
            _write_args(args_fd, options)
            stdin_data: bytes | None = None
            if spec.network is None:
                cmd = [*prefix, "--args", str(args_fd), "--", *spec.argv]
            else:
                # the launcher starts the network bridge before the spell, as in a warm run
                proxy = await self._start_proxy(spec, spec.network, net_dir, owner)
                cmd = [
                    *prefix,
                    "--args", str(args_fd),
                    "--", SANDBOX_PYTHON, "-I", "-S", "-c", LAUNCHER_BOOTSTRAP_COLD,
                ]  # fmt: skip
                stdin_data = _launcher_input(spec)

            async def finish_init() -> None:
                # bwrap's monitor has exited: everything it will write is in the pipe
                nonlocal statuses
                statuses = _read_json_status(status_read)
                reaped.append(_kill_init(statuses))
                await _settle_inits(reaped)

            raw = await _supervise(
                cmd,
                spec=spec,
                out_dir=paths[2],
                env={"PATH": "/usr/bin:/bin"},
                cwd=None,
                pass_fds=fds[1:],
                on_line=on_line,
                reap_group_after_exit=False,
                after_exit=finish_init,
                stdin_data=stdin_data,
            )
        finally:
            if statuses is None:  # cancelled or failed: still kill and reap its init
                with contextlib.suppress(Exception):
                    reaped.append(_kill_init(_read_json_status(status_read)))
            for fd in fds:
                os.close(fd)
            if proxy is not None:
                await proxy.aclose()
            remove_tree(net_dir)
        assert statuses is not None
        if (
            raw.killed_for is None
            and raw.returncode > 0
            and "exit-code" not in statuses
            and not _exec_failed(raw.stderr_tail, spec.argv[0])
        ):
            # bwrap itself failed before the spell ran (namespaces forbidden, bad bind, ...).
            raise SandboxUnavailable(
                f"bwrap failed to set up the sandbox (exit {raw.returncode}): "
                f"{raw.stderr_tail.strip()}"
            )
        return _classify(raw, spec)

    async def _start_proxy(
        self, spec: SandboxSpec, access: NetworkAccess, net_dir: Path, owner: int | None
    ) -> NetProxy:
        """The run's CONNECT proxy, serving ``net_dir/proxy.sock`` for the sandbox uid."""
        proxy = self._proxy_factory(
            access,
            max_seconds=spec.timeout_sec,
            label=spec.env.get("SPELL_CAST_ID") or "a run",
        )
        try:
            await proxy.start(net_dir, owner)
        except OSError as exc:
            raise SandboxUnavailable(f"the network proxy could not start: {exc}") from exc
        return proxy

    def _seccomp_fd(self, *, network: bool) -> int | None:
        """A memfd holding the no-network or (``network``) the proxy filter, for ``--seccomp``."""
        program = seccomp_program(platform.machine(), network=network)
        if program is None:
            if not self._warned_seccomp:
                log.warning(
                    "no seccomp filter for %s: syscalls are not filtered", platform.machine()
                )
                self._warned_seccomp = True
            return None
        return _memfd("bwrap-seccomp", program)


def _kill_init(statuses: Mapping[str, object]) -> asyncio.Future[None] | None:
    """Kill the namespace init bwrap reported (``child-pid``), if this process adopted it
    (bwrap's monitor has exited), and return the future of its reaping."""
    pid = statuses.get("child-pid")
    if not isinstance(pid, int):
        return None
    init = AdoptedInit.open(pid, os.getpid())
    if init is None:
        return None
    init.kill()
    return init.reaped()


async def _settle_inits(reaped: Sequence[asyncio.Future[None] | None]) -> None:
    """Wait (a bounded time) until the killed inits are reaped: then nothing of the run can
    still write to its output. Their reaping goes on in the background after that."""
    waiting = [f for f in reaped if f is not None and not f.done()]
    if not waiting:
        return
    _, pending = await asyncio.wait(
        [asyncio.ensure_future(asyncio.shield(f)) for f in waiting], timeout=INIT_EXIT_GRACE_SEC
    )
    if pending:
        log.warning("a sandbox's namespace init is still exiting after %.0f s", INIT_EXIT_GRACE_SEC)
        for task in pending:
            task.cancel()


def _exec_failed(stderr_tail: str, argv0: str) -> bool:
    """Whether bwrap set the sandbox up but could not exec the spell's program (a missing or
    non-executable entrypoint: the spell's failure, not the sandbox's; bwrap reports no
    ``exit-code`` then). The warm launcher prints the same line in that case."""
    lines = stderr_tail.strip().splitlines()
    return bool(lines) and lines[-1].startswith(f"bwrap: execvp {argv0}: ")


def warm_profile_of(spec: SandboxSpec) -> WarmProfile:
    """The warm sandboxes ``spec`` can run in: same limits, and the proxy flavour (its seccomp
    filter allows ``AF_INET``/``AF_INET6``) exactly when the run has a network allow-list."""
    return WarmProfile(
        spec.memory_mb, spec.max_output_bytes, spec.max_procs, network=spec.network is not None
    )


def _sandbox_env(extra: Mapping[str, str], *, network: bool = False) -> dict[str, str]:
    """The spell's whole environment (bwrap starts from ``--clearenv``); with ``network``, the
    proxy variables (:func:`app.runner.netproxy.proxy_env`)."""
    return {
        "HOME": SANDBOX_TMP,
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        **extra,
        **(proxy_env() if network else {}),
        "SPELL_INPUT": INPUT_PATH,
        "SPELL_OUT": OUT_DIR,
    }


def _launcher_input(spec: SandboxSpec) -> bytes:
    """What a cold launcher reads on stdin: its source (length-prefixed), then the job."""
    source = launcher_source().encode()
    job = json.dumps(_warm_job(spec), separators=(",", ":")).encode()
    return b"%012d" % len(source) + source + job + b"\n"


#: Prefix of the per-run folders bound at ``/run/spell`` in cold runs (``<prefix><pid>-…``).
NET_DIR_PREFIX = "spell-net-"


def _make_net_dir() -> Path:
    """A cold run's folder for ``/run/spell``: private to us, traversable (not listable) by the
    sandbox uid; removed after the run (and, after a crash, by the next probe)."""
    path = Path(tempfile.mkdtemp(prefix=f"{NET_DIR_PREFIX}{os.getpid()}-"))
    path.chmod(0o711)
    return path


def _write_args(fd: int, options: Sequence[str]) -> None:
    os.write(fd, b"".join(os.fsencode(opt) + b"\0" for opt in options))
    os.lseek(fd, 0, os.SEEK_SET)


def _warm_job(spec: SandboxSpec) -> dict[str, object]:
    """The launcher's job for ``spec`` (see :mod:`app.runner.launcher`).

    A Python spell runs inside the launcher's already started interpreter (``path``/``code``)
    only when the interpreter would have started the same way: our interpreter and flags, and
    no environment variable that the interpreter or libc reads at start-up (only names matching
    :data:`_IN_PROCESS_ENV` besides the fixed ones). Everything else is exec'ed (``exec``).
    """
    argv = list(spec.argv)
    kind = "exec"
    if (
        len(argv) >= 4
        and argv[0] == SANDBOX_PYTHON
        and argv[1:3] == ["-I", "-S"]
        and all(_IN_PROCESS_ENV.fullmatch(name) for name in spec.env)
    ):
        if argv[3] == "-c":
            kind = "code" if len(argv) >= 5 else "exec"
        elif not argv[3].startswith("-"):
            kind = "path"
    return {
        "kind": kind,
        "argv": argv,
        "env": _sandbox_env(spec.env, network=spec.network is not None),
        "rlimits": _Limits.of(spec).for_launcher(),
        "cwd": SPELL_DIR,
        "proxy": None
        if spec.network is None
        else {"socket": SANDBOX_PROXY_SOCKET, "port": PROXY_PORT},
    }


def _memfd(name: str, content: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, content)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_probe_workspace() -> Path:
    """A throwaway bundle/input the sandbox uid can reach (mkdtemp makes 0700 folders)."""
    work = Path(tempfile.mkdtemp(prefix="spell-sandbox-probe-"))
    work.chmod(0o755)
    (work / "bundle").mkdir()
    (work / "bundle").chmod(0o755)
    (work / "input.json").write_text("{}", encoding="utf-8")
    (work / "input.json").chmod(0o644)
    return work


def _read_json_status(fd: int) -> dict[str, object]:
    """Merge the JSON documents bwrap wrote to ``--json-status-fd`` (never blocks)."""
    os.set_blocking(fd, False)
    data = bytearray()
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    merged: dict[str, object] = {}
    decoder = json.JSONDecoder()
    text = data.decode("utf-8", errors="replace")
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        if isinstance(doc, dict):
            merged.update(doc)
    return merged


# --------------------------------------------------------------------------------------------
# Development fallback


class UnsafeSubprocessSandbox:
    """NOT a sandbox: a plain subprocess with the same rlimits, timeout and output cap.

    Only for ``SPELL_UNSAFE_NO_SANDBOX=1`` local development. The spell sees the host file
    system and network. When the runner is root it still drops to ``uid`` via setpriv. Paths in
    ``argv`` starting with ``/spell`` are rewritten to ``bundle_dir``; ``SPELL_INPUT`` and
    ``SPELL_OUT`` point at the host paths; ``HOME``/``TMPDIR`` is a throwaway folder.
    """

    name = "unsafe-subprocess"

    def __init__(self, *, uid: int = 65534) -> None:
        if uid == 0:
            raise ValueError("the sandbox uid must not be 0")
        self._uid = uid

    async def probe(self) -> None:
        if _running_as_root():
            _which_or_unavailable("setpriv", "needed to drop root (apt-get install util-linux)")
        _which_or_unavailable("prlimit", "needed to set the rlimits (apt-get install util-linux)")
        log.warning("UNSAFE: spells run WITHOUT a sandbox (SPELL_UNSAFE_NO_SANDBOX=1)")

    async def run(self, spec: SandboxSpec, on_line: LineCallback | None = None) -> SandboxResult:
        log.warning(
            "UNSAFE: running %s WITHOUT a sandbox: no namespaces, host files and network "
            "are reachable (SPELL_UNSAFE_NO_SANDBOX=1; never use this in production)%s",
            spec.argv[0],
            "; its network allow-list is NOT enforced" if spec.network is not None else "",
        )
        root = _running_as_root()
        uid = self._uid if root else None
        bundle_dir, input_path, out_dir = _prepare_paths(spec, uid)
        argv = [_rewrite_spell_path(arg, bundle_dir) for arg in spec.argv]
        if root:
            setpriv = _which_or_unavailable("setpriv", "needed to drop root")
            argv = [*_setpriv_prefix(setpriv, self._uid), *argv]
        prlimit = _which_or_unavailable("prlimit", "needed to set the rlimits")
        argv = [*_Limits.of(spec).prlimit_argv(prlimit), *argv]
        home = Path(tempfile.mkdtemp(prefix="spell-unsafe-home-"))
        try:
            if uid is not None:
                os.chown(home, uid, uid)
            env = {
                "HOME": str(home),
                "TMPDIR": str(home),
                "PATH": "/usr/bin:/bin",
                "LANG": "C.UTF-8",
                **spec.env,
                "SPELL_INPUT": str(input_path),
                "SPELL_OUT": str(out_dir),
            }
            raw = await _supervise(
                argv,
                spec=spec,
                out_dir=out_dir,
                env=env,
                cwd=bundle_dir,
                pass_fds=(),
                on_line=on_line,
                reap_group_after_exit=True,
            )
        finally:
            await asyncio.to_thread(remove_tree, home)
        return _classify(raw, spec)


def _rewrite_spell_path(arg: str, bundle_dir: Path) -> str:
    if arg == SPELL_DIR:
        return str(bundle_dir)
    if arg.startswith(SPELL_DIR + "/"):
        return str(bundle_dir) + arg[len(SPELL_DIR) :]
    return arg


#: Processes one sandbox keeps of its uid besides what the spell starts: bwrap's monitor, the
#: namespace's init, the spell (or the idle launcher).
PROCS_PER_SANDBOX = 3


def process_budget_error(
    *, warm: int, workers: int, uid_pool: Sequence[int], max_procs: int = 64
) -> str | None:
    """Why these settings would starve spells of processes, or None when they are fine.

    Without a uid pool every sandbox (idle warm ones and running ones) shares one uid, whose
    ``RLIMIT_NPROC`` (``max_procs``) counts all of their processes: their fixed
    :data:`PROCS_PER_SANDBOX` each must stay within half of it, leaving the rest to the spells.
    ``workers``: the casts the process runs at once (``SPELL_WORKERS``, or ``spell worker
    --concurrency`` when given). Call at start-up and refuse to start on a message.
    """
    if uid_pool:
        return None
    fixed = PROCS_PER_SANDBOX * (warm + workers)
    if fixed <= max_procs // 2:
        return None
    return (
        f"SPELL_SANDBOX_WARM ({warm}) + {workers} concurrent runs (SPELL_WORKERS or "
        f"`spell worker --concurrency`): their sandboxes keep {fixed} processes of the one "
        f"sandbox uid, over half of its process limit ({max_procs}): spells would fail to "
        f"start. Lower them (at most {max_procs // 2 // PROCS_PER_SANDBOX} in all) or set "
        "SPELL_SANDBOX_UID_POOL (one uid per sandbox)"
    )


def detect_sandbox(
    *,
    uid: int = 65534,
    allow_unsafe: bool = False,
    uid_pool: Sequence[int] = (),
    warm: int = 0,
    warm_dir: Path | None = None,
    warm_profile: WarmProfile | None = None,
) -> Sandbox:
    """The bubblewrap sandbox when ``bwrap`` is on PATH; the unsafe fallback only if allowed.

    ``uid_pool`` and the ``warm*`` pool options are passed to :class:`BwrapSandbox` (see there).

    Does not probe: call ``await sandbox.probe()`` at start-up and refuse service runs on
    :class:`SandboxUnavailable` (fail closed).
    """
    bwrap = shutil.which("bwrap")
    if bwrap is not None:
        return BwrapSandbox(
            uid=uid,
            bwrap=bwrap,
            uid_pool=uid_pool,
            warm=warm,
            warm_dir=warm_dir,
            warm_profile=warm_profile,
        )
    if allow_unsafe:
        log.warning("bwrap not found; SPELL_UNSAFE_NO_SANDBOX=1 so spells run WITHOUT a sandbox")
        return UnsafeSubprocessSandbox(uid=uid)
    raise SandboxUnavailable(
        "bubblewrap (bwrap) not found on PATH: install it (apt-get install bubblewrap); "
        "for local development only, SPELL_UNSAFE_NO_SANDBOX=1 runs spells without a sandbox"
    )
