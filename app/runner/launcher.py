"""The first process of a warm sandbox: waits for one job, then becomes the spell.

The platform does not run this module itself: it runs its source INSIDE a pre-spawned bubblewrap
sandbox, where ``/usr/bin/python3 -I -S -c LAUNCHER_BOOTSTRAP`` (:mod:`app.runner.sandbox`) reads
it from stdin and executes it as ``__main__``. So it may use the standard library only and must
work on the system interpreter.

Protocol (one sandbox, one job, then the sandbox is gone):

1. Import what the job needs, then write :data:`READY` to stdout: interpreter start-up is paid.
2. Read ONE line from stdin: the job, a JSON object ``{"kind", "argv", "env", "rlimits",
   "cwd", "proxy"}``, and answer :data:`JOB_TAKEN` on stdout. End of input without a job (the
   pool is closing) exits 0 without running anything.
3. stdin becomes ``/dev/null`` (as in a cold run), the rlimits are set (soft and hard, so they can
   only go down from the limits the sandbox was spawned with), the environment is replaced by
   ``env`` and the working folder is ``cwd``. When ``proxy`` is ``{"socket", "port"}`` (a run
   with a network allow-list), the network bridge is started: it listens on
   ``127.0.0.1:port`` (the sandbox's own loopback) before the spell's code starts, and relays
   every connection to the Unix socket ``socket``, where the host's proxy enforces the
   allow-list (:mod:`app.runner.netproxy`). The bridge is a grandchild (its parent exits at
   once, so the namespace's init adopts it and the spell has no child to wait for), holds none
   of the output pipes, and dies with the sandbox. Its ``AF_INET`` listener needs the proxy
   seccomp filter: only sandboxes of the proxy flavour get a job with ``proxy``; under the
   no-network filter ``socket(AF_INET)`` answers EPERM and the launcher exits 70.
4. ``kind`` says how ``argv`` runs:

   ``path``  ``[python, -I, -S, script, *args]``: the script runs in this interpreter as
             ``__main__`` with ``sys.argv = [script, *args]``, as ``python3 -I -S script`` would.
   ``code``  ``[python, -I, -S, -c, code, *args]``: the same for ``-c`` with ``sys.argv = ["-c",
             *args]``.
   ``exec``  anything else: ``execvpe(argv[0], argv, env)``, exactly what bwrap does in a cold run.

   ``path`` falls back to ``exec`` for what CPython would not run as plain source (a folder, a
   zip application, a ``.pyc``), so the result is always what a cold start would give.

An uncaught exception prints its traceback without this launcher's frames and exits 1, like the
interpreter does; ``SystemExit`` behaves as usual.

A cold run with a network allow-list is started through this launcher as well (so it gets the
bridge); its bootstrap sets ``SPELL_LAUNCHER_COLD``, and the launcher then writes neither
:data:`READY` nor :data:`JOB_TAKEN` (the host reads nothing from it before the spell's output).
"""

from __future__ import annotations

import json
import os
import sys
import types

TYPE_CHECKING = False
if TYPE_CHECKING:  # no typing import at run time: the launcher starts as lean as it can
    from typing import Any, NoReturn

READY = b"\0spell-launcher-ready\n"
#: Written as soon as the job is read, before anything of it runs: until the host has seen it,
#: the job can still go to another sandbox.
JOB_TAKEN = b"\0spell-launcher-job\n"
MAX_JOB_BYTES = 16 * 1024 * 1024
#: Bytes one bridge connection buffers per direction before it stops reading that side.
BRIDGE_BUFFER = 256 * 1024
#: Seconds the bridge waits for the host's proxy to accept a connection.
BRIDGE_CONNECT_TIMEOUT = 10.0
#: Tail of a file searched for a zip end-of-central-directory record (zip applications).
_ZIP_TAIL = 65536 + 22
#: ``resource`` constants by job name; ``resource`` is imported in :func:`main` (it runs inside
#: the Linux sandbox only), so the host can import this module on any OS (Windows has none).
_RLIMITS = {
    "as": "RLIMIT_AS",
    "cpu": "RLIMIT_CPU",
    "fsize": "RLIMIT_FSIZE",
    "nproc": "RLIMIT_NPROC",
    "nofile": "RLIMIT_NOFILE",
    "core": "RLIMIT_CORE",
}


