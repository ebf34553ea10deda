"""The network allow-list: a host-side CONNECT proxy per run, reached through a Unix socket.

A sandbox has its own, empty network namespace (``bwrap --unshare-all``): only ``lo``, no
route, no DNS. A spell that declares ``execution.network.allow: ["api.example.com:443", ...]``
reaches exactly those ``host:port`` pairs, and only this way:

::

    spell ──TCP──▶ 127.0.0.1:3128 (bridge, in the sandbox's own netns)
          ──AF_UNIX──▶ /run/spell/proxy.sock (bind mount of a host folder)
          ──▶ NetProxy (host, asyncio) ──TCP──▶ vetted address of an allowed host

* **The socket.** Every sandbox, cold or warm, with or without network, binds one host folder
  read-only at ``/run/spell`` (:data:`SANDBOX_NET_DIR`), so both paths have the same mounts.
  For a run with an allow-list the host creates ``proxy.sock`` in that folder (a warm sandbox
  was spawned before its run was known: the socket appears in the already bound folder when the
  run is assigned) and serves it with a :class:`NetProxy` for the run's lifetime. The socket is
  owned by the sandbox uid, mode 0600. A run without an allow-list gets an empty folder: nothing
  to connect to.
* **The bridge.** HTTP clients take a proxy URL (``HTTPS_PROXY``), not a Unix socket, so the
  launcher (:mod:`app.runner.launcher`; it also starts cold runs that have an allow-list)
  listens on ``127.0.0.1:3128`` in the sandbox's own ``lo`` *before* the spell's code starts and
  relays every accepted connection, byte for byte, to ``/run/spell/proxy.sock``. The bridge
  is not a security boundary: it runs as the spell's uid and the spell may connect to the Unix
  socket itself (``SPELL_PROXY_SOCKET``) or kill the bridge (and lose its network). Every rule
  is enforced here, on the host side of the socket.
* **The rules** (:meth:`NetProxy._handle`): only ``CONNECT host:port`` (any other method: 405;
  plain ``http://`` through the proxy is therefore refused, HTTPS tunnels only), only for an
  exact, case-insensitive match of the run's allow-list (else 403); the proxy resolves the name
  itself and refuses (403) if **any** address is not public
  (:func:`app.domain.spells.address_refusal`: private, loopback, link-local, multicast,
  reserved, unspecified, CGNAT, cloud metadata, IPv4 embedded in IPv6 ...); it then connects to
  a vetted address, never resolving again (no DNS rebinding). A byte budget (both directions,
  all tunnels of the run: ``SPELL_PROXY_MAX_BYTES``) and the run's time limit close every tunnel
  when passed. Refusals are logged with the target host only, never payloads. DNS from inside
  the sandbox still fails: there is no resolver, and name resolution is the proxy's job.

**Sockets and seccomp.** Two seccomp filters (:func:`app.runner.sandbox.seccomp_program`),
chosen per run:

* **no-network** (the default: every run without an allow-list): ``socket()`` only for
  ``AF_UNIX``; ``AF_INET``/``AF_INET6`` answer ``EPERM`` (a refusal by policy, like the other
  denied syscalls), so such a spell cannot even open a TCP or UDP socket, on its own loopback
  or anywhere else.
* **proxy** (runs with an allow-list): ``AF_UNIX``, ``AF_INET`` and ``AF_INET6``. The bridge
  listens on ``127.0.0.1`` and HTTP clients must open a TCP socket to it. That is no way out:
  each sandbox has its own network namespace whose only interface is its own ``lo`` (no route,
  no address beyond loopback), with no capability to add one (``CAP_NET_ADMIN``/
  ``CAP_NET_RAW`` are dropped, netlink is filtered), so a TCP or UDP socket reaches nothing
  but sockets of the same sandbox; ``connect()`` to any other address fails with
  ``ENETUNREACH``. Abstract Unix sockets are per network namespace, too. The only path to the
  outside is the Unix socket above, i.e. this proxy.

In both, ``socketpair()`` is ``AF_UNIX`` only, and ``AF_NETLINK``, ``AF_PACKET``,
``AF_VSOCK`` (not network-namespaced: it reaches the hypervisor), Bluetooth, ``AF_ALG`` and
the rest answer ``EAFNOSUPPORT``. A warm sandbox's filter is installed at spawn, before its run
is known, so the filter is part of its :class:`~app.runner.pool.WarmProfile`: the no-network
flavour serves only runs without an allow-list, the proxy flavour only runs with one
(:func:`app.runner.sandbox.warm_profile_of`); a run with none ready starts cold with its own
filter. Apart from the filter and the proxy variables, both flavours are built alike (same
mounts, ``/run/spell`` included).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from app.domain.spells import (
    address_refusal,
    canonical_network_target,
    format_network_target,
    parse_network_target,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "PROXY_ENV_NAMES",
    "PROXY_PORT",
    "SANDBOX_NET_DIR",
    "SANDBOX_PROXY_SOCKET",
    "SOCKET_NAME",
    "NetProxy",
    "NetworkAccess",
    "ProxyFactory",
    "Resolver",
    "proxy_env",
    "system_resolver",
]

log = logging.getLogger("spell.sandbox.netproxy")

#: Where the host folder holding the proxy socket is bound in every sandbox.
SANDBOX_NET_DIR = "/run/spell"
SOCKET_NAME = "proxy.sock"
SANDBOX_PROXY_SOCKET = f"{SANDBOX_NET_DIR}/{SOCKET_NAME}"
#: The bridge's port on the sandbox's own loopback interface.
PROXY_PORT = 3128
#: Default byte budget of one run (both directions, all tunnels): ``SPELL_PROXY_MAX_BYTES``.
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
#: Tunnels one run may hold open at once.
MAX_TUNNELS = 32
#: Connections to the socket one run may hold at once (tunnels and requests still being read):
#: each costs the host process a file descriptor, so a spell cannot exhaust the server's.
MAX_CONNECTIONS = 64
#: Refusals logged per run; the rest are only counted (a spell cannot flood the log).
MAX_LOGGED_REFUSALS = 20
#: Largest request head (request line + headers) a client may send.
MAX_HEAD_BYTES = 8192
#: Seconds a client has to send its request head; for name resolution; to connect upstream.
HEAD_TIMEOUT_SEC = 10.0
RESOLVE_TIMEOUT_SEC = 10.0
CONNECT_TIMEOUT_SEC = 10.0
_CHUNK = 65536
_PHRASES = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
#: The variables a run with an allow-list sees (see :func:`proxy_env`).
PROXY_ENV_NAMES = frozenset(
    {
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "SPELL_PROXY_SOCKET",
    }
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port)`` → the host's addresses (as text), in the order to try them."""


