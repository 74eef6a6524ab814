"""Engine jobs end to end on a two-node Ray cluster: the engine is batchrun's simulated
provider (`batchrun mock-server --port {port}`), two replicas, a driver subprocess.

What holds: rows spread over the replicas; a replica killed mid-job is restarted and no
row is lost or answered twice; a replica that never becomes healthy and a command that
exits at once fail the job naming the replica with its log's tail; Ctrl-C mid-job leaves
no process, actor or placement group behind; a job asking for more GPUs than exist is
refused before anything is reserved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from enginekit import (
    REPO,
    engine_command,
    engine_job,
    ledgers,
    processes_with,
    run_driver,
    start_driver,
    summary_of,
    wait_for,
)
from ray.cluster_utils import Cluster

from batchrun.sim.ledger import prompt_key

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Head (3 CPUs, 1 fake GPU) + one node (2 CPUs, 1 fake GPU): Ray schedules GPU
    bundles on declared GPUs whether or not CUDA is there, which is all the placement
    group and the cost arithmetic need."""
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 3, "num_gpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=2, num_gpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def _results(folder: Path) -> list[dict]:
    files = sorted((folder / "out" / "results").glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f, columns=["id", "status"]).to_pylist()]


PING = prompt_key([{"role": "user", "content": "ping"}])  # each start's readiness check


def _ok_keys(records: list[dict]) -> Counter[str]:
    """Rows answered ok by one server: its readiness ping left out."""
    return Counter(r["key"] for r in records if r.get("outcome") == "ok" and r["key"] != PING)


def test_rows_spread_over_replicas_and_gpu_time_is_priced(cluster: Cluster, tmp_path: Path):
    spec = engine_job(tmp_path, 400, {"command": engine_command(tmp_path, "--latency-ms 20"),
                                      "resources": {"CPU": 1, "GPU": 1}},
                      price={"gpu_hour_usd": 3.6})
    rc, _, err = run_driver(spec, cluster.address)
    assert rc == 0, err[-3000:]
    s = summary_of(tmp_path)
    assert s["ok"] == 400 and s["rows"] == 400
    books = ledgers(tmp_path)
    assert len(books) == 2  # one server per replica, none restarted
    per_server = [sum(_ok_keys(recs).values()) for recs in books.values()]
    assert all(n >= 40 for n in per_server), per_server  # both took a real share
    keys = Counter()
    for recs in books.values():
        keys.update(_ok_keys(recs))
    assert len(keys) == 400 and sum(keys.values()) == 400  # every row answered once
    e = s["engine"]
    assert e["replicas"] == 2 and e["gpu_hours"] > 0
    assert e["cost_usd"] == pytest.approx(e["gpu_hours"] * 3.6)
    assert e["usd_per_1k_rows"] == pytest.approx(e["cost_usd"] * 1000 / 400)
    assert e["usd_per_1m_output_tokens"] == pytest.approx(
        e["cost_usd"] * 1e6 / s["completion_tokens"])
    assert processes_with(str(tmp_path)) == []


def test_a_killed_replica_is_restarted_and_no_row_is_lost_or_doubled(cluster: Cluster,
                                                                     tmp_path: Path):
    spec = engine_job(tmp_path, 600, {"command": engine_command(tmp_path, "--latency-ms 60")})
    p = start_driver(spec, cluster.address)
    try:
        wait_for(lambda: sum(len(r) for r in ledgers(tmp_path).values()) >= 150, 120,
                 "the job to be under way")
        victim_file = sorted(ledgers(tmp_path))[0]
        servers = [pid for pid, cmd in processes_with(str(tmp_path / victim_file))
                   if "mock-server" in cmd and "supervise" not in cmd and "env " not in cmd]
        assert len(servers) == 1, servers
        os.kill(servers[0], signal.SIGKILL)
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err[-3000:]
    assert "the server exited; starting it again" in out + err  # the replica's Ray log
    rows = _results(tmp_path)
    ids = Counter(r["id"] for r in rows)
    assert len(ids) == 600 and max(ids.values()) == 1  # nothing lost, no row twice
    assert all(r["status"] == "ok" for r in rows)
    books = ledgers(tmp_path)
    assert len(books) == 3  # the restarted server listens on a port (and ledger) of its own
    dead, others = Counter[str](), Counter[str]()
    for name, recs in books.items():
        (dead if name == victim_file else others).update(_ok_keys(recs))
    # answers the killed server decided but never delivered were sent again elsewhere;
    # every other row was answered exactly once, and at most its share was in flight
    assert len(set(dead) | set(others)) == 600
    assert max(others.values()) == 1 and max(dead.values()) == 1
    assert len([k for k in dead if k in others]) <= 8  # max_concurrency_per_replica
    assert processes_with(str(tmp_path)) == []


