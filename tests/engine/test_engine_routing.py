"""The engine's pure core: routing arithmetic, the plan's checks, GPU-time cost. No Ray."""

from __future__ import annotations

import pytest

from batchrun.engine.plan import (
    GpuUsage,
    check_fits,
    command_args,
    cost_cap_reached,
    gpu_cost,
)
from batchrun.engine.routing import SUSPECT_S, ReplicaView, Router, share_of_cap
from batchrun.spec import EngineSpec


def _views(*states: str, nodes: tuple[str, ...] = ()) -> list[ReplicaView]:
    return [ReplicaView(i, s, f"http://h{i}:1/v1", nodes[i] if nodes else f"n{i}", 0)
            for i, s in enumerate(states)]


def test_least_outstanding_first_then_own_node():
    r = Router(share=10, node_id="n1")
    r.update(_views("ready", "ready", "ready"))
    first = r.acquire(0.0)
    assert first is not None and first.index == 1  # a tie: the worker's own node wins
    picked = [r.acquire(0.0).index for _ in range(2)]  # type: ignore[union-attr]
    assert sorted(picked) == [0, 2]  # then the others, least outstanding first
    assert r.outstanding() == {0: 1, 1: 1, 2: 1}
    r.release(0)
    assert r.acquire(0.0).index == 0  # type: ignore[union-attr]


def test_only_ready_replicas_and_the_share_caps_each():
    r = Router(share=2)
    r.update(_views("starting", "ready", "failed"))
    got = [r.acquire(0.0) for _ in range(3)]
    assert [v.index for v in got if v] == [1, 1]
    assert got[2] is None  # replica 1 holds its share; the others cannot take a request
    r.update(_views("ready", "ready", "failed"))  # replica 0 joins when ready
    assert r.acquire(0.0).index == 0  # type: ignore[union-attr]


def test_a_suspected_replica_is_avoided_until_restarted_or_timed_out():
    r = Router(share=5)
    r.update(_views("ready", "ready"))
    v0 = r.acquire(0.0)
    assert v0 is not None and v0.index == 0
    r.release(0)
    r.suspect(v0, now=10.0)
    assert {r.acquire(10.5).index for _ in range(3)} == {1}  # type: ignore[union-attr]
    for _ in range(3):
        r.release(1)
    assert r.acquire(10.0 + SUSPECT_S + 0.1).index == 0  # type: ignore[union-attr]
    r.release(0)
    r.suspect(v0, now=20.0)
    r.update([ReplicaView(0, "ready", "http://h0:2/v1", "n0", 1), _views("ready", "ready")[1]])
    assert r.acquire(20.1).index == 0  # type: ignore[union-attr]  # a new generation


def test_all_failed():
    r = Router(share=1)
    r.update(_views("failed", "starting"))
    assert r.all_failed() is None
    r.update(_views("failed", "failed"))
    assert [v.index for v in r.all_failed() or []] == [0, 1]


@pytest.mark.parametrize("cap,workers", [(128, 3), (8, 2), (7, 7), (5, 3), (100, 1)])
def test_worker_shares_sum_to_the_cap(cap: int, workers: int):
    shares = [share_of_cap(cap, workers, i) for i in range(workers)]
    assert sum(shares) == cap and max(shares) - min(shares) <= 1


def test_share_is_at_least_one():
    assert [share_of_cap(2, 3, i) for i in range(3)] == [1, 1, 1]


def _engine(**kw: object) -> EngineSpec:
    base: dict[str, object] = {"command": "serve --port {port} --host {host} --model {model_path}"
                               " --name {model}", "replicas": 4, "resources": {"GPU": 1, "CPU": 8}}
    base.update(kw)
    return EngineSpec.model_validate(base)


def test_command_placeholders_are_filled_and_not_a_shell():
    e = _engine(model_path="/m/llama 8b")
    assert command_args(e, model="a;rm -rf /", host="10.0.0.2", port=8001) == [
        "serve", "--port", "8001", "--host", "10.0.0.2", "--model", "/m/llama 8b",
        "--name", "a;rm -rf /"]


def test_check_fits_names_what_the_cluster_has():
    e = _engine()
    node = {"GPU": 2.0, "CPU": 16.0}
    assert check_fits(e, {"GPU": 4.0, "CPU": 32.0}, [node, node]) is None
    msg = check_fits(e, {"GPU": 2.0, "CPU": 32.0}, [node])
    assert msg is not None and "asks for 4 GPU" in msg and "the cluster has 2" in msg
    msg = check_fits(_engine(replicas=1, resources={"GPU": 4}), {"GPU": 4.0}, [node, node])
    assert msg is not None and "largest node has 2" in msg
    msg = check_fits(_engine(replicas=2, resources={"CPU": 1, "accel": 1}), {"CPU": 8.0}, [node])
    assert msg is not None and "accel" in msg and "has 0" in msg
    cpu = _engine(replicas=2, resources={"CPU": 2})
    assert check_fits(cpu, {"CPU": 6.0}, [node], worker_cpus=2.0) is None
    msg = check_fits(cpu, {"CPU": 5.0}, [node], worker_cpus=2.0)
    assert msg is not None and "workers 2 more; the cluster has 5" in msg


def test_gpu_cost_per_rows_and_tokens():
    u = GpuUsage(replicas=4, gpus_per_replica=1.0, seconds=1800.0)
    assert u.gpu_hours == pytest.approx(2.0)
    c = gpu_cost(u, 2.5, rows=10_000, output_tokens=2_000_000)
    assert c["cost_usd"] == pytest.approx(5.0)
    assert c["usd_per_1k_rows"] == pytest.approx(0.5)
    assert c["usd_per_1m_output_tokens"] == pytest.approx(2.5)
    none = gpu_cost(u, None, rows=0, output_tokens=0)
    assert none["cost_usd"] is None and none["usd_per_1k_rows"] is None
    assert none["gpu_hours"] == pytest.approx(2.0)


def test_cost_cap_stops_before_the_reservation_passes_it():
    # 2 replicas x 1 GPU at $3.60/h = $0.002/s; a $1 cap is 500 s of reservation
    assert not cost_cap_reached(2, 1.0, 3.6, elapsed_s=480.0, cap_usd=1.0, ahead_s=16.0)
    assert cost_cap_reached(2, 1.0, 3.6, elapsed_s=485.0, cap_usd=1.0, ahead_s=16.0)
    assert not cost_cap_reached(2, 0.0, 3.6, elapsed_s=1e9, cap_usd=1.0, ahead_s=16.0)
