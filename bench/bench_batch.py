"""Benchmark 5: batch mode (Batch API) wall time and driver memory, and its cost estimate.

    python -m bench.bench_batch [--rows 100000] [--batch-delay-s 60]

The simulated provider (own process) completes each batch ``batch_delay_s`` after it is
created. The job (``mode: batch``, endpoint = the provider) runs as
``batchrun run SPEC --no-dashboard`` in a subprocess; batch mode starts no Ray, so the
driver and its descendants (none expected) are sampled for PSS every 0.5 s. The cost of
the same job online and through the Batch API comes from ``batchrun estimate SPEC --json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil

from bench.common import (
    MODEL,
    cli_cmd,
    emit,
    mib,
    parse_summary,
    provider,
    results,
    sample_tree,
    write_spec,
)


def estimate(spec: str) -> dict[str, object]:
    p = subprocess.run([sys.executable, "-m", "batchrun", "estimate", spec, "--json"],
                       capture_output=True, text=True, check=True)
    est = json.loads(p.stdout)["estimate"]
    online, batch = est["online"], est["batch"] or {}
    return {"model": est["model"], "prompt_tokens": est["prompt_tokens"],
            "online_expected_usd": online["expected_usd"],
            "online_worst_usd": online["worst_usd"],
            "batch_expected_usd": batch.get("expected_usd"),
            "batch_worst_usd": batch.get("worst_usd"),
            "batch_over_online": (round(batch["expected_usd"] / online["expected_usd"], 3)
                                  if batch else None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch-delay-s", type=float, default=60.0)
    args = ap.parse_args()
    with provider(batch_delay_s=args.batch_delay_s) as srv:
        spec = write_spec("batch", args.rows, srv.base_url, mode="batch",
                          limits={"rpm": 100_000_000, "max_concurrency": 128})
        t0 = time.monotonic()
        job = subprocess.Popen(cli_cmd(spec), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        driver = psutil.Process(job.pid)
        peak_driver = peak_all = 0
        n_desc = 0
        while job.poll() is None:
            s = sample_tree(driver)
            peak_driver, peak_all = max(peak_driver, s["driver"]), max(peak_all, s["all"])
            n_desc = max(n_desc, len(s["by_name"]))
            time.sleep(0.5)
        wall = time.monotonic() - t0
        summary = parse_summary(job.stdout.read() if job.stdout else "")
    res = results(spec)
    emit("batch", {
        "rows": args.rows, "batch_delay_s": args.batch_delay_s, "exit_code": job.returncode,
        "rows_ok": res["ok"], "distinct_ids": len(res["ids"]),
        "process_wall_s": round(wall, 1), "summary_wall_s": summary.get("wall_s"),
        "ray_startup_s": summary.get("ray_startup_s"),
        "peak_driver_pss_mib": mib(peak_driver), "peak_driver_tree_pss_mib": mib(peak_all),
        "driver_descendants": n_desc, "estimate_model": MODEL, **estimate(str(spec)),
    })


if __name__ == "__main__":
    main()
