"""``fcntl.flock`` where the OS has it (Linux, macOS); a fail-closed stand-in where it has not.

Modules that lock files import this instead of :mod:`fcntl` (``from app.store import filelock as
fcntl``), so they import everywhere, Windows included (``tests/unit/test_portable_imports.py``).

Without ``fcntl`` (Windows) there is no advisory lock several processes could share, and the audit
log's chain is only safe while every writer holds one (``spell serve`` and ``spell worker`` append
to one file). So there the stand-in refuses every *exclusive* lock, and :func:`require_flock`
(called before the audit log's writer creates or opens anything) refuses outright, with
``UNAVAILABLE`` and :data:`UNSUPPORTED` as the message: the server does not start rather than
risk a forked chain. *Shared* locks (a reader that wants a consistent view against a concurrent
writer) are granted without locking, since no writer can exist on such an OS:
:func:`app.store.auditlog.verify_file` still checks a log copied from a server.
"""

from __future__ import annotations

import os
from pathlib import Path

from app.errors import AppError

__all__ = [
    "HAVE_FLOCK",
    "LOCK_EX",
    "LOCK_NB",
    "LOCK_SH",
    "LOCK_UN",
    "UNSUPPORTED",
    "flock",
    "require_flock",
    "try_lock",
    "unlock",
]

UNSUPPORTED = (
    "this operating system has no POSIX file locks (fcntl.flock), which the audit log needs so "
    "that processes sharing a data directory never fork its hash chain: run the platform "
    "(spell serve, spell worker) on Linux or macOS"
)

try:
    import fcntl as _fcntl
except ImportError:  # Windows
    HAVE_FLOCK = False
    LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8

    def flock(fd: int, operation: int, /) -> None:
        """Grant shared locks and unlocks (no writer can exist); refuse exclusive ones."""
        if operation & LOCK_EX:
            raise AppError("UNAVAILABLE", UNSUPPORTED)

else:
    HAVE_FLOCK = True
    LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = (
        _fcntl.LOCK_SH,
        _fcntl.LOCK_EX,
        _fcntl.LOCK_NB,
        _fcntl.LOCK_UN,
    )
    flock = _fcntl.flock


def try_lock(path: Path) -> int | None:
    """An exclusive lock on ``path`` (created 0600, its folder 0700), as an open fd to pass to
    :func:`unlock`, or None if another process holds it. Never blocks, so it is called on the
    event loop: a thread cannot be left holding the lock after its caller was cancelled."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        flock(fd, LOCK_EX | LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:  # e.g. UNAVAILABLE: no file locks on this OS
        os.close(fd)
        raise
    return fd


def unlock(fd: int) -> None:
    try:
        flock(fd, LOCK_UN)
    finally:
        os.close(fd)


def require_flock() -> None:
    """Raise ``UNAVAILABLE`` unless this OS has ``fcntl.flock`` (call before writing)."""
    if not HAVE_FLOCK:
        raise AppError("UNAVAILABLE", UNSUPPORTED)