def _read_job() -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_JOB_BYTES:
            os.write(2, b"spell launcher: job too large\n")
            os._exit(70)
    return bytes(buf)


def _fail_exec(argv0: str, exc: OSError) -> NoReturn:
    os.write(2, f"bwrap: execvp {argv0}: {exc.strerror}\n".encode(errors="replace"))
    os._exit(1)


def _default_signals() -> None:
    """Give an exec'ed program the signal dispositions a cold run's program gets.

    CPython ignores SIGPIPE and SIGXFSZ at start-up and an ignored signal stays ignored across
    exec; a cold run is spawned with them at their defaults (``restore_signals``). Without this,
    a program past ``RLIMIT_FSIZE`` would get EFBIG instead of dying of SIGXFSZ (exit 153).
    """
    import signal

    for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ"):
        signum = getattr(signal, name, None)
        if signum is not None:
            signal.signal(signum, signal.SIG_DFL)


def _exec(argv: list[str], env: dict[str, str]) -> NoReturn:
    _default_signals()
    try:
        os.execvpe(argv[0], argv, env)  # noqa: S606 - what bwrap itself does in a cold run
    except OSError as exc:
        _fail_exec(argv[0], exc)


def _runs_as_source(path: str, data: bytes) -> bool:
    """Whether CPython would run ``path`` as plain source code (not a zip app or a .pyc)."""
    if path.endswith((".pyc", ".pyo")):
        return False
    import _frozen_importlib_external

    magic: bytes = _frozen_importlib_external.MAGIC_NUMBER
    if data[:2] == magic[:2]:
        return False
    return b"PK\x05\x06" not in data[-_ZIP_TAIL:]


