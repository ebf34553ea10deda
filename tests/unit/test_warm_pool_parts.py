"""The warm pool's pieces that need no sandbox: uids, jobs, limits, slot filling, output moving."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from app.runner.launcher import JOB_TAKEN, READY
from app.runner.pool import (
    WARM_MAX_CPU_SEC,
    UidBroker,
    WarmProfile,
    copy_output,
    fill_slot,
    launcher_source,
    make_slot,
    move_output,
    remove_stale_slots,
)
from app.runner.sandbox import (
    SANDBOX_PYTHON,
    SandboxSpec,
    _exec_failed,
    _Limits,
    _warm_job,
    warm_profile_of,
)


def spec(argv: list[str], **overrides: object) -> SandboxSpec:
    kwargs: dict[str, object] = {
        "bundle_dir": Path("/b"),
        "argv": argv,
        "input_path": Path("/i"),
        "out_dir": Path("/o"),
        "timeout_sec": 9.5,
        "memory_mb": 128,
        "max_output_bytes": 1000,
        "env": {"SPELL_CAST_ID": "c_1", "TRACEPARENT": "00-a-b-01"},
    }
    kwargs.update(overrides)
    return SandboxSpec(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ jobs


@pytest.mark.parametrize(
    ("argv", "env", "kind"),
    [
        ([SANDBOX_PYTHON, "-I", "-S", "main.py", "x"], None, "path"),
        ([SANDBOX_PYTHON, "-I", "-S", "-c", "print(1)", "x"], None, "code"),
        ([SANDBOX_PYTHON, "-I", "-S", "-c"], None, "exec"),  # the interpreter's own error
        ([SANDBOX_PYTHON, "-I", "-S", "-u", "main.py"], None, "exec"),
        ([SANDBOX_PYTHON, "-I", "-S", "-"], None, "exec"),
        ([SANDBOX_PYTHON, "-S", "-I", "main.py"], None, "exec"),
        (["/usr/bin/python3.11", "-I", "-S", "main.py"], None, "exec"),
        (["./run"], None, "exec"),
        ([SANDBOX_PYTHON, "-I", "-S", "main.py"], {"LC_ALL": "C"}, "exec"),
        ([SANDBOX_PYTHON, "-I", "-S", "main.py"], {"TZ": "UTC"}, "exec"),
        ([SANDBOX_PYTHON, "-I", "-S", "main.py"], {"LD_PRELOAD": "/x.so"}, "exec"),
        ([SANDBOX_PYTHON, "-I", "-S", "main.py"], {"SPELL_ID": "a", "TRACESTATE": "b"}, "path"),
    ],
)
def test_only_what_the_interpreter_would_start_the_same_way_runs_in_process(
    argv: list[str], env: dict[str, str] | None, kind: str
) -> None:
    job = _warm_job(spec(argv, **({"env": env} if env is not None else {})))
    assert job["kind"] == kind
    assert job["argv"] == argv


def test_the_job_carries_the_cold_environment_and_limits() -> None:
    s = spec([SANDBOX_PYTHON, "-I", "-S", "main.py"])
    job = _warm_job(s)
    assert job["cwd"] == "/spell"
    assert job["env"] == {
        "HOME": "/tmp",
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "SPELL_CAST_ID": "c_1",
        "TRACEPARENT": "00-a-b-01",
        "SPELL_INPUT": "/tmp/input.json",
        "SPELL_OUT": "/tmp/out",
    }
    assert job["rlimits"] == {
        "as": [128 * 1024 * 1024] * 2,
        "cpu": [11, 12],
        "fsize": [1000, 1000],
        "nproc": [64, 64],
        "nofile": [256, 256],
        "core": [0, 0],
    }


def test_prlimit_sets_the_same_limits_as_the_launcher() -> None:
    limits = _Limits.of(spec(["./run"]))
    assert limits.prlimit_argv("/usr/bin/prlimit") == [
        "/usr/bin/prlimit",
        f"--as={128 * 1024 * 1024}",
        "--cpu=11:12",
        "--fsize=1000",
        "--nproc=64",
        "--nofile=256",
        "--core=0",
        "--",
    ]
    assert limits.for_launcher()["cpu"] == [11, 12]


def test_the_profile_is_what_is_fixed_at_spawn() -> None:
    s = spec(["./run"], memory_mb=192, max_output_bytes=5, max_procs=7)
    assert warm_profile_of(s) == WarmProfile(memory_mb=192, max_output_bytes=5, max_procs=7)
    assert WARM_MAX_CPU_SEC >= 3600 + 2  # the longest timeout's CPU limit can be lowered to


def test_launcher_protocol_markers_are_distinct_and_in_its_source() -> None:
    assert READY != JOB_TAKEN
    assert READY.startswith(b"\0") and JOB_TAKEN.startswith(b"\0")  # never a text line
    source = launcher_source()
    assert "def main()" in source
    compile(source, "<launcher>", "exec")


def test_a_failed_exec_is_told_apart_from_a_failed_setup() -> None:
    assert _exec_failed("bwrap: execvp ./run: No such file or directory\n", "./run")
    assert not _exec_failed("bwrap: Can't find source path /x: No such file\n", "./run")
    assert not _exec_failed("", "./run")


# ------------------------------------------------------------------------------------ uids


async def test_without_a_pool_every_sandbox_gets_the_one_uid() -> None:
    broker = UidBroker(65534)
    assert [broker.try_take(), broker.try_take(for_warm=True)] == [65534, 65534]


async def test_a_uid_pool_hands_out_each_uid_once_and_wakes_waiters() -> None:
    broker = UidBroker(65534, [10, 11])
    released: list[str] = []
    broker.on_release = lambda: released.append("kick")
    assert broker.try_take() == 10
    assert broker.try_take(for_warm=True) == 11
    assert broker.try_take() is None
    waiter = asyncio.create_task(broker.changed())
    await asyncio.sleep(0)
    assert broker.try_take(for_warm=True) is None  # a run waits: warm spawns keep off
    broker.release(10)
    await asyncio.wait_for(waiter, 1)
    assert released == ["kick"]
    assert broker.try_take() == 10


# ------------------------------------------------------------------------------------ slots


def test_a_slot_mirrors_the_bundle_by_hard_links_with_owners_and_modes(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "sub" / "deep").mkdir(parents=True)
    (bundle / "main.py").write_text("print('hi')\n")
    (bundle / "run").write_text("#!/bin/sh\n")
    (bundle / "run").chmod(0o755)
    (bundle / "sub" / "deep" / "data").write_text("x")
    (bundle / "sub").chmod(0o750)
    os.symlink("main.py", bundle / "alias")
    inp = tmp_path / "input.json"
    inp.write_text('{"a": 1}')
    inp.chmod(0o640)
    warm_dir = tmp_path / "warm"
    warm_dir.mkdir()
    slot = make_slot(warm_dir, None)
    assert stat.S_IMODE(slot.stat().st_mode) == 0o711
    assert (slot / "input.json").read_bytes() == b""
    fill_slot(slot, bundle, inp, root=os.geteuid() == 0)
    got = slot / "bundle"
    assert (got / "main.py").stat().st_ino == (bundle / "main.py").stat().st_ino
    assert stat.S_IMODE((got / "run").stat().st_mode) == 0o755
    assert stat.S_IMODE((got / "sub").stat().st_mode) == 0o750
    assert (got / "sub" / "deep" / "data").read_text() == "x"
    assert os.readlink(got / "alias") == "main.py"
    assert (slot / "input.json").read_text() == '{"a": 1}'
    assert stat.S_IMODE((slot / "input.json").stat().st_mode) == 0o640


def test_stale_slots_of_dead_processes_are_removed(tmp_path: Path) -> None:
    mine = make_slot(tmp_path, None)
    dead = tmp_path / "w-999999999-abc"  # no such pid
    dead.mkdir()
    other = tmp_path / "not-a-slot"
    other.mkdir()
    assert remove_stale_slots(tmp_path) == 1
    assert mine.exists() and other.exists() and not dead.exists()


def test_the_output_moves_by_rename(tmp_path: Path) -> None:
    slot_out = tmp_path / "slot" / "out"
    (slot_out / "a").mkdir(parents=True)
    (slot_out / "a" / "f").write_text("data")
    run_out = tmp_path / "run" / "out"
    run_out.mkdir(parents=True)
    move_output(slot_out, run_out)
    assert (run_out / "a" / "f").read_text() == "data"
    assert not slot_out.exists()


def test_copying_the_output_never_follows_or_opens_what_the_spell_planted(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "f.txt").write_text("kept")
    (out / "big").write_bytes(b"x" * 3_000_000)
    os.symlink("/etc/passwd", out / "link")
    os.mkfifo(out / "fifo")  # opening it for reading would block forever
    dest = tmp_path / "dest"
    dest.mkdir()
    copy_output(out, dest)
    assert (dest / "sub" / "f.txt").read_text() == "kept"
    assert (dest / "big").stat().st_size == 3_000_000
    assert os.readlink(dest / "link") == "/etc/passwd"
    assert not (dest / "fifo").exists()


def test_settings_that_starve_the_shared_uid_of_processes_are_refused() -> None:
    from app.runner.sandbox import process_budget_error

    assert process_budget_error(warm=2, workers=2, uid_pool=()) is None  # the defaults
    assert process_budget_error(warm=5, workers=5, uid_pool=()) is None  # 30 <= 32
    msg = process_budget_error(warm=20, workers=4, uid_pool=())
    assert msg is not None and "SPELL_SANDBOX_UID_POOL" in msg
    # the runs are SPELL_WORKERS or `spell worker --concurrency`, whichever the process uses
    assert msg.startswith(
        "SPELL_SANDBOX_WARM (20) + 4 concurrent runs (SPELL_WORKERS or `spell worker "
        "--concurrency`): their sandboxes keep 72 processes"
    ), msg
    assert process_budget_error(warm=20, workers=4, uid_pool=range(200000, 200064)) is None


def test_the_launcher_restores_default_signals_before_exec() -> None:
    source = launcher_source()
    assert "_default_signals()" in source.split("def _exec(", 1)[1].split("os.execvpe", 1)[0]
