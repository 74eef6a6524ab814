"""Benchmark 2: rate-limit adherence against a strict provider.

    python -m bench.bench_ratelimit [--rows 6000] [--rpm 3000] [--latency-ms 100]

The simulated provider enforces ``rpm`` per 60 s and rpm/6 per 10 s (strict) and answers
each accepted request after ``latency_ms``; the job has ``limits.rpm`` equal to it and runs
as ``batchrun run SPEC --no-dashboard`` in a subprocess. Checked: no 429 at all, no lost
row (every input id in the results), the ledger's window maxima, and the achieved rate
rows / (last arrival - first arrival) * 60 as a share of ``rpm``. The limiter paces the
10 s window at (10 s + 0.17 s) / (rpm/6) per slot, so its ceiling is 10 / 10.17 = 98.3%.
"""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq

from bench.common import emit, prompts_file, provider, results, run_cli, write_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--rpm", type=int, default=3000)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    with provider(rpm=args.rpm, latency_ms=args.latency_ms) as srv:
        spec = write_spec("ratelimit", args.rows, srv.base_url, shard_rows=2000,
                          limits={"rpm": args.rpm, "max_concurrency": args.concurrency})
        summary, wall, rc = run_cli(spec)
        ledger = srv.stats()
    res = results(spec)
    want = set(pq.read_table(prompts_file(args.rows), columns=["id"])["id"].to_pylist())
    lost = len(want - res["ids"])
    by = ledger["by_outcome"]
    n429 = by.get("rate_limited", 0) + by.get("storm", 0) + by.get("too_large", 0)
    span = ledger["last_arrival"] - ledger["first_arrival"]
    rate = args.rows / span * 60
    share = rate / args.rpm
    emit("ratelimit", {
        "rows": args.rows, "rpm": args.rpm, "latency_ms": args.latency_ms, "exit_code": rc,
        "http_429": n429, "lost_rows": lost, "rows_ok": res["ok"],
        "requests": ledger["total_requests"], "by_outcome": by,
        "max_arrivals_60s": ledger["max_arrivals_60s"],
        "max_arrivals_10s": ledger["max_arrivals_10s"],
        "arrival_span_s": round(span, 2), "achieved_rpm": round(rate, 1),
        "share_of_rpm": round(share, 4), "design_ceiling": round(10 / 10.17, 4),
        "ray_startup_s": summary.get("ray_startup_s"), "summary_wall_s": summary.get("wall_s"),
        "process_wall_s": round(wall, 2),
        "met": (n429 == 0 and lost == 0 and ledger["max_arrivals_60s"] <= args.rpm
                and ledger["max_arrivals_10s"] <= args.rpm // 6 and share >= 0.98),
    })


if __name__ == "__main__":
    main()