def proxy_env() -> dict[str, str]:
    """The environment that points a spell's HTTP clients at the in-sandbox bridge (its own
    loopback excepted: a spell talking to a helper it started itself needs no proxy)."""
    url = f"http://127.0.0.1:{PROXY_PORT}"
    local = "localhost,127.0.0.1,::1"
    return {
        "HTTPS_PROXY": url,
        "https_proxy": url,
        "HTTP_PROXY": url,
        "http_proxy": url,
        "NO_PROXY": local,
        "no_proxy": local,
        "SPELL_PROXY_SOCKET": SANDBOX_PROXY_SOCKET,
    }


@dataclass(frozen=True)
class NetworkAccess:
    """What one run may reach: exact ``host:port`` entries (see
    :func:`app.domain.spells.parse_network_target`) and a byte budget."""

    allow: tuple[str, ...]
    max_bytes: int = DEFAULT_MAX_BYTES
    targets: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.allow:
            raise ValueError("network access needs at least one host:port")
        if self.max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        # ValueError on a bad entry
        keys = frozenset(canonical_network_target(entry) for entry in self.allow)
        object.__setattr__(self, "targets", keys)

    def allows(self, host: str, port: int) -> bool:
        return format_network_target(host, port) in self.targets


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver (the proxy runs on the host)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    out: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        addr = str(sockaddr[0])
        if addr not in out:
            out.append(addr)
    return out


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _printable(text: str, limit: int = 200) -> str:
    """Spell-controlled text made safe for one log line."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[:limit] + "…"


class NetProxy:
    """One run's CONNECT proxy on a Unix socket (see the module docstring).

    ``resolver`` replaces the system resolver (tests map names to addresses with it).
    ``unsafe_allow_loopback_for_tests`` lets tunnels reach loopback addresses, so tests can
    point an allowed name at a local server; it exists only as this constructor argument, never
    as a setting. Every other non-public address is refused regardless.
    """

    def __init__(
        self,
        access: NetworkAccess,
        *,
        max_seconds: float,
        label: str = "",
        resolver: Resolver | None = None,
        unsafe_allow_loopback_for_tests: bool = False,
    ) -> None:
        if not max_seconds > 0:
            raise ValueError("max_seconds must be > 0")
        self.access = access
        self.max_seconds = max_seconds
        self.label = label
        self._resolver = resolver or system_resolver
        self._allow_loopback = unsafe_allow_loopback_for_tests
        self._server: asyncio.Server | None = None
        self._path: Path | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tunnels = 0
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False
        self._closed = False
        self.bytes_used = 0
        #: counters: ``tunnels`` opened, ``refused`` requests
        self.stats: dict[str, int] = {"tunnels": 0, "refused": 0}

    @property
    def exhausted(self) -> bool:
        return self.bytes_used >= self.access.max_bytes

    @property
    def path(self) -> Path | None:
        """The Unix socket, while serving."""
        return self._path

    async def start(self, net_dir: Path, owner: int | None) -> Path:
        """Serve ``net_dir/proxy.sock``; ``owner`` (the sandbox uid, when the runner is root)
        gets the socket (mode 0600), else it stays ours. Returns the socket's path."""
        path = net_dir / SOCKET_NAME
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dir_fd = os.open(net_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # through the folder's fd: a deep warm_dir may be longer than sun_path allows
            sock.bind(f"/proc/self/fd/{dir_fd}/{SOCKET_NAME}")
            st = os.stat(SOCKET_NAME, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{path} is not the socket just bound")
            if owner is not None:
                os.chown(SOCKET_NAME, owner, owner, dir_fd=dir_fd, follow_symlinks=False)
            os.chmod(f"/proc/self/fd/{dir_fd}/{SOCKET_NAME}", 0o600)
            sock.listen(64)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(
                self._handle, sock=sock, limit=MAX_HEAD_BYTES
            )
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(SOCKET_NAME, dir_fd=dir_fd)
            raise
        finally:
            os.close(dir_fd)
        self._path = path
        self._timer = asyncio.get_running_loop().call_later(self.max_seconds, self._expire)
        return path

    async def aclose(self) -> None:
        """Stop serving, close every tunnel, remove the socket."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.close()
        self._close_all()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*list(self._handlers), return_exceptions=True)
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._path = None

    # -- internals ----------------------------------------------------------------------------

    def _expire(self) -> None:
        self._expired = True
        log.warning(
            "network proxy for %s: time limit (%.0f s) reached", self.label, self.max_seconds
        )
        self._close_all()

    def _close_all(self) -> None:
        for writer in list(self._writers):
            writer.close()

    def _refuse(self, host: str, reason: str) -> None:
        self.stats["refused"] += 1
        n = self.stats["refused"]
        if n > MAX_LOGGED_REFUSALS:
            return
        log.warning(
            "network proxy refused %s for %s: %s%s",
            _printable(host),
            self.label or "a run",
            reason,
            " (further refusals of this run are counted, not logged)"
            if n == MAX_LOGGED_REFUSALS
            else "",
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._handlers) >= MAX_CONNECTIONS or self._closed:
            self._refuse("?", f"more than {MAX_CONNECTIONS} connections at once")
            writer.close()
            return
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                up_reader, upstream = await self._open_tunnel(reader)
            except _Refused as exc:
                await self._respond(writer, exc.status, exc.reason)
                return
            self._writers.add(upstream)
            self.stats["tunnels"] += 1
            self._tunnels += 1
            try:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                # bytes the client sent after the head are still in ``reader``: pumped on
                await asyncio.gather(self._pump(reader, upstream), self._pump(up_reader, writer))
            finally:
                self._tunnels -= 1
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            if task is not None:
                self._handlers.discard(task)

    async def _open_tunnel(
        self, reader: asyncio.StreamReader
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Read and check the request; the upstream connection to a vetted address."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_SEC)
        except asyncio.LimitOverrunError:
            self._refuse("?", "request head too large")
            raise _Refused(431, "request head too large") from None
        except (TimeoutError, asyncio.IncompleteReadError):
            raise ConnectionError("no request") from None
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._refuse("?", "malformed request line")
            raise _Refused(400, "malformed request line")
        method, target, _ = parts
        if method != "CONNECT":
            host = urlsplit(target).hostname or "?"
            self._refuse(host, f"method {_printable(method, 20)} (only CONNECT is allowed)")
            raise _Refused(
                405,
                "the spell proxy only tunnels HTTPS (CONNECT host:port); plain HTTP is not allowed",
            )
        try:
            host, port = parse_network_target(target)
        except ValueError as exc:
            self._refuse(target, f"not host:port ({exc})")
            raise _Refused(400, f"CONNECT needs host:port: {exc}") from None
        shown = format_network_target(host, port)
        if not self.access.allows(host, port):
            self._refuse(shown, "not on the allow-list")
            raise _Refused(403, f"{shown} is not on this spell's network allow-list")
        if self._closed or self._expired:
            self._refuse(shown, "the run's network time is over")
            raise _Refused(403, "the run's network time is over")
        if self.exhausted:
            self._refuse(shown, "the run's byte budget is used up")
            raise _Refused(403, "the run's network byte budget is used up")
        if self._tunnels >= MAX_TUNNELS:
            self._refuse(shown, f"more than {MAX_TUNNELS} open tunnels")
            raise _Refused(503, f"at most {MAX_TUNNELS} tunnels may be open at once")
        addresses = await self._vetted(host, port, shown)
        return await self._connect(addresses, port, shown)

    async def _vetted(self, host: str, port: int, shown: str) -> list[Address]:
        """Every address of ``host``, all of them public; else refused."""
        try:
            literal: Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            texts = [host]
        else:
            try:
                texts = await asyncio.wait_for(self._resolver(host, port), RESOLVE_TIMEOUT_SEC)
            except (OSError, TimeoutError, UnicodeError) as exc:
                self._refuse(shown, f"name resolution failed ({type(exc).__name__})")
                raise _Refused(502, f"{host} could not be resolved") from None
        addresses: list[Address] = []
        for text in texts:
            try:
                addresses.append(ipaddress.ip_address(text.split("%", 1)[0]))
            except ValueError:
                self._refuse(shown, "the resolver returned something that is not an address")
                raise _Refused(502, f"{host} could not be resolved") from None
        if not addresses:
            self._refuse(shown, "no address")
            raise _Refused(502, f"{host} has no address")
        for ip in addresses:
            why = address_refusal(ip, allow_loopback=self._allow_loopback)
            if why is not None:
                # the address is not shown to the spell: no oracle for internal names
                self._refuse(shown, f"resolves to {why}")
                raise _Refused(403, f"{host} resolves to a non-public address")
        return addresses

    async def _connect(
        self, addresses: Iterable[Address], port: int, shown: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the first vetted address that answers (never resolving again)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_TIMEOUT_SEC
        last = "no address"
        for ip in addresses:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(
                    loop.sock_connect(sock, (ip.compressed, port)),
                    max(0.1, deadline - loop.time()),
                )
                return await asyncio.open_connection(sock=sock, limit=_CHUNK)
            except (OSError, TimeoutError) as exc:
                sock.close()
                last = type(exc).__name__
                if loop.time() >= deadline:
                    break
        self._refuse(shown, f"upstream connection failed ({last})")
        raise _Refused(502, f"{shown} could not be reached")

    def _count(self, n: int) -> bool:
        """Charge ``n`` bytes to the budget; False (and every tunnel closed) once it is over."""
        self.bytes_used += n
        if self.bytes_used > self.access.max_bytes:
            log.warning(
                "network proxy for %s: byte budget (%d) used up, closing its tunnels",
                self.label or "a run",
                self.access.max_bytes,
            )
            self._close_all()
            return False
        return True

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(_CHUNK):
                if not self._count(len(data)):
                    return
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except (ConnectionError, OSError):
            dst.close()

    async def _respond(self, writer: asyncio.StreamWriter, status: int, reason: str) -> None:
        body = f"spell proxy: {reason}\n".encode()
        head = [
            f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if status == 405:
            head.append("Allow: CONNECT")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(writer.drain(), 5.0)


class ProxyFactory(Protocol):
    """How a sandbox makes the proxy of one run (:class:`NetProxy`, or a test's variant)."""

    def __call__(self, access: NetworkAccess, *, max_seconds: float, label: str) -> NetProxy: ...
