"""The network allow-list, for real: bubblewrap sandboxes (cold and warm), the in-sandbox bridge
and the host-side CONNECT proxy, against local servers.

Names are mapped to addresses by a resolver injected into the proxy; reaching a local server
needs the proxy's test-only loopback allowance, which no setting can turn on. Skipped when bwrap
is not installed, unless SPELL_REQUIRE_SERVICES=1 (CI), where it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import socket
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.runner.bundle import pack_dir
from app.runner.netproxy import NetProxy, NetworkAccess
from app.runner.pool import WarmPool
from app.runner.sandbox import (
    BwrapSandbox,
    SandboxResult,
    SandboxSpec,
    SandboxUnavailable,
    warm_profile_of,
)
from app.web.app import Overrides
from tests.conftest import Harness

pytestmark = pytest.mark.e2e

if shutil.which("bwrap") is None:
    if os.environ.get("SPELL_REQUIRE_SERVICES") == "1":
        pytest.fail("bwrap is required (SPELL_REQUIRE_SERVICES=1) but not installed", pytrace=False)
    pytest.skip("bubblewrap (bwrap) is not installed", allow_module_level=True)

PYTHON = "/usr/bin/python3"
ALLOWED = "api.spell-test.example"
BODY = b"hello through the proxy"


class Proxies:
    """The sandbox's proxy factory: a fake resolver, the loopback allowance on or off, and a
    record of every proxy made (one per run)."""

    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {}
        self.allow_loopback = True
        self.made: list[NetProxy] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        if host in self.names:
            return list(self.names[host])
        raise socket.gaierror(socket.EAI_NONAME, "unknown test name")

    def __call__(self, access: NetworkAccess, *, max_seconds: float, label: str) -> NetProxy:
        proxy = NetProxy(
            access,
            max_seconds=max_seconds,
            label=label,
            resolver=self.resolve,
            unsafe_allow_loopback_for_tests=self.allow_loopback,
        )
        self.made.append(proxy)
        return proxy


class WarmOnly:
    """Every run must go through a pre-spawned sandbox (the pool's hit counter proves it)."""

    def __init__(self, inner: BwrapSandbox) -> None:
        self.inner = inner

    @property
    def pool(self) -> WarmPool:
        assert self.inner.pool is not None, "the warm pool did not start"
        return self.inner.pool

    async def run(self, spec: SandboxSpec) -> SandboxResult:
        assert await self.pool.prewarm(warm_profile_of(spec)), "no warm sandbox got ready"
        hits = self.pool.stats["hits"]
        result = await self.inner.run(spec)
        assert self.pool.stats["hits"] == hits + 1, "the run did not use a warm sandbox"
        return result


async def _probed(sb: BwrapSandbox) -> BwrapSandbox:
    try:
        await sb.probe()
    except SandboxUnavailable as exc:
        if os.environ.get("SPELL_REQUIRE_SERVICES") == "1":
            pytest.fail(f"sandbox probe failed: {exc}")
        pytest.skip(f"bwrap cannot create namespaces here: {exc}")
    return sb


@pytest.fixture
def proxies() -> Proxies:
    return Proxies()


@pytest.fixture(params=["cold", "warm"])
async def sandbox(
    request: pytest.FixtureRequest, proxies: Proxies
) -> AsyncIterator[BwrapSandbox | WarmOnly]:
    """Every test runs twice: a cold spawn, and a pre-spawned (warm) sandbox."""
    if request.param == "cold":
        yield await _probed(BwrapSandbox(proxy_factory=proxies))
        return
    inner = await _probed(BwrapSandbox(warm=1, proxy_factory=proxies))
    try:
        yield WarmOnly(inner)
    finally:
        await inner.aclose()


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bundle = root / "bundle"
        self.input = root / "input.json"
        self.n = 0

    def spec(self, code: str, *, allow: list[str] | None = None, **overrides: Any) -> SandboxSpec:
        self.n += 1
        (self.bundle / "main.py").write_text(textwrap.dedent(code), encoding="utf-8")
        (self.bundle / "main.py").chmod(0o644)
        kwargs: dict[str, Any] = {
            "bundle_dir": self.bundle,
            "argv": [PYTHON, "-I", "-S", "/spell/main.py"],
            "input_path": self.input,
            "out_dir": self.root / f"out{self.n}",
            "timeout_sec": 20.0,
            "memory_mb": 256,
            "max_output_bytes": 1024 * 1024,
            "env": {"SPELL_CAST_ID": "c_net"},
            "network": NetworkAccess(allow=tuple(allow)) if allow else None,
        }
        kwargs.update(overrides)
        return SandboxSpec(**kwargs)


@pytest.fixture
def ws() -> Iterator[Workspace]:
    # Not tmp_path: /tmp/pytest-of-root is 0700, so uid 65534 could not reach it.
    root = Path(tempfile.mkdtemp(prefix="spell-netproxy-test-"))
    root.chmod(0o755)
    (root / "bundle").mkdir()
    (root / "bundle").chmod(0o755)
    (root / "input.json").write_text("{}", encoding="utf-8")
    (root / "input.json").chmod(0o644)
    yield Workspace(root)
    shutil.rmtree(root, ignore_errors=True)


class Upstream:
    """A local HTTP server (on the host, 127.0.0.1): what the allowed name points at."""

    def __init__(self, body: bytes = BODY) -> None:
        self.body = body
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % len(self.body)
                + self.body
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def report(result: SandboxResult) -> dict[str, Any]:
    """The JSON document a probing spell printed as its last stdout line."""
    assert result.outcome == "ok", result
    return dict(json.loads(result.stdout_tail.strip().splitlines()[-1]))


#: A spell that tunnels to each (host, port) of TARGETS through the bridge (http.client's
#: CONNECT tunnel, what HTTPS clients do) and reports the status, or the error, per target.
TUNNEL = """
    import http.client, json, os
    out = {"env": {k: os.environ.get(k) for k in
                   ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                    "NO_PROXY", "no_proxy", "SPELL_PROXY_SOCKET")}}
    for host, port in TARGETS:
        c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=10)
        c.set_tunnel(host, port)
        try:
            c.request("GET", "/data")
            r = c.getresponse()
            out[f"{host}:{port}"] = [r.status, r.read().decode()]
        except OSError as exc:
            out[f"{host}:{port}"] = [type(exc).__name__, str(exc)]
        finally:
            c.close()
    print(json.dumps(out))
"""


def tunnel_code(targets: list[tuple[str, int]]) -> str:
    return f"TARGETS = {targets!r}\n" + textwrap.dedent(TUNNEL)


# --------------------------------------------------------------------------------------------
# no allow-list: no network, not even through the proxy path


async def test_without_an_allow_list_there_is_no_network_at_all(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, proxies: Proxies
) -> None:
    async with Upstream() as up:
        proxies.names[ALLOWED] = ["127.0.0.1"]
        spec = ws.spec(
            f"""
            import json, os, socket
            out = {{"env": [k for k in os.environ if "proxy" in k.lower()],
                    "run_spell": os.path.isdir("/run/spell")}}
            for name, addr in [("bridge", ("127.0.0.1", 3128)),
                               ("host_server", ("127.0.0.1", {up.port})),
                               ("internet", ("1.1.1.1", 443))]:
                try:  # the no-network seccomp filter refuses socket(AF_INET) itself
                    socket.create_connection(addr, timeout=3)
                    out[name] = "connected"
                except OSError as exc:
                    out[name] = type(exc).__name__
            u = socket.socket(socket.AF_UNIX)
            try:
                u.connect("/run/spell/proxy.sock")
                out["unix"] = "connected"
            except OSError as exc:
                out["unix"] = type(exc).__name__
            print(json.dumps(out))
            """
        )
        seen = report(await sandbox.run(spec))
    assert seen["env"] == []
    assert seen["run_spell"] is True  # the same mounts as a run with network
    assert seen["bridge"] == "PermissionError"  # EPERM: no AF_INET socket at all
    assert seen["host_server"] == "PermissionError"
    assert seen["internet"] == "PermissionError"
    assert seen["unix"] == "FileNotFoundError"
    assert proxies.made == []
    assert up.requests == []


# --------------------------------------------------------------------------------------------
# an allow-list: those hosts, through the proxy, and nothing else


async def test_an_allowed_host_is_reached_through_the_proxy(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, proxies: Proxies
) -> None:
    async with Upstream() as up:
        proxies.names[ALLOWED] = ["127.0.0.1"]
        spec = ws.spec(tunnel_code([(ALLOWED, up.port)]), allow=[f"{ALLOWED}:{up.port}"])
        seen = report(await sandbox.run(spec))
    assert seen[f"{ALLOWED}:{up.port}"] == [200, BODY.decode()]
    assert seen["env"] == {
        "HTTPS_PROXY": "http://127.0.0.1:3128",
        "https_proxy": "http://127.0.0.1:3128",
        "HTTP_PROXY": "http://127.0.0.1:3128",
        "http_proxy": "http://127.0.0.1:3128",
        "NO_PROXY": "localhost,127.0.0.1,::1",
        "no_proxy": "localhost,127.0.0.1,::1",
        "SPELL_PROXY_SOCKET": "/run/spell/proxy.sock",
    }
    assert len(up.requests) == 1
    assert up.requests[0].startswith(b"GET /data HTTP/1.1\r\n")
    (proxy,) = proxies.made
    assert proxy.stats == {"tunnels": 1, "refused": 0}
    assert proxy.bytes_used > len(BODY)
    assert proxy.path is None  # closed with the run, socket removed


def _self_signed(name: str, folder: Path) -> tuple[Path, Path]:
    """A certificate for ``name`` (its own CA) and its key, as PEM files in ``folder``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "ca.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https_clients_use_the_proxy_from_the_environment(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, proxies: Proxies, tmp_path: Path
) -> None:
    """urllib and curl, unchanged, tunnel real TLS through the bridge and the proxy."""
    import ssl

    cert, key = _self_signed(ALLOWED, tmp_path)
    shutil.copy(cert, ws.bundle / "ca.pem")
    (ws.bundle / "ca.pem").chmod(0o644)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    up = Upstream()
    server = await asyncio.start_server(up._handle, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    proxies.names[ALLOWED] = ["127.0.0.1"]
    try:
        spec = ws.spec(
            f"""
            import json, os, ssl, subprocess, urllib.request, urllib.error
            url = "https://{ALLOWED}:{port}/data"
            ctx = ssl.create_default_context(cafile="/spell/ca.pem")
            out = {{"urllib": urllib.request.urlopen(url, context=ctx, timeout=10).read().decode()}}
            out["curl"] = None  # curl, where installed: it reads https_proxy by itself
            if os.path.exists("/usr/bin/curl"):
                curl = subprocess.run(["/usr/bin/curl", "-sS", "--cacert", "/spell/ca.pem", url],
                                      capture_output=True, text=True, timeout=20)
                out["curl"] = [curl.returncode, curl.stdout, curl.stderr[-200:]]
            try:
                urllib.request.urlopen("http://{ALLOWED}:{port}/plain", timeout=10)
                out["plain"] = "fetched"
            except urllib.error.HTTPError as exc:
                out["plain"] = exc.code
            print(json.dumps(out))
            """,
            allow=[f"{ALLOWED}:{port}"],
        )
        seen = report(await sandbox.run(spec))
    finally:
        server.close()
    assert seen["urllib"] == BODY.decode()
    if os.path.exists("/usr/bin/curl"):
        assert seen["curl"][:2] == [0, BODY.decode()], seen["curl"]
    assert seen["plain"] == 405
    assert len(up.requests) == 1 + (seen["curl"] is not None)


async def test_the_unix_socket_is_the_proxy_itself(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, proxies: Proxies
) -> None:
    """Going around the bridge changes nothing: the rules live on the host side."""
    async with Upstream() as up:
        proxies.names[ALLOWED] = ["127.0.0.1"]
        spec = ws.spec(
            f"""
            import json, os, socket
            def ask(target, rest=b""):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(10)
                s.connect(os.environ["SPELL_PROXY_SOCKET"])
                s.sendall(b"CONNECT " + target + b" HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" + rest)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                return data.decode(errors="replace")
            print(json.dumps({{
                "allowed": ask(b"{ALLOWED}:{up.port}", b"GET / HTTP/1.0\\r\\n\\r\\n"),
                "other": ask(b"example.org:443"),
            }}))
            """,
            allow=[f"{ALLOWED}:{up.port}"],
        )
        seen = report(await sandbox.run(spec))
    assert seen["allowed"].startswith("HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK")
    assert seen["allowed"].endswith(BODY.decode())
    assert seen["other"].startswith("HTTP/1.1 403 ")
    assert len(up.requests) == 1


async def test_hosts_ports_and_methods_off_the_list_are_refused(
    sandbox: BwrapSandbox | WarmOnly,
    ws: Workspace,
    proxies: Proxies,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Upstream() as up, Upstream() as other:
        proxies.names[ALLOWED] = ["127.0.0.1"]
        proxies.names["other.spell-test.example"] = ["127.0.0.1"]
        targets = [
            ("other.spell-test.example", up.port),  # another name, same server
            (ALLOWED, other.port),  # the allowed name, another port
            (ALLOWED.upper(), up.port),  # host names match case-insensitively
        ]
        code = tunnel_code(targets) + textwrap.dedent(
            """
            import http.client
            c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=10)
            c.request("GET", "http://%s:%d/secret?token=do-not-log" % TARGETS[2])
            r = c.getresponse()
            print(json.dumps({"plain_http": [r.status, r.getheader("Allow")]}))
            """
        )
        caplog.set_level(logging.WARNING, logger="spell.sandbox.netproxy")
        result = await sandbox.run(ws.spec(code, allow=[f"{ALLOWED}:{up.port}"]))
        assert result.outcome == "ok", result
        lines = result.stdout_tail.strip().splitlines()
        seen = json.loads(lines[-2])
        plain = json.loads(lines[-1])
    assert seen[f"other.spell-test.example:{up.port}"][0] == "OSError"
    assert "403" in seen[f"other.spell-test.example:{up.port}"][1]
    assert "403" in seen[f"{ALLOWED}:{other.port}"][1]
    assert seen[f"{ALLOWED.upper()}:{up.port}"] == [200, BODY.decode()]
    assert plain["plain_http"] == [405, "CONNECT"]
    assert len(up.requests) == 1 and other.requests == []
    (proxy,) = proxies.made
    assert proxy.stats == {"tunnels": 1, "refused": 3}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"other.spell-test.example:{up.port}" in logged
    assert "not on the allow-list" in logged
    assert "do-not-log" not in logged and "/secret" not in logged
    assert "c_net" in logged  # which run


@pytest.mark.parametrize(
    "addresses",
    [
        pytest.param(["127.0.0.1"], id="loopback"),
        pytest.param(["10.1.2.3"], id="private"),
        pytest.param(["169.254.169.254"], id="metadata"),
        pytest.param(["fd00:ec2::254"], id="metadata-v6"),
        pytest.param(["100.64.0.1"], id="cgnat"),
        pytest.param(["93.184.215.14", "192.168.1.1"], id="one-of-several"),
        pytest.param(["::ffff:127.0.0.1"], id="mapped-loopback"),
    ],
)
async def test_an_allowed_name_resolving_to_a_non_public_address_is_refused(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, proxies: Proxies, addresses: list[str]
) -> None:
    async with Upstream() as up:
        proxies.allow_loopback = False  # what production does
        proxies.names[ALLOWED] = addresses
        spec = ws.spec(tunnel_code([(ALLOWED, up.port)]), allow=[f"{ALLOWED}:{up.port}"])
        seen = report(await sandbox.run(spec))
    status = seen[f"{ALLOWED}:{up.port}"]
    assert status[0] == "OSError" and "403" in status[1], status
    assert up.requests == []
    (proxy,) = proxies.made
    assert proxy.stats == {"tunnels": 0, "refused": 1}


async def test_connecting_to_an_address_directly_bypasses_nothing(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, proxies: Proxies
) -> None:
    """A run WITH network still cannot reach anything except through the proxy."""
    async with Upstream() as up:
        proxies.names[ALLOWED] = ["127.0.0.1"]
        spec = ws.spec(
            f"""
            import json, socket
            out = {{}}
            for name, family, addr in [
                ("host_server", socket.AF_INET, ("127.0.0.1", {up.port})),
                ("public_v4", socket.AF_INET, ("1.1.1.1", 443)),
                ("public_v6", socket.AF_INET6, ("2606:4700:4700::1111", 443)),
                ("metadata", socket.AF_INET, ("169.254.169.254", 80)),
            ]:
                s = socket.socket(family)
                s.settimeout(3)
                try:
                    s.connect(addr)
                    out[name] = "connected"
                except OSError as exc:
                    out[name] = type(exc).__name__
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                u.sendto(b"x", ("8.8.8.8", 53))
                out["udp"] = "sent"
            except OSError as exc:
                out["udp"] = type(exc).__name__
            print(json.dumps(out))
            """,
            allow=[f"{ALLOWED}:{up.port}"],
        )
        seen = report(await sandbox.run(spec))
    assert seen["host_server"] == "ConnectionRefusedError"
    assert seen["public_v4"] == "OSError"  # ENETUNREACH: only lo exists
    assert seen["public_v6"] == "OSError"
    assert seen["metadata"] == "OSError"
    assert seen["udp"] == "OSError"
    assert up.requests == []


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64"), reason="no seccomp filter for this ABI"
)
@pytest.mark.parametrize("flavour", ["no-network", "allow-list"])
async def test_socket_families_depend_on_the_allow_list(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, flavour: str
) -> None:
    """With an allow-list (the proxy filter) AF_INET/AF_INET6 sockets can be created (they
    reach only the sandbox's own lo); without one (the no-network filter) they answer EPERM.
    Every other family is refused by seccomp in both; raw sockets never get through."""
    allow = [f"{ALLOWED}:443"] if flavour == "allow-list" else None
    spec = ws.spec(
        """
        import errno, json, socket
        out = {}
        cases = {"unix": (1, socket.SOCK_STREAM, 0), "inet": (2, socket.SOCK_STREAM, 0),
                 "inet6": (10, socket.SOCK_STREAM, 0), "inet_udp": (2, socket.SOCK_DGRAM, 0),
                 "netlink": (16, socket.SOCK_RAW, 0),
                 "packet": (17, socket.SOCK_RAW, 0), "vsock": (40, socket.SOCK_STREAM, 0),
                 "alg": (38, socket.SOCK_SEQPACKET, 0), "bluetooth": (31, socket.SOCK_STREAM, 0),
                 "raw_inet": (2, socket.SOCK_RAW, 1)}
        for name, args in cases.items():
            try:
                socket.socket(*args).close()
                out[name] = "created"
            except OSError as exc:
                out[name] = errno.errorcode[exc.errno]
        for name, family in (("pair_unix", 1), ("pair_inet", 2)):
            try:
                a, b = socket.socketpair(family)
                a.close(); b.close()
                out[name] = "created"
            except OSError as exc:
                out[name] = errno.errorcode[exc.errno]
        print(json.dumps(out))
        """,
        allow=allow,
    )
    seen = report(await sandbox.run(spec))
    inet = "created" if allow else "EPERM"
    assert seen["unix"] == "created"
    assert seen["inet"] == seen["inet6"] == seen["inet_udp"] == inet, seen
    for family in ("netlink", "packet", "vsock", "alg", "bluetooth"):
        assert seen[family] == "EAFNOSUPPORT", (family, seen)
    assert seen["raw_inet"] == "EPERM"  # seccomp, or (allow-list) no CAP_NET_RAW
    assert seen["pair_unix"] == "created"
    assert seen["pair_inet"] == "EAFNOSUPPORT"


async def test_dns_inside_the_sandbox_fails_even_for_an_allowed_name(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, proxies: Proxies
) -> None:
    proxies.names[ALLOWED] = ["127.0.0.1"]
    spec = ws.spec(
        f"""
        import json, socket
        out = {{}}
        for name in ("{ALLOWED}", "example.com"):
            try:
                out[name] = [a[4][0] for a in socket.getaddrinfo(name, 443)]
            except OSError as exc:
                out[name] = type(exc).__name__
        print(json.dumps(out))
        """,
        allow=[f"{ALLOWED}:443"],
    )
    seen = report(await sandbox.run(spec))
    assert seen[ALLOWED] == "gaierror"
    assert seen["example.com"] == "gaierror"


async def test_the_byte_budget_closes_the_tunnels(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, proxies: Proxies
) -> None:
    big = b"x" * (2 * 1024 * 1024)
    async with Upstream(big) as up:
        proxies.names[ALLOWED] = ["127.0.0.1"]
        spec = ws.spec(
            f"""
            import http.client, json
            c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=10)
            c.set_tunnel("{ALLOWED}", {up.port})
            c.request("GET", "/big")
            r = c.getresponse()
            got = 0
            try:
                while chunk := r.read(65536):
                    got += len(chunk)
                outcome = "complete" if got == {len(big)} else "cut"  # EOF before the end
            except http.client.IncompleteRead as exc:
                got += len(exc.partial)
                outcome = "cut"
            except OSError as exc:
                outcome = type(exc).__name__
            c2 = http.client.HTTPConnection("127.0.0.1", 3128, timeout=10)
            c2.set_tunnel("{ALLOWED}", {up.port})
            try:
                c2.request("GET", "/again")
                again = "allowed"
            except OSError as exc:
                again = str(exc)
            print(json.dumps({{"got": got, "outcome": outcome, "again": again}}))
            """,
            allow=[f"{ALLOWED}:{up.port}"],
            network=NetworkAccess(allow=(f"{ALLOWED}:{up.port}",), max_bytes=256 * 1024),
        )
        seen = report(await sandbox.run(spec))
    assert seen["got"] < 256 * 1024
    assert seen["outcome"] == "cut"
    assert "403" in seen["again"]
    (proxy,) = proxies.made
    assert proxy.exhausted


async def test_the_proxy_and_its_socket_are_gone_after_the_run(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, proxies: Proxies
) -> None:
    proxies.names[ALLOWED] = ["127.0.0.1"]
    spec = ws.spec(
        """
        import json, os, stat
        st = os.stat(os.environ["SPELL_PROXY_SOCKET"])
        print(json.dumps({"mode": stat.S_IMODE(st.st_mode), "sock": stat.S_ISSOCK(st.st_mode),
                          "uid": st.st_uid, "me": os.getuid()}))
        """,
        allow=[f"{ALLOWED}:443"],
    )
    seen = report(await sandbox.run(spec))
    assert seen["sock"] is True
    assert seen["mode"] == 0o600
    assert seen["uid"] == seen["me"]  # the sandbox uid's alone
    (proxy,) = proxies.made
    assert proxy.path is None
    assert not [p for p in Path(tempfile.gettempdir()).glob(f"spell-net-{os.getpid()}-*")]


IDENTITY = """
    import json, os, socket, sys
    st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
    mounts = []
    for line in open("/proc/self/mountinfo"):
        left, _, right = line.partition(" - ")
        f = left.split()
        mounts.append([f[4], f[5], *right.split()[:1]])
    print(json.dumps({
        "ids": [os.getuid(), os.geteuid(), os.getgid()],
        "caps": st["CapEff"].strip(), "seccomp": st["Seccomp"].strip(),
        "limits": open("/proc/self/limits").read().splitlines(),
        "mounts": sorted(mounts), "env": dict(os.environ),
        "fds": sorted(os.listdir("/proc/self/fd")), "stdin": os.readlink("/proc/self/fd/0"),
        "argv": sys.argv, "orig_argv": sys.orig_argv, "cwd": os.getcwd(),
        "inet": socket.socket(socket.AF_INET).close() is None,
    }))
