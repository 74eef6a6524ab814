"""GPU health verdicts from recorded figures (the pure part of --health).

The readings below have the shape gpu_probe.collect() returns on an 8x H100 SXM
(HGX) node. The copy figure, 1,490 GB/s, is the one measured on an H100 80GB
HBM3 (FACTS.md); the matmul, temperature and power figures are typical values
for that GPU after a short burn, not measurements of this project. Each test
changes one reading the way a sick GPU shows it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from batchrun.commcheck.export import prometheus_text
from batchrun.commcheck.gpu_probe import nvml_readings
from batchrun.commcheck.health import (
    MODELS,
    evaluate_health,
    find_model,
    reference_busbw,
)
from batchrun.commcheck.report import Report
from batchrun.commcheck.table import format_table

H100 = "NVIDIA H100 80GB HBM3"


def _gpu(i: int, **changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": H100, "uuid": f"GPU-5a1c{i:04x}-0b8e-7d2f-91aa-0000000000{i:02d}", "index": i,
        "device_count": 8,
        "ecc": {"uncorrected_volatile": 0, "uncorrected_aggregate": 0},
        "remapped_rows": {"correctable": 0, "uncorrectable": 0, "pending": False,
                          "failure": False},
        "retired_pages_pending": None,  # NotSupported on Hopper (row remapping instead)
        "throttle_reasons": 0x4 if i % 3 == 0 else 0x0,  # SW power cap under the burn
        "temperature_c": 44 + i, "slowdown_temp_c": 87,
        "power_w": 312.5 + i, "power_limit_w": 700.0, "default_power_limit_w": 700.0,
        "nvlink": {"present": 18, "active": 18, "inactive": []},
        "copy_gbps": 1490.0 - 3 * i, "bf16_tflops": 702.0 + 2 * i,
    }
    raw.update(changes)
    return raw


def _node(changes: dict[int, dict[str, Any]] | None = None, node: str = "10.0.0.7",
          first: int = 0) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    raws = {first + i: _gpu(i, **(changes or {}).get(i, {})) for i in range(8)}
    infos = {first + i: {"node": node, "gpu_ids": [str(i)], "gpu_name": H100}
             for i in range(8)}
    return raws, infos


def _failures(raws: dict[int, dict[str, Any]], infos: dict[int, dict[str, Any]],
              expected: int | None = None) -> list[str]:
    _, _, failures = evaluate_health(raws, infos, expected)
    return [f"{f.kind} {f.check} {f.reason}" for f in failures]


def test_reference_table_matches_nvml_names() -> None:
    assert find_model(H100).key == "H100-SXM5-80GB"  # type: ignore[union-attr]
    assert find_model("NVIDIA H100 PCIe").key == "H100-PCIe"  # type: ignore[union-attr]
    assert find_model("NVIDIA H100 NVL").key == "H100-NVL"  # type: ignore[union-attr]
    assert find_model("NVIDIA H200").key == "H200-SXM"  # type: ignore[union-attr]
    assert find_model("NVIDIA H200 NVL").key == "H200-NVL"  # type: ignore[union-attr]
    assert find_model("NVIDIA A100-SXM4-80GB").key == "A100-SXM4-80GB"  # type: ignore[union-attr]
    assert find_model("NVIDIA A100 80GB PCIe").key == "A100-80GB-PCIe"  # type: ignore[union-attr]
    assert find_model("NVIDIA GH200 480GB") is None and find_model("Tesla V100") is None
    assert all(m.source and m.hbm_gbps > 1000 and m.bf16_tflops > 300 for m in MODELS)
    floor, source = reference_busbw(H100)
    assert floor == pytest.approx(0.65 * 450) and "H100 datasheet" in source
    assert reference_busbw("NVIDIA H100 PCIe") == (None, "")


def test_healthy_node_passes_with_power_cap_as_a_warning() -> None:
    raws, infos = _node()
    gpus, counts, failures = evaluate_health(raws, infos)
    assert failures == []
    assert all(g["healthy"] for g in gpus)
    assert gpus[0]["copy_ref_gbps"] == pytest.approx(1675.0)  # half of 3,350 GB/s HBM3
    assert [f["check"] for f in gpus[0]["findings"]] == ["throttle"]  # SW power cap: warn
    assert counts == [{"node": "10.0.0.7", "ranks": 8, "nvml": 8, "expected": 8}]


def test_slow_copy_is_named_against_reference_and_median() -> None:
    raws, infos = _node({3: {"copy_gbps": 1100.0}})
    found = _failures(raws, infos)
    assert len(found) == 2 and all(f.startswith("unhealthy gpu_health node 10.0.0.7 GPU 3 "
                                                "(GPU-5a1c0003-") for f in found)
    assert "device copy 1100.0 GB/s is 66% of the H100-SXM5-80GB reference" in found[0]
    assert "device copy 1100 GB/s is 25% below the median 1476 of 8 " + H100 in found[1]


def test_matmul_below_median_but_above_floor_is_still_named() -> None:
    raws, infos = _node({5: {"bf16_tflops": 560.0}})  # above 55% of 989.5, 21% under peers
    found = _failures(raws, infos)
    assert len(found) == 1 and "GPU 5" in found[0]
    assert "bf16 matmul 560 TFLOPS is 21% below the median 707" in found[0]


@pytest.mark.parametrize(("change", "needle"), [
    ({"ecc": {"uncorrected_volatile": 2, "uncorrected_aggregate": 2}},
     "2 uncorrectable ECC errors since the last reset"),
    ({"remapped_rows": {"correctable": 0, "uncorrectable": 1, "pending": True,
                        "failure": False}}, "a row remap is pending: reset the GPU"),
    ({"remapped_rows": {"correctable": 0, "uncorrectable": 9, "pending": False,
                        "failure": True}}, "row remapping failed"),
    ({"throttle_reasons": 0x40 | 0x4}, "clocks held down: HW thermal slowdown"),
    ({"throttle_reasons": 0x8}, "clocks held down: HW slowdown"),
    ({"temperature_c": 85}, "85 C, slowdown at 87 C"),
    ({"nvlink": {"present": 18, "active": 16, "inactive": [4, 11]}},
     "16 of 18 NVLink links active (down: [4, 11])"),
])
def test_nvml_findings_fail_the_gpu(change: dict[str, Any], needle: str) -> None:
    raws, infos = _node({6: change})
    found = _failures(raws, infos)
    assert any(needle in f and "GPU 6" in f and f.startswith("unhealthy") for f in found), found


def test_power_limit_below_default_is_a_warning_only() -> None:
    raws, infos = _node({2: {"power_limit_w": 500.0}})
    gpus, _, failures = evaluate_health(raws, infos)
    assert failures == [] and gpus[2]["healthy"]
    assert any("power limit 500 W of a default 700 W" in f["message"]
               for f in gpus[2]["findings"])


def test_missing_gpu_on_a_node_is_named() -> None:
    raws_a, infos_a = _node()
    raws_b, infos_b = _node(node="10.0.0.8", first=8)
    for raw in raws_b.values():
        raw["device_count"] = 7  # NVML on that node sees one GPU fewer
    raws, infos = {**raws_a, **raws_b}, {**infos_a, **infos_b}
    assert _failures(raws, infos) == [
        "unhealthy gpu_count node 10.0.0.8 has 7 GPUs, 8 expected"]
    assert _failures(raws_a, infos_a, expected=9) == [
        "unhealthy gpu_count node 10.0.0.7 has 8 GPUs, 9 expected"]


def test_nvml_unavailable_means_could_not_run() -> None:
    raws, infos = _node({1: {"nvml_error": "nvmlInit failed: Driver Not Loaded"}})
    found = _failures(raws, infos)
    assert found == ["could_not_run gpu_health node 10.0.0.7 GPU 1 (GPU-5a1c0001-0b8e-7d2f-"
                     "91aa-000000000001): NVML unavailable: nvmlInit failed: Driver Not Loaded"]


def test_health_in_the_report_table_json_and_prometheus() -> None:
    raws, infos = _node({3: {"copy_gbps": 1100.0}})
    report = Report(settings={}, world_size=8)
    report.health, report.node_gpus, failures = evaluate_health(raws, infos)
    report.failures.extend(failures)
    assert report.exit_code == 1
    text = format_table(report)
    assert "# GPU health" in text and "1100 (66%)" in text and "  FAIL — " in text
    assert "# node 10.0.0.7: 8 GPUs seen by NVML, 8 expected, 8 ranks" in text
    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(report))}
    healthy = {s.labels["gpu"]: s.value for s in families["batchrun_commcheck_gpu_healthy"].samples}
    assert healthy["3"] == 0.0 and healthy["0"] == 1.0
    copies = families["batchrun_commcheck_gpu_copy_gbps"].samples
    assert copies[3].value == 1100.0 and copies[3].labels["model"] == "H100-SXM5-80GB"
    checks = [f["check"] for f in report.to_dict()["health"][3]["findings"]]
    assert checks == ["throttle", "copy_gbps", "copy_gbps"]


def test_health_figures_are_not_changed_by_evaluation() -> None:
    raws, infos = _node()
    before = copy.deepcopy(raws)
    evaluate_health(raws, infos)
    assert raws == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path of a real NVML call")
def test_real_nvml_call_without_a_gpu_says_why() -> None:
    readings = nvml_readings(0)  # real pynvml (or its absence): no NVML library here
    assert set(readings) == {"nvml_error"}
    assert "NVML" in readings["nvml_error"] or "batchrun[gpu]" in readings["nvml_error"]
