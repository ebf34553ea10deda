"""Sandbox start-up cost for the hello spell: cold bubblewrap spawn vs warm-pool dispatch.

Usage: .venv/bin/python bench/sandbox_overhead.py [-n 30] [--json]

The hello spell (templates/spells/hello/main.py, the worker's argv ``/usr/bin/python3 -I -S
main.py``, its input and a fresh output folder per run), four ways, each timed from the call
to the finished result (spell exited, output in place):

* ``plain``   asyncio.create_subprocess_exec, no limits, no supervision;
* ``unsafe``  UnsafeSubprocessSandbox.run: rlimits (prlimit), setpriv when root, watchdog,
              line streaming, no namespaces;
* ``cold``    BwrapSandbox.run without a pool: prlimit → setpriv → bwrap → python3 start-up;
* ``warm``    BwrapSandbox(warm=2).run: a pre-spawned sandbox is filled (bundle hard-linked,
              input copied), handed the job and watched; the pool is waited for between runs
              (untimed), so this is the "job assigned → spell exited" time of a ready pool.
              ``warm spell`` is the run's own duration_ms (job sent → exit).

Modes run interleaved round-robin after 3 warm-up rounds, so load from other processes hits
them alike; median and p95 are printed.

Also measured: how long spawning a process blocks the event loop, with a server-sized heap
(~150 MB of Python objects): ``create_subprocess_exec`` with ``preexec_fn`` (fork, what the
sandbox did before) vs with a ``prlimit`` prefix (vfork + exec, what it does now).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.runner.sandbox import (
    BwrapSandbox,
    SandboxSpec,
    UnsafeSubprocessSandbox,
    warm_profile_of,
)
from app.worker.runs import build_argv

HELLO = Path(__file__).resolve().parents[1] / "templates" / "spells" / "hello" / "main.py"
WARMUP = 3
MODES = ("plain", "unsafe", "cold", "warm")


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


async def time_interleaved(
    n: int, modes: dict[str, Callable[[], Awaitable[None]]]
) -> dict[str, list[float]]:
    """Round-robin over the modes, so load from other processes hits them all alike."""
    for _ in range(WARMUP):
        for once in modes.values():
            await once()
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(n):
        for mode, once in modes.items():
            start = time.perf_counter()
            await once()
            samples[mode].append((time.perf_counter() - start) * 1000)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50": round(statistics.median(samples), 2),
        "p95": round(percentile(samples, 95), 2),
        "min": round(min(samples), 2),
        "max": round(max(samples), 2),
    }


async def measure_hello(n: int, modes: Iterable[str] = MODES) -> dict[str, dict[str, float]]:
    """Time the hello spell in ``modes`` (see the module docstring); summaries per mode."""
    wanted = list(modes)
    work = Path(tempfile.mkdtemp(prefix="spell-bench-spawn-"))
    work.chmod(0o755)
    bundle = work / "bundle"
    bundle.mkdir()
    bundle.chmod(0o755)
    shutil.copy(HELLO, bundle / "main.py")
    (bundle / "main.py").chmod(0o644)
    input_path = work / "input.json"
    input_path.write_text(json.dumps({"name": "bench"}))
    input_path.chmod(0o644)
    argv = build_argv("main.py")  # what the worker runs: /usr/bin/python3 -I -S main.py
    counter = 0

    def spec() -> SandboxSpec:
        nonlocal counter
        counter += 1
        return SandboxSpec(
            bundle_dir=bundle,
            argv=argv,
            input_path=input_path,
            out_dir=work / f"out{counter}",
            timeout_sec=10,
            memory_mb=128,
            max_output_bytes=100 * 1024 * 1024,
        )

    async def plain() -> None:
        out = work / f"plain{time.monotonic_ns()}"
        out.mkdir()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"SPELL_INPUT": str(input_path), "SPELL_OUT": str(out), "PATH": "/usr/bin:/bin"},
            cwd=bundle,
        )
        await proc.communicate()
        assert proc.returncode == 0

    cold_sb = BwrapSandbox()
    await cold_sb.probe()
    unsafe_sb = UnsafeSubprocessSandbox()
    warm_sb = BwrapSandbox(warm=2)
    spell_ms: list[float] = []

    async def cold() -> None:
        result = await cold_sb.run(spec())
        assert result.outcome == "ok", result

    async def unsafe() -> None:
        result = await unsafe_sb.run(spec())
        assert result.outcome == "ok", result

    async def warm() -> None:
        result = await warm_sb.run(spec())
        assert result.outcome == "ok", result
        spell_ms.append(result.duration_ms)

    callables = {"plain": plain, "unsafe": unsafe, "cold": cold, "warm": warm}
    modes_ = {m: callables[m] for m in wanted}
    if "warm" in modes_:
        await warm_sb.probe()
        assert warm_sb.pool is not None
        pool = warm_sb.pool
        profile = warm_profile_of(spec())

        async def warm_ready() -> None:
            # untimed: the pool gets ready between runs, as it does between casts
            assert await pool.prewarm(profile)
            assert await pool.wait_idle()
            start = time.perf_counter()
            hits = pool.stats["hits"]
            await warm()
            took = (time.perf_counter() - start) * 1000
            assert pool.stats["hits"] == hits + 1, "a warm run started cold"
            warm_times.append(took)

        warm_times: list[float] = []
        modes_["warm"] = warm_ready
    logging.getLogger("spell.sandbox").setLevel(logging.ERROR)  # the unsafe run warns each time
    try:
        results = await time_interleaved(n, modes_)
    finally:
        await warm_sb.aclose()
        shutil.rmtree(work, ignore_errors=True)
    out = {mode: summary(samples) for mode, samples in results.items()}
    if "warm" in modes_:
        out["warm"] = summary(warm_times[-n:])  # without the untimed wait for the pool
        out["warm spell"] = summary(spell_ms[-n:])
    return out


async def measure_loop_block(n: int) -> dict[str, dict[str, float]]:
    """How long one ``create_subprocess_exec`` call keeps the event loop busy."""
    heap = [bytearray(1024) for _ in range(150_000)]  # ~150 MB, like a busy server process

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    prlimit = shutil.which("prlimit") or "prlimit"
    samples: dict[str, list[float]] = {"preexec_fn (before)": [], "prlimit (now)": []}
    for _ in range(n):
        for mode in samples:
            start = time.perf_counter()
            if mode.startswith("preexec"):
                proc = await asyncio.create_subprocess_exec(
                    "/usr/bin/true", start_new_session=True, preexec_fn=limits
                )
            else:
                proc = await asyncio.create_subprocess_exec(
                    prlimit, "--core=0", "--", "/usr/bin/true", start_new_session=True
                )
            samples[mode].append((time.perf_counter() - start) * 1000)
            await proc.wait()
    del heap
    return {mode: summary(values) for mode, values in samples.items()}


def print_table(title: str, rows: dict[str, dict[str, float]]) -> None:
    print(title)
    print(f"{'mode':<22} {'p50 ms':>8} {'p95 ms':>8} {'min ms':>8} {'max ms':>8}")
    for mode, s in rows.items():
        print(f"{mode:<22} {s['p50']:>8.2f} {s['p95']:>8.2f} {s['min']:>8.2f} {s['max']:>8.2f}")


async def main(n: int, as_json: bool) -> None:
    hello = await measure_hello(n)
    block = await measure_loop_block(n)
    bwrap_version = subprocess.run(
        ["bwrap", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"# n={n} per mode, interleaved, after {WARMUP} warm-up rounds; {bwrap_version}; "
        f"{platform.platform()}; {os.cpu_count()} CPUs; runner uid {os.geteuid()}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print_table("hello spell, call -> result", hello)
    d50 = hello["warm"]["p50"] - hello["cold"]["p50"]
    d95 = hello["warm"]["p95"] - hello["cold"]["p95"]
    print(f"warm - cold: p50 {d50:+.2f} ms, p95 {d95:+.2f} ms")
    print_table("event loop blocked by one spawn call", block)
    if as_json:
        print(json.dumps({"n": n, "hello": hello, "loop_block": block}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="measured iterations per mode")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args: Any = parser.parse_args()
    asyncio.run(main(args.n, args.json))
