"""Benchmark: the same job with input and output on a local S3 server vs on local paths.

    python -m bench.bench_storage [--rows 100000] [--rounds 2]

A no-latency simulated provider and a moto S3 server (``python -m moto.server``), each
in its own process. In one session the job runs alternately on local paths and on
``s3://`` (input uploaded once, a fresh output prefix each round), in this process via
``run_job`` (a local Ray without dashboard each time). The rate is steady state: rows /
(min(started_at) .. max(finished_at)) of the results files, so Ray's start-up and the
job's set-up are apart. Target: S3 at least 90% of local.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import batchrun.runner as runner
from bench.common import WORK, emit, machine, prompts_file, provider, results, write_spec


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_results(fs: pafs.FileSystem, prefix: str) -> dict[str, Any]:
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{prefix}/results"))
             if i.base_name.startswith("shard-")]
    t = pq.read_table(files, filesystem=fs, columns=["id", "status", "started_at",
                                                     "finished_at"])
    first, last = pc.min(t["started_at"]).as_py(), pc.max(t["finished_at"]).as_py()
    return {"rows": t.num_rows, "ok": pc.sum(pc.equal(t["status"], "ok")).as_py() or 0,
            "ids": len(set(t["id"].to_pylist())), "span_s": (last - first).total_seconds()}


def one(name: str, rows: int, url: str, **over: Any) -> dict[str, Any]:
    spec = write_spec(name, rows, url, **over)
    t0 = time.monotonic()
    summary = runner.run_job(str(spec), runner.RunOptions(progress=False,
                                                          include_dashboard=False))
    return {"summary_rows_per_s": summary.rows_per_s, "e2e_s": time.monotonic() - t0,
            "ok": summary.ok, "spec": spec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(machine())
    src = prompts_file(args.rows)
    with s3_server() as s3url, provider() as srv:
        os.environ.update(AWS_ENDPOINT_URL=s3url, AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")
        fs = pafs.S3FileSystem(endpoint_override=s3url, region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir("bench")
        pafs.copy_files(str(src), "bench/in/prompts.parquet",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        local_rates, s3_rates, rounds = [], [], []
        for r in range(args.rounds):
            srv.reset()
            loc = one("storage-local", args.rows, srv.base_url)
            lres = results(loc["spec"])
            srv.reset()
            s3 = one("storage-s3", args.rows, srv.base_url,
                     input="s3://bench/in/", output=f"s3://bench/out-{r}/")
            sres = s3_results(fs, f"bench/out-{r}")
            lrate, srate = lres["rows"] / lres["span_s"], sres["rows"] / sres["span_s"]
            local_rates.append(lrate)
            s3_rates.append(srate)
            rounds.append({"round": r, "local_rows_per_s": round(lrate, 1),
                           "s3_rows_per_s": round(srate, 1),
                           "local_ok": loc["ok"], "s3_ok": s3["ok"], "s3_distinct": sres["ids"],
                           "local_e2e_s": round(loc["e2e_s"], 1),
                           "s3_e2e_s": round(s3["e2e_s"], 1)})
            print(rounds[-1], flush=True)
    local, s3 = sum(local_rates) / len(local_rates), sum(s3_rates) / len(s3_rates)
    emit("storage", {"rows": args.rows, "rounds": rounds,
                     "local_steady_rows_per_s": round(local, 1),
                     "s3_steady_rows_per_s": round(s3, 1), "share": round(s3 / local, 3),
                     "target_share": 0.9, "met": s3 / local >= 0.9,
                     "work_dir": str(WORK)})


if __name__ == "__main__":
    main()
