"""Hot account: cast throughput against ONE capped account, and proof of zero overspend.

Usage: .venv/bin/python bench/hot_account.py [--quick] [--runs 3] [--clients 32]
                                              [--backends sqlite,postgresql] [--worker 1|off]

Per run and backend, on a fresh data dir / throw-away PostgreSQL database:

1. Baseline (no HTTP, same process as the generator): ``SqlLedger.reserve`` — the single
   conditional ``UPDATE budgets ... WHERE used + reserved + est <= cap RETURNING`` — each in its
   own ``ledger.sessions.begin()`` transaction, from the same number of concurrent tasks, against
   one account with the same cap and the same over-subscription. Throughput = reservations
   attempted per second; it also must accept exactly cap // price.
2. The API: a real ``spell serve`` subprocess (SPELL_WORKERS=1: the accepted casts also run hello
   in bubblewrap in the background and settle). A paid spell (flat 7 cents); the caster's monthly
   cap is set through ``POST /v1/billing/caps`` to 7*K + 3 cents, so exactly K casts fit. N
   concurrent clients (closed loop: each sends its next cast when the previous answer arrives,
   unique Idempotency-Key each) fire 1.25*K casts in total.

Checks (printed, and the exit status is 1 if any fails): accepted * price <= cap; accepted ==
cap // price; every other answer is 402 BUDGET_CAP_EXCEEDED; cast ids are unique; the budget's
used + reserved == accepted * price (via GET /v1/billing/caps) and the ledger holds exactly
``accepted`` casts for the account.

Throughput reported: accepted casts/s = accepted / (time of the last 202), and all answers/s.
Target: >= 500 casts/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

TARGET_CASTS_PER_S = 500.0
PRICE = 7
SLACK = 3  # cap = PRICE*K + SLACK: a cap that is not a multiple of the price


async def raw_reserve(env: c.Env, *, clients: int, expect: int, attempts: int) -> dict[str, Any]:
    """The reservation UPDATE straight on the database (no HTTP, no app), N concurrent tasks."""
    from app.domain.caps import month_period
    from app.services.ports import SystemClock
    from app.store.db import make_engine, upgrade
    from app.store.ledger import SqlLedger

    settings = env.settings()
    settings.ensure_data_dir()
    engine = make_engine(settings.sqlalchemy_url)
    try:
        await upgrade(engine)
        ledger = SqlLedger(engine, SystemClock())
        cap = PRICE * expect + SLACK
        acct = "raw-acct"
        await ledger.ensure_principal(acct, "caster", monthly_cap=cap, total_cap=None)
        period = month_period(SystemClock().now())
        # warm the pool and the statement cache on another, uncapped account
        await ledger.ensure_principal("raw-warm", "caster", monthly_cap=None, total_cap=None)
        for _ in range(20):
            async with ledger.sessions.begin() as s:
                await ledger.reserve(s, "raw-warm", PRICE, period)
        left = attempts
        ok = 0
        errors: list[str] = []

        async def client() -> None:
            nonlocal left, ok
            while left > 0:
                left -= 1
                try:
                    async with ledger.sessions.begin() as s:
                        if await ledger.reserve(s, acct, PRICE, period):
                            ok += 1
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {e}"[:200])

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
        view = await ledger.budget(acct)
        assert view is not None
        held = view.monthly.used_cents + view.monthly.reserved_cents
        checks = {
            "accepted_x_price_le_cap": ok * PRICE <= cap,
            "accepted_eq_cap_div_price": ok == cap // PRICE,
            "budget_used_plus_reserved_eq_accepted_x_price": held == ok * PRICE,
            "no_errors": not errors,
        }
        return {
            "attempts": attempts,
            "accepted": ok,
            "cap_cents": cap,
            "held_cents": held,
            "wall_s": round(wall, 3),
            "reserves_per_s": round(attempts / wall, 1),
            "errors": len(errors),
            "error_samples": errors[:5],
            "checks": checks,
        }
    finally:
        await engine.dispose()


async def http_burst(
    env: c.Env, *, clients: int, expect: int, attempts: int, worker: str = "1"
) -> dict[str, Any]:
    maker, hot, warm = await c.issue_tokens(
        env, [("bench-maker", "maker"), ("hot-acct", "caster"), ("warm-acct", "caster")]
    )
    cap = PRICE * expect + SLACK
    argv = None
    if worker == "off":  # the API alone: bench/_serve_noworker.py, Overrides(run_worker=False)
        argv = [
            sys.executable,
            str(Path(__file__).parent / "_serve_noworker.py"),
            "--port",
            "{port}",
        ]
    async with (
        c.running_server(env, argv) as server,
        c.session(limit=clients + 8, timeout=60) as s,
    ):
        url = server.url
        digest = await c.upload_hello(s, url, maker)
        await c.publish_hello(s, url, maker, digest, spell_id="bench.hello-paid", flat_cents=PRICE)
        cast_url = f"{url}/v1/spells/bench.hello-paid:cast"
        async with s.post(
            url + "/v1/billing/caps",
            json={"monthly_cents": cap},
            headers={**c.auth(hot), "Idempotency-Key": c.idem()},
        ) as r:
            body = await r.json()
            assert r.status == 200 and body["monthly"]["cap_cents"] == cap, body

        async def cast(token: str, i: int) -> tuple[int, dict[str, Any]]:
            async with s.post(
                cast_url,
                json={"input": {"name": f"hot-{i}"}},
                headers={**c.auth(token), "Idempotency-Key": c.idem()},
            ) as r:
                return r.status, await r.json()

        # warm-up on another (uncapped) account: pools, caches, the first bwrap runs
        await asyncio.gather(*(cast(warm, i) for i in range(min(clients * 2, 64))))

        left = attempts
        statuses: dict[str, int] = {}
        cast_ids: list[str] = []
        refusal_codes: dict[str, int] = {}
        other: list[str] = []
        last_accept = 0.0
        t0 = time.perf_counter()
        cpu0 = c.proc_cpu_ms(server.proc.pid) if server.proc else float("nan")

        async def client() -> None:
            nonlocal left, last_accept
            while left > 0:
                left -= 1
                i = left
                try:
                    status, body = await cast(hot, i)
                except Exception as e:
                    statuses["exception"] = statuses.get("exception", 0) + 1
                    other.append(f"{type(e).__name__}: {e}"[:200])
                    continue
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status == 202:
                    cast_ids.append(body["cast_id"])
                    last_accept = time.perf_counter()
                elif status == 402:
                    code = body.get("error", {}).get("code", "?")
                    refusal_codes[code] = refusal_codes.get(code, 0) + 1
                else:
                    other.append(f"{status} {body}"[:300])

        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
        cpu1 = c.proc_cpu_ms(server.proc.pid) if server.proc else float("nan")
        async with s.get(url + "/v1/billing/caps", headers=c.auth(hot)) as r:
            caps = await r.json()
        # background runs finished meanwhile (warm-up casts first, then the hot account's)
        counts = await c.scrape_cast_counts(s, url)
        alive = server.alive()
        server_errors = server.errors_in_log()[:5]
    # the server is stopped: count what the ledger holds for the account
    from app.cli.local import local_engine
    from app.services.ports import SystemClock
    from app.store.ledger import SqlLedger

    async with local_engine(env.settings(), migrate=False) as engine:
        in_ledger = await SqlLedger(engine, SystemClock()).count_casts(caster_id="hot-acct")

    accepted = len(cast_ids)
    held = caps["monthly"]["used_cents"] + caps["monthly"]["reserved_cents"]
    accept_window = (last_accept - t0) if accepted else float("nan")
    checks = {
        "accepted_x_price_le_cap": accepted * PRICE <= cap,
        "accepted_eq_cap_div_price": accepted == cap // PRICE,
        "only_202_or_402_budget": not other and set(refusal_codes) <= {"BUDGET_CAP_EXCEEDED"},
        "cast_ids_unique": len(set(cast_ids)) == accepted,
        "budget_used_plus_reserved_eq_accepted_x_price": held == accepted * PRICE,
        "ledger_casts_eq_accepted": in_ledger == accepted,
        "server_alive": alive,
    }
    return {
        "attempts": attempts,
        "accepted": accepted,
        "expected_accepted": cap // PRICE,
        "cap_cents": cap,
        "held_cents": held,
        "caps_view": caps,
        "ledger_casts": in_ledger,
        "statuses": statuses,
        "refusal_codes": refusal_codes,
        "other_samples": other[:5],
        "wall_s": round(wall, 3),
        "accept_window_s": round(accept_window, 3),
        "accepted_per_s": round(accepted / accept_window, 1) if accepted else 0.0,
        "answers_per_s": round(attempts / wall, 1),
        "server_cpu_ms_per_answer": round((cpu1 - cpu0) / attempts, 2),
        "runs_finished_by_worker": counts.get("succeeded", 0) + counts.get("failed", 0),
        "server_errors": server_errors,
        "checks": checks,
    }


async def main(args: argparse.Namespace) -> int:
    expect = 300 if args.quick else args.accepted
    attempts = int(expect * 1.25)
    backends = args.backends.split(",")
    if "postgresql" in backends:
        reason = await c.pg_available()
        if reason:
            print(f"# PostgreSQL unavailable ({reason}); skipping it", file=sys.stderr)
            backends = [b for b in backends if b != "postgresql"]
    info = c.machine_info()
    raw: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for run in range(args.runs):
        for backend in backends:
            async with c.platform_env(backend, workers=1) as env:
                base = await raw_reserve(
                    env, clients=args.clients, expect=expect, attempts=attempts
                )
                http = await http_burst(
                    env, clients=args.clients, expect=expect, attempts=attempts, worker=args.worker
                )
            raw.append({"run": run, "backend": backend, "raw_reserve": base, "http": http})
            ok = all(http["checks"].values()) and all(base["checks"].values())
            print(
                f"# run {run} {backend:<10} raw reserve {base['reserves_per_s']:8.1f}/s "
                f"(accepted {base['accepted']}/{base['attempts']})  http accepted "
                f"{http['accepted_per_s']:7.1f}/s answers {http['answers_per_s']:7.1f}/s "
                f"(accepted {http['accepted']}/{http['attempts']}, expected "
                f"{http['expected_accepted']}) checks "
                f"{'OK' if ok else 'FAILED'}",
                file=sys.stderr,
            )

    rows = []
    summary = []
    failed = False
    for backend in backends:
        rs = [r for r in raw if r["backend"] == backend]
        acc = c.median([r["http"]["accepted_per_s"] for r in rs])
        ans = c.median([r["http"]["answers_per_s"] for r in rs])
        base = c.median([r["raw_reserve"]["reserves_per_s"] for r in rs])
        ratios = [
            r["raw_reserve"]["reserves_per_s"] / r["http"]["accepted_per_s"]
            for r in rs
            if r["http"]["accepted_per_s"]
        ]
        ratio = c.median(ratios)
        cpu = c.median([r["http"]["server_cpu_ms_per_answer"] for r in rs])
        checks_ok = all(
            all(r["http"]["checks"].values()) and all(r["raw_reserve"]["checks"].values())
            for r in rs
        )
        failed |= not checks_ok
        accepted = [r["http"]["accepted"] for r in rs]
        verdict = "met" if acc >= TARGET_CASTS_PER_S else "NOT met"
        item = {
            "backend": backend,
            "runs": len(rs),
            "clients": args.clients,
            "price_cents": PRICE,
            "cap_cents": PRICE * expect + SLACK,
            "attempts": attempts,
            "accepted_per_run": accepted,
            "median_accepted_casts_per_s": acc,
            "median_answers_per_s": ans,
            "median_raw_reserve_per_s": base,
            "raw_over_http_ratio": ratio,
            "server_cpu_ms_per_answer": cpu,
            "zero_overspend_checks_passed": checks_ok,
            "target_casts_per_s": TARGET_CASTS_PER_S,
            "verdict": verdict,
        }
        summary.append(item)
        rows.append(
            [
                backend,
                acc,
                ans,
                base,
                f"{ratio:.1f}x",
                cpu,
                f"{'/'.join(map(str, accepted))} of {attempts} (cap//price={expect})",
                "PASS" if checks_ok else "FAIL",
                verdict,
            ]
        )
    print(
        f"\nhot_account: {args.clients} closed-loop clients, one account, price {PRICE} c, cap "
        f"{PRICE * expect + SLACK} c (= {expect} casts), {attempts} attempts; median of "
        f"{args.runs} runs; {'SPELL_WORKERS=1' if args.worker == '1' else 'worker off'}; "
        f"{info['cpus']} CPUs {info['cpu_model']}; "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    print(
        c.table(
            [
                "backend",
                "casts/s",
                "answers/s",
                "raw reserve/s",
                "raw/http",
                "srv CPU ms/ans",
                "accepted per run",
                "no overspend",
                f">={TARGET_CASTS_PER_S:g}/s",
            ],
            rows,
        )
    )
    for r in raw:
        for part in ("raw_reserve", "http"):
            bad = [k for k, v in r[part]["checks"].items() if not v]
            if bad:
                print(
                    f"CHECK FAILED run {r['run']} {r['backend']} {part}: {bad} -> {r[part]}",
                    file=sys.stderr,
                )
    out = c.write_json(
        "hot_account" if args.worker == "1" else "hot_account_noworker",
        {
            "benchmark": "hot_account",
            "worker": args.worker,
            "command": " ".join([".venv/bin/python", "bench/hot_account.py", *sys.argv[1:]]),
            "quick": args.quick,
            "runs": args.runs,
            "clients": args.clients,
            "machine": info,
            "wall_s": round(time.monotonic() - t0, 1),
            "summary": summary,
            "raw": raw,
        },
    )
    print(f"wrote {out.relative_to(c.ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="cap of 300 casts instead of --accepted")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--accepted", type=int, default=1200, help="casts the cap allows (full mode)")
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument(
        "--worker",
        choices=["1", "off"],
        default="1",
        help="off: the API alone (bench/_serve_noworker.py), no background hello runs",
    )
    sys.exit(asyncio.run(main(p.parse_args())))
