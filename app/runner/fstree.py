"""Walk, measure, copy and delete folders a spell wrote: iteratively, by directory fd.

A spell controls the shape of its output folder. It can nest folders past ``PATH_MAX`` (16
levels of 255-character names, made with relative ``mkdir``/``chdir``), so nothing below it can
be reached by a full host path, or deep enough (thousands of levels) that a recursive walk
raises ``RecursionError``. Every walk here therefore:

* goes by directory file descriptor (``openat``-style ``dir_fd=``), never by full path, and
  opens folders ``O_NOFOLLOW`` (a link the spell planted is never followed);
* keeps an explicit stack instead of recursing, holding one fd per level (bounded by the depth
  limit, or kept small by flattening, see :func:`remove_tree`);
* measuring, zipping and copying refuse a tree deeper than ``max_depth``
  (:data:`MAX_OUTPUT_DEPTH`) with :class:`TreeTooDeep`; deleting handles any depth.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "DIR_FLAGS",
    "MAX_OUTPUT_DEPTH",
    "TreeTooDeep",
    "remove_tree",
    "tree_usage",
    "walk_folder",
]

log = logging.getLogger("spell.sandbox.fstree")

#: Folder levels allowed below a run's output folder (``out/a`` is level 1). Deeper output is
#: ``output_too_large``; zipping and copying refuse it as well.
MAX_OUTPUT_DEPTH = 64
#: Windows has none of the last three (0 there keeps this module importable); it cannot open a
#: folder with ``os.open`` either, so every walk here fails closed with ``OSError`` on Windows.
DIR_FLAGS: int = (
    os.O_RDONLY
    | getattr(os, "O_DIRECTORY", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
#: Levels :func:`remove_tree` descends before it moves a folder up to the top (fewer fds).
_FLATTEN_DEPTH = 64


class TreeTooDeep(OSError):
    """A folder tree nests deeper than the walk allows."""

    def __init__(self, max_depth: int) -> None:
        super().__init__(f"folders nest deeper than {max_depth} levels")
        self.max_depth = max_depth


def tree_usage(
    top: str | Path, *, max_entries: int, max_depth: int = MAX_OUTPUT_DEPTH, strict: bool = True
) -> tuple[int, int]:
    """(bytes in regular files, entries) under ``top``; never follows symlinks.

    Stops counting once ``max_entries`` is passed (the caller only needs to know it is over).
    Raises :class:`TreeTooDeep` past ``max_depth`` and ``OSError`` when any part of the tree
    cannot be read: the caller must treat both as over the cap (fail closed). With ``strict``
    False an entry that vanished between listing and reading is skipped (the spell is still
    running and may delete files); nothing else is.
    """
    total = 0
    entries = 0
    stack: list[tuple[int, Iterator[os.DirEntry[str]]]] = []

    def push(fd: int) -> None:
        try:
            it = os.scandir(fd)
        except BaseException:
            os.close(fd)
            raise
        stack.append((fd, it))

    push(os.open(top, DIR_FLAGS))
    try:
        while stack:
            fd, it = stack[-1]
            entry = next(it, None)
            if entry is None:
                stack.pop()
                _close(fd, it)
                continue
            entries += 1
            if entries > max_entries:
                return total, entries
            try:
                if entry.is_dir(follow_symlinks=False):
                    if len(stack) > max_depth:
                        raise TreeTooDeep(max_depth)
                    push(os.open(entry.name, DIR_FLAGS, dir_fd=fd))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                if strict:
                    raise
    finally:
        for fd, it in stack:
            _close(fd, it)
    return total, entries


def _close(fd: int, it: Iterator[os.DirEntry[str]]) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()
    os.close(fd)


def walk_folder(
    top_fd: int, *, max_depth: int = MAX_OUTPUT_DEPTH
) -> Iterator[tuple[int, str, os.stat_result, tuple[str, ...]]]:
    """Pre-order ``(dir_fd, name, lstat, parents)`` for every entry below ``top_fd``, names
    sorted; ``dir_fd`` is valid until the next item. Folders are entered after they were yielded
    (opened ``O_NOFOLLOW``); past ``max_depth`` :class:`TreeTooDeep` is raised. Entries that
    vanish are skipped. ``top_fd`` stays the caller's."""
    stack: list[tuple[int, Iterator[str], tuple[str, ...]]] = [
        (top_fd, iter(sorted(os.listdir(top_fd))), ())
    ]
    try:
        while stack:
            fd, names, parents = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                if fd != top_fd:
                    os.close(fd)
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield fd, name, st, parents
            if stat.S_ISDIR(st.st_mode):
                if len(stack) > max_depth:
                    raise TreeTooDeep(max_depth)
                sub = os.open(name, DIR_FLAGS, dir_fd=fd)
                try:
                    sub_names = iter(sorted(os.listdir(sub)))
                except BaseException:
                    os.close(sub)
                    raise
                stack.append((sub, sub_names, (*parents, name)))
    finally:
        for fd, _, _ in stack:
            if fd != top_fd:
                os.close(fd)


def remove_tree(path: str | Path) -> bool:
    """Delete ``path`` (a folder, or anything else) and everything below it; never raises.

    Like ``shutil.rmtree(path, ignore_errors=True)`` but without recursion (any depth) and by
    directory fd (any path length); past a few dozen levels, folders are moved up to the top
    so the walk holds few fds. Returns whether ``path`` is gone; failures are logged.
    """
    try:
        _remove(os.fspath(path))
    except FileNotFoundError:
        return True
    except Exception as exc:  # ignore_errors: a leftover is logged, never fatal
        log.warning("could not remove %s: %s", path, exc)
        return False
    return True


def _remove(path: str) -> None:
    try:
        root = os.open(path, DIR_FLAGS)
    except OSError:
        st = os.lstat(path)  # FileNotFoundError: already gone
        if stat.S_ISDIR(st.st_mode):
            raise
        os.unlink(path)
        return
    # (fd, name in its parent, names still to look at); the root's entry lists again at the end
    # (flattened folders land there)
    stack: list[tuple[int, str, Iterator[str]]] = [(root, "", iter(os.listdir(root)))]
    try:
        while stack:
            fd, own_name, names = stack[-1]
            name = next(names, None)
            if name is None:
                if len(stack) == 1:
                    again = os.listdir(fd)
                    if again:
                        stack[0] = (fd, own_name, iter(again))
                        continue
                stack.pop()
                os.close(fd)
                if stack:
                    with contextlib.suppress(FileNotFoundError):
                        os.rmdir(own_name, dir_fd=stack[-1][0])
                continue
            try:
                os.unlink(name, dir_fd=fd)
                continue
            except FileNotFoundError:
                continue
            except IsADirectoryError:
                pass
            except PermissionError:  # EPERM: a folder on some systems
                if not stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise
            if len(stack) > _FLATTEN_DEPTH:
                # move it to the top: it is emptied there, with a short fd stack
                os.rename(
                    name, f".rm-{secrets.token_hex(8)}", src_dir_fd=fd, dst_dir_fd=stack[0][0]
                )
                continue
            sub = os.open(name, DIR_FLAGS, dir_fd=fd)
            try:
                sub_names = iter(os.listdir(sub))
            except BaseException:
                os.close(sub)
                raise
            stack.append((sub, name, sub_names))
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    os.rmdir(path)
