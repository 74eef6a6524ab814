"""Benchmark: a job on a self-hosted engine (``engine:``, two replicas) against a bare
aiohttp loop on two servers of the same command, in the same run.

    python -m bench.bench_engine [--rows 6000] [--latency-ms 200] [--per-replica 64]

The engine is batchrun's simulated provider (``python -m batchrun mock-server --port
{port} --latency-ms L``): batchrun reserves two ``{CPU: 1}`` bundles, starts a server on
each, routes rows over them (``max_concurrency_per_replica`` each) and stops them. The
baseline starts two servers of the same command itself and runs one aiohttp loop per
server with the same concurrency, before and after batchrun. Ideal: 2 x per-replica /
latency. batchrun's rate is steady state: rows / (min(started_at) .. max(finished_at)) of
its results; its wall time with the replicas' start-up and stop is reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from bench.common import ROOT, bodies, emit, machine, provider, results, run_cli, write_spec


async def _loop(url: str, payloads: list[bytes], concurrency: int) -> tuple[int, int]:
    """POST every body with ``concurrency`` in flight; (ok answers, completion tokens)."""
    ok = tokens = 0
    it = iter(payloads)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 8)) as s:

        async def lane() -> None:
            nonlocal ok, tokens
            for body in it:
                async with s.post(url, data=body, headers=headers) as r:
                    raw = await r.read()
                if r.status == 200:
                    ok += 1
                    tokens += orjson.loads(raw)["usage"]["completion_tokens"]

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return ok, tokens


def bare_two(urls: list[str], payloads: list[bytes], concurrency: int) -> dict[str, float]:
    """Half the bodies to each server, both loops at once, in one process."""
    halves = [payloads[i::len(urls)] for i in range(len(urls))]

    async def both() -> list[tuple[int, int]]:
        return await asyncio.gather(*(_loop(u + "/chat/completions", h, concurrency)
                                      for u, h in zip(urls, halves, strict=True)))

    t0 = time.monotonic()
    got = asyncio.run(both())
    secs = time.monotonic() - t0
    ok, tokens = sum(g[0] for g in got), sum(g[1] for g in got)
    return {"ok": ok, "seconds": secs, "rows_per_s": ok / secs, "tokens_per_s": tokens / secs}


def _tokens(spec: Path) -> int:
    out = Path(yaml.safe_load(spec.read_text())["output"]) / "results"
    files = sorted(out.glob("shard-*.parquet"))
    t = pq.ParquetDataset([str(f) for f in files]).read(columns=["completion_tokens"])
    return int(pc.sum(t["completion_tokens"]).as_py() or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--per-replica", type=int, default=64)
    ap.add_argument("--bare-rows", type=int, default=4000)
    args = ap.parse_args()
    ideal = 2 * args.per_replica / (args.latency_ms / 1000)
    payloads = bodies(args.rows, args.bare_rows)
    bare = []
    with provider(latency_ms=args.latency_ms) as a, provider(latency_ms=args.latency_ms) as b:
        bare.append(bare_two([a.base_url, b.base_url], payloads, args.per_replica))
    print(f"bare loop 1: {bare[0]['rows_per_s']:,.1f} rows/s")
    command = (f"env PYTHONPATH={ROOT} {sys.executable} -m batchrun mock-server --host {{host}} "
               f"--port {{port}} --latency-ms {args.latency_ms:g}")
    spec = write_spec("engine", args.rows, "http://127.0.0.1:1/v1", limits={}, engine={
        "command": command, "replicas": 2, "resources": {"CPU": 1},
        "max_concurrency_per_replica": args.per_replica, "startup_timeout_s": 120})
    summary, wall, rc = run_cli(spec)
    res = results(spec)
    tokens = _tokens(spec)
    with provider(latency_ms=args.latency_ms) as a, provider(latency_ms=args.latency_ms) as b:
        bare.append(bare_two([a.base_url, b.base_url], payloads, args.per_replica))
    print(f"bare loop 2: {bare[1]['rows_per_s']:,.1f} rows/s")
    steady = res["rows"] / res["span_s"]
    bare_rate = sum(x["rows_per_s"] for x in bare) / len(bare)
    emit("engine", {
        "machine": machine(), "rows": args.rows, "latency_ms": args.latency_ms,
        "replicas": 2, "per_replica": args.per_replica, "exit_code": rc, "rows_ok": res["ok"],
        "distinct_ids": len(res["ids"]), "ideal_rows_per_s": ideal,
        "batchrun_steady_rows_per_s": round(steady, 1),
        "batchrun_steady_tokens_per_s": round(tokens / res["span_s"], 1),
        "batchrun_wall_s_with_engine_start_stop": round(wall, 1),
        "engine_reserved_s": (summary.get("engine") or {}).get("reserved_s"),
        "bare_rows_per_s": [round(x["rows_per_s"], 1) for x in bare],
        "bare_tokens_per_s": [round(x["tokens_per_s"], 1) for x in bare],
        "batchrun_share_of_bare": round(steady / bare_rate, 3),
        "batchrun_share_of_ideal": round(steady / ideal, 3), "cwd": os.getcwd(),
    })


if __name__ == "__main__":
    main()
