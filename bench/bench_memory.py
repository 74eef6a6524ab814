"""Benchmark 4: memory of a streamed 1M / 10M-row job, as PSS sampled every second.

    python -m bench.bench_memory --rows 1000000
    python -m bench.bench_memory --rows 10000000 --stop-after-rows 3000000
    python -m bench.bench_memory --idle-only           # Ray's idle baseline alone

First Ray's idle baseline (``ray.init(num_cpus=2, include_dashboard=False)`` in a child,
sampled for a few seconds), then the job: ``batchrun run SPEC --no-dashboard`` as a
subprocess against a no-latency, no-limit simulated provider (own process), ``workers: 2``,
``shard_rows: 50000``. Every second: PSS of the driver, of the job's actors (cmdline
``ray::Worker`` / ``ray::RateLimiter``), of Ray's other processes (daemons, idle workers:
the driver's other descendants) and of the provider. "job" = driver + actors; "all" =
job + Ray. With ``--stop-after-rows`` the job gets SIGINT once that many rows are on disk
(it is resumable), so a 10M input can be measured over a bounded stretch.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import yaml

from bench.common import cli_cmd, emit, mib, provider, pss, sample_tree, write_spec

KEYS = ("driver", "actor", "ray", "job", "all")
IDLE = ("import ray, sys; ray.init(num_cpus=2, include_dashboard=False); "
        "print('ready', flush=True); sys.stdin.read(); ray.shutdown()")


def idle_baseline(seconds: float = 6.0) -> dict[str, float]:
    """PSS of a bare local Ray (the driver that started it included), MiB, last sample."""
    p = subprocess.Popen([sys.executable, "-c", IDLE], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdin is not None
    p.stdout.readline()
    time.sleep(seconds)  # let the pre-started workers settle
    s = sample_tree(psutil.Process(p.pid))
    p.stdin.close()
    p.wait(60)
    return {"driver_mib": mib(s["driver"]), "ray_mib": mib(s["ray"]),
            "all_mib": mib(s["all"]), "process_names": sorted(s["by_name"])}


def rows_on_disk(out: Path) -> int:
    files = list(out.glob("results/shard-*.parquet")) + list(out.glob("parts/*/part-*.parquet"))
    n = 0
    for f in files:
        with contextlib.suppress(OSError, ValueError):  # replaced between glob and read
            n += pq.read_metadata(f).num_rows
    return n


def run_job(args: argparse.Namespace) -> dict[str, Any]:
    peak: dict[str, float] = dict.fromkeys(KEYS, 0.0)
    peak_by_name: dict[str, int] = {}
    with provider() as srv:
        spec = write_spec(f"mem{args.rows}", args.rows, srv.base_url, shard_rows=50_000,
                          limits={"rpm": 100_000_000, "max_concurrency": 128})
        out = Path(yaml.safe_load(spec.read_text())["output"])
        prov = psutil.Process(srv.pid)
        t0 = time.monotonic()
        job = subprocess.Popen(cli_cmd(spec), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        driver = psutil.Process(job.pid)
        samples, prov_peak, stopped, done, last_check = 0, 0, False, 0, 0.0
        while job.poll() is None:
            s = sample_tree(driver)
            samples += 1
            for k in KEYS:
                peak[k] = max(peak[k], s.get(k, 0))
            for name, m in s["by_name"].items():
                peak_by_name[name] = max(peak_by_name.get(name, 0), m)
            prov_peak = max(prov_peak, pss(prov))
            now = time.monotonic()
            if not stopped and now - last_check >= 5:
                last_check, done = now, rows_on_disk(out)
                if args.stop_after_rows and done >= args.stop_after_rows:
                    job.send_signal(signal.SIGINT)  # the runner removes its actors
                    stopped = True
                    print(f"stopping at {done:,} rows after {now - t0:.0f} s", flush=True)
            if samples % 30 == 0:
                top = {k: mib(v) for k, v in s["by_name"].items() if v > 40 * 2**20}
                print(f"{now - t0:5.0f} s  rows {done:,}  job {mib(s['job']):.0f} MiB  all "
                      f"{mib(s['all']):.0f} MiB  driver {mib(s['driver']):.0f}  {top}",
                      flush=True)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        wall = time.monotonic() - t0
        job.wait()
    final = rows_on_disk(out)
    return {"rows_input": args.rows, "rows_done": final, "stopped_early": stopped,
            "exit_code": job.returncode, "wall_s": round(wall, 1),
            "rows_per_s": round(final / wall, 1), "samples": samples,
            **{f"peak_{k}_mib": mib(v) for k, v in peak.items()},
            "peak_provider_mib": mib(prov_peak),
            "peak_by_process_name_mib": {k: mib(v) for k, v in sorted(peak_by_name.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--stop-after-rows", type=int, default=0)
    ap.add_argument("--idle-only", action="store_true")
    args = ap.parse_args()
    idle = idle_baseline()
    print(f"Ray idle baseline (no dashboard): {idle}", flush=True)
    figures: dict[str, Any] = {"ray_idle": idle, "dashboard": False}
    if not args.idle_only:
        figures.update(run_job(args))
        figures["bound_2gb_met"] = figures["peak_job_mib"] < 2048
    emit("memory", figures)


if __name__ == "__main__":
    main()
