"""Sandbox spawn overhead: a hello-world spell via BwrapSandbox.run vs a plain subprocess.

Usage: python bench/sandbox_overhead.py [-n 30]

Three ways of running the same ``/usr/bin/python3 -I -S -c ...`` that writes one file:

* ``plain``   asyncio.create_subprocess_exec, no limits, no supervision;
* ``unsafe``  UnsafeSubprocessSandbox.run: rlimits, setpriv when root, watchdog, line streaming;
* ``bwrap``   BwrapSandbox.run: the same plus setpriv + bubblewrap namespaces and mounts.

Each is measured end to end (spawn to reaped), interleaved round-robin after 3 warm-up rounds
so that load from other processes affects all modes alike; prints median and p95.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.runner.sandbox import (
    BwrapSandbox,
    SandboxSpec,
    UnsafeSubprocessSandbox,
)

PYTHON = "/usr/bin/python3"
CODE = (
    "import os\n"
    "with open(os.path.join(os.environ['SPELL_OUT'], 'hello.txt'), 'w') as f:\n"
    "    f.write('hello')\n"
    "print('hello')\n"
)
ARGV = [PYTHON, "-I", "-S", "-c", CODE]
WARMUP = 3


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


async def main(n: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="spell-bench-"))
    work.chmod(0o755)
    bundle = work / "bundle"
    bundle.mkdir()
    bundle.chmod(0o755)
    input_path = work / "input.json"
    input_path.write_text("{}")
    input_path.chmod(0o644)
    out = work / "out"

    def spec() -> SandboxSpec:
        shutil.rmtree(out, ignore_errors=True)
        return SandboxSpec(
            bundle_dir=bundle,
            argv=ARGV,
            input_path=input_path,
            out_dir=out,
            timeout_sec=30,
            memory_mb=512,
            max_output_bytes=1024 * 1024,
        )

    async def plain() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        proc = await asyncio.create_subprocess_exec(
            *ARGV,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"SPELL_OUT": str(out), "PATH": "/usr/bin:/bin"},
            cwd=bundle,
        )
        await proc.communicate()
        assert proc.returncode == 0

    bwrap = BwrapSandbox()
    await bwrap.probe()
    unsafe = UnsafeSubprocessSandbox()

    async def sandboxed() -> None:
        result = await bwrap.run(spec())
        assert result.outcome == "ok", result

    async def unsupervised() -> None:
        result = await unsafe.run(spec())
        assert result.outcome == "ok", result

    logging.getLogger("spell.sandbox").setLevel(logging.ERROR)  # the unsafe run warns each time
    try:
        results = await time_interleaved(
            n, {"plain": plain, "unsafe": unsupervised, "bwrap": sandboxed}
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    bwrap_version = subprocess.run(
        ["bwrap", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"# n={n} per mode, interleaved, after {WARMUP} warm-up rounds; {bwrap_version}; "
        f"{platform.platform()}; {os.cpu_count()} CPUs; runner uid {os.geteuid()}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'mode':<8} {'median ms':>10} {'p95 ms':>8} {'min ms':>8} {'max ms':>8}")
    summary: dict[str, dict[str, float]] = {}
    for mode, samples in results.items():
        summary[mode] = {
            "median_ms": round(statistics.median(samples), 2),
            "p95_ms": round(percentile(samples, 95), 2),
            "min_ms": round(min(samples), 2),
            "max_ms": round(max(samples), 2),
        }
        s = summary[mode]
        print(
            f"{mode:<8} {s['median_ms']:>10.2f} {s['p95_ms']:>8.2f} "
            f"{s['min_ms']:>8.2f} {s['max_ms']:>8.2f}"
        )
    diff_median = summary["bwrap"]["median_ms"] - summary["plain"]["median_ms"]
    diff_p95 = summary["bwrap"]["p95_ms"] - summary["plain"]["p95_ms"]
    print(f"bwrap - plain: median {diff_median:+.2f} ms, p95 {diff_p95:+.2f} ms")
    print(json.dumps({"n": n, "results": summary}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="measured iterations per mode")
    asyncio.run(main(parser.parse_args().n))