def _run_python(argv: list[str], kind: str, env: dict[str, str]) -> None:
    import builtins

    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    if kind == "path":
        path = argv[3]
        try:
            if not os.path.isfile(path):
                _exec(argv, env)  # a folder, a FIFO, a missing file: the interpreter decides
            with open(path, "rb") as fh:
                source: str | bytes = fh.read()
        except OSError:
            _exec(argv, env)
        assert isinstance(source, bytes)
        if not _runs_as_source(path, source):
            _exec(argv, env)
        filename = os.path.abspath(path)  # as CPython makes the script's __file__
        sys.argv = argv[3:]
        main.__dict__.update(__file__=filename, __cached__=None)
    else:
        source, filename = argv[4], "<string>"
        sys.argv = ["-c", *argv[5:]]
    sys.orig_argv = list(argv)
    sys.modules["__main__"] = main
    try:
        code = compile(source, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        sys.excepthook(type(exc), exc.with_traceback(None), None)  # no frame of it ran
        sys.exit(1)
    try:
        exec(code, main.__dict__)  # noqa: S102 - this IS the spell's interpreter
    except SystemExit:
        raise
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code is not code:
            tb = tb.tb_next  # drop this launcher's frames: the spell's own traceback only
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        if isinstance(exc, KeyboardInterrupt):
            import signal

            sys.stdout.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        sys.exit(1)


def _start_bridge(path: str, port: int) -> None:
    """Listen on ``127.0.0.1:port`` now, and relay connections to ``path`` in a grandchild."""
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    pid = os.fork()
    if pid == 0:
        try:
            if os.fork() == 0:
                _bridge(listener, path)
        finally:
            os._exit(0)
    listener.close()
    os.waitpid(pid, 0)


class _Half:
    """One direction of a bridged connection: bytes read from ``src`` wait in ``buf`` for
    ``dst``."""

    __slots__ = ("buf", "dst", "eof", "shut", "src")

    def __init__(self, src: Any, dst: Any) -> None:
        self.src = src
        self.dst = dst
        self.buf = bytearray()
        self.eof = False
        self.shut = False


def _bridge(listener: Any, path: str) -> NoReturn:
    """Relay every connection accepted on ``listener`` to the Unix socket ``path`` (one
    thread, non-blocking, bounded buffers, half-close passed on). Never returns."""
    import contextlib
    import selectors
    import socket

    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # never hold the sandbox's output pipes open
        os.dup2(null, fd)
    os.close(null)
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)
    reading: dict[Any, _Half] = {}  # socket -> the half it is the source of
    writing: dict[Any, _Half] = {}  # socket -> the half it is the destination of
    watched: dict[Any, int] = {}

    def interest(s: Any) -> None:
        if s not in reading:
            return
        ev = 0
        out, inc = reading[s], writing[s]
        if not out.eof and len(out.buf) < BRIDGE_BUFFER:
            ev |= selectors.EVENT_READ
        if inc.buf:
            ev |= selectors.EVENT_WRITE
        old = watched.get(s, 0)
        if ev == old:
            return
        if not ev:
            sel.unregister(s)
            del watched[s]
        elif not old:
            sel.register(s, ev)
            watched[s] = ev
        else:
            sel.modify(s, ev)
            watched[s] = ev

    def drop(s: Any) -> None:
        peer = reading[s].dst
        for x in (s, peer):
            if x in watched:
                sel.unregister(x)
                del watched[x]
            reading.pop(x, None)
            writing.pop(x, None)
            x.close()

    while True:
        for key, mask in sel.select():
            s: Any = key.fileobj
            if s is listener:
                try:
                    client, _ = listener.accept()
                except OSError:
                    continue
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    upstream.settimeout(BRIDGE_CONNECT_TIMEOUT)
                    upstream.connect(path)
                except OSError:
                    client.close()
                    upstream.close()
                    continue
                client.setblocking(False)
                upstream.setblocking(False)
                a, b = _Half(client, upstream), _Half(upstream, client)
                reading[client], writing[upstream] = a, a
                reading[upstream], writing[client] = b, b
                interest(client)
                interest(upstream)
                continue
            if s not in reading:
                continue
            out, inc = reading[s], writing[s]
            try:
                if mask & selectors.EVENT_READ:
                    try:
                        data = s.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    if data:
                        out.buf += data
                    elif data is not None:
                        out.eof = True
                if mask & selectors.EVENT_WRITE and inc.buf:
                    with contextlib.suppress(BlockingIOError, InterruptedError):
                        del inc.buf[: s.send(inc.buf)]
            except OSError:
                drop(s)
                continue
            for half in (out, inc):
                if half.eof and not half.buf and not half.shut:
                    half.shut = True
                    with contextlib.suppress(OSError):
                        half.dst.shutdown(socket.SHUT_WR)
            if out.shut and inc.shut:
                drop(s)
                continue
            peer = out.dst
            interest(s)
            interest(peer)


def main() -> None:
    import resource  # before READY, as a top-level import would be (POSIX only, see _RLIMITS)

    cold = bool(globals().get("SPELL_LAUNCHER_COLD"))
    if not cold:
        os.write(1, READY)
    raw = _read_job()
    if not raw.strip():
        os._exit(0)
    if not cold:
        os.write(1, JOB_TAKEN)
    job: dict[str, Any] = json.loads(raw)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for name, (soft, hard) in job["rlimits"].items():
        resource.setrlimit(getattr(resource, _RLIMITS[name]), (soft, hard))
    os.chdir(job["cwd"])
    env: dict[str, str] = {**job["env"], "PWD": job["cwd"]}  # as bwrap's --chdir sets it
    os.environ.clear()
    os.environ.update(env)
    proxy = job.get("proxy")
    if proxy:
        try:
            _start_bridge(proxy["socket"], int(proxy["port"]))
        except OSError as exc:
            os.write(2, f"spell launcher: the network bridge failed: {exc}\n".encode())
            os._exit(70)
    argv: list[str] = job["argv"]
    kind = job["kind"]
    del raw, job
    if kind == "exec":
        _exec(argv, env)
    _run_python(argv, kind, env)


if __name__ == "__main__":
    main()
