"""Two drivers on one S3 output, and ``kill -9`` of the driver mid-run, then a rerun:
the second driver refuses, the rerun re-sends at most the rows in flight or not yet
checkpointed (the simulated provider's request ledger counts them)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batchrun.sim import MockConfig, start_subprocess
from tests.conftest import make_prompts, write_spec
from tests.online.test_driver_crash import _ours, _settled, _wait, own_ray_tmpdir
from tests.storage.conftest import S3_URL, keys, s3_client, upload

pytestmark = pytest.mark.timeout(300)

N = 3000
CONCURRENCY = 16
FLUSH_ROWS = 20
SHARD_ROWS = 375  # 8 shards


def _fs() -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=S3_URL, region="us-east-1")


def _checkpointed(bucket: str) -> int:
    n = 0
    for k in keys(bucket, "out/parts/") + keys(bucket, "out/results/"):
        with contextlib.suppress(OSError):  # merged and deleted while we looked
            n += pq.read_metadata(f"{bucket}/{k}", filesystem=_fs()).num_rows
    return n


def test_second_driver_refuses_and_kill_9_then_rerun_resends_little(
        tmp_path: Path, bucket: str, s3_server: str) -> None:
    src = upload(make_prompts(tmp_path / "in.parquet", N, row_group=SHARD_ROWS), bucket,
                 "in/a.parquet")
    with own_ray_tmpdir() as raytmp, start_subprocess(MockConfig(latency_ms=20)) as server:
        spec = write_spec(tmp_path, input=src, output=f"s3://{bucket}/out/",
                          endpoint={"base_url": server.base_url}, flush_rows=FLUSH_ROWS,
                          shard_rows=SHARD_ROWS,
                          limits={"rpm": 1_000_000, "max_concurrency": CONCURRENCY})
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = raytmp
        cmd = [sys.executable, "-m", "batchrun", "run", str(spec), "--no-progress",
               "--no-dashboard"]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: _checkpointed(bucket) >= 600 or proc.poll() is not None, 150,
              "checkpoints")
        # a second driver of the same job on the same output: refused, sends nothing
        lease = json.loads(s3_client().get_object(Bucket=bucket, Key="out/lease.json")
                           ["Body"].read())
        assert lease["pid"] == proc.pid
        before = server.stats()["total_requests"]
        second = subprocess.run(cmd, env={**env, "RAY_TMPDIR": raytmp + "-2"},
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "another driver of this job holds it" in second.stderr
        assert f"pid {proc.pid}" in second.stderr
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert before <= server.stats()["total_requests"]
        _settled(server)
        paid = server.stats()["ok"]
        assert paid < N, "the job finished before the kill: the test proves nothing"
        for p in _ours(raytmp):
            with contextlib.suppress(psutil.Error):
                p.kill()
        # the rerun takes over the dead driver's lease (same host, its process is gone)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
        assert done.returncode == 0, done.stderr[-2000:]
        stats = server.stats()
    finals = [f"{bucket}/{k}" for k in keys(bucket, "out/results/")]
    ids = pq.read_table(finals, filesystem=_fs())["id"].to_pylist()
    assert sorted(ids) == [f"r{i:06d}" for i in range(N)]  # one result row per input row
    assert stats["distinct_ok_prompts"] == N
    bound = CONCURRENCY + 2 * (2 * FLUSH_ROWS)  # as tests/online/test_driver_crash.py
    assert stats["duplicate_ok_prompts"] <= bound, (
        f"{stats['duplicate_ok_prompts']} answers paid twice; at most {bound} allowed")
    assert not keys(bucket, "out/parts/") and "out/lease.json" not in keys(bucket, "out/")
