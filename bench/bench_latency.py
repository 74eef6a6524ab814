"""Benchmark 3: a latency-bound job reaches concurrency / latency.

    python -m bench.bench_latency [--rows 8000] [--latency-ms 500] [--concurrency 200]
                                  [--shard-rows N]

The simulated provider answers every request after ``latency_ms`` with no limit, so the
ideal rate is concurrency / latency (200 / 0.5 s = 400 rows/s). batchrun runs as
``batchrun run SPEC --no-dashboard`` (subprocess, ``workers: 2``, ``max_concurrency``
= concurrency, no-op RPM, the spec's default ``shard_rows`` unless given: 8,000 rows are
fewer than workers x shard_rows, the small job whose concurrency must still follow the
work); a bare aiohttp loop with the same concurrency on the same server runs before it,
in the same run, as the baseline. batchrun's rate is steady state: rows /
(min(started_at) .. max(finished_at)) of its results. Met: >= 90% of the bare loop.
"""

from __future__ import annotations

import argparse

from bench.common import bare_loop, bodies, emit, provider, results, run_cli, write_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--latency-ms", type=float, default=500.0)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--bare-rows", type=int, default=4000)
    ap.add_argument("--shard-rows", type=int, default=None, help="default: the spec's")
    args = ap.parse_args()
    ideal = args.concurrency / (args.latency_ms / 1000)
    with provider(latency_ms=args.latency_ms) as srv:
        bare = bare_loop(srv.base_url, bodies(args.rows, args.bare_rows), args.concurrency)
        print(f"bare loop: {bare['rows_per_s']:,.1f} rows/s")
        shards = {} if args.shard_rows is None else {"shard_rows": args.shard_rows}
        spec = write_spec("latency", args.rows, srv.base_url, **shards,
                          limits={"rpm": 100_000_000, "max_concurrency": args.concurrency})
        summary, wall, rc = run_cli(spec)
    res = results(spec)
    steady = res["rows"] / res["span_s"]
    emit("latency", {
        "rows": args.rows, "latency_ms": args.latency_ms, "concurrency": args.concurrency,
        "exit_code": rc, "rows_ok": res["ok"], "ideal_rows_per_s": ideal,
        "batchrun_steady_rows_per_s": round(steady, 1),
        "batchrun_share_of_ideal": round(steady / ideal, 3),
        "bare_rows": bare["requests"], "bare_rows_per_s": round(bare["rows_per_s"], 1),
        "bare_share_of_ideal": round(bare["rows_per_s"] / ideal, 3),
        "shard_rows": args.shard_rows or "default",
        "batchrun_share_of_bare": round(steady / bare["rows_per_s"], 3),
        "ray_startup_s": summary.get("ray_startup_s"), "summary_wall_s": summary.get("wall_s"),
        "process_wall_s": round(wall, 2), "met": steady >= 0.9 * bare["rows_per_s"],
    })


if __name__ == "__main__":
    main()
