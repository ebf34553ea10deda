"""Spell bundles (deterministic tar.gz of a spell folder) and run output packaging (zip).

A bundle is content-addressed: ``sha256:<hex>`` of the tar.gz bytes. It may hold only regular
files and folders with relative, ``..``-free names, and must have ``spell.json`` at the top.
Stored as ``<bundles_dir>/<hex>.tar.gz``, extracted once to ``<bundles_dir>/<hex>/`` with
world-readable modes, so the sandbox uid can read it (it also needs search permission on every
folder above ``bundles_dir``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from app.runner.fstree import MAX_OUTPUT_DEPTH, remove_tree, walk_folder

__all__ = [
    "BundleError",
    "bundle_digest",
    "extract_bundle",
    "pack_dir",
    "read_spell_json",
    "store_bundle",
    "zip_output",
]

SPELL_JSON = "spell.json"
#: Folder names never packed.
SKIPPED_NAMES = frozenset({".git", "__pycache__"})
#: Most entries (files + folders) a bundle may have.
MAX_MEMBERS = 10_000
#: Largest ``spell.json`` read.
MAX_SPELL_JSON_BYTES = 1024 * 1024
#: Unpacked-size cap for :func:`read_spell_json`, which is not told the bundle limit.
DEFAULT_MAX_UNPACKED = 256 * 1024 * 1024
#: Unpacked-size cap relative to the compressed limit.
UNPACKED_RATIO = 10

_HEX_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_CHUNK = 1024 * 1024


class BundleError(ValueError):
    """The bundle (or folder to pack) is not acceptable; the message says why."""


def bundle_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Packing


def pack_dir(path: Path) -> bytes:
    """A deterministic tar.gz of the spell folder ``path``.

    Sorted entries, mtime 0, uid/gid 0 and no owner names, modes normalised to 0755/0644, gzip
    header without name or time; ``.git`` and ``__pycache__`` are skipped. A symlink to a file
    inside the folder is stored as a regular file; any other symlink (leaving the folder, or to
    a folder) and any special file raises :class:`BundleError`.
    """
    root = path.resolve(strict=True)
    if not root.is_dir():
        raise BundleError(f"{path} is not a folder")
    if not (root / SPELL_JSON).is_file():
        raise BundleError(f"{path} has no {SPELL_JSON} at the top level")
    buf = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for rel, source in _walk_for_pack(root, root, ""):
            info = tarfile.TarInfo(rel)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if source is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            st = source.stat()
            info.mode = 0o755 if st.st_mode & 0o111 else 0o644
            info.size = st.st_size
            with source.open("rb") as fh:
                tar.addfile(info, fh)
    return buf.getvalue()


def _walk_for_pack(root: Path, folder: Path, prefix: str) -> Iterator[tuple[str, Path | None]]:
    """Yield ``(name, file)`` in sorted order; ``file`` is None for a folder."""
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name in SKIPPED_NAMES:
            continue
        rel = f"{prefix}{entry.name}"
        if entry.is_symlink():
            target = entry.resolve()
            if not target.is_relative_to(root) or not target.is_file():
                raise BundleError(f"symlink {rel} points outside the spell folder or to a folder")
            yield rel, target
        elif entry.is_dir():
            yield rel, None
            yield from _walk_for_pack(root, entry, f"{rel}/")
        elif entry.is_file():
            yield rel, entry
        else:
            raise BundleError(f"{rel} is not a regular file or folder")


# --------------------------------------------------------------------------------------------
# Validation


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _CappedReader(io.RawIOBase):
    """Reads from ``inner`` but raises :class:`BundleError` past ``cap`` bytes (gzip bombs)."""

    def __init__(self, inner: _Readable, cap: int) -> None:
        self._inner = inner
        self._left = cap

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._inner.read(len(view))
        if len(data) > self._left:
            raise BundleError("bundle unpacks to more than the allowed size")
        self._left -= len(data)
        view[: len(data)] = data
        return len(data)


def _clean_name(name: str) -> str:
    """The member name without leading ``./``, or BundleError if it could escape."""
    if name.startswith("/"):
        raise BundleError(f"absolute path in bundle: {name!r}")
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    parts = name.split("/")
    if ".." in parts:
        raise BundleError(f"'..' in bundle path: {name!r}")
    if name and any(part in ("", ".") for part in parts):
        raise BundleError(f"malformed bundle path: {name!r}")
    return name


def _scan(data: bytes, *, max_unpacked: int) -> bytes:
    """Validate a bundle in one streaming pass; return the bytes of its ``spell.json``."""
    if not data.startswith(b"\x1f\x8b"):
        raise BundleError("bundle is not gzip data")
    stream_cap = max_unpacked + 2048 * (MAX_MEMBERS + 2) + 64 * 1024
    files: set[str] = set()
    names: set[str] = set()
    unpacked = 0
    spell_json: bytes | None = None
    try:
        raw = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
        stream = io.BufferedReader(_CappedReader(raw, stream_cap))
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = _clean_name(member.name)
                if not (member.isreg() or member.isdir()) or member.issparse():
                    raise BundleError(
                        f"{member.name!r}: only regular files and folders are allowed "
                        "(no links, devices, FIFOs or sparse files)"
                    )
                if not name:
                    continue  # the "./" entry itself
                if name in names:
                    raise BundleError(f"duplicate bundle path: {name!r}")
                names.add(name)
                if len(names) > MAX_MEMBERS:
                    raise BundleError(f"bundle has more than {MAX_MEMBERS} entries")
                if member.isreg():
                    files.add(name)
                    unpacked += member.size
                    if unpacked > max_unpacked:
                        raise BundleError("bundle unpacks to more than the allowed size")
                    if name == SPELL_JSON:
                        if member.size > MAX_SPELL_JSON_BYTES:
                            raise BundleError(f"{SPELL_JSON} is larger than 1 MiB")
                        fh = tar.extractfile(member)
                        assert fh is not None
                        spell_json = fh.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BundleError(f"bundle is not a valid tar.gz: {exc}") from exc
    for name in names:
        parent = name.rpartition("/")[0]
        while parent:
            if parent in files:
                raise BundleError(f"bundle path {name!r} is inside the file {parent!r}")
            parent = parent.rpartition("/")[0]
    if spell_json is None:
        raise BundleError(f"bundle has no {SPELL_JSON} file at the top level")
    return spell_json


def read_spell_json(data: bytes) -> dict[str, Any]:
    """The parsed ``spell.json`` of a bundle (which is fully validated on the way)."""
    raw = _scan(data, max_unpacked=DEFAULT_MAX_UNPACKED)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{SPELL_JSON} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BundleError(f"{SPELL_JSON} must hold a JSON object")
    return doc


# --------------------------------------------------------------------------------------------
# Storage


def _atomic_write(dest: Path, write: Callable[[IO[bytes]], object]) -> None:
    """``write(fileobj)`` into a temp file next to ``dest``, fsync, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def store_bundle(data: bytes, bundles_dir: Path, *, max_bytes: int) -> str:
    """Validate ``data`` and store it as ``bundles_dir/<hex>.tar.gz``; return its digest.

    Rejects (with :class:`BundleError`) data over ``max_bytes``, anything that is not a tar.gz,
    members other than regular files and folders, absolute or ``..`` paths, and archives that
    unpack to more than ``10 * max_bytes``. Storing the same bytes twice is a no-op.
    """
    if len(data) > max_bytes:
        raise BundleError(f"bundle is {len(data)} bytes; the limit is {max_bytes}")
    _scan(data, max_unpacked=UNPACKED_RATIO * max_bytes)
    digest = bundle_digest(data)
    bundles_dir.mkdir(parents=True, exist_ok=True)
    dest = bundles_dir / f"{_hex(digest)}.tar.gz"
    if not dest.is_file():
        _atomic_write(dest, lambda fh: fh.write(data))
    return digest


