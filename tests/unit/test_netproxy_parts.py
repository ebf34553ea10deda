"""The network allow-list's pure parts: entry parsing, address classification, the spell
document's ``execution.network`` field, the proxy environment and the seccomp socket filter."""

from __future__ import annotations

import errno
import ipaddress
import struct
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.domain.spells import (
    MAX_NETWORK_ALLOW,
    SpellDocument,
    address_refusal,
    canonical_network_target,
    network_target_problem,
    parse_network_target,
)
from app.runner.netproxy import NetworkAccess, proxy_env
from app.runner.pool import WarmProfile
from app.runner.sandbox import (
    SANDBOX_PYTHON,
    SandboxSpec,
    _launcher_input,
    _warm_job,
    seccomp_program,
    warm_profile_of,
)

# --------------------------------------------------------------------------------------------
# host:port entries


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        ("api.example.com:443", ("api.example.com", 443)),
        ("API.Example.COM:443", ("api.example.com", 443)),
        ("api.example.com.:8443", ("api.example.com", 8443)),
        ("xn--bcher-kva.example:443", ("xn--bcher-kva.example", 443)),
        ("a-b.c-d.io:1", ("a-b.c-d.io", 1)),
        ("93.184.215.14:443", ("93.184.215.14", 443)),
        ("[2606:4700:4700:0::1111]:443", ("2606:4700:4700::1111", 443)),
        ("example.com:65535", ("example.com", 65535)),
    ],
)
def test_good_entries_parse_to_a_canonical_host_and_port(
    entry: str, parsed: tuple[str, int]
) -> None:
    assert parse_network_target(entry) == parsed


@pytest.mark.parametrize(
    ("entry", "canonical"),
    [
        ("API.Example.COM:443", "api.example.com:443"),  # case
        ("api.example.com.:8443", "api.example.com:8443"),  # trailing dot
        ("93.184.215.14:443", "93.184.215.14:443"),
        ("[2606:4700:4700:0::1111]:443", "[2606:4700:4700::1111]:443"),  # brackets, compressed
        ("[2606:4700:4700:0:0:0:0:1111]:443", "[2606:4700:4700::1111]:443"),
    ],
)
def test_the_canonical_form_is_the_one_the_spell_and_the_proxy_use(
    entry: str, canonical: str
) -> None:
    assert canonical_network_target(entry) == canonical
    # the spell document stores it, the proxy's allow-list is made of it and shows it
    network = SpellDocument.model_validate(_doc({"allow": [entry, canonical]})).execution.network
    assert network is not None and network.allow == [canonical]
    access = NetworkAccess(allow=(entry,))
    assert access.targets == {canonical}
    assert access.allows(*parse_network_target(canonical))


@pytest.mark.parametrize(
    "entry",
    [
        "api.example.com",  # no port
        "api.example.com:",  # empty port
        ":443",
        "api.example.com:0",
        "api.example.com:65536",
        "api.example.com:+443",
        "api.example.com:44 3",
        "*.example.com:443",  # wildcards
        "api.*.com:443",
        "localhost:443",  # one label, and this machine
        "api.localhost:443",
        "intranet:443",  # one label: search domains would decide
        "user@api.example.com:443",
        "api.example.com/path:443",
        "https://api.example.com:443",
        "-bad.example.com:443",
        "bad-.example.com:443",
        "a..example.com:443",
        "api_x.example.com:443",
        "b\u00fccher.example:443",  # IDNs in their xn-- form only
        ("a" * 64) + ".example.com:443",
        "1.2.3:443",  # all-numeric last label: neither a name nor an address
        "2606:4700::1111:443",  # IPv6 without brackets
        "[api.example.com]:443",
        "[2606:4700::1111]",
        "",
    ],
)
def test_bad_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_network_target(entry)


@pytest.mark.parametrize(
    "entry",
    ["10.0.0.1:443", "127.0.0.1:443", "169.254.169.254:80", "[::1]:443", "[fd00:ec2::254]:80"],
)
def test_ip_literals_must_be_public(entry: str) -> None:
    problem = network_target_problem(entry)
    assert problem is not None and "address" in problem


# --------------------------------------------------------------------------------------------
# address classification


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.0.1",
        "169.254.0.7",  # link-local
        "169.254.169.254",  # metadata
        "169.254.170.2",
        "fd00:ec2::254",
        "100.100.100.200",
        "168.63.129.16",  # Azure WireServer: a public address, refused by name
        "192.0.0.192",  # Oracle metadata
        "100.64.0.1",  # CGNAT
        "100.127.255.254",
        "0.0.0.0",
        "0.1.2.3",
        "::",
        "224.0.0.1",  # multicast (Python calls it global)
        "239.1.2.3",
        "ff02::1",
        "255.255.255.255",
        "240.0.0.1",  # reserved
        "198.18.0.1",  # benchmarking
        "192.0.2.1",  # documentation
        "2001:db8::1",
        "fe80::1",
        "fc00::1",
        "fec0::1",  # site-local
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b::808:808",  # NAT64 of a public address: still refused (reserved prefix)
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address",
    ["93.184.215.14", "1.1.1.1", "8.8.8.8", "2606:4700:4700::1111", "2a00:1450:4001::200e"],
)
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


