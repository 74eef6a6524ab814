"""Benchmark: task embeddings (many rows per request) against chat (one row per request).

    python -m bench.bench_embeddings [--rows 200000] [--per-request 128] [--dimensions 256]
                                     [--concurrency 32] [--chat-rows 200000]

One no-latency, no-limit simulated provider in its own process, one run, in this order:
a bare aiohttp loop sending the embedding requests batchrun would send (``--per-request``
inputs each, base64, the same dimensions; the answers read, not decoded), the embeddings
job, then the chat job on the same prompts at one row per request (``run_job`` in this
process, local Ray without dashboard). Rates are steady state: rows / (first started_at ..
last finished_at) of the results, as in bench_overhead; Ray's start-up is apart.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import pyarrow.parquet as pq

import batchrun.runner as runner
from bench.common import bare_loop, emit, machine, prompts_file, provider, results, write_spec

EMBED_MODEL = "text-embedding-3-small"


def embedding_bodies(rows: int, per: int, dims: int) -> list[bytes]:
    texts = pq.read_table(prompts_file(rows), columns=["prompt"])["prompt"].to_pylist()
    return [json.dumps({"model": EMBED_MODEL, "input": texts[i:i + per],
                        "encoding_format": "base64", "dimensions": dims}).encode()
            for i in range(0, len(texts), per)]


def _job(name: str, rows: int, url: str, concurrency: int, **over: Any) -> dict[str, Any]:
    spec = write_spec(name, rows, url, limits={"rpm": 100_000_000,
                                               "max_concurrency": concurrency}, **over)
    summary = runner.run_job(str(spec), runner.RunOptions(progress=False,
                                                          include_dashboard=False))
    res = results(spec)
    return {"rows": res["rows"], "ok": res["ok"], "distinct_ids": len(res["ids"]),
            "steady_rows_per_s": round(res["rows"] / res["span_s"], 1),
            "summary_wall_s": round(summary.wall_s, 2),
            "ray_startup_s": round(summary.ray_startup_s or 0.0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--chat-rows", type=int, default=200_000)
    ap.add_argument("--per-request", type=int, default=128)
    ap.add_argument("--dimensions", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--flush-rows", type=int, default=None,
                    help="the embeddings job's flush_rows (default: the spec's, 2,048)")
    args = ap.parse_args()
    print(machine())
    payloads = embedding_bodies(args.rows, args.per_request, args.dimensions)
    with provider() as srv:
        loop = bare_loop(srv.base_url, payloads, args.concurrency, path="/embeddings")
        bare = {"requests": len(payloads), "ok": loop["ok"],
                "rows_per_s": round(args.rows / loop["seconds"], 1)}
        print(f"bare loop: {bare}")
        srv.reset()
        emb = _job("embeddings", args.rows, srv.base_url, args.concurrency,
                   task="embeddings", model=EMBED_MODEL, generation=None,
                   workers=args.workers, embedding={"dimensions": args.dimensions,
                                                    "inputs_per_request": args.per_request},
                   **({"flush_rows": args.flush_rows} if args.flush_rows else {}))
        emb["requests"] = srv.stats()["total_requests"]
        print(f"embeddings: {emb}")
        srv.reset()
        time.sleep(3)  # let Ray's shut-down processes exit first
        chat = _job("embeddings-chat", args.chat_rows, srv.base_url, 128,
                    workers=args.workers)
        print(f"chat: {chat}")
    ratio = emb["steady_rows_per_s"] / chat["steady_rows_per_s"]
    emit("embeddings", {
        "rows": args.rows, "per_request": args.per_request, "dimensions": args.dimensions,
        "concurrency": args.concurrency, "workers": args.workers,
        "flush_rows": args.flush_rows or "default",
        "bare_embeddings_rows_per_s": bare["rows_per_s"], "bare_ok_requests": bare["ok"],
        "embeddings": emb, "chat_one_row_per_request": chat,
        "embeddings_over_chat": round(ratio, 2), "target": 5.0, "met": ratio >= 5.0,
        "embeddings_share_of_bare": round(emb["steady_rows_per_s"] / bare["rows_per_s"], 3),
    })


if __name__ == "__main__":
    main()