def _hex(digest: str) -> str:
    match = _HEX_DIGEST.fullmatch(digest)
    if match is None:
        raise BundleError(f"not a bundle digest: {digest!r}")
    return match.group(1)


def _strict_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    if not (member.isreg() or member.isdir()):
        raise BundleError(f"{member.name!r}: only regular files and folders are allowed")
    return tarfile.data_filter(member, dest)


def extract_bundle(digest: str, bundles_dir: Path) -> Path:
    """Extract the stored bundle once to ``bundles_dir/<hex>/`` and return that folder.

    Verifies the stored bytes against the digest, extracts with tarfile's ``data`` filter into
    a temp folder, makes everything world-readable (folders 0755, files 0644 or 0755), then
    renames it into place. Concurrent callers race on the rename; the loser discards its copy.
    """
    hexdigest = _hex(digest)
    final = bundles_dir / hexdigest
    if final.is_dir():
        return final
    archive = bundles_dir / f"{hexdigest}.tar.gz"
    try:
        data = archive.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle {digest} is not stored in {bundles_dir}") from None
    if bundle_digest(data) != digest:
        raise BundleError(f"stored bundle {archive} does not match its digest")
    tmp = Path(tempfile.mkdtemp(prefix=f".{hexdigest}.", suffix=".tmp", dir=bundles_dir))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            # Validated by store_bundle; the data filter re-checks every path and mode.
            tar.extractall(tmp, filter=_strict_filter)  # noqa: S202
        _make_world_readable(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if final.is_dir():  # another extractor won the race
                return final
            raise
    finally:
        if tmp.exists():
            remove_tree(tmp)
    return final


def _make_world_readable(top: Path) -> None:
    top.chmod(0o755)
    for folder, dirnames, filenames in os.walk(top):
        for name in dirnames:
            # World-readable on purpose: the sandbox uid must read the bundle.
            os.chmod(os.path.join(folder, name), 0o755, follow_symlinks=False)  # noqa: S103
        for name in filenames:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, 0o755 if mode & 0o111 else 0o644)