"""


async def test_a_warm_network_run_sees_exactly_what_a_cold_one_sees(
    ws: Workspace, proxies: Proxies
) -> None:
    cold = await _probed(BwrapSandbox(proxy_factory=proxies))
    warm = WarmOnly(await _probed(BwrapSandbox(warm=1, proxy_factory=proxies)))
    try:
        allow = [f"{ALLOWED}:443"]
        seen_cold = report(await cold.run(ws.spec(IDENTITY, allow=allow)))
        seen_warm = report(await warm.run(ws.spec(IDENTITY, allow=allow)))
    finally:
        await warm.inner.aclose()
    assert seen_warm == seen_cold
    (run_spell,) = [m for m in seen_cold["mounts"] if m[0] == "/run/spell"]
    assert run_spell[1].split(",")[0] == "ro"  # read-only: the spell cannot plant a socket
    assert seen_cold["seccomp"] == "2" and seen_cold["caps"] == "0000000000000000"
    assert seen_cold["stdin"] == "/dev/null"
    assert seen_cold["fds"] == ["0", "1", "2", "3"]  # no bridge socket leaks into the spell
    assert seen_cold["env"]["HTTPS_PROXY"] == "http://127.0.0.1:3128"
    assert seen_cold["inet"] is True  # the proxy filter, cold and warm


def _in_namespace(ns: str) -> set[int]:
    """Live (non-zombie) processes whose PID namespace is ``ns`` (``pid:[inode]``)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.add(int(entry))
    return found