def test_a_replica_that_never_becomes_healthy_is_named_with_its_log(cluster: Cluster,
                                                                   tmp_path: Path):
    spec = engine_job(tmp_path, 20, {"command": engine_command(tmp_path),
                                     "health_path": "/not-there", "startup_timeout_s": 8})
    rc, _, err = run_driver(spec, cluster.address)
    assert rc == 5, err[-3000:]
    assert "no engine replica became ready" in err and "engine-0" in err and "engine-1" in err
    assert "not ready within 8 s" in err and "mock provider listening" in err  # the log's tail
    assert not (tmp_path / "out" / "results").exists() or _results(tmp_path) == []
    assert processes_with(str(tmp_path)) == []


def test_a_command_that_exits_at_once_fails_fast(cluster: Cluster, tmp_path: Path):
    cmd = (f"{sys.executable} -c \"import sys; print('boom on {{port}}', '{tmp_path}'); "
           "sys.exit(3)\"")
    spec = engine_job(tmp_path, 20, {"command": cmd, "startup_timeout_s": 120})
    t0 = time.monotonic()
    rc, _, err = run_driver(spec, cluster.address)
    assert rc == 5, err[-3000:]
    assert "exited during start-up" in err and "boom on" in err and "exited with code 3" in err
    assert time.monotonic() - t0 < 100  # it did not wait for startup_timeout_s
    assert processes_with(str(tmp_path)) == []