# --------------------------------------------------------------------------------------------
# Output packaging


def zip_output(out_dir: Path, dest_dir: Path) -> tuple[str, int, Path]:
    """Zip the regular files under ``out_dir`` into ``dest_dir/<hex>.zip``.

    Deterministic: sorted, relative names, fixed timestamps, modes 0644/0755. Symlinks and
    special files are skipped and never followed (the folder was writable by the spell), and
    folders are walked by file descriptor so a swapped-in symlink cannot redirect the walk.
    Returns ``("sha256:<hex>", size_bytes, path)``. Not fsynced: the zip is a staging file that
    the artifact store copies or uploads (durability is the store's business).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".output.", suffix=".zip.tmp", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                top = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    _zip_folder(zf, top)
                finally:
                    os.close(top)
            fh.flush()
            fh.seek(0)
            hasher = hashlib.sha256()
            while chunk := fh.read(_CHUNK):
                hasher.update(chunk)
            size = fh.tell()
        tmp.chmod(0o644)
        dest = dest_dir / f"{hasher.hexdigest()}.zip"
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return f"sha256:{hasher.hexdigest()}", size, dest


def _zip_folder(zf: zipfile.ZipFile, top_fd: int) -> None:
    """Every regular file below ``top_fd``, by directory fd and without recursion; a tree
    deeper than :data:`~app.runner.fstree.MAX_OUTPUT_DEPTH` raises ``TreeTooDeep``."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    for dir_fd, name, st, parents in walk_folder(top_fd, max_depth=MAX_OUTPUT_DEPTH):
        if stat.S_ISREG(st.st_mode):
            arcname = "/".join(
                os.fsencode(part).decode("utf-8", errors="replace") for part in (*parents, name)
            )
            _zip_file(zf, os.open(name, flags, dir_fd=dir_fd), arcname)


def _zip_file(zf: zipfile.ZipFile, fd: int, arcname: str) -> None:
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            return
        info = zipfile.ZipInfo(arcname, date_time=_ZIP_EPOCH)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.create_system = 3  # Unix, so external_attr carries the mode
        info.external_attr = (stat.S_IFREG | (0o755 if st.st_mode & 0o111 else 0o644)) << 16
        info.file_size = st.st_size
        with zf.open(info, "w", force_zip64=st.st_size >= zipfile.ZIP64_LIMIT) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