async def test_the_bridge_dies_with_the_sandbox(
    sandbox: BwrapSandbox | WarmOnly, ws: Workspace, proxies: Proxies
) -> None:
    proxies.names[ALLOWED] = ["127.0.0.1"]
    spec = ws.spec(
        """
        import json, os, socket
        s = socket.create_connection(("127.0.0.1", 3128), timeout=5)  # the bridge is up
        s.close()
        print(json.dumps({"ns": os.readlink("/proc/self/ns/pid"),
                          "children": open(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
                                      .read().split()}))
        """,
        allow=[f"{ALLOWED}:443"],
    )
    seen = report(await sandbox.run(spec))
    assert seen["children"] == []  # the bridge is not the spell's child: nothing to wait for
    left = _in_namespace(seen["ns"])
    for _ in range(250):  # the namespace's init was killed; its processes go with it
        if not left:
            break
        await asyncio.sleep(0.02)
        left = _in_namespace(seen["ns"])
    assert left == set()


# --------------------------------------------------------------------------------------------
# the host side alone (a client on the Unix socket, no sandbox)


async def _ask(path: Path, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


@pytest.fixture
def net_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="spell-netproxy-host-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_the_proxy_refuses_malformed_and_oversized_requests(net_dir: Path) -> None:
    proxy = NetProxy(NetworkAccess(allow=("api.example.com:443",)), max_seconds=30)
    path = await proxy.start(net_dir, None)
    try:
        assert (await _ask(path, b"HELLO\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await _ask(path, b"CONNECT api.example.com HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 400 "
        )
        huge = b"CONNECT api.example.com:443 HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
        assert (await _ask(path, huge)).startswith(b"HTTP/1.1 431 ")
        assert (await _ask(path, b"DELETE / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
    finally:
        await proxy.aclose()
    assert not path.exists()


async def test_the_proxy_connects_to_the_vetted_address_without_resolving_again(
    net_dir: Path,
) -> None:
    """DNS rebinding: the second answer would be private, but the name is resolved once."""
    answers = [["127.0.0.1"], ["10.0.0.1"]]
    calls: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), 2) - 1]

    async with Upstream() as up:
        proxy = NetProxy(
            NetworkAccess(allow=(f"{ALLOWED}:{up.port}",)),
            max_seconds=30,
            resolver=resolver,
            unsafe_allow_loopback_for_tests=True,
        )
        path = await proxy.start(net_dir, None)
        try:
            data = await _ask(
                path,
                f"CONNECT {ALLOWED}:{up.port} HTTP/1.1\r\n\r\nGET / HTTP/1.0\r\n\r\n".encode(),
            )
        finally:
            await proxy.aclose()
    assert data.endswith(BODY)
    assert calls == [ALLOWED]
    assert len(up.requests) == 1


async def test_the_time_limit_closes_open_tunnels(net_dir: Path) -> None:
    """A tunnel still open when the run's time is over is closed by the proxy."""
    opened = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.set()
        await reader.read()  # never answers; returns once the proxy closes the tunnel
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    proxy = NetProxy(
        NetworkAccess(allow=(f"{ALLOWED}:{port}",)),
        max_seconds=0.5,
        resolver=resolver,
        unsafe_allow_loopback_for_tests=True,
    )
    path = await proxy.start(net_dir, None)
    try:
        data = await _ask(path, f"CONNECT {ALLOWED}:{port} HTTP/1.1\r\n\r\n".encode())
        assert data == b"HTTP/1.1 200 Connection established\r\n\r\n"  # then EOF
        assert opened.is_set()
        again = await _ask(path, f"CONNECT {ALLOWED}:{port} HTTP/1.1\r\n\r\n".encode())
        assert again.startswith(b"HTTP/1.1 403 ")
    finally:
        await proxy.aclose()
        server.close()


# --------------------------------------------------------------------------------------------
# through the platform: a published spell's allow-list reaches its run


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"proxy_max_bytes": 5_000_000, "sandbox_warm": 0})


