"""Run every benchmark in --quick mode (what `make bench` does) and print one summary.

Usage: .venv/bin/python bench/run_all.py [--runs 3] [--full] [--only cast_latency,hot_account,...]

Each benchmark runs as its own child process (its own servers, data dirs and throw-away
PostgreSQL databases) one after the other, so they never load the machine at the same time.
Results: bench/results/<name>.json (each benchmark) and bench/results/run_all.json (this summary).
Exit status 1 if a benchmark failed its correctness checks or crashed (a missed performance
target is reported, not an error).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common as c  # noqa: E402

BENCHES = ["cast_latency", "hot_account", "e2e_hello"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="runs per benchmark (medians over them)")
    p.add_argument("--full", action="store_true", help="full-length windows instead of --quick")
    p.add_argument("--only", default=",".join(BENCHES))
    args = p.parse_args()
    statuses: dict[str, int] = {}
    walls: dict[str, float] = {}
    started = time.time()
    for name in args.only.split(","):
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--runs", str(args.runs)]
        if not args.full:
            cmd.append("--quick")
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        statuses[name] = subprocess.run(cmd, check=False, cwd=c.ROOT).returncode
        walls[name] = round(time.monotonic() - t0, 1)

    print("\n=== summary (medians over runs; details in bench/results/*.json)")
    rows = []
    for name in args.only.split(","):
        path = c.RESULTS / f"{name}.json"
        if not path.exists() or path.stat().st_mtime < started:
            rows.append([name, "no new results (failed early?)", "-", "-", statuses.get(name)])
            continue
        data = json.loads(path.read_text())
        for item in data["summary"]:
            if name == "cast_latency":
                if item["target"] == "healthz":
                    continue
                what = f"{item['backend']} {item['rate']:.0f}/s {item['target']}"
                value = (
                    f"p95 {item['median_p95_ms']:.1f} ms "
                    f"({item['p95_ratio_vs_healthz']:.1f}x healthz)"
                )
                target = "p95 <= 10 ms"
            elif name == "hot_account":
                what = f"{item['backend']} {item['clients']} clients"
                value = (
                    f"{item['median_accepted_casts_per_s']:.1f} casts/s "
                    f"(raw reserve {item['median_raw_reserve_per_s']:.0f}/s), overspend checks "
                    f"{'PASS' if item['zero_overspend_checks_passed'] else 'FAIL'}"
                )
                target = ">= 500 casts/s"
            else:
                what = f"{item['backend']} hello"
                value = (
                    f"p95 {item['median_e2e_p95_ms']:.1f} ms (bwrap spawn p95 "
                    f"{item['baseline_bwrap_spawn_p95_ms']:.1f} ms)"
                )
                target = "p95 <= 60 ms"
            rows.append([f"{name}: {what}", value, target, item["verdict"], statuses.get(name)])
    print(c.table(["benchmark", "median result", "target", "verdict", "exit"], rows))
    c.write_json(
        "run_all",
        {"quick": not args.full, "runs": args.runs, "exit_status": statuses, "wall_s": walls},
    )
    return 1 if any(statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
