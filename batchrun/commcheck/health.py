"""Per-GPU health verdicts from recorded figures (pure: gpu_probe.py takes the readings).

Reference table (datasheet peaks; "dense" is half the datasheet's with-sparsity figure):

- A100: NVIDIA A100 Tensor Core GPU datasheet,
  https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
  (BF16 Tensor Core 312 TFLOPS dense; HBM 1,555 GB/s 40GB, 1,935 GB/s 80GB PCIe,
  2,039 GB/s 80GB SXM; NVLink 600 GB/s, 12 links).
- H100: NVIDIA H100 Tensor Core GPU datasheet,
  https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
  (BF16 1,979 / 1,671 / 1,513 TFLOPS with sparsity for SXM / NVL / PCIe; HBM 3.35 /
  3.9 / 2 TB/s; NVLink 900 GB/s on SXM, 18 links).
- H200: NVIDIA H200 product page and datasheet, https://www.nvidia.com/en-us/data-center/h200/
  (BF16 1,979 / 1,671 TFLOPS with sparsity for SXM / NVL; HBM3e 4.8 TB/s; NVLink
  900 GB/s on SXM).

A device copy reads and writes every byte, so its one-way rate (bytes / time, as
commcheck and nccl-tests count it) is at best half the HBM figure; FACTS.md
measured 1,490 GB/s on an H100 80GB HBM3, 89% of that ceiling. The floors below
are thresholds chosen for a health check (a GPU under them is sick, not merely
a little slow), not measurements; the median comparison catches the rest.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Any

from batchrun.commcheck.report import COULD_NOT_RUN, UNHEALTHY, Failure

__all__ = ["MODELS", "GpuModel", "evaluate_gpu", "evaluate_health", "find_model",
           "reference_busbw"]

COPY_FLOOR = 0.75  # of half the HBM peak
MATMUL_FLOOR = 0.55  # of the dense bf16 peak (cuBLAS on 8192^3 reaches ~60-90%)
NVLINK_BUSBW_FLOOR = 0.65  # of one direction of NVLink, for one node's busbw
MEDIAN_TOL = 0.10  # a GPU 10% below the median of its model in this run is named
HOT_MARGIN_C = 5  # within 5 C of the slowdown temperature
BAD_THROTTLE = {0x8: "HW slowdown", 0x20: "SW thermal slowdown", 0x40: "HW thermal slowdown",
                0x80: "HW power brake"}
POWER_CAP = 0x4  # SW power cap: normal under a matmul burn, reported, not failed

_A100 = "NVIDIA A100 datasheet"
_H100 = "NVIDIA H100 datasheet"
_H200 = "NVIDIA H200 datasheet"


@dataclass(frozen=True)
class GpuModel:
    key: str
    pattern: str  # regex on the lower-cased NVML / torch device name
    hbm_gbps: float
    bf16_tflops: float  # dense
    nvlink_links: int | None  # active links a healthy SXM GPU has; None: not checked
    nvlink_gbps: float | None  # one direction, per GPU
    source: str

    @property
    def copy_gbps(self) -> float:
        return self.hbm_gbps / 2


MODELS: tuple[GpuModel, ...] = (
    GpuModel("A100-SXM4-40GB", r"a100-sxm4-40gb", 1555, 312, 12, 300, _A100),
    GpuModel("A100-SXM4-80GB", r"a100-sxm4-80gb", 2039, 312, 12, 300, _A100),
    GpuModel("A100-PCIE-40GB", r"a100-pcie-40gb", 1555, 312, None, None, _A100),
    GpuModel("A100-80GB-PCIe", r"a100 80gb pcie", 1935, 312, None, None, _A100),
    GpuModel("H100-SXM5-80GB", r"h100 80gb hbm3|h100-sxm", 3350, 989.5, 18, 450, _H100),
    GpuModel("H100-NVL", r"h100 nvl", 3900, 835.5, None, None, _H100),
    GpuModel("H100-PCIe", r"h100 pcie", 2000, 756.5, None, None, _H100),
    GpuModel("H200-NVL", r"(?<![a-z])h200 nvl", 4800, 835.5, None, None, _H200),
    GpuModel("H200-SXM", r"(?<![a-z])h200(?! nvl)", 4800, 989.5, 18, 450, _H200),
)


def find_model(name: str | None) -> GpuModel | None:
    if not name:
        return None
    low = name.lower()
    return next((m for m in MODELS if re.search(m.pattern, low)), None)


def reference_busbw(name: str | None) -> tuple[float | None, str]:
    """Lowest healthy one-node busbw for a model with NVLink, and where the figure comes from."""
    model = find_model(name)
    if model is None or model.nvlink_gbps is None:
        return None, ""
    return NVLINK_BUSBW_FLOOR * model.nvlink_gbps, (
        f"{NVLINK_BUSBW_FLOOR:.0%} of {model.nvlink_gbps:g} GB/s one-way NVLink, {model.source}")


def _finding(level: str, check: str, message: str) -> dict[str, str]:
    return {"level": level, "check": check, "message": message}


def _nvml_findings(raw: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    ecc = raw.get("ecc") or {}
    if ecc.get("uncorrected_volatile"):
        out.append(_finding("fail", "ecc", f"{ecc['uncorrected_volatile']} uncorrectable ECC "
                            "errors since the last reset"))
    elif ecc.get("uncorrected_aggregate"):
        out.append(_finding("warn", "ecc", f"{ecc['uncorrected_aggregate']} uncorrectable ECC "
                            "errors over the GPU's life"))
    rows = raw.get("remapped_rows") or {}
    if rows.get("failure"):
        out.append(_finding("fail", "remap", "row remapping failed: the GPU needs service"))
    elif rows.get("pending"):
        out.append(_finding("fail", "remap", "a row remap is pending: reset the GPU"))
    if raw.get("retired_pages_pending"):
        out.append(_finding("fail", "remap", "a page retirement is pending: reset the GPU"))
    reasons = raw.get("throttle_reasons") or 0
    bad = [name for bit, name in BAD_THROTTLE.items() if reasons & bit]
    if bad:
        out.append(_finding("fail", "throttle", "clocks held down: " + ", ".join(bad)))
    elif reasons & POWER_CAP:
        out.append(_finding("warn", "throttle", "at its software power cap"))
    temp, slow = raw.get("temperature_c"), raw.get("slowdown_temp_c")
    if temp is not None and slow and temp >= slow - HOT_MARGIN_C:
        out.append(_finding("fail", "temperature", f"{temp} C, slowdown at {slow} C"))
    limit, default = raw.get("power_limit_w"), raw.get("default_power_limit_w")
    if limit and default and limit < 0.9 * default:
        out.append(_finding("warn", "power", f"power limit {limit:.0f} W of a default "
                            f"{default:.0f} W"))
    return out


def evaluate_gpu(raw: dict[str, Any], model: GpuModel | None) -> list[dict[str, str]]:
    """Findings for one GPU against its model's reference (no peers needed)."""
    if raw.get("nvml_error"):
        out = [_finding("error", "nvml", f"NVML unavailable: {raw['nvml_error']}")]
    else:
        out = _nvml_findings(raw)
    if raw.get("measure_error"):
        out.append(_finding("error", "measure", raw["measure_error"]))
    links = (raw.get("nvlink") or {}).get("active")
    if model and model.nvlink_links and links is not None and links < model.nvlink_links:
        out.append(_finding("fail", "nvlink", f"{links} of {model.nvlink_links} NVLink links "
                            f"active (down: {(raw.get('nvlink') or {}).get('inactive')})"))
    if model is None:
        return out
    for key, floor, ref, unit, what in (
            ("copy_gbps", COPY_FLOOR, model.copy_gbps, "GB/s", "device copy"),
            ("bf16_tflops", MATMUL_FLOOR, model.bf16_tflops, "TFLOPS", "bf16 matmul")):
        value = raw.get(key)
        if value is not None and value < floor * ref:
            out.append(_finding("fail", key, f"{what} {value:.1f} {unit} is {value / ref:.0%} of "
                                f"the {model.key} reference {ref:g} (floor {floor:.0%}; "
                                f"{model.source})"))
    return out


