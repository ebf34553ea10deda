"""Spell bundles: deterministic packing, strict validation, atomic storage, output zips."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from app.runner.bundle import (
    BundleError,
    bundle_digest,
    extract_bundle,
    pack_dir,
    read_spell_json,
    store_bundle,
    zip_output,
)

MAX = 1024 * 1024
SPELL = {"name": "hello", "version": "1.0.0", "entrypoint": "main.py"}


@pytest.fixture
def spell_dir(tmp_path: Path) -> Path:
    root = tmp_path / "spell"
    (root / "lib").mkdir(parents=True)
    (root / "spell.json").write_text(json.dumps(SPELL))
    (root / "main.py").write_text("print('hello')\n")
    (root / "lib" / "helper.py").write_text("X = 1\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o750)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\0junk")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


def names_in(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getnames()


def make_tar(*members: tuple[tarfile.TarInfo, bytes | None], spell_json: bool = True) -> bytes:
    """A tar.gz built by hand, for archives pack_dir would never produce."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if spell_json:
            info = tarfile.TarInfo("spell.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
        for info, content in members:
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return buf.getvalue()


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, content: bytes = b"", **attrs: object
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    if kind == tarfile.REGTYPE:
        info.size = len(content)
        return info, content
    return info, None


# --------------------------------------------------------------------------------------------
# pack_dir


def test_pack_is_deterministic_across_copies_and_mtimes(spell_dir: Path, tmp_path: Path) -> None:
    first = pack_dir(spell_dir)
    assert pack_dir(spell_dir) == first
    os.utime(spell_dir / "main.py", (1_000_000, 1_000_000))
    (spell_dir / "main.py").chmod(0o600)
    assert bundle_digest(pack_dir(spell_dir)) == bundle_digest(first)


def test_pack_skips_git_and_pycache_and_normalises_metadata(spell_dir: Path) -> None:
    data = pack_dir(spell_dir)
    assert names_in(data) == ["lib", "lib/helper.py", "main.py", "run.sh", "spell.json"]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (
                0,
                0,
                0,
                "",
                "",
            )
        modes = {m.name: m.mode for m in tar.getmembers()}
    assert modes == {
        "lib": 0o755,
        "lib/helper.py": 0o644,
        "main.py": 0o644,
        "run.sh": 0o755,
        "spell.json": 0o644,
    }
    assert gzip.decompress(data)  # plain gzip, header without name or time
    assert data[4:8] == b"\0\0\0\0"


def test_pack_requires_spell_json(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("")
    with pytest.raises(BundleError, match=r"no spell\.json"):
        pack_dir(tmp_path)


def test_pack_rejects_a_symlink_leaving_the_folder(spell_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret")
    (spell_dir / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(BundleError, match="symlink leak points outside"):
        pack_dir(spell_dir)


def test_pack_stores_a_symlink_inside_the_folder_as_a_file(spell_dir: Path) -> None:
    (spell_dir / "alias.py").symlink_to("main.py")
    data = pack_dir(spell_dir)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        alias = tar.getmember("alias.py")
        assert alias.isreg()
        fh = tar.extractfile(alias)
        assert fh is not None and fh.read() == b"print('hello')\n"


# --------------------------------------------------------------------------------------------
# store / extract / read


def test_store_extract_round_trip(spell_dir: Path, tmp_path: Path) -> None:
    data = pack_dir(spell_dir)
    bundles = tmp_path / "bundles"
    digest = store_bundle(data, bundles, max_bytes=MAX)

    hexdigest = hashlib.sha256(data).hexdigest()
    assert digest == f"sha256:{hexdigest}" == bundle_digest(data)
    assert (bundles / f"{hexdigest}.tar.gz").read_bytes() == data
    assert store_bundle(data, bundles, max_bytes=MAX) == digest  # idempotent

    folder = extract_bundle(digest, bundles)
    assert folder == bundles / hexdigest
    assert (folder / "main.py").read_text() == "print('hello')\n"
    assert (folder / "lib" / "helper.py").read_text() == "X = 1\n"
    assert json.loads((folder / "spell.json").read_text()) == SPELL
    assert not (folder / ".git").exists()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "lib").stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "main.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((folder / "run.sh").stat().st_mode) == 0o755
    assert extract_bundle(digest, bundles) == folder  # idempotent
    assert sorted(p.name for p in bundles.iterdir()) == [hexdigest, f"{hexdigest}.tar.gz"]


def test_concurrent_extractions_agree_and_leave_no_temp_folders(
    spell_dir: Path, tmp_path: Path
) -> None:
    bundles = tmp_path / "bundles"
    digest = store_bundle(pack_dir(spell_dir), bundles, max_bytes=MAX)
    results: list[Path] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        try:
            results.append(extract_bundle(digest, bundles))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1
    assert len(list(bundles.iterdir())) == 2


def test_extract_refuses_a_tampered_or_unknown_bundle(spell_dir: Path, tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    digest = store_bundle(pack_dir(spell_dir), bundles, max_bytes=MAX)
    archive = bundles / f"{digest.removeprefix('sha256:')}.tar.gz"
    archive.write_bytes(pack_dir(spell_dir) + b"\0")
    with pytest.raises(BundleError, match="does not match its digest"):
        extract_bundle(digest, bundles)
    with pytest.raises(BundleError, match="is not stored"):
        extract_bundle("sha256:" + "0" * 64, bundles)
    with pytest.raises(BundleError, match="not a bundle digest"):
        extract_bundle("sha256:../../etc", bundles)


def test_read_spell_json(spell_dir: Path) -> None:
    assert read_spell_json(pack_dir(spell_dir)) == SPELL


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"{nope", "not valid JSON", id="invalid-json"),
        pytest.param(b"[1, 2]", "must hold a JSON object", id="not-an-object"),
    ],
)
def test_read_spell_json_rejects_bad_documents(content: bytes, message: str) -> None:
    data = make_tar(entry("spell.json", content=content), spell_json=False)
    with pytest.raises(BundleError, match=message):
        read_spell_json(data)


def _bomb() -> bytes:
    # 11 MiB of zeros compresses to ~11 KiB: over 10x a 1 MiB limit once unpacked.
    return make_tar(entry("zeros", content=b"\0" * (11 * MAX)))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        pytest.param(
            lambda: make_tar(entry("link", tarfile.SYMTYPE, linkname="/etc/passwd")),
            "only regular files and folders",
            id="symlink",
        ),
        pytest.param(
            lambda: make_tar(entry("hard", tarfile.LNKTYPE, linkname="spell.json")),
            "only regular files and folders",
            id="hardlink",
        ),
        pytest.param(
            lambda: make_tar(entry("null", tarfile.CHRTYPE, devmajor=1, devminor=3)),
            "only regular files and folders",
            id="device",
        ),
        pytest.param(
            lambda: make_tar(entry("fifo", tarfile.FIFOTYPE)),
            "only regular files and folders",
            id="fifo",
        ),
        pytest.param(
            lambda: make_tar(entry("../escape.py", content=b"x")),
            "'..' in bundle path",
            id="dotdot",
        ),
        pytest.param(
            lambda: make_tar(entry("lib/../../escape.py", content=b"x")),
            "'..' in bundle path",
            id="nested-dotdot",
        ),
        pytest.param(
            lambda: make_tar(entry("/etc/cron.d/x", content=b"x")), "absolute path", id="absolute"
        ),
        pytest.param(
            lambda: make_tar(entry("spell.json", content=b"{}")), "duplicate", id="duplicate"
        ),
        pytest.param(
            lambda: make_tar(entry("a", content=b"x"), entry("a/b", content=b"y")),
            "inside the file",
            id="file-as-folder",
        ),
        pytest.param(
            lambda: make_tar(entry("main.py", content=b"x"), spell_json=False),
            "no spell.json",
            id="missing-spell-json",
        ),
        pytest.param(lambda: b"definitely not a bundle", "not gzip", id="garbage"),
        pytest.param(
            lambda: gzip.compress(b"gzip but not a tar" * 100), "not a valid tar.gz", id="not-tar"
        ),
        pytest.param(lambda: pack_dir_bytes_truncated(), "not a valid tar.gz", id="truncated"),
        pytest.param(lambda: os.urandom(2 * MAX), "the limit is", id="oversize"),
        pytest.param(_bomb, "unpacks to more than", id="unpacked-bomb"),
    ],
)
def test_store_rejects_unsafe_or_invalid_bundles(
    tmp_path: Path, build: Callable[[], bytes], message: str
) -> None:
    bundles = tmp_path / "bundles"
    with pytest.raises(BundleError, match=message):
        store_bundle(build(), bundles, max_bytes=MAX)
    assert not bundles.exists() or list(bundles.iterdir()) == []