def test_the_loopback_allowance_lets_only_loopback_through() -> None:
    ok = [ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    for ip in ok:
        assert address_refusal(ip) is not None
        assert address_refusal(ip, allow_loopback=True) is None, ip
    for a in ("10.0.0.1", "169.254.169.254", "fd00:ec2::254", "0.0.0.0", "100.64.0.1"):
        assert address_refusal(ipaddress.ip_address(a), allow_loopback=True) is not None, a


# --------------------------------------------------------------------------------------------
# the spell document


def _doc(network: object) -> dict[str, object]:
    return {
        "id": "com.example.net",
        "name": "Net",
        "execution": {
            "mode": "service",
            "entrypoint": "main.py",
            "bundle": "sha256:" + "0" * 64,
            "network": network,
        },
    }


def test_the_document_keeps_a_canonical_deduplicated_allow_list() -> None:
    doc = SpellDocument.model_validate(
        _doc({"allow": ["API.example.com:443", "api.example.com.:443", "[2606:4700::1]:443"]})
    )
    assert doc.execution.network is not None
    assert doc.execution.network.allow == ["api.example.com:443", "[2606:4700::1]:443"]


def test_a_document_without_network_has_none() -> None:
    doc = SpellDocument.model_validate(_doc({}))
    assert doc.execution.network is not None and doc.execution.network.allow == []
    raw = _doc(None)
    del raw["execution"]["network"]  # type: ignore[attr-defined]
    assert SpellDocument.model_validate(raw).execution.network is None


@pytest.mark.parametrize(
    ("network", "fragment"),
    [
        ({"allow": ["*.example.com:443"]}, "wildcards"),
        ({"allow": ["api.example.com"]}, "host:port"),
        ({"allow": ["10.0.0.1:443"]}, "private"),
        ({"allow": ["169.254.169.254:80"]}, "metadata"),
        ({"allow": ["localhost:80"]}, "localhost"),
        ({"allow": [f"h{i}.example.com:443" for i in range(MAX_NETWORK_ALLOW + 1)]}, "at most"),
        ({"allow": ["api.example.com:443"], "deny": []}, "Extra inputs"),
        ({"allow": "api.example.com:443"}, "list"),
    ],
)
def test_bad_network_fields_are_refused_with_a_reason(network: object, fragment: str) -> None:
    with pytest.raises(ValidationError) as err:
        SpellDocument.model_validate(_doc(network))
    assert fragment in str(err.value)


# --------------------------------------------------------------------------------------------
# what a run is given


def test_network_access_matches_exactly_and_case_insensitively() -> None:
    access = NetworkAccess(allow=("api.example.com:443", "[2606:4700::1]:8443"))
    assert access.allows("api.example.com", 443)
    assert access.allows(*parse_network_target("API.EXAMPLE.COM.:443"))
    assert access.allows("2606:4700::1", 8443)
    assert not access.allows("api.example.com", 80)
    assert not access.allows("example.com", 443)
    assert not access.allows("x.api.example.com", 443)
    with pytest.raises(ValueError):
        NetworkAccess(allow=())
    with pytest.raises(ValueError):
        NetworkAccess(allow=("*.example.com:443",))
    with pytest.raises(ValueError):
        NetworkAccess(allow=("api.example.com:443",), max_bytes=0)


def _spec(network: NetworkAccess | None, env: dict[str, str] | None = None) -> SandboxSpec:
    return SandboxSpec(
        bundle_dir=Path("/nonexistent/bundle"),
        argv=[SANDBOX_PYTHON, "-I", "-S", "main.py"],
        input_path=Path("/nonexistent/input.json"),
        out_dir=Path("/nonexistent/out"),
        timeout_sec=10,
        memory_mb=128,
        max_output_bytes=1000,
        env=env or {},
        network=network,
    )


def test_only_a_run_with_an_allow_list_gets_the_proxy_and_its_variables() -> None:
    none = _warm_job(_spec(None))
    assert none["proxy"] is None
    assert not any("proxy" in k.lower() for k in none["env"])  # type: ignore[union-attr]
    job = _warm_job(_spec(NetworkAccess(allow=("api.example.com:443",))))
    assert job["proxy"] == {"socket": "/run/spell/proxy.sock", "port": 3128}
    env = job["env"]
    assert isinstance(env, dict)
    for name, value in proxy_env().items():
        assert env[name] == value
    assert env["HTTPS_PROXY"] == "http://127.0.0.1:3128"
    assert job["kind"] == "path"  # the proxy variables do not force an exec


def test_a_spell_cannot_set_the_proxy_variables_itself() -> None:
    with pytest.raises(ValueError, match="set by the sandbox"):
        _spec(None, env={"HTTPS_PROXY": "http://evil:1"})


def test_the_cold_launcher_reads_its_source_then_the_job() -> None:
    data = _launcher_input(_spec(NetworkAccess(allow=("api.example.com:443",))))
    n = int(data[:12])
    source, job = data[12 : 12 + n], data[12 + n :]
    assert b"def _start_bridge" in source
    assert job.endswith(b"\n") and job.count(b"\n") == 1
    assert b'"proxy":{"socket":"/run/spell/proxy.sock","port":3128}' in job


# --------------------------------------------------------------------------------------------
# the seccomp socket filter, run through a small classic-BPF interpreter

_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SOCKET = {"x86_64": (41, 53), "aarch64": (198, 199)}
_ERRNO, _ALLOW = 0x00050000, 0x7FFF0000


def _run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == 0x15:  # jeq
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x35:  # jge
            pc += 1 + (jt if acc >= k else jf)
        elif code == 0x06:  # ret
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


_OTHER_FAMILIES = (16, 17, 38, 40, 31, 5, 15, 44)
"""AF_NETLINK, AF_PACKET, AF_ALG, AF_VSOCK, AF_BLUETOOTH, AF_APPLETALK, AF_KEY, AF_XDP"""


def _common_verdicts(program: bytes, machine: str) -> None:
    """What both filters answer alike."""
    arch = _ARCH[machine]
    sock, pair = _SOCKET[machine]
    eafnosupport = _ERRNO | errno.EAFNOSUPPORT
    assert _run_bpf(program, sock, arch, (1, 1, 0)) == _ALLOW  # AF_UNIX
    for family in _OTHER_FAMILIES:
        assert _run_bpf(program, sock, arch, (family, 3, 0)) == eafnosupport, family
    # only the low 32 bits are the int domain; high bits do not sneak a family through
    assert _run_bpf(program, sock, arch, ((1 << 32) | 16, 3, 0)) == eafnosupport
    assert _run_bpf(program, pair, arch, (1, 1, 0)) == _ALLOW
    for family in (2, 10, 16):
        assert _run_bpf(program, pair, arch, (family, 1, 0)) == eafnosupport, family
    # other syscalls keep their verdicts: ptrace EPERM, clone3 ENOSYS, read allowed,
    # foreign ABI killed
    ptrace = 101 if machine == "x86_64" else 117
    assert _run_bpf(program, ptrace, arch) == _ERRNO | errno.EPERM
    assert _run_bpf(program, 435, arch) == _ERRNO | errno.ENOSYS
    assert _run_bpf(program, 0 if machine == "x86_64" else 63, arch) == _ALLOW
    assert _run_bpf(program, sock, 0x40000003) == 0x80000000


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_no_network_filter_allows_only_unix_sockets(machine: str) -> None:
    program = seccomp_program(machine)
    assert program is not None
    assert seccomp_program(machine, network=False) == program  # the default
    arch = _ARCH[machine]
    sock = _SOCKET[machine][0]
    for family in (2, 10):  # AF_INET, AF_INET6: refused by policy, any type
        for sock_type in (1, 2, 3):
            got = _run_bpf(program, sock, arch, (family, sock_type, 0))
            assert got == _ERRNO | errno.EPERM, (family, sock_type)
    # the high bits of the domain do not turn AF_INET into something else either
    assert _run_bpf(program, sock, arch, ((7 << 32) | 2, 1, 0)) == _ERRNO | errno.EPERM
    _common_verdicts(program, machine)


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_proxy_filter_allows_unix_inet_and_inet6_sockets(machine: str) -> None:
    program = seccomp_program(machine, network=True)
    assert program is not None
    assert program != seccomp_program(machine)
    assert len(program) % 8 == 0
    arch = _ARCH[machine]
    sock = _SOCKET[machine][0]
    for family in (1, 2, 10):  # AF_UNIX, AF_INET, AF_INET6
        assert _run_bpf(program, sock, arch, (family, 1, 0)) == _ALLOW
    _common_verdicts(program, machine)


def test_the_warm_flavour_follows_the_allow_list() -> None:
    plain = warm_profile_of(_spec(None))
    proxied = warm_profile_of(_spec(NetworkAccess(allow=("api.example.com:443",))))
    assert plain.network is False and proxied.network is True
    assert plain == WarmProfile(memory_mb=128, max_output_bytes=1000)
    assert proxied != plain  # a no-network run never takes a proxy-flavoured sandbox