def _versus_median(gpus: list[dict[str, Any]]) -> None:
    """Name GPUs more than MEDIAN_TOL below the median of the same model in this run."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for gpu in gpus:
        by_model.setdefault(gpu["name"] or "?", []).append(gpu)
    for name, same in by_model.items():
        if len(same) < 3:
            continue  # two GPUs: which one is slow cannot be told from a median
        for key, unit, what in (("copy_gbps", "GB/s", "device copy"),
                                ("bf16_tflops", "TFLOPS", "bf16 matmul"),
                                ("nvlink_active", "links", "active NVLink")):
            values = [g[key] for g in same if g.get(key) is not None]
            if len(values) < 3:
                continue
            median = statistics.median(values)
            for gpu in same:
                value = gpu.get(key)
                if value is not None and median and value < (1 - MEDIAN_TOL) * median:
                    gpu["findings"].append(_finding(
                        "fail", key, f"{what} {value:.4g} {unit} is {1 - value / median:.0%} "
                        f"below the median {median:.4g} of {len(values)} {name}"))


def _gpu_entry(rank: int, raw: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    name = raw.get("name") or info.get("gpu_name")
    model = find_model(name)
    index = raw.get("index")
    if index is None and info.get("gpu_ids"):
        index = info["gpu_ids"][0]
    return {"rank": rank, "node": info.get("node", "?"), "gpu": index, "uuid": raw.get("uuid"),
            "name": name, "model": model.key if model else None,
            "copy_gbps": raw.get("copy_gbps"), "bf16_tflops": raw.get("bf16_tflops"),
            "copy_ref_gbps": model.copy_gbps if model else None,
            "bf16_ref_tflops": model.bf16_tflops if model else None,
            "nvlink_active": (raw.get("nvlink") or {}).get("active"),
            "temperature_c": raw.get("temperature_c"), "power_w": raw.get("power_w"),
            "throttle_reasons": raw.get("throttle_reasons"),
            "raw": raw, "findings": evaluate_gpu(raw, model)}


def _node_counts(gpus: list[dict[str, Any]], expected: int | None) -> list[dict[str, Any]]:
    counts: dict[str, dict[str, Any]] = {}
    for gpu in gpus:
        entry = counts.setdefault(gpu["node"], {"node": gpu["node"], "ranks": 0, "nvml": None})
        entry["ranks"] += 1
        found = gpu["raw"].get("device_count")
        if found is not None:
            entry["nvml"] = max(entry["nvml"] or 0, found)
    known = [c["nvml"] for c in counts.values() if c["nvml"] is not None]
    want = expected if expected is not None else (max(known) if known else None)
    for entry in counts.values():
        entry["expected"] = want
    return list(counts.values())


def _where(gpu: dict[str, Any]) -> str:
    return f"node {gpu['node']} GPU {gpu['gpu']} ({gpu['uuid'] or 'uuid unknown'})"


def evaluate_health(raws: dict[int, dict[str, Any]], infos: dict[int, dict[str, Any]],
                    expected_per_node: int | None = None
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Failure]]:
    """(one entry per GPU, GPU count per node, failures) from every rank's readings."""
    gpus = [_gpu_entry(rank, raws[rank], infos.get(rank, {})) for rank in sorted(raws)]
    _versus_median(gpus)
    failures = []
    for gpu in gpus:
        for f in gpu["findings"]:
            if f["level"] in ("fail", "error"):
                kind = UNHEALTHY if f["level"] == "fail" else COULD_NOT_RUN
                failures.append(Failure("gpu_health", kind, f"{_where(gpu)}: {f['message']}"))
        gpu["healthy"] = not any(f["level"] == "fail" for f in gpu["findings"])
    counts = _node_counts(gpus, expected_per_node)
    for c in counts:
        if c["nvml"] is not None and c["expected"] is not None and c["nvml"] < c["expected"]:
            failures.append(Failure("gpu_count", UNHEALTHY, f"node {c['node']} has {c['nvml']} "
                                    f"GPUs, {c['expected']} expected"))
    return gpus, counts, failures