def _leftovers(address: str, job: str) -> str:
    """The job's named actors and placement groups still alive on the cluster."""
    code = (
        "import ray\n"
        f"ray.init(address={address!r}, namespace='batchrun', log_to_driver=False)\n"
        "from ray.util import placement_group_table\n"
        f"actors = [n for n in ray.util.list_named_actors() if n.startswith('batchrun:{job}:')]\n"
        "pgs = [p['name'] for p in placement_group_table().values() if p['state'] != 'REMOVED']\n"
        "print(actors, pgs)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=REPO, check=True).stdout
    return out.strip().splitlines()[-1]


def test_ctrl_c_mid_job_leaves_nothing_behind(cluster: Cluster, tmp_path: Path):
    spec = engine_job(tmp_path, 3000, {"command": engine_command(tmp_path, "--latency-ms 200")},
                      name="ctrlc-job")
    p = start_driver(spec, cluster.address)
    try:
        wait_for(lambda: sum(len(r) for r in ledgers(tmp_path).values()) >= 40, 120,
                 "the job to be under way")
        assert len(processes_with(str(tmp_path))) >= 4  # 2 supervisors, 2 servers (+ env)
        os.kill(p.pid, signal.SIGINT)
        p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0
    wait_for(lambda: processes_with(str(tmp_path)) == [], 30, "every engine process to end")
    assert _leftovers(cluster.address, "ctrlc-job") == "[] []"


def test_more_gpus_than_the_cluster_has_is_refused_before_reserving(cluster: Cluster,
                                                                     tmp_path: Path):
    spec = engine_job(tmp_path, 20, {"command": engine_command(tmp_path),
                                     "resources": {"GPU": 2, "CPU": 1}})
    rc, _, err = run_driver(spec, cluster.address)
    assert rc == 2, err[-3000:]
    assert "asks for 4 GPU (2 replicas x 2) and the cluster has 2" in err
    assert "Traceback" not in err
    assert processes_with(str(tmp_path)) == []


def test_max_cost_usd_caps_gpu_time(cluster: Cluster, tmp_path: Path):
    # 2 replicas x 1 GPU at $360/h: $0.20 a second; a $5 cap leaves ~9 s of the reservation
    # (the cap is charged 16 s ahead: the next check and the stop), a few seconds of sending
    # at most 2 x 8 rows / 50 ms: under a third of the rows, so the cap stops the job
    rows = 8_000
    spec = engine_job(tmp_path, rows, {"command": engine_command(tmp_path, "--latency-ms 50"),
                                       "resources": {"CPU": 1, "GPU": 1}},
                      price={"gpu_hour_usd": 360.0}, budget={"max_cost_usd": 5.0})
    rc, _, err = run_driver(spec, cluster.address)
    assert rc == 4, err[-3000:]  # budget exhausted
    s = summary_of(tmp_path)
    assert s["budget_exhausted"] and 0 < s["rows"] < rows and s["unsent"] == rows - s["rows"]
    assert s["engine"]["cost_usd"] <= 5.0
    assert processes_with(str(tmp_path)) == []
    # resume, as with an endpoint: the rerun (no cap, fewer rows' worth of latency) sends
    # only the rows left, and every row ends with one result
    engine_job(tmp_path, rows, {"command": engine_command(tmp_path, "--latency-ms 5"),
                                "resources": {"CPU": 1, "GPU": 1}},
               price={"gpu_hour_usd": 360.0})
    rc, _, err = run_driver(spec, cluster.address, timeout=280)
    assert rc == 0, err[-3000:]
    again = summary_of(tmp_path)
    assert again["rows"] == rows and again["rows_this_run"] == rows - s["rows"]
    ids = Counter(r["id"] for r in _results(tmp_path))
    assert len(ids) == rows and max(ids.values()) == 1


def test_preflight_without_a_usable_gpu_fails_naming_the_replica(cluster: Cluster,
                                                                 tmp_path: Path):
    # the cluster's GPUs are declared, not real: commcheck's check must say so, early
    spec = engine_job(tmp_path, 20, {"command": engine_command(tmp_path), "preflight": True,
                                     "resources": {"CPU": 1, "GPU": 1}})
    rc, _, err = run_driver(spec, cluster.address)
    assert rc == 5, err[-3000:]
    assert "preflight" in err and "engine-0" in err and "GPU" in err
    assert "Traceback" not in err
    assert list(tmp_path.glob("ledger-*")) == []  # no server was started
    assert processes_with(str(tmp_path)) == []


def test_a_replica_that_stops_answering_is_restarted(cluster: Cluster, tmp_path: Path):
    # SIGSTOP: the process lives, holds its port and answers nothing (a hung server); with
    # 2 s health checks it is found in 3 x (1 + 2) s rather than the default 3 x (1 + 5) s
    spec = engine_job(tmp_path, 1500, {"command": engine_command(tmp_path, "--latency-ms 60"),
                                       "health_timeout_s": 2})
    p = start_driver(spec, cluster.address)
    try:
        wait_for(lambda: sum(len(r) for r in ledgers(tmp_path).values()) >= 100, 120,
                 "the job to be under way")
        victim_file = sorted(ledgers(tmp_path))[0]
        servers = [pid for pid, cmd in processes_with(str(tmp_path / victim_file))
                   if "mock-server" in cmd and "supervise" not in cmd and "env " not in cmd]
        assert len(servers) == 1, servers
        os.kill(servers[0], signal.SIGSTOP)
        out, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err[-3000:]
    assert "health checks failed in a row; restarting" in out + err
    ids = Counter(r["id"] for r in _results(tmp_path))
    assert len(ids) == 1500 and max(ids.values()) == 1
    # its rows in flight were retried on the other replica once the hung server was ended
    assert processes_with(str(tmp_path)) == []  # the stopped process too (SIGKILL)
