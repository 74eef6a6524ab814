"""Store faults on the way to S3 (503 SlowDown, 500, connection resets) are retried with
backoff by the SDKs; a store that stays down stops the job with one line, nothing lost."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batchrun.runner import RunOptions, run_job
from tests.conftest import make_prompts, write_spec
from tests.storage.conftest import S3_URL, keys, upload
from tests.storage.faultproxy import fault_proxy

pytestmark = pytest.mark.timeout(240)

_CYCLE = ("slowdown", "500", "reset")


def _ids(bucket: str, prefix: str) -> list[str]:
    fs = pafs.S3FileSystem(endpoint_override=S3_URL, region="us-east-1")
    finals = [f"{bucket}/{k}" for k in keys(bucket, prefix) if "/results/shard-" in k]
    return sorted(pq.read_table(finals, filesystem=fs)["id"].to_pylist())


def test_throttling_5xx_and_resets_are_retried(tmp_path: Path, ray_session: None,
                                               bucket: str, s3_server: str) -> None:
    src = upload(make_prompts(tmp_path / "in.parquet", 400, row_group=50), bucket,
                 "in/a.parquet")
    with fault_proxy(S3_URL) as proxy:
        # every fourth request of the store fails, in turn throttled, 500, reset
        proxy.plan = lambda method, path, n: _CYCLE[(n // 4) % 3] if n % 4 == 1 else None
        spec = write_spec(tmp_path, input=src, output=f"s3://{bucket}/out/",
                          simulate={"latency_ms": 0}, shard_rows=100, flush_rows=40,
                          storage={"endpoint_url": proxy.url},
                          budget={"daily_usd": 10, "ledger_dir": f"s3://{bucket}/ledger/"})
        summary = run_job(str(spec), RunOptions(progress=False))
        injected = dict(proxy.injected)
    assert summary.ok == 400 and summary.rows == 400
    assert _ids(bucket, "out/") == [f"r{i:06d}" for i in range(400)]
    assert min(injected.get(f, 0) for f in _CYCLE) >= 3, injected


def test_a_store_that_stays_down_stops_the_job_with_one_line(tmp_path: Path, bucket: str,
                                                             s3_server: str) -> None:
    n = 1500  # 4 s of sending at 8 x 20 ms: under way when the store goes down
    src = upload(make_prompts(tmp_path / "in.parquet", n, row_group=100), bucket,
                 "in/a.parquet")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["BATCHRUN_STORE_ATTEMPTS"] = "3"  # give up sooner than the default 8 tries
    with fault_proxy(S3_URL) as proxy:
        spec = write_spec(tmp_path, input=src, output=f"s3://{bucket}/out/",
                          simulate={"latency_ms": 20}, shard_rows=250, flush_rows=20,
                          limits={"rpm": 1_000_000, "max_concurrency": 8},
                          storage={"endpoint_url": proxy.url})
        cmd = [sys.executable, "-m", "batchrun", "run", str(spec), "--no-progress",
               "--no-dashboard"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 120
        while not [k for k in keys(bucket, "out/parts/")] and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        proxy.plan = lambda method, path, i: "slowdown"  # the store is down from now on
        _, err = proc.communicate(timeout=200)
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert proc.returncode == 3, err[-3000:]
        assert len(lines) == 1 and f"s3://{bucket}/out/" in lines[0], err[-3000:]
        assert "Traceback" not in err
        proxy.plan = lambda method, path, i: None  # back: the rerun finishes the job
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
        assert done.returncode == 0, done.stderr[-3000:]
    assert _ids(bucket, "out/") == [f"r{i:06d}" for i in range(n)]