@pytest.fixture
def overrides(proxies: Proxies) -> Overrides:
    return Overrides(sandbox=BwrapSandbox(proxy_factory=proxies))


async def test_a_published_spell_reaches_its_allowed_host_and_nothing_else(
    harness: Harness, proxies: Proxies, tmp_path: Path
) -> None:
    async with Upstream() as up:
        proxies.names[ALLOWED] = ["127.0.0.1"]
        proxies.names["other.spell-test.example"] = ["127.0.0.1"]
        folder = tmp_path / "net"
        folder.mkdir()
        (folder / "main.py").write_text(
            tunnel_code([(ALLOWED, up.port), ("other.spell-test.example", up.port)])
            + "open(os.path.join(os.environ['SPELL_OUT'], 'seen.json'), 'w')"
            ".write(json.dumps(out))\n"
        )
        doc: dict[str, Any] = {
            "id": "com.example.net",
            "name": "net",
            "execution": {
                "mode": "service",
                "entrypoint": "main.py",
                "timeout_sec": 20,
                "network": {"allow": [f"{ALLOWED.upper()}:{up.port}"]},
            },
            "pricing": {"model": "flat", "currency": "USD", "flat_cents": 1},
        }
        (folder / "spell.json").write_text(json.dumps(doc))
        maker = await harness.token("makers", "maker")
        caster = await harness.token("ACME", "caster")
        auth = {"Authorization": f"Bearer {maker}"}
        r = await harness.client.post(
            "/v1/bundles",
            data=pack_dir(folder),
            headers={**auth, "Content-Type": "application/gzip"},
        )
        assert r.status == 201, await r.text()
        doc["execution"]["bundle"] = (await r.json())["digest"]
        r = await harness.client.post("/v1/spells", json=doc, headers=auth)
        assert r.status in (200, 201), await r.text()
        r = await harness.cast(caster, "com.example.net", {"input": {}})
        assert r.status == 202, await r.text()
        done = await harness.wait_cast(caster, (await r.json())["cast_id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert len(up.requests) == 1
    (proxy,) = proxies.made
    assert proxy.access.targets == {f"{ALLOWED}:{up.port}"}
    assert proxy.access.max_bytes == 5_000_000  # SPELL_PROXY_MAX_BYTES
    assert proxy.label == done["cast_id"]
    assert proxy.stats == {"tunnels": 1, "refused": 1}


async def test_publishing_a_bad_allow_list_is_refused_with_the_error_shape(
    harness: Harness,
) -> None:
    maker = await harness.token("makers", "maker")
    doc = {
        "id": "com.example.badnet",
        "name": "badnet",
        "execution": {
            "mode": "service",
            "entrypoint": "main.py",
            "bundle": "sha256:" + "0" * 64,
            "network": {"allow": ["169.254.169.254:80"]},
        },
    }
    r = await harness.client.post(
        "/v1/spells", json=doc, headers={"Authorization": f"Bearer {maker}"}
    )
    body = await r.json()
    assert r.status == 422, body
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert "169.254.169.254" in json.dumps(body)
    assert "Traceback" not in json.dumps(body)


async def test_connections_per_run_are_capped_and_refusal_logs_are_bounded(
    net_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from app.runner.netproxy import MAX_CONNECTIONS, MAX_LOGGED_REFUSALS

    access = NetworkAccess(allow=("api.example.com:443",))
    proxy = NetProxy(access, max_seconds=60, label="c_x")
    path = await proxy.start(net_dir, None)
    idle: list[asyncio.StreamWriter] = []
    try:
        for _ in range(MAX_CONNECTIONS):  # each waits for its request head
            _, w = await asyncio.open_unix_connection(str(path))
            idle.append(w)
        reader, writer = await asyncio.open_unix_connection(str(path))
        with contextlib.suppress(ConnectionResetError):  # closed at once
            assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert proxy.stats["refused"] == 1
    finally:
        for w in idle:
            w.close()
        await proxy.aclose()

    caplog.set_level(logging.WARNING, logger="spell.sandbox.netproxy")
    proxy = NetProxy(access, max_seconds=60, label="c_y")
    path = await proxy.start(net_dir, None)
    try:
        for i in range(MAX_LOGGED_REFUSALS + 5):
            data = await _ask(path, f"CONNECT h{i}.example.com:443 HTTP/1.1\r\n\r\n".encode())
            assert data.startswith(b"HTTP/1.1 403 ")
    finally:
        await proxy.aclose()
    assert proxy.stats["refused"] == MAX_LOGGED_REFUSALS + 5
    refusals = [r for r in caplog.records if "c_y" in r.getMessage()]
    assert len(refusals) == MAX_LOGGED_REFUSALS
    assert "not logged" in refusals[-1].getMessage()
