"""The warm sandbox pool, for real: a pre-spawned sandbox is the same sandbox as a cold one,
is used once, is replaced, is never handed a job once dead, and never outlives its owner.

tests/e2e/test_sandbox.py runs every isolation and limit test against both paths; this file
compares the two paths directly and covers the pool's own life cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.runner.netproxy import NetworkAccess
from app.runner.pool import WARM_SPAWN_NICE, WarmPool, WarmProfile, reap_adopted
from app.runner.sandbox import (
    BwrapSandbox,
    SandboxResult,
    SandboxSpec,
    SandboxUnavailable,
    warm_profile_of,
)

pytestmark = pytest.mark.e2e

if shutil.which("bwrap") is None:
    if os.environ.get("SPELL_REQUIRE_SERVICES") == "1":
        pytest.fail("bwrap is required (SPELL_REQUIRE_SERVICES=1) but not installed", pytrace=False)
    pytest.skip("bubblewrap (bwrap) is not installed", allow_module_level=True)

PYTHON = "/usr/bin/python3"
IS_ROOT = os.geteuid() == 0
ROOT = Path(__file__).resolve().parents[2]


async def _probed(sb: BwrapSandbox) -> BwrapSandbox:
    try:
        await sb.probe()
    except SandboxUnavailable as exc:
        if os.environ.get("SPELL_REQUIRE_SERVICES") == "1":
            pytest.fail(f"sandbox probe failed: {exc}")
        pytest.skip(f"bwrap cannot create namespaces here: {exc}")
    return sb


@pytest.fixture
async def cold() -> BwrapSandbox:
    return await _probed(BwrapSandbox())


@pytest.fixture
async def warm() -> AsyncIterator[BwrapSandbox]:
    sb = await _probed(BwrapSandbox(warm=2))
    try:
        yield sb
    finally:
        await sb.aclose()


def pool_of(sb: BwrapSandbox) -> WarmPool:
    assert sb.pool is not None, "the warm pool did not start"
    return sb.pool


async def run_warm(sb: BwrapSandbox, spec: SandboxSpec) -> SandboxResult:
    """Run ``spec`` and prove it went through a pre-spawned sandbox."""
    pool = pool_of(sb)
    assert await pool.prewarm(warm_profile_of(spec))
    hits = pool.stats["hits"]
    result = await sb.run(spec)
    assert pool.stats["hits"] == hits + 1, "the run did not use a warm sandbox"
    return result


class Space:
    """A bundle folder, an input file and fresh output folders the sandbox uid can reach."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bundle = root / "bundle"
        self.input = root / "input.json"
        self.n = 0

    def file(self, name: str, text: str, mode: int = 0o644) -> Path:
        path = self.bundle / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        path.chmod(mode)
        return path

    def spec(self, argv: list[str], **overrides: Any) -> SandboxSpec:
        self.n += 1
        kwargs: dict[str, Any] = {
            "bundle_dir": self.bundle,
            "argv": argv,
            "input_path": self.input,
            "out_dir": self.root / f"out{self.n}",
            "timeout_sec": 10.0,
            "memory_mb": 256,
            "max_output_bytes": 1024 * 1024,
            "env": {"SPELL_CAST_ID": "c_1", "TRACEPARENT": "00-abc-def-01"},
        }
        kwargs.update(overrides)
        return SandboxSpec(**kwargs)


