"""Benchmark 1: batchrun's overhead against a bare aiohttp loop, same server, same run.

    python -m bench.bench_overhead [--rows 100000] [--concurrency 128] [--workers 2]

A no-latency, no-limit simulated provider in its own process. Order: bare loop, batchrun
(in this process via ``run_job``, local Ray without dashboard), bare loop again, and last
a bare loop on uvloop (batchrun's workers run on uvloop: a second, stricter baseline). The
batchrun rate is steady state: rows / (min(started_at) .. max(finished_at)) of the results;
Ray start-up and end-to-end wall time are reported apart. The limiter's ``stats()`` is
read just before the job's actors are removed (a wrapper around ``_stop_actors``).
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from typing import Any

import psutil
import ray

import batchrun.runner as runner
from bench.common import bare_loop, bodies, emit, machine, provider, results, write_spec

LIMITER: dict[str, Any] = {}


class CpuMeter:
    """CPU seconds (user + system) by process kind, of this process's descendants and of
    the provider, sampled every 0.5 s so that processes which exit still count."""

    def __init__(self, provider_pid: int) -> None:
        self.me, self.provider = psutil.Process(), provider_pid
        self.last: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()

    def _kind(self, p: psutil.Process) -> str:
        if p.pid == self.provider:
            return "provider"
        cmd = " ".join(p.cmdline())
        return ("worker" if "ray::Worker" in cmd else "limiter" if "ray::RateLimiter" in cmd
                else "ray")

    def sample(self) -> None:
        for p in self.me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                kind = self.last.get(p.pid, ("ray", 0.0))[0]
                kind = kind if kind != "ray" else self._kind(p)  # an idle worker turns actor
                t = p.cpu_times()
                self.last[p.pid] = (kind, t.user + t.system)
        t = self.me.cpu_times()
        self.last[self.me.pid] = ("driver", t.user + t.system)

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, secs in self.last.values():
            out[kind] = round(out.get(kind, 0.0) + secs, 2)
        return out

    def __enter__(self) -> CpuMeter:
        self.sample()
        self.start = self.totals()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            self.sample()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()
        end = self.totals()
        self.used = {k: round(v - self.start.get(k, 0.0), 2) for k, v in end.items()}


def _capture_limiter_stats() -> None:
    original = runner._stop_actors

    def stop(actors: runner.JobActors) -> None:
        try:
            LIMITER.update(ray.get(actors.limiter.stats.remote(), timeout=30))
        finally:
            original(actors)

    runner._stop_actors = stop  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-rows", type=int, default=10_000)
    args = ap.parse_args()
    print(machine())
    payloads = bodies(args.rows)
    with provider() as srv:
        with CpuMeter(srv.pid) as bare_cpu:
            before = bare_loop(srv.base_url, payloads, args.concurrency)
        print(f"bare loop (before): {before['rows_per_s']:,.0f} rows/s")
        srv.reset()
        spec = write_spec("overhead", args.rows, srv.base_url, workers=args.workers,
                          shard_rows=args.shard_rows,
                          limits={"rpm": 100_000_000, "max_concurrency": args.concurrency})
        _capture_limiter_stats()
        t0 = time.monotonic()
        with CpuMeter(srv.pid) as cpu:
            summary = runner.run_job(str(spec), runner.RunOptions(progress=False,
                                                                  include_dashboard=False))
        e2e = time.monotonic() - t0
        ledger = srv.stats()
        res = results(spec)
        srv.reset()
        time.sleep(3)  # let Ray's shut-down processes exit first
        after = bare_loop(srv.base_url, payloads, args.concurrency)
        print(f"bare loop (after): {after['rows_per_s']:,.0f} rows/s")
        srv.reset()
        on_uv = bare_loop(srv.base_url, payloads, args.concurrency, uvloop=True)
        print(f"bare loop on uvloop (last): {on_uv['rows_per_s']:,.0f} rows/s")
    steady = res["rows"] / res["span_s"]
    arrivals = ledger["last_arrival"] - ledger["first_arrival"]
    bare = (before["rows_per_s"] + after["rows_per_s"]) / 2
    emit("overhead", {
        "rows": args.rows, "concurrency": args.concurrency, "workers": args.workers,
        "batchrun_rows_ok": res["ok"], "batchrun_distinct_ids": len(res["ids"]),
        "batchrun_steady_rows_per_s": round(steady, 1),
        "batchrun_ledger_rows_per_s": round(ledger["total_requests"] / arrivals, 1),
        "batchrun_summary_rows_per_s": round(summary.rows_per_s, 1),
        "ray_startup_s": round(summary.ray_startup_s or 0.0, 2),
        "summary_wall_s": round(summary.wall_s, 2), "end_to_end_s": round(e2e, 2),
        "bare_before_rows_per_s": round(before["rows_per_s"], 1),
        "bare_after_rows_per_s": round(after["rows_per_s"], 1),
        "bare_ok": [before["ok"], after["ok"]],
        "share_of_bare": round(steady / bare, 3), "target_share": 0.5,
        "bare_uvloop_rows_per_s": round(on_uv["rows_per_s"], 1),
        "share_of_bare_uvloop": round(steady / on_uv["rows_per_s"], 3),
        "met": steady / bare >= 0.5, "ledger_requests": ledger["total_requests"],
        "cpu_s_bare_loop_before": bare_cpu.used, "cpu_s_batchrun": cpu.used,
        "limiter_leases": LIMITER.get("leases"), "limiter_granted": LIMITER.get("granted"),
        # per request sent (the ledger), not per slot granted: spare slots may go unused
        "leases_per_request": (round(LIMITER["leases"] / ledger["total_requests"], 4)
                               if LIMITER.get("leases") else None),
    })


if __name__ == "__main__":
    main()
