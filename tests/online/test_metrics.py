"""batchrun's custom metrics reach the node's Prometheus endpoint, tagged with the job.

A real job (``run_job`` in a background thread, on the session's local Ray, whose
``metrics_report_interval_ms`` is 1 s) against a real loopback provider that is slow
and fails some requests; the endpoint is scraped while the job runs.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import ray

from batchrun.runner import RunOptions, run_job
from batchrun.sim import MockConfig, start_in_thread
from tests.conftest import make_prompts, write_spec

ROWS = 400

# metric (as Prometheus names it) -> what a matching series must also contain
WANTED = {
    "ray_batchrun_requests_total": 'status="ok"',
    "ray_batchrun_requests_total ": 'status="error"',  # same metric, the other status
    "ray_batchrun_input_tokens_total": "",
    "ray_batchrun_output_tokens_total": "",
    "ray_batchrun_cost_usd_total": "",
    "ray_batchrun_latency_ms_bucket": 'le="100.0"',
    "ray_batchrun_latency_ms_count": "",
    "ray_batchrun_limiter_wait_ms_total": "",
    "ray_batchrun_in_flight": "",
    "ray_batchrun_rows_remaining": "",
}


def _endpoints() -> list[str]:
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n["Alive"]]


def _scrape() -> str:
    texts = []
    for url in _endpoints():
        with urllib.request.urlopen(url, timeout=5) as r:
            texts.append(r.read().decode())
    return "\n".join(texts)


def _series(text: str, name: str, job: str, extra: str) -> list[tuple[str, float]]:
    """Sample lines of ``name`` carrying job=``job`` (and ``extra``): (labels, value)."""
    pat = re.compile(rf"^{re.escape(name.strip())}\{{(.*)\}} (\S+)$", re.M)
    return [(m[1], float(m[2])) for m in pat.finditer(text)
            if f'job="{job}"' in m[1] and extra in m[1]]


def _missing(text: str, job: str) -> list[str]:
    return [n.strip() + (f"{{{x}}}" if x else "") for n, x in WANTED.items()
            if not _series(text, n, job, x)]


def test_metrics_exported_with_job_tag(ray_session: None, tmp_path: Path) -> None:
    job = f"metrics-{secrets.token_hex(3)}"
    make_prompts(tmp_path / "in.parquet", ROWS, row_group=100)
    box: dict[str, Any] = {}
    with start_in_thread(MockConfig(latency_ms=50, fail_rate=0.1)) as provider:
        # 3,000 RPM = 50 rows/s: under the provider's pace (4 x 20/s), so the limiter makes
        # workers wait; one attempt per row, so the provider's 500s end as row errors
        spec = write_spec(tmp_path, name=job, limits={"rpm": 3000, "max_concurrency": 4},
                          retry={"max_attempts": 1}, shard_rows=100, flush_rows=20,
                          endpoint={"base_url": provider.base_url})

        def run() -> None:
            try:
                box["summary"] = run_job(str(spec), RunOptions(progress=False))
            except BaseException as e:  # re-raised in the test thread
                box["error"] = e

        thread = threading.Thread(target=run, daemon=True)
        t0 = time.monotonic()
        thread.start()
        missing = list(WANTED)
        while time.monotonic() - t0 < 60:
            missing = _missing(_scrape(), job)
            if not missing or "error" in box:
                break
            time.sleep(0.5)
        seen_s = time.monotonic() - t0
        thread.join(120)
    assert "error" not in box, box.get("error")
    assert not missing, f"not exported after {seen_s:.0f} s: {missing}"
    print(f"all batchrun metrics seen {seen_s:.1f} s after the start")

    # once the job is done (and one report interval later), the totals add up -- up to
    # what the workers counted in their last report interval: the job kills its actors
    # when it ends, and Ray exports a process's metrics only every interval (a known gap)
    time.sleep(2.5)
    text, summary = _scrape(), box["summary"]
    assert summary.rows == ROWS
    done = sum(v for _, v in _series(text, "ray_batchrun_requests_total", job, ""))
    assert 0.9 * ROWS <= done <= ROWS
    assert sum(v for _, v in _series(text, "ray_batchrun_rows_remaining", job, "")) == 0
    assert sum(v for _, v in _series(text, "ray_batchrun_cost_usd_total", job, "")) > 0
