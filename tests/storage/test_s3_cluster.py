"""A job on a 3-node Ray cluster (``ray.cluster_utils.Cluster``) with its input and output
on the S3 server: each worker, one per node, reads its own shards from the store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_prompts, write_spec
from tests.storage.conftest import S3_URL, keys, upload

pytestmark = pytest.mark.timeout(300)

# three nodes of one CPU each: three workers of one CPU each land one per node
CLUSTER = r"""
import sys
import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                        "include_dashboard": False})
try:
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cpus = sorted(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    ray.shutdown()
    print(f"ADDRESS {cluster.address} {cpus}", flush=True)
    sys.stdin.read()
finally:
    cluster.shutdown()
"""


def test_a_job_on_three_nodes_with_s3_input_and_output(tmp_path: Path, bucket: str,
                                                       s3_server: str) -> None:
    n = 900
    for i in range(3):
        upload(make_prompts(tmp_path / f"in{i}.parquet", n // 3, start=i * n // 3,
                            row_group=50), bucket, f"in/part-{i}.parquet")
    spec = write_spec(tmp_path, input=f"s3://{bucket}/in/", output=f"s3://{bucket}/out/",
                      simulate={"latency_ms": 5}, workers=3, shard_rows=100)
    host = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        assert line.startswith("ADDRESS "), f"the cluster did not start: {line!r}"
        address = line.split()[1]
        assert line.split(" ", 2)[2].strip() == "[1.0, 1.0, 1.0]"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run([sys.executable, "-m", "batchrun", "run", str(spec),
                               "--address", address, "--no-progress"],
                              env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        assert host.stdin is not None
        host.stdin.close()
        try:
            host.wait(timeout=60)
        except subprocess.TimeoutExpired:
            host.kill()
    fs = pafs.S3FileSystem(endpoint_override=S3_URL, region="us-east-1")
    finals = [f"{bucket}/{k}" for k in keys(bucket, "out/results/")]
    assert len(finals) == 9
    ids = pq.read_table(finals, filesystem=fs)["id"].to_pylist()
    assert sorted(ids) == [f"r{i:06d}" for i in range(n)]
