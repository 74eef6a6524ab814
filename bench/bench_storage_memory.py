"""Benchmark: memory of a 1M-row job with input and output on a local S3 server vs local.

    python -m bench.bench_storage_memory [--rows 1000000] [--modes s3,local]

A no-latency simulated provider and a moto S3 server (``python -m moto.server``), each in
its own process. The same job (``workers: 2``, ``shard_rows: 50000``, as benchmark 4)
runs as ``batchrun run SPEC --no-dashboard`` in a subprocess, once per mode: ``local``
(local input and output) and ``s3`` (``input: s3://bench/in/``, a fresh ``output:
s3://bench/out-N/``). Every second: PSS of the driver, of the job's actors (workers and
limiter) and of Ray's own processes (``bench.common.sample_tree``), and the rows the
provider has answered. "Flat" is judged by the job's PSS (driver + actors) at each
quarter of the rows: a store input read lazily by row groups keeps it the same shape as
a local one. The moto server's own memory is reported apart (it holds every object).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from typing import Any

import psutil
import pyarrow.fs as pafs

from bench.bench_storage import s3_server
from bench.common import (
    cli_cmd,
    emit,
    machine,
    mib,
    prompts_file,
    provider,
    pss,
    sample_tree,
    write_spec,
)

KEYS = ("driver", "actor", "ray", "job", "all")


def measure(name: str, rows: int, base_url: str, server_pid: int,
            **over: Any) -> dict[str, Any]:
    """Run one job to the end, sampling PSS every second."""
    spec = write_spec(name, rows, base_url, shard_rows=50_000,
                      limits={"rpm": 100_000_000, "max_concurrency": 128}, **over)
    peak = dict.fromkeys(KEYS, 0.0)
    quarters: dict[int, float] = {}  # quarter of the rows done -> job PSS peak in it
    s3_peak, t0 = 0, time.monotonic()
    job = subprocess.Popen(cli_cmd(spec), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    driver, srv = psutil.Process(job.pid), psutil.Process(server_pid)
    n = done = 0
    while job.poll() is None:
        now = time.monotonic()
        s = sample_tree(driver)
        for k in KEYS:
            peak[k] = max(peak[k], s.get(k, 0))
        s3_peak = max(s3_peak, pss(srv))
        if n % 5 == 0:  # the provider's count of answered rows (not every second: O(rows))
            done = provider_ok(base_url)
        q = min(3, done * 4 // rows)
        quarters[q] = max(quarters.get(q, 0.0), mib(s.get("job", 0)))
        if n % 30 == 0:
            print(f"{name} {now - t0:5.0f} s job {mib(s.get('job', 0)):.0f} MiB "
                  f"driver {mib(s['driver']):.0f} actors {mib(s['actor']):.0f}", flush=True)
        n += 1
        time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
    wall = time.monotonic() - t0
    err = job.stderr.read().decode()[-400:] if job.stderr else ""
    return {"mode": name, "exit_code": job.returncode, "wall_s": round(wall, 1),
            "rows_per_s": round(rows / wall, 1), "samples": n,
            **{f"peak_{k}_mib": mib(v) for k, v in peak.items()},
            "job_mib_by_quarter": [quarters.get(q) for q in range(4)],
            "peak_s3_server_mib": mib(s3_peak), "stderr_tail": err if job.returncode else ""}


_PROVIDER: dict[str, Any] = {}


def provider_ok(base_url: str) -> int:
    return int(_PROVIDER[base_url].stats()["ok"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--modes", default="s3,local")
    args = ap.parse_args()
    print(machine(), flush=True)
    src = prompts_file(args.rows)
    runs = []
    with s3_server() as s3url, provider() as srv:
        _PROVIDER[srv.base_url] = srv
        os.environ.update(AWS_ENDPOINT_URL=s3url, AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")
        fs = pafs.S3FileSystem(endpoint_override=s3url, region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir("bench")
        pafs.copy_files(str(src), "bench/in/prompts.parquet",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        s3_pid = next(p.pid for p in psutil.Process().children()
                      if "moto.server" in " ".join(p.cmdline()))
        for i, mode in enumerate(args.modes.split(",")):
            srv.reset()
            over = ({"input": "s3://bench/in/", "output": f"s3://bench/out-{i}/"}
                    if mode == "s3" else {})
            runs.append(measure(f"storage-mem-{mode}", args.rows, srv.base_url, s3_pid,
                                **over))
            print(runs[-1], flush=True)
    emit("storage_memory", {"rows": args.rows, "runs": runs})


if __name__ == "__main__":
    main()