@pytest.fixture
def space() -> Iterator[Space]:
    # Not tmp_path: /tmp/pytest-of-root is 0700, so uid 65534 could not reach it.
    root = Path(tempfile.mkdtemp(prefix="spell-pool-test-"))
    root.chmod(0o755)
    (root / "bundle").mkdir()
    (root / "bundle").chmod(0o755)
    (root / "input.json").write_text(json.dumps({"name": "world"}), encoding="utf-8")
    (root / "input.json").chmod(0o644)
    yield Space(root)
    shutil.rmtree(root, ignore_errors=True)


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (through /proc/PID/task/*/children)."""
    found = {pid}
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    stack.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still exist and are not zombies."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


async def wait_gone(pids: set[int], timeout: float = 5.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return alive(pids)


# --------------------------------------------------------------------------------------------
# a warm sandbox IS a cold sandbox

REPORT = """
    import errno, json, os, socket, sys
    def sockets():
        out = {}
        for name, family, kind in [("unix", 1, 1), ("inet", 2, 1), ("inet_udp", 2, 2),
                                   ("inet6", 10, 1), ("netlink", 16, 3), ("packet", 17, 3)]:
            try:
                socket.socket(family, kind).close()
                out[name] = "created"
            except OSError as exc:
                out[name] = errno.errorcode[exc.errno]
        return out
    def status():
        return dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
    st = status()
    mounts = []
    for line in open("/proc/self/mountinfo"):
        left, _, right = line.partition(" - ")
        f = left.split()
        fstype, source, superopts = right.split()
        mounts.append([f[4], f[5], fstype, source, superopts])  # no ids, no host-side root
    old_umask = os.umask(0o22)
    os.umask(old_umask)
    report = open(os.path.join(os.environ["SPELL_OUT"], "report.json"), "w")
    report.write(json.dumps({
        "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()],
        "pid": os.getpid(), "session_leader": os.getsid(0) == os.getpid(),
        "caps": {k: st[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "no_new_privs": st["NoNewPrivs"].strip(), "seccomp": st["Seccomp"].strip(),
        "signals": {k: st[k].strip() for k in ("SigBlk", "SigIgn", "SigCgt")},
        "limits": open("/proc/self/limits").read().splitlines(),
        "mounts": sorted(mounts),
        "hostname": socket.gethostname(), "cwd": os.getcwd(), "umask": old_umask,
        "env": dict(os.environ), "stdin": os.readlink("/proc/self/fd/0"),
        "fds": sorted(os.listdir("/proc/self/fd")),
        "argv": sys.argv, "orig_argv": sys.orig_argv, "path": sys.path,
        "flags": [sys.flags.isolated, sys.flags.no_site, sys.flags.ignore_environment,
                  sys.flags.safe_path],
        "name": __name__, "file": globals().get("__file__"), "executable": sys.executable,
        "encoding": [sys.getfilesystemencoding(), sys.stdout.encoding],
        "sockets": sockets(),
        "nice": os.nice(0),  # a warm sandbox is spawned niced and handed its job at 0
    }))
"""

#: What the no-network seccomp filter answers to socket() (REPORT's ``sockets``).
NO_NETWORK_SOCKETS = {
    "unix": "created",
    "inet": "EPERM",
    "inet_udp": "EPERM",
    "inet6": "EPERM",
    "netlink": "EAFNOSUPPORT",
    "packet": "EAFNOSUPPORT",
}
HAS_SECCOMP = platform.machine() in ("x86_64", "aarch64")


def report(result: SandboxResult) -> dict[str, Any]:
    """The JSON a probing spell printed as its last stdout line."""
    assert result.outcome == "ok", result
    return dict(json.loads(result.stdout_tail.strip().splitlines()[-1]))


def written_report(result: SandboxResult, spec: SandboxSpec) -> dict[str, Any]:
    """The JSON :data:`REPORT` wrote into the output folder (too big for the stdout tail)."""
    assert result.outcome == "ok", result
    return dict(json.loads((spec.out_dir / "report.json").read_text()))


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([PYTHON, "-I", "-S", "main.py", "an arg"], id="script"),
        pytest.param([PYTHON, "-I", "-S", "-c", textwrap.dedent(REPORT), "x"], id="dash-c"),
        pytest.param(["./run"], id="executable"),
    ],
)
async def test_a_warm_run_sees_exactly_what_a_cold_run_sees(
    cold: BwrapSandbox, warm: BwrapSandbox, space: Space, argv: list[str]
) -> None:
    """Identity, capabilities, seccomp, rlimits, mounts, environment, fds, interpreter state."""
    space.file("main.py", REPORT)
    space.file("run", f"#!/bin/sh\nexec {PYTHON} -I -S main.py\n", mode=0o755)
    options = {"memory_mb": 192, "timeout_sec": 7.0, "max_output_bytes": 2 * 1024 * 1024}
    spec = space.spec(argv, **options)
    seen_cold = written_report(await cold.run(spec), spec)
    spec = space.spec(argv, **options)
    seen_warm = written_report(await run_warm(warm, spec), spec)
    for key in seen_cold:
        assert seen_warm[key] == seen_cold[key], key
    assert seen_warm == seen_cold
    # and it is the sandbox we think it is
    assert seen_warm["seccomp"] == "2"
    if HAS_SECCOMP:  # the no-network filter, cold and warm
        assert seen_warm["sockets"] == NO_NETWORK_SOCKETS
    assert seen_warm["caps"]["CapEff"] == "0000000000000000"
    assert seen_warm["fds"] == ["0", "1", "2", "3", "4"]  # the report file and listdir's own
    assert seen_warm["stdin"] == "/dev/null"
    assert any(line.startswith("Max cpu time") and " 8 " in line for line in seen_warm["limits"])
    if IS_ROOT:
        assert seen_warm["ids"][:2] == [65534, 65534]


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(
            "def inner():\n    raise RuntimeError('boom')\ntry:\n    {}['x']\n"
            "except KeyError:\n    inner()\n",
            id="chained-traceback",
        ),
        pytest.param("def broken(:\n    pass\n", id="syntax-error"),
        pytest.param("raise SystemExit('no way')\n", id="system-exit-message"),
        pytest.param("import sys\nprint('partial', flush=True)\nsys.exit(3)\n", id="exit-3"),
        pytest.param("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n", id="signal"),
        pytest.param("import atexit\natexit.register(print, 'at exit')\n", id="atexit"),
        pytest.param("raise KeyboardInterrupt\n", id="keyboard-interrupt"),
    ],
)
async def test_a_warm_run_fails_exactly_like_a_cold_run(
    cold: BwrapSandbox, warm: BwrapSandbox, space: Space, code: str
) -> None:
    space.file("main.py", code)
    argv = [PYTHON, "-I", "-S", "/spell/main.py"]
    a = await cold.run(space.spec(argv))
    b = await run_warm(warm, space.spec(argv))
    assert (b.outcome, b.exit_code, b.stdout_tail, b.stderr_tail) == (
        a.outcome,
        a.exit_code,
        a.stdout_tail,
        a.stderr_tail,
    )


async def test_entrypoints_the_launcher_does_not_run_itself_are_exec_ed(
    cold: BwrapSandbox, warm: BwrapSandbox, space: Space
) -> None:
    """A missing program, a missing script, a folder and a spell given LC_ALL behave as cold."""
    space.file("pkg/__main__.py", "import sys\nprint('package main', sys.argv)\n")
    space.file("main.py", "import sys, locale\nprint(sys.stdout.encoding, locale.getlocale())\n")
    cases = [
        ["./nonexistent"],
        [PYTHON, "-I", "-S", "missing.py"],
        [PYTHON, "-I", "-S", "pkg"],
        [PYTHON, "-I", "-S", "-u", "main.py"],
    ]
    for argv in cases:
        a = await cold.run(space.spec(argv))
        b = await run_warm(warm, space.spec(argv))
        assert (b.outcome, b.exit_code, b.stdout_tail, b.stderr_tail) == (
            a.outcome,
            a.exit_code,
            a.stdout_tail,
            a.stderr_tail,
        ), argv
    env = {"LC_ALL": "C", "TZ": "Asia/Tokyo"}
    argv = [PYTHON, "-I", "-S", "-c", "import time, sys; print(time.tzname, sys.stdout.encoding)"]
    a = await cold.run(space.spec(argv, env=env))
    b = await run_warm(warm, space.spec(argv, env=env))
    assert b.outcome == "ok"
    assert b.stdout_tail == a.stdout_tail  # start-up variables applied: exec'ed afresh


async def test_the_bundle_keeps_its_owners_and_modes_in_a_warm_sandbox(
    warm: BwrapSandbox, space: Space
) -> None:
    secret = space.file("private/secret.txt", "root only")
    secret.chmod(0o600)
    (space.bundle / "private").chmod(0o700)
    space.file("sub/deeper/data.txt", "shared")
    space.file(
        "main.py",
        """
        import json, os
        out = {}
        for path in ["private/secret.txt", "sub/deeper/data.txt"]:
            try:
                out[path] = open(path).read()
            except OSError as exc:
                out[path] = type(exc).__name__
        out["modes"] = {p: oct(os.stat(p).st_mode & 0o777) for p in ["sub", "main.py"]}
        print(json.dumps(out))
        """,
    )
    seen = report(await run_warm(warm, space.spec([PYTHON, "-I", "-S", "main.py"])))
    assert seen["sub/deeper/data.txt"] == "shared"
    assert seen["modes"] == {"sub": "0o755", "main.py": "0o644"}
    if IS_ROOT:
        assert seen["private/secret.txt"] == "PermissionError"


async def test_the_output_lands_in_the_run_folder_and_the_slot_is_removed(
    warm: BwrapSandbox, space: Space
) -> None:
    space.file(
        "main.py",
        """
        import os
        out = os.environ["SPELL_OUT"]
        os.makedirs(out + "/a/b")
        open(out + "/a/b/c.txt", "w").write("deep")
        os.symlink("/etc/passwd", out + "/link")
        """,
    )
    spec = space.spec([PYTHON, "-I", "-S", "main.py"])
    pool = pool_of(warm)
    assert await pool.prewarm(warm_profile_of(spec))
    used = pool.idle[0]
    assert used.slot.is_dir()
    result = await run_warm(warm, spec)
    assert result.outcome == "ok", result
    assert (spec.out_dir / "a" / "b" / "c.txt").read_text() == "deep"
    assert os.readlink(spec.out_dir / "link") == "/etc/passwd"  # moved as is, never followed
    assert result.output_bytes == 4
    if IS_ROOT:
        assert spec.out_dir.stat().st_uid == 65534
    deadline = time.monotonic() + 5
    while used.slot.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not used.slot.exists()
    assert (space.bundle / "main.py").exists()  # only the slot's links to it went


async def test_each_sandbox_runs_once_and_is_replaced(warm: BwrapSandbox, space: Space) -> None:
    space.file("main.py", "import os\nprint(os.getpid(), open('/proc/self/stat').read())\n")
    pool = pool_of(warm)
    assert await pool.wait_idle()
    first = set(pool.idle)  # the objects themselves (kept alive), not ids that could be reused
    seen = set()
    for _ in range(4):
        spec = space.spec([PYTHON, "-I", "-S", "main.py"])
        assert await pool.prewarm(warm_profile_of(spec))
        used = pool.idle[0]
        seen.add(used)
        pids = descendants(used.proc.pid)
        assert len(pids) >= 3
        result = await run_warm(warm, spec)
        assert result.outcome == "ok"
        assert used.state == "retired"
        assert used not in pool.idle
        assert await wait_gone(pids) == set()
        assert used.proc.returncode is not None
    assert len(seen) == 4  # four runs, four sandboxes
    assert await pool.wait_idle()
    assert not first & set(pool.idle)


async def test_an_idle_sandbox_that_died_is_replaced_and_never_used(
    warm: BwrapSandbox, space: Space
) -> None:
    pool = pool_of(warm)
    assert await pool.wait_idle()
    victim = pool.idle[0]
    os.killpg(victim.proc.pid, signal.SIGKILL)
    await victim.proc.wait()
    deadline = time.monotonic() + 5
    while pool.stats["died_idle"] < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert pool.stats["died_idle"] == 1
    assert victim not in pool.idle
    assert await pool.wait_idle()  # replaced (after a short back-off)
    space.file("main.py", "print('fine')\n")
    for _ in range(3):
        result = await run_warm(warm, space.spec([PYTHON, "-I", "-S", "main.py"]))
        assert result.stdout_tail == "fine\n"
    assert victim.state == "dead"


async def test_a_sandbox_found_dead_at_dispatch_is_skipped(
    warm: BwrapSandbox, space: Space
) -> None:
    """Killed after it was counted idle, before the job: the run goes elsewhere, unharmed."""
    space.file("main.py", "print('fine')\n")
    pool = pool_of(warm)
    assert await pool.wait_idle()
    for victim in pool.idle:
        for pid in descendants(victim.proc.pid):
            # launcher included: nothing can read the job. Killing the namespace's init takes
            # the rest with it, so a later pid of the list may already be gone.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    result = await warm.run(space.spec([PYTHON, "-I", "-S", "main.py"]))
    assert result.outcome == "ok", result
    assert result.stdout_tail == "fine\n"
    assert pool.stats["dead_on_dispatch"] + pool.stats["died_idle"] >= 1


async def test_closing_the_pool_kills_every_sandbox_and_removes_its_folder(
    space: Space,
) -> None:
    sb = await _probed(BwrapSandbox(warm=3))
    pool = pool_of(sb)
    assert await pool.wait_idle()
    space.file("main.py", "import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    spec = space.spec(
        [PYTHON, "-I", "-S", "main.py"], max_output_bytes=WarmProfile().max_output_bytes
    )
    started = asyncio.Event()

    async def on_line(stream: str, line: str) -> None:
        started.set()

    busy = asyncio.create_task(sb.run(spec, on_line))
    await asyncio.wait_for(started.wait(), 10)
    assert pool.stats["hits"] == 1
    pids: set[int] = set()
    for warm in pool._all:
        pids |= descendants(warm.proc.pid)
    assert len(pids) >= 9  # 3 sandboxes x (bwrap, its init, the launcher or spell)
    warm_dir = pool.warm_dir
    await sb.aclose()
    assert await wait_gone(pids) == set()
    result = await busy
    assert result.outcome == "killed"
    assert not warm_dir.exists()  # the default folder belongs to the sandbox object


HOLDER = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from app.runner.sandbox import BwrapSandbox

async def main():
    sb = BwrapSandbox(warm=2)
    await sb.probe()
    assert await sb.pool.wait_idle()
    print(json.dumps([w.proc.pid for w in sb.pool.idle]), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_warm_sandboxes_die_with_the_process_that_spawned_them() -> None:
    """A crashed server leaves no sandbox behind (bwrap --die-with-parent)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(ROOT)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), 60)
        tops = json.loads(line)
        pids: set[int] = set()
        for pid in tops:
            pids |= descendants(pid)
        assert len(pids) >= 6
        holder.kill()
        holder.wait(10)
        assert await wait_gone(pids) == set()
        for pid in pids:  # adopted by this (sub)reaper process once the holder died
            reap_adopted(pid)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        for slot in Path(tempfile.gettempdir()).glob(f"spell-warm-{holder.pid}"):
            shutil.rmtree(slot, ignore_errors=True)


async def test_the_pool_follows_the_profiles_of_recent_runs(
    warm: BwrapSandbox, space: Space
) -> None:
    space.file("main.py", "print('ok')\n")
    pool = pool_of(warm)
    assert await pool.wait_idle()
    assert {w.profile for w in pool.idle} == {WarmProfile()}
    spec = space.spec([PYTHON, "-I", "-S", "main.py"], memory_mb=128)
    misses = pool.stats["misses"]
    assert (await warm.run(spec)).outcome == "ok"  # nothing warm for 128 MB: cold
    assert pool.stats["misses"] == misses + 1
    for _ in range(2):
        assert (await run_warm(warm, space.spec(spec.argv, memory_mb=128))).outcome == "ok"
    deadline = time.monotonic() + 10
    want = {warm_profile_of(spec)}
    while {w.profile for w in pool.idle} != want and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await pool.wait_idle()
    assert {w.profile for w in pool.idle} == want
    assert len(pool.idle) == 2


SOCKETS = """
    import errno, json, socket
    out = {}
    for name, family in (("inet", socket.AF_INET), ("inet6", socket.AF_INET6)):
        try:
            socket.socket(family).close()
            out[name] = "created"
        except OSError as exc:
            out[name] = errno.errorcode[exc.errno]
    print(json.dumps(out))
"""


@pytest.mark.skipif(not HAS_SECCOMP, reason="no seccomp filter for this ABI")
async def test_a_warm_sandbox_serves_only_runs_of_its_network_flavour(space: Space) -> None:
    """The seccomp filter is fixed at spawn: a proxy-flavoured warm sandbox (AF_INET allowed)
    never runs a spell without an allow-list, and a no-network one never runs a spell with
    one; each run gets the filter its cold run would get."""
    space.file("main.py", SOCKETS)
    allow = NetworkAccess(allow=("api.example.com:443",))  # never connected to
    sb = await _probed(BwrapSandbox(warm=1))
    try:
        pool = pool_of(sb)
        assert await pool.wait_idle()
        assert {w.profile.network for w in pool.idle} == {False}
        argv = [PYTHON, "-I", "-S", "main.py"]
        # with an allow-list and only a no-network sandbox idle: cold, proxy filter
        hits, misses = pool.stats["hits"], pool.stats["misses"]
        seen = report(await sb.run(space.spec(argv, network=allow)))
        assert (pool.stats["hits"], pool.stats["misses"]) == (hits, misses + 1)
        assert seen == {"inet": "created", "inet6": "created"}
        # warm, proxy flavour
        spec = space.spec(argv, network=allow)
        assert warm_profile_of(spec).network is True
        assert report(await run_warm(sb, spec)) == {"inet": "created", "inet6": "created"}
        # the pool now holds only proxy-flavoured sandboxes: a run without network is cold
        deadline = time.monotonic() + 10
        while {w.profile.network for w in pool.idle} != {True} and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert {w.profile.network for w in pool.idle} == {True}
        hits, misses = pool.stats["hits"], pool.stats["misses"]
        seen = report(await sb.run(space.spec(argv)))
        assert (pool.stats["hits"], pool.stats["misses"]) == (hits, misses + 1)
        assert seen == {"inet": "EPERM", "inet6": "EPERM"}
        # warm, no-network flavour
        assert report(await run_warm(sb, space.spec(argv))) == {"inet": "EPERM", "inet6": "EPERM"}
    finally:
        await sb.aclose()


@pytest.mark.skipif(not IS_ROOT, reason="only root can switch to pool uids")
async def test_warm_sandboxes_and_cold_runs_share_a_small_uid_pool_without_deadlock(
    space: Space,
) -> None:
    uids = range(200_300, 200_302)
    sb = await _probed(BwrapSandbox(uid_pool=uids, warm=2))
    try:
        pool = pool_of(sb)
        assert await pool.wait_idle()  # both uids are now held by idle warm sandboxes
        space.file("main.py", "import os, time\ntime.sleep(0.2)\nprint(os.getuid())\n")
        argv = [PYTHON, "-I", "-S", "main.py"]
        other = space.spec(argv, memory_mb=200)  # a profile no warm sandbox has
        result = await asyncio.wait_for(sb.run(other), 30)
        assert result.outcome == "ok", result
        specs = [space.spec(argv) for _ in range(5)] + [space.spec(argv, memory_mb=160)]
        results = await asyncio.wait_for(asyncio.gather(*(sb.run(s) for s in specs)), 60)
        assert [r.outcome for r in results] == ["ok"] * 6, results
        assert {int(r.stdout_tail) for r in results} <= set(uids)
        assert pool.stats["hits"] >= 1
    finally:
        await sb.aclose()


async def test_no_spawn_forks_the_server_with_preexec_fn(
    monkeypatch: pytest.MonkeyPatch, space: Space
) -> None:
    """rlimits come from prlimit: every spawn (probe, warm, cold) is a plain vfork + exec, which
    does not hold up the event loop the way a fork with ``preexec_fn`` does."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    real = asyncio.create_subprocess_exec

    async def spy(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        calls.append((args, kwargs))
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
    sb = await _probed(BwrapSandbox(warm=1))
    try:
        space.file("main.py", "print('ok')\n")
        assert (await run_warm(sb, space.spec([PYTHON, "-I", "-S", "main.py"]))).outcome == "ok"
        assert (await sb.run(space.spec([PYTHON, "-I", "-S", "main.py"], memory_mb=99))).outcome
    finally:
        await sb.aclose()
    assert len(calls) >= 3
    for args, kwargs in calls:
        assert "preexec_fn" not in kwargs
        # warm spawns start niced (nice execs prlimit: still no fork in this process)
        argv = list(args[3:]) if Path(args[0]).name == "nice" else list(args)
        assert Path(argv[0]).name == "prlimit"
        assert kwargs["start_new_session"] is True


def _tree_nice(pid: int) -> dict[int, int]:
    """pid -> niceness of ``pid`` and every descendant (field 19 of /proc/PID/stat)."""
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        top = todo.pop()
        with contextlib.suppress(OSError):
            out[top] = int(Path(f"/proc/{top}/stat").read_text().rsplit(")", 1)[1].split()[16])
            todo += [int(c) for c in Path(f"/proc/{top}/task/{top}/children").read_text().split()]
    return out


@pytest.mark.skipif(not IS_ROOT, reason="warm spawns are niced only where 0 can be restored")
async def test_an_idle_warm_sandbox_waits_niced_and_its_run_is_not(
    warm: BwrapSandbox, space: Space
) -> None:
    """Spawning a spare is background work (nice 10), but the spell it then runs gets the
    niceness of a cold run (0): the spell reports it from inside."""
    space.file("main.py", "import os\nprint(os.nice(0))\n")
    spec = space.spec([PYTHON, "-I", "-S", "main.py"])
    pool = pool_of(warm)
    assert await pool.prewarm(warm_profile_of(spec))
    idle = pool.idle[0]
    niceness = _tree_nice(idle.proc.pid)
    assert len(niceness) >= 3  # bwrap's monitor, the namespace's init, the launcher
    assert set(niceness.values()) == {WARM_SPAWN_NICE}
    lines: list[str] = []

    async def on_line(stream: str, line: str) -> None:
        lines.append(line)

    hits = pool.stats["hits"]
    result = await warm.run(spec, on_line)
    assert pool.stats["hits"] == hits + 1
    assert result.outcome == "ok", result
    assert lines == ["0"]


@pytest.mark.parametrize("mode", ["cold", "warm"])
async def test_a_finished_sandbox_leaves_not_even_a_zombie(space: Space, mode: str) -> None:
    """bwrap's monitor exits without reaping its namespace's init; we adopt and reap it (a
    zombie would count against the sandbox uid's RLIMIT_NPROC until someone reaps it)."""
    space.file("main.py", "print('started', flush=True)\nimport time\ntime.sleep(0.3)\n")
    sb = await _probed(BwrapSandbox(warm=1 if mode == "warm" else 0))
    try:
        spec = space.spec([PYTHON, "-I", "-S", "main.py"])
        monitors: list[int] = []
        if mode == "warm":
            assert await pool_of(sb).prewarm(warm_profile_of(spec))
            monitors = [pool_of(sb).idle[0].proc.pid]
        seen: set[int] = set()
        me = os.getpid()

        async def on_line(stream: str, line: str) -> None:
            tops = monitors or [
                int(c) for c in Path(f"/proc/{me}/task/{me}/children").read_text().split()
            ]
            for top in tops:
                seen.update(descendants(top) - {top})  # below bwrap's monitor

        result = await sb.run(spec, on_line)
        assert result.outcome == "ok", result
        assert len(seen) >= 2  # the namespace's init and the spell
        deadline = time.monotonic() + 2
        while any(Path(f"/proc/{pid}").exists() for pid in seen) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert [pid for pid in seen if Path(f"/proc/{pid}").exists()] == []
    finally:
        await sb.aclose()
