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
answers / (last arrival - first arrival) x 60, as a share of ``rpm``, and the pace per
10 s from the provider's ledger file (stalled windows: under 90% of rpm/6). With
``--with-cli``, the same rows through ``batchrun run`` as well: the limiter's baseline on
this machine at the same moment (these machines are shared; a loaded one drops slots).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import ray

from bench.common import (
    MAX_TOKENS,
    MODEL,
    WORK,
    emit,
    machine,
    prompts_file,
    provider,
    run_cli,
    write_spec,
)


def _ledger_file(side: str) -> Path:
    path = WORK / f"ray_data_{side}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return path


def _timeline(path: Path, rpm: int) -> dict[str, Any]:
    """Accepted arrivals per 10 s from the provider's ledger file: how steady the pace was
    (a window under 90% of rpm/6 is a stall: a loaded machine, or the pipeline idle)."""
    times = sorted(r["t"] for r in map(json.loads, path.read_text().splitlines())
                   if r.get("outcome") == "ok")
    if not times:
        return {}
    counts = [0] * (int((times[-1] - times[0]) // 10) + 1)
    for t in times:
        counts[int((t - times[0]) // 10)] += 1
    full = counts[:-1] or counts  # the last window is cut short by the end of the rows
    return {"windows_10s": len(full), "stalled_windows": sum(c < 0.9 * rpm / 6 for c in full),
            "min_10s": min(full), "median_10s": sorted(full)[len(full) // 2]}


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

    ledger = _ledger_file("batchrun")
    with provider(rpm=args.rpm, latency_ms=args.latency_ms, ledger_file=str(ledger)) as srv:
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
        figures = _ledger(srv, n, ok, args.rows, args.rpm)
    return {**figures, "wall_s": round(wall, 1), **_timeline(ledger, args.rpm)}


def run_cli_job(args: argparse.Namespace) -> dict[str, Any]:
    """The baseline of the same machine at the same moment: the same rows through
    ``batchrun run`` (its own Ray, 2 workers), the limiter the pipeline reuses."""
    ledger = _ledger_file("cli")
    with provider(rpm=args.rpm, latency_ms=args.latency_ms, ledger_file=str(ledger)) as srv:
        spec = write_spec("ray_data_cli", args.rows, srv.base_url,
                          limits={"rpm": args.rpm, "max_concurrency": 64})
        summary, wall, rc = run_cli(spec)
        figures = _ledger(srv, summary.get("rows", 0), summary.get("ok", 0), args.rows,
                          args.rpm)
    return {**figures, "wall_s": round(wall, 1), "exit_code": rc,
            **_timeline(ledger, args.rpm)}


def run_ray_llm(path: str, args: argparse.Namespace) -> dict[str, Any]:
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    qps = args.qps or max(1, args.rpm // 60 // args.actors)
    ledger = _ledger_file("ray_llm")
    with provider(rpm=args.rpm, latency_ms=args.latency_ms, ledger_file=str(ledger)) as srv:
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
        figures = _ledger(srv, n, ok, args.rows, args.rpm)
    return {**figures, "wall_s": round(wall, 1), **_timeline(ledger, args.rpm),
            "qps_per_actor": qps, "max_retries": args.max_retries, "pipeline_error": error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--rpm", type=int, default=3000)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--actors", type=int, default=4)
    ap.add_argument("--max-retries", type=int, default=3)
    ap.add_argument("--only", choices=["batchrun", "ray-llm"], default=None)
    ap.add_argument("--qps", type=int, default=None,
                    help="Ray Data LLM's qps per actor (default: the limit's per-actor share)")
    ap.add_argument("--with-cli", action="store_true",
                    help="also the same rows through `batchrun run`: the machine's baseline")
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
    if args.with_cli:
        figures["cli_baseline"] = run_cli_job(args)
        print("cli baseline:", figures["cli_baseline"], flush=True)
    emit("ray_data", figures)


if __name__ == "__main__":
    main()
