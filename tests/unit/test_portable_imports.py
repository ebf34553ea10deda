"""Every ``app`` module imports on an OS without the POSIX-only parts of the standard library.

The platform's server and sandbox are POSIX (Linux; macOS without the sandbox), but the package
must still *import* on Windows: the CLI's portable commands, the SDK and the test suite's portable
tiers run there (``.github/workflows/ci.yml``, job ``test-portable``). Windows has no ``fcntl``,
``resource``, ``pwd``, ``grp``, ``termios``…, and its ``os``/``signal`` lack ``O_DIRECTORY``,
``O_NOFOLLOW``, ``O_CLOEXEC``, ``fork``, ``SIGKILL``, ``SIGXCPU``… A module that touches one of
them at import time breaks every importer.

Each check runs in a fresh interpreter that first makes those modules unimportable (``None`` in
``sys.modules``) and deletes those attributes, the way Windows lacks them, then imports every
module under ``app/``. On a real Windows runner the blocking is a no-op and the imports are real.
Only the standard library: this module runs on the Windows CI runner too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Standard-library modules that exist only on POSIX systems.
POSIX_ONLY_MODULES = ("fcntl", "resource", "pwd", "grp", "termios", "tty", "pty", "syslog")
#: ``os`` attributes Windows does not have. ``os.WNOHANG`` is missing there too but stays:
#: the POSIX branch of ``subprocess`` reads it at import time, which Windows never takes.
POSIX_ONLY_OS = (
    "O_CLOEXEC",
    "O_DIRECTORY",
    "O_NOFOLLOW",
    "O_NONBLOCK",
    "O_PATH",
    "MFD_CLOEXEC",
    "P_PIDFD",
    "chown",
    "fork",
    "geteuid",
    "getpgid",
    "getuid",
    "killpg",
    "memfd_create",
    "pidfd_open",
    "setsid",
    "waitid",
)
#: ``signal`` attributes Windows does not have.
POSIX_ONLY_SIGNAL = (
    "SIGALRM",
    "SIGCHLD",
    "SIGHUP",
    "SIGKILL",
    "SIGPIPE",
    "SIGQUIT",
    "SIGUSR1",
    "SIGUSR2",
    "SIGXCPU",
    "SIGXFSZ",
    "pidfd_send_signal",
    "pthread_sigmask",
    "setitimer",
)

# Run in the child: block, strip, then import every module of the package and report failures.
_CHILD = """
import importlib, json, os, pkgutil, signal, sys, traceback
modules, os_attrs, signal_attrs = json.loads(sys.argv[1])
for name in modules:
    sys.modules[name] = None
for name in os_attrs:
    if hasattr(os, name):
        delattr(os, name)
for name in signal_attrs:
    if hasattr(signal, name):
        delattr(signal, name)
import app
failed = {}
names = ["app"] + [m.name for m in pkgutil.walk_packages(app.__path__, "app.", onerror=print)]
for name in names:
    try:
        importlib.import_module(name)
    except BaseException as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        failed[name] = f"{type(exc).__name__}: {exc} ({where.filename}:{where.lineno})"
print(json.dumps({"imported": len(names) - len(failed), "failed": failed}))
"""


def import_all(
    modules: tuple[str, ...] = POSIX_ONLY_MODULES,
    os_attrs: tuple[str, ...] = POSIX_ONLY_OS,
    signal_attrs: tuple[str, ...] = POSIX_ONLY_SIGNAL,
) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([modules, os_attrs, signal_attrs])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_every_app_module_imports_without_posix_only_modules() -> None:
    result = import_all()
    assert result["failed"] == {}
    # Every module was found (and so checked): the package has far more than a handful.
    imported = result["imported"]
    assert isinstance(imported, int) and imported > 60, result


def test_the_check_finds_a_module_that_needs_one() -> None:
    # The same child, blocking a module the package imports at module level, must report the
    # modules that need it: the check above cannot pass by importing nothing.
    result = import_all(modules=("sqlalchemy",), os_attrs=(), signal_attrs=())
    failed = result["failed"]
    assert isinstance(failed, dict) and "app.store.models" in failed, result


# Run in the child: with ``fcntl`` blocked, writing the audit log is refused with UNAVAILABLE
# (no lock could keep two writers from forking the chain), while verifying a log still works.
_AUDIT_CHILD = """
import asyncio, json, sys
from pathlib import Path
sys.modules["fcntl"] = None
from app.errors import AppError
from app.store import filelock
from app.store.auditlog import AuditLog, verify_file

async def main(path):
    try:
        async with AuditLog(path) as audit:
            await audit.append("cast.created", actor="acct_1")
    except AppError as exc:
        return exc.code, exc.message
    return None, None

path = Path(sys.argv[1])
code, message = asyncio.run(main(path))
result = verify_file(path) if path.exists() else None
print(json.dumps({
    "have_flock": filelock.HAVE_FLOCK,
    "code": code,
    "message": message,
    "size": path.stat().st_size if path.exists() else None,
    "verified": None if result is None else [result.ok, result.lines],
}))
"""


def audit_child(path: Path, *, block_fcntl: bool) -> dict[str, object]:
    code = _AUDIT_CHILD if block_fcntl else _AUDIT_CHILD.replace('sys.modules["fcntl"] = None', "")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_without_file_locks_the_audit_log_refuses_to_write_but_still_verifies(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    native = audit_child(path, block_fcntl=False)
    if not native["have_flock"]:  # a real Windows runner: there is no flock to compare with
        assert native["code"] == "UNAVAILABLE"
        return
    assert native["code"] is None and native["verified"] == [True, 1], native
    size = native["size"]
    blocked = audit_child(path, block_fcntl=True)
    assert blocked["have_flock"] is False
    assert blocked["code"] == "UNAVAILABLE", blocked
    assert "fcntl.flock" in str(blocked["message"]) and "Linux or macOS" in str(blocked["message"])
    # Nothing was written, and the record the native writer made still verifies.
    assert blocked["size"] == size and blocked["verified"] == [True, 1], blocked
