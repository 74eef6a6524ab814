"""Benchmark: a Ray Data pipeline against a strict provider, batchrun's limiter vs Ray Data LLM.

    python -m bench.bench_ray_data [--rows 20000] [--rpm 3000] [--latency-ms 100] [--actors 4]

The same rows (``bench/data/p<rows>.parquet``) go through two pipelines, one after the
other, each against a fresh simulated provider (its own process) that enforces ``rpm``
per 60 s and rpm/6 per 10 s (strict), on one local Ray:

- ``batchrun.ray_data.complete(ds, spec, concurrency=actors)``, ``limits.rpm = rpm``;
- Ray Data LLM's HTTP stage, ``build_processor(HttpRequestProcessorConfig(url=...,
  qps=..., concurrency=actors, max_retries=...))``: ``qps`` is the documented way to
  stay under a provider's limit, and each actor paces itself, so it gets the limit's
  per-actor share (rpm / 60 / actors, rounded down: it takes an int).

Figures per side, from the provider's ledger and the rows that came out: 429s received,
rows lost (no output row) or failed (status error), and the achieved rate, accepted
answers / (last arrival - first arrival) x 60, as a share of ``rpm``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import ray

from bench.common import MAX_TOKENS, MODEL, emit, machine, prompts_file, provider


def _ledger(srv: Any, rows_out: int, ok_rows: int, rows: int, rpm: int) -> dict[str, Any]:
    st = srv.stats()
    by = st["by_outcome"]
    span = max(st["last_arrival"] - st["first_arrival"], 1e-9)
    accepted = by.get("ok", 0)
    return {"http_429": by.get("rate_limited", 0) + by.get("storm", 0),
            "requests": st["total_requests"], "by_outcome": by,
            "rows_out": rows_out, "rows_lost": rows - rows_out, "rows_failed": rows_out - ok_rows,
            "max_arrivals_60s": st["max_arrivals_60s"], "max_arrivals_10s": st["max_arrivals_10s"],
            "arrival_span_s": round(span, 1), "achieved_rpm": round(accepted / span * 60, 1),
            "share_of_rpm": round(accepted / span * 60 / rpm, 4)}


def run_batchrun(path: str, args: argparse.Namespace) -> dict[str, Any]:
    import batchrun.ray_data as brd

    with provider(rpm=args.rpm, latency_ms=args.latency_ms) as srv:
        spec = {"name": "bench-ray-data", "prompt_column": "prompt", "model": MODEL,
                "endpoint": {"base_url": srv.base_url},
                "generation": {"max_tokens": MAX_TOKENS, "temperature": 0.2},
                "limits": {"rpm": args.rpm, "max_concurrency": 64}}
        t0 = time.monotonic()
        ds = ray.data.read_parquet(path).repartition(4 * args.actors)
        out = brd.complete(ds, spec, concurrency=args.actors)
        n = ok = 0
        for b in out.iter_batches(batch_format="pyarrow", batch_size=None):
            n += b.num_rows
            ok += sum(s == "ok" for s in b["status"].to_pylist())
        wall = time.monotonic() - t0
        return {**_ledger(srv, n, ok, args.rows, args.rpm), "wall_s": round(wall, 1)}


def run_ray_llm(path: str, args: argparse.Namespace) -> dict[str, Any]:
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    qps = max(1, args.rpm // 60 // args.actors)
    with provider(rpm=args.rpm, latency_ms=args.latency_ms) as srv:
        config = HttpRequestProcessorConfig(
            url=srv.base_url + "/chat/completions", qps=qps, concurrency=args.actors,
            max_retries=args.max_retries, batch_size=64)
        proc = build_processor(
            config,
            preprocess=lambda row: {"payload": {
                "model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0.2,
                "messages": [{"role": "user", "content": row["prompt"]}]}},
            postprocess=lambda row: {"id": row["id"],
                                     "ok": "choices" in (row.get("http_response") or {})})
        t0 = time.monotonic()
        n = ok = 0
        error = None
        try:
            ds = ray.data.read_parquet(path).repartition(4 * args.actors)
            for b in proc(ds).iter_batches(batch_format="pyarrow", batch_size=None):
                n += b.num_rows
                ok += sum(bool(x) for x in b["ok"].to_pylist())
        except Exception as e:  # the stage raises once a row's retries are spent
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        wall = time.monotonic() - t0
        return {**_ledger(srv, n, ok, args.rows, args.rpm), "wall_s": round(wall, 1),
                "qps_per_actor": qps, "max_retries": args.max_retries, "pipeline_error": error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--rpm", type=int, default=3000)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--actors", type=int, default=4)
    ap.add_argument("--max-retries", type=int, default=3)
    ap.add_argument("--only", choices=["batchrun", "ray-llm"], default=None)
    args = ap.parse_args()
    path = str(prompts_file(args.rows))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    figures: dict[str, Any] = {"rows": args.rows, "rpm": args.rpm, "actors": args.actors,
                               "latency_ms": args.latency_ms, "machine": machine()}
    if args.only in (None, "batchrun"):
        figures["batchrun"] = b = run_batchrun(path, args)
        figures["met"] = (b["http_429"] == 0 and b["rows_lost"] == 0 and b["rows_failed"] == 0
                          and b["share_of_rpm"] >= 0.98)
        print("batchrun:", b, flush=True)
    if args.only in (None, "ray-llm"):
        figures["ray_data_llm"] = run_ray_llm(path, args)
        print("ray_data_llm:", figures["ray_data_llm"], flush=True)
    emit("ray_data", figures)


if __name__ == "__main__":
    main()
