"""commcheck across two Ray nodes (ray.cluster_utils.Cluster, as Ray's own tests do).

The two nodes share this machine's IP, so commcheck labels them ip/node-id.
Runs in a subprocess: the test session already holds its own local Ray, and a
second cluster cannot live in the same driver. Real Ray, real gloo.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from batchrun.commcheck.cli import build_plan
from batchrun.commcheck.launch import run_ray

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2,
                                                        "include_dashboard": False})
try:
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    plan = build_plan(4, backend="gloo", strategy="SPREAD", min_bytes="1K", max_bytes="16K",
                      factor=4, iters=5, warmup=1, timeout_s=30, cpus_per_rank=0.5,
                      rank_bytes="16K", pairwise=True, fault="slow:3:20")
    report = run_ray(plan)
    out = {"status": report.status, "named": (report.rank_check or {}).get("named"),
           "nodes": report.topology.get("nodes"),
           "node_of": {i["rank"]: i["node"] for i in report.ranks},
           "groups": sorted({r.group for r in report.groups}),
           "pairwise": sorted({r.group for r in report.pairwise}),
           "localisation": report.localisation,
           "failures": [(f.check, f.reason) for f in report.all_failures()]}
    print("RESULT " + json.dumps(out))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.timeout(150)
def test_two_nodes_slow_rank_named_with_node_groups_and_node_pairs() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=140)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(line[len("RESULT "):])
    assert data["nodes"] == 2 and data["status"] == "unhealthy"
    assert data["named"] == [3]
    node_of = {int(k): v for k, v in data["node_of"].items()}
    assert len(set(node_of.values())) == 2 and all("/" in n for n in node_of.values())
    # triggered by the named rank: each node's own group, then the node pair
    assert {f"node {n}" for n in node_of.values()} <= set(data["groups"])
    assert "without 3" in data["groups"]
    a, b = sorted(set(node_of.values()), key=lambda n: min(r for r in node_of
                                                           if node_of[r] == n))
    assert data["pairwise"] == [f"{a}<->{b}"]
    assert any(x.startswith("each node's own group:") for x in data["localisation"])
    assert any(x.startswith("node pairs (one rank per node):") for x in data["localisation"])
    assert [c for c, _ in data["failures"]] == ["rank_outlier"]
