"""The bubblewrap sandbox, for real: isolation, limits, classification, streaming.

Skipped when bwrap is not installed, unless SPELL_REQUIRE_SERVICES=1 (CI), where it fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import shutil
import socket
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.runner.pool import WarmPool
from app.runner.sandbox import (
    MAX_LINE_BYTES,
    TAIL_BYTES,
    BwrapSandbox,
    SandboxResult,
    SandboxSpec,
    SandboxUnavailable,
    UnsafeSubprocessSandbox,
    detect_sandbox,
    seccomp_program,
    warm_profile_of,
)

pytestmark = pytest.mark.e2e

if shutil.which("bwrap") is None:
    if os.environ.get("SPELL_REQUIRE_SERVICES") == "1":
        pytest.fail("bwrap is required (SPELL_REQUIRE_SERVICES=1) but not installed", pytrace=False)
    pytest.skip("bubblewrap (bwrap) is not installed", allow_module_level=True)

PYTHON = "/usr/bin/python3"
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def cold_sandbox() -> BwrapSandbox:
    sb = BwrapSandbox()
    try:
        asyncio.run(sb.probe())
    except SandboxUnavailable as exc:
        if os.environ.get("SPELL_REQUIRE_SERVICES") == "1":
            pytest.fail(f"sandbox probe failed: {exc}")
        pytest.skip(f"bwrap cannot create namespaces here: {exc}")
    return sb


class WarmOnly:
    """A warm-pool BwrapSandbox whose every run must go through a pre-spawned sandbox.

    Before each run the pool is shifted to the run's profile and waited for, and afterwards the
    pool's hit counter proves the run did not fall back to a cold spawn.
    """

    name = "bwrap"

    def __init__(self, inner: BwrapSandbox) -> None:
        self.inner = inner

    @property
    def pool(self) -> WarmPool:
        assert self.inner.pool is not None, "the warm pool did not start"
        return self.inner.pool

    async def probe(self) -> None:
        await self.inner.probe()

    async def run(self, spec: SandboxSpec, on_line: Any = None) -> SandboxResult:
        assert await self.pool.prewarm(warm_profile_of(spec)), "no warm sandbox got ready"
        hits = self.pool.stats["hits"]
        result = await self.inner.run(spec, on_line)
        assert self.pool.stats["hits"] == hits + 1, "the run did not use a warm sandbox"
        return result


@pytest.fixture(params=["cold", "warm"])
async def sandbox(
    request: pytest.FixtureRequest, cold_sandbox: BwrapSandbox
) -> AsyncIterator[BwrapSandbox | WarmOnly]:
    """Every sandbox test runs twice: cold spawn, and through the warm pool."""
    if request.param == "cold":
        yield cold_sandbox
        return
    inner = BwrapSandbox(warm=1)
    await inner.probe()
    try:
        yield WarmOnly(inner)
    finally:
        await inner.aclose()


@dataclass
class Workspace:
    """A bundle folder, an input file and an output folder the sandbox uid can reach."""

    root: Path
    lines: list[tuple[str, str]] = field(default_factory=list)

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def input(self) -> Path:
        return self.root / "input.json"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def spec(self, code: str, **overrides: Any) -> SandboxSpec:
        (self.bundle / "main.py").write_text(textwrap.dedent(code), encoding="utf-8")
        (self.bundle / "main.py").chmod(0o644)
        kwargs: dict[str, Any] = {
            "bundle_dir": self.bundle,
            "argv": [PYTHON, "-I", "-S", "/spell/main.py"],
            "input_path": self.input,
            "out_dir": self.out,
            "timeout_sec": 10.0,
            "memory_mb": 256,
            "max_output_bytes": 1024 * 1024,
        }
        kwargs.update(overrides)
        return SandboxSpec(**kwargs)

    async def on_line(self, stream: str, line: str) -> None:
        self.lines.append((stream, line))


@pytest.fixture
def ws() -> Iterator[Workspace]:
    # Not tmp_path: /tmp/pytest-of-root is 0700, so uid 65534 could not reach it.
    root = Path(tempfile.mkdtemp(prefix="spell-sandbox-test-"))
    root.chmod(0o755)
    (root / "bundle").mkdir()
    (root / "bundle").chmod(0o755)
    (root / "input.json").write_text(json.dumps({"name": "world"}), encoding="utf-8")
    (root / "input.json").chmod(0o644)
    yield Workspace(root)
    shutil.rmtree(root, ignore_errors=True)


def report(result: SandboxResult) -> dict[str, Any]:
    """The JSON document a probing spell printed as its last stdout line."""
    assert result.outcome == "ok", result
    return dict(json.loads(result.stdout_tail.strip().splitlines()[-1]))


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


async def test_happy_path_reads_input_writes_output_and_streams_lines(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPELL_TEST_HOST_SECRET", "must-not-leak")
    spec = ws.spec(
        """
        import json, os, sys
        doc = json.load(open(os.environ["SPELL_INPUT"]))
        with open(os.path.join(os.environ["SPELL_OUT"], "greeting.txt"), "w") as f:
            f.write(f"hello {doc['name']}")
        print("line one")
        print("line two", flush=True)
        print("to stderr", file=sys.stderr)
        print(json.dumps({"cwd": os.getcwd(), "env": dict(os.environ)}))
        """,
        env={"SPELL_CAST_ID": "cast_123", "TRACEPARENT": "00-abc-def-01"},
    )
    result = await sandbox.run(spec, ws.on_line)

    assert result.outcome == "ok"
    assert result.exit_code == 0
    assert (ws.out / "greeting.txt").read_text() == "hello world"
    assert result.output_bytes == len("hello world")
    stdout = [line for stream, line in ws.lines if stream == "stdout"]
    assert stdout[:2] == ["line one", "line two"]
    assert ("stderr", "to stderr") in ws.lines
    assert "to stderr" in result.stderr_tail
    seen = report(result)
    assert seen["cwd"] == "/spell"
    env = seen["env"]
    assert env["SPELL_INPUT"] == "/tmp/input.json"
    assert env["SPELL_OUT"] == "/tmp/out"
    assert env["SPELL_CAST_ID"] == "cast_123"
    assert env["TRACEPARENT"] == "00-abc-def-01"
    assert env["HOME"] == "/tmp"
    assert "SPELL_TEST_HOST_SECRET" not in env


async def test_network_is_denied_even_to_a_port_listening_on_the_host(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    """A spell without a network allow-list cannot even create an AF_INET/AF_INET6 socket
    (seccomp, EPERM), so it reaches neither the internet nor a port on the host; DNS fails and
    its namespace has only ``lo``. AF_UNIX still works (asyncio's self-pipe, socketpair)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        spec = ws.spec(
            f"""
            import asyncio, errno, json, socket
            results = {{}}
            for name, family, addr in [("internet", socket.AF_INET, ("1.1.1.1", 80)),
                                       ("host", socket.AF_INET, ("127.0.0.1", {port})),
                                       ("internet6", socket.AF_INET6, ("2606:4700::1111", 80))]:
                try:
                    s = socket.socket(family)
                except OSError as exc:
                    results[name] = errno.errorcode[exc.errno]
                    continue
                s.settimeout(3)
                try:
                    s.connect(addr)
                    results[name] = "connected"
                except OSError as exc:
                    results[name] = "created, then " + type(exc).__name__
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=3)
                results["create_connection"] = "connected"
            except OSError as exc:
                results["create_connection"] = type(exc).__name__
            try:
                socket.getaddrinfo("example.com", 443)
                results["dns"] = "resolved"
            except OSError as exc:
                results["dns"] = type(exc).__name__
            results["interfaces"] = [l.split(":")[0].strip()
                                     for l in open("/proc/net/dev").readlines()[2:]]
            results["asyncio"] = asyncio.run(asyncio.sleep(0, "runs"))
            print(json.dumps(results))
            """
        )
        seen = report(await sandbox.run(spec))
    finally:
        listener.close()
    assert seen["internet"] == "EPERM"  # socket() itself is refused
    assert seen["host"] == "EPERM"
    assert seen["internet6"] == "EPERM"
    assert seen["create_connection"] == "PermissionError"
    assert seen["dns"] != "resolved"
    assert seen["interfaces"] == ["lo"]
    assert seen["asyncio"] == "runs"


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64"), reason="no seccomp filter for this ABI"
)
async def test_a_spell_without_network_can_create_only_unix_sockets(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    """The no-network seccomp filter: AF_INET/AF_INET6 of every type EPERM (raw ones too,
    before the capability check), netlink/packet/vsock/... EAFNOSUPPORT, AF_UNIX allowed."""
    spec = ws.spec(
        """
        import errno, json, socket
        out = {}
        cases = {"unix": (1, socket.SOCK_STREAM), "unix_dgram": (1, socket.SOCK_DGRAM),
                 "inet_tcp": (2, socket.SOCK_STREAM), "inet_udp": (2, socket.SOCK_DGRAM),
                 "inet_raw": (2, socket.SOCK_RAW), "inet6_tcp": (10, socket.SOCK_STREAM),
                 "inet6_udp": (10, socket.SOCK_DGRAM), "netlink": (16, socket.SOCK_RAW),
                 "packet": (17, socket.SOCK_RAW), "vsock": (40, socket.SOCK_STREAM)}
        for name, (family, kind) in cases.items():
            try:
                socket.socket(family, kind).close()
                out[name] = "created"
            except OSError as exc:
                out[name] = errno.errorcode[exc.errno]
        a, b = socket.socketpair()
        a.sendall(b"ping")
        out["socketpair"] = b.recv(4).decode()
        print(json.dumps(out))
        """
    )
    seen = report(await sandbox.run(spec))
    assert seen == {
        "unix": "created",
        "unix_dgram": "created",
        "inet_tcp": "EPERM",
        "inet_udp": "EPERM",
        "inet_raw": "EPERM",
        "inet6_tcp": "EPERM",
        "inet6_udp": "EPERM",
        "netlink": "EAFNOSUPPORT",
        "packet": "EAFNOSUPPORT",
        "vsock": "EAFNOSUPPORT",
        "socketpair": "ping",
    }


async def test_only_the_output_folder_is_writable(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    spec = ws.spec(
        """
        import json
        results = {}
        for path in ["/spell/x", "/spell/main.py", "/usr/x", "/usr/bin/python3", "/etc/x", "/x",
                     "/dev/x", "/tmp/input.json", "/tmp/out/ok"]:
            try:
                with open(path, "a") as f:
                    f.write("x")
                results[path] = "written"
            except OSError as exc:
                results[path] = type(exc).__name__
        print(json.dumps(results))
        """
    )
    before = (ws.bundle / "main.py").read_bytes()
    seen = report(await sandbox.run(spec))
    assert seen.pop("/tmp/out/ok") == "written"
    assert all(outcome != "written" for outcome in seen.values()), seen
    assert (ws.bundle / "main.py").read_bytes() == before
    assert not (ws.bundle / "x").exists()
    assert json.loads(ws.input.read_text()) == {"name": "world"}


async def test_identity_is_unprivileged_without_capabilities(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    spec = ws.spec(
        """
        import json, os, subprocess
        status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines())
        nested = subprocess.run(["/usr/bin/unshare", "-U", "true"], capture_output=True)
        print(json.dumps({
            "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "CapEff": status["CapEff"].strip(), "CapPrm": status["CapPrm"].strip(),
            "NoNewPrivs": status["NoNewPrivs"].strip(), "pid": os.getpid(),
            "nested_userns": nested.returncode, "fds": sorted(os.listdir("/proc/self/fd")),
        }))
        """
    )
    seen = report(await sandbox.run(spec))
    assert seen["uid"] != 0
    assert seen["euid"] != 0
    assert seen["CapEff"] == "0000000000000000"
    assert seen["CapPrm"] == "0000000000000000"
    assert seen["pid"] < 10  # own PID namespace
    assert seen["fds"] == ["0", "1", "2", "3"]  # 3 is listdir's own: no launcher fd leaks in
    if shutil.which("unshare"):
        assert seen["nested_userns"] != 0
    if IS_ROOT:
        assert seen["NoNewPrivs"] == "1"


# Syscall numbers per ABI; on the host ptrace(TRACEME) succeeds and the others answer EINVAL.
SYSCALLS = {
    "x86_64": {"ptrace": 101, "bpf": 321, "unshare": 272, "io_uring_setup": 425, "clone3": 435},
    "aarch64": {"ptrace": 117, "bpf": 280, "unshare": 97, "io_uring_setup": 425, "clone3": 435},
}


@pytest.mark.skipif(platform.machine() not in SYSCALLS, reason="no seccomp filter for this ABI")
async def test_seccomp_denies_dangerous_syscalls_but_not_threads_or_subprocesses(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    spec = ws.spec(
        f"""
        import ctypes, errno, json, subprocess, threading
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(256)
        nrs = {SYSCALLS[platform.machine()]!r}
        args = {{"ptrace": (0, 0, 0, 0), "bpf": (0, 0, 0), "unshare": (0x00020000,),
                 "io_uring_setup": (1, ctypes.addressof(buf)), "clone3": (0, 0)}}
        results = {{}}
        for name, nr in nrs.items():
            ctypes.set_errno(0)
            rc = libc.syscall(nr, *args[name])
            results[name] = errno.errorcode.get(ctypes.get_errno()) if rc == -1 else rc
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
        child = subprocess.run(["/usr/bin/echo", "child ran"], capture_output=True, text=True)
        results["subprocess"] = child.stdout.strip()
        print(json.dumps(results))
        """
    )
    seen = report(await sandbox.run(spec))
    assert seen == {
        "ptrace": "EPERM",
        "bpf": "EPERM",
        "unshare": "EPERM",
        "io_uring_setup": "EPERM",
        "clone3": "ENOSYS",
        "subprocess": "child ran",
    }


def test_seccomp_program_is_whole_bpf_instructions() -> None:
    for network in (False, True):
        program = seccomp_program("x86_64", network=network)
        assert program is not None and len(program) % 8 == 0
        assert seccomp_program("riscv64", network=network) is None


async def test_etc_shadow_is_absent_and_unreadable_even_when_bound(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    probe = """
        import json, sys
        try:
            open(sys.argv[1]).read()
            print(json.dumps("read"))
        except OSError as exc:
            print(json.dumps(type(exc).__name__))
    """
    absent = await sandbox.run(
        ws.spec(probe, argv=[PYTHON, "-I", "-S", "/spell/main.py", "/etc/shadow"])
    )
    assert json.loads(absent.stdout_tail) == "FileNotFoundError"

    if not Path("/etc/shadow").exists():
        pytest.skip("no /etc/shadow on this host")
    # Bind the host's /etc as the bundle: the file is there, but only host root may read it.
    bound = await sandbox.run(
        ws.spec(
            "",
            bundle_dir=Path("/etc"),
            argv=[PYTHON, "-I", "-S", "-c", textwrap.dedent(probe), "/spell/shadow"],
        )
    )
    assert json.loads(bound.stdout_tail) == "PermissionError"


async def test_memory_limit_ends_the_run_as_memory(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    spec = ws.spec(
        """
        blob = bytearray(256 * 1024 * 1024)
        print("allocated", len(blob))
        """,
        memory_mb=128,
    )
    result = await sandbox.run(spec)
    assert result.outcome == "memory", result
    assert "MemoryError" in result.stderr_tail
    assert "allocated" not in result.stdout_tail


async def test_time_limit_kills_the_whole_process_tree(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    marker = f"spell-sandbox-orphan-{os.getpid()}-{time.monotonic_ns()}"
    seen_while_running: list[int] = []

    async def on_line(stream: str, line: str) -> None:
        if line == "child started":
            seen_while_running.extend(processes_with(marker))

    spec = ws.spec(
        f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-I", "-S", "-c", "import time; time.sleep(1000)",
                          "{marker}"], start_new_session=True)
        time.sleep(0.2)
        print("child started", flush=True)
        while True:
            time.sleep(1)
        """,
        timeout_sec=1.5,
    )
    result = await sandbox.run(spec, on_line)

    assert result.outcome == "timeout", result
    assert result.exit_code is None
    assert result.duration_ms >= 1500
    assert seen_while_running, "the child process never showed up"
    deadline = time.monotonic() + 3
    while processes_with(marker) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert processes_with(marker) == []


async def test_cancelling_a_run_kills_the_sandbox(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    marker = f"spell-sandbox-cancelled-{os.getpid()}-{time.monotonic_ns()}"
    started = asyncio.Event()

    async def on_line(stream: str, line: str) -> None:
        if line == "child started":
            started.set()

    spec = ws.spec(
        f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-I", "-S", "-c", "import time; time.sleep(1000)",
                          "{marker}"])
        time.sleep(0.2)
        print("child started", flush=True)
        time.sleep(1000)
        """,
        timeout_sec=60,
    )
    task = asyncio.create_task(sandbox.run(spec, on_line))
    await asyncio.wait_for(started.wait(), timeout=10)
    assert processes_with(marker)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 3
    while processes_with(marker) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert processes_with(marker) == []


async def test_cpu_limit_ends_the_run_as_cpu(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    result = await sandbox.run(ws.spec("while True: pass", cpu_sec=1, timeout_sec=10))
    assert result.outcome == "cpu", result
    assert result.exit_code == 152


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(
            """
            import os, time
            for i in range(16):  # 16 files of 512 KiB: each under RLIMIT_FSIZE, 8 MiB in all
                with open(os.path.join(os.environ["SPELL_OUT"], f"part{i}"), "wb") as f:
                    f.write(b"x" * 512 * 1024)
            time.sleep(30)
            """,
            id="many-files-watchdog",
        ),
        pytest.param(
            """
            import os
            with open(os.path.join(os.environ["SPELL_OUT"], "big"), "wb") as f:
                for _ in range(64):
                    f.write(b"x" * 64 * 1024)
            """,
            id="one-file-rlimit-fsize",
        ),
    ],
)
async def test_too_much_output_ends_the_run_as_output_too_large(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, code: str
) -> None:
    result = await sandbox.run(ws.spec(code, max_output_bytes=1024 * 1024))
    assert result.outcome == "output_too_large", result
    assert result.duration_ms < 30_000


async def test_crash_is_exit_error_with_the_traceback(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    result = await sandbox.run(ws.spec("raise RuntimeError('boom')"))
    assert result.outcome == "exit_error"
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr_tail
    assert "RuntimeError: boom" in result.stderr_tail


async def test_long_lines_are_capped_and_tails_kept(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    spec = ws.spec(
        """
        print("a" * 20000)
        for i in range(2000):
            print(f"row {i}")
        """
    )
    result = await sandbox.run(spec, ws.on_line)
    assert result.outcome == "ok"
    assert ws.lines[0] == ("stdout", "a" * MAX_LINE_BYTES)
    assert ws.lines[-1] == ("stdout", "row 1999")
    assert len(ws.lines) == 2001
    assert len(result.stdout_tail.encode()) <= TAIL_BYTES
    assert result.stdout_tail.endswith("row 1999\n")


@pytest.mark.skipif(not IS_ROOT, reason="only root can switch to pool uids")
async def test_uid_pool_gives_each_concurrent_run_its_own_process_budget(ws: Workspace) -> None:
    # One shared uid would need 6 runs x 3 processes > max_procs=4; a pool makes it per run.
    pooled = BwrapSandbox(uid_pool=range(200_100, 200_106))
    (ws.bundle / "main.py").write_text("import os, time\ntime.sleep(0.3)\nprint(os.getuid())\n")
    specs = [
        SandboxSpec(
            bundle_dir=ws.bundle,
            argv=[PYTHON, "-I", "-S", "/spell/main.py"],
            input_path=ws.input,
            out_dir=ws.root / f"out{i}",
            timeout_sec=10,
            memory_mb=256,
            max_output_bytes=1024,
            max_procs=4,
        )
        for i in range(6)
    ]
    results = await asyncio.gather(*(pooled.run(spec) for spec in specs))
    assert [r.outcome for r in results] == ["ok"] * 6, results
    assert {int(r.stdout_tail) for r in results} == set(range(200_100, 200_106))


async def test_probe_passes_and_is_cached(cold_sandbox: BwrapSandbox) -> None:
    fresh = BwrapSandbox()
    await fresh.probe()
    await fresh.probe()


async def test_probe_fails_closed_when_bwrap_is_missing_or_broken() -> None:
    with pytest.raises(SandboxUnavailable, match="not executable"):
        await BwrapSandbox(bwrap="/nonexistent/bwrap").probe()
    with pytest.raises(SandboxUnavailable, match="failed to set up"):
        await BwrapSandbox(bwrap="/usr/bin/false").probe()


@pytest.mark.skipif(not IS_ROOT, reason="reachability is only checked when dropping root")
async def test_paths_the_sandbox_uid_cannot_reach_are_refused(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    ws.root.chmod(0o700)
    with pytest.raises(ValueError, match="not reachable by sandbox uid"):
        await sandbox.run(ws.spec("print('hi')"))


def test_detect_sandbox_prefers_bwrap_and_fails_closed_without_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert isinstance(detect_sandbox(), BwrapSandbox)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="bwrap"):
        detect_sandbox()
    assert isinstance(detect_sandbox(allow_unsafe=True), UnsafeSubprocessSandbox)


async def test_unsafe_mode_keeps_limits_and_warns_loudly(
    ws: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    unsafe = UnsafeSubprocessSandbox()
    caplog.set_level(logging.WARNING, logger="spell.sandbox")
    ok = await unsafe.run(
        ws.spec(
            """
            import json, os
            name = json.load(open(os.environ["SPELL_INPUT"]))["name"]
            open(os.path.join(os.environ["SPELL_OUT"], "a.txt"), "w").write(name)
            """
        )
    )
    assert ok.outcome == "ok", ok
    assert (ws.out / "a.txt").read_text() == "world"
    assert any("UNSAFE" in r.getMessage() for r in caplog.records)
    slow = await unsafe.run(ws.spec("import time; time.sleep(60)", timeout_sec=0.5))
    assert slow.outcome == "timeout"


# --- output measured by directory fd, fail closed; spell rlimits and signals ----------------

_NEST_PAST_PATH_MAX = """
    import os
    os.chdir(os.environ["SPELL_OUT"])
    for i in range(20):  # 20 x 256 bytes of path: far past PATH_MAX (4096) from the host
        name = f"{i:02d}" + "n" * 253
        os.mkdir(name)
        os.chdir(name)
    for i in range(4):  # 4 x 512 KiB: each under RLIMIT_FSIZE (1 MiB), 2 MiB in all
        with open(f"part{i}", "wb") as f:
            f.write(b"x" * 512 * 1024)
"""


async def test_output_nested_past_path_max_is_still_counted(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    result = await sandbox.run(ws.spec(_NEST_PAST_PATH_MAX, max_output_bytes=1024 * 1024))
    assert result.outcome == "output_too_large", result


async def test_output_nested_deeper_than_the_limit_is_output_too_large(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    code = """
        import os
        os.chdir(os.environ["SPELL_OUT"])
        for _ in range(70):  # MAX_OUTPUT_DEPTH is 64
            os.mkdir("d")
            os.chdir("d")
        with open("f", "w") as f:
            f.write("tiny")
    """
    result = await sandbox.run(ws.spec(code))
    assert result.outcome == "output_too_large", result


async def test_output_within_the_depth_limit_is_fine(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    code = """
        import os
        os.chdir(os.environ["SPELL_OUT"])
        for _ in range(60):
            os.mkdir("d")
            os.chdir("d")
        with open("f", "w") as f:
            f.write("tiny")
    """
    result = await sandbox.run(ws.spec(code))
    assert result.outcome == "ok", result
    assert result.output_bytes == 4


async def test_open_files_are_limited(sandbox: BwrapSandbox | WarmOnly, ws: Workspace) -> None:
    code = """
        import json, resource
        print(json.dumps(resource.getrlimit(resource.RLIMIT_NOFILE)))
    """
    result = await sandbox.run(ws.spec(code))
    assert result.outcome == "ok", result
    assert json.loads(result.stdout_tail.strip().splitlines()[-1]) == [256, 256]


async def test_an_exec_d_program_gets_default_sigpipe_and_sigxfsz(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    result = await sandbox.run(ws.spec("", argv=["/usr/bin/grep", "SigIgn", "/proc/self/status"]))
    assert result.outcome == "ok", result
    ignored = int(result.stdout_tail.split()[-1], 16)
    for sig in (13, 25):  # SIGPIPE, SIGXFSZ
        assert not ignored & (1 << (sig - 1)), hex(ignored)


async def test_a_program_past_rlimit_fsize_dies_of_sigxfsz(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace
) -> None:
    argv = ["/bin/sh", "-c", 'exec head -c 2000000 /dev/zero > "$SPELL_OUT/big"']
    result = await sandbox.run(ws.spec("", argv=argv, max_output_bytes=1024 * 1024))
    assert result.outcome == "output_too_large", result
    assert result.exit_code == 153, result
