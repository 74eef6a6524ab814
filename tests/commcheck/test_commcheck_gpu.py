"""The CUDA and NVML paths of commcheck, on a real GPU (skipped where there is none).

NOT YET RUN: no GPU machine was lent to the session that wrote these. On a GPU
machine (one is enough: NCCL refuses two ranks on one GPU) they run the real
NVML readings, the device copy and bf16 matmul, and every collective on one
rank, through the local launcher and through a Ray placement group.
"""

from __future__ import annotations

import pytest
import torch

from batchrun.commcheck.collectives import OP_NAMES
from batchrun.commcheck.gpu_probe import collect
from batchrun.commcheck.health import evaluate_gpu, find_model
from batchrun.commcheck.launch import run_ray
from batchrun.commcheck.local import run_local
from batchrun.commcheck.plan import Plan
from batchrun.commcheck.table import format_table

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL_HEALTH = {"copy_bytes": 256 << 20, "matmul_n": 4096, "iters": 5}


def _plan(**kw: object) -> Plan:
    opts: dict[str, object] = {"backend": "nccl", "ops": list(OP_NAMES), "iters": 5,
                               "warmup": 2, "timeout_s": 120.0, "health": True,
                               "health_opts": SMALL_HEALTH}
    opts.update(kw)
    return Plan(world=1, sizes=[1 << 20, 64 << 20], **opts)  # type: ignore[arg-type]


def test_probe_reads_nvml_and_measures_copy_and_matmul() -> None:
    raw = collect(0, **SMALL_HEALTH)
    assert raw["copy_gbps"] > 10 and raw["bf16_tflops"] > 1, raw
    assert "measure_error" not in raw
    pytest.importorskip("pynvml")
    assert "nvml_error" not in raw, raw
    assert raw["uuid"].startswith("GPU-") and raw["device_count"] >= 1
    assert raw["temperature_c"] is not None and raw["power_w"] is not None
    findings = evaluate_gpu(raw, find_model(raw["name"]))
    assert all(f["level"] != "error" for f in findings), findings


@pytest.mark.timeout(300)
def test_one_rank_every_collective_local_launcher() -> None:
    report = run_local(_plan())
    text = format_table(report)
    assert all(r.wrong == 0 and r.status == "ok" for r in report.rows), text
    assert {r.op for r in report.rows} == set(OP_NAMES) - {"sendrecv"}  # needs 2 ranks
    reduce = [r for r in report.rows if r.op == "all_reduce"]
    assert all(r.oop_busbw == 0.0 for r in reduce)  # one rank: no bus
    big = reduce[-1]
    assert big.copy_gbps and 0.5 < (big.oop_algbw or 0) / big.copy_gbps < 1.5, text
    assert report.health and report.health[0]["copy_gbps"], text


@pytest.mark.timeout(300)
def test_one_rank_through_a_ray_placement_group(ray_local: None) -> None:
    report = run_ray(_plan(ops=["all_reduce"]))
    assert report.rows and all(r.wrong == 0 for r in report.rows), format_table(report)
    assert report.ranks[0]["gpu_name"] and report.ranks[0]["nccl"]