def pack_dir_bytes_truncated() -> bytes:
    data = make_tar(entry("main.py", content=os.urandom(50_000)))
    return data[: len(data) // 2]


def test_store_accepts_a_leading_dot_slash(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in [("./spell.json", b'{"name": "x"}'), ("./main.py", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    digest = store_bundle(buf.getvalue(), tmp_path, max_bytes=MAX)
    folder = extract_bundle(digest, tmp_path)
    assert (folder / "spell.json").read_text() == '{"name": "x"}'
    assert read_spell_json(buf.getvalue()) == {"name": "x"}


# --------------------------------------------------------------------------------------------
# zip_output


def fill_output(folder: Path, mtime: int) -> None:
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "b.txt").write_text("bee")
    (folder / "a.txt").write_text("ay")
    (folder / "sub" / "deeper" / "c.json").write_text('{"c": 3}')
    (folder / "sub" / "tool").write_text("#!/bin/sh\n")
    (folder / "sub" / "tool").chmod(0o700)
    for path in folder.rglob("*"):
        os.utime(path, (mtime, mtime))


def test_zip_output_is_deterministic_and_skips_links(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    fill_output(one, 1_000_000)
    fill_output(two, 2_000_000)
    (two / "link").symlink_to("/etc/passwd")
    (two / "sub" / "dirlink").symlink_to("/etc")
    os.mkfifo(two / "pipe")

    digest_one, size_one, path_one = zip_output(one, tmp_path / "zips")
    digest_two, size_two, path_two = zip_output(two, tmp_path / "zips")

    assert digest_one == digest_two
    assert size_one == size_two == path_one.stat().st_size
    assert path_one == path_two == tmp_path / "zips" / f"{digest_one.removeprefix('sha256:')}.zip"
    assert digest_one == "sha256:" + hashlib.sha256(path_one.read_bytes()).hexdigest()
    with zipfile.ZipFile(path_one) as zf:
        assert zf.namelist() == ["a.txt", "b.txt", "sub/deeper/c.json", "sub/tool"]
        assert zf.read("sub/deeper/c.json") == b'{"c": 3}'
        assert stat.S_IMODE(zf.getinfo("sub/tool").external_attr >> 16) == 0o755
        assert stat.S_IMODE(zf.getinfo("a.txt").external_attr >> 16) == 0o644
    assert [p.name for p in (tmp_path / "zips").iterdir()] == [path_one.name]


def test_zip_output_of_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    digest, size, path = zip_output(tmp_path / "out", tmp_path / "zips")
    assert digest.startswith("sha256:")
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == []
    assert size == path.stat().st_size
