"""Host-side walks of spell-made trees: iterative, by directory fd, any depth or path length;
and the reaping of adopted sandbox inits without a retry limit."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.runner import pool as pool_mod
from app.runner.bundle import zip_output
from app.runner.fstree import MAX_OUTPUT_DEPTH, TreeTooDeep, remove_tree, tree_usage
from app.runner.pool import (
    UidBroker,
    WarmPool,
    WarmProfile,
    copy_output,
    pending_inits,
    reap_adopted,
    remove_stale_slots,
    when_done,
)
from app.runner.sandbox import MAX_OUTPUT_ENTRIES, _output_usage

LONG = 250  # 20 levels of this: past PATH_MAX (4096) as a full path


@pytest.fixture(autouse=True)
def _no_deep_leftovers(tmp_path: Path) -> Iterator[None]:
    """pytest removes old tmp_paths with the recursive shutil.rmtree: leave nothing deep."""
    yield
    for entry in list(tmp_path.iterdir()):
        assert remove_tree(entry), entry


def chain(top: Path, levels: int, name: str = "d", payload: bytes = b"") -> None:
    """``levels`` nested folders below ``top``, made relative to a dir fd (any path length),
    with a file ``f`` holding ``payload`` at the bottom."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(levels):
            sub = f"{i:03d}{name}"[: len(name) + 3]
            os.mkdir(sub, dir_fd=fd)
            nxt = os.open(sub, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, payload)
        os.close(out)
    finally:
        os.close(fd)


def long_chain(top: Path, payload: bytes) -> None:
    chain(top, 20, name="n" * LONG, payload=payload)


# --- measuring ---------------------------------------------------------------------------------


def test_usage_counts_files_nested_past_path_max(tmp_path: Path) -> None:
    long_chain(tmp_path / "out", b"x" * 5000)
    assert tree_usage(tmp_path / "out", max_entries=100) == (5000, 21)
    assert _output_usage(tmp_path / "out") == (5000, 21)


def test_usage_fails_closed_past_the_depth_limit(tmp_path: Path) -> None:
    chain(tmp_path / "out", MAX_OUTPUT_DEPTH + 1)
    with pytest.raises(TreeTooDeep):
        tree_usage(tmp_path / "out", max_entries=MAX_OUTPUT_ENTRIES)
    assert _output_usage(tmp_path / "out") is None  # the run is output_too_large
    chain(tmp_path / "ok", MAX_OUTPUT_DEPTH)
    assert _output_usage(tmp_path / "ok") == (0, MAX_OUTPUT_DEPTH + 1)


def test_usage_fails_closed_on_an_unreadable_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    os.symlink("/etc", tmp_path / "out" / "link")  # a link is an entry, never followed
    assert _output_usage(tmp_path / "out") == (0, 1)
    os.rename(tmp_path / "out", tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "out")  # the top itself swapped for a link
    assert _output_usage(tmp_path / "out") is None


# --- deleting, zipping, copying ------------------------------------------------------------------


def test_remove_tree_deletes_a_chain_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    chain(tmp_path / "run", 1500)
    assert remove_tree(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert os.listdir(tmp_path) == []


def test_remove_tree_deletes_past_path_max_and_odd_entries(tmp_path: Path) -> None:
    long_chain(tmp_path / "run", b"data")
    os.symlink("/etc", tmp_path / "run" / "link")
    os.mkfifo(tmp_path / "run" / "fifo")
    assert remove_tree(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert (Path("/etc")).is_dir()  # the link was removed, not followed
    assert remove_tree(tmp_path / "missing")  # nothing there: fine


def test_zip_refuses_a_too_deep_tree_without_recursion_error(tmp_path: Path) -> None:
    chain(tmp_path / "out", 1500)
    with pytest.raises(TreeTooDeep):
        zip_output(tmp_path / "out", tmp_path / "zips")
    assert list((tmp_path / "zips").iterdir()) == []


def test_zip_packs_output_within_the_limit(tmp_path: Path) -> None:
    chain(tmp_path / "out", 3, payload=b"hello")
    (tmp_path / "out" / "top.txt").write_text("t")
    _, _, path = zip_output(tmp_path / "out", tmp_path / "zips")
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["000d/001d/002d/f", "top.txt"]
        assert zf.read("000d/001d/002d/f") == b"hello"


def test_copy_output_goes_past_path_max_and_refuses_too_deep(tmp_path: Path) -> None:
    long_chain(tmp_path / "slot", b"payload")
    (tmp_path / "dest").mkdir()
    copy_output(tmp_path / "slot", tmp_path / "dest")
    assert tree_usage(tmp_path / "dest", max_entries=100) == (7, 21)
    chain(tmp_path / "deep", 1500)
    (tmp_path / "dest2").mkdir()
    with pytest.raises(TreeTooDeep):
        copy_output(tmp_path / "deep", tmp_path / "dest2")


def test_stale_slot_too_deep_for_shutil_is_removed(tmp_path: Path) -> None:
    dead = tmp_path / "w-999999999-abc"  # no such pid
    chain(dead, 1500)
    assert remove_stale_slots(tmp_path) == 1
    assert not dead.exists()


async def test_pool_start_survives_a_failing_stale_slot_removal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*_: object, **__: object) -> int:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(pool_mod, "remove_stale_slots", boom)

    async def spawner(*_: object) -> asyncio.subprocess.Process:
        raise RuntimeError("no spawning in this test")

    pool = WarmPool(
        size=1, warm_dir=tmp_path, spawner=spawner, uids=UidBroker(65534), initial=WarmProfile()
    )
    with caplog.at_level(logging.ERROR, logger="spell.sandbox.pool"):
        pool.start()  # logs, never raises
    assert "stale warm sandbox folders" in caplog.text
    await pool.aclose()


# --- reaping adopted inits ---------------------------------------------------------------------


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


async def test_an_init_that_dies_slowly_is_still_reaped() -> None:
    # A child of ours (as an adopted init is) that takes longer than the old 2 s retry window.
    sleep = shutil.which("sleep")
    assert sleep is not None
    pid = os.posix_spawn(sleep, [sleep, "2.6"], dict(os.environ))
    try:
        reap_adopted(pid)
        await asyncio.sleep(3.4)
        assert _state(pid) is None, "the exited child was left a zombie"
        assert pending_inits() == 0
    finally:
        if _state(pid) not in (None, "Z"):
            os.kill(pid, signal.SIGKILL)
        if _state(pid) is not None:
            os.waitpid(pid, 0)


async def test_reaping_does_not_touch_a_process_that_is_not_our_child() -> None:
    assert reap_adopted(1) is None  # init's parent is 0, never us


async def test_the_uid_waits_for_the_reaping() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    released: list[int] = []
    when_done([fut, None], lambda: released.append(1))
    await asyncio.sleep(0)
    assert released == []
    fut.set_result(None)
    await asyncio.sleep(0.01)
    assert released == [1]
    when_done([None], lambda: released.append(2))
    assert released == [1, 2]
